"""fold-dense: ``matmul(x, W)`` with a constant 2-D ``W`` [in, out], and an ``add`` of a constant
bias [out] after it, become one ``dense(x, W, b)``.

Afterwards every live matmul by a constant matrix is a ``dense`` op: the unit that pruning,
quantization and layout selection work on. The node keeps the matmul's scope (module path); the
matmul and add it replaces are left dead for ``dce``.
"""

from __future__ import annotations

from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import only_user, other_input, replace_result


@register
class FoldDense(Pass):
    name = "fold-dense"

    def run(self, graph):
        folded = with_bias = 0
        for mm in [n for n in graph.nodes if n.op == "matmul"]:
            x, w = mm.inputs
            if not (w.is_constant and w.data.ndim == 2):
                continue
            out = mm.outputs[0]
            inputs, last = [x, w], mm
            add = only_user(out)
            if add is not None and add.op == "add":
                b = other_input(add, out)
                if b.is_constant and b.data.ndim == 1 and b.data.shape[0] == w.data.shape[1]:
                    inputs, last = [x, w, b], add
                    with_bias += 1
            dense = graph.make_node("dense", inputs, [last.outputs[0].type], meta=mm.meta, before=mm)
            replace_result(graph, last.outputs[0], dense.outputs[0])
            folded += 1
        return {"dense-folded": folded, "with-bias": with_bias}
