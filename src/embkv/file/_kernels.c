/*
 * embkv.file._kernels: the compiled hot path of embkv.
 *
 * A View wraps one mapped table file (see format.py and ARCHITECTURE.md for the layout)
 * and runs the per-key work of lookups, upserts and deletes without a Python loop.
 *
 * Concurrency protocol (single writer per table, any number of readers, across processes):
 *   - every row starts with a 64-bit sequence number (a seqlock): odd while the writer
 *     rewrites the row, even otherwise; readers copy, then re-read the sequence and retry
 *     when it moved, so they never return a torn vector and never block the writer;
 *   - upserts are copy-on-write at the row level: a new row is written completely, then the
 *     index slot is switched to it with one release store, then the old row goes to the free
 *     list. A referenced row is therefore never half-written, even if the writer is killed;
 *   - a freed row may be reused at once. Readers detect that through the row's own key
 *     (checked under the seqlock) and re-read the slot.
 *
 * Everything read from the file is bounds-checked: a corrupt or hostile file yields an
 * error code, never an out-of-bounds access.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include "_vendor/xxhash.h"

/* an index slot is one u64: a 24-bit fingerprint of the key's hash above a 40-bit row field
 * (0 empty, all ones a tombstone, else row number + 1); one store switches it atomically */
#define SLOT_EMPTY 0ULL
#define ROW_BITS 40
#define ROW_FIELD ((1ULL << ROW_BITS) - 1)
#define SLOT_TOMB ROW_FIELD
#define FP_MASK 0xFFFFFFULL
#define FINGERPRINT(h) ((h)&FP_MASK)

/* a row's sequence word: checksum (high 32) | key code (8) | write count (low 24, odd while written) */
#define SEQ_COUNT 0xFFFFFFULL
#define SEQ_CODE_SHIFT 24
#define SEQ_CODE(w) (((w) >> SEQ_CODE_SHIFT) & 0xFF)
#define LONG_KEY 255 /* key code of a string key longer than INLINE_KEY: prefix in the row, all of it in the heap */
#define LONG_PREFIX 16

#define KEY_INT 1
#define KEY_STR 2

#define QUANT_NONE 0
#define QUANT_INT8 1
#define QUANT_BF16 2

/* indices into the mutable counter block of the header (format.COUNTERS_OFFSET) */
#define C_GENERATION 0
#define C_LIVE 1
#define C_ROWS_USED 2
#define C_FREE 3
#define C_HEAP_USED 4
#define C_TOMBS 5
#define C_SUPERSEDED 6
#define C_DIRTY 7

#define COUNTERS_OFFSET 128
#define INLINE_KEY 24 /* string keys up to this many bytes live in the row only (no heap) */
#define SPIN_BUDGET 200000
#define GIL_RELEASE_MIN 64
#define PREFETCH_CHUNK 32

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* result codes of the per-key routines */
#define R_MISS 0
#define R_HIT 1
#define R_CORRUPT -1
#define R_BUSY -2

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int has_buf;
    int writable;
    char *base;
    uint64_t size;
    uint64_t slot_count; /* any count: a key's home slot is mulhi(hash, slot_count) */
    uint64_t row_capacity;
    uint64_t heap_capacity;
    /* how far the writer may take new rows and heap bytes: the file is sparse and the writer
     * reserves space before it writes (Mapping.reserve), so a batch must fit below these */
    uint64_t row_limit;
    uint64_t heap_limit;
    uint64_t free_limit; /* entries of the free-row stack reserved */
    uint64_t row_stride;
    uint64_t row_header;
    uint64_t vec_bytes; /* a stored vector */
    uint64_t out_bytes; /* a vector as reads return it (float32 for int8 and bfloat16 rows) */
    uint64_t dim;
    int quant;          /* QUANT_NONE, QUANT_INT8 (float32 scale, then dim int8 codes), QUANT_BF16 */
    uint64_t tag_word;  /* index of the row's tag word (the last word of the row header); 0: untagged rows */
    int key_type;
    uint64_t *slots;
    char *rows;
    uint64_t *freelist;
    char *heap;
    uint64_t *ctr;
} View;

static PyObject *CorruptError; /* set from Python: embkv.errors.CorruptTableError */
static PyObject *BusyError;    /* set from Python: embkv.errors.ReadRetryError */

static inline uint64_t mix64(uint64_t x)
{
    /* splitmix64 finalizer: real keys are often sequential or strided, this spreads them */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t *row_meta(View *v, uint64_t r) { return (uint64_t *)(v->rows + r * v->row_stride); }
static inline char *row_vec(View *v, uint64_t r) { return v->rows + r * v->row_stride + v->row_header; }

/* the rows and heap bytes written so far: reads stay below them, so a damaged slot or a torn
 * heap offset never reads the sparse file's unallocated part (a read fault there allocates a
 * page in tmpfs, and SIGBUSes when it is full). A slot is published with a release store
 * after the counters moved, so a reader that sees the slot sees them too */
static inline uint64_t rows_in_use(const View *v)
{
    uint64_t used = LOAD_ACQ(&v->ctr[C_ROWS_USED]);
    return used < v->row_capacity ? used : v->row_capacity;
}

static inline uint64_t heap_in_use(const View *v)
{
    uint64_t used = LOAD_ACQ(&v->ctr[C_HEAP_USED]);
    return used < v->heap_capacity ? used : v->heap_capacity;
}

static inline void backoff(uint64_t budget)
{
    if ((budget & 63) == 0)
        sched_yield();
    else
        CPU_RELAX();
}

static int check_range(uint64_t off, uint64_t len, uint64_t size)
{
    uint64_t end;
    if (__builtin_add_overflow(off, len, &end))
        return 0;
    return end <= size;
}

/* ---------------------------------------------------------------- View lifecycle */

static int View_init(View *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    int writable, key_type, quant, tagged;
    unsigned long long slot_count, row_capacity, heap_capacity, index_off, rows_off, free_off, heap_off;
    unsigned long long row_stride, row_header, vec_bytes, dim;
    if (!PyArg_ParseTuple(args, "OpiKKKKKKKKKKKip", &obj, &writable, &key_type, &slot_count, &row_capacity,
                          &heap_capacity, &index_off, &rows_off, &free_off, &heap_off, &row_stride, &row_header,
                          &vec_bytes, &dim, &quant, &tagged))
        return -1;
    if (self->has_buf) {
        PyBuffer_Release(&self->buf);
        self->has_buf = 0;
    }
    if (PyObject_GetBuffer(obj, &self->buf, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    self->has_buf = 1;
    self->writable = writable;
    self->base = (char *)self->buf.buf;
    self->size = (uint64_t)self->buf.len;
    uint64_t idx_bytes, row_bytes, free_bytes;
    int bad = 0;
    bad |= (key_type != KEY_INT && key_type != KEY_STR);
    bad |= (slot_count < 16 || slot_count > (1ULL << (ROW_BITS + 1)));
    bad |= (row_header != (key_type == KEY_INT ? 16u : 8u + INLINE_KEY) + (tagged ? 8u : 0u));
    bad |= (row_capacity >= ROW_FIELD - 1);
    bad |= (vec_bytes == 0 || row_header + vec_bytes > row_stride || (row_stride % 8) != 0);
    bad |= (quant != QUANT_NONE && quant != QUANT_INT8 && quant != QUANT_BF16) || dim == 0 || dim > (1u << 20);
    bad |= (quant == QUANT_INT8 && vec_bytes != 4 + dim) || (quant == QUANT_BF16 && vec_bytes != 2 * dim);
    bad |= (index_off % 8) || (rows_off % 8) || (free_off % 8);
    bad |= __builtin_mul_overflow(slot_count, (uint64_t)8, &idx_bytes);
    bad |= __builtin_mul_overflow(row_capacity, row_stride, &row_bytes);
    bad |= __builtin_mul_overflow(row_capacity, (uint64_t)8, &free_bytes);
    if (!bad) {
        bad |= !check_range(COUNTERS_OFFSET, 8 * 8, self->size);
        bad |= !check_range(index_off, idx_bytes, self->size);
        bad |= !check_range(rows_off, row_bytes, self->size);
        bad |= !check_range(free_off, free_bytes, self->size);
        bad |= !check_range(heap_off, heap_capacity, self->size);
    }
    if (bad) {
        PyBuffer_Release(&self->buf);
        self->has_buf = 0;
        PyErr_SetString(CorruptError ? CorruptError : PyExc_ValueError,
                        "table layout does not fit the mapped file");
        return -1;
    }
    self->slot_count = slot_count;
    self->row_capacity = row_capacity;
    self->heap_capacity = heap_capacity;
    self->row_limit = row_capacity;
    self->heap_limit = heap_capacity;
    self->free_limit = row_capacity;
    self->row_stride = row_stride;
    self->row_header = row_header;
    self->vec_bytes = vec_bytes;
    self->dim = dim;
    self->quant = quant;
    self->out_bytes = quant == QUANT_NONE ? vec_bytes : 4 * dim;
    self->tag_word = tagged ? row_header / 8 - 1 : 0;
    self->key_type = key_type;
    self->slots = (uint64_t *)(self->base + index_off);
    self->rows = self->base + rows_off;
    self->freelist = (uint64_t *)(self->base + free_off);
    self->heap = self->base + heap_off;
    self->ctr = (uint64_t *)(self->base + COUNTERS_OFFSET);
    return 0;
}

static void View_dealloc(View *self)
{
    if (self->has_buf)
        PyBuffer_Release(&self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *View_release(View *self, PyObject *Py_UNUSED(ignored))
{
    if (self->has_buf) {
        PyBuffer_Release(&self->buf);
        self->has_buf = 0;
    }
    Py_RETURN_NONE;
}

static int require_open(View *self, int write)
{
    if (!self->has_buf) {
        PyErr_SetString(PyExc_ValueError, "view is released");
        return -1;
    }
    if (write && !self->writable) {
        PyErr_SetString(PyExc_PermissionError, "view is read-only");
        return -1;
    }
    return 0;
}

/* an open view of a table with this key type (lookups of the other kind are a caller bug) */
static int require_keys(View *self, int key_type)
{
    if (require_open(self, 0) < 0)
        return -1;
    if (self->key_type != key_type) {
        PyErr_SetString(PyExc_TypeError, key_type == KEY_INT ? "table has string keys" : "table has int keys");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- reads */

/* a stored vector as reads return it: a plain copy, or decoded to float32 (int8 codes times the
 * row's scale; bfloat16 widened). Inside the reader's seqlock window: a torn source is retried */
static inline void copy_vec(View *v, char *dst, const char *src)
{
    if (v->quant == QUANT_NONE) {
        memcpy(dst, src, v->vec_bytes);
        return;
    }
    float *out = (float *)dst;
    if (v->quant == QUANT_INT8) {
        float scale;
        memcpy(&scale, src, 4);
        const int8_t *codes = (const int8_t *)(src + 4);
        for (uint64_t j = 0; j < v->dim; j++)
            out[j] = (float)codes[j] * scale;
        return;
    }
    /* bfloat16 is the top half of a float32: widen the bits (a loop the compiler vectorizes) */
    const uint16_t *half = (const uint16_t *)src;
    uint32_t *bits = (uint32_t *)dst;
    for (uint64_t j = 0; j < v->dim; j++)
        bits[j] = (uint32_t)half[j] << 16;
}

/* where a hash's probe starts: the high half of hash * slot_count (no power-of-two table needed) */
static inline uint64_t home_slot(const View *v, uint64_t h)
{
    return (uint64_t)(((unsigned __int128)h * v->slot_count) >> 64);
}

static inline uint64_t next_slot(const View *v, uint64_t j) { return j + 1 == v->slot_count ? 0 : j + 1; }

static inline uint64_t slot_word(uint64_t h, uint64_t r) { return (FINGERPRINT(h) << ROW_BITS) | (r + 1); }

/* the bytes of a string row's key: inline (code <= INLINE_KEY), or (LONG_KEY) a prefix in the
 * row and the whole key in the heap as u64 length | bytes. Bounds-checked: the reader may see a
 * row being rewritten, and the file may be damaged */
static inline int str_key_equal(const View *v, const uint64_t *meta, uint64_t code, const char *kb, uint64_t kl)
{
    const char *area = (const char *)&meta[1];
    if (kl <= INLINE_KEY)
        return code == kl && memcmp(area, kb, kl) == 0;
    if (code != LONG_KEY || memcmp(area, kb, LONG_PREFIX) != 0)
        return 0;
    uint64_t off, len, heap_used = heap_in_use(v);
    memcpy(&off, area + LONG_PREFIX, 8);
    if (!check_range(off, 8, heap_used))
        return 0;
    memcpy(&len, v->heap + off, 8);
    return len == kl && check_range(off + 8, len, heap_used) &&
           memcmp(v->heap + off + 8 + LONG_PREFIX, kb + LONG_PREFIX, kl - LONG_PREFIX) == 0;
}

/* does row meta (sequence word s) hold the key: an int key, or kb[0:kl] */
static inline int row_holds(const View *v, const uint64_t *meta, uint64_t s, uint64_t ikey, const char *kb, uint64_t kl)
{
    if (v->key_type == KEY_INT)
        return LOAD_RLX(&meta[1]) == ikey;
    return str_key_equal(v, meta, SEQ_CODE(s), kb, kl);
}

/* the reader's probe, for both key types: h is mix64(int key) or the string key's xxh3 */
static int find_key(View *v, uint64_t h, uint64_t ikey, const char *kb, uint64_t kl, char *dst, uint64_t *tag_out)
{
    uint64_t j = home_slot(v, h), fp = FINGERPRINT(h);
    uint64_t budget = SPIN_BUDGET;
    uint64_t step = 0;
    while (step < v->slot_count) {
        uint64_t w = LOAD_ACQ(&v->slots[j]);
        uint64_t rf = w & ROW_FIELD;
        if (rf == SLOT_EMPTY)
            return R_MISS;
        if (rf == SLOT_TOMB || (w >> ROW_BITS) != fp) {
            j = next_slot(v, j);
            step++;
            continue;
        }
        uint64_t r = rf - 1;
        if (r >= rows_in_use(v))
            return R_CORRUPT;
        uint64_t *meta = row_meta(v, r);
        uint64_t s1 = LOAD_ACQ(&meta[0]);
        if (!(s1 & 1)) {
            int same = row_holds(v, meta, s1, ikey, kb, kl);
            uint64_t tag = v->tag_word ? LOAD_RLX(&meta[v->tag_word]) : 0;
            if (same && dst)
                copy_vec(v, dst, row_vec(v, r));
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (LOAD_RLX(&meta[0]) == s1) {
                if (same) {
                    *tag_out = tag;
                    return R_HIT;
                }
                /* a stable row holding another key (a fingerprint collision): skip the slot if
                 * it still points here and the row was not rewritten meanwhile (it may have left
                 * and come back: ABA), otherwise the writer moved things and the slot is read again */
                if (LOAD_ACQ(&v->slots[j]) == w && LOAD_ACQ(&meta[0]) == s1) {
                    j = next_slot(v, j);
                    step++;
                    continue;
                }
            }
        }
        if (--budget == 0)
            return R_BUSY;
        backoff(budget);
    }
    return R_MISS;
}

static PyObject *raise_code(int code, uint64_t i)
{
    if (code == R_CORRUPT)
        PyErr_Format(CorruptError ? CorruptError : PyExc_ValueError,
                     "index points outside the row area (key #%llu): the table file is corrupt",
                     (unsigned long long)i);
    else
        PyErr_Format(BusyError ? BusyError : PyExc_RuntimeError,
                     "row of key #%llu kept changing during %d read attempts", (unsigned long long)i,
                     SPIN_BUDGET);
    return NULL;
}

/* packed string keys: hashes (u64[n]), offsets (u64[n+1]) into blob */
typedef struct {
    Py_buffer hb, ob, bb;
    const uint64_t *hashes;
    const uint64_t *offs;
    const char *blob;
    uint64_t n;
} packed_t;

static void packed_release(packed_t *p)
{
    PyBuffer_Release(&p->hb);
    PyBuffer_Release(&p->ob);
    PyBuffer_Release(&p->bb);
}

static int packed_get(PyObject *h, PyObject *o, PyObject *b, packed_t *p)
{
    memset(p, 0, sizeof(*p));
    if (PyObject_GetBuffer(h, &p->hb, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(o, &p->ob, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&p->hb);
        return -1;
    }
    if (PyObject_GetBuffer(b, &p->bb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&p->hb);
        PyBuffer_Release(&p->ob);
        return -1;
    }
    p->n = (uint64_t)p->hb.len / 8;
    p->hashes = (const uint64_t *)p->hb.buf;
    p->offs = (const uint64_t *)p->ob.buf;
    p->blob = (const char *)p->bb.buf;
    int bad = (p->hb.len % 8) != 0 || (uint64_t)p->ob.len != 8 * (p->n + 1);
    if (!bad) {
        bad = p->offs[0] != 0 || p->offs[p->n] != (uint64_t)p->bb.len;
        for (uint64_t i = 0; !bad && i < p->n; i++)
            bad = p->offs[i] > p->offs[i + 1];
    }
    if (bad) {
        packed_release(p);
        PyErr_SetString(PyExc_ValueError, "malformed packed string keys");
        return -1;
    }
    return 0;
}

/* string keys read straight from a list of str/bytes (no packing); valid while the GIL is held */
typedef struct {
    const char **ptrs;
    uint64_t *lens;
    uint64_t *hashes;
} strlist_t;

/* optional arguments of the get entry points (see get_args) */
typedef struct {
    PyObject *default_o;      /* vector bytes written for misses, or None for zeros */
    PyObject *tags_o;         /* None, or a writable buffer of n u64: each row's tag (0 for misses) */
    long long min_version;    /* < 0: found[i] is 1/0 (hit/miss); >= 0: found[i] is a freshness status */
    unsigned long long max_age; /* classifying: rows filled more than this many seconds ago are stale (0: no limit) */
    PyObject *stats_o;        /* None, or a writable int64[4]: calls, keys, fresh, stale are added to it */
    int stale_as_miss;        /* classifying: report stale rows as misses, holding the default vector */
} get_opts_t;

/* freshness status written to found[] when min_version >= 0 (embkv.cache HIT / OOV / STALE) */
#define S_FRESH 0
#define S_MISS 1
#define S_STALE 2

/* the stats buffer of a classifying get; added to with the GIL held, so threads never lose counts */
#define ST_CALLS 0
#define ST_KEYS 1
#define ST_FRESH 2
#define ST_STALE 3

/* a row is fresh when untagged (tag 0) or its tag says version >= min_version, filled at >= min_time */
static inline uint8_t tag_status(uint64_t tag, uint64_t min_version, uint64_t min_time)
{
    if (tag == 0 || ((tag >> 32) >= min_version && (tag & 0xFFFFFFFFULL) >= min_time))
        return S_FRESH;
    return S_STALE;
}

/* get(keys..., out, found, default[, tags, min_version, max_age, stats, stale_as_miss]) -> number found
 * (fresh when classifying), or -1 when the file was superseded */
static PyObject *do_get(View *self, const int64_t *ikeys, packed_t *pk, strlist_t *sk, uint64_t n, PyObject *out_o,
                        PyObject *found_o, const get_opts_t *opt)
{
    Py_buffer out = {0}, found = {0}, dflt = {0}, tagb = {0}, statb = {0};
    int have_out = out_o != Py_None, have_dflt = opt->default_o != Py_None, have_tags = opt->tags_o != Py_None;
    int have_stats = opt->stats_o != Py_None;
    int classify = opt->min_version >= 0;
    uint64_t min_version = classify ? (uint64_t)opt->min_version : 0, min_time = 0, stale = 0;
    if (classify && opt->max_age) {
        uint64_t now = (uint64_t)time(NULL);
        min_time = now > opt->max_age ? now - opt->max_age : 0;
    }
    PyObject *res = NULL;
    if (have_out && PyObject_GetBuffer(out_o, &out, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(found_o, &found, PyBUF_WRITABLE) < 0)
        goto done_out;
    if (have_dflt && PyObject_GetBuffer(opt->default_o, &dflt, PyBUF_SIMPLE) < 0)
        goto done_found;
    if (have_tags && PyObject_GetBuffer(opt->tags_o, &tagb, PyBUF_WRITABLE) < 0)
        goto done_dflt;
    if (have_stats && PyObject_GetBuffer(opt->stats_o, &statb, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        goto done_tags;
    if (have_stats) {
        /* int64 only: the counts are added as int64, so another element type would read as garbage */
        const char *fmt = statb.format ? statb.format : "B";
        char last = fmt[0] ? fmt[strlen(fmt) - 1] : 'B';
        if (statb.itemsize != 8 || (last != 'l' && last != 'q')) {
            PyErr_SetString(PyExc_ValueError, "stats must be an int64 array of 4");
            goto done_all;
        }
    }
    if ((have_out && (uint64_t)out.len != n * self->out_bytes) || (uint64_t)found.len != n ||
        (have_dflt && (uint64_t)dflt.len != self->out_bytes) || (have_tags && (uint64_t)tagb.len != 8 * n) ||
        (have_stats && statb.len != 4 * 8)) {
        PyErr_SetString(PyExc_ValueError, "output buffers do not match the batch");
        goto done_all;
    }
    if (LOAD_ACQ(&self->ctr[C_SUPERSEDED])) {
        res = PyLong_FromLong(-1);
        goto done_all;
    }
    char *o = have_out ? (char *)out.buf : NULL;
    uint8_t *f = (uint8_t *)found.buf;
    uint64_t *tags = have_tags ? (uint64_t *)tagb.buf : NULL;
    const char *d = have_dflt ? (const char *)dflt.buf : NULL;
    uint64_t hits = 0, bad_i = 0;
    int code = 0;
    int release = n >= GIL_RELEASE_MIN && sk == NULL; /* list keys point into Python objects */
    PyThreadState *ts = NULL;
    if (release)
        ts = PyEval_SaveThread();
    /* batches go in chunks: first hash every key and prefetch its home slot, then prefetch
     * the rows those slots name, then do the validated reads, so cache misses overlap */
    uint64_t starts[PREFETCH_CHUNK], rows[PREFETCH_CHUNK];
    for (uint64_t base = 0; base < n && code == 0; base += PREFETCH_CHUNK) {
        uint64_t m = n - base < PREFETCH_CHUNK ? n - base : PREFETCH_CHUNK;
        for (uint64_t c = 0; c < m; c++) {
            uint64_t i = base + c;
            starts[c] = ikeys ? mix64((uint64_t)ikeys[i]) : (pk ? pk->hashes[i] : sk->hashes[i]);
            __builtin_prefetch(&self->slots[home_slot(self, starts[c])]);
        }
        if (m > 1) {
            /* stage 2: the row of the first slot on each probe path whose fingerprint matches
             * (a hint only: the validated read follows). At the index's load the home slot often
             * holds another key, so prefetching the home slot's row would fetch the wrong one */
            for (uint64_t c = 0; c < m; c++) {
                uint64_t j = home_slot(self, starts[c]), fp = FINGERPRINT(starts[c]);
                rows[c] = UINT64_MAX;
                for (int step = 0; step < 8; step++) {
                    uint64_t w = LOAD_RLX(&self->slots[j]), rf = w & ROW_FIELD;
                    if (rf == SLOT_EMPTY)
                        break;
                    if (rf != SLOT_TOMB && (w >> ROW_BITS) == fp) {
                        if (rf - 1 < rows_in_use(self)) {
                            rows[c] = rf - 1;
                            __builtin_prefetch(row_meta(self, rf - 1));
                        }
                        break;
                    }
                    j = next_slot(self, j);
                }
            }
            /* stage 3: a long string key's bytes in the heap (prefetching vector lines too measured slower) */
            for (uint64_t c = 0; c < m && self->key_type == KEY_STR; c++) {
                uint64_t i = base + c;
                uint64_t kl = sk ? sk->lens[i] : pk->offs[i + 1] - pk->offs[i];
                if (rows[c] == UINT64_MAX || kl <= INLINE_KEY) /* short keys compare in the row */
                    continue;
                uint64_t *meta = row_meta(self, rows[c]);
                uint64_t off = LOAD_RLX(&meta[3]); /* a long key's heap offset, after its prefix */
                if (SEQ_CODE(LOAD_RLX(&meta[0])) == LONG_KEY && off < heap_in_use(self))
                    __builtin_prefetch(self->heap + off);
            }
        }
        for (uint64_t c = 0; c < m; c++) {
            uint64_t i = base + c;
            char *dst = o ? o + i * self->out_bytes : NULL;
            uint64_t tag = 0;
            int r;
            if (ikeys)
                r = find_key(self, starts[c], (uint64_t)ikeys[i], NULL, 0, dst, &tag);
            else if (pk)
                r = find_key(self, starts[c], 0, pk->blob + pk->offs[i], pk->offs[i + 1] - pk->offs[i], dst, &tag);
            else
                r = find_key(self, starts[c], 0, sk->ptrs[i], sk->lens[i], dst, &tag);
            if (r < 0) {
                code = r;
                bad_i = i;
                break;
            }
            if (tags)
                tags[i] = r ? tag : 0;
            if (classify) {
                uint8_t st = r ? tag_status(tag, min_version, min_time) : S_MISS;
                if (st == S_STALE) {
                    if (opt->stale_as_miss) {
                        st = S_MISS;
                        r = 0; /* below: the row gets the default vector */
                    } else {
                        stale++;
                    }
                }
                f[i] = st;
                hits += st == S_FRESH;
            } else {
                f[i] = (uint8_t)r;
                hits += (uint64_t)r;
            }
            if (!r && dst) {
                if (d)
                    memcpy(dst, d, self->out_bytes);
                else
                    memset(dst, 0, self->out_bytes);
            }
        }
    }
    if (release)
        PyEval_RestoreThread(ts);
    if (code < 0) {
        raise_code(code, bad_i);
    } else {
        if (have_stats) {
            int64_t *st = (int64_t *)statb.buf;
            st[ST_CALLS] += 1;
            st[ST_KEYS] += (int64_t)n;
            st[ST_FRESH] += (int64_t)hits;
            st[ST_STALE] += (int64_t)stale;
        }
        res = PyLong_FromUnsignedLongLong(hits);
    }
done_all:
    if (have_stats)
        PyBuffer_Release(&statb);
done_tags:
    if (have_tags)
        PyBuffer_Release(&tagb);
done_dflt:
    if (have_dflt)
        PyBuffer_Release(&dflt);
done_found:
    PyBuffer_Release(&found);
done_out:
    if (have_out)
        PyBuffer_Release(&out);
    return res;
}

#define GET_OPTS_INIT {Py_None, Py_None, -1, 0, Py_None, 0}

/* the get entry points are METH_FASTCALL (no argument tuple, no format string to interpret):
 * a lookup of one key costs about as much in argument handling as in the probe itself.
 * args[0 .. nreq-1] are the required arguments; then default, tags, min_version, max_age,
 * stats, stale_as_miss, each optional */
static int parse_get_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t nreq,
                          get_opts_t *opt)
{
    if (nargs < nreq || nargs > nreq + 6) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd arguments (%zd given)", name, nreq, nreq + 6, nargs);
        return -1;
    }
    PyObject *const *o = args + nreq;
    Py_ssize_t n = nargs - nreq;
    if (n > 0)
        opt->default_o = o[0];
    if (n > 1)
        opt->tags_o = o[1];
    if (n > 2) {
        opt->min_version = PyLong_AsLongLong(o[2]);
        if (opt->min_version == -1 && PyErr_Occurred())
            return -1;
    }
    if (n > 3) {
        long long age = PyLong_AsLongLong(o[3]);
        if (age == -1 && PyErr_Occurred())
            return -1;
        if (age < 0) {
            PyErr_SetString(PyExc_ValueError, "max_age must not be negative");
            return -1;
        }
        opt->max_age = (unsigned long long)age;
    }
    if (n > 4)
        opt->stats_o = o[4];
    if (n > 5) {
        int t = PyObject_IsTrue(o[5]);
        if (t < 0)
            return -1;
        opt->stale_as_miss = t;
    }
    return 0;
}

static PyObject *View_get_int(View *self, PyObject *const *args, Py_ssize_t nargs)
{
    get_opts_t opt = GET_OPTS_INIT;
    if (parse_get_args("get_int", args, nargs, 3, &opt) < 0)
        return NULL;
    PyObject *keys_o = args[0], *out_o = args[1], *found_o = args[2];
    if (require_keys(self, KEY_INT) < 0)
        return NULL;
    Py_buffer kb;
    if (PyObject_GetBuffer(keys_o, &kb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (kb.len % 8) {
        PyBuffer_Release(&kb);
        PyErr_SetString(PyExc_ValueError, "keys must be int64");
        return NULL;
    }
    PyObject *res = do_get(self, (const int64_t *)kb.buf, NULL, NULL, (uint64_t)kb.len / 8, out_o, found_o, &opt);
    PyBuffer_Release(&kb);
    return res;
}

static PyObject *View_get_strlist(View *self, PyObject *const *args, Py_ssize_t nargs)
{
    get_opts_t opt = GET_OPTS_INIT;
    if (parse_get_args("get_strlist", args, nargs, 3, &opt) < 0)
        return NULL;
    PyObject *keys_o = args[0], *out_o = args[1], *found_o = args[2];
    if (require_keys(self, KEY_STR) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(keys_o, "keys must be a sequence of str or bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *res = NULL;
    strlist_t sk;
    void *mem = PyMem_Malloc((size_t)(n ? n : 1) * (sizeof(char *) + 2 * sizeof(uint64_t)));
    if (!mem) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    sk.ptrs = (const char **)mem;
    sk.lens = (uint64_t *)(sk.ptrs + (n ? n : 1));
    sk.hashes = sk.lens + (n ? n : 1);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = items[i];
        Py_ssize_t len;
        const char *data;
        if (i + 8 < n) /* key objects are scattered on the heap: fetch a few ahead */
            __builtin_prefetch((const char *)items[i + 8] + 32);
        if (PyUnicode_Check(it)) {
            data = PyUnicode_AsUTF8AndSize(it, &len);
            if (!data)
                goto out;
        } else if (PyBytes_Check(it)) {
            data = PyBytes_AS_STRING(it);
            len = PyBytes_GET_SIZE(it);
        } else {
            PyErr_Format(PyExc_TypeError, "string-keyed table: key #%zd is %.100s, not str or bytes", i,
                         Py_TYPE(it)->tp_name);
            goto out;
        }
        sk.ptrs[i] = data;
        sk.lens[i] = (uint64_t)len;
        sk.hashes[i] = XXH3_64bits(data, (size_t)len);
    }
    res = do_get(self, NULL, NULL, &sk, (uint64_t)n, out_o, found_o, &opt);
out:
    PyMem_Free(mem);
    Py_DECREF(seq);
    return res;
}

static PyObject *View_get_str(View *self, PyObject *const *args, Py_ssize_t nargs)
{
    get_opts_t opt = GET_OPTS_INIT;
    if (parse_get_args("get_str", args, nargs, 5, &opt) < 0)
        return NULL;
    PyObject *h = args[0], *o = args[1], *b = args[2], *out_o = args[3], *found_o = args[4];
    if (require_keys(self, KEY_STR) < 0)
        return NULL;
    packed_t pk;
    if (packed_get(h, o, b, &pk) < 0)
        return NULL;
    PyObject *res = do_get(self, NULL, &pk, NULL, pk.n, out_o, found_o, &opt);
    packed_release(&pk);
    return res;
}

/* ---------------------------------------------------------------- writes (one writer, lock held by caller) */

static int alloc_row(View *v, uint64_t *r)
{
    uint64_t nfree = v->ctr[C_FREE];
    if (nfree > 0) {
        if (nfree > v->row_capacity)
            return R_CORRUPT;
        uint64_t cand = v->freelist[nfree - 1];
        if (cand >= v->row_capacity)
            return R_CORRUPT;
        /* count first: a crash after this leaks one row (recovered on reopen), never reuses one twice */
        STORE_RLX(&v->ctr[C_FREE], nfree - 1);
        *r = cand;
        return 0;
    }
    uint64_t used = v->ctr[C_ROWS_USED];
    if (used >= v->row_capacity || used >= v->row_limit)
        return R_CORRUPT; /* pre-checked by the caller; reaching this means the counters lie */
    STORE_RLX(&v->ctr[C_ROWS_USED], used + 1);
    *r = used;
    return 0;
}

static void free_row(View *v, uint64_t r)
{
    uint64_t nfree = v->ctr[C_FREE];
    /* beyond the reserved stack (a fresh version built from keys with duplicates reserves
     * none) or with insane counters: leaking the row is the safe answer; a recount after a
     * crash gives leaked rows back */
    if (nfree >= v->row_capacity || nfree >= v->free_limit)
        return;
    v->freelist[nfree] = r;
    STORE_REL(&v->ctr[C_FREE], nfree + 1);
}

/* checksum of a row: xxh3 of everything after the sequence word (key fields, tag, vector),
 * seeded with the key code the sequence word carries, so a damaged code is caught too */
static inline uint32_t row_checksum(View *v, uint64_t r, uint64_t code)
{
    return (uint32_t)XXH3_64bits_withSeed(v->rows + r * v->row_stride + 8, v->row_header - 8 + v->vec_bytes, code);
}

static void write_row(View *v, uint64_t r, uint64_t code, const uint64_t *meta, int nmeta, const char *vec)
{
    uint64_t *m = row_meta(v, r);
    uint64_t word = m[0];
    uint64_t count = word & SEQ_COUNT;
    if (count & 1) /* left odd by a writer killed mid-row: the row was unreferenced, just move on */
        count++;
    STORE_RLX(&m[0], (word & ~SEQ_COUNT) | ((count + 1) & SEQ_COUNT));
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (int i = 0; i < nmeta; i++)
        STORE_RLX(&m[1 + i], meta[i]);
    memcpy(row_vec(v, r), vec, v->vec_bytes);
    uint64_t sum = row_checksum(v, r, code);
    STORE_REL(&m[0], (sum << 32) | (code << SEQ_CODE_SHIFT) | ((count + 2) & SEQ_COUNT));
}

/* a string row's key: its bytes (inline, or in the heap) and length; 0 if the row is damaged */
static int row_str_key(const View *v, const uint64_t *meta, const char **kb, uint64_t *kl)
{
    uint64_t code = SEQ_CODE(meta[0]);
    const char *area = (const char *)&meta[1];
    if (code <= INLINE_KEY) {
        *kb = area;
        *kl = code;
        return 1;
    }
    uint64_t off, len, heap_used = heap_in_use(v);
    memcpy(&off, area + LONG_PREFIX, 8);
    if (code != LONG_KEY || !check_range(off, 8, heap_used))
        return 0;
    memcpy(&len, v->heap + off, 8);
    if (len <= INLINE_KEY || !check_range(off + 8, len, heap_used) ||
        memcmp(v->heap + off + 8, area, LONG_PREFIX) != 0)
        return 0;
    *kb = v->heap + off + 8;
    *kl = len;
    return 1;
}

/* verify_rows(rows) -> list of (row, problem) for rows whose checksum or key bytes are wrong */
static PyObject *View_verify_rows(View *self, PyObject *args)
{
    Py_buffer rb;
    if (!PyArg_ParseTuple(args, "y*", &rb))
        return NULL;
    PyObject *bad = PyList_New(0);
    if (!bad || require_open(self, 0) < 0 || rb.len % 8) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "rows must be int64");
        Py_XDECREF(bad);
        PyBuffer_Release(&rb);
        return NULL;
    }
    const int64_t *rows = (const int64_t *)rb.buf;
    uint64_t n = (uint64_t)rb.len / 8;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t r = (uint64_t)rows[i];
        const char *problem = NULL;
        if (r >= self->row_capacity) {
            problem = "row number outside the row area";
        } else if (r >= rows_in_use(self)) {
            problem = "row above the rows-used mark (never written)";
        } else {
            uint64_t *m = row_meta(self, r);
            uint64_t word = LOAD_ACQ(&m[0]);
            const char *kb;
            uint64_t kl;
            if (word & 1)
                problem = "row left half-written (odd sequence)";
            else if ((uint32_t)(word >> 32) != row_checksum(self, r, SEQ_CODE(word)))
                problem = "row checksum mismatch (vector or key damaged)";
            else if (self->key_type == KEY_INT && SEQ_CODE(word) != 0)
                problem = "int row with a string key code";
            else if (self->key_type == KEY_STR && !row_str_key(self, m, &kb, &kl))
                problem = "string key bytes outside the key heap or differing from it";
        }
        if (problem) {
            PyObject *item = Py_BuildValue("(Ks)", (unsigned long long)r, problem);
            if (!item || PyList_Append(bad, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(bad);
                PyBuffer_Release(&rb);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    PyBuffer_Release(&rb);
    return bad;
}

/* locate a key for the writer: *slot_out = its slot, or the slot to insert it at */
static int writer_probe(View *v, uint64_t h, uint64_t ikey, const char *kb, uint64_t kl, uint64_t *slot_out,
                        int *found)
{
    uint64_t j = home_slot(v, h), fp = FINGERPRINT(h);
    uint64_t first_tomb = UINT64_MAX;
    for (uint64_t step = 0; step < v->slot_count; step++) {
        uint64_t w = v->slots[j], rf = w & ROW_FIELD;
        if (rf == SLOT_EMPTY) {
            *slot_out = first_tomb != UINT64_MAX ? first_tomb : j;
            *found = 0;
            return 0;
        }
        if (rf == SLOT_TOMB) {
            if (first_tomb == UINT64_MAX)
                first_tomb = j;
        } else if ((w >> ROW_BITS) == fp) {
            if (rf - 1 >= rows_in_use(v))
                return R_CORRUPT;
            uint64_t *m = row_meta(v, rf - 1);
            if (row_holds(v, m, m[0], ikey, kb, kl)) {
                *slot_out = j;
                *found = 1;
                return 0;
            }
        }
        j = next_slot(v, j);
    }
    if (first_tomb != UINT64_MAX) {
        *slot_out = first_tomb;
        *found = 0;
        return 0;
    }
    return R_CORRUPT; /* a full index never happens under the load-factor cap */
}

/* heap bytes a new string key takes: none when it fits in the row, else its length word and bytes */
static inline uint64_t heap_need(uint64_t kl) { return kl <= INLINE_KEY ? 0 : 8 + kl; }

static int put_one(View *v, uint64_t h, uint64_t ikey, const char *kb, uint64_t kl, const char *vec, uint64_t tag)
{
    uint64_t j, r;
    int found, rc;
    if ((rc = writer_probe(v, h, ikey, kb, kl, &j, &found)) < 0)
        return rc;
    if ((rc = alloc_row(v, &r)) < 0)
        return rc;
    uint64_t *s = &v->slots[j];
    /* the tag word is the last header word, present only in tagged tables */
    int with_tag = v->tag_word != 0;
    if (v->key_type == KEY_INT) {
        uint64_t meta[2] = {ikey, tag};
        write_row(v, r, 0, meta, 1 + with_tag, vec);
    } else {
        uint64_t meta[4] = {0, 0, 0, tag};
        uint64_t code = kl;
        if (kl <= INLINE_KEY) {
            memcpy(meta, kb, kl);
        } else {
            uint64_t off;
            code = LONG_KEY;
            memcpy(meta, kb, LONG_PREFIX);
            if (found) {
                memcpy(&off, (const char *)&row_meta(v, (*s & ROW_FIELD) - 1)[1] + LONG_PREFIX, 8); /* same bytes: share */
            } else {
                off = v->ctr[C_HEAP_USED];
                if (!check_range(off, heap_need(kl), v->heap_limit))
                    return R_CORRUPT; /* pre-checked */
                memcpy(v->heap + off, &kl, 8);
                memcpy(v->heap + off + 8, kb, kl);
                STORE_REL(&v->ctr[C_HEAP_USED], off + heap_need(kl));
            }
            memcpy((char *)meta + LONG_PREFIX, &off, 8);
        }
        write_row(v, r, code, meta, 3 + with_tag, vec);
    }
    if (found) {
        uint64_t old = (*s & ROW_FIELD) - 1;
        STORE_REL(s, slot_word(h, r));
        free_row(v, old);
    } else {
        if ((*s & ROW_FIELD) == SLOT_TOMB)
            v->ctr[C_TOMBS]--;
        STORE_REL(s, slot_word(h, r));
        v->ctr[C_LIVE]++;
    }
    return 0;
}

static int room_for(View *v, uint64_t n, uint64_t heap_bytes)
{
    uint64_t cap = v->row_capacity, used = v->ctr[C_ROWS_USED], nfree = v->ctr[C_FREE];
    if (used > cap || nfree > cap)
        return R_CORRUPT;
    uint64_t limit = v->row_limit < cap ? v->row_limit : cap;
    if (nfree + (limit > used ? limit - used : 0) < n)
        return 0;
    uint64_t occupied = v->ctr[C_LIVE] + v->ctr[C_TOMBS];
    if ((occupied + n) * 4 > v->slot_count * 3)
        return 0;
    uint64_t heap_limit = v->heap_limit < v->heap_capacity ? v->heap_limit : v->heap_capacity;
    if (heap_bytes && v->ctr[C_HEAP_USED] + heap_bytes > heap_limit)
        return 0;
    return 1;
}

/* set_limits(rows, heap_bytes, free_entries): the rows, heap bytes and free-stack entries
 * reserved so far (see View.row_limit) */
static PyObject *View_set_limits(View *self, PyObject *args)
{
    unsigned long long rows, heap, free_entries;
    if (!PyArg_ParseTuple(args, "KKK", &rows, &heap, &free_entries))
        return NULL;
    self->row_limit = rows < self->row_capacity ? rows : self->row_capacity;
    self->heap_limit = heap < self->heap_capacity ? heap : self->heap_capacity;
    self->free_limit = free_entries < self->row_capacity ? free_entries : self->row_capacity;
    Py_RETURN_NONE;
}

/* the worst case (every key new) did not fit: count the keys that really are new, since
 * rewriting existing keys needs only one spare row at a time (copy-on-write, then free) */
static int room_for_exact(View *v, const int64_t *ikeys, packed_t *pk, uint64_t n, uint64_t *rows_out,
                          uint64_t *heap_out)
{
    uint64_t fresh = 0, fresh_heap = 0, j;
    int found, rc;
    for (uint64_t i = 0; i < n; i++) {
        if (ikeys) {
            rc = writer_probe(v, mix64((uint64_t)ikeys[i]), (uint64_t)ikeys[i], NULL, 0, &j, &found);
        } else {
            uint64_t kl = pk->offs[i + 1] - pk->offs[i];
            rc = writer_probe(v, pk->hashes[i], 0, pk->blob + pk->offs[i], kl, &j, &found);
            fresh_heap += found ? 0 : heap_need(kl);
        }
        if (rc < 0)
            return rc;
        fresh += !found;
    }
    *rows_out = fresh + 1;
    *heap_out = fresh_heap;
    return room_for(v, fresh + 1, fresh_heap);
}

/* what a put that did not fit answers: the new rows (plus one spare) and heap bytes it needs */
static PyObject *needs(uint64_t rows, uint64_t heap)
{
    return Py_BuildValue("(KK)", (unsigned long long)rows, (unsigned long long)heap);
}

/* the optional tags argument of put: None (every row tag 0) or n u64; *tags NULL for None */
static int tags_get(PyObject *tags_o, uint64_t n, Py_buffer *tb, const uint64_t **tags)
{
    *tags = NULL;
    if (tags_o == NULL || tags_o == Py_None)
        return 0;
    if (PyObject_GetBuffer(tags_o, tb, PyBUF_SIMPLE) < 0)
        return -1;
    if ((uint64_t)tb->len != 8 * n) {
        PyBuffer_Release(tb);
        PyErr_SetString(PyExc_ValueError, "tags must be one u64 per key");
        return -1;
    }
    *tags = (const uint64_t *)tb->buf;
    return 0;
}

/* put_int(keys, vectors[, tags]) -> True, or (rows, heap bytes) the batch needs when it does not fit in
 * the space reserved or the table (nothing written): the writer reserves that much, or grows the table */
static PyObject *View_put_int(View *self, PyObject *args)
{
    Py_buffer kb, vb, tb;
    PyObject *tags_o = NULL;
    const uint64_t *tags = NULL;
    if (!PyArg_ParseTuple(args, "y*y*|O", &kb, &vb, &tags_o))
        return NULL;
    PyObject *res = NULL;
    uint64_t n = (uint64_t)kb.len / 8, i = 0;
    int rc = 0;
    if (require_open(self, 1) < 0)
        goto out;
    if (self->key_type != KEY_INT || kb.len % 8 || (uint64_t)vb.len != n * self->vec_bytes) {
        PyErr_SetString(PyExc_ValueError, "keys/vectors do not match an int-keyed table");
        goto out;
    }
    if (tags_get(tags_o, n, &tb, &tags) < 0)
        goto out;
    uint64_t need_rows = 0, need_heap = 0;
    rc = room_for(self, n, 0);
    if (rc == 0)
        rc = room_for_exact(self, (const int64_t *)kb.buf, NULL, n, &need_rows, &need_heap);
    if (rc <= 0) {
        if (rc < 0)
            raise_code(rc, 0);
        else
            res = needs(need_rows, need_heap);
        goto out;
    }
    const int64_t *keys = (const int64_t *)kb.buf;
    const char *vecs = (const char *)vb.buf;
    Py_BEGIN_ALLOW_THREADS for (i = 0; i < n; i++)
    {
        uint64_t key = (uint64_t)keys[i];
        if ((rc = put_one(self, mix64(key), key, NULL, 0, vecs + i * self->vec_bytes, tags ? tags[i] : 0)) < 0)
            break;
    }
    Py_END_ALLOW_THREADS
    self->ctr[C_GENERATION]++;
    if (rc < 0)
        raise_code(rc, i);
    else
        res = Py_NewRef(Py_True);
out:
    if (tags)
        PyBuffer_Release(&tb);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&vb);
    return res;
}

static PyObject *View_put_str(View *self, PyObject *args)
{
    PyObject *h, *o, *b, *tags_o = NULL;
    Py_buffer vb, tb;
    const uint64_t *tags = NULL;
    if (!PyArg_ParseTuple(args, "OOOy*|O", &h, &o, &b, &vb, &tags_o))
        return NULL;
    PyObject *res = NULL;
    packed_t pk;
    int rc = 0;
    uint64_t i = 0;
    if (require_open(self, 1) < 0) {
        PyBuffer_Release(&vb);
        return NULL;
    }
    if (packed_get(h, o, b, &pk) < 0) {
        PyBuffer_Release(&vb);
        return NULL;
    }
    if (self->key_type != KEY_STR || (uint64_t)vb.len != pk.n * self->vec_bytes) {
        PyErr_SetString(PyExc_ValueError, "keys/vectors do not match a string-keyed table");
        goto out;
    }
    if (tags_get(tags_o, pk.n, &tb, &tags) < 0)
        goto out;
    uint64_t heap_bytes = 0;
    for (i = 0; i < pk.n; i++)
        heap_bytes += heap_need(pk.offs[i + 1] - pk.offs[i]);
    uint64_t need_rows = 0, need_heap = 0;
    rc = room_for(self, pk.n, heap_bytes);
    if (rc == 0)
        rc = room_for_exact(self, NULL, &pk, pk.n, &need_rows, &need_heap);
    if (rc <= 0) {
        if (rc < 0)
            raise_code(rc, 0);
        else
            res = needs(need_rows, need_heap);
        goto out;
    }
    const char *vecs = (const char *)vb.buf;
    Py_BEGIN_ALLOW_THREADS for (i = 0; i < pk.n; i++)
    {
        rc = put_one(self, pk.hashes[i], 0, pk.blob + pk.offs[i], pk.offs[i + 1] - pk.offs[i],
                     vecs + i * self->vec_bytes, tags ? tags[i] : 0);
        if (rc < 0)
            break;
    }
    Py_END_ALLOW_THREADS
    self->ctr[C_GENERATION]++;
    if (rc < 0)
        raise_code(rc, i);
    else
        res = Py_NewRef(Py_True);
out:
    if (tags)
        PyBuffer_Release(&tb);
    packed_release(&pk);
    PyBuffer_Release(&vb);
    return res;
}

static int delete_one(View *v, uint64_t h, uint64_t ikey, const char *kb, uint64_t kl)
{
    uint64_t j;
    int found, rc;
    if ((rc = writer_probe(v, h, ikey, kb, kl, &j, &found)) < 0)
        return rc;
    if (!found)
        return 0;
    uint64_t old = (v->slots[j] & ROW_FIELD) - 1;
    STORE_REL(&v->slots[j], SLOT_TOMB);
    free_row(v, old);
    v->ctr[C_LIVE]--;
    v->ctr[C_TOMBS]++;
    return 1;
}

static PyObject *View_delete_int(View *self, PyObject *args)
{
    Py_buffer kb;
    if (!PyArg_ParseTuple(args, "y*", &kb))
        return NULL;
    PyObject *res = NULL;
    if (require_open(self, 1) == 0) {
        if (self->key_type != KEY_INT || kb.len % 8) {
            PyErr_SetString(PyExc_ValueError, "keys do not match an int-keyed table");
        } else {
            const int64_t *keys = (const int64_t *)kb.buf;
            uint64_t n = (uint64_t)kb.len / 8, deleted = 0, i;
            int rc = 0;
            for (i = 0; i < n; i++) {
                uint64_t key = (uint64_t)keys[i];
                if ((rc = delete_one(self, mix64(key), key, NULL, 0)) < 0)
                    break;
                deleted += (uint64_t)rc;
            }
            self->ctr[C_GENERATION]++;
            res = rc < 0 ? raise_code(rc, i) : PyLong_FromUnsignedLongLong(deleted);
        }
    }
    PyBuffer_Release(&kb);
    return res;
}

static PyObject *View_delete_str(View *self, PyObject *args)
{
    PyObject *h, *o, *b;
    if (!PyArg_ParseTuple(args, "OOO", &h, &o, &b))
        return NULL;
    if (require_open(self, 1) < 0)
        return NULL;
    if (self->key_type != KEY_STR) {
        PyErr_SetString(PyExc_ValueError, "keys do not match a string-keyed table");
        return NULL;
    }
    packed_t pk;
    if (packed_get(h, o, b, &pk) < 0)
        return NULL;
    uint64_t deleted = 0, i;
    int rc = 0;
    for (i = 0; i < pk.n; i++) {
        if ((rc = delete_one(self, pk.hashes[i], 0, pk.blob + pk.offs[i], pk.offs[i + 1] - pk.offs[i])) < 0)
            break;
        deleted += (uint64_t)rc;
    }
    self->ctr[C_GENERATION]++;
    packed_release(&pk);
    return rc < 0 ? raise_code(rc, i) : PyLong_FromUnsignedLongLong(deleted);
}

/* export_str(rows) -> (hashes, offsets, blob) of the keys held by those rows (writer side) */
static PyObject *View_export_str(View *self, PyObject *args)
{
    Py_buffer rb;
    if (!PyArg_ParseTuple(args, "y*", &rb))
        return NULL;
    PyObject *hashes = NULL, *offs = NULL, *blob = NULL, *res = NULL;
    uint64_t n = (uint64_t)rb.len / 8, total = 0;
    const int64_t *rows = (const int64_t *)rb.buf;
    const char *kb;
    uint64_t kl;
    if (require_open(self, 0) < 0 || self->key_type != KEY_STR || rb.len % 8) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "export_str needs int64 rows of a string-keyed table");
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) {
        if ((uint64_t)rows[i] >= rows_in_use(self) || !row_str_key(self, row_meta(self, (uint64_t)rows[i]), &kb, &kl)) {
            PyErr_Format(CorruptError ? CorruptError : PyExc_ValueError,
                         "row %lld holds a damaged string key: the table file is corrupt", (long long)rows[i]);
            goto out;
        }
        total += kl;
    }
    hashes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * n));
    offs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * (n + 1)));
    blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!hashes || !offs || !blob)
        goto out;
    uint64_t *hp = (uint64_t *)PyBytes_AS_STRING(hashes), *op = (uint64_t *)PyBytes_AS_STRING(offs);
    char *bp = PyBytes_AS_STRING(blob);
    uint64_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        row_str_key(self, row_meta(self, (uint64_t)rows[i]), &kb, &kl);
        hp[i] = XXH3_64bits(kb, (size_t)kl);
        op[i] = pos;
        memcpy(bp + pos, kb, kl);
        pos += kl;
    }
    op[n] = pos;
    res = PyTuple_Pack(3, hashes, offs, blob);
out:
    Py_XDECREF(hashes);
    Py_XDECREF(offs);
    Py_XDECREF(blob);
    PyBuffer_Release(&rb);
    return res;
}

/* ---------------------------------------------------------------- batched cold reads */

/* read_rows(fd, keys, out, found, threads) -> rows read: the vectors of int keys read with pread(2)
 * from the table file, spread over `threads` threads, instead of through the mapping one page
 * fault at a time (and without mapping the pages into the process). The index is probed by
 * fingerprint only, so no row page is touched before its read; the read row's own sequence
 * word and key are checked in the buffer. found[i]: 1 read, 0 missing, 2 not settled here (a
 * fingerprint collision, or a row being written): the caller looks those up the usual way. For
 * tables whose writer does not run at the same time (a training table's stores); plain float
 * rows only (the vector is copied as stored). */
typedef struct {
    View *v;
    int fd;
    const int64_t *keys;
    const uint64_t *rows;
    char *out;
    uint8_t *found;
    uint64_t lo, hi;
    uint64_t read;
    int err;
} read_job_t;

static void *read_some(void *arg)
{
    read_job_t *job = arg;
    View *v = job->v;
    char *buf = malloc(v->row_stride);
    if (!buf) {
        job->err = ENOMEM;
        return NULL;
    }
    for (uint64_t i = job->lo; i < job->hi; i++) {
        if (job->rows[i] == UINT64_MAX)
            continue;
        off_t at = (off_t)((uint64_t)(v->rows - v->base) + job->rows[i] * v->row_stride);
        ssize_t got = pread(job->fd, buf, v->row_stride, at);
        if (got != (ssize_t)v->row_stride) {
            job->found[i] = 2;
            continue;
        }
        uint64_t seq, key;
        memcpy(&seq, buf, 8);
        memcpy(&key, buf + 8, 8);
        if ((seq & 1) || key != (uint64_t)job->keys[i]) {
            job->found[i] = 2;
            continue;
        }
        memcpy(job->out + i * v->out_bytes, buf + v->row_header, v->out_bytes);
        job->found[i] = 1;
        job->read++;
    }
    free(buf);
    return NULL;
}

static PyObject *View_read_rows(View *self, PyObject *args)
{
    int fd, threads;
    Py_buffer kb, ob, fb;
    if (!PyArg_ParseTuple(args, "iy*w*w*i", &fd, &kb, &ob, &fb, &threads))
        return NULL;
    PyObject *res = NULL;
    uint64_t n = (uint64_t)kb.len / 8;
    uint64_t *rows = NULL;
    if (require_keys(self, KEY_INT) < 0)
        goto out;
    if (self->quant != QUANT_NONE || kb.len % 8 || (uint64_t)ob.len != n * self->out_bytes || (uint64_t)fb.len != n) {
        PyErr_SetString(PyExc_ValueError, "read_rows: buffers do not match the batch (float rows only)");
        goto out;
    }
    if (threads < 1)
        threads = 1;
    if (threads > 64)
        threads = 64;
    rows = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!rows) {
        PyErr_NoMemory();
        goto out;
    }
    const int64_t *keys = kb.buf;
    uint8_t *found = fb.buf;
    uint64_t total = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t used = rows_in_use(self);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t h = mix64((uint64_t)keys[i]), j = home_slot(self, h), fp = FINGERPRINT(h);
        rows[i] = UINT64_MAX;
        found[i] = 0;
        for (uint64_t step = 0; step < self->slot_count; step++) {
            uint64_t w = LOAD_ACQ(&self->slots[j]), rf = w & ROW_FIELD;
            if (rf == SLOT_EMPTY)
                break;
            if (rf != SLOT_TOMB && (w >> ROW_BITS) == fp) {
                if (rf - 1 < used)
                    rows[i] = rf - 1;
                else
                    found[i] = 2; /* damaged, or moving: the usual lookup says which */
                break;
            }
            j = next_slot(self, j);
        }
    }
    uint64_t per = (n + (uint64_t)threads - 1) / (uint64_t)threads;
    read_job_t jobs[64];
    pthread_t tids[64];
    int created[64] = {0};
    for (int t = 0; t < threads; t++) {
        uint64_t lo = (uint64_t)t * per, hi = lo + per < n ? lo + per : n;
        jobs[t] = (read_job_t){self, fd, keys, rows, (char *)ob.buf, found, lo < n ? lo : n, hi, 0, 0};
        if (lo >= hi || t == threads - 1)
            continue;
        created[t] = pthread_create(&tids[t], NULL, read_some, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; t++) /* the last slice, or one no thread could take, runs here */
        if (!created[t] && jobs[t].lo < jobs[t].hi)
            read_some(&jobs[t]);
    for (int t = 0; t < threads; t++) {
        if (created[t])
            pthread_join(tids[t], NULL);
        total += jobs[t].read;
        err = err ? err : jobs[t].err;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    res = PyLong_FromUnsignedLongLong(total);
out:
    free(rows);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&fb);
    return res;
}

/* ---------------------------------------------------------------- module functions */

/* pack_str(sequence of str/bytes) -> (hashes, offsets, blob); str is hashed as UTF-8 */
static PyObject *pack_str(PyObject *mod, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "keys must be a sequence of str or bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *hashes = NULL, *offs = NULL, *blob = NULL, *res = NULL;
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = items[i];
        Py_ssize_t len;
        if (PyUnicode_Check(it)) {
            if (!PyUnicode_AsUTF8AndSize(it, &len))
                goto out;
        } else if (PyBytes_Check(it)) {
            len = PyBytes_GET_SIZE(it);
        } else {
            PyErr_Format(PyExc_TypeError, "string-keyed table: key #%zd is %.100s, not str or bytes", i,
                         Py_TYPE(it)->tp_name);
            goto out;
        }
        total += (uint64_t)len;
    }
    hashes = PyBytes_FromStringAndSize(NULL, 8 * n);
    offs = PyBytes_FromStringAndSize(NULL, 8 * (n + 1));
    blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!hashes || !offs || !blob)
        goto out;
    uint64_t *hp = (uint64_t *)PyBytes_AS_STRING(hashes), *op = (uint64_t *)PyBytes_AS_STRING(offs);
    char *bp = PyBytes_AS_STRING(blob);
    uint64_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = items[i];
        const char *data;
        Py_ssize_t len;
        if (PyUnicode_Check(it))
            data = PyUnicode_AsUTF8AndSize(it, &len); /* cached by the first pass */
        else {
            data = PyBytes_AS_STRING(it);
            len = PyBytes_GET_SIZE(it);
        }
        hp[i] = XXH3_64bits(data, (size_t)len);
        op[i] = pos;
        memcpy(bp + pos, data, (size_t)len);
        pos += (uint64_t)len;
    }
    op[n] = pos;
    res = PyTuple_Pack(3, hashes, offs, blob);
out:
    Py_XDECREF(hashes);
    Py_XDECREF(offs);
    Py_XDECREF(blob);
    Py_DECREF(seq);
    return res;
}

static PyObject *set_errors(PyObject *mod, PyObject *args)
{
    PyObject *corrupt, *busy;
    if (!PyArg_ParseTuple(args, "OO", &corrupt, &busy))
        return NULL;
    Py_XSETREF(CorruptError, Py_NewRef(corrupt));
    Py_XSETREF(BusyError, Py_NewRef(busy));
    Py_RETURN_NONE;
}

static PyMethodDef View_methods[] = {
    {"get_int", (PyCFunction)(void (*)(void))View_get_int, METH_FASTCALL,
     "get_int(keys, out|None, found[, default, tags, min_version, max_age, stats, stale_as_miss]) -> hits, or -1 if "
     "the file was superseded. min_version >= 0: found[i] = 0 fresh, 1 miss, 2 stale (by the row's tag)"},
    {"get_str", (PyCFunction)(void (*)(void))View_get_str, METH_FASTCALL,
     "get_str(hashes, offsets, blob, out|None, found[, default, tags, min_version, max_age, stats, stale_as_miss])"},
    {"get_strlist", (PyCFunction)(void (*)(void))View_get_strlist, METH_FASTCALL,
     "get_strlist(keys, out|None, found[, default, ...]): like get_int, string keys read from a list"},
    {"put_int", (PyCFunction)View_put_int, METH_VARARGS,
     "put_int(keys, vectors[, tags]) -> True, or (rows, heap bytes) needed if the batch does not fit"},
    {"put_str", (PyCFunction)View_put_str, METH_VARARGS,
     "put_str(hashes, offsets, blob, vectors[, tags]) -> True, or (rows, heap bytes) needed if it does not fit"},
    {"read_rows", (PyCFunction)View_read_rows, METH_VARARGS,
     "read_rows(fd, keys, out, found, threads) -> rows read with pread (found: 1 read, 0 missing, 2 unsettled)"},
    {"set_limits", (PyCFunction)View_set_limits, METH_VARARGS,
     "set_limits(rows, heap_bytes, free_entries): how far writes may go (the space reserved)"},
    {"delete_int", (PyCFunction)View_delete_int, METH_VARARGS, "delete_int(keys) -> number deleted"},
    {"delete_str", (PyCFunction)View_delete_str, METH_VARARGS, "delete_str(hashes, offsets, blob) -> deleted"},
    {"export_str", (PyCFunction)View_export_str, METH_VARARGS, "export_str(rows) -> packed keys of those rows"},
    {"verify_rows", (PyCFunction)View_verify_rows, METH_VARARGS,
     "verify_rows(rows) -> [(row, problem)] for damaged rows (checksums, string key bytes)"},
    {"release", (PyCFunction)View_release, METH_NOARGS, "release the mapped buffer"},
    {NULL}};

static PyTypeObject ViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "embkv.file._kernels.View",
    .tp_basicsize = sizeof(View),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapped embkv table: the compiled lookup/upsert/delete kernels.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)View_init,
    .tp_dealloc = (destructor)View_dealloc,
    .tp_methods = View_methods,
};

static PyMethodDef module_methods[] = {
    {"pack_str", pack_str, METH_O, "pack_str(keys) -> (hashes, offsets, blob), xxh3-64 of each key's UTF-8"},
    {"set_errors", set_errors, METH_VARARGS, "set_errors(corrupt_cls, busy_cls)"},
    {NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "embkv.file._kernels", "embkv compiled kernels", -1,
                                       module_methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
    if (PyType_Ready(&ViewType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "View", (PyObject *)&ViewType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
