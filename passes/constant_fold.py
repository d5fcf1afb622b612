"""constant-fold: evaluate nodes whose inputs are all constants, and ``shape`` of static values.

Afterwards no node with only constant inputs produces a result of at most ``max_elements``
elements, and no ``shape`` node reads a value of static shape. Larger results are left alone so
that, e.g., the transposed tied embedding is not stored a second time.
"""

from __future__ import annotations

import numpy as np

from femtocc.ir.ops import OPS
from femtocc.passes.manager import Pass, register


def fold_node(graph, node, max_elements: int) -> bool:
    if node.op == "shape" and node.inputs[0].type.is_static:
        results = OPS["shape"].run([np.empty(node.inputs[0].type.shape, np.bool_)], node.attrs)
    elif node.inputs and all(v.is_constant for v in node.inputs):
        if any((o.type.numel() or max_elements + 1) > max_elements for o in node.outputs):
            return False
        results = OPS[node.op].run([v.data for v in node.inputs], node.attrs)
    else:
        return False
    for out, data in zip(node.outputs, results):
        const = graph.add_constant(out.name + "_folded", np.asarray(data))
        out.replace_all_uses_with(const)
        graph.replace_output(out, const)
    graph.erase_node(node)
    return True


@register
class ConstantFold(Pass):
    name = "constant-fold"
    max_elements: int = 65536

    def run(self, graph):
        folded = sum(fold_node(graph, node, self.max_elements) for node in list(graph.nodes))
        return {"folded": folded}
