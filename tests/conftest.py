"""Shared fixtures. Real-model tests read speech from ../shared/data/speech/dev (or $FEMTOCC_DEV_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FEMTOCC_DEV_DATA", REPO.parent / "shared" / "data" / "speech" / "dev"))


@pytest.fixture(scope="session")
def dev_data() -> Path:
    if not (DEV / "transcripts.tsv").is_file():
        pytest.skip(f"speech data not found at {DEV} (set FEMTOCC_DEV_DATA)")
    return DEV


@pytest.fixture(scope="session")
def tiny():
    from femtocc.frontend.whisper import load_whisper

    return load_whisper("whisper-tiny.en")


@pytest.fixture(scope="session")
def tiny_onnx(tiny):
    from femtocc.frontend.onnx_export import export_whisper

    return export_whisper(tiny)


@pytest.fixture(scope="session")
def dev_utts(dev_data):
    from femtocc.data import load_dataset

    return load_dataset(dev_data)


@pytest.fixture(scope="session")
def features(tiny, dev_utts):
    """Log-mel features of one real utterance."""
    extractor = tiny.feature_extractor()
    audio = dev_utts[10].audio()
    return extractor(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
