"""``N:M``: in every group of ``M`` consecutive inputs of one output at most ``N`` weights are
nonzero (``2:4`` keeps 2 of 4). Each group stores exactly ``N`` slots: the weight and its position
in the group (``ceil(log2 M)`` bits; a blob spends one byte per position), unused slots zero.

Blob, for an ``[in, out]`` weight, output-major: per output, per group, ``N`` positions (u8,
increasing; unused slots hold position 0 and weight 0), then all the slots' weights in the
same order (int8, or int4 packed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from femtocc.ir.formats import FormatError, lane_cycles, pack4, unpack4, weight_bytes


@dataclass(frozen=True)
class NM:
    n: int = 2
    m: int = 4

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def _groups(self, w_in_out: np.ndarray) -> np.ndarray:
        """[out, groups, M] view of an [in, out] weight."""
        n_in, n_out = w_in_out.shape
        return np.asarray(w_in_out).T.reshape(n_out, n_in // self.m, self.m)

    def fits(self, w_in_out: np.ndarray) -> bool:
        return w_in_out.shape[0] % self.m == 0 and bool(np.all((self._groups(w_in_out) != 0).sum(axis=2) <= self.n))

    def macs_per_row(self, w_in_out: np.ndarray) -> int:
        return int(w_in_out.size) // self.m * self.n

    def cycles_per_row(self, w_in_out: np.ndarray, target) -> int:
        return lane_cycles(self.macs_per_row(w_in_out), target)

    def nbytes(self, w_in_out: np.ndarray, bits: int, index_bits: int = 0) -> int:
        slots = int(w_in_out.size) // self.m * self.n
        return weight_bytes(slots, bits) + (slots * math.ceil(math.log2(self.m)) + 7) // 8

    def encode(self, q: np.ndarray, bits: int) -> bytes:
        if not self.fits(q):
            raise FormatError(f"weight does not fit {self.name}")
        groups = self._groups(q)  # [out, G, M]
        order = np.argsort(groups == 0, axis=2, kind="stable")[..., : self.n]  # nonzeros first, in position order
        order = np.sort(order, axis=2)
        values = np.take_along_axis(groups, order, axis=2)
        positions = np.where(values != 0, order, 0).astype(np.uint8)
        values = values.astype(np.int8)
        return positions.tobytes() + (pack4(values) if bits == 4 else values.tobytes())

    def decode(self, raw: bytes, n_in: int, n_out: int, bits: int, name: str) -> np.ndarray:
        if n_in % self.m:
            raise FormatError(f"weight {name} has {n_in} inputs, not a multiple of M={self.m}")
        slots = n_out * (n_in // self.m) * self.n
        need = slots + weight_bytes(slots, bits)
        if len(raw) != need:
            raise FormatError(f"{self.name} weight {name} has {len(raw)} bytes, {slots} slots need {need}")
        positions = np.frombuffer(raw[:slots], np.uint8).astype(np.int64).reshape(n_out, n_in // self.m, self.n)
        if positions.size and positions.max() >= self.m:
            raise FormatError(f"{self.name} weight {name} has a position {positions.max()} >= M={self.m}")
        body = raw[slots:]
        values = (unpack4(body, slots) if bits == 4 else np.frombuffer(body, np.int8)).reshape(positions.shape)
        o, g, k = np.nonzero(values)  # unused slots hold weight 0 and write nothing
        out = np.zeros((n_out, n_in // self.m, self.m), np.int8)
        out[o, g, positions[o, g, k]] = values[o, g, k]
        if np.count_nonzero(out) != len(o):
            raise FormatError(f"{self.name} weight {name} names one position twice in a group")
        return out.reshape(n_out, n_in).T.copy()
