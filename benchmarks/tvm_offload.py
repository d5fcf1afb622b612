"""Whole utterances through Apache TVM with spu001 offload: WER and agreement with onnxruntime.

    python benchmarks/tvm_offload.py [--data DIR] [--utterances 8] [--runtime reference|sim] [--out benchmarks/results/tvm_offload.json]

tiny.en's three exported graphs (encoder, cross K/V, decoder step) each go through
``from_onnx`` -> ``partition_for_spu001`` -> ``tvm.compile``; the harness's greedy decoding drives
the three VMs. Regions calibrate on their first calls (the first utterance), so this measures the
TVM path as a user gets it, on the first utterances of the evaluation split. Reports WER, the
agreement with onnxruntime's float transcripts, and the time per utterance.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import write_result


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.backends import make_backend
    from femtocc.decode import GraphBackend, score, transcribe
    from femtocc.frontend.onnx_export import export_whisper
    from femtocc.frontend.whisper import load_whisper
    from femtocc.targets.spu001.tvm import tvm_runner

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--runtime", choices=["reference", "sim"], default="reference")
    ap.add_argument("--out", default="benchmarks/results/tvm_offload.json")
    args = ap.parse_args()
    bundle = load_whisper("whisper-tiny.en")
    utts = split_by_speaker(load_dataset(args.data))[1][: args.utterances]
    dense = transcribe(bundle, make_backend(bundle, "onnxruntime"), utts)
    t = time.perf_counter()
    paths = export_whisper(bundle)
    runners = {w: tvm_runner(paths[w], args.runtime) for w in ("encoder", "cross_kv", "decoder_step")}
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    offloaded = transcribe(bundle, GraphBackend(f"tvm-spu001-{args.runtime}", runners, bundle.config), utts)
    decode_s = time.perf_counter() - t
    report = score(offloaded, {x.id: x.hypothesis for x in dense})
    result = {
        "utterances": len(utts), "runtime": args.runtime,
        "wer_onnxruntime": round(score(dense)["wer"], 3), "wer_tvm_spu001": round(report["wer"], 3),
        "agreement_wer": round(report["agreement_wer"], 3), "hit_token_limit": report["hit_token_limit"],
        "identical_transcripts": sum(a.hypothesis == b.hypothesis for a, b in zip(offloaded, dense)),
        "import_partition_compile_s": round(build_s, 2), "seconds_per_utterance": round(decode_s / len(utts), 2),
    }
    for k, v in result.items():
        print(f"{k:<28} {v}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
