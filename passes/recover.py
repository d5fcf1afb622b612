"""Recovery training: gradual OBS pruning with distillation on packed training windows.

Stages follow a schedule (:mod:`femtocc.passes.schedule`). In each stage:

1. the Hessians of the *current* student are collected on calibration clips;
2. OBS with its refit prunes every layer (the token table too with ``include_embeddings``) to the
   stage's sparsity, every zero already made chosen first (``PruneConfig.keep_zeros``): masks only
   grow. Without it, OBS after a round of distillation revived 163 and 860 of 177 K zeros in two
   tiny.en layers;
3. ``steps`` distillation steps, each over ``batch`` packed windows (:mod:`femtocc.train_data`) in a
   seeded order. The loss is ``kl_weight`` times the KL divergence from the teacher's top-k
   distribution at every position of its transcript (teacher-forced), plus ``hidden_weight`` times
   the encoder output's squared error relative to the teacher's mean square, plus ``block_weight``
   times the same normalised error averaged over every encoder and decoder block's output
   (SquareHead-style; the teacher runs beside the student for it). AdamW, a linear warm-up over
   ``warmup`` steps then cosine decay to zero, gradients clipped to norm ``clip``; every pruned
   weight (a token table pruned before included) is multiplied by its mask after every step.
   ``augment`` draws gain, noise and SpecAugment masks afresh for the student's input at every step,
   while the targets stay the teacher's on the clean window (speed perturbation would move the
   frames the targets align with);
4. optionally the student's WER and agreement on held-back utterances (``val``).

``precision="bf16"`` runs forward and backward under ``torch.autocast`` (weights, optimizer state
and losses stay float32): 1.9x faster per window on this project's CPU, which has AMX.
``compile=True`` wraps the model in ``torch.compile``; it does not pay here (the decoder length
changes every window, and recompiling costs more than it saves: ``benchmarks/train_speed.py``).

A last stage of ``final_steps`` fine-tunes at the final sparsity. After every stage the student is
saved as a model folder ``OUT/stage-NN``. ``OUT/log.jsonl`` gets a ``"step"`` line every
``LOG_EVERY`` steps (stage, step, sparsity, loss, learning rate, seconds) and a ``"stage"`` line
per stage (sparsity reached, losses, held-back WER, seconds). Every
stage's randomness is seeded by (``seed``, stage, rank) and its optimizer starts afresh, so
``resume=True``, which continues after the last saved stage, ends with the same weights as a run
that was never interrupted.

Under torchrun (:mod:`femtocc.distributed`) each process trains on its shard of the windows
(``windows[rank::world]``) inside DistributedDataParallel; rank 0 collects the Hessians, prunes,
validates and writes, then every rank takes rank 0's weights, and so its masks.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.train_data import Augment


@dataclass
class RecoverConfig:
    sparsities: list[float]  # one per stage (passes/schedule.py)
    pattern: str = "unstructured"
    steps: int = 100  # distillation steps per stage
    final_steps: int = 0  # steps of a last stage at the final sparsity
    batch: int = 1  # windows per step and process
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    block_weight: float = 0.0
    precision: str = "fp32"  # or "bf16": forward and backward under torch.autocast
    compile: bool = False  # torch.compile the model
    seed: int = 0
    layers: str | None = None  # prune only layers whose module path matches
    groups: list = field(default_factory=list)  # [(regex, sparsities)]: these layers follow their own schedule
    context_s: int = 30  # the student's encoder context (a bucket, femtocc.frontend.onnx_export); the teacher's is 30
    augment: Augment | None = None  # the student's input only, drawn afresh every step (femtocc.train_data)
    fused: bool = True  # AdamW's fused kernel: one pass over the parameters (benchmarks/train_speed.py)
    include_embeddings: bool = False  # the token table (proj_out, tied to the embedding) is pruned too
    freeze: str | None = None  # parameters whose name matches are not trained (frozen_parameters)


def _student_module(model, frames: int | None):
    """``model`` (transformers Whisper) as a module whose forward encodes only ``frames`` encoder
    frames (all of them for None); the module DistributedDataParallel wraps."""
    import torch

    from femtocc.frontend.whisper import encode

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_features, decoder_input_ids, output_hidden_states=False):
            if frames is None:
                return self.model(input_features=input_features, decoder_input_ids=decoder_input_ids,
                                  output_hidden_states=output_hidden_states)
            enc = encode(self.model.model.encoder, input_features, frames)
            return self.model(encoder_outputs=(enc,), decoder_input_ids=decoder_input_ids)

    return Student()


def frozen_parameters(model, regex: str | None) -> list:
    """The parameters of ``model`` whose name (``model.decoder.embed_tokens.weight``; a tied weight
    under each of its names) matches ``regex``, which distillation leaves as they are. A regex that
    does not compile or matches no parameter is a one-line error naming ``--freeze``."""
    if not regex:
        return []
    try:
        rx = re.compile(regex)
    except re.error as e:
        raise FemtoccError(f"--freeze {regex!r}: not a regular expression ({e})") from None
    found = {id(p): p for n, p in model.named_parameters(remove_duplicate=False) if rx.search(n)}
    if not found:
        raise FemtoccError(f"--freeze {regex!r} matches no parameter (names such as model.decoder.embed_tokens.weight)")
    return list(found.values())


def stage_targets(model, cfg: RecoverConfig, stage: int) -> dict[float, list[str]]:
    """Stage ``stage``'s sparsity -> the layers pruned to it: a layer follows the first of
    ``cfg.groups`` whose regex it matches, else the main schedule (if ``cfg.layers`` admits it). A
    regex that matches no prunable layer at all is an error. The token table is a prunable layer
    only with ``cfg.include_embeddings``."""
    from femtocc.passes.calibrate import prunable_layers

    every = list(prunable_layers(model, cfg.include_embeddings))
    names = list(every)
    out: dict[float, list[str]] = {}
    for regex, sparsities in [*cfg.groups, (cfg.layers, cfg.sparsities)]:
        rx = re.compile(regex) if regex else None
        if regex is not None and not any(rx.search(n) for n in every):
            hint = "" if cfg.include_embeddings else " (the token table proj_out only with --include-embeddings)"
            raise FemtoccError(f"{regex!r} matches no prunable layer{hint}")
        chosen = [n for n in names if rx is None or rx.search(n)]
        names = [n for n in names if n not in chosen]
        if chosen:
            out.setdefault(sparsities[stage], []).extend(chosen)
    return out


def check_schedules(cfg: RecoverConfig) -> None:
    """Every schedule (the main one and each group's) is non-empty, never decreases, and has as
    many stages as the main one."""
    for sparsities in [cfg.sparsities, *(g[1] for g in cfg.groups)]:
        if not sparsities or any(b < a for a, b in zip(sparsities, sparsities[1:])):
            raise FemtoccError(f"a recovery schedule must be a non-empty, non-decreasing list, got {sparsities}")
        if len(sparsities) != len(cfg.sparsities):
            raise FemtoccError(f"every schedule needs the same number of stages, got {len(sparsities)} and "
                               f"{len(cfg.sparsities)}")


def sparsity_of(layers: dict) -> float:
    """The fraction of zeros over the weights of ``layers`` (module path -> module)."""
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / sum(m.weight.numel() for m in layers.values())


LOG_EVERY = 10  # steps per line of the JSONL log


def _stage_dir(out: Path, i: int) -> Path:
    return out / f"stage-{i:02d}"


def _lr_at(step: int, total: int, cfg: RecoverConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(total - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / span))


def topk_kl(logp_t, logp_s, valid=None):
    """Mean over (valid) positions of the KL divergence between teacher and student over the
    teacher's top-k tokens plus one bucket for all the others (k + 1 outcomes): never negative,
    and a lower bound of the full KL (merging outcomes cannot raise a divergence)."""
    import torch

    pt = logp_t.exp()
    rest_t = (1 - pt.sum(-1)).clamp(min=1e-8)
    rest_s = (1 - logp_s.exp().sum(-1)).clamp(min=1e-8)
    kl = (pt * (logp_t - logp_s)).sum(-1) + rest_t * (torch.log(rest_t) - torch.log(rest_s))
    return kl.mean() if valid is None else (kl * valid).sum() / valid.sum()


def relative_mse(student, teacher, valid=None):
    """Squared error relative to the teacher's mean square (over valid positions of [B, T, d])."""
    student, teacher = student.float(), teacher.float()
    if valid is None:
        return ((student - teacher) ** 2).mean() / (teacher**2).mean()
    w = valid[..., None]
    return (((student - teacher) ** 2) * w).sum() / ((teacher**2) * w).sum()


def make_batch(windows, targets: Path, teacher, device="cpu", frames: int | None = None, augment=None,
               rng: np.random.Generator | None = None, clean: bool = False) -> dict:
    """``features`` [B, 80, 3000], teacher-forced decoder input ``ids`` [B, L] (prompt and the
    teacher's transcript, right-padded with end of text), ``valid`` [B, L] (1 where a position
    has a target), and the teacher's ``topk_ids``, ``topk_logp`` [B, L, k] and ``encoder`` output
    (None when the targets have none). ``frames``: the student's shorter context; the features are
    cut to ``2 * frames`` mel frames and the teacher's encoder output (of the full window) to its
    first ``frames``. ``augment`` (:class:`femtocc.train_data.Augment`, drawn from ``rng``) changes
    the student's ``features`` only; the targets are the teacher's on the clean window, whose
    features are, with ``clean`` (for a teacher running beside the student), ``teacher_features``."""
    import torch

    from femtocc.train_data import load_targets

    settings = teacher.decode
    loaded = [load_targets(targets, w) for w in windows]
    seqs = [list(settings.prompt) + [int(x) for x in t["tokens"]] for t in loaded]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), settings.eot, dtype=torch.long)
    valid = torch.zeros(len(seqs), length)
    k = loaded[0]["topk_ids"].shape[1]
    top_ids = torch.zeros(len(seqs), length, k, dtype=torch.long)
    top_logp = torch.zeros(len(seqs), length, k)
    for b, (seq, t) in enumerate(zip(seqs, loaded)):
        ids[b, : len(seq)] = torch.tensor(seq)
        valid[b, : len(seq)] = 1
        top_ids[b, : len(seq)] = torch.from_numpy(t["topk_ids"].astype(np.int64))
        top_logp[b, : len(seq)] = torch.from_numpy(t["topk_logp"].astype(np.float32))
    audio = [w.audio() for w in windows]
    augmented = augment is not None and augment.active
    student_audio = [augment.apply(a, rng) for a in audio] if augmented and augment.waveform else audio
    feats = np.concatenate([teacher.features(a) for a in student_audio])
    teacher_feats = None
    if augmented and clean:
        teacher_feats = feats if student_audio is audio else np.concatenate([teacher.features(a) for a in audio])
    if augmented and augment.masks:
        feats = augment.mask(feats, rng)  # a copy: teacher_feats stays clean
    enc = (torch.from_numpy(np.stack([t["encoder"] for t in loaded]).astype(np.float32)).to(device)
           if all("encoder" in t for t in loaded) else None)
    if frames is not None:
        feats = np.ascontiguousarray(feats[:, :, : 2 * frames])
        teacher_feats = np.ascontiguousarray(teacher_feats[:, :, : 2 * frames]) if teacher_feats is not None else None
        enc = enc[:, :frames].contiguous() if enc is not None else None
    return {"features": torch.from_numpy(feats).to(device), "ids": ids.to(device), "valid": valid.to(device),
            "topk_ids": top_ids.to(device), "topk_logp": top_logp.to(device), "encoder": enc,
            "teacher_features": torch.from_numpy(teacher_feats).to(device) if teacher_feats is not None else None}


def batch_loss(net, teacher_model, batch: dict, cfg: RecoverConfig, autocast=None):
    """The distillation loss of one batch (:func:`make_batch`): KL at every valid position, the
    encoder output's relative error, and (with a teacher model) every block's."""
    import torch
    import torch.nn.functional as F

    autocast = autocast or contextlib.nullcontext()
    with autocast:
        out = net(input_features=batch["features"], decoder_input_ids=batch["ids"],
                  output_hidden_states=bool(cfg.block_weight))
    logp = F.log_softmax(out.logits.float(), -1).gather(-1, batch["topk_ids"])
    loss = cfg.kl_weight * topk_kl(batch["topk_logp"], logp, batch["valid"])
    if cfg.hidden_weight and batch["encoder"] is not None:
        loss = loss + cfg.hidden_weight * relative_mse(out.encoder_last_hidden_state, batch["encoder"])
    if cfg.block_weight:
        with torch.no_grad(), autocast:
            clean = batch.get("teacher_features")
            ref = teacher_model(input_features=batch["features"] if clean is None else clean,
                                decoder_input_ids=batch["ids"],
                                output_hidden_states=True)
        pairs = [(s, t, None) for s, t in zip(out.encoder_hidden_states[1:], ref.encoder_hidden_states[1:])]
        pairs += [(s, t, batch["valid"]) for s, t in zip(out.decoder_hidden_states[1:], ref.decoder_hidden_states[1:])]
        loss = loss + cfg.block_weight * sum(relative_mse(s, t, v) for s, t, v in pairs) / len(pairs)
    return loss


def distil(student, teacher, windows, targets: Path, steps: int, cfg: RecoverConfig, stage: int,
           device: str = "cpu", progress: bool = False, log: Path | None = None) -> list[float]:
    """``steps`` distillation steps of ``student`` (in place) over this rank's shard of
    ``windows``; returns the losses (averaged over the ranks). With ``log``, every
    ``LOG_EVERY`` steps a line ``{"event": "step", stage, step, sparsity, loss (the mean since the
    last line), lr, seconds}`` is appended to it."""
    import torch

    from femtocc import distributed
    from femtocc.passes.calibrate import prunable_layers
    from femtocc.progress import progress as bar

    rank, world = distributed.rank_world()
    shard = windows[rank::world]
    if not shard:
        raise FemtoccError(f"{len(windows)} training windows cannot feed {world} processes")
    torch.manual_seed(cfg.seed * 1000 + stage)
    model = student.model.to(device)
    from femtocc.frontend.onnx_export import bucket_frames

    frames = bucket_frames(model.config, cfg.context_s)  # None: Whisper's full 30-s window
    frozen = frozen_parameters(model, cfg.freeze)  # before DDP, which hooks the trained ones
    for p in frozen:
        p.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    net = _student_module(model, frames)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[torch.device(device).index] if device != "cpu" else None,
                                      broadcast_buffers=False)  # the student's context, as on one process
    if cfg.compile:
        net = torch.compile(net)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    teacher_model = teacher.model.to(device) if cfg.block_weight else None
    # every zero stays zero, the token table's too when an earlier pruning made them (--include-embeddings);
    # a layer without zeros, or frozen, has no mask to re-apply (the step's hot path skips it)
    masked = {n: m for n, m in prunable_layers(model, include_embeddings=True).items()
              if m.weight.requires_grad and not bool(m.weight.detach().all())}
    masks = {n: (m.weight.detach() != 0).to(m.weight.dtype) for n, m in masked.items()}
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused or None)
    order = np.random.default_rng([cfg.seed, stage, rank]).permutation(len(shard))
    sparsity = sparsity_of(prunable_layers(model, cfg.include_embeddings))
    losses, start = [], time.perf_counter()
    model.train()
    try:
        for step in bar(range(steps), f"stage {stage} distillation", "step", enabled=progress):
            chosen = [shard[int(order[(step * cfg.batch + j) % len(shard)])] for j in range(cfg.batch)]
            batch = make_batch(chosen, targets, teacher, device, frames, cfg.augment,
                               np.random.default_rng([cfg.seed, stage, rank, step]), clean=bool(cfg.block_weight))
            loss = batch_loss(net, teacher_model, batch, cfg, autocast)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, cfg)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.clip)
            opt.step()
            with torch.no_grad():
                for n, m in masked.items():
                    m.weight.mul_(masks[n])
            losses.append(distributed.mean(float(loss.detach())))
            if log is not None and ((step + 1) % LOG_EVERY == 0 or step + 1 == steps):
                line = {"event": "step", "stage": stage, "step": step + 1, "sparsity": sparsity,
                        "loss": _mean_loss(losses[-((step % LOG_EVERY) + 1):]), "lr": _lr_at(step, steps, cfg),
                        "seconds": round(time.perf_counter() - start, 2)}
                with open(log, "a") as f:
                    f.write(json.dumps(line) + "\n")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        model.to("cpu")
        if teacher_model is not None:
            teacher_model.to("cpu")
    return losses


def _mean_loss(losses: list[float]) -> float | None:
    """The mean of a tenth of a stage's losses (one window's loss says little)."""
    return float(np.mean(losses)) if losses else None


def validate(student, teacher, utts, context_s: int = 30) -> dict:
    """WER against the references, agreement with the teacher, and runaways on ``utts`` (each in
    the smallest of the buckets ``context_s`` and 30 s that holds it)."""
    from femtocc.decode import TorchBackend, score, transcribe
    from femtocc.passes.calibrate import dense_transcripts

    dense = {uid: teacher.text(tokens) for uid, tokens in dense_transcripts(teacher, utts).items()}
    report = score(transcribe(student, TorchBackend(student, sorted({context_s, 30})), utts), dense)
    return {key: report[key] for key in ("utterances", "wer", "agreement_wer", "hit_token_limit")}


def recover(teacher, cfg: RecoverConfig, windows, targets: Path, calib, out: Path, resume: bool = False,
            progress: bool = False, val=None, device: str = "cpu", student=None):
    """Run the stages; returns (student bundle, report). ``student``: the model to prune (default
    the teacher; a pruned model continues from its zeros); ``calib``: utterances for the Hessians;
    ``val``: held-back utterances scored after every stage (none: not scored)."""
    import copy

    from femtocc import distributed
    from femtocc.cache import atomic_write
    from femtocc.frontend.whisper import load_whisper, save_bundle
    from femtocc.passes.calibrate import collect_hessians, dense_transcripts, prunable_layers
    from femtocc.passes.prune import PruneConfig, prune_model, weights_digest

    check_schedules(cfg)
    if cfg.augment is not None and cfg.augment.speed != (1.0,):
        raise FemtoccError("the student's augmentation cannot change speed: the teacher's targets align with the "
                           "clean window's frames (pack the windows with speed perturbation instead)")
    if not 1 <= cfg.context_s <= 30 or (cfg.context_s < 30 and cfg.block_weight):
        raise FemtoccError(f"--context {cfg.context_s}: give whole seconds from 1 to 30; a shorter context than 30 "
                           "matches the encoder output only (--block-weight 0)")
    rank, world = distributed.rank_world()
    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "log.jsonl").write_text("")
    stages = [(s, cfg.steps) for s in cfg.sparsities] + ([(cfg.sparsities[-1], cfg.final_steps)] if cfg.final_steps else [])
    student, first, log = student or teacher, 0, []
    if student is teacher:  # training changes the student in place; the teacher stays as it is
        student = copy.copy(teacher)
        student.model = copy.deepcopy(teacher.model)
    if resume:
        done = [i for i in range(len(stages)) if (_stage_dir(out, i) / "femtocc.json").is_file()]
        if done:
            first = done[-1] + 1
            student = load_whisper(str(_stage_dir(out, done[-1])))
            if student.metadata.get("recovery", {}).get("teacher") != teacher.source_digest:
                raise FemtoccError(f"{_stage_dir(out, done[-1])}: a checkpoint of another model; cannot resume from it")
            lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
            lines = [e for e in lines if e["stage"] < first]
            if rank == 0:
                with atomic_write(out / "log.jsonl", "w") as f:
                    f.write("".join(json.dumps(e) + "\n" for e in lines))
            log = [e for e in lines if e.get("event", "stage") == "stage"]
    for i in range(first, len(stages)):
        sparsity, steps = stages[i]
        start = time.perf_counter()
        if i < len(cfg.sparsities):  # a pruning stage (the last, optional, only fine-tunes)
            if rank == 0:
                targets_of = {s: n for s, n in stage_targets(student.model, cfg, i).items() if s > 0}  # 0: distil only
                every = prunable_layers(student.model, cfg.include_embeddings)
                chosen = {n: every[n] for names in targets_of.values() for n in names}
                hessians = (collect_hessians(student, calib, chosen, progress, dense_tokens=dense_transcripts(teacher, calib))
                            if chosen else None)
                for s, names in targets_of.items():
                    exact = "^(" + "|".join(re.escape(n) for n in names) + ")$"
                    prune = PruneConfig("obs", s, cfg.pattern, layers=exact, keep_zeros=True,
                                        include_embeddings=cfg.include_embeddings)
                    student, _ = prune_model(student, prune, calib, progress, hessians=hessians)
            elif i == first:  # rank 0 pruned a copy; the others take its weights into theirs
                student = copy.copy(student)
                student.model = copy.deepcopy(student.model)
            distributed.broadcast_module(student.model)
        losses = distil(student, teacher, windows, targets, steps, cfg, i, device, progress,
                        out / "log.jsonl" if rank == 0 else None) if steps else []
        entry = {"event": "stage", "stage": i, "target_sparsity": sparsity,
                 "sparsity": sparsity_of(prunable_layers(student.model, cfg.include_embeddings)), "steps": steps,
                 "windows_per_step": cfg.batch * world,
                 "loss_first": _mean_loss(losses[: max(1, len(losses) // 10)]),
                 "loss_last": _mean_loss(losses[-max(1, len(losses) // 10):])}
        student.source_digest = weights_digest(student.model)
        digests = distributed.gather(student.source_digest)
        if len(set(digests)) > 1:
            raise FemtoccError(f"stage {i}: the {world} processes ended with different weights ({digests})")
        if world > 1:
            entry["rank_digests"] = digests
        student.metadata = {"recovery": {"teacher": teacher.source_digest, "config": asdict(cfg), "stage": i},
                            "dense_source": teacher.name}
        if rank == 0:
            entry["train_s"] = round(time.perf_counter() - start, 2)
            if val:
                entry["val"] = validate(student, teacher, val, cfg.context_s)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            log.append(entry)
            save_bundle(student, _stage_dir(out, i))
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if progress:
                loss = f", loss {entry['loss_first']:.4f} -> {entry['loss_last']:.4f}" if losses else ""
                scored = f", held-back WER {entry['val']['wer']:.2f}" if val else ""
                print(f"stage {i}: sparsity {entry['sparsity']:.3f}{loss}{scored}, {entry['seconds']} s", flush=True)
        distributed.barrier()
    return student, {"config": asdict(cfg), "stages": log}
