"""Training data for recovery training: utterances packed into 30-s windows, optional seeded
augmentation, and the teacher's targets computed once and cached on disk.

Whisper's encoder always reads a 30-s window, so a window that holds one 6.6-s clip (the
training folder's mean) pays for 30 s and learns from 6.6. :func:`pack` fills each window with
several utterances, ``gap_s`` of silence between them, in a seeded order (greedy, next fit), so
a training step sees 3-4x more speech; :func:`packing_stats` measures it.

A :class:`Window` knows its utterances and builds its audio on demand, optionally augmented
(speed perturbation, gain, white noise at a signal-to-noise ratio), from a seed of its own: the
same window and seed give the same samples. The dense model transcribes the packed window as it
is, so its transcript covers every utterance in it (the training folder has mostly no reference
text; the teacher's own output is the target).

:func:`teacher_targets` runs the teacher over every window once: its greedy transcript, then,
teacher-forced on prompt + transcript + end of text, the top-``k`` log-probabilities of each
position (float16, with their token ids) and optionally its encoder output (float16). They are
cached under ``cache_root()/teacher/KEY/`` (one ``.npz`` per window, written atomically, so an
interrupted run resumes where it stopped; under torchrun each process computes its shard of
the windows, the same shard it trains on), keyed by the teacher's weights digest, the windows'
utterances (ids, sizes), the packing and augmentation, and ``k``. The teacher never changes
during a run: a different teacher is a different key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from femtocc.data import SAMPLE_RATE, Utterance
from femtocc.errors import FemtoccError

WINDOW_S = 30.0
GAP_S = 0.4
TARGETS_VERSION = 1


@dataclass(frozen=True)
class Augment:
    """Seeded augmentation of a window's audio and, SpecAugment-style, of its log-mel features;
    every field at its default leaves it as it is."""

    speed: tuple[float, ...] = (1.0,)  # one factor drawn per window (resampled: pitch and tempo change)
    gain_db: float = 0.0  # gain drawn uniformly in [-gain_db, +gain_db]
    snr_db: tuple[float, float] | None = None  # white noise at an SNR drawn uniformly in this range
    # (count, widest): mel bands / 10-ms feature frames set to zero, each up to `widest` wide. The
    # teacher never sees masked features, so they stay out of repr (and so out of targets_key)
    freq_masks: tuple[int, int] = field(default=(0, 0), repr=False)
    time_masks: tuple[int, int] = field(default=(0, 0), repr=False)

    @classmethod
    def parse(cls, text: str, option: str = "--augment") -> "Augment":
        """``gain=DB,snr=LO:HI,freq=NxW,time=NxW`` (any subset), e.g. ``gain=6,snr=15:35,freq=2x12,time=2x40``."""
        fields: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            try:
                if key == "gain":
                    fields["gain_db"] = float(value)
                    ok = fields["gain_db"] >= 0
                elif key == "snr":
                    lo, hi = (float(x) for x in value.split(":"))
                    fields["snr_db"], ok = (lo, hi), lo <= hi
                elif key in ("freq", "time"):
                    count, widest = (int(x) for x in value.split("x"))
                    fields[f"{key}_masks"], ok = (count, widest), count >= 0 and widest >= 1
                else:
                    raise FemtoccError(f"{option}: unknown key {key!r} in {item!r}; give gain, snr, freq or time")
            except ValueError:
                ok = False
            if not ok:
                raise FemtoccError(f"{option}: cannot read {item!r}; e.g. gain=6, snr=15:35, freq=2x12, time=2x40")
        return cls(**fields)

    def apply(self, audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = float(rng.choice(self.speed))
        if factor != 1.0:
            from fractions import Fraction

            from scipy.signal import resample_poly

            ratio = Fraction(factor).limit_denominator(100)
            audio = resample_poly(audio, ratio.denominator, ratio.numerator).astype(np.float32)
        if self.gain_db:
            audio = audio * np.float32(10 ** (rng.uniform(-self.gain_db, self.gain_db) / 20))
        if self.snr_db is not None:
            power = float(np.mean(audio.astype(np.float64) ** 2))
            snr = rng.uniform(*self.snr_db)
            noise = rng.standard_normal(len(audio)) * math.sqrt(power / 10 ** (snr / 10))
            audio = (audio + noise).astype(np.float32)
        return np.clip(audio, -1.0, 1.0).astype(np.float32)

    def mask(self, features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``features`` [..., mels, frames] with the frequency and time masks drawn from ``rng``
        (a copy; zero is the normalised log-mel's middle)."""
        out = features.copy()
        for (count, widest), axis in ((self.freq_masks, -2), (self.time_masks, -1)):
            size = out.shape[axis]
            for _ in range(count):
                width = int(rng.integers(0, min(widest, size) + 1))
                start = int(rng.integers(0, size - width + 1))
                index = [slice(None)] * out.ndim
                index[axis] = slice(start, start + width)
                out[tuple(index)] = 0.0
        return out

    @property
    def active(self) -> bool:
        return self.waveform or self.masks

    @property
    def waveform(self) -> bool:
        return self.speed != (1.0,) or bool(self.gain_db) or self.snr_db is not None

    @property
    def masks(self) -> bool:
        return self.freq_masks[0] > 0 or self.time_masks[0] > 0


@dataclass(frozen=True)
class Window:
    """Utterances played one after another in one Whisper window."""

    index: int
    utterances: tuple[Utterance, ...]
    durations: tuple[float, ...]
    gap_s: float = GAP_S
    augment: Augment = field(default_factory=Augment)
    seed: int = 0

    @property
    def speech_s(self) -> float:
        return float(sum(self.durations))

    def audio(self) -> np.ndarray:
        gap = np.zeros(int(round(self.gap_s * SAMPLE_RATE)), np.float32)
        parts = []
        for i, u in enumerate(self.utterances):
            parts += [gap] if i else []
            parts.append(u.audio())
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if self.augment.waveform:
            audio = self.augment.apply(audio, np.random.default_rng([self.seed, self.index]))
        return audio[: int(WINDOW_S * SAMPLE_RATE)]


def duration_s(u: Utterance) -> float:
    """An utterance's length from its header (no decoding)."""
    import soundfile as sf

    try:
        return float(sf.info(str(u.audio_path)).duration)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise FemtoccError(f"audio file {u.audio_path}: cannot read its header ({e})") from None


def pack(utts: list[Utterance], seed: int = 0, window_s: float = WINDOW_S, gap_s: float = GAP_S,
         augment: Augment | None = None, per_window: int | None = None) -> list[Window]:
    """Windows of at most ``window_s`` seconds, each holding utterances in a seeded order with
    ``gap_s`` between them (next fit: a window is closed when the next utterance does not fit).
    ``per_window=1`` gives the unpacked baseline, one utterance per window. Speed perturbation
    above 1 shortens a window and below 1 lengthens it, so the fill leaves room for the slowest
    factor. Utterances longer than a window are refused."""
    augment = augment or Augment()
    room = window_s * min(augment.speed)
    order = np.random.default_rng(seed).permutation(len(utts))
    windows, current, lengths = [], [], []
    for i in order:
        u = utts[int(i)]
        d = duration_s(u)
        if d > room:
            raise FemtoccError(f"{u.audio_path}: {d:.1f} s does not fit a {room:.1f}-s window")
        fits = sum(lengths) + gap_s * len(lengths) + d <= room
        if current and (not fits or (per_window and len(current) >= per_window)):
            windows.append(Window(len(windows), tuple(current), tuple(lengths), gap_s, augment, seed))
            current, lengths = [], []
        current.append(u)
        lengths.append(d)
    if current:
        windows.append(Window(len(windows), tuple(current), tuple(lengths), gap_s, augment, seed))
    return windows


def packing_stats(windows: list[Window], window_s: float = WINDOW_S) -> dict:
    """Speech per window and the share of encoder time that is speech."""
    speech = sum(w.speech_s for w in windows)
    return {"windows": len(windows), "utterances": sum(len(w.utterances) for w in windows),
            "speech_s": round(speech, 3), "speech_s_per_window": round(speech / max(len(windows), 1), 3),
            "speech_fraction": round(speech / (window_s * max(len(windows), 1)), 4)}


# ----------------------------------------------------------------------------- teacher targets


def targets_key(teacher, windows: list[Window], k: int, hidden: bool) -> str:
    parts = {"version": TARGETS_VERSION, "teacher": teacher.source_digest, "k": k, "hidden": hidden,
             "windows": [[w.gap_s, w.seed, repr(w.augment),
                          [[u.id, u.audio_path.stat().st_size] for u in w.utterances]] for w in windows]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def teacher_targets(teacher, windows: list[Window], k: int = 16, hidden: bool = False, folder: Path | None = None,
                    progress: bool = False) -> Path:
    """Compute (or find) the teacher's targets for every window; returns their folder, which holds
    ``window-NNNNN.npz`` (``tokens`` int32, ``topk_logp`` float16 [L, k], ``topk_ids`` int32 [L, k]
    for the L = len(prompt) + len(tokens) decoder positions, and with ``hidden`` the encoder output
    ``encoder`` float16 [frames, d]) and ``targets.json`` once all are there."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import BaseModelOutput

    from femtocc import distributed
    from femtocc.cache import atomic_write, cache_root
    from femtocc.decode import TorchBackend, greedy_decode, token_limit
    from femtocc.progress import progress as steps

    folder = Path(folder) if folder else cache_root() / "teacher" / targets_key(teacher, windows, k, hidden)
    done = folder / "targets.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = distributed.rank_world()
    backend = TorchBackend(teacher)
    settings = teacher.decode
    model = teacher.model
    for w in steps(windows[rank::world], "teacher targets", "window", enabled=progress):
        path = folder / f"window-{w.index:05d}.npz"
        if path.is_file():
            continue
        audio = w.audio()
        feats = teacher.features(audio)
        with torch.no_grad():
            enc = model.model.encoder(torch.from_numpy(feats)).last_hidden_state
        tokens, _ = greedy_decode(backend.session(enc), settings, token_limit(len(audio) / SAMPLE_RATE, settings))
        seq = list(settings.prompt) + tokens + [settings.eot]
        with torch.no_grad():
            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                           decoder_input_ids=torch.tensor([seq[:-1]])).logits[0].float()
            top = torch.topk(F.log_softmax(logits, -1), k, dim=-1)
        arrays = {"tokens": np.array(tokens, np.int32), "topk_logp": top.values.numpy().astype(np.float16),
                  "topk_ids": top.indices.numpy().astype(np.int32)}
        if hidden:
            arrays["encoder"] = enc[0].numpy().astype(np.float16)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    distributed.barrier()
    if rank == 0:
        with atomic_write(done, "w") as f:
            json.dump({"version": TARGETS_VERSION, "teacher": teacher.source_digest, "k": k, "hidden": hidden,
                       "windows": len(windows), **packing_stats(windows)}, f, indent=1)
    return folder


def load_targets(folder: Path, window: Window) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / f"window-{window.index:05d}.npz") as z:
        return {name: z[name] for name in z.files}
