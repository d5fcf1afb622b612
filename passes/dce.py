"""dce: dead-code elimination.

Afterwards every node has at least one output that is used or is a graph output, and every
constant is used.
"""

from __future__ import annotations

from femtocc.passes.manager import Pass, register


@register
class DeadCodeElimination(Pass):
    name = "dce"

    def run(self, graph):
        live_outputs = {id(v) for v in graph.outputs}
        removed = 0
        for node in reversed(list(graph.nodes)):
            if not any(v.users or id(v) in live_outputs for v in node.outputs):
                graph.erase_node(node)
                removed += 1
        dead = [n for n, v in graph.constants.items() if not v.users and id(v) not in live_outputs]
        for n in dead:
            del graph.constants[n]
        return {"nodes-removed": removed, "constants-removed": len(dead)}
