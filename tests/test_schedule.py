"""Sparsity schedules for gradual pruning (issue 16)."""

import pytest

from femtocc.errors import FemtoccError
from femtocc.passes.schedule import parse_schedule


def test_cubic_takes_big_steps_first_and_ends_exactly():
    s = parse_schedule("cubic:0:0.9:6")
    assert s[-1] == 0.9 and len(s) == 6
    steps = [b - a for a, b in zip([0.0] + s, s)]
    assert all(x > 0 for x in steps) and steps == sorted(steps, reverse=True)
    assert s[0] == pytest.approx(0.9 - 0.9 * (5 / 6) ** 3, abs=1e-6)


def test_linear_and_the_scheduled_combination():
    assert parse_schedule("linear:0.2:0.8:3") == [0.4, 0.6, 0.8]
    s = parse_schedule("oneshot:0.5:0.9:5")
    assert s[0] == 0.5 and s[-1] == 0.9 and s == sorted(s) and len(s) == 5
    assert parse_schedule("oneshot:0.6:0.6:1") == [0.6]


@pytest.mark.parametrize("text, message", [
    ("cubic:0.9:0.5:4", "below the start"),
    ("square:0:0.5:4", "unknown kind 'square'"),
    ("cubic:0:1.0:4", "must be in [0, 1)"),
    ("cubic:0:0.5", "expected KIND:START:FINAL:STAGES"),
    ("linear:0:0.5:two", "STAGES a whole number"),
    ("oneshot:0.3:0.9:1", "too few"),
])
def test_bad_schedules_are_named(text, message):
    with pytest.raises(FemtoccError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_schedule(text)


@pytest.mark.parametrize("pattern", ["unstructured", "pencil8"])
def test_obs_over_a_schedule_keeps_every_zero(pattern):
    """Gradual pruning re-prunes a pruned layer at each stage: its zeros have zero saliency, and
    none comes back through OBS's column updates or the refit (masks only grow)."""
    import numpy as np

    from femtocc.passes.obs import obs_prune
    from femtocc.passes.sparsity import parse_pattern

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256))
    h = 2 * x.T @ x / 512
    w = rng.standard_normal((64, 256)).astype(np.float32)
    zeros = np.zeros(w.shape, bool)
    for s in parse_schedule("cubic:0:0.8:4"):
        w = obs_prune(w, h, s, parse_pattern(pattern)).weight
        now = w == 0
        assert not np.any(zeros & ~now) and now.mean() == pytest.approx(s, abs=0.02)
        zeros = now
