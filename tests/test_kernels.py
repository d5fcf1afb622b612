"""The reference runtime's fast kernels compute exactly what the specification (femtocc.ir.qops) computes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femtocc.ir.ops import OPS
from femtocc.runtime import kernels
from femtocc.runtime.program import Program
from femtocc.runtime.reference import ReferenceRuntime

rng = np.random.default_rng(11)
I16, I8 = np.iinfo(np.int16).max, np.iinfo(np.int8).max


def ints(shape, dtype=np.int16, low=None, high=None, seed=0):
    r = np.random.default_rng(seed)
    q = np.iinfo(dtype).max
    return r.integers(-q if low is None else low, (q if high is None else high) + 1, shape).astype(dtype)


def same(op, fast, xs, attrs, **kw):
    want = OPS[op].run(xs, attrs)[0]
    got = fast(xs, attrs, **kw)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    return got


def exp_table(step, bits_in=16, rate=5e-4):
    n = (1 << (bits_in - step)) + 1
    return np.round(2 ** 15 * np.exp(-np.arange(n) * (1 << step) * rate)).astype(np.int32)


@pytest.mark.parametrize("dtype, bits, shift", [(np.int16, 16, 33), (np.int8, 8, 20), (np.int16, 8, 1), (np.int8, 16, 62)])
@pytest.mark.parametrize("shape", [(1, 700, 96), (3, 5, 96), (96,), (0, 96)])
def test_qdense(dtype, bits, shift, shape):
    x = ints(shape, dtype, seed=1)
    x.flat[:3] = [np.iinfo(dtype).max, -np.iinfo(dtype).max, 0][: x.size]  # the extremes
    w = ints((96, 40), np.int8, -127, 127, seed=2)
    bias = rng.integers(-2 ** 40, 2 ** 40, 40)
    mult = rng.integers(1, 2 ** 22, 40)
    args = [x, w, bias, mult, np.ones(40, np.float32)]
    same("qdense", kernels.fast_qdense, args, {"shift": shift, "bits": bits})
    same("qdense", kernels.fast_qdense, args, {"shift": shift, "bits": bits}, weight=kernels.Weight(w))


@pytest.mark.parametrize("k", [5120, kernels.MAX_INNER])
def test_qdense_extremes_at_large_inner_sizes(k):
    """Every product at its largest, of one sign and of both: the int32 partial sums stay exact."""
    w = np.full((k, 16), -127, np.int8)
    w[:, 8:] = 127
    for value in (-I16, I16):
        x = np.full((2, k), value, np.int16)
        x[1, ::2] = -value
        same("qdense", kernels.fast_qdense, [x, w, np.zeros(16, np.int64), np.ones(16, np.int64), None], {"shift": 20, "bits": 16})


def test_qdense_wraps_like_numpy_int64():
    """A hostile multiplier overflows int64: the kernel wraps exactly as numpy's int64 does."""
    x, w = ints((4, 64), seed=3), ints((64, 8), np.int8, seed=4)
    same("qdense", kernels.fast_qdense, [x, w, np.zeros(8, np.int64), np.full(8, 2 ** 40), None], {"shift": 2, "bits": 16})


@pytest.mark.parametrize("a_shape, b_shape", [((2, 6, 150, 64), (2, 6, 64, 130)), ((1, 6, 200, 200), (6, 200, 64)),
                                              ((1, 6, 1, 64), (1, 6, 64, 20)), ((300, 64), (64, 300))])
def test_qmatmul(a_shape, b_shape):
    a, b = ints(a_shape, seed=5), ints(b_shape, seed=6)
    a.flat[0], b.flat[0] = I16, -I16
    for mult, shift in ((6129363, 39), (534326, 34), (3, 1)):
        same("qmatmul", kernels.fast_qmatmul, [a, b], {"mult": mult, "shift": shift, "bits": 16})
    same("qmatmul", kernels.fast_qmatmul, [a.astype(np.int8), b.astype(np.int8)], {"mult": 77, "shift": 9, "bits": 8})


@pytest.mark.parametrize("a_dtype, b_dtype", [(np.int16, np.int16), (np.int8, np.int16), (np.int16, np.int8), (np.int8, np.int8)])
@pytest.mark.parametrize("a_shape, b_shape", [((1, 6, 1, 64), (1, 6, 64, 1500)), ((1, 6, 3, 1500), (1, 6, 1500, 64)),
                                              ((6, 2, 64), (64, 700)), ((1, 2, 40), (3, 40, 9)), ((8, 5), (5, 0))])
def test_qmatmul_few_rows(a_dtype, b_dtype, a_shape, b_shape):
    """A decoding step's product (one pass in C), every dtype pair and broadcast; the most negative int16
    at both sides: two such products overflow int32, each goes to int64."""
    a, b = ints(a_shape, a_dtype, seed=20), ints(b_shape, b_dtype, seed=21)
    a.flat[:2], b.flat[:2] = np.iinfo(a_dtype).min, np.iinfo(b_dtype).min
    for mult, shift in ((6129363, 39), (2 ** 40, 3), (1, 1)):
        same("qmatmul", kernels.fast_qmatmul, [a, b], {"mult": mult, "shift": shift, "bits": 16})
    same("qmatmul", kernels.fast_qmatmul, [np.full((1, 64), -32768, np.int16), np.full((64, 16), -32768, np.int16)],
         {"mult": 1, "shift": 30, "bits": 16})


@pytest.mark.parametrize("x_dtype, k", [(np.int16, 5000), (np.int8, 70000), (np.int16, 7)])
def test_qdense_few_rows_at_the_extremes(x_dtype, k):
    """Few rows (one pass in C): int32 runs of products at their largest, flushed to int64 exactly."""
    lo = np.iinfo(x_dtype).min
    w = np.full((k, 24), -128, np.int8)
    w[:, 12:] = 127
    for rows in (1, 3, kernels.FEW_ROWS):
        x = np.full((rows, k), lo, x_dtype)
        x[-1, ::2] = np.iinfo(x_dtype).max
        mult = rng.integers(-2 ** 20, 2 ** 20, 24)
        same("qdense", kernels.fast_qdense, [x, w, rng.integers(-2 ** 40, 2 ** 40, 24), mult, None], {"shift": 30, "bits": 16})
        same("qdense", kernels.fast_qdense, [x, w, np.int64(5), np.int64(3), None], {"shift": 40, "bits": 8})


def test_qdense_few_rows_split_over_threads():
    """A vocabulary-sized projection of one row: its columns are shared out to the threads."""
    x, w = ints((1, 1, 384), seed=22), ints((384, 12000), np.int8, seed=23)
    args = [x, w, rng.integers(-2 ** 30, 2 ** 30, 12000), rng.integers(1, 2 ** 22, 12000), None]
    same("qdense", kernels.fast_qdense, args, {"shift": 30, "bits": 16}, weight=kernels.Weight(w))


@pytest.mark.parametrize("step, bits", [(6, 16), (0, 8), (3, 16)])
def test_qsoftmax(step, bits):
    dtype = np.int16 if step else np.int8
    x = np.clip(np.random.default_rng(8).normal(0, 3000 if step else 30, (2, 3, 90, 257)), -I16, I16).astype(dtype)
    x[0, 0, 0, :] = x[0, 0, 0, 0]  # a flat row
    same("qsoftmax", kernels.fast_qsoftmax, [x, exp_table(step, 16 if step else 8, 5e-4 if step else 0.05)],
         {"step_bits": step, "bits": bits})


def test_qsoftmax_edge_rows_take_the_specification():
    for n in (1 << 20, (1 << 20) + 8):  # row sums just below 2**51 (the C kernel's limit) and above it (numpy)
        x = np.full((1, n), 7, np.int16)
        same("qsoftmax", kernels.fast_qsoftmax, [x, np.full(1025, 2 ** 31 - 1, np.int32)], {"step_bits": 6, "bits": 16})
    x = ints((4, 300), seed=9)
    zeros = np.zeros_like(exp_table(6))
    with np.errstate(divide="ignore"):  # numpy's floor division by a zero sum gives 0
        same("qsoftmax", kernels.fast_qsoftmax, [x, zeros], {"step_bits": 6, "bits": 16})  # every row sums to zero
    negative = exp_table(6) - 1000
    same("qsoftmax", kernels.fast_qsoftmax, [x, negative], {"step_bits": 6, "bits": 16})
    short = exp_table(6)[:100]  # positions outside the table: the specification's own error
    with pytest.raises(ValueError) as spec:
        OPS["qsoftmax"].run([x, short], {"step_bits": 6, "bits": 16})
    with pytest.raises(ValueError) as fast:
        kernels.fast_qsoftmax([x, short], {"step_bits": 6, "bits": 16})
    assert str(fast.value) == str(spec.value)


@pytest.mark.parametrize("dtype, bits, step", [(np.int16, 16, 6), (np.int8, 8, 0), (np.int8, 8, 2)])
def test_qgelu(dtype, bits, step):
    n = (1 << (bits - step)) + 1
    table = np.round(np.tanh(np.linspace(-3, 3, n)) * 20000).astype(np.int32)
    x = ints((3, 700, 64), dtype, seed=10)
    same("qgelu", kernels.fast_qgelu, [x, table], {"step_bits": step, "bits": bits})
    with pytest.raises(ValueError):
        kernels.fast_qgelu([x, table[:5]], {"step_bits": step, "bits": bits})


@pytest.mark.parametrize("dtype, bits, scale", [(np.int16, 16, 3000), (np.int8, 8, 40), (np.int16, 8, 1)])
def test_qlayer_norm(dtype, bits, scale):
    x = np.clip(np.random.default_rng(12).normal(0, scale, (2, 500, 384)), -np.iinfo(dtype).max, np.iinfo(dtype).max).astype(dtype)
    x[0, 0, :] = 5  # a constant row: variance is eps alone
    gamma = rng.integers(-2 ** 14, 2 ** 14, 384).astype(np.int32)
    beta = rng.integers(-2 ** 10, 2 ** 10, 384).astype(np.int32)
    for eps, shift in ((3, 14), (1, 0), (1 << 30, 20)):
        same("qlayer_norm", kernels.fast_qlayer_norm, [x, gamma, beta], {"eps": eps, "gamma_shift": shift, "bits": bits})
    big = np.full(384, 2 ** 26, np.int32)  # beyond what the kernel takes: the specification runs it
    same("qlayer_norm", kernels.fast_qlayer_norm, [x, big, beta], {"eps": 3, "gamma_shift": 14, "bits": bits})


def test_qadd():
    a, b = ints((1, 1500, 384), seed=13), ints((1, 1500, 384), seed=14)
    for attrs in ({"mult_a": 12345, "mult_b": -23456, "shift": 14, "bits": 16}, {"mult_a": 1, "mult_b": 1, "shift": 0, "bits": 8}):
        same("qadd", kernels.fast_qadd, [a, b], attrs)
    same("qadd", kernels.fast_qadd, [a, b[0, :1]], {"mult_a": 3, "mult_b": 5, "shift": 2, "bits": 16})  # broadcast


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 70), st.integers(1, 62), st.sampled_from([8, 16]),
       st.integers(0, 2 ** 31))
def test_qdense_any_shape(m, k, n, shift, bits, seed):
    r = np.random.default_rng(seed)
    x = r.integers(-I16, I16 + 1, (m, k)).astype(np.int16)
    w = r.integers(-I8, I8 + 1, (k, n)).astype(np.int8)
    args = [x, w, r.integers(-2 ** 30, 2 ** 30, n), r.integers(-2 ** 24, 2 ** 24, n), None]
    same("qdense", kernels.fast_qdense, args, {"shift": shift, "bits": bits})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 200), st.integers(2, 12), st.integers(0, 2 ** 31))
def test_qsoftmax_any_rows(rows, n, step, seed):
    x = np.random.default_rng(seed).integers(-I16, I16 + 1, (rows, n)).astype(np.int16)
    same("qsoftmax", kernels.fast_qsoftmax, [x, exp_table(step, rate=2e-5)], {"step_bits": step, "bits": 16})


def test_reference_runtime_fast_equals_spec(tmp_path):
    """A compiled block (layer norm, pencil-sparse dense, GELU, attention over 300 rows) on both paths."""
    from test_program import compiled

    for kw in ({}, {"weight_bits": 4, "act_bits": 8}):
        _, _, data = compiled(tmp_path, **kw)
        prog = Program.from_bytes(data)
        x = ints((1, 300, 32), np.int16 if not kw else np.int8, seed=15)
        fast, spec = ReferenceRuntime(prog).run({"x": x}), ReferenceRuntime(prog, kernels="spec").run({"x": x})
        assert np.array_equal(fast["out"], spec["out"])
    with pytest.raises(ValueError, match="kernels must be"):
        ReferenceRuntime(prog, kernels="turbo")


def test_kernel_arguments_are_checked():
    """The C entry points refuse mismatched buffers with an error, never a crash."""
    from femtocc.runtime import _refkern

    out = np.empty(10, np.int16)
    with pytest.raises(ValueError, match="output length"):
        _refkern.lut(np.zeros(11, np.int16), np.zeros(5, np.int64), 0, 16, out)
    with pytest.raises(ValueError, match="R must be"):
        _refkern.requant(np.zeros(7, np.int32), 2, 2, 2, np.zeros(2, np.int64), np.zeros(2, np.int64),
                         np.ones(1, np.int64), 3, 16, np.empty(4, np.int16))
    with pytest.raises(ValueError, match="shift"):
        _refkern.add(out, out, 1, 1, 0, 16, np.empty(10, np.int16))
    with pytest.raises(ValueError, match="rows must be whole"):
        _refkern.softmax(np.zeros(10, np.int16), 3, np.zeros(5, np.int64), 16, out)
    with pytest.raises(TypeError):
        _refkern.layer_norm(b"abc", 1, None, None, 0, 0, 16, out)
    a, b, zeros, one = np.zeros((2, 3), np.int16), np.zeros((3, 4), np.int8), np.zeros(4, np.int64), np.ones(1, np.int64)
    with pytest.raises(ValueError, match="a must be"):
        _refkern.matmul(a, b, 1, 1, 2, 4, 4, zeros, one, 3, 16, np.empty(8, np.int16), 0, 4)
    with pytest.raises(ValueError, match="column range"):
        _refkern.matmul(a, b, 1, 1, 2, 3, 4, zeros, one, 3, 16, np.empty(8, np.int16), 2, 5)
    with pytest.raises(ValueError, match="out must"):
        _refkern.matmul(a, b, 1, 1, 2, 3, 4, zeros, one, 3, 16, np.empty(7, np.int16), 0, 4)
    with pytest.raises(ValueError, match="int8 or int16"):
        _refkern.matmul(a.astype(np.int32), b, 1, 1, 2, 3, 4, zeros, one, 3, 16, np.empty(8, np.int16), 0, 4)


def test_the_fast_paths_are_taken(monkeypatch):
    """On the shapes of a Whisper layer, no op falls back to the specification."""
    monkeypatch.setattr(kernels, "OPS", {})  # a fallback would fail with KeyError
    x, w = ints((1, 1500, 384), seed=16), ints((384, 64), np.int8, seed=17)
    kernels.fast_qdense([x, w, np.zeros(64, np.int64), np.ones(64, np.int64), None], {"shift": 8, "bits": 16})
    kernels.fast_qmatmul([ints((6, 300, 64)), ints((6, 64, 300))], {"mult": 5, "shift": 9, "bits": 16})
    kernels.fast_qsoftmax([ints((6, 300, 300)), exp_table(6)], {"step_bits": 6, "bits": 16})
    kernels.fast_qgelu([x, exp_table(6)], {"step_bits": 6, "bits": 16})
    kernels.fast_qlayer_norm([x, np.ones(384, np.int32), np.zeros(384, np.int32)], {"eps": 1, "gamma_shift": 0, "bits": 16})
    kernels.fast_qadd([x, x], {"mult_a": 1, "mult_b": 1, "shift": 1, "bits": 16})


def test_scalars_and_empty_inputs_take_the_specification():
    table = exp_table(6)
    same("qsoftmax", kernels.fast_qsoftmax, [np.array(5, np.int16), table], {"step_bits": 6, "bits": 16})
    for x in (np.array(5, np.int16), np.zeros((3, 0), np.int16)):
        same("qgelu", kernels.fast_qgelu, [x, table], {"step_bits": 6, "bits": 16})
        same("qadd", kernels.fast_qadd, [x, x], {"mult_a": 1, "mult_b": 2, "shift": 1, "bits": 16})
