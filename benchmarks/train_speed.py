"""Seconds per training window of the recovery trainer on this machine, and what changes them.

    python benchmarks/train_speed.py [--train ../shared/data/speech/train] [--steps 6] [--out benchmarks/results/train_speed.json]

Times :func:`femtocc.passes.recover.distil` itself (features, teacher targets from the cache,
forward, backward, AdamW, masks: a whole step) on tiny.en over packed windows of real training
speech, ``--steps`` steps after one warm-up step, for: torch threads 2 and 1, a batch of 2 windows,
bf16 autocast, AdamW's fused kernel against its foreach one, the student's input augmented
(``--augment``), the token table frozen (``--freeze embed_tokens``), ``torch.compile``, and the
per-block matching loss (the teacher runs beside the student). Each variant is reported as seconds
per window and as seconds of speech learned from per second of training, with its ratio to the
plain fp32 batch-1 loop.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import write_result

VARIANTS = {  # name: (torch threads, config changes); AdamW is fused unless a variant says otherwise
    "fp32, 2 threads": (2, {}),
    "fp32, 1 thread": (1, {}),
    "batch 2": (2, {"batch": 2}),
    "bf16 autocast": (2, {"precision": "bf16"}),
    "bf16, foreach AdamW": (2, {"precision": "bf16", "fused": False}),
    "bf16, augmented": (2, {"precision": "bf16", "augment": "gain=6,snr=20:40,freq=2x15,time=4x50"}),
    "bf16, token table frozen": (2, {"precision": "bf16", "freeze": "embed_tokens"}),
    "bf16, batch 2": (2, {"precision": "bf16", "batch": 2}),
    "bf16, block matching": (2, {"precision": "bf16", "block_weight": 1.0}),
    "torch.compile": (2, {"compile": True}),
    "block matching": (2, {"block_weight": 1.0}),
}


def main() -> int:
    import torch

    from femtocc.data import load_dataset
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.recover import RecoverConfig, distil
    from femtocc.train_data import Augment, pack, teacher_targets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="../shared/data/speech/train")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", default=None, help="variant names separated by ;")
    ap.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = ap.parse_args()
    teacher = load_whisper("whisper-tiny.en")
    windows = pack(load_dataset(args.train)[:60], seed=0)
    speech = sum(w.speech_s for w in windows) / len(windows)
    base = RecoverConfig([0.0], steps=args.steps, lr=1e-5, warmup=1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = teacher_targets(teacher, windows, k=16, hidden=True, folder=Path(tmp) / "targets")
        for name, (threads, changes) in VARIANTS.items():
            if args.only and name not in args.only.split(";"):
                continue
            torch.set_num_threads(threads)
            cfg = replace(base, **{key: Augment.parse(value) if key == "augment" else value
                                   for key, value in changes.items()})
            student = copy.copy(teacher)
            student.model = copy.deepcopy(teacher.model)
            start = time.perf_counter()
            distil(student, teacher, windows, targets, 1, cfg, 0)
            first = time.perf_counter() - start
            start = time.perf_counter()
            distil(student, teacher, windows, targets, args.steps, cfg, 1)
            per_window = (time.perf_counter() - start) / (args.steps * cfg.batch)
            rows[name] = {"threads": threads, **changes, "first_step_s": round(first, 2),
                          "s_per_window": round(per_window, 3), "speech_s_per_training_s": round(speech / per_window, 2)}
            print(f"{name:<18} {per_window:6.3f} s per window ({speech / per_window:5.1f} s of speech per second), "
                  f"first step {first:.1f} s", flush=True)
    torch.set_num_threads(2)
    ref = rows.get("fp32, 2 threads", {}).get("s_per_window")
    for row in rows.values():
        row["speedup"] = round(ref / row["s_per_window"], 3) if ref else None
    write_result(args.out, {"data": str(args.train), "windows": len(windows), "speech_s_per_window": round(speech, 2),
                            "steps": args.steps, "model": "whisper-tiny.en", "variants": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
