"""Issue 16: the first cut of the recovery trainer (gradual OBS + distillation on packed windows)."""

import json

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.passes.recover import RecoverConfig, recover
from femtocc.train_data import pack, teacher_targets
from test_train_data import TRAIN as TRAIN_DIR
from test_train_data import train_utts  # noqa: F401  (fixture)

LAYERS = r"^(encoder\.layers\.0\.fc1|decoder\.layers\.0\.fc1)$"


def weights(bundle):
    from femtocc.passes.calibrate import prunable_layers
    from femtocc.passes.prune import weight_matrix

    return {n: weight_matrix(m) for n, m in prunable_layers(bundle.model).items()}


@pytest.fixture(scope="module")
def run(tiny, train_utts, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("recover")
    windows = pack(train_utts[:10], seed=0)[:1]  # one window: every step sees it, so the loss is comparable
    targets = teacher_targets(tiny, windows, k=8, hidden=True, folder=tmp / "targets")
    cfg = RecoverConfig([0.6, 0.8], layers=LAYERS, steps=4, final_steps=2, lr=1e-5, warmup=1)
    calib = train_utts[:3]
    student, report = recover(tiny, cfg, windows, targets, calib, tmp / "out")
    return tmp, windows, targets, cfg, calib, student, report


def test_stages_hit_their_sparsity_and_masks_only_grow(run):
    from femtocc.frontend.whisper import load_whisper

    tmp, _, _, cfg, _, student, report = run
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2]
    zeros = None
    for i, target in enumerate([0.6, 0.8, 0.8]):
        w = weights(load_whisper(str(tmp / "out" / f"stage-{i:02d}")))
        for name in ("encoder.layers.0.fc1", "decoder.layers.0.fc1"):
            assert (w[name] == 0).mean() == pytest.approx(target, abs=0.01), (i, name)
        now = {n: a == 0 for n, a in w.items()}
        if zeros is not None:
            assert all(not np.any(zeros[n] & ~now[n]) for n in now)
        zeros = now
    log = [json.loads(x) for x in (tmp / "out" / "log.jsonl").read_text().splitlines()]
    assert log == report["stages"] and all(np.isfinite(e["loss_last"]) for e in log)


def test_distillation_lowers_the_loss_within_a_stage(run):
    stages = run[6]["stages"]
    assert all(0 <= s["loss_last"] < s["loss_first"] for s in stages[:2])


def test_topk_kl_is_a_divergence():
    import torch

    from femtocc.passes.recover import topk_kl

    p = torch.log_softmax(torch.randn(5, 50), -1)
    q = torch.log_softmax(torch.randn(5, 50), -1)
    top = torch.topk(p, 8, -1).indices
    assert float(topk_kl(p.gather(-1, top), p.gather(-1, top))) == pytest.approx(0, abs=1e-6)
    full = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < float(topk_kl(p.gather(-1, top), q.gather(-1, top))) <= full + 1e-6


def test_resume_gives_the_uninterrupted_result(run, tiny):
    import shutil

    tmp, windows, targets, cfg, calib, student, _ = run
    out = tmp / "interrupted"
    shutil.copytree(tmp / "out", out)
    for i in (1, 2):  # the run "died" after stage 0
        shutil.rmtree(out / f"stage-{i:02d}")
    resumed, report = recover(tiny, cfg, windows, targets, calib, out, resume=True)
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2]
    a, b = weights(student), weights(resumed)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_resume_from_another_models_checkpoint_is_refused(run, tiny):
    tmp, windows, targets, cfg, calib, _, _ = run
    meta = tmp / "out" / "stage-02" / "femtocc.json"
    manifest = json.loads(meta.read_text())
    manifest["metadata"]["recovery"]["teacher"] = "0" * 64
    other = tmp / "other"
    import shutil

    shutil.copytree(tmp / "out", other)
    (other / "stage-02" / "femtocc.json").write_text(json.dumps(manifest))
    with pytest.raises(FemtoccError, match="checkpoint of another model"):
        recover(tiny, cfg, windows, targets, calib, other, resume=True)


def test_prune_with_a_schedule_on_training_speech(tmp_path, dev_data, capsys):
    from femtocc.cli import main
    from femtocc.frontend.whisper import load_whisper

    out = tmp_path / "rec"
    assert main(["prune", "whisper-tiny.en", "--schedule", "linear:0.4:0.7:2", "--train", str(TRAIN_DIR),
                 "--train-limit", "4", "--steps-per-stage", "2", "--warmup", "1", "--layers", LAYERS, "--top-k", "8",
                 "--calib", str(dev_data), "--calib-limit", "2", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "train-report.json").read_text())
    assert [s["target_sparsity"] for s in report["stages"]] == [0.55, 0.7]
    assert report["data"]["utterances"] == 4 and report["data"]["speech_s"] > 0 and report["schedule"] == "linear:0.4:0.7:2"
    w = weights(load_whisper(str(out)))
    assert (w["encoder.layers.0.fc1"] == 0).mean() == pytest.approx(0.7, abs=0.01)
    assert (tmp_path / "rec.recovery" / "stage-01").is_dir() and "recovered whisper-tiny.en" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "cubic:0.6:0.3:3"], "below the start"),
    (["--schedule", "cubic:0:0.5:3", "--method", "mp-local"], "cannot be scheduled"),
    (["--schedule", "cubic:0:0.5:3", "--pattern", "2:4"], "N:M fixes the sparsity"),
    (["--schedule", "cubic:0:0.5:3", "--steps", "2"], "--schedule replaces --steps"),
    (["--schedule", "cubic:0:0.5:3", "--train", "EMPTY"], "has no utterances"),
    (["--train", "EMPTY"], "needs both --schedule and --train"),
])
def test_bad_recovery_input_is_one_line(argv, message, tmp_path, capsys, dev_data):
    from femtocc.cli import main

    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    if "--train" not in argv:
        argv += ["--train", str(TRAIN_DIR)]
    assert main(["prune", "whisper-tiny.en", *argv, "--calib", str(dev_data), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
