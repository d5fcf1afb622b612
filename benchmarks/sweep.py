"""Sparsity sweep: WER against sparsity for each pruning method and model, on real speech.

    python benchmarks/sweep.py [--models whisper-tiny.en whisper-base] [--data DIR] [--out benchmarks/results]

For each model: split the data by speaker (calibration / evaluation), calibrate once on the
dense model, transcribe the evaluation part densely, then for every grid point prune a copy,
export it to ONNX and transcribe the evaluation part with onnxruntime. Writes, per model,
``sweep-MODEL.json`` and ``.csv`` (after every point, so a partial sweep is kept) and
``sweep-MODEL.png`` (WER against sparsity, one line per method, dense WER marked), and reports
for each method the highest sparsity whose WER stays within +1.0 absolute of dense. A sweep
restricted to some grid lines or points (--only, --methods, --grid) replaces those points in the
earlier results of the same evaluation set and keeps the rest. Each row keeps its errors per
utterance, against the references and against the dense transcripts, so that

    python benchmarks/sweep.py --compare sweep-A.json sweep-B.json [--line obs-uniform]

can resample the evaluation utterances (a paired bootstrap) and say how often model B's highest
sparsity within +1.0 exceeds model A's (one runaway utterance moves a WER by ~0.8 here), and at
each sparsity both ran, how often B's agreement WER is the lower. With --swap-split a sweep
calibrates on the evaluation speakers and evaluates on the calibration speakers
(``sweep-MODEL-swapped.*``); ``--compare A.json+A-swapped.json B.json+B-swapped.json`` pools the
two folds, so that every utterance of the dev set is evaluated by a model that did not see it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from common import header, write_result

from femtocc.passes.obs import ADMM_ITERATIONS

GRIDS = {
    # (method, allocation, pattern, ADMM mask search iterations): sparsities
    ("mp-local", "uniform", "unstructured", 0): [0.1, 0.2, 0.3, 0.4],
    ("mp-global", "global", "unstructured", 0): [0.1, 0.2, 0.3, 0.4],
    ("obs", "uniform", "unstructured", 0): [0.3, 0.4, 0.45, 0.5, 0.55, 0.6],
    ("obs", "uniform", "unstructured", ADMM_ITERATIONS): [0.4, 0.45, 0.5, 0.55],
    ("obs", "global", "unstructured", 0): [0.4, 0.5, 0.6],
    ("obs", "uniform", "pencil8", 0): [0.5],
}
TOLERANCE = 1.0


def label(method: str, allocation: str, pattern: str, admm_iterations: int = 0) -> str:
    text = method if method != "obs" else f"obs-{allocation}"
    text = text if pattern == "unstructured" else f"{text} {pattern}"
    return f"{text} admm" if admm_iterations else text


def usable(rows: list[dict], dense_wer: float) -> dict[str, float]:
    """Per method: the highest sparsity whose WER is within TOLERANCE of dense (0 if none)."""
    best: dict[str, float] = {}
    for r in rows:
        best.setdefault(r["label"], 0.0)
        if r["wer"] <= dense_wer + TOLERANCE:
            best[r["label"]] = max(best[r["label"]], r["sparsity"])
    return best


def earlier_rows(path: Path, rerun: dict[str, list[float]], evaluation_utterances: int,
                 dense_wer: float) -> tuple[list[dict], list[str]]:
    """The rows of an earlier sweep of the same evaluation set that this sweep does not rerun
    (``rerun``: line label -> sparsities), and the commands that made them, so a sweep restricted
    with --only, --methods or --grid updates its points and keeps the others."""
    if not path.is_file():
        return [], []
    earlier = json.loads(path.read_text())
    if earlier["evaluation_utterances"] != evaluation_utterances or abs(earlier["dense"]["wer"] - dense_wer) > 1e-9:
        return [], []
    kept = [r for r in earlier["rows"]
            if not any(abs(r["sparsity"] - x) < 1e-3 for x in rerun.get(r["label"], []))]
    return kept, (earlier.get("earlier_commands", []) + [earlier["command"]]) if kept else []


def plot(rows, dense_wer, model, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from femtocc.cache import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(dense_wer + 10, min(3 * dense_wer, max(r["wer"] for r in rows) + 2))  # keep the +1.0 region legible
    off_scale: dict[float, int] = {}  # per sparsity, labels already written at the edge
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["sparsity"], r["wer"]) for r in rows if r["label"] == name)
        line, = ax.plot([p[0] * 100 for p in pts], [min(p[1], top) for p in pts], marker="o", label=name)
        for x, y in pts:
            if y > top:  # off the scale: drawn at the edge, with its value
                off_scale[x] = off_scale.get(x, 0) + 1
                ax.annotate(f"{y:.0f}", (x * 100, top), textcoords="offset points", xytext=(4, -3 - 9 * off_scale[x]),
                            fontsize=7, color=line.get_color())
    ax.axhline(dense_wer, color="black", linestyle="--", linewidth=1, label=f"dense {dense_wer:.2f}")
    ax.axhline(dense_wer + TOLERANCE, color="grey", linestyle=":", linewidth=1, label="dense + 1.0")
    ax.set_xlabel("sparsity of pruned layers (%)")
    ax.set_ylabel("WER (%)")
    ax.set_ylim(0, top * 1.02)
    ax.set_title(f"{model}: WER vs sparsity (evaluation split)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as a table, without their per-utterance lists (those stay in the JSON)."""
    from femtocc.cache import atomic_write

    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r if not k.startswith("utterance_"))),
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def sweep_model(model: str, args) -> dict:
    from femtocc.cache import atomic_write
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.backends import make_backend
    from femtocc.decode import score, transcribe
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.calibrate import collect_hessians, prunable_layers
    from femtocc.passes.prune import PruneConfig, prune_model
    from femtocc.wer import normalize, utterance_errors

    bundle = load_whisper(model)
    calib, evaluation = split_by_speaker(load_dataset(args.data))
    if args.swap_split:  # the second fold of a two-fold cross-evaluation
        calib, evaluation = evaluation, calib
    stem = f"sweep-{model}{'-swapped' if args.swap_split else ''}"
    evaluation = evaluation[: args.eval_limit] if args.eval_limit else evaluation
    t = time.perf_counter()
    hessians = collect_hessians(bundle, calib, prunable_layers(bundle.model))
    calib_s = time.perf_counter() - t
    dense = transcribe(bundle, make_backend(bundle, "onnxruntime"), evaluation)
    dense_report = score(dense)
    dense_texts = {x.id: x.hypothesis for x in dense}
    dense_per = utterance_errors([x.reference for x in dense], [x.hypothesis for x in dense])
    dense_words = [len(normalize(x.hypothesis).split()) for x in dense]  # the agreement WER's denominators
    print(f"{model}: dense WER {dense_report['wer']:.2f} on {len(evaluation)} utterances; "
          f"calibration on {len(calib)} utterances took {calib_s:.0f} s", flush=True)
    out = Path(args.out)
    grids = {k: v for k, v in GRIDS.items()
             if (not args.methods or k[0] in args.methods) and (not args.only or label(*k) in args.only)}
    rows, earlier_commands = earlier_rows(out / f"{stem}.json", {label(*k): v for k, v in grids.items()},
                                          len(evaluation), dense_report["wer"])
    for (method, allocation, pattern, admm_iterations), sparsities in grids.items():
        for s in sparsities:
            cfg = PruneConfig(method=method, sparsity=s, pattern=pattern, allocation=allocation,
                              admm_iterations=admm_iterations)
            pruned, report = prune_model(bundle, cfg, calib, hessians=hessians)
            with tempfile.TemporaryDirectory() as tmp:
                transcripts = transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation)
            result = score(transcripts, dense_texts)
            row = {
                "model": model, "label": label(method, allocation, pattern, admm_iterations), "method": method,
                "allocation": allocation, "pattern": pattern, "sparsity": round(report["sparsity"], 4),
                "wer": round(result["wer"], 3), "agreement_wer": round(result["agreement_wer"], 3),
                "hit_token_limit": result["hit_token_limit"], "prune_s": round(report["pruning_s"], 2),
                "dampings": report["dampings_used"],
                "refit_iterations": cfg.refit_iterations if method == "obs" else None,
                "admm_iterations": admm_iterations,
                "utterance_errors": [e for e, _ in utterance_errors([x.reference for x in transcripts],
                                                                   [x.hypothesis for x in transcripts])],
                # against the dense model's transcript; its words are "dense_utterance_words"
                "utterance_agreement_errors": [e for e, _ in utterance_errors(
                    [dense_texts[x.id] for x in transcripts], [x.hypothesis for x in transcripts])],
            }
            rows.append(row)
            print(f"  {row['label']:<28} sparsity {row['sparsity']:.3f}  WER {row['wer']:6.2f}  "
                  f"agree {row['agreement_wer']:6.2f}  runaways {row['hit_token_limit']}", flush=True)
            summary = {
                **header(),
                "earlier_commands": earlier_commands,  # of the rows kept from earlier sweeps
                "model": model,
                "calibration_utterances": len(calib),
                "evaluation_utterances": len(evaluation),
                "dense": dense_report,
                "utterance_ids": [u.id for u in evaluation],  # the order of every utterance list below
                "utterance_words": [w for _, w in dense_per],
                "dense_utterance_errors": [e for e, _ in dense_per],
                "dense_utterance_words": dense_words,
                "tolerance": TOLERANCE,
                "max_sparsity_within_tolerance": usable(rows, dense_report["wer"]),
                "rows": rows,
            }
            with atomic_write(out / f"{stem}.json", "w") as f:
                json.dump(summary, f, indent=1)
            write_csv(rows, out / f"{stem}.csv")
    plot(rows, dense_report["wer"], model, out / f"{stem}.png")
    best = usable(rows, dense_report["wer"])
    for name, s in best.items():
        print(f"  {model}: {name:<28} highest sparsity within +{TOLERANCE} WER: {s:.3f}")
    return best


def usable_bootstrap(summary: dict, name: str, draws):
    """The highest sparsity within TOLERANCE of dense for line ``name``, once per resample of the
    evaluation utterances (``draws``: [B, n] utterance counts); rows without per-utterance errors
    (older sweeps) are left out."""
    import numpy as np

    words = draws @ np.asarray(summary["utterance_words"], dtype=float)
    dense = 100 * (draws @ np.asarray(summary["dense_utterance_errors"], dtype=float)) / words
    best = np.zeros(len(draws))
    for r in summary["rows"]:
        if r["label"] == name and "utterance_errors" in r:
            wer = 100 * (draws @ np.asarray(r["utterance_errors"], dtype=float)) / words
            best = np.where(wer <= dense + TOLERANCE, np.maximum(best, r["sparsity"]), best)
    return best


def agreement_bootstrap(a: dict, b: dict, name: str, draws) -> dict:
    """At each sparsity both sweeps ran on line ``name``: each model's agreement WER (its pruned
    transcripts against its own dense transcripts) and how often, over the resamples, the second
    model's is the lower: which model pruning perturbs less. Unlike the +1.0 criterion it does not
    hinge on grid points or on references, but it is not WER: changes can also repair errors."""
    import numpy as np

    def curve(summary):
        if "dense_utterance_words" not in summary:
            return {}
        words = draws @ np.asarray(summary["dense_utterance_words"], dtype=float)
        return {round(r["sparsity"], 3): 100 * (draws @ np.asarray(r["utterance_agreement_errors"], dtype=float)) / words
                for r in summary["rows"] if r["label"] == name and "utterance_agreement_errors" in r}

    ca, cb = curve(a), curve(b)
    return {f"{s:.3f}": {a["model"]: round(float(ca[s].mean()), 3), b["model"]: round(float(cb[s].mean()), 3),
                         f"P({b['model']} lower)": round(float(np.mean(cb[s] < ca[s])), 4)}
            for s in sorted(set(ca) & set(cb))}


def load_sweep(spec: str) -> dict:
    """A sweep JSON, or "A.json+B.json": two sweeps of the same model on disjoint evaluation
    utterances (the two folds of --swap-split) pooled into one, at the points both ran."""
    first, *rest = (json.loads(Path(p).read_text()) for p in spec.split("+"))
    for other in rest:
        if other["model"] != first["model"] or set(other["utterance_ids"]) & set(first["utterance_ids"]):
            raise SystemExit(f"compare {spec}: pooled sweeps must be of one model on disjoint utterances")
        pooled = {**first, **{k: first[k] + other[k] for k in ("utterance_ids", "utterance_words", "dense_utterance_errors")}}
        agreement = "dense_utterance_words" in first and "dense_utterance_words" in other
        if agreement:
            pooled["dense_utterance_words"] = first["dense_utterance_words"] + other["dense_utterance_words"]
        else:  # one fold's words alone would not match the pooled utterances
            pooled.pop("dense_utterance_words", None)
        pooled["dense"] = {"wer": 100 * sum(pooled["dense_utterance_errors"]) / sum(pooled["utterance_words"])}
        theirs = {(r["label"], round(r["sparsity"], 3)): r for r in other["rows"]}
        pooled["rows"] = []
        for r in first["rows"]:
            o = theirs.get((r["label"], round(r["sparsity"], 3)))
            if o is None or "utterance_errors" not in r or "utterance_errors" not in o:
                continue
            row = {**r, "utterance_errors": r["utterance_errors"] + o["utterance_errors"],
                   "hit_token_limit": r["hit_token_limit"] + o["hit_token_limit"]}
            row["wer"] = 100 * sum(row["utterance_errors"]) / sum(pooled["utterance_words"])
            if agreement and "utterance_agreement_errors" in r and "utterance_agreement_errors" in o:
                row["utterance_agreement_errors"] = r["utterance_agreement_errors"] + o["utterance_agreement_errors"]
                row["agreement_wer"] = 100 * sum(row["utterance_agreement_errors"]) / sum(pooled["dense_utterance_words"])
            else:  # the first fold's alone would be wrong for the pool
                row.pop("agreement_wer", None)
                row.pop("utterance_agreement_errors", None)
            pooled["rows"].append(row)
        first = pooled
    return first


def compare(first: str, second: str, name: str, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap over the evaluation utterances of two models' sweeps: how often the second
    model's highest sparsity within +1.0 of its dense WER exceeds, equals or trails the first's."""
    import numpy as np

    a, b = load_sweep(first), load_sweep(second)
    if a.get("utterance_ids") is None or a.get("utterance_ids") != b.get("utterance_ids"):
        raise SystemExit("compare: both sweeps need per-utterance errors on the same evaluation utterances")
    n = len(a["utterance_ids"])
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws = np.zeros((resamples, n))
    np.add.at(draws, (np.arange(resamples)[:, None], picks), 1.0)
    ua, ub = usable_bootstrap(a, name, draws), usable_bootstrap(b, name, draws)

    def spread(u):
        values, counts = np.unique(u, return_counts=True)
        return {f"{v:.3f}": round(c / resamples, 4) for v, c in zip(values, counts)}

    return {
        "line": name, "resamples": resamples, "seed": seed,
        "agreement": agreement_bootstrap(a, b, name, draws),
        "models": [a["model"], b["model"]],
        "measured": [usable(a["rows"], a["dense"]["wer"]).get(name), usable(b["rows"], b["dense"]["wer"]).get(name)],
        "bootstrap": {a["model"]: spread(ua), b["model"]: spread(ub)},
        f"P({b['model']} further)": round(float(np.mean(ub > ua)), 4),
        "P(same)": round(float(np.mean(ub == ua)), 4),
        f"P({a['model']} further)": round(float(np.mean(ub < ua)), 4),
    }


def replot(json_path: str) -> None:
    """Redraw a sweep's plot from its JSON (no pruning or decoding)."""
    summary = json.loads(Path(json_path).read_text())
    plot(summary["rows"], summary["dense"]["wer"], summary["model"], Path(json_path).with_suffix(".png"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    ap.add_argument("--methods", nargs="*", default=None, help="restrict to these methods")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="*", default=None, metavar="LABEL", help="run only these grid lines, e.g. obs-uniform")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier sweep")
    ap.add_argument("--grid", nargs="*", default=[], metavar="LABEL=S1,S2",
                    help="replace a grid line, e.g. obs-uniform=0.5,0.6,0.7 or 'mp-local=0.2,0.3'")
    ap.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"),
                    help="only compare two models' sweep JSONs by a paired bootstrap of the evaluation utterances")
    ap.add_argument("--swap-split", action="store_true",
                    help="calibrate on the evaluation speakers and evaluate on the calibration speakers "
                         "(writes sweep-MODEL-swapped.*; --compare A.json+A-swapped.json ... pools both folds)")
    ap.add_argument("--line", default="obs-uniform", help="the grid line --compare looks at (default obs-uniform)")
    args = ap.parse_args()
    if args.compare:
        result = compare(*args.compare, args.line)
        print(json.dumps(result, indent=1))
        line = "" if args.line == "obs-uniform" else "-" + args.line.replace(" ", "-")
        line += "-pooled" if any("+" in spec for spec in args.compare) else ""
        path = Path(args.out) / f"compare-{result['models'][0]}-{result['models'][1]}{line}.json"
        write_result(path, result)
        print(f"wrote {path}")
        return 0
    if args.replot:
        replot(args.replot)
        return 0
    for item in args.grid:
        name, _, values = item.partition("=")
        keys = [k for k in GRIDS if label(*k) == name]
        if not keys or not values:
            ap.error(f"--grid {item!r}: expected one of {', '.join(label(*k) for k in GRIDS)}=S1,S2,...")
        GRIDS[keys[0]] = [float(v) for v in values.split(",")]
    for model in args.models:
        sweep_model(model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
