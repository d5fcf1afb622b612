"""Verifier and shape inference.

:func:`verify` guarantees, when it returns: every value is defined once (SSA) and before its
uses (dominance, in node order); every op is in the vocabulary with the right number of inputs
and outputs; use lists match inputs; graph outputs are defined; and every node's declared output
types agree with what its type rule infers (dtype, rank, and each dim where both are known); only
constants carry a storage encoding, it is a 2-D weight's, and the data fits it (an ``N:M`` weight
has at most ``N`` nonzeros per group, a ``pencilH`` weight a multiple of ``H`` outputs); a
quantized constant (``attrs["quant"]``) has 4 or 8 bits, and an ``i8`` one values inside them; a
placement (``attrs["placement"]``, from tile-sram) names a place and non-negative sizes.

:func:`infer_shapes` rewrites each node's output types to what the type rules infer, keeping a
declared dim where inference only knows ``?``.
"""

from __future__ import annotations

from femtocc.errors import FemtoccError
from femtocc.ir import dims
from femtocc.ir.core import Graph, Node, TensorType
from femtocc.ir.formats import parse_format
from femtocc.ir.ops import OPS, OpError, infer_types


class VerifyError(FemtoccError):
    pass


def _where(node: Node) -> str:
    loc = f" ({node.meta['source']})" if node.meta.get("source") else ""
    return f"node %{node.outputs[0].name} = {node.op}{loc}"


def _inferred(node: Node) -> list[TensorType]:
    consts = [v.data if v.is_constant else None for v in node.inputs]
    try:
        return infer_types(node.op, [v.type for v in node.inputs], node.attrs, consts)
    except OpError as e:
        raise VerifyError(f"{_where(node)}: {e}") from None


def _agree(declared: TensorType, inferred: TensorType) -> bool:
    return (
        declared.dtype == inferred.dtype
        and declared.rank == inferred.rank
        and all(dims.compatible(a, b) for a, b in zip(declared.shape, inferred.shape))
    )


def _check_encoding(v) -> None:
    try:
        fmt = parse_format(v.type.encoding)
    except FemtoccError as e:
        raise VerifyError(f"constant %{v.name}: {e}") from None
    if v.type.rank != 2:
        raise VerifyError(f"constant %{v.name}: storage encoding <{fmt.name}> needs a 2-D [in, out] weight, type is {v.type}")
    if v.data is not None and not fmt.fits(v.data):
        raise VerifyError(f"constant %{v.name}: data does not fit its storage encoding <{fmt.name}>")


PLACES = ("sram", "tile", "stream", "external")


def _check_placement(v) -> None:
    p = v.attrs["placement"]
    if not isinstance(p, dict) or p.get("where") not in PLACES:
        raise VerifyError(f"%{v.name}: placement {p} must say where: {', '.join(PLACES)}")
    bad = [k for k in ("address", "bytes", "tiles") if k in p and (not isinstance(p[k], int) or p[k] < 0)]
    if bad:
        raise VerifyError(f"%{v.name}: placement {bad[0]} must be a non-negative integer, got {p[bad[0]]!r}")


def _check_quant(v) -> None:
    q = v.attrs["quant"]
    bits = q.get("bits") if isinstance(q, dict) else None
    if bits not in (4, 8):
        raise VerifyError(f"constant %{v.name}: quant {q} needs bits 4 or 8")
    if v.type.dtype == "i8" and v.data is not None and v.data.size:
        lo, hi = int(v.data.min()), int(v.data.max())
        if lo < -(1 << (bits - 1)) or hi >= 1 << (bits - 1):
            raise VerifyError(f"constant %{v.name}: values in [{lo}, {hi}] do not fit {bits}-bit quantization")


def verify(g: Graph) -> None:
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, what):
        if v.name in names:
            raise VerifyError(f"graph @{g.name}: value %{v.name} is defined twice ({what})")
        names.add(v.name)
        defined.add(id(v))

    for v in g.inputs:
        define(v, "input")
    for name, v in g.constants.items():
        if name != v.name:
            raise VerifyError(f"graph @{g.name}: constant table key {name!r} != value name {v.name!r}")
        if v.data is not None and not TensorType.of(v.data).same_data(v.type):
            raise VerifyError(f"constant %{v.name}: data is {TensorType.of(v.data)}, type says {v.type}")
        if v.type.encoding:
            _check_encoding(v)
        if "quant" in v.attrs:
            _check_quant(v)
        if "placement" in v.attrs:
            _check_placement(v)
        define(v, "constant")
    for node in g.nodes:
        if node.op not in OPS:
            raise VerifyError(f"{_where(node)}: unknown op {node.op!r}")
        if len(node.outputs) != OPS[node.op].n_outputs:
            raise VerifyError(f"{_where(node)}: {len(node.outputs)} outputs, {node.op} has {OPS[node.op].n_outputs}")
        for i, v in enumerate(node.inputs):
            if id(v) not in defined:
                raise VerifyError(f"{_where(node)}: input {i} %{v.name} is not defined before this node")
            if node not in v.users:
                raise VerifyError(f"{_where(node)}: use list of %{v.name} misses this node")
        for out, want in zip(node.outputs, _inferred(node)):
            if not _agree(out.type, want):
                raise VerifyError(f"{_where(node)}: declared type {out.type}, inferred {want}")
            if out.producer is not node:
                raise VerifyError(f"{_where(node)}: output %{out.name} has another producer")
        for v in node.outputs:
            if "placement" in v.attrs:
                _check_placement(v)
            if v.type.encoding:
                raise VerifyError(f"{_where(node)}: output %{v.name} has storage encoding <{v.type.encoding}>; only constants are stored")
            define(v, "node output")
    for v in g.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph @{g.name}: output %{v.name} is not defined")


def infer_shapes(g: Graph) -> None:
    for node in g.nodes:
        for out, want in zip(node.outputs, _inferred(node)):
            if out.type.rank == want.rank and out.type.dtype == want.dtype:
                shape = tuple(
                    old if new == dims.UNKNOWN else dims.canonical(new) for old, new in zip(out.type.shape, want.shape)
                )
                out.type = TensorType(want.dtype, shape)
            else:
                out.type = want
