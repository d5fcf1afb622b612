"""Side experiment (issue 3): an ADMM mask search (in the manner of ALPS, Meng et al. 2024) after OBS.

    python benchmarks/experiments/admm_masks.py whisper-tiny.en 0.45,0.5 [--pattern pencil8]

Per layer, warm-started from the OBS mask: W-steps solve ``(H' + rho I)`` exactly (one eigen
decomposition of the Jacobi-scaled damped H), D-steps keep the layer's largest ``|W + V / rho|``
(one budget per layer, so rows may differ; pencils by their norm), ``rho`` grows as the support
settles; 150 iterations, then the product's refit on the final mask. A layer keeps the OBS result
where ADMM's error is not lower. Prints the mean relative layer error and the WER (onnxruntime,
evaluation split) per sparsity. Results: benchmarks/results/side-experiments.json (admm_masks).
"""
import argparse
import json
import os
import tempfile

import numpy as np
import torch

import femtocc.passes.prune as prune
from femtocc.data import load_dataset, split_by_speaker
from femtocc.decode import make_backend, score, transcribe
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, prunable_layers
from femtocc.passes.obs import LayerResult, _refit, obs_prune, relative_error

ITERATIONS = 150


def largest(Z, pruned: int, pattern):
    rows, cols = Z.shape
    keep = torch.zeros(Z.numel() // (8 if pattern.kind == "pencil" else 1), dtype=torch.bool)
    score = (Z.reshape(rows // 8, 8, cols) ** 2).sum(1).reshape(-1) if pattern.kind == "pencil" else Z.abs().reshape(-1)
    keep[torch.topk(score, score.numel() - pruned).indices] = True
    keep = keep.reshape(-1, cols)
    return keep.repeat_interleave(8, 0) if pattern.kind == "pencil" else keep


def admm_keep(w, h, sparsity, pattern, damping, keep, rho=0.1):
    H = torch.from_numpy(np.asarray(h, np.float64))
    Hd = H + damping * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    g = torch.sqrt(torch.diag(Hd))
    evals, Q = (t.float() for t in torch.linalg.eigh(Hd / g[:, None] / g[None, :]))
    Hn = (Hd / g[:, None] / g[None, :]).float()
    W0 = (torch.from_numpy(np.asarray(w, np.float64)) * g[None, :]).float()
    units = int(round(sparsity * W0.numel() / (8 if pattern.kind == "pencil" else 1)))
    D, V, B = W0 * keep, torch.zeros_like(W0), W0 @ Hn
    for t in range(ITERATIONS):
        W = ((B - V + rho * D) @ Q) / (evals + rho) @ Q.T
        Z = W + V / rho
        new = largest(Z, units, pattern)
        changed, keep = int((new != keep).sum()), new
        D = Z * keep
        V = V + rho * (W - D)
        if t % 3 == 2:
            total = units * (8 if pattern.kind == "pencil" else 1)
            rho *= 1.3 if changed > 0.1 * total else (1.2 if changed > 0.005 * total else 1.1)
    return keep


def obs_then_admm(weight, hessian, sparsity, pattern, damping=None, block=128, refit_iterations=25):
    r = obs_prune(weight, hessian, sparsity, pattern, damping, block, refit_iterations)
    if sparsity == 0:
        return r
    keep = admm_keep(weight, hessian, sparsity, pattern, r.damping, torch.from_numpy(~r.mask))
    W0 = torch.from_numpy(np.asarray(weight, np.float32))
    W = _refit(W0, W0 * keep, keep, torch.from_numpy(np.asarray(hessian, np.float32)), r.damping, refit_iterations).numpy()
    error = relative_error(weight, W, hessian)
    return r if error >= r.error else LayerResult(W, (~keep).numpy(), r.damping, error, r.unrefit_error, r.dead_inputs)


ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("sparsities")
ap.add_argument("--pattern", default="unstructured")
args = ap.parse_args()
bundle = load_whisper(args.model)
calib, evaluation = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
H = collect_hessians(bundle, calib, prunable_layers(bundle.model))
prune.obs_prune = obs_then_admm
for s in map(float, args.sparsities.split(",")):
    pruned, report = prune.prune_model(bundle, prune.PruneConfig(sparsity=s, pattern=args.pattern), calib, hessians=H)
    with tempfile.TemporaryDirectory() as tmp:
        r = score(transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation))
    print(json.dumps({"model": args.model, "pattern": args.pattern, "sparsity": s, "wer": round(r["wer"], 3),
                      "hit_token_limit": r["hit_token_limit"], "mean_relative_error": round(report["mean_relative_error"], 6)}))
