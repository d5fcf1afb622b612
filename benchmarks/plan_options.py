"""How much of a model a 1-MiB chip holds under each token-table option, and what it transcribes:
every plan compiled (``femtocc compile MODEL --plan PLAN``) and run on the evaluation speakers
(reference runtime), one row per plan: resident parameters, stored bytes, layers per weight width,
the token table's sparsity and width, WER and runaways.

    python benchmarks/plan_options.py --plan "int8, full vocabulary=whisper-tiny.en:build/plan-int8.json" \\
        --plan "int8+int4, 16k vocabulary=build/tiny-vocab16k:build/plan-v16k.json" [--workdir build/plan-options] \\
        [--out benchmarks/results/plan_options.json]

Make the plans with ``femtocc plan MODEL --scope model --sram 1MiB`` (or ``femtocc plan --from``).
A build or run already in ``--workdir`` is reused, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import femtocc, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="append", required=True, metavar="LABEL=MODEL:PLAN")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--workdir", default="build/plan-options")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--out", default="benchmarks/results/plan_options.json")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for spec in args.plan:
        label, _, rest = spec.partition("=")
        model, _, plan_path = rest.rpartition(":")
        if not (label and model and plan_path):
            ap.error(f"--plan {spec!r}: give LABEL=MODEL:PLAN")
        plan = json.loads(Path(plan_path).read_text())
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        build, result = work / slug, work / f"{slug}-eval.json"
        if not (build / "report.json").exists():
            femtocc("compile", model, "--plan", plan_path, "--quant", plan["quant"], "-o", str(build), "--force")
        if not result.exists():
            femtocc("run", str(build), "--runtime", "reference", "--data", args.data, "--split", "eval",
                    "--workers", args.workers, "--json", str(result))
        report = json.loads((build / "report.json").read_text())
        run = json.loads(result.read_text())["report"]
        table = plan["layers"].get("proj_out", {})
        row = {
            "label": label, "model": model, "plan": plan_path, "scope": plan["scope"], "sram_bytes": plan["sram_bytes"],
            "layer_bits": plan.get("layer_bits", [plan.get("weight_bits")]), "quant": plan["quant"],
            "scope_parameters": plan["scope_parameters"], "resident_parameters": plan["resident_nonzero_parameters"],
            "stored_bytes": report["plan"]["scope_bytes"], "resident": report["plan"]["resident"],
            "layers_at_bits": report["plan"].get("layers_at_bits"),
            "token_table": {"parameters": table.get("parameters"), "sparsity": table.get("sparsity"), "bits": table.get("bits")},
            "wer": run["wer"], "runaways": run["hit_token_limit"], "utterances": run["utterances"],
            "compile_s": report["stages_s"]["total"],
        }
        rows.append(row)
        print(f"{label}: {row['resident_parameters']:,} of {row['scope_parameters']:,} parameters in "
              f"{row['stored_bytes']:,} bytes ({'resident' if row['resident'] else 'DOES NOT FIT'}; widths "
              f"{row['layers_at_bits']}); token table at {table.get('sparsity')} sparsity, {table.get('bits')} bits; "
              f"WER {row['wer']:.2f}, {row['runaways']} runaways", flush=True)
    write_result(args.out, {"data": args.data, "split": "eval", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
