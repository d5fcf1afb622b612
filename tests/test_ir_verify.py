import numpy as np
import pytest

from femtocc.ir import Graph, Interpreter, TensorType, VerifyError, infer_shapes, parse_graph, verify
from femtocc.ir import dims


def test_verifier_rejects_wrong_declared_type():
    g = parse_graph("graph @g(%a: f32[2, 3], %b: f32[3, 4]) {\n  %c = matmul(%a, %b) : f32[2, 5]\n  return %c\n}")
    with pytest.raises(VerifyError, match=r"node %c = matmul: declared type f32\[2, 5\], inferred f32\[2, 4\]"):
        verify(g)


def test_verifier_rejects_use_before_definition():
    g = parse_graph("graph @g(%a: f32[2]) {\n  %b = neg(%a) : f32[2]\n  %c = neg(%b) : f32[2]\n  return %c\n}")
    g.nodes.reverse()
    with pytest.raises(VerifyError, match="input 0 %b is not defined before this node"):
        verify(g)


def test_verifier_rejects_unknown_op_and_bad_arity():
    g = parse_graph("graph @g(%a: f32[2]) {\n  %b = frobnicate(%a) : f32[2]\n  return %b\n}")
    with pytest.raises(VerifyError, match="unknown op 'frobnicate'"):
        verify(g)
    g = parse_graph("graph @g(%a: f32[2]) {\n  %b = add(%a) : f32[2]\n  return %b\n}")
    with pytest.raises(VerifyError, match="add takes 2..2 inputs, got 1"):
        verify(g)


def test_shape_inference_with_symbolic_dims():
    g = parse_graph(
        "graph @g(%past: f32[1, 6, P, 64], %new: f32[1, 6, T, 64]) {\n"
        "  %kv = concat(%past, %new) {axis = 2} : f32[1, 6, ?, 64]\n"
        "  %kt = transpose(%kv) {perm = [0, 1, 3, 2]} : f32[?, ?, ?, ?]\n"
        "  return %kt\n}"
    )
    infer_shapes(g)
    verify(g)
    assert g.outputs[0].type == TensorType("f32", (1, 6, 64, "P + T"))


def test_dims_algebra():
    assert dims.add("T", "P") == "P + T"
    assert dims.add("T", 1) == "T + 1"
    assert dims.add(2, 3) == 5
    assert dims.compatible("T + P", "P + T")
    assert dims.compatible("?", 7)
    assert not dims.compatible("T", "P")


def test_interpreter_runs_and_checks_inputs():
    g = Graph("g")
    x = g.add_input("x", TensorType("f32", ("T", 3)))
    w = g.add_constant("w", np.eye(3, dtype=np.float32) * 2)
    n = g.make_node("dense", [x, w], [TensorType("f32", ("T", 3))])
    g.outputs = [n.outputs[0]]
    out = Interpreter(g).run({"x": np.ones((5, 3), np.float32)})
    np.testing.assert_array_equal(out["dense"], np.full((5, 3), 2, np.float32))
    from femtocc.errors import FemtoccError

    with pytest.raises(FemtoccError, match=r"input %x has shape \[5, 4\], expected f32\[T, 3\]"):
        Interpreter(g).run({"x": np.ones((5, 4), np.float32)})
    with pytest.raises(FemtoccError, match="input %x was not given"):
        Interpreter(g).run({})


def test_quantized_constants_are_checked_against_their_bit_width():
    g = Graph("g")
    w = g.add_constant("w", np.array([[7, -8], [3, 9]], np.int8), attrs={"quant": {"bits": 4, "axis": 1}})
    g.outputs = [w]
    with pytest.raises(VerifyError, match=r"constant %w: values in \[-8, 9\] do not fit 4-bit quantization"):
        verify(g)
    w.data[1, 1] = 0
    verify(g)
    w.attrs["quant"]["bits"] = 16
    with pytest.raises(VerifyError, match="needs bits 4 or 8"):
        verify(g)


def test_placements_are_checked():
    g = Graph("g")
    w = g.add_constant("w", np.ones((2, 8), np.int8), attrs={"placement": {"where": "sram", "bytes": 16, "address": 0}})
    g.outputs = [w]
    verify(g)
    w.attrs["placement"]["where"] = "cache"
    with pytest.raises(VerifyError, match="placement .* must say where: sram, tile, stream, external"):
        verify(g)
    w.attrs["placement"] = {"where": "stream", "bytes": -1}
    with pytest.raises(VerifyError, match="placement bytes must be a non-negative integer"):
        verify(g)
