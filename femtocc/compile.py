"""The compile driver: Whisper -> three spu001 programs (encoder, cross K/V, decoder step) and a report.

Stages, each timed:

1. ``load``: the model and the calibration utterances;
2. ``prune`` (optional): OBS or magnitude pruning of every linear / conv layer (Hessians from the
   calibration utterances);
3. ``import``: the float graphs (the cached ONNX export of the dense model, imported, the float
   pipeline run) with the pruned weights put in place by module path;
4. ``ranges``: the largest |x| of every activation on calibration speech (IR interpreter);
5. ``quantize``, ``layout``, ``tile``: the passes of the named ``spu001`` pipeline (one pass manager
   per graph, the calibrated ranges on the values; ``--print-ir-after-all`` prints every pass of
   both pipelines);
6. ``codegen``: the programs, written atomically with ``build.json`` (manifest and report).

``BUILD/`` then holds ``encoder.spu``, ``cross_kv.spu``, ``decoder_step.spu``, ``build.json``,
``report.json`` and ``report.png``; ``femtocc run BUILD`` transcribes with it. With context buckets
(``--buckets 10,30``) it also holds ``encoder@10s.spu``, ``cross_kv@10s.spu`` and
``decoder_step@10s.spu``: the same weights for a 10-s context (each program's header names its
bucket, its shapes are the bucket's), calibrated on every calibration utterance cut to 10 s; a run
encodes each window in the smallest bucket that holds it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError

QUANT = {"w8a16": (8, 16), "w4a8": (4, 8)}


@dataclass
class CompileOptions:
    model: str
    output: Path
    target: str = ""
    method: str | None = None  # obs, mp-local, mp-global or None (no pruning)
    sparsity: float = 0.5
    pattern: str = ""  # empty: the target's native pencil (spu001: pencil8)
    quant: str = "w8a16"
    weight_quant: str = "round"  # or "gptq": second-order rounding with error compensation
    calib: str = "../shared/data/speech/dev"
    calib_limit: int = 32
    range_limit: int | None = None  # utterances for activation ranges (default: all calibration)
    print_ir_after_all: bool = False
    print_ir_after: tuple = ()
    save_ir: bool = False  # also write BUILD/ir/*.fir: the final IR each program was generated from
    plan: str | None = None  # a femtocc plan (passes/plan.py): per-layer OBS sparsities and an SRAM budget
    vocab_bits: int = 0  # the token table (embedding + tied output projection): 4, 8, or 0 (as before)
    buckets: tuple = (30,)  # encoder context buckets in seconds (see femtocc.frontend.onnx_export)
    force: bool = False  # replace ``output`` even when it is not an earlier build
    progress: bool = True
    log: object = None  # a writable stream for stage lines
    stages: dict = field(default_factory=dict)


def _stage(opts: CompileOptions, name: str, start: float, detail: str = "") -> float:
    now = time.perf_counter()
    opts.stages[name] = round(now - start, 3)
    if opts.log is not None:
        print(f"[{len(opts.stages)}] {name:<9} {now - start:7.1f} s  {detail}", file=opts.log, flush=True)
    return now


def gptq_weights(bundle, calib, tokens, bits: int, layer_bits: dict, progress: bool) -> dict:
    """Round every prunable layer of ``bundle`` and its token table (in place) with GPTQ, each at its
    width in ``layer_bits`` (module path -> bits; ``bits`` for the others); returns path -> scales."""
    from femtocc.passes.calibrate import collect_hessians, prunable_layers
    from femtocc.passes.obs import gptq_quantize
    from femtocc.passes.prune import _store, weight_matrix

    layers = prunable_layers(bundle.model, include_embeddings=True)
    hessians = collect_hessians(bundle, calib, layers, progress=progress, dense_tokens=tokens)
    scales = {}
    for name, module in layers.items():
        w, scales[name] = gptq_quantize(weight_matrix(module), hessians.matrices[name], layer_bits.get(name, bits))
        _store(module, w)
    return scales


def put_weights(graphs: dict, model, scales: dict | None = None, bits: dict | None = None) -> int:
    """Copy the (pruned) weights of ``model`` into the float graphs' ``dense`` nodes, by module path,
    and the token table into the embedding lookup and the output projection tied to it; ``scales``
    (GPTQ grids) and ``bits`` (a plan's per-layer widths) go on the constants as ``weight_scale``
    and ``weight_bits``, which the quantize pass honours."""
    from femtocc.passes.calibrate import prunable_layers
    from femtocc.passes.prune import weight_matrix

    layers = prunable_layers(model, include_embeddings=True)
    scales, bits = scales or {}, bits or {}
    done = 0

    def mark(const, name):
        if name in scales:
            const.attrs["weight_scale"] = [float(x) for x in scales[name]]
        if name in bits:
            const.attrs["weight_bits"] = int(bits[name])

    for g in graphs.values():
        for node in g.nodes:
            scope = node.meta.get("scope", "")
            name = "proj_out" if scope == "decoder.embed_tokens" else scope
            module = layers.get(name)
            if module is not None and node.op in ("gather", "transpose") and node.inputs[0].is_constant:
                # the token table, tied: the embedding lookup's table and the output projection's
                # weight, which the lowered graph still holds as transpose(constant) [V, d]
                w = weight_matrix(module)
                if node.inputs[0].data.shape != w.shape:
                    raise FemtoccError(f"compile: weight of {scope} is {w.shape}, graph has {node.inputs[0].data.shape}")
                node.inputs[0].data = np.ascontiguousarray(w, dtype=np.float32)
                mark(node.inputs[0], name)
                done += 1
                continue
            if node.op != "dense" or module is None or not node.inputs[1].is_constant:
                continue
            w = weight_matrix(module).T
            const = node.inputs[1]
            if const.data.shape != w.shape:
                raise FemtoccError(f"compile: weight of {node.meta['scope']} is {w.shape}, graph has {const.data.shape}")
            const.data = np.ascontiguousarray(w, dtype=np.float32)
            mark(const, name)
            done += 1
    return done


def compile_model(opts: CompileOptions) -> dict:
    from femtocc.cache import atomic_dir, check_output_dir
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.onnx_export import bucket_names, export_whisper, load_onnx, parse_buckets, split_name
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes import PassManager, pipeline
    from femtocc.passes.calibrate import attach_ranges, collect_value_ranges, dense_transcripts
    from femtocc.runtime.program import VERSION as PROGRAM_VERSION
    from femtocc.targets.spu001.codegen import generate
    from femtocc.targets.spu001.description import load_target

    if opts.quant not in QUANT:
        raise FemtoccError(f"--quant {opts.quant!r}: choose from {', '.join(QUANT)}")
    if opts.weight_quant not in ("round", "gptq"):
        raise FemtoccError(f"--weight-quant {opts.weight_quant!r}: choose round or gptq")
    if opts.calib_limit < 1:
        raise FemtoccError("--calib-limit must be at least 1")
    buckets = parse_buckets(opts.buckets)
    check_output_dir(opts.output, "build", opts.force)
    target = load_target(opts.target)
    wbits, abits = QUANT[opts.quant]
    plan = None
    if opts.plan:
        from femtocc.passes.plan import read_plan

        plan = read_plan(opts.plan)
        if plan.get("quant", opts.quant) != opts.quant:
            raise FemtoccError(f"--quant {opts.quant}: the plan {opts.plan} counted bytes for {plan['quant']}; "
                               f"compile with --quant {plan['quant']}")
        opts.method, opts.pattern = "obs", plan["pattern"]
        if plan.get("weight_quant") == "gptq":  # the plan's errors were measured on GPTQ-rounded weights
            opts.weight_quant = "gptq"
    layer_bits = {n: target.check_weight_bits(v["bits"], f"--plan {opts.plan}: layers.{n}.bits")
                  for n, v in plan["layers"].items() if "bits" in v} if plan else {}
    if opts.vocab_bits:
        target.check_weight_bits(opts.vocab_bits, "--vocab-bits")
        if layer_bits.get("proj_out", opts.vocab_bits) != opts.vocab_bits:
            raise FemtoccError(f"--vocab-bits {opts.vocab_bits}: the plan {opts.plan} holds the token table at "
                               f"{layer_bits['proj_out']} bits; leave --vocab-bits out")
    table_bits = layer_bits.get("proj_out") or opts.vocab_bits  # 0: the pipeline's default
    if opts.method:
        from femtocc.passes.prune import PruneConfig, prune_model
        from femtocc.passes.sparsity import parse_pattern

        native = f"pencil{target.facts.pencil}"
        chosen = parse_pattern(opts.pattern or native)
        if chosen.kind == "pencil" and chosen.name != native:
            raise FemtoccError(f"--pattern {chosen.name}: {target.name} stores pencils of {target.facts.pencil} "
                               f"(facts.pencil in {target.source}); prune with {native}")
        cfg = PruneConfig(method=opts.method, sparsity=opts.sparsity, pattern=chosen.name,
                          per_layer={n: v["sparsity"] for n, v in plan["layers"].items()} if plan else None)
        cfg.check()
    t0 = t = time.perf_counter()
    bundle = load_whisper(opts.model)
    calib = split_by_speaker(load_dataset(opts.calib))[0][: opts.calib_limit]
    t = _stage(opts, "load", t, f"{bundle.name}, {len(calib)} calibration utterances")

    prune_report = None
    model = bundle
    if plan:  # a model recovered to the plan (prune --plan --schedule) is compiled as it is
        from femtocc.passes.plan import still_to_prune

        cfg.per_layer = still_to_prune(bundle.model, cfg.per_layer)
    if opts.method and (not plan or cfg.per_layer):
        model, prune_report = prune_model(bundle, cfg, calib, progress=opts.progress)
        t = _stage(opts, "prune", t, f"{opts.method} {opts.pattern} {prune_report['sparsity']:.3f}")

    tokens = dense_transcripts(bundle, calib)
    scales = None
    if opts.weight_quant == "gptq":
        import copy

        if model is bundle:
            model = copy.copy(bundle)
            model.model = copy.deepcopy(bundle.model)
        scales = gptq_weights(model, calib, tokens, wbits, {"proj_out": table_bits or 8, **layer_bits}, opts.progress)
        t = _stage(opts, "gptq", t, f"{len(scales)} layers rounded with error compensation")
    paths = export_whisper(bundle, None, buckets=buckets)
    print_opts = {"print_after_all": opts.print_ir_after_all, "print_after": opts.print_ir_after}
    float_pm = PassManager.parse(pipeline("lowered"), **print_opts)
    graphs = {w: float_pm.run(import_onnx(load_onnx(paths[w]), w)) for w in bucket_names(buckets)}
    replaced = put_weights(graphs, model.model, scales, layer_bits) if model is not bundle or layer_bits else 0
    if model is not bundle:
        for g in graphs.values():
            PassManager.parse(f"annotate-sparsity{{pencil={target.facts.pencil}}}").run(g)
    t = _stage(opts, "import", t, f"{sum(len(g.nodes) for g in graphs.values())} nodes, {replaced} weights put in place")

    ranges = collect_value_ranges(graphs, model, calib[: opts.range_limit] if opts.range_limit else calib,
                                  progress=opts.progress, tokens=tokens)
    attach_ranges(graphs, ranges)
    t = _stage(opts, "ranges", t, f"{len(ranges)} activations")

    # the spu001 pipeline, one pass manager per graph; its passes' times make the report's stages
    prompt = len(bundle.decode.prompt)
    stats: dict[str, dict] = {w: {} for w in graphs}
    seconds = {"quantize": 0.0, "layout": 0.0, "tile": 0.0}
    stage_of = {"quantize": "quantize", "select-layout": "layout", "tile-sram": "tile"}
    for w, g in graphs.items():
        spec = pipeline("spu001", target=opts.target, weight_bits=wbits, act_bits=abits,
                        tokens=prompt if split_name(w)[0] == "decoder_step" else 1, vocab_bits=table_bits)
        m = PassManager.parse(spec, **print_opts)
        m.run(g)
        for r in m.records:
            stats[w][stage_of[r.name]] = r.stats
            seconds[stage_of[r.name]] += r.seconds
    for name, sec in seconds.items():
        opts.stages[name] = round(sec, 3)
        if opts.log is not None:
            print(f"[{len(opts.stages)}] {name:<9} {sec:7.1f} s", file=opts.log, flush=True)
    t = time.perf_counter()

    programs = {w: generate(g, target).to_bytes() for w, g in graphs.items()}
    report = build_report(graphs, stats, target, bundle, prune_report, opts, programs)
    if plan:
        report["plan"] = plan_check(report, plan)
    manifest = {
        "format": f"femtocc-build/{PROGRAM_VERSION}",
        "model": opts.model,
        "model_name": bundle.name,
        "target": target.name,
        "target_file": str(Path(target.source).resolve()) if opts.target else None,
        "quant": opts.quant,
        **({"weight_bits": sorted({wbits, *layer_bits.values()}, reverse=True)} if layer_bits else {}),  # a plan's widths
        "vocab_bits": table_bits or 8,  # the token table's (embedding and, when tied, output projection)
        "pruning": prune_report and {k: v for k, v in prune_report.items() if k != "layers"},
        "buckets": list(buckets),
        "programs": {w: f"{w}.spu" for w in programs},
        "calibration_utterances": len(calib),
    }
    t = _stage(opts, "codegen", t, ", ".join(f"{w} {len(b) / 2**20:.1f} MiB" for w, b in programs.items()))
    opts.stages["total"] = round(time.perf_counter() - t0, 3)
    report["stages_s"] = dict(opts.stages)
    with atomic_dir(Path(opts.output)) as tmp:
        (tmp / "ranges.json").write_text(json.dumps(ranges, indent=0))
        for w, data in programs.items():
            (tmp / f"{w}.spu").write_bytes(data)
        (tmp / "build.json").write_text(json.dumps(manifest, indent=1))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        plot_report(report, tmp / "report.png")
        if opts.save_ir:
            from femtocc.ir import save

            for w, g in graphs.items():
                save(g, tmp / "ir" / f"{w}.fir")
    return report


# ----------------------------------------------------------------------------- report


def build_report(graphs, stats, target, bundle, prune_report, opts, programs) -> dict:
    """Per-layer sparsity, format, bytes, placement and predicted cycles; totals; bytes vs sparsity."""
    from femtocc.targets.spu001.cost import bytes_vs_sparsity, weight_cost

    layers = []
    for w, g in graphs.items():
        for node in g.nodes:
            if node.op != "qdense":
                continue
            c = node.inputs[1]
            lay, place = weight_cost(c, target), c.attrs.get("placement", {})
            rows = 1
            for d in node.inputs[0].type.shape[:-1]:
                rows *= d if isinstance(d, int) else 1
            layers.append({
                "graph": w, "layer": node.meta.get("scope", node.outputs[0].name), "shape": list(c.data.shape),
                "sparsity": float(1 - np.count_nonzero(c.data) / c.data.size), "bits": c.attrs.get("quant", {}).get("bits"),
                "format": lay.get("format"),
                "bytes": lay.get("bytes"), "dense_bytes": lay.get("dense_bytes"), "placement": place.get("where"),
                "rows_per_run": rows, "cycles": lay.get("cycles_per_row", 0) * rows,
                "dense_cycles": lay.get("dense_cycles_per_row", 0) * rows,
            })
    totals = {}
    for w in graphs:
        mine = [r for r in layers if r["graph"] == w]
        totals[w] = {
            "weight_bytes": sum(r["bytes"] for r in mine), "dense_weight_bytes": sum(r["dense_bytes"] for r in mine),
            "predicted_cycles": sum(r["cycles"] for r in mine), "dense_cycles": sum(r["dense_cycles"] for r in mine),
            "sparse_layers": sum(r["format"] != "dense" for r in mine), "program_bytes": len(programs[w]),
            **{f"tile_{k}": v for k, v in stats[w].get("tile", {}).items()},
        }
    return {
        "model": bundle.name, "target": target.name, "quant": opts.quant,
        "pruning": prune_report and {k: v for k, v in prune_report.items() if k != "layers"},
        "layers": layers, "totals": totals, "weight_bytes_vs_sparsity": bytes_vs_sparsity(graphs, target),
    }


def plan_check(report: dict, plan: dict) -> dict:
    """Whether the plan's scope fits its budget as compiled: the stored bytes of the scope's layers
    (the 30-s programs; the token table once), against the plan's ``sram_bytes``."""
    scope = set(plan["layers"])
    total, widths = 0, {}  # widths: each scope layer seen, once
    for r in report["layers"]:
        if "@" in r["graph"] or r["layer"] not in scope or r["layer"] in widths:
            continue
        total += r["bytes"]
        widths[r["layer"]] = r["bits"]
    off = sorted(n for n, b in widths.items() if plan["layers"][n].get("bits", b) != b)
    return {"scope": plan["scope"], "sram_bytes": plan["sram_bytes"], "scope_bytes": total,
            "planned_bytes": plan["scope_bytes"], "resident": total <= plan["sram_bytes"],
            "layers_at_bits": {str(b): sum(1 for x in widths.values() if x == b) for b in sorted(set(widths.values()), reverse=True)},
            "widths_not_as_planned": off,
            "layers": len(widths), "placed_in_sram_by_tile_sram": sum(
                1 for r in report["layers"] if "@" not in r["graph"] and r["layer"] in scope and r["placement"] == "sram")}


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    layers = report["layers"]
    x = np.arange(len(layers))
    a.bar(x, [r["dense_bytes"] / 1024 for r in layers], color="#ccc", label="dense int8")
    a.bar(x, [r["bytes"] / 1024 for r in layers], color=["#1f77b4" if r["format"] == "dense" else "#d62728" for r in layers],
          label=f"stored (red: {report['weight_bytes_vs_sparsity']['pattern']})")
    a.set_yscale("log")
    a.set_xlabel("qdense layer (encoder, cross K/V, decoder)")
    a.set_ylabel("KiB")
    a.set_title(f"{report['model']} on {report['target']}: weight bytes per layer")
    a.legend()
    rows = report["weight_bytes_vs_sparsity"]["rows"]
    for key in [k for k in rows[0] if k.endswith("_bytes")]:
        b.plot([r["sparsity"] for r in rows], [r[key] / 2**20 for r in rows], marker="o", label=key[:-6])
    sram = report["weight_bytes_vs_sparsity"]["sram_bytes"]
    b.axhline(sram / 2**20, color="k", ls="--", label=f"SRAM ({sram / 2**20:g} MiB)")
    b.set_xlabel(f"{report['weight_bytes_vs_sparsity']['pattern']} sparsity")
    b.set_ylabel("int8 weight MiB")
    b.set_yscale("log")
    b.set_title("weight bytes vs sparsity")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(report: dict, out) -> None:
    print(f"{'graph':<17}{'layer':<40}{'shape':>11}{'sparsity':>9}{'format':>9}{'KiB':>9}{'dense KiB':>10}"
          f"{'where':>8}{'Mcycles':>9}", file=out)
    for r in report["layers"]:
        print(f"{r['graph']:<17}{r['layer'][:39]:<40}{'x'.join(map(str, r['shape'])):>11}{r['sparsity']:>9.3f}"
              f"{r['format']:>9}{r['bytes'] / 1024:>9.1f}{r['dense_bytes'] / 1024:>10.1f}{r['placement'] or '-':>8}"
              f"{r['cycles'] / 1e6:>9.3f}", file=out)
    pattern = report["weight_bytes_vs_sparsity"]["pattern"]
    for w, t in report["totals"].items():
        speed = t["dense_cycles"] / max(t["predicted_cycles"], 1)
        print(f"{w}: weights {t['weight_bytes'] / 2**20:.2f} MiB (dense {t['dense_weight_bytes'] / 2**20:.2f}), "
              f"{t['sparse_layers']} {pattern} layers, predicted {t['predicted_cycles'] / 1e6:.1f} Mcycles "
              f"(honest speedup {speed:.2f}x), program {t['program_bytes'] / 2**20:.2f} MiB, SRAM high-water "
              f"{t.get('tile_high-water-bytes-per-core', 0) / 1024:.0f} KiB/core, external {t.get('tile_external-bytes-per-run', 0) / 2**20:.1f} MiB/run",
              file=out)
    bvs = report["weight_bytes_vs_sparsity"]
    print(f"weight bytes vs {pattern} sparsity: " + ", ".join(
        f"{r['sparsity']:.2f}: {r.get('encoder_bytes', 0) / 2**20:.2f} MiB enc" for r in bvs["rows"]), file=out)
    print(f"encoder weights SRAM-resident from {pattern} sparsity {bvs['encoder_resident_from']}", file=out)
    if "plan" in report:
        p = report["plan"]
        widths = ", ".join(f"{n} at {b} bits" for b, n in p.get("layers_at_bits", {}).items())
        print(f"plan: the {p['scope']}'s {p['layers']} layers ({widths}) store {p['scope_bytes']:,} bytes (planned "
              f"{p['planned_bytes']:,}) against a budget of {p['sram_bytes']:,}: "
              f"{'SRAM-resident' if p['resident'] else 'DOES NOT FIT'}", file=out)
