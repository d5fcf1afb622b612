"""Sparsity patterns: how pruned weights are grouped, and what a mask of each pattern looks like.

Weights here are in the ``[out, in]`` orientation (a row per output channel):

* ``unstructured``: any weight may be zero.
* ``pencilH``: a target's native format (spu001: ``pencil8``). A pencil is ``H`` consecutive output
  channels at one input index, ``W[Hg:Hg+H, j]`` (one memory word of ``H`` int8 weights); pencils
  are kept or pruned whole.
* ``N:M``: in every group of ``M`` consecutive inputs of a row at most ``N`` weights are nonzero
  (``2:4`` keeps 2 of 4: 50 %).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir.formats import best_fit
from femtocc.ir.formats.dense import DENSE
from femtocc.ir.formats.nm import NM
from femtocc.ir.formats.pencil import Pencil


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "pencil" | "nm"
    n: int = 0  # N:M: nonzeros kept per group
    m: int = 0  # N:M: group size; pencil: pencil height

    @property
    def name(self) -> str:
        return {"unstructured": "unstructured", "pencil": f"pencil{self.m}", "nm": f"{self.n}:{self.m}"}[self.kind]

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity; the others take any target."""
        return 1 - self.n / self.m if self.kind == "nm" else None

    def check_shape(self, shape: tuple[int, int], layer: str) -> None:
        out, inp = shape
        if self.kind == "pencil" and out % self.m:
            raise FemtoccError(f"layer {layer}: {out} output channels is not a multiple of the pencil height {self.m}")
        if self.kind == "nm" and inp % self.m:
            raise FemtoccError(f"layer {layer}: {inp} inputs is not a multiple of M={self.m} for {self.name}")


def parse_pattern(text: str) -> Pattern:
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    m = re.fullmatch(r"pencil(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return Pattern("pencil", m=int(m.group(1)))
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if m and 0 < int(m.group(1)) < int(m.group(2)):
        return Pattern("nm", n=int(m.group(1)), m=int(m.group(2)))
    raise FemtoccError(f"unknown sparsity pattern {text!r}: use unstructured, pencilH such as pencil8, or N:M such as 2:4")


def mask_follows(mask: np.ndarray, pattern: Pattern) -> bool:
    """True when the pruned entries (``mask`` True = pruned) form whole units of ``pattern``."""
    kept = (~np.asarray(mask)).T  # the weights' nonzero pattern, [in, out] as the formats see it
    if pattern.kind == "pencil":
        return Pencil(pattern.m).whole(kept)
    if pattern.kind == "nm":
        return NM(pattern.n, pattern.m).fits(kept)
    return True


def describe(weight_out_in: np.ndarray, pencil: int = 8) -> dict:
    """The sparsity of a weight and the most structured pattern its zeros follow (for the
    ``annotate-sparsity`` analysis): ``pencil{pencil}``, ``2:4`` / ``1:4`` / ``4:8``, else ``unstructured``;
    ``dense`` when nothing is zero. See :func:`femtocc.ir.formats.best_fit`."""
    w = np.asarray(weight_out_in)
    zeros = int((w == 0).sum())
    encoding: dict = {"format": "dense", "nnz": int(w.size - zeros), "sparsity": round(zeros / max(w.size, 1), 6)}
    if zeros == 0:
        return encoding
    fmt = best_fit(w.T, pencil)
    if isinstance(fmt, Pencil):
        return {**encoding, "format": fmt.name, "pencils": fmt.pencils(w.T)}
    return {**encoding, "format": "unstructured" if fmt is DENSE else fmt.name}
