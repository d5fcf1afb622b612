"""Integer quantization: every integer op against its float fake-quant form and the float op, and the pass.

Documented tolerance (femtocc.ir.qops): integer and fake-quant results differ by at most one output
LSB for the linear ops (qdense, qmatmul, qadd, requantize) and two for the table ops (qgelu,
qsoftmax, qlayer_norm).
"""

import json

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, Interpreter, TensorType, verify
from femtocc.ir.qops import isqrt, lut_interpolate, rshift_round
from femtocc.passes import PassManager
from femtocc.passes.calibrate import RangeRecorder
from femtocc.passes.quantize import quantize_weight, requant_multipliers

rng = np.random.default_rng(3)


def one_op(op, shapes, consts=(), attrs=None, out_shape=None):
    """A graph computing one float op on inputs x0, x1, ... and constants."""
    g = Graph("g")
    ins = [g.add_input(f"x{i}", TensorType("f32", s)) for i, s in enumerate(shapes)]
    ins += [g.add_constant(f"c{i}", c) for i, c in enumerate(consts)]
    n = g.make_node(op, ins, [TensorType("f32", out_shape or shapes[0])], attrs or {}, meta={"scope": "layer"})
    g.outputs = [n.outputs[0]]
    return g


def quantize(g, feeds, tmp_path, **opts):
    """Calibrate ``g`` on ``feeds``, quantize it; returns the float result."""
    recorder = RangeRecorder()
    y = recorder.runner(g)(feeds)[g.outputs[0].name]
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps(recorder.ranges))
    spec = ",".join([f"ranges={ranges}"] + [f"{k.replace('_', '-')}={v}" for k, v in opts.items()])
    PassManager.parse(f"quantize{{{spec}}}").run(g)
    verify(g)
    return y


def compare(g, feeds, y_float, lsb_tolerance, rel_tolerance):
    name = g.outputs[0].name
    integer = Interpreter(g).run(feeds)[name]
    fake = Interpreter(g, fake_quant=True).run(feeds)[name]
    lsb = g.outputs[0].producer.attrs["scale"]
    assert np.abs(np.rint((integer - fake) / lsb)).max() <= lsb_tolerance
    rel = np.abs(integer - y_float).max() / np.abs(y_float).max()
    assert rel < rel_tolerance, rel
    return integer


@pytest.mark.parametrize("weight_bits, act_bits, rel", [(8, 16, 0.02), (4, 8, 0.25), (8, 8, 0.05)])
def test_qdense(tmp_path, weight_bits, act_bits, rel):
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] = 0  # a dead output channel
    b = rng.standard_normal(40).astype(np.float32)
    feeds = {"x0": rng.standard_normal((1, 7, 96)).astype(np.float32)}
    g = one_op("dense", [(1, "T", 96)], [w, b], out_shape=(1, "T", 40))
    y = quantize(g, feeds, tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    assert g.op_counts() == {"dequantize": 1, "qdense": 1, "quantize": 1}
    compare(g, feeds, y, 1, rel)


def test_qmatmul_qadd_requantize(tmp_path):
    a = rng.standard_normal((2, 5, 16)).astype(np.float32)
    b = rng.standard_normal((2, 16, 9)).astype(np.float32)
    g = one_op("matmul", [(2, 5, 16), (2, 16, 9)], out_shape=(2, 5, 9))
    compare(g, {"x0": a, "x1": b}, quantize(g, {"x0": a, "x1": b}, tmp_path), 1, 0.002)
    assert "qmatmul" in g.op_counts()

    c = rng.standard_normal((3, 8)).astype(np.float32) * 5
    g = one_op("add", [(3, 8)], [rng.standard_normal(8).astype(np.float32)])
    compare(g, {"x0": c}, quantize(g, {"x0": c}, tmp_path), 1, 0.001)
    assert "qadd" in g.op_counts()

    g = one_op("mul", [(3, 8)], [np.float32(0.125)])
    compare(g, {"x0": c}, quantize(g, {"x0": c}, tmp_path), 1, 0.001)
    assert "requantize" in g.op_counts()


@pytest.mark.parametrize("act_bits", [16, 8])
def test_table_ops(tmp_path, act_bits):
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    rel = {16: 0.003, 8: 0.08}[act_bits]
    g = one_op("gelu", [(4, 64)])
    compare(g, {"x0": x}, quantize(g, {"x0": x}, tmp_path, act_bits=act_bits), 2, rel)
    assert "qgelu" in g.op_counts()

    g = one_op("softmax", [(4, 64)], attrs={"axis": -1})
    p = compare(g, {"x0": x}, quantize(g, {"x0": x}, tmp_path, act_bits=act_bits), 2, 2 * rel)
    assert np.allclose(p.sum(axis=-1), 1, atol=64 * 2.0 ** -(act_bits - 1))

    gamma = rng.uniform(0.5, 2, 64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    g = one_op("layer_norm", [(4, 64)], [gamma, beta], attrs={"axis": -1, "epsilon": 1e-5})
    compare(g, {"x0": x + 10}, quantize(g, {"x0": x + 10}, tmp_path, act_bits=act_bits), 2, rel * 2)
    assert "qlayer_norm" in g.op_counts()


@pytest.mark.parametrize("opts, bits, own", [({}, 8, None), ({"vocab_bits": 4}, 4, None),
                                             ({"weight_bits": 4, "act_bits": 8, "vocab_bits": 8}, 8, None),
                                             ({}, 4, 4), ({"weight_bits": 4, "act_bits": 8}, 8, 8)])
def test_token_embedding_is_one_table_for_gather_and_output_projection(tmp_path, opts, bits, own):
    """One table, stored once, at ``vocab-bits`` when given (int4: half what a decoder step streams),
    or at the table constant's own ``weight_bits`` (a plan's choice)."""
    table = rng.standard_normal((50, 16)).astype(np.float32)
    g = Graph("dec")
    ids = g.add_input("ids", TensorType("i64", (1, "T")))
    emb = g.add_constant("emb", table, attrs={"weight_bits": own} if own else None)
    h = g.make_node("gather", [emb, ids], [TensorType("f32", (1, "T", 16))], {"axis": 0}).outputs[0]
    t = g.make_node("transpose", [emb], [TensorType("f32", (16, 50))], {"perm": [1, 0]}).outputs[0]
    logits = g.make_node("matmul", [h, t], [TensorType("f32", (1, "T", 50))]).outputs[0]
    g.outputs = [logits]
    feeds = {"ids": np.array([[3, 7, 49]])}
    y = quantize(g, feeds, tmp_path, **opts)
    counts = g.op_counts()
    assert counts["qgather"] == 1 and counts["qdense"] == 1
    int8 = [c for c in g.constants.values() if c.data.dtype == np.int8]
    assert len(int8) == 1  # tied: stored once
    assert int8[0].attrs["quant"]["bits"] == bits and np.abs(int8[0].data).max() == 2 ** (bits - 1) - 1
    out = Interpreter(g).run(feeds)[g.outputs[0].name]
    assert np.argmax(out, -1).tolist() == np.argmax(y, -1).tolist()


def test_pruned_zeros_and_annotations_survive(tmp_path):
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[:8, :] = 0
    g = one_op("dense", [(2, 32)], [w], out_shape=(2, 16))
    g.constants["c0"].attrs["sparsity"] = {"format": "unstructured"}
    quantize(g, {"x0": rng.standard_normal((2, 32)).astype(np.float32)}, tmp_path)
    wq = next(n for n in g.nodes if n.op == "qdense").inputs[1]
    assert wq.data.dtype == np.int8 and not wq.data[:8].any()
    assert wq.attrs["sparsity"] == {"format": "unstructured"} and wq.attrs["quant"]["bits"] == 8


def test_a_constant_carries_its_own_weight_width(tmp_path):
    """A plan's per-layer width: a dense weight marked ``weight_bits=4`` is stored at 4 bits in a W8A16
    graph (on the grid ``weight_scale`` names, when GPTQ rounded it), its neighbour at 8."""
    from femtocc.passes.obs import gptq_quantize

    x = rng.standard_normal((2, 32)).astype(np.float32)
    g = Graph("g")
    v = g.add_input("x0", TensorType("f32", (2, 32)))
    w4 = rng.standard_normal((32, 16)).astype(np.float32)
    rounded, scale = gptq_quantize(w4.T, np.eye(32), 4)
    c4 = g.add_constant("w4", np.ascontiguousarray(rounded.T), attrs={"weight_bits": 4, "weight_scale": scale.tolist()})
    h = g.make_node("dense", [v, c4], [TensorType("f32", (2, 16))]).outputs[0]
    c8 = g.add_constant("w8", rng.standard_normal((16, 8)).astype(np.float32))
    g.outputs = [g.make_node("dense", [h, c8], [TensorType("f32", (2, 8))]).outputs[0]]
    quantize(g, {"x0": x}, tmp_path)
    stored = {n.inputs[1].name: n.inputs[1] for n in g.nodes if n.op == "qdense"}
    assert stored["w4.q"].attrs["quant"]["bits"] == 4 and np.abs(stored["w4.q"].data).max() == 7
    assert np.array_equal(stored["w4.q"].data, np.rint(rounded.T / scale[None, :]).astype(np.int8))
    assert "weight_bits" not in stored["w4.q"].attrs and stored["w8.q"].attrs["quant"]["bits"] == 8
    c = Graph("g")
    v = c.add_input("x0", TensorType("f32", (2, 32)))
    bad = c.add_constant("w", w4, attrs={"weight_bits": 2})
    c.outputs = [c.make_node("dense", [v, bad], [TensorType("f32", (2, 16))]).outputs[0]]
    with pytest.raises(FemtoccError, match="%w in @g has weight_bits 2; give 4 or 8"):
        quantize(c, {"x0": x}, tmp_path)


def test_vocab_bits_must_be_4_or_8(tmp_path):
    g = one_op("add", [(2, 4), (2, 4)])
    with pytest.raises(FemtoccError, match="vocab-bits must be 4 or 8"):
        quantize(g, {"x0": np.ones((2, 4), np.float32), "x1": np.ones((2, 4), np.float32)}, tmp_path, vocab_bits=6)


def test_errors_name_the_problem(tmp_path):
    g = one_op("exp", [(2, 3)])
    x = {"x0": np.ones((2, 3), np.float32)}
    with pytest.raises(FemtoccError, match=r"node %exp \(exp\) in @g has no integer form"):
        quantize(g, x, tmp_path)
    g = one_op("gelu", [(2, 3)])
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(FemtoccError, match="no calibrated range for %x0"):
        PassManager.parse(f"quantize{{ranges={tmp_path / 'r.json'}}}").run(g)
    with pytest.raises(FemtoccError, match="does not exist"):
        PassManager.parse(f"quantize{{ranges={tmp_path / 'missing.json'}}}").run(g)
    with pytest.raises(FemtoccError, match="weight-bits must be 4 or 8"):
        PassManager.parse(f"quantize{{ranges={tmp_path / 'r.json'},weight-bits=3}}").run(g)


def test_integer_primitives():
    q = rng.integers(0, 2**48, 1000)
    r = isqrt(q)
    assert np.all(r * r <= q) and np.all((r + 1) * (r + 1) > q)
    assert rshift_round(np.array([5, 6, -5, -6]), 2).tolist() == [1, 2, -1, -1]  # round half up
    table = np.array([0, 100, 300], np.int32)
    assert lut_interpolate(np.array([0, 2, 4, 6, 7]), table, 2).tolist() == [0, 50, 100, 200, 250]
    w = rng.standard_normal((8, 4)).astype(np.float32)
    wq, s = quantize_weight(w, 8)
    assert np.abs(wq * s - w).max() <= s.max() / 2 + 1e-6
    m, shift = requant_multipliers(np.array([0.3, 0.001]))
    assert m.max() < 2**24 and np.allclose(m / 2.0**shift, [0.3, 0.001], rtol=1e-4)


def test_gptq_beats_rounding_on_the_calibrated_error():
    from femtocc.passes.obs import gptq_quantize, relative_error

    x = rng.standard_normal((400, 48)) @ rng.standard_normal((48, 48))  # correlated inputs
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((16, 48)).astype(np.float32)
    w[:, :5] = 0  # pruned columns stay pruned
    g, scale = gptq_quantize(w, h, 4)
    q = g / scale[:, None]
    assert np.allclose(q, np.rint(q), atol=1e-4) and np.abs(np.rint(q)).max() <= 7 and not g[:, :5].any()
    plain = np.clip(np.rint(w / scale[:, None]), -7, 7) * scale[:, None]
    assert relative_error(w, g, h) < 0.8 * relative_error(w, plain, h)
    wq, s = quantize_weight(g.T, 4, scale)  # the quantize pass keeps the GPTQ grid
    assert np.array_equal(wq.T, np.rint(q).astype(np.int8)) and np.allclose(s, scale)
