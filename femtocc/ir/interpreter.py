"""Reference interpreter: a loop over nodes, calling each op's numpy definition (float32).

Intermediate arrays are released after their last use, so the encoder's attention maps do not
pile up.
"""

from __future__ import annotations

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir.core import DTYPES, Graph
from femtocc.ir.ops import OPS
from femtocc.ir.qops import FAKE


class Interpreter:
    """``fake_quant=True`` runs the integer ops in their float fake-quant form (:data:`~femtocc.ir.qops.FAKE`).

    ``run(feeds, observe=f)`` calls ``f(value, array)`` for every node result (calibration).
    """

    def __init__(self, graph: Graph, fake_quant: bool = False):
        missing = [v.name for v in graph.constants.values() if v.data is None]
        if missing:
            raise FemtoccError(f"graph @{graph.name}: constants without data (weights file missing?): {missing[:3]}")
        self.graph = graph
        self.impl = {name: d.run for name, d in OPS.items()}
        if fake_quant:
            self.impl.update(FAKE)
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        keep = {id(v) for v in graph.outputs}
        self._free_after: list[list[int]] = [[] for _ in graph.nodes]
        for node in graph.nodes:
            for v in node.outputs:
                if id(v) in keep or not v.users:
                    continue
                last = max(position[id(u)] for u in v.users)
                self._free_after[last].append(id(v))

    def run(self, feeds: dict[str, np.ndarray], observe=None) -> dict[str, np.ndarray]:
        g = self.graph
        env: dict[int, np.ndarray] = {id(v): v.data for v in g.constants.values()}
        for v in g.inputs:
            if v.name not in feeds:
                raise FemtoccError(f"graph @{g.name}: input %{v.name} was not given")
            x = np.asarray(feeds[v.name])
            if x.ndim != v.type.rank or any(
                isinstance(d, int) and d != s for d, s in zip(v.type.shape, x.shape)
            ):
                raise FemtoccError(f"graph @{g.name}: input %{v.name} has shape {list(x.shape)}, expected {v.type}")
            env[id(v)] = x.astype(DTYPES[v.type.dtype], copy=False)
        for i, node in enumerate(g.nodes):
            results = self.impl[node.op]([env[id(v)] for v in node.inputs], node.attrs)
            for v, r in zip(node.outputs, results):
                env[id(v)] = np.asarray(r)
                if observe is not None:
                    observe(v, env[id(v)])
            for dead in self._free_after[i]:
                del env[dead]
        return {v.name: env[id(v)] for v in g.outputs}

