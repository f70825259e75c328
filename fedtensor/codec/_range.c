/* A range coder that writes and reads, word for word, constriction's queue.RangeEncoder stream (32-bit words,
 * a 64-bit state, 24-bit probabilities) for fedtensor's models: categorical symbols under constriction's "fast"
 * (perfect=False) quantisation of float32 probability rows, Bernoulli decisions under that of a float64 p, and
 * raw bits. constriction (Rust, behind pyo3) holds the GIL while it codes and needs a gathered copy of every
 * symbol's probability row; here the rows are read in place, a run of the block coder's chunks is one call,
 * and the GIL is released while coding. The tests compare both ways with constriction, valid streams and
 * damaged ones.
 *
 * The quantisation is constriction's exactly: symbol s of a row p[0..K) has the cumulative
 * as_u32(c[s] * scale) + s (wrapping), c[s] = p[0] + … + p[s-1] summed left to right in float32, scale =
 * (2^24 − K) / c[K], the last symbol ending at 2^24; as_u32 is Rust's saturating `as` (NaN and negatives give
 * 0). A row whose sum is not a positive normal number, and a symbol of zero width, are refused as there.
 * setup.py compiles without fused multiply-adds.
 *
 * Every call is all or nothing: an encoder call that fails (a symbol outside its model, no memory) leaves the
 * stream as it was before the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float arithmetic must be plain IEEE single and double precision (the streams would differ)"
#endif

#define PRECISION 24
#define TOTAL ((uint32_t)1 << PRECISION)
#define MAX_SYMBOLS 1024 /* row length bound (fedtensor's rows have 16 or 40 entries) */

enum { OUTSIDE = -2, INVALID_DATA = -3, NO_ROW = -4 }; /* and -1: out of memory */

static PyObject *InvalidData; /* _range.InvalidData (a ValueError): data no encoder writes */

/* Rust's `as u32` from a float: saturating, NaN to 0. */
static inline uint32_t as_u32f(float x) { return x != x || x <= 0.0f ? 0 : x >= 4294967296.0f ? UINT32_MAX : (uint32_t)x; }
static inline uint32_t as_u32d(double x) { return x != x || x <= 0.0 ? 0 : x >= 4294967296.0 ? UINT32_MAX : (uint32_t)x; }

/* A row's cumulatives c[0..K] (float32) and its scale, as constriction's lazy categorical model; 0 for a row
 * constriction refuses (its sum not a positive normal number). */
static float row_model(const float *p, Py_ssize_t k, float *c) {
    float acc = 0.0f;
    for (Py_ssize_t s = 0; s < k; s++) {
        c[s] = acc;
        acc = acc + p[s];
    }
    c[k] = acc;
    if (!(isnormal(acc) && acc > 0.0f)) return 0.0f;
    return (float)(TOTAL - (uint32_t)k) / acc;
}

/* Where symbol 1 starts under constriction's fast model of [1 − p, p] (float64); 0 for a p it refuses. */
static uint32_t bit_split(double p) {
    double q = 1.0 - p, norm = q + p;
    if (!(isnormal(norm) && norm > 0.0)) return 0;
    return as_u32d(q * ((double)(TOTAL - 2) / norm)) + 1;
}

static int bit_interval(uint32_t mid, int64_t v, uint32_t *left, uint32_t *prob) {
    if (mid == 0 || (v != 0 && v != 1)) return OUTSIDE;
    *left = v ? mid : 0;
    *prob = v ? TOTAL - mid : mid;
    return *prob ? 0 : OUTSIDE;
}

/* ------------------------------------------------------------------------------------------------------------
 * Encoder
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t lower, range;
    Py_ssize_t inverted; /* words held back while a carry may still reach them (0: none) */
    uint32_t first_inverted;
    Py_ssize_t n_words;
} State;

typedef struct {
    PyObject_HEAD
    State s;
    uint32_t *words;
    Py_ssize_t cap;
    int busy; /* coding with the GIL released: no other call may touch it meanwhile */
} Encoder;

/* Room for more words (out of line: once per doubling). */
static __attribute__((noinline)) int grow(Encoder *e) {
    Py_ssize_t cap = e->cap ? 2 * e->cap : 1024;
    uint32_t *grown = PyMem_RawRealloc(e->words, (size_t)cap * sizeof(uint32_t));
    if (!grown) return -1;
    e->words = grown, e->cap = cap;
    return 0;
}

/* The coding functions below take the state as ``s``, a local copy of ``e->s`` in every coding loop (stored
 * back once the call succeeds): a state only reachable through ``e`` went to memory and back on every symbol,
 * since the word stores might alias it (Python's extensions build with -fno-strict-aliasing). */
static inline int put(Encoder *e, State *s, uint32_t w) {
    if (s->n_words == e->cap && grow(e) < 0) return -1;
    e->words[s->n_words++] = w;
    return 0;
}

/* Flush held-back words once the range no longer straddles a carry (carry: lower wrapped). */
static int release_inverted(Encoder *e, State *s, int carry) {
    uint32_t first = carry ? s->first_inverted + 1 : s->first_inverted, rest = carry ? 0 : UINT32_MAX;
    if (put(e, s, first) < 0) return -1;
    for (Py_ssize_t i = 1; i < s->inverted; i++)
        if (put(e, s, rest) < 0) return -1;
    s->inverted = 0;
    return 0;
}

/* Encode the interval [left, left + prob) of [0, 2^24): constriction's encode_symbol. */
static inline int encode(Encoder *e, State *s, uint32_t left, uint32_t prob) {
    uint64_t scale = s->range >> PRECISION, range = scale * prob;
    if (!range) return OUTSIDE;
    s->range = range;
    uint64_t lower = s->lower + scale * left;
    if (s->inverted && lower + s->range > lower && release_inverted(e, s, lower < s->lower) < 0) return -1;
    s->lower = lower;
    if (s->range < ((uint64_t)1 << 32)) {
        s->range <<= 32;
        uint32_t word = (uint32_t)(s->lower >> 32);
        s->lower <<= 32;
        if (s->inverted)
            s->inverted++;
        else if (s->lower + s->range > s->lower) {
            if (put(e, s, word) < 0) return -1;
        } else
            s->inverted = 1, s->first_inverted = word;
    }
    return 0;
}

static inline int encode_bit(Encoder *e, State *s, uint32_t mid, int64_t v) {
    uint32_t left, prob;
    int rc = bit_interval(mid, v, &left, &prob);
    return rc ? rc : encode(e, s, left, prob);
}

static void set_error(int rc, const char *what) {
    if (rc == -1) PyErr_NoMemory();
    else if (rc == INVALID_DATA) PyErr_Format(InvalidData, "%s: invalid compressed data", what);
    else if (rc == NO_ROW) PyErr_Format(PyExc_IndexError, "%s: a row number outside the table", what);
    else PyErr_Format(PyExc_ValueError, "%s: a symbol outside its model, or a model constriction refuses", what);
}

typedef struct {
    Py_buffer b;
    int held;
} Buf;

static void release(Buf *b, int n) {
    for (int i = 0; i < n; i++)
        if (b[i].held) PyBuffer_Release(&b[i].b);
}

/* A C-contiguous buffer of ``ndim`` dimensions and struct format ``format`` ("f", "d", "i", "H", "I", "q");
 * ``writable`` for outputs. */
static int get(PyObject *obj, Buf *out, const char *format, int ndim, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, &out->b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    out->held = 1;
    const char *f = out->b.format ? out->b.format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    char want = format[0];
    int ok = strcmp(f, format) == 0 || (want == 'q' && strcmp(f, "l") == 0 && out->b.itemsize == 8) ||
             (want == 'i' && strcmp(f, "l") == 0 && out->b.itemsize == 4) ||
             (want == 'I' && strcmp(f, "L") == 0 && out->b.itemsize == 4);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: wrong dtype (format %s, expected %s)", name, f, format);
        return -1;
    }
    if (out->b.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions", name, ndim);
        return -1;
    }
    return 0;
}

/* Begin a call that codes with the GIL released: a busy encoder is refused; the state is kept to rewind to. */
static int begin(Encoder *e, State *kept) {
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "range encoder: in use by another thread");
        return -1;
    }
    *kept = e->s;
    e->busy = 1;
    return 0;
}

/* End it: after an error the stream is rewound to where the call began (words past it are dropped). */
static PyObject *end(Encoder *e, const State *kept, int rc, const char *what) {
    e->busy = 0;
    if (!rc) Py_RETURN_NONE;
    e->s = *kept;
    set_error(rc, what);
    return NULL;
}

/* The left ends of table rows (row_lefts), each made when first used: k + 1 a row. */
typedef struct {
    uint32_t *left;
    int64_t *made; /* the tag a row was made under (-1: not yet) */
} Rows;

static int rows_new(Rows *r, Py_ssize_t n_rows, Py_ssize_t k) {
    r->left = PyMem_RawMalloc((size_t)(n_rows ? n_rows : 1) * (k + 1) * sizeof(uint32_t));
    r->made = PyMem_RawMalloc((size_t)(n_rows ? n_rows : 1) * sizeof(int64_t));
    if (!r->left || !r->made) {
        PyMem_RawFree(r->left), PyMem_RawFree(r->made);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n_rows; i++) r->made[i] = -1;
    return 0;
}

static void rows_free(Rows *r) { PyMem_RawFree(r->left), PyMem_RawFree(r->made); }

/* A row's left ends under constriction's quantisation (symbol v starts at as_u32f(c[v] * scale) + v; after the
 * last, 2^24), all 0 for a row constriction refuses: coding a symbol is then two loads, not two float products
 * and conversions (2.4 against 6.6 ns a symbol), and the same for every symbol of a row. */
static void row_lefts(const float *p, Py_ssize_t k, uint32_t *left) {
    float c[MAX_SYMBOLS + 1], scale = row_model(p, k, c);
    for (Py_ssize_t v = 0; v < k; v++) left[v] = scale == 0.0f ? 0 : as_u32f(c[v] * scale) + (uint32_t)v;
    left[k] = scale == 0.0f ? 0 : TOTAL;
}

/* Row ``i`` of ``table`` (k entries a row) as made for ``tag``: its left ends. */
static const uint32_t *rows_lefts(Rows *r, const float *table, Py_ssize_t i, Py_ssize_t k, int64_t tag) {
    uint32_t *left = r->left + i * (k + 1);
    if (r->made[i] != tag) {
        row_lefts(table + i * k, k, left);
        r->made[i] = tag;
    }
    return left;
}

static inline int encode_left(Encoder *e, State *s, const uint32_t *left, Py_ssize_t k, int64_t v) {
    if (v < 0 || v >= k) return OUTSIDE;
    uint32_t prob = left[v + 1] - left[v];
    return prob ? encode(e, s, left[v], prob) : OUTSIDE;
}

/* The inputs of categorical_rows, both ways: a (L, K) float32 table, uint16 row numbers or None (row i for
 * symbol i), and the symbols (int32; written when decoding). */
static int rows_inputs(PyObject **o, Buf *b, int writable, Py_ssize_t *n_rows, Py_ssize_t *k, Py_ssize_t *n) {
    if (get(o[0], &b[0], "f", 2, 0, "table") < 0 || (o[1] != Py_None && get(o[1], &b[1], "H", 1, 0, "rows") < 0) ||
        get(o[2], &b[2], "i", 1, writable, "values") < 0)
        return -1;
    *n_rows = b[0].b.shape[0], *k = b[0].b.shape[1], *n = o[1] == Py_None ? *n_rows : b[1].b.shape[0];
    if (*k < 2 || *k > MAX_SYMBOLS || b[2].b.shape[0] != *n) {
        PyErr_SetString(PyExc_ValueError, "categorical_rows: bad shapes (rows of 2 to 1024 symbols, a value each)");
        return -1;
    }
    return 0;
}

/* categorical_rows(table float32 (L, K), rows uint16 (n) or None, values int32 (n)): value i under row rows[i]
 * (under row i where rows is None). */
static PyObject *Encoder_categorical_rows(Encoder *e, PyObject *args) {
    PyObject *o[3], *result = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2])) return NULL;
    Buf b[3] = {0};
    Py_ssize_t n_rows, k, n;
    Rows rows;
    State kept;
    if (rows_inputs(o, b, 0, &n_rows, &k, &n) < 0 || rows_new(&rows, n_rows, k) < 0) goto done;
    if (begin(e, &kept) == 0) {
        State st = e->s;
        const float *table = b[0].b.buf;
        const uint16_t *at = o[1] == Py_None ? NULL : b[1].b.buf;
        const int32_t *values = b[2].b.buf;
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n && !rc; i++) {
            Py_ssize_t r = at ? at[i] : i; /* read once: the array may change under a released GIL */
            if (r >= n_rows) { rc = NO_ROW; break; }
            rc = encode_left(e, &st, rows_lefts(&rows, table, r, k, 0), k, values[i]);
        }
        Py_END_ALLOW_THREADS
        if (!rc) e->s = st;
        result = end(e, &kept, rc, "categorical_rows");
    }
    rows_free(&rows);
done:
    release(b, 3);
    return result;
}

/* categorical_alike(probs float32 (K), values int32 (n)): every value under the one row. */
static PyObject *Encoder_categorical_alike(Encoder *e, PyObject *args) {
    PyObject *o[2], *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1])) return NULL;
    Buf b[2] = {0};
    State kept;
    if (get(o[0], &b[0], "f", 1, 0, "probs") < 0 || get(o[1], &b[1], "i", 1, 0, "values") < 0) goto done;
    Py_ssize_t k = b[0].b.shape[0], n = b[1].b.shape[0];
    if (k < 2 || k > MAX_SYMBOLS) {
        PyErr_SetString(PyExc_ValueError, "categorical_alike: a row of 2 to 1024 symbols");
        goto done;
    }
    uint32_t left[MAX_SYMBOLS + 1];
    row_lefts(b[0].b.buf, k, left);
    if (begin(e, &kept) == 0) {
        State st = e->s;
        const int32_t *values = b[1].b.buf;
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n && !rc; i++) rc = encode_left(e, &st, left, k, values[i]);
        Py_END_ALLOW_THREADS
        if (!rc) e->s = st;
        result = end(e, &kept, rc, "categorical_alike");
    }
done:
    release(b, 2);
    return result;
}

/* The inputs of bernoulli, both ways: p1 float64 (n) or None (1/2 each), and the bits (int32; written
 * when decoding). */
static int bernoulli_inputs(PyObject **o, Buf *b, int writable, Py_ssize_t *n) {
    if ((o[0] != Py_None && get(o[0], &b[0], "d", 1, 0, "p1") < 0) ||
        get(o[1], &b[1], "i", 1, writable, writable ? "out" : "values") < 0)
        return -1;
    *n = b[1].b.shape[0];
    if (o[0] != Py_None && b[0].b.shape[0] != *n) {
        PyErr_SetString(PyExc_ValueError, "bernoulli: lengths differ");
        return -1;
    }
    return 0;
}

/* bernoulli(p1 float64 (n) or None for 1/2 each, values int32 (n)). */
static PyObject *Encoder_bernoulli(Encoder *e, PyObject *args) {
    PyObject *o[2], *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1])) return NULL;
    Buf b[2] = {0};
    State kept;
    Py_ssize_t n;
    if (bernoulli_inputs(o, b, 0, &n) < 0) goto done;
    if (begin(e, &kept) == 0) {
        State st = e->s;
        const double *p = o[0] == Py_None ? NULL : b[0].b.buf;
        const int32_t *values = b[1].b.buf;
        uint32_t even = bit_split(0.5);
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n && !rc; i++) rc = encode_bit(e, &st, p ? bit_split(p[i]) : even, values[i]);
        Py_END_ALLOW_THREADS
        if (!rc) e->s = st;
        result = end(e, &kept, rc, "bernoulli");
    }
done:
    release(b, 2);
    return result;
}

/* chunks(bounds int64 (C+1), local uint16, sym int32, tables float32 (C, L, K), psign float64, sign int32,
 * dist float64 (C, D), length int32, bits int32, marks int64 (3, C+1)): a run of C chunks of
 * fedtensor.codec.entropy's signed coder, each its symbols under its own table's rows, then its non-zeros'
 * signs, then (if any) its escapes' lengths under its row of dist (cast to float32) and their raw bits;
 * marks: where each chunk's signs, escapes and bits start. The calls the Python loop made one by one. */
static PyObject *Encoder_chunks(Encoder *e, PyObject *args) {
    PyObject *o[10], *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    Buf b[10] = {0};
    int64_t *edges = NULL; /* private copies of bounds and marks: the GIL is released while they are used */
    Rows rows = {0};
    State kept;
    if (get(o[0], &b[0], "q", 1, 0, "bounds") < 0 || get(o[1], &b[1], "H", 1, 0, "local") < 0 ||
        get(o[2], &b[2], "i", 1, 0, "sym") < 0 || get(o[3], &b[3], "f", 3, 0, "tables") < 0 ||
        get(o[4], &b[4], "d", 1, 0, "psign") < 0 || get(o[5], &b[5], "i", 1, 0, "sign") < 0 ||
        get(o[6], &b[6], "d", 2, 0, "dist") < 0 || get(o[7], &b[7], "i", 1, 0, "length") < 0 ||
        get(o[8], &b[8], "i", 1, 0, "bits") < 0 || get(o[9], &b[9], "q", 2, 0, "marks") < 0)
        goto done;
    Py_ssize_t n_chunks = b[0].b.shape[0] - 1, n_sym = b[1].b.shape[0], n_local = b[3].b.shape[1],
               k = b[3].b.shape[2], d = b[6].b.shape[1];
    if (n_chunks < 0 || b[2].b.shape[0] != n_sym || b[3].b.shape[0] != n_chunks || b[6].b.shape[0] != n_chunks ||
        b[9].b.shape[0] != 3 || b[9].b.shape[1] != n_chunks + 1 || b[5].b.shape[0] != b[4].b.shape[0] || k < 2 ||
        k > MAX_SYMBOLS || d < 2 || d > MAX_SYMBOLS) {
        PyErr_SetString(PyExc_ValueError, "chunks: inconsistent shapes");
        goto done;
    }
    edges = PyMem_RawMalloc((size_t)4 * (n_chunks + 1) * sizeof(int64_t));
    if (!edges) { PyErr_NoMemory(); goto done; }
    memcpy(edges, b[0].b.buf, (size_t)(n_chunks + 1) * sizeof(int64_t));
    memcpy(edges + n_chunks + 1, b[9].b.buf, (size_t)3 * (n_chunks + 1) * sizeof(int64_t));
    Py_ssize_t limits[4] = {n_sym, b[4].b.shape[0], b[7].b.shape[0], b[8].b.shape[0]};
    for (int r = 0; r < 4; r++) {
        const int64_t *m = edges + r * (n_chunks + 1);
        for (Py_ssize_t c = 0; c <= n_chunks; c++)
            if (m[c] < (c ? m[c - 1] : 0) || m[c] > limits[r]) {
                PyErr_SetString(PyExc_ValueError, "chunks: bounds or marks out of order or range");
                goto done;
            }
    }
    if (rows_new(&rows, n_local, k) < 0) goto done;
    if (begin(e, &kept) == 0) {
        State st = e->s;
        const uint16_t *local = b[1].b.buf;
        const int32_t *sym = b[2].b.buf, *sign = b[5].b.buf, *length = b[7].b.buf, *bits = b[8].b.buf;
        const float *tables = b[3].b.buf;
        const double *psign = b[4].b.buf, *dist = b[6].b.buf;
        const int64_t *bounds = edges, *nz = edges + (n_chunks + 1), *es = nz + (n_chunks + 1), *bs = es + (n_chunks + 1);
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t c = 0; c < n_chunks && !rc; c++) {
            const float *table = tables + c * n_local * k; /* a chunk's table holds only the rows it uses */
            for (Py_ssize_t i = bounds[c]; i < bounds[c + 1] && !rc; i++) {
                Py_ssize_t r = local[i]; /* read once: the array may change under a released GIL */
                if (r >= n_local) { rc = NO_ROW; break; }
                rc = encode_left(e, &st, rows_lefts(&rows, table, r, k, c), k, sym[i]);
            }
            for (Py_ssize_t j = nz[c]; j < nz[c + 1] && !rc; j++) rc = encode_bit(e, &st, bit_split(psign[j]), sign[j]);
            if (es[c + 1] > es[c] && !rc) {
                float p[MAX_SYMBOLS];
                uint32_t ld[MAX_SYMBOLS + 1];
                for (Py_ssize_t s = 0; s < d; s++) p[s] = (float)dist[c * d + s];
                row_lefts(p, d, ld);
                uint32_t even = bit_split(0.5);
                for (Py_ssize_t j = es[c]; j < es[c + 1] && !rc; j++) rc = encode_left(e, &st, ld, d, length[j]);
                for (Py_ssize_t j = bs[c]; j < bs[c + 1] && !rc; j++) rc = encode_bit(e, &st, even, bits[j]);
            }
        }
        Py_END_ALLOW_THREADS
        if (!rc) e->s = st;
        result = end(e, &kept, rc, "chunks");
    }
done:
    rows_free(&rows);
    PyMem_RawFree(edges);
    release(b, 10);
    return result;
}

/* The coded words, sealed as constriction's get_compressed() seals them (coding may go on after). */
static PyObject *Encoder_finish(Encoder *e, PyObject *Py_UNUSED(ignored)) {
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "range encoder: in use by another thread");
        return NULL;
    }
    const State *s = &e->s;
    if (s->range == UINT64_MAX) return PyBytes_FromStringAndSize(NULL, 0);
    uint64_t point = s->lower + (((uint64_t)1 << 32) - 1);
    uint32_t point_word = (uint32_t)(point >> 32);
    int pad = (uint32_t)((s->lower + s->range) >> 32) == point_word; /* one more word pins the point down */
    Py_ssize_t n = s->n_words + s->inverted + 1 + pad;
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint32_t));
    if (!bytes) return NULL;
    uint32_t *out = (uint32_t *)PyBytes_AS_STRING(bytes);
    if (s->n_words) memcpy(out, e->words, (size_t)s->n_words * sizeof(uint32_t));
    Py_ssize_t m = s->n_words;
    if (s->inverted) {
        int carry = point < s->lower;
        out[m++] = carry ? s->first_inverted + 1 : s->first_inverted;
        for (Py_ssize_t i = 1; i < s->inverted; i++) out[m++] = carry ? 0 : UINT32_MAX;
    }
    out[m++] = point_word;
    if (pad) out[m++] = 0;
    return bytes;
}

static void encoder_reset(Encoder *e) {
    e->s = (State){0, UINT64_MAX, 0, 0, 0};
}

static PyObject *Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Encoder *e = (Encoder *)type->tp_alloc(type, 0);
    if (e) encoder_reset(e); /* usable even if __init__ is never called */
    return (PyObject *)e;
}

static int Encoder_init(Encoder *e, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, ":Encoder") || (kwds && PyDict_GET_SIZE(kwds))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Encoder() takes no arguments");
        return -1;
    }
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "range encoder: in use by another thread");
        return -1;
    }
    encoder_reset(e);
    return 0;
}

static void Encoder_dealloc(Encoder *e) {
    PyMem_RawFree(e->words);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Encoder_methods[] = {
    {"categorical_rows", (PyCFunction)Encoder_categorical_rows, METH_VARARGS,
     "categorical_rows(table, rows, values): values[i] under table[rows[i]] (float32 rows, uint16 row numbers; "
     "rows None: under table[i])"},
    {"categorical_alike", (PyCFunction)Encoder_categorical_alike, METH_VARARGS,
     "categorical_alike(probs, values): every value under one float32 row"},
    {"bernoulli", (PyCFunction)Encoder_bernoulli, METH_VARARGS,
     "bernoulli(p1, values): bits with P(one) = p1 (float64), or 1/2 where p1 is None"},
    {"chunks", (PyCFunction)Encoder_chunks, METH_VARARGS, "a run of the signed coder's chunks (see the C source)"},
    {"finish", (PyCFunction)Encoder_finish, METH_NOARGS, "the sealed stream, as bytes of native uint32 words"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fedtensor.codec._range.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Range encoder writing constriction's queue.RangeEncoder stream for fedtensor's models.",
    .tp_methods = Encoder_methods,
    .tp_init = (initproc)Encoder_init,
    .tp_new = Encoder_new,
    .tp_dealloc = (destructor)Encoder_dealloc,
};

/* ------------------------------------------------------------------------------------------------------------
 * Decoder: constriction's queue.RangeDecoder for the same models (its decode_symbol, its quantile functions and
 * its maybe_exhausted), so that a stream decodes to the same symbols and is judged used up alike, valid or not.
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    uint64_t lower, range, point;
    uint32_t *words;
    Py_ssize_t n_words, pos;
    int busy;
} Decoder;

/* The decoder's state, copied to a local in every decoding loop and stored back after it (as the encoder's). */
typedef struct {
    uint64_t lower, range, point;
    Py_ssize_t pos;
    const uint32_t *words;
    Py_ssize_t n_words;
} DState;

static DState dstate(const Decoder *d) { return (DState){d->lower, d->range, d->point, d->pos, d->words, d->n_words}; }
static void dstore(Decoder *d, const DState *s) { d->lower = s->lower, d->range = s->range, d->point = s->point, d->pos = s->pos; }

/* Decode the symbol whose interval holds the next quantile: ``search`` finds it (0 or an error). */
static inline int quantile(const DState *s, uint64_t *scale, uint32_t *q) {
    *scale = s->range >> PRECISION;
    uint64_t v = (s->point - s->lower) / *scale;
    if (v >= TOTAL) return INVALID_DATA; /* what no encoder writes (constriction: InvalidData) */
    *q = (uint32_t)v;
    return 0;
}

static inline int advance(DState *s, uint64_t scale, uint32_t left, uint32_t prob) {
    uint64_t range = scale * prob;
    if (!range) return INVALID_DATA;
    s->lower += scale * left;
    s->range = range;
    if (s->range < ((uint64_t)1 << 32)) {
        s->lower <<= 32;
        s->range <<= 32;
        s->point <<= 32;
        if (s->pos < s->n_words) s->point |= s->words[s->pos++];
    }
    return 0;
}

/* The symbol under a row of left ends (:func:`row_lefts`): the last whose left end is at most the quantile. */
static inline int decode_left(DState *s, const uint32_t *left, Py_ssize_t k, int32_t *out) {
    uint64_t sc;
    uint32_t q;
    int rc = left[k] == 0 ? OUTSIDE : quantile(s, &sc, &q); /* (a refused row's ends are all 0) */
    if (rc) return rc;
    Py_ssize_t v = 0;
    while (v < k - 1 && q >= left[v + 1]) v++;
    if (left[v + 1] == left[v]) return INVALID_DATA;
    *out = (int32_t)v;
    return advance(s, sc, left[v], left[v + 1] - left[v]);
}

static inline int decode_bit(DState *s, uint32_t mid, int32_t *out) {
    uint64_t sc;
    uint32_t q;
    int rc = mid == 0 ? OUTSIDE : quantile(s, &sc, &q);
    if (rc) return rc;
    *out = q >= mid;
    return *out ? advance(s, sc, mid, TOTAL - mid) : advance(s, sc, 0, mid);
}

static int decoder_free(Decoder *d) {
    if (d->busy) PyErr_SetString(PyExc_RuntimeError, "range decoder: in use by another thread");
    return !d->busy;
}

static PyObject *Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Decoder *d = (Decoder *)type->tp_alloc(type, 0);
    if (d) d->range = UINT64_MAX; /* an empty stream until __init__ gives it words */
    return (PyObject *)d;
}

/* Decoder(words uint32 (n)): reads the first two words as constriction's from_compressed does. */
static int Decoder_init(Decoder *d, PyObject *args, PyObject *kwds) {
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:Decoder", &o) || (kwds && PyDict_GET_SIZE(kwds)) || !decoder_free(d)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Decoder() takes no keyword arguments");
        return -1;
    }
    Buf b[1] = {0};
    if (get(o, &b[0], "I", 1, 0, "words") < 0) {
        release(b, 1);
        return -1;
    }
    Py_ssize_t n = b[0].b.shape[0];
    uint32_t *words = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (!words) {
        release(b, 1);
        PyErr_NoMemory();
        return -1;
    }
    if (n) memcpy(words, b[0].b.buf, (size_t)n * sizeof(uint32_t));
    release(b, 1);
    PyMem_RawFree(d->words);
    d->words = words, d->n_words = n, d->pos = 0, d->lower = 0, d->range = UINT64_MAX, d->point = 0;
    int read = 0;
    for (; read < 2 && d->pos < n; read++) d->point = (d->point << 32) | d->words[d->pos++];
    if (read == 1) d->point <<= 32;
    return 0;
}

static void Decoder_dealloc(Decoder *d) {
    PyMem_RawFree(d->words);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *decoded(Decoder *d, int rc, const char *what) {
    d->busy = 0;
    if (!rc) Py_RETURN_NONE;
    set_error(rc, what);
    return NULL;
}

/* categorical_rows(table float32 (L, K), rows uint16 (n) or None, out int32 (n)). */
static PyObject *Decoder_categorical_rows(Decoder *d, PyObject *args) {
    PyObject *o[3], *result = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || !decoder_free(d)) return NULL;
    Buf b[3] = {0};
    Py_ssize_t n_rows, k, n;
    Rows rows;
    if (rows_inputs(o, b, 1, &n_rows, &k, &n) < 0 || rows_new(&rows, n_rows, k) < 0) goto done;
    const float *table = b[0].b.buf;
    const uint16_t *at = o[1] == Py_None ? NULL : b[1].b.buf;
    int32_t *out = b[2].b.buf;
    int rc = 0;
    d->busy = 1;
    DState st = dstate(d);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) {
        Py_ssize_t r = at ? at[i] : i; /* read once: ``out`` may even overlap ``rows`` */
        if (r >= n_rows) { rc = NO_ROW; break; }
        rc = decode_left(&st, rows_lefts(&rows, table, r, k, 0), k, out + i);
    }
    Py_END_ALLOW_THREADS
    dstore(d, &st);
    result = decoded(d, rc, "categorical_rows");
    rows_free(&rows);
done:
    release(b, 3);
    return result;
}

/* categorical_alike(probs float32 (K), out int32 (n)). */
static PyObject *Decoder_categorical_alike(Decoder *d, PyObject *args) {
    PyObject *o[2], *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !decoder_free(d)) return NULL;
    Buf b[2] = {0};
    if (get(o[0], &b[0], "f", 1, 0, "probs") < 0 || get(o[1], &b[1], "i", 1, 1, "out") < 0) goto done;
    Py_ssize_t k = b[0].b.shape[0], n = b[1].b.shape[0];
    if (k < 2 || k > MAX_SYMBOLS) {
        PyErr_SetString(PyExc_ValueError, "categorical_alike: a row of 2 to 1024 symbols");
        goto done;
    }
    int32_t *out = b[1].b.buf;
    uint32_t left[MAX_SYMBOLS + 1];
    row_lefts(b[0].b.buf, k, left);
    int rc = 0;
    d->busy = 1;
    DState st = dstate(d);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = decode_left(&st, left, k, out + i);
    Py_END_ALLOW_THREADS
    dstore(d, &st);
    result = decoded(d, rc, "categorical_alike");
done:
    release(b, 2);
    return result;
}

/* bernoulli(p1 float64 (n) or None for 1/2 each, out int32 (n)). */
static PyObject *Decoder_bernoulli(Decoder *d, PyObject *args) {
    PyObject *o[2], *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !decoder_free(d)) return NULL;
    Buf b[2] = {0};
    Py_ssize_t n;
    if (bernoulli_inputs(o, b, 1, &n) < 0) goto done;
    const double *p = o[0] == Py_None ? NULL : b[0].b.buf;
    int32_t *out = b[1].b.buf;
    uint32_t even = bit_split(0.5);
    int rc = 0;
    d->busy = 1;
    DState st = dstate(d);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = decode_bit(&st, p ? bit_split(p[i]) : even, out + i);
    Py_END_ALLOW_THREADS
    dstore(d, &st);
    result = decoded(d, rc, "bernoulli");
done:
    release(b, 2);
    return result;
}

/* Whether the data may be used up: constriction's maybe_exhausted. */
static PyObject *Decoder_maybe_exhausted(Decoder *d, PyObject *Py_UNUSED(ignored)) {
    if (!decoder_free(d)) return NULL;
    int done = d->pos >= d->n_words && (d->range == UINT64_MAX || d->point - d->lower < ((uint64_t)1 << 33) - 1);
    return PyBool_FromLong(done);
}

static PyMethodDef Decoder_methods[] = {
    {"categorical_rows", (PyCFunction)Decoder_categorical_rows, METH_VARARGS,
     "categorical_rows(table, rows, out): out[i] under table[rows[i]] (rows None: under table[i])"},
    {"categorical_alike", (PyCFunction)Decoder_categorical_alike, METH_VARARGS,
     "categorical_alike(probs, out): every symbol under one float32 row"},
    {"bernoulli", (PyCFunction)Decoder_bernoulli, METH_VARARGS,
     "bernoulli(p1, out): bits with P(one) = p1 (float64), or 1/2 where p1 is None"},
    {"maybe_exhausted", (PyCFunction)Decoder_maybe_exhausted, METH_NOARGS, "whether the data may be used up"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fedtensor.codec._range.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Range decoder reading constriction's queue.RangeEncoder streams for fedtensor's models.",
    .tp_methods = Decoder_methods,
    .tp_init = (initproc)Decoder_init,
    .tp_new = Decoder_new,
    .tp_dealloc = (destructor)Decoder_dealloc,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_range", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__range(void) {
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&DecoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    InvalidData = PyErr_NewExceptionWithDoc("fedtensor.codec._range.InvalidData",
                                            "Compressed data that no encoder writes.", PyExc_ValueError, NULL);
    if (!InvalidData || PyModule_AddObjectRef(m, "InvalidData", InvalidData) < 0 ||
        PyModule_AddObjectRef(m, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddObjectRef(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
