"""Restrict a Whisper model's vocabulary to the tokens a corpus uses (issue 18: the decoder's
per-token cost).

Whisper's token embedding is tied to its output projection: one ``[V, d]`` table (51,864 x 384 on
tiny.en, 19.9 M of its 37.8 M parameters) that every decoder step reads whole to score the next
token. An English transcriber uses a few thousand of those tokens. :func:`restrict` keeps the
tokens the dense model itself writes on a training corpus (its greedy transcripts of the packed
training windows, the same cached teacher targets recovery training uses: no labels needed) plus
every token decoding needs (the prompt and end of text), optionally topped up to a size with the
most frequent tokens (:func:`fill`), and re-indexes them: token ``i`` of the
restricted model is token ``vocabulary[i]`` of the original. The table becomes ``[V', d]``, so both
the embedding lookup and the output projection shrink by ``V / V'``.

Guarantee: the restricted model computes the same hidden states as the original on any token
sequence of kept tokens, and its logits are the original's logits of the kept tokens
(``restricted_logits[i] == logits[vocabulary[i]]``); greedy decoding therefore picks the same
token whenever the original's choice is a kept token. Ids and text are mapped back through
``metadata["vocabulary"]`` (:meth:`WhisperBundle.original_ids`, :meth:`WhisperBundle.text`), which
``save_bundle`` writes and ``load_whisper`` reads back.
"""

from __future__ import annotations

import copy
import hashlib

from femtocc.errors import FemtoccError


def corpus_tokens(teacher, utts, seed: int = 0, progress: bool = False) -> set[int]:
    """The tokens the teacher writes on ``utts`` (packed into 30-s windows, transcribed greedily;
    the transcripts are cached with the teacher targets of recovery training)."""
    from femtocc.train_data import load_targets, pack, teacher_targets

    if not utts:
        raise FemtoccError("--vocabulary-from: the folder has no utterances")
    windows = pack(utts, seed=seed)
    folder = teacher_targets(teacher, windows, k=16, hidden=True, progress=progress)
    used: set[int] = set()
    for w in windows:
        used.update(int(t) for t in load_targets(folder, w)["tokens"])
    return used


def fill(keep: set[int], size: int, vocab_size: int) -> set[int]:
    """``keep`` topped up to ``size`` tokens with the lowest ids it lacks: byte-level BPE numbers its
    tokens in merge order, so low ids are the frequent pieces (the bytes, common words)."""
    out = set(keep)
    for t in range(vocab_size):
        if len(out) >= size:
            break
        out.add(t)
    return out


def restrict(bundle, keep: set[int] | list[int], source: dict | None = None):
    """A copy of ``bundle`` whose vocabulary is ``keep`` plus the tokens decoding needs, in original
    id order; its ``metadata["vocabulary"]`` maps new ids to original ones."""
    import torch
    from torch import nn

    from femtocc.frontend.whisper import DecodeSettings

    if bundle.metadata.get("vocabulary"):
        raise FemtoccError(f"{bundle.name}: the vocabulary is already restricted")
    d = bundle.decode
    size = bundle.model.config.vocab_size
    vocabulary = sorted(set(int(t) for t in keep) | set(d.prompt) | {d.eot})
    if vocabulary[0] < 0 or vocabulary[-1] >= size:
        raise FemtoccError(f"vocabulary: token ids must lie in [0, {size}), got {vocabulary[0]}..{vocabulary[-1]}")
    index = {t: i for i, t in enumerate(vocabulary)}
    out = copy.copy(bundle)
    out.model = copy.deepcopy(bundle.model)
    decoder = out.model.model.decoder
    table = decoder.embed_tokens.weight.detach()[torch.tensor(vocabulary)].clone()
    decoder.embed_tokens = nn.Embedding(len(vocabulary), table.shape[1], padding_idx=None)
    decoder.embed_tokens.weight = nn.Parameter(table)
    out.model.proj_out = nn.Linear(table.shape[1], len(vocabulary), bias=False)
    out.model.proj_out.weight = decoder.embed_tokens.weight  # tied, as in Whisper
    out.model.config.vocab_size = len(vocabulary)
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(out.model.config, key, None)
        if value is not None:
            setattr(out.model.config, key, index.get(int(value), index[d.eot]))
    out.decode = DecodeSettings(
        prompt=tuple(index[t] for t in d.prompt), eot=index[d.eot],
        suppress=tuple(index[t] for t in d.suppress if t in index),
        suppress_begin=tuple(index[t] for t in d.suppress_begin if t in index),
        max_target_positions=d.max_target_positions, multilingual=d.multilingual,
    )
    out.model.generation_config = copy.deepcopy(bundle.model.generation_config)
    out.model.generation_config.suppress_tokens = list(out.decode.suppress)
    out.model.generation_config.begin_suppress_tokens = list(out.decode.suppress_begin)
    out.model.generation_config.forced_decoder_ids = None
    out.metadata = {**bundle.metadata, "vocabulary": vocabulary,
                    "vocabulary_source": {**(source or {}), "kept": len(vocabulary), "of": size}}
    digest = hashlib.sha256(f"{bundle.source_digest}:vocabulary:{vocabulary}".encode()).hexdigest()
    out.source_digest = digest  # a new model (its export and calibration caches are its own)
    return out
