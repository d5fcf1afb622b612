/* Python binding of the spu001 simulator: femtocc.runtime._spusim.
 *
 *   sim = Simulator(program_bytes, config_dict)      # validates; ValueError on a bad program
 *   sim.inputs / sim.outputs                         # [(name, dtype code, scale), ...]
 *   sim.instructions                                 # [(op, output buffer name, first constant operand name), ...]
 *   outputs, stats = sim.run([(dtype, shape, buffer), ...])
 *       outputs: [(dtype, shape, bytes)]; stats: one tuple per instruction, fields in STAT_FIELDS
 *
 * Only the C library and Python's C API (buffer protocol) are used; numpy wraps results on the
 * Python side (femtocc/runtime/sim.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "spusim.h"

typedef struct {
    PyObject_HEAD
    Program prog;
    Config cfg;
    int loaded;
} SimObject;

static const char *STAT_FIELDS[] = {
    "cycles", "compute_cycles", "transfer_cycles", "sram_cycles", "macs", "macs_skipped", "elements", "lookups",
    "sram_read_words", "sram_write_words", "external_bytes", "bank_conflict_cycles", "energy_mac_pj", "energy_sram_pj",
    "energy_table_pj", "energy_external_pj", "energy_other_pj", "act_nonzero", "act_total", "host_seconds",
    "bank_reads", "bank_writes", NULL};

/* strings from a program may be any bytes: decode them leniently */
static PyObject *text(const char *s) { return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace"); }

static void set_error(const char *msg) {
    PyObject *m = text(msg);
    if (m) {
        PyErr_SetObject(PyExc_ValueError, m);
        Py_DECREF(m);
    }
}

static int get_num(PyObject *d, const char *key, double *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "simulator config: missing %s", key);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

/* the config dict holds exactly the keys of SPU_CONFIG (spu_isa.h): a missing or unknown key is an error */
static int read_config(PyObject *d, Config *c) {
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "simulator config must be a dict");
        return -1;
    }
    double x;
#define READ_INT(key)                                                                                   \
    if (get_num(d, #key, &x)) return -1;                                                                \
    if (x < 0 || x > 1e12) {                                                                            \
        PyErr_Format(PyExc_ValueError, "simulator config: %s = %g out of range", #key, x);               \
        return -1;                                                                                      \
    }                                                                                                   \
    c->key = (int64_t)x;
#define READ_REAL(key) \
    if (get_num(d, #key, &x)) return -1; \
    c->key = x;
    SPU_CONFIG(READ_INT, READ_REAL)
#undef READ_INT
#undef READ_REAL
    if (PyDict_Size(d) != SPU_CONFIG_KEYS) {
        static const char *known[] = {
#define NAME(key) #key,
            SPU_CONFIG(NAME, NAME)
#undef NAME
        };
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(d, &pos, &key, &value)) {
            const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
            int found = 0;
            for (size_t i = 0; k && i < sizeof(known) / sizeof(known[0]); i++) found |= strcmp(k, known[i]) == 0;
            if (!found) {
                PyErr_Format(PyExc_ValueError, "simulator config: unknown key %R", key);
                return -1;
            }
        }
    }
    if (c->cores < 1 || c->mac_lanes_per_core < 1 || c->sram_word_bits < 8 || c->sram_word_bits % 8) {
        PyErr_SetString(PyExc_ValueError,
                        "simulator config: cores and mac_lanes_per_core must be >= 1, sram_word_bits a multiple of 8");
        return -1;
    }
    return 0;
}

/* a program runs only on the target it was compiled for: its cores, SRAM and pencil height */
static int check_target(const Program *p, const Config *c, char *err) {
    int64_t sram = c->sram_banks_per_core * c->sram_bank_words * (c->sram_word_bits / 8);
    if ((int64_t)p->cores != c->cores || (int64_t)p->sram_bytes_per_core != sram)
        return spu_fail(err, "program: compiled for %u cores with %u bytes of SRAM each; this target has %lld with %lld (cores, sram_*)",
                        p->cores, p->sram_bytes_per_core, (long long)c->cores, (long long)sram);
    for (uint32_t i = 0; i < p->n_buffers; i++)
        if (p->buffers[i].layout == LY_PENCIL && (int64_t)p->buffers[i].block != c->pencil)
            return spu_fail(err, "program: weight %s is stored in pencils of %u; this target reads pencils of %lld (pencil)",
                            p->buffers[i].name, p->buffers[i].block, (long long)c->pencil);
    return 0;
}

static int sim_init(SimObject *self, PyObject *args, PyObject *kwds) {
    Py_buffer buf;
    PyObject *config;
    static char *kwlist[] = {"program", "config", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*O", kwlist, &buf, &config)) return -1;
    if (self->loaded) {
        spu_free(&self->prog);
        self->loaded = 0;
    }
    if (read_config(config, &self->cfg)) {
        PyBuffer_Release(&buf);
        return -1;
    }
    char err[SPU_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = spu_parse(&self->prog, buf.buf, (size_t)buf.len, err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (rc) {
        set_error(err);
        return -1;
    }
    if (check_target(&self->prog, &self->cfg, err)) {
        spu_free(&self->prog);
        set_error(err);
        return -1;
    }
    self->loaded = 1;
    return 0;
}

static void sim_dealloc(SimObject *self) {
    if (self->loaded) spu_free(&self->prog);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *symbols(SimObject *self, uint32_t start, uint32_t count) {
    PyObject *list = PyList_New(count);
    if (!list) return NULL;
    for (uint32_t i = 0; i < count; i++) {
        const Symbol *s = &self->prog.symbols[start + i];
        const BufferDesc *b = &self->prog.buffers[s->buffer];
        PyObject *dims = PyList_New(b->rank);
        if (!dims) { Py_DECREF(list); return NULL; }
        for (int k = 0; k < b->rank; k++)
            PyList_SET_ITEM(dims, k, Py_BuildValue("(iii)", b->dims[k].c, b->dims[k].t, b->dims[k].p));
        if (PyErr_Occurred()) { Py_DECREF(dims); Py_DECREF(list); return NULL; }
        PyObject *item = Py_BuildValue("(NidN)", text(s->name), b->dtype, s->scale, dims);
        if (!item) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *sim_get_inputs(SimObject *self, void *closure) {
    (void)closure;
    if (!self->loaded) Py_RETURN_NONE;
    return symbols(self, 0, self->prog.n_inputs);
}

static PyObject *sim_get_outputs(SimObject *self, void *closure) {
    (void)closure;
    if (!self->loaded) Py_RETURN_NONE;
    return symbols(self, self->prog.n_inputs, self->prog.n_outputs);
}

static PyObject *sim_get_instructions(SimObject *self, void *closure) {
    (void)closure;
    if (!self->loaded) Py_RETURN_NONE;
    PyObject *list = PyList_New(self->prog.n_code);
    if (!list) return NULL;
    for (uint32_t k = 0; k < self->prog.n_code; k++) {
        const Instr *ins = &self->prog.code[k];
        const uint8_t *ids = (const uint8_t *)ins->ids;
        uint16_t out = (uint16_t)(ids[2 * ins->n_in] | (ids[2 * ins->n_in + 1] << 8));
        const char *weight = "";
        for (int j = 0; j < ins->n_in; j++) {
            uint16_t id = (uint16_t)(ids[2 * j] | (ids[2 * j + 1] << 8));
            int region = self->prog.buffers[id].region;
            if (region == RG_CONST || region == RG_STREAM) { weight = self->prog.buffers[id].name; break; }
        }
        PyObject *item = Py_BuildValue("(sNNi)", spu_op_name(ins->op), text(self->prog.buffers[out].name), text(weight), ins->tile_rows);
        if (!item) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

static PyObject *sim_run(SimObject *self, PyObject *args) {
    PyObject *feeds;
    if (!self->loaded) {
        PyErr_SetString(PyExc_RuntimeError, "simulator has no program");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O", &feeds)) return NULL;
    Program *p = &self->prog;
    PyObject *seq = PySequence_Fast(feeds, "inputs must be a sequence of (dtype, shape, buffer)");
    if (!seq) return NULL;
    if ((uint32_t)PySequence_Fast_GET_SIZE(seq) != p->n_inputs) {
        char msg[SPU_ERR_LEN];
        snprintf(msg, sizeof(msg), "%s: expected %u inputs, got %zd", p->graph, p->n_inputs, PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        set_error(msg);
        return NULL;
    }
    Tensor *inputs = calloc(p->n_inputs + 1, sizeof(Tensor));
    Py_buffer *views = calloc(p->n_inputs + 1, sizeof(Py_buffer));
    Tensor *outputs = calloc(p->n_outputs + 1, sizeof(Tensor));
    InstrStats *stats = calloc(p->n_code + 1, sizeof(InstrStats));
    uint32_t got = 0;
    PyObject *result = NULL;
    char err[SPU_ERR_LEN] = {0};
    if (!inputs || !views || !outputs || !stats) { PyErr_NoMemory(); goto done; }
    for (; got < p->n_inputs; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, got);
        int dtype;
        PyObject *shape;
        if (!PyArg_ParseTuple(item, "iOy*", &dtype, &shape, &views[got])) goto done;
        Tensor *t = &inputs[got];
        Py_ssize_t rank = PySequence_Length(shape);
        if (dtype < 0 || dtype >= DT_COUNT || rank < 0 || rank > SPU_MAX_RANK) {
            got++;
            PyErr_Format(PyExc_ValueError, "input %u has a bad dtype or rank", got - 1);
            goto done;
        }
        t->dtype = dtype;
        t->rank = (int)rank;
        t->numel = 1;
        for (Py_ssize_t i = 0; i < rank; i++) {
            PyObject *d = PySequence_GetItem(shape, i);
            long long v = d ? PyLong_AsLongLong(d) : -1;
            Py_XDECREF(d);
            if (v < 0 || v > (1LL << 28)) {
                got++;
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "input %u has a bad shape", got - 1);
                goto done;
            }
            t->shape[i] = v;
            t->numel *= v;
        }
        if (t->numel > (1LL << 28) || views[got].len != t->numel * spu_dtype_size(dtype)) {
            got++;
            char msg[SPU_ERR_LEN];
            snprintf(msg, sizeof(msg), "%s: input %s has %zd bytes, its shape needs %lld", p->graph, p->symbols[got - 1].name,
                     views[got - 1].len, (long long)(t->numel * spu_dtype_size(dtype)));
            set_error(msg);
            goto done;
        }
        t->data = views[got].buf;
        t->owned = 0;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = spu_run(p, &self->cfg, inputs, outputs, stats, err);
    Py_END_ALLOW_THREADS
    if (rc) {
        set_error(err);
        goto done;
    }
    PyObject *outs = PyList_New(p->n_outputs), *st = PyList_New(p->n_code);
    if (!outs || !st) { Py_XDECREF(outs); Py_XDECREF(st); goto done; }
    for (uint32_t i = 0; i < p->n_outputs; i++) {
        Tensor *t = &outputs[i];
        PyObject *shape = PyTuple_New(t->rank);
        for (int k = 0; k < t->rank; k++) PyTuple_SET_ITEM(shape, k, PyLong_FromLongLong(t->shape[k]));
        PyList_SET_ITEM(outs, i, Py_BuildValue("(iNy#)", t->dtype, shape, (const char *)t->data, (Py_ssize_t)(t->numel * spu_dtype_size(t->dtype))));
    }
    for (uint32_t k = 0; k < p->n_code; k++) {
        InstrStats *s = &stats[k];
        double v[] = {s->cycles, s->compute_cycles, s->transfer_cycles, s->sram_cycles, s->macs, s->macs_skipped, s->elements,
                      s->lookups, s->sram_read_words, s->sram_write_words, s->external_bytes, s->bank_conflict_cycles,
                      s->energy_pj[0], s->energy_pj[1], s->energy_pj[2], s->energy_pj[3], s->energy_pj[4], s->act_nonzero, s->act_total,
                      s->host_seconds};
        size_t n = sizeof(v) / sizeof(v[0]);
        int banks = (int)(self->cfg.sram_banks_per_core < SPU_MAX_BANKS ? self->cfg.sram_banks_per_core : SPU_MAX_BANKS);
        PyObject *tup = PyTuple_New((Py_ssize_t)n + 2);
        for (size_t i = 0; i < n; i++) PyTuple_SET_ITEM(tup, (Py_ssize_t)i, PyFloat_FromDouble(v[i]));
        PyObject *reads = PyTuple_New(banks), *writes = PyTuple_New(banks);
        for (int i = 0; i < banks; i++) {
            PyTuple_SET_ITEM(reads, i, PyFloat_FromDouble(s->bank_reads[i]));
            PyTuple_SET_ITEM(writes, i, PyFloat_FromDouble(s->bank_writes[i]));
        }
        PyTuple_SET_ITEM(tup, (Py_ssize_t)n, reads);
        PyTuple_SET_ITEM(tup, (Py_ssize_t)n + 1, writes);
        PyList_SET_ITEM(st, k, tup);
    }
    result = Py_BuildValue("(NN)", outs, st);
done:
    for (uint32_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    if (outputs)
        for (uint32_t i = 0; i < p->n_outputs; i++) tensor_free(&outputs[i]);
    free(inputs);
    free(views);
    free(outputs);
    free(stats);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef sim_methods[] = {
    {"run", (PyCFunction)sim_run, METH_VARARGS, "run([(dtype, shape, buffer), ...]) -> (outputs, stats)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef sim_getset[] = {
    {"inputs", (getter)sim_get_inputs, NULL, "[(name, dtype, scale, dims)]", NULL},
    {"outputs", (getter)sim_get_outputs, NULL, "[(name, dtype, scale, dims)]", NULL},
    {"instructions", (getter)sim_get_instructions, NULL, "[(op, output, constant operand, tile rows)]", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject SimType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "femtocc.runtime._spusim.Simulator",
    .tp_basicsize = sizeof(SimObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "spu001 cycle simulator for one validated .spu program",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sim_init,
    .tp_dealloc = (destructor)sim_dealloc,
    .tp_methods = sim_methods,
    .tp_getset = sim_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spusim", "spu001 cycle simulator (C)", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__spusim(void) {
    if (PyType_Ready(&SimType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&SimType);
    if (PyModule_AddObject(m, "Simulator", (PyObject *)&SimType) < 0) {
        Py_DECREF(&SimType);
        Py_DECREF(m);
        return NULL;
    }
    int n = 0;
    while (STAT_FIELDS[n]) n++;
    PyObject *fields = PyTuple_New(n);
    for (int i = 0; i < n; i++) PyTuple_SET_ITEM(fields, i, PyUnicode_FromString(STAT_FIELDS[i]));
    PyModule_AddObject(m, "STAT_FIELDS", fields);
    return m;
}
