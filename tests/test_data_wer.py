import numpy as np
import pytest
import soundfile as sf

from femtocc.data import SAMPLE_RATE, load_audio, load_dataset, split_by_speaker
from femtocc.errors import FemtoccError
from femtocc.wer import corpus_wer, normalize, utterance_errors


def tone(seconds=0.5, rate=SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def write_tsv(folder, lines):
    (folder / "transcripts.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_stereo_44k_is_mixed_and_resampled(tmp_path):
    stereo = np.stack([tone(1.0, 44100), -tone(1.0, 44100) * 0.5], axis=1)
    sf.write(tmp_path / "a.wav", stereo, 44100)
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == SAMPLE_RATE
    assert 0.05 < np.abs(audio).max() < 0.2  # (1 - 0.5) / 2 * 0.3 = 0.075


def test_transcripts_tsv_folder(tmp_path):
    sf.write(tmp_path / "b.wav", tone(), SAMPLE_RATE)
    sf.write(tmp_path / "a.wav", tone(), SAMPLE_RATE)
    write_tsv(tmp_path, ["file\ttext", 'b.wav\tHe said "hi"\tand left', "a.wav\tHello."])
    utts = load_dataset(tmp_path)
    assert [u.id for u in utts] == ["a", "b"]
    assert utts[1].text == 'He said "hi"\tand left'  # split on the first tab only, no quoting


def test_librispeech_layout(tmp_path):
    d = tmp_path / "84" / "121123"
    d.mkdir(parents=True)
    sf.write(d / "84-121123-0000.flac", tone(), SAMPLE_RATE)
    (d / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n")
    utts = load_dataset(tmp_path)
    assert [(u.id, u.text, u.speaker) for u in utts] == [("84-121123-0000", "GO DO YOU HEAR", "84")]


@pytest.mark.parametrize(
    "lines, files, message",
    [
        (["file\ttext", "a.wav\thello"], [], r"transcripts.tsv: audio file a.wav listed but not found"),
        (["name,text", "a.wav,hello"], ["a.wav"], r"transcripts.tsv:1: expected the header 'file<TAB>text'"),
        (["file\ttext", "a.wav hello"], ["a.wav"], r"transcripts.tsv:2: expected 'file<TAB>text', found no tab"),
    ],
)
def test_bad_folders_give_clear_errors(tmp_path, lines, files, message):
    for f in files:
        sf.write(tmp_path / f, tone(), SAMPLE_RATE)
    write_tsv(tmp_path, lines)
    with pytest.raises(FemtoccError, match=message):
        load_dataset(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(FemtoccError, match="has no utterances"):
        load_dataset(tmp_path)
    with pytest.raises(FemtoccError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_undecodable_audio(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF-not-really")
    with pytest.raises(FemtoccError, match="a.wav: cannot decode"):
        load_audio(tmp_path / "a.wav")


def test_normalizer_and_corpus_wer():
    assert normalize("Mr. Smith's colour, 20 dollars!") == normalize("mister smith's color twenty dollars")
    r = corpus_wer(["the cat sat", "on the mat"], ["the cat sat", "on a mat"])
    assert r["wer"] == pytest.approx(100 / 6)
    assert (r["substitutions"], r["deletions"], r["insertions"], r["words"]) == (1, 0, 0, 6)
    r = corpus_wer(["hello world", "uh"], ["", "extra words"])  # empty hypothesis, empty normalized reference
    assert r["wer"] == pytest.approx(200.0)


def test_utterance_errors_sum_to_the_corpus_wer():
    refs = ["the cat sat", "on the mat", "hello world", "uh", "Mr. Smith paid 20 dollars"]
    hyps = ["the cat sat down", "on a mat", "", "extra words", "mister smith paid twenty dollars"]
    per = utterance_errors(refs, hyps)
    assert per == [(1, 3), (1, 3), (2, 2), (2, 0), (0, 4)]  # "20 dollars" normalizes to "$20"
    errors, words = map(sum, zip(*per))
    assert 100 * errors / words == pytest.approx(corpus_wer(refs, hyps)["wer"])


def test_speaker_split_is_disjoint_and_deterministic(dev_utts):
    calib, evaluation = split_by_speaker(dev_utts)
    assert {u.speaker for u in calib}.isdisjoint({u.speaker for u in evaluation})
    assert len(calib) + len(evaluation) == len(dev_utts) == 193
    assert 0.25 * 193 <= len(calib) <= 0.45 * 193
    assert [u.id for u in split_by_speaker(dev_utts)[0]] == [u.id for u in calib]
