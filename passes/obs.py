"""Optimal Brain Surgeon pruning of one layer, with weight reconstruction (the OBC / SparseGPT family).

Given a weight ``W [out, in]`` and the layer's input second moment ``H = 2 X X^T / n`` the
layer's output error for a change ``dW`` is ``tr(dW H dW^T) / 2``. Columns (inputs) are visited
left to right in blocks; within a block the pruning mask is chosen by the OBS saliency
``w^2 / [H^-1]_jj^2`` (per weight, per pencil, or per N:M group), each pruned column's error is
spread over the not-yet-visited columns through the upper Cholesky factor of ``H^-1``, and each
block's accumulated error is pushed to the later blocks at once. Cost: one Cholesky
(``O(in^3)``) plus ``O(out * in^2)`` updates per layer.

That update moves only the columns right of each pruned one: kept weights already visited never
answer the prunings after them. With the mask fixed, the best kept weights are a
least-squares problem per row, and a refit solves it (Jacobi-preconditioned conjugate gradients
over all rows at once, ``O(out * in^2)`` per iteration, ``REFIT_ITERATIONS`` of them). On
Whisper's layers it removes about 40 % of the output error that the OBS update leaves (30-75 %
per layer, unstructured 45 %; see benchmarks/README.md).

Optionally (``admm_iterations``) the mask is searched further, in the manner of ALPS (Meng et
al. 2024): ADMM splits the weight into a dense copy, fitted exactly through one eigen
decomposition of the damped H, and a sparse copy, the layer's largest units of the dense one;
the penalty that ties them grows until the support settles. It starts from the OBS mask, takes
one budget per layer (rows may differ; pencils by their norm), and the refit finishes it. The
layer keeps whichever mask, OBS's or ADMM's, leaves the lower error. This fits a layer's
calibration data more closely than OBS; where that data is thin (decoder layers fed by a few
thousand tokens) the closer fit does not carry over to new speakers, so the driver runs it on
well-calibrated layers only (benchmarks/README.md).

Guarantees: the result has exactly the requested number of pruned units in every block
(unstructured and pencil) or per group (N:M), or with ADMM in the layer; pruned entries are
exactly zero, the mask follows the pattern (:func:`femtocc.passes.sparsity.mask_follows`), and
the refit never changes the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.passes.sparsity import Pattern

AUTO_DAMPING = (0.01, 0.03, 0.1, 0.3, 1.0)  # tried in order until the damped H factors
REFIT_ITERATIONS = 25  # the refit converges within this on Whisper's layers (benchmarks/README.md)
ADMM_ITERATIONS = 150  # what the measurements in benchmarks/README.md used


@dataclass
class LayerResult:
    weight: np.ndarray  # [out, in], float32, pruned and reconstructed
    mask: np.ndarray  # [out, in], True where pruned
    damping: float  # fraction of mean(diag(H)) added to the diagonal
    error: float  # tr(dW H dW^T) / tr(W H W^T): relative output error on the calibration data
    unrefit_error: float  # the same before the refit of the kept weights (== error without refit)
    dead_inputs: int  # inputs that never fired (diag(H) == 0); their weights are pruned for free


def relative_error(w: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    import torch

    W, D, H = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (w, w - w_new, h))
    total = ((W @ H) * W).sum().item()
    return float(((D @ H) * D).sum().item() / total) if total > 0 else 0.0


def damped(h, damping: float):
    """``H + damping * mean(diag H) * I`` (torch): the damped Hessian every OBS solve uses."""
    import torch

    return h + damping * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)


def _inverse_cholesky(h, damping):
    """Upper Cholesky factor of (H + damping * mean(diag H) I)^-1, or None if not positive definite."""
    import torch

    chol, info = torch.linalg.cholesky_ex(damped(h, damping))
    if info.item():
        return None
    inv = torch.cholesky_inverse(chol)
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    return None if info.item() else upper


def obs_prune(
    weight: np.ndarray, hessian: np.ndarray, sparsity: float, pattern: Pattern,
    damping: float | None = None, block: int = 128, refit_iterations: int = REFIT_ITERATIONS,
    admm_iterations: int = 0, keep_pruned: np.ndarray | None = None,
) -> LayerResult:
    """Prune one layer to ``sparsity`` in ``pattern`` by OBS (SparseGPT's column order and weight
    updates), then refit the kept weights. ``keep_pruned`` (bool, the weight's shape): entries that
    must stay pruned (gradual pruning's earlier masks; whole units of the pattern). They are chosen first in every block:
    each block prunes ``round(sparsity * size)`` units, never fewer than an earlier, lower
    sparsity pruned there, so the mask only grows."""
    import torch

    W = torch.from_numpy(np.array(weight, dtype=np.float64))
    H = torch.from_numpy(np.array(hessian, dtype=np.float64))
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise FemtoccError(f"Hessian is {tuple(H.shape)}, weight has {cols} inputs")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    tries = (damping,) if damping is not None else AUTO_DAMPING
    Hinv = None
    for lam in tries:
        Hinv = _inverse_cholesky(H, lam)
        if Hinv is not None:
            break
    if Hinv is None:
        raise FemtoccError(f"Hessian is not positive definite even with damping {tries[-1]}")

    if pattern.kind == "pencil":
        block = max(pattern.m, block)
    if pattern.kind == "nm":
        block = max(pattern.m, block - block % pattern.m)
    mask = torch.zeros_like(W, dtype=torch.bool)
    forced = torch.from_numpy(np.asarray(keep_pruned, bool)) if keep_pruned is not None else torch.zeros_like(mask)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        saliency = W1**2 / d.unsqueeze(0) ** 2
        forced1 = forced[:, i1:i2]
        saliency[forced1] = -1.0  # below any real saliency: chosen first
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            k = int(round(sparsity * saliency.numel()))
            if k:
                mask1.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
        elif pattern.kind == "pencil":
            pencil = saliency.reshape(rows // pattern.m, pattern.m, count).sum(dim=1)
            k = int(round(sparsity * pencil.numel()))
            chosen = torch.zeros_like(pencil, dtype=torch.bool)
            if k:
                chosen.view(-1)[torch.topk(pencil.reshape(-1), k, largest=False).indices] = True
            mask1 = chosen.repeat_interleave(pattern.m, dim=0)
        for i in range(count):
            w = W1[:, i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                idx = torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            mask1[:, i] |= forced1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask |= dead.unsqueeze(0).expand_as(mask)
    W[mask] = 0.0
    unrefit = relative_error(weight, W.to(torch.float32).numpy(), hessian)
    if refit_iterations:
        W0 = torch.from_numpy(np.asarray(weight, dtype=np.float32))  # float32 converges alike, 2-3x faster
        W = _refit(W0, W.to(torch.float32), ~mask, H.to(torch.float32), lam, refit_iterations)
    out = W.to(torch.float32).numpy()
    error = relative_error(weight, out, hessian) if refit_iterations else unrefit
    if admm_iterations and refit_iterations and mask.any():
        if pattern.kind == "nm":
            raise FemtoccError("the ADMM mask search is for unstructured and pencil patterns, not N:M")
        keep = _admm_keep(W0 * ~dead.unsqueeze(0), H, ~mask, pattern, lam, admm_iterations)
        searched = _refit(W0, W0 * keep, keep, H.to(torch.float32), lam, refit_iterations)
        searched_error = relative_error(weight, searched.numpy(), hessian)
        if searched_error < error and not bool((keep & forced).any()):
            out, mask, error = searched.numpy(), ~keep, searched_error
    return LayerResult(out, mask.numpy(), float(lam), error, unrefit, int(dead.sum()))


def _admm_keep(W0, H, keep, pattern: Pattern, damping: float, iterations: int, rho: float = 0.1):
    """ADMM over ``min tr((W - W0) H' (W - W0)^T)`` keeping as many units as the OBS mask ``keep``,
    in Jacobi-scaled coordinates (``H'`` to unit diagonal, so ``|w|`` there is a diagonal saliency)."""
    import torch

    Hd = damped(H.to(torch.float64), damping)
    g = torch.sqrt(torch.diag(Hd))
    Hn = Hd / g[:, None] / g[None, :]
    evals, Q = (t.to(torch.float32) for t in torch.linalg.eigh(Hn))
    Wn = W0.to(torch.float32) * g[None, :].to(torch.float32)
    rows, cols = Wn.shape
    unit = pattern.m if pattern.kind == "pencil" else 1
    kept_units = int(keep.sum()) // unit
    pruned = keep.numel() - kept_units * unit
    B = Wn @ Hn.to(torch.float32)
    D, V = Wn * keep, torch.zeros_like(Wn)
    for t in range(iterations):
        W = ((B - V + rho * D) @ Q) / (evals + rho) @ Q.T
        Z = W + V / rho
        score = (Z.reshape(rows // unit, unit, cols) ** 2).sum(1) if unit > 1 else Z.abs()
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[torch.topk(score.reshape(-1), kept_units).indices] = True
        new_keep = chosen.reshape(score.shape).repeat_interleave(unit, dim=0)
        changed, keep = int((new_keep != keep).sum()), new_keep
        D = Z * keep
        V = V + rho * (W - D)
        if t % 3 == 2:  # raise the penalty faster while the support still moves
            rho *= 1.3 if changed > 0.1 * pruned else (1.2 if changed > 0.005 * pruned else 1.1)
    return keep


def _refit(W0, W, keep, H, damping: float, iterations: int):
    """The best kept weights for a fixed mask: minimise ``tr((W - W0) H' (W - W0)^T)``, ``H'`` the
    damped Hessian, over ``W`` that are zero outside ``keep``. Each row is its own positive-definite
    system on its kept inputs; Jacobi-preconditioned conjugate gradients solve all rows at once,
    starting from the OBS weights (one ``[out, in] x [in, in]`` product per iteration)."""
    import torch

    Hd = damped(H, damping)
    M = keep.to(W.dtype)
    inv_diag = 1.0 / torch.diag(Hd)
    R = M * ((W0 - W) @ Hd)  # b - A W with A X = M * (X H'), b = M * (W0 H')
    Z = R * inv_diag
    P, rz = Z, (R * Z).sum(dim=1, keepdim=True)
    tiny = torch.finfo(W.dtype).tiny
    for _ in range(iterations):
        AP = M * (P @ Hd)
        alpha = rz / (P * AP).sum(dim=1, keepdim=True).clamp_min(tiny)
        W = W + alpha * P
        R = R - alpha * AP
        Z = R * inv_diag
        rz_next = (R * Z).sum(dim=1, keepdim=True)
        P = Z + (rz_next / rz.clamp_min(tiny)) * P
        rz = rz_next
    return M * W


def magnitude_mask(weight: np.ndarray, sparsity: float, pattern: Pattern, threshold: float | None = None) -> np.ndarray:
    """Prune the smallest-magnitude units: |w| (unstructured), a pencil's L2 norm, or within each N:M group.

    With ``threshold`` (global magnitude pruning) every unit whose score is at or below it is pruned.
    """
    w = np.abs(np.asarray(weight, dtype=np.float32))
    rows, cols = w.shape
    if pattern.kind == "nm":
        groups = w.reshape(rows, cols // pattern.m, pattern.m)
        order = np.argsort(groups, axis=2, kind="stable")[:, :, : pattern.m - pattern.n]
        mask = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(mask, order, True, axis=2)
        return mask.reshape(rows, cols)
    scores = unit_scores(w, pattern)
    if threshold is not None:
        chosen = scores <= threshold
    else:
        k = int(round(sparsity * scores.size))
        chosen = np.zeros(scores.size, dtype=bool)
        chosen[np.argsort(scores.reshape(-1), kind="stable")[:k]] = True
        chosen = chosen.reshape(scores.shape)
    return np.repeat(chosen, pattern.m, axis=0) if pattern.kind == "pencil" else chosen


def unit_scores(abs_weight: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Magnitude score per prunable unit: |w|, or a pencil's root-mean-square."""
    if pattern.kind == "pencil":
        rows, cols = abs_weight.shape
        return np.sqrt((abs_weight.reshape(rows // pattern.m, pattern.m, cols) ** 2).mean(axis=1))
    return abs_weight


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, damping: float | None = None,
                  block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Second-order weight quantization (GPTQ / OBQ): columns are rounded left to right to the
    per-output-channel grid ``scale = max|W[c, :]| / qmax`` and each rounding error is spread over
    the not-yet-rounded columns through the upper Cholesky factor of ``H^-1``, as in
    :func:`obs_prune`. Zeros stay zero (a pruned pattern survives). Returns the weight on the grid
    (``q * scale``, float32, [out, in]) and the scales [out]."""
    import torch

    from femtocc.ir.qops import qmax

    W = torch.from_numpy(np.array(weight, dtype=np.float64))
    H = torch.from_numpy(np.array(hessian, dtype=np.float64))
    rows, cols = W.shape
    zero = W == 0
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    q_max = qmax(bits)
    peak = W.abs().max(dim=1).values
    scale = torch.where(peak > 0, peak / q_max, torch.ones_like(peak))
    Hinv = None
    for lam in ((damping,) if damping is not None else AUTO_DAMPING):
        Hinv = _inverse_cholesky(H, lam)
        if Hinv is not None:
            break
    if Hinv is None:
        raise FemtoccError("Hessian is not positive definite for GPTQ")
    zero_t = zero.T.contiguous()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].T.contiguous()  # [block, rows]: each column a contiguous row (tall token tables)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[i]
            q = torch.clamp(torch.round(w / scale), -q_max, q_max) * scale
            q[zero_t[i1 + i]] = 0.0
            err = (w - q) / Hinv1[i, i]
            W1[i:] -= torch.outer(Hinv1[i, i:], err)
            W1[i] = q
            Err1[i] = err
        W[:, i1:i2] = W1.T
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    return W.to(torch.float32).numpy(), scale.to(torch.float32).numpy()
