"""Simulator against the independent analytical counter, per linear layer of compiled tiny.en.

    python benchmarks/sim_crosscheck.py --build BUILD [--data DIR] [--out benchmarks/results/sim_crosscheck.json]

``BUILD`` comes from ``femtocc compile ... --save-ir`` (its ``ir/*.fir`` are what the analytical
counter, ``targets/spu001/cost.py``, reads). The encoder and cross K/V run on one real utterance and
the decoder step on the prompt, in every context bucket of the build, zero-activation skipping off (the analytical counter assumes dense
activations); MACs, SRAM words and cycles must agree within 8 % on every layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import write_result

TOLERANCE = 0.08
KEYS = ("macs", "sram_read_words", "sram_write_words", "cycles")


def main() -> int:
    from femtocc.data import load_dataset
    from femtocc.frontend.whisper import load_whisper
    from femtocc.ir import load
    from femtocc.runtime.sim import SimRuntime
    from femtocc.targets.spu001 import load as load_target
    from femtocc.targets.spu001.cost import linear_layer_costs

    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--out", default="benchmarks/results/sim_crosscheck.json")
    args = ap.parse_args()
    build = Path(args.build)
    manifest = json.loads((build / "build.json").read_text())
    target = load_target()
    bundle = load_whisper(manifest["model"])
    from femtocc.decode import cut_features
    from femtocc.frontend.onnx_export import WINDOW_S, bucket_frames, bucket_name, split_name

    utt = load_dataset(args.data)[0]
    prompt = list(bundle.decode.prompt)
    cfg = bundle.config
    empty = np.zeros((1, cfg.decoder_attention_heads, 0, cfg.d_model // cfg.decoder_attention_heads), np.float32)
    measured = {}
    for b in manifest.get("buckets", [WINDOW_S]):  # every context bucket's programs
        sink: list = []
        run = {w: SimRuntime((build / manifest["programs"][bucket_name(w, b)]).read_bytes(), target, bucket_name(w, b),
                             {"skip_zero_activations": 0}).runner(sink)
               for w in ("encoder", "cross_kv", "decoder_step")}
        feats = cut_features(bundle.features(utt.audio()), bucket_frames(cfg, b))
        enc = run["encoder"]({"input_features": feats})["encoder_hidden_states"]
        cross = run["cross_kv"]({"encoder_hidden_states": enc})
        run["decoder_step"]({"input_ids": np.array([prompt], np.int64), **cross,
                             **{f"past_{t}.{i}": empty for i in range(cfg.decoder_layers) for t in "kv"}})
        measured.update({(stats.graph, const): row for stats in sink
                         for (op, _, const, _), row in zip(stats.instructions, stats.rows) if op == "qdense"})

    predicted = {}
    for w in manifest["programs"]:
        tokens = len(prompt) if split_name(w)[0] == "decoder_step" else 1
        predicted.update({(w, k): v for k, v in linear_layer_costs(load(build / "ir" / f"{w}.fir"), target, tokens=tokens).items()})
    rows, worst = [], {k: 0.0 for k in KEYS}
    for (graph, name), p in predicted.items():
        s = measured[graph, name]
        row = {"graph": graph, "layer": name.removesuffix(".q")}
        for k in KEYS:
            dev = abs(s[k] - p[k]) / max(p[k], 1)
            row[k] = {"simulated": s[k], "analytical": p[k], "deviation": dev}
            worst[k] = max(worst[k], dev)
        rows.append(row)
    ok = all(v <= TOLERANCE for v in worst.values())
    print(f"{len(rows)} linear layers; largest deviation: " + ", ".join(f"{k} {v:.2%}" for k, v in worst.items())
          + f" -> {'within' if ok else 'OUTSIDE'} {TOLERANCE:.0%}")
    write_result(args.out, {"build": str(build), "tolerance": TOLERANCE, "worst_deviation": worst, "within_tolerance": ok,
                            "layers": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
