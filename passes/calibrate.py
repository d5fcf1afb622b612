"""Calibration: each prunable layer's input second moment ``H = 2 X X^T / n`` on real speech.

The decoder must see real token sequences and cross-attention real encoder states, so each
calibration utterance runs through the encoder and then through the decoder, either decoding
greedily (dense model) or teacher-forced on the dense model's cached greedy transcript. Forward
hooks accumulate ``X^T X`` per layer as they go: memory is one ``in x in`` matrix per layer,
whatever the number of utterances. A convolution's input is unfolded (``in = channels * kernel``,
kernel index fastest, matching ``weight.reshape(out, -1)``). Layers that read the same tensor
(q/k/v, all cross-attention k/v) share one computation per forward pass. Encoder inputs keep
all speech frames and every ``PADDING_STRIDE``-th frame of Whisper's 30 s zero padding, scaled
so the sum stays unbiased (the padding frames are near-identical; this cuts calibration ~2x).

With ``heldout``, the utterances of every other speaker (sorted by name) also accumulate into a
second H: pruning on the other speakers' H and measuring on this one tells how far a layer's
calibration error generalises (decoder layers, fed ~20 tokens per utterance against hundreds of
inputs, fit their calibration data far better than new speakers': benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from femtocc.cache import atomic_write, cache_root
from femtocc.data import SAMPLE_RATE, Utterance
from femtocc.errors import FemtoccError

PADDING_STRIDE = 4


@dataclass
class Hessians:
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # layer path -> H (float64)
    rows: dict[str, int] = field(default_factory=dict)  # layer path -> number of input rows seen
    utterances: int = 0
    heldout_matrices: dict[str, np.ndarray] = field(default_factory=dict)  # H over the held-out speakers only
    heldout_rows: dict[str, int] = field(default_factory=dict)

    def update(self, other: "Hessians") -> None:
        """Take ``other``'s layers (a recalibration of some layers) over these."""
        for mine, theirs in ((self.matrices, other.matrices), (self.rows, other.rows),
                             (self.heldout_matrices, other.heldout_matrices), (self.heldout_rows, other.heldout_rows)):
            mine.update(theirs)

    def fit_matrix(self, name: str) -> np.ndarray:
        """H over the speakers that are not held out: ``matrices`` minus the held-out part."""
        n, n_out = self.rows[name], self.heldout_rows[name]
        return (n * self.matrices[name] - n_out * self.heldout_matrices[name]) / (n - n_out)


def heldout_speakers(utts: list[Utterance]) -> set[str]:
    """Every other speaker in sorted order: a deterministic half of the calibration speakers."""
    speakers = sorted({u.speaker for u in utts})
    if len(speakers) < 2:
        raise FemtoccError(f"a held-out error needs calibration speech from at least 2 speakers, got {len(speakers)}")
    return set(speakers[1::2])


def prunable_layers(model, include_embeddings: bool = False) -> dict:
    """Module path (``encoder.layers.0.fc1``) -> nn.Linear / nn.Conv1d, encoder then decoder.

    The token embedding (and the output projection tied to it) is left out unless asked for.
    """
    from torch import nn

    layers = {}
    for prefix, part in (("encoder", model.model.encoder), ("decoder", model.model.decoder)):
        for name, module in part.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                layers[f"{prefix}.{name}"] = module
    if include_embeddings:
        layers["proj_out"] = model.proj_out
    return layers


def _unfold(module, x):
    """Conv1d input [1, C, L] -> rows [L_out, C*K] that multiply weight.reshape(out, C*K)."""
    import torch.nn.functional as F

    pad = module.padding[0]
    k, stride = module.kernel_size[0], module.stride[0]
    cols = F.pad(x, (pad, pad)).unfold(2, k, stride)  # [1, C, L_out, K]
    return cols.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)


def _token_cache(bundle, u: Utterance):
    st = u.audio_path.stat()
    raw = f"{bundle.source_digest}:{u.audio_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache_root() / "transcripts" / f"{hashlib.sha256(raw.encode()).hexdigest()[:24]}.json"


def dense_transcripts(bundle, utts: list[Utterance]) -> dict[str, list[int]]:
    """Greedy token ids of ``bundle`` per utterance, cached by model digest and audio file."""
    from femtocc.decode import torch_graph_backend

    results, backend = {}, None
    for u in utts:
        results[u.id] = _cached_tokens(bundle, u)
        if results[u.id] is None:
            backend = backend or torch_graph_backend(bundle)
            audio = u.audio()
            results[u.id] = _decode_and_cache(bundle, u, backend.start(bundle.features(audio)), len(audio) / SAMPLE_RATE)
    return results


def _cached_tokens(bundle, u: Utterance) -> list[int] | None:
    path = _token_cache(bundle, u)
    return json.loads(path.read_text()) if path.is_file() else None


def _decode_and_cache(bundle, u: Utterance, session, seconds: float) -> list[int]:
    """Greedy-decode ``u`` in ``session`` (bounded by its duration) and cache the tokens."""
    from femtocc.decode import greedy_decode, token_limit

    tokens, _ = greedy_decode(session, bundle.decode, token_limit(seconds, bundle.decode))
    with atomic_write(_token_cache(bundle, u), "w") as f:
        json.dump(tokens, f)
    return tokens


def _drive(bundle, utts, dense_tokens, recording: dict, progress: bool, on_utterance) -> None:
    """Run each utterance through the encoder and the teacher-forced decoder, hooks recording.

    Tokens: ``dense_tokens`` if given, else this model's cached transcript, else greedy decoding
    with the hooks paused (then cached). ``on_utterance(u, seconds)`` runs before each utterance.
    """
    from femtocc.decode import torch_graph_backend
    from femtocc.progress import progress as steps

    model = bundle.model
    backend = torch_graph_backend(bundle)
    attention = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # same math as eager, twice as fast on the encoder
    try:
        for u in steps(utts, "calibrate", "utt", enabled=progress):
            audio = u.audio()
            seconds = len(audio) / SAMPLE_RATE
            on_utterance(u, seconds)
            session = backend.start(bundle.features(audio))
            tokens = dense_tokens[u.id] if dense_tokens is not None else _cached_tokens(bundle, u)
            if tokens is None:  # decode without recording, then record the teacher-forced pass
                recording["on"] = False
                tokens = _decode_and_cache(bundle, u, session, seconds)
                recording["on"] = True
                session = session.fresh()
            session.step(list(bundle.decode.prompt) + list(tokens))
    finally:
        model.set_attn_implementation(attention)


def collect_hessians(
    bundle, utts: list[Utterance], layers: dict | None = None, progress: bool = False,
    dense_tokens: dict[str, list[int]] | None = None, padding_stride: int = PADDING_STRIDE, heldout: bool = False,
) -> Hessians:
    """Run ``utts`` through the model and accumulate H for ``layers`` (and, with ``heldout``, the
    part of H from :func:`heldout_speakers`).

    The decoder is teacher-forced on ``dense_tokens`` (the dense model's greedy transcripts) when
    given, else on this model's cached transcripts; failing both, the model decodes greedily while
    the hooks record and its transcripts are cached (so call it that way only on a dense model).
    """
    import torch
    from torch import nn

    model = bundle.model
    layers = layers if layers is not None else prunable_layers(model)
    encoder_modules = {id(m) for m in model.model.encoder.modules()}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    held_sums: dict[str, torch.Tensor] = {}
    held_rows: dict[str, int] = {}
    held_speakers = heldout_speakers(utts) if heldout else set()
    shared: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}  # holds x so its address stays unique
    speech = {"seconds": 0.0, "heldout": False}
    recording = {"on": True}

    def rows_of(module, x):
        flat = _unfold(module, x) if isinstance(module, nn.Conv1d) else x.reshape(-1, x.shape[-1])
        flat = flat.to(torch.float32)
        per_second = flat.shape[0] / 30.0  # encoder inputs always span Whisper's 30 s window
        if id(module) in encoder_modules and padding_stride > 1:
            # Whisper pads every utterance to 30 s. Keep every speech frame, and an unbiased
            # stride sample of the padding frames (weighted by sqrt(stride) so X^T X keeps its sum).
            n = min(flat.shape[0], int(np.ceil(speech["seconds"] * per_second)) + 2)
            pad = flat[n::padding_stride] * float(np.sqrt(padding_stride))
            return torch.cat([flat[:n], pad]), flat.shape[0]
        return flat, flat.shape[0]

    def add(total: dict, count: dict, name: str, xtx, n: int) -> None:
        if name in total:
            total[name] += xtx
        else:
            total[name] = xtx.clone()
        count[name] = count.get(name, 0) + n

    def hook(name):
        def accumulate(module, inputs, output):
            if not recording["on"]:
                return
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), type(module))
            if key not in shared:
                flat, n = rows_of(module, x)
                shared[key] = (x, (flat.T @ flat).to(torch.float64), n)
            _, xtx, n = shared[key]
            add(sums, rows, name, xtx, n)
            if speech["heldout"]:
                add(held_sums, held_rows, name, xtx, n)

        return accumulate

    def new_utterance(u: Utterance, seconds: float) -> None:
        speech["seconds"] = seconds
        speech["heldout"] = u.speaker in held_speakers
        shared.clear()

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        _drive(bundle, utts, dense_tokens, recording, progress, new_utterance)
    finally:
        for h in handles:
            h.remove()
    out = Hessians(utterances=len(utts))
    for name, s in sums.items():
        out.matrices[name] = (2.0 / rows[name]) * s.numpy()
        out.rows[name] = rows[name]
        if heldout:
            if held_rows.get(name, 0) in (0, rows[name]):
                raise FemtoccError(f"layer {name}: no input rows from one of the two calibration halves")
            out.heldout_matrices[name] = (2.0 / held_rows[name]) * held_sums[name].numpy()
            out.heldout_rows[name] = held_rows[name]
    return out


# ----------------------------------------------------------------------------- activation ranges


def range_key(graph, value) -> str:
    """Where a value's range is stored: graph inputs and outputs by bare name, so the values that
    flow between the three graphs (``encoder_hidden_states``, ``cross_k.0``) share one scale; a KV
    cache input ``past_k.0`` and output ``present_k.0`` are one tensor across steps. Everything
    else is ``graph:value``."""
    if value in graph.inputs or value in graph.outputs:
        return value.name.replace("past_", "present_")
    return f"{graph.name}:{value.name}"


def attach_ranges(graphs: dict, ranges: dict[str, float]) -> int:
    """Put each calibrated range on its value (``attrs["range"]``), where ``quantize`` reads it;
    returns how many values got one."""
    done = 0
    for g in graphs.values():
        for v in g.values().values():
            key = range_key(g, v)
            if key in ranges:
                v.attrs["range"] = float(ranges[key])
                done += 1
    return done


def finite_peak(array: np.ndarray) -> float:
    """Largest finite |x| (0 if none): a masked ``-inf`` saturates to the quantized minimum, it
    does not stretch the scale."""
    peak = float(np.abs(array).max(initial=0))
    if np.isfinite(peak):
        return peak
    return float(np.abs(array[np.isfinite(array)]).max(initial=0))


class RangeRecorder:
    """Largest finite |x| of every float value over the runs of :meth:`runner` (keys: :func:`range_key`)."""

    def __init__(self):
        self.ranges: dict[str, float] = {}

    def runner(self, graph):
        """A runner for ``graph`` (IR interpreter) that records as it goes."""
        from femtocc.ir import Interpreter

        interp = Interpreter(graph)

        def observe(value, array):
            if array.dtype.kind == "f" and array.size:
                key = range_key(graph, value)
                self.ranges[key] = max(self.ranges.get(key, 0.0), finite_peak(array))

        def run(feeds):
            for v in graph.inputs:
                observe(v, np.asarray(feeds[v.name]))
            return interp.run(feeds, observe=observe)

        return run


def collect_value_ranges(graphs: dict, bundle, utts: list[Utterance], progress: bool = False,
                         tokens: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Largest |x| of every float value of the IR graphs (encoder, cross_kv, decoder_step, of every
    context bucket) on ``utts``.

    The graphs run in the IR interpreter; the decoder step is teacher-forced on the model's
    greedy transcript of each utterance (one step over prompt + tokens, so the KV-cache inputs
    are empty and every position is seen once), or on ``tokens`` when given (the dense model's).
    """
    from femtocc.decode import GraphBackend
    from femtocc.progress import progress as steps

    recorder = RangeRecorder()
    tokens = tokens if tokens is not None else dense_transcripts(bundle, utts)
    backend = GraphBackend("calibrate", {w: recorder.runner(g) for w, g in graphs.items()}, bundle.config)
    for b in backend.buckets:  # every bucket sees every utterance, cut to the bucket if longer
        for u in steps(utts, "ranges" if len(backend.buckets) == 1 else f"ranges {b} s", "utt", enabled=progress):
            session = backend.start(bundle.features(u.audio()), b)
            session.step(list(bundle.decode.prompt) + list(tokens[u.id]))
    return dict(sorted(recorder.ranges.items()))
