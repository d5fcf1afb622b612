import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, TensorType, parse_graph, print_graph, verify
from femtocc.ir.text import load, save


def small_graph() -> Graph:
    g = Graph("toy")
    x = g.add_input("x", TensorType("f32", (1, "T", 4)))
    w = g.add_constant("layer.0.weight", np.arange(32, dtype=np.float32).reshape(4, 8) / 7,
                       attrs={"encoding": {"format": "pencil8", "nnz": 24}, "note": "tied"})
    b = g.add_constant("bias", np.full(8, 0.1, np.float32))
    half = g.add_constant("half", np.float32(0.5))
    ninf = g.add_constant("neg inf", np.float32(-np.inf))
    d = g.make_node("dense", [x, w, b], [TensorType("f32", (1, "T", 8))], meta={"scope": "layer.0", "source": "n0"})
    m = g.make_node("mul", [d.outputs[0], half], [TensorType("f32", (1, "T", 8))])
    s = g.make_node("softmax", [m.outputs[0]], [TensorType("f32", (1, "T", 8))], attrs={"axis": -1, "eps": 1e-05, "tag": "a\"b", "flags": [True, False]})
    mx = g.make_node("add", [s.outputs[0], ninf], [TensorType("f32", (1, "T", 8))])
    g.outputs = [mx.outputs[0]]
    return g


def test_round_trip_is_exact():
    g = small_graph()
    verify(g)
    text = print_graph(g)
    again = parse_graph(text, g.weights())
    assert print_graph(again) == text
    verify(again)
    assert again.constants["layer.0.weight"].attrs == {"encoding": {"format": "pencil8", "nnz": 24}, "note": "tied"}
    np.testing.assert_array_equal(again.constants["layer.0.weight"].data, g.constants["layer.0.weight"].data)
    assert again.constants["neg inf"].data == -np.inf
    assert again.nodes[2].attrs == {"axis": -1, "eps": 1e-05, "tag": 'a"b', "flags": [True, False]}


def test_text_is_readable():
    text = print_graph(small_graph())
    assert "graph @toy(%x: f32[1, T, 4]) {" in text
    assert '%"neg inf" = const f32[] dense<-inf>' in text
    assert '%dense = dense(%x, %layer.0.weight, %bias) : f32[1, T, 8] loc("layer.0", "n0")' in text
    assert "  return %add\n}" in text


def test_save_load_files(tmp_path):
    g = small_graph()
    path = save(g, tmp_path / "toy.fir")
    assert (tmp_path / "toy.safetensors").is_file()
    again = load(path)
    assert print_graph(again) == print_graph(g)
    np.testing.assert_array_equal(again.constants["bias"].data, g.constants["bias"].data)


def test_symbolic_dims_parse_to_canonical_form():
    g = parse_graph("graph @g(%a: f32[1, T + P, 4], %b: f32[?]) {\n  return %a\n}\n")
    assert g.inputs[0].type.shape == (1, "P + T", 4)
    assert g.inputs[1].type.shape == ("?",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("graph @g(%a: f32[2]) {\n  %b = add(%a, %c) : f32[2]\n  return %b\n}", "<text>:2:16: use of undefined value %c"),
        ("graph @g(%a: q8[2]) {\n  return %a\n}", "<text>:1:14: unknown dtype; expected one of"),
        ("graph @g(%a: f32[2]) {\n  %a = neg(%a) : f32[2]\n  return %a\n}", "value %a is defined twice"),
        ("graph @g(%a: f32[2]) {\n  %c = const i64[3] dense<[1, 2]>\n  return %a\n}", "dense literal has 2 values, type i64[3] needs 3"),
        ("graph @g(%a: f32[2]) {\n  return %a\n", "expected } (found end of input)"),
        ("graph @g(%a: f32[2]) { $ }", "<text>:1:24: unexpected character '$'"),
    ],
)
def test_parse_errors_name_the_place(text, message):
    with pytest.raises(FemtoccError) as err:
        parse_graph(text)
    assert message in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FemtoccError, match="no such IR file"):
        load(tmp_path / "nope.fir")


def embedding_conv_graph() -> Graph:
    """A token embedding, a convolution and a scaling, quantized: qgather, im2col, qdense, requantize."""
    from femtocc.passes import PassManager, pipeline
    from femtocc.passes.calibrate import RangeRecorder, attach_ranges

    rng = np.random.default_rng(3)
    g = Graph("embed_conv")
    ids = g.add_input("ids", TensorType("i64", (1, "T")))
    x = g.add_input("x", TensorType("f32", (1, 4, 10)))
    table = g.add_constant("table", rng.standard_normal((50, 8)).astype(np.float32))
    e = g.make_node("gather", [table, ids], [TensorType("f32", (1, "T", 8))], {"axis": 0}).outputs[0]
    half = g.make_node("mul", [e, g.add_constant("half", np.float32(0.5))], [TensorType("f32", (1, "T", 8))]).outputs[0]
    c = g.make_node("conv", [x, g.add_constant("w", rng.standard_normal((8, 4, 3)).astype(np.float32)),
                             g.add_constant("b", rng.standard_normal(8).astype(np.float32))],
                    [TensorType("f32", (1, 8, 10))], {"pads": [1, 1], "strides": [1], "dilations": [1], "group": 1}).outputs[0]
    g.outputs = [half, c]
    PassManager.parse(pipeline("lowered")).run(g)
    recorder = RangeRecorder()
    recorder.runner(g)({"ids": np.array([[3, 7, 7]], np.int64), "x": rng.standard_normal((1, 4, 10)).astype(np.float32)})
    attach_ranges({"g": g}, recorder.ranges)
    PassManager.parse(pipeline("spu001", tokens=3)).run(g)
    return g


def test_every_op_round_trips_through_text(tmp_path):
    """print -> parse -> print is the identity for every op of the vocabulary: the float ops on the
    single-node graphs of tests/test_ops.py (which round-trip there), the integer ops here."""
    from test_ops import CASES
    from test_program import block

    from femtocc.ir.ops import OPS

    graphs = [block(tmp_path)[0], block(tmp_path, weight_bits=4, act_bits=8)[0], embedding_conv_graph()]
    for g in graphs:
        verify(g)
        text = print_graph(g)
        again = parse_graph(text, g.weights())
        verify(again)
        assert print_graph(again) == text
    covered = {c[0] for c in CASES} | {n.op for g in graphs for n in g.nodes}
    assert covered == set(OPS), sorted(set(OPS) - covered)
    assert "<pencil8>" in print_graph(graphs[0])  # a storage encoding on a type


@pytest.mark.parametrize("text, message", [
    ("graph @g() {\n  %w = const i8[2, 8]<pencil5>\n  return %w\n}", "pencil5"),
    ("graph @g() {\n  %w = const i8[2, 8]<blocky>\n  return %w\n}", "unknown storage format 'blocky'"),
])
def test_bad_encodings_are_refused(text, message):
    with pytest.raises(FemtoccError, match=message):
        verify(parse_graph(text, {"w": np.ones((2, 8), np.int8)}))


def test_the_verifier_checks_an_encoding_against_the_data():
    g = Graph("g")
    w = g.add_constant("w", np.ones((8, 4), np.int8))
    g.outputs = [w]
    w.type = w.type.with_encoding("2:4")  # every input of every output is nonzero: 4 of 4, not 2
    with pytest.raises(FemtoccError, match="data does not fit its storage encoding <2:4>"):
        verify(g)
    w.data = np.tile(np.array([[1], [0], [2], [0]], np.int8), (2, 4))
    verify(g)
    assert "i8[8, 4]<2:4>" in print_graph(g)
