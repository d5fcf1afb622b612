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
BACKENDS = ("torch", "onnxruntime", "ir")


class Session(Protocol):
    def step(self, tokens: list[int]) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def start(self, features: np.ndarray) -> Session: ...


# ----------------------------------------------------------------------------- backends


class TorchBackend:
    """transformers' own forward pass with its KV cache: the reference every other backend meets."""

    name = "torch"

    def __init__(self, bundle):
        self.model = bundle.model

    def start(self, features):
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        with torch.no_grad():
            enc = self.model.model.encoder(torch.from_numpy(features)).last_hidden_state
        return _TorchSession(self.model, BaseModelOutput(last_hidden_state=enc))


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
    """Runs the three exported graphs (encoder, cross K/V, decoder step) with any graph runner."""

    def __init__(self, name: str, runners: dict[str, Runner], config):
        self.name, self.runners = name, runners
        self.n_layers = config.decoder_layers
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads

    def start(self, features):
        enc = self.runners["encoder"]({"input_features": features})["encoder_hidden_states"]
        cross = self.runners["cross_kv"]({"encoder_hidden_states": enc})
        empty = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
        past = {f"past_{t}.{i}": empty for i in range(self.n_layers) for t in "kv"}
        return _GraphSession(self.runners["decoder_step"], past, cross)


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


def torch_graph_backend(bundle) -> GraphBackend:
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

    sigs = graph_signatures(bundle.config)
    runners = {w: runner(m, *sigs[w]) for w, m in graph_modules(bundle).items()}
    return GraphBackend("torch-graphs", runners, bundle.config)


def ir_runner(graph) -> Runner:
    from femtocc.ir import Interpreter

    return Interpreter(graph).run


def make_backend(bundle, kind: str, manager=None, progress=None, export_dir=None) -> Backend:
    """``torch``, ``onnxruntime`` or ``ir`` (the IR interpreter, after the passes of ``manager``,
    a :class:`~femtocc.passes.PassManager`; by default the standard pipeline).

    The ONNX graphs come from the export cache, or are written to ``export_dir`` when given.
    """
    if kind == "torch":
        return TorchBackend(bundle)
    from femtocc.frontend.onnx_export import GRAPH_NAMES, export_whisper

    paths = export_whisper(bundle, export_dir, progress=progress)
    if kind == "onnxruntime":
        return GraphBackend(kind, {w: ort_runner(paths[w]) for w in GRAPH_NAMES}, bundle.config)
    if kind == "ir":
        from femtocc.frontend.onnx_export import load_onnx
        from femtocc.frontend.onnx_ir import import_onnx
        from femtocc.passes import DEFAULT_PIPELINE, PassManager

        manager = manager or PassManager.parse(DEFAULT_PIPELINE)
        graphs = {w: manager.run(import_onnx(load_onnx(paths[w]), w)) for w in GRAPH_NAMES}
        return GraphBackend(kind, {w: ir_runner(g) for w, g in graphs.items()}, bundle.config)
    raise FemtoccError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")


RUNTIMES = ("reference", "sim")


def build_target(manifest: dict):
    """The target description a build was compiled for (its own file, else the default spu001)."""
    from femtocc.targets.spu001 import load

    return load(manifest["target_file"]) if manifest.get("target_file") else load()


def build_runners(build_dir, runtime: str = "reference", sink: list | None = None) -> tuple[dict[str, Runner], dict]:
    """Runners for the programs of a ``femtocc compile`` build on ``runtime`` (``reference``: numpy,
    ``sim``: the C cycle simulator, whose per-run statistics are appended to ``sink``), and the
    build's manifest."""
    import json
    from pathlib import Path

    from femtocc.frontend.onnx_export import GRAPH_NAMES

    build = Path(build_dir)
    manifest_path = build / "build.json"
    if not manifest_path.is_file():
        raise FemtoccError(f"{build}: not a femtocc build (no build.json); create one with femtocc compile")
    manifest = json.loads(manifest_path.read_text())
    if runtime not in RUNTIMES:
        raise FemtoccError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    paths = {w: build / manifest["programs"][w] for w in GRAPH_NAMES}
    if runtime == "reference":
        from femtocc.runtime.reference import ReferenceRuntime, load_program

        return {w: ReferenceRuntime(load_program(p)).runner() for w, p in paths.items()}, manifest
    from femtocc.runtime.sim import SimRuntime

    target = build_target(manifest)
    runners = {}
    for w, p in paths.items():
        try:
            data = p.read_bytes()
        except OSError as e:
            raise FemtoccError(f"{p}: cannot read ({e.strerror})") from None
        runners[w] = SimRuntime(data, target, str(p)).runner(sink)
    return runners, manifest


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


def transcribe(bundle, backend: Backend, utts: list[Utterance], progress: bool = False) -> list[Transcript]:
    from tqdm import tqdm

    extractor = bundle.feature_extractor()
    results = []
    for u in tqdm(utts, desc=f"transcribe [{backend.name}]", unit="utt", disable=not progress, leave=False):
        audio = u.audio()
        start = time.perf_counter()
        features = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)
        duration = len(audio) / SAMPLE_RATE
        tokens, hit = greedy_decode(backend.start(features), bundle.decode, token_limit(duration, bundle.decode))
        results.append(
            Transcript(u.id, u.text, bundle.text(tokens), tokens, duration, hit, time.perf_counter() - start)
        )
    return results


def score(transcripts: list[Transcript], dense: dict[str, str] | None = None) -> dict:
    """WER against references, runaway count, and (given dense transcripts by id) agreement WER."""
    from femtocc.wer import corpus_wer

    report = {
        "utterances": len(transcripts),
        **corpus_wer([t.reference for t in transcripts], [t.hypothesis for t in transcripts]),
        "hit_token_limit": sum(t.hit_limit for t in transcripts),
        "token_limit_rule": f"min(448 - prompt, ceil({TOKENS_PER_SECOND} * seconds) + {TOKEN_SLACK})",
        "seconds": sum(t.seconds for t in transcripts),
        "audio_seconds": sum(t.duration_s for t in transcripts),
    }
    if dense is not None:
        agree = corpus_wer([dense[t.id] or "-" for t in transcripts], [t.hypothesis for t in transcripts])
        report["agreement_wer"] = agree["wer"]
        report["identical_transcripts"] = sum(dense[t.id] == t.hypothesis for t in transcripts)
    return report
