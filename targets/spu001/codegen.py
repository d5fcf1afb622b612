"""codegen: a quantized, laid-out, tiled IR graph -> one ``.spu`` program (see femtocc.runtime.program).

Works on any graph, whole (encoder, cross K/V, decoder step) or one partitioned subgraph, as long
as its data path is integer (run ``quantize`` first):

* graph inputs read only through ``quantize`` become integer program inputs carrying that scale
  (``shape`` nodes read the integer buffer: same dims); graph outputs made by ``dequantize``
  become integer program outputs with their scale; integer inputs (token ids) pass as they are;
* every other node becomes one instruction; an op outside the ISA is an error naming the node;
* constants are stored in the storage encoding on their type (``select-layout`` chose it: dense,
  or pencil with the target's height; int4 packed) or raw; a ``qdense``'s float weight scales are not needed on the chip and stay
  behind;
* activations take the region and address ``tile-sram`` gave them; without a plan they go to
  external memory, packed one after another.

The same graph always gives the same bytes (buffers are numbered in graph order).
"""

from __future__ import annotations

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir import dims
from femtocc.ir.formats import parse_format
from femtocc.ir.formats.pencil import Pencil
from femtocc.runtime.program import OPCODE, Buffer, Instruction, Program, Symbol, encode_constant, encode_params

EXTERNAL_BYTES = 1 << 32  # modelled external memory size


def program_dim(d, where: str):
    """An IR dim (int, ``"T"``, ``"P + T"``, ``"?"``) as a program dim ``(const, coef_T, coef_P)``."""
    if isinstance(d, int):
        return (d, 0, 0)
    if d == dims.UNKNOWN:
        return (-1, 0, 0)
    terms = dims.parse(d)
    if terms is None or set(terms) - {"", "T", "P"}:
        raise FemtoccError(f"codegen: {where} has dim {d!r}; programs know only T (new tokens) and P (cached tokens)")
    return (terms.get("", 0), terms.get("T", 0), terms.get("P", 0))


def _max_bytes(type_, dtype_bytes: int, bound: int = 448) -> int:
    n = 1
    for d in type_.shape:
        c, t, p = program_dim(d, "value")
        n *= max(c + (t + p) * bound, 1) if (c, t, p) != (-1, 0, 0) else bound
    return n * dtype_bytes


def check_limits(graph, target, code: list[Instruction], buffers: list[Buffer]) -> None:
    """The program must fit the core's program memory, every lookup table its table memory, and the
    pencil index width the format stores must be the target's."""
    f = target.facts
    if len(code) > f.program_memory_instructions_per_core:
        raise FemtoccError(f"codegen: @{graph.name} needs {len(code)} instructions; {target.name}'s program memory holds "
                           f"{f.program_memory_instructions_per_core} per core (facts.program_memory_instructions_per_core)")
    bits = target.assumptions.pencil_index_bits
    if bits != 16 and any(b.layout == "pencil" for b in buffers):
        raise FemtoccError(f"codegen: the .spu format stores 16-bit pencil indices; {target.name} says "
                           f"assumptions.pencil_index_bits = {bits}")
    for ins in code:
        if ins.op in ("qgelu", "qsoftmax"):
            table = buffers[ins.inputs[1]]
            if len(table.blob) > f.table_memory_bytes_per_core:
                raise FemtoccError(f"codegen: the {ins.op} table {table.name} of @{graph.name} is {len(table.blob)} bytes; "
                                   f"{target.name}'s table memory holds {f.table_memory_bytes_per_core} per core "
                                   "(facts.table_memory_bytes_per_core)")


def generate(graph, target) -> Program:
    """One program for ``graph`` on ``target`` (a :class:`~femtocc.targets.spu001.description.Target`)."""
    from femtocc.ir.core import DTYPES

    buffers: list[Buffer] = []
    index: dict[int, int] = {}  # id(IR value) -> buffer
    ext_next = [0]

    def shape_of(v):
        return tuple(program_dim(d, f"%{v.name}") for d in v.type.shape)

    def add(v, region: str, **kw) -> int:
        index[id(v)] = len(buffers)
        buffers.append(Buffer(v.name, v.type.dtype, shape_of(v), region, **kw))
        return index[id(v)]

    def activation(v) -> int:
        nbytes = _max_bytes(v.type, np.dtype(DTYPES[v.type.dtype]).itemsize)
        placed = v.attrs.get("placement")
        if placed and placed["where"] in ("sram", "tile"):
            return add(v, "sram", address=placed["address"], nbytes=placed["bytes"])
        if placed and placed["where"] == "external":
            return add(v, "external", address=placed["address"], nbytes=max(placed["bytes"], 0))
        address = ext_next[0]
        ext_next[0] += -(-nbytes // 8) * 8
        return add(v, "external", address=address, nbytes=nbytes)

    def constant(c) -> int:
        layout, bits, block = "raw", 0, 0
        if "quant" in c.attrs and c.data.dtype == np.int8 and c.data.ndim == 2 and c.attrs["quant"].get("axis") == 1:
            bits = int(c.attrs["quant"]["bits"])
            layout = "dense"
            if c.type.encoding:
                fmt = parse_format(c.type.encoding)
                if not isinstance(fmt, Pencil) or fmt.height != target.facts.pencil:
                    raise FemtoccError(f"codegen: %{c.name} is stored <{fmt.name}>; {target.name} reads dense and "
                                       f"pencil{target.facts.pencil} weights (run select-layout for this target)")
                layout, block = "pencil", fmt.height
        elif c.type.encoding:
            raise FemtoccError(f"codegen: %{c.name} has storage encoding <{c.type.encoding}> but is not a quantized weight")
        blob = encode_constant(c.data, layout, bits, block)
        region = "stream" if c.attrs.get("placement", {}).get("where") == "stream" else "const"
        return add(c, region, nbytes=len(blob), layout=layout, bits=bits, block=block, blob=blob)

    def operand(v) -> int:
        if id(v) in index:
            return index[id(v)]
        if v.is_constant:
            return constant(v)
        raise FemtoccError(f"codegen: %{v.name} in @{graph.name} is used before it is computed")

    # inputs: integer as given, float through their quantize node
    inputs: list[Symbol] = []
    boundary = set()
    for v in graph.inputs:
        if v.type.dtype in ("f32", "f16", "f64"):
            quant = [u for u in v.users if u.op == "quantize"]
            others = [u for u in v.users if u.op not in ("quantize", "shape")]
            scales = {u.attrs["scale"] for u in quant}
            if others or len(scales) != 1:
                raise FemtoccError(f"codegen: float input %{v.name} of @{graph.name} must be read through one quantize "
                                   f"(found {', '.join(sorted(u.op for u in v.users))}); run quantize first")
            q = quant[0].outputs[0]
            for u in quant[1:]:
                index[id(u.outputs[0])] = len(buffers)
            buf = add(q, "input", nbytes=_max_bytes(q.type, np.dtype(DTYPES[q.type.dtype]).itemsize))
            index[id(v)] = buf
            boundary.update(id(u) for u in quant)
            inputs.append(Symbol(v.name, buf, float(scales.pop())))
        else:
            inputs.append(Symbol(v.name, add(v, "input", nbytes=_max_bytes(v.type, np.dtype(DTYPES[v.type.dtype]).itemsize))))

    deq_outputs = {id(v.producer): v for v in graph.outputs if v.producer is not None and v.producer.op == "dequantize"}
    code: list[Instruction] = []
    for node in graph.nodes:
        if id(node) in boundary:
            continue
        if id(node) in deq_outputs:
            continue
        if node.op not in OPCODE:
            raise FemtoccError(f"codegen: node %{node.outputs[0].name} ({node.op}) in @{graph.name} has no spu001 instruction; "
                               "the data path must be integer (run quantize)")
        ins = [operand(v) for v in (node.inputs[:4] if node.op == "qdense" else node.inputs)]
        outs = [activation(v) for v in node.outputs]
        code.append(Instruction(node.op, ins, outs, encode_params(node.op, node.attrs), int(node.attrs.get("tile_rows", 0))))

    outputs: list[Symbol] = []
    for v in graph.outputs:
        if id(v.producer) in deq_outputs if v.producer is not None else False:
            src = v.producer.inputs[0]
            outputs.append(Symbol(v.name, operand(src), float(v.producer.attrs["scale"])))
        else:
            outputs.append(Symbol(v.name, operand(v)))
    for s in outputs:  # an output lives in the output region, whatever the plan said
        b = buffers[s.buffer]
        if b.region in ("sram", "external"):
            itemsize = np.dtype(DTYPES[b.dtype]).itemsize
            b.region, b.address = "output", 0
            b.nbytes = itemsize * int(np.prod([max(c + (t + p) * 448, 1) if c >= 0 else 448 for c, t, p in b.shape]))
    check_limits(graph, target, code, buffers)
    return Program(target.name, graph.name, buffers, code, inputs, outputs,
                   sram_bytes_per_core=target.sram_bytes_per_core, cores=target.facts.cores,
                   external_bytes=max(EXTERNAL_BYTES, ext_next[0]))
