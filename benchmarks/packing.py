"""How much more speech a training step sees when utterances are packed into 30-s windows.

    python benchmarks/packing.py [--train ../shared/data/speech/train] [--windows 4] [--out benchmarks/results/packing.json]

Over the whole training folder: windows, speech seconds per window and the speech share of the
encoder's 30 s, packed (femtocc.train_data.pack, seed 0, 0.4-s gaps) against one utterance per
window. Then, on the first ``--windows`` windows of each kind, the seconds of one training step
of tiny.en (forward and backward of encoder and decoder, teacher-forced on the teacher's
transcript of the window, batch 1, this machine's threads) and so the seconds of speech learned
from per second of training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import write_result


def step_seconds(bundle, windows, targets) -> list[float]:
    import torch
    import torch.nn.functional as F

    from femtocc.train_data import load_targets

    model = bundle.model
    model.train()
    times = []
    for w in windows:
        tokens = list(load_targets(targets, w)["tokens"])
        seq = list(bundle.decode.prompt) + tokens + [bundle.decode.eot]
        feats = bundle.features(w.audio())
        start = time.perf_counter()
        logits = model(input_features=torch.from_numpy(feats), decoder_input_ids=torch.tensor([seq[:-1]])).logits
        loss = F.cross_entropy(logits[0], torch.tensor(seq[1:]))
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    model.eval()
    return times


def main() -> int:
    from femtocc.data import load_dataset
    from femtocc.frontend.whisper import load_whisper
    from femtocc.train_data import pack, packing_stats, teacher_targets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="../shared/data/speech/train")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    args = ap.parse_args()
    utts = load_dataset(args.train)
    kinds = {"packed": pack(utts, seed=0), "one_per_window": pack(utts, seed=0, per_window=1)}
    result = {"data": str(args.train), "utterances": len(utts), "audio_s": round(sum(w.speech_s for w in kinds["packed"]), 1)}
    bundle = load_whisper("whisper-tiny.en")
    with tempfile.TemporaryDirectory() as tmp:
        for name, windows in kinds.items():
            stats = packing_stats(windows)
            sample = windows[: args.windows]
            targets = teacher_targets(bundle, sample, k=8, folder=Path(tmp) / name)
            times = step_seconds(bundle, sample[:1], targets) and step_seconds(bundle, sample, targets)  # warm-up first
            stats["step_s"] = round(sum(times) / len(times), 3)
            stats["sample_speech_s_per_window"] = round(sum(w.speech_s for w in sample) / len(sample), 3)
            stats["speech_s_per_training_s"] = round(stats["sample_speech_s_per_window"] / stats["step_s"], 3)
            result[name] = stats
            print(f"{name:<16} {stats['windows']:>5} windows, {stats['speech_s_per_window']:6.2f} s of speech per window "
                  f"({stats['speech_fraction']:.0%} of the encoder's 30 s); training step {stats['step_s']:.2f} s, "
                  f"{stats['speech_s_per_training_s']:.2f} s of speech per second of training", flush=True)
    result["speech_per_window_gain"] = round(result["packed"]["speech_s_per_window"] /
                                             result["one_per_window"]["speech_s_per_window"], 2)
    result["speech_per_training_second_gain"] = round(result["packed"]["speech_s_per_training_s"] /
                                                      result["one_per_window"]["speech_s_per_training_s"], 2)
    write_result(args.out, result)
    print(f"packing: {result['speech_per_window_gain']}x the speech per window, "
          f"{result['speech_per_training_second_gain']}x per second of training; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
