"""Export Whisper to three ONNX graphs with torch's dynamo exporter (opset 18).

* ``encoder``: ``input_features f32[1, n_mels, 3000] -> encoder_hidden_states f32[1, 1500, d]``
* ``cross_kv``: ``encoder_hidden_states -> cross_k.{i} f32[1, H, Dh, 1500], cross_v.{i} f32[1, H,
  1500, Dh]`` per decoder layer, run once per utterance. K comes out transposed, as the decoder's
  attention reads it, so that no decoder step transposes (and streams) what never changes between
  steps;
* ``decoder_step``: ``input_ids i64[1, T]``, ``past_k.{i}, past_v.{i} f32[1, H, P, Dh]`` and the
  cross K/V ``-> logits f32[1, T, V]``, ``present_k.{i}, present_v.{i} f32[1, H, P+T, Dh]``.
  ``T`` new tokens (the whole prompt at once, then one at a time) after ``P`` cached ones.

Context buckets: Whisper always encodes a 30-s window. :func:`export_whisper` can also export the
three graphs for a shorter context of ``b`` seconds (``encoder@10s``, ``cross_kv@10s``,
``decoder_step@10s``): the encoder reads ``100 b`` mel frames and keeps ``50 b`` positions of its
positional embedding, and the cross K/V and the decoder step use ``50 b`` frames. The 30-s graphs
keep their plain names and are the same with or without other buckets. Every name fits the 16
bytes a program header keeps for it (``decoder_step@10s``).

The graphs call transformers' own modules; the attention of the cross-K/V split and of the
cached decoder step is spelled out here because transformers' cache objects do not export
cleanly. Weights get stable names from the transformers module path (``decoder.layers.0.fc1.weight``):
the exporter stores Linear weights transposed (``[in, out]``) under generated names, which
:func:`_rename_initializers` maps back by content.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from femtocc.cache import atomic_write, cache_root
from femtocc.errors import FemtoccError

OPSET = 18
EXPORTER_VERSION = 3  # 3: cross K transposed once in cross_kv
GRAPH_NAMES = ("encoder", "cross_kv", "decoder_step")
WINDOW_S = 30  # Whisper's context; the full bucket


def bucket_name(which: str, seconds: int) -> str:
    """The graph ``which`` for a context of ``seconds``: plain for the full 30-s window, else
    ``which@{seconds}s``."""
    return which if seconds == WINDOW_S else f"{which}@{seconds}s"


def split_name(name: str) -> tuple[str, int]:
    """``encoder@10s`` -> (``encoder``, 10); ``encoder`` -> (``encoder``, 30)."""
    base, _, rest = name.partition("@")
    return base, int(rest[:-1]) if rest else WINDOW_S


def parse_buckets(spec, option: str = "--buckets") -> tuple[int, ...]:
    """Context buckets in whole seconds, sorted, from ``"10,30"`` or a sequence; the largest must
    be 30 (a window of any length must fit one)."""
    if not isinstance(spec, (str, list, tuple)):
        raise FemtoccError(f"{option} {spec!r}: give whole seconds separated by commas, e.g. 10,30")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        out = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError:
        raise FemtoccError(f"{option} {spec!r}: give whole seconds separated by commas, e.g. 10,30") from None
    if not out or out[0] < 1 or out[-1] != WINDOW_S:
        raise FemtoccError(f"{option} {spec!r}: buckets are whole seconds from 1 to {WINDOW_S}, and "
                           f"{WINDOW_S} must be one of them")
    return tuple(out)


def bucket_frames(config, seconds: int) -> int | None:
    """Encoder frames of a context of ``seconds`` (its mel frames are twice as many); None for the
    full window, which is encoded as transformers encodes it."""
    return None if seconds == WINDOW_S else config.max_source_positions * seconds // WINDOW_S


def bucket_names(buckets=(WINDOW_S,)) -> list[str]:
    """Every graph of a bucket set, bucket by bucket (smallest first)."""
    return [bucket_name(w, b) for b in buckets for w in GRAPH_NAMES]


def _modules():
    import torch
    from torch import nn

    def heads(x, n_heads):
        b, t, d = x.shape
        return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)

    def merge(x):
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def attend(q, k, v, mask=None, k_transposed=False):
        scores = torch.matmul(q, k if k_transposed else k.transpose(2, 3))
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return merge(torch.matmul(torch.softmax(scores, dim=-1), v))

    class Encoder(nn.Module):
        def __init__(self, hf, frames: int | None = None):
            super().__init__()
            self.encoder, self.frames = hf.model.encoder, frames

        def forward(self, input_features):
            from femtocc.frontend.whisper import encode

            return encode(self.encoder, input_features, self.frames)

    class CrossKV(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.decoder = hf.model.decoder
            self.n_heads = hf.config.decoder_attention_heads

        def forward(self, encoder_hidden_states):
            out = []
            for layer in self.decoder.layers:
                att = layer.encoder_attn
                out.append(heads(att.k_proj(encoder_hidden_states), self.n_heads).transpose(2, 3))
                out.append(heads(att.v_proj(encoder_hidden_states), self.n_heads))
            return tuple(out)

    class DecoderStep(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.decoder = hf.model.decoder
            self.proj_out = hf.proj_out
            self.n_heads = hf.config.decoder_attention_heads

        def forward(self, input_ids, *caches):
            n = len(self.decoder.layers)
            past, cross = caches[: 2 * n], caches[2 * n :]
            new_tokens, cached = input_ids.shape[1], past[0].shape[2]
            positions = torch.arange(new_tokens) + cached
            h = self.decoder.embed_tokens(input_ids) + self.decoder.embed_positions.weight[positions]
            future = torch.arange(cached + new_tokens)[None, :] > positions[:, None]
            present = []
            for i, layer in enumerate(self.decoder.layers):
                att = layer.self_attn
                x = layer.self_attn_layer_norm(h)
                q = heads(att.q_proj(x) * att.scaling, self.n_heads)
                k = torch.cat([past[2 * i], heads(att.k_proj(x), self.n_heads)], dim=2)
                v = torch.cat([past[2 * i + 1], heads(att.v_proj(x), self.n_heads)], dim=2)
                present += [k, v]
                h = h + att.out_proj(attend(q, k, v, future))
                att = layer.encoder_attn
                x = layer.encoder_attn_layer_norm(h)
                q = heads(att.q_proj(x) * att.scaling, self.n_heads)
                h = h + att.out_proj(attend(q, cross[2 * i], cross[2 * i + 1], k_transposed=True))
                x = layer.final_layer_norm(h)
                h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
            logits = self.proj_out(self.decoder.layer_norm(h))
            return (logits, *present)

    return Encoder, CrossKV, DecoderStep


def graph_modules(bundle, buckets=(WINDOW_S,)) -> dict:
    """The graphs of every bucket as eager torch modules over ``bundle.model``'s own layers (hooks
    fire). Only the encoder differs between buckets; the others are shared."""
    Encoder, CrossKV, DecoderStep = _modules()
    cross, step = CrossKV(bundle.model).eval(), DecoderStep(bundle.model).eval()
    mods = {}
    for b in buckets:
        mods[bucket_name("encoder", b)] = Encoder(bundle.model, bucket_frames(bundle.config, b)).eval()
        mods[bucket_name("cross_kv", b)] = cross
        mods[bucket_name("decoder_step", b)] = step
    return mods


def graph_signatures(config, buckets=(WINDOW_S,)) -> dict[str, tuple[list[str], list[str]]]:
    """Input and output names of every graph (the same in every bucket)."""
    n = config.decoder_layers
    kv = lambda p: [f"{p}_{t}.{i}" for i in range(n) for t in ("k", "v")]  # noqa: E731
    sig = {
        "encoder": (["input_features"], ["encoder_hidden_states"]),
        "cross_kv": (["encoder_hidden_states"], kv("cross")),
        "decoder_step": (["input_ids", *kv("past"), *kv("cross")], ["logits", *kv("present")]),
    }
    return {bucket_name(w, b): sig[w] for b in buckets for w in GRAPH_NAMES}


def _example_inputs(config, seconds: int = WINDOW_S):
    import torch

    n, h = config.decoder_layers, config.decoder_attention_heads
    dh = config.d_model // h
    src = config.max_source_positions * seconds // WINDOW_S
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, config.num_mel_bins, 2 * src, generator=g)
    enc = torch.randn(1, src, config.d_model, generator=g)
    ids = torch.tensor([[config.decoder_start_token_id] * 3])
    past = [torch.randn(1, h, 2, dh, generator=g) for _ in range(2 * n)]
    cross = [torch.randn(*((1, h, dh, src) if i % 2 == 0 else (1, h, src, dh)), generator=g) for i in range(2 * n)]
    return {"encoder": (feats,), "cross_kv": (enc,), "decoder_step": (ids, *past, *cross)}


def export_graph(bundle, name: str):
    """Export one graph (``encoder``, ``decoder_step@10s``, ...); returns an ``onnx.ModelProto``
    with stable initializer names."""
    import onnx
    import torch

    config = bundle.config
    which, seconds = split_name(name)
    module = graph_modules(bundle, (seconds,))[name]
    inputs, outputs = graph_signatures(config, (seconds,))[name]
    args = _example_inputs(config, seconds)[which]
    dynamic = None
    if which == "decoder_step":
        tokens = torch.export.Dim("T", min=1, max=config.max_target_positions)
        cached = torch.export.Dim("P", min=0, max=config.max_target_positions)
        n = config.decoder_layers
        dynamic = ({1: tokens}, tuple([{2: cached}] * (2 * n) + [None] * (2 * n)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
            external_data=False,
        )
    model = program.model_proto
    _rename_initializers(model, module)
    _strip_provenance(model)
    model.graph.name = name
    onnx.checker.check_model(model)
    return model


KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)  # the module path each node came from


def _strip_provenance(model) -> None:
    """Drop per-node stack traces and FX dumps: they hold source paths and line numbers, so
    the same model would export to different bytes from different checkouts."""
    for node in model.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_METADATA]
        del node.metadata_props[:]
        for key, value in kept:
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value


def _rename_initializers(model, module) -> None:
    """Give every weight initializer its module path; transposed copies keep the path too."""
    import onnx.numpy_helper as nh

    by_content: dict[tuple, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        a = p.detach().numpy()
        by_content.setdefault((a.shape, a.tobytes()), name)
        if a.ndim == 2:
            t = np.ascontiguousarray(a.T)
            by_content.setdefault((t.shape, t.tobytes()), name)
    renames: dict[str, str] = {}
    taken = {init.name for init in model.graph.initializer}
    for init in model.graph.initializer:
        a = nh.to_array(init)
        target = by_content.get((a.shape, a.tobytes()))
        if target is None or target == init.name:
            continue
        if target in taken:  # the same weight appears twice (tied or both layouts): keep both
            target = f"{target}.T"
            if target in taken:
                continue
        renames[init.name] = target
        taken.add(target)
    if not renames:
        return
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    for vi in model.graph.value_info:
        vi.name = renames.get(vi.name, vi.name)


def export_whisper(bundle, out_dir: Path | None = None, progress=None, buckets=(WINDOW_S,)) -> dict[str, Path]:
    """Export (or fetch from the cache) the three graphs of every bucket; returns their paths by
    graph name.

    The cache key is the model's source digest plus this exporter's version; the export is
    deterministic (stack traces and other source paths are stripped), so the same model gives
    the same bytes from any checkout.
    """
    key = hashlib.sha256(f"{bundle.source_digest}:{EXPORTER_VERSION}:{OPSET}".encode()).hexdigest()[:16]
    folder = Path(out_dir) if out_dir else cache_root() / "onnx" / f"{bundle.name}-{key}"
    paths = {}
    for which in bucket_names(buckets):
        path = folder / f"{which}.onnx"
        if not path.is_file():
            model = export_graph(bundle, which)
            with atomic_write(path) as f:
                f.write(model.SerializeToString())
        if progress:
            progress(which)
        paths[which] = path
    return paths


def load_onnx(path: str | Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FemtoccError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...: all mean a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FemtoccError(f"{path}: not a valid ONNX model ({first})") from None
    return model
