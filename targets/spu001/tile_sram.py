"""tile-sram: place every tensor of a graph in the target's SRAM, or stream it from external memory.

Model (see docs/spu001.md): the target's cores split every layer by output channels, so each core
holds its share of each activation and of each weight (rounded up to whole SRAM words of the
description's ``sram_word_bits``).

1. Symbolic dims are bound (``tokens`` for ``T``, ``cached`` for ``P``).
2. Activations (graph inputs and node results; ``act-bytes`` per element) get addresses in each
   core's SRAM by a linear scan over the node order with first-fit reuse of freed space
   (liveness: from the defining node to the last use).
3. Weights fill what the activation high-water mark and the reserved stream buffer leave,
   largest first; a weight that does not fit is streamed from external memory in column tiles through a double buffer of
   ``stream-buffer`` bytes per core, each byte read once per run (a tile stays resident while
   all rows, e.g. all encoder frames, pass through it).

Afterwards every weight of a ``dense``/``qdense``/``conv`` carries ``placement = {where:
"sram"|"stream", bytes, address|tiles}``, and the pass statistics give the per-core high-water
mark, resident and streamed bytes, and external bytes per run. An activation one row of which
cannot be double-buffered in a core's SRAM is a compile error naming the value and the sizes.

Locality scheduling of attention: a chain ``qmatmul -> [where] -> qsoftmax -> qmatmul`` whose
intermediates have no other users runs in tiles of query rows (one head at a time per core), so
the score and probability matrices never exist whole: each lives in a row-tile scratch of
``rows x keys`` elements and moves no external bytes. The chain's nodes get ``tile_rows``; code
generation passes it on to the instruction stream. Every activation gets ``placement = {where:
"sram"|"external"|"tile", address, bytes}`` (bytes per core for SRAM).
"""

from __future__ import annotations

from femtocc.errors import FemtoccError
from femtocc.ir import dims
from femtocc.passes.manager import Pass, register
from femtocc.targets.spu001.cost import stored_bytes


def _bind(shape, binding: dict[str, int], name: str) -> int:
    n = 1
    for d in shape:
        if isinstance(d, str):
            terms = dims.parse(d)
            if terms is None or any(k and k not in binding for k in terms):
                raise FemtoccError(f"tile-sram: value %{name} has dim {d!r} that cannot be bound (known: {', '.join(binding)})")
            d = sum(v * (binding[k] if k else 1) for k, v in terms.items())
        n *= int(d)
    return n


class _Arena:
    """First-fit allocator over one core's SRAM words; tracks the high-water mark."""

    def __init__(self, words: int):
        self.words, self.free, self.high = words, [(0, words)], 0

    def alloc(self, size: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= size:
                self.free[i] = (start + size, length - size)
                self.high = max(self.high, start + size)
                return start
        return None

    def release(self, start: int, size: int) -> None:
        self.free.append((start, size))
        self.free.sort()
        merged = []
        for s, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            elif n:
                merged.append((s, n))
        self.free = merged


@register
class TileSram(Pass):
    name = "tile-sram"
    target: str = ""
    tokens: int = 1
    cached: int = 448
    act_bytes: int = 2
    stream_buffer: int = 16384

    def run(self, graph):
        from femtocc.targets.spu001.description import load_target

        target = load_target(self.target)
        cores = target.facts.cores
        word = target.facts.sram_word_bits // 8  # bytes per SRAM word

        def _words(nbytes: int) -> int:
            return -(-nbytes // word)

        core_words = target.sram_bytes_per_core // word
        binding = {"T": self.tokens, "P": self.cached}
        weights = {id(n.inputs[1]): n.inputs[1] for n in graph.nodes
                   if n.op in ("dense", "qdense", "conv") and n.inputs[1].is_constant}

        # activations: linear scan with liveness
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        last_use: dict[int, int] = {}
        for v in list(graph.inputs) + [o for n in graph.nodes for o in n.outputs]:
            uses = [position[id(u)] for u in v.users]
            last_use[id(v)] = len(graph.nodes) if v in graph.outputs else max(uses, default=-1)
        buffer_words = 2 * _words(self.stream_buffer)  # double-buffered stream tile, reserved first
        if buffer_words >= core_words:
            raise FemtoccError(f"tile-sram: stream-buffer {self.stream_buffer} leaves no SRAM ({core_words * word} bytes per core)")
        arena = _Arena(core_words - buffer_words)
        live: dict[int, tuple[int, int]] = {}
        external_acts = {"bytes": 0, "values": 0, "next": 0}
        tiled = self._tile_attention(graph, binding, core_words * word)

        def place(v):
            elements = _bind(v.type.shape, binding, v.name)
            size = _words(-(-elements * self.act_bytes // cores))
            if id(v) in tiled:  # one head's row tile per core
                elements = tiled[id(v)] * _bind(v.type.shape[-1:], binding, v.name)
                size = _words(elements * self.act_bytes)
            start = arena.alloc(size) if size <= arena.words // 2 or id(v) in tiled else None
            if start is None:
                # too large, or no room beside what is live: written to external memory and read
                # back in row tiles
                row = _words(-(-_bind(v.type.shape[-1:], binding, v.name) * self.act_bytes // cores))
                if 2 * row > core_words:
                    raise FemtoccError(
                        f"tile-sram: activation %{v.name} ({v.type}): one row needs {row * word} bytes per core, "
                        f"double-buffered that exceeds the {core_words * word} bytes of SRAM"
                    )
                external_acts["bytes"] += elements * self.act_bytes * (1 + len(v.users))
                external_acts["values"] += 1
                v.attrs["placement"] = {"where": "external", "address": external_acts["next"], "bytes": elements * self.act_bytes}
                external_acts["next"] += _words(elements * self.act_bytes) * word
                return
            live[id(v)] = (start, size)
            v.attrs["placement"] = {"where": "tile" if id(v) in tiled else "sram", "address": start * word, "bytes": size * word}

        for v in graph.inputs:
            place(v)
        for i, node in enumerate(graph.nodes):
            for v in node.outputs:
                place(v)
            for v in {id(x): x for x in node.inputs + node.outputs}.values():
                if id(v) in live and last_use.get(id(v), -1) <= i and v not in graph.outputs:
                    arena.release(*live.pop(id(v)))
        act_high = arena.high

        # weights: largest first into what activations leave; the rest streams in column tiles
        free_words = core_words - act_high
        resident = streamed = 0
        address = act_high
        budget = free_words - buffer_words
        sizes = {id(c): stored_bytes(c, target) for c in weights.values()}
        for const in sorted(weights.values(), key=lambda c: -sizes[id(c)]):
            total = sizes[id(const)]
            per_core = _words(-(-total // cores))
            if per_core <= budget:
                const.attrs["placement"] = {"where": "sram", "bytes": total, "address": address * word}
                address += per_core
                budget -= per_core
                resident += total
            else:
                tiles = -(-per_core // _words(self.stream_buffer))
                const.attrs["placement"] = {"where": "stream", "bytes": total, "tiles": tiles}
                streamed += total
        return {
            "attention-chains-tiled": sum(1 for n in graph.nodes if n.op in ("qsoftmax", "softmax") and n.attrs.get("tile_rows")),
            "act-high-water-bytes-per-core": act_high * word,
            "high-water-bytes-per-core": (address + (buffer_words if streamed else 0)) * word,
            "resident-weight-bytes": resident,
            "streamed-weight-bytes": streamed,
            "streamed-activations": external_acts["values"],
            "external-bytes-per-run": streamed + external_acts["bytes"],
            "external-activation-bytes": external_acts["next"],
        }

    def _tile_attention(self, graph, binding, core_bytes) -> dict[int, int]:
        """Find attention chains, mark their nodes with ``tile_rows``; id(value) -> rows kept."""
        tiled: dict[int, int] = {}
        for first in graph.nodes:
            if first.op not in ("qmatmul", "matmul") or len(first.outputs[0].users) != 1:
                continue
            chain, v = [first], first.outputs[0]
            while len(v.users) == 1 and v.users[0].op in ("where", "qsoftmax", "softmax") and len(chain) < 3:
                chain.append(v.users[0])
                v = v.users[0].outputs[0]
            if chain[-1].op not in ("qsoftmax", "softmax") or len(v.users) != 1 or v.users[0].op not in ("qmatmul", "matmul"):
                continue
            chain.append(v.users[0])
            keys = _bind(first.outputs[0].type.shape[-1:], binding, first.outputs[0].name)
            rows = _bind(first.outputs[0].type.shape[-2:-1], binding, first.outputs[0].name)
            tile = 64
            while tile > 1 and 3 * tile * keys * self.act_bytes > core_bytes // 4:
                tile //= 2
            tile = min(tile, rows)
            for node in chain:
                node.attrs["tile_rows"] = tile
            for node in chain[:-1]:
                tiled[id(node.outputs[0])] = tile
        return tiled
