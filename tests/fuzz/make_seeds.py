"""Seed corpus and config for the libFuzzer harness tests/fuzz/spu_fuzz.c.

Writes into OUT: ``config.txt`` (the simulator's hardware parameters from the target description,
one "key value" per line, as femtocc.runtime.sim.sim_config gives them to the extension) and
``seeds/*.spu-body``: real programs, each without its CRC-32 trailer (the harness appends it):

* the quantized, pencil8-pruned block with self-attention of tests/test_program.py;
* the three programs (encoder, cross K/V, decoder step) of a miniature Whisper with random
  weights (1 layer each side, d_model 16, 8 mel bins, 4 frames, 64 tokens), exported to ONNX and
  compiled by the same passes as ``femtocc compile``: every op the real programs use;

each at W8A16 and W4A8.

    python tests/fuzz/make_seeds.py OUT [--target FILE.toml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUANTS = ((8, 16), (4, 8))


def mini_whisper_graphs() -> dict:
    """The float IR of a miniature random Whisper's three graphs, with feeds for calibration."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from femtocc.frontend.onnx_export import GRAPH_NAMES, export_graph
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.frontend.whisper import _quiet_transformers
    from femtocc.passes import PassManager, pipeline

    _quiet_transformers()
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=16,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           max_source_positions=4, max_target_positions=8, decoder_start_token_id=1, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    model = WhisperForConditionalGeneration(config).eval()
    bundle = type("MiniBundle", (), {"model": model, "config": config})()
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {"encoder": {"input_features": f32(1, 8, 8)}, "cross_kv": {"encoder_hidden_states": f32(1, 4, 16)},
             "decoder_step": {"input_ids": np.array([[1, 3, 5]]), "past_k.0": f32(1, 2, 2, 8), "past_v.0": f32(1, 2, 2, 8),
                              "cross_k.0": f32(1, 2, 8, 4), "cross_v.0": f32(1, 2, 4, 8)}}  # K transposed
    return {w: (PassManager.parse(pipeline("lowered")).run(import_onnx(export_graph(bundle, w), w)), feeds[w])
            for w in GRAPH_NAMES}


def _lower(graph, feeds, wbits: int, abits: int, tokens: int):
    from femtocc.passes import PassManager, pipeline
    from femtocc.passes.calibrate import RangeRecorder, attach_ranges

    recorder = RangeRecorder()
    recorder.runner(graph)(feeds)
    attach_ranges({graph.name: graph}, recorder.ranges)
    PassManager.parse(pipeline("spu001", weight_bits=wbits, act_bits=abits, tokens=tokens)).run(graph)
    return graph


def write_seeds(out: Path, target_file: str | None = None) -> list[Path]:
    """Write OUT/config.txt and OUT/seeds/*.spu-body; returns the seed files."""
    import copy

    sys.path.insert(0, str(HERE.parent))
    from test_program import block

    from femtocc.runtime.sim import sim_config
    from femtocc.targets.spu001 import load
    from femtocc.targets.spu001.codegen import generate

    target = load(target_file) if target_file else load()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.txt").write_text("".join(f"{k} {float(v)!r}\n" for k, v in sim_config(target).items()))
    seeds = out / "seeds"
    seeds.mkdir(exist_ok=True)
    programs = {}
    mini = mini_whisper_graphs()
    for wbits, abits in QUANTS:
        with tempfile.TemporaryDirectory() as tmp:
            programs[f"block-w{wbits}a{abits}"] = block(Path(tmp), weight_bits=wbits, act_bits=abits)[0]
        for w, (graph, feeds) in mini.items():
            programs[f"mini-{w}-w{wbits}a{abits}"] = _lower(copy.deepcopy(graph), feeds, wbits, abits, 3)
    written = []
    for name, graph in programs.items():
        path = seeds / f"{name}.spu-body"
        path.write_bytes(generate(graph, target).to_bytes()[:-4])
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--target", default=None, help="target description TOML (default spu001)")
    args = ap.parse_args()
    for p in write_seeds(Path(args.out), args.target):
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
