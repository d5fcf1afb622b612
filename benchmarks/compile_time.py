"""Time of ``femtocc compile whisper-tiny.en`` end to end, split per stage.

    python benchmarks/compile_time.py [--calib DIR] [--calib-limit 32] [--out benchmarks/results/compile_time.json]

OBS 50 % pencil8 + W8A16 with 32 calibration utterances (calibration, OBS pruning, ranges,
quantization, layout, tiling, codegen). The first compile of a fresh cache also converts the model,
exports ONNX and decodes the dense transcripts once; both a cold-cache and a warm run are timed when
``--cold`` is given (the cold one in a temporary cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import write_result


def main() -> int:
    from femtocc.compile import CompileOptions, compile_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", default="../shared/data/speech/dev")
    ap.add_argument("--calib-limit", type=int, default=32)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = ap.parse_args()
    runs = {}
    if args.cold:
        os.environ["FEMTOCC_CACHE"] = tempfile.mkdtemp(prefix="femtocc-cold-")
    for label in (["cold", "warm"] if args.cold else ["warm"]):
        out = Path(tempfile.mkdtemp()) / "build"
        report = compile_model(CompileOptions(model="whisper-tiny.en", output=out, method="obs", sparsity=0.5,
                                              pattern="pencil8", calib=args.calib, calib_limit=args.calib_limit,
                                              progress=False, log=sys.stderr))
        runs[label] = report["stages_s"]
        print(f"{label}: {report['stages_s']['total']:.1f} s  " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages_s"].items() if k != "total"))
    write_result(args.out, {"model": "whisper-tiny.en", "config": "obs 0.5 pencil8, w8a16", "calibration_utterances": args.calib_limit,
                            "stages_s": runs, "target_s": 60})
    return 0


if __name__ == "__main__":
    sys.exit(main())
