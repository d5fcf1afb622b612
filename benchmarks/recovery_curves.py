"""WER against sparsity after recovery training, beside one-shot OBS at the same sparsities.

    python benchmarks/recovery_curves.py --runs build/rec-u60 build/rec-p50 [--model whisper-tiny.en]
        [--data ../shared/data/speech/dev] [--out benchmarks/results/recovery-curves]

``--runs``: output folders of ``femtocc prune --schedule ... --train ...``. Every stage checkpoint
in ``RUN.recovery/stage-NN`` is a point of that run's curve (the sparsity it was pruned to, the
training seconds up to the end of that stage, those of the recovered model it started from
included); of the stages at one sparsity (a pruning stage and a final fine-tuning stage) only
the one the run kept (``--keep best``), else the last (``--all-stages``: every one). A run's kind is its schedule: ``cubic`` and ``linear`` are "gradual",
``oneshot`` with more than one stage the "scheduled combination", and one ``oneshot`` stage
"one-shot + fine-tune"; a run that started from a recovered model says so. For every pattern
and sparsity that a run reaches, tiny.en is also pruned one shot with OBS (one calibration on
the calibration speakers of the dev set) and scored the same way: the one-shot curve
(``--oneshot-from SWEEP.json`` takes the points that ``sweep.py`` already measured, with
onnxruntime, on the same evaluation speakers). Every model is transcribed (torch) on the evaluation
speakers of the dev set; WER, agreement with dense, runaways.

Writes ``OUT.json`` (points are kept between runs of the script, keyed by the model folder and
its weights digest, so adding a run scores only the new points) and ``OUT.png`` (one panel per
pattern, one series per kind, dense WER and dense + 1.0 marked).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from common import write_result


def kind_of(schedule: str) -> str:
    kind, *_, stages = schedule.split(":")
    if kind == "oneshot":
        return "scheduled combination" if int(stages) > 1 else "one-shot + fine-tune"
    return "gradual"


def training_s(model: Path) -> float:
    """Seconds of the training stages that made ``model`` (a recovery output, or one of its
    ``RUN.recovery/stage-NN`` folders), with those of the recovered model it started from."""
    if (model / "train-report.json").is_file():
        report, last = json.loads((model / "train-report.json").read_text()), None
    elif model.parent.name.endswith(".recovery") and model.name.startswith("stage-"):
        run = model.parent.with_name(model.parent.name[: -len(".recovery")])
        if not (run / "train-report.json").is_file():
            return 0.0
        report, last = json.loads((run / "train-report.json").read_text()), int(model.name.split("-")[1])
    else:
        return 0.0
    own = sum(e["seconds"] for e in report["stages"] if last is None or e["stage"] <= last)
    return own + training_s(Path(report.get("start", "")))


def run_points(run: Path, all_stages: bool = False) -> list[dict]:
    """A run's stage checkpoints; of the stages at one sparsity (a pruning stage and a final
    fine-tuning stage) only the one the run kept, else the last, unless ``all_stages``."""
    report = json.loads((run / "train-report.json").read_text())
    work = run.with_name(run.name + ".recovery")
    start = Path(report.get("start", ""))
    before = training_s(start)
    kind = kind_of(report["schedule"]) + (" (continued)" if before else "")
    points, seconds = [], before
    stages = report["stages"]
    same = {}  # sparsity -> the stage that stands for it: the one the run kept, else the last
    for stage in stages:
        sparsity = stage["target_sparsity"]
        if sparsity not in same or same[sparsity] != report.get("kept_stage"):
            same[sparsity] = stage["stage"]
    for stage in stages:
        seconds += stage["seconds"]
        if not all_stages and same[stage["target_sparsity"]] != stage["stage"]:
            continue
        folder = work / f"stage-{stage['stage']:02d}"
        points.append({"kind": kind, "run": str(run), "model": str(folder),
                       "schedule": report["schedule"], "stage": stage["stage"], "pattern": report["config"]["pattern"],
                       "sparsity": round(stage["target_sparsity"], 4), "training_s": round(seconds, 1),
                       "steps": stage["steps"], "speech_s": report["data"]["speech_s"]})
    return points


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from femtocc.cache import atomic_write

    patterns = sorted({p["pattern"] for p in result["points"]})
    fig, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.2), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for kind in sorted({p["kind"] for p in result["points"] if p["pattern"] == pattern}):
            pts = sorted((p["sparsity"], p["wer"]) for p in result["points"] if p["pattern"] == pattern and p["kind"] == kind)
            ax.plot(*zip(*pts), marker="o", label=kind)
        ax.axhline(result["dense"]["wer"], color="k", lw=0.8, label="dense")
        ax.axhline(result["dense"]["wer"] + 1.0, color="k", lw=0.8, ls="--", label="dense + 1.0")
        ax.set(title=f"{result['model']}, {pattern}", xlabel="sparsity of the pruned layers",
               ylabel="WER % (dev evaluation speakers)", ylim=(0, min(150, max([60] + [p["wer"] * 1.05 for p in result["points"]]))))
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.calibrate import collect_hessians
    from femtocc.passes.obs import REFIT_ITERATIONS
    from femtocc.passes.prune import PruneConfig, prune_model
    from femtocc.passes.recover import validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--out", default="benchmarks/results/recovery-curves")
    ap.add_argument("--oneshot-from", default=None, metavar="SWEEP.json",
                    help="take one-shot points that benchmarks/sweep.py measured (same evaluation set) from its JSON")
    ap.add_argument("--all-stages", action="store_true", help="also the pruning stage before a final fine-tuning stage")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = load_whisper(args.model)
    calib, evaluation = split_by_speaker(load_dataset(args.data))
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    known = {(p["model"], p.get("digest")): p for p in earlier.get("points", [])}
    points = [p for run in args.runs for p in run_points(Path(run), args.all_stages)]
    for pattern, sparsity in sorted({(p["pattern"], p["sparsity"]) for p in points}):
        points.append({"kind": "one-shot", "model": f"{args.model} obs {pattern} {sparsity}", "pattern": pattern,
                       "sparsity": sparsity, "training_s": 0.0})
    dense_point = earlier.get("dense") if earlier.get("dense", {}).get("digest") == teacher.source_digest else \
        {"model": "dense", "digest": teacher.source_digest, **validate(teacher, teacher, evaluation)}
    result = {"model": args.model, "data": args.data, "evaluation_utterances": len(evaluation),
              "dense": dense_point, "points": []}
    swept = {}
    if args.oneshot_from:
        sweep = json.loads(Path(args.oneshot_from).read_text())
        if sweep["evaluation_utterances"] != len(evaluation) or sweep["model"] != args.model:
            raise SystemExit(f"{args.oneshot_from}: another model or evaluation set")
        swept = {(r["pattern"], round(r["sparsity"], 4)): r for r in sweep["rows"]
                 if r["method"] == "obs" and r["allocation"] == "uniform" and not r.get("admm_iterations")
                 and r.get("refit_iterations") == REFIT_ITERATIONS}
    hessians = None
    for p in points:
        if p["kind"] == "one-shot":
            bundle = None
            p["digest"] = f"{teacher.source_digest}:{p['pattern']}:{p['sparsity']}:{len(calib)}"
        else:
            bundle = load_whisper(p["model"])
            p["digest"] = bundle.source_digest
        row = swept.get((p["pattern"], p["sparsity"])) if p["kind"] == "one-shot" else None
        if (p["model"], p["digest"]) in known:
            p.update({k: v for k, v in known[(p["model"], p["digest"])].items() if k not in p})
        elif row:
            p.update({"wer": row["wer"], "agreement_wer": row["agreement_wer"],
                      "hit_token_limit": row["hit_token_limit"], "source": args.oneshot_from})
        else:
            if bundle is None:  # one calibration of the dense model serves every one-shot point
                hessians = hessians or collect_hessians(teacher, calib)
                bundle, _ = prune_model(teacher, PruneConfig("obs", p["sparsity"], p["pattern"]), calib, hessians=hessians)
            p.update(validate(bundle, teacher, evaluation))
        result["points"].append(p)
        print(f"{p['kind']:<22} {p['pattern']:<12} {p['sparsity']:.3f}  WER {p['wer']:6.2f}  agreement "
              f"{p['agreement_wer']:6.2f}  runaways {p['hit_token_limit']}  training {p['training_s']:.0f} s", flush=True)
        write_result(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(f"dense WER {dense_point['wer']:.2f}; wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
