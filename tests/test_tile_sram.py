"""tile-sram on toy graphs with known answers: fits, must stream, cannot compile."""

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, TensorType
from femtocc.passes import PassManager


def mlp(n_in, n_hidden, rows="T"):
    g = Graph("mlp")
    x = g.add_input("x", TensorType("f32", (rows, n_in)))
    w1 = g.add_constant("w1", np.ones((n_in, n_hidden), np.float32))
    w2 = g.add_constant("w2", np.ones((n_hidden, n_in), np.float32))
    for w in (w1, w2):
        w.attrs["quant"] = {"bits": 8}
    h = g.make_node("dense", [x, w1], [TensorType("f32", (rows, n_hidden))]).outputs[0]
    y = g.make_node("dense", [h, w2], [TensorType("f32", (rows, n_in))]).outputs[0]
    g.outputs = [y]
    return g


def stats(g, spec):
    m = PassManager.parse(spec)
    m.run(g)
    return m.records[-1].stats


def test_small_model_fits_in_sram():
    g = mlp(64, 256)
    s = stats(g, "tile-sram{tokens=10}")
    # per core: x 10*64*2/2 = 640 B, h 2560 B, y 640 B; x is freed after h is made and y reuses its space
    assert s["act-high-water-bytes-per-core"] == 640 + 2560
    assert s["resident-weight-bytes"] == 2 * 64 * 256 and s["streamed-weight-bytes"] == 0
    assert g.constants["w1"].attrs["placement"]["where"] == "sram"


def test_large_weights_stream_and_count_external_traffic():
    g = mlp(1024, 1024)  # two 1 MiB int8 weights: 512 KiB per core each, more than fits beside activations
    s = stats(g, "tile-sram{tokens=1}")
    assert s["streamed-weight-bytes"] == 2 * 1024 * 1024
    assert s["external-bytes-per-run"] == 2 * 1024 * 1024
    p = g.constants["w1"].attrs["placement"]
    assert p["where"] == "stream" and p["tiles"] == 32  # 512 KiB per core in 16 KiB tiles


def test_large_activations_stream_and_huge_rows_cannot_compile():
    g = mlp(64, 8192, rows=1500)  # h: 1500 x 8192 int16 = 24 MiB: external, written once, read once
    s = stats(g, "tile-sram")
    assert s["streamed-activations"] == 1
    assert s["external-bytes-per-run"] == s["streamed-weight-bytes"] + 2 * 1500 * 8192 * 2
    g = mlp(64, 1 << 20, rows=1)  # one row of h is 1 MiB per core
    with pytest.raises(FemtoccError, match=r"activation %dense \(f32\[1, 1048576\]\): one row needs 1048576 bytes per core"):
        PassManager.parse("tile-sram").run(g)


def test_unbound_dim_is_named():
    g = mlp(8, 8, rows="N")
    with pytest.raises(FemtoccError, match="value %x has dim 'N' that cannot be bound"):
        PassManager.parse("tile-sram").run(g)


def test_attention_chains_run_in_row_tiles():
    """scores = q @ k^T -> softmax -> @ v: the score matrix is never placed whole."""
    g = Graph("attn")
    f = lambda *s: TensorType("f32", s)  # noqa: E731
    q = g.add_input("q", f(1, 6, 1500, 64))
    kt = g.add_input("kt", f(1, 6, 64, 1500))
    v = g.add_input("v", f(1, 6, 1500, 64))
    s = g.make_node("matmul", [q, kt], [f(1, 6, 1500, 1500)]).outputs[0]
    p = g.make_node("softmax", [s], [f(1, 6, 1500, 1500)], {"axis": -1}).outputs[0]
    g.outputs = [g.make_node("matmul", [p, v], [f(1, 6, 1500, 64)]).outputs[0]]
    st = stats(g, "tile-sram")
    assert st["attention-chains-tiled"] == 1
    assert all(n.attrs["tile_rows"] == 8 for n in g.nodes)  # 3 x 8 rows x 1500 keys x 2 bytes fit a quarter core
    assert s.attrs["placement"]["where"] == "tile" and s.attrs["placement"]["bytes"] == 8 * 1500 * 2
    assert st["external-activation-bytes"] < 6 * 1500 * 1500 * 2  # no score matrix goes out
