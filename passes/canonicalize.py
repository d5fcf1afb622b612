"""canonicalize: local simplifications from a rule table, constant folding and DCE, to a fixpoint.

Each rule maps a node to the value that replaces its result, or None. Afterwards no rule
applies anywhere, no small constant computation is left (see ``constant-fold``) and no dead node
remains.
"""

from __future__ import annotations

from femtocc.passes.constant_fold import fold_node
from femtocc.passes.dce import DeadCodeElimination
from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import is_scalar, replace_result


def _same_type(node, v):
    return v if v.type == node.outputs[0].type else None


RULES = {
    # x * 1 -> x,  1 * x -> x
    "mul": lambda n: next((_same_type(n, x) for x, c in (n.inputs, n.inputs[::-1]) if is_scalar(c, 1.0)), None),
    # x + 0 -> x,  0 + x -> x
    "add": lambda n: next((_same_type(n, x) for x, c in (n.inputs, n.inputs[::-1]) if is_scalar(c, 0.0)), None),
    # x / 1 -> x
    "div": lambda n: _same_type(n, n.inputs[0]) if is_scalar(n.inputs[1], 1.0) else None,
    # identity(x) -> x
    "identity": lambda n: n.inputs[0],
    # reshape to its own static shape -> x
    "reshape": lambda n: n.inputs[0] if n.inputs[0].type.is_static and n.inputs[0].type == n.outputs[0].type else None,
    # transpose with the identity permutation -> x
    "transpose": lambda n: n.inputs[0] if n.attrs.get("perm") == list(range(n.inputs[0].type.rank)) else None,
}


@register
class Canonicalize(Pass):
    name = "canonicalize"
    max_fold_elements: int = 65536

    def run(self, graph):
        rewrites = folded = 0
        changed = True
        while changed:
            changed = False
            for node in list(graph.nodes):
                if node not in graph.nodes:
                    continue
                rule = RULES.get(node.op)
                new = rule(node) if rule else None
                if new is not None and new is not node.outputs[0]:
                    replace_result(graph, node.outputs[0], new)
                    graph.erase_node(node)
                    rewrites += 1
                    changed = True
                elif fold_node(graph, node, self.max_fold_elements):
                    folded += 1
                    changed = True
        dce = DeadCodeElimination().run(graph)
        return {"rewrites": rewrites, "folded": folded, **dce}
