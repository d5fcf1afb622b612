"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar redraws itself with carriage returns, which fills a CI log or a ``> log 2>&1`` file with
fragments; so when the stream is not a terminal, a loop prints one line every
``PLAIN_EVERY_S`` seconds instead (``desc: done/total unit, elapsed``) and a last line if it printed
any. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

PLAIN_EVERY_S = 30.0


def progress(items: Iterable, desc: str, unit: str = "item", enabled: bool = True, total: int | None = None,
             stream=None, every_s: float = PLAIN_EVERY_S) -> Iterable:
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=stream)
    return _plain(items, desc, unit, total, stream, every_s)


def _plain(items: Iterable, desc: str, unit: str, total: int | None, stream, every_s: float) -> Iterator:
    start = last = time.monotonic()
    done, printed = 0, False
    of = f"/{total}" if total is not None else ""
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            print(f"{desc}: {done}{of} {unit} ({now - start:.0f} s)", file=stream, flush=True)
            last, printed = now, True
    if printed:
        print(f"{desc}: {done}{of} {unit} done ({time.monotonic() - start:.0f} s)", file=stream, flush=True)
