"""The ``femtocc`` command.

Every user-facing failure is a :class:`FemtoccError` and prints as one line; set
``FEMTOCC_DEBUG=1`` to see a traceback for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from femtocc.errors import FemtoccError

DEFAULT_DATA = "../shared/data/speech/dev"


class _Parser(argparse.ArgumentParser):
    """argparse with femtocc's one-line errors (the usage is one ``--help`` away)."""

    def error(self, message):
        where = self.prog.removeprefix("femtocc").strip()
        self.exit(2, f"femtocc: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value}: sparsity must be in [0, 1), the fraction of weights set to zero")
    return value


def pattern(text: str) -> str:
    from femtocc.passes.sparsity import parse_pattern

    try:
        return parse_pattern(text).name
    except FemtoccError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def widths(text: str) -> tuple:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give weight widths as 8,4") from None
    return values


def buckets(text: str) -> tuple:
    from femtocc.frontend.onnx_export import parse_buckets

    try:
        return parse_buckets(text, "")
    except FemtoccError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


BUCKETS_HELP = ("encoder context buckets in seconds, e.g. 10,30 (must include 30): each window is encoded "
                "in the smallest bucket that holds its audio (default 30: Whisper's full window)")


def _add_pipeline_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--pipeline", default=default, help=f"pass pipeline, e.g. 'canonicalize,fold-gelu' (default: {default!r})")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS", help="print the IR after PASS (repeatable)")


def _manager(args):
    from femtocc.passes import PassManager

    return PassManager.parse(
        args.pipeline, print_after_all=args.print_ir_after_all, print_after=tuple(args.print_ir_after), out=sys.stderr
    )


def _force_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace -o even when it is not {what} folder that femtocc wrote (never ., ~ or /)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEFAULT_DATA, help=f"speech folder (transcripts.tsv or LibriSpeech layout; default {DEFAULT_DATA})")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N utterances (sorted by id)")
    p.add_argument(
        "--split", choices=("all", "eval", "calib"), default="all",
        help="all utterances, or the speaker-disjoint evaluation / calibration part (default all)",
    )


def _utterances(args):
    from femtocc.data import load_dataset, split_by_speaker

    utts = load_dataset(args.data)
    if args.split != "all":
        calib, evaluation = split_by_speaker(utts)
        utts = calib if args.split == "calib" else evaluation
    return utts[: args.limit] if args.limit else utts


def _check_json(option: str | None) -> Path | None:
    """The --json path, checked before any work: not a folder, in a folder that can be written."""
    if option is None:
        return None
    path = Path(option).expanduser()
    if path.is_dir():
        raise FemtoccError(f"--json {option}: is a folder; give a file name")
    from femtocc.cache import existing_parent

    parent = existing_parent(path.resolve())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FemtoccError(f"--json {option}: cannot write into {parent}")
    return path


# ----------------------------------------------------------------------------- commands


def cmd_import(args) -> int:
    from femtocc.frontend.onnx_export import export_whisper, load_onnx
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.frontend.whisper import load_whisper
    from femtocc.ir import save

    from femtocc.cache import atomic_dir, check_output_dir

    out = check_output_dir(args.output, "import", args.force)
    manager = _manager(args)
    bundle = load_whisper(args.model)
    lines = []
    with atomic_dir(out) as tmp:
        paths = export_whisper(bundle, tmp, buckets=args.buckets)
        for which in paths:
            graph = manager.run(import_onnx(load_onnx(paths[which]), which))
            save(graph, tmp / f"{which}.fir")
            lines.append(f"wrote {out / which}.onnx and {out / which}.fir ({len(graph.nodes)} nodes, "
                         f"{graph.parameter_count():,} parameters)")
        (tmp / "femtocc-import.json").write_text(json.dumps(
            {"format": "femtocc-import/1", "model": args.model, "graphs": list(paths), "buckets": list(args.buckets),
             "pipeline": args.pipeline}, indent=1))
    print("\n".join(lines))
    if manager.records:
        print(manager.summary(), file=sys.stderr)
    return 0


def load_graph(path: Path):
    """An IR graph from ``.onnx`` or from IR text (with its ``.safetensors`` weights if present)."""
    from femtocc.ir import load

    if path.suffix == ".onnx":
        from femtocc.frontend.onnx_export import load_onnx
        from femtocc.frontend.onnx_ir import import_onnx

        return import_onnx(load_onnx(path), path.stem)
    return load(path)


def show_build(path: Path) -> int:
    """A build folder: its model, target, quantization, and each bucket's programs with their input
    shapes, sizes and predicted cycles (from report.json)."""
    from femtocc.decode import read_build
    from femtocc.frontend.onnx_export import split_name
    from femtocc.runtime.program import Program, format_dim

    manifest, data = read_build(path)
    totals = {}
    if (path / "report.json").is_file():
        totals = json.loads((path / "report.json").read_text()).get("totals", {})
    print(f"// build {path}: {manifest['model']} for {manifest['target']}, {manifest['quant']}, "
          f"buckets {', '.join(f'{b} s' for b in manifest.get('buckets', [30]))}")
    for name, blob in data.items():
        prog = Program.from_bytes(blob, name, validate=False)
        ins = ", ".join(f"{b.name}: {b.dtype}[{', '.join(format_dim(d) for d in b.shape)}]"
                        for b in prog.buffers if b.region == "input"
                        and (not b.name.startswith(("past_", "cross_")) or b.name.startswith("cross_k.0")))
        cycles = totals.get(name, {}).get("predicted_cycles")
        print(f"{split_name(name)[1]:>3} s  {name:<17} {len(blob) / 2**20:7.2f} MiB  "
              + (f"{cycles / 1e6:8.1f} Mcycles  " if cycles is not None else "") + ins)
    return 0


def cmd_show(args) -> int:
    from femtocc.ir import print_graph

    path = Path(args.file)
    if not path.exists():
        raise FemtoccError(f"{path}: no such file")
    if path.is_dir():
        return show_build(path)
    if path.suffix == ".spu":
        from femtocc.runtime.reference import load_program

        sys.stdout.write(load_program(path).disassemble())
        return 0
    graph = load_graph(path)
    if args.pipeline:
        _manager(args).run(graph)
    if not args.summary:
        sys.stdout.write(print_graph(graph))
    counts = graph.op_counts()
    print(f"// @{graph.name}: {len(graph.nodes)} nodes, {len(graph.constants)} constants, "
          f"{graph.parameter_count():,} parameters")
    print("// ops: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    return 0


def _print_report(rows: list[tuple[str, dict]]) -> None:
    print(f"{'backend':<14}{'utts':>6}{'WER %':>9}{'agree %':>9}{'same':>6}{'limit':>7}{'s/utt':>8}")
    for name, r in rows:
        agree = f"{r['agreement_wer']:.2f}" if "agreement_wer" in r else "-"
        same = str(r.get("identical_transcripts", "-"))
        print(f"{name:<14}{r['utterances']:>6}{r['wer']:>9.2f}{agree:>9}{same:>6}{r['hit_token_limit']:>7}"
              f"{r['seconds'] / max(r['utterances'], 1):>8.2f}")


def dense_reference(bundle, utts) -> dict[str, str]:
    """Transcripts of the dense model a (pruned) model came from, for agreement."""
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.calibrate import dense_transcripts

    source = bundle.metadata.get("dense_source")
    dense = load_whisper(source) if source else bundle
    return {uid: dense.text(tokens) for uid, tokens in dense_transcripts(dense, utts).items()}


def cmd_eval(args) -> int:
    from femtocc.cache import atomic_write
    from femtocc.backends import make_backend
    from femtocc.decode import score, transcribe
    from femtocc.frontend.whisper import load_whisper

    json_path = _check_json(args.json)
    utts = _utterances(args)
    bundle = load_whisper(args.model)
    backend = make_backend(bundle, args.backend, manager=_manager(args) if args.backend == "ir" else None,
                           buckets=args.buckets)
    transcripts = transcribe(bundle, backend, utts, progress=not args.quiet)
    report = score(transcripts, dense_reference(bundle, utts))
    if bundle.metadata.get("pruning"):
        report["pruning"] = bundle.metadata["pruning"]
    _print_report([(args.backend, report)])
    if json_path is None:
        print("per-utterance results not written (--json OUT writes them)")
        return 0
    result = {
        "model": args.model,
        "backend": args.backend,
        "data": str(args.data),
        "split": args.split,
        "report": report,
        "utterances": [t.__dict__ for t in transcripts],
    }
    with atomic_write(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {json_path}")
    return 0


def cmd_prune(args) -> int:
    from femtocc.cache import atomic_write
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.whisper import load_whisper, save_bundle
    from femtocc.passes.prune import PruneConfig, prune_model

    from femtocc.cache import check_output_dir

    if args.vocabulary_size is not None and (not args.vocabulary_from or args.vocabulary_size < 1):
        raise FemtoccError("--vocabulary-size needs --vocabulary-from and must be at least 1")
    if (args.schedule or args.train) and args.vocabulary_from:
        raise FemtoccError("--vocabulary-from restricts a finished model: recover first, then run "
                           "femtocc prune OUT --sparsity 0 --vocabulary-from DIR on the result")
    if args.schedule or args.train:
        return _cmd_recover(args)
    per_layer = None
    if args.plan:
        from femtocc.passes.plan import read_plan

        plan = read_plan(args.plan)
        if args.method != "obs":
            raise FemtoccError(f"--plan was made with OBS; --method {args.method} cannot apply it")
        per_layer, args.pattern = {n: v["sparsity"] for n, v in plan["layers"].items()}, plan["pattern"]
    cfg = PruneConfig(
        per_layer=per_layer,
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation,
        damping=args.damping, refit_iterations=args.refit_iterations, admm_iterations=args.admm_iterations,
        sequential=args.sequential, layers=args.layers,
        include_embeddings=args.include_embeddings,
        heldout=args.heldout,
    )
    cfg.check()
    check_output_dir(args.output, "model", args.force)
    calib = load_dataset(args.calib)
    if args.calib_split == "calib":
        calib = split_by_speaker(calib)[0]
    calib = calib[: args.calib_limit] if args.calib_limit else calib
    vocab_utts = load_dataset(args.vocabulary_from) if args.vocabulary_from else None
    bundle = load_whisper(args.model)
    if args.sparsity > 0 or not args.vocabulary_from:
        pruned, report = prune_model(bundle, cfg, calib, progress=not args.quiet)
    else:  # only the vocabulary
        pruned, report = bundle, None
    pruned.metadata["dense_source"] = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    if vocab_utts is not None:
        from femtocc.passes.vocabulary import corpus_tokens, fill, restrict

        used = corpus_tokens(bundle, vocab_utts, progress=not args.quiet)
        if args.vocabulary_size:
            needed = set(bundle.decode.prompt) | {bundle.decode.eot}
            used = fill(used | needed, args.vocabulary_size, bundle.model.config.vocab_size)
        pruned = restrict(pruned, used, {"data": args.vocabulary_from, "utterances": len(vocab_utts),
                                         "size": args.vocabulary_size})
        source = pruned.metadata["vocabulary_source"]
        print(f"vocabulary: kept {source['kept']:,} of {source['of']:,} tokens (the ones {bundle.name} writes on "
              f"{len(vocab_utts)} utterances of {args.vocabulary_from}, the prompt and end of text"
              f"{', topped up with the most frequent' if args.vocabulary_size else ''})")
    out = save_bundle(pruned, args.output)
    if report is None:
        print(f"wrote {out}")
        return 0
    with atomic_write(out / "prune-report.json", "w") as f:
        json.dump(report, f, indent=1)
    if args.verbose:
        print(f"{'layer':<42}{'shape':>12}{'sparsity':>10}{'rel.err':>10}{'unrefit':>10}{'held-out':>10}{'damp':>7}")
        for name, r in report["layers"].items():
            err, unrefit, heldout = (f"{r[k]:.4f}" if r[k] is not None else "-"
                                     for k in ("relative_error", "relative_error_before_refit", "heldout_error"))
            damp = f"{r['damping']:g}" if r["damping"] is not None else "-"
            print(f"{name:<42}{'x'.join(map(str, r['shape'])):>12}{r['sparsity']:>10.3f}{err:>10}{unrefit:>10}"
                  f"{heldout:>10}{damp:>7}")
    print(f"pruned {len(report['layers'])} layers ({report['pruned_params']:,} of {report['model_params']:,} "
          f"parameters) with {args.method}, pattern {report['config']['pattern']}: sparsity {report['sparsity']:.4f}, "
          f"{report['calibration_utterances']} calibration utterances, damping {report['dampings_used'] or '-'}, "
          f"{report['seconds']:.1f} s (calibration {report['calibration_s']:.1f} s, pruning {report['pruning_s']:.1f} s)")
    if report["mean_heldout_error"] is not None:
        print(f"mean relative layer error {report['mean_relative_error']:.4f} on the calibration speech, "
              f"{report['mean_heldout_error']:.4f} on held-out speakers")
    print(f"wrote {out} and {out / 'prune-report.json'}")
    return 0


def _cmd_recover(args) -> int:
    """``prune --schedule ... --train DIR``: gradual OBS with distillation (passes/recover.py)."""
    import time

    from femtocc import distributed
    from femtocc.cache import atomic_write, check_output_dir
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.whisper import load_whisper, save_bundle
    from femtocc.passes.recover import RecoverConfig, check_schedules, frozen_parameters, recover
    from femtocc.passes.schedule import parse_schedule
    from femtocc.passes.sparsity import parse_pattern
    from femtocc.train_data import Augment, pack, packing_stats, teacher_targets

    if not (args.schedule and args.train):
        raise FemtoccError("recovery training needs both --schedule and --train")
    if args.method != "obs":
        raise FemtoccError(f"--schedule prunes with OBS; --method {args.method} cannot be scheduled")
    plain = [text for text in args.schedule if "@" not in text]
    if len(plain) != 1:
        raise FemtoccError(f"give exactly one --schedule without @REGEX (for the layers no other one names), "
                           f"got {len(plain)}")
    sparsities = parse_schedule(plain[0])
    groups = [(text.split("@", 1)[1], parse_schedule(text.split("@", 1)[0])) for text in args.schedule if "@" in text]
    layers, table = args.layers, args.include_embeddings
    if args.plan:
        if groups or args.layers:
            raise FemtoccError("--plan gives every layer its own sparsity; leave out @REGEX schedules and --layers")
        from femtocc.passes.plan import plan_schedules

        groups, layers, args.pattern, planned_table = plan_schedules(args.plan, sparsities)
        table = table or planned_table
    check_schedules(RecoverConfig(sparsities, groups=groups))
    fixed = parse_pattern(args.pattern).fixed_sparsity
    if fixed is not None and any(x != fixed for x in [*sparsities, *(x for _, g in groups for x in g)]):
        raise FemtoccError(f"--pattern {args.pattern}: N:M fixes the sparsity at {fixed}; give a schedule that "
                           f"stays there, e.g. oneshot:{fixed}:{fixed}:1")
    if args.final_steps < 0 or args.warmup < 0 or args.lr <= 0 or (args.val_limit or 0) < 0:
        raise FemtoccError("--final-steps, --warmup and --val-limit must be >= 0 and --lr > 0")
    if min(args.kl_weight, args.hidden_weight, args.block_weight) < 0:
        raise FemtoccError("--kl-weight, --hidden-weight and --block-weight must be >= 0")
    if args.context > 30:
        raise FemtoccError(f"--context {args.context}: Whisper's window is 30 s; give 1 to 30")
    if args.window is not None and args.window > args.context:
        raise FemtoccError(f"--window {args.window}: a window must fit the student's context (--context {args.context})")
    if args.context < 30 and args.block_weight:
        raise FemtoccError(f"--context {args.context}: a shorter context than 30 s matches the encoder output only; "
                           "give --block-weight 0")
    augment = Augment.parse(args.augment) if args.augment else None
    if args.keep == "best" and args.val_limit == 0:
        raise FemtoccError("--keep best chooses by the held-back WER; it needs --val-limit above 0")
    rank, world, device = distributed.init_from_env(args.device)
    out = check_output_dir(args.output, "model", args.force)
    start = time.perf_counter()
    train = load_dataset(args.train)[: args.train_limit]
    calib = load_dataset(args.calib)
    calib = split_by_speaker(calib)[0] if args.calib_split == "calib" else calib
    val = split_by_speaker(load_dataset(args.val))[0][: args.val_limit] if args.val_limit != 0 else []
    calib = calib[: args.calib_limit] if args.calib_limit else calib
    bundle = load_whisper(args.model)
    teacher_name = args.teacher or bundle.metadata.get("dense_source") or args.model
    teacher = load_whisper(teacher_name) if teacher_name != args.model else bundle
    frozen_parameters(bundle.model, args.freeze)  # a bad --freeze fails before the teacher's targets
    if bundle.metadata.get("vocabulary") != teacher.metadata.get("vocabulary"):
        raise FemtoccError(f"{args.model} and its teacher {teacher_name} have different vocabularies; distil the "
                           "full-vocabulary model, then restrict it (--vocabulary-from)")
    talk = not args.quiet and rank == 0
    window = args.window or args.context
    if window < 30:
        from femtocc.train_data import duration_s

        option = f"--window {window}" if args.window else f"--context {window}"
        fits = [u for u in train if duration_s(u) <= window]
        if not fits:
            raise FemtoccError(f"{option}: no clip of {args.train} is that short")
        if talk:
            print(f"{option}: {len(fits)} of {len(train)} training clips fit; the others are left out")
        train = fits
    windows = pack(train, seed=args.seed, window_s=window)
    targets = teacher_targets(teacher, windows, k=args.top_k, hidden=args.hidden_weight > 0, progress=talk)
    cfg = RecoverConfig(sparsities, args.pattern, args.steps_per_stage, args.final_steps, args.batch, args.lr,
                        args.warmup, kl_weight=args.kl_weight, hidden_weight=args.hidden_weight,
                        block_weight=args.block_weight, precision=args.precision, seed=args.seed, layers=layers,
                        groups=groups, context_s=args.context, augment=augment, include_embeddings=table,
                        freeze=args.freeze)
    work = out.with_name(out.name + ".recovery")
    student, report = recover(teacher, cfg, windows, targets, calib, work, resume=args.resume, progress=talk,
                              val=val, device=device, student=bundle)
    if rank != 0:
        return 0
    if args.keep == "best":  # early stopping: the stage at the final sparsity with the lowest held-back WER
        final = report["stages"][-1]["target_sparsity"]
        best = min((e for e in report["stages"] if e["target_sparsity"] == final and "val" in e),
                   key=lambda e: (e["val"]["wer"], -e["stage"]))
        student = load_whisper(str(work / f"stage-{best['stage']:02d}"))
        report["kept_stage"] = best["stage"]
    student.metadata["dense_source"] = teacher_name if not Path(teacher_name).exists() else str(Path(teacher_name).resolve())
    save_bundle(student, out)
    report.update({"command": "femtocc " + " ".join(sys.argv[1:]), "schedule": plain[0], "teacher": teacher_name,
                   "start": args.model,
                   "group_schedules": [text for text in args.schedule if "@" in text],
                   **({"plan": str(args.plan), "pattern": args.pattern} if args.plan else {}),
                   "data": {"train": str(args.train), **packing_stats(windows, args.context), "context_s": args.context,
                            "window_s": window,
                            "calibration": str(args.calib),
                            "calibration_utterances": len(calib), "validation": str(args.val),
                            "validation_utterances": len(val), "validation_split": "calib"},
                   "seconds": round(time.perf_counter() - start, 1), "device": device, "processes": world})
    with atomic_write(out / "train-report.json", "w") as f:
        json.dump(report, f, indent=1)
    last = report["stages"][-1]
    reached = f"the sparsities of {args.plan}" if args.plan else f"sparsity {last['target_sparsity']}"
    print(f"recovered {args.model} over {len(report['stages'])} stages to {reached} "
          f"({report['data']['speech_s']:.0f} s of training speech in {len(windows)} windows)"
          + (f", kept stage {report['kept_stage']}" if "kept_stage" in report else "")
          + f"; wrote {out} (train-report.json) and the stages in {work}")
    return 0


def cmd_compile(args) -> int:
    from femtocc.compile import CompileOptions, compile_model, print_report

    if not args.method:
        given = [o for o, v in (("--sparsity", args.sparsity), ("--pattern", args.pattern)) if v is not None]
        if given:
            raise FemtoccError(f"{given[0]} given without --method: nothing would be pruned; add --method obs "
                               f"(or leave out {given[0]})")
    if args.plan and (args.method or args.sparsity is not None or args.pattern):
        raise FemtoccError("--plan sets the method, pattern and every layer's sparsity; leave out --method, "
                           "--sparsity and --pattern")
    opts = CompileOptions(
        plan=args.plan,
        model=args.model, output=Path(args.output), target=args.target_file or "", method=args.method,
        sparsity=0.5 if args.sparsity is None else args.sparsity, pattern=args.pattern or "",
        force=args.force,
        quant=args.quant, weight_quant=args.weight_quant, calib=args.calib, calib_limit=args.calib_limit,
        range_limit=args.range_limit, print_ir_after_all=args.print_ir_after_all, print_ir_after=tuple(args.print_ir_after),
        save_ir=args.save_ir, progress=not args.quiet, log=sys.stderr, buckets=args.buckets, vocab_bits=args.vocab_bits or 0,
    )
    if args.target != "spu001":
        raise FemtoccError(f"--target {args.target!r}: the only target is spu001 (a variant is --target-file FILE.toml)")
    report = compile_model(opts)
    print_report(report, sys.stdout)
    programs = ", ".join(f"{w}.spu" for w in report["totals"])
    print(f"wrote {args.output}/ ({programs}, build.json, report.json, report.png) "
          f"in {report['stages_s']['total']:.1f} s")
    return 0


def cmd_run(args) -> int:
    from femtocc.cache import atomic_write
    from femtocc.decode import build_target, read_build, run_build, score
    from femtocc.frontend.whisper import load_whisper

    json_path = _check_json(args.json)
    manifest, _ = read_build(args.build)
    utts = _utterances(args)
    bundle = load_whisper(manifest["model"])
    transcripts, runs = run_build(args.build, args.runtime, utts, args.workers, progress=not args.quiet, bundle=bundle)
    per_utt, sink = [], [r for rs in runs for r in rs]
    if args.runtime == "sim":
        from femtocc.runtime.report import utterance_stats

        clock_hz = build_target(manifest).facts.clock_hz
        per_utt = [utterance_stats(rs, t, clock_hz) for rs, t in zip(runs, transcripts)]
    report = score(transcripts, dense_reference(bundle, utts))
    report["build"] = {k: manifest[k] for k in ("model", "target", "quant", "pruning")}
    timeline = json_path and json_path.with_name(f"{json_path.stem}-timeline.png")
    if per_utt:
        from femtocc.runtime.report import plot_timeline, summarize

        report["simulator"] = summarize(per_utt, sink)
        if timeline:
            plot_timeline(report["simulator"], timeline)
    _print_report([(args.runtime, report)])
    if per_utt:
        sim = report["simulator"]
        print(f"simulated on {manifest['target']}: {sim['latency_s_mean']:.3f} s latency per utterance "
              f"({sim['real_time_factor']:.3f} x real time), {sim['energy_uj_mean']:.0f} uJ per utterance, "
              f"{sim['macs_per_utterance']:.3g} MACs ({sim['macs_skipped_fraction']:.1%} skipped as zero activations)"
              + (f"; timeline: {timeline}" if timeline else ""))
    if json_path is None:
        print("per-utterance results not written (--json OUT writes them" +
              (", and the timeline beside them)" if per_utt else ")"))
        return 0
    with atomic_write(json_path, "w") as f:
        json.dump({"build": str(args.build), "runtime": args.runtime, "data": str(args.data), "split": args.split,
                   "report": report, "utterances": [dict(t.__dict__, **(per_utt[i] if per_utt else {}))
                                                    for i, t in enumerate(transcripts)]}, f, indent=1, default=str)
    print(f"wrote {json_path}")
    return 0


def parse_size(text: str) -> int:
    """``1MiB``, ``512KiB``, ``1MB``, ``1048576``: bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1MiB, 512KiB or 1048576")
    unit = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def cmd_plan(args) -> int:
    from femtocc.cache import atomic_write
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.plan import make_plan
    from femtocc.targets.spu001.description import load_target

    json_path = _check_json(args.output)
    if args.source:
        from femtocc.passes.plan import replan

        if args.model:
            raise FemtoccError("--from PLAN chooses again from that plan's measurements; give no MODEL")
        plan = replan(args.source, args.sram, args.layer_bits)
    else:
        if not args.model:
            raise FemtoccError("give a MODEL to plan (or --from PLAN)")
        target = load_target(args.target_file or "")
        budget = args.sram if args.sram is not None else target.sram_bytes
        for bits in args.layer_bits or ():
            target.check_weight_bits(bits, "--layer-bits")
        calib = split_by_speaker(load_dataset(args.calib))[0][: args.calib_limit]
        bundle = load_whisper(args.model)
        plan = make_plan(bundle, calib, args.scope, budget, target, args.quant, args.layer_bits, progress=not args.quiet)
    with atomic_write(json_path, "w") as f:
        json.dump(plan, f, indent=1)
    sparsities = [v["sparsity"] for v in plan["layers"].values()]
    print(f"{plan['scope']} of {plan['model']} in {plan['sram_bytes']:,} bytes ({plan['pattern']}, {plan['quant']}): "
          f"{plan['scope_bytes']:,} bytes, {plan['resident_nonzero_parameters']:,} of {plan['scope_parameters']:,} "
          f"parameters kept, layer sparsities {min(sparsities):.2f}-{max(sparsities):.2f}, layers at "
          f"{', '.join(f'{b} bits: {n}' for b, n in plan['layers_at_bits'].items())}, predicted error "
          f"{plan['predicted_error']:.3f} (sum of layer errors); wrote {json_path}")
    return 0


def cmd_sweep(args) -> int:
    from femtocc import sweep

    if args.report:
        if args.grid or args.output:
            raise FemtoccError("--report DIR draws a finished sweep; give it alone")
        result = sweep.report(args.report)
        for axis in result["axes"]:
            front = [r for r in result["records"] if r["id"] in result["fronts"][axis]]
            print(f"front of WER against {axis}: " + ", ".join(
                f"{r['wer']:.2f} @ {r[axis]:.3g} ({r['strategy']})" for r in sorted(front, key=lambda r: r[axis])))
        print(f"{result['points']} points ({result['failed']} failed); wrote {args.report}/pareto.json and pareto.png")
        return 0
    if not args.grid or not args.output:
        raise FemtoccError("give a grid file and -o DIR (or --report DIR)")
    settings, points = sweep.load_grid(args.grid)
    if args.dry_run:
        for p in points:
            cmds = sweep.commands(p, settings, Path(args.output) / "points" / p["id"])
            print(f"{p['id']}  {p['name']}: " + " && ".join("femtocc " + " ".join(c) for c in cmds))
        print(f"{len(points)} points")
        return 0

    def progress(record, i, n):
        if args.quiet:
            return
        what = (f"WER {record['wer']:.2f}, {record['weight_bytes'] / 2**20:.2f} MiB" if record["status"] == "done"
                else f"FAILED in {record['failed_command']}: {record['error']}")
        print(f"[{i}/{n}] {record['id']} {record['strategy']}: {what} ({record.get('seconds', 0):.0f} s)", flush=True)

    summary = sweep.run_sweep(args.grid, args.output, args.workers, args.ray, args.ray_cpus, args.ray_memory_gb,
                              args.ray_gpus, progress)
    print(f"{summary['points']} points: {summary['skipped']} already done, {summary['ran']} run "
          f"({summary['failed']} failed) in {summary['seconds']:.0f} s; records in {args.output}/{sweep.RECORDS}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from femtocc import __version__
    from femtocc.backends import BACKENDS
    from femtocc.passes import DEFAULT_PIPELINE

    parser = _Parser(
        prog="femtocc",
        description="Sparse compiler stack for Whisper on the spu001 sparse processing unit.",
    )
    parser.add_argument("--version", action="version", version=f"femtocc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("import", help="export a Whisper model to ONNX and femtocc IR",
                       description="Export MODEL's encoder, cross-attention K/V and decoder step to ONNX "
                                   "(opset 18) and write each as femtocc IR text (.fir) with its weights.")
    p.add_argument("model", help="whisper-tiny.en, whisper-base, a local folder or a hub id")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--buckets", type=buckets, default=(30,), help=BUCKETS_HELP + "; the graphs of every bucket")
    _force_arg(p, "an import")
    _add_pipeline_args(p, DEFAULT_PIPELINE)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("show", help="print the IR of an .onnx or .fir file with op and parameter counts, "
                                    "a .spu program's disassembly, or a build folder's programs")
    p.add_argument("file")
    p.add_argument("--summary", action="store_true", help="only the counts, not the IR")
    _add_pipeline_args(p, "")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("eval", help="transcribe speech with a backend and report WER",
                       description="Greedy-decode every utterance and report corpus WER (Whisper English "
                                   "normalizer), the number of utterances that hit the token limit, and agreement "
                                   "with the transcripts of the dense model (the model itself, or the one a "
                                   "pruned model came from).")
    p.add_argument("model")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--buckets", type=buckets, default=(30,), help=BUCKETS_HELP)
    p.add_argument("--json", metavar="OUT", help="write per-utterance results to OUT (default: none written)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _data_args(p)
    _add_pipeline_args(p, DEFAULT_PIPELINE)
    p.set_defaults(func=cmd_eval)

    from femtocc.passes.obs import ADMM_ITERATIONS, REFIT_ITERATIONS
    from femtocc.passes.prune import METHODS

    p = sub.add_parser("prune", help="prune a model with OBS or magnitude pruning",
                       description="Prune every linear and conv layer of encoder and decoder (not the token "
                                   "embedding / output projection) and write the pruned model as a folder that "
                                   "every other command accepts.")
    p.add_argument("model")
    p.add_argument("--method", choices=METHODS, default="obs")
    p.add_argument("--sparsity", type=sparsity, default=0.5, help="fraction of pruned-layer weights set to zero (default 0.5)")
    p.add_argument("--pattern", type=pattern, default="unstructured", help="unstructured, pencilH such as pencil8, or N:M such as 2:4 (default unstructured)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="same sparsity in every layer, or allocated across layers from the OBS error (default uniform)")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="prune each layer a femtocc plan names to its planned sparsity, in its pattern (OBS); with "
                        "--schedule and --train, gradually with recovery training (the schedule gives the shape)")
    p.add_argument("--damping", type=float, default=None, help="OBS damping as a fraction of mean(diag H) (default: automatic)")
    p.add_argument("--refit-iterations", type=int, default=REFIT_ITERATIONS, metavar="N",
                   help="OBS: conjugate-gradient iterations that refit the kept weights to the pruned mask "
                        f"(0: SparseGPT's update alone; default {REFIT_ITERATIONS})")
    p.add_argument("--admm-iterations", type=int, default=0, metavar="N",
                   help="OBS: search the mask further by ADMM (ALPS-style) on the layers fed by audio frames "
                        f"(encoder, cross-attention k/v); {ADMM_ITERATIONS} is a good value, minutes per model "
                        "(default 0: off)")
    p.add_argument("--sequential", action="store_true", help="calibrate each block on the already pruned blocks before it")
    p.add_argument("--heldout", action="store_true",
                   help="also report each layer's error on held-out calibration speakers (every other speaker), "
                        "pruned without them: shows how far the calibration error generalises")
    p.add_argument("--layers", default=None, metavar="REGEX", help="prune only layers whose module path matches")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also prune the output projection (tied embedding); with --schedule it is pruned and "
                        "recovered like the other layers (--layers '^proj_out$' for the table alone)")
    p.add_argument("--vocabulary-from", default=None, metavar="DIR",
                   help="keep only the output tokens the model writes on this speech folder (its own transcripts of "
                        "the packed 30-s windows, cached like recovery training's teacher targets); with --sparsity 0 "
                        "nothing else is pruned")
    p.add_argument("--vocabulary-size", type=int, default=None, metavar="N",
                   help="with --vocabulary-from: top the kept tokens up to N with the most frequent ones (lowest ids)")
    r = p.add_argument_group("recovery training (gradual OBS with distillation on training speech)")
    r.add_argument("--schedule", action="append", default=None, metavar="KIND:START:FINAL:STAGES[@REGEX]",
                   help="stage sparsities: cubic, linear or oneshot, e.g. cubic:0:0.6:4 (replaces --sparsity); "
                        "repeat with @REGEX for layers that follow their own schedule, e.g. cubic:0.3:0.9:4@^encoder")
    r.add_argument("--train", default=None, metavar="DIR", help="training speech folder (the dense model's outputs are the targets)")
    r.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the model to distil from (default: the dense model MODEL was pruned from, else MODEL)")
    r.add_argument("--train-limit", type=positive_int, default=None, help="use only N training utterances")
    r.add_argument("--steps-per-stage", type=positive_int, default=100, help="distillation steps per stage (default 100)")
    r.add_argument("--final-steps", type=int, default=0, help="steps of a last stage at the final sparsity (default 0)")
    r.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate (default 1e-5)")
    r.add_argument("--warmup", type=int, default=10, help="linear warm-up steps per stage (default 10)")
    r.add_argument("--batch", type=positive_int, default=1, help="windows per step and process (default 1)")
    r.add_argument("--kl-weight", type=float, default=1.0)
    r.add_argument("--hidden-weight", type=float, default=1.0, help="weight of encoder-output matching (0: off)")
    r.add_argument("--block-weight", type=float, default=0.0,
                   help="weight of every block's output matching, the teacher running beside the student (default 0: off)")
    r.add_argument("--val", default=DEFAULT_DATA, metavar="DIR",
                   help=f"after every stage, score WER on the calibration speakers of DIR, never its evaluation "
                        f"speakers (default {DEFAULT_DATA})")
    r.add_argument("--val-limit", type=int, default=None, help="score only N of them (0: no scoring)")
    r.add_argument("--keep", choices=("last", "best"), default="last",
                   help="the output: the last stage, or of the stages at the final sparsity the one with the lowest "
                        "held-back WER (early stopping; default last)")
    r.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward and backward under autocast, fp32 weights (1.9x faster on CPUs with AMX)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where distillation runs (under torchrun: gloo on cpu, NCCL on cuda)")
    r.add_argument("--context", type=positive_int, default=30, metavar="S",
                   help="the student's encoder context in seconds, the bucket it will run in (compile --buckets S,30): "
                        "windows are packed to S seconds, the student encodes only them, the teacher the full 30-s "
                        "window; training clips longer than S are left out (default 30)")
    r.add_argument("--augment", metavar="SPEC", default=None,
                   help="augment the student's input afresh every step, the targets staying the teacher's on the clean "
                        "window: gain=DB, snr=LO:HI (white noise), freq=NxW and time=NxW (SpecAugment masks: N masks "
                        "up to W mel bands / 10-ms frames), e.g. gain=6,snr=15:35,freq=2x12,time=2x40")
    r.add_argument("--window", type=positive_int, default=None, metavar="S",
                   help="pack training clips into windows of at most S seconds, the rest of the context silence as "
                        "when one utterance is transcribed; clips longer than S are left out (default: the context)")
    r.add_argument("--freeze", default=None, metavar="REGEX",
                   help="do not train the parameters whose name matches, e.g. embed_tokens: the token table "
                        "(tied to the output projection, 20 M of tiny.en's 38 M) stays as it is")
    r.add_argument("--top-k", type=positive_int, default=16, help="teacher log-probs kept per position (default 16)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", action="store_true", help="continue from the last stage saved in OUT.recovery/")
    p.add_argument("--calib", default=DEFAULT_DATA, help=f"calibration speech folder (default {DEFAULT_DATA})")
    p.add_argument("--calib-split", choices=("calib", "all"), default="calib",
                   help="use the speaker-disjoint calibration part of --calib (default), or all of it")
    p.add_argument("--calib-limit", type=positive_int, default=None, help="at most N calibration utterances")
    p.add_argument("-o", "--output", required=True, help="output model folder")
    _force_arg(p, "a pruned model")
    p.add_argument("--verbose", action="store_true", help="print the per-layer table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compile", help="compile a model for spu001: prune, quantize, layout, tile, codegen",
                       description="The whole pipeline: optional pruning, integer quantization with calibrated scales, "
                                   "sparse layout selection, SRAM tiling, and code generation of three programs "
                                   "(encoder, cross K/V, decoder step). Writes the build folder and a report "
                                   "(terminal table, report.json, report.png).")
    p.add_argument("model")
    p.add_argument("--target", default="spu001", help="target name (spu001)")
    p.add_argument("--target-file", default=None, help="a target description TOML (a variant of spu001)")
    p.add_argument("--method", choices=METHODS, default=None, help="prune with this method first (default: no pruning)")
    p.add_argument("--sparsity", type=sparsity, default=None, help="with --method: fraction of weights set to zero (default 0.5)")
    p.add_argument("--pattern", type=pattern, default=None,
                   help="with --method: pruning pattern (default the target's native pencil: pencil8 on spu001)")
    from femtocc.compile import QUANT

    p.add_argument("--quant", choices=tuple(QUANT), default="w8a16")
    p.add_argument("--weight-quant", choices=("round", "gptq"), default="round",
                   help="round weights to the grid, or GPTQ: second-order rounding with error compensation")
    p.add_argument("--calib", default=DEFAULT_DATA, help="calibration speech (its speaker-disjoint calibration part is used)")
    p.add_argument("--calib-limit", type=positive_int, default=32, help="calibration utterances (default 32)")
    p.add_argument("--range-limit", type=positive_int, default=None, help="of those, how many set activation ranges (default all)")
    p.add_argument("--buckets", type=buckets, default=(30,), help=BUCKETS_HELP + "; one set of programs per bucket")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="prune by a femtocc plan (each layer to its planned sparsity, OBS) and report whether its "
                        "scope's weights fit its SRAM budget")
    p.add_argument("--vocab-bits", type=int, choices=(4, 8), default=None,
                   help="precision of the token table, the embedding and the output projection tied to it (default: "
                        "int8, or --quant's weight bits for an untied projection); 4 halves what each decoder step streams")
    p.add_argument("-o", "--output", required=True, help="build folder")
    _force_arg(p, "a build")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--save-ir", action="store_true", help="also write BUILD/ir/*.fir, the IR the programs came from")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every target pass")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS", help="print the IR after PASS (repeatable)")
    p.set_defaults(func=cmd_compile)

    from femtocc.decode import RUNTIMES

    p = sub.add_parser("run", help="transcribe speech with a compiled build and report WER",
                       description="Run the build's programs on a runtime, greedy-decode every utterance, and report "
                                   "WER and agreement with the dense float model's transcripts.")
    p.add_argument("build")
    p.add_argument("--runtime", choices=RUNTIMES, default="reference")
    p.add_argument("--json", metavar="OUT", help="write per-utterance results to OUT, and with --runtime sim the "
                                                  "timeline to OUT's name + -timeline.png (default: none written)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="transcribe utterances in this many processes at once (same results; default 1)")
    p.add_argument("--quiet", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="choose a sparsity and weight width per layer so that a scope's weights fit an SRAM budget",
                       description="Prune every layer of the scope by OBS at each candidate sparsity and round it by "
                                   "GPTQ at each weight width the target allows, on calibration speech; measure its "
                                   "output error and its bytes as the compiler stores them, and choose per layer to "
                                   "fit the budget at the least summed error (passes/plan.py). Apply with femtocc "
                                   "compile --plan (or prune --plan).")
    p.add_argument("model", nargs="?")
    p.add_argument("--from", dest="source", metavar="PLAN",
                   help="choose again from the candidates PLAN measured (another --sram or --layer-bits; seconds)")
    p.add_argument("--sram", type=parse_size, default=None, help="the budget, e.g. 1MiB (default: the target's SRAM)")
    p.add_argument("--scope", choices=("encoder", "model"), default="encoder",
                   help="the encoder's weights, or the whole model's with the token table (default encoder)")
    p.add_argument("--quant", choices=tuple(QUANT), default="w8a16",
                   help="the build's precision: its activation width (and the default weight width)")
    p.add_argument("--layer-bits", type=widths, default=None, metavar="8,4",
                   help="the weight widths a layer may get (default: the target's assumptions.layer_weight_bits)")
    p.add_argument("--target-file", default=None, help="a target description TOML (a variant of spu001)")
    p.add_argument("--calib", default=DEFAULT_DATA, help="calibration speech (its speaker-disjoint calibration part)")
    p.add_argument("--calib-limit", type=positive_int, default=16, help="calibration utterances (default 16)")
    p.add_argument("-o", "--output", required=True, help="the plan file (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="explore a grid of builds (prune, compile, run) to a WER / cost Pareto front",
                       description="Run every point of GRID.toml (see femtocc.sweep) not yet done in DIR, appending "
                                   "each record to DIR/points.jsonl; or, with --report DIR, draw the Pareto front of "
                                   "WER against each cost axis (DIR/pareto.json, DIR/pareto.png).")
    p.add_argument("grid", nargs="?", help="the grid file (TOML)")
    p.add_argument("-o", "--output", help="the sweep folder (created, or continued)")
    p.add_argument("--report", metavar="DIR", help="compute and draw the Pareto front of a sweep folder")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="points run at once on this machine (each point's processes one thread each; default 1)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run every point as a Ray task: on the cluster at ADDRESS, or on a Ray instance started "
                        "here when no address is given (needs femtocc[ray])")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray task (default 1)")
    p.add_argument("--ray-memory-gb", type=float, default=6.0, help="memory per Ray task in GiB (default 6)")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray task (default 0)")
    p.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")
    p.add_argument("--quiet", action="store_true", help="no line per finished point")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except FemtoccError as e:
        print(f"femtocc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("femtocc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI never shows a raw traceback unless asked to
        if os.environ.get("FEMTOCC_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"femtocc: internal error ({type(e).__name__}: {first}); rerun with FEMTOCC_DEBUG=1 "
              "for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
