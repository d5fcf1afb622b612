"""select-layout: choose each weight's storage format on the target from its cost model.

For every ``dense`` / ``qdense`` node with a constant ``[in, out]`` weight the candidates are:

* ``dense``: every weight stored, ``in * out * bits / 8`` bytes; ``in * out`` MACs per row;
* ``pencil8``: only pencils (``pencil`` consecutive outputs at one input) that hold a nonzero
  are stored, each as one 64-bit word plus its input index; ``pencils * pencil`` MACs per row.

Cycles per input row are MACs over the MAC lanes of all cores. A sparse format is a candidate only
when it is both no slower and smaller than dense; among candidates fewer cycles win, then fewer
bytes. So a layer stays dense whenever sparse would be slower or larger (the "honest speedup":
unstructured sparsity that leaves most pencils nonzero buys nothing).
Afterwards every such weight constant carries ``layout = {format, bytes, dense_bytes,
cycles_per_row, dense_cycles_per_row}``.
"""

from __future__ import annotations

import numpy as np

from femtocc.passes.manager import Pass, register


def weight_bits(const) -> int:
    return int(const.attrs.get("quant", {}).get("bits", 32 if const.data.dtype == np.float32 else 8))


def layout_costs(w_in_out: np.ndarray, bits: int, target) -> dict[str, dict]:
    """Bytes and cycles per input row of each candidate format for one [in, out] weight."""
    f, a = target.facts, target.assumptions
    lanes = a.mac_lanes_per_core * f.cores
    n_in, n_out = w_in_out.shape
    costs = {"dense": {"bytes": n_in * n_out * bits // 8, "cycles_per_row": -(-n_in * n_out // lanes)}}
    if n_out % f.pencil == 0:
        nonzero = (w_in_out != 0).reshape(n_in, n_out // f.pencil, f.pencil).any(axis=2)
        pencils = int(nonzero.sum())
        word_bytes = f.pencil * bits // 8
        costs[f"pencil{f.pencil}"] = {
            "bytes": pencils * (word_bytes + a.pencil_index_bits // 8),
            "cycles_per_row": -(-pencils * f.pencil // lanes) + pencils * a.pencil_decode_cycles // max(f.cores, 1),
        }
    return costs


@register
class SelectLayout(Pass):
    name = "select-layout"
    target: str = ""  # a target description file; empty: the default spu001

    def run(self, graph):
        from femtocc.targets.spu001 import DEFAULT, load

        target = load(self.target or DEFAULT)
        stats = {"dense": 0, "sparse": 0}
        for node in graph.nodes:
            if node.op not in ("dense", "qdense") or not node.inputs[1].is_constant:
                continue
            const = node.inputs[1]
            costs = layout_costs(const.data, weight_bits(const), target)
            dense = costs["dense"]
            eligible = [k for k, c in costs.items()
                        if k == "dense" or (c["cycles_per_row"] <= dense["cycles_per_row"] and c["bytes"] < dense["bytes"])]
            best = min(eligible, key=lambda k: (costs[k]["cycles_per_row"], costs[k]["bytes"], k != "dense"))
            const.attrs["layout"] = {
                "format": best,
                "bytes": costs[best]["bytes"],
                "dense_bytes": costs["dense"]["bytes"],
                "cycles_per_row": costs[best]["cycles_per_row"],
                "dense_cycles_per_row": costs["dense"]["cycles_per_row"],
            }
            stats["dense" if best == "dense" else "sparse"] += 1
        return stats
