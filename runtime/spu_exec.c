/* Execution of validated .spu programs: integer semantics of femtocc/ir/qops.py and the data
 * movement ops of femtocc/ir/ops.py (bit-exact with the reference runtime), and the timing,
 * traffic and energy model of docs/spu001.md.
 *
 * Every run-time condition that depends on input data (an index out of range, a shape that does not
 * fit, a reshape that cannot be satisfied) is an error message, never undefined behaviour.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "spusim.h"

/* ------------------------------------------------------------------------------------------ host threads */

/* The host work of the big ops (qdense, qmatmul, qsoftmax) is split over threads by rows. Only the
 * arithmetic is shared out: every count the simulator keeps is a sum of integers (exact in a double
 * whatever the order), so results and statistics are the same for any number of threads.
 * FEMTOCC_SIM_THREADS sets the number (default: the online CPUs, at most SPU_MAX_THREADS). */
#define SPU_MAX_THREADS 16
#define PARALLEL_MIN_WORK 2e6 /* multiply-adds below which an op runs on the calling thread */

typedef void (*RangeFn)(void *ctx, int64_t begin, int64_t end, int slot);
typedef struct { RangeFn fn; void *ctx; int64_t begin, end; int slot; } Job;

static void *job_main(void *arg) {
    Job *j = arg;
    j->fn(j->ctx, j->begin, j->end, j->slot);
    return NULL;
}

static int host_threads(void) {
    const char *env = getenv("FEMTOCC_SIM_THREADS");
    long n = env && *env ? strtol(env, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > SPU_MAX_THREADS ? SPU_MAX_THREADS : (int)n);
}

/* fn over [0, n) in contiguous parts, one per thread, the calling thread taking the first; slot i
 * gets the i-th part, so per-slot results combine in row order. Returns the number of parts. */
static int parallel_for(int64_t n, double work, RangeFn fn, void *ctx) {
    int64_t t = work < PARALLEL_MIN_WORK ? 1 : host_threads();
    if (t > n) t = n > 0 ? n : 1;
    Job jobs[SPU_MAX_THREADS];
    pthread_t threads[SPU_MAX_THREADS];
    int started[SPU_MAX_THREADS] = {0};
    for (int64_t i = 0; i < t; i++) jobs[i] = (Job){fn, ctx, n * i / t, n * (i + 1) / t, (int)i};
    for (int64_t i = 1; i < t; i++) started[i] = pthread_create(&threads[i], NULL, job_main, &jobs[i]) == 0;
    job_main(&jobs[0]);
    for (int64_t i = 1; i < t; i++) {
        if (started[i]) pthread_join(threads[i], NULL);
        else job_main(&jobs[i]); /* no thread to be had: do its part here */
    }
    return (int)t;
}


/* ------------------------------------------------------------------------------------------ tensors */

void tensor_free(Tensor *t) {
    if (t->owned) free(t->data);
    t->data = NULL;
    t->owned = 0;
}

static int tensor_alloc(Tensor *t, int dtype, int rank, const int64_t *shape, char *err) {
    int64_t n = 1;
    if (rank < 0 || rank > SPU_MAX_RANK) return spu_fail(err, "rank %d out of range", rank);
    for (int i = 0; i < rank; i++) {
        if (shape[i] < 0) return spu_fail(err, "negative dimension %lld", (long long)shape[i]);
        if (shape[i] && n > SPU_MAX_ELEMENTS / shape[i]) return spu_fail(err, "tensor of more than 2**28 elements");
        n *= shape[i];
        t->shape[i] = shape[i];
    }
    t->dtype = dtype;
    t->rank = rank;
    t->numel = n;
    t->data = calloc((size_t)(n ? n : 1), (size_t)spu_dtype_size(dtype));
    t->owned = 1;
    if (!t->data) return spu_fail(err, "out of memory for %lld elements", (long long)n);
    return 0;
}

static inline int64_t ld(const Tensor *t, int64_t i) {
    switch (t->dtype) {
    case DT_I8: return ((const int8_t *)t->data)[i];
    case DT_I16: return ((const int16_t *)t->data)[i];
    case DT_I32: return ((const int32_t *)t->data)[i];
    case DT_I64: return ((const int64_t *)t->data)[i];
    default: return ((const uint8_t *)t->data)[i];
    }
}

static inline void st(Tensor *t, int64_t i, int64_t v) {
    switch (t->dtype) {
    case DT_I8: ((int8_t *)t->data)[i] = (int8_t)v; break;
    case DT_I16: ((int16_t *)t->data)[i] = (int16_t)v; break;
    case DT_I32: ((int32_t *)t->data)[i] = (int32_t)v; break;
    case DT_I64: ((int64_t *)t->data)[i] = v; break;
    case DT_BOOL: ((uint8_t *)t->data)[i] = v != 0; break;
    default: ((uint8_t *)t->data)[i] = (uint8_t)v; break;
    }
}

static void strides_of(const int64_t *shape, int rank, int64_t *strides) {
    int64_t s = 1;
    for (int i = rank - 1; i >= 0; i--) {
        strides[i] = s;
        s *= shape[i];
    }
}

/* ------------------------------------------------------------------------------------------ integer arithmetic */

static inline int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}

/* 128-bit intermediates: a hostile program's multipliers cannot overflow (valid ones never come close) */
typedef __int128 wide;

static inline wide rshift_round_w(wide v, int64_t s) {
    if (s <= 0) return v * ((wide)1 << (-s > 62 ? 62 : -s));
    wide x = v + ((wide)1 << (s - 1));
    return x >= 0 ? x >> s : -((-x - 1) >> s) - 1; /* floor shift without implementation-defined >> */
}

static inline int64_t clamp64(wide v) {
    return v > (wide)INT64_MAX ? INT64_MAX : (v < (wide)INT64_MIN ? INT64_MIN : (int64_t)v);
}

static inline int64_t rshift_round(int64_t v, int64_t s) { return clamp64(rshift_round_w(v, s)); }

/* rshift_round(a * m, s) without overflow */
static inline int64_t requant(int64_t a, int64_t m, int64_t s) { return clamp64(rshift_round_w((wide)a * m, s)); }

static inline int64_t saturate(int64_t v, int64_t bits) {
    int64_t q = ((int64_t)1 << (bits - 1)) - 1;
    return v > q ? q : (v < -q ? -q : v);
}

static inline int64_t isqrt64(int64_t q) {
    int64_t r = (int64_t)floor(sqrt((double)q));
    if (r * r > q) r -= 1;
    if ((r + 1) * (r + 1) <= q) r += 1;
    return r;
}

static inline int64_t bit_length(int64_t v) { return v > 0 ? 64 - __builtin_clzll((unsigned long long)v) : 0; }

static inline int64_t lut(const BufferDesc *table, int64_t u, int64_t step_bits) {
    int64_t i = u >> step_bits;
    int64_t lo = table->values[i];
    if (step_bits == 0) return lo;
    int64_t hi = table->values[i + 1];
    /* |hi - lo| < 2**33 and the fraction < 2**16: the product fits int64; floor shift as in rshift_round */
    int64_t v = (hi - lo) * (u & (((int64_t)1 << step_bits) - 1)) + ((int64_t)1 << (step_bits - 1));
    return lo + (v >= 0 ? v >> step_bits : -((-v - 1) >> step_bits) - 1);
}

/* the interpolated table at every position it covers ((d >> step) + 1 < entries; d < entries without a
   step), into *positions of them; int32, since an interpolated value lies between two i32 entries.
   NULL when out of memory. */
static int32_t *table_every(const BufferDesc *table, int64_t step, int64_t *positions) {
    *positions = step ? (table->numel - 1) << step : table->numel;
    int32_t *every = malloc(sizeof(int32_t) * (size_t)(*positions + 1));
    if (every)
        for (int64_t d = 0; d < *positions; d++) every[d] = (int32_t)lut(table, d, step);
    return every;
}

/* ------------------------------------------------------------------------------------------ broadcasting */

typedef struct { int rank; int64_t shape[SPU_MAX_RANK]; int64_t strides[3][SPU_MAX_RANK]; } Bcast;

static int broadcast(Bcast *b, const Tensor **ts, int n, char *err) {
    int rank = 0;
    for (int k = 0; k < n; k++) rank = ts[k]->rank > rank ? ts[k]->rank : rank;
    b->rank = rank;
    for (int i = 0; i < rank; i++) {
        int64_t d = 1;
        for (int k = 0; k < n; k++) {
            int j = i - (rank - ts[k]->rank);
            if (j < 0) continue;
            int64_t e = ts[k]->shape[j];
            if (e != 1) {
                if (d != 1 && d != e) return spu_fail(err, "shapes do not broadcast (%lld vs %lld)", (long long)d, (long long)e);
                d = e;
            }
        }
        b->shape[i] = d;
    }
    for (int k = 0; k < n; k++) {
        int64_t own[SPU_MAX_RANK];
        strides_of(ts[k]->shape, ts[k]->rank, own);
        for (int i = 0; i < rank; i++) {
            int j = i - (rank - ts[k]->rank);
            b->strides[k][i] = (j < 0 || ts[k]->shape[j] == 1) ? 0 : own[j];
        }
    }
    return 0;
}

/* calls f(out_index, offsets) for every element of the broadcast shape */
#define BCAST_LOOP(B, N, ...)                                                                  \
    do {                                                                                       \
        int64_t idx_[SPU_MAX_RANK] = {0}, off_[3] = {0, 0, 0}, total_ = 1;                     \
        for (int i_ = 0; i_ < (B).rank; i_++) total_ *= (B).shape[i_];                         \
        for (int64_t o_ = 0; o_ < total_; o_++) {                                              \
            const int64_t out_ = o_;                                                           \
            const int64_t *off = off_;                                                         \
            (void)out_; (void)off;                                                             \
            __VA_ARGS__;                                                                       \
            for (int i_ = (B).rank - 1; i_ >= 0; i_--) {                                       \
                idx_[i_]++;                                                                    \
                for (int k_ = 0; k_ < (N); k_++) off_[k_] += (B).strides[k_][i_];              \
                if (idx_[i_] < (B).shape[i_]) break;                                           \
                for (int k_ = 0; k_ < (N); k_++) off_[k_] -= (B).strides[k_][i_] * (B).shape[i_]; \
                idx_[i_] = 0;                                                                  \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------------------------------ run context */

typedef struct {
    const Program *p;
    const Config *cfg;
    Tensor *env;       /* per buffer */
    InstrStats *stats; /* per instruction */
    int64_t T, P;
    char *err;
} Ctx;

static int bits_dtype(int64_t bits) { return bits <= 8 ? DT_I8 : DT_I16; }

static const BufferDesc *const_of(Ctx *c, uint16_t id) {
    const BufferDesc *b = &c->p->buffers[id];
    return (b->region == RG_CONST || b->region == RG_STREAM) ? b : NULL;
}

static inline uint16_t operand(const Instr *ins, int j) {
    const uint8_t *q = (const uint8_t *)ins->ids + 2 * j;
    return (uint16_t)(q[0] | (q[1] << 8));
}

static int need_int(Ctx *c, const Tensor *t, const char *what, int k) {
    if (t->dtype != DT_I8 && t->dtype != DT_I16)
        return spu_fail(c->err, "instruction %d: %s must be i8 or i16", k, what);
    return 0;
}

/* ------------------------------------------------------------------------------------------ ops */

/* hot kernels, compiled for AVX-512, AVX2 and the baseline, picked at load time */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HOT
#endif

#define ROWS 8 /* rows of a qdense block */

/* acc[n] += sum_k x[k] * w[k, n] for int16 x (|x| <= 2**15) and int8-range w: int32 partial sums over
   chunks of 256 inputs (|partial| < 2**30) flushed into int64, so the result is exact */
HOT static void dense_row(const int32_t *x, const int8_t *w, int64_t K, int64_t N, int64_t *acc, int32_t *part) {
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
        int64_t k1 = k0 + 256 < K ? k0 + 256 : K;
        for (int64_t n = 0; n < N; n++) part[n] = 0;
        for (int64_t k = k0; k < k1; k++) {
            int32_t xv = x[k];
            if (xv == 0) continue;
            const int8_t *wr = w + k * N;
            for (int64_t n = 0; n < N; n++) part[n] += xv * (int32_t)wr[n];
        }
        for (int64_t n = 0; n < N; n++) acc[n] += part[n];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
static int have_avx2(void) { return __builtin_cpu_supports("avx2"); }
/* dense_row with AVX2 on pair-interleaved weights (BufferDesc.weight_pairs): vpmaddwd takes two
   inputs at once, x[2p] * w[2p][n] + x[2p+1] * w[2p+1][n] (|.| <= 2**23) in int32, partial sums
   over 128 pairs (|partial| <= 2**30) flushed into int64: exact, like dense_row */
__attribute__((target("avx2"))) static void dense_row_pairs(const int32_t *x, const int16_t *wp, int64_t K, int64_t N,
                                                            int64_t *acc, int32_t *part) {
    const int64_t P = (K + 1) / 2;
    for (int64_t p0 = 0; p0 < P; p0 += 128) {
        int64_t p1 = p0 + 128 < P ? p0 + 128 : P;
        memset(part, 0, sizeof(int32_t) * (size_t)N);
        for (int64_t p = p0; p < p1; p++) {
            int32_t x0 = x[2 * p], x1 = 2 * p + 1 < K ? x[2 * p + 1] : 0;
            if (!x0 && !x1) continue;
            const __m256i xv = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)x0 | ((uint32_t)(uint16_t)x1 << 16)));
            const int16_t *wr = wp + 2 * p * N;
            int64_t n = 0;
            for (; n + 8 <= N; n += 8) {
                __m256i sum = _mm256_loadu_si256((const __m256i *)(part + n));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(xv, _mm256_loadu_si256((const __m256i *)(wr + 2 * n))));
                _mm256_storeu_si256((__m256i *)(part + n), sum);
            }
            for (; n < N; n++) part[n] += x0 * wr[2 * n] + x1 * wr[2 * n + 1];
        }
        for (int64_t n = 0; n < N; n++) acc[n] += part[n];
    }
}

static int have_vnni(void) { return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"); }
/* acc[r][n] += sum_k x[r][k] * w[k][n] for all ROWS rows of a block at once, with AVX-512 VNNI on the
   pair-interleaved weights: vpdpwssd adds x[r][2p] * w[2p][n] + x[r][2p+1] * w[2p+1][n] (|.| <= 2**23) to
   int32 sums, ROWS rows x 32 columns of them in registers, flushed into int64 every 128 pairs
   (|sum| <= 2**30): exact, like dense_row. xp: scratch for ROWS * ceil(K/2) packed input pairs. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void dense_block_vnni(const int32_t *x, const int16_t *wp,
                                                                                   int64_t K, int64_t N, int64_t *acc,
                                                                                   int32_t *xp) {
    const int64_t P = (K + 1) / 2, N32 = N / 32 * 32;
    for (int r = 0; r < ROWS; r++)
        for (int64_t p = 0; p < P; p++) {
            const int32_t x0 = x[r * K + 2 * p], x1 = 2 * p + 1 < K ? x[r * K + 2 * p + 1] : 0;
            xp[r * P + p] = (int32_t)((uint32_t)(uint16_t)x0 | ((uint32_t)(uint16_t)x1 << 16));
        }
    for (int64_t n0 = 0; n0 < N32; n0 += 32)
        for (int64_t p0 = 0; p0 < P; p0 += 128) {
            const int64_t p1 = p0 + 128 < P ? p0 + 128 : P;
            __m512i c[ROWS][2];
            for (int r = 0; r < ROWS; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
            for (int64_t p = p0; p < p1; p++) {
                const int16_t *w = wp + 2 * p * N + 2 * n0;
                const __m512i w0 = _mm512_loadu_si512((const void *)w), w1 = _mm512_loadu_si512((const void *)(w + 32));
                for (int r = 0; r < ROWS; r++) {
                    const __m512i xv = _mm512_set1_epi32(xp[r * P + p]);
                    c[r][0] = _mm512_dpwssd_epi32(c[r][0], xv, w0);
                    c[r][1] = _mm512_dpwssd_epi32(c[r][1], xv, w1);
                }
            }
            for (int r = 0; r < ROWS; r++)
                for (int h = 0; h < 2; h++) {
                    int64_t *a = acc + r * N + n0 + 16 * h;
                    const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(c[r][h]));
                    const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c[r][h], 1));
                    _mm512_storeu_si512((void *)a, _mm512_add_epi64(_mm512_loadu_si512((const void *)a), lo));
                    _mm512_storeu_si512((void *)(a + 8), _mm512_add_epi64(_mm512_loadu_si512((const void *)(a + 8)), hi));
                }
        }
    for (int r = 0; r < ROWS; r++) /* the last N % 32 columns */
        for (int64_t n = N32; n < N; n++) {
            int64_t sum = 0;
            for (int64_t p = 0; p < P; p++) {
                const int32_t x0 = x[r * K + 2 * p], x1 = 2 * p + 1 < K ? x[r * K + 2 * p + 1] : 0;
                sum += (int64_t)x0 * wp[2 * (p * N + n)] + (int64_t)x1 * wp[2 * (p * N + n) + 1];
            }
            acc[r * N + n] += sum;
        }
}

/* pencil_rows for pencils of height 8 with AVX-512 VNNI, two pencils at a time: for the pair (q, q'),
   vpdpwssd adds x[r][index[q]] * w[q][j] + x[r][index[q']] * w[q'][j] (|.| <= 2**23) to the int32 sum of
   row r, column j; the 8 rows x 8 columns of a group are 4 registers (2 rows each); flushed into int64
   every 128 pairs (|sum| <= 2**30): exact, like pencil_rows. xt16: the block's rows, input-major [K][8]. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void pencil8_rows_vnni(const int16_t *xt16,
                                                                                           const BufferDesc *w,
                                                                                           int64_t *acc, int64_t N) {
    const uint32_t *offsets = w->pencil_offsets;
    const uint16_t *index = w->pencil_index;
    const int8_t *words = w->pencil_words;
    const int64_t groups = N / 8;
    __m512i rows_of[4]; /* lanes 0-7 take row 2z's pair, lanes 8-15 row 2z+1's */
    for (int z = 0; z < 4; z++)
        rows_of[z] = _mm512_set_epi32(2 * z + 1, 2 * z + 1, 2 * z + 1, 2 * z + 1, 2 * z + 1, 2 * z + 1, 2 * z + 1, 2 * z + 1,
                                      2 * z, 2 * z, 2 * z, 2 * z, 2 * z, 2 * z, 2 * z, 2 * z);
    const __m128i zero = _mm_setzero_si128();
    for (int64_t g = 0; g < groups; g++) {
        const uint32_t q0 = offsets[g], q1 = offsets[g + 1];
        for (uint32_t b0 = q0; b0 < q1; b0 += 256) {
            const uint32_t b1 = b0 + 256 < q1 ? b0 + 256 : q1;
            __m512i c[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
            for (uint32_t q = b0; q < b1; q += 2) {
                const int two = q + 1 < b1;
                const __m128i x0 = _mm_loadu_si128((const __m128i *)(xt16 + 8 * (int64_t)index[q]));
                const __m128i x1 = two ? _mm_loadu_si128((const __m128i *)(xt16 + 8 * (int64_t)index[q + 1])) : zero;
                /* the 8 rows' (x0, x1) pairs as int32 lanes 0..7 */
                const __m256i xp = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi16(x0, x1)),
                                                           _mm_unpackhi_epi16(x0, x1), 1);
                const __m512i xp512 = _mm512_castsi256_si512(xp);
                /* the weights (w[q][j], w[q'][j]) as int16 pairs, j = 0..7, in both halves */
                int64_t wa, wb = 0;
                memcpy(&wa, words + 8 * (int64_t)q, 8);
                if (two) memcpy(&wb, words + 8 * (int64_t)q + 8, 8);
                const __m128i wi = _mm_unpacklo_epi8(_mm_cvtsi64_si128(wa), _mm_cvtsi64_si128(wb));
                const __m512i wv = _mm512_broadcast_i64x4(_mm256_cvtepi8_epi16(wi));
                for (int z = 0; z < 4; z++)
                    c[z] = _mm512_dpwssd_epi32(c[z], _mm512_permutexvar_epi32(rows_of[z], xp512), wv);
            }
            for (int z = 0; z < 4; z++) {
                int64_t *a0 = acc + (2 * z) * N + 8 * g, *a1 = acc + (2 * z + 1) * N + 8 * g;
                const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(c[z]));
                const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c[z], 1));
                _mm512_storeu_si512((void *)a0, _mm512_add_epi64(_mm512_loadu_si512((const void *)a0), lo));
                _mm512_storeu_si512((void *)a1, _mm512_add_epi64(_mm512_loadu_si512((const void *)a1), hi));
            }
        }
    }
}
#else
static void dense_row_pairs(const int32_t *x, const int16_t *wp, int64_t K, int64_t N, int64_t *acc, int32_t *part) {}
static int have_avx2(void) { return 0; }
static void dense_block_vnni(const int32_t *x, const int16_t *wp, int64_t K, int64_t N, int64_t *acc, int32_t *xp) {}
static int have_vnni(void) { return 0; }
static void pencil8_rows_vnni(const int16_t *xt16, const BufferDesc *w, int64_t *acc, int64_t N) {}
#endif

/* pencil rows: acc[r][H*g + j] += sum over the group's pencils q of X[r][index[q]] * words[q][j] (H the
   pencil height), for up to ROWS rows at once (each pencil's H weights are loaded once per row block);
   int32 partial sums over at most 256 pencils (|partial| < 2**30) are flushed into int64, so the result
   is exact. Inlined with H a constant for the common heights, so their inner loops vectorise. */
static inline __attribute__((always_inline)) void pencil_rows_h(const int32_t *xt, const uint32_t *offsets,
                                                                const uint16_t *index, const int8_t *words,
                                                                int64_t groups, int64_t *acc, int64_t N, const int H) {
    /* xt: [K][ROWS] (a block of rows, input-major), acc: [ROWS][N] */
    int32_t part[ROWS][SPU_MAX_BLOCK];
    for (int64_t g = 0; g < groups; g++) {
        uint32_t q0 = offsets[g], q1 = offsets[g + 1];
        for (uint32_t b0 = q0; b0 < q1; b0 += 256) {
            uint32_t b1 = b0 + 256 < q1 ? b0 + 256 : q1;
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < H; j++) part[r][j] = 0;
            for (uint32_t q = b0; q < b1; q++) {
                int32_t w[SPU_MAX_BLOCK];
                for (int j = 0; j < H; j++) w[j] = words[H * (int64_t)q + j];
                const int32_t *xv = xt + (int64_t)index[q] * ROWS;
                for (int r = 0; r < ROWS; r++)
                    for (int j = 0; j < H; j++) part[r][j] += xv[r] * w[j];
            }
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < H; j++) acc[r * N + H * g + j] += part[r][j];
        }
    }
}

HOT static void pencil_rows(const int32_t *xt, const BufferDesc *w, int64_t *acc, int64_t N) {
    const int H = (int)w->block;
    if (H == 8) pencil_rows_h(xt, w->pencil_offsets, w->pencil_index, w->pencil_words, N / 8, acc, N, 8);
    else if (H == 16) pencil_rows_h(xt, w->pencil_offsets, w->pencil_index, w->pencil_words, N / 16, acc, N, 16);
    else pencil_rows_h(xt, w->pencil_offsets, w->pencil_index, w->pencil_words, N / H, acc, N, H);
}

/* acc[r][n] = sum_k a[r][k] * b[k][n] for MR rows of a, in double: every product of int16-range
   operands is below 2**30 and every partial sum below 2**53 for K < 2**23 (checked by the caller),
   so the sums are exact integers whatever the order. MR rows x 16 columns of sums stay in registers
   (16 of AVX-512's 32), so each b load feeds MR multiply-adds. */
#define MR 8
typedef double v8d __attribute__((vector_size(64)));

HOT static void matmul_rows(const double *a, const double *b, int64_t K, int64_t N, double *acc) {
    int64_t n0 = 0;
    for (; n0 + 16 <= N; n0 += 16) {
        v8d c0[MR], c1[MR], b0, b1;
        for (int r = 0; r < MR; r++) c0[r] = (v8d){0}, c1[r] = (v8d){0};
        for (int64_t k = 0; k < K; k++) {
            memcpy(&b0, b + k * N + n0, sizeof b0);
            memcpy(&b1, b + k * N + n0 + 8, sizeof b1);
            for (int r = 0; r < MR; r++) {
                const double ar = a[r * K + k];
                c0[r] += ar * b0, c1[r] += ar * b1;
            }
        }
        for (int r = 0; r < MR; r++) {
            memcpy(acc + r * N + n0, &c0[r], sizeof c0[r]);
            memcpy(acc + r * N + n0 + 8, &c1[r], sizeof c1[r]);
        }
    }
    for (; n0 < N; n0++)
        for (int r = 0; r < MR; r++) {
            double sum = 0;
            for (int64_t k = 0; k < K; k++) sum += a[r * K + k] * b[k * N + n0];
            acc[r * N + n0] = sum;
        }
}

typedef struct {
    const Tensor *a;
    Tensor *out;
    const double *bd; /* the batch's b as doubles: [K][N] */
    const Instr *ins;
    int64_t M, K, N, aoff, ooff, limit; /* limit: requant_limit of the multiplier */
    int skip;
    double issued[SPU_MAX_THREADS], skipped[SPU_MAX_THREADS];
    int oom[SPU_MAX_THREADS];
} MatmulWork;

typedef struct {
    const Tensor *x;
    Tensor *out;
    const BufferDesc *w, *bias, *mult;
    const Instr *ins;
    const int64_t *uses;  /* MACs each nonzero input issues */
    const int64_t *limit; /* per column: the largest |acc| with |acc * mult| < 2**62 */
    int pencil;
    int64_t K, N, rows;
    double issued[SPU_MAX_THREADS], nonzero[SPU_MAX_THREADS];
    int oom[SPU_MAX_THREADS];
} DenseWork;

/* the largest |acc| with |acc * m| < 2**62 */
static int64_t requant_limit(int64_t m) {
    const uint64_t am = m < 0 ? (uint64_t)0 - (uint64_t)m : (uint64_t)m;
    return am ? (int64_t)(UINT64_C(0x3fffffffffffffff) / am) : INT64_MAX;
}

/* out[o + i] = saturate(requant(acc[i], mult[i], shift), bits) for i < n, mult and limit (requant_limit
   of each multiplier) per column, or one of each for all when !per_column: where every |acc[i]| is
   within its limit, one branch-free int64 pass the compiler vectorises, else the general 128-bit form */
HOT static void requant_i64(const int64_t *acc, int64_t n, const int64_t *mult, const int64_t *limit, int per_column,
                            int64_t shift, int64_t bits, Tensor *out, int64_t o) {
    int64_t bad = shift < 1 || shift > 62 || (out->dtype != DT_I16 && out->dtype != DT_I8);
    for (int64_t i = 0; i < n && !bad; i++) {
        const int64_t l = limit[per_column ? i : 0];
        bad |= (acc[i] > l) | (acc[i] < -l);
    }
    if (bad) {
        for (int64_t i = 0; i < n; i++) st(out, o + i, saturate(requant(acc[i], mult[per_column ? i : 0], shift), bits));
        return;
    }
    const int64_t half = (int64_t)1 << (shift - 1), q = ((int64_t)1 << (bits - 1)) - 1;
    if (out->dtype == DT_I16) {
        int16_t *dst = (int16_t *)out->data + o;
        for (int64_t i = 0; i < n; i++) { /* arithmetic shift: a floor, as in rshift_round_w */
            const int64_t v = (acc[i] * mult[per_column ? i : 0] + half) >> shift;
            dst[i] = (int16_t)(v > q ? q : (v < -q ? -q : v));
        }
    } else {
        int8_t *dst = (int8_t *)out->data + o;
        for (int64_t i = 0; i < n; i++) {
            const int64_t v = (acc[i] * mult[per_column ? i : 0] + half) >> shift;
            dst[i] = (int8_t)(v > q ? q : (v < -q ? -q : v));
        }
    }
}

/* x[i0 + k] for k < K as int32 */
static void load_row(const Tensor *x, int64_t i0, int64_t K, int32_t *dst) {
    if (x->dtype == DT_I16)
        for (int64_t k = 0; k < K; k++) dst[k] = ((const int16_t *)x->data)[i0 + k];
    else if (x->dtype == DT_I8)
        for (int64_t k = 0; k < K; k++) dst[k] = ((const int8_t *)x->data)[i0 + k];
    else
        for (int64_t k = 0; k < K; k++) dst[k] = (int32_t)ld(x, i0 + k);
}

/* qdense over row blocks [b0, b1) of ROWS rows each */
static void qdense_part(void *arg, int64_t b0, int64_t b1, int slot) {
    DenseWork *d = arg;
    const int64_t K = d->K, N = d->N;
    int64_t *acc = malloc(sizeof(int64_t) * (size_t)(ROWS * N + 1));
    int32_t *part = malloc(sizeof(int32_t) * (size_t)(N + 1));
    int32_t *xr = malloc(sizeof(int32_t) * (size_t)(ROWS * K + 1)), *row = malloc(sizeof(int32_t) * (size_t)(K + 1));
    int32_t *xp = malloc(sizeof(int32_t) * (size_t)(ROWS * ((K + 1) / 2) + 1)); /* packed pairs for the VNNI kernel */
    int16_t *xt16 = malloc(sizeof(int16_t) * (size_t)(ROWS * K + 1));             /* the block input-major, for pencil8 */
    const int pencil8 = d->pencil && d->w->block == 8 && ROWS == 8 && have_vnni();
    const int8_t *w8 = (const int8_t *)d->w->native; /* dense layout: the weight as loaded */
    int64_t issued = 0, nonzero = 0; /* integers: the same sums in any order */
    if (!acc || !part || !xr || !row || !xp || !xt16) {
        d->oom[slot] = 1;
        b1 = b0;
    }
    for (int64_t blk = b0; blk < b1; blk++) {
        int64_t r0 = blk * ROWS, R = d->rows - r0 < ROWS ? d->rows - r0 : ROWS;
        for (int64_t r = 0; r < ROWS; r++) {
            if (r < R) load_row(d->x, (r0 + r) * K, K, row);
            else memset(row, 0, sizeof(int32_t) * (size_t)K);
            for (int64_t kk = 0; kk < K; kk++) {
                nonzero += row[kk] != 0;
                issued += row[kk] ? d->uses[kk] : 0;
            }
            if (pencil8)
                for (int64_t kk = 0; kk < K; kk++) xt16[kk * ROWS + r] = (int16_t)row[kk];
            else if (d->pencil)
                for (int64_t kk = 0; kk < K; kk++) xr[kk * ROWS + r] = row[kk];
            else
                memcpy(xr + r * K, row, sizeof(int32_t) * (size_t)K);
            for (int64_t n = 0; n < N; n++) acc[r * N + n] = d->bias->values[n];
        }
        if (pencil8)
            pencil8_rows_vnni(xt16, d->w, acc, N);
        else if (d->pencil)
            pencil_rows(xr, d->w, acc, N);
        else if (R > ROWS / 2 && d->w->weight_pairs && have_vnni()) /* a full block: all rows at once */
            dense_block_vnni(xr, d->w->weight_pairs, K, N, acc, xp);
        else if (have_avx2() && d->w->weight_pairs)
            for (int64_t r = 0; r < R; r++) dense_row_pairs(xr + r * K, d->w->weight_pairs, K, N, acc + r * N, part);
        else
            for (int64_t r = 0; r < R; r++) dense_row(xr + r * K, w8, K, N, acc + r * N, part);
        for (int64_t r = 0; r < R; r++)
            requant_i64(acc + r * N, N, d->mult->values, d->limit, 1, d->ins->a[0], d->ins->a[1], d->out, (r0 + r) * N);
    }
    free(acc); free(part); free(xr); free(row); free(xp); free(xt16);
    d->issued[slot] = (double)issued;
    d->nonzero[slot] = (double)nonzero;
}

static int op_qdense(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *x = &c->env[operand(ins, 0)];
    const BufferDesc *w = const_of(c, operand(ins, 1)), *bias = const_of(c, operand(ins, 2)), *mult = const_of(c, operand(ins, 3));
    if (!w || !bias || !mult) return spu_fail(c->err, "instruction %d (qdense): weight, bias and multipliers must be constants", k);
    if (need_int(c, x, "qdense input", k)) return -1;
    if (w->rank != 2 || w->dtype != DT_I8 || x->rank < 1 || x->shape[x->rank - 1] != w->shape[0] || bias->numel != w->shape[1] ||
        mult->numel != w->shape[1])
        return spu_fail(c->err, "instruction %d (qdense): input, weight, bias and multiplier shapes do not fit", k);
    int64_t K = w->shape[0], N = w->shape[1], rows = K ? x->numel / K : 0;
    int64_t shape[SPU_MAX_RANK];
    memcpy(shape, x->shape, sizeof(shape));
    shape[x->rank - 1] = N;
    if (tensor_alloc(out, bits_dtype(ins->a[1]), x->rank, shape, c->err)) return -1;
    for (int64_t n = 0; n < N; n++)
        if (bias->values[n] > (INT64_C(1) << 50) || bias->values[n] < -(INT64_C(1) << 50))
            return spu_fail(c->err, "instruction %d (qdense): bias beyond 2**50", k);
    int pencil = w->layout == LY_PENCIL;
    int64_t *uses = malloc(sizeof(int64_t) * (size_t)(K + 1)), *limit = malloc(sizeof(int64_t) * (size_t)(N + 1));
    if (!uses || !limit) {
        free(uses);
        free(limit);
        return spu_fail(c->err, "out of memory");
    }
    for (int64_t n = 0; n < N; n++) limit[n] = requant_limit(mult->values[n]);
    for (int64_t kk = 0; kk < K; kk++) uses[kk] = pencil ? 0 : N;
    if (pencil)
        for (int64_t q = 0; q < w->pencils; q++) uses[w->pencil_index[q]] += w->block;
    double total_per_row = 0;
    for (int64_t kk = 0; kk < K; kk++) total_per_row += (double)uses[kk];
    DenseWork d = {.x = x, .out = out, .w = w, .bias = bias, .mult = mult, .ins = ins, .uses = uses, .limit = limit, .pencil = pencil,
                   .K = K, .N = N, .rows = rows};
    int parts = parallel_for((rows + ROWS - 1) / ROWS, (double)rows * (double)K * (double)N, qdense_part, &d);
    free(uses);
    free(limit);
    double issued = 0, nonzero = 0;
    for (int i = 0; i < parts; i++) {
        if (d.oom[i]) return spu_fail(c->err, "out of memory");
        issued += d.issued[i];
        nonzero += d.nonzero[i];
    }
    double all = total_per_row * (double)rows;
    s->macs = c->cfg->skip_zero_activations ? issued : all;
    s->macs_skipped = all - s->macs;
    s->act_nonzero = nonzero;
    s->act_total = (double)x->numel;
    s->lookups = pencil ? s->macs / (double)w->block : 0; /* pencil index decodes */
    return 0;
}

/* rows [m0, m1) of one batch of a qmatmul, MR at a time (a short last group padded with zero rows) */
static void qmatmul_part(void *arg, int64_t m0, int64_t m1, int slot) {
    MatmulWork *w = arg;
    const int64_t K = w->K, N = w->N;
    double *arows = malloc(sizeof(double) * (size_t)(MR * (K + N) + 1)), *acc = arows + MR * K;
    int64_t *sums = malloc(sizeof(int64_t) * (size_t)(MR * N + 1));
    double issued = 0, skipped = 0;
    w->oom[slot] = !arows || !sums;
    for (int64_t m = m0; m < m1 && !w->oom[slot]; m += MR) {
        const int64_t rows = m1 - m < MR ? m1 - m : MR;
        for (int64_t r = 0; r < MR; r++) {
            int64_t nz = 0;
            for (int64_t kk = 0; kk < K; kk++) {
                arows[r * K + kk] = r < rows ? (double)ld(w->a, w->aoff + (m + r) * K + kk) : 0;
                nz += arows[r * K + kk] != 0;
            }
            if (r < rows) {
                issued += (double)(w->skip ? nz : K) * (double)N;
                skipped += (double)(w->skip ? K - nz : 0) * (double)N;
            }
        }
        matmul_rows(arows, w->bd, K, N, acc);
        for (int64_t i = 0; i < rows * N; i++) sums[i] = (int64_t)acc[i]; /* exact: |acc| < 2**53 for K < 2**23 */
        requant_i64(sums, rows * N, &w->ins->a[0], &w->limit, 0, w->ins->a[1], w->ins->a[2], w->out, w->ooff + m * N);
    }
    free(arows);
    free(sums);
    w->issued[slot] = issued;
    w->skipped[slot] = skipped;
}

/* acc[n] = sum_k a[k] * b[k][n] straight from b's integers, for the few rows of a decoding step (no
   double copy of b): each product (|.| <= 2**30) in int32, summed in int64, exact */
#define FEW_ROW(TB)                                                                                          \
    HOT static void few_row_##TB(const int32_t *restrict a, const TB *restrict b, int64_t K, int64_t N,      \
                                 int64_t *restrict acc) {                                                    \
        for (int64_t n = 0; n < N; n++) acc[n] = 0;                                                          \
        for (int64_t k = 0; k < K; k++) {                                                                    \
            const int32_t av = a[k];                                                                         \
            if (!av) continue;                                                                               \
            const TB *restrict bk = b + k * N;                                                               \
            for (int64_t n = 0; n < N; n++) acc[n] += av * (int32_t)bk[n];                                   \
        }                                                                                                    \
    }
FEW_ROW(int16_t)
FEW_ROW(int8_t)

/* rows [0, M) of one batch of a qmatmul with M < 4; the counts as qmatmul_part keeps them */
static int qmatmul_few(MatmulWork *w, const Tensor *b, int64_t boff, double *issued, double *skipped) {
    const int64_t K = w->K, N = w->N, M = w->M;
    int32_t *arow = malloc(sizeof(int32_t) * (size_t)(K + 1));
    int64_t *acc = malloc(sizeof(int64_t) * (size_t)(N + 1));
    int ok = arow && acc;
    for (int64_t m = 0; m < M && ok; m++) {
        int64_t nz = 0;
        for (int64_t kk = 0; kk < K; kk++) {
            arow[kk] = (int32_t)ld(w->a, w->aoff + m * K + kk);
            nz += arow[kk] != 0;
        }
        *issued += (double)(w->skip ? nz : K) * (double)N;
        *skipped += (double)(w->skip ? K - nz : 0) * (double)N;
        if (b->dtype == DT_I16) few_row_int16_t(arow, (const int16_t *)b->data + boff, K, N, acc);
        else few_row_int8_t(arow, (const int8_t *)b->data + boff, K, N, acc);
        requant_i64(acc, N, &w->ins->a[0], &w->limit, 0, w->ins->a[1], w->ins->a[2], w->out, w->ooff + m * N);
    }
    free(arow); free(acc);
    return ok ? 0 : -1;
}

static int op_qmatmul(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *a = &c->env[operand(ins, 0)], *b = &c->env[operand(ins, 1)];
    if (need_int(c, a, "qmatmul operand", k) || need_int(c, b, "qmatmul operand", k)) return -1;
    if (a->rank < 2 || b->rank < 2 || a->shape[a->rank - 1] != b->shape[b->rank - 2])
        return spu_fail(c->err, "instruction %d (qmatmul): inner dims differ", k);
    int64_t M = a->shape[a->rank - 2], K = a->shape[a->rank - 1], N = b->shape[b->rank - 1];
    Tensor ba = {0}, bb = {0}; /* batch shapes only */
    ba.rank = a->rank - 2; bb.rank = b->rank - 2;
    memcpy(ba.shape, a->shape, sizeof(int64_t) * (size_t)ba.rank);
    memcpy(bb.shape, b->shape, sizeof(int64_t) * (size_t)bb.rank);
    const Tensor *bt[2] = {&ba, &bb};
    Bcast bc;
    if (broadcast(&bc, bt, 2, c->err)) return -1;
    if (bc.rank + 2 > SPU_MAX_RANK) return spu_fail(c->err, "instruction %d (qmatmul): rank too large", k);
    int64_t shape[SPU_MAX_RANK];
    memcpy(shape, bc.shape, sizeof(int64_t) * (size_t)bc.rank);
    shape[bc.rank] = M;
    shape[bc.rank + 1] = N;
    if (tensor_alloc(out, bits_dtype(ins->a[2]), bc.rank + 2, shape, c->err)) return -1;
    if (K >= ((int64_t)1 << 23)) return spu_fail(c->err, "instruction %d (qmatmul): inner dim %lld beyond 2**23", k, (long long)K);
    const int few = M < 4 && (b->dtype == DT_I16 || b->dtype == DT_I8); /* a decoding step: from the integers */
    double *bd = few ? NULL : malloc(sizeof(double) * (size_t)(K * N + 1)); /* b as doubles: [K][N] */
    if (!few && !bd) return spu_fail(c->err, "out of memory");
    MatmulWork w = {.a = a, .out = out, .bd = bd, .ins = ins, .M = M, .K = K, .N = N, .limit = requant_limit(ins->a[0]),
                    .skip = (int)c->cfg->skip_zero_activations};
    double issued = 0, skipped = 0;
    int64_t last_b = -1;
    int oom = 0;
    BCAST_LOOP(bc, 2, {
        int64_t boff = off[1] * K * N;
        w.aoff = off[0] * M * K;
        w.ooff = out_ * M * N;
        if (few) {
            oom |= qmatmul_few(&w, b, boff, &issued, &skipped);
        } else {
            if (boff != last_b) {
                for (int64_t kk = 0; kk < K * N; kk++) bd[kk] = (double)ld(b, boff + kk);
                last_b = boff;
            }
            int parts = parallel_for(M, (double)M * (double)K * (double)N, qmatmul_part, &w);
            for (int i = 0; i < parts; i++) {
                issued += w.issued[i];
                skipped += w.skipped[i];
                oom |= w.oom[i];
            }
        }
    });
    free(bd);
    if (oom) return spu_fail(c->err, "out of memory");
    s->macs = issued;
    s->macs_skipped = skipped;
    return 0;
}

static int op_elementwise(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    int n = ins->op == OP_WHERE ? 3 : 2;
    const Tensor *ts[3];
    for (int j = 0; j < n; j++) ts[j] = &c->env[operand(ins, j)];
    Bcast bc;
    if (broadcast(&bc, ts, n, c->err)) return spu_fail(c->err, "instruction %d (%s): shapes do not broadcast", k, spu_op_name(ins->op));
    int dtype;
    switch (ins->op) {
    case OP_QADD: dtype = bits_dtype(ins->a[3]); break;
    case OP_GREATER: case OP_LESS: case OP_EQUAL: dtype = DT_BOOL; break;
    case OP_WHERE: dtype = ts[1]->dtype; break;
    default: dtype = ts[0]->dtype; break;
    }
    if (ins->op == OP_QADD && (need_int(c, ts[0], "qadd operand", k) || need_int(c, ts[1], "qadd operand", k))) return -1;
    if (tensor_alloc(out, dtype, bc.rank, bc.shape, c->err)) return -1;
    switch (ins->op) {
    case OP_QADD: {
        int64_t ma = ins->a[0], mb = ins->a[1], sh = ins->a[2], bits = ins->a[3];
        BCAST_LOOP(bc, 2, st(out, out_, saturate(clamp64(rshift_round_w((wide)ld(ts[0], off[0]) * ma + (wide)ld(ts[1], off[1]) * mb, sh)), bits)));
        break;
    }
    case OP_ADD: BCAST_LOOP(bc, 2, st(out, out_, (int64_t)((uint64_t)ld(ts[0], off[0]) + (uint64_t)ld(ts[1], off[1])))); break;
    case OP_SUB: BCAST_LOOP(bc, 2, st(out, out_, (int64_t)((uint64_t)ld(ts[0], off[0]) - (uint64_t)ld(ts[1], off[1])))); break;
    case OP_GREATER: BCAST_LOOP(bc, 2, st(out, out_, ld(ts[0], off[0]) > ld(ts[1], off[1]))); break;
    case OP_LESS: BCAST_LOOP(bc, 2, st(out, out_, ld(ts[0], off[0]) < ld(ts[1], off[1]))); break;
    case OP_EQUAL: BCAST_LOOP(bc, 2, st(out, out_, ld(ts[0], off[0]) == ld(ts[1], off[1]))); break;
    case OP_WHERE: BCAST_LOOP(bc, 3, st(out, out_, ld(ts[0], off[0]) ? ld(ts[1], off[1]) : ld(ts[2], off[2]))); break;
    default: return spu_fail(c->err, "instruction %d: not an elementwise op", k);
    }
    s->elements = (double)out->numel;
    return 0;
}

typedef struct {
    const Tensor *x;
    Tensor *out;
    const int32_t *every; /* the interpolated table at each of its positions [0, positions) */
    int64_t half, bits, positions;
    int64_t bad[SPU_MAX_THREADS]; /* the part's first element outside the table, or -1 */
} GeluWork;

/* qgelu over elements [i0, i1) */
static void qgelu_part(void *arg, int64_t i0, int64_t i1, int slot) {
    GeluWork *g = arg;
    g->bad[slot] = -1;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t u = ld(g->x, i) + g->half;
        if (u < 0 || u >= g->positions) { g->bad[slot] = i; return; }
        st(g->out, i, saturate(g->every[u], g->bits));
    }
}

static int op_unary_table(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *x = &c->env[operand(ins, 0)];
    if (need_int(c, x, "input", k)) return -1;
    if (tensor_alloc(out, bits_dtype(ins->op == OP_REQUANTIZE ? ins->a[2] : ins->a[1]), x->rank, x->shape, c->err)) return -1;
    if (ins->op == OP_REQUANTIZE) {
        for (int64_t i = 0; i < x->numel; i++) st(out, i, saturate(requant(ld(x, i), ins->a[0], ins->a[1]), ins->a[2]));
        s->elements = (double)x->numel;
        return 0;
    }
    const BufferDesc *table = const_of(c, operand(ins, 1));
    int64_t bits = ins->a[1], step = ins->a[0];
    if (!table || table->dtype != DT_I32 || table->numel != (((int64_t)1 << (bits - step)) + 1) || step > bits)
        return spu_fail(c->err, "instruction %d (qgelu): table must be an i32 constant of 2**(bits-step_bits)+1 entries", k);
    GeluWork g = {.x = x, .out = out, .half = (int64_t)1 << (bits - 1), .bits = bits};
    int32_t *every = table_every(table, step, &g.positions);
    if (!every) return spu_fail(c->err, "out of memory");
    g.every = every;
    int parts = parallel_for(x->numel, 2.0 * (double)x->numel, qgelu_part, &g);
    free(every);
    for (int i = 0; i < parts; i++) /* the first element outside the table, as one thread would have met it */
        if (g.bad[i] >= 0)
            return spu_fail(c->err, "instruction %d (qgelu): input %lld outside the table", k, (long long)ld(x, g.bad[i]));
    s->elements = (double)x->numel;
    s->lookups = (double)x->numel;
    return 0;
}

typedef struct {
    const Tensor *x;
    Tensor *out;
    const BufferDesc *table;
    const int32_t *every; /* the interpolated table at each of its positions [0, positions) */
    int64_t n, step, bits, positions;
    int fail[SPU_MAX_THREADS]; /* 0, or 1 out of memory, 2 outside the table, 3 negative entry, 4 bad row sum */
    int64_t total[SPU_MAX_THREADS];
} SoftmaxWork;

/* one row of a qsoftmax into e: 0, or 2 outside the table, 3 a negative entry, 4 a row sum that is not
 * positive (into *bad_total), whichever comes first along the row. Plain passes
 * over the row that the compiler vectorises (the table read is a gather). */
HOT static int softmax_row(const int32_t *restrict xv, int64_t n, const int32_t *restrict every, int64_t L, int64_t bits,
                           int32_t *restrict e, int64_t *bad_total) {
    int32_t m = INT32_MIN, lo = INT32_MAX, neg = 0;
    int64_t total = 0;
    for (int64_t j = 0; j < n; j++) {
        m = xv[j] > m ? xv[j] : m;
        lo = xv[j] < lo ? xv[j] : lo;
    }
    if ((int64_t)m - lo < L)
        for (int64_t j = 0; j < n; j++) {
            e[j] = every[m - xv[j]];
            neg |= e[j] < 0;
            total += e[j];
        }
    if ((int64_t)m - lo >= L || neg) /* which comes first along the row */
        for (int64_t j = 0; j < n; j++) {
            if (m - xv[j] >= L) return 2;
            if (every[m - xv[j]] < 0) return 3;
        }
    if (total <= 0) { *bad_total = total; return 4; }
    if (total >= (INT64_C(1) << 51)) { /* beyond the double path: integer division (num < 2**62) */
        for (int64_t j = 0; j < n; j++) {
            const int64_t q = ((int64_t)e[j] * ((int64_t)1 << (bits - 1)) + total / 2) / total;
            e[j] = (int32_t)saturate(q, bits);
        }
        return 0;
    }
    /* q = floor(num / total) for num = e * 2**(bits-1) + floor(total / 2) < 2**52: all exact integers in
       double; the reciprocal's estimate is within one of q, one step each way makes it exact */
    const double t = (double)total, half = (double)(total / 2), scale = (double)((int64_t)1 << (bits - 1)), top = scale - 1,
                 inv = 1.0 / t;
    for (int64_t j = 0; j < n; j++) {
        const double num = (double)e[j] * scale + half;
        double q = (double)(int32_t)(num * inv); /* truncation: num * inv in [0, 2**16) */
        q = q * t > num ? q - 1 : q;
        q = (q + 1) * t <= num ? q + 1 : q;
        e[j] = (int32_t)(q > top ? top : q);
    }
    return 0;
}

/* rows [r0, r1) of a qsoftmax; a part stops at its first bad row */
static void qsoftmax_part(void *arg, int64_t r0, int64_t r1, int slot) {
    SoftmaxWork *w = arg;
    const int64_t n = w->n;
    int32_t *e = malloc(sizeof(int32_t) * (size_t)(2 * n + 1)), *xv = e + n;
    w->fail[slot] = e ? 0 : 1;
    for (int64_t r = r0; r < r1 && !w->fail[slot]; r++) {
        if (w->x->dtype == DT_I16)
            for (int64_t j = 0; j < n; j++) xv[j] = ((const int16_t *)w->x->data)[r * n + j];
        else
            for (int64_t j = 0; j < n; j++) xv[j] = (int32_t)ld(w->x, r * n + j);
        w->fail[slot] = softmax_row(xv, n, w->every, w->positions, w->bits, e, &w->total[slot]);
        if (w->fail[slot]) break;
        if (w->out->dtype == DT_I16)
            for (int64_t j = 0; j < n; j++) ((int16_t *)w->out->data)[r * n + j] = (int16_t)e[j];
        else
            for (int64_t j = 0; j < n; j++) st(w->out, r * n + j, e[j]);
    }
    free(e);
}

static int op_qsoftmax(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *x = &c->env[operand(ins, 0)];
    const BufferDesc *table = const_of(c, operand(ins, 1));
    if (need_int(c, x, "qsoftmax input", k) || x->rank < 1) return -1;
    int64_t step = ins->a[0], bits = ins->a[1], in_bits = x->dtype == DT_I8 ? 8 : 16;
    if (!table || table->dtype != DT_I32 || step > in_bits || table->numel != (((int64_t)1 << (in_bits - step)) + 1))
        return spu_fail(c->err, "instruction %d (qsoftmax): table must be an i32 constant of 2**(input bits - step_bits)+1 entries", k);
    if (tensor_alloc(out, bits_dtype(bits), x->rank, x->shape, c->err)) return -1;
    int64_t n = x->shape[x->rank - 1], rows = n ? x->numel / n : 0;
    int64_t positions;
    int32_t *every = table_every(table, step, &positions);
    if (!every) return spu_fail(c->err, "out of memory");
    SoftmaxWork w = {.x = x, .out = out, .table = table, .every = every, .n = n, .step = step, .bits = bits, .positions = positions};
    int parts = parallel_for(rows, 4.0 * (double)x->numel, qsoftmax_part, &w);
    free(every);
    for (int i = 0; i < parts; i++) { /* the first failing row, as one thread would have met it */
        if (w.fail[i] == 1) return spu_fail(c->err, "out of memory");
        if (w.fail[i] == 2) return spu_fail(c->err, "instruction %d (qsoftmax): input outside the table", k);
        if (w.fail[i] == 3) return spu_fail(c->err, "instruction %d (qsoftmax): negative exp table entry", k);
        if (w.fail[i] == 4) return spu_fail(c->err, "instruction %d (qsoftmax): row sums to %lld", k, (long long)w.total[i]);
    }
    s->elements = (double)x->numel;
    s->lookups = (double)x->numel;
    return 0;
}

typedef struct {
    const Tensor *x;
    Tensor *out;
    const BufferDesc *gamma, *beta;
    int64_t n, eps, gs, bits;
} LayerNormWork;

/* rows [r0, r1) of a qlayer_norm */
static void qlayer_norm_part(void *arg, int64_t r0, int64_t r1, int slot) {
    const LayerNormWork *w = arg;
    const Tensor *x = w->x;
    const int64_t n = w->n;
    for (int64_t r = r0; r < r1; r++) {
        int64_t sum = 0, var = 0;
        for (int64_t j = 0; j < n; j++) sum += ld(x, r * n + j);
        int64_t mu = floordiv(2 * sum + n, 2 * n);
        for (int64_t j = 0; j < n; j++) { int64_t d = ld(x, r * n + j) - mu; var += d * d; }
        var = var / n + w->eps;
        int64_t f = floordiv(40 - bit_length(var), 2);
        f = f > 0 ? f : 0;
        int64_t sd = isqrt64(var * ((int64_t)1 << (2 * f)));
        for (int64_t j = 0; j < n; j++) {
            int64_t num = (ld(x, r * n + j) - mu) * w->gamma->values[j] * ((int64_t)1 << f);
            int64_t y = clamp64((wide)rshift_round(floordiv(2 * num + sd, 2 * sd), w->gs) + w->beta->values[j]);
            st(w->out, r * n + j, saturate(y, w->bits));
        }
    }
}

static int op_qlayer_norm(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *x = &c->env[operand(ins, 0)];
    const BufferDesc *gamma = const_of(c, operand(ins, 1)), *beta = const_of(c, operand(ins, 2));
    if (need_int(c, x, "qlayer_norm input", k) || x->rank < 1) return -1;
    int64_t n = x->shape[x->rank - 1];
    if (!gamma || !beta || gamma->numel != n || beta->numel != n || n < 1 || n > (1 << 20))
        return spu_fail(c->err, "instruction %d (qlayer_norm): gamma and beta must be constants of the last dim", k);
    for (int64_t j = 0; j < n; j++)
        if (gamma->values[j] > (INT64_C(1) << 24) || gamma->values[j] < -(INT64_C(1) << 24))
            return spu_fail(c->err, "instruction %d (qlayer_norm): gamma beyond 2**24", k);
    if (tensor_alloc(out, bits_dtype(ins->a[2]), x->rank, x->shape, c->err)) return -1;
    LayerNormWork w = {.x = x, .out = out, .gamma = gamma, .beta = beta, .n = n, .eps = ins->a[0], .gs = ins->a[1],
                       .bits = ins->a[2]};
    int64_t rows = x->numel / n;
    parallel_for(rows, 4.0 * (double)x->numel, qlayer_norm_part, &w);
    s->elements = (double)x->numel;
    s->lookups = (double)rows; /* one square root per row */
    return 0;
}

static int op_qgather(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const BufferDesc *table = const_of(c, operand(ins, 0)), *mult = const_of(c, operand(ins, 1));
    const Tensor *ids = &c->env[operand(ins, 2)];
    if (!table || !mult || table->rank != 2 || mult->numel != table->shape[1] || ids->rank + 1 > SPU_MAX_RANK)
        return spu_fail(c->err, "instruction %d (qgather): needs a [dim, rows] table and per-row multipliers", k);
    int64_t D = table->shape[0], V = table->shape[1], shape[SPU_MAX_RANK];
    memcpy(shape, ids->shape, sizeof(int64_t) * (size_t)ids->rank);
    shape[ids->rank] = D;
    if (tensor_alloc(out, bits_dtype(ins->a[1]), ids->rank + 1, shape, c->err)) return -1;
    for (int64_t i = 0; i < ids->numel; i++) {
        int64_t id = ld(ids, i);
        if (id < 0) id += V;
        if (id < 0 || id >= V) return spu_fail(c->err, "instruction %d (qgather): index %lld out of range for %lld rows", k, (long long)ld(ids, i), (long long)V);
        for (int64_t d = 0; d < D; d++)
            st(out, i * D + d, saturate(requant(table->values[d * V + id], mult->values[id], ins->a[0]), ins->a[1]));
    }
    s->elements = (double)out->numel;
    return 0;
}

/* values of a small integer tensor (shape vectors, axes, scalars) */
static int int_values(Ctx *c, const Tensor *t, int64_t *out, int max, int k, const char *what) {
    if (t->numel > max) return spu_fail(c->err, "instruction %d: %s has %lld values, at most %d allowed", k, what, (long long)t->numel, max);
    for (int64_t i = 0; i < t->numel; i++) out[i] = ld(t, i);
    return (int)t->numel;
}

static int copy_view(Ctx *c, const Tensor *x, Tensor *out, int rank, const int64_t *shape, int k) {
    int64_t n = 1;
    for (int i = 0; i < rank; i++) n *= shape[i];
    if (n != x->numel) return spu_fail(c->err, "instruction %d (%s): %lld elements cannot take the new shape", k, "reshape", (long long)x->numel);
    if (tensor_alloc(out, x->dtype, rank, shape, c->err)) return -1;
    memcpy(out->data, x->data, (size_t)(x->numel * spu_dtype_size(x->dtype)));
    return 0;
}

static int64_t norm_axis(int64_t a, int rank) { return a < 0 ? a + rank : a; }

static int op_move(Ctx *c, const Instr *ins, int k, Tensor *out, InstrStats *s) {
    const Tensor *x = &c->env[operand(ins, 0)];
    int64_t shape[SPU_MAX_RANK], vals[SPU_MAX_RANK + 2];
    switch (ins->op) {
    case OP_IDENTITY: return copy_view(c, x, out, x->rank, x->shape, k);
    case OP_RESHAPE: {
        int n = int_values(c, &c->env[operand(ins, 1)], vals, SPU_MAX_RANK, k, "reshape shape");
        if (n < 0) return -1;
        int infer = -1;
        int64_t known = 1;
        for (int i = 0; i < n; i++) {
            int64_t d = vals[i];
            if (d == 0 && !(ins->has[0] && ins->a[0])) {
                if (i >= x->rank) return spu_fail(c->err, "instruction %d (reshape): 0 refers past the input rank", k);
                d = x->shape[i];
            }
            if (d == -1) {
                if (infer >= 0) return spu_fail(c->err, "instruction %d (reshape): two -1 dims", k);
                infer = i;
                shape[i] = 1;
                continue;
            }
            if (d < 0) return spu_fail(c->err, "instruction %d (reshape): negative dim %lld", k, (long long)d);
            if (d && known > SPU_MAX_ELEMENTS / d) return spu_fail(c->err, "instruction %d (reshape): more than 2**28 elements", k);
            shape[i] = d;
            known *= d;
        }
        if (infer >= 0) {
            if (known == 0 || x->numel % known) return spu_fail(c->err, "instruction %d (reshape): cannot infer -1", k);
            shape[infer] = x->numel / known;
        }
        return copy_view(c, x, out, n, shape, k);
    }
    case OP_SQUEEZE: case OP_UNSQUEEZE: {
        int n = ins->n_in > 1 ? int_values(c, &c->env[operand(ins, 1)], vals, SPU_MAX_RANK, k, "axes") : 0;
        if (n < 0) return -1;
        int rank = 0;
        if (ins->op == OP_SQUEEZE) {
            int drop[SPU_MAX_RANK] = {0};
            for (int i = 0; i < n; i++) {
                int64_t a = norm_axis(vals[i], x->rank);
                if (a < 0 || a >= x->rank || x->shape[a] != 1) return spu_fail(c->err, "instruction %d (squeeze): axis %lld is not a dim of size 1", k, (long long)vals[i]);
                drop[a] = 1;
            }
            for (int i = 0; i < x->rank; i++)
                if (!(n ? drop[i] : x->shape[i] == 1)) shape[rank++] = x->shape[i];
        } else {
            rank = x->rank + n;
            if (rank > SPU_MAX_RANK) return spu_fail(c->err, "instruction %d (unsqueeze): rank too large", k);
            int add[SPU_MAX_RANK] = {0};
            for (int i = 0; i < n; i++) {
                int64_t a = norm_axis(vals[i], rank);
                if (a < 0 || a >= rank || add[a]) return spu_fail(c->err, "instruction %d (unsqueeze): bad axis %lld", k, (long long)vals[i]);
                add[a] = 1;
            }
            for (int i = 0, j = 0; i < rank; i++) shape[i] = add[i] ? 1 : x->shape[j++];
        }
        return copy_view(c, x, out, rank, shape, k);
    }
    case OP_SHAPE: {
        int64_t start = ins->has[0] ? ins->a[0] : 0, end = ins->has[1] ? ins->a[1] : x->rank;
        if (start < 0) start += x->rank;
        if (end < 0) end += x->rank;
        start = start < 0 ? 0 : (start > x->rank ? x->rank : start);
        end = end < start ? start : (end > x->rank ? x->rank : end);
        int64_t len = end - start;
        if (tensor_alloc(out, DT_I64, 1, &len, c->err)) return -1;
        for (int64_t i = 0; i < len; i++) st(out, i, x->shape[start + i]);
        return 0;
    }
    case OP_RANGE: {
        const Tensor *a = &c->env[operand(ins, 0)], *b = &c->env[operand(ins, 1)], *d = &c->env[operand(ins, 2)];
        if (a->numel != 1 || b->numel != 1 || d->numel != 1) return spu_fail(c->err, "instruction %d (range): start, limit and delta must be scalars", k);
        int64_t s0 = ld(a, 0), lim = ld(b, 0), del = ld(d, 0);
        if (del == 0) return spu_fail(c->err, "instruction %d (range): delta is 0", k);
        wide w = ((wide)lim - s0 + del + (del > 0 ? -1 : 1)) / del;
        if (w > SPU_MAX_ELEMENTS) return spu_fail(c->err, "instruction %d (range): too long", k);
        int64_t n = w > 0 ? (int64_t)w : 0;
        if (tensor_alloc(out, a->dtype, 1, &n, c->err)) return -1;
        for (int64_t i = 0; i < n; i++) st(out, i, (int64_t)((wide)s0 + (wide)i * del));
        return 0;
    }
    case OP_TRANSPOSE: {
        int64_t perm[SPU_MAX_RANK];
        if (ins->list_len >= 0 && ins->list_len != x->rank) return spu_fail(c->err, "instruction %d (transpose): perm length differs from rank", k);
        int seen[SPU_MAX_RANK] = {0};
        for (int i = 0; i < x->rank; i++) {
            perm[i] = ins->list_len >= 0 ? ins->list[i] : x->rank - 1 - i;
            if (perm[i] < 0 || perm[i] >= x->rank || seen[perm[i]]++) return spu_fail(c->err, "instruction %d (transpose): bad perm", k);
            shape[i] = x->shape[perm[i]];
        }
        if (tensor_alloc(out, x->dtype, x->rank, shape, c->err)) return -1;
        int64_t xs[SPU_MAX_RANK], idx[SPU_MAX_RANK] = {0}, off = 0;
        strides_of(x->shape, x->rank, xs);
        for (int64_t o = 0; o < out->numel; o++) {
            st(out, o, ld(x, off));
            for (int i = x->rank - 1; i >= 0; i--) {
                idx[i]++;
                off += xs[perm[i]];
                if (idx[i] < shape[i]) break;
                off -= xs[perm[i]] * shape[i];
                idx[i] = 0;
            }
        }
        s->elements = (double)out->numel;
        return 0;
    }
    case OP_CONCAT: {
        int64_t axis = norm_axis(ins->a[0], x->rank);
        if (axis < 0 || axis >= x->rank) return spu_fail(c->err, "instruction %d (concat): axis out of range", k);
        memcpy(shape, x->shape, sizeof(shape));
        shape[axis] = 0;
        for (int j = 0; j < ins->n_in; j++) {
            const Tensor *t = &c->env[operand(ins, j)];
            if (t->rank != x->rank || t->dtype != x->dtype) return spu_fail(c->err, "instruction %d (concat): inputs differ in rank or dtype", k);
            for (int i = 0; i < x->rank; i++)
                if (i != axis && t->shape[i] != x->shape[i]) return spu_fail(c->err, "instruction %d (concat): inputs differ off the axis", k);
            shape[axis] += t->shape[axis];
        }
        if (tensor_alloc(out, x->dtype, x->rank, shape, c->err)) return -1;
        int64_t outer = 1, inner = 1;
        for (int i = 0; i < axis; i++) outer *= shape[i];
        for (int i = (int)axis + 1; i < x->rank; i++) inner *= shape[i];
        int64_t at = 0, es = spu_dtype_size(x->dtype);
        for (int j = 0; j < ins->n_in; j++) {
            const Tensor *t = &c->env[operand(ins, j)];
            int64_t chunk = t->shape[axis] * inner;
            for (int64_t o = 0; o < outer; o++)
                memcpy((char *)out->data + (o * shape[axis] * inner + at) * es, (const char *)t->data + o * chunk * es, (size_t)(chunk * es));
            at += chunk;
        }
        s->elements = (double)out->numel;
        return 0;
    }
    case OP_GATHER: {
        const Tensor *ids = &c->env[operand(ins, 1)];
        int64_t axis = norm_axis(ins->has[0] ? ins->a[0] : 0, x->rank);
        if (axis < 0 || axis >= x->rank || x->rank - 1 + ids->rank > SPU_MAX_RANK) return spu_fail(c->err, "instruction %d (gather): axis or rank out of range", k);
        int r = 0;
        for (int i = 0; i < axis; i++) shape[r++] = x->shape[i];
        for (int i = 0; i < ids->rank; i++) shape[r++] = ids->shape[i];
        for (int i = (int)axis + 1; i < x->rank; i++) shape[r++] = x->shape[i];
        if (tensor_alloc(out, x->dtype, r, shape, c->err)) return -1;
        int64_t outer = 1, inner = 1, n = x->shape[axis];
        for (int i = 0; i < axis; i++) outer *= x->shape[i];
        for (int i = (int)axis + 1; i < x->rank; i++) inner *= x->shape[i];
        for (int64_t o = 0; o < outer; o++)
            for (int64_t j = 0; j < ids->numel; j++) {
                int64_t id = ld(ids, j);
                if (id < 0) id += n;
                if (id < 0 || id >= n) return spu_fail(c->err, "instruction %d (gather): index %lld out of range for %lld", k, (long long)ld(ids, j), (long long)n);
                for (int64_t i = 0; i < inner; i++) st(out, (o * ids->numel + j) * inner + i, ld(x, (o * n + id) * inner + i));
            }
        return 0;
    }
    case OP_GATHER_ND: {
        const Tensor *ids = &c->env[operand(ins, 1)];
        if (ids->rank < 1) return spu_fail(c->err, "instruction %d (gather_nd): indices need a last dim", k);
        int64_t depth = ids->shape[ids->rank - 1];
        if (depth > x->rank || ids->rank - 1 + x->rank - depth > SPU_MAX_RANK) return spu_fail(c->err, "instruction %d (gather_nd): index depth too large", k);
        int r = 0;
        for (int i = 0; i < ids->rank - 1; i++) shape[r++] = ids->shape[i];
        for (int i = (int)depth; i < x->rank; i++) shape[r++] = x->shape[i];
        if (tensor_alloc(out, x->dtype, r, shape, c->err)) return -1;
        int64_t xs[SPU_MAX_RANK], inner = 1, points = depth ? ids->numel / depth : 1;
        strides_of(x->shape, x->rank, xs);
        for (int i = (int)depth; i < x->rank; i++) inner *= x->shape[i];
        for (int64_t q = 0; q < points; q++) {
            int64_t off = 0;
            for (int64_t d = 0; d < depth; d++) {
                int64_t v = ld(ids, q * depth + d);
                if (v < 0) v += x->shape[d];
                if (v < 0 || v >= x->shape[d]) return spu_fail(c->err, "instruction %d (gather_nd): index %lld out of range", k, (long long)ld(ids, q * depth + d));
                off += v * xs[d];
            }
            for (int64_t i = 0; i < inner; i++) st(out, q * inner + i, ld(x, off + i));
        }
        return 0;
    }
    case OP_EXPAND: {
        int n = int_values(c, &c->env[operand(ins, 1)], vals, SPU_MAX_RANK, k, "expand shape");
        if (n < 0) return -1;
        Tensor shp = {0};
        shp.rank = n;
        for (int i = 0; i < n; i++) { if (vals[i] < 0) return spu_fail(c->err, "instruction %d (expand): negative dim", k); shp.shape[i] = vals[i]; }
        const Tensor *ts[2] = {x, &shp};
        Bcast bc;
        if (broadcast(&bc, ts, 2, c->err)) return spu_fail(c->err, "instruction %d (expand): shapes do not broadcast", k);
        if (tensor_alloc(out, x->dtype, bc.rank, bc.shape, c->err)) return -1;
        BCAST_LOOP(bc, 1, st(out, out_, ld(x, off[0])));
        return 0;
    }
    case OP_SLICE: {
        int64_t starts[SPU_MAX_RANK + 2], ends[SPU_MAX_RANK + 2], axes[SPU_MAX_RANK + 2], steps[SPU_MAX_RANK + 2];
        int n = int_values(c, &c->env[operand(ins, 1)], starts, SPU_MAX_RANK, k, "starts");
        if (n < 0 || int_values(c, &c->env[operand(ins, 2)], ends, SPU_MAX_RANK, k, "ends") != n) return spu_fail(c->err, "instruction %d (slice): starts and ends differ", k);
        for (int i = 0; i < n; i++) { axes[i] = i; steps[i] = 1; }
        if (ins->n_in > 3 && int_values(c, &c->env[operand(ins, 3)], axes, SPU_MAX_RANK, k, "axes") != n) return spu_fail(c->err, "instruction %d (slice): axes differ", k);
        if (ins->n_in > 4 && int_values(c, &c->env[operand(ins, 4)], steps, SPU_MAX_RANK, k, "steps") != n) return spu_fail(c->err, "instruction %d (slice): steps differ", k);
        int64_t lo[SPU_MAX_RANK], step[SPU_MAX_RANK];
        for (int i = 0; i < x->rank; i++) { lo[i] = 0; step[i] = 1; shape[i] = x->shape[i]; }
        for (int i = 0; i < n; i++) {
            int64_t a = axes[i], d;
            if (a < 0 || a >= x->rank) return spu_fail(c->err, "instruction %d (slice): axis %lld out of range", k, (long long)a);
            d = x->shape[a];
            int64_t s0 = starts[i], e0 = ends[i], sp = steps[i];
            if (sp == 0) return spu_fail(c->err, "instruction %d (slice): step 0", k);
            /* python slice.indices */
            if (sp > 0) {
                s0 = s0 < 0 ? (s0 + d < 0 ? 0 : s0 + d) : (s0 > d ? d : s0);
                e0 = e0 < 0 ? (e0 + d < 0 ? 0 : e0 + d) : (e0 > d ? d : e0);
                shape[a] = e0 > s0 ? (e0 - s0 + sp - 1) / sp : 0;
            } else {
                s0 = s0 < 0 ? (s0 + d < 0 ? -1 : s0 + d) : (s0 >= d ? d - 1 : s0);
                e0 = e0 < 0 ? (e0 + d < 0 ? -1 : e0 + d) : (e0 >= d ? d - 1 : e0);
                shape[a] = s0 > e0 ? (s0 - e0 - sp - 1) / -sp : 0;
            }
            lo[a] = s0;
            step[a] = sp;
        }
        if (tensor_alloc(out, x->dtype, x->rank, shape, c->err)) return -1;
        int64_t xs[SPU_MAX_RANK], idx[SPU_MAX_RANK] = {0};
        strides_of(x->shape, x->rank, xs);
        for (int64_t o = 0; o < out->numel; o++) {
            int64_t off = 0;
            for (int i = 0; i < x->rank; i++) off += (lo[i] + idx[i] * step[i]) * xs[i];
            st(out, o, ld(x, off));
            for (int i = x->rank - 1; i >= 0; i--) {
                if (++idx[i] < shape[i]) break;
                idx[i] = 0;
            }
        }
        return 0;
    }
    case OP_IM2COL: {
        if (x->rank != 3) return spu_fail(c->err, "instruction %d (im2col): input must be [N, C, L]", k);
        int64_t K = ins->a[0], stride = ins->has[1] ? ins->a[1] : 1, dil = ins->has[2] ? ins->a[2] : 1;
        int64_t plo = ins->list_len == 2 ? ins->list[0] : 0, phi = ins->list_len == 2 ? ins->list[1] : 0;
        int64_t N = x->shape[0], C = x->shape[1], L = x->shape[2];
        int64_t span = L + plo + phi - dil * (K - 1) - 1;
        int64_t Lo = span >= 0 ? span / stride + 1 : 0;
        shape[0] = N; shape[1] = Lo; shape[2] = C * K;
        if (tensor_alloc(out, x->dtype, 3, shape, c->err)) return -1;
        for (int64_t b = 0; b < N; b++)
            for (int64_t t = 0; t < Lo; t++)
                for (int64_t ch = 0; ch < C; ch++)
                    for (int64_t j = 0; j < K; j++) {
                        int64_t pos = t * stride + j * dil - plo;
                        int64_t v = (pos >= 0 && pos < L) ? ld(x, (b * C + ch) * L + pos) : 0;
                        st(out, ((b * Lo + t) * C + ch) * K + j, v);
                    }
        s->elements = (double)out->numel;
        return 0;
    }
    default: return spu_fail(c->err, "instruction %d: unknown op", k);
    }
}

/* ------------------------------------------------------------------------------------------ timing model */

static double bytes_of(const Tensor *t) { return (double)(t->numel * spu_dtype_size(t->dtype)); }

/* which SRAM bank a buffer starts in (bank-interleaved by address) */
static int64_t bank_of(const Config *cfg, const BufferDesc *b) {
    int64_t bank_bytes = cfg->sram_bank_words * (cfg->sram_word_bits / 8);
    return bank_bytes ? (int64_t)(b->address / (uint64_t)bank_bytes) % (cfg->sram_banks_per_core ? cfg->sram_banks_per_core : 1) : 0;
}

static void account(Ctx *c, const Instr *ins, const Tensor *out, InstrStats *s) {
    const Config *cfg = c->cfg;
    const Program *p = c->p;
    double lanes = (double)(cfg->mac_lanes_per_core * cfg->cores);
    double cores = (double)cfg->cores;
    double word_bytes = (double)(cfg->sram_word_bits >= 8 ? cfg->sram_word_bits / 8 : 1);
    double bank_words[64] = {0};
    int banks = (int)(cfg->sram_banks_per_core > 64 ? 64 : cfg->sram_banks_per_core);
    double ext = 0, transfers = 0;
    /* operands: SRAM words read per bank, external bytes for streamed weights and spilled activations */
    for (int j = 0; j < ins->n_in + ins->n_out; j++) {
        uint16_t id = operand(ins, j);
        const BufferDesc *b = &p->buffers[id];
        const Tensor *t = j < ins->n_in ? &c->env[id] : out;
        double bytes = (b->region == RG_CONST || b->region == RG_STREAM) ? (double)b->nbytes : bytes_of(t);
        double bursts = 1;
        if (ins->op == OP_QGATHER && j < 2 && b->rank >= 1) {
            /* a gather reads only the rows it looks up (table [dim, rows], multipliers [rows]): one
               burst per looked-up row, not the whole table at every decoder step */
            double rows = (double)c->env[operand(ins, 2)].numel, of = (double)b->dims[b->rank - 1].c;
            if (of > 0 && rows < of) {
                bytes = bytes * rows / of;
                bursts = rows;
            }
        }
        double words = ceil(bytes / word_bytes);
        if (j < ins->n_in) s->sram_read_words += words; else s->sram_write_words += words;
        if (b->region == RG_STREAM || b->region == RG_EXTERNAL || b->region == RG_INPUT || b->region == RG_OUTPUT) {
            ext += bytes;
            transfers += bursts;
        }
        if (banks > 0 && (b->region == RG_SRAM || b->region == RG_CONST)) {
            int64_t bank = bank_of(cfg, b) % banks;
            bank_words[bank] += words / cores;
            double *per = j < ins->n_in ? s->bank_reads : s->bank_writes;
            per[bank < SPU_MAX_BANKS ? bank : SPU_MAX_BANKS - 1] += words / cores;
        }
    }
    double spread = (s->sram_read_words + s->sram_write_words) / cores / (banks > 0 ? banks : 1);
    double worst = 0;
    for (int i = 0; i < banks; i++) worst = bank_words[i] > worst ? bank_words[i] : worst;
    double ports = (double)(cfg->bank_read_ports > 0 ? cfg->bank_read_ports : 1);
    s->sram_cycles = (worst > spread ? worst : spread) / ports;
    s->bank_conflict_cycles = worst > spread ? (worst - spread) / ports : 0;
    switch (ins->op) {
    case OP_QDENSE:
        s->compute_cycles = ceil(s->macs / lanes) + s->lookups * (double)cfg->pencil_decode_cycles / cores;
        break;
    case OP_QMATMUL: s->compute_cycles = ceil(s->macs / lanes); break;
    case OP_QGELU: case OP_QSOFTMAX: case OP_QLAYER_NORM:
        s->compute_cycles = ceil(s->elements / lanes) + ceil(s->lookups * (double)cfg->table_lookup_cycles / lanes);
        break;
    default: s->compute_cycles = ceil(s->elements / lanes); break;
    }
    s->external_bytes = ext;
    s->transfer_cycles = ext > 0 ? ext / (double)(cfg->external_bandwidth_bytes_per_cycle > 0 ? cfg->external_bandwidth_bytes_per_cycle : 1)
                                       + transfers * (double)cfg->external_latency_cycles : 0;
    /* double-buffered tiles: transfer overlaps compute and SRAM traffic; the cores meet at a barrier */
    double busy = s->compute_cycles > s->sram_cycles ? s->compute_cycles : s->sram_cycles;
    s->cycles = (busy > s->transfer_cycles ? busy : s->transfer_cycles) + (double)cfg->core_sync_cycles;
    int a16 = 1;
    if (ins->op == OP_QDENSE || ins->op == OP_QMATMUL) a16 = c->env[operand(ins, 0)].dtype == DT_I16;
    s->energy_pj[0] = s->macs * (a16 ? cfg->mac_int16 : cfg->mac_int8);
    s->energy_pj[1] = s->sram_read_words * cfg->sram_read_64b + s->sram_write_words * cfg->sram_write_64b;
    s->energy_pj[2] = (ins->op == OP_QDENSE ? 0 : s->lookups) * cfg->table_lookup;
    s->energy_pj[3] = ext * cfg->external_read_byte;
    s->energy_pj[4] = s->elements * cfg->add_int32;
}

/* ------------------------------------------------------------------------------------------ run */

static int check_declared(Ctx *c, const BufferDesc *b, const Tensor *t, int k, uint16_t id) {
    if (t->dtype != b->dtype || t->rank != b->rank)
        return spu_fail(c->err, "instruction %d (%s) made a tensor of dtype %d rank %d, buffer %u (%s) is dtype %d rank %d", k,
                    spu_op_name(c->p->code[k].op), t->dtype, t->rank, id, b->name, b->dtype, b->rank);
    for (int i = 0; i < b->rank; i++) {
        Dim d = b->dims[i];
        if (d.c == -1 && d.t == 0 && d.p == 0) continue;
        int64_t want = d.c + (int64_t)d.t * c->T + (int64_t)d.p * c->P;
        if (want != t->shape[i])
            return spu_fail(c->err, "instruction %d (%s) made dim %d = %lld, buffer %u (%s) declares %lld", k, spu_op_name(c->p->code[k].op), i,
                        (long long)t->shape[i], id, b->name, (long long)want);
    }
    return 0;
}

int spu_run(const Program *p, const Config *cfg, Tensor *inputs, Tensor *outputs, InstrStats *stats, char *err) {
    Ctx c = {p, cfg, NULL, stats, 0, 0, err};
    int64_t T = -1, P = -1;
    for (uint32_t i = 0; i < p->n_inputs; i++) {
        const BufferDesc *b = &p->buffers[p->symbols[i].buffer];
        if (inputs[i].dtype != b->dtype || inputs[i].rank != b->rank)
            return spu_fail(err, "%s: input %s has dtype %d rank %d, expected dtype %d rank %d", p->graph, p->symbols[i].name,
                            inputs[i].dtype, inputs[i].rank, b->dtype, b->rank);
    }
    /* bind T and P from the inputs: a dim with one unknown symbol fixes it; two rounds, so that
       a dim T + P binds P once T is known (the check below catches any disagreement) */
    for (int round = 0; round < 2; round++) {
        for (uint32_t i = 0; i < p->n_inputs; i++) {
            const BufferDesc *b = &p->buffers[p->symbols[i].buffer];
            for (int k = 0; k < b->rank; k++) {
                Dim d = b->dims[k];
                int64_t *sym = NULL, coef = 0, rest = inputs[i].shape[k] - d.c;
                if (d.t && T < 0 && (!d.p || P >= 0)) { sym = &T; coef = d.t; rest -= (int64_t)d.p * (P < 0 ? 0 : P); }
                else if (d.p && P < 0 && (!d.t || T >= 0)) { sym = &P; coef = d.p; rest -= (int64_t)d.t * (T < 0 ? 0 : T); }
                if (!sym) continue;
                if (rest < 0 || rest % coef)
                    return spu_fail(err, "%s: input %s dim %lld does not fit its declared dim", p->graph, p->symbols[i].name, (long long)inputs[i].shape[k]);
                *sym = rest / coef;
            }
        }
    }
    c.T = T < 0 ? 0 : T;
    c.P = P < 0 ? 0 : P;
    for (uint32_t i = 0; i < p->n_inputs; i++) {
        const BufferDesc *b = &p->buffers[p->symbols[i].buffer];
        for (int k = 0; k < b->rank; k++) {
            Dim d = b->dims[k];
            if (d.c == -1 && !d.t && !d.p) continue;
            if (d.c + (int64_t)d.t * c.T + (int64_t)d.p * c.P != inputs[i].shape[k])
                return spu_fail(err, "%s: input %s has dim %d = %lld, expected %lld", p->graph, p->symbols[i].name, k,
                            (long long)inputs[i].shape[k], (long long)(d.c + (int64_t)d.t * c.T + (int64_t)d.p * c.P));
        }
    }
    c.env = calloc(p->n_buffers + 1, sizeof(Tensor));
    if (!c.env) return spu_fail(err, "out of memory");
    for (uint32_t i = 0; i < p->n_inputs; i++) {
        Tensor *t = &c.env[p->symbols[i].buffer];
        *t = inputs[i];
        t->owned = 0;
    }
    /* constants are visible as tensors too (data movement ops may read them): views of the
       arrays decoded when the program was loaded */
    int rc = 0;
    for (uint32_t i = 0; i < p->n_buffers; i++) {
        const BufferDesc *b = &p->buffers[i];
        if (b->region != RG_CONST && b->region != RG_STREAM) continue;
        Tensor *t = &c.env[i];
        t->dtype = b->dtype;
        t->rank = b->rank;
        memcpy(t->shape, b->shape, sizeof(t->shape));
        t->numel = b->numel;
        t->data = b->native;
        t->owned = 0;
    }
    for (uint32_t k = 0; k < p->n_code && !rc; k++) {
        const Instr *ins = &p->code[k];
        InstrStats *s = &stats[k];
        memset(s, 0, sizeof(*s));
        Tensor out = {0};
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        switch (ins->op) {
        case OP_QDENSE: rc = op_qdense(&c, ins, (int)k, &out, s); break;
        case OP_QMATMUL: rc = op_qmatmul(&c, ins, (int)k, &out, s); break;
        case OP_QADD: case OP_ADD: case OP_SUB: case OP_GREATER: case OP_LESS: case OP_EQUAL: case OP_WHERE:
            rc = op_elementwise(&c, ins, (int)k, &out, s);
            break;
        case OP_REQUANTIZE: case OP_QGELU: rc = op_unary_table(&c, ins, (int)k, &out, s); break;
        case OP_QSOFTMAX: rc = op_qsoftmax(&c, ins, (int)k, &out, s); break;
        case OP_QLAYER_NORM: rc = op_qlayer_norm(&c, ins, (int)k, &out, s); break;
        case OP_QGATHER: rc = op_qgather(&c, ins, (int)k, &out, s); break;
        default: rc = op_move(&c, ins, (int)k, &out, s); break;
        }
        if (!rc) {
            uint16_t id = operand(ins, ins->n_in);
            rc = check_declared(&c, &p->buffers[id], &out, (int)k, id);
            if (!rc) {
                account(&c, ins, &out, s);
                tensor_free(&c.env[id]);
                c.env[id] = out;
            }
        }
        if (rc) tensor_free(&out);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        s->host_seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    }
    for (uint32_t i = 0; i < p->n_outputs && !rc; i++) {
        uint32_t id = p->symbols[p->n_inputs + i].buffer;
        if (outputs[i].data) continue; /* an earlier output with the same buffer made it */
        Tensor *t = &c.env[id];
        if (t->owned) {
            outputs[i] = *t;
            t->owned = 0;
            t->data = NULL;
        } else { /* an input passed straight through: copy it */
            rc = tensor_alloc(&outputs[i], t->dtype, t->rank, t->shape, err);
            if (!rc) memcpy(outputs[i].data, t->data, (size_t)(t->numel * spu_dtype_size(t->dtype)));
        }
        /* the same buffer may be two outputs; the first took it */
        for (uint32_t j = i + 1; j < p->n_outputs; j++)
            if (p->symbols[p->n_inputs + j].buffer == id) {
                rc = tensor_alloc(&outputs[j], outputs[i].dtype, outputs[i].rank, outputs[i].shape, err);
                if (!rc) memcpy(outputs[j].data, outputs[i].data, (size_t)(outputs[i].numel * spu_dtype_size(outputs[i].dtype)));
            }
    }
    for (uint32_t i = 0; i < p->n_buffers; i++) tensor_free(&c.env[i]);
    free(c.env);
    return rc;
}
