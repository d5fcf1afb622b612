"""Issue 16, part 1: training windows packed from real training speech, seeded augmentation, and
the teacher's cached targets."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from femtocc.data import SAMPLE_RATE, Utterance, load_dataset
from femtocc.train_data import Augment, Window, load_targets, pack, packing_stats, teacher_targets

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "train"


@pytest.fixture(scope="module")
def train_utts():
    if not (TRAIN / "transcripts.tsv").is_file():
        pytest.skip(f"training speech not found at {TRAIN}")
    return load_dataset(TRAIN)


def test_the_training_folder_loads_with_its_empty_transcripts(train_utts):
    assert len(train_utts) == 1946 and sum(not u.text for u in train_utts) == 273
    assert {u.audio_path.suffix for u in train_utts} == {".flac", ".ogg"}
    assert len({u.speaker for u in train_utts}) == 567


def test_packing_fills_windows_with_every_utterance_once(train_utts):
    utts = train_utts[:120]
    windows = pack(utts, seed=3)
    assert sorted(u.id for w in windows for u in w.utterances) == sorted(u.id for u in utts)
    assert all(w.speech_s + w.gap_s * (len(w.utterances) - 1) <= 30.0 for w in windows)
    assert [[u.id for u in w.utterances] for w in pack(utts, seed=3)] == [[u.id for u in w.utterances] for w in windows]
    assert [[u.id for u in w.utterances] for w in pack(utts, seed=4)] != [[u.id for u in w.utterances] for w in windows]
    single = pack(utts, seed=3, per_window=1)
    assert len(single) == 120 and all(len(w.utterances) == 1 for w in single)
    gain = packing_stats(windows)["speech_s_per_window"] / packing_stats(single)["speech_s_per_window"]
    assert gain >= 3.0, gain


def test_window_audio_is_the_utterances_with_gaps_and_augmentation_is_seeded(train_utts):
    (w,) = pack(train_utts[:3], seed=0, window_s=60.0)
    audio = w.audio()
    expected = sum(len(u.audio()) for u in w.utterances) + 2 * int(round(w.gap_s * SAMPLE_RATE))
    assert len(audio) == expected
    first = w.utterances[0].audio()
    assert np.array_equal(audio[: len(first)], first)
    aug = Augment(speed=(0.9, 1.1), gain_db=6.0, snr_db=(20.0, 30.0))
    windows = pack(train_utts[:12], seed=0, augment=aug)
    a, b = windows[0].audio(), windows[0].audio()
    assert np.array_equal(a, b) and not np.array_equal(a[:1000], windows[0].utterances[0].audio()[:1000])
    assert len(a) <= 30 * SAMPLE_RATE and np.abs(a).max() <= 1.0
    ratio = len(a) / len(replace(windows[0], augment=Augment()).audio())  # speed 0.9 lengthens, 1.1 shortens
    assert min(abs(ratio - 1 / 0.9), abs(ratio - 1 / 1.1)) < 0.01, ratio
    assert not np.array_equal(windows[1].audio()[:1000], replace(windows[1], augment=Augment()).audio()[:1000])


def test_augment_spec_and_seeded_masks():
    from femtocc.errors import FemtoccError
    from femtocc.train_data import targets_key

    aug = Augment.parse("gain=6, snr=15:35,freq=2x12,time=3x40")
    assert (aug.gain_db, aug.snr_db, aug.freq_masks, aug.time_masks) == (6.0, (15.0, 35.0), (2, 12), (3, 40))
    assert aug.waveform and aug.masks and not Augment.parse("freq=1x5").waveform and not Augment().active
    for bad in ("gain=-1", "snr=30:10", "freq=2", "time=0x0", "gain", "pitch=2"):
        with pytest.raises(FemtoccError, match="--augment"):
            Augment.parse(bad)
    feats = np.ones((1, 80, 3000), np.float32)
    a, b = (aug.mask(feats, np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(a, b) and feats.min() == 1.0  # seeded, and a copy
    zero_bands, zero_frames = (a == 0).all(axis=2)[0], (a == 0).all(axis=1)[0]
    assert 0 < zero_bands.sum() <= 24 and 0 < zero_frames.sum() <= 120
    assert ((a == 0) == (zero_bands[:, None] | zero_frames[None, :])).all()  # whole bands and frames only

    class Teacher:
        source_digest = "d"

    # masks never reach the teacher, so they leave its cached targets' key as it was
    utt = Utterance("u", Path(__file__), "", "s")
    window = Window(0, (utt,), (1.0,))
    assert targets_key(Teacher, [window], 8, True) == targets_key(
        Teacher, [replace(window, augment=Augment(freq_masks=(2, 9)))], 8, True)


def test_teacher_targets_align_with_their_tokens_and_are_cached(train_utts, tiny, tmp_path):
    windows = pack(train_utts[:8], seed=1)[:2]
    folder = teacher_targets(tiny, windows, k=8, hidden=True, folder=tmp_path / "t")
    prompt = list(tiny.decode.prompt)
    for w in windows:
        t = load_targets(folder, w)
        tokens = list(t["tokens"])
        assert len(tokens) > 10 and t["topk_logp"].dtype == np.float16 and t["encoder"].shape == (1500, 384)
        assert t["topk_logp"].shape == t["topk_ids"].shape == (len(prompt) + len(tokens), 8)
        # position i predicts token i + 1 of prompt + tokens + end of text
        following = tokens + [tiny.decode.eot]
        hits = [following[j] in t["topk_ids"][len(prompt) - 1 + j] for j in range(len(following))]
        assert all(hits)
        assert np.all(np.diff(t["topk_logp"].astype(np.float32), axis=1) <= 0)
    # done once: a second call reuses the files; an interrupted run redoes only what is missing
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("window-*.npz")}
    assert teacher_targets(tiny, windows, k=8, hidden=True, folder=folder) == folder
    (folder / "targets.json").unlink()
    (folder / "window-00001.npz").unlink()
    teacher_targets(tiny, windows, k=8, hidden=True, folder=folder)
    assert (folder / "window-00000.npz").stat().st_mtime_ns == stamps["window-00000.npz"]
    assert np.array_equal(load_targets(folder, windows[1])["tokens"], load_targets(folder, windows[1])["tokens"])
    assert (folder / "targets.json").is_file()
