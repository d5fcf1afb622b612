"""WER of compiled tiny.en programs on the reference runtime against the dense float model.

    python benchmarks/spu_wer.py BUILD [BUILD ...] [--data DIR] [--limit N] [--out benchmarks/results/spu_wer.json]

Each BUILD comes from ``femtocc compile`` (e.g. W8A16 alone; OBS 50 % pencil8 + W8A16). All run on
the speaker-disjoint evaluation part of the dev set with the reference runtime, beside the dense
float model (torch) on the same utterances, in one run. Targets (issue 4): W8A16 within +0.3 WER
of float; OBS 50 % pencil8 + W8A16 within +1.5.
"""

from __future__ import annotations

import argparse
import sys

from common import write_result


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.decode import GraphBackend, TorchBackend, build_runners, score, transcribe
    from femtocc.frontend.whisper import load_whisper

    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/spu_wer.json")
    args = ap.parse_args()
    _, evaluation = split_by_speaker(load_dataset(args.data))
    evaluation = evaluation[: args.limit] if args.limit else evaluation
    bundle = load_whisper("whisper-tiny.en")
    dense = transcribe(bundle, TorchBackend(bundle), evaluation)
    dense_report = score(dense)
    texts = {t.id: t.hypothesis for t in dense}
    print(f"dense float: WER {dense_report['wer']:.2f} on {len(evaluation)} utterances")
    rows = {}
    for build in args.builds:
        runners, manifest = build_runners(build, "reference")
        result = score(transcribe(bundle, GraphBackend("spu", runners, bundle.config), evaluation), texts)
        delta = result["wer"] - dense_report["wer"]
        rows[build] = {"manifest": {k: manifest[k] for k in ("quant", "pruning")}, "report": result, "delta_wer": delta}
        print(f"{build}: WER {result['wer']:.2f} ({delta:+.2f} vs float), agreement {result['agreement_wer']:.2f}, "
              f"{result['hit_token_limit']} hit the token limit", flush=True)
    write_result(args.out, {"utterances": len(evaluation), "split": "eval", "runtime": "reference",
                            "dense_float": dense_report, "builds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
