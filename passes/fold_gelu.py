"""fold-gelu: fold exact GELU spelled with Erf into one ``gelu`` op.

Matches ``x * 0.5 * (1 + erf(x / sqrt(2)))`` with the two multiplications in either order and
either operand order (how torch's exporter and femtocc's own ONNX export spell it). Afterwards
no ``erf`` node that belongs to such a pattern remains (run ``dce`` to drop the dead nodes).
"""

from __future__ import annotations

import math

from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import is_scalar, only_user, other_input, replace_result


def _match(erf):
    div = erf.inputs[0].producer
    if div is None or div.op != "div" or not is_scalar(div.inputs[1], math.sqrt(2.0)):
        return None
    x = div.inputs[0]
    add = only_user(erf.outputs[0])
    if add is None or add.op != "add" or not is_scalar(other_input(add, erf.outputs[0]), 1.0):
        return None
    value, want_x, want_half = add.outputs[0], True, True
    last = None
    for _ in range(2):
        mul = only_user(value)
        if mul is None or mul.op != "mul":
            return None
        other = other_input(mul, value)
        if want_x and other is x:
            want_x = False
        elif want_half and is_scalar(other, 0.5):
            want_half = False
        else:
            return None
        value, last = mul.outputs[0], mul
    return x, last


@register
class FoldGelu(Pass):
    name = "fold-gelu"

    def run(self, graph):
        folded = 0
        for erf in [n for n in graph.nodes if n.op == "erf"]:
            if erf not in graph.nodes:
                continue
            found = _match(erf)
            if not found:
                continue
            x, last = found
            gelu = graph.make_node("gelu", [x], [last.outputs[0].type], meta=last.meta, before=last)
            replace_result(graph, last.outputs[0], gelu.outputs[0])
            folded += 1
        return {"gelu-folded": folded}
