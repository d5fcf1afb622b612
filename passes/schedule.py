"""Sparsity schedules for gradual pruning: the sparsity each stage prunes to.

``KIND:START:FINAL:STAGES`` (the text of ``--schedule``), stages ``i = 1..K``:

* ``cubic``: Zhu & Gupta (2017), ``final + (start - final) * (1 - i / K)**3``: large steps while
  the network has redundancy to spare, small ones near the end;
* ``linear``: ``start + (final - start) * i / K``;
* ``oneshot``: one-shot straight to ``START`` in the first stage, then cubic from ``START`` to
  ``FINAL`` over the other ``K - 1`` (the scheduled combination of one-shot and gradual).

Guarantee: the sparsities never decrease, lie in [0, 1), and the last one is ``FINAL`` exactly.
"""

from __future__ import annotations

from femtocc.errors import FemtoccError

KINDS = ("cubic", "linear", "oneshot")


def schedule(kind: str, start: float, final: float, stages: int) -> list[float]:
    if kind not in KINDS:
        raise FemtoccError(f"--schedule: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if not (0.0 <= start < 1.0 and 0.0 <= final < 1.0):
        raise FemtoccError(f"--schedule: sparsities must be in [0, 1), got {start} and {final}")
    if final < start:
        raise FemtoccError(f"--schedule: the final sparsity {final} is below the start {start}; masks only grow")
    if stages < 1 or (kind == "oneshot" and stages < 2 and final != start):
        raise FemtoccError(f"--schedule: {stages} stages is too few for {kind}")
    if kind == "linear":
        out = [start + (final - start) * i / stages for i in range(1, stages + 1)]
    elif kind == "cubic":
        out = [final + (start - final) * (1 - i / stages) ** 3 for i in range(1, stages + 1)]
    else:
        out = [start] + (schedule("cubic", start, final, stages - 1) if stages > 1 else [])
    out[-1] = final
    return [round(s, 6) for s in out]


def parse_schedule(text: str) -> list[float]:
    """The stage sparsities of ``KIND:START:FINAL:STAGES``."""
    parts = text.split(":")
    if len(parts) != 4:
        raise FemtoccError(f"--schedule {text!r}: expected KIND:START:FINAL:STAGES, e.g. cubic:0.3:0.9:6")
    try:
        start, final, stages = float(parts[1]), float(parts[2]), int(parts[3])
    except ValueError:
        raise FemtoccError(f"--schedule {text!r}: START and FINAL are numbers, STAGES a whole number") from None
    return schedule(parts[0].strip().lower(), start, final, stages)
