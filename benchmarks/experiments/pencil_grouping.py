"""Side experiment (issue 4): does regrouping output channels into pencils help pencil8 OBS?

    python benchmarks/experiments/pencil_grouping.py

Rows (output channels) of a layer are grouped eight at a time by the similarity of their OBS
saliency profiles (greedy balanced k-means), and pencil8 OBS runs on the permuted weight; a
layer whose outputs feed an elementwise op and one linear layer (fc1 -> GELU -> fc2, q/k/v within
a head) could take such a permutation for free. Prints the relative output error of pencil8 OBS
with the identity grouping, the regrouped one, and unstructured OBS, on 30 calibration utterances.
"""
import numpy as np

from femtocc.data import load_dataset, split_by_speaker
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, prunable_layers
from femtocc.passes.prune import weight_matrix
from femtocc.passes.obs import obs_prune
from femtocc.passes.sparsity import parse_pattern
b = load_whisper("whisper-tiny.en")
calib, _ = split_by_speaker(load_dataset(__import__("os").environ.get("DATA", "../shared/data/speech/dev")))
L = prunable_layers(b.model)
names = ["encoder.layers.1.fc1", "encoder.layers.2.self_attn.q_proj", "decoder.layers.1.fc1", "encoder.layers.2.fc2"]
H = collect_hessians(b, calib[:30], {n: L[n] for n in names})
pat = parse_pattern("pencil8")

def balanced_groups(S, m=8, iters=10, seed=0):
    """rows -> groups of m with similar normalized saliency profiles (greedy balanced k-means)."""
    X = S / (np.linalg.norm(S, axis=1, keepdims=True) + 1e-12)
    n = X.shape[0]; k = n // m
    rng = np.random.default_rng(seed)
    cent = X[rng.choice(n, k, replace=False)]
    for _ in range(iters):
        sim = X @ cent.T  # n x k
        order = np.argsort(-sim, axis=None)
        assign = -np.ones(n, int); size = np.zeros(k, int)
        for idx in order:
            r, c = divmod(idx, k)
            if assign[r] < 0 and size[c] < m:
                assign[r] = c; size[c] += 1
        cent = np.stack([X[assign == c].mean(0) for c in range(k)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
    return np.argsort(assign, kind="stable")

for n in names:
    w = weight_matrix(L[n]).astype(np.float64); h = H.matrices[n]
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(h.shape[0])
    dinv = np.diag(np.linalg.inv(hd))
    S = w**2 / dinv[None, :]
    for s in (0.3, 0.5):
        base = obs_prune(w, h, s, pat, refit_iterations=0).error
        perm = balanced_groups(S)
        pe = obs_prune(w[perm], h, s, pat, refit_iterations=0).error
        un = obs_prune(w, h, s, parse_pattern("unstructured"), refit_iterations=0).error
        print(n, s, "identity", round(base, 4), "grouped", round(pe, 4), "unstructured", round(un, 4), flush=True)
