"""Prune real tiny.en a little on a few utterances; the result evaluates in two backends alike."""

import json

import numpy as np
import pytest

from femtocc.cli import main


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny, dev_data):
    out = tmp_path_factory.mktemp("pruned") / "tiny-obs-20"
    assert main(["prune", "whisper-tiny.en", "--calib", str(dev_data), "--calib-limit", "4",
                 "--sparsity", "0.2", "--pattern", "pencil8", "--heldout", "-o", str(out), "--quiet"]) == 0
    return out


def test_prune_writes_a_loadable_model_with_report(pruned_dir):
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.sparsity import mask_follows, parse_pattern

    report = json.loads((pruned_dir / "prune-report.json").read_text())
    assert report["calibration_utterances"] == 4 and report["config"]["pattern"] == "pencil8"
    assert abs(report["sparsity"] - 0.2) < 0.002
    assert len(report["layers"]) == 66 and report["dampings_used"]
    bundle = load_whisper(str(pruned_dir))
    assert bundle.metadata["dense_source"] == "whisper-tiny.en"
    fc1 = bundle.model.model.encoder.layers[0].fc1.weight.detach().numpy()
    assert mask_follows(fc1 == 0, parse_pattern("pencil8")) and abs((fc1 == 0).mean() - 0.2) < 0.01
    emb = bundle.model.model.decoder.embed_tokens.weight.detach().numpy()
    assert (emb == 0).mean() < 0.001  # the embedding is not pruned
    # --heldout: 2 utterances fit, 2 speakers held out; the decoder's few tokens overfit
    held = [r["heldout_error"] for r in report["layers"].values()]
    assert all(np.isfinite(e) and e >= 0 for e in held)
    assert report["mean_heldout_error"] > report["mean_relative_error"] > 0


def test_pruned_model_in_ir_carries_encodings(pruned_dir):
    from femtocc.backends import make_backend
    from femtocc.frontend.onnx_export import export_whisper, load_onnx
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.frontend.whisper import load_whisper
    from femtocc.ir import print_graph
    from femtocc.passes import DEFAULT_PIPELINE, PassManager

    bundle = load_whisper(str(pruned_dir))
    paths = export_whisper(bundle)
    g = PassManager.parse(DEFAULT_PIPELINE).run(import_onnx(load_onnx(paths["encoder"]), "encoder"))
    w = g.constants["encoder.layers.0.fc1.weight"]
    assert w.attrs["sparsity"]["format"] == "pencil8"
    assert w.attrs["sparsity"]["nnz"] == int(np.count_nonzero(w.data))
    assert 'sparsity = {format = "pencil8"' in print_graph(g)
    assert make_backend(bundle, "ir") is not None


def test_pruned_model_evaluates_identically_in_two_backends(pruned_dir, dev_data, tmp_path):
    reports = {}
    for backend in ("onnxruntime", "ir"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", str(pruned_dir), "--data", str(dev_data), "--split", "eval", "--limit", "3",
                     "--backend", backend, "--quiet", "--json", str(out)]) == 0
        reports[backend] = json.loads(out.read_text())
    hyps = {b: [u["hypothesis"] for u in r["utterances"]] for b, r in reports.items()}
    assert hyps["onnxruntime"] == hyps["ir"]
    assert reports["ir"]["report"]["pruning"]["config"]["method"] == "obs"
    assert "agreement_wer" in reports["ir"]["report"]


def test_prune_cli_errors(capsys, dev_data, tmp_path):
    for argv, message in [
        (["--pattern", "block"], "unknown sparsity pattern 'block'"),
        (["--pattern", "pencil5"], "layer encoder.conv1: 384 output channels is not a multiple of the pencil height 5"),
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--layers", "nothing-matches-this"], "matches no prunable layer"),
        (["--pattern", "2:4", "--allocation", "global"], "global allocation has nothing to allocate"),
        (["--heldout"], "at least 2 speakers, got 1"),
        (["--admm-iterations", "10", "--pattern", "2:4"], "ADMM mask search is for OBS with the refit on"),
        (["--admm-iterations", "-1"], "ADMM iterations must be >= 0"),
    ]:
        code = main(["prune", "whisper-tiny.en", "--calib", str(dev_data), "--calib-limit", "1", "-o", str(tmp_path / "x"), "--quiet", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_sequential_recalibrates_each_block(tiny, dev_utts, monkeypatch):
    from femtocc.passes import calibrate, prune
    from femtocc.passes.prune import PruneConfig, _stages, prune_model

    assert _stages(["decoder.layers.0.fc1", "encoder.layers.1.fc1", "encoder.conv1", "encoder.layers.0.fc2"]) == [
        ["encoder.conv1"], ["encoder.layers.0.fc2"], ["encoder.layers.1.fc1"], ["decoder.layers.0.fc1"]]
    seen = []
    real = calibrate.collect_hessians

    def spy(bundle, utts, layers=None, *a, **k):
        seen.append(sorted(layers))
        return real(bundle, utts, layers, *a, **k)

    monkeypatch.setattr(prune, "collect_hessians", spy)
    cfg = PruneConfig(sparsity=0.3, sequential=True, layers=r"encoder\.layers\.[01]\.fc[12]")
    pruned, report = prune_model(tiny, cfg, dev_utts[:2])
    assert len(seen) == 2 and seen[1] == ["encoder.layers.1.fc1", "encoder.layers.1.fc2"]
    assert abs(report["sparsity"] - 0.3) < 0.001 and len(report["layers"]) == 4
    # the dense model itself is untouched
    assert (tiny.model.model.encoder.layers[1].fc1.weight == 0).float().mean() < 0.01


def test_admm_runs_on_frame_fed_layers_only(tiny, dev_utts):
    from femtocc.passes.prune import PruneConfig, prune_model
    from femtocc.passes.sparsity import mask_follows, parse_pattern

    cfg = PruneConfig(sparsity=0.5, pattern="pencil8", admm_iterations=5,
                      layers=r"encoder\.layers\.0\.fc1|decoder\.layers\.0\.fc1")
    pruned, report = prune_model(tiny, cfg, dev_utts[:5])  # 7,500 frames for 384 inputs; ~100 tokens
    layers = report["layers"]
    assert layers["encoder.layers.0.fc1"]["admm_iterations"] == 5
    assert layers["decoder.layers.0.fc1"]["admm_iterations"] == 0
    fc1 = pruned.model.model.encoder.layers[0].fc1.weight.detach().numpy()
    assert mask_follows(fc1 == 0, parse_pattern("pencil8")) and (fc1 == 0).mean() == 0.5
