"""Encoder context that follows the audio (issue 18, section 1), measured before it is built: WER of
tiny.en when each evaluation utterance is encoded in the smallest context bucket that holds it
(the mel features cut to the bucket, the positional embedding sliced; no retraining: "the cut
model as is"), and the encoder cycles each bucket set would save.

    python benchmarks/encoder_buckets.py --sim-json RUN.json [--sets 30 10,30 ...] [--out benchmarks/results/encoder_buckets.json]

Cycles: the encoder's attention matmuls scale with the square of the frames, everything else in
the encoder and the cross K/V with the frames. Both parts per 30-s window, and the decoder's cycles
per utterance, come from a simulator run of a build (``RUN.json`` from ``femtocc run BUILD --runtime
sim --json RUN.json``), so a window in a bucket of ``b`` seconds is predicted to cost
``linear * b/30 + attention * (b/30)**2`` encoder cycles; the simulated real-time factor of a bucket
set follows (an estimate until the buckets are compiled).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import write_result

SETS = ["30", "10,30", "5,10,20,30", "5,10,15,20,30"]


def main() -> int:
    import torch

    from femtocc.data import SAMPLE_RATE, load_dataset, split_by_speaker
    from femtocc.decode import SILENCE_PEAK, TorchBackend, greedy_decode, token_limit, windows
    from femtocc.frontend.whisper import encode, load_whisper
    from femtocc.wer import corpus_wer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--sets", nargs="+", default=SETS, help="bucket sets in seconds, e.g. 10,30")
    ap.add_argument("--sim-json", required=True, help="femtocc run BUILD --runtime sim --json RUN.json of a build")
    ap.add_argument("--out", default="benchmarks/results/encoder_buckets.json")
    args = ap.parse_args()
    import json
    import math

    from femtocc.targets.spu001.description import load_target

    run = json.loads(open(args.sim_json).read())
    by_op, utts = run["report"]["simulator"]["cycles_by_op"], run["report"]["simulator"]["utterances"]
    windows_simulated = sum(max(1, math.ceil(u["duration_s"] / 30)) for u in run["utterances"])
    attention = by_op["encoder/qmatmul"]["cycles"] / windows_simulated
    linear = sum(v["cycles"] for k, v in by_op.items() if k.startswith(("encoder/", "cross_kv/"))) / windows_simulated - attention
    decoder = sum(v["cycles"] for k, v in by_op.items() if k.startswith("decoder_step/")) / utts
    clock = load_target(run.get("target_file") or "").facts.clock_hz
    bundle = load_whisper(args.model)
    backend = TorchBackend(bundle)
    evaluation = split_by_speaker(load_dataset(args.data))[1]
    durations = {u.id: len(u.audio()) / SAMPLE_RATE for u in evaluation}
    rows = []
    for spec in args.sets:
        buckets = sorted(float(b) for b in spec.split(","))
        if buckets[-1] != 30:
            raise SystemExit(f"bucket set {spec}: the largest bucket must be 30 s (Whisper's window)")
        start, refs, hyps, used = time.perf_counter(), [], [], []
        runaways = 0
        for u in evaluation:
            audio = u.audio()
            texts = []
            for a, b in windows(audio):
                if b <= a or float(np.max(np.abs(audio[a:b]))) < SILENCE_PEAK:  # silence is not decoded
                    continue
                seconds = (b - a) / SAMPLE_RATE
                bucket = next(x for x in buckets if x >= seconds)
                used.append(bucket)
                f = torch.from_numpy(bundle.features(audio[a:b]))
                with torch.no_grad():
                    enc = encode(bundle.model.model.encoder, f, int(bucket * 50))
                part, hit = greedy_decode(backend.session(enc), bundle.decode, token_limit(seconds, bundle.decode))
                texts.append(bundle.text(part).strip())
                runaways += hit
            refs.append(u.text)
            hyps.append(" ".join(t for t in texts if t))
        score = corpus_wer(refs, hyps)
        mean_b = float(np.mean(used))
        cycles = sum(linear * b / 30 + attention * (b / 30) ** 2 for b in used) + decoder * len(evaluation)
        rtf = cycles / clock / sum(durations.values())
        row = {"buckets": buckets, "wer": score["wer"], "runaways": runaways, "mean_bucket_s": mean_b,
               "predicted_latency_s": cycles / clock / len(evaluation), "predicted_real_time_factor": rtf,
               "windows": len(used), "seconds": round(time.perf_counter() - start, 1),
               "bucket_counts": {str(b): used.count(b) for b in buckets}}
        rows.append(row)
        print(f"buckets {spec:>16} s: WER {score['wer']:.2f} ({runaways} runaways), mean bucket {mean_b:.1f} s "
              f"(audio {np.mean(list(durations.values())):.1f} s), predicted RTF {rtf:.3f}", flush=True)
    write_result(args.out, {"model": args.model, "utterances": len(evaluation), "sim_json": args.sim_json,
                            "cycles_per_30s_window": {"attention": attention, "linear": linear},
                            "decoder_cycles_per_utterance": decoder,
                            "mean_audio_s": float(np.mean(list(durations.values()))), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
