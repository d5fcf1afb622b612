"""The closed op vocabulary of the IR: for each op, its ONNX name, its numpy semantics and its type rule.

The numpy functions are the living definition of each op (float32, as ONNX specifies it); the
interpreter, constant folding and every backend test rely on them. ``infer`` maps input types
(and, for shape-carrying inputs, their constant values where known) to output types.

femtocc's own ops, created by canonicalization passes:

* ``gelu(x)``: exact GELU, ``x * 0.5 * (1 + erf(x / sqrt(2)))``.
* ``dense(x, w[, b])``: ``x @ w + b`` with ``w`` stored ``[in, out]``: the op that pruning and
  quantization act on.
* the integer ops of the quantized IR (``quantize``, ``qdense``, ``qsoftmax``, ...) live in
  :mod:`femtocc.ir.qops`; they register into the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

from femtocc.ir import dims
from femtocc.ir.core import DTYPES, TensorType

Consts = list  # per input: its constant np.ndarray, or None


class OpError(ValueError):
    """An op's inputs or attributes do not fit its definition."""


@dataclass(frozen=True)
class OpDef:
    name: str
    onnx: str | None  # ONNX op type it imports from / exports to (None: femtocc-only)
    arity: tuple[int, int]  # min, max inputs
    run: Callable  # (inputs: list[np.ndarray], attrs: dict) -> list[np.ndarray]
    infer: Callable  # (types: list[TensorType], attrs: dict, consts: Consts) -> list[TensorType]
    n_outputs: int = 1


OPS: dict[str, OpDef] = {}


def op(name: str, onnx: str | None, arity=(1, 1), n_outputs: int = 1):
    def register(run):
        def attach(infer):
            OPS[name] = OpDef(name, onnx, arity, run, infer, n_outputs)
            return infer

        run.infer = attach
        return run

    return register


# ----------------------------------------------------------------------------- type helpers


def _bcast(*types: TensorType, dtype: str | None = None) -> TensorType:
    rank = max(t.rank for t in types)
    shape = []
    for i in range(rank):
        d: int | str = 1
        for t in types:
            j = i - (rank - t.rank)
            if j >= 0:
                d = dims.broadcast(d, t.shape[j])
        shape.append(d)
    return TensorType(dtype or types[0].dtype, tuple(shape))


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def _same(types, attrs, consts):
    return [types[0]]


def _dims_from_const(array) -> list[int]:
    return [int(x) for x in np.asarray(array).reshape(-1)]


# ----------------------------------------------------------------------------- elementwise

_BINARY = {
    "add": ("Add", np.add),
    "sub": ("Sub", np.subtract),
    "mul": ("Mul", np.multiply),
    "div": ("Div", None),
    "pow": ("Pow", np.power),
}
_COMPARE = {
    "greater": ("Greater", np.greater),
    "less": ("Less", np.less),
    "less_or_equal": ("LessOrEqual", np.less_equal),
    "greater_or_equal": ("GreaterOrEqual", np.greater_equal),
    "equal": ("Equal", np.equal),
}
_UNARY = {
    "neg": ("Neg", np.negative),
    "sqrt": ("Sqrt", np.sqrt),
    "exp": ("Exp", np.exp),
    "tanh": ("Tanh", np.tanh),
    "erf": ("Erf", lambda x: special.erf(x).astype(x.dtype)),
    "reciprocal": ("Reciprocal", np.reciprocal),
    "identity": ("Identity", lambda x: x),
}


def _divide(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates
    return np.divide(a, b)


def _register_elementwise():
    def binary(fn):
        return lambda xs, attrs: [np.asarray(fn(xs[0], xs[1])).astype(xs[0].dtype, copy=False)]

    for name, (onnx_name, fn) in _BINARY.items():
        OPS[name] = OpDef(
            name, onnx_name, (2, 2), binary(fn or _divide), lambda t, a, c: [_bcast(t[0], t[1])]
        )
    for name, (onnx_name, fn) in _COMPARE.items():
        OPS[name] = OpDef(
            name, onnx_name, (2, 2), lambda xs, attrs, fn=fn: [np.asarray(fn(xs[0], xs[1]))],
            lambda t, a, c: [_bcast(t[0], t[1], dtype="bool")],
        )
    for name, (onnx_name, fn) in _UNARY.items():
        OPS[name] = OpDef(name, onnx_name, (1, 1), lambda xs, attrs, fn=fn: [np.asarray(fn(xs[0]))], _same)


_register_elementwise()


@op("where", "Where", (3, 3))
def _where(xs, attrs):
    return [np.where(xs[0], xs[1], xs[2]).astype(xs[1].dtype, copy=False)]


@_where.infer
def _(t, a, c):
    return [_bcast(t[0], t[1], t[2], dtype=t[1].dtype)]


@op("cast", "Cast")
def _cast(xs, attrs):
    return [xs[0].astype(DTYPES[attrs["to"]])]


@_cast.infer
def _(t, a, c):
    return [TensorType(a["to"], t[0].shape)]


@op("gelu", None)
def _gelu(xs, attrs):
    x = xs[0]
    return [(x * (special.erf(x / np.float32(np.sqrt(2.0))).astype(x.dtype) + 1) * np.float32(0.5)).astype(x.dtype)]


_gelu.infer(_same)


@op("softmax", "Softmax")
def _softmax(xs, attrs):
    x = xs[0]
    axis = attrs.get("axis", -1)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return [e / np.sum(e, axis=axis, keepdims=True)]


_softmax.infer(_same)


@op("layer_norm", "LayerNormalization", (2, 3))
def _layer_norm(xs, attrs):
    x, scale = xs[0], xs[1]
    axis = _axis(attrs.get("axis", -1), x.ndim)
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=axes, keepdims=True)
    y = centred / np.sqrt(var + np.float32(attrs.get("epsilon", 1e-5))) * scale
    if len(xs) > 2:
        y = y + xs[2]
    return [y.astype(x.dtype, copy=False)]


_layer_norm.infer(_same)


# ----------------------------------------------------------------------------- linear algebra


@op("matmul", "MatMul", (2, 2))
def _matmul(xs, attrs):
    return [np.matmul(xs[0], xs[1])]


@_matmul.infer
def _(t, a, c):
    x, w = t
    if x.rank < 2 or w.rank < 2:
        raise OpError(f"matmul needs rank >= 2 operands, got {x} and {w}")
    if not dims.compatible(x.shape[-1], w.shape[-2]):
        raise OpError(f"matmul inner dims differ: {x} @ {w}")
    batch = _bcast(TensorType(x.dtype, x.shape[:-2]), TensorType(x.dtype, w.shape[:-2])).shape
    return [TensorType(x.dtype, (*batch, x.shape[-2], w.shape[-1]))]


@op("dense", None, (2, 3))
def _dense(xs, attrs):
    y = np.matmul(xs[0], xs[1])
    return [y + xs[2] if len(xs) > 2 else y]


@_dense.infer
def _(t, a, c):
    x, w = t[0], t[1]
    if w.rank != 2:
        raise OpError(f"dense weight must be 2-D [in, out], got {w}")
    if not dims.compatible(x.shape[-1], w.shape[0]):
        raise OpError(f"dense input {x} does not match weight {w} ([in, out])")
    if len(t) > 2 and (t[2].rank != 1 or not dims.compatible(t[2].shape[0], w.shape[1])):
        raise OpError(f"dense bias {t[2]} does not match weight {w}")
    return [TensorType(x.dtype, (*x.shape[:-1], w.shape[1]))]


@op("conv", "Conv", (2, 3))
def _conv(xs, attrs):
    """1-D convolution (the only kind Whisper has), as im2col + matmul."""
    x, w = xs[0], xs[1]
    stride = attrs.get("strides", [1])[0]
    dilation = attrs.get("dilations", [1])[0]
    pad_lo, pad_hi = attrs.get("pads", [0, 0])
    n, c, length = x.shape
    out_ch, _, k = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad_lo, pad_hi)))
    out_len = (length + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1
    idx = np.arange(out_len)[:, None] * stride + np.arange(k)[None, :] * dilation
    cols = xp[:, :, idx]  # n, c, out_len, k
    cols = cols.transpose(0, 2, 1, 3).reshape(n, out_len, c * k)
    y = np.matmul(cols, w.reshape(out_ch, c * k).T).transpose(0, 2, 1)
    if len(xs) > 2:
        y = y + xs[2][None, :, None]
    return [np.ascontiguousarray(y, dtype=x.dtype)]


@_conv.infer
def _(t, a, c):
    x, w = t[0], t[1]
    if x.rank != 3 or w.rank != 3:
        raise OpError(f"conv supports 1-D convolution only (rank-3 input and weight), got {x}, {w}")
    if a.get("group", 1) != 1:
        raise OpError(f"conv supports group=1 only, got group={a['group']}")
    if not dims.compatible(x.shape[1], w.shape[1]):
        raise OpError(f"conv input channels {x.shape[1]} != weight channels {w.shape[1]}")
    stride = a.get("strides", [1])[0]
    dilation = a.get("dilations", [1])[0]
    pads = a.get("pads", [0, 0])
    length = x.shape[2]
    if isinstance(length, int):
        length = (length + pads[0] + pads[1] - dilation * (w.shape[2] - 1) - 1) // stride + 1
    elif stride != 1 or pads[0] + pads[1] != dilation * (w.shape[2] - 1):
        length = dims.UNKNOWN
    return [TensorType(x.dtype, (x.shape[0], w.shape[0], length))]


@op("im2col", None)
def _im2col(xs, attrs):
    """``[N, C, L]`` -> ``[N, L_out, C * K]`` (kernel index fastest): a 1-D convolution's input
    rows, so that ``conv(x, W) == transpose(im2col(x) @ W.reshape(out, C * K).T)``."""
    x = xs[0]
    k, stride, dilation = attrs["kernel"], attrs.get("stride", 1), attrs.get("dilation", 1)
    pad_lo, pad_hi = attrs.get("pads", [0, 0])
    n, c, length = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad_lo, pad_hi)))
    out_len = (length + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1
    idx = np.arange(out_len)[:, None] * stride + np.arange(k)[None, :] * dilation
    return [np.ascontiguousarray(xp[:, :, idx].transpose(0, 2, 1, 3).reshape(n, out_len, c * k))]


@_im2col.infer
def _(t, a, c):
    x = t[0]
    if x.rank != 3:
        raise OpError(f"im2col takes [N, C, L], got {x}")
    k, stride, dilation = a["kernel"], a.get("stride", 1), a.get("dilation", 1)
    pads = a.get("pads", [0, 0])
    length = x.shape[2]
    if isinstance(length, int):
        length = (length + pads[0] + pads[1] - dilation * (k - 1) - 1) // stride + 1
    elif stride != 1 or pads[0] + pads[1] != dilation * (k - 1):
        length = dims.UNKNOWN
    channels = x.shape[1] * k if isinstance(x.shape[1], int) else dims.UNKNOWN
    return [TensorType(x.dtype, (x.shape[0], length, channels))]


# ----------------------------------------------------------------------------- shape ops


@op("shape", "Shape")
def _shape(xs, attrs):
    s = np.array(xs[0].shape, dtype=np.int64)
    return [s[attrs.get("start", 0) : attrs.get("end", len(s))]]


@_shape.infer
def _(t, a, c):
    n = len(range(t[0].rank)[a.get("start", 0) : a.get("end", t[0].rank)])
    return [TensorType("i64", (n,))]


@op("reshape", "Reshape", (2, 2))
def _reshape(xs, attrs):
    x, shape = xs[0], [int(d) for d in xs[1]]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@_reshape.infer
def _(t, a, c):
    if c[1] is None:
        n = t[1].shape[0]
        return [TensorType(t[0].dtype, (dims.UNKNOWN,) * n if isinstance(n, int) else ())]
    target = _dims_from_const(c[1])
    src = t[0].shape
    out: list[int | str] = []
    for i, d in enumerate(target):
        out.append(src[i] if d == 0 and not a.get("allowzero", 0) else d)
    if -1 in out:
        i = out.index(-1)
        known = [d for j, d in enumerate(out) if j != i]
        if t[0].is_static and all(isinstance(d, int) for d in known):
            out[i] = int(np.prod(src)) // max(int(np.prod(known)), 1)
        else:
            out[i] = _solve_reshape(src, known)
    return [TensorType(t[0].dtype, tuple(out))]


def _solve_reshape(src, known) -> int | str:
    """The -1 dim when one symbolic source dim survives unchanged: cancel the static parts."""
    sym_src = [d for d in src if not isinstance(d, int)]
    sym_known = [d for d in known if not isinstance(d, int)]
    if len(sym_src) == 1 and not sym_known:
        static = int(np.prod([d for d in src if isinstance(d, int)]))
        rest = int(np.prod(known))
        if rest and static % rest == 0 and static // rest == 1:
            return sym_src[0]
    if len(sym_src) == 1 and len(sym_known) == 1 and dims.compatible(sym_src[0], sym_known[0]):
        static = int(np.prod([d for d in src if isinstance(d, int)]))
        rest = int(np.prod([d for d in known if isinstance(d, int)]))
        if rest and static % rest == 0:
            return static // rest
    return dims.UNKNOWN


@op("transpose", "Transpose")
def _transpose(xs, attrs):
    return [np.transpose(xs[0], attrs.get("perm"))]


@_transpose.infer
def _(t, a, c):
    perm = a.get("perm", list(reversed(range(t[0].rank))))
    if sorted(perm) != list(range(t[0].rank)):
        raise OpError(f"transpose perm {perm} is not a permutation of rank {t[0].rank}")
    return [TensorType(t[0].dtype, tuple(t[0].shape[p] for p in perm))]


@op("squeeze", "Squeeze", (1, 2))
def _squeeze(xs, attrs):
    if len(xs) > 1:
        return [np.squeeze(xs[0], axis=tuple(int(a) for a in xs[1]))]
    return [np.squeeze(xs[0])]


@_squeeze.infer
def _(t, a, c):
    x = t[0]
    if len(t) > 1:
        if c[1] is None:
            return [TensorType(x.dtype, (dims.UNKNOWN,) * (x.rank - t[1].shape[0]))]
        axes = {_axis(int(i), x.rank) for i in np.asarray(c[1]).reshape(-1)}
    else:
        axes = {i for i, d in enumerate(x.shape) if d == 1}
    return [TensorType(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes))]


@op("unsqueeze", "Unsqueeze", (2, 2))
def _unsqueeze(xs, attrs):
    return [np.expand_dims(xs[0], tuple(int(a) for a in xs[1]))]


@_unsqueeze.infer
def _(t, a, c):
    if c[1] is None:
        raise OpError("unsqueeze needs constant axes")
    x = t[0]
    rank = x.rank + np.asarray(c[1]).size
    axes = sorted(_axis(int(i), rank) for i in np.asarray(c[1]).reshape(-1))
    shape = list(x.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return [TensorType(x.dtype, tuple(shape))]


@op("concat", "Concat", (1, 64))
def _concat(xs, attrs):
    return [np.concatenate(xs, axis=attrs["axis"])]


@_concat.infer
def _(t, a, c):
    rank = t[0].rank
    axis = _axis(a["axis"], rank)
    total: int | str = 0
    shape = list(t[0].shape)
    for ty in t:
        if ty.rank != rank:
            raise OpError(f"concat inputs differ in rank: {t[0]} and {ty}")
        for i in range(rank):
            if i != axis and not dims.compatible(shape[i], ty.shape[i]):
                raise OpError(f"concat inputs differ off the axis: {t[0]} and {ty}")
        total = dims.add(total, ty.shape[axis])
    shape[axis] = total
    return [TensorType(t[0].dtype, tuple(shape))]


@op("gather", "Gather", (2, 2))
def _gather(xs, attrs):
    return [np.take(xs[0], xs[1], axis=attrs.get("axis", 0))]


@_gather.infer
def _(t, a, c):
    data, idx = t
    axis = _axis(a.get("axis", 0), data.rank)
    return [TensorType(data.dtype, data.shape[:axis] + idx.shape + data.shape[axis + 1 :])]


@op("gather_nd", "GatherND", (2, 2))
def _gather_nd(xs, attrs):
    if attrs.get("batch_dims", 0):
        raise OpError("gather_nd with batch_dims is not supported")
    data, idx = xs
    k = idx.shape[-1]
    return [data[tuple(np.moveaxis(idx, -1, 0))] if k else data]


@_gather_nd.infer
def _(t, a, c):
    data, idx = t
    k = idx.shape[-1]
    if not isinstance(k, int):
        raise OpError("gather_nd needs a static last index dim")
    return [TensorType(data.dtype, idx.shape[:-1] + data.shape[k:])]


@op("range", "Range", (3, 3))
def _range(xs, attrs):
    return [np.arange(xs[0], xs[1], xs[2], dtype=xs[0].dtype)]


@_range.infer
def _(t, a, c):
    if all(x is not None for x in c):
        n = len(range(int(c[0]), int(c[1]), int(c[2])))
        return [TensorType(t[0].dtype, (n,))]
    return [TensorType(t[0].dtype, (dims.UNKNOWN,))]


@op("expand", "Expand", (2, 2))
def _expand(xs, attrs):
    shape = [int(d) for d in xs[1]]
    return [xs[0] * np.ones(shape, dtype=xs[0].dtype)]


@_expand.infer
def _(t, a, c):
    if c[1] is None:
        return [TensorType(t[0].dtype, (dims.UNKNOWN,) * t[1].shape[0])]
    return [_bcast(t[0], TensorType(t[0].dtype, tuple(_dims_from_const(c[1]))))]


@op("tile", "Tile", (2, 2))
def _tile(xs, attrs):
    return [np.tile(xs[0], [int(r) for r in xs[1]])]


@_tile.infer
def _(t, a, c):
    if c[1] is None:
        return [TensorType(t[0].dtype, (dims.UNKNOWN,) * t[0].rank)]
    reps = _dims_from_const(c[1])
    return [TensorType(t[0].dtype, tuple(d * r if isinstance(d, int) else (d if r == 1 else dims.UNKNOWN) for d, r in zip(t[0].shape, reps)))]


@op("slice", "Slice", (3, 5))
def _slice(xs, attrs):
    x = xs[0]
    starts, ends = xs[1], xs[2]
    axes = xs[3] if len(xs) > 3 else np.arange(len(starts))
    steps = xs[4] if len(xs) > 4 else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(e), int(st))
    return [x[tuple(index)]]


@_slice.infer
def _(t, a, c):
    x = t[0]
    if any(v is None for v in c[1:]) or not x.is_static:
        return [TensorType(x.dtype, (dims.UNKNOWN,) * x.rank)]
    out = _slice([np.empty(x.shape, dtype=np.bool_), *c[1:]], a)[0]
    return [TensorType(x.dtype, out.shape)]


@op("reduce_mean", "ReduceMean", (1, 2))
def _reduce_mean(xs, attrs):
    axes = tuple(int(a) for a in xs[1]) if len(xs) > 1 else None
    return [np.mean(xs[0], axis=axes, keepdims=bool(attrs.get("keepdims", 1))).astype(xs[0].dtype)]


@_reduce_mean.infer
def _(t, a, c):
    x = t[0]
    if len(t) > 1 and c[1] is None:
        raise OpError("reduce_mean needs constant axes")
    axes = {_axis(int(i), x.rank) for i in np.asarray(c[1]).reshape(-1)} if len(t) > 1 else set(range(x.rank))
    keep = bool(a.get("keepdims", 1))
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
    return [TensorType(x.dtype, shape)]


@op("constant_of_shape", "ConstantOfShape")
def _constant_of_shape(xs, attrs):
    return [np.full([int(d) for d in xs[0]], attrs.get("value", 0.0), dtype=DTYPES[attrs.get("dtype", "f32")])]


@_constant_of_shape.infer
def _(t, a, c):
    shape = tuple(_dims_from_const(c[0])) if c[0] is not None else (dims.UNKNOWN,) * t[0].shape[0]
    return [TensorType(a.get("dtype", "f32"), shape)]


def infer_types(op_name: str, types: list[TensorType], attrs: dict, consts: Consts) -> list[TensorType]:
    if op_name not in OPS:
        raise OpError(f"unknown op {op_name!r}")
    d = OPS[op_name]
    lo, hi = d.arity
    if not lo <= len(types) <= hi:
        raise OpError(f"{op_name} takes {lo}..{hi} inputs, got {len(types)}")
    return d.infer(types, attrs, consts)


from femtocc.ir.qops import qmax  # noqa: E402,F401  (registers the integer ops; qmax is used widely)

ONNX_TO_OP = {d.onnx: name for name, d in OPS.items() if d.onnx}
