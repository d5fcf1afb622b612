"""The decoder's vocabulary cost: tiny.en restricted to the tokens a training corpus uses, at several
sizes, against the full model: WER on the evaluation speakers (torch), and per utterance the
simulated latency, energy and decoder-step external bytes of the W8A16 build (spu001 simulator).

    python benchmarks/vocabulary.py [--sizes 0,16384,32768] [--sim-limit 8] [--out benchmarks/results/vocabulary.json]

Size 0 keeps exactly the tokens tiny.en writes on ``--train`` (its greedy transcripts of the
packed windows); a size N tops that set up with the most frequent tokens (lowest BPE ids).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import femtocc, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--train", default="../shared/data/speech/train")
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--sizes", default="0,16384,32768")
    ap.add_argument("--sim-limit", type=int, default=8, help="evaluation utterances simulated per build")
    ap.add_argument("--out", default="benchmarks/results/vocabulary.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in [None] + [int(s) for s in args.sizes.split(",")]:
            name = "full" if size is None else f"vocab{size}"
            model = args.model
            if size is not None:
                model = str(tmp / name)
                femtocc("prune", args.model, "--sparsity", "0", "--vocabulary-from", args.train, "-o", model,
                        *(["--vocabulary-size", str(size)] if size else []))
            femtocc("eval", model, "--data", args.data, "--split", "eval", "--json", str(tmp / f"{name}-eval.json"))
            build = tmp / f"{name}-spu"
            femtocc("compile", model, "--calib", args.data, "-o", str(build))
            femtocc("run", str(build), "--runtime", "sim", "--data", args.data, "--split", "eval", "--limit",
                    str(args.sim_limit), "--json", str(tmp / f"{name}-sim.json"))
            ev = json.loads((tmp / f"{name}-eval.json").read_text())["report"]
            sim = json.loads((tmp / f"{name}-sim.json").read_text())["report"]
            report = json.loads((build / "report.json").read_text())
            kept = 51864 if size is None else json.loads((Path(model) / "femtocc.json").read_text())["metadata"]["vocabulary_source"]["kept"]
            row = {"vocabulary": kept, "wer": ev["wer"], "agreement_wer": ev.get("agreement_wer"),
                   "runaways": ev["hit_token_limit"], "sim_utterances": args.sim_limit,
                   "sim_latency_s": sim["simulator"]["latency_s_mean"], "sim_energy_uj": sim["simulator"]["energy_uj_mean"],
                   "sim_real_time_factor": sim["simulator"]["real_time_factor"],
                   "decoder_step_external_mib": report["totals"]["decoder_step"]["tile_external-bytes-per-run"] / 2**20}
            rows.append(row)
            print(f"{kept:>6} tokens: WER {row['wer']:.2f} ({row['runaways']} runaways), simulated "
                  f"{row['sim_latency_s']:.2f} s and {row['sim_energy_uj'] / 1000:.1f} mJ per utterance "
                  f"(RTF {row['sim_real_time_factor']:.3f}), decoder step streams {row['decoder_step_external_mib']:.1f} MiB",
                  flush=True)
    write_result(args.out, {"model": args.model, "train": args.train, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
