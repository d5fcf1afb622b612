"""Golden IR per pass: each pass, run on the text of ``tests/golden/PASS.before.fir``, prints exactly
``PASS.after.fir``. Regenerate both with ``python tests/golden/make_golden.py`` (never by hand)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))

from make_golden import GOLDEN, paths, spec_of  # noqa: E402

from femtocc.ir import parse_graph, print_graph, verify  # noqa: E402
from femtocc.passes import PASSES, PassManager  # noqa: E402


def test_every_pass_has_a_golden_pair():
    assert set(GOLDEN) == set(PASSES)
    assert all(p.is_file() for name in GOLDEN for p in paths(name))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pass_output_matches_its_golden_text(name):
    before, after = paths(name)
    g = parse_graph(before.read_text(), source=str(before))
    verify(g)
    PassManager.parse(spec_of(name)).run(g)
    assert print_graph(g) == after.read_text(), f"{name}: regenerate with python tests/golden/make_golden.py and review the diff"
    again = parse_graph(after.read_text(), source=str(after))  # the after-text parses and verifies too
    verify(again)
