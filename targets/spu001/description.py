"""The spu001 target description: hardware as validated data, read by every consumer alike.

``load(path)`` reads a TOML description (``spu001.toml`` beside this file by default); a larger
variant (4 cores, more SRAM) is another TOML file, not other code. Every key is checked: an
unknown key, a missing key or a value of the wrong type is an error that names the file and the
key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from femtocc.errors import FemtoccError

DEFAULT = Path(__file__).with_name("spu001.toml")


@dataclass(frozen=True)
class Facts:
    cores: int
    sram_banks_per_core: int
    sram_bank_words: int
    sram_word_bits: int
    table_memory_bytes_per_core: int
    threads_per_core: int
    program_memory_instructions_per_core: int
    clock_hz: int
    pencil: int
    precisions: list


@dataclass(frozen=True)
class Assumptions:
    mac_lanes_per_core: int
    pencil_index_bits: int
    pencil_decode_cycles: int
    bank_read_ports: int
    table_lookup_cycles: int
    external_bandwidth_bytes_per_cycle: int
    external_latency_cycles: int
    core_sync_cycles: int
    skip_zero_activations: bool
    layer_weight_bits: list


@dataclass(frozen=True)
class Energy:
    mac_int8: float
    mac_int16: float
    add_int32: float
    sram_read_64b: float
    sram_write_64b: float
    table_lookup: float
    external_read_byte: float


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    facts: Facts
    assumptions: Assumptions
    energy_pj: Energy
    source: str

    @property
    def sram_bytes_per_core(self) -> int:
        f = self.facts
        return f.sram_banks_per_core * f.sram_bank_words * f.sram_word_bits // 8

    @property
    def sram_bytes(self) -> int:
        return self.sram_bytes_per_core * self.facts.cores

    def check_weight_bits(self, bits: int, what: str) -> int:
        """``bits`` when a layer may hold weights that wide (``assumptions.layer_weight_bits``), else an
        error naming ``what`` (the option or plan field that asked)."""
        allowed = self.assumptions.layer_weight_bits
        if bits not in allowed:
            raise FemtoccError(f"{what}: {bits}-bit weights; {self.name} holds a layer's weights at "
                               f"{' or '.join(map(str, allowed))} bits (assumptions.layer_weight_bits in {self.source})")
        return bits

    @property
    def peak_macs_per_second(self) -> float:
        return self.facts.cores * self.assumptions.mac_lanes_per_core * self.facts.clock_hz


def _section(cls, table, where: str):
    if not isinstance(table, dict):
        raise FemtoccError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise FemtoccError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    missing = sorted(set(known) - set(table))
    if missing:
        raise FemtoccError(f"{where}: missing key {missing[0]!r}")
    for name, f in known.items():
        want = {"int": int, "float": (int, float), "bool": bool, "list": list, "str": str}[f.type]
        value = table[name]
        if not isinstance(value, want) or (f.type == "int" and isinstance(value, bool)):
            raise FemtoccError(f"{where}.{name}: expected {f.type}, got {type(value).__name__} {value!r}")
        if f.type in ("int", "float") and value < 0:
            raise FemtoccError(f"{where}.{name}: must not be negative, got {value}")
    return cls(**table)


_LOADED: dict = {}


def load_target(path: str | Path | None = "") -> Target:
    """:func:`load`, cached by path (passes name their target by file; empty: the default)."""
    path = Path(path or DEFAULT)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0)
    if key not in _LOADED:
        _LOADED[key] = load(path)
    return _LOADED[key]


def load(path: str | Path = DEFAULT) -> Target:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FemtoccError(f"target description {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise FemtoccError(f"{path}: not valid TOML ({e})") from None
    top = {"name", "description", "facts", "assumptions", "energy_pj"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise FemtoccError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(top))})")
    for key in sorted(top - set(data)):
        raise FemtoccError(f"{path}: missing key {key!r}")
    facts = _section(Facts, data["facts"], f"{path}: facts")
    bad = [p for p in facts.precisions if p not in ("w8a16", "w4a8")]
    if bad:
        raise FemtoccError(f"{path}: facts.precisions: unknown precision {bad[0]!r} (known: w8a16, w4a8)")
    assumptions = _section(Assumptions, data["assumptions"], f"{path}: assumptions")
    widths = assumptions.layer_weight_bits
    if not widths or any(b not in (4, 8) or isinstance(b, bool) for b in widths):
        raise FemtoccError(f"{path}: assumptions.layer_weight_bits: give weight widths from 4 and 8, got {widths!r}")
    if facts.cores < 1 or facts.pencil < 1:
        raise FemtoccError(f"{path}: facts.cores and facts.pencil must be at least 1")
    return Target(
        name=str(data["name"]),
        description=str(data["description"]),
        facts=facts,
        assumptions=assumptions,
        energy_pj=_section(Energy, data["energy_pj"], f"{path}: energy_pj"),
        source=str(path),
    )
