/* The reference runtime's fused integer kernels: femtocc.runtime._refkern.
 *
 * Each function computes, bit for bit, one integer op of femtocc/ir/qops.py (the specification) on
 * contiguous buffers, in one pass over its data instead of numpy's many int64 temporaries. The
 * simulator (runtime/spu_*.c) has its own kernels and shares no code with these: the reference
 * runtime and the simulator stay two implementations that check each other. Large integer matrix
 * products are not here: runtime/kernels.py computes them exactly on int8 digits or in float64 with
 * torch; ``matmul`` covers the few rows of a decoding step, where a library call costs more than it saves.
 *
 *   requant(R, nA, M, N, row, col, mult, shift, bits, out) -> 0
 *       acc[m,n] = 256 * R[m, n] + R[M+m, n] + row[m] + col[n]   (two digits: R int32 [2M, N])
 *       acc[m,n] = R[m, n] + row[m] + col[n]                      (one: R int32, or float64 exact integers)
 *       out[m,n] = saturate(rshift_round(acc * mult[n or 0], shift), bits)
 *   matmul(a, b, B, Bb, M, K, N, col, mult, shift, bits, out, n0, n1) -> 0   (a few rows: decoding steps)
 *       for the columns n0 <= n < n1: out[h,m,n] = saturate(rshift_round((sum_k a[h,m,k] * b[h or 0,k,n] + col[n]) * mult[n or 0], shift), bits)
 *   add(a, b, mult_a, mult_b, shift, bits, out) -> 0      (qadd, operands of one shape and dtype)
 *       out = saturate(rshift_round(a * mult_a + b * mult_b, shift), bits)
 *   lut(x, every, offset, bits, out) -> -1, or the first position outside the table (every: int32)
 *       out = saturate(every[x + offset], bits)                          (qgelu)
 *   softmax(x, n, every, bits, out) -> -1, the first position outside the table, or -2
 *       (-2: a row whose table values are negative or sum to zero or to 2**51 or more: the caller falls
 *       back to numpy)
 *   layer_norm(x, n, gamma, beta, eps, gamma_shift, bits, out) -> 0, or -2 (fall back to numpy)
 *
 * Integer wrap-around follows numpy's int64 (two's complement, computed in uint64); shifts of
 * negative numbers are floor shifts. Every buffer length is checked here as well as by the caller:
 * bad arguments raise ValueError, never read or write out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* hot loops, compiled for AVX-512, AVX2 and the baseline, picked at load time */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

static inline int64_t wrap_mul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
static inline int64_t wrap_add(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

/* v >> s rounding down (gcc and clang shift signed integers arithmetically), rounding half up */
static inline int64_t rshift_round(int64_t v, int64_t s) {
    if (s <= 0) return (int64_t)((uint64_t)v << (-s > 63 ? 63 : -s));
    if (s > 63) return v >= 0 ? 0 : -1;
    return wrap_add(v, (int64_t)1 << (s - 1)) >> s;
}

static inline int64_t saturate(int64_t v, int64_t bits) {
    const int64_t q = ((int64_t)1 << (bits - 1)) - 1;
    v = v > q ? q : v;
    return v < -q ? -q : v;
}

static inline int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static inline int64_t load(const void *x, Py_ssize_t size, Py_ssize_t i) {
    return size == 1 ? ((const int8_t *)x)[i] : ((const int16_t *)x)[i];
}

static inline void store(void *out, int64_t bits, Py_ssize_t i, int64_t v) {
    if (bits <= 8)
        ((int8_t *)out)[i] = (int8_t)saturate(v, bits);
    else
        ((int16_t *)out)[i] = (int16_t)saturate(v, bits);
}

static int check(int ok, const char *what) {
    if (!ok) PyErr_Format(PyExc_ValueError, "_refkern: %s", what);
    return ok;
}

/* an int8/int16 input buffer and an output buffer of the same length for ``bits`` */
static int check_io(Py_buffer *x, Py_buffer *out, int64_t bits) {
    return check(x->itemsize == 1 || x->itemsize == 2, "input must be int8 or int16") &&
           check(bits >= 2 && bits <= 16, "bits must be 2..16") &&
           check(out->len == x->len / x->itemsize * (bits <= 8 ? 1 : 2), "output length does not match the input");
}

static PyObject *done(Py_buffer **bufs, int n, PyObject *result) {
    for (int i = 0; i < n; i++)
        if (bufs[i]->obj) PyBuffer_Release(bufs[i]);
    return result;
}

/* one output row of requant: acc holds the row's digit sums on entry */
HOT static void requant_row(int64_t *acc, Py_ssize_t N, int64_t rm, const int64_t *cl, const int64_t *mu, int per_channel,
                            int64_t shift, int64_t bits, void *out) {
    const int64_t half = (int64_t)1 << (shift - 1);
    for (Py_ssize_t n = 0; n < N; n++)
        acc[n] = saturate(wrap_add(wrap_mul(wrap_add(wrap_add(acc[n], rm), cl[n]), mu[per_channel ? n : 0]), half) >> shift, bits);
    if (bits <= 8)
        for (Py_ssize_t n = 0; n < N; n++) ((int8_t *)out)[n] = (int8_t)acc[n];
    else
        for (Py_ssize_t n = 0; n < N; n++) ((int16_t *)out)[n] = (int16_t)acc[n];
}

HOT static void digit_sums(const void *R, int itemsize, Py_ssize_t nA, Py_ssize_t N, Py_ssize_t plane, int64_t *acc) {
    if (itemsize == 8) { /* one float64 product of exact integers */
        const double *r0 = R;
        for (Py_ssize_t n = 0; n < N; n++) acc[n] = (int64_t)r0[n];
    } else if (nA == 1) {
        const int32_t *r0 = R;
        for (Py_ssize_t n = 0; n < N; n++) acc[n] = r0[n];
    } else {
        const int32_t *r0 = R;
        for (Py_ssize_t n = 0; n < N; n++) acc[n] = 256 * (int64_t)r0[n] + r0[plane + n];
    }
}

static PyObject *requant(PyObject *self, PyObject *args) {
    Py_buffer R = {0}, row = {0}, col = {0}, mult = {0}, out = {0};
    Py_ssize_t nA, M, N;
    long long shift, bits;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*LLw*", &R, &nA, &M, &N, &row, &col, &mult, &shift, &bits, &out)) return NULL;
    Py_buffer *bufs[] = {&R, &row, &col, &mult, &out};
    int ok = check((nA == 1 || nA == 2) && M >= 0 && N >= 0, "bad digit count or sizes") &&
             check((R.itemsize == 4 && R.len == (Py_ssize_t)4 * nA * M * N) ||
                       (R.itemsize == 8 && nA == 1 && R.len == (Py_ssize_t)8 * M * N),
                   "R must be int32 [nA*M, N] or float64 [M, N]") &&
             check(row.len == 8 * M && col.len == 8 * N, "row and col must be int64 [M] and [N]") &&
             check(mult.len == 8 * N || mult.len == 8, "mult must be int64 [N] or [1]") &&
             check(shift >= 1 && shift <= 62, "shift must be 1..62") &&
             check(bits >= 2 && bits <= 16 && out.len == M * N * (bits <= 8 ? 1 : 2), "out must hold M*N of bits");
    if (!ok) return done(bufs, 5, NULL);
    int64_t *accs = PyMem_RawMalloc(sizeof(int64_t) * (size_t)(N ? N : 1));
    if (!accs) return done(bufs, 5, PyErr_NoMemory());
    const int64_t *rw = row.buf, *cl = col.buf, *mu = mult.buf;
    const int per_channel = mult.len == 8 * N && N > 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t m = 0; m < M; m++) { /* R[i*M+m, n] at i*M*N + m*N + n */
        digit_sums((const char *)R.buf + m * N * R.itemsize, (int)R.itemsize, nA, N, M * N, accs);
        requant_row(accs, N, rw[m], cl, mu, per_channel, shift, bits, (char *)out.buf + m * N * (bits <= 8 ? 1 : 2));
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(accs);
    return done(bufs, 5, PyLong_FromLong(0));
}

/* acc[n] = sum_k a[k] * b[k, n] exactly, for n in one tile of columns (b's rows are N apart): each
 * product is formed in int32 (|a * b| <= 2**30) and summed in int32 over runs of CHUNK products that
 * cannot overflow it (2**31 / max|a * b|), then in int64 */
#define TILE 512
#define DOT_TILE(TA, TB, CHUNK)                                                                              \
    HOT static void dot_tile_##TA##_##TB(const TA *restrict a, const TB *restrict b, Py_ssize_t K, Py_ssize_t N, \
                                         Py_ssize_t T, int64_t *restrict acc) {                             \
        int32_t part[TILE];                                                                                  \
        for (Py_ssize_t n = 0; n < T; n++) acc[n] = 0;                                                       \
        for (Py_ssize_t k0 = 0; k0 < K; k0 += CHUNK) {                                                      \
            const Py_ssize_t k1 = K - k0 < CHUNK ? K : k0 + CHUNK;                                           \
            for (Py_ssize_t n = 0; n < T; n++) part[n] = 0;                                                  \
            for (Py_ssize_t k = k0; k < k1; k++) {                                                           \
                const int32_t av = a[k];                                                                     \
                const TB *restrict bk = b + k * N;                                                           \
                for (Py_ssize_t n = 0; n < T; n++) part[n] += av * (int32_t)bk[n];                           \
            }                                                                                                \
            for (Py_ssize_t n = 0; n < T; n++) acc[n] += part[n];                                            \
        }                                                                                                    \
    }
DOT_TILE(int8_t, int8_t, 65536) /* |a * b| <= 2**14 */
DOT_TILE(int8_t, int16_t, 256)  /* |a * b| <= 2**22 */
DOT_TILE(int16_t, int8_t, 256)

/* |a * b| <= 2**30: two products can overflow int32, so each goes to int64 */
HOT static void dot_tile_int16_t_int16_t(const int16_t *restrict a, const int16_t *restrict b, Py_ssize_t K, Py_ssize_t N,
                                         Py_ssize_t T, int64_t *restrict acc) {
    for (Py_ssize_t n = 0; n < T; n++) acc[n] = 0;
    for (Py_ssize_t k = 0; k < K; k++) {
        const int32_t av = a[k];
        const int16_t *restrict bk = b + k * N;
        for (Py_ssize_t n = 0; n < T; n++) acc[n] += av * (int32_t)bk[n];
    }
}

static void dot_tile(const void *a, int as, const void *b, int bs, Py_ssize_t K, Py_ssize_t N, Py_ssize_t T, int64_t *acc) {
    if (as == 1 && bs == 1) dot_tile_int8_t_int8_t(a, b, K, N, T, acc);
    else if (as == 1) dot_tile_int8_t_int16_t(a, b, K, N, T, acc);
    else if (bs == 1) dot_tile_int16_t_int8_t(a, b, K, N, T, acc);
    else dot_tile_int16_t_int16_t(a, b, K, N, T, acc);
}

static PyObject *matmul(PyObject *self, PyObject *args) {
    Py_buffer a = {0}, b = {0}, col = {0}, mult = {0}, out = {0};
    Py_ssize_t B, M, K, N, Bb, n0, n1;
    long long shift, bits;
    if (!PyArg_ParseTuple(args, "y*y*nnnnny*y*LLw*nn", &a, &b, &B, &Bb, &M, &K, &N, &col, &mult, &shift, &bits, &out,
                          &n0, &n1))
        return NULL;
    Py_buffer *bufs[] = {&a, &b, &col, &mult, &out};
    int ok = check(B >= 0 && M >= 0 && K >= 0 && N >= 0 && (Bb == 1 || Bb == B), "bad sizes") &&
             check(0 <= n0 && n0 <= n1 && n1 <= N, "bad column range") &&
             check((a.itemsize == 1 || a.itemsize == 2) && (b.itemsize == 1 || b.itemsize == 2),
                   "operands must be int8 or int16") &&
             check(a.len == a.itemsize * B * M * K && b.len == b.itemsize * Bb * K * N,
                   "a must be [B, M, K] and b [B or 1, K, N]") &&
             check(col.len == 8 * N, "col must be int64 [N]") &&
             check(mult.len == 8 * N || mult.len == 8, "mult must be int64 [N] or [1]") &&
             check(shift >= 1 && shift <= 62, "shift must be 1..62") &&
             check(bits >= 2 && bits <= 16 && out.len == B * M * N * (bits <= 8 ? 1 : 2), "out must hold B*M*N of bits");
    if (!ok) return done(bufs, 5, NULL);
    const int per_channel = mult.len == 8 * N && N > 1;
    const Py_ssize_t ob = bits <= 8 ? 1 : 2;
    const int64_t *cl = col.buf, *mu = mult.buf;
    int64_t acc[TILE];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t h = 0; h < B; h++)
        for (Py_ssize_t t0 = n0; t0 < n1; t0 += TILE) {
            const Py_ssize_t T = n1 - t0 < TILE ? n1 - t0 : TILE;
            const char *bt = (const char *)b.buf + ((Bb == 1 ? 0 : h) * K * N + t0) * b.itemsize;
            for (Py_ssize_t m = 0; m < M; m++) {
                const Py_ssize_t row = h * M + m;
                dot_tile((const char *)a.buf + row * K * a.itemsize, (int)a.itemsize, bt, (int)b.itemsize, K, N, T, acc);
                requant_row(acc, T, 0, cl + t0, per_channel ? mu + t0 : mu, per_channel, shift, bits,
                            (char *)out.buf + (row * N + t0) * ob);
            }
        }
    Py_END_ALLOW_THREADS
    return done(bufs, 5, PyLong_FromLong(0));
}

static PyObject *lut(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, every = {0}, out = {0};
    long long offset, bits;
    if (!PyArg_ParseTuple(args, "y*y*LLw*", &x, &every, &offset, &bits, &out)) return NULL;
    Py_buffer *bufs[] = {&x, &every, &out};
    if (!check_io(&x, &out, bits) || !check(every.len % 4 == 0, "every must be int32"))
        return done(bufs, 3, NULL);
    const int32_t *e = every.buf;
    const int64_t L = every.len / 4;
    const Py_ssize_t n = x.len / x.itemsize, size = x.itemsize;
    int64_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t u = load(x.buf, size, i) + offset;
        if (u < 0 || u >= L) { bad = u; break; }
        store(out.buf, bits, i, e[u]);
    }
    Py_END_ALLOW_THREADS
    return done(bufs, 3, PyLong_FromLongLong(bad));
}

/* one qsoftmax row: -1, the first position outside the table, or -2 (a negative value, a zero sum or a
 * sum too large for the double arithmetic below: the caller falls back to numpy). Every loop is a plain
 * pass over the row, so that the compiler vectorizes it (the table read is a gather). */
HOT static int64_t softmax_row(const int16_t *restrict x, Py_ssize_t n, const int32_t *restrict e, int64_t L, int64_t bits,
                               int32_t *restrict v,
                               void *out) {
    int32_t mx = INT16_MIN, mn = INT16_MAX;
    for (Py_ssize_t j = 0; j < n; j++) {
        mx = x[j] > mx ? x[j] : mx;
        mn = x[j] < mn ? x[j] : mn;
    }
    if ((int64_t)mx - mn >= L)
        for (Py_ssize_t j = 0; j < n; j++)
            if (mx - x[j] >= L) return mx - x[j];
    int32_t lowest = 0;
    int64_t total = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        v[j] = e[mx - x[j]];
        lowest = v[j] < lowest ? v[j] : lowest;
        total += v[j];
    }
    if (lowest < 0 || total <= 0 || total >= ((int64_t)1 << 51)) return -2;
    /* p = floor(num / total), num = v * 2**(bits-1) + floor(total / 2) < 2**52: every value below is an
       integer under 2**53, exact in double; the estimate from the reciprocal is within one of the
       quotient, and one correction each way makes it exact */
    const double t = (double)total, half = (double)(total / 2), scale = (double)((int64_t)1 << (bits - 1)),
                 q = scale - 1, inv = 1.0 / t;
    for (Py_ssize_t j = 0; j < n; j++) {
        const double num = (double)v[j] * scale + half;
        double p = (double)(int32_t)(num * inv); /* truncation is floor here: num * inv < 2**16 is not negative */
        p = p * t > num ? p - 1 : p;
        p = (p + 1) * t <= num ? p + 1 : p;
        v[j] = (int32_t)(p > q ? q : p);
    }
    if (bits <= 8)
        for (Py_ssize_t j = 0; j < n; j++) ((int8_t *)out)[j] = (int8_t)v[j];
    else
        for (Py_ssize_t j = 0; j < n; j++) ((int16_t *)out)[j] = (int16_t)v[j];
    return -1;
}

static PyObject *softmax(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, every = {0}, out = {0};
    Py_ssize_t n;
    long long bits;
    if (!PyArg_ParseTuple(args, "y*ny*Lw*", &x, &n, &every, &bits, &out)) return NULL;
    Py_buffer *bufs[] = {&x, &every, &out};
    if (!check_io(&x, &out, bits) || !check(n >= 1 && (x.len / x.itemsize) % n == 0, "rows must be whole") ||
        !check(every.len % 4 == 0 && every.len > 0, "every must be int32"))
        return done(bufs, 3, NULL);
    const int64_t L = every.len / 4, obytes = bits <= 8 ? 1 : 2;
    const Py_ssize_t rows = x.len / x.itemsize / n, size = x.itemsize;
    int64_t status = -1;
    int16_t *row = PyMem_RawMalloc(sizeof(int16_t) * (size_t)n);
    int32_t *v = PyMem_RawMalloc(sizeof(int32_t) * (size_t)n);
    if (!row || !v) {
        PyMem_RawFree(row);
        PyMem_RawFree(v);
        return done(bufs, 3, PyErr_NoMemory());
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows && status == -1; r++) {
        const int16_t *xr = (const int16_t *)x.buf + r * n;
        if (size == 1) { /* int8 rows are widened; int16 rows are read in place */
            for (Py_ssize_t j = 0; j < n; j++) row[j] = ((const int8_t *)x.buf)[r * n + j];
            xr = row;
        }
        status = softmax_row(xr, n, every.buf, L, bits, v, (char *)out.buf + r * n * obytes);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(row);
    PyMem_RawFree(v);
    return done(bufs, 3, PyLong_FromLongLong(status));
}

static PyObject *layer_norm(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, gamma = {0}, beta = {0}, out = {0};
    Py_ssize_t n;
    long long eps, gs, bits;
    if (!PyArg_ParseTuple(args, "y*ny*y*LLLw*", &x, &n, &gamma, &beta, &eps, &gs, &bits, &out)) return NULL;
    Py_buffer *bufs[] = {&x, &gamma, &beta, &out};
    if (!check_io(&x, &out, bits) || !check(n >= 1 && (x.len / x.itemsize) % n == 0, "rows must be whole") ||
        !check(gamma.len == 8 * n && beta.len == 8 * n, "gamma and beta must be int64 [n]"))
        return done(bufs, 4, NULL);
    const int64_t *g = gamma.buf, *b = beta.buf;
    for (Py_ssize_t j = 0; j < n; j++) /* |c * gamma| << f stays below 2**62 with |c| < 2**17 and f <= 20 */
        if (g[j] > ((int64_t)1 << 24) || g[j] < -((int64_t)1 << 24)) return done(bufs, 4, PyLong_FromLong(-2));
    if (n > (1 << 20)) return done(bufs, 4, PyLong_FromLong(-2));
    const Py_ssize_t rows = x.len / x.itemsize / n, size = x.itemsize;
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const Py_ssize_t base = r * n;
        int64_t sum = 0, var = 0;
        for (Py_ssize_t j = 0; j < n; j++) sum += load(x.buf, size, base + j);
        const int64_t mu = floordiv(2 * sum + n, 2 * (int64_t)n);
        for (Py_ssize_t j = 0; j < n; j++) { int64_t c = load(x.buf, size, base + j) - mu; var += c * c; }
        var = var / n + eps;
        if (var <= 0 || var >= ((int64_t)1 << 52)) { status = -2; break; }
        const int64_t f0 = (40 - (64 - __builtin_clzll((unsigned long long)var))) / 2;
        const int64_t f = f0 > 0 ? f0 : 0, q = var << (2 * f);
        int64_t sd = (int64_t)floor(sqrt((double)q));
        if (sd * sd > q) sd -= 1;
        if ((sd + 1) * (sd + 1) <= q) sd += 1;
        for (Py_ssize_t j = 0; j < n; j++) {
            const int64_t num = wrap_mul((load(x.buf, size, base + j) - mu) * g[j], (int64_t)1 << f); /* no UB shift */
            store(out.buf, bits, base + j, rshift_round(floordiv(2 * num + sd, 2 * sd), gs) + b[j]);
        }
    }
    Py_END_ALLOW_THREADS
    return done(bufs, 4, PyLong_FromLong(status));
}

HOT static void add_loop(const void *a, const void *b, Py_ssize_t size, Py_ssize_t n, int64_t ma, int64_t mb, int64_t shift,
                         int64_t bits, void *out) {
    const int64_t half = (int64_t)1 << (shift - 1);
    for (Py_ssize_t i = 0; i < n; i++)
        store(out, bits, i, wrap_add(wrap_add(wrap_mul(load(a, size, i), ma), wrap_mul(load(b, size, i), mb)), half) >> shift);
}

static PyObject *add(PyObject *self, PyObject *args) {
    Py_buffer a = {0}, b = {0}, out = {0};
    long long ma, mb, shift, bits;
    if (!PyArg_ParseTuple(args, "y*y*LLLLw*", &a, &b, &ma, &mb, &shift, &bits, &out)) return NULL;
    Py_buffer *bufs[] = {&a, &b, &out};
    if (!check_io(&a, &out, bits) || !check(b.itemsize == a.itemsize && b.len == a.len, "operands must match") ||
        !check(shift >= 1 && shift <= 62, "shift must be 1..62"))
        return done(bufs, 3, NULL);
    Py_BEGIN_ALLOW_THREADS
    add_loop(a.buf, b.buf, a.itemsize, a.len / a.itemsize, ma, mb, shift, bits, out.buf);
    Py_END_ALLOW_THREADS
    return done(bufs, 3, PyLong_FromLong(0));
}

static PyMethodDef methods[] = {
    {"requant", requant, METH_VARARGS, "combine int8-digit products and requantize (qdense, qmatmul)"},
    {"matmul", matmul, METH_VARARGS, "exact integer products of a few rows, requantized (qdense, qmatmul)"},
    {"lut", lut, METH_VARARGS, "table lookup at every position (qgelu)"},
    {"add", add, METH_VARARGS, "qadd of two operands of one shape and dtype"},
    {"softmax", softmax, METH_VARARGS, "qsoftmax along rows of n"},
    {"layer_norm", layer_norm, METH_VARARGS, "qlayer_norm along rows of n"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_refkern", .m_doc = "the reference runtime's fused integer kernels", .m_size = -1,
    .m_methods = methods};

PyMODINIT_FUNC PyInit__refkern(void) { return PyModule_Create(&module); }
