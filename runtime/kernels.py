"""Fast exact forms of the integer ops the reference runtime spends its time in.

Each ``fast_<op>(args, attrs)`` returns exactly what ``femtocc.ir.qops``'s definition of the op
returns (that module stays the specification; ``tests/test_kernels.py`` checks the two against
each other), only faster:

* ``qdense`` (activations x int8 weights) runs as one int8 x int8 -> int32 matrix product
  (``torch._int_mm``: oneDNN, VNNI/AMX where the CPU has them). An int16 activation is split into
  two int8 *digits*, ``x = 256 * hi + lo + 128`` with ``hi = x >> 8`` and ``lo = (x & 255) - 128``,
  stacked along the rows; the int32 partial sums are exact for inner sizes up to 2**16;
* ``qmatmul`` (activation x activation, attention) runs as a float64 product, exact because every
  partial sum stays below 2**53 (four digit products would cost more than the one float64 product
  at attention's inner size of 64);
* the digits' recombination, the bias, the requantization and saturation, and the table ops
  (GELU, softmax, layer norm) run in one pass each in the C kernels of ``_refkern``
  (``runtime/kernels/ref_kernels.c``), which share no code with the simulator.

Anything outside what the fast forms cover (other dtypes, an inner size beyond 2**16, a table
position out of range, a softmax row that sums to zero) is handed to the specification itself,
so results and error messages are the specification's in every case.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from femtocc.ir import qops
from femtocc.ir.ops import OPS

# int32 partial sums are exact while 255 * 128 * K < 2**31, even where the library computes s8 x s8
# as u8 x s8 plus a compensation (VNNI): inner sizes up to 2**16
MAX_INNER = 1 << 16
FEW_ROWS = 8  # qdense and qmatmul with at most this many rows (a decoding step) take the one-pass C product

try:
    import torch

    from femtocc.runtime import extension

    _refkern = extension("_refkern", "FEMTOCC_REFKERN")  # CI points it at the sanitizer build
except ImportError:  # pragma: no cover - the extension is part of the package build
    _refkern = None


def _int_mm_works() -> bool:
    """Whether this torch build has a CPU int8 matrix product (x86 builds do; others may not)."""
    try:
        a = torch.ones((2, 8), dtype=torch.int8)
        return bool((torch._int_mm(a, a.t().contiguous()) == 8).all())
    except (AttributeError, RuntimeError, NotImplementedError):  # pragma: no cover - platform dependent
        return False


INT_MM = _refkern is not None and _int_mm_works()


class Weight:
    """A constant int8 weight [K, N] ready for ``torch._int_mm``, with its column sums."""

    def __init__(self, w: np.ndarray):
        self.matrix = torch.from_numpy(np.array(w, np.int8, copy=True))
        self.sums = w.sum(axis=0, dtype=np.int64)


def supported(*xs: np.ndarray, shift: int = 1) -> bool:
    return _refkern is not None and 1 <= shift <= 62 and all(x.dtype in (np.int8, np.int16) for x in xs)


def fast_qdense(xs, attrs, weight: Weight | None = None):
    """``weight``: the weight's :class:`Weight`, when the caller prepared it once (a constant).
    Rows go a block at a time through one reused int32 buffer (a fresh product of every row at once
    costs more in page faults than in arithmetic)."""
    x, w, bias, mult, _ = xs
    if not INT_MM or not supported(x, shift=attrs["shift"]) or w.dtype != np.int8 or w.ndim != 2 or w.shape[0] > MAX_INNER:
        return OPS["qdense"].run(xs, attrs)
    weight = weight or Weight(w)
    K, N = w.shape
    x2 = x.reshape(-1, K)
    M, digits = len(x2), 1 if x.dtype == np.int8 else 2
    out = np.empty((M, N), qops.DTYPES[qops.qdtype(attrs["bits"])])
    mult = np.ascontiguousarray(mult, np.int64).reshape(-1)
    if M <= FEW_ROWS:  # a decoding step: one pass in C over the weight
        bias, x2, w = np.ascontiguousarray(np.broadcast_to(bias, (N,)), np.int64), np.ascontiguousarray(x2), weight.matrix.numpy()
        in_parallel(N, lambda n0, n1: _refkern.matmul(x2, w, 1, 1, M, K, N, bias, mult, attrs["shift"], attrs["bits"], out, n0, n1),
                    least=1 << 22, elements_per_row=M * K)  # threads pay only for the vocabulary projection
        return [out.reshape(*x.shape[:-1], N)]
    offset = 128 if digits == 2 else 0
    col = np.ascontiguousarray(offset * weight.sums + bias, np.int64)
    rows = max(1, min(M, (1 << 19) // max(digits * N, 1)))  # a 2-MiB block of int32 products
    R = torch.empty((digits * rows, N), dtype=torch.int32)
    zero = np.zeros(rows, np.int64)
    for r0 in range(0, M, rows):
        xb = x2[r0:r0 + rows]
        n = len(xb)
        a = np.concatenate([(xb >> 8).astype(np.int8), ((xb & 255) - 128).astype(np.int8)]) if digits == 2 else xb.copy()
        torch._int_mm(torch.from_numpy(a), weight.matrix, out=R[:digits * n])
        _refkern.requant(R[:digits * n].numpy(), digits, n, N, zero[:n], col, mult, attrs["shift"], attrs["bits"], out[r0:r0 + n])
    return [out.reshape(*x.shape[:-1], N)]


def fast_qmatmul(xs, attrs):
    """Activation x activation: float64 products (exact: |a|, |b| < 2**15 and an inner size below
    2**22 keep every partial sum below 2**53), a block of rows at a time into one reused buffer so
    that the products stay in cache for the fused requantization."""
    a, b = xs
    if not supported(a, b, shift=attrs["shift"]) or a.ndim < 2 or b.ndim < 2 or a.shape[-1] >= 1 << 22:
        return OPS["qmatmul"].run(xs, attrs)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, N = a.shape[-2], b.shape[-1]
    if M <= FEW_ROWS:  # a decoding step's few rows: one pass in C
        K = a.shape[-1]
        a3 = np.ascontiguousarray(np.broadcast_to(a, (*batch, M, K))).reshape(-1, M, K)
        shared = math.prod(b.shape[:-2]) == 1  # one b for every batch entry: no copies of it
        b3 = np.ascontiguousarray(b).reshape(1, K, N) if shared else \
            np.ascontiguousarray(np.broadcast_to(b, (*batch, K, N))).reshape(-1, K, N)
        out = np.empty((len(a3), M, N), qops.DTYPES[qops.qdtype(attrs["bits"])])
        _refkern.matmul(a3, b3, len(a3), len(b3), M, K, N, np.zeros(N, np.int64), np.array([attrs["mult"]], np.int64),
                        attrs["shift"], attrs["bits"], out, 0, N)
        return [out.reshape(*batch, M, N)]
    a = np.broadcast_to(a, (*batch, *a.shape[-2:])).reshape(-1, *a.shape[-2:])
    b = torch.from_numpy(np.broadcast_to(b, (*batch, *b.shape[-2:])).reshape(-1, *b.shape[-2:]).astype(np.float64))
    out = np.empty((len(a), M, N), qops.DTYPES[qops.qdtype(attrs["bits"])])
    rows = max(1, min(M, (1 << 18) // max(N, 1)))  # a 2-MiB block of float64 products
    acc = np.empty((rows, N))
    zero, mult = np.zeros(max(rows, N), np.int64), np.array([attrs["mult"]], np.int64)
    for h in range(len(a)):
        for r0 in range(0, M, rows):
            n = min(rows, M - r0)
            torch.mm(torch.from_numpy(a[h, r0:r0 + n].astype(np.float64)), b[h], out=torch.from_numpy(acc[:n]))
            _refkern.requant(acc[:n], 1, n, N, zero[:n], zero[:N], mult, attrs["shift"], attrs["bits"], out[h, r0:r0 + n])
    return [out.reshape(*batch, M, N)]


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


def in_parallel(rows: int, run, least: int = 1 << 16, elements_per_row: int = 1) -> list:
    """``run(r0, r1)`` over ``[0, rows)``, split into one range per torch thread when the work is
    large enough to pay for it (the C kernels release the GIL); the results in range order."""
    global _POOL
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or rows * elements_per_row < least:
        return [run(0, rows)]
    if _POOL is None or _POOL[0] < threads:
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="femtocc-ref"))
    step = -(-rows // threads)
    return list(_POOL[1].map(lambda r0: run(r0, min(r0 + step, rows)), range(0, rows, step)))


def _every(table: np.ndarray, step_bits: int) -> np.ndarray:
    """The table's value at every position, as int32 (an interpolated value lies between two int32 entries)."""
    return _every_int32(np.ascontiguousarray(table, np.int32).tobytes(), step_bits)


@functools.lru_cache(maxsize=32)
def _every_int32(table: bytes, step_bits: int) -> np.ndarray:
    return qops._lut_every_position(table, step_bits).astype(np.int32)


def _out(x: np.ndarray, bits: int) -> np.ndarray:
    return np.empty(x.shape, qops.DTYPES[qops.qdtype(bits)])


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _table_op(op: str, xs, attrs, kernel, *extra):
    """A table op (``qgelu``, ``qsoftmax``) through ``kernel(rows, *extra, every, bits, out)``, which
    returns -1 when every row is done; anything else hands the op to the specification (a position
    outside the table, for its error; a softmax row that the kernel leaves to numpy)."""
    x, table = xs
    if not supported(x) or x.size == 0 or x.ndim == 0:
        return OPS[op].run(xs, attrs)
    out, x2, every = _out(x, attrs["bits"]), _rows(x), _every(table, attrs["step_bits"])
    o2 = out.reshape(x2.shape)
    run = lambda r0, r1: kernel(x2[r0:r1], *extra, every, attrs["bits"], o2[r0:r1])  # noqa: E731
    if any(s != -1 for s in in_parallel(len(x2), run, elements_per_row=x2.shape[1])):
        return OPS[op].run(xs, attrs)
    return [out]


def fast_qgelu(xs, attrs):
    return _table_op("qgelu", xs, attrs, lambda x, every, bits, out: _refkern.lut(x, every, 1 << (bits - 1), bits, out))


def fast_qsoftmax(xs, attrs):
    return _table_op("qsoftmax", xs, attrs, _refkern.softmax, xs[0].shape[-1] if xs[0].ndim else 0)


def fast_qlayer_norm(xs, attrs):
    x, gamma, beta = xs
    if not supported(x) or x.size == 0 or x.ndim == 0:
        return OPS["qlayer_norm"].run(xs, attrs)
    out, x2 = _out(x, attrs["bits"]), _rows(x)
    o2 = out.reshape(x2.shape)
    g, b = (np.ascontiguousarray(np.broadcast_to(v, x.shape[-1:]), np.int64) for v in (gamma, beta))
    run = lambda r0, r1: _refkern.layer_norm(x2[r0:r1], x2.shape[1], g, b, attrs["eps"], attrs["gamma_shift"],
                                             attrs["bits"], o2[r0:r1])
    if any(s != 0 for s in in_parallel(len(x2), run, elements_per_row=x2.shape[1])):
        return OPS["qlayer_norm"].run(xs, attrs)
    return [out]


def fast_qadd(xs, attrs):
    a, b = xs
    if not supported(a, b, shift=attrs["shift"]) or a.shape != b.shape or a.dtype != b.dtype or a.size == 0 or a.ndim == 0:
        return OPS["qadd"].run(xs, attrs)
    out, a2, b2 = _out(a, attrs["bits"]), _rows(a), _rows(b)
    o2 = out.reshape(a2.shape)
    in_parallel(len(a2), lambda r0, r1: _refkern.add(a2[r0:r1], b2[r0:r1], attrs["mult_a"], attrs["mult_b"],
                                                     attrs["shift"], attrs["bits"], o2[r0:r1]),
                elements_per_row=a2.shape[1])
    return [out]


FAST = {"qdense": fast_qdense, "qmatmul": fast_qmatmul, "qgelu": fast_qgelu, "qsoftmax": fast_qsoftmax,
        "qlayer_norm": fast_qlayer_norm, "qadd": fast_qadd}
