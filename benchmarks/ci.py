"""The fast benchmark suite CI runs after the tests, compared with the committed baseline.

    python benchmarks/ci.py [--data DIR] [--baseline benchmarks/baseline.json] [--out benchmarks/results/ci.json] [--update-baseline]

Measures, in one run (a few minutes here): compile time of tiny.en W8A16 and its stages, program
bytes, WER and agreement of the compiled programs on a fixed subset of the evaluation speakers (on
the simulator, which is bit-exact with the reference runtime), simulated cycles and energy per
utterance, and the simulator's speed. Times are kept as ratios to onnxruntime's dense float encoder
time (one thread) measured in the same run. Prints a table of changes against the baseline and exits 1 when a
metric regresses beyond its threshold: WER, bytes, cycles and energy are deterministic and held
tight; time ratios get a loose bound (machines differ). The full suite (sweeps, both models,
dev-set runs) is the separate set of scripts listed in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

SUBSET = 6  # first utterances of the evaluation split
CALIB = 4
# metric -> (direction, allowed relative change): "lower" means an increase beyond it is a regression
# WER in absolute points (one word of the subset is ~1.6); the rest relative. Bytes are exact; cycles
# and energy depend on which activations are zero, so another machine's float rounding in
# calibration may move them a little.
THRESHOLDS = {
    "wer": ("points", 2.0),
    "agreement_wer": ("points", 2.0),
    "program_bytes": ("lower", 0.0),
    "cycles_per_utterance": ("lower", 0.01),
    "energy_uj_per_utterance": ("lower", 0.01),
    "compile_over_ort_encoder": ("lower", 2.0),
    "sim_encoder_over_ort_encoder": ("lower", 2.0),
}


def measure(data: str) -> dict:
    from femtocc.compile import CompileOptions, compile_model
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.backends import make_backend
    from femtocc.decode import GraphBackend, build_runners, build_target, score, transcribe
    from femtocc.frontend.whisper import load_whisper
    from femtocc.runtime.report import utterance_stats

    from femtocc.passes.calibrate import dense_transcripts

    bundle = load_whisper("whisper-tiny.en")
    calibration, evaluation = split_by_speaker(load_dataset(data))
    subset = evaluation[:SUBSET]
    dense_transcripts(bundle, calibration[:CALIB])  # cached before the compile is timed
    features = bundle.features(subset[0].audio())
    import onnxruntime

    from femtocc.frontend.onnx_export import export_whisper

    # the time reference: onnxruntime on one thread, like the simulator, so the ratios do not
    # depend on how many cores the machine has
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    ort = onnxruntime.InferenceSession(str(export_whisper(bundle)["encoder"]), opts, providers=["CPUExecutionProvider"])
    ort.run(None, {"input_features": features})
    start = time.perf_counter()
    ort.run(None, {"input_features": features})
    ort_encoder_s = time.perf_counter() - start

    build = Path(tempfile.mkdtemp()) / "build"
    report = compile_model(CompileOptions(model="whisper-tiny.en", output=build, calib=data, calib_limit=CALIB, progress=False))
    sink: list = []
    runners, manifest = build_runners(build, "sim", sink)
    clock_hz = build_target(manifest).facts.clock_hz
    start = time.perf_counter()
    runners["encoder"]({"input_features": features})
    sim_encoder_s = time.perf_counter() - start
    sink.clear()
    dense = {t.id: t.hypothesis for t in transcribe(bundle, make_backend(bundle, "torch"), subset)}
    backend = GraphBackend("sim", runners, bundle.config)
    transcripts, per_utt = [], []
    for u in subset:
        mark = len(sink)
        transcripts += transcribe(bundle, backend, [u])
        per_utt.append(utterance_stats(sink[mark:], transcripts[-1], clock_hz))
    wer = score(transcripts, dense)
    return {
        "wer": wer["wer"], "agreement_wer": wer["agreement_wer"],
        "program_bytes": sum(t["program_bytes"] for t in report["totals"].values()),
        "cycles_per_utterance": sum(sum(u["sim_cycles"].values()) for u in per_utt) / len(per_utt),
        "energy_uj_per_utterance": sum(u["sim_energy_uj"] for u in per_utt) / len(per_utt),
        "compile_over_ort_encoder": report["stages_s"]["total"] / ort_encoder_s,
        "sim_encoder_over_ort_encoder": sim_encoder_s / ort_encoder_s,
        "_seconds": {"compile": report["stages_s"], "ort_encoder": ort_encoder_s, "sim_encoder": sim_encoder_s},
    }


def compare(now: dict, base: dict) -> list[tuple[str, float, float, float, bool]]:
    rows = []
    for key, (direction, allowed) in THRESHOLDS.items():
        old, new = base.get(key), now[key]
        if old is None:
            rows.append((key, float("nan"), new, float("nan"), False))
            continue
        if direction == "points":
            change = new - old
            regressed = change > allowed
        else:
            change = (new - old) / abs(old) if old else (0.0 if new == old else float("inf"))
            regressed = change > allowed
        rows.append((key, old, new, change, regressed))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--baseline", default=str(Path(__file__).with_name("baseline.json")))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ci.json"))
    ap.add_argument("--update-baseline", action="store_true")
    args = ap.parse_args()
    if not (Path(args.data) / "transcripts.tsv").is_file():
        print(f"benchmark suite skipped: no speech at {args.data}")
        return 0
    start = time.perf_counter()
    now = measure(args.data)
    metrics = {k: v for k, v in now.items() if not k.startswith("_")}
    baseline_path = Path(args.baseline)
    if args.update_baseline or not baseline_path.is_file():
        baseline_path.write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"wrote baseline {baseline_path}")
    base = json.loads(baseline_path.read_text())
    rows = compare(metrics, base)
    print(f"{'metric':<30}{'baseline':>14}{'now':>14}{'change':>10}  verdict")
    for key, old, new, change, bad in rows:
        shown = f"{change:>+10.2f}" if THRESHOLDS[key][0] == "points" else f"{change:>+10.2%}"
        print(f"{key:<30}{old:>14.4g}{new:>14.4g}{shown}  {'REGRESSED' if bad else 'ok'}")
    failed = [r[0] for r in rows if r[4]]
    write_result(args.out, {"metrics": metrics, "seconds": now["_seconds"], "baseline": base,
                            "regressed": failed, "wall_s": time.perf_counter() - start})
    print(f"benchmark suite: {len(rows) - len(failed)}/{len(rows)} ok in {time.perf_counter() - start:.0f} s"
          + (f"; regressed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
