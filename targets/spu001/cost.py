"""The spu001 cost model, the only one: bytes and cycles of weights and linear layers, from the IR.

Every consumer reads it: ``select-layout`` (which storage format each weight gets),
``tile-sram`` (how many bytes a weight occupies), the compile report (per-layer bytes and
predicted cycles, bytes against sparsity) and the benchmarks. It is computed from the IR alone
(shapes, each weight's storage encoding on its type, the placements ``tile-sram`` made) with the
timing model of docs/spu001.md and the numbers of the target description, never from the
simulator, so the two cross-check each other (``benchmarks/sim_crosscheck.py``).

* A weight's bytes, MACs and cycles per input row come from its format's module in
  :mod:`femtocc.ir.formats` (MACs over the MAC lanes of all cores, plus ``pencil_decode_cycles``
  per pencil); this module adds SRAM and external traffic, placement and the core barrier.
* Activations count as dense: the simulator's skipping of zero activations is data-dependent and
  is compared with it switched off.

Known differences from the simulator, by construction small: the weight bytes here leave out the
4 bytes of offsets per pencil group the program also stores; the SRAM time assumes accesses spread
over all banks, the simulator charges bank conflicts when operands share a bank.
"""

from __future__ import annotations

import math

import numpy as np

from femtocc.ir import dims
from femtocc.ir.formats import parse_format
from femtocc.ir.formats.dense import DENSE
from femtocc.ir.formats.pencil import Pencil

SPARSITY_GRID = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def storage_formats(target) -> list:
    """The weight storage formats the target reads: dense and its native pencil."""
    return [DENSE, Pencil(target.facts.pencil)]


def weight_bits(const) -> int:
    """A weight constant's bit width: its quantization's, else its dtype's."""
    return int(const.attrs.get("quant", {}).get("bits", 32 if const.data.dtype == np.float32 else 8))


def format_cost(fmt, w_in_out: np.ndarray, bits: int, target) -> dict:
    """Bytes and cycles per input row of one ``[in, out]`` weight stored in ``fmt`` on ``target``."""
    return {"bytes": fmt.nbytes(w_in_out, bits, target.assumptions.pencil_index_bits),
            "cycles_per_row": fmt.cycles_per_row(w_in_out, target)}


def format_costs(w_in_out: np.ndarray, bits: int, target) -> dict[str, dict]:
    """:func:`format_cost` of every storage format of the target that can hold the weight."""
    return {fmt.name: format_cost(fmt, w_in_out, bits, target) for fmt in storage_formats(target) if fmt.fits(w_in_out)}


def choose_format(costs: dict[str, dict]) -> str:
    """select-layout's rule over :func:`format_costs`: a sparse format is a candidate only when it is
    both no slower and smaller than dense; among candidates fewer cycles win, then fewer bytes."""
    dense = costs["dense"]
    eligible = [k for k, c in costs.items()
                if k == "dense" or (c["cycles_per_row"] <= dense["cycles_per_row"] and c["bytes"] < dense["bytes"])]
    return min(eligible, key=lambda k: (costs[k]["cycles_per_row"], costs[k]["bytes"], k != "dense"))


def stored_format(const):
    """The storage format a weight constant's type names (dense when it names none)."""
    return parse_format(const.type.encoding) if const.type.encoding else DENSE


def stored_bytes(const, target) -> int:
    """Bytes of a weight constant as its type says it is stored."""
    return stored_format(const).nbytes(const.data, weight_bits(const), target.assumptions.pencil_index_bits)


def weight_cost(const, target) -> dict:
    """A weight constant as its type says it is stored: ``{format, bytes, cycles_per_row}`` and the
    ``dense_bytes`` / ``dense_cycles_per_row`` it would take dense."""
    fmt = stored_format(const)
    bits = weight_bits(const)
    mine, dense = format_cost(fmt, const.data, bits, target), format_cost(DENSE, const.data, bits, target)
    return {"format": fmt.name, **mine, "dense_bytes": dense["bytes"], "dense_cycles_per_row": dense["cycles_per_row"]}


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
    word = f.sram_word_bits // 8
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
        fmt = stored_format(w)
        macs = rows * fmt.macs_per_row(w.data)
        weight_bytes = stored_bytes(w, target)
        read = [rows * k * act_bytes, weight_bytes, 8 * n, 8 * n]
        written = rows * n * act_bytes
        words_read = sum(math.ceil(b / word) for b in read)
        words_written = math.ceil(written / word)
        compute = math.ceil(macs / lanes)
        if isinstance(fmt, Pencil):
            compute += (macs / fmt.height) * a.pencil_decode_cycles / cores
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


def bytes_vs_sparsity(graphs: dict, target) -> dict:
    """Weight bytes of every prunable qdense at each native-pencil sparsity of the grid (exact: a
    pencil layer at sparsity s keeps ceil((1 - s) * pencils) pencils, whichever method chose them),
    and the first sparsity at which the encoder's weights fit the SRAM."""
    h = target.facts.pencil
    word = Pencil(h).word_bytes(8, target.assumptions.pencil_index_bits)
    rows, resident_from = [], None
    for s in SPARSITY_GRID:
        row = {"sparsity": s}
        for w, g in graphs.items():
            total = 0
            for node in (n for n in g.nodes if n.op == "qdense"):
                n_in, n_out = node.inputs[1].data.shape
                prunable = node.meta.get("scope", "").startswith(("encoder.", "decoder.")) and n_out % h == 0
                kept = math.ceil(round((1 - s) * n_in * n_out / h, 6)) * word
                total += min(n_in * n_out, kept) if prunable and s > 0 else n_in * n_out
            row[f"{w}_bytes"] = total
        if "encoder_bytes" in row:
            row["encoder_resident"] = row["encoder_bytes"] <= target.sram_bytes
            if row["encoder_resident"] and resident_from is None:
                resident_from = s
        rows.append(row)
    return {"pattern": f"pencil{h}", "bits": 8, "rows": rows, "encoder_resident_from": resident_from,
            "sram_bytes": target.sram_bytes}
