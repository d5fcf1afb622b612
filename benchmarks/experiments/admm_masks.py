"""Side experiment (issue 3): the ADMM mask search after OBS on every layer, decoder included.

    python benchmarks/experiments/admm_masks.py whisper-tiny.en 0.45,0.5 [--pattern pencil8]

The product runs the search (``femtocc prune --admm-iterations``, ``obs._admm_keep``) only on the
layers calibrated with at least ``prune.ADMM_MIN_ROWS_PER_INPUT`` rows per input; this script
lowers that bound to 0, so the decoder's token-fed layers are searched too. Prints the mean
relative layer error and the WER (onnxruntime, evaluation split) per sparsity. Results:
benchmarks/results/side-experiments.json (admm_masks).
"""
import argparse
import json
import os
import tempfile

import femtocc.passes.prune as prune
from femtocc.data import load_dataset, split_by_speaker
from femtocc.backends import make_backend
from femtocc.decode import score, transcribe
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, prunable_layers
from femtocc.passes.obs import ADMM_ITERATIONS

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("sparsities")
ap.add_argument("--pattern", default="unstructured")
args = ap.parse_args()
bundle = load_whisper(args.model)
calib, evaluation = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
H = collect_hessians(bundle, calib, prunable_layers(bundle.model))
prune.ADMM_MIN_ROWS_PER_INPUT = 0
for s in map(float, args.sparsities.split(",")):
    cfg = prune.PruneConfig(sparsity=s, pattern=args.pattern, admm_iterations=ADMM_ITERATIONS)
    pruned, report = prune.prune_model(bundle, cfg, calib, hessians=H)
    with tempfile.TemporaryDirectory() as tmp:
        r = score(transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation))
    print(json.dumps({"model": args.model, "pattern": args.pattern, "sparsity": s, "wer": round(r["wer"], 3),
                      "hit_token_limit": r["hit_token_limit"], "mean_relative_error": round(report["mean_relative_error"], 6)}))
