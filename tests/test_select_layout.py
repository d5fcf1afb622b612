import numpy as np

from femtocc.ir import Graph, TensorType, print_graph
from femtocc.passes import PassManager
from femtocc.targets.spu001.cost import format_costs, weight_cost
from femtocc.targets.spu001 import load

rng = np.random.default_rng(5)


def graph_with(weight):
    g = Graph("g")
    x = g.add_input("x", TensorType("f32", (1, weight.shape[0])))
    g.add_constant("w", weight)  # float: 32-bit words until quantize makes it int8
    g.outputs = [g.make_node("dense", [x, g.constants["w"]], [TensorType("f32", (1, weight.shape[1]))]).outputs[0]]
    return g


def test_costs_with_known_answers():
    t = load()
    w = np.ones((16, 32), np.float32)
    w[:, :8] = 0  # one pencil column of four is empty everywhere
    c = format_costs(w, 8, t)
    assert c["dense"] == {"bytes": 512, "cycles_per_row": 32}  # 512 MACs / (8 lanes x 2 cores)
    assert c["pencil8"] == {"bytes": 48 * (8 + 2), "cycles_per_row": 24}  # 48 pencils of 8


def test_structured_sparsity_is_chosen_and_unstructured_stays_dense():
    w = rng.standard_normal((64, 64)).astype(np.float32)
    pencil = w.copy()
    pencil.reshape(64, 8, 8)[rng.random((64, 8)) < 0.8] = 0  # 80 % of pencils empty
    unstructured = np.where(rng.random(w.shape) < 0.5, 0, w).astype(np.float32)  # 50 %, few empty pencils
    manager = PassManager.parse("select-layout")
    g = graph_with(pencil)
    manager.run(g)
    assert g.constants["w"].type.encoding == "pencil8" and "<pencil8>" in print_graph(g)
    layout = weight_cost(g.constants["w"], load())
    assert layout["format"] == "pencil8" and layout["cycles_per_row"] < layout["dense_cycles_per_row"] / 3
    g = graph_with(unstructured)
    manager.run(g)
    assert g.constants["w"].type.encoding is None
    layout = weight_cost(g.constants["w"], load())
    assert layout["format"] == "dense" and layout["bytes"] == 4 * 64 * 64
    assert manager.records[-1].stats == {"dense": 1, "sparse": 0}
