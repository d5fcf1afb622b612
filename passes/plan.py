"""Fit-to-SRAM planning: a sparsity and a weight width per layer so that a scope's weights fit a
byte budget, at the least predicted accuracy loss (``femtocc plan``).

For every layer of the scope (``encoder``: the encoder's convolutions and linear layers; ``model``:
every prunable layer and the token table, the embedding tied to the output projection), every
candidate sparsity of :data:`CANDIDATES` and every weight width the target lets a layer hold
(``assumptions.layer_weight_bits``: int8 and int4 on spu001, under the build's activation width),
the layer is pruned by OBS (with its refit) in the target's native pencil, then rounded to the
width by GPTQ, on Hessians collected once from calibration speech, and measured twice:

* its **error**: the relative output error ``||(W - W') X||^2 / ||W X||^2`` of the pruned and
  rounded weight on the calibration inputs;
* its **bytes**: that weight stored as ``select-layout`` would store it (the target cost model's
  :func:`choose_format`, the same accounting the compile report adds up).

The objective is the sum over layers of their relative output errors: each layer's relative
perturbation of its own output, weighted alike, as in OBS's layer-wise framing (SparseGPT, OBC),
where end-to-end loss grows with the layer errors. It needs no end-to-end evaluation per candidate,
which at tens of layers x ten sparsities would cost hours here. The choice is a multiple-choice
knapsack; :func:`choose` solves it greedily on each layer's lower convex hull of (bytes, error):
starting from every layer's largest candidate (dense, int8), it repeatedly moves the layer whose
next hull point saves bytes at the least error per byte, until the scope fits. A plan that cannot
fit even at every layer's smallest candidate is an error naming the shortfall.

The plan (``plan.json``) lists each layer's sparsity, width, bytes and error; ``femtocc compile
--plan`` prunes to it, puts each layer's width on its weight constant (``weight_bits``, which the
quantize pass honours) and rounds with GPTQ as the plan measured. ``femtocc prune --plan`` prunes
to it in one shot, or ``femtocc prune --plan --schedule --train`` gradually with recovery training
(each layer follows the schedule's shape to its planned sparsity); ``compile --plan`` of a model
already at the plan's sparsities prunes nothing and checks that the scope fits.
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


def layer_options(bundle, calib, scope: str, target, widths, progress: bool = False) -> dict[str, list[dict]]:
    """Per layer of the scope: every candidate's ``{sparsity, bits, error, bytes, format}``, one per
    sparsity of :data:`CANDIDATES` and weight width of ``widths``."""
    from femtocc.passes.calibrate import collect_hessians
    from femtocc.passes.obs import gptq_quantize, obs_prune, relative_error
    from femtocc.passes.prune import weight_matrix
    from femtocc.passes.quantize import quantize_weight
    from femtocc.passes.sparsity import parse_pattern
    from femtocc.progress import progress as steps
    from femtocc.targets.spu001.cost import choose_format, format_costs

    pattern = parse_pattern(f"pencil{target.facts.pencil}")
    layers = scope_layers(bundle.model, scope)
    hessians = collect_hessians(bundle, calib, layers, progress)
    options = {}
    for name in steps(list(layers), "plan: OBS and GPTQ per layer, sparsity and width", "layer", enabled=progress):
        w, h = weight_matrix(layers[name]), hessians.matrices[name]
        rows = []
        for s in CANDIDATES:
            pruned = w if s == 0 else obs_prune(w, h, s, pattern).weight
            for bits in widths:
                rounded, scale = gptq_quantize(pruned, h, bits)
                q, _ = quantize_weight(rounded.T, bits, scale)  # [in, out], as the compiled qdense holds it
                costs = format_costs(q, bits, target)
                fmt = choose_format(costs)
                rows.append({"sparsity": s, "bits": bits, "error": relative_error(w, rounded, h),
                             "bytes": int(costs[fmt]["bytes"]), "format": fmt})
        options[name] = rows
    return options


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
            raise FemtoccError(f"the scope needs at least {smallest:,} bytes at its sparsest and narrowest candidates; "
                               f"the budget is {budget:,}")
        h = hulls[best]
        total -= h[at[best]]["bytes"] - h[at[best] + 1]["bytes"]
        at[best] += 1
    return {n: hulls[n][at[n]] for n in hulls}


HEAD = ("format", "model", "scope", "target", "pattern", "quant", "activation_bits", "weight_quant", "objective",
        "calibration_utterances")


def make_plan(bundle, calib, scope: str, budget: int, target, quant: str, widths=None, progress: bool = False) -> dict:
    """Measure every layer's candidates and choose. ``widths``: the weight widths a layer may get
    (default: every width the target allows a layer, ``assumptions.layer_weight_bits``)."""
    from femtocc.compile import QUANT

    widths = sorted({target.check_weight_bits(b, "--layer-bits") for b in widths or target.assumptions.layer_weight_bits},
                    reverse=True)
    options = layer_options(bundle, calib, scope, target, widths, progress)
    head = {"format": PLAN_FORMAT, "model": bundle.name, "scope": scope, "target": target.name,
            "pattern": f"pencil{target.facts.pencil}", "quant": quant, "activation_bits": QUANT[quant][1],
            "weight_quant": "gptq",
            "objective": "sum of per-layer relative output errors (OBS pruning, then GPTQ rounding) on the calibration speech",
            "calibration_utterances": len(calib)}
    params = {n: int(np.prod(_shape(bundle.model, n, scope))) for n in options}
    return choose_plan(head, options, params, budget, widths)


def choose_plan(head: dict, options: dict[str, list[dict]], params: dict[str, int], budget: int, widths) -> dict:
    """The plan that :func:`choose` makes from measured ``options``, using only the candidates at
    ``widths``; ``params``: each layer's number of weights."""
    widths = sorted(set(widths), reverse=True)
    usable = {n: [r for r in rows if r["bits"] in widths] for n, rows in options.items()}
    if any(not rows for rows in usable.values()):
        raise FemtoccError(f"--layer-bits {','.join(map(str, widths))}: the plan measured no candidate at these widths")
    chosen = choose(usable, budget)
    kept = sum(round(params[n] * (1 - c["sparsity"])) for n, c in chosen.items())
    return {
        **head, "sram_bytes": budget, "layer_bits": widths,
        "scope_bytes": sum(c["bytes"] for c in chosen.values()),
        "scope_parameters": sum(params.values()), "resident_nonzero_parameters": kept,
        "layers_at_bits": {str(b): sum(1 for c in chosen.values() if c["bits"] == b) for b in widths},
        "predicted_error": sum(c["error"] for c in chosen.values()),
        "layers": {n: {**c, "parameters": params[n]} for n, c in chosen.items()},
        "options": options,
    }


def replan(path, budget: int | None = None, widths=None) -> dict:
    """Choose again from the candidates a plan file measured (``femtocc plan --from``): another budget
    or fewer widths, in a second instead of the measurement's minutes."""
    plan = read_plan(path, "--from")
    if not isinstance(plan.get("options"), dict) or any(k not in plan for k in HEAD):
        raise FemtoccError(f"--from {path}: the plan holds no measured options (make it with femtocc plan)")
    params = {n: v.get("parameters") for n, v in plan["layers"].items()}
    missing = sorted(n for n, v in params.items() if not isinstance(v, int) or n not in plan["options"])
    if missing:
        raise FemtoccError(f"--from {path}: layers.{missing[0]} has no parameters or measured options")
    return choose_plan({k: plan[k] for k in HEAD}, plan["options"], params,
                       plan["sram_bytes"] if budget is None else budget, widths or plan["layer_bits"])


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


def plan_schedules(path, sparsities: list[float]) -> tuple[list, str, str, bool]:
    """``prune --plan PLAN --schedule S``: every layer the plan names follows the schedule's shape to its
    own planned sparsity (stage ``i`` prunes layer ``n`` to ``planned[n] * S[i] / S[-1]``); the layers
    it does not name stay dense. Returns (the per-layer schedules, a regex of the planned layers, the
    plan's pattern, whether it prunes the token table ``proj_out``)."""
    import re

    plan = read_plan(path)
    if sparsities[-1] <= 0:
        raise FemtoccError("--plan with --schedule: the schedule's final sparsity must be above 0 (it gives the "
                           "shape; each layer ends at its planned sparsity)")
    planned = {n: v["sparsity"] for n, v in plan["layers"].items() if v["sparsity"] > 0}
    if not planned:
        raise FemtoccError(f"--plan {path}: no layer is pruned")
    groups = [(f"^{re.escape(n)}$", [round(p * x / sparsities[-1], 6) for x in sparsities]) for n, p in planned.items()]
    return groups, "^(" + "|".join(re.escape(n) for n in planned) + ")$", plan["pattern"], "proj_out" in planned


def read_plan(path, option: str = "--plan") -> dict:
    """A plan file, checked: its format and a sparsity in [0, 1) for every layer."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FemtoccError(f"{option} {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FemtoccError(f"{option} {path}: not valid JSON ({e})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), dict):
        raise FemtoccError(f"{option} {path}: not a femtocc plan (format {PLAN_FORMAT} with layers); make one with femtocc plan")
    for name, layer in plan["layers"].items():
        s = layer.get("sparsity") if isinstance(layer, dict) else None
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise FemtoccError(f"{option} {path}: layers.{name}.sparsity must be in [0, 1)")
        if "bits" in layer and (not isinstance(layer["bits"], int) or isinstance(layer["bits"], bool)):
            raise FemtoccError(f"{option} {path}: layers.{name}.bits must be an integer width (4 or 8)")
    return plan
