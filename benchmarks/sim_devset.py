"""The whole dev set through the simulator and the reference runtime: the same transcripts?

    python benchmarks/sim_devset.py BUILD [--data DIR] [--reference RUN.json ...] [--out benchmarks/results/sim_devset.json]

Reference-runtime transcripts may come from earlier ``femtocc run BUILD --runtime reference --json
RUN.json`` results of the same build (utterances missing there are run now). Reports how many of the
utterances decode to identical token sequences, the simulated latency and energy per utterance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import write_result


def main() -> int:
    from femtocc.data import load_dataset
    from femtocc.decode import GraphBackend, build_runners, build_target, transcribe
    from femtocc.frontend.whisper import load_whisper
    from femtocc.runtime.report import summarize, utterance_stats

    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--reference", nargs="*", default=[])
    ap.add_argument("--out", default="benchmarks/results/sim_devset.json")
    args = ap.parse_args()
    utts = load_dataset(args.data)
    known = {}
    for path in args.reference:
        for u in json.load(open(path))["utterances"]:
            known[u["id"]] = u["tokens"]
    sink: list = []
    sim_runners, manifest = build_runners(args.build, "sim", sink)
    bundle = load_whisper(manifest["model"])
    clock_hz = build_target(manifest).facts.clock_hz
    sim = GraphBackend("sim", sim_runners, bundle.config)
    ref = GraphBackend("reference", build_runners(args.build, "reference")[0], bundle.config)
    same, per_utt, diffs = 0, [], []
    start = time.perf_counter()
    for i, u in enumerate(utts):
        mark = len(sink)
        (t,) = transcribe(bundle, sim, [u])
        per_utt.append(utterance_stats(sink[mark:], t, clock_hz))
        del sink[mark:]
        ref_tokens = known.get(u.id) or transcribe(bundle, ref, [u])[0].tokens
        if t.tokens == ref_tokens:
            same += 1
        else:
            diffs.append(u.id)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(utts)}: {same} identical", flush=True)
    summary = summarize(per_utt, [])
    print(f"{same}/{len(utts)} utterances decode to identical tokens on the simulator and the reference runtime "
          f"({time.perf_counter() - start:.0f} s); simulated {summary['latency_s_mean']:.2f} s and "
          f"{summary['energy_uj_mean']:.0f} uJ per utterance")
    write_result(args.out, {"build": args.build, "utterances": len(utts), "identical": same, "different": diffs,
                            "latency_s_mean": summary["latency_s_mean"], "energy_uj_mean": summary["energy_uj_mean"],
                            "real_time_factor": summary["real_time_factor"]})
    return 0 if same == len(utts) else 1


if __name__ == "__main__":
    sys.exit(main())
