"""Pruning driver: OBS (second order, with reconstruction) and the magnitude baselines, on Whisper.

* ``obs``: :func:`femtocc.passes.obs.obs_prune` per layer on calibrated Hessians: the OBS mask
  and update, then a refit of the kept weights to that mask (``refit_iterations``; 0 turns it off).
* ``mp-local``: per layer, the smallest-magnitude units (weights, pencils, or within N:M groups).
* ``mp-global``: one magnitude threshold across all pruned layers.

Per-layer sparsity is ``uniform`` (every layer at the target) or ``global``: for OBS, every unit
is scored by the output error it would cause alone, ``w^2 / [H^-1]_jj`` relative to the layer's
output energy ``tr(W H W^T)``, and one threshold over all layers meets the target (each layer
kept within ``ALLOCATION_SPREAD`` of the target, so no layer is emptied; ``mp-global`` uses the
classic unbounded magnitude threshold, capped at ``MAX_LAYER_SPARSITY``). ``sequential`` recalibrates each block on the outputs of the
blocks already pruned before it (costs one calibration pass per block). ``heldout`` adds each
layer's error on held-out calibration speakers (pruned again without them: one more OBS per layer).
``admm_iterations`` adds OBS's ADMM mask search on the layers calibrated with at least
``ADMM_MIN_ROWS_PER_INPUT`` rows per input.

Guarantees: the pruned layers hold exact zeros in the chosen pattern; the overall sparsity over
pruned parameters equals the target up to rounding (uniform) or the cap (global); the token
embedding and the output projection tied to it are untouched unless ``include_embeddings``.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.passes.calibrate import Hessians, collect_hessians, dense_transcripts, prunable_layers
from femtocc.passes.obs import REFIT_ITERATIONS, damped, magnitude_mask, obs_prune, relative_error, unit_scores
from femtocc.passes.sparsity import Pattern, parse_pattern

METHODS = ("obs", "mp-local", "mp-global")
MAX_LAYER_SPARSITY = 0.98
ALLOCATION_SPREAD = 0.15  # global allocation keeps each layer within target +- this
# The ADMM mask search runs where calibration saw this many input rows per input: the encoder and
# cross-attention k/v (1,500 frames per utterance), not the decoder's token-fed layers, whose
# closer fit to ~20 tokens per utterance does not carry over to new speakers (benchmarks/README.md).
ADMM_MIN_ROWS_PER_INPUT = 16


def well_calibrated(rows: int, inputs: int) -> bool:
    """Whether a layer's calibration saw enough input rows for a closer fit to carry over to new
    speakers (the layers fed by audio frames): where the ADMM mask search runs."""
    return rows >= ADMM_MIN_ROWS_PER_INPUT * inputs


@dataclass
class PruneConfig:
    method: str = "obs"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"  # or "global"
    damping: float | None = None  # None: automatic (see obs.AUTO_DAMPING)
    sequential: bool = False
    layers: str | None = None  # regex over module paths; None: every linear and conv
    include_embeddings: bool = False
    block: int = 128
    refit_iterations: int = REFIT_ITERATIONS  # OBS: conjugate-gradient refit of the kept weights (0: off)
    keep_zeros: bool = False  # OBS keeps every weight that is already zero pruned (masks only grow)
    heldout: bool = False  # also measure each layer's error on held-out calibration speakers (see calibrate)
    admm_iterations: int = 0  # OBS: ADMM mask search on well-calibrated layers (see obs; 0: off)
    per_layer: dict | None = None  # module path -> sparsity (a plan, passes/plan.py): only these layers, each to its own

    def check(self) -> Pattern:
        if self.method not in METHODS:
            raise FemtoccError(f"unknown pruning method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise FemtoccError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in ("uniform", "global"):
            raise FemtoccError(f"allocation must be uniform or global, got {self.allocation!r}")
        pattern = parse_pattern(self.pattern)
        if pattern.kind == "nm" and (self.allocation == "global" or self.method == "mp-global"):
            raise FemtoccError("N:M fixes every group's sparsity; global allocation has nothing to allocate")
        if pattern.fixed_sparsity is not None:
            self.sparsity = pattern.fixed_sparsity
        if self.refit_iterations < 0:
            raise FemtoccError(f"refit iterations must be >= 0, got {self.refit_iterations}")
        if self.admm_iterations < 0:
            raise FemtoccError(f"ADMM iterations must be >= 0, got {self.admm_iterations}")
        if self.admm_iterations and (self.method != "obs" or pattern.kind == "nm" or not self.refit_iterations):
            raise FemtoccError("the ADMM mask search is for OBS with the refit on, unstructured or pencil patterns")
        return pattern


def weight_matrix(module) -> np.ndarray:
    """A layer's weight as [out, in] (a conv's kernel flattened into its inputs)."""
    w = module.weight.detach().numpy()
    return w.reshape(w.shape[0], -1)


def _store(module, matrix: np.ndarray) -> None:
    import torch

    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(matrix.reshape(module.weight.shape)))


def _stages(names: list[str]) -> list[list[str]]:
    """Sequential order: the convolutions, then each encoder block, then each decoder block."""
    stages: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.", n)
        key = f"{m.group(1)}.{int(m.group(2)):03d}" if m else n.split(".")[0] + ".-"
        stages.setdefault(key, []).append(n)
    order = sorted(stages, key=lambda k: (k.split(".")[0] != "encoder", k))
    return [stages[k] for k in order]


def _global_sparsities(weights: dict[str, np.ndarray], cfg: PruneConfig, pattern: Pattern,
                       hessians: Hessians | None) -> dict[str, float]:
    """One threshold over all units' scores; per-layer sparsity = share of its units below it."""
    import torch

    scores = {}
    for name, w in weights.items():
        if cfg.method == "obs":
            H = damped(torch.from_numpy(hessians.matrices[name]), 0.01)
            hinv_diag = torch.diag(torch.linalg.inv(H)).numpy()
            w64 = w.astype(np.float64)
            energy = float(((w64 @ hessians.matrices[name]) * w64).sum())
            per_weight = w.astype(np.float64) ** 2 / hinv_diag[None, :] / max(energy, 1e-30)
            if pattern.kind == "pencil":
                r, c = per_weight.shape
                per_weight = per_weight.reshape(r // pattern.m, pattern.m, c).sum(axis=1)
            scores[name] = per_weight
        else:
            scores[name] = unit_scores(np.abs(w), pattern)
    sizes = {n: sc.size for n, sc in scores.items()}
    total = sum(sizes.values())
    spread = ALLOCATION_SPREAD if cfg.method == "obs" else 1.0  # mp-global: the classic unbounded threshold
    lo, hi = max(0.0, cfg.sparsity - spread), min(MAX_LAYER_SPARSITY, cfg.sparsity + spread)
    sorted_scores = {n: np.sort(sc.reshape(-1)) for n, sc in scores.items()}

    def allocation(threshold: float) -> dict[str, float]:
        return {n: float(np.clip(np.searchsorted(v, threshold, side="right") / v.size, lo, hi))
                for n, v in sorted_scores.items()}

    def pruned(threshold: float) -> float:
        return sum(allocation(threshold)[n] * sizes[n] for n in sizes) / total

    # the pruned share is monotone in the threshold: bisect (on the log scale) to meet the target
    values = np.concatenate(list(sorted_scores.values()))
    low, high = float(values.min()) * 0.5 + 1e-300, float(values.max()) * 2 + 1e-300
    for _ in range(100):
        mid = float(np.sqrt(low * high))
        if pruned(mid) < cfg.sparsity:
            low = mid
        else:
            high = mid
    return allocation(high)


def _heldout_error(w, new, name: str, hessians: Hessians, sparsity: float, pattern: Pattern, cfg: PruneConfig,
                   damping: float | None, admm_iterations: int) -> float:
    """The layer's relative error on the held-out speakers' H, pruned without them: OBS reruns on the
    other speakers' H (same damping); a magnitude mask does not depend on the data."""
    held = hessians.heldout_matrices[name]
    if cfg.method != "obs":
        return relative_error(w, new, held)
    r = obs_prune(w, hessians.fit_matrix(name), sparsity, pattern, damping, cfg.block, cfg.refit_iterations,
                  admm_iterations)
    return relative_error(w, r.weight, held)


def weights_digest(model) -> str:
    """SHA-256 over every parameter's name and bytes: a pruned model's identity for export caches."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def prune_model(bundle, cfg: PruneConfig, calib, progress: bool = False, hessians: Hessians | None = None):
    """Prune a copy of ``bundle``'s model; returns (pruned bundle, report dict).

    ``hessians`` of the dense model may be passed in to reuse one calibration across several
    prunings (not with ``sequential``, which recalibrates as it goes).
    """
    start = time.perf_counter()
    pattern = cfg.check()
    pruned = copy.copy(bundle)
    pruned.model = copy.deepcopy(bundle.model)
    layers = prunable_layers(pruned.model, cfg.include_embeddings or "proj_out" in (cfg.per_layer or {}))
    if cfg.per_layer is not None:
        unknown = sorted(set(cfg.per_layer) - set(layers))
        if unknown:
            raise FemtoccError(f"the plan names {unknown[0]!r}, which is not a prunable layer of {bundle.name}")
        layers = {n: m for n, m in layers.items() if cfg.per_layer.get(n, 0) > 0}
    if cfg.layers:
        try:
            rx = re.compile(cfg.layers)
        except re.error as e:
            raise FemtoccError(f"--layers {cfg.layers!r} is not a valid regular expression: {e}") from None
        layers = {n: m for n, m in layers.items() if rx.search(n)}
        if not layers:
            raise FemtoccError(f"--layers {cfg.layers!r} matches no prunable layer")
    for name, module in layers.items():
        pattern.check_shape(weight_matrix(module).shape, name)

    timings = {}
    t = time.perf_counter()
    if cfg.heldout and not calib:
        raise FemtoccError("a held-out error needs calibration utterances")
    if hessians is None or cfg.sequential or (cfg.heldout and not hessians.heldout_matrices):
        if cfg.method == "obs" and not calib:
            raise FemtoccError("OBS pruning needs calibration utterances")
        hessians = collect_hessians(pruned, calib, layers, progress, heldout=cfg.heldout) if calib else None
    timings["calibration_s"] = time.perf_counter() - t

    weights = {n: weight_matrix(m) for n, m in layers.items()}
    if cfg.per_layer is not None:
        targets = {n: float(cfg.per_layer[n]) for n in layers}
    elif cfg.allocation == "global" or cfg.method == "mp-global":
        targets = _global_sparsities(weights, cfg, pattern, hessians)
    else:
        targets = {n: cfg.sparsity for n in layers}

    t = time.perf_counter()
    per_layer = {}
    stages = _stages(list(layers)) if cfg.sequential and cfg.method == "obs" else [list(layers)]
    for i, stage in enumerate(stages):
        if cfg.sequential and cfg.method == "obs" and i > 0:
            t_cal = time.perf_counter()
            tokens = dense_transcripts(bundle, calib)
            stage_layers = {n: layers[n] for n in stage}
            hessians.update(collect_hessians(pruned, calib, stage_layers, dense_tokens=tokens, heldout=cfg.heldout))
            timings["calibration_s"] += time.perf_counter() - t_cal
        for name in stage:
            w = weight_matrix(layers[name])
            if cfg.method == "obs":
                search = cfg.admm_iterations if well_calibrated(hessians.rows[name], w.shape[1]) else 0
                r = obs_prune(w, hessians.matrices[name], targets[name], pattern, cfg.damping, cfg.block,
                              cfg.refit_iterations, search, keep_pruned=(w == 0) if cfg.keep_zeros else None)
                new, damping, error, unrefit = r.weight, r.damping, r.error, r.unrefit_error
            else:
                search = 0
                mask = magnitude_mask(w, targets[name], pattern)
                new, damping = np.where(mask, 0.0, w).astype(np.float32), None
                error = relative_error(w, new, hessians.matrices[name]) if hessians else None
                unrefit = error
            heldout = _heldout_error(w, new, name, hessians, targets[name], pattern, cfg, damping, search) \
                if cfg.heldout else None
            _store(layers[name], new)
            per_layer[name] = {
                "shape": list(w.shape),
                "params": int(w.size),
                "nnz": int(np.count_nonzero(new)),
                "sparsity": float(1 - np.count_nonzero(new) / w.size),
                "target": targets[name],
                "relative_error": error,
                "relative_error_before_refit": unrefit,
                "heldout_error": heldout,
                "admm_iterations": search,
                "damping": damping,
            }
    timings["pruning_s"] = time.perf_counter() - t
    total = sum(p["params"] for p in per_layer.values())
    nnz = sum(p["nnz"] for p in per_layer.values())
    dampings = sorted({p["damping"] for p in per_layer.values() if p["damping"] is not None})
    errors = [p["relative_error"] for p in per_layer.values() if p["relative_error"] is not None]
    heldout = [p["heldout_error"] for p in per_layer.values() if p["heldout_error"] is not None]
    report = {
        "config": {**asdict(cfg), "pattern": pattern.name},
        "calibration_utterances": len(calib) if calib else 0,
        "pruned_params": total,
        "pruned_nnz": nnz,
        "sparsity": 1 - nnz / total,
        "model_params": int(sum(p.numel() for p in pruned.model.parameters())),
        "dampings_used": dampings,
        "mean_relative_error": float(np.mean(errors)) if errors else None,
        "mean_heldout_error": float(np.mean(heldout)) if heldout else None,
        "seconds": time.perf_counter() - start,
        **timings,
        "layers": per_layer,
    }
    pruned.source_digest = weights_digest(pruned.model)
    pruned.metadata = {"pruning": {k: v for k, v in report.items() if k != "layers"}, "dense_source": bundle.name}
    pruned.name = f"{bundle.name}-{cfg.method}-{pattern.name.replace(':', 'of')}-{cfg.sparsity:.2f}"
    return pruned, report

