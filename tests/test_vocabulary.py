"""Restricting tiny.en's vocabulary to the tokens a corpus uses (passes/vocabulary.py)."""

import json

import numpy as np
import pytest
import torch

from femtocc.cli import main
from femtocc.errors import FemtoccError


def small_folder(dev_utts, tmp_path, n=4):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = ["file\ttext"]
    for u in dev_utts[:n]:
        (folder / u.audio_path.name).symlink_to(u.audio_path)
        lines.append(f"{u.audio_path.name}\t{u.text}")
    (folder / "transcripts.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_restricted_logits_are_the_kept_rows_of_the_full_ones(tiny):
    from femtocc.passes.vocabulary import restrict

    keep = {11, 13, 262, 290, 257, 318}
    small = restrict(tiny, keep)
    vocab = small.metadata["vocabulary"]
    assert vocab == sorted(keep | set(tiny.decode.prompt) | {tiny.decode.eot})
    assert small.model.config.vocab_size == len(vocab) and small.decode.eot == vocab.index(tiny.decode.eot)
    assert small.original_ids(small.decode.prompt) == list(tiny.decode.prompt)
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = [vocab.index(t) for t in (*tiny.decode.prompt, 262, 290)]
    with torch.no_grad():
        full = tiny.model(input_features=feats, decoder_input_ids=torch.tensor([small.original_ids(ids)])).logits
        mine = small.model(input_features=feats, decoder_input_ids=torch.tensor([ids])).logits
    np.testing.assert_allclose(mine.numpy(), full[..., vocab].numpy(), rtol=1e-5, atol=1e-5)
    assert tiny.model.config.vocab_size == 51864  # the original is untouched
    with pytest.raises(FemtoccError, match="already restricted"):
        restrict(small, keep)


def test_prune_vocabulary_from_a_corpus_decodes_the_same(tiny, dev_utts, tmp_path, capsys):
    """The kept tokens are the ones tiny.en writes on the corpus (packed into windows); wherever its
    transcript of an utterance uses only kept tokens, the restricted model writes the same one."""
    from femtocc.decode import TorchBackend, transcribe
    from femtocc.frontend.whisper import load_whisper

    corpus = small_folder(dev_utts, tmp_path)
    out = tmp_path / "tiny-vocab"
    assert main(["prune", "whisper-tiny.en", "--sparsity", "0", "--vocabulary-from", str(corpus), "-o", str(out),
                 "--quiet"]) == 0
    assert "vocabulary: kept" in capsys.readouterr().out
    small = load_whisper(str(out))
    manifest = json.loads((out / "femtocc.json").read_text())
    assert manifest["metadata"]["vocabulary_source"]["of"] == 51864
    assert small.model.config.vocab_size == len(manifest["metadata"]["vocabulary"]) < 1000
    theirs = transcribe(tiny, TorchBackend(tiny), dev_utts[:4])
    mine = transcribe(small, TorchBackend(small), dev_utts[:4])
    kept = set(manifest["metadata"]["vocabulary"])
    covered = [(a, b) for a, b in zip(mine, theirs) if set(b.tokens) <= kept]
    assert covered and all(a.hypothesis == b.hypothesis for a, b in covered)
    assert all(set(small.metadata["vocabulary"][t] for t in a.tokens) <= kept for a in mine)
    topped = tmp_path / "tiny-vocab-1000"
    assert main(["prune", "whisper-tiny.en", "--sparsity", "0", "--vocabulary-from", str(corpus), "--vocabulary-size",
                 "1000", "-o", str(topped), "--quiet"]) == 0
    vocab = json.loads((topped / "femtocc.json").read_text())["metadata"]["vocabulary"]
    assert len(vocab) == 1000 and kept <= set(vocab) and set(range(100)) <= set(vocab)


def test_vocabulary_with_recovery_is_refused(dev_data, tmp_path, capsys):
    assert main(["prune", "whisper-tiny.en", "--vocabulary-size", "10", "-o", str(tmp_path / "x")]) == 2
    assert "--vocabulary-size needs --vocabulary-from" in capsys.readouterr().err
    code = main(["prune", "whisper-tiny.en", "--schedule", "oneshot:0.5:0.5:1", "--train", str(dev_data),
                 "--vocabulary-from", str(dev_data), "-o", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "--vocabulary-from restricts a finished model" in capsys.readouterr().err
