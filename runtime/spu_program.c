/* Parsing and full validation of .spu programs (the format of femtocc/runtime/program.py).
 *
 * Every read is bounds-checked; every count, index, address, size and blob is checked before the
 * program can run. Errors are reported as one message naming the part of the file.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spusim.h"

#define ABSENT INT64_MIN
#define HEADER_SIZE SPU_HEADER_SIZE
#define BUFFER_SIZE SPU_BUFFER_SIZE
#define INSTR_SIZE SPU_INSTR_SIZE
#define SYMBOL_SIZE SPU_SYMBOL_SIZE

/* per opcode: scalar attribute count, whether a list follows, which scalars are required (bit mask),
   min and max inputs (as stored in the program) */
typedef struct { const char *name; int scalars, list, required, min_in, max_in; } OpSpec;

#define SPU_OP_SPEC(op, name, scalars, list, required, min_in, max_in) [op] = {name, scalars, list, required, min_in, max_in},
static const OpSpec OPS[OP_COUNT] = {SPU_OPS(SPU_OP_SPEC)};

const char *spu_op_name(int op) { return (op >= 0 && op < OP_COUNT) ? OPS[op].name : "?"; }

int spu_fail(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, SPU_ERR_LEN, fmt, ap);
    va_end(ap);
    return -1;
}

int64_t spu_dtype_size(int dtype) {
    static const int64_t sizes[DT_COUNT] = {1, 2, 4, 8, 1, 1};
    return (dtype >= 0 && dtype < DT_COUNT) ? sizes[dtype] : 0;
}

static uint32_t crc32_of(const uint8_t *data, size_t n) {
    static uint32_t table[256];
    static int ready = 0;
    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        ready = 1;
    }
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

/* little-endian readers over a bounded cursor */
typedef struct { const uint8_t *data; size_t pos, end; const char *where; char *err; } Cursor;

static int take(Cursor *c, size_t n, const char *what, const uint8_t **out) {
    if (n > c->end - c->pos) {
        spu_fail(c->err, "%s: truncated in %s (needs %zu bytes at offset %zu, %zu left)", c->where, what, n, c->pos,
             c->end - c->pos);
        return -1;
    }
    *out = c->data + c->pos;
    c->pos += n;
    return 0;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

void spu_free(Program *p) {
    if (p->buffers) {
        for (uint32_t i = 0; i < p->n_buffers; i++) {
            free(p->buffers[i].values);
            free(p->buffers[i].native);
            free(p->buffers[i].pencil_index);
            free(p->buffers[i].pencil_words);
            free(p->buffers[i].weight_pairs);
        }
    }
    if (p->strings) {
        for (uint32_t i = 0; i < p->n_strings; i++) free(p->strings[i]);
    }
    if (p->code) {
        for (uint32_t i = 0; i < p->n_code; i++) free(p->code[i].params);
    }
    free(p->strings);
    free(p->buffers);
    free(p->code);
    free(p->symbols);
    free(p->data);
    memset(p, 0, sizeof(*p));
}

static int decode_values(BufferDesc *b, uint32_t index, char *err);

/* a constant's values, and once more in its own dtype so every run can read it without a copy */
static int decode_constant(BufferDesc *b, uint32_t index, char *err) {
    if (decode_values(b, index, err)) return -1;
    int64_t size = spu_dtype_size(b->dtype);
    b->native = malloc((size_t)((b->numel ? b->numel : 1) * size));
    if (!b->native) return spu_fail(err, "buffer %u (%s): out of memory", index, b->name);
    for (int64_t i = 0; i < b->numel; i++) {
        int64_t v = b->values[i];
        switch (b->dtype) {
        case DT_I8: ((int8_t *)b->native)[i] = (int8_t)v; break;
        case DT_I16: ((int16_t *)b->native)[i] = (int16_t)v; break;
        case DT_I32: ((int32_t *)b->native)[i] = (int32_t)v; break;
        case DT_I64: ((int64_t *)b->native)[i] = v; break;
        default: ((uint8_t *)b->native)[i] = (uint8_t)v; break;
        }
    }
    if (b->layout == LY_DENSE) { /* for the executor's paired multiply-add (vpmaddwd) */
        int64_t K = b->shape[0], N = b->shape[1], P = (K + 1) / 2;
        b->weight_pairs = calloc((size_t)(P * N * 2 + 1), sizeof(int16_t));
        if (!b->weight_pairs) return spu_fail(err, "buffer %u (%s): out of memory", index, b->name);
        for (int64_t k = 0; k < K; k++)
            for (int64_t n = 0; n < N; n++) b->weight_pairs[((k / 2) * N + n) * 2 + (k & 1)] = (int16_t)b->values[k * N + n];
    }
    return 0;
}

static int alloc_values(BufferDesc *b, uint32_t index, char *err) {
    b->values = malloc(sizeof(int64_t) * (size_t)(b->numel ? b->numel : 1));
    return b->values ? 0 : spu_fail(err, "buffer %u (%s): out of memory", index, b->name);
}

static int decode_values(BufferDesc *b, uint32_t index, char *err) {
    int64_t numel = 1;
    for (int k = 0; k < b->rank; k++) {
        if (b->dims[k].t || b->dims[k].p || b->dims[k].c < 0)
            return spu_fail(err, "buffer %u (%s): a constant must have a static shape", index, b->name);
        b->shape[k] = b->dims[k].c;
        if (b->shape[k] && numel > SPU_MAX_ELEMENTS / b->shape[k])
            return spu_fail(err, "buffer %u (%s): constant of more than 2**28 elements", index, b->name);
        numel *= b->shape[k];
    }
    b->numel = numel;
    const uint8_t *raw = b->blob;
    uint64_t n = b->nbytes;
    /* every size is checked against the bytes before anything of that size is allocated */
    if (b->layout == LY_RAW) {
        int64_t size = spu_dtype_size(b->dtype);
        if (n != (uint64_t)(numel * size))
            return spu_fail(err, "constant %s has %llu bytes, its shape needs %lld", b->name, (unsigned long long)n,
                        (long long)(numel * size));
        if (alloc_values(b, index, err)) return -1;
        for (int64_t i = 0; i < numel; i++) {
            const uint8_t *q = raw + i * size;
            switch (b->dtype) {
            case DT_I8: b->values[i] = (int8_t)q[0]; break;
            case DT_I16: b->values[i] = (int16_t)rd16(q); break;
            case DT_I32: b->values[i] = (int32_t)rd32(q); break;
            case DT_I64: b->values[i] = (int64_t)rd64(q); break;
            case DT_BOOL: b->values[i] = q[0] != 0; break;
            default: b->values[i] = q[0]; break;
            }
        }
        return 0;
    }
    if (b->dtype != DT_I8 || b->rank != 2 || (b->bits != 4 && b->bits != 8))
        return spu_fail(err, "weight %s in a weight layout must be a 2-D i8 with bits 4 or 8", b->name);
    int64_t n_in = b->shape[0], n_out = b->shape[1];
    int four = b->bits == 4;
    if (b->layout == LY_DENSE) {
        uint64_t need = four ? (uint64_t)((numel + 1) / 2) : (uint64_t)numel;
        if (n != need)
            return spu_fail(err, "weight %s has %llu bytes, dense %u-bit needs %llu", b->name, (unsigned long long)n, b->bits,
                        (unsigned long long)need);
        if (alloc_values(b, index, err)) return -1;
        for (int64_t i = 0; i < numel; i++) {
            if (four) {
                int v = (raw[i / 2] >> ((i & 1) * 4)) & 0xF;
                b->values[i] = v > 7 ? v - 16 : v;
            } else {
                b->values[i] = (int8_t)raw[i];
            }
        }
        return 0;
    }
    const int64_t h = b->block;
    if (h < 1 || n_out % h)
        return spu_fail(err, "weight %s has %lld outputs, not a multiple of the pencil %lld", b->name, (long long)n_out, (long long)h);
    int64_t groups = n_out / h;
    uint64_t head = 4 * (uint64_t)(groups + 1);
    if (n < head) return spu_fail(err, "pencil weight %s truncated in its offsets", b->name);
    uint32_t first = rd32(raw);
    if (first != 0) return spu_fail(err, "pencil weight %s: offsets must start at 0", b->name);
    for (int64_t g = 0; g < groups; g++) {
        uint32_t a = rd32(raw + 4 * g), c = rd32(raw + 4 * (g + 1));
        if (c < a || c - a > n_in)
            return spu_fail(err, "pencil weight %s has offsets that are not non-decreasing counts <= %lld", b->name, (long long)n_in);
    }
    int64_t pencils = rd32(raw + 4 * groups);
    uint64_t body = four ? ((uint64_t)pencils * (uint64_t)h + 1) / 2 : (uint64_t)pencils * (uint64_t)h;
    uint64_t need = head + 2 * (uint64_t)pencils + body;
    if (n != need)
        return spu_fail(err, "pencil weight %s has %llu bytes, %lld pencils need %llu", b->name, (unsigned long long)n,
                    (long long)pencils, (unsigned long long)need);
    if (alloc_values(b, index, err)) return -1;
    b->pencils = pencils;
    const size_t slots = (size_t)(pencils + (pencils & 1) + 2); /* the offsets after the indices, 4-byte aligned */
    b->pencil_index = malloc(sizeof(uint16_t) * slots + sizeof(uint32_t) * (size_t)(groups + 1));
    b->pencil_words = malloc((size_t)(pencils ? pencils : 1) * (size_t)h);
    if (!b->pencil_index || !b->pencil_words) return spu_fail(err, "weight %s: out of memory", b->name);
    uint32_t *offsets = (uint32_t *)(b->pencil_index + slots);
    for (int64_t g = 0; g <= groups; g++) offsets[g] = rd32(raw + 4 * g);
    b->pencil_offsets = offsets;
    const uint8_t *idx = raw + head, *words = raw + head + 2 * pencils;
    memset(b->values, 0, sizeof(int64_t) * (size_t)numel);
    for (int64_t g = 0; g < groups; g++) {
        for (uint32_t q = offsets[g]; q < offsets[g + 1]; q++) {
            uint16_t k = rd16(idx + 2 * (uint64_t)q);
            if (k >= n_in) return spu_fail(err, "pencil weight %s has input index %u >= %lld inputs", b->name, k, (long long)n_in);
            if (q > offsets[g] && k <= b->pencil_index[q - 1])
                return spu_fail(err, "pencil weight %s has input indices that do not increase within a group", b->name);
            b->pencil_index[q] = k;
            for (int64_t j = 0; j < h; j++) {
                int v;
                uint64_t e = (uint64_t)q * (uint64_t)h + (uint64_t)j;
                if (four) {
                    v = (words[e / 2] >> ((e & 1) * 4)) & 0xF;
                    v = v > 7 ? v - 16 : v;
                } else {
                    v = (int8_t)words[e];
                }
                b->pencil_words[e] = (int8_t)v;
                b->values[k * n_out + g * h + j] = v;
            }
        }
    }
    return 0;
}

static int decode_params(Instr *ins, uint32_t k, char *err) {
    const OpSpec *s = &OPS[ins->op];
    int pos = 0;
    for (int i = 0; i < s->scalars; i++) {
        if (pos >= ins->n_params) return spu_fail(err, "instruction %u (%s): params end early", k, s->name);
        ins->a[i] = ins->params[pos++];
        ins->has[i] = ins->a[i] != ABSENT;
        if (!ins->has[i] && (s->required >> i) & 1)
            return spu_fail(err, "instruction %u (%s): required param %d is absent", k, s->name, i);
    }
    ins->list_len = -1;
    if (s->list) {
        if (pos >= ins->n_params) return spu_fail(err, "instruction %u (%s): params end before the list", k, s->name);
        int64_t n = ins->params[pos++];
        if (n != ABSENT) {
            if (n < 0 || n > SPU_MAX_RANK + 2 || n > ins->n_params - pos)
                return spu_fail(err, "instruction %u (%s): list claims %lld items", k, s->name, (long long)n);
            for (int64_t i = 0; i < n; i++) ins->list[i] = ins->params[pos++];
            ins->list_len = (int)n;
        }
    }
    if (pos != ins->n_params) return spu_fail(err, "instruction %u (%s): %d params left over", k, s->name, ins->n_params - pos);
    /* ranges the arithmetic relies on */
    switch (ins->op) {
    case OP_QDENSE: case OP_QGATHER:
        if (ins->a[0] < 0 || ins->a[0] > 62) return spu_fail(err, "instruction %u (%s): shift outside 0..62", k, s->name);
        if (ins->a[1] != 8 && ins->a[1] != 16) return spu_fail(err, "instruction %u (%s): bits must be 8 or 16", k, s->name);
        break;
    case OP_QMATMUL: case OP_REQUANTIZE:
        if (ins->a[1] < 0 || ins->a[1] > 62) return spu_fail(err, "instruction %u (%s): shift outside 0..62", k, s->name);
        if (ins->a[2] != 8 && ins->a[2] != 16) return spu_fail(err, "instruction %u (%s): bits must be 8 or 16", k, s->name);
        if (ins->a[0] < -(INT64_C(1) << 40) || ins->a[0] > (INT64_C(1) << 40))
            return spu_fail(err, "instruction %u (%s): multiplier out of range", k, s->name);
        break;
    case OP_QADD:
        if (ins->a[2] < 0 || ins->a[2] > 62) return spu_fail(err, "instruction %u (qadd): shift outside 0..62", k);
        if (ins->a[3] != 8 && ins->a[3] != 16) return spu_fail(err, "instruction %u (qadd): bits must be 8 or 16", k);
        for (int i = 0; i < 2; i++)
            if (ins->a[i] < -(INT64_C(1) << 40) || ins->a[i] > (INT64_C(1) << 40))
                return spu_fail(err, "instruction %u (qadd): multiplier out of range", k);
        break;
    case OP_QGELU: case OP_QSOFTMAX:
        if (ins->a[0] < 0 || ins->a[0] > 16) return spu_fail(err, "instruction %u (%s): step_bits outside 0..16", k, s->name);
        if (ins->a[1] != 8 && ins->a[1] != 16) return spu_fail(err, "instruction %u (%s): bits must be 8 or 16", k, s->name);
        break;
    case OP_QLAYER_NORM:
        if (ins->a[0] < 1 || ins->a[0] > (INT64_C(1) << 40)) return spu_fail(err, "instruction %u (qlayer_norm): eps out of range", k);
        if (ins->a[1] < 0 || ins->a[1] > 62) return spu_fail(err, "instruction %u (qlayer_norm): gamma_shift outside 0..62", k);
        if (ins->a[2] != 8 && ins->a[2] != 16) return spu_fail(err, "instruction %u (qlayer_norm): bits must be 8 or 16", k);
        break;
    case OP_IM2COL:
        if (ins->a[0] < 1 || ins->a[0] > 4096) return spu_fail(err, "instruction %u (im2col): kernel out of range", k);
        if ((ins->has[1] && (ins->a[1] < 1 || ins->a[1] > 4096)) || (ins->has[2] && (ins->a[2] < 1 || ins->a[2] > 4096)))
            return spu_fail(err, "instruction %u (im2col): stride and dilation must be in 1..4096", k);
        if (ins->list_len != -1 && (ins->list_len != 2 || ins->list[0] < 0 || ins->list[1] < 0 || ins->list[0] > 4096 || ins->list[1] > 4096))
            return spu_fail(err, "instruction %u (im2col): pads must be two values in 0..4096", k);
        break;
    case OP_GATHER_ND:
        if (ins->has[0] && ins->a[0] != 0) return spu_fail(err, "instruction %u (gather_nd): batch_dims must be 0", k);
        break;
    default: break;
    }
    return 0;
}

int spu_parse(Program *p, const uint8_t *bytes, size_t size, char *err) {
    memset(p, 0, sizeof(*p));
    if (size < HEADER_SIZE + 4) return spu_fail(err, "program: %zu bytes is too short for a .spu program", size);
    uint32_t crc = rd32(bytes + size - 4);
    if (crc32_of(bytes, size - 4) != crc) return spu_fail(err, "program: checksum mismatch (file corrupted or truncated)");
    p->data = malloc(size);
    if (!p->data) return spu_fail(err, "program: out of memory");
    memcpy(p->data, bytes, size);
    p->size = size;
    Cursor c = {p->data, 0, size - 4, "program", err};
    const uint8_t *h;
    if (take(&c, HEADER_SIZE, "header", &h)) goto bad;
    if (memcmp(h, "SPU\0", 4) != 0) { spu_fail(err, "program: not a .spu program (bad magic)"); goto bad; }
    if (rd16(h + 4) != SPU_VERSION) {
        spu_fail(err, "program: format version %u, this simulator reads version %d", rd16(h + 4), SPU_VERSION);
        goto bad;
    }
    memcpy(p->target, h + 8, 16);
    memcpy(p->graph, h + 24, 16);
    p->n_strings = rd32(h + 40);
    p->n_buffers = rd32(h + 44);
    p->n_code = rd32(h + 48);
    p->n_inputs = rd32(h + 52);
    p->n_outputs = rd32(h + 56);
    p->blob_bytes = rd64(h + 60);
    p->sram_bytes_per_core = rd32(h + 68);
    p->cores = rd32(h + 72);
    p->external_bytes = rd64(h + 76);
    /* every count must be backed by bytes, so nothing below can allocate absurd sizes */
    if ((uint64_t)p->n_strings * 2 > size || (uint64_t)p->n_buffers * BUFFER_SIZE > size ||
        (uint64_t)p->n_code * INSTR_SIZE > size || ((uint64_t)p->n_inputs + p->n_outputs) * SYMBOL_SIZE > size ||
        p->blob_bytes > size) {
        spu_fail(err, "program: header counts exceed the file size");
        goto bad;
    }
    if (p->cores < 1 || p->cores > 64) { spu_fail(err, "program: %u cores, expected 1..64", p->cores); goto bad; }
    p->strings = calloc(p->n_strings + 1, sizeof(char *));
    p->buffers = calloc(p->n_buffers + 1, sizeof(BufferDesc));
    p->code = calloc(p->n_code + 1, sizeof(Instr));
    p->symbols = calloc(p->n_inputs + p->n_outputs + 1, sizeof(Symbol));
    if (!p->strings || !p->buffers || !p->code || !p->symbols) { spu_fail(err, "program: out of memory"); goto bad; }
    for (uint32_t i = 0; i < p->n_strings; i++) {
        const uint8_t *q;
        if (take(&c, 2, "string length", &q)) goto bad;
        uint16_t len = rd16(q);
        if (take(&c, len, "string", &q)) goto bad;
        p->strings[i] = malloc(len + 1u);
        if (!p->strings[i]) { spu_fail(err, "program: out of memory"); goto bad; }
        memcpy(p->strings[i], q, len);
        p->strings[i][len] = 0;
    }
    for (uint32_t i = 0; i < p->n_buffers; i++) {
        const uint8_t *q;
        if (take(&c, BUFFER_SIZE, "buffer", &q)) goto bad;
        BufferDesc *b = &p->buffers[i];
        uint32_t name = rd32(q);
        if (name >= p->n_strings) { spu_fail(err, "program: buffer %u names string %u, only %u exist", i, name, p->n_strings); goto bad; }
        b->name = p->strings[name];
        b->dtype = q[4]; b->region = q[5]; b->layout = q[6]; b->rank = q[7];
        if (b->dtype >= DT_COUNT || b->region >= RG_COUNT || b->layout >= LY_COUNT || b->rank > SPU_MAX_RANK) {
            spu_fail(err, "program: buffer %u (%s) has dtype %d, region %d, layout %d, rank %d out of range", i, b->name,
                 b->dtype, b->region, b->layout, b->rank);
            goto bad;
        }
        for (int k = 0; k < SPU_MAX_RANK; k++) {
            b->dims[k].c = (int32_t)rd32(q + 8 + 12 * k);
            b->dims[k].t = (int32_t)rd32(q + 12 + 12 * k);
            b->dims[k].p = (int32_t)rd32(q + 16 + 12 * k);
        }
        b->address = rd64(q + 80);
        b->nbytes = rd64(q + 88);
        b->blob_offset = rd64(q + 96);
        b->bits = rd32(q + 104);
        b->block = rd32(q + 108);
        if ((b->layout == LY_PENCIL) != (b->block != 0) || b->block > SPU_MAX_BLOCK) {
            spu_fail(err, "program: buffer %u (%s) has block %u; a pencil buffer needs its pencil height in 1..%d, other layouts 0",
                     i, b->name, b->block, SPU_MAX_BLOCK);
            goto bad;
        }
    }
    for (uint32_t k = 0; k < p->n_code; k++) {
        const uint8_t *q;
        if (take(&c, INSTR_SIZE, "instruction", &q)) goto bad;
        Instr *ins = &p->code[k];
        ins->op = rd16(q);
        ins->n_in = q[2];
        ins->n_out = q[3];
        ins->n_params = rd16(q + 4);
        ins->tile_rows = rd16(q + 6);
        if (ins->op >= OP_COUNT) { spu_fail(err, "program: instruction %u has opcode %d; this version knows %d", k, ins->op, OP_COUNT); goto bad; }
        if (take(&c, 2u * (ins->n_in + ins->n_out), "instruction operands", &q)) goto bad;
        ins->ids = (const uint16_t *)q; /* read through rd16 */
        const uint8_t *pp;
        if (take(&c, 8u * ins->n_params, "instruction params", &pp)) goto bad;
        ins->params = malloc(sizeof(int64_t) * (ins->n_params + 1u));
        if (!ins->params) { spu_fail(err, "program: out of memory"); goto bad; }
        for (int i = 0; i < ins->n_params; i++) ins->params[i] = (int64_t)rd64(pp + 8 * i);
    }
    for (uint32_t i = 0; i < p->n_inputs + p->n_outputs; i++) {
        const uint8_t *q;
        if (take(&c, SYMBOL_SIZE, "symbol", &q)) goto bad;
        uint32_t name = rd32(q);
        if (name >= p->n_strings) { spu_fail(err, "program: symbol %u names string %u, only %u exist", i, name, p->n_strings); goto bad; }
        p->symbols[i].name = p->strings[name];
        p->symbols[i].buffer = rd32(q + 4);
        uint64_t bits = rd64(q + 8);
        memcpy(&p->symbols[i].scale, &bits, 8);
        if (p->symbols[i].buffer >= p->n_buffers) {
            spu_fail(err, "program: symbol %s names buffer %u, only %u exist", p->symbols[i].name, p->symbols[i].buffer, p->n_buffers);
            goto bad;
        }
    }
    const uint8_t *blob;
    if (take(&c, p->blob_bytes, "constant blobs", &blob)) goto bad;
    if (c.pos != c.end) { spu_fail(err, "program: %zu unexpected bytes before the checksum", c.end - c.pos); goto bad; }

    /* memory map */
    for (uint32_t i = 0; i < p->n_buffers; i++) {
        BufferDesc *b = &p->buffers[i];
        if (b->region == RG_SRAM && (b->address > p->sram_bytes_per_core || b->nbytes > p->sram_bytes_per_core - b->address)) {
            spu_fail(err, "program: buffer %u (%s) at SRAM address %llu + %llu bytes exceeds the %u bytes per core", i, b->name,
                 (unsigned long long)b->address, (unsigned long long)b->nbytes, p->sram_bytes_per_core);
            goto bad;
        }
        if (b->region == RG_EXTERNAL && (b->address > p->external_bytes || b->nbytes > p->external_bytes - b->address)) {
            spu_fail(err, "program: buffer %u (%s) exceeds the external memory", i, b->name);
            goto bad;
        }
        if (b->region == RG_CONST || b->region == RG_STREAM) {
            if (b->blob_offset > p->blob_bytes || b->nbytes > p->blob_bytes - b->blob_offset) {
                spu_fail(err, "program: buffer %u (%s) blob runs past the %llu blob bytes", i, b->name, (unsigned long long)p->blob_bytes);
                goto bad;
            }
            b->blob = blob + b->blob_offset;
            char sub[SPU_ERR_LEN];
            if (decode_constant(b, i, sub)) { spu_fail(err, "program: %s", sub); goto bad; }
        }
    }
    /* code: arity, operands, definitions before use, params */
    char *defined = calloc(p->n_buffers + 1, 1);
    if (!defined) { spu_fail(err, "program: out of memory"); goto bad; }
    for (uint32_t i = 0; i < p->n_inputs; i++) defined[p->symbols[i].buffer] = 1;
    for (uint32_t i = 0; i < p->n_buffers; i++)
        if (p->buffers[i].region == RG_CONST || p->buffers[i].region == RG_STREAM) defined[i] = 1;
    for (uint32_t k = 0; k < p->n_code; k++) {
        Instr *ins = &p->code[k];
        const OpSpec *s = &OPS[ins->op];
        if (ins->n_in < s->min_in || ins->n_in > s->max_in || ins->n_out != 1) {
            spu_fail(err, "program: instruction %u (%s): %d inputs and %d outputs do not fit the op", k, s->name, ins->n_in, ins->n_out);
            free(defined);
            goto bad;
        }
        const uint8_t *ids = (const uint8_t *)ins->ids;
        for (int j = 0; j < ins->n_in + ins->n_out; j++) {
            uint16_t id = rd16(ids + 2 * j);
            if (id >= p->n_buffers) {
                spu_fail(err, "program: instruction %u (%s): operand buffer %u does not exist (%u buffers)", k, s->name, id, p->n_buffers);
                free(defined);
                goto bad;
            }
            if (j < ins->n_in && !defined[id]) {
                spu_fail(err, "program: instruction %u (%s): reads buffer %u (%s) before anything writes it", k, s->name, id,
                     p->buffers[id].name);
                free(defined);
                goto bad;
            }
        }
        for (int j = ins->n_in; j < ins->n_in + ins->n_out; j++) {
            uint16_t id = rd16(ids + 2 * j);
            if (p->buffers[id].region == RG_CONST || p->buffers[id].region == RG_STREAM || p->buffers[id].region == RG_INPUT) {
                spu_fail(err, "program: instruction %u (%s) writes buffer %u (%s), a constant or input", k, s->name, id, p->buffers[id].name);
                free(defined);
                goto bad;
            }
            defined[id] = 1;
        }
        char sub[SPU_ERR_LEN];
        if (decode_params(ins, k, sub)) {
            spu_fail(err, "program: %s", sub);
            free(defined);
            goto bad;
        }
    }
    for (uint32_t i = p->n_inputs; i < p->n_inputs + p->n_outputs; i++) {
        if (!defined[p->symbols[i].buffer]) {
            spu_fail(err, "program: output %s (buffer %u) is never written", p->symbols[i].name, p->symbols[i].buffer);
            free(defined);
            goto bad;
        }
    }
    free(defined);
    return 0;
bad:
    spu_free(p);
    return -1;
}
