"""Time OBS pruning of whisper-tiny.en with 128 calibration utterances; peak memory; JSON result.

    python benchmarks/prune_time.py [--data DIR] [--utterances 128] [--out benchmarks/results/prune_time.json]

Runs twice in one process with a fresh cache: "cold" (the dense transcripts used to teacher-force
the decoder are decoded first) and "warm" (they come from the cache). The utterances are the
first N of the data folder: this measures time, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time


from common import write_result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--utterances", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/prune_time.json")
    args = ap.parse_args()

    from femtocc.frontend.whisper import load_whisper

    model_cache = os.environ.get("FEMTOCC_CACHE")
    bundle = load_whisper("whisper-tiny.en")  # conversion cached; not part of the pruning time
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["FEMTOCC_CACHE"] = fresh  # no cached transcripts: the cold run decodes them
        from femtocc.data import load_dataset
        from femtocc.passes.prune import PruneConfig, prune_model

        utts = load_dataset(args.data)[: args.utterances]
        runs = {}
        for label in ("cold", "warm"):
            start = time.perf_counter()
            _, report = prune_model(bundle, PruneConfig(method="obs", sparsity=args.sparsity), utts)
            total = time.perf_counter() - start
            runs[label] = {
                "total_s": total,
                "calibration_s": report["calibration_s"],
                "pruning_s": report["pruning_s"],
                "sparsity": report["sparsity"],
                "layers": len(report["layers"]),
            }
            print(f"{label}: {total:.1f} s (calibration {report['calibration_s']:.1f} s, OBS {report['pruning_s']:.1f} s)")
    if model_cache is not None:
        os.environ["FEMTOCC_CACHE"] = model_cache
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "model": "whisper-tiny.en",
        "method": "obs unstructured",
        "calibration_utterances": len(utts),
        "target_s": 120,
        "runs": runs,
        "peak_rss_mib": round(peak_mib, 1),
    }
    write_result(args.out, result)
    print(f"peak RSS {peak_mib:.0f} MiB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
