"""``dense``: every weight stored, row-major ``[in, out]``, int8 or int4 packed two per byte."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from femtocc.ir.formats import FormatError, lane_cycles, pack4, unpack4, weight_bytes


@dataclass(frozen=True)
class Dense:
    name: str = "dense"

    def fits(self, w_in_out: np.ndarray) -> bool:
        return True

    def macs_per_row(self, w_in_out: np.ndarray) -> int:
        return int(w_in_out.size)

    def cycles_per_row(self, w_in_out: np.ndarray, target) -> int:
        return lane_cycles(self.macs_per_row(w_in_out), target)

    def nbytes(self, w_in_out: np.ndarray, bits: int, index_bits: int = 0) -> int:
        return weight_bytes(int(w_in_out.size), bits)

    def encode(self, q: np.ndarray, bits: int) -> bytes:
        return pack4(q) if bits == 4 else np.ascontiguousarray(q, np.int8).tobytes()

    def decode(self, raw: bytes, n_in: int, n_out: int, bits: int, name: str) -> np.ndarray:
        count = n_in * n_out
        need = weight_bytes(count, bits)
        if len(raw) != need:
            raise FormatError(f"weight {name} has {len(raw)} bytes, dense {bits}-bit {[n_in, n_out]} needs {need}")
        q = unpack4(raw, count) if bits == 4 else np.frombuffer(raw, np.int8)
        return q.reshape(n_in, n_out)


DENSE = Dense()
