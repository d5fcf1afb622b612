"""Coverage-guided fuzzing of the spu001 program loader and executor with libFuzzer.

    python benchmarks/fuzz.py [--seconds 600] [--work build/fuzz] [--out benchmarks/results/fuzz.json]

Builds tests/fuzz/spu_fuzz.c with the simulator's C sources (runtime/spu_program.c and
runtime/spu_exec.c) under clang's ``-fsanitize=fuzzer,address,undefined`` (UBSan aborts on the
first report), writes the seed corpus (real programs compiled from small graphs) and the target's
config with tests/fuzz/make_seeds.py, and runs libFuzzer for ``--seconds`` over parse, validation
and execution on small inputs. Records executions, edges covered (of the instrumented total),
corpus size and every finding: a crash, sanitizer report, hang (``--timeout`` s per input) or
out-of-memory (``--rss-limit-mb``) stops the run, and its input is kept under ``WORK/artifacts``;
copy it to tests/fuzz/regressions/ so that tests/test_sim.py checks it from then on. Exits 1 on
a finding. The corpus under ``WORK/corpus`` persists between runs. CI runs it for 120 s (seed 1); needs
clang and its runtime (Debian: ``apt-get install clang libclang-rt-14-dev``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined"]
FINDINGS = ("crash", "leak", "timeout", "oom", "slow-unit")


def build(work: Path) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        sys.exit("fuzz: clang not found (Debian: apt-get install clang libclang-rt-14-dev)")
    binary = work / "spu_fuzz"
    sources = [REPO / "tests/fuzz/spu_fuzz.c", REPO / "runtime/spu_program.c", REPO / "runtime/spu_exec.c"]
    cmd = [clang, *FLAGS, f"-I{REPO / 'runtime'}", *map(str, sources), "-lm", "-pthread", "-o", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fuzz: building the harness failed:\n{done.stderr}")
    return binary


def run(binary: Path, work: Path, seconds: int, timeout: int, rss_mb: int, seeds: Path, seed: int) -> dict:
    corpus, artifacts = work / "corpus", work / "artifacts"
    corpus.mkdir(exist_ok=True)
    artifacts.mkdir(exist_ok=True)
    before = set(artifacts.iterdir())
    cmd = [str(binary), f"-max_total_time={seconds}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}", f"-seed={seed}",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus), str(seeds)]
    env = dict(os.environ, SPU_FUZZ_CONFIG=str(work / "config.txt"))
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = done.stderr
    (work / "fuzz.log").write_text(log)
    stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", log)}
    status = [m for m in re.finditer(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", log)]
    edges = re.search(r"Loaded \d+ modules\s+\((\d+) inline 8-bit counters\)", log)
    found = sorted(p.name for p in set(artifacts.iterdir()) - before if p.name.startswith(FINDINGS))
    reports = len(re.findall(r"ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:", log))
    last = status[-1] if status else None
    return {
        "seconds": round(time.monotonic() - start, 1),
        "executions": stats.get("number_of_executed_units", int(last.group(1)) if last else 0),
        "executions_per_second": stats.get("average_exec_per_sec"),
        "edges_covered": int(last.group(2)) if last else None,
        "edges_instrumented": int(edges.group(1)) if edges else None,
        "features": int(last.group(3)) if last else None,
        "corpus_inputs": int(last.group(4)) if last else None,
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "crashes": sum(f.startswith(("crash", "leak")) for f in found),
        "hangs": sum(f.startswith(("timeout", "slow-unit")) for f in found),
        "out_of_memory": sum(f.startswith("oom") for f in found),
        "sanitizer_reports": reports,
        "findings": [str(artifacts / f) for f in found],
        "exit_code": done.returncode,
        "log_tail": log.strip().splitlines()[-12:] if done.returncode else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--work", default=str(REPO / "build" / "fuzz"), help="harness, corpus, artifacts and log")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    ap.add_argument("--rss-limit-mb", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: a new one each run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "tests" / "fuzz"))
    from make_seeds import write_seeds

    seeds = write_seeds(work)
    binary = build(work)
    result = {"harness": "tests/fuzz/spu_fuzz.c", "flags": " ".join(FLAGS),
              "seeds": [p.name for p in seeds], **run(binary, work, args.seconds, args.timeout, args.rss_limit_mb,
                                                      work / "seeds", args.seed)}
    write_result(args.out, result)
    print(f"fuzz: {result['executions']:,} executions in {result['seconds']} s ({result['executions_per_second']}/s), "
          f"{result['edges_covered']} of {result['edges_instrumented']} edges covered, corpus {result['corpus_inputs']}; "
          f"crashes {result['crashes']}, hangs {result['hangs']}, out-of-memory {result['out_of_memory']}, "
          f"sanitizer reports {result['sanitizer_reports']}; wrote {args.out}")
    for f in result["findings"]:
        print(f"finding: {f} (copy it to tests/fuzz/regressions/ as NAME.spu-body)")
    if result["exit_code"] and not result["findings"]:
        print("\n".join(result["log_tail"]), file=sys.stderr)
    return 1 if result["findings"] or result["sanitizer_reports"] or result["exit_code"] else 0


if __name__ == "__main__":
    sys.exit(main())
