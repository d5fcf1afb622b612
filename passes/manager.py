"""Passes, their registry, and the pass manager.

A pass is a dataclass whose fields are its options, with a ``name`` and a ``run(graph)`` that
rewrites the graph in place and returns statistics (counts by name). A pipeline is a string:
``"fold-gelu,fold-dense,constant-fold{max-elements=1024},dce"``. The manager verifies the IR
after every pass, times each pass, and can print the IR after all passes or after named ones.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import ClassVar, TextIO

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, print_graph, verify

PASSES: dict[str, type[Pass]] = {}


class Pass:
    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> dict[str, int]:
        raise NotImplementedError

    def spec(self) -> str:
        opts = [f"{f.name.replace('_', '-')}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def register(cls):
    """Class decorator: makes ``cls`` a dataclass and registers it under ``cls.name``."""
    cls = dataclasses.dataclass(cls)
    if cls.name in PASSES:
        raise ValueError(f"pass {cls.name} registered twice")
    PASSES[cls.name] = cls
    return cls


_ITEM = re.compile(r"\s*([a-z0-9-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _convert(text: str, kind, where: str):
    kind = kind if isinstance(kind, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(kind, str)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise FemtoccError(f"{where}: {text!r} is not a valid {kind.__name__}") from None


def parse_pipeline(spec: str) -> list[Pass]:
    passes, pos = [], 0
    spec = spec.strip()
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if not m or m.end() == pos:
            raise FemtoccError(f"pipeline {spec!r}: cannot parse at position {pos}")
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise FemtoccError(f"pipeline: unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
        cls = PASSES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in filter(None, (opts or "").split(",")):
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in fields:
                known = ", ".join(f.replace("_", "-") for f in fields) or "none"
                raise FemtoccError(f"pass {name}: unknown option {item.strip()!r} (options: {known})")
            kwargs[key] = _convert(val.strip(), fields[key].type, f"pass {name} option {key}")
        passes.append(cls(**kwargs))
        pos = m.end()
    return passes


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    stats: dict[str, int]


class PassManager:
    def __init__(
        self, passes: list[Pass], verify_each: bool = True, print_after_all: bool = False,
        print_after: tuple[str, ...] = (), out: TextIO | None = None,
    ):
        unknown = [p for p in print_after if p not in PASSES]
        if unknown:
            raise FemtoccError(f"--print-ir-after: unknown pass {unknown[0]!r}")
        self.passes = passes
        self.verify_each = verify_each
        self.print_after_all = print_after_all
        self.print_after = set(print_after)
        self.out = out or sys.stdout
        self.records: list[PassRecord] = []

    @classmethod
    def parse(cls, spec: str, **kwargs) -> PassManager:
        return cls(parse_pipeline(spec), **kwargs)

    def run(self, graph: Graph) -> Graph:
        for p in self.passes:
            start = time.perf_counter()
            stats = p.run(graph) or {}
            if self.verify_each:
                try:
                    verify(graph)
                except FemtoccError as e:
                    raise FemtoccError(f"IR invalid after pass {p.name}: {e}") from None
            self.records.append(PassRecord(p.name, time.perf_counter() - start, stats))
            if self.print_after_all or p.name in self.print_after:
                self.out.write(f"// ----- IR after {p.spec()} on @{graph.name}\n{print_graph(graph)}")
        return graph

    def summary(self) -> str:
        lines = []
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v) or "no change"
            lines.append(f"{r.name:<16} {r.seconds * 1000:8.1f} ms  {stats}")
        return "\n".join(lines)
