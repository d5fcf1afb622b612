"""Symbolic dimensions: integer sums of named sizes, such as ``T``, ``P + T`` or ``T + 1``.

That is all Whisper's graphs need (tokens ``T`` after ``P`` cached ones). Anything else is
``"?"`` (unknown), which every check accepts.
"""

from __future__ import annotations

import re

UNKNOWN = "?"
_TERM = re.compile(r"^\s*([+-]?)\s*(\d+|[A-Za-z_][A-Za-z0-9_]*)\s*$")


def parse(dim: int | str) -> dict[str, int] | None:
    """``"P + T + 2"`` -> ``{"P": 1, "T": 1, "": 2}``; ``None`` for unknown."""
    if isinstance(dim, int):
        return {"": dim} if dim else {}
    if dim == UNKNOWN:
        return None
    terms: dict[str, int] = {}
    for part in re.split(r"(?=[+-])", dim.replace(" ", "")):
        if not part:
            continue
        m = _TERM.match(part)
        if not m:
            return None
        sign = -1 if m.group(1) == "-" else 1
        key, amount = (("", int(m.group(2))) if m.group(2).isdigit() else (m.group(2), 1))
        terms[key] = terms.get(key, 0) + sign * amount
    return {k: v for k, v in terms.items() if v}


def render(terms: dict[str, int] | None) -> int | str:
    if terms is None:
        return UNKNOWN
    if all(k == "" for k in terms):
        return terms.get("", 0)
    parts = []
    for key in sorted(k for k in terms if k) + ([""] if "" in terms else []):
        coeff = terms[key]
        if coeff == 0:
            continue
        text = key if key else str(abs(coeff))
        if key and abs(coeff) != 1:
            return UNKNOWN  # only unit coefficients are spelled out
        sign = "-" if coeff < 0 else "+"
        parts.append((sign, text))
    out = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, text in parts[1:]:
        out += f" {sign} {text}"
    return out


def canonical(dim: int | str) -> int | str:
    return render(parse(dim))


def add(a: int | str, b: int | str) -> int | str:
    pa, pb = parse(a), parse(b)
    if pa is None or pb is None:
        return UNKNOWN
    out = dict(pa)
    for k, v in pb.items():
        out[k] = out.get(k, 0) + v
    return render({k: v for k, v in out.items() if v})


def compatible(a: int | str, b: int | str) -> bool:
    return a == UNKNOWN or b == UNKNOWN or canonical(a) == canonical(b)


def broadcast(a: int | str, b: int | str) -> int | str:
    if a == 1:
        return b
    if b == 1:
        return a
    if canonical(a) == canonical(b):
        return canonical(a)
    if isinstance(a, int) and not isinstance(b, int):
        return a
    if isinstance(b, int) and not isinstance(a, int):
        return b
    return UNKNOWN
