"""OBS and magnitude pruning on small random layers; sparse-pattern bookkeeping."""

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, TensorType
from femtocc.passes import PassManager
from femtocc.passes.obs import magnitude_mask, obs_prune, relative_error
from femtocc.passes.sparsity import Pattern, describe, mask_follows, parse_pattern

rng = np.random.default_rng(7)


def layer(rows=64, cols=128, samples=1000, correlated=True):
    x = rng.standard_normal((samples, cols))
    if correlated:  # activations live near a low-dimensional subspace, as real ones do
        x = x[:, : cols // 4] @ rng.standard_normal((cols // 4, cols)) + 0.1 * x
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    h = 2 * x.T @ x / samples
    return w, h, x


def output_error(w, w_new, x):
    return float(np.linalg.norm(x @ (w - w_new).T))


@pytest.mark.parametrize("pattern", ["unstructured", "pencil8", "2:4"])
def test_obs_beats_magnitude_on_reconstruction_error(pattern):
    w, h, x = layer()
    p = parse_pattern(pattern)
    r = obs_prune(w, h, 0.5, p)
    magnitude = np.where(magnitude_mask(w, 0.5, p), 0, w)
    assert output_error(w, r.weight, x) < 0.6 * output_error(w, magnitude, x)
    assert r.error == pytest.approx(relative_error(w, r.weight, h), rel=1e-6)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.37), ("pencil8", 0.5), ("pencil8", 0.8), ("2:4", 0.5), ("1:4", 0.75)])
def test_exact_sparsity_and_valid_pattern(pattern, sparsity):
    w, h, _ = layer()
    p = parse_pattern(pattern)
    r = obs_prune(w, h, sparsity, p)
    assert np.all(r.weight[r.mask] == 0)
    assert np.count_nonzero(r.weight) == np.count_nonzero(~r.mask)  # no other zeros appear by accident
    assert abs(r.mask.mean() - sparsity) < 1 / 128
    assert mask_follows(r.mask, p)
    m = magnitude_mask(w, sparsity, p)
    assert abs(m.mean() - sparsity) < 1 / 128 and mask_follows(m, p)


@pytest.mark.parametrize("pattern", ["unstructured", "pencil8", "2:4"])
def test_refit_solves_each_row_exactly_for_the_obs_mask(pattern):
    w, h, _ = layer(rows=16, cols=48)
    p = parse_pattern(pattern)
    plain = obs_prune(w, h, 0.5, p, refit_iterations=0)
    refit = obs_prune(w, h, 0.5, p, refit_iterations=100)
    assert np.array_equal(refit.mask, plain.mask)
    assert np.all(refit.weight[refit.mask] == 0)
    assert refit.unrefit_error == pytest.approx(plain.error, rel=1e-6)
    assert refit.error < 0.95 * plain.error
    # the exact optimum per row, on the damped Hessian the refit uses: kept weights K solve
    # H'_KK d_K = H'_KP w_P (d = w_new - w, the pruned weights P set to zero)
    hd = h + refit.damping * np.mean(np.diag(h)) * np.eye(h.shape[0])
    for r in range(w.shape[0]):
        keep, cut = ~refit.mask[r], refit.mask[r]
        d = np.linalg.solve(hd[np.ix_(keep, keep)], hd[np.ix_(keep, cut)] @ w[r, cut].astype(np.float64))
        np.testing.assert_allclose(refit.weight[r, keep], w[r, keep] + d, rtol=1e-3, atol=1e-4)


def test_pencil_and_nm_masks_are_checked():
    p8, p24 = parse_pattern("pencil8"), parse_pattern("2:4")
    mask = np.zeros((16, 8), bool)
    mask[0:8, 3] = True
    assert mask_follows(mask, p8)
    mask[9, 4] = True  # a lone weight inside a pencil
    assert not mask_follows(mask, p8)
    nm = np.zeros((2, 8), bool)
    nm[:, [0, 1, 4, 6]] = True
    assert mask_follows(nm, p24)
    nm[0, 4] = False  # three kept in the second group of row 0
    assert not mask_follows(nm, p24)


def test_singular_hessian_is_damped_and_dead_inputs_pruned():
    w, _, _ = layer(rows=32, cols=64)
    x = rng.standard_normal((10, 64))  # 10 samples for 64 inputs: rank 10
    x[:, 5] = 0.0  # an input that never fires
    h = 2 * x.T @ x / 10
    r = obs_prune(w, h, 0.5, parse_pattern("unstructured"))
    assert np.isfinite(r.weight).all()
    assert r.dead_inputs == 1 and np.all(r.weight[:, 5] == 0)
    assert r.damping in (0.01, 0.03, 0.1, 0.3, 1.0)
    r2 = obs_prune(w, h, 0.5, parse_pattern("unstructured"), damping=0.3)
    assert r2.damping == 0.3
    with pytest.raises(FemtoccError, match="not positive definite"):
        obs_prune(w, -np.eye(64), 0.5, parse_pattern("unstructured"), damping=0.0)


@pytest.mark.parametrize("pattern", ["unstructured", "pencil8"])
def test_admm_mask_search_keeps_the_count_and_lowers_the_error(pattern):
    w, h, _ = layer(rows=32, cols=96, samples=2000)
    p = parse_pattern(pattern)
    plain = obs_prune(w, h, 0.6, p)
    searched = obs_prune(w, h, 0.6, p, admm_iterations=60)
    assert searched.mask.sum() == plain.mask.sum() and mask_follows(searched.mask, p)
    assert np.all(searched.weight[searched.mask] == 0)
    assert searched.error < 0.95 * plain.error
    with pytest.raises(FemtoccError, match="not N:M"):
        obs_prune(w, h, 0.5, parse_pattern("2:4"), admm_iterations=10)


def test_heldout_part_of_the_hessian_and_speaker_halves():
    from femtocc.data import Utterance
    from femtocc.passes.calibrate import Hessians, heldout_speakers

    _, _, x = layer(rows=8, cols=16, samples=30)
    fit, held = x[:18], x[18:]
    h = Hessians({"l": 2 * x.T @ x / 30}, {"l": 30}, 4, {"l": 2 * held.T @ held / 12}, {"l": 12})
    assert np.allclose(h.fit_matrix("l"), 2 * fit.T @ fit / 18)
    utts = [Utterance(f"u{i}", None, "", s) for i, s in enumerate("cabab")]
    assert heldout_speakers(utts) == {"b"}
    with pytest.raises(FemtoccError, match="at least 2 speakers, got 1"):
        heldout_speakers(utts[:1])


def test_overfit_shows_on_heldout_samples():
    # 12 samples for 64 inputs: OBS fits the calibration samples far better than new ones
    w, _, x = layer(rows=32, cols=64, samples=112)
    fit, held = x[:12], x[12:]
    r = obs_prune(w, 2 * fit.T @ fit / 12, 0.5, parse_pattern("unstructured"))
    assert relative_error(w, r.weight, 2 * held.T @ held / 100) > 3 * r.error


def test_global_magnitude_threshold():
    w = np.array([[0.1, -2.0, 0.3, 4.0]], np.float32)
    m = magnitude_mask(w, 0.0, parse_pattern("unstructured"), threshold=0.3)
    assert m.tolist() == [[True, False, True, False]]


def test_pattern_parsing():
    assert parse_pattern("2:4").fixed_sparsity == 0.5
    assert parse_pattern("pencil8").name == "pencil8"
    assert parse_pattern("pencil16") == Pattern("pencil", m=16)  # another target's pencil height
    for bad in ("pencil0", "4:2", "block", "0:4"):
        with pytest.raises(FemtoccError, match="unknown sparsity pattern"):
            parse_pattern(bad)


def test_describe_and_annotate_sparsity():
    w = rng.standard_normal((16, 8)).astype(np.float32)
    assert describe(w)["format"] == "dense"
    w2 = w.copy()
    w2[0:8, [1, 5]] = 0
    assert describe(w2) == {"format": "pencil8", "nnz": 112, "sparsity": 0.125, "pencils": 14}
    w3 = w.copy()
    w3[:, [0, 1, 4, 5]] = 0
    w3[3, 2] = 0
    assert describe(w3)["format"] == "2:4"
    w4 = w.copy()
    w4[3, 2] = 0
    assert describe(w4)["format"] == "unstructured"

    g = Graph("g")
    x = g.add_input("x", TensorType("f32", (1, 8)))
    const = g.add_constant("w", np.ascontiguousarray(w2.T))  # IR dense weights are [in, out]
    g.outputs = [g.make_node("dense", [x, const], [TensorType("f32", (1, 16))]).outputs[0]]
    manager = PassManager.parse("annotate-sparsity")
    manager.run(g)
    assert g.constants["w"].attrs["sparsity"] == {"format": "pencil8", "nnz": 112, "sparsity": 0.125, "pencils": 14}
    g.constants["w"].data = np.ascontiguousarray(w4.T)
    manager.run(g)
    assert g.constants["w"].attrs["sparsity"]["format"] == "unstructured"
    g.constants["w"].data = np.ascontiguousarray(w.T)
    manager.run(g)
    assert "sparsity" not in g.constants["w"].attrs
