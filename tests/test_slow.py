"""Whole dev set and both models. Run with: python -m pytest -m slow"""

import pytest

pytestmark = pytest.mark.slow


def test_all_backends_give_the_same_193_transcripts(tiny, dev_utts):
    from femtocc.backends import BACKENDS, make_backend
    from femtocc.decode import transcribe

    texts = {b: [t.hypothesis for t in transcribe(tiny, make_backend(tiny, b), dev_utts)] for b in BACKENDS}
    assert len(texts["torch"]) == 193
    assert texts["torch"] == texts["onnxruntime"] == texts["ir"]


def test_whisper_base_loads_and_transcribes(dev_utts):
    from femtocc.backends import make_backend
    from femtocc.decode import score, transcribe
    from femtocc.frontend.whisper import load_whisper

    base = load_whisper("whisper-base")
    assert base.decode.multilingual and len(base.decode.prompt) == 4
    utts = dev_utts[:8]
    torch_t = transcribe(base, make_backend(base, "torch"), utts)
    ort_t = transcribe(base, make_backend(base, "onnxruntime"), utts)
    assert [t.hypothesis for t in torch_t] == [t.hypothesis for t in ort_t]
    assert score(torch_t)["wer"] < 25


def test_dense_wer_matches_transformers_generate_on_the_dev_set(tiny, dev_utts):
    import torch

    from femtocc.decode import TorchBackend, transcribe
    from femtocc.wer import corpus_wer

    ours = transcribe(tiny, TorchBackend(tiny), dev_utts)
    extractor, gc = tiny.feature_extractor(), tiny.generation_config()
    theirs = []
    for u in dev_utts:
        f = extractor(u.audio(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            theirs.append(tiny.text(tiny.model.generate(f, generation_config=gc)[0]))
    refs = [u.text for u in dev_utts]
    same = sum(a.hypothesis == b for a, b in zip(ours, theirs))
    # generate has no duration bound: only runaways (which our loop stops) may differ
    assert same >= len(dev_utts) - sum(t.hit_limit for t in ours)
    assert corpus_wer(refs, [t.hypothesis for t in ours])["wer"] == pytest.approx(corpus_wer(refs, theirs)["wer"], abs=0.3)
