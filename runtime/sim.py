"""The spu001 cycle simulator (C extension ``_spusim``) from Python.

``SimRuntime(program_bytes, target)`` validates the program in C (a bad program is a
:class:`~femtocc.runtime.program.ProgramError`) and runs it bit-exact with the reference runtime,
returning outputs and per-instruction statistics. Every timing and energy parameter comes from the
target description (``targets/spu001/spu001.toml``); nothing the description holds is in the C code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from femtocc.runtime.program import DTYPES, NUMPY, ProgramError, float_io

STAT_FIELDS: tuple[str, ...] = ()


def extension():
    """The compiled simulator; ``$FEMTOCC_SPUSIM`` may name another build of it (the sanitizer build
    that CI runs the simulator tests under)."""
    from femtocc.runtime import extension as load

    return load("_spusim", "FEMTOCC_SPUSIM")


def sim_config(target) -> dict:
    """Every number of the target description, by key: exactly the keys the extension reads
    (``SPU_CONFIG`` in runtime/spu_isa.h, generated from the same description classes)."""
    from femtocc.runtime.isa_header import config_fields

    sections = (target.facts, target.assumptions, target.energy_pj)
    values = {k: v for s in sections for k, v in vars(s).items()}
    return {key: (int(values[key]) if kind == "int" else float(values[key])) for key, kind in config_fields()}


@dataclass
class RunStats:
    """Statistics of one run: per instruction (in program order) and totals."""

    graph: str
    instructions: list[tuple[str, str, str, int]]  # op, output buffer, first constant operand, tile rows
    rows: list[dict] = field(default_factory=list)

    def total(self, key: str) -> float:
        return float(sum(r[key] for r in self.rows))

    def per_bank(self, key: str = "bank_reads") -> list[float]:
        """SRAM words per bank (per core) over the run: ``bank_reads`` or ``bank_writes``."""
        return [float(sum(x)) for x in zip(*(r[key] for r in self.rows))] if self.rows else []

    def by_op(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for (op, *_), r in zip(self.instructions, self.rows):
            agg = out.setdefault(op, {k: 0.0 for k, v in r.items() if not isinstance(v, tuple)} | {"count": 0})
            for k, v in r.items():
                if not isinstance(v, tuple):
                    agg[k] += v
            agg["count"] += 1
        return out

    def energy_pj(self) -> float:
        return sum(self.total(k) for k in self.rows[0] if k.startswith("energy_")) if self.rows else 0.0


class SimRuntime:
    def __init__(self, program: bytes, target, where: str = "program", overrides: dict | None = None):
        """``overrides``: simulator settings replacing the description's (e.g. ``skip_zero_activations=0``)."""
        _spusim = extension()
        global STAT_FIELDS
        STAT_FIELDS = _spusim.STAT_FIELDS
        try:
            self.sim = _spusim.Simulator(bytes(program), {**sim_config(target), **(overrides or {})})
        except ValueError as e:
            raise ProgramError(f"{where}: {str(e).removeprefix('program: ')}") from None
        self.target = target
        self.inputs = self.sim.inputs
        self.outputs = self.sim.outputs
        self.instructions = self.sim.instructions
        self.graph = where

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        args = []
        for name, dtype, _, _ in self.inputs:
            if name not in feeds:
                raise ProgramError(f"{self.graph}: input {name} was not given")
            x = np.ascontiguousarray(feeds[name])
            if x.dtype != NUMPY[DTYPES[dtype]]:
                raise ProgramError(f"{self.graph}: input {name} is {x.dtype}, expected {DTYPES[dtype]}")
            args.append((dtype, x.shape, x))
        try:
            outs, stats = self.sim.run(args)
        except ValueError as e:
            raise ProgramError(str(e)) from None
        result = {}
        for (name, *_), (dtype, shape, raw) in zip(self.outputs, outs):
            result[name] = np.frombuffer(raw, NUMPY[DTYPES[dtype]]).reshape(shape).copy()
        return result, RunStats(self.graph, self.instructions, [dict(zip(STAT_FIELDS, s)) for s in stats])

    def runner(self, sink: list | None = None):
        """Float-in, float-out like :meth:`ReferenceRuntime.runner`; each run's stats go to ``sink``."""

        def run_ints(ints):
            out, stats = self.run(ints)
            if sink is not None:
                sink.append(stats)
            return out

        return float_io(run_ints, {n: (s, NUMPY[DTYPES[d]]) for n, d, s, _ in self.inputs}, {n: s for n, _, s, _ in self.outputs})
