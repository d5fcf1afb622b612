"""``pencilH``: the spu001 format. A pencil is ``H`` consecutive outputs at one input,
``W[j, H*g : H*g + H]`` of an ``[in, out]`` weight: one memory word of ``H`` weights. Only pencils
holding a nonzero are stored, each with its input index; a pencil is kept or dropped whole.

Blob: u32 offsets per group of ``H`` outputs, plus one (the pencils of group ``g`` are
``offsets[g]:offsets[g+1]``); per pencil a u16 input index (increasing within a group); then the
pencils' ``H`` weights each (int8, or int4 packed two per byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from femtocc.ir.formats import FormatError, lane_cycles, pack4, unpack4, weight_bytes


@dataclass(frozen=True)
class Pencil:
    height: int = 8

    @property
    def name(self) -> str:
        return f"pencil{self.height}"

    def live(self, w_in_out: np.ndarray) -> np.ndarray:
        """[in, groups]: which pencils hold a nonzero."""
        n_in, n_out = w_in_out.shape
        return (np.asarray(w_in_out) != 0).reshape(n_in, n_out // self.height, self.height).any(axis=2)

    def fits(self, w_in_out: np.ndarray) -> bool:
        """Any weight with a multiple of ``H`` outputs can be stored (a zero inside a live pencil is
        stored as a zero weight)."""
        return w_in_out.shape[1] % self.height == 0

    def whole(self, w_in_out: np.ndarray) -> bool:
        """Every pencil is all zero or all nonzero: the zeros are exactly pencils (a pencil-pruned weight)."""
        n_in, n_out = w_in_out.shape
        if n_out % self.height:
            return False
        zero = (np.asarray(w_in_out) == 0).reshape(n_in, n_out // self.height, self.height)
        return bool(np.all(zero.all(axis=2) == zero.any(axis=2)))

    def pencils(self, w_in_out: np.ndarray) -> int:
        return int(self.live(w_in_out).sum())

    def macs_per_row(self, w_in_out: np.ndarray) -> int:
        return self.pencils(w_in_out) * self.height

    def cycles_per_row(self, w_in_out: np.ndarray, target) -> int:
        pencils = self.pencils(w_in_out)
        decode = pencils * target.assumptions.pencil_decode_cycles // max(target.facts.cores, 1)
        return lane_cycles(pencils * self.height, target) + decode

    def word_bytes(self, bits: int, index_bits: int = 16) -> int:
        """Bytes one stored pencil costs: its ``H`` weights and its input index."""
        return weight_bytes(self.height, bits) + index_bits // 8

    def nbytes(self, w_in_out: np.ndarray, bits: int, index_bits: int = 16) -> int:
        return self.pencils(w_in_out) * self.word_bytes(bits, index_bits)

    def encode(self, q: np.ndarray, bits: int) -> bytes:
        n_in, n_out = q.shape
        if n_out % self.height:
            raise FormatError(f"{n_out} outputs is not a multiple of the pencil height {self.height}")
        groups = q.reshape(n_in, n_out // self.height, self.height).transpose(1, 0, 2)  # [group, in, H]
        live = groups.any(axis=2)
        offsets = np.concatenate([[0], np.cumsum(live.sum(axis=1))]).astype(np.uint32)
        index = np.nonzero(live)[1].astype(np.uint16)  # group-major: inputs of group 0, then group 1, ...
        words = groups[live]
        return offsets.tobytes() + index.tobytes() + (pack4(words) if bits == 4 else words.astype(np.int8).tobytes())

    def decode(self, raw: bytes, n_in: int, n_out: int, bits: int, name: str) -> np.ndarray:
        h = self.height
        if n_out % h:
            raise FormatError(f"weight {name} has {n_out} outputs, not a multiple of the pencil {h}")
        g = n_out // h
        head = 4 * (g + 1)
        if len(raw) < head:
            raise FormatError(f"pencil weight {name} truncated in its offsets")
        offsets = np.frombuffer(raw[:head], np.uint32).astype(np.int64)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or np.any(np.diff(offsets) > n_in):
            raise FormatError(f"pencil weight {name} has offsets that are not non-decreasing counts <= {n_in}")
        pencils = int(offsets[-1])
        need = head + 2 * pencils + weight_bytes(pencils * h, bits)
        if len(raw) != need:
            raise FormatError(f"pencil weight {name} has {len(raw)} bytes, {pencils} pencils need {need}")
        index = np.frombuffer(raw[head : head + 2 * pencils], np.uint16).astype(np.int64)
        if pencils and index.max() >= n_in:
            raise FormatError(f"pencil weight {name} has input index {index.max()} >= {n_in} inputs")
        group = np.repeat(np.arange(g), np.diff(offsets))
        if pencils > 1 and np.any((np.diff(index) <= 0) & (np.diff(group) == 0)):
            raise FormatError(f"pencil weight {name} has input indices that do not increase within a group")
        body = raw[head + 2 * pencils :]
        words = (unpack4(body, pencils * h) if bits == 4 else np.frombuffer(body, np.int8)).reshape(pencils, h)
        dense = np.zeros((g, n_in, h), np.int8)
        dense[group, index] = words
        return dense.transpose(1, 0, 2).reshape(n_in, n_out)
