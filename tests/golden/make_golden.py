"""Golden IR per pass: for every registered pass, a small graph before it and the text after it.

    python tests/golden/make_golden.py        # (re)writes tests/golden/PASS.before.fir / .after.fir

Never edit the .fir files by hand: change a pass, rerun this command, and review the diff of the
after-texts (``tests/test_golden.py`` fails until the files and the passes agree). The graphs are
small enough that every constant prints inline (except the GELU table quantize builds, which no
later pass reads), so a file is the whole graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
F = "f32"


def _t(*shape, dtype=F):
    from femtocc.ir import TensorType

    return TensorType(dtype, shape)


def _rng():
    return np.random.default_rng(11)


def g_canonicalize():
    from femtocc.ir import Graph

    g = Graph("canonicalize")
    x = g.add_input("x", _t(2, 4))
    one = g.add_constant("one", np.float32(1.0))
    zero = g.add_constant("zero", np.float32(0.0))
    a = g.make_node("mul", [x, one], [_t(2, 4)]).outputs[0]  # x * 1 -> x
    b = g.make_node("add", [zero, a], [_t(2, 4)]).outputs[0]  # 0 + x -> x
    c = g.make_node("identity", [b], [_t(2, 4)]).outputs[0]  # identity -> x
    d = g.make_node("transpose", [c], [_t(2, 4)], {"perm": [0, 1]}).outputs[0]  # identity permutation
    two = g.make_node("add", [one, one], [_t()]).outputs[0]  # constant computation
    g.outputs = [g.make_node("mul", [d, two], [_t(2, 4)]).outputs[0]]
    return g


def g_fold_gelu():
    from femtocc.ir import Graph

    g = Graph("fold_gelu")
    x = g.add_input("x", _t(2, 3))
    c = lambda n, v: g.add_constant(n, np.float32(v))  # noqa: E731
    d = g.make_node("div", [x, c("sqrt2", np.sqrt(2))], [_t(2, 3)]).outputs[0]
    e = g.make_node("erf", [d], [_t(2, 3)]).outputs[0]
    a = g.make_node("add", [e, c("one", 1.0)], [_t(2, 3)]).outputs[0]
    m = g.make_node("mul", [x, a], [_t(2, 3)]).outputs[0]
    g.outputs = [g.make_node("mul", [m, c("half", 0.5)], [_t(2, 3)]).outputs[0]]
    return g


def g_fold_dense():
    from femtocc.ir import Graph

    rng = _rng()
    g = Graph("fold_dense")
    x = g.add_input("x", _t(1, "T", 3))
    w = g.add_constant("w", rng.standard_normal((3, 4)).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(4).astype(np.float32))
    m = g.make_node("matmul", [x, w], [_t(1, "T", 4)], meta={"scope": "fc", "source": "MatMul_0"}).outputs[0]
    g.outputs = [g.make_node("add", [m, b], [_t(1, "T", 4)]).outputs[0]]
    return g


def g_constant_fold():
    from femtocc.ir import Graph

    g = Graph("constant_fold")
    x = g.add_input("x", _t(2, 3))
    s = g.make_node("shape", [x], [_t(2, dtype="i64")]).outputs[0]  # static: folds
    a = g.add_constant("a", np.arange(4, dtype=np.float32))
    b = g.make_node("mul", [a, g.add_constant("k", np.float32(3.0))], [_t(4)]).outputs[0]
    r = g.make_node("reshape", [x, s], [_t(2, 3)]).outputs[0]
    g.outputs = [r, b]
    return g


def g_dce():
    from femtocc.ir import Graph

    g = Graph("dce")
    x = g.add_input("x", _t(4))
    g.add_constant("unused", np.float32(2.0))
    g.make_node("neg", [x], [_t(4)], names=["dead"])
    g.outputs = [g.make_node("exp", [x], [_t(4)]).outputs[0]]
    return g


def g_lower_conv():
    from femtocc.ir import Graph

    rng = _rng()
    g = Graph("lower_conv")
    x = g.add_input("x", _t(1, 2, 5))
    w = g.add_constant("w", rng.standard_normal((4, 2, 2)).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(4).astype(np.float32))
    g.outputs = [g.make_node("conv", [x, w, b], [_t(1, 4, 5)], {"pads": [1, 0], "strides": [1], "dilations": [1], "group": 1},
                             meta={"scope": "conv1"}).outputs[0]]
    return g


def _pencil_weight():
    """[in 2, out 8]: one of the two pencils pruned (the dense weight of select-layout's input)."""
    w = _rng().standard_normal((2, 8)).astype(np.float32)
    w[1] = 0
    return w


def g_annotate_sparsity():
    from femtocc.ir import Graph

    g = Graph("annotate_sparsity")
    x = g.add_input("x", _t(1, 2))
    g.outputs = [g.make_node("dense", [x, g.add_constant("w", _pencil_weight())], [_t(1, 8)]).outputs[0]]
    return g


def g_quantize(gelu: bool = True):
    from femtocc.ir import Graph

    g = Graph("quantize")
    x = g.add_input("x", _t(1, 2))
    h = g.make_node("dense", [x, g.add_constant("w", _pencil_weight()), g.add_constant("b", np.full(8, 0.5, np.float32))],
                    [_t(1, 8)]).outputs[0]
    g.outputs = [g.make_node("gelu", [h], [_t(1, 8)]).outputs[0] if gelu else h]
    return g


QUANTIZE_RANGES = {"x": 2.0, "quantize:dense": 4.0, "gelu": 4.0, "dense": 4.0}


def _quantized(name):
    """A quantized dense layer (the quantize golden without its GELU table): the input of select-layout
    and tile-sram."""
    from femtocc.passes import PassManager

    g = g_quantize(gelu=False)
    PassManager.parse(f"quantize{{ranges={HERE / 'quantize.ranges.json'}}}").run(g)
    g.name = name
    return g


# pass -> (input graph builder, pass spec)
GOLDEN = {
    "annotate-sparsity": (g_annotate_sparsity, "annotate-sparsity"),
    "canonicalize": (g_canonicalize, "canonicalize"),
    "constant-fold": (g_constant_fold, "constant-fold"),
    "dce": (g_dce, "dce"),
    "fold-dense": (g_fold_dense, "fold-dense"),
    "fold-gelu": (g_fold_gelu, "fold-gelu,dce"),
    "lower-conv": (g_lower_conv, "lower-conv"),
    "quantize": (g_quantize, f"quantize{{ranges={{RANGES}}}}"),
    "select-layout": (lambda: _quantized("select_layout"), "select-layout"),
    "tile-sram": (lambda: _quantized("tile_sram"), "select-layout,tile-sram{tokens=1}"),
}


def spec_of(name: str) -> str:
    return GOLDEN[name][1].replace("{RANGES}", str(HERE / "quantize.ranges.json"))


def paths(name: str) -> tuple[Path, Path]:
    return HERE / f"{name}.before.fir", HERE / f"{name}.after.fir"


def main() -> int:
    from femtocc.ir import print_graph, verify
    from femtocc.passes import PASSES, PassManager

    (HERE / "quantize.ranges.json").write_text(json.dumps(QUANTIZE_RANGES, indent=1) + "\n")
    missing = sorted(set(PASSES) - set(GOLDEN))
    if missing:
        print(f"no golden input for pass(es) {', '.join(missing)}: add one to GOLDEN", file=sys.stderr)
        return 1
    for name, (build, _) in GOLDEN.items():
        g = build()
        verify(g)
        before, after = paths(name)
        before.write_text(print_graph(g))
        PassManager.parse(spec_of(name)).run(g)
        after.write_text(print_graph(g))
        print(f"{name}: {before.name}, {after.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
