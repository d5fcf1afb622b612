"""Sparsity patterns: how pruned weights are grouped, and what a mask of each pattern looks like.

Weights here are in the ``[out, in]`` orientation (a row per output channel):

* ``unstructured``: any weight may be zero.
* ``pencil8``: the spu001 native format. A pencil is 8 consecutive output channels at one input
  index, ``W[8g:8g+8, j]`` (one 64-bit word of 8 int8 weights); pencils are kept or pruned whole.
* ``N:M``: in every group of ``M`` consecutive inputs of a row at most ``N`` weights are nonzero
  (``2:4`` keeps 2 of 4: 50 %).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from femtocc.errors import FemtoccError

PENCIL = 8


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
    if text == "pencil8":
        return Pattern("pencil", m=PENCIL)
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if m and 0 < int(m.group(1)) < int(m.group(2)):
        return Pattern("nm", n=int(m.group(1)), m=int(m.group(2)))
    raise FemtoccError(f"unknown sparsity pattern {text!r}: use unstructured, pencil8 or N:M such as 2:4")


def mask_follows(mask: np.ndarray, pattern: Pattern) -> bool:
    """True when the pruned entries (``mask`` True = pruned) form whole units of ``pattern``."""
    out, inp = mask.shape
    if pattern.kind == "pencil":
        pencils = mask.reshape(out // pattern.m, pattern.m, inp)
        return bool(np.all(pencils.all(axis=1) == pencils.any(axis=1)))
    if pattern.kind == "nm":
        kept = (~mask).reshape(out, inp // pattern.m, pattern.m).sum(axis=2)
        return bool(np.all(kept <= pattern.n))
    return True


def describe(weight_out_in: np.ndarray) -> dict:
    """The sparse encoding a weight's zeros allow, most structured first (for IR annotations)."""
    w = np.asarray(weight_out_in)
    zeros = w == 0
    out, inp = w.shape
    encoding: dict = {"format": "dense", "nnz": int(w.size - zeros.sum()), "sparsity": round(float(zeros.mean()), 6)}
    if zeros.mean() == 0:
        return encoding
    if out % PENCIL == 0:
        pencils = zeros.reshape(out // PENCIL, PENCIL, inp)
        whole = pencils.all(axis=1)
        if np.all(whole == pencils.any(axis=1)):
            return {**encoding, "format": f"pencil{PENCIL}", "pencils": int((~whole).sum())}
    for n, m in ((2, 4), (1, 4), (4, 8)):
        if inp % m == 0 and np.all((~zeros).reshape(out, inp // m, m).sum(axis=2) <= n):
            return {**encoding, "format": f"{n}:{m}"}
    return {**encoding, "format": "unstructured"}
