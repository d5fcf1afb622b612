"""What every benchmark records beside its numbers: the command and the machine."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys


def header() -> dict:
    return {
        "command": "python " + shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }


def write_result(path, result: dict) -> None:
    from femtocc.cache import atomic_write

    with atomic_write(path, "w") as f:
        json.dump({**header(), **result}, f, indent=2)


def femtocc(*args: str) -> None:
    """Run one femtocc command in a process (quiet; its printout discarded), failing loudly."""
    subprocess.run([sys.executable, "-m", "femtocc", *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)
