"""The sweep's bookkeeping and paired bootstrap (benchmarks/sweep.py) on small made-up sweeps."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(REPO / "benchmarks"))  # sweep.py imports its neighbour common.py
    try:
        spec = importlib.util.spec_from_file_location("sweep", REPO / "benchmarks" / "sweep.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def summary(model, dense_errors, rows, ids=("a", "b", "c", "d")):
    """A sweep JSON: 10 words per utterance; rows are (label, sparsity, errors, agreement errors)."""
    return {
        "model": model, "utterance_ids": list(ids), "utterance_words": [10] * len(ids),
        "dense_utterance_errors": dense_errors, "dense_utterance_words": [10] * len(ids),
        "dense": {"wer": 100 * sum(dense_errors) / (10 * len(ids))},
        "rows": [{"label": name, "sparsity": s, "wer": 100 * sum(e) / (10 * len(ids)), "utterance_errors": e, "hit_token_limit": 0,
                  "utterance_agreement_errors": a} for name, s, e, a in rows],
    }


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_bootstrap_finds_the_model_that_keeps_more_sparsity(sweep, tmp_path):
    # A: dense 10 %, +0 at 40 %, +50 at 50 %; B: dense 0 %, within +1.0 at both points
    a = summary("A", [1, 1, 1, 1], [("obs-uniform", 0.4, [1, 1, 1, 1], [3, 3, 3, 3]),
                                    ("obs-uniform", 0.5, [6, 6, 6, 6], [6, 6, 6, 6])])
    b = summary("B", [0, 0, 0, 0], [("obs-uniform", 0.4, [0, 0, 0, 0], [0, 0, 0, 1]),
                                    ("obs-uniform", 0.5, [0, 0, 0, 0], [1, 0, 0, 0])])
    result = sweep.compare(write(tmp_path, "a.json", a), write(tmp_path, "b.json", b), "obs-uniform", resamples=200)
    assert result["measured"] == [0.4, 0.5]
    assert result["P(B further)"] == 1.0 and result["P(same)"] == 0.0
    assert result["bootstrap"] == {"A": {"0.400": 1.0}, "B": {"0.500": 1.0}}
    assert set(result["agreement"]) == {"0.400", "0.500"}
    assert result["agreement"]["0.400"]["P(B lower)"] == 1.0
    assert result["agreement"]["0.400"]["A"] == pytest.approx(30.0)


def test_bootstrap_of_equal_models_is_a_tie(sweep, tmp_path):
    rows = [("obs-uniform", 0.4, [1, 2, 1, 2], [1, 1, 1, 1])]
    a, b = summary("A", [1, 2, 1, 2], rows), summary("B", [1, 2, 1, 2], rows)
    result = sweep.compare(write(tmp_path, "a.json", a), write(tmp_path, "b.json", b), "obs-uniform", resamples=100)
    assert result["P(same)"] == 1.0
    assert result["agreement"]["0.400"]["P(B lower)"] == 0.0


def test_compare_needs_the_same_evaluation_utterances(sweep, tmp_path):
    a = summary("A", [0, 0, 0, 0], [])
    b = summary("B", [0, 0, 0, 0], [], ids=("a", "b", "c", "e"))
    with pytest.raises(SystemExit, match="same evaluation utterances"):
        sweep.compare(write(tmp_path, "a.json", a), write(tmp_path, "b.json", b), "obs-uniform")


def test_a_sweep_keeps_the_earlier_points_it_does_not_rerun(sweep, tmp_path):
    earlier = summary("A", [1, 1, 1, 1], [("obs-uniform", 0.4, [1] * 4, [0] * 4), ("obs-uniform", 0.5, [2] * 4, [1] * 4),
                                          ("mp-local", 0.2, [3] * 4, [2] * 4)])
    earlier.update(evaluation_utterances=4, command="sweep.py --first", earlier_commands=[])
    path = tmp_path / "sweep-A.json"
    path.write_text(json.dumps(earlier))
    kept, commands = sweep.earlier_rows(path, {"obs-uniform": [0.5, 0.6]}, 4, 10.0)
    assert [(r["label"], r["sparsity"]) for r in kept] == [("obs-uniform", 0.4), ("mp-local", 0.2)]
    assert commands == ["sweep.py --first"]
    # another evaluation set (or dense WER): nothing is kept
    assert sweep.earlier_rows(path, {}, 5, 10.0) == ([], [])
    assert sweep.earlier_rows(path, {}, 4, 11.0) == ([], [])


def test_two_folds_pool_into_one_sweep_at_their_common_points(sweep, tmp_path):
    first = summary("A", [1, 1, 1, 1], [("obs-uniform", 0.4, [1, 1, 1, 1], [0] * 4),
                                        ("obs-uniform", 0.5, [2, 2, 2, 2], [1] * 4)])
    second = summary("A", [0, 0], [("obs-uniform", 0.4, [3, 3], [2, 2])], ids=("e", "f"))
    pooled = sweep.load_sweep(write(tmp_path, "a.json", first) + "+" + write(tmp_path, "a2.json", second))
    assert pooled["utterance_ids"] == ["a", "b", "c", "d", "e", "f"]
    assert pooled["dense"]["wer"] == pytest.approx(100 * 4 / 60)
    assert [(r["sparsity"], r["utterance_errors"]) for r in pooled["rows"]] == [(0.4, [1, 1, 1, 1, 3, 3])]
    assert pooled["rows"][0]["wer"] == pytest.approx(100 * 10 / 60)
    assert pooled["rows"][0]["utterance_agreement_errors"] == [0, 0, 0, 0, 2, 2]
    assert pooled["rows"][0]["agreement_wer"] == pytest.approx(100 * 4 / 60)
    with pytest.raises(SystemExit, match="disjoint utterances"):
        sweep.load_sweep(write(tmp_path, "a.json", first) + "+" + write(tmp_path, "a3.json", first))


def test_pooling_a_fold_without_agreement_drops_the_agreement(sweep, tmp_path):
    first = summary("A", [1, 1, 1, 1], [("obs-uniform", 0.4, [1, 1, 1, 1], [0] * 4)])
    older = summary("A", [0, 0], [("obs-uniform", 0.4, [3, 3], [2, 2])], ids=("e", "f"))
    del older["dense_utterance_words"]  # a sweep from before agreement errors were kept
    pooled = sweep.load_sweep(write(tmp_path, "a.json", first) + "+" + write(tmp_path, "a2.json", older))
    assert "dense_utterance_words" not in pooled
    assert "agreement_wer" not in pooled["rows"][0] and "utterance_agreement_errors" not in pooled["rows"][0]
    assert pooled["rows"][0]["wer"] == pytest.approx(100 * 10 / 60)
