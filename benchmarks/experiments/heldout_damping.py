"""Side experiment (issue 3): how far does each layer's OBS error generalise, and which damping
generalises best?

    python benchmarks/experiments/heldout_damping.py whisper-tiny.en 0.45

The calibration speakers are halved (``calibrate.heldout_speakers``). For every prunable layer and
damping in the grid, OBS (with the refit) prunes on one half's H and the relative output error is
measured on both halves. Prints one JSON line per layer, then a summary per kind of layer: the
layers fed by decoder tokens (~20 per utterance) and those fed by audio frames (1,500 per
utterance). Add ``--wer`` to prune with each layer's best damping on the full H and score the
evaluation split with onnxruntime.
"""
import argparse
import json
import os
import tempfile

import numpy as np

from femtocc.data import load_dataset, split_by_speaker
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, prunable_layers
from femtocc.passes.obs import obs_prune, relative_error
from femtocc.passes.prune import weight_matrix, well_calibrated
from femtocc.passes.sparsity import parse_pattern

GRID = (0.01, 0.03, 0.1, 0.3, 1.0)

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("sparsity", type=float)
ap.add_argument("--pattern", default="unstructured")
ap.add_argument("--wer", action="store_true")
args = ap.parse_args()
bundle = load_whisper(args.model)
calib, evaluation = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
layers = prunable_layers(bundle.model)
H = collect_hessians(bundle, calib, layers, heldout=True)
pattern = parse_pattern(args.pattern)
best, kinds = {}, {"token-fed": [], "frame-fed": []}
for name, module in layers.items():
    w = weight_matrix(module)
    fit_h, held_h = H.fit_matrix(name), H.heldout_matrices[name]
    errors = {}
    for lam in GRID:
        r = obs_prune(w, fit_h, args.sparsity, pattern, damping=lam)
        errors[lam] = (r.error, relative_error(w, r.weight, held_h))
    best[name] = min(GRID, key=lambda lam: errors[lam][1])
    fit_rows = H.rows[name] - H.heldout_rows[name]
    kinds["frame-fed" if well_calibrated(fit_rows, w.shape[1]) else "token-fed"].append(errors)
    print(json.dumps({"layer": name, "fit_rows": fit_rows, "best": best[name],
                      "fit_and_heldout": {str(k): [round(e, 6) for e in v] for k, v in errors.items()}}), flush=True)
for kind, rows in kinds.items():
    summary = {str(lam): [round(float(np.mean([r[lam][i] for r in rows])), 6) for i in (0, 1)] for lam in GRID}
    per_layer_best = float(np.mean([min(r[lam][1] for lam in GRID) for r in rows]))
    print(json.dumps({"kind": kind, "layers": len(rows), "mean_fit_and_heldout": summary,
                      "per_layer_best_heldout": round(per_layer_best, 6)}), flush=True)

if args.wer:
    import femtocc.passes.prune as prune
    from femtocc.backends import make_backend
    from femtocc.decode import score, transcribe

    by_matrix = {id(m): n for n, m in H.matrices.items()}

    def obs_with_best_damping(weight, hessian, sparsity, pattern, damping=None, *rest):
        return obs_prune(weight, hessian, sparsity, pattern, best[by_matrix[id(hessian)]], *rest)

    prune.obs_prune = obs_with_best_damping
    pruned, _ = prune.prune_model(bundle, prune.PruneConfig(sparsity=args.sparsity, pattern=args.pattern), calib, hessians=H)
    with tempfile.TemporaryDirectory() as tmp:
        r = score(transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation))
    print(json.dumps({"sparsity": args.sparsity, "wer": round(r["wer"], 3), "hit_token_limit": r["hit_token_limit"]}))
