/* libFuzzer harness for the spu001 program loader and executor (runtime/spu_program.c, spu_exec.c).
 *
 * One input is a .spu program without its 4-byte CRC-32 trailer: the harness appends the checksum,
 * so that mutations reach the parser and validator instead of stopping at the checksum. A program
 * that validates is then run once on small deterministic inputs (T = 3 new tokens after P = 2
 * cached ones; every free dim 1), with the hardware parameters of the target description, read at
 * start-up from the file named by $SPU_FUZZ_CONFIG ("key value" lines that
 * tests/fuzz/make_seeds.py writes from femtocc.runtime.sim.sim_config). Build and run with
 * benchmarks/fuzz.py.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spusim.h"

#define FUZZ_T 3
#define FUZZ_P 2
#define FUZZ_MAX_INPUT_ELEMENTS (1 << 16)

static Config cfg;

static uint32_t crc32_of(const uint8_t *data, size_t n) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

/* the keys of SPU_CONFIG (runtime/spu_isa.h, generated from the target description) */
static int set_key(const char *key, double v) {
#define SET_INT(k) if (!strcmp(key, #k)) { cfg.k = (int64_t)v; return 0; }
#define SET_REAL(k) if (!strcmp(key, #k)) { cfg.k = v; return 0; }
    SPU_CONFIG(SET_INT, SET_REAL)
#undef SET_INT
#undef SET_REAL
    return -1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *path = getenv("SPU_FUZZ_CONFIG");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) {
        fprintf(stderr, "spu_fuzz: set SPU_FUZZ_CONFIG to the config file that tests/fuzz/make_seeds.py writes\n");
        exit(2);
    }
    char key[128];
    double v;
    while (fscanf(f, "%127s %lf", key, &v) == 2)
        if (set_key(key, v)) {
            fprintf(stderr, "spu_fuzz: %s: unknown key %s\n", path, key);
            exit(2);
        }
    fclose(f);
    if (cfg.cores < 1 || cfg.mac_lanes_per_core < 1 || cfg.pencil < 1 || cfg.sram_word_bits < 8) {
        fprintf(stderr, "spu_fuzz: %s: incomplete config\n", path);
        exit(2);
    }
    return 0;
}

/* inputs of the declared shapes (T, P bound as above), filled from a tiny PRNG seeded by the program */
static int make_inputs(const Program *p, Tensor *in, uint64_t seed) {
    for (uint32_t i = 0; i < p->n_inputs; i++) {
        const BufferDesc *b = &p->buffers[p->symbols[i].buffer];
        in[i].dtype = b->dtype;
        in[i].rank = b->rank;
        int64_t n = 1;
        for (int k = 0; k < b->rank; k++) {
            Dim d = b->dims[k];
            int64_t dim = (d.c == -1 && !d.t && !d.p) ? 1 : (int64_t)d.c + (int64_t)d.t * FUZZ_T + (int64_t)d.p * FUZZ_P;
            if (dim < 0 || dim > FUZZ_MAX_INPUT_ELEMENTS) return -1;
            in[i].shape[k] = dim;
            n *= dim;
            if (n > FUZZ_MAX_INPUT_ELEMENTS) return -1;
        }
        in[i].numel = n;
        in[i].data = calloc((size_t)(n ? n : 1), (size_t)spu_dtype_size(b->dtype));
        in[i].owned = 1;
        if (!in[i].data) return -1;
        uint8_t *bytes = in[i].data;
        for (int64_t j = 0; j < n * spu_dtype_size(b->dtype); j++) {
            seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
            /* small values: token ids and indices stay in range often enough to go deep */
            bytes[j] = (j % spu_dtype_size(b->dtype)) ? 0 : (uint8_t)(seed % 5);
        }
        if (b->dtype == DT_BOOL)
            for (int64_t j = 0; j < n; j++) bytes[j] &= 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *bytes = malloc(size + 4);
    if (!bytes) return 0;
    memcpy(bytes, data, size);
    uint32_t crc = crc32_of(data, size);
    for (int i = 0; i < 4; i++) bytes[size + i] = (uint8_t)(crc >> (8 * i));
    Program p;
    char err[SPU_ERR_LEN];
    if (spu_parse(&p, bytes, size + 4, err) == 0) {
        Tensor *in = calloc(p.n_inputs + 1, sizeof(Tensor));
        Tensor *out = calloc(p.n_outputs + 1, sizeof(Tensor));
        InstrStats *stats = calloc(p.n_code + 1, sizeof(InstrStats));
        if (in && out && stats && make_inputs(&p, in, 0x9E3779B97F4A7C15ull ^ crc) == 0)
            spu_run(&p, &cfg, in, out, stats, err);
        for (uint32_t i = 0; in && i < p.n_inputs; i++) tensor_free(&in[i]);
        for (uint32_t i = 0; out && i < p.n_outputs; i++) tensor_free(&out[i]);
        free(in);
        free(out);
        free(stats);
        spu_free(&p);
    }
    free(bytes);
    return 0;
}
