"""Small helpers for local rewrites: constant scalars, single users, replacing a node's result."""

from __future__ import annotations

import numpy as np


def scalar(v) -> float | None:
    """The value of a constant with exactly one element, else None."""
    if v.is_constant and v.data.size == 1:
        return float(v.data.reshape(-1)[0])
    return None


def is_scalar(v, target: float, rtol: float = 1e-6) -> bool:
    x = scalar(v)
    return x is not None and bool(np.isclose(x, target, rtol=rtol, atol=0.0))


def only_user(v):
    return v.users[0] if len(v.users) == 1 else None


def other_input(node, v):
    a, b = node.inputs
    return b if a is v else a


def replace_result(graph, old, new) -> None:
    """Send every use of ``old`` (and a graph output) to ``new``; the producer becomes dead."""
    old.replace_all_uses_with(new)
    graph.replace_output(old, new)
