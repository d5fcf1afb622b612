"""The integer ops of the quantized IR: their numpy definitions are the exact specification.

Every spu001 program runs these and nothing else on its data path (the reference runtime calls
these functions; the C simulator must match them bit for bit), so each is written with integer
arithmetic only: int64 accumulators, floor division, right shifts that round half up
(``rshift_round(v, s) = (v + 2**(s-1)) >> s``), saturation to the signed range of ``bits``.
Floating point appears only when a pass *builds* constants (scales, multipliers, tables).

Symmetric quantization, zero point 0: a value ``q`` at scale ``s`` means ``q * s``.

* ``quantize`` / ``dequantize``: float <-> integer at the graph boundary (host side).
* ``qdense(x, w, bias, mult, w_scale) {shift, bits}``: ``x @ w + bias`` accumulated exactly, each
  output channel requantized by its own multiplier: ``rshift_round(acc * mult[c], shift)``.
* ``qmatmul(a, b) {mult, shift, bits}``: activation x activation (attention), one multiplier.
* ``qadd(a, b) {mult_a, mult_b, shift, bits}``: ``rshift_round(a * mult_a + b * mult_b, shift)``.
* ``requantize(x) {mult, shift, bits}``: rescale (a multiplication by a constant, a scale change).
* ``qgelu(x, table) {step_bits, bits}``: GELU by a lookup table with linear interpolation over the
  whole input range: ``u = x + 2**(bits-1)``, ``i = u >> step_bits``, the low bits interpolate
  between ``table[i]`` and ``table[i+1]`` (``2**(bits-step_bits) + 1`` int32 entries).
* ``qsoftmax(x, table) {step_bits, bits}`` along the last axis: ``d = max - x``, ``e = exp table
  at d`` (interpolated as above, ``table[j] = round(2**15 * exp(-j * 2**step_bits * scale))``),
  ``p = floor((e * 2**(bits-1) + sum/2) / sum)``; the result has scale ``2**-(bits-1)``.
* ``qlayer_norm(x, gamma, beta) {eps, gamma_shift, bits}`` along the last axis:
  ``mu = floor(sum / n + 1/2)``, ``c = x - mu``, ``v = floor(sum c^2 / n) + eps``; the standard
  deviation in fixed point ``s = isqrt(v << 2f)`` with ``f = max((40 - bit_length(v)) // 2, 0)``
  (about 20 significant bits); ``y = rshift_round(div_round((c * gamma[c]) << f, s), gamma_shift)
  + beta[c]`` where ``gamma = round(gamma_real / y_scale * 2**gamma_shift)``.

The ``*_fake`` functions are the float "fake-quant" forms (dequantize, float op, quantize) that the
integer forms approximate; :data:`FAKE` maps op names to them. Tolerance (tested): at most one
output LSB for the linear ops, two for the table ops.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import special

from femtocc.ir import dims
from femtocc.ir.core import DTYPES, TensorType
from femtocc.ir.ops import OpError, op

STD_BITS = 40  # layer norm: the variance is scaled to 40 bits before its square root


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def qdtype(bits: int) -> str:
    return "i8" if bits <= 8 else "i16"


def rshift_round(v: np.ndarray, shift: int) -> np.ndarray:
    if shift <= 0:
        return v << -shift
    return (v + (1 << (shift - 1))) >> shift


def saturate(v: np.ndarray, bits: int) -> np.ndarray:
    q = qmax(bits)
    return np.clip(v, -q, q).astype(DTYPES[qdtype(bits)])


def bit_length(v: np.ndarray) -> np.ndarray:
    """Bits of positive int64 below 2**53 (exact through float64's exponent)."""
    return np.frexp(v.astype(np.float64))[1].astype(np.int64)


def div_round(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """round(a / b) for b > 0, halves up: floor((2a + b) / 2b)."""
    return (2 * a + b) // (2 * b)


def isqrt(q: np.ndarray) -> np.ndarray:
    """Exact floor(sqrt(q)) of non-negative int64 below 2**52: float estimate, then corrected."""
    r = np.floor(np.sqrt(q.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > q, r - 1, r)
    return np.where((r + 1) * (r + 1) <= q, r + 1, r)


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matmul through float64 (exact while every partial sum stays below 2**53). An operand
    already in float64 (a runtime's cached copy of a constant weight) is used as it is."""
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(np.int64)


def _lut_direct(u: np.ndarray, table: np.ndarray, step_bits: int) -> np.ndarray:
    i = u >> step_bits
    lo = table[i].astype(np.int64)
    if step_bits == 0:
        return lo
    hi = table[i + 1].astype(np.int64)
    return lo + rshift_round((hi - lo) * (u & ((1 << step_bits) - 1)), step_bits)


@functools.lru_cache(maxsize=32)
def _lut_every_position(table: bytes, step_bits: int) -> np.ndarray:
    """The interpolated value at every position the table covers (at most 2**16 + 1 of them)."""
    t = np.frombuffer(table, np.int32)
    n = (len(t) - 1) << step_bits if step_bits else len(t)
    return _lut_direct(np.arange(n, dtype=np.int64), t, step_bits)


def lut_interpolate(u: np.ndarray, table: np.ndarray, step_bits: int) -> np.ndarray:
    """Piecewise-linear table lookup at non-negative integer positions ``u``: the value at
    ``u`` is ``table[i] + round((table[i + 1] - table[i]) * f / 2**step_bits)`` for
    ``u = i * 2**step_bits + f`` (``table[u]`` when ``step_bits`` is 0). Positions outside the table
    are an error. Computed once per table for every position, then gathered."""
    every = _lut_every_position(np.ascontiguousarray(table, np.int32).tobytes(), step_bits)
    if u.size and (int(u.min()) < 0 or int(u.max()) >= len(every)):
        raise ValueError(f"table position {int(u.min()) if int(u.min()) < 0 else int(u.max())} outside the "
                         f"{len(every)} the table covers")
    return every[u]


def _check_int(t: TensorType, what: str, dtypes=("i8", "i16")):
    if t.dtype not in dtypes:
        raise OpError(f"{what} must be {'/'.join(dtypes)}, got {t}")


def _int_out(t, a, shape=None):
    return [TensorType(qdtype(a["bits"]), shape if shape is not None else t[0].shape)]


# ----------------------------------------------------------------------------- boundary


@op("quantize", None)
def _quantize(xs, attrs):
    q = np.clip(np.rint(xs[0] / np.float32(attrs["scale"])), -qmax(attrs["bits"]), qmax(attrs["bits"]))
    return [q.astype(DTYPES[qdtype(attrs["bits"])])]


_quantize.infer(lambda t, a, c: _int_out(t, a))


@op("dequantize", None)
def _dequantize(xs, attrs):
    return [(xs[0].astype(np.float32) * np.float32(attrs["scale"])).astype(np.float32)]


_dequantize.infer(lambda t, a, c: [TensorType("f32", t[0].shape)])


# ----------------------------------------------------------------------------- linear


BLOCK = 1 << 16  # int64 intermediates are made this many elements at a time, so they stay in the cache


def _row_blocks(rows: int, row_elements: int, least: int = 1):
    """[start, stop) blocks of rows holding about BLOCK elements each (at least ``least`` rows)."""
    step = max(least, BLOCK // max(row_elements, 1))
    return ((r, min(r + step, rows)) for r in range(0, rows, step))


@op("qdense", None, (5, 5))
def _qdense(xs, attrs):
    x, w, bias, mult, _ = xs
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], w.shape[1]), DTYPES[qdtype(attrs["bits"])])
    for a, b in _row_blocks(x2.shape[0], w.shape[1], least=64):  # rows are independent
        acc = exact_matmul(x2[a:b], w) + bias
        out[a:b] = saturate(rshift_round(acc * mult, attrs["shift"]), attrs["bits"])
    return [out.reshape(*x.shape[:-1], w.shape[1])]


@_qdense.infer
def _(t, a, c):
    x, w, b, m, s = t
    if w.rank != 2 or not dims.compatible(x.shape[-1], w.shape[0]):
        raise OpError(f"qdense input {x} does not match weight {w} ([in, out])")
    if x.dtype not in ("i8", "i16") or w.dtype != "i8" or b.dtype != "i64" or m.dtype != "i64" or s.dtype != "f32":
        raise OpError(f"qdense takes i8/i16 input, i8 weight, i64 bias and multiplier, f32 weight scales; got {x}, {w}, {b}, {m}, {s}")
    return _int_out(t, a, (*x.shape[:-1], w.shape[1]))


@op("qmatmul", None, (2, 2))
def _qmatmul(xs, attrs):
    a, b = xs
    if a.ndim < 2 or b.ndim < 2:
        return [saturate(rshift_round(exact_matmul(a, b) * attrs["mult"], attrs["shift"]), attrs["bits"])]
    m, n = a.shape[-2], b.shape[-1]
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = np.empty((*batch, m, n), DTYPES[qdtype(attrs["bits"])])
    for r0, r1 in _row_blocks(m, n * max(int(np.prod(batch)), 1), least=16):  # rows of a are independent
        acc = exact_matmul(a[..., r0:r1, :], b)
        out[..., r0:r1, :] = saturate(rshift_round(acc * attrs["mult"], attrs["shift"]), attrs["bits"])
    return [out]


@_qmatmul.infer
def _(t, a, c):
    from femtocc.ir.ops import OPS

    _check_int(t[0], "qmatmul operand")
    _check_int(t[1], "qmatmul operand")
    out = OPS["matmul"].infer(t, a, c)[0]
    return _int_out(t, a, out.shape)


@op("qadd", None, (2, 2))
def _qadd(xs, attrs):
    a, b = (x.astype(np.int64) for x in xs)
    return [saturate(rshift_round(a * attrs["mult_a"] + b * attrs["mult_b"], attrs["shift"]), attrs["bits"])]


@_qadd.infer
def _(t, a, c):
    from femtocc.ir.ops import OPS

    _check_int(t[0], "qadd operand")
    _check_int(t[1], "qadd operand")
    return _int_out(t, a, OPS["add"].infer(t, a, c)[0].shape)


@op("requantize", None)
def _requantize(xs, attrs):
    return [saturate(rshift_round(xs[0].astype(np.int64) * attrs["mult"], attrs["shift"]), attrs["bits"])]


@_requantize.infer
def _(t, a, c):
    _check_int(t[0], "requantize input")
    return _int_out(t, a)


# ----------------------------------------------------------------------------- tables


@op("qgelu", None, (2, 2))
def _qgelu(xs, attrs):
    x, table = xs
    u = x.astype(np.int64) + (1 << (attrs["bits"] - 1))
    return [saturate(lut_interpolate(u, table, attrs["step_bits"]), attrs["bits"])]


def _table_infer(t, a, c, entries: int, what: str):
    _check_int(t[0], f"{what} input")
    if t[1].dtype != "i32" or t[1].shape != (entries,):
        raise OpError(f"{what} table must be i32[{entries}] for bits={a['bits']}, step-bits={a['step_bits']}, got {t[1]}")


@_qgelu.infer
def _(t, a, c):
    _table_infer(t, a, c, (1 << (a["bits"] - a["step_bits"])) + 1, "qgelu")
    return _int_out(t, a)


def softmax_table_entries(input_bits: int, step_bits: int) -> int:
    return (1 << (input_bits - step_bits)) + 1  # d = max - x spans [0, 2**input_bits - 2]


@op("qsoftmax", None, (2, 2))
def _qsoftmax(xs, attrs):
    x, table = xs
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    out = np.empty(rows.shape, DTYPES[qdtype(attrs["bits"])])
    for a, b in _row_blocks(rows.shape[0], rows.shape[1]):  # each row on its own
        xi = rows[a:b].astype(np.int32)
        d = xi.max(axis=-1, keepdims=True) - xi
        e = lut_interpolate(d, table, attrs["step_bits"])
        total = e.sum(axis=-1, keepdims=True)
        p = (e * (1 << (attrs["bits"] - 1)) + total // 2) // total
        out[a:b] = saturate(p, attrs["bits"])
    return [out.reshape(x.shape)]


@_qsoftmax.infer
def _(t, a, c):
    bits_in = 8 if t[0].dtype == "i8" else 16
    _table_infer(t, a, c, softmax_table_entries(bits_in, a["step_bits"]), "qsoftmax")
    return _int_out(t, a)


@op("qlayer_norm", None, (3, 3))
def _qlayer_norm(xs, attrs):
    x, gamma, beta = (v.astype(np.int64) for v in xs)
    n = x.shape[-1]
    mu = (2 * x.sum(axis=-1, keepdims=True) + n) // (2 * n)
    c = x - mu
    var = (c * c).sum(axis=-1, keepdims=True) // n + attrs["eps"]
    # std in fixed point with ~20 significant bits: var << 2f lies in [2**38, 2**40)
    f = np.maximum((STD_BITS - bit_length(var)) // 2, 0)
    std = isqrt(var << (2 * f))
    y = rshift_round(div_round((c * gamma) << f, std), attrs["gamma_shift"]) + beta
    return [saturate(y, attrs["bits"])]


@_qlayer_norm.infer
def _(t, a, c):
    _check_int(t[0], "qlayer_norm input")
    for v, what in ((t[1], "gamma"), (t[2], "beta")):
        if v.dtype != "i32" or v.rank != 1 or not dims.compatible(v.shape[0], t[0].shape[-1]):
            raise OpError(f"qlayer_norm {what} must be i32[{t[0].shape[-1]}], got {v}")
    return _int_out(t, a)


# ----------------------------------------------------------------------------- fake quant


def _deq(q, scale):
    return q.astype(np.float32) * np.float32(scale)


def _quant(y, scale, bits):
    return saturate(np.rint(np.asarray(y, np.float64) / scale), bits)


def qdense_fake(xs, attrs):
    x, w, bias, _, w_scale = xs
    sx = np.float32(attrs["x_scale"])
    y = np.matmul(_deq(x, sx), w.astype(np.float32) * w_scale[None, :]) + bias.astype(np.float32) * sx * w_scale
    return [_quant(y, attrs["y_scale"], attrs["bits"])]


def qmatmul_fake(xs, attrs):
    y = np.matmul(_deq(xs[0], attrs["a_scale"]), _deq(xs[1], attrs["b_scale"]))
    return [_quant(y, attrs["y_scale"], attrs["bits"])]


def qadd_fake(xs, attrs):
    y = _deq(xs[0], attrs["a_scale"]) + _deq(xs[1], attrs["b_scale"])
    return [_quant(y, attrs["y_scale"], attrs["bits"])]


def requantize_fake(xs, attrs):
    return [_quant(_deq(xs[0], attrs["x_scale"]) * np.float32(attrs["factor"]), attrs["y_scale"], attrs["bits"])]


def qgelu_fake(xs, attrs):
    x = _deq(xs[0], attrs["x_scale"]).astype(np.float64)
    return [_quant(0.5 * x * (1 + special.erf(x / np.sqrt(2.0))), attrs["y_scale"], attrs["bits"])]


def qsoftmax_fake(xs, attrs):
    x = _deq(xs[0], attrs["x_scale"]).astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return [_quant(e / e.sum(axis=-1, keepdims=True), 2.0 ** -(attrs["bits"] - 1), attrs["bits"])]


def qlayer_norm_fake(xs, attrs):
    """Float layer norm with the quantized gamma and beta (as qdense_fake uses quantized weights)."""
    sx, sy = attrs["x_scale"], attrs["y_scale"]
    x = _deq(xs[0], sx).astype(np.float64)
    gamma = xs[1].astype(np.float64) * sy / 2.0 ** attrs["gamma_shift"]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + attrs["eps"] * sx * sx) * gamma + xs[2].astype(np.float64) * sy
    return [_quant(y, sy, attrs["bits"])]


FAKE = {
    "qdense": qdense_fake, "qmatmul": qmatmul_fake, "qadd": qadd_fake, "requantize": requantize_fake,
    "qgelu": qgelu_fake, "qsoftmax": qsoftmax_fake, "qlayer_norm": qlayer_norm_fake,
}


@op("qgather", None, (3, 3))
def _qgather(xs, attrs):
    """Columns of an int8 ``[dim, rows]`` table with per-column scales, requantized to one activation
    scale: ``y[..., :] = rshift_round(table[:, i] * mult[i], shift)``. The layout is the one of a
    ``qdense`` weight, so a token embedding tied to the output projection is stored once."""
    table, mult, ids = xs
    rows = table.T[ids].astype(np.int64)
    return [saturate(rshift_round(rows * mult[ids][..., None], attrs["shift"]), attrs["bits"])]


@_qgather.infer
def _(t, a, c):
    table, mult, ids = t
    if table.dtype != "i8" or table.rank != 2 or mult.dtype != "i64" or mult.shape != table.shape[1:]:
        raise OpError(f"qgather takes an i8 [dim, rows] table and i64 [rows] multipliers, got {table}, {mult}")
    if ids.dtype not in ("i64", "i32"):
        raise OpError(f"qgather indices must be integers, got {ids}")
    return _int_out(t, a, (*ids.shape, table.shape[0]))
