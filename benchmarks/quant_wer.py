"""WER of integer-quantized tiny.en (dense layers W8A16 by default) against float, on the IR backend.

    python benchmarks/quant_wer.py [--data DIR] [--weight-bits 8] [--act-bits 16] [--out benchmarks/results/quant_wer.json]

Static activation ranges come from the speaker-disjoint calibration part; both float and
quantized graphs run in femtocc's IR interpreter on the evaluation part, in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import write_result


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.decode import make_backend, score, transcribe
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes import DEFAULT_PIPELINE, PassManager
    from femtocc.passes.calibrate import collect_ranges

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--weight-bits", type=int, default=8)
    ap.add_argument("--act-bits", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/quant_wer.json")
    args = ap.parse_args()

    bundle = load_whisper(args.model)
    calib, evaluation = split_by_speaker(load_dataset(args.data))
    evaluation = evaluation[: args.limit] if args.limit else evaluation
    ranges = collect_ranges(bundle, calib)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranges.json"
        path.write_text(json.dumps(ranges))
        quant = f"quantize{{ranges={path},weight-bits={args.weight_bits},act-bits={args.act_bits}}}"
        for label, pipeline in (("float", DEFAULT_PIPELINE), (f"w{args.weight_bits}a{args.act_bits}", f"{DEFAULT_PIPELINE},{quant}")):
            manager = PassManager.parse(pipeline)
            backend = make_backend(bundle, "ir", manager=manager)
            report = score(transcribe(bundle, backend, evaluation))
            quantized = sum(r.stats.get("quantized", 0) for r in manager.records)
            rows[label] = {"wer": report["wer"], "hit_token_limit": report["hit_token_limit"], "dense_layers_quantized": quantized}
            print(f"{label:<8} WER {report['wer']:.2f}  runaways {report['hit_token_limit']}  quantized layers {quantized}", flush=True)
    delta = rows[f"w{args.weight_bits}a{args.act_bits}"]["wer"] - rows["float"]["wer"]
    print(f"quantized - float: {delta:+.2f} WER")
    write_result(args.out, {
        "model": args.model,
        "scope": "dense (linear) layers integer; convolutions, layer norm, softmax, GELU and the output projection float",
        "calibration_utterances": len(calib),
        "evaluation_utterances": len(evaluation),
        "results": rows,
        "wer_delta": delta,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
