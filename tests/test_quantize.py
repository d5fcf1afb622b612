"""Integer quantization: qdense against its float fake-quant form, and the quantize pass."""

import json

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, Interpreter, TensorType, verify
from femtocc.passes import PassManager
from femtocc.passes.quantize import quantize_weight, requant_multipliers

rng = np.random.default_rng(3)


def dense_graph(w, b):
    g = Graph("d")
    x = g.add_input("x", TensorType("f32", (1, "T", w.shape[0])))
    n = g.make_node("dense", [x, g.add_constant("w", w), g.add_constant("b", b)],
                    [TensorType("f32", (1, "T", w.shape[1]))], meta={"scope": "layer"})
    g.outputs = [n.outputs[0]]
    return g


def quantized(w, b, x, tmp_path, **opts):
    g = dense_graph(w, b)
    y = Interpreter(g).run({"x": x})["dense"]
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"layer": {"input": float(np.abs(x).max()), "output": float(np.abs(y).max())}}))
    spec = ",".join([f"ranges={ranges}"] + [f"{k.replace('_', '-')}={v}" for k, v in opts.items()])
    PassManager.parse(f"quantize{{{spec}}}").run(g)
    return g, y


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 16), (4, 8), (8, 8)])
def test_integer_and_fake_quant_agree_within_one_lsb(tmp_path, weight_bits, act_bits):
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] = 0  # a dead output channel
    b = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((1, 7, 96)).astype(np.float32)
    g, y_float = quantized(w, b, x, tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    assert g.op_counts() == {"dequantize": 1, "qdense": 1, "quantize": 1}
    verify(g)
    qd = next(n for n in g.nodes if n.op == "qdense")
    integer = Interpreter(g).run({"x": x})
    fake = Interpreter(g, fake_quant=True).run({"x": x})
    name = g.outputs[0].name
    lsb = qd.attrs["y_scale"]
    # documented tolerance: integer and fake-quant results differ by at most one output LSB
    assert np.abs(np.rint((integer[name] - fake[name]) / lsb)).max() <= 1
    # and both are close to the float layer (a few LSBs of weight and activation rounding)
    rel = np.abs(integer[name] - y_float).max() / np.abs(y_float).max()
    assert rel < {8: 0.02, 4: 0.25}[weight_bits]


def test_quantize_keeps_pruned_zeros_and_annotations(tmp_path):
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[:8, :] = 0
    g = dense_graph(w, np.zeros(16, np.float32))
    g.constants["w"].attrs["sparsity"] = {"format": "unstructured"}
    ranges = tmp_path / "r.json"
    ranges.write_text(json.dumps({"layer": {"input": 2.0, "output": 5.0}}))
    PassManager.parse(f"quantize{{ranges={ranges}}}").run(g)
    wq = g.constants["w.q"]
    assert wq.data.dtype == np.int8 and np.all(wq.data[:8] == 0)
    assert wq.attrs == {"sparsity": {"format": "unstructured"}, "quant": {"bits": 8, "axis": 1, "scheme": "symmetric-per-channel"}}
    assert "w" not in g.constants  # the float weight is gone


def test_weight_quantization_and_multipliers():
    w = np.array([[1.0, -0.5], [-2.0, 0.25]], np.float32)
    q, s = quantize_weight(w, 8)
    np.testing.assert_allclose(s, [2.0 / 127, 0.5 / 127])
    assert q.tolist() == [[64, -127], [-127, 64]]
    m, shift = requant_multipliers(np.array([0.001, 0.37, 1.9]))
    assert m.max() < 2**24
    np.testing.assert_allclose(m / 2.0**shift, [0.001, 0.37, 1.9], rtol=0, atol=1.9 / 2**23)  # 24-bit multipliers


def test_quantize_errors(tmp_path):
    g = dense_graph(np.ones((4, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(FemtoccError, match="quantize needs calibrated ranges"):
        PassManager.parse("quantize").run(g)
    with pytest.raises(FemtoccError, match="does not exist"):
        PassManager.parse(f"quantize{{ranges={tmp_path / 'none.json'}}}").run(g)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": {"input": 0}}))
    with pytest.raises(FemtoccError, match="needs positive 'input' and 'output'"):
        PassManager.parse(f"quantize{{ranges={bad}}}").run(g)
    with pytest.raises(FemtoccError, match="weight-bits must be 4 or 8"):
        PassManager.parse(f"quantize{{ranges={bad},weight-bits=3}}").run(g)


def test_w8a16_on_real_tiny_en(tiny, dev_utts, tmp_path):
    from femtocc.decode import make_backend, transcribe
    from femtocc.passes import DEFAULT_PIPELINE
    from femtocc.passes.calibrate import collect_ranges

    ranges = collect_ranges(tiny, dev_utts[:2])
    assert len(ranges) == 66 and all(r["input"] > 0 and r["output"] > 0 for r in ranges.values())
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(ranges))
    manager = PassManager.parse(f"{DEFAULT_PIPELINE},quantize{{ranges={path}}}")
    backend = make_backend(tiny, "ir", manager=manager)
    assert sum(r.stats.get("quantized", 0) for r in manager.records) == 64  # every linear layer; convs stay float
    utts = dev_utts[5:7]
    quantized = transcribe(tiny, backend, utts)
    floating = transcribe(tiny, make_backend(tiny, "ir"), utts)
    assert [t.hypothesis for t in quantized] == [t.hypothesis for t in floating]
