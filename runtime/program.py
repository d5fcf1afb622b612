"""The ``.spu`` program format (version 2): what codegen writes and every runtime reads.

All integers little-endian. A file is::

    header      magic "SPU\\0", u16 version, u16 flags, char[16] target, char[16] graph,
                u32 counts: strings, buffers, instructions, inputs, outputs; u64 blob bytes;
                u32 SRAM bytes per core, u32 cores, u64 external bytes
    strings     per string: u16 length, UTF-8 bytes          (names of buffers and symbols)
    buffers     per buffer (the memory map), fixed 112 bytes: u32 name, u8 dtype, u8 region,
                u8 layout, u8 rank, 6 x (i32 const, i32 coef_T, i32 coef_P) dims, u64 address,
                u64 bytes, u64 blob offset, u32 bits, u32 block
    code        per instruction: u16 opcode, u8 inputs, u8 outputs, u16 params, u16 tile rows,
                u16 buffer ids (inputs then outputs), i64 params (the op's schema below)
    symbols     inputs then outputs: u32 name, u32 buffer, f64 scale (0: not quantized)
    blobs       constant data, each at its buffer's blob offset, in its layout
    trailer     u32 CRC-32 of everything before it

A dim is ``const + coef_T * T + coef_P * P``: ``T`` (new tokens) and ``P`` (cached tokens) are
bound from the input shapes at run time; ``-1, 0, 0`` marks a dim known only at run time.
Regions: ``input``, ``output``, ``const`` (a blob loaded into SRAM, or table memory, before the
run), ``stream`` (a blob that stays in external memory and streams in tiles at every run),
``sram`` (address in each core's SRAM, the tensor split across cores), ``external`` (address in
external memory). Constant layouts:
``raw`` (the array), ``dense`` and ``pencil`` (int8 / int4 weights in the storage formats of
:mod:`femtocc.ir.formats`; a pencil buffer's ``block`` is its pencil height, the target's
``facts.pencil``; 0 for the others).

Version 2 added ``block`` (version 1 had a reserved 0 there and only 8-high pencils).

Params: the op's integer attributes in :data:`ISA` order; a name ending in ``*`` is a list
(length first); :data:`ABSENT` marks an attribute left at its default.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir.formats import FormatError, parse_format

MAGIC = b"SPU\0"
VERSION = 2
ABSENT = -(1 << 63)
MAX_RANK = 6
MAX_ELEMENTS = 1 << 28  # the largest tensor or constant a program may hold
MAX_BLOCK = 64  # the tallest pencil a program may declare

# opcode -> (op name, integer attributes in order). The opcode is the position in this list. An
# attribute ending in ``?`` may be absent, one ending in ``*`` is a list (may be absent); the
# others are required. runtime/spu_isa.h is generated from this table (runtime/isa_header.py).
ISA: list[tuple[str, tuple[str, ...]]] = [
    ("qdense", ("shift", "bits")),
    ("qmatmul", ("mult", "shift", "bits")),
    ("qadd", ("mult_a", "mult_b", "shift", "bits")),
    ("requantize", ("mult", "shift", "bits")),
    ("qgelu", ("step_bits", "bits")),
    ("qsoftmax", ("step_bits", "bits")),
    ("qlayer_norm", ("eps", "gamma_shift", "bits")),
    ("qgather", ("shift", "bits")),
    ("im2col", ("kernel", "stride?", "dilation?", "pads*")),
    ("transpose", ("perm*",)),
    ("reshape", ("allowzero?",)),
    ("concat", ("axis",)),
    ("slice", ()),
    ("gather", ("axis?",)),
    ("gather_nd", ("batch_dims?",)),
    ("squeeze", ()),
    ("unsqueeze", ()),
    ("expand", ()),
    ("where", ()),
    ("shape", ("start?", "end?")),
    ("range", ()),
    ("add", ()),
    ("sub", ()),
    ("greater", ()),
    ("less", ()),
    ("equal", ()),
    ("identity", ()),
]
OPCODE = {name: i for i, (name, _) in enumerate(ISA)}

DTYPES = ["i8", "i16", "i32", "i64", "bool", "u8"]
NUMPY = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64, "bool": np.bool_, "u8": np.uint8}
REGIONS = ["input", "output", "const", "sram", "external", "stream"]
CONSTANT_REGIONS = ("const", "stream")
LAYOUTS = ["raw", "dense", "pencil"]

_HEADER = struct.Struct("<4sHH16s16s5IQIIQ")
_BUFFER = struct.Struct("<IBBBB" + "iii" * MAX_RANK + "QQQII")
_INSTR = struct.Struct("<HBBHH")
_SYMBOL = struct.Struct("<IId")


class ProgramError(FemtoccError):
    """A program file is malformed; the message names the file part and what was expected."""


Dim = tuple[int, int, int]  # const, coef_T, coef_P; (-1, 0, 0): known at run time


@dataclass
class Buffer:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    region: str
    address: int = 0
    nbytes: int = 0
    layout: str = "raw"
    bits: int = 0
    block: int = 0  # pencil layout: the pencil height
    blob: bytes = b""  # const only
    blob_offset: int = 0


@dataclass
class Instruction:
    op: str
    inputs: list[int]
    outputs: list[int]
    params: list[int] = field(default_factory=list)
    tile_rows: int = 0  # rows per tile when the scheduler tiled the loop (0: whole tensor)


@dataclass
class Symbol:
    name: str
    buffer: int
    scale: float = 0.0


@dataclass
class Program:
    target: str
    graph: str
    buffers: list[Buffer]
    code: list[Instruction]
    inputs: list[Symbol]
    outputs: list[Symbol]
    sram_bytes_per_core: int = 0
    cores: int = 1
    external_bytes: int = 0

    # ------------------------------------------------------------------ writing
    def to_bytes(self) -> bytes:
        strings: dict[str, int] = {}

        def sid(s: str) -> int:
            return strings.setdefault(s, len(strings))

        for b in self.buffers:
            sid(b.name)
        for s in self.inputs + self.outputs:
            sid(s.name)
        blob = bytearray()
        for b in self.buffers:
            if b.region in CONSTANT_REGIONS:
                b.blob_offset = len(blob)
                blob += b.blob
                blob += bytes(-len(blob) % 8)  # 64-bit word aligned
        parts = [_HEADER.pack(MAGIC, VERSION, 0, self.target.encode()[:16], self.graph.encode()[:16], len(strings),
                              len(self.buffers), len(self.code), len(self.inputs), len(self.outputs), len(blob),
                              self.sram_bytes_per_core, self.cores, self.external_bytes)]
        for s in strings:
            raw = s.encode()
            parts.append(struct.pack("<H", len(raw)) + raw)
        for b in self.buffers:
            dims = [x for d in b.shape for x in d] + [0] * 3 * (MAX_RANK - len(b.shape))
            parts.append(_BUFFER.pack(sid(b.name), DTYPES.index(b.dtype), REGIONS.index(b.region), LAYOUTS.index(b.layout),
                                      len(b.shape), *dims, b.address, b.nbytes, b.blob_offset, b.bits, b.block))
        for ins in self.code:
            parts.append(_INSTR.pack(OPCODE[ins.op], len(ins.inputs), len(ins.outputs), len(ins.params), ins.tile_rows))
            parts.append(struct.pack(f"<{len(ins.inputs) + len(ins.outputs)}H", *ins.inputs, *ins.outputs))
            parts.append(struct.pack(f"<{len(ins.params)}q", *ins.params))
        for s in self.inputs + self.outputs:
            parts.append(_SYMBOL.pack(sid(s.name), s.buffer, s.scale))
        parts.append(bytes(blob))
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    # ------------------------------------------------------------------ reading
    @staticmethod
    def from_bytes(data: bytes, where: str = "program", validate: bool = True) -> Program:
        """Parse (and unless ``validate`` is False, fully validate) a program's bytes."""
        r = _Reader(data, where)
        if len(data) < _HEADER.size + 4:
            raise ProgramError(f"{where}: {len(data)} bytes is too short for a .spu program")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise ProgramError(f"{where}: checksum mismatch (file corrupted or truncated)")
        (magic, version, _, target, graph, n_str, n_buf, n_ins, n_in, n_out, blob_bytes,
         sram, cores, external) = r.unpack(_HEADER, "header")
        if magic != MAGIC:
            raise ProgramError(f"{where}: not a .spu program (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ProgramError(f"{where}: format version {version}, this femtocc reads version {VERSION}")
        strings = [r.take(r.unpack(struct.Struct("<H"), f"string {i} length")[0], f"string {i}").decode("utf-8", "replace")
                   for i in range(n_str)]

        def string(i: int, what: str) -> str:
            if i >= len(strings):
                raise ProgramError(f"{where}: {what} names string {i}, only {len(strings)} exist")
            return strings[i]

        buffers = []
        for i in range(n_buf):
            f = r.unpack(_BUFFER, f"buffer {i}")
            name = string(f[0], f"buffer {i}")
            dtype, region, layout, rank = f[1], f[2], f[3], f[4]
            if dtype >= len(DTYPES) or region >= len(REGIONS) or layout >= len(LAYOUTS) or rank > MAX_RANK:
                raise ProgramError(f"{where}: buffer {i} ({name}) has dtype {dtype}, region {region}, layout {layout}, "
                                   f"rank {rank}; expected < {len(DTYPES)}, {len(REGIONS)}, {len(LAYOUTS)}, {MAX_RANK + 1}")
            dims = f[5 : 5 + 3 * MAX_RANK]
            shape = tuple(tuple(dims[3 * k : 3 * k + 3]) for k in range(rank))
            address, nbytes, offset, bits, block = f[5 + 3 * MAX_RANK : 10 + 3 * MAX_RANK]
            if (LAYOUTS[layout] == "pencil") != (block != 0) or block > MAX_BLOCK:
                raise ProgramError(f"{where}: buffer {i} ({name}) has block {block}; a pencil buffer needs its pencil "
                                   f"height in 1..{MAX_BLOCK}, other layouts 0")
            buffers.append(Buffer(name, DTYPES[dtype], shape, REGIONS[region], address, nbytes, LAYOUTS[layout], bits,
                                  block, blob_offset=offset))
        code = []
        for i in range(n_ins):
            opcode, n_i, n_o, n_p, tile = r.unpack(_INSTR, f"instruction {i}")
            if opcode >= len(ISA):
                raise ProgramError(f"{where}: instruction {i} has opcode {opcode}; this version knows {len(ISA)}")
            ids = struct.unpack_from(f"<{n_i + n_o}H", r.take(2 * (n_i + n_o), f"instruction {i} operands"))
            params = list(struct.unpack_from(f"<{n_p}q", r.take(8 * n_p, f"instruction {i} params")))
            code.append(Instruction(ISA[opcode][0], list(ids[:n_i]), list(ids[n_i:]), params, tile))
        symbols = []
        for i in range(n_in + n_out):
            name_id, buf, scale = r.unpack(_SYMBOL, f"symbol {i}")
            symbols.append(Symbol(string(name_id, f"symbol {i}"), buf, scale))
        blob = r.take(blob_bytes, "constant blobs")
        if r.pos != len(data) - 4:
            raise ProgramError(f"{where}: {len(data) - 4 - r.pos} unexpected bytes before the checksum")
        prog = Program(target.rstrip(b"\0").decode(errors="replace"), graph.rstrip(b"\0").decode(errors="replace"),
                       buffers, code, symbols[:n_in], symbols[n_in:], sram, cores, external)
        for i, b in enumerate(buffers):
            if b.region in CONSTANT_REGIONS:
                if b.blob_offset + b.nbytes > len(blob):
                    raise ProgramError(f"{where}: buffer {i} ({b.name}) blob [{b.blob_offset}, +{b.nbytes}) "
                                       f"runs past the {len(blob)} blob bytes")
                b.blob = bytes(blob[b.blob_offset : b.blob_offset + b.nbytes])
        if validate:
            prog.validate(where)
        return prog

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "program") -> None:
        """Everything a runtime relies on: operand ids, arities, params, dims, memory regions."""
        from femtocc.ir.ops import OPS

        n = len(self.buffers)
        defined = {s.buffer for s in self.inputs} | {i for i, b in enumerate(self.buffers) if b.region in CONSTANT_REGIONS}
        for s in self.inputs + self.outputs:
            if s.buffer >= n:
                raise ProgramError(f"{where}: symbol {s.name} names buffer {s.buffer}, only {n} exist")
        for i, b in enumerate(self.buffers):
            if b.region == "sram" and b.address + b.nbytes > self.sram_bytes_per_core:
                raise ProgramError(f"{where}: buffer {i} ({b.name}) at SRAM address {b.address} + {b.nbytes} bytes "
                                   f"exceeds the {self.sram_bytes_per_core} bytes per core")
            if b.region == "external" and b.address + b.nbytes > self.external_bytes:
                raise ProgramError(f"{where}: buffer {i} ({b.name}) at external address {b.address} + {b.nbytes} bytes "
                                   f"exceeds the {self.external_bytes} external bytes")
            if b.region in CONSTANT_REGIONS:
                decode_constant(b, where)
        for k, ins in enumerate(self.code):
            label = f"{where}: instruction {k} ({ins.op})"
            lo, hi = OPS[ins.op].arity
            extra = 1 if ins.op == "qdense" else 0  # the float weight scales stay behind in the IR
            if not lo <= len(ins.inputs) + extra <= hi or len(ins.outputs) != OPS[ins.op].n_outputs:
                raise ProgramError(f"{label}: {len(ins.inputs)} inputs and {len(ins.outputs)} outputs do not fit the op")
            for b in ins.inputs + ins.outputs:
                if b >= n:
                    raise ProgramError(f"{label}: operand buffer {b} does not exist ({n} buffers)")
            for b in ins.inputs:
                if b not in defined:
                    raise ProgramError(f"{label}: reads buffer {b} ({self.buffers[b].name}) before anything writes it")
            for b in ins.outputs:
                if self.buffers[b].region in CONSTANT_REGIONS + ("input",):
                    raise ProgramError(f"{label}: writes buffer {b} ({self.buffers[b].name}), a constant or input")
            decode_params(ins, label)
            defined.update(ins.outputs)
        for s in self.outputs:
            if s.buffer not in defined:
                raise ProgramError(f"{where}: output {s.name} (buffer {s.buffer}) is never written")

    # ------------------------------------------------------------------ text
    def disassemble(self) -> str:
        lines = [f"; spu program v{VERSION} target={self.target} graph={self.graph} cores={self.cores} "
                 f"sram={self.sram_bytes_per_core}B/core external={self.external_bytes}B",
                 f"; {len(self.buffers)} buffers, {len(self.code)} instructions, "
                 f"{sum(len(b.blob) for b in self.buffers)} constant bytes", "", "memory map:"]
        for i, b in enumerate(self.buffers):
            where = {"sram": f"sram@{b.address:#x}", "external": f"ext@{b.address:#x}"}.get(b.region, b.region)
            layout = f" {b.layout}{b.block or ''}/{b.bits}b" if b.region in CONSTANT_REGIONS else ""
            lines.append(f"  b{i:<4} {where:<14} {b.dtype}[{', '.join(format_dim(d) for d in b.shape)}] "
                         f"{b.nbytes}B{layout}  {b.name}")
        lines.append("")
        for s in self.inputs:
            lines.append(f"input  {s.name} = b{s.buffer}" + (f" scale={s.scale:.6g}" if s.scale else ""))
        for s in self.outputs:
            lines.append(f"output {s.name} = b{s.buffer}" + (f" scale={s.scale:.6g}" if s.scale else ""))
        lines.append("")
        lines.append("code:")
        for k, ins in enumerate(self.code):
            attrs = decode_params(ins, f"instruction {k}")
            text = ", ".join(f"{a}={v}" for a, v in attrs.items())
            tile = f" tile={ins.tile_rows}" if ins.tile_rows else ""
            lines.append(f"  {k:>4}: {ins.op:<12} {', '.join(f'b{b}' for b in ins.outputs)} <- "
                         f"{', '.join(f'b{b}' for b in ins.inputs)}{'  {' + text + '}' if text else ''}{tile}")
        return "\n".join(lines) + "\n"


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data) - 4:
            raise ProgramError(f"{self.where}: truncated in {what} (needs {n} bytes at offset {self.pos}, "
                               f"{max(len(self.data) - 4 - self.pos, 0)} left)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct, what: str):
        return s.unpack(self.take(s.size, what))


def format_dim(d: Dim) -> str:
    c, t, p = d
    if (c, t, p) == (-1, 0, 0):
        return "?"
    terms = [f"{t}*T" if t not in (0, 1) else "T" if t else "", f"{p}*P" if p not in (0, 1) else "P" if p else ""]
    terms = [x for x in terms if x] + ([str(c)] if c or not (t or p) else [])
    return " + ".join(terms)


def bind(shape: tuple[Dim, ...], T: int, P: int) -> tuple[int | None, ...]:
    return tuple(None if d == (-1, 0, 0) else d[0] + d[1] * T + d[2] * P for d in shape)


def solve_sizes(dims: list[tuple[str, Dim, int]]) -> dict[str, int]:
    """``T`` and ``P`` from ``(where, declared dim, actual size)`` triples: a dim with one unknown
    symbol fixes it; two rounds, so that a dim ``T + P`` binds ``P`` once ``T`` is known. Unbound
    symbols are 0; callers check every dim against the result (:func:`bind`)."""
    symbols: dict[str, int | None] = {"T": None, "P": None}
    for _ in range(2):
        for where, (c, t, q), n in dims:
            for sym, coef, other, other_coef in (("T", t, "P", q), ("P", q, "T", t)):
                if not coef or symbols[sym] is not None or (other_coef and symbols[other] is None):
                    continue
                value, rem = divmod(n - c - other_coef * (symbols[other] or 0), coef)
                if rem or value < 0:
                    raise ProgramError(f"{where} dim {n} does not fit {sym}")
                symbols[sym] = value
    return {k: v or 0 for k, v in symbols.items()}


def encode_params(op: str, attrs: dict) -> list[int]:
    out: list[int] = []
    for name in ISA[OPCODE[op]][1]:
        key = name.rstrip("*?")
        if name.endswith("*"):
            items = [int(x) for x in attrs.get(key, [])]
            out += [len(items) if key in attrs else ABSENT, *items]
        else:
            out.append(int(attrs[key]) if key in attrs else ABSENT)
    return out


def decode_params(ins: Instruction, label: str) -> dict:
    attrs, pos, p = {}, 0, ins.params
    for name in ISA[OPCODE[ins.op]][1]:
        if pos >= len(p):
            raise ProgramError(f"{label}: params end before {name.rstrip('*?')}")
        value = p[pos]
        pos += 1
        if name.endswith("*"):
            if value == ABSENT:
                continue
            if not 0 <= value <= len(p) - pos:
                raise ProgramError(f"{label}: list {name[:-1]} claims {value} items, {len(p) - pos} params left")
            attrs[name[:-1]] = list(p[pos : pos + value])
            pos += value
        elif value != ABSENT:
            attrs[name.rstrip("?")] = value
        elif not name.endswith("?"):
            raise ProgramError(f"{label}: required attribute {name} is absent")
    if pos != len(p):
        raise ProgramError(f"{label}: {len(p) - pos} params left over")
    for key in ("shift", "step_bits", "gamma_shift"):
        if key in attrs and not 0 <= attrs[key] <= 62:
            raise ProgramError(f"{label}: {key}={attrs[key]} outside 0..62")
    if "bits" in attrs and attrs["bits"] not in (8, 16):
        raise ProgramError(f"{label}: bits={attrs['bits']}, expected 8 or 16")
    return attrs


def float_io(run_ints, input_types: dict, output_scales: dict):
    """Wrap ``run_ints`` (integer feeds -> integer outputs) as float-in, float-out, as the host
    does at a program's boundary: inputs are quantized with their symbol's scale and saturated to
    their dtype, outputs dequantized; symbols without a scale (token ids) pass as they are.
    ``input_types``: name -> (scale, numpy dtype); ``output_scales``: name -> scale.
    An input given again as the very same array object as in the previous call (the cross-attention
    K/V at every decoding step) reuses its integers; callers must not change an array in place
    between calls."""
    last: dict[str, tuple] = {}

    def run(feeds):
        ints = {}
        for name, x in feeds.items():
            if name not in input_types:
                continue
            scale, dt = input_types[name]
            if scale and name in last and last[name][0] is x:
                ints[name] = last[name][1]
            elif scale:
                lim = np.iinfo(dt).max
                ints[name] = np.clip(np.rint(np.asarray(x, np.float32) / np.float32(scale)), -lim, lim).astype(dt, order="C")  # row-major, as the program lays it out
                last[name] = (x, ints[name])
            else:
                ints[name] = np.asarray(x).astype(dt)
        out = run_ints(ints)
        return {k: (v.astype(np.float32) * np.float32(output_scales[k]) if output_scales[k] else v) for k, v in out.items()}

    return run


# ----------------------------------------------------------------------------- constant layouts


def storage_format(layout: str, block: int = 0):
    """The :mod:`femtocc.ir.formats` format of a weight layout."""
    return parse_format("dense" if layout == "dense" else f"pencil{block}")


def encode_constant(data: np.ndarray, layout: str, bits: int, block: int = 0) -> bytes:
    if layout == "raw":
        return np.ascontiguousarray(data).tobytes()
    return storage_format(layout, block).encode(data, bits)


def decode_constant(b: Buffer, where: str = "program") -> np.ndarray:
    """The array a constant buffer holds, checked against its declared shape and layout."""
    if any(d[1] or d[2] or d[0] < 0 for d in b.shape):
        raise ProgramError(f"{where}: constant {b.name} must have a static shape")
    shape = tuple(d[0] for d in b.shape)
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProgramError(f"{where}: constant {b.name} has more than 2**28 elements ({list(shape)})")
    raw = b.blob
    try:
        if b.layout == "raw":
            itemsize = np.dtype(NUMPY[b.dtype]).itemsize
            if len(raw) != count * itemsize:
                raise ProgramError(f"{where}: constant {b.name} has {len(raw)} bytes, {b.dtype}{list(shape)} needs {count * itemsize}")
            return np.frombuffer(raw, NUMPY[b.dtype]).reshape(shape)
        if b.dtype != "i8" or len(shape) != 2 or b.bits not in (4, 8):
            raise ProgramError(f"{where}: weight {b.name} in layout {b.layout} must be a 2-D i8 with bits 4 or 8")
        return storage_format(b.layout, b.block).decode(raw, shape[0], shape[1], b.bits, b.name)
    except FormatError as e:
        raise ProgramError(f"{where}: {e}") from None
    except ValueError as e:
        raise ProgramError(f"{where}: constant {b.name} cannot be decoded ({e})") from None
