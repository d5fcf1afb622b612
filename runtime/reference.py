"""The reference runtime: executes ``.spu`` programs in numpy with exact integer semantics.

It is the specification the C simulator must match bit for bit: each instruction runs the integer
op's definition from :mod:`femtocc.ir.qops` / :mod:`femtocc.ir.ops` on operands decoded from the
program (pencil weights are decoded from their compressed blobs). The program is validated when
loaded (:meth:`Program.from_bytes`), and every run checks its inputs' dtypes and shapes, binds
``T`` and ``P`` from them, and checks each result against the shape the program declares.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from femtocc.runtime.program import (CONSTANT_REGIONS, NUMPY, Program, ProgramError, bind, decode_constant, decode_params,
                                     float_io, solve_sizes)


def load_program(path) -> Program:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProgramError(f"{path}: cannot read ({e.strerror})") from None
    return Program.from_bytes(data, str(path))


class ReferenceRuntime:
    """``kernels="fast"`` (the default) runs the hot integer ops through :mod:`femtocc.runtime.kernels`,
    which compute exactly what the specification computes; ``"spec"`` runs every op's numpy
    definition itself (slow; the tests run both and compare)."""

    def __init__(self, program: Program, kernels: str = "fast"):
        from femtocc.ir.ops import OPS
        from femtocc.runtime.kernels import FAST, Weight

        if kernels not in ("fast", "spec"):
            raise ValueError(f"kernels must be fast or spec, got {kernels!r}")
        self.program = program
        self.consts = {i: decode_constant(b) for i, b in enumerate(program.buffers) if b.region in CONSTANT_REGIONS}
        self.steps = []
        weights: dict[int, Weight] = {}  # a constant qdense weight, made ready for the int8 product once
        for k, ins in enumerate(program.code):
            attrs = decode_params(ins, f"instruction {k}")
            fn = OPS[ins.op].run
            if kernels == "fast" and ins.op in FAST:
                fn = FAST[ins.op]
                w = ins.inputs[1] if ins.op == "qdense" else None
                if w in self.consts and self.consts[w].ndim == 2 and self.consts[w].dtype == np.int8:
                    fn = functools.partial(fn, weight=weights.setdefault(w, Weight(self.consts[w])))
            self.steps.append((k, ins, fn, attrs, list(ins.inputs)))

    def bind(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """``T`` and ``P`` from the inputs' shapes (:func:`solve_sizes`; :meth:`run` checks every dim)."""
        p = self.program
        for s in p.inputs:
            if s.name not in feeds:
                raise ProgramError(f"{p.graph}: input {s.name} was not given")
            b, x = p.buffers[s.buffer], feeds[s.name]
            if x.dtype != NUMPY[b.dtype] or x.ndim != len(b.shape):
                raise ProgramError(f"{p.graph}: input {s.name} is {x.dtype}{list(x.shape)}, expected {b.dtype} of rank {len(b.shape)}")
        return solve_sizes([(f"{p.graph}: input {s.name}", d, n) for s in p.inputs
                            for d, n in zip(p.buffers[s.buffer].shape, feeds[s.name].shape)])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.program
        sym = self.bind(feeds)
        env: dict[int, np.ndarray] = dict(self.consts)
        for s in p.inputs:
            x = feeds[s.name]
            want = bind(p.buffers[s.buffer].shape, sym["T"], sym["P"])
            if any(w is not None and w != n for w, n in zip(want, x.shape)):
                raise ProgramError(f"{p.graph}: input {s.name} has shape {list(x.shape)}, expected {list(want)}")
            env[s.buffer] = x
        for k, ins, fn, attrs, operands in self.steps:
            args = [env[b] for b in operands]
            args += [None] if ins.op == "qdense" else []
            try:
                results = fn(args, attrs)
            except (IndexError, ValueError, ZeroDivisionError, OverflowError) as e:
                raise ProgramError(f"{p.graph}: instruction {k} ({ins.op}) failed: {e}") from None
            for b, r in zip(ins.outputs, results):
                buf = p.buffers[b]
                want = bind(buf.shape, sym["T"], sym["P"])
                r = np.asarray(r)
                if r.dtype != NUMPY[buf.dtype] or r.ndim != len(want) or any(w is not None and w != n for w, n in zip(want, r.shape)):
                    raise ProgramError(f"{p.graph}: instruction {k} ({ins.op}) made {r.dtype}{list(r.shape)}, "
                                       f"buffer {b} ({buf.name}) is {buf.dtype}{list(want)}")
                env[b] = r
        return {s.name: env[s.buffer] for s in p.outputs}

    def runner(self):
        """A float-in, float-out runner for the decoding loop (see :func:`float_io`)."""
        p = self.program
        return float_io(self.run, {s.name: (s.scale, NUMPY[p.buffers[s.buffer].dtype]) for s in p.inputs},
                        {s.name: s.scale for s in p.outputs})
