"""Fit-to-SRAM planning: a sparsity per layer so that a scope's weights fit a byte budget, at the
least predicted accuracy loss (``femtocc plan``).

For every layer of the scope (``encoder``: the encoder's convolutions and linear layers; ``model``:
every prunable layer and the token table, the embedding tied to the output projection) and every
candidate sparsity of :data:`CANDIDATES`, the layer is pruned by OBS (with its refit) in the
target's native pencil on Hessians collected once from calibration speech, and measured twice:

* its **error**: OBS's relative output error ``||(W - W') X||^2 / ||W X||^2`` on the calibration
  inputs (what ``prune`` reports per layer);
* its **bytes**: the pruned weight quantized at the build's weight precision, then stored as
  ``select-layout`` would store it (the target cost model's :func:`choose_format`, the same
  accounting the compile report adds up).

The objective is the sum over layers of their relative output errors: each layer's relative
perturbation of its own output, weighted alike, as in OBS's layer-wise framing (SparseGPT, OBC),
where end-to-end loss grows with the layer errors. It needs no end-to-end evaluation per candidate,
which at tens of layers x ten sparsities would cost hours here. The choice is a multiple-choice
knapsack; :func:`choose` solves it greedily on each layer's lower convex hull of (bytes, error):
starting dense, it repeatedly moves the layer whose next hull point saves bytes at the least
error per byte, until the scope fits. A plan that cannot fit even at the largest candidate is an
error naming the shortfall.

The plan (``plan.json``) lists each layer's sparsity, bytes and error; ``femtocc prune`` and
``femtocc compile`` apply it with ``--plan``, in one shot, or ``femtocc prune --plan --schedule
--train`` gradually with recovery training (each layer follows the schedule's shape to its planned
sparsity); ``compile --plan`` of a model already at the plan's sparsities prunes nothing and
checks that the scope fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError

CANDIDATES = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97)
SCOPES = ("encoder", "model")
PLAN_FORMAT = "femtocc-plan/1"


def scope_layers(model, scope: str) -> dict:
    from femtocc.passes.calibrate import prunable_layers

    if scope not in SCOPES:
        raise FemtoccError(f"--scope {scope!r}: choose from {', '.join(SCOPES)}")
    layers = prunable_layers(model, include_embeddings=scope == "model")
    return {n: m for n, m in layers.items() if scope == "model" or n.startswith("encoder.")}


def layer_options(bundle, calib, scope: str, target, bits: int, progress: bool = False) -> dict[str, list[dict]]:
    """Per layer of the scope: every candidate's ``{sparsity, error, bytes, format}``."""
    from femtocc.passes.calibrate import collect_hessians
    from femtocc.passes.obs import obs_prune
    from femtocc.passes.prune import weight_matrix
    from femtocc.passes.quantize import quantize_weight
    from femtocc.passes.sparsity import parse_pattern
    from femtocc.progress import progress as steps
    from femtocc.targets.spu001.cost import choose_format, format_costs

    pattern = parse_pattern(f"pencil{target.facts.pencil}")
    layers = scope_layers(bundle.model, scope)
    hessians = collect_hessians(bundle, calib, layers, progress)
    options = {}
    for name in steps(list(layers), "plan: OBS per layer and sparsity", "layer", enabled=progress):
        w = weight_matrix(layers[name])
        rows = []
        for s in CANDIDATES:
            new, error = (w, 0.0) if s == 0 else _pruned(obs_prune, w, hessians.matrices[name], s, pattern)
            q, _ = quantize_weight(new.T, bits)  # [in, out], as the compiled qdense holds it
            costs = format_costs(q, bits, target)
            fmt = choose_format(costs)
            rows.append({"sparsity": s, "error": float(error), "bytes": int(costs[fmt]["bytes"]), "format": fmt})
        options[name] = rows
    return options


def _pruned(obs_prune, w, hessian, s, pattern):
    r = obs_prune(w, hessian, s, pattern)
    return r.weight, r.error


def _hull(rows: list[dict]) -> list[dict]:
    """The candidates on the lower convex hull of (bytes, error), from the most bytes down."""
    pts = sorted(rows, key=lambda r: (-r["bytes"], r["error"]))
    kept: list[dict] = []
    for r in pts:
        if kept and r["error"] <= kept[-1]["error"]:  # fewer bytes and no more error: better
            kept.pop()
            while kept and r["error"] <= kept[-1]["error"]:
                kept.pop()
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]  # b must lie below the line from a to r
            if (b["error"] - a["error"]) * (a["bytes"] - r["bytes"]) >= (r["error"] - a["error"]) * (a["bytes"] - b["bytes"]):
                kept.pop()
            else:
                break
        kept.append(r)
    return kept


def choose(options: dict[str, list[dict]], budget: int) -> dict[str, dict]:
    """Per layer, the candidate the greedy hull walk ends on (see the module docstring)."""
    hulls = {n: _hull(rows) for n, rows in options.items()}
    at = {n: 0 for n in hulls}
    total = sum(h[0]["bytes"] for h in hulls.values())
    while total > budget:
        best, rate = None, None
        for n, h in hulls.items():
            if at[n] + 1 < len(h):
                a, b = h[at[n]], h[at[n] + 1]
                r = (b["error"] - a["error"]) / max(a["bytes"] - b["bytes"], 1)
                if rate is None or r < rate:
                    best, rate = n, r
        if best is None:
            smallest = sum(h[-1]["bytes"] for h in hulls.values())
            raise FemtoccError(f"the scope needs at least {smallest:,} bytes at sparsity {CANDIDATES[-1]}; the budget "
                               f"is {budget:,}")
        h = hulls[best]
        total -= h[at[best]]["bytes"] - h[at[best] + 1]["bytes"]
        at[best] += 1
    return {n: hulls[n][at[n]] for n in hulls}


def make_plan(bundle, calib, scope: str, budget: int, target, quant: str, progress: bool = False) -> dict:
    from femtocc.compile import QUANT

    bits = QUANT[quant][0]
    options = layer_options(bundle, calib, scope, target, bits, progress)
    chosen = choose(options, budget)
    params = {n: int(np.prod(_shape(bundle.model, n, scope))) for n in chosen}
    kept = sum(round(params[n] * (1 - c["sparsity"])) for n, c in chosen.items())
    return {
        "format": PLAN_FORMAT, "model": bundle.name, "scope": scope, "sram_bytes": budget, "target": target.name,
        "pattern": f"pencil{target.facts.pencil}", "quant": quant, "weight_bits": bits,
        "objective": "sum of per-layer OBS relative output errors on the calibration speech",
        "calibration_utterances": len(calib),
        "scope_bytes": sum(c["bytes"] for c in chosen.values()),
        "scope_parameters": sum(params.values()), "resident_nonzero_parameters": kept,
        "predicted_error": sum(c["error"] for c in chosen.values()),
        "layers": {n: {**c, "parameters": params[n]} for n, c in chosen.items()},
        "options": options,
    }


def _shape(model, name, scope):
    from femtocc.passes.prune import weight_matrix

    return weight_matrix(scope_layers(model, scope)[name]).shape


def still_to_prune(model, per_layer: dict[str, float], slack: float = 0.005) -> dict[str, float]:
    """The planned layers that ``model`` (transformers Whisper) does not already hold at their planned
    sparsity (within ``slack``): a model recovered to the plan (``prune --plan --schedule``) is
    compiled as it is, not pruned again."""
    from femtocc.passes.calibrate import prunable_layers

    layers = prunable_layers(model, include_embeddings=True)
    return {n: s for n, s in per_layer.items()
            if n not in layers or float((layers[n].weight == 0).float().mean()) < s - slack}


def plan_schedules(path, sparsities: list[float]) -> tuple[list, str, str]:
    """``prune --plan PLAN --schedule S``: every layer the plan names follows the schedule's shape to its
    own planned sparsity (stage ``i`` prunes layer ``n`` to ``planned[n] * S[i] / S[-1]``); the layers
    it does not name stay dense. Returns (the per-layer schedules, a regex of the planned layers, the
    plan's pattern)."""
    import re

    plan = read_plan(path)
    if sparsities[-1] <= 0:
        raise FemtoccError("--plan with --schedule: the schedule's final sparsity must be above 0 (it gives the "
                           "shape; each layer ends at its planned sparsity)")
    if "proj_out" in plan["layers"] or "decoder.embed_tokens" in plan["layers"]:
        raise FemtoccError(f"--plan {path} prunes the token table, which recovery training does not prune; plan "
                           "--scope encoder, or prune that plan in one shot")
    planned = {n: v["sparsity"] for n, v in plan["layers"].items() if v["sparsity"] > 0}
    if not planned:
        raise FemtoccError(f"--plan {path}: no layer is pruned")
    groups = [(f"^{re.escape(n)}$", [round(p * x / sparsities[-1], 6) for x in sparsities]) for n, p in planned.items()]
    return groups, "^(" + "|".join(re.escape(n) for n in planned) + ")$", plan["pattern"]


def read_plan(path) -> dict:
    """A plan file, checked: its format and a sparsity in [0, 1) for every layer."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FemtoccError(f"--plan {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FemtoccError(f"--plan {path}: not valid JSON ({e})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), dict):
        raise FemtoccError(f"--plan {path}: not a femtocc plan (format {PLAN_FORMAT} with layers); make one with femtocc plan")
    for name, layer in plan["layers"].items():
        s = layer.get("sparsity") if isinstance(layer, dict) else None
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise FemtoccError(f"--plan {path}: layers.{name}.sparsity must be in [0, 1)")
    return plan
