/* spu001 cycle simulator: shared types.
 *
 * The simulator reads the .spu format of femtocc/runtime/program.py, validates it
 * completely, runs it with the integer semantics of femtocc/ir/qops.py (bit-exact with the
 * reference runtime), and counts cycles, MACs, SRAM and external traffic, and energy with the
 * timing model of docs/spu001.md, every parameter taken from the target description.
 */
#ifndef SPUSIM_H
#define SPUSIM_H

#include <stddef.h>
#include <stdint.h>

#include "spu_isa.h" /* format, ISA and target keys, generated from the Python sources */

#define SPU_ERR_LEN 512
#define SPU_MAX_BANKS 16 /* statistics per bank for up to this many banks (the rest fold into the last) */

typedef struct { int32_t c, t, p; } Dim;

typedef struct {
    const char *name;
    int dtype, region, layout, rank;
    Dim dims[SPU_MAX_RANK];
    uint64_t address, nbytes, blob_offset;
    uint32_t bits, block; /* block: a pencil buffer's pencil height */
    const uint8_t *blob;       /* constants: their bytes inside the program */
    /* decoded constant (any layout): int64 copy of the values; pencil also keeps its structure */
    int64_t *values;
    void *native;   /* the same values in the buffer's dtype, row-major: what a run reads as a tensor */
    int64_t numel;
    int64_t shape[SPU_MAX_RANK];
    const uint32_t *pencil_offsets; /* pencil: [groups + 1] */
    uint16_t *pencil_index;         /* pencil: input index per pencil */
    int8_t *pencil_words;           /* pencil: block weights per pencil (int4 unpacked) */
    int16_t *weight_pairs;          /* dense weights [K][N]: [ceil(K/2)][N][2], rows 2p and 2p+1 side by side */
    int64_t pencils;
} BufferDesc;

typedef struct {
    int op, n_in, n_out, n_params, tile_rows;
    const uint16_t *ids;   /* n_in inputs then n_out outputs (little-endian in the file) */
    int64_t *params;
    /* decoded attributes */
    int64_t a[8];          /* scalar attributes in ISA order */
    int64_t list[SPU_MAX_RANK + 2];
    int list_len;
    int has[8];
} Instr;

typedef struct { const char *name; uint32_t buffer; double scale; } Symbol;

typedef struct {
    uint8_t *data;      /* owned copy of the file */
    size_t size;
    char target[17], graph[17];
    uint32_t n_strings, n_buffers, n_code, n_inputs, n_outputs;
    uint64_t blob_bytes, external_bytes;
    uint32_t sram_bytes_per_core, cores;
    char **strings;
    BufferDesc *buffers;
    Instr *code;
    Symbol *symbols;    /* inputs then outputs */
} Program;

/* every number of the target description, named as there (spu_isa.h) */
#define SPU_INT_FIELD(key) int64_t key;
#define SPU_REAL_FIELD(key) double key;
typedef struct { SPU_CONFIG(SPU_INT_FIELD, SPU_REAL_FIELD) } Config;

typedef struct {
    int dtype, rank;
    int64_t shape[SPU_MAX_RANK];
    int64_t numel;
    void *data;
    int owned;
} Tensor;

typedef struct {
    double cycles, compute_cycles, transfer_cycles, sram_cycles;
    double macs, macs_skipped, elements, lookups;
    double sram_read_words, sram_write_words, external_bytes, bank_conflict_cycles;
    double bank_reads[SPU_MAX_BANKS], bank_writes[SPU_MAX_BANKS]; /* words per bank, per core */
    double energy_pj[5]; /* mac, sram, table, external, other */
    double act_nonzero, act_total; /* activation density seen by qdense */
    double host_seconds;           /* wall time the simulator spent on the instruction */
} InstrStats;

/* spu_program.c */
int spu_fail(char *err, const char *fmt, ...); /* writes the message to err, returns -1 */
const char *spu_op_name(int op);
int spu_parse(Program *p, const uint8_t *bytes, size_t size, char *err);
void spu_free(Program *p);
int64_t spu_dtype_size(int dtype);

/* spu_exec.c */
int spu_run(const Program *p, const Config *cfg, Tensor *inputs, Tensor *outputs, InstrStats *stats, char *err);
void tensor_free(Tensor *t);

#endif
