"""Storage formats of a weight matrix: the sparse encoding a tensor type carries.

A format is the text in angle brackets after a type (``i8[384, 1536]<pencil8>``) and one module
here that knows, for a weight stored ``[in, out]`` (the IR's ``dense`` orientation):

* ``fits(w)``: whether ``w`` can be stored in the format exactly (``dense``: always; ``pencilH``:
  a multiple of ``H`` outputs; ``N:M``: at most ``N`` nonzeros in every ``M`` consecutive inputs of
  an output);
* ``macs_per_row(w)``: multiply-accumulates one input row issues when only stored weights compute;
* ``cycles_per_row(w, target)``: those MACs over the target's MAC lanes (all cores), plus the
  format's index decoding (``pencil_decode_cycles`` per pencil);
* ``nbytes(w, bits, index_bits)``: bytes stored (weights at ``bits`` plus each stored unit's index);
* ``encode(q, bits)`` / ``decode(raw, n_in, n_out, bits, name)``: the bytes of a program blob and
  back, decode checking every count and index (a bad blob is a :class:`FormatError` naming ``name``).

``parse_format("pencil16")`` gives the module's format object for a name; :func:`best_fit` the most
structured format the zeros allow. The cost model (``femtocc.targets.spu001.cost``) asks the
formats for bytes and cycles and adds memory traffic and placement.
"""

from __future__ import annotations

import re

import numpy as np

from femtocc.errors import FemtoccError


class FormatError(FemtoccError):
    """A weight does not fit its format, or a blob does not decode."""


def pack4(q: np.ndarray) -> bytes:
    """int4 values, two per byte, low nibble first."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def unpack4(raw: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8)
    nib = np.stack([b & 0xF, b >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def weight_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` weights at ``bits`` (int4 packed two per byte)."""
    return (count * bits + 7) // 8


def lane_cycles(macs: int, target) -> int:
    """Cycles for ``macs`` multiply-accumulates on all the target's MAC lanes."""
    return -(-macs // (target.assumptions.mac_lanes_per_core * target.facts.cores))


def parse_format(text: str):
    """The format named ``text``: ``dense``, ``pencilH`` (H >= 1) or ``N:M`` (0 < N < M)."""
    from femtocc.ir.formats import dense, nm, pencil

    text = text.strip().lower()
    if text == "dense":
        return dense.DENSE
    m = re.fullmatch(r"pencil(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return pencil.Pencil(int(m.group(1)))
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if m and 0 < int(m.group(1)) < int(m.group(2)):
        return nm.NM(int(m.group(1)), int(m.group(2)))
    raise FormatError(f"unknown storage format {text!r}: use dense, pencilH (e.g. pencil8) or N:M (e.g. 2:4)")


def best_fit(w_in_out: np.ndarray, pencil: int = 8):
    """The most structured format the zeros of ``w`` allow: ``pencil{pencil}``, then ``2:4``, ``1:4``,
    ``4:8``; ``dense`` when none fits or nothing is zero."""
    from femtocc.ir.formats import dense, nm, pencil as pencil_module

    w = np.asarray(w_in_out)
    if not (w == 0).any():
        return dense.DENSE
    if pencil_module.Pencil(pencil).whole(w):
        return pencil_module.Pencil(pencil)
    for fmt in (nm.NM(2, 4), nm.NM(1, 4), nm.NM(4, 8)):
        if fmt.fits(w):
            return fmt
    return dense.DENSE
