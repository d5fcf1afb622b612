"""Speech data: utterance lists from a folder, audio at 16 kHz mono, and speaker-disjoint splits.

A data folder is either

* a folder with ``transcripts.tsv`` (UTF-8, header ``file<TAB>text``, no quoting: each line is
  split on its first tab) and the audio files it names; an optional ``metadata.tsv`` with
  ``file`` and ``speaker`` columns gives speakers; or
* a LibriSpeech-layout tree: ``*.trans.txt`` files of ``ID TEXT`` lines beside ``ID.flac``.

Audio of any sample rate and channel count is mixed to mono and resampled to 16 kHz.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    id: str
    audio_path: Path
    text: str
    speaker: str

    def audio(self) -> np.ndarray:
        return load_audio(self.audio_path)


def load_audio(path: Path) -> np.ndarray:
    import soundfile as sf

    if not path.is_file():
        raise FemtoccError(f"audio file {path} does not exist")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise FemtoccError(f"audio file {path}: cannot decode ({e})") from None
    mono = samples.mean(axis=1)
    bad = int(np.count_nonzero(~np.isfinite(mono)))
    if bad:
        raise FemtoccError(f"audio file {path}: {bad} of {len(mono)} samples are NaN or infinite")
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = gcd(rate, SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a file that is not UTF-8 is a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FemtoccError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FemtoccError(f"{path}: cannot read ({e.strerror})") from None


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    lines = read_lines(path)
    if not lines or lines[0].split("\t")[:2] != ["file", "text"]:
        raise FemtoccError(f"{path}:1: expected the header 'file<TAB>text'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if "\t" not in line:
            raise FemtoccError(f"{path}:{number}: expected 'file<TAB>text', found no tab")
        file, text = line.split("\t", 1)
        if not file.strip():
            raise FemtoccError(f"{path}:{number}: empty file name")
        rows.append((file.strip(), text.strip()))
    return rows


def _speakers(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.tsv"
    if not meta.is_file():
        return {}
    lines = read_lines(meta)
    header = lines[0].split("\t") if lines else []
    if "file" not in header or "speaker" not in header:
        return {}
    fi, si = header.index("file"), header.index("speaker")
    out = {}
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) > max(fi, si):
            out[cols[fi]] = cols[si]
    return out


def load_dataset(folder: str | Path, limit: int | None = None) -> list[Utterance]:
    """All utterances of a data folder, in a stable order (sorted by id)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FemtoccError(f"data folder {folder} does not exist")
    utts: list[Utterance] = []
    tsv = folder / "transcripts.tsv"
    if tsv.is_file():
        speakers = _speakers(folder)
        for file, text in _read_tsv(tsv):
            path = folder / file
            if not path.is_file():
                raise FemtoccError(f"{tsv}: audio file {file} listed but not found in {folder}")
            utts.append(Utterance(Path(file).stem, path, text, speakers.get(file, Path(file).stem)))
    else:
        for trans in sorted(folder.rglob("*.trans.txt")):
            for number, line in enumerate(read_lines(trans), start=1):
                if not line.strip():
                    continue
                uid, _, text = line.partition(" ")
                path = trans.parent / f"{uid}.flac"
                if not path.is_file():
                    raise FemtoccError(f"{trans}:{number}: audio {path.name} not found")
                utts.append(Utterance(uid, path, text.strip(), uid.split("-")[0]))
    if not utts:
        raise FemtoccError(
            f"data folder {folder} has no utterances: expected transcripts.tsv or LibriSpeech *.trans.txt files"
        )
    utts.sort(key=lambda u: u.id)
    return utts[:limit] if limit else utts


def split_by_speaker(utts: list[Utterance], calib_fraction: float = 0.3) -> tuple[list[Utterance], list[Utterance]]:
    """Deterministic speaker-disjoint (calibration, evaluation) split.

    Speakers are ordered by a hash of their name and taken into calibration until it holds about
    ``calib_fraction`` of the utterances, so no speaker is in both parts.
    """
    by_speaker: dict[str, list[Utterance]] = {}
    for u in utts:
        by_speaker.setdefault(u.speaker, []).append(u)
    order = sorted(by_speaker, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    calib: list[Utterance] = []
    target = calib_fraction * len(utts)
    chosen = set()
    for s in order:
        if len(calib) >= target:
            break
        calib += by_speaker[s]
        chosen.add(s)
    evaluation = [u for u in utts if u.speaker not in chosen]
    return sorted(calib, key=lambda u: u.id), evaluation
