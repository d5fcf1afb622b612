"""Real time on the simulated chip, step by step (issue 18): compiled builds run on the simulator over
the dev evaluation speakers, each with its WER, runaways, real-time factor, latency and energy.

    python benchmarks/realtime.py --steps LABEL=MODEL:COMPILE_ARGS ... [--workers 2] [--limit N]
                                  [--out benchmarks/results/realtime.json]

A step is ``LABEL=MODEL`` or ``LABEL=MODEL:ARGS``: ``MODEL`` is compiled with ``femtocc compile MODEL
ARGS`` (e.g. ``--buckets 10,30``) into ``--work``, or reused from there when its build already
holds the same command, and run with ``femtocc run BUILD --runtime sim --split eval``. The
simulator is bit-exact with the reference runtime, so its WER is the build's. Every step also
records the reference runtime's tokens on ``--check`` utterances and says whether they are the
simulator's. The real-time factor is the mean simulated latency over the mean audio duration.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from common import femtocc, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", nargs="+", required=True, help="LABEL=MODEL[:COMPILE ARGS]")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--work", default="build/realtime", help="where the builds are written (and reused)")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--limit", default=None, help="only the first N evaluation utterances")
    ap.add_argument("--check", type=int, default=4, help="utterances also run on the reference runtime")
    ap.add_argument("--out", default="benchmarks/results/realtime.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    limit = ["--limit", args.limit] if args.limit else []
    rows = []
    for step in args.steps:
        label, _, spec = step.partition("=")
        model, _, extra = spec.partition(":")
        build = work / label.replace(" ", "_").replace("+", "").replace("/", "_")
        command = ["compile", model, "--calib", args.data, *shlex.split(extra), "-o", str(build), "--force"]
        stamp = build / "benchmark-command.json"
        start = time.perf_counter()
        if not (stamp.is_file() and json.loads(stamp.read_text()) == command):
            femtocc(*command)
            stamp.write_text(json.dumps(command))
        compile_s = time.perf_counter() - start
        sim_json, ref_json = work / f"{build.name}-sim.json", work / f"{build.name}-reference.json"
        femtocc("run", str(build), "--runtime", "sim", "--data", args.data, "--split", "eval", "--workers", args.workers,
                *limit, "--json", str(sim_json))
        femtocc("run", str(build), "--runtime", "reference", "--data", args.data, "--split", "eval", "--workers",
                args.workers, "--limit", str(args.check), "--json", str(ref_json))
        sim = json.loads(sim_json.read_text())
        ref = json.loads(ref_json.read_text())
        same = all(a["tokens"] == b["tokens"] for a, b in zip(ref["utterances"], sim["utterances"]))
        s = sim["report"]["simulator"]
        n = len(sim["utterances"])
        cycles = {g: sum(u["sim_cycles"].get(g, 0) for u in sim["utterances"]) / n / 1e6
                  for g in ("encoder", "cross_kv", "decoder_step")}
        report = json.loads((build / "report.json").read_text())
        row = {"step": label, "model": model, "compile_args": extra, "buckets": json.loads((build / "build.json").read_text()).get("buckets", [30]),
               "utterances": n, "wer": sim["report"]["wer"], "agreement_wer": sim["report"].get("agreement_wer"),
               "runaways": sim["report"]["hit_token_limit"], "real_time_factor": s["real_time_factor"],
               "latency_s": s["latency_s_mean"], "energy_mj": s["energy_uj_mean"] / 1000,
               "audio_s": sum(u["duration_s"] for u in sim["utterances"]) / n, "mcycles_per_utterance": cycles,
               "weight_bytes": {g: t["weight_bytes"] for g, t in report["totals"].items()},
               "reference_matches_simulator": {"utterances": len(ref["utterances"]), "identical_tokens": same},
               "compile_s": round(compile_s, 1)}
        rows.append(row)
        print(f"{label:<34} WER {row['wer']:6.2f} ({row['runaways']} runaways)  RTF {row['real_time_factor']:.3f}  "
              f"{row['latency_s']:.2f} s  {row['energy_mj']:.1f} mJ  Mcycles enc {cycles['encoder']:.0f} cross "
              f"{cycles['cross_kv']:.0f} dec {cycles['decoder_step']:.0f}  ref==sim {same}", flush=True)
        write_result(args.out, {"data": args.data, "split": "eval", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
