"""Side experiment (issue 3): do more decoder calibration tokens generalise to new speakers?

    python benchmarks/experiments/decoder_augmentation.py whisper-tiny.en 0.45

The calibration speakers are halved (``calibrate.heldout_speakers``). OBS (with the refit, automatic
damping) prunes every layer on the fit half's H, once as is and once with extra clips of the fit
half: each utterance's two halves and each utterance joined to the next one, teacher-forced on the
dense model's greedy transcripts of the clips (about 3x the decoder tokens). Prints the mean
relative layer error on the held-out half's H for the token-fed (decoder) and frame-fed layers.
Results: benchmarks/results/side-experiments.json (decoder_augmentation).
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from femtocc.data import SAMPLE_RATE, Utterance, load_audio, load_dataset, split_by_speaker
from femtocc.decode import greedy_decode, token_limit, torch_graph_backend
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, dense_transcripts, heldout_speakers, prunable_layers
from femtocc.passes.obs import obs_prune, relative_error
from femtocc.passes.prune import weight_matrix, well_calibrated
from femtocc.passes.sparsity import parse_pattern


@dataclass(frozen=True)
class Clip(Utterance):
    parts: tuple = ()  # ((audio path, start fraction, end fraction), ...)

    def audio(self):
        pieces = [(x := load_audio(path))[int(a * len(x)) : int(b * len(x))] for path, a, b in self.parts]
        return np.concatenate(pieces).astype(np.float32)


model, sparsity = sys.argv[1], float(sys.argv[2])
bundle = load_whisper(model)
calib, _ = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
held = heldout_speakers(calib)
fit = [u for u in calib if u.speaker not in held]
heldout = [u for u in calib if u.speaker in held]
clips = [Clip(f"{u.id}#{i}", u.audio_path, "", u.speaker, ((u.audio_path, i / 2, (i + 1) / 2),)) for u in fit for i in (0, 1)]
clips += [Clip(f"{u.id}+{v.id}", u.audio_path, "", u.speaker, ((u.audio_path, 0, 1), (v.audio_path, 0, 1)))
          for u, v in zip(fit, fit[1:] + fit[:1])]
tokens = dense_transcripts(bundle, calib)
backend = torch_graph_backend(bundle)
for c in clips:
    audio = c.audio()
    tokens[c.id], _ = greedy_decode(backend.start(bundle.features(audio)), bundle.decode,
                                    token_limit(len(audio) / SAMPLE_RATE, bundle.decode))
layers = prunable_layers(bundle.model)
plain = collect_hessians(bundle, fit, layers, dense_tokens=tokens)
augmented = collect_hessians(bundle, fit + clips, layers, dense_tokens=tokens)
target = collect_hessians(bundle, heldout, layers, dense_tokens=tokens)
pattern = parse_pattern("unstructured")
errors = {"token-fed": [], "frame-fed": []}
for name, module in layers.items():
    w = weight_matrix(module)
    row = [relative_error(w, obs_prune(w, h.matrices[name], sparsity, pattern).weight, target.matrices[name])
           for h in (plain, augmented)]
    errors["frame-fed" if well_calibrated(plain.rows[name], w.shape[1]) else "token-fed"].append(row)
for kind, rows in errors.items():
    mean = np.mean(rows, axis=0)
    print(json.dumps({"model": model, "sparsity": sparsity, "kind": kind, "layers": len(rows),
                      "fit_tokens": sum(len(tokens[u.id]) for u in fit), "clip_tokens": sum(len(tokens[c.id]) for c in clips),
                      "heldout_error": round(float(mean[0]), 6), "heldout_error_with_clips": round(float(mean[1]), 6)}))
