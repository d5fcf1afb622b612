"""Greedy decoding over interchangeable backends, and the WER evaluation built on it.

One decoding loop serves every backend. A backend turns log-mel features into a ``Session``
whose ``step(tokens)`` feeds new tokens and returns the logits at the last position; the loop
applies Whisper's rules: the prompt from :class:`~femtocc.frontend.whisper.DecodeSettings`,
suppressed tokens at every step, begin-suppressed tokens at the first step, stop at
``<|endoftext|>``.

Length bound: an utterance of ``d`` seconds may generate at most
``min(max_target_positions - len(prompt), ceil(TOKENS_PER_SECOND * d) + TOKEN_SLACK)`` tokens.
Dense Whisper on the dev set stays well under 5 tokens per second, so the bound only stops
runaways (pruned models that repeat one phrase); utterances that hit it are counted and reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from femtocc.data import SAMPLE_RATE, Utterance
from femtocc.errors import FemtoccError

TOKENS_PER_SECOND = 8
TOKEN_SLACK = 16


class Session(Protocol):
    def step(self, tokens: list[int]) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def start(self, features: np.ndarray, seconds: float | None = None) -> Session:
        """A session on 30 s of log-mel ``features`` that hold ``seconds`` of audio (None: all
        30); a backend with context buckets encodes only the smallest bucket that holds them."""
        ...


def cut_features(features: np.ndarray, frames: int | None) -> np.ndarray:
    """The first ``2 * frames`` mel frames of ``features`` (all of them for None: the full window)."""
    return features if frames is None else np.ascontiguousarray(features[:, :, : 2 * frames])


def choose_bucket(seconds: float | None, buckets) -> int:
    """The smallest context bucket (seconds) that holds ``seconds`` of audio; the largest when
    ``seconds`` is None or longer than all."""
    for b in sorted(buckets):
        if seconds is not None and seconds <= b:
            return b
    return max(buckets)


# ----------------------------------------------------------------------------- backends


class TorchBackend:
    """transformers' own forward pass with its KV cache: the reference every other backend meets."""

    name = "torch"

    def __init__(self, bundle, buckets=(30,)):
        from femtocc.frontend.onnx_export import bucket_frames, bucket_name, graph_modules

        self.model, self.buckets = bundle.model, tuple(buckets)
        self.frames = {b: bucket_frames(bundle.config, b) for b in self.buckets}
        mods = graph_modules(bundle, self.buckets)
        self.encoders = {b: mods[bucket_name("encoder", b)] for b in self.buckets}

    def start(self, features, seconds=None):
        import torch

        b = choose_bucket(seconds, self.buckets)
        with torch.no_grad():
            enc = self.encoders[b](torch.from_numpy(cut_features(features, self.frames[b])))
        return self.session(enc)

    def session(self, encoder_output):
        """A decoding session on an encoder output already computed."""
        from transformers.modeling_outputs import BaseModelOutput

        return _TorchSession(self.model, BaseModelOutput(last_hidden_state=encoder_output))


class _TorchSession:
    def __init__(self, model, encoder_outputs):
        self.model, self.encoder_outputs, self.past = model, encoder_outputs, None

    def step(self, tokens):
        import torch

        with torch.no_grad():
            out = self.model(
                encoder_outputs=self.encoder_outputs,
                decoder_input_ids=torch.tensor([tokens]),
                cache=self.past,
                use_cache=True,
            )
        self.past = out.cache
        return out.logits[0, -1].numpy()


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class GraphBackend:
    """Runs the three exported graphs (encoder, cross K/V, decoder step) with any graph runner.

    ``runners`` holds the graphs of one or more context buckets (``encoder``, ``encoder@10s``,
    ...; see :mod:`femtocc.frontend.onnx_export`); each window runs in the smallest bucket that
    holds its audio, its features cut to that bucket."""

    def __init__(self, name: str, runners: dict[str, Runner], config):
        from femtocc.frontend.onnx_export import GRAPH_NAMES, bucket_frames, bucket_name, split_name

        self.name, self.runners = name, runners
        self.n_layers = config.decoder_layers
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.buckets = tuple(sorted({split_name(w)[1] for w in runners}))
        self.frames = {b: bucket_frames(config, b) for b in self.buckets}
        self.graphs = {b: [bucket_name(w, b) for w in GRAPH_NAMES] for b in self.buckets}
        for b, names in self.graphs.items():
            if any(n not in runners for n in names):
                raise FemtoccError(f"{name}: bucket {b} s needs the graphs {', '.join(names)}")

    def start(self, features, seconds=None):
        b = choose_bucket(seconds, self.buckets)
        encoder, cross_kv, step = (self.runners[n] for n in self.graphs[b])
        features = cut_features(features, self.frames[b])
        enc = encoder({"input_features": features})["encoder_hidden_states"]
        cross = cross_kv({"encoder_hidden_states": enc})
        empty = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
        past = {f"past_{t}.{i}": empty for i in range(self.n_layers) for t in "kv"}
        return _GraphSession(step, past, cross)


class _GraphSession:
    def __init__(self, run: Runner, past, cross):
        self.run, self.past, self.cross = run, past, cross
        self.empty = past

    def fresh(self) -> _GraphSession:
        """A new session on the same encoder output, with an empty token cache."""
        return _GraphSession(self.run, self.empty, self.cross)

    def step(self, tokens):
        out = self.run({"input_ids": np.array([tokens], np.int64), **self.past, **self.cross})
        self.past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        return out["logits"][0, -1]


def ort_runner(path) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds)))


def torch_graph_backend(bundle, buckets=(30,)) -> GraphBackend:
    """The exported graphs' torch modules run eagerly: same math as the ONNX graphs, no export, and
    forward hooks on the model's layers fire (calibration uses this)."""
    import torch

    from femtocc.frontend.onnx_export import graph_modules, graph_signatures

    def runner(module, inputs, outputs):
        def run(feeds):
            with torch.no_grad():
                result = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in inputs))
            result = result if isinstance(result, tuple) else (result,)
            return {n: r.numpy() for n, r in zip(outputs, result)}

        return run

    sigs = graph_signatures(bundle.config, buckets)
    runners = {w: runner(m, *sigs[w]) for w, m in graph_modules(bundle, buckets).items()}
    return GraphBackend("torch-graphs", runners, bundle.config)


def ir_runner(graph) -> Runner:
    from femtocc.ir import Interpreter

    return Interpreter(graph).run


RUNTIMES = ("reference", "sim")


def build_target(manifest: dict):
    """The target description a build was compiled for (its own file, else the default spu001)."""
    from femtocc.targets.spu001 import load

    return load(manifest["target_file"]) if manifest.get("target_file") else load()


BUILD_KEYS = ("format", "model", "target", "quant", "programs")


def read_build(build_dir) -> tuple[dict, dict[str, bytes]]:
    """A build's manifest and program bytes, checked: ``build.json`` is a JSON object with every key
    a run needs, its program paths stay inside the build folder, and each program's header (format
    version, target, graph) and weight precision agree with the manifest."""
    import json
    from pathlib import Path

    from femtocc.compile import QUANT
    from femtocc.frontend.onnx_export import bucket_names, parse_buckets
    from femtocc.runtime.program import VERSION, Program

    build = Path(build_dir)
    path = build / "build.json"
    if not path.is_file():
        raise FemtoccError(f"{build}: not a femtocc build (no build.json); create one with femtocc compile")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FemtoccError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise FemtoccError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    missing = [k for k in BUILD_KEYS if k not in manifest]
    if missing:
        raise FemtoccError(f"{path}: missing {', '.join(missing)}; rebuild with femtocc compile")
    if manifest["format"] != f"femtocc-build/{VERSION}":
        raise FemtoccError(f"{path}: format {manifest['format']!r}, this femtocc reads femtocc-build/{VERSION}")
    if manifest["quant"] not in QUANT:
        raise FemtoccError(f"{path}: quant {manifest['quant']!r} is not one of {', '.join(QUANT)}")
    names = bucket_names(parse_buckets(manifest.get("buckets", [30]), f"{path}: buckets"))
    programs = manifest["programs"]
    if not isinstance(programs, dict) or any(not isinstance(programs.get(w), str) for w in names):
        raise FemtoccError(f"{path}: programs must name a file for each of {', '.join(names)}")
    root = build.resolve()
    data = {}
    for w in names:
        file = (build / programs[w]).resolve()
        if root not in file.parents:
            raise FemtoccError(f"{path}: programs.{w} = {programs[w]!r} is outside the build folder")
        try:
            data[w] = file.read_bytes()
        except OSError as e:
            raise FemtoccError(f"{file}: cannot read ({e.strerror})") from None
        head = Program.from_bytes(data[w], str(file), validate=False)
        tables = {ins.inputs[0] for ins in head.code if ins.op == "qgather" and ins.inputs}
        bits = {b.bits for i, b in enumerate(head.buffers) if b.layout in ("dense", "pencil") and i not in tables}
        table_bits = {head.buffers[i].bits for i in tables if i < len(head.buffers)}
        want_table = {manifest.get("vocab_bits") or 8}  # the token table has its own precision (int8 by default)
        if table_bits and table_bits != want_table:
            raise FemtoccError(f"{file}: token table bits {table_bits} in the program, {want_table} in {path.name}")
        for what, found, want in (("target", head.target, manifest["target"][:16]), ("graph", head.graph, w[:16])):
            if found != want:
                raise FemtoccError(f"{file}: {what} {found!r} in the program, {want!r} in {path.name}")
        want_bits = set(manifest.get("weight_bits") or [QUANT[manifest["quant"]][0]])  # a plan's widths, or the quant's
        if bits - want_bits:
            raise FemtoccError(f"{file}: weight bits {bits} in the program, {want_bits} in {path.name} "
                               f"(quant {manifest['quant']})")
    return manifest, data


def build_runners(build_dir, runtime: str = "reference", sink: list | None = None) -> tuple[dict[str, Runner], dict]:
    """Runners for the programs of a ``femtocc compile`` build on ``runtime`` (``reference``: numpy,
    ``sim``: the C cycle simulator, whose per-run statistics are appended to ``sink``), and the
    build's manifest."""
    from pathlib import Path

    if runtime not in RUNTIMES:
        raise FemtoccError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    manifest, data = read_build(build_dir)
    where = {w: str(Path(build_dir) / manifest["programs"][w]) for w in data}
    if runtime == "reference":
        from femtocc.runtime.program import Program
        from femtocc.runtime.reference import ReferenceRuntime

        return {w: ReferenceRuntime(Program.from_bytes(b, where[w])).runner() for w, b in data.items()}, manifest
    from femtocc.runtime.sim import SimRuntime

    target = build_target(manifest)
    return {w: SimRuntime(b, target, where[w]).runner(sink) for w, b in data.items()}, manifest


_WORKER: dict = {}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEMTOCC_SIM_THREADS": "1"}


def _worker_start(build_dir, runtime: str, bundle=None) -> None:
    from femtocc.frontend.whisper import load_whisper

    sink: list = []
    runners, manifest = build_runners(build_dir, runtime, sink)
    bundle = bundle or load_whisper(manifest["model"])
    _WORKER.update(bundle=bundle, backend=GraphBackend(f"spu001-{runtime}", runners, bundle.config), sink=sink)


def _worker_transcribe(u: Utterance):
    sink = _WORKER["sink"]
    (t,) = transcribe(_WORKER["bundle"], _WORKER["backend"], [u])
    runs = sink[:]
    sink.clear()
    return t, runs


def run_build(build_dir, runtime: str, utts: list[Utterance], workers: int = 1, progress: bool = False,
              bundle=None) -> tuple[list[Transcript], list[list]]:
    """Transcripts of ``utts`` on a build's programs, and each utterance's simulator runs (empty
    lists on the reference runtime). ``workers`` > 1 spreads the utterances over that many spawned
    processes, each single-threaded: the arithmetic is exact integer arithmetic, so the results
    are the same, in the same order, as one worker's. One worker uses ``bundle`` (the build's model)
    when given instead of loading it again."""
    import os

    from femtocc.progress import progress as steps

    desc = f"transcribe [spu001-{runtime}]"
    if workers <= 1:
        _worker_start(build_dir, runtime, bundle)
        results = [_worker_transcribe(u) for u in steps(utts, desc, "utt", enabled=progress)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        saved = {k: os.environ.get(k) for k in ONE_THREAD}
        os.environ.update(ONE_THREAD)  # the spawned workers inherit it
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_start, initargs=(str(build_dir), runtime)) as pool:
                results = list(steps(pool.map(_worker_transcribe, utts), desc, "utt", enabled=progress, total=len(utts)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return [t for t, _ in results], [r for _, r in results]


# ----------------------------------------------------------------------------- decoding


def token_limit(duration_s: float, settings) -> int:
    room = settings.max_target_positions - len(settings.prompt)
    return max(1, min(room, math.ceil(TOKENS_PER_SECOND * duration_s) + TOKEN_SLACK))


def greedy_decode(session: Session, settings, limit: int) -> tuple[list[int], bool]:
    """Returns the generated tokens (without prompt and EOT) and whether ``limit`` stopped it."""
    suppress = np.array(settings.suppress, dtype=np.int64)
    suppress_begin = np.array(settings.suppress_begin, dtype=np.int64)
    logits = session.step(list(settings.prompt))
    out: list[int] = []
    for i in range(limit):
        logits = np.array(logits, dtype=np.float32)
        logits[suppress] = -np.inf
        if i == 0:
            logits[suppress_begin] = -np.inf
        token = int(np.argmax(logits))
        if token == settings.eot:
            return out, False
        out.append(token)
        if i + 1 < limit:
            logits = session.step([token])
    return out, True


@dataclass
class Transcript:
    id: str
    reference: str
    hypothesis: str
    tokens: list[int]
    duration_s: float
    hit_limit: bool
    seconds: float


WINDOW_S = 30.0  # Whisper's context: every window is padded or cut to this
MIN_WINDOW_S = 5.0  # a window that longer audio is cut into is at least this long (but the last)
SILENCE_PEAK = 1e-4  # -80 dBFS: audio (or a window of it) whose peak stays below this is silence


def windows(audio: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) sample ranges that cover ``audio`` one after another, each at most 30 s.

    Audio that fits Whisper's 30-s window is one window, as it always was. Longer audio is cut
    sequentially: each window ends at the quietest 100-ms frame (hop 10 ms, the first if several
    tie) between ``MIN_WINDOW_S`` and 30 s after its start, and the next starts there. The quietest
    point of that stretch is its longest pause, so the cut falls between sentences rather than
    through a word, and a window holds as few sentences as the pauses allow: Whisper asked for
    text without timestamps tends to stop early or skip a sentence in a window that holds several
    (dev utterances put one after another: a 24-s window of four lost one, another three).
    """
    n, size = len(audio), int(WINDOW_S * SAMPLE_RATE)
    frame, hop = SAMPLE_RATE // 10, SAMPLE_RATE // 100
    out, start = [], 0
    while n - start > size:
        lo = start + int(MIN_WINDOW_S * SAMPLE_RATE)
        energy = np.convolve(np.asarray(audio[lo : start + size], np.float64) ** 2, np.ones(frame), "valid")[::hop]
        cut = lo + int(np.argmin(energy)) * hop + frame // 2
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out


def transcribe(bundle, backend: Backend, utts: list[Utterance], progress: bool = False) -> list[Transcript]:
    """Greedy transcripts of ``utts``. Audio longer than 30 s is decoded window by window
    (:func:`windows`), each with the plain prompt, and the texts joined with a space. Silence
    (a file or window whose peak stays below -80 dBFS) is not decoded: its transcript is empty,
    whatever the backend (Whisper makes words up for it: tiny.en says "you" to digital silence)."""
    from femtocc.progress import progress as steps

    results = []
    for u in steps(utts, f"transcribe [{backend.name}]", "utt", enabled=progress):
        audio = u.audio()
        start = time.perf_counter()
        tokens, texts, hit = [], [], False
        for a, b in windows(audio):
            if b > a and float(np.max(np.abs(audio[a:b]))) >= SILENCE_PEAK:  # silence is not decoded
                part, cut = greedy_decode(backend.start(bundle.features(audio[a:b]), (b - a) / SAMPLE_RATE), bundle.decode,
                                          token_limit((b - a) / SAMPLE_RATE, bundle.decode))
                tokens += part
                texts.append(bundle.text(part).strip())
                hit |= cut
        duration = len(audio) / SAMPLE_RATE
        text = " ".join(t for t in texts if t) if len(texts) > 1 else bundle.text(tokens)
        results.append(Transcript(u.id, u.text, text, tokens, duration, hit, time.perf_counter() - start))
    return results


def score(transcripts: list[Transcript], dense: dict[str, str] | None = None) -> dict:
    """WER against references, runaway count, and (given dense transcripts by id) agreement WER."""
    from femtocc.wer import corpus_wer

    report = {
        "utterances": len(transcripts),
        **corpus_wer([t.reference for t in transcripts], [t.hypothesis for t in transcripts],
                     "the data folder's reference transcripts"),
        "hit_token_limit": sum(t.hit_limit for t in transcripts),
        "token_limit_rule": f"min(448 - prompt, ceil({TOKENS_PER_SECOND} * seconds) + {TOKEN_SLACK})",
        "seconds": sum(t.seconds for t in transcripts),
        "audio_seconds": sum(t.duration_s for t in transcripts),
    }
    if dense is not None:
        agree = corpus_wer([dense[t.id] or "-" for t in transcripts], [t.hypothesis for t in transcripts],
                           "the dense model's transcripts")
        report["agreement_wer"] = agree["wer"]
        report["identical_transcripts"] = sum(dense[t.id] == t.hypothesis for t in transcripts)
    return report
