"""``femtocc sweep``: a grid of builds, each pruned, compiled and run, to a WER / cost Pareto front.

A grid file (TOML) names what to explore::

    [sweep]
    data = "../shared/data/speech/dev"   # scored on this folder's evaluation speakers (split)
    split = "eval"                       # eval, calib or all
    limit = 16                           # the first N utterances of the split (0: all of them)
    runtime = "reference"                # or "sim": simulated cycles, energy, traffic per utterance
    calib_limit = 8                      # calibration utterances for pruning and compiling

    [[strategy]]
    name = "obs one-shot"
    model = ["whisper-tiny.en", "whisper-base"]
    method = "obs"                       # obs, mp-local, mp-global, or none
    pattern = ["unstructured", "pencil8"]
    sparsity = [0.3, 0.5]
    quant = ["w8a16", "w4a8"]

Every key of a strategy may be a list; a strategy stands for every combination of its lists (the
example is 16 points). Recovery training is a strategy with ``schedule`` and ``train`` (and
optionally ``steps_per_stage``, ``final_steps``, ``lr``, ``warmup``, ``batch``, ``kl_weight``,
``hidden_weight``, ``block_weight``, ``context``, ``precision``, ``seed``), the options of ``femtocc
prune`` of the same names. ``buckets`` and ``vocab_bits`` go to ``femtocc compile``.

A point runs ``femtocc prune`` (unless ``method = "none"``), ``femtocc compile`` and ``femtocc run``
as processes, in its own folder ``DIR/points/ID/`` (``ID`` is a digest of the point's settings and
the sweep's), and its record is appended to ``DIR/points.jsonl`` as soon as it finishes: WER,
agreement with the dense model, runaways, weight bytes, SRAM-resident weight bytes, external bytes,
cycles and energy per utterance (simulated with ``runtime = "sim"``; otherwise the cost model's
cycles and external bytes of the linear layers, and no energy), compile seconds. A point that fails
is recorded with its error and the sweep goes on. Running the same command again skips every point
already recorded as done, so an interrupted sweep loses at most the points in flight.

Points run in a local pool of ``workers`` at a time, or as Ray tasks (``ray_address``: an existing cluster, or ``"local"`` to start one here), each asking for
``ray_cpus`` CPUs, ``ray_memory_gb`` of memory and ``ray_gpus`` GPUs. A point's commands always
run one thread each, so a point computes the same record wherever and however it runs.

:func:`pareto` and :func:`report` turn the records into the front of WER against each cost axis.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from femtocc.errors import FemtoccError

SWEEP_KEYS = {"data": str, "split": str, "limit": int, "runtime": str, "calib": str, "calib_limit": int}
SWEEP_DEFAULTS = {"data": "../shared/data/speech/dev", "split": "eval", "limit": 16, "runtime": "reference",
                  "calib": None, "calib_limit": 8}
# strategy key -> (type, the femtocc command and option it becomes)
PRUNE_KEYS = {"method": str, "pattern": str, "sparsity": float, "schedule": str, "train": str,
              "steps_per_stage": int, "final_steps": int, "lr": float, "warmup": int, "batch": int,
              "kl_weight": float, "hidden_weight": float, "block_weight": float, "context": int,
              "precision": str, "seed": int, "train_limit": int}
COMPILE_KEYS = {"quant": str, "buckets": str, "vocab_bits": int, "weight_quant": str}
STRATEGY_KEYS = {"name": str, "model": str, **PRUNE_KEYS, **COMPILE_KEYS}
COST_AXES = ("weight_bytes", "external_bytes_per_utterance", "cycles_per_utterance", "energy_uj_per_utterance")
RECORDS = "points.jsonl"
MANIFEST = "sweep.json"


# ----------------------------------------------------------------------------- the grid


def _typed(value, kind, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FemtoccError(f"{where}: expected {kind.__name__}, found {value!r}")
    return value


def _check_point(p: dict, where: str) -> None:
    """The values a point's commands would refuse, refused now with the key named."""
    from femtocc.compile import QUANT
    from femtocc.frontend.onnx_export import parse_buckets
    from femtocc.frontend.whisper import PACKAGED_MODELS
    from femtocc.passes.prune import METHODS
    from femtocc.passes.sparsity import parse_pattern

    model = p["model"]
    if model not in PACKAGED_MODELS and not Path(model).expanduser().is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise FemtoccError(f"{where}.model: {model!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), "
                           "a model folder or a hub id")
    if p["method"] not in (*METHODS, "none"):
        raise FemtoccError(f"{where}.method: {p['method']!r} is not one of {', '.join((*METHODS, 'none'))}")
    try:
        parse_pattern(p.get("pattern", "unstructured"))
    except FemtoccError as e:
        raise FemtoccError(f"{where}.pattern: {e}") from None
    if "sparsity" in p and not 0 <= p["sparsity"] < 1:
        raise FemtoccError(f"{where}.sparsity: {p['sparsity']} is not in [0, 1)")
    if p.get("quant", "w8a16") not in QUANT:
        raise FemtoccError(f"{where}.quant: {p['quant']!r} is not one of {', '.join(QUANT)}")
    if "buckets" in p:
        parse_buckets(p["buckets"], f"{where}.buckets")
    if ("schedule" in p) != ("train" in p):
        raise FemtoccError(f"{where}: recovery training needs both schedule and train")
    if "schedule" in p:
        from femtocc.passes.schedule import parse_schedule

        try:
            parse_schedule(p["schedule"])
        except FemtoccError as e:
            raise FemtoccError(f"{where}.schedule: {e}") from None
    elif p["method"] != "none" and "sparsity" not in p:
        raise FemtoccError(f"{where}: method {p['method']} needs a sparsity (or a schedule and train)")


def load_grid(path: str | Path) -> tuple[dict, list[dict]]:
    """The sweep settings and the expanded points of a grid file; a malformed file or value is a
    one-line error naming the key (``strategy[1].pattern``)."""
    import tomllib

    path = Path(path)
    try:
        grid = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FemtoccError(f"{path}: no such grid file") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FemtoccError(f"{path}: not a valid TOML grid ({e})") from None
    unknown = set(grid) - {"sweep", "strategy"}
    if unknown:
        raise FemtoccError(f"{path}: unknown table {sorted(unknown)[0]!r}; a grid has [sweep] and [[strategy]]")
    sweep = dict(SWEEP_DEFAULTS)
    for key, value in grid.get("sweep", {}).items():
        if key not in SWEEP_KEYS:
            raise FemtoccError(f"{path}: sweep.{key}: unknown key; known: {', '.join(SWEEP_KEYS)}")
        sweep[key] = _typed(value, SWEEP_KEYS[key], f"{path}: sweep.{key}")
    sweep["calib"] = sweep["calib"] or sweep["data"]
    if sweep["runtime"] not in ("reference", "sim"):
        raise FemtoccError(f"{path}: sweep.runtime: {sweep['runtime']!r} is not reference or sim")
    if sweep["split"] not in ("eval", "calib", "all"):
        raise FemtoccError(f"{path}: sweep.split: {sweep['split']!r} is not eval, calib or all")
    strategies = grid.get("strategy", [])
    if not isinstance(strategies, list) or not strategies:
        raise FemtoccError(f"{path}: no [[strategy]]; a grid needs at least one")
    points = []
    for i, strategy in enumerate(strategies):
        where = f"{path}: strategy[{i}]"
        if "model" not in strategy:
            raise FemtoccError(f"{where}: needs a model")
        axes = []
        for key, value in strategy.items():
            if key not in STRATEGY_KEYS:
                raise FemtoccError(f"{where}.{key}: unknown key; known: {', '.join(STRATEGY_KEYS)}")
            values = value if isinstance(value, list) else [value]
            if not values:
                raise FemtoccError(f"{where}.{key}: an empty list")
            axes.append([(key, _typed(v, STRATEGY_KEYS[key], f"{where}.{key}")) for v in values])
        for combo in itertools.product(*axes):
            p = {"name": f"strategy {i}", "method": "obs" if "schedule" in strategy else "none", **dict(combo)}
            _check_point(p, where)
            p["id"] = point_id(p, sweep)
            points.append(p)
    seen = {}
    for p in points:
        if p["id"] in seen:
            raise FemtoccError(f"{path}: two strategies give the same point ({p['name']} and {seen[p['id']]}); "
                               "drop one")
        seen[p["id"]] = p["name"]
    return sweep, points


def point_id(point: dict, sweep: dict) -> str:
    """A digest of what decides a point's record (its settings but its strategy's name, and the sweep's)."""
    settings = {k: v for k, v in point.items() if k not in ("name", "id")}
    return hashlib.sha256(json.dumps([settings, sweep], sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- one point


def commands(point: dict, sweep: dict, work: Path) -> list[list[str]]:
    """The femtocc commands of a point, in order (prune unless method = none, compile, run)."""
    model, cmds = point["model"], []
    if point["method"] != "none":
        pruned = str(work / "model")
        cmd = ["prune", model, "--method", point["method"], "--calib", sweep["calib"],
               "--calib-limit", str(sweep["calib_limit"]), "-o", pruned, "--force", "--quiet"]
        for key in PRUNE_KEYS:
            if key != "method" and key in point:
                cmd += [f"--{key.replace('_', '-')}", str(point[key])]
        if "schedule" in point:
            cmd += ["--val-limit", "0"]
        cmds.append(cmd)
        model = pruned
    build = str(work / "build")
    cmd = ["compile", model, "--calib", sweep["calib"], "--calib-limit", str(sweep["calib_limit"]), "-o", build,
           "--force", "--quiet"]
    for key in COMPILE_KEYS:
        if key in point:
            cmd += [f"--{key.replace('_', '-')}", str(point[key])]
    cmds.append(cmd)
    run = ["run", build, "--runtime", sweep["runtime"], "--data", sweep["data"], "--split", sweep["split"],
           "--json", str(work / "run.json"), "--quiet"]
    if sweep["limit"]:
        run += ["--limit", str(sweep["limit"])]
    cmds.append(run)
    return cmds


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEMTOCC_SIM_THREADS": "1"}


def run_point(point: dict, sweep: dict, root: str) -> dict:
    """Run one point (its femtocc commands as processes, in ``root/points/ID``); returns its record,
    ``status`` "done" or "failed" (with the failing command and its error line). Never raises.

    The commands run one thread each, wherever the point runs: a calibration summed by more threads
    rounds differently, and an int4 build can decode other tokens from a one-LSB change of scale."""
    work = Path(root) / "points" / point["id"]
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ONE_THREAD)
    record = {"id": point["id"], "strategy": point["name"],
              "point": {k: v for k, v in point.items() if k not in ("id", "name")}}
    start = time.perf_counter()
    for cmd in commands(point, sweep, work):
        proc = subprocess.run([sys.executable, "-m", "femtocc", *cmd], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            return {**record, "status": "failed", "failed_command": f"femtocc {cmd[0]}",
                    "error": lines[-1] if lines else f"exit status {proc.returncode}",
                    "seconds": round(time.perf_counter() - start, 1)}
    try:
        record.update(measure(work, sweep))
    except (OSError, KeyError, ValueError) as e:
        return {**record, "status": "failed", "failed_command": "measure", "error": f"{type(e).__name__}: {e}"}
    return {**record, "status": "done", "seconds": round(time.perf_counter() - start, 1)}


def measure(work: Path, sweep: dict) -> dict:
    """A finished point's figures from its build report and run JSON (30-s programs for the bytes)."""
    report = json.loads((work / "build" / "report.json").read_text())
    run = json.loads((work / "run.json").read_text())
    r = run["report"]
    full = {g: t for g, t in report["totals"].items() if "@" not in g}
    layers = [x for x in report["layers"] if "@" not in x["graph"]]
    n = max(r["utterances"], 1)
    steps = sum(len(u["tokens"]) + 1 for u in run["utterances"]) / n  # decoder steps per utterance
    out = {
        "utterances": r["utterances"], "wer": r["wer"], "agreement_wer": r.get("agreement_wer"),
        "runaways": r["hit_token_limit"],
        "weight_bytes": sum(t["weight_bytes"] for t in full.values()),
        "sram_resident_bytes": sum(x["bytes"] for x in layers if x["placement"] == "sram"),
        "compile_s": report["stages_s"]["total"],
        "sparsity": (report.get("pruning") or {}).get("sparsity", 0.0),
    }
    if "simulator" in r:
        sim = r["simulator"]
        out.update(cycles_per_utterance=sim["latency_s_mean"] * _clock(run), energy_uj_per_utterance=sim["energy_uj_mean"],
                   external_bytes_per_utterance=sum(v["external_bytes"] for v in sim["cycles_by_op"].values()) / n,
                   real_time_factor=sim["real_time_factor"], costs_from="simulator")
    else:  # the cost model's linear layers: encoder and cross K/V once, the decoder step per token
        per_run = {g: t["predicted_cycles"] for g, t in full.items()}
        ext = {g: t.get("tile_external-bytes-per-run", 0) for g, t in full.items()}
        out.update(cycles_per_utterance=per_run["encoder"] + per_run["cross_kv"] + steps * per_run["decoder_step"],
                   energy_uj_per_utterance=None,
                   external_bytes_per_utterance=ext["encoder"] + ext["cross_kv"] + steps * ext["decoder_step"],
                   costs_from="cost model (linear layers)")
    return out


def _clock(run: dict) -> float:
    from femtocc.decode import build_target, read_build

    return build_target(read_build(run["build"])[0]).facts.clock_hz


# ----------------------------------------------------------------------------- the sweep


def read_records(out: Path) -> dict[str, dict]:
    """The last record of every point in ``out/points.jsonl`` (a torn last line is ignored)."""
    records = {}
    path = Path(out) / RECORDS
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            records[rec["id"]] = rec
    return records


def _append(out: Path, record: dict) -> None:
    path = Path(out) / RECORDS
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n")  # a torn last line stays apart
        f.flush()
        os.fsync(f.fileno())


def run_sweep(grid_path, out, workers: int = 1, ray_address: str | None = None, ray_cpus: float = 1,
              ray_memory_gb: float = 6, ray_gpus: float = 0, progress=None) -> dict:
    """Run every point of the grid not yet done in ``out``; returns a summary."""
    sweep, points = load_grid(grid_path)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FemtoccError(f"-o {out}: exists and is not a femtocc sweep folder (no {MANIFEST}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"format": "femtocc-sweep/1", "grid": str(grid_path), "sweep": sweep,
                                            "points": len(points)}, indent=1))
    done = {i for i, r in read_records(out).items() if r.get("status") == "done"}
    todo = [_absolute(p, ("train", "model")) for p in points if p["id"] not in done]
    sweep = _absolute(sweep, ("data", "calib"))  # the points may run elsewhere (a Ray worker's folder)
    start, results = time.perf_counter(), []

    def finished(record):
        _append(out, record)
        results.append(record)
        if progress:
            progress(record, len(results), len(todo))

    if ray_address is not None:
        _run_on_ray(todo, sweep, out, ray_address, ray_cpus, ray_memory_gb, ray_gpus, finished)
    elif workers <= 1:
        for p in todo:
            finished(run_point(p, sweep, str(out)))
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(workers) as pool:  # each point runs as processes; threads only wait
            for fut in as_completed([pool.submit(run_point, p, sweep, str(out)) for p in todo]):
                finished(fut.result())
    return {"points": len(points), "skipped": len(points) - len(todo), "ran": len(results),
            "failed": sum(r["status"] == "failed" for r in results), "seconds": round(time.perf_counter() - start, 1)}


def _absolute(settings: dict, keys) -> dict:
    """``settings`` with its folder paths made absolute (a hub id or packaged model name stays)."""
    out = dict(settings)
    for k in keys:
        if k in out and Path(out[k]).expanduser().exists():
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


def _run_on_ray(todo, sweep, out, address, cpus, memory_gb, gpus, finished) -> None:
    try:
        import ray
    except ImportError:
        raise FemtoccError("--ray needs Ray: pip install 'femtocc[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=max(int(cpus), os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, memory=int(memory_gb * 2**30))(run_point)
        pending = [task.remote(p, sweep, str(out.resolve())) for p in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finished(ray.get(ready[0]))
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- the front


def pareto(records: list[dict], axis: str) -> list[dict]:
    """The points no other point beats on both WER and ``axis`` (lower is better), by ``axis``."""
    pts = sorted((r for r in records if r.get(axis) is not None), key=lambda r: (r[axis], r["wer"]))
    front, best = [], float("inf")
    for r in pts:
        if r["wer"] < best:
            front.append(r)
            best = r["wer"]
    return front


def report(out) -> dict:
    """``out/pareto.json`` and ``out/pareto.png``: every done point and the front of WER against each
    cost axis (one series per strategy, the front highlighted)."""
    from femtocc.cache import atomic_write

    out = Path(out)
    records = [r for r in read_records(out).values() if r.get("status") == "done"]
    if not records:
        raise FemtoccError(f"{out}: no finished points in {RECORDS}; run femtocc sweep GRID -o {out} first")
    axes = [a for a in COST_AXES if any(r.get(a) is not None for r in records)]
    fronts = {a: [r["id"] for r in pareto(records, a)] for a in axes}
    result = {"points": len(records), "failed": sum(r.get("status") == "failed" for r in read_records(out).values()),
              "axes": axes, "fronts": fronts,
              "records": sorted(records, key=lambda r: (r["strategy"], r["id"]))}
    with atomic_write(out / "pareto.json", "w") as f:
        json.dump(result, f, indent=1)
    _plot(records, fronts, axes, out / "pareto.png")
    return result


def _plot(records, fronts, axes, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, plots = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 4.4), squeeze=False)
    strategies = sorted({r["strategy"] for r in records})
    by_id = {r["id"]: r for r in records}
    models = sorted({r["point"]["model"] for r in records})
    markers = dict(zip(models, "o^sDvP*X"))
    colors = dict(zip(strategies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, axis in zip(plots[0], axes):
        for s in strategies:
            for m in models:
                mine = [r for r in records if r["strategy"] == s and r["point"]["model"] == m and r.get(axis) is not None]
                if mine:
                    ax.scatter([r[axis] for r in mine], [r["wer"] for r in mine], color=colors[s], marker=markers[m],
                               alpha=0.75, label=f"{s}, {Path(m).name}")
        front = [by_id[i] for i in fronts[axis]]
        ax.step([r[axis] for r in front], [r["wer"] for r in front], where="post", color="k", lw=1.5, label="Pareto front")
        ax.set_ylim(0, min(max(r["wer"] for r in records), 3 * max(r["wer"] for r in front) + 10) * 1.05)
        ax.set_xscale("log")
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("WER %")
        ax.grid(alpha=0.3)
    plots[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
