"""Time femtocc's IR interpreter against onnxruntime on real tiny.en graphs; print ratios, write JSON.

    python benchmarks/interpreter_vs_ort.py [--data DIR] [--repeats N] [--out benchmarks/results/interpreter_vs_ort.json]

Both run the same exported graphs on the same real utterance in one process, one after the other,
so the ratio is what this machine measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


from common import write_result


def main() -> int:
    from femtocc.data import load_dataset
    from femtocc.decode import ort_runner
    from femtocc.frontend.onnx_export import export_whisper, load_onnx
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.frontend.whisper import load_whisper
    from femtocc.ir import Interpreter
    from femtocc.passes import DEFAULT_PIPELINE, PassManager

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/interpreter_vs_ort.json")
    args = ap.parse_args()

    bundle = load_whisper("whisper-tiny.en")
    paths = export_whisper(bundle)
    utt = load_dataset(args.data)[10]
    feats = bundle.features(utt.audio())
    ort = {w: ort_runner(p) for w, p in paths.items()}
    ir = {w: Interpreter(PassManager.parse(DEFAULT_PIPELINE).run(import_onnx(load_onnx(p), w))).run for w, p in paths.items()}
    enc = ort["encoder"]({"input_features": feats})["encoder_hidden_states"]
    cross = ort["cross_kv"]({"encoder_hidden_states": enc})
    cfg = bundle.config
    h, dh, cached = cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads, 20
    rng = np.random.default_rng(0)
    past = {f"past_{t}.{i}": rng.standard_normal((1, h, cached, dh)).astype(np.float32)
            for i in range(cfg.decoder_layers) for t in "kv"}
    step_feeds = {"input_ids": np.array([[262]], np.int64), **past, **cross}
    cases = {
        "encoder": {"input_features": feats},
        "cross_kv": {"encoder_hidden_states": enc},
        f"decoder_step(T=1,P={cached})": step_feeds,
    }
    rows = {}
    for name, feeds in cases.items():
        graph = name.split("(")[0]
        t_ort = best_of(lambda: ort[graph](feeds), args.repeats)
        t_ir = best_of(lambda: ir[graph](feeds), args.repeats)
        rows[name] = {"onnxruntime_s": t_ort, "ir_interpreter_s": t_ir, "ir_over_ort": t_ir / t_ort}
        print(f"{name:<24} onnxruntime {t_ort * 1000:8.2f} ms   IR interpreter {t_ir * 1000:8.2f} ms   ratio {t_ir / t_ort:6.2f}x")
    result = {
        "model": "whisper-tiny.en",
        "utterance": utt.id,
        "repeats": args.repeats,
        "timing": "best of repeats, one process, same inputs",
        "results": rows,
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
