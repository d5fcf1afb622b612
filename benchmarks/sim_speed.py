"""Simulator speed and the sparse speedup it measures, in one run.

    python benchmarks/sim_speed.py --dense BUILD --sparse BUILD80 [--data DIR] [--out benchmarks/results/sim_speed.json]

``--dense``: a W8A16 build of tiny.en (``femtocc compile whisper-tiny.en -o BUILD``);
``--sparse``: the same with 80 % pencil8 (``--method mp-local --sparsity 0.8 --pattern pencil8``;
magnitude pruning is enough to count cycles). On the utterance of the dev set closest to 10 s:

* wall time of the simulator for the encoder plus the full greedy decode (cross K/V and every
  decoder step), simulated MACs per wall second, and onnxruntime's dense float time on the same
  audio (same process, one after the other) as a ratio;
* simulated cycles of all linear (qdense) layers, 80 % pencil8 against dense int8, with zero
  activations not skipped in either (the weight sparsity alone), and with skipping as configured.
"""

from __future__ import annotations

import argparse
import sys
import time


from common import write_result


def decode_with(runners, bundle, features, duration):
    from femtocc.decode import GraphBackend, greedy_decode, token_limit

    backend = GraphBackend("b", runners, bundle.config)
    start = time.perf_counter()
    tokens, _ = greedy_decode(backend.start(features), bundle.decode, token_limit(duration, bundle.decode))
    return tokens, time.perf_counter() - start


def sim_runners(build, config_changes=None):
    import json
    from pathlib import Path

    from femtocc.runtime.sim import SimRuntime
    from femtocc.targets.spu001 import load

    manifest = json.loads((Path(build) / "build.json").read_text())
    sink: list = []
    runners = {w: SimRuntime((Path(build) / name).read_bytes(), load(), w, config_changes).runner(sink)
               for w, name in manifest["programs"].items()}
    return runners, sink


def linear_cycles(sink) -> float:
    return sum(r["cycles"] for s in sink for (op, *_), r in zip(s.instructions, s.rows) if op == "qdense")


def main() -> int:
    from femtocc.data import SAMPLE_RATE, load_dataset
    from femtocc.backends import make_backend
    from femtocc.frontend.whisper import load_whisper

    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", required=True)
    ap.add_argument("--sparse", required=True)
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--out", default="benchmarks/results/sim_speed.json")
    args = ap.parse_args()
    bundle = load_whisper("whisper-tiny.en")
    utts = load_dataset(args.data)
    import soundfile

    utt = min(utts, key=lambda u: (abs(soundfile.info(str(u.audio_path)).duration - 10.0), u.id))
    audio = utt.audio()
    duration = len(audio) / SAMPLE_RATE
    features = bundle.features(audio)

    ort = make_backend(bundle, "onnxruntime")
    decode_with(ort.runners, bundle, features, duration)  # warm up
    ort_tokens, ort_s = decode_with(ort.runners, bundle, features, duration)

    runners, sink = sim_runners(args.dense)
    tokens, sim_s = decode_with(runners, bundle, features, duration)
    macs = sum(s.total("macs") for s in sink)
    cycles = sum(s.total("cycles") for s in sink)
    print(f"utterance {utt.id} ({duration:.1f} s, {len(tokens)} tokens): simulator {sim_s:.2f} s wall for encoder + "
          f"{sum(1 for s in sink if s.graph == 'decoder_step')} decoder steps; {macs / sim_s / 1e9:.2f} G simulated MACs per "
          f"second; onnxruntime dense float {ort_s:.2f} s -> simulator / onnxruntime {sim_s / ort_s:.1f}x")
    from femtocc.targets.spu001 import load

    clock_hz = load().facts.clock_hz
    print(f"simulated latency {cycles / clock_hz:.2f} s at {clock_hz / 1e6:.0f} MHz, same tokens as onnxruntime: {tokens == ort_tokens}")

    ratios = {}
    for label, changes in (("weights only", {"skip_zero_activations": 0}), ("with zero-activation skipping", None)):
        dense_runners, dense_sink = sim_runners(args.dense, changes)
        sparse_runners, sparse_sink = sim_runners(args.sparse, changes)
        dense_runners["encoder"]({"input_features": features})
        sparse_runners["encoder"]({"input_features": features})
        d, s = linear_cycles(dense_sink), linear_cycles(sparse_sink)
        ratios[label] = {"dense_int8_cycles": d, "pencil8_80_cycles": s, "ratio": d / s}
        print(f"encoder linear layers, {label}: dense int8 {d / 1e6:.1f} Mcycles, 80 % pencil8 {s / 1e6:.1f} Mcycles -> {d / s:.2f}x fewer")
    write_result(args.out, {
        "utterance": utt.id, "duration_s": duration, "tokens": len(tokens),
        "simulator_wall_s": sim_s, "onnxruntime_wall_s": ort_s, "simulator_over_onnxruntime": sim_s / ort_s,
        "simulated_macs": macs, "simulated_macs_per_wall_s": macs / sim_s, "simulated_cycles": cycles,
        "same_tokens_as_onnxruntime": tokens == ort_tokens, "sparse_speedup": ratios,
        "targets": {"wall_s_max": 10.0, "sparse_ratio_min": 3.0},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
