"""Issue 16: the first cut of the recovery trainer (gradual OBS + distillation on packed windows)."""

import json
from pathlib import Path

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.passes.prune import weights_digest
from femtocc.passes.recover import RecoverConfig, recover
from femtocc.train_data import Augment, pack, teacher_targets
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
    assert [e for e in log if e["event"] == "stage"] == report["stages"]
    assert all(np.isfinite(e["loss_last"]) for e in report["stages"])
    steps = [(e["stage"], e["step"]) for e in log if e["event"] == "step"]
    assert steps == [(0, 4), (1, 4), (2, 2)]  # every LOG_EVERY steps and each stage's last


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
                 "--train-limit", "4", "--steps-per-stage", "2", "--warmup", "1", "--layers", LAYERS, "--top-k", "8", "--val-limit", "3",
                 "--final-steps", "1", "--keep", "best",
                 "--calib", str(dev_data), "--calib-limit", "2", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "train-report.json").read_text())
    assert [s["target_sparsity"] for s in report["stages"]] == [0.55, 0.7, 0.7]
    best = min(report["stages"][1:], key=lambda e: (e["val"]["wer"], -e["stage"]))["stage"]
    assert report["kept_stage"] == best
    kept = load_whisper(str(tmp_path / "rec.recovery" / f"stage-{best:02d}"))
    assert weights_digest(load_whisper(str(out)).model) == weights_digest(kept.model)
    assert all(s["val"]["utterances"] == 3 and s["val"]["wer"] >= 0 for s in report["stages"])
    assert report["data"]["utterances"] == 4 and report["data"]["speech_s"] > 0 and report["schedule"] == "linear:0.4:0.7:2"
    w = weights(load_whisper(str(out)))
    assert (w["encoder.layers.0.fc1"] == 0).mean() == pytest.approx(0.7, abs=0.01)
    assert (tmp_path / "rec.recovery" / "stage-01").is_dir() and "recovered whisper-tiny.en" in capsys.readouterr().out
    # a recovered model continues from its zeros, distilled from the dense model it came from
    more = tmp_path / "rec80"
    assert main(["prune", str(out), "--schedule", "linear:0.7:0.8:1", "--train", str(TRAIN_DIR), "--train-limit", "4",
                 "--steps-per-stage", "1", "--warmup", "1", "--layers", LAYERS, "--top-k", "8", "--val-limit", "0",
                 "--window", "12", "--augment", "gain=3,freq=1x5",
                 "--calib", str(dev_data), "--calib-limit", "2", "-o", str(more), "--quiet"]) == 0
    report = json.loads((more / "train-report.json").read_text())
    assert report["teacher"] == "whisper-tiny.en" and report["start"] == str(out)
    assert report["data"]["window_s"] == 12 and report["data"]["context_s"] == 30
    assert report["data"]["speech_s_per_window"] <= 12 and report["config"]["augment"]["freq_masks"] == [1, 5]
    w80 = weights(load_whisper(str(more)))
    assert (w80["encoder.layers.0.fc1"] == 0).mean() == pytest.approx(0.8, abs=0.01)
    assert not np.any((w["encoder.layers.0.fc1"] == 0) & (w80["encoder.layers.0.fc1"] != 0))


def test_a_student_for_a_short_context_bucket(tmp_path, dev_data, tiny):
    """--context 10: windows packed to 10 s, the student encodes 500 frames, the teacher's targets come
    from the full window (its encoder output cut to the same 500 frames); sparsity 0 only distils."""
    import torch

    from femtocc.cli import main
    from femtocc.data import load_dataset
    from femtocc.frontend.whisper import encode, load_whisper
    from femtocc.passes.recover import make_batch
    from femtocc.train_data import duration_s

    out = tmp_path / "ctx10"
    assert main(["prune", "whisper-tiny.en", "--schedule", "oneshot:0:0:1", "--train", str(TRAIN_DIR),
                 "--train-limit", "6", "--steps-per-stage", "2", "--warmup", "1", "--top-k", "8", "--val-limit", "2",
                 "--context", "10", "--lr", "1e-4", "--calib", str(dev_data), "--calib-limit", "2", "-o", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "train-report.json").read_text())
    assert report["data"]["context_s"] == 10 and report["config"]["context_s"] == 10
    assert report["stages"][0]["sparsity"] < 1e-4 and report["stages"][0]["val"]["utterances"] == 2
    student = load_whisper(str(out))
    assert weights_digest(student.model) != weights_digest(tiny.model)  # distilled, and the teacher untouched
    assert weights_digest(tiny.model) == weights_digest(load_whisper("whisper-tiny.en").model)
    short = [u for u in load_dataset(TRAIN_DIR)[:6] if duration_s(u) <= 10]
    windows = pack(short, seed=0, window_s=10)
    assert all(w.speech_s + w.gap_s * (len(w.utterances) - 1) <= 10 for w in windows)
    targets = teacher_targets(tiny, windows[:1], k=8, hidden=True, folder=tmp_path / "t")
    batch = make_batch(windows[:1], targets, tiny, frames=500)
    assert batch["features"].shape == (1, 80, 1000) and batch["encoder"].shape == (1, 500, 384)
    with torch.no_grad():  # the target is the teacher's full-window encoder output, cut
        full = tiny.model.model.encoder(torch.from_numpy(tiny.features(windows[0].audio()))).last_hidden_state
        assert torch.allclose(batch["encoder"], full[:, :500], atol=2e-2)
        assert not torch.allclose(encode(tiny.model.model.encoder, batch["features"], 500), full[:, :500], atol=2e-2)


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "cubic:0.6:0.3:3"], "below the start"),
    (["--schedule", "cubic:0:0.5:3", "--method", "mp-local"], "cannot be scheduled"),
    (["--schedule", "cubic:0:0.5:3", "--pattern", "2:4"], "N:M fixes the sparsity"),
    (["--schedule", "cubic:0:0.5:3", "--train", "EMPTY"], "has no utterances"),
    (["--train", "EMPTY"], "needs both --schedule and --train"),
    (["--schedule", "cubic:0:0.5:3", "--keep", "best", "--val-limit", "0"], "needs --val-limit above 0"),
    (["--schedule", "cubic:0:0.5:3", "--schedule", "cubic:0:0.2:3"], "exactly one --schedule without @REGEX"),
    (["--schedule", "cubic:0:0.5:3", "--schedule", "cubic:0:0.9:2@^encoder"], "same number of stages"),
    (["--schedule", "cubic:0:0.5:3", "--pattern", "pencil3x"], "--pattern"),
    (["--schedule", "cubic:0:0.5:3", "--train", "BADAUDIO"], "bad.flac: cannot read"),
    (["--schedule", "cubic:0:0.5:3", "--context", "40"], "--context 40"),
    (["--schedule", "cubic:0:0.5:3", "--context", "10", "--block-weight", "1"], "--block-weight 0"),
    (["--schedule", "cubic:0:0.5:3", "--augment", "snr=40"], "--augment: cannot read 'snr=40'"),
    (["--schedule", "cubic:0:0.5:3", "--context", "10", "--window", "20"], "--window 20: a window must fit"),
    (["--schedule", "cubic:0:0.5:3", "--window", "1"], "--window 1: no clip of"),
    (["--schedule", "cubic:0:0.5:3", "--augment", "speed=0.9"], "--augment: unknown key 'speed'"),
    (["--schedule", "cubic:0:0.5:3", "--freeze", "no_such_parameter"], "--freeze 'no_such_parameter' matches no"),
    (["--schedule", "cubic:0:0.5:3", "--freeze", "embed_(tokens"], "not a regular expression"),
])
def test_bad_recovery_input_is_one_line(argv, message, tmp_path, capsys, dev_data):
    from femtocc.cli import main

    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "transcripts.tsv").write_text("file\ttext\nbad.flac\tnot a recording\n")
    (bad / "bad.flac").write_bytes(b"fLaC but not really" * 10)
    argv = [{"EMPTY": str(tmp_path / "empty"), "BADAUDIO": str(bad)}.get(a, a) for a in argv]
    if "--train" not in argv:
        argv += ["--train", str(TRAIN_DIR)]
    assert main(["prune", "whisper-tiny.en", *argv, "--calib", str(dev_data), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_two_gloo_processes_end_with_identical_weights_and_masks(tmp_path, dev_data):
    """torchrun, two CPU processes, the real CLI: each trains on its shard inside DDP, rank 0 prunes
    and every rank takes its weights; the trainer gathers every rank's weights digest per stage. The
    student encodes a 10-s context inside DDP as it does on one process."""
    import os
    import subprocess
    import sys

    from femtocc.frontend.whisper import load_whisper

    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "femtocc", "prune", "whisper-tiny.en",
           "--schedule", "linear:0.4:0.7:2", "--train", str(TRAIN_DIR), "--train-limit", "14", "--steps-per-stage", "2",
           "--warmup", "1", "--layers", LAYERS, "--top-k", "8", "--calib", str(dev_data), "--calib-limit", "2",
           "--val-limit", "2", "--context", "10", "-o", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "train-report.json").read_text())
    assert report["processes"] == 2 and report["data"]["windows"] >= 2 and report["data"]["context_s"] == 10
    for stage in report["stages"]:
        assert len(stage["rank_digests"]) == 2 and len(set(stage["rank_digests"])) == 1
        assert stage["windows_per_step"] == 2 and stage["val"]["utterances"] == 2
    w = weights(load_whisper(str(out)))
    assert (w["encoder.layers.0.fc1"] == 0).mean() == pytest.approx(0.7, abs=0.01)
    assert weights_digest(load_whisper(str(out)).model) == report["stages"][-1]["rank_digests"][0]


def test_a_padded_batch_aligns_every_windows_targets(run, tiny, train_utts):  # noqa: F811
    """The teacher as its own student: over a batch of two windows whose transcripts differ in
    length (right-padded), KL and every hidden-state error are ~0 at every valid position; any
    misalignment of targets, padding or positions would show."""
    import torch

    from femtocc.passes.recover import batch_loss, make_batch

    tmp = run[0]
    windows = pack(train_utts[10:30], seed=0)[:2]
    targets = teacher_targets(tiny, windows, k=8, hidden=True, folder=tmp / "batch-targets")
    batch = make_batch(windows, targets, tiny)
    lengths = batch["valid"].sum(1).tolist()
    assert batch["ids"].shape[0] == 2 and lengths[0] != lengths[1] and max(lengths) == batch["ids"].shape[1]
    short = int(np.argmin(lengths))
    assert (batch["ids"][short, int(lengths[short]):] == tiny.decode.eot).all()
    with torch.no_grad():
        for weights_ in ({"kl_weight": 1.0, "hidden_weight": 0.0}, {"kl_weight": 0.0, "hidden_weight": 1.0},
                         {"kl_weight": 0.0, "hidden_weight": 0.0, "block_weight": 1.0}):
            cfg = RecoverConfig([0.5], **weights_)
            assert float(batch_loss(tiny.model, tiny.model, batch, cfg)) < 2e-3, weights_
        shifted = {**batch, "topk_ids": torch.roll(batch["topk_ids"], 1, dims=1)}
        assert float(batch_loss(tiny.model, None, shifted, RecoverConfig([0.5], hidden_weight=0.0))) > 1.0


def test_augmentation_changes_the_students_input_only(run, tiny, train_utts):  # noqa: F811
    """--augment: the student's features are the window's with gain, noise and masks drawn from
    the step's seed; the targets and the teacher's features stay those of the clean window."""
    import torch

    from femtocc.passes.recover import batch_loss, make_batch

    windows = pack(train_utts[10:30], seed=0)[:2]
    targets = teacher_targets(tiny, windows, k=8, hidden=True, folder=run[0] / "batch-targets")
    clean = make_batch(windows, targets, tiny)
    assert clean["teacher_features"] is None  # the teacher reads the student's features
    augment = Augment.parse("gain=6,snr=20:30,freq=2x10,time=2x40")

    def draw(seed):
        return make_batch(windows, targets, tiny, augment=augment, rng=np.random.default_rng(seed), clean=True)

    batch, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(batch["features"], again["features"]) and not torch.equal(batch["features"], other["features"])
    assert not torch.equal(batch["features"], clean["features"])
    assert torch.equal(batch["teacher_features"], clean["features"])
    for key in ("ids", "valid", "topk_ids", "topk_logp", "encoder"):
        assert torch.equal(batch[key], clean[key]), key
    with torch.no_grad():  # the teacher as its own student: matching its clean blocks is exact only on clean input
        cfg = RecoverConfig([0.5], kl_weight=0.0, hidden_weight=0.0, block_weight=1.0)
        assert float(batch_loss(tiny.model, tiny.model, {**batch, "features": batch["teacher_features"]}, cfg)) < 2e-3
        assert float(batch_loss(tiny.model, tiny.model, batch, cfg)) > 1e-2


def test_layer_groups_follow_their_own_schedule(tiny):
    from femtocc.passes.calibrate import prunable_layers
    from femtocc.passes.recover import stage_targets

    cfg = RecoverConfig([0.2, 0.5], groups=[(r"^encoder\.layers\.\d\.fc", [0.6, 0.9])], layers=r"^decoder")
    names = list(prunable_layers(tiny.model))
    for stage, (main, group) in enumerate([(0.2, 0.6), (0.5, 0.9)]):
        targets = stage_targets(tiny.model, cfg, stage)
        assert sorted(targets[group]) == sorted(n for n in names if n.startswith("encoder.layers.") and ".fc" in n)
        assert sorted(targets[main]) == sorted(n for n in names if n.startswith("decoder"))
    with pytest.raises(FemtoccError, match="matches no prunable layer"):
        stage_targets(tiny.model, RecoverConfig([0.2], groups=[("^nothing", [0.5])]), 0)
    with pytest.raises(FemtoccError, match="same number of stages"):
        recover(tiny, RecoverConfig([0.2, 0.5], groups=[("^encoder", [0.9])]), [], None, [], Path("unused"))
    with pytest.raises(FemtoccError, match="cannot change speed"):
        recover(tiny, RecoverConfig([0.2], augment=Augment(speed=(0.9, 1.1))), [], None, [], Path("unused"))


def test_the_token_table_is_pruned_on_request_and_its_zeros_stay(run, tiny):
    """With include_embeddings a stage prunes the token table (tied: the embedding is the output
    projection) in its pattern; without it, a table pruned before keeps every zero through
    distillation, as the other layers do."""
    from femtocc.passes.calibrate import prunable_layers
    from femtocc.passes.plan import plan_schedules

    tmp, windows, targets, _, calib, _, _ = run
    cfg = RecoverConfig([0.3], pattern="pencil8", layers="^proj_out$", steps=2, lr=1e-3, warmup=0,
                        include_embeddings=True)
    student, report = recover(tiny, cfg, windows, targets, calib, tmp / "table")
    table = prunable_layers(student.model, include_embeddings=True)["proj_out"].weight.detach().numpy().copy()
    assert student.model.model.decoder.embed_tokens.weight is student.model.proj_out.weight
    assert (table == 0).mean() == pytest.approx(0.3, abs=0.01) and report["stages"][0]["sparsity"] > 0
    pencils = (table == 0).reshape(-1, 8, table.shape[1])  # [out / 8, 8, in]: whole pencils zero
    assert np.array_equal(pencils.all(axis=1), pencils.any(axis=1))
    assert (weights(student)["decoder.layers.0.fc1"] == 0).mean() < 1e-3  # --layers kept the rest dense
    again, _ = recover(tiny, RecoverConfig([0.0], steps=2, lr=1e-3, warmup=0), windows, targets, calib,
                       tmp / "table-again", student=student)
    after = again.model.proj_out.weight.detach().numpy()
    assert np.all(after[table == 0] == 0) and not np.array_equal(after, table)  # trained, zeros kept
    with pytest.raises(FemtoccError, match="only with --include-embeddings"):
        recover(tiny, RecoverConfig([0.3], layers="^proj_out$"), windows, targets, calib, tmp / "unused")
    plan = _plan_file(tmp, {"proj_out": 0.5, "encoder.layers.0.fc1": 0.25})
    assert plan_schedules(plan, [0.5])[3]  # a plan that prunes the table recovers it


def test_frozen_parameters_stay_as_they_are(run, tiny):
    """--freeze: the matched parameters (the tied token table under either of its names) are not
    trained and are trainable again afterwards; the others are trained."""
    from femtocc.passes.recover import frozen_parameters

    tmp, windows, targets, _, calib, _, _ = run
    table = tiny.model.proj_out.weight.detach().clone()
    fc1 = tiny.model.model.decoder.layers[0].fc1.weight.detach().clone()
    cfg = RecoverConfig([0.0], steps=2, lr=1e-3, warmup=0, freeze="embed_tokens")
    student, _ = recover(tiny, cfg, windows, targets, calib, tmp / "frozen")
    assert student.model.proj_out.weight.equal(table) and student.model.proj_out.weight.requires_grad
    assert not student.model.model.decoder.layers[0].fc1.weight.equal(fc1)
    assert frozen_parameters(tiny.model, "^proj_out") == frozen_parameters(tiny.model, "embed_tokens")
    assert len(frozen_parameters(tiny.model, r"decoder\.layers\.0\.fc1\.")) == 2  # weight and bias


def _plan_file(tmp_path, layers: dict) -> Path:
    from femtocc.passes.plan import PLAN_FORMAT

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": PLAN_FORMAT, "pattern": "pencil8",
                                "layers": {n: {"sparsity": s} for n, s in layers.items()}}))
    return path


def test_a_plan_recovered_gradually(tmp_path, dev_data, capsys):
    """prune --plan --schedule --train: each planned layer follows the schedule's shape to its own
    planned sparsity (pencil8), masks only grow, the layers the plan leaves out stay dense."""
    from femtocc.cli import main
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.plan import plan_schedules

    plan = _plan_file(tmp_path, {"encoder.layers.0.fc1": 0.5, "encoder.layers.1.fc2": 0.25, "encoder.layers.2.fc1": 0.0})
    groups, layers, pattern, table = plan_schedules(plan, [0.3, 0.6])
    assert pattern == "pencil8" and not table and dict(groups) == {r"^encoder\.layers\.0\.fc1$": [0.25, 0.5],
                                                     r"^encoder\.layers\.1\.fc2$": [0.125, 0.25]}
    out = tmp_path / "rec"
    assert main(["prune", "whisper-tiny.en", "--plan", str(plan), "--schedule", "linear:0.3:0.6:2", "--train", str(TRAIN_DIR),
                 "--train-limit", "4", "--steps-per-stage", "1", "--warmup", "1", "--top-k", "8", "--val-limit", "0",
                 "--calib", str(dev_data), "--calib-limit", "2", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "train-report.json").read_text())
    assert report["plan"] == str(plan) and report["pattern"] == "pencil8"
    first = weights(load_whisper(str(tmp_path / "rec.recovery" / "stage-00")))
    w = weights(load_whisper(str(out)))
    for name, planned in (("encoder.layers.0.fc1", 0.5), ("encoder.layers.1.fc2", 0.25)):
        assert (first[name] == 0).mean() == pytest.approx(planned * 0.45 / 0.6, abs=0.01)  # linear: 0.45, then 0.6
        assert (w[name] == 0).mean() == pytest.approx(planned, abs=0.01)
        assert not np.any((first[name] == 0) & (w[name] != 0))  # masks only grow
        pencils = (w[name] == 0).reshape(-1, 8, w[name].shape[1])  # [out / 8, 8, in]: whole pencils zero
        assert np.array_equal(pencils.all(axis=1), pencils.any(axis=1))
    assert all((w[n] == 0).mean() < 1e-3 for n in ("encoder.layers.2.fc1", "decoder.layers.0.fc1"))  # not pruned
    assert "to the sparsities of" in capsys.readouterr().out
    # compile --plan prunes only what the model does not already hold at its planned sparsity
    from femtocc.passes.plan import still_to_prune

    planned = {"encoder.layers.0.fc1": 0.5, "encoder.layers.1.fc2": 0.25}
    assert still_to_prune(load_whisper(str(out)).model, planned) == {}
    assert still_to_prune(load_whisper(str(tmp_path / "rec.recovery" / "stage-00")).model, planned) == planned


@pytest.mark.parametrize("layers, extra, message", [
    ({"encoder.layers.0.fc1": 0.5}, ["--schedule", "cubic:0:0.5:2@^decoder"], "leave out @REGEX"),
    ({"encoder.layers.0.fc1": 0.5}, ["--layers", "^encoder"], "leave out @REGEX"),
    ({"encoder.layers.0.fc1": 0.0}, [], "no layer is pruned"),
])
def test_bad_plan_recovery_is_one_line(layers, extra, message, tmp_path, capsys, dev_data):
    from femtocc.cli import main

    plan = _plan_file(tmp_path, layers)
    assert main(["prune", "whisper-tiny.en", "--plan", str(plan), "--schedule", "cubic:0:0.5:2", *extra, "--train",
                 str(TRAIN_DIR), "--calib", str(dev_data), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
