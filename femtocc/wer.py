"""Word error rate with Whisper's English normalizer, corpus-level, via jiwer."""

from __future__ import annotations

import functools
import importlib.resources
import json

from femtocc.errors import FemtoccError


@functools.cache
def normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    try:
        spelling = json.loads(
            importlib.resources.files("whisper_normalizer").joinpath("normalizers/english.json").read_text()
        )
    except (ModuleNotFoundError, FileNotFoundError):
        raise FemtoccError("whisper-normalizer's english.json is missing: pip install whisper-normalizer") from None
    return EnglishTextNormalizer(spelling)


def normalize(text: str) -> str:
    return normalizer()(text)


def corpus_wer(references: list[str], hypotheses: list[str], whose: str = "the reference transcripts") -> dict:
    """Corpus WER in percent over normalized texts; utterances whose normalized reference is empty
    are scored by counting every hypothesis word as an insertion. ``whose`` names the references
    in the error raised when none has a word."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    extra_insertions = sum(len(h.split()) for r, h in zip(refs, hyps) if not r.strip())
    if not pairs:
        raise FemtoccError(f"all {len(refs)} of {whose} are empty after normalization: no reference words to "
                           "score against")
    out = jiwer.process_words([r for r, _ in pairs], [h if h.strip() else "" for _, h in pairs])
    words = sum(len(r.split()) for r, _ in pairs)
    errors = out.substitutions + out.deletions + out.insertions + extra_insertions
    return {
        "wer": 100.0 * errors / words,
        "words": words,
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions + extra_insertions,
    }


def utterance_errors(references: list[str], hypotheses: list[str]) -> list[tuple[int, int]]:
    """(errors, reference words) per utterance, scored as :func:`corpus_wer` scores the corpus (an
    empty reference counts every hypothesis word as an error): the sums give its WER, and they
    let a bootstrap resample utterances."""
    import jiwer

    out = []
    for r, h in zip(references, hypotheses, strict=True):
        r, h = normalize(r), normalize(h)
        if not r.strip():
            out.append((len(h.split()), 0))
            continue
        m = jiwer.process_words(r, h if h.strip() else "")
        out.append((m.substitutions + m.deletions + m.insertions, len(r.split())))
    return out
