"""Reader for CTranslate2's ``model.bin`` (binary format version 6).

Layout, all little-endian: ``u32 version``, ``str spec_name``, ``u32 spec_revision``,
``u32 n_variables``, then per variable ``str name, u8 rank, u32 dims[rank], u8 dtype,
u32 nbytes, bytes``; then ``u32 n_aliases`` and per alias ``str alias, str target``.
A ``str`` is ``u16 length`` (including a trailing NUL) followed by that many bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SUPPORTED_VERSION = 6


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FemtoccError(
                f"{self.source}: truncated CTranslate2 model at byte {self.pos} "
                f"(wanted {n} more bytes, file has {len(self.data)})"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        return raw.rstrip(b"\0").decode("utf-8")


def read_model_bin(parts: list[Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Read a model.bin (given as one path, or as the split parts of one file, in order).

    Returns the spec name and the variables, aliases resolved, scalars as 0-d arrays.
    """
    source = " + ".join(str(p) for p in parts)
    try:
        data = b"".join(Path(p).read_bytes() for p in parts)
    except OSError as e:
        raise FemtoccError(f"cannot read CTranslate2 model {source}: {e.strerror}") from None
    r = _Reader(data, source)
    version = r.unpack("I")
    if version != SUPPORTED_VERSION:
        raise FemtoccError(
            f"{source}: CTranslate2 binary version {version}, femtocc reads version {SUPPORTED_VERSION}"
        )
    spec = r.string()
    r.unpack("I")  # spec revision: no behaviour depends on it for Whisper
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        dims = [r.unpack("I") for _ in range(r.unpack("B"))]
        dtype_id = r.unpack("B")
        if dtype_id not in _DTYPES:
            raise FemtoccError(f"{source}: variable {name!r} has unknown dtype id {dtype_id}")
        raw = r.take(r.unpack("I"))
        array = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
        if array.size != int(np.prod(dims)):
            raise FemtoccError(f"{source}: variable {name!r} holds {array.size} values, shape {dims}")
        variables[name] = array.reshape(dims)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise FemtoccError(f"{source}: alias {alias!r} points at missing variable {target!r}")
        variables[alias] = variables[target]
    if r.pos != len(data):
        raise FemtoccError(f"{source}: {len(data) - r.pos} trailing bytes after the last alias")
    return spec, variables
