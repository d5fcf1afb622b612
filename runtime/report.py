"""Simulator statistics per utterance, per op class and per layer, and the timeline plot of where cycles go."""

from __future__ import annotations

from pathlib import Path


def utterance_stats(runs: list, transcript, clock_hz: float) -> dict:
    """Cycles, latency, energy and MACs of one utterance from the simulator runs it took."""
    cycles = {"encoder": 0.0, "cross_kv": 0.0, "decoder_step": 0.0}
    energy = macs = skipped = 0.0
    steps = 0
    for r in runs:
        graph = Path(r.graph).stem.split("@")[0]  # the buckets of a graph count together
        cycles[graph] = cycles.get(graph, 0.0) + r.total("cycles")
        energy += r.energy_pj()
        macs += r.total("macs")
        skipped += r.total("macs_skipped")
        steps += graph == "decoder_step"
    total = sum(cycles.values())
    return {
        "sim_cycles": cycles, "sim_latency_s": total / clock_hz, "sim_energy_uj": energy / 1e6,
        "sim_macs": macs, "sim_macs_skipped": skipped, "sim_decoder_steps": steps,
        "sim_real_time_factor": total / clock_hz / max(transcript.duration_s, 1e-9),
    }


def summarize(per_utt: list[dict], runs: list) -> dict:
    n = max(len(per_utt), 1)
    ops: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    for r in runs:
        graph = Path(r.graph).stem.split("@")[0]  # the buckets of a graph count together
        for (op, out, const, _), row in zip(r.instructions, r.rows):
            o = ops.setdefault(f"{graph}/{op}", {"cycles": 0.0, "macs": 0.0, "external_bytes": 0.0, "energy_pj": 0.0})
            o["cycles"] += row["cycles"]
            o["macs"] += row["macs"]
            o["external_bytes"] += row["external_bytes"]
            o["energy_pj"] += sum(v for k, v in row.items() if k.startswith("energy_"))
            if op == "qdense":
                name = const.removesuffix(".q")
                lay = layers.setdefault(name, {"graph": graph, "cycles": 0.0, "macs": 0.0, "macs_skipped": 0.0,
                                               "act_nonzero": 0.0, "act_total": 0.0})
                for k in ("cycles", "macs", "macs_skipped", "act_nonzero", "act_total"):
                    lay[k] += row[k]
    for lay in layers.values():
        lay["activation_density"] = lay["act_nonzero"] / lay["act_total"] if lay["act_total"] else None
    bank_reads = [sum(x) for x in zip(*(r.per_bank("bank_reads") for r in runs))] if runs else []
    bank_writes = [sum(x) for x in zip(*(r.per_bank("bank_writes") for r in runs))] if runs else []
    audio = sum(u["sim_latency_s"] / u["sim_real_time_factor"] for u in per_utt if u["sim_real_time_factor"])
    macs = sum(u["sim_macs"] for u in per_utt)
    return {
        "utterances": len(per_utt),
        "latency_s_mean": sum(u["sim_latency_s"] for u in per_utt) / n,
        "energy_uj_mean": sum(u["sim_energy_uj"] for u in per_utt) / n,
        "real_time_factor": sum(u["sim_latency_s"] for u in per_utt) / max(audio, 1e-9),
        "macs_per_utterance": macs / n,
        "macs_skipped_fraction": sum(u["sim_macs_skipped"] for u in per_utt) / max(macs + sum(u["sim_macs_skipped"] for u in per_utt), 1),
        "cycles_by_op": dict(sorted(ops.items(), key=lambda kv: -kv[1]["cycles"])),
        "sram_words_per_bank_per_utterance": {"reads": [x / n for x in bank_reads], "writes": [x / n for x in bank_writes]},
        "layers": layers,
    }


def plot_timeline(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    ops = list(summary["cycles_by_op"].items())[:14]
    a.barh([k for k, _ in ops][::-1], [v["cycles"] / 1e6 / max(summary["utterances"], 1) for _, v in ops][::-1])
    a.set_xlabel("Mcycles per utterance")
    a.set_title("where cycles go (graph/op)")
    layers = list(summary["layers"].items())
    b.bar(range(len(layers)), [v["cycles"] / 1e6 / max(summary["utterances"], 1) for _, v in layers],
          color=["#1f77b4" if v["graph"] == "encoder" else "#ff7f0e" if v["graph"] == "cross_kv" else "#2ca02c" for _, v in layers])
    b.set_xlabel("qdense layer (blue encoder, orange cross K/V, green decoder, all steps)")
    b.set_ylabel("Mcycles per utterance")
    b.set_yscale("log")
    b.set_title(f"latency {summary['latency_s_mean']:.2f} s, energy {summary['energy_uj_mean']:.0f} uJ per utterance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
