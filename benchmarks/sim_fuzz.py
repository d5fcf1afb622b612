"""A longer fuzz run of the simulator than the test suite's: mutated and truncated real programs.

    python benchmarks/sim_fuzz.py --program BUILD/cross_kv.spu [--seconds 300] [--out benchmarks/results/sim_fuzz.json]

Each case mutates 1-8 random bytes (checksum resealed so the mutation reaches the parser) or cuts
the file short; it must be rejected with a message or, if still valid, run (or fail at run time
with a message). A crash ends the process: the count of cases that completed is the result.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib

import numpy as np

from common import write_result


def main() -> int:
    from femtocc.runtime.program import ProgramError
    from femtocc.runtime.sim import SimRuntime
    from femtocc.targets.spu001 import load

    ap = argparse.ArgumentParser()
    ap.add_argument("--program", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/sim_fuzz.json")
    args = ap.parse_args()
    target = load()
    data = open(args.program, "rb").read()
    sim = SimRuntime(data, target)
    feeds = {}
    for name, dtype, _, dims in sim.inputs:
        shape = [c + t * 2 + p * 3 for c, t, p in dims]
        feeds[name] = np.random.default_rng(1).integers(-50, 50, shape).astype({0: np.int8, 1: np.int16, 3: np.int64}[dtype])
    rng = np.random.default_rng(args.seed)
    counts = {"rejected": 0, "ran": 0, "failed_at_run_time": 0}
    end = time.monotonic() + args.seconds
    cases = 0
    while time.monotonic() < end:
        body = bytearray(data[:-4])
        if rng.random() < 0.2:
            body = body[: int(rng.integers(0, len(body)))]
        else:
            for _ in range(int(rng.integers(1, 9))):
                body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
        case = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
        cases += 1
        try:
            s = SimRuntime(case, target)
        except ProgramError:
            counts["rejected"] += 1
            continue
        try:
            s.run(feeds)
            counts["ran"] += 1
        except ProgramError:
            counts["failed_at_run_time"] += 1
    print(f"{cases} mutated programs in {args.seconds:.0f} s, no crash: {counts}")
    write_result(args.out, {"program": args.program, "seconds": args.seconds, "cases": cases, **counts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
