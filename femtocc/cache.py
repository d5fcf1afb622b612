"""Where femtocc keeps converted models and exported graphs, and how it writes files.

The cache root is ``$FEMTOCC_CACHE`` if set, else ``$XDG_CACHE_HOME/femtocc``, else
``~/.cache/femtocc``. Every write goes through :func:`atomic_write` or :func:`atomic_dir` so that
an interrupted run never leaves a half-written file where a complete one is expected; both give
the result the permissions of the user's umask. An output folder a command is asked to write is
checked by :func:`check_output_dir` before any work: it replaces only an empty folder or an
earlier femtocc output of the same kind (recognised by its manifest), and never the current
directory, one of its parents, the home directory or ``/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from femtocc.errors import FemtoccError

# kind of output folder -> (manifest file, the value of its "format" key starts with this)
OUTPUT_KINDS = {
    "build": ("build.json", "femtocc-build/"),
    "model": ("femtocc.json", "femtocc-whisper"),
    "import": ("femtocc-import.json", "femtocc-import/"),
}


def cache_root() -> Path:
    if os.environ.get("FEMTOCC_CACHE"):
        return Path(os.environ["FEMTOCC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "femtocc"


def sha256_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    """One digest over the concatenated bytes of ``paths`` (split weight packages hash as one)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_kind(folder: Path) -> str | None:
    """Which kind of femtocc output ``folder`` is (by its manifest), or None."""
    import json

    for kind, (name, prefix) in OUTPUT_KINDS.items():
        try:
            manifest = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(prefix):
            return kind
    return None


def _never_replaced(resolved: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the root directory"
    if resolved == Path.home().resolve():
        return "the home directory"
    if resolved == cwd:
        return "the current directory"
    if resolved in cwd.parents:
        return "a parent of the current directory"
    return None


def existing_parent(path: Path) -> Path:
    """The nearest parent of ``path`` that exists (where creating ``path`` would start)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_dir(path: str | os.PathLike, kind: str, force: bool = False, option: str = "-o") -> Path:
    """Check, before any work, that ``path`` may become a femtocc output folder of ``kind``.

    Allowed: a path that does not exist yet (its nearest existing parent must be a writable
    folder), an empty folder, or an earlier output of the same ``kind``; anything else only with
    ``force``. The root, the home directory, the current directory and its parents are refused
    always, and so is an existing file or a symbolic link at ``path``.
    """
    path = Path(path).expanduser()
    resolved = path.resolve()
    what = _never_replaced(resolved)
    if what:
        raise FemtoccError(f"{option} {path}: is {what}; femtocc replaces its output folder whole, so give a new folder")
    if path.is_symlink():
        raise FemtoccError(f"{option} {path}: is a symbolic link; give the folder itself")
    if path.exists():
        if not path.is_dir():
            raise FemtoccError(f"{option} {path}: a file of that name exists; give a folder")
        found = output_kind(path)
        if found != kind and any(path.iterdir()) and not force:
            manifest = OUTPUT_KINDS[kind][0]
            was = f"a femtocc {found} folder" if found else f"not a femtocc {kind} folder (no {manifest})"
            raise FemtoccError(f"{option} {path}: exists and is {was}; it would be replaced: choose another "
                               "folder, or pass --force to replace it")
    parent = existing_parent(resolved)
    if not parent.is_dir():
        raise FemtoccError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FemtoccError(f"{option} {path}: cannot create it, {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.
    The file gets the permissions the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory under a temporary name; it appears at ``path`` only when complete, with
    the permissions the umask gives a new folder. An existing folder at ``path`` is replaced (the
    commands check it with :func:`check_output_dir` first); the current directory, its parents,
    the home directory and the root never are."""
    path = Path(path).expanduser()
    what = _never_replaced(path.resolve())
    if what:
        raise FemtoccError(f"{path}: is {what}; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if path.is_dir() and not path.is_symlink():  # swap, then delete: the old folder stays whole until then
            import shutil

            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        if path.is_symlink() or path.exists():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
