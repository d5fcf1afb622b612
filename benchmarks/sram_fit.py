"""Weight bytes of tiny.en on spu001 against pencil8 OBS sparsity, and where the encoder fits in SRAM.

    python benchmarks/sram_fit.py [--data DIR] [--out benchmarks/results/sram_fit.json]

Weights are int8; each layer is stored in the format select-layout would choose (dense or
pencil8, from the target's cost model), the token embedding excluded (it stays in external
memory). Calibration: the speaker-disjoint calibration part of the data.
"""

from __future__ import annotations

import argparse
import sys

from common import write_result

SPARSITIES = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]


def main() -> int:
    from femtocc.data import load_dataset, split_by_speaker
    from femtocc.frontend.whisper import load_whisper
    from femtocc.passes.calibrate import collect_hessians, prunable_layers
    from femtocc.passes.prune import PruneConfig, weight_matrix, prune_model
    from femtocc.targets.spu001.cost import format_costs
    from femtocc.targets.spu001 import load

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/speech/dev")
    ap.add_argument("--out", default="benchmarks/results/sram_fit.json")
    args = ap.parse_args()
    target = load()
    bundle = load_whisper("whisper-tiny.en")
    calib, _ = split_by_speaker(load_dataset(args.data))
    hessians = collect_hessians(bundle, calib, prunable_layers(bundle.model))
    rows = []
    for s in SPARSITIES:
        model = bundle if s == 0 else prune_model(bundle, PruneConfig("obs", s, "pencil8"), calib, hessians=hessians)[0]
        totals = {"encoder": 0, "decoder": 0}
        for name, module in prunable_layers(model.model).items():
            costs = format_costs(weight_matrix(module).T, 8, target)
            best = min(costs.values(), key=lambda c: (c["cycles_per_row"], c["bytes"]))
            totals[name.split(".")[0]] += best["bytes"]
        fits = totals["encoder"] <= target.sram_bytes
        rows.append({"sparsity": s, "encoder_bytes": totals["encoder"], "decoder_bytes": totals["decoder"], "encoder_fits_sram": fits})
        print(f"pencil8 sparsity {s:.1f}: encoder {totals['encoder'] / 2**20:6.2f} MiB, decoder {totals['decoder'] / 2**20:6.2f} MiB "
              f"(int8; SRAM {target.sram_bytes / 2**20:.0f} MiB) -> encoder {'fits' if fits else 'streams'}", flush=True)
    first = next((r["sparsity"] for r in rows if r["encoder_fits_sram"]), None)
    print(f"encoder weights become SRAM-resident at pencil8 sparsity {first}")
    write_result(args.out, {"model": "whisper-tiny.en", "target": target.source, "sram_bytes": target.sram_bytes,
                            "weights": "int8, layout per select-layout, token embedding excluded",
                            "rows": rows, "encoder_resident_from_sparsity": first})
    return 0


if __name__ == "__main__":
    sys.exit(main())
