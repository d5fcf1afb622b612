"""select-layout: give each weight the storage format the spu001 cost model finds best.

For every ``dense`` / ``qdense`` node with a constant ``[in, out]`` weight the candidates are the
target's storage formats that can hold it (:func:`~femtocc.targets.spu001.cost.storage_formats`):

* ``dense``: every weight stored, ``in * out * bits / 8`` bytes; ``in * out`` MACs per row;
* ``pencilH`` (``H`` = the description's ``facts.pencil``): only pencils that hold a nonzero are
  stored, each as one word plus its input index; ``pencils * H`` MACs per row.

The choice is made from the data, by the cost model (the ``annotate-sparsity`` analysis is not
consulted). A sparse format is a candidate only when it is both no slower and smaller than dense;
among candidates fewer cycles win, then fewer bytes. So a layer stays dense whenever sparse would
be slower or larger (the "honest speedup": unstructured sparsity that leaves most pencils nonzero
buys nothing).

Guarantee: afterwards every such weight's type carries the chosen storage encoding
(``i8[384, 1536]<pencil8>``; none for dense), which the verifier checks against the data.
"""

from __future__ import annotations

from femtocc.passes.manager import Pass, register
from femtocc.targets.spu001.cost import choose_format, format_costs, weight_bits


@register
class SelectLayout(Pass):
    name = "select-layout"
    target: str = ""  # a target description file; empty: the default spu001

    def run(self, graph):
        from femtocc.targets.spu001.description import load_target

        target = load_target(self.target)
        stats = {"dense": 0, "sparse": 0}
        for node in graph.nodes:
            if node.op not in ("dense", "qdense") or not node.inputs[1].is_constant:
                continue
            const = node.inputs[1]
            best = choose_format(format_costs(const.data, weight_bits(const), target))
            const.type = const.type.with_encoding(None if best == "dense" else best)
            stats["dense" if best == "dense" else "sparse"] += 1
        return stats
