import io
import math

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, Interpreter, TensorType, print_graph, verify
from femtocc.passes import PASSES, PassManager, parse_pipeline

rng = np.random.default_rng(1)


def gelu_mlp(order: str = "torch") -> Graph:
    """x -> matmul(W1)+b1 -> erf-spelled GELU -> matmul(W2) (no bias): the shape of Whisper's FFN."""
    g = Graph("mlp")
    x = g.add_input("x", TensorType("f32", (1, "T", 8)))
    w1 = g.add_constant("fc1.weight", rng.standard_normal((8, 16)).astype(np.float32))
    b1 = g.add_constant("fc1.bias", rng.standard_normal(16).astype(np.float32))
    w2 = g.add_constant("fc2.weight", rng.standard_normal((16, 8)).astype(np.float32))
    sqrt2 = g.add_constant("sqrt2", np.float32(math.sqrt(2)))
    one = g.add_constant("one", np.float32(1))
    half = g.add_constant("half", np.float32(0.5))
    t = lambda n: TensorType("f32", (1, "T", n))  # noqa: E731
    h = g.make_node("matmul", [x, w1], [t(16)], meta={"scope": "fc1"}).outputs[0]
    h = g.make_node("add", [h, b1], [t(16)]).outputs[0]
    d = g.make_node("div", [h, sqrt2], [t(16)]).outputs[0]
    e = g.make_node("erf", [d], [t(16)]).outputs[0]
    a = g.make_node("add", [e, one], [t(16)]).outputs[0]
    if order == "torch":  # x * (0.5 * (1 + erf))
        m = g.make_node("mul", [half, a], [t(16)]).outputs[0]
        y = g.make_node("mul", [h, m], [t(16)]).outputs[0]
    else:  # (x * (1 + erf)) * 0.5
        m = g.make_node("mul", [h, a], [t(16)]).outputs[0]
        y = g.make_node("mul", [m, half], [t(16)]).outputs[0]
    out = g.make_node("matmul", [y, w2], [t(8)], meta={"scope": "fc2"}).outputs[0]
    g.outputs = [out]
    verify(g)
    return g


def run(g, x):
    return Interpreter(g).run({"x": x})[g.outputs[0].name]


@pytest.mark.parametrize("order", ["torch", "femtocc"])
def test_fold_gelu_and_dense_preserve_outputs(order):
    g = gelu_mlp(order)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    before = run(g, x)
    manager = PassManager.parse("fold-gelu,fold-dense,dce")
    manager.run(g)
    assert g.op_counts() == {"dense": 2, "gelu": 1}
    np.testing.assert_allclose(run(g, x), before, rtol=1e-5, atol=1e-6)
    stats = {r.name: r.stats for r in manager.records}
    assert stats["fold-gelu"] == {"gelu-folded": 1}
    assert stats["fold-dense"] == {"dense-folded": 2, "with-bias": 1}
    dense = [n for n in g.nodes if n.op == "dense"]
    assert [len(n.inputs) for n in dense] == [3, 2]
    assert dense[0].meta["scope"] == "fc1"


def test_fold_gelu_leaves_near_misses_alone():
    g = gelu_mlp()
    g.constants["half"].data = np.float32(0.4)  # not GELU any more
    PassManager.parse("fold-gelu,dce").run(g)
    assert "gelu" not in g.op_counts()


def test_canonicalize_rules_and_constant_folding():
    g = Graph("c")
    x = g.add_input("x", TensorType("f32", (2, 3)))
    one = g.add_constant("one", np.float32(1))
    zero = g.add_constant("zero", np.float32(0))
    shape_src = g.add_constant("s", np.array([3, 2], np.int64))
    t = TensorType("f32", (2, 3))
    a = g.make_node("mul", [x, one], [t]).outputs[0]
    b = g.make_node("add", [zero, a], [t]).outputs[0]
    c = g.make_node("transpose", [b], [t], attrs={"perm": [0, 1]}).outputs[0]
    s = g.make_node("shape", [c], [TensorType("i64", (2,))]).outputs[0]  # static: folds
    twice = g.make_node("mul", [shape_src, shape_src], [TensorType("i64", (2,))]).outputs[0]  # constant: folds
    r = g.make_node("reshape", [c, s], [t]).outputs[0]
    g.outputs = [r, twice]
    verify(g)
    manager = PassManager.parse("canonicalize")
    manager.run(g)
    assert g.nodes == []
    assert g.outputs[0] is x
    np.testing.assert_array_equal(g.outputs[1].data, [9, 4])
    assert manager.records[0].stats["rewrites"] == 4


def test_constant_fold_respects_size_limit():
    g = Graph("big")
    w = g.add_constant("w", np.ones((300, 300), np.float32))
    x = g.add_input("x", TensorType("f32", (1, 300)))
    wt = g.make_node("transpose", [w], [TensorType("f32", (300, 300))], attrs={"perm": [1, 0]}).outputs[0]
    y = g.make_node("matmul", [x, wt], [TensorType("f32", (1, 300))]).outputs[0]
    g.outputs = [y]
    PassManager.parse("constant-fold{max-elements=1000}").run(g)
    assert g.op_counts() == {"matmul": 1, "transpose": 1}
    PassManager.parse("constant-fold{max-elements=100000}").run(g)
    assert g.op_counts() == {"matmul": 1}


def test_dce_removes_dead_nodes_and_constants():
    g = gelu_mlp()
    g.outputs = [g.nodes[1].outputs[0]]  # only fc1's output is live
    stats = PASSES["dce"]().run(g)
    assert g.op_counts() == {"add": 1, "matmul": 1}
    assert stats == {"nodes-removed": 6, "constants-removed": 4}


def test_pipeline_parsing_and_errors():
    passes = parse_pipeline("canonicalize{max-fold-elements=10}, fold-gelu ,dce")
    assert [p.spec() for p in passes] == ["canonicalize{max-fold-elements=10}", "fold-gelu", "dce"]
    with pytest.raises(FemtoccError, match="unknown pass 'fold-everything'"):
        parse_pipeline("dce,fold-everything")
    with pytest.raises(FemtoccError, match=r"pass constant-fold: unknown option 'size=3' \(options: max-elements\)"):
        parse_pipeline("constant-fold{size=3}")
    with pytest.raises(FemtoccError, match="'many' is not a valid int"):
        parse_pipeline("constant-fold{max-elements=many}")


def test_print_ir_after():
    out = io.StringIO()
    PassManager.parse("fold-gelu,dce", print_after=("dce",), out=out).run(gelu_mlp())
    text = out.getvalue()
    assert text.startswith("// ----- IR after dce on @mlp\ngraph @mlp(")
    assert text.count("// ----- IR after") == 1
    out = io.StringIO()
    PassManager.parse("fold-gelu,dce", print_after_all=True, out=out).run(gelu_mlp())
    assert out.getvalue().count("// ----- IR after") == 2


def test_manager_reports_invalid_ir():
    from femtocc.passes.manager import Pass

    class Breaks(Pass):
        name = "breaks"

        def run(self, graph):
            graph.nodes[0].outputs[0].type = TensorType("f32", (99,))
            return {}

    with pytest.raises(FemtoccError, match="IR invalid after pass breaks"):
        PassManager([Breaks()]).run(gelu_mlp())
    assert print_graph(gelu_mlp())  # the fixture itself is fine


def test_lower_conv_matches_the_convolution():
    import numpy as np

    from femtocc.ir import Graph, Interpreter, TensorType
    from femtocc.passes import PassManager

    rng = np.random.default_rng(0)
    for stride, pads in ((1, [1, 1]), (2, [1, 1]), (1, [0, 0])):
        g = Graph("c")
        x = g.add_input("x", TensorType("f32", (1, 5, 17)))
        w = g.add_constant("w", rng.standard_normal((8, 5, 3)).astype(np.float32))
        b = g.add_constant("b", rng.standard_normal(8).astype(np.float32))
        out_len = (17 + sum(pads) - 3) // stride + 1
        g.outputs = [g.make_node("conv", [x, w, b], [TensorType("f32", (1, 8, out_len))],
                                 {"strides": [stride], "pads": pads, "dilations": [1], "group": 1}, {"scope": "conv1"}).outputs[0]]
        feeds = {"x": rng.standard_normal((1, 5, 17)).astype(np.float32)}
        before = Interpreter(g).run(feeds)[g.outputs[0].name]
        PassManager.parse("lower-conv").run(g)
        assert g.op_counts() == {"dense": 1, "im2col": 1, "transpose": 1}
        dense = next(n for n in g.nodes if n.op == "dense")
        assert dense.meta["scope"] == "conv1" and dense.inputs[1].data.shape == (15, 8)
        assert np.allclose(Interpreter(g).run(feeds)[g.outputs[0].name], before, atol=1e-5)
