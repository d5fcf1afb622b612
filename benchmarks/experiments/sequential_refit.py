"""Side experiment (issue 3): sequential encoder OBS, optionally with a least-squares refit toward the dense outputs.

    python benchmarks/experiments/sequential_refit.py whisper-tiny.en 0.45      # REFIT=0: plain sequential

Results: benchmarks/results/side-experiments.json (tiny_en). Neither beat one-shot OBS.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from femtocc.data import SAMPLE_RATE, load_dataset, split_by_speaker
from femtocc.backends import make_backend
from femtocc.decode import score, transcribe
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import PADDING_STRIDE, collect_hessians, prunable_layers
from femtocc.passes.obs import obs_prune
from femtocc.passes.prune import PruneConfig, _store, prune_model, weight_matrix, weights_digest
from femtocc.passes.sparsity import parse_pattern

model_name, S = sys.argv[1], float(sys.argv[2])
REFIT = os.environ.get("REFIT", "1") == "1"
bundle = load_whisper(model_name)
calib, evaluation = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
t0 = time.perf_counter()
hess = collect_hessians(bundle, calib, prunable_layers(bundle.model))
print("dense calib", round(time.perf_counter() - t0), flush=True)
# one-shot: decoder and convolutions on dense Hessians
pruned, _ = prune_model(bundle, PruneConfig(sparsity=S, layers=r"^decoder|conv"), calib, hessians=hess)
feats = {u.id: (torch.from_numpy(bundle.features(u.audio())), len(u.audio()) / SAMPLE_RATE) for u in calib}

class Stop(Exception):
    pass

def capture(model, names, feats_u, seconds, last):
    layers = prunable_layers(model)
    rows = {}
    def hook(name):
        def f(m, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            n = min(x.shape[0], int(np.ceil(seconds * x.shape[0] / 30.0)) + 2)
            rows[name] = torch.cat([x[:n], x[n::PADDING_STRIDE] * float(np.sqrt(PADDING_STRIDE))]).double()
            if name == last:
                raise Stop
        return f
    hs = [layers[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model.model.encoder(feats_u)
    except Stop:
        pass
    finally:
        for h in hs:
            h.remove()
    return rows

pattern = parse_pattern(os.environ.get("PATTERN", "unstructured"))
n_blocks = bundle.model.config.encoder_layers
t1 = time.perf_counter()
for b in range(n_blocks):
    names = [n for n in prunable_layers(pruned.model) if n.startswith(f"encoder.layers.{b}.")]
    last = names[-1]
    H, C, count = ({n: 0 for n in names} for _ in range(3))
    for u in calib:
        f, sec = feats[u.id]
        ref = capture(bundle.model, names, f, sec, last)
        cur = capture(pruned.model, names, f, sec, last)
        for n in names:
            H[n] = H[n] + cur[n].T @ cur[n]
            C[n] = C[n] + cur[n].T @ ref[n]
            count[n] += cur[n].shape[0]
    layers = prunable_layers(pruned.model)
    for n in names:
        h, c = (2.0 / count[n]) * H[n], (2.0 / count[n]) * C[n]
        w = torch.from_numpy(weight_matrix(layers[n]).astype(np.float64))
        if REFIT:
            damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
            lam = 0.01 * torch.mean(torch.diag(h))
            w = w @ (c.T + lam * torch.eye(h.shape[0], dtype=h.dtype)) @ torch.linalg.inv(damped)
        r = obs_prune(w.numpy(), h.numpy(), S, pattern, refit_iterations=0)
        _store(layers[n], r.weight)
    print("block", b, round(time.perf_counter() - t1), flush=True)
pruned.source_digest = weights_digest(pruned.model)
with tempfile.TemporaryDirectory() as tmp:
    res = score(transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation))
print(json.dumps({"model": model_name, "S": S, "refit": REFIT, "pattern": pattern.name, "wer": round(res["wer"], 3), "runaways": res["hit_token_limit"], "s": round(time.perf_counter() - t0)}), flush=True)
