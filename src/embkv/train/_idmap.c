/* IdMap: an int64 -> int64 hash map for the training table's hot-row cache (train/idmap.py).
 *
 * Open addressing with linear probing over a power-of-two slot array, at most half full, and
 * backward-shift deletion, so no tombstones build up as rows are evicted and loaded. Every
 * operation takes a whole batch (int64 buffers) and runs without the GIL: the cache maps a
 * training batch's ids to cache slots in one call, no Python loop per id. Values are cache
 * slot numbers (>= 0); -1 marks an empty slot and is what a lookup writes for a missing id.
 * The caller (the training table) serializes calls with its own lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t key;
    int64_t val; /* -1: empty */
} entry_t;

typedef struct {
    PyObject_HEAD
    entry_t *slots;
    uint64_t mask;
    uint64_t count;
    uint64_t max_items;
} IdMap;

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static int IdMap_init(IdMap *self, PyObject *args, PyObject *kwds)
{
    unsigned long long max_items;
    if (!PyArg_ParseTuple(args, "K", &max_items))
        return -1;
    if (max_items == 0 || max_items > (1ULL << 40)) {
        PyErr_SetString(PyExc_ValueError, "IdMap holds 1 .. 2**40 items");
        return -1;
    }
    uint64_t n = 16;
    while (n < 2 * max_items)
        n <<= 1;
    PyMem_RawFree(self->slots);
    self->slots = PyMem_RawMalloc(n * sizeof(entry_t));
    if (!self->slots) {
        PyErr_NoMemory();
        return -1;
    }
    memset(self->slots, 0xFF, n * sizeof(entry_t)); /* val -1 everywhere */
    self->mask = n - 1;
    self->count = 0;
    self->max_items = max_items;
    return 0;
}

static void IdMap_dealloc(IdMap *self)
{
    PyMem_RawFree(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int get_i64(PyObject *o, Py_buffer *b, int writable, const char *what)
{
    if (PyObject_GetBuffer(o, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (b->len % 8) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "%s must be int64", what);
        return -1;
    }
    return 0;
}

static int require_init(const IdMap *m)
{
    if (!m->slots) {
        PyErr_SetString(PyExc_ValueError, "IdMap was not initialized");
        return -1;
    }
    return 0;
}

static inline uint64_t find(const IdMap *m, int64_t key)
{
    uint64_t j = mix64((uint64_t)key) & m->mask;
    while (m->slots[j].val >= 0 && m->slots[j].key != key)
        j = (j + 1) & m->mask;
    return j;
}

/* lookup(keys, out) -> number found; out[i] = value, or -1 */
static PyObject *IdMap_lookup(IdMap *self, PyObject *args)
{
    PyObject *k_o, *o_o;
    Py_buffer kb, ob;
    if (require_init(self) < 0 || !PyArg_ParseTuple(args, "OO", &k_o, &o_o) || get_i64(k_o, &kb, 0, "keys") < 0)
        return NULL;
    if (get_i64(o_o, &ob, 1, "out") < 0) {
        PyBuffer_Release(&kb);
        return NULL;
    }
    uint64_t n = (uint64_t)kb.len / 8, hits = 0;
    if ((uint64_t)ob.len != 8 * n) {
        PyBuffer_Release(&kb);
        PyBuffer_Release(&ob);
        PyErr_SetString(PyExc_ValueError, "out must have one int64 per key");
        return NULL;
    }
    const int64_t *keys = kb.buf;
    int64_t *out = ob.buf;
    Py_BEGIN_ALLOW_THREADS for (uint64_t i = 0; i < n; i++)
    {
        if (i + 8 < n)
            __builtin_prefetch(&self->slots[mix64((uint64_t)keys[i + 8]) & self->mask]);
        int64_t v = self->slots[find(self, keys[i])].val;
        out[i] = v;
        hits += v >= 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&kb);
    PyBuffer_Release(&ob);
    return PyLong_FromUnsignedLongLong(hits);
}

/* insert(keys, values): set each key's value (values >= 0); OverflowError past max_items */
static PyObject *IdMap_insert(IdMap *self, PyObject *args)
{
    PyObject *k_o, *v_o;
    Py_buffer kb, vb;
    if (require_init(self) < 0 || !PyArg_ParseTuple(args, "OO", &k_o, &v_o) || get_i64(k_o, &kb, 0, "keys") < 0)
        return NULL;
    if (get_i64(v_o, &vb, 0, "values") < 0) {
        PyBuffer_Release(&kb);
        return NULL;
    }
    uint64_t n = (uint64_t)kb.len / 8;
    const int64_t *keys = kb.buf, *vals = vb.buf;
    PyObject *res = NULL;
    if ((uint64_t)vb.len != 8 * n) {
        PyErr_SetString(PyExc_ValueError, "values must have one int64 per key");
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (vals[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "values must be >= 0");
            goto out;
        }
    }
    if (self->count + n > self->max_items) { /* it may not fit: all or nothing */
        uint64_t fresh = 0;
        for (uint64_t i = 0; i < n; i++)
            fresh += self->slots[find(self, keys[i])].val < 0;
        if (self->count + fresh > self->max_items) {
            PyErr_SetString(PyExc_OverflowError, "IdMap is full");
            goto out;
        }
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t j = find(self, keys[i]);
        if (self->slots[j].val < 0) {
            if (self->count >= self->max_items) { /* duplicates counted twice above: cannot happen */
                PyErr_SetString(PyExc_OverflowError, "IdMap is full");
                goto out;
            }
            self->count++;
            self->slots[j].key = keys[i];
        }
        self->slots[j].val = vals[i];
    }
    res = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&kb);
    PyBuffer_Release(&vb);
    return res;
}

/* remove(keys) -> number removed; backward-shift deletion keeps every probe chain unbroken */
static PyObject *IdMap_remove(IdMap *self, PyObject *args)
{
    PyObject *k_o;
    Py_buffer kb;
    if (require_init(self) < 0 || !PyArg_ParseTuple(args, "O", &k_o) || get_i64(k_o, &kb, 0, "keys") < 0)
        return NULL;
    uint64_t n = (uint64_t)kb.len / 8, removed = 0;
    const int64_t *keys = kb.buf;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t j = find(self, keys[i]);
        if (self->slots[j].val < 0)
            continue;
        removed++;
        self->count--;
        /* shift later entries of the chain back into the hole while their home allows it */
        uint64_t hole = j, k = j;
        for (;;) {
            k = (k + 1) & self->mask;
            if (self->slots[k].val < 0)
                break;
            uint64_t home = mix64((uint64_t)self->slots[k].key) & self->mask;
            /* k's entry may move to hole unless its home lies cyclically in (hole, k] */
            int stays = hole <= k ? (home > hole && home <= k) : (home > hole || home <= k);
            if (stays)
                continue;
            self->slots[hole] = self->slots[k];
            hole = k;
        }
        self->slots[hole].val = -1;
    }
    PyBuffer_Release(&kb);
    return PyLong_FromUnsignedLongLong(removed);
}

static PyObject *IdMap_clear(IdMap *self, PyObject *Py_UNUSED(ignored))
{
    if (require_init(self) < 0)
        return NULL;
    memset(self->slots, 0xFF, (self->mask + 1) * sizeof(entry_t));
    self->count = 0;
    Py_RETURN_NONE;
}

/* items() -> (keys, values) as bytes of int64, in slot order */
static PyObject *IdMap_items(IdMap *self, PyObject *Py_UNUSED(ignored))
{
    if (require_init(self) < 0)
        return NULL;
    PyObject *keys = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * self->count));
    PyObject *vals = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * self->count));
    if (!keys || !vals) {
        Py_XDECREF(keys);
        Py_XDECREF(vals);
        return NULL;
    }
    int64_t *k = (int64_t *)PyBytes_AS_STRING(keys), *v = (int64_t *)PyBytes_AS_STRING(vals);
    uint64_t n = 0;
    for (uint64_t j = 0; j <= self->mask; j++) {
        if (self->slots[j].val >= 0) {
            k[n] = self->slots[j].key;
            v[n] = self->slots[j].val;
            n++;
        }
    }
    PyObject *res = PyTuple_Pack(2, keys, vals);
    Py_DECREF(keys);
    Py_DECREF(vals);
    return res;
}

static Py_ssize_t IdMap_len(IdMap *self) { return (Py_ssize_t)self->count; }

static PyMethodDef IdMap_methods[] = {
    {"lookup", (PyCFunction)IdMap_lookup, METH_VARARGS, "lookup(keys, out) -> found; out[i] = value or -1"},
    {"insert", (PyCFunction)IdMap_insert, METH_VARARGS, "insert(keys, values): set each key's value"},
    {"remove", (PyCFunction)IdMap_remove, METH_VARARGS, "remove(keys) -> number removed"},
    {"clear", (PyCFunction)IdMap_clear, METH_NOARGS, "remove every key"},
    {"items", (PyCFunction)IdMap_items, METH_NOARGS, "items() -> (keys, values) as int64 bytes"},
    {NULL}};

static PySequenceMethods IdMap_as_sequence = {.sq_length = (lenfunc)IdMap_len};

static PyTypeObject IdMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "embkv.train._idmap.IdMap",
    .tp_basicsize = sizeof(IdMap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "IdMap(max_items): int64 -> int64 (>= 0) hash map, batch operations",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)IdMap_init,
    .tp_dealloc = (destructor)IdMap_dealloc,
    .tp_methods = IdMap_methods,
    .tp_as_sequence = &IdMap_as_sequence,
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "embkv.train._idmap",
                                       "batch int64 hash map of the training cache", -1, NULL};

PyMODINIT_FUNC PyInit__idmap(void)
{
    if (PyType_Ready(&IdMapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&IdMapType);
    if (PyModule_AddObject(m, "IdMap", (PyObject *)&IdMapType) < 0) {
        Py_DECREF(&IdMapType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
