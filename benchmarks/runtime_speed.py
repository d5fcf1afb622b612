"""Host seconds per utterance of every way femtocc runs tiny.en, on the same utterances in one run.

    python benchmarks/runtime_speed.py --build dense=BUILD_W8A16 --build pencil50=BUILD_P50 \\
        [--data DIR] [--limit 12] [--out benchmarks/results/runtime_speed.json]

For the first ``--limit`` utterances of the dev evaluation speakers, one process, one worker:
onnxruntime on the float graphs, femtocc's IR interpreter on the float graphs, and for each
``--build`` the reference runtime and the C simulator on its programs. Each is a full greedy
transcription (features, encoder, cross K/V, every decoder step). Prints seconds per utterance and
the ratio to onnxruntime, checks that the reference runtime and the simulator decode identical
tokens, and records the simulator's cycles and energy per utterance (which must not change when
the host gets faster). Targets of issue 15: reference <= 2x onnxruntime, simulator <= 4x.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import write_result


def timed(bundle, backend, utts, sink=None) -> tuple[float, list, list]:
    """Seconds per utterance, the transcripts, and each utterance's simulator runs (if ``sink``)."""
    from femtocc.decode import transcribe

    transcribe(bundle, backend, utts[:1])  # warm-up: caches, first-call costs
    out, runs = [], []
    start = time.perf_counter()
    for u in utts:
        first = len(sink) if sink is not None else 0
        out += transcribe(bundle, backend, [u])
        runs.append(sink[first:] if sink is not None else [])
    return (time.perf_counter() - start) / len(utts), out, runs


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.backends import make_backend
    from femtocc.decode import GraphBackend, build_runners, build_target
    from femtocc.frontend.whisper import load_whisper
    from femtocc.runtime.report import utterance_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/runtime_speed.json")
    args = ap.parse_args()
    builds = dict(b.split("=", 1) for b in args.build)
    utts = split_by_speaker(load_dataset(args.data))[1][: args.limit]
    bundle = load_whisper("whisper-tiny.en")
    rows = {}
    for kind in ("onnxruntime", "ir"):
        seconds, out, _ = timed(bundle, make_backend(bundle, kind), utts)
        rows[kind] = {"s_per_utt": seconds, "tokens": sum(len(t.tokens) for t in out)}
        print(f"{kind:<24}{seconds:8.3f} s/utt", flush=True)
    ort = rows["onnxruntime"]["s_per_utt"]
    checks = {}
    for name, build in builds.items():
        tokens = {}
        for runtime in ("reference", "sim"):
            sink: list = []
            runners, manifest = build_runners(build, runtime, sink)
            seconds, out, runs = timed(bundle, GraphBackend(runtime, runners, bundle.config), utts, sink)
            tokens[runtime] = [t.tokens for t in out]
            row = rows[f"{name}/{runtime}"] = {"s_per_utt": seconds, "over_onnxruntime": seconds / ort,
                                                "tokens": sum(len(t) for t in tokens[runtime])}
            if runtime == "sim":
                clock = build_target(manifest).facts.clock_hz
                per = [utterance_stats(r, t, clock) for r, t in zip(runs, out)]
                for p, r in zip(per, runs):  # every counter the simulator keeps, summed over the utterance
                    p["sim_totals"] = {k: sum(x.total(k) for x in r) for k, v in r[0].rows[0].items() if k != "host_seconds" and isinstance(v, (int, float))}
                row["sim_cycles_per_utt"] = sum(sum(p["sim_cycles"].values()) for p in per) / len(per)
                row["sim_energy_uj_per_utt"] = sum(p["sim_energy_uj"] for p in per) / len(per)
                row["per_utterance"] = [{"id": t.id, "tokens": t.tokens, **p} for t, p in zip(out, per)]
            else:
                row["per_utterance"] = [{"id": t.id, "tokens": t.tokens} for t in out]
            print(f"{name + '/' + runtime:<24}{seconds:8.3f} s/utt  {seconds / ort:6.2f}x onnxruntime", flush=True)
        checks[name] = {"identical_tokens": sum(a == b for a, b in zip(tokens["reference"], tokens["sim"])),
                        "utterances": len(utts)}
    for name in ("ir",):
        rows[name]["over_onnxruntime"] = rows[name]["s_per_utt"] / ort
    write_result(args.out, {"utterances": [u.id for u in utts], "builds": builds, "rows": rows,
                            "reference_vs_sim": checks,
                            "targets": {"reference_over_onnxruntime": 2.0, "sim_over_onnxruntime": 4.0}})
    print(f"reference vs simulator identical tokens: {checks}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
