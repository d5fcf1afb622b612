"""Each op's numpy definition against onnxruntime, on single-node graphs exported through femtocc."""

import numpy as np
import onnxruntime as ort
import pytest

from femtocc.frontend.onnx_ir import export_onnx
from femtocc.ir import Graph, Interpreter, TensorType, infer_shapes, parse_graph, print_graph, verify

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


CASES = [
    ("add", [f32(2, 3, 4), f32(4)], {}),
    ("sub", [f32(2, 3), f32(2, 1)], {}),
    ("mul", [f32(3, 4), np.float32(0.5)], {}),
    ("div", [f32(3, 4), np.float32(1.41)], {}),
    ("pow", [np.abs(f32(3, 4)), np.float32(2.0)], {}),
    ("neg", [f32(5)], {}),
    ("sqrt", [np.abs(f32(5))], {}),
    ("exp", [f32(5)], {}),
    ("tanh", [f32(5)], {}),
    ("erf", [f32(7, 3)], {}),
    ("greater", [f32(2, 3), f32(3)], {}),
    ("greater_or_equal", [f32(2, 3), f32(3)], {}),
    ("less", [f32(2, 3), f32(2, 1)], {}),
    ("equal", [np.arange(6).reshape(2, 3), np.array([1, 4, 5])], {}),
    ("identity", [f32(2, 3)], {}),
    ("reciprocal", [np.abs(f32(4)) + 0.5], {}),
    ("less_or_equal", [np.arange(6).reshape(1, 6), np.arange(3).reshape(3, 1)], {}),
    ("where", [f32(3, 4) > 0, f32(3, 4), np.float32(-np.inf)], {}),
    ("cast", [np.arange(5, dtype=np.int64)], {"to": "f32"}),
    ("softmax", [f32(2, 3, 9)], {"axis": -1}),
    ("layer_norm", [f32(2, 5, 16), f32(16), f32(16)], {"axis": -1, "epsilon": 1e-5}),
    ("matmul", [f32(2, 3, 5, 8), f32(2, 3, 8, 4)], {}),
    ("conv", [f32(1, 4, 20), f32(6, 4, 3), f32(6)], {"pads": [1, 1], "strides": [2], "dilations": [1], "group": 1}),
    ("shape", [f32(2, 3, 4)], {"start": 1, "end": 3}),
    ("reshape", [f32(2, 3, 4), np.array([1, -1, 4], np.int64)], {"allowzero": 1}),
    ("transpose", [f32(2, 3, 4)], {"perm": [0, 2, 1]}),
    ("squeeze", [f32(1, 3, 1), np.array([0], np.int64)], {}),
    ("unsqueeze", [f32(3, 4), np.array([0, 3], np.int64)], {}),
    ("concat", [f32(1, 2, 3), f32(1, 4, 3)], {"axis": 1}),
    ("gather", [f32(10, 4), np.array([[1, 7, 7]], np.int64)], {"axis": 0}),
    ("gather_nd", [f32(10, 4), np.array([[3], [5]], np.int64)], {"batch_dims": 0}),
    ("range", [np.array(2, np.int64), np.array(9, np.int64), np.array(3, np.int64)], {}),
    ("expand", [f32(3, 1), np.array([2, 3, 4], np.int64)], {}),
    ("tile", [f32(2, 3), np.array([2, 1], np.int64)], {}),
    ("slice", [f32(5, 6), np.array([1], np.int64), np.array([4], np.int64), np.array([1], np.int64)], {}),
    ("reduce_mean", [f32(3, 4, 5), np.array([-1], np.int64)], {"keepdims": 1}),
    ("constant_of_shape", [np.array([2, 3], np.int64)], {"value": 1.5, "dtype": "f32"}),
    ("gelu", [f32(4, 5)], {}),
    ("dense", [f32(2, 3, 8), f32(8, 5), f32(5)], {}),
]


@pytest.mark.parametrize("op, arrays, attrs", CASES, ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(op, arrays, attrs):
    g = Graph(op)
    ins = [g.add_input(f"in{i}", TensorType.of(np.asarray(a))) for i, a in enumerate(arrays)]
    node = g.make_node(op, ins, [TensorType("f32", ())], attrs=attrs)
    # shape-carrying inputs become constants so the type rule can read them
    for i, a in enumerate(arrays):
        if np.asarray(a).dtype == np.int64 and op not in ("cast", "gather", "gather_nd", "less_or_equal", "equal", "shape"):
            c = g.add_constant(f"c{i}", np.asarray(a))
            node.set_input(i, c)
    g.inputs = [v for v in g.inputs if v.users]
    infer_shapes(g)
    g.outputs = [node.outputs[0]]
    verify(g)
    text = print_graph(g)  # the text form round-trips
    assert print_graph(parse_graph(text, g.weights())) == text
    feeds = {v.name: np.asarray(arrays[int(v.name[2:])]) for v in g.inputs}
    ours = Interpreter(g).run(feeds)[node.outputs[0].name]
    sess = ort.InferenceSession(export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, feeds)[0]
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # the declared (inferred) type matches what actually came out
    assert tuple(node.outputs[0].type.shape) == ours.shape
