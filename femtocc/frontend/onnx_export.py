"""Export Whisper to three ONNX graphs with torch's dynamo exporter (opset 18).

* ``encoder``: ``input_features f32[1, n_mels, 3000] -> encoder_hidden_states f32[1, 1500, d]``
* ``cross_kv``: ``encoder_hidden_states -> cross_k.{i}, cross_v.{i} f32[1, H, 1500, Dh]`` per decoder
  layer, run once per utterance;
* ``decoder_step``: ``input_ids i64[1, T]``, ``past_k.{i}, past_v.{i} f32[1, H, P, Dh]`` and the
  cross K/V ``-> logits f32[1, T, V]``, ``present_k.{i}, present_v.{i} f32[1, H, P+T, Dh]``.
  ``T`` new tokens (the whole prompt at once, then one at a time) after ``P`` cached ones.

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
EXPORTER_VERSION = 2
GRAPH_NAMES = ("encoder", "cross_kv", "decoder_step")


def _modules():
    import torch
    from torch import nn

    def heads(x, n_heads):
        b, t, d = x.shape
        return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)

    def merge(x):
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def attend(q, k, v, mask=None):
        scores = torch.matmul(q, k.transpose(2, 3))
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return merge(torch.matmul(torch.softmax(scores, dim=-1), v))

    class Encoder(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.encoder = hf.model.encoder

        def forward(self, input_features):
            return self.encoder(input_features).last_hidden_state

    class CrossKV(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.decoder = hf.model.decoder
            self.n_heads = hf.config.decoder_attention_heads

        def forward(self, encoder_hidden_states):
            out = []
            for layer in self.decoder.layers:
                att = layer.encoder_attn
                out.append(heads(att.k_proj(encoder_hidden_states), self.n_heads))
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
                h = h + att.out_proj(attend(q, cross[2 * i], cross[2 * i + 1]))
                x = layer.final_layer_norm(h)
                h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
            logits = self.proj_out(self.decoder.layer_norm(h))
            return (logits, *present)

    return Encoder, CrossKV, DecoderStep


def graph_modules(bundle) -> dict:
    """The three graphs as eager torch modules over ``bundle.model``'s own layers (hooks fire)."""
    Encoder, CrossKV, DecoderStep = _modules()
    mods = {"encoder": Encoder(bundle.model), "cross_kv": CrossKV(bundle.model), "decoder_step": DecoderStep(bundle.model)}
    return {k: m.eval() for k, m in mods.items()}


def graph_signatures(config) -> dict[str, tuple[list[str], list[str]]]:
    n = config.decoder_layers
    kv = lambda p: [f"{p}_{t}.{i}" for i in range(n) for t in ("k", "v")]  # noqa: E731
    return {
        "encoder": (["input_features"], ["encoder_hidden_states"]),
        "cross_kv": (["encoder_hidden_states"], kv("cross")),
        "decoder_step": (["input_ids", *kv("past"), *kv("cross")], ["logits", *kv("present")]),
    }


def _example_inputs(config):
    import torch

    n, h = config.decoder_layers, config.decoder_attention_heads
    dh = config.d_model // h
    src = config.max_source_positions
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, config.num_mel_bins, 2 * src, generator=g)
    enc = torch.randn(1, src, config.d_model, generator=g)
    ids = torch.tensor([[config.decoder_start_token_id] * 3])
    past = [torch.randn(1, h, 2, dh, generator=g) for _ in range(2 * n)]
    cross = [torch.randn(1, h, src, dh, generator=g) for _ in range(2 * n)]
    return {"encoder": (feats,), "cross_kv": (enc,), "decoder_step": (ids, *past, *cross)}


def export_graph(bundle, which: str):
    """Export one graph; returns an ``onnx.ModelProto`` with stable initializer names."""
    import onnx
    import torch

    config = bundle.config
    module = graph_modules(bundle)[which]
    inputs, outputs = graph_signatures(config)[which]
    args = _example_inputs(config)[which]
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
    model.graph.name = which
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


def export_whisper(bundle, out_dir: Path | None = None, progress=None) -> dict[str, Path]:
    """Export (or fetch from the cache) the three graphs; returns their paths.

    The cache key is the model's source digest plus this exporter's version; the export is
    deterministic (stack traces and other source paths are stripped), so the same model gives
    the same bytes from any checkout.
    """
    key = hashlib.sha256(f"{bundle.source_digest}:{EXPORTER_VERSION}:{OPSET}".encode()).hexdigest()[:16]
    folder = Path(out_dir) if out_dir else cache_root() / "onnx" / f"{bundle.name}-{key}"
    paths = {}
    for which in GRAPH_NAMES:
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
