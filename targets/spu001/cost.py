"""Analytical cost of the linear layers of a compiled graph: MACs, SRAM words and cycles per layer.

Computed from the IR alone (shapes, the layouts ``select-layout`` chose, the placements ``tile-sram``
made) with the timing model of docs/spu001.md, never from the simulator, so the two cross-check
each other (``benchmarks/sim_crosscheck.py``). Activations count as dense: the simulator's skipping
of zero activations is data-dependent and is compared with it switched off.

Known differences, by construction small: the analytical weight bytes are select-layout's estimate
(pencils x (8 + 2) bytes), the program also stores 4 bytes of offsets per pencil group; the
analytical SRAM time assumes accesses spread over all banks, the simulator charges bank
conflicts when operands share a bank.
"""

from __future__ import annotations

import math

from femtocc.ir import dims


def _bound(shape, binding) -> int:
    n = 1
    for d in shape:
        if isinstance(d, str):
            terms = dims.parse(d) or {}
            d = sum(v * (binding.get(k, 0) if k else 1) for k, v in terms.items())
        n *= int(d)
    return n


def linear_layer_costs(graph, target, tokens: int = 1, cached: int = 0) -> dict[str, dict]:
    """Per ``qdense`` (keyed by its weight constant's name): MACs, SRAM words read / written, cycles."""
    f, a = target.facts, target.assumptions
    lanes, cores, banks = a.mac_lanes_per_core * f.cores, f.cores, f.sram_banks_per_core
    binding = {"T": tokens, "P": cached}
    out = {}
    for node in graph.nodes:
        if node.op != "qdense":
            continue
        x, w, bias, mult = node.inputs[:4]
        y = node.outputs[0]
        act_bytes = 1 if x.type.dtype == "i8" else 2
        rows = _bound(x.type.shape[:-1], binding)
        k, n = w.data.shape
        layout = w.attrs.get("layout", {})
        pencil = layout.get("format") == "pencil8"
        per_row = (int((w.data.reshape(k, n // 8, 8) != 0).any(axis=2).sum()) * 8) if pencil else k * n
        macs = rows * per_row
        weight_bytes = layout.get("bytes", k * n)
        read = [rows * k * act_bytes, weight_bytes, 8 * n, 8 * n]
        written = rows * n * act_bytes
        words_read = sum(math.ceil(b / 8) for b in read)
        words_written = math.ceil(written / 8)
        compute = math.ceil(macs / lanes) + (macs / 8) * a.pencil_decode_cycles / cores if pencil else math.ceil(macs / lanes)
        sram = (words_read + words_written) / cores / banks / max(a.bank_read_ports, 1)
        external, transfers = 0, 0
        for value, nbytes in ((x, read[0]), (w, weight_bytes), (y, written)):
            where = value.attrs.get("placement", {}).get("where")
            if where in ("stream", "external") or value in graph.inputs or value in graph.outputs:
                external += nbytes
                transfers += 1
        transfer = external / a.external_bandwidth_bytes_per_cycle + transfers * a.external_latency_cycles if external else 0
        out[w.name] = {
            "macs": macs, "sram_read_words": words_read, "sram_write_words": words_written,
            "compute_cycles": compute, "transfer_cycles": transfer,
            "cycles": max(compute, sram, transfer) + a.core_sync_cycles,
        }
    return out
