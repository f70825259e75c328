/* A range encoder that writes, word for word, what constriction's queue.RangeEncoder (32-bit words, a 64-bit
 * state, 24-bit probabilities) writes for fedtensor's models: categorical symbols under constriction's "fast"
 * (perfect=False) quantisation of float32 probabilities, Bernoulli decisions under that of float64 ones, and
 * raw bits. constriction (Rust, behind pyo3) holds the GIL while it codes and is called once per chunk with
 * a gathered copy of each symbol's probability row; here a whole run of chunks is one call that reads the
 * model tables in place and releases the GIL, so another thread's work (a second slab group, the device's
 * next slab) overlaps it. Streams are still decoded by constriction; the tests check the two agree byte for
 * byte.
 *
 * The quantisation must be constriction's exactly: a symbol s of a row p[0..K) has the cumulative
 * (uint32)(c[s] * scale) + s, c[s] = p[0] + … + p[s-1] summed left to right in the row's float type, scale =
 * (2^24 − K) / c[K], and the last symbol ends at 2^24. setup.py compiles without fused multiply-adds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PRECISION 24
#define TOTAL ((uint32_t)1 << PRECISION)
#define MAX_SYMBOLS 64 /* row length bound (fedtensor's rows have 16 or 40 entries) */

typedef struct {
    PyObject_HEAD
    uint64_t lower, range;
    Py_ssize_t inverted;  /* words held back while a carry may still reach them (0: none) */
    uint32_t first_inverted;
    uint32_t *words;
    Py_ssize_t n_words, cap;
    int failed; /* out of memory or an impossible symbol: the stream is unusable */
    int busy;   /* coding with the GIL released: another thread must not code into it meanwhile */
} Encoder;

static int put(Encoder *e, uint32_t w) {
    if (e->n_words == e->cap) {
        Py_ssize_t cap = e->cap ? 2 * e->cap : 1024;
        uint32_t *grown = PyMem_RawRealloc(e->words, (size_t)cap * sizeof(uint32_t));
        if (!grown) return -1;
        e->words = grown, e->cap = cap;
    }
    e->words[e->n_words++] = w;
    return 0;
}

/* Flush held-back words once the range no longer straddles a carry (carry: lower wrapped). */
static int release_inverted(Encoder *e, int carry) {
    uint32_t first = carry ? e->first_inverted + 1 : e->first_inverted, rest = carry ? 0 : UINT32_MAX;
    if (put(e, first) < 0) return -1;
    for (Py_ssize_t i = 1; i < e->inverted; i++)
        if (put(e, rest) < 0) return -1;
    e->inverted = 0;
    return 0;
}

/* Encode a symbol of the interval [left, left + prob) of [0, 2^24); prob > 0. constriction's encode_symbol. */
static int encode(Encoder *e, uint32_t left, uint32_t prob) {
    uint64_t scale = e->range >> PRECISION;
    e->range = scale * prob;
    uint64_t lower = e->lower + scale * left;
    if (e->inverted && lower + e->range > lower && release_inverted(e, lower < e->lower) < 0) return -1;
    e->lower = lower;
    if (e->range < ((uint64_t)1 << 32)) {
        e->range <<= 32;
        uint32_t word = (uint32_t)(e->lower >> 32);
        e->lower <<= 32;
        if (e->inverted)
            e->inverted++;
        else if (e->lower + e->range > e->lower) {
            if (put(e, word) < 0) return -1;
        } else
            e->inverted = 1, e->first_inverted = word;
    }
    return 0;
}

/* A row's cumulatives c[0..K] (float32) and its scale, as constriction's lazy categorical model. */
static float row_scale(const float *p, Py_ssize_t k, float *c) {
    float acc = 0.0f;
    for (Py_ssize_t s = 0; s < k; s++) {
        c[s] = acc;
        acc = acc + p[s];
    }
    c[k] = acc;
    return (float)(TOTAL - (uint32_t)k) / acc;
}

static int row_ok(const float *c, Py_ssize_t k) { return c[k] > 0.0f && c[k] <= 3.4e38f && c[k] >= 1.17549435e-38f; }

/* Symbol v under a row with cumulatives c and scale: constriction's left_cumulative_and_probability. */
static int encode_row(Encoder *e, const float *c, float scale, Py_ssize_t k, int32_t v) {
    if (v < 0 || v >= k) return -2;
    uint32_t left = (uint32_t)(c[v] * scale) + (uint32_t)v;
    uint32_t right = v == k - 1 ? TOTAL : (uint32_t)(c[v + 1] * scale) + (uint32_t)v + 1;
    if (right <= left) return -2;
    return encode(e, left, right - left);
}

/* A Bernoulli decision under P(one) = p (float64): constriction's fast model of [1 − p, p]. */
static int encode_bit(Encoder *e, double p, int32_t v) {
    if (!(p >= 0.0 && p <= 1.0) || (v != 0 && v != 1)) return -2;
    double q = 1.0 - p, norm = q + p, scale = (double)(TOTAL - 2) / norm;
    uint32_t mid = (uint32_t)(q * scale) + 1;
    return v ? encode(e, mid, TOTAL - mid) : encode(e, 0, mid);
}

static int fail(Encoder *e, int code) {
    e->failed = 1;
    if (code == -1) PyErr_NoMemory();
    else PyErr_SetString(PyExc_ValueError, "range encoder: a symbol outside its model (or an invalid model)");
    return -1;
}

typedef struct {
    Py_buffer b;
    int held;
} Buf;

static void release(Buf *b, int n) {
    for (int i = 0; i < n; i++)
        if (b[i].held) PyBuffer_Release(&b[i].b);
}

static int get(PyObject *obj, Buf *out, const char *format, int ndim, const char *name) {
    if (PyObject_GetBuffer(obj, &out->b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0) return -1;
    out->held = 1;
    const char *f = out->b.format;
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    if (strcmp(f, format) != 0 && !(format[0] == 'q' && strcmp(f, "l") == 0 && out->b.itemsize == 8) &&
        !(format[0] == 'i' && strcmp(f, "l") == 0 && out->b.itemsize == 4)) {
        PyErr_Format(PyExc_TypeError, "%s: wrong dtype (format %s, expected %s)", name, out->b.format, format);
        return -1;
    }
    if (out->b.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions", name, ndim);
        return -1;
    }
    return 0;
}

static int usable(Encoder *e) {
    if (e->failed) PyErr_SetString(PyExc_ValueError, "range encoder: unusable after an earlier error");
    else if (e->busy) PyErr_SetString(PyExc_RuntimeError, "range encoder: in use by another thread");
    return !e->failed && !e->busy;
}

/* categorical_rows(table float32 (L, K), rows uint16 (n) or None, values int32 (n)): symbol i under row rows[i]
 * (under row i where rows is None). */
static PyObject *Encoder_categorical_rows(Encoder *e, PyObject *args) {
    PyObject *o[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || !usable(e)) return NULL;
    Buf b[3] = {0};
    PyObject *result = NULL;
    int identity = o[1] == Py_None;
    if (get(o[0], &b[0], "f", 2, "table") < 0 || (!identity && get(o[1], &b[1], "H", 1, "rows") < 0) ||
        get(o[2], &b[2], "i", 1, "values") < 0)
        goto done;
    Py_ssize_t n_rows = b[0].b.shape[0], k = b[0].b.shape[1], n = identity ? n_rows : b[1].b.shape[0];
    if (k < 2 || k > MAX_SYMBOLS || b[2].b.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "categorical_rows: bad shapes");
        goto done;
    }
    const float *table = b[0].b.buf;
    const uint16_t *rows = identity ? NULL : b[1].b.buf;
    const int32_t *values = b[2].b.buf;
    for (Py_ssize_t i = 0; i < n && rows; i++)
        if (rows[i] >= n_rows) { PyErr_SetString(PyExc_IndexError, "categorical_rows: row out of range"); goto done; }
    int rc = 0;
    /* rows given: each row's cumulatives made once, when first used; else each symbol's own row */
    const Py_ssize_t stride = MAX_SYMBOLS + 2;
    float *cum = rows ? PyMem_RawMalloc((size_t)n_rows * stride * sizeof(float)) : NULL;
    char *made = rows ? PyMem_RawCalloc((size_t)n_rows, 1) : NULL;
    if (rows && (!cum || !made)) {
        PyMem_RawFree(cum), PyMem_RawFree(made);
        PyErr_NoMemory();
        goto done;
    }
    float c[MAX_SYMBOLS + 2];
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) {
        float *cr = c;
        if (rows) {
            cr = cum + (Py_ssize_t)rows[i] * stride;
            if (!made[rows[i]]) cr[stride - 1] = row_scale(table + (Py_ssize_t)rows[i] * k, k, cr), made[rows[i]] = 1;
        } else
            cr[stride - 1] = row_scale(table + i * k, k, cr);
        rc = row_ok(cr, k) ? encode_row(e, cr, cr[stride - 1], k, values[i]) : -2;
    }
    Py_END_ALLOW_THREADS
    e->busy = 0;
    PyMem_RawFree(cum), PyMem_RawFree(made);
    if (rc) { fail(e, rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 3);
    return result;
}

/* even_bits(values int32 (n)): bits with P(one) = 1/2. */
static PyObject *Encoder_even_bits(Encoder *e, PyObject *arg) {
    if (!usable(e)) return NULL;
    Buf b[1] = {0};
    PyObject *result = NULL;
    if (get(arg, &b[0], "i", 1, "values") < 0) goto done;
    Py_ssize_t n = b[0].b.shape[0];
    const int32_t *values = b[0].b.buf;
    int rc = 0;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = encode_bit(e, 0.5, values[i]);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc) { fail(e, rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 1);
    return result;
}

/* categorical_alike(probs float32 (K), values int32 (n)): every symbol under the one row. */
static PyObject *Encoder_categorical_alike(Encoder *e, PyObject *args) {
    PyObject *o[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !usable(e)) return NULL;
    Buf b[2] = {0};
    PyObject *result = NULL;
    if (get(o[0], &b[0], "f", 1, "probs") < 0 || get(o[1], &b[1], "i", 1, "values") < 0) goto done;
    Py_ssize_t k = b[0].b.shape[0], n = b[1].b.shape[0];
    if (k < 2 || k > MAX_SYMBOLS) { PyErr_SetString(PyExc_ValueError, "categorical_alike: bad row length"); goto done; }
    const int32_t *values = b[1].b.buf;
    float c[MAX_SYMBOLS + 1], scale = row_scale(b[0].b.buf, k, c);
    int rc = row_ok(c, k) ? 0 : -2;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = encode_row(e, c, scale, k, values[i]);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc) { fail(e, rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 2);
    return result;
}

/* bernoulli(p1 float64 (n), values int32 (n)). */
static PyObject *Encoder_bernoulli(Encoder *e, PyObject *args) {
    PyObject *o[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !usable(e)) return NULL;
    Buf b[2] = {0};
    PyObject *result = NULL;
    if (get(o[0], &b[0], "d", 1, "p1") < 0 || get(o[1], &b[1], "i", 1, "values") < 0) goto done;
    Py_ssize_t n = b[0].b.shape[0];
    if (b[1].b.shape[0] != n) { PyErr_SetString(PyExc_ValueError, "bernoulli: lengths differ"); goto done; }
    const double *p = b[0].b.buf;
    const int32_t *values = b[1].b.buf;
    int rc = 0;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = encode_bit(e, p[i], values[i]);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc) { fail(e, rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 2);
    return result;
}

/* chunks(bounds int64 (C+1), local uint16, sym int32, tables float32 (C, L, 16), psign float64, sign int32,
 * dist float64 (C, D), length int32, bits int32, marks int64 (3, C+1)): a run of C chunks of
 * fedtensor.codec.entropy's signed coder, each its symbols under its own table's rows, then its non-zeros'
 * signs, then (if any) its escapes' lengths under its row of dist (cast to float32) and their raw bits —
 * marks: where each chunk's signs, escapes and bits start. The calls the Python loop made one by one. */
static PyObject *Encoder_chunks(Encoder *e, PyObject *args) {
    PyObject *o[10];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9]) ||
        !usable(e))
        return NULL;
    Buf b[10] = {0};
    PyObject *result = NULL;
    if (get(o[0], &b[0], "q", 1, "bounds") < 0 || get(o[1], &b[1], "H", 1, "local") < 0 ||
        get(o[2], &b[2], "i", 1, "sym") < 0 || get(o[3], &b[3], "f", 3, "tables") < 0 ||
        get(o[4], &b[4], "d", 1, "psign") < 0 || get(o[5], &b[5], "i", 1, "sign") < 0 ||
        get(o[6], &b[6], "d", 2, "dist") < 0 || get(o[7], &b[7], "i", 1, "length") < 0 ||
        get(o[8], &b[8], "i", 1, "bits") < 0 || get(o[9], &b[9], "q", 2, "marks") < 0)
        goto done;
    Py_ssize_t n_chunks = b[0].b.shape[0] - 1, n_sym = b[1].b.shape[0], n_local = b[3].b.shape[1],
               k = b[3].b.shape[2], d = b[6].b.shape[1];
    const int64_t *bounds = b[0].b.buf, *marks = b[9].b.buf;
    int bad = n_chunks < 0 || b[2].b.shape[0] != n_sym || b[3].b.shape[0] != n_chunks || b[6].b.shape[0] != n_chunks ||
              b[9].b.shape[0] != 3 || b[9].b.shape[1] != n_chunks + 1 || b[5].b.shape[0] != b[4].b.shape[0] ||
              k < 2 || k > MAX_SYMBOLS || d < 2 || d > MAX_SYMBOLS;
    Py_ssize_t limits[4] = {n_sym, b[4].b.shape[0], b[7].b.shape[0], b[8].b.shape[0]};
    for (int r = 0; r < 4 && !bad; r++) {
        const int64_t *m = r ? marks + (r - 1) * (n_chunks + 1) : bounds;
        for (Py_ssize_t c = 0; c <= n_chunks && !bad; c++)
            bad = m[c] < (c ? m[c - 1] : 0) || m[c] > limits[r];
    }
    const uint16_t *local = b[1].b.buf;
    for (Py_ssize_t i = 0; i < n_sym && !bad; i++) bad = local[i] >= n_local;
    if (bad) { PyErr_SetString(PyExc_ValueError, "chunks: inconsistent shapes, marks or local contexts"); goto done; }
    const int32_t *sym = b[2].b.buf, *sign = b[5].b.buf, *length = b[7].b.buf, *bits = b[8].b.buf;
    const float *tables = b[3].b.buf;
    const double *psign = b[4].b.buf, *dist = b[6].b.buf;
    /* each row's cumulatives are made when a chunk first uses it (a chunk's table holds only its rows) */
    float *cum = PyMem_RawMalloc((size_t)n_local * (MAX_SYMBOLS + 2) * sizeof(float));
    Py_ssize_t *made = PyMem_RawMalloc((size_t)n_local * sizeof(Py_ssize_t));
    if (!cum || !made) {
        PyMem_RawFree(cum), PyMem_RawFree(made);
        PyErr_NoMemory();
        goto done;
    }
    const Py_ssize_t stride = MAX_SYMBOLS + 2; /* k + 1 cumulatives, then the scale */
    int rc = 0;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n_local; r++) made[r] = -1;
    for (Py_ssize_t c = 0; c < n_chunks && !rc; c++) {
        const float *table = tables + c * n_local * k;
        for (Py_ssize_t i = bounds[c]; i < bounds[c + 1] && !rc; i++) {
            Py_ssize_t r = local[i];
            float *cr = cum + r * stride;
            if (made[r] != c) {
                cr[stride - 1] = row_scale(table + r * k, k, cr);
                if (!row_ok(cr, k)) { rc = -2; break; }
                made[r] = c;
            }
            rc = encode_row(e, cr, cr[stride - 1], k, sym[i]);
        }
        for (Py_ssize_t j = marks[c]; j < marks[c + 1] && !rc; j++) rc = encode_bit(e, psign[j], sign[j]);
        Py_ssize_t e0 = marks[n_chunks + 1 + c], e1 = marks[n_chunks + 2 + c];
        if (e1 > e0 && !rc) {
            float p[MAX_SYMBOLS], cd[MAX_SYMBOLS + 1];
            for (Py_ssize_t s = 0; s < d; s++) p[s] = (float)dist[c * d + s];
            float scale = row_scale(p, d, cd);
            rc = row_ok(cd, d) ? 0 : -2;
            for (Py_ssize_t j = e0; j < e1 && !rc; j++) rc = encode_row(e, cd, scale, d, length[j]);
            for (Py_ssize_t j = marks[2 * (n_chunks + 1) + c]; j < marks[2 * (n_chunks + 1) + c + 1] && !rc; j++)
                rc = encode_bit(e, 0.5, bits[j]);
        }
    }
    Py_END_ALLOW_THREADS
    e->busy = 0;
    PyMem_RawFree(cum), PyMem_RawFree(made);
    if (rc) { fail(e, rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 10);
    return result;
}

/* The coded words, sealed as constriction's get_compressed() seals them (the encoder can go on). */
static PyObject *Encoder_finish(Encoder *e, PyObject *Py_UNUSED(ignored)) {
    if (!usable(e)) return NULL;
    if (e->range == UINT64_MAX) return PyBytes_FromStringAndSize(NULL, 0);
    Py_ssize_t n = e->n_words + e->inverted + 2;
    uint32_t *out = PyMem_Malloc((size_t)n * sizeof(uint32_t));
    if (!out) return PyErr_NoMemory();
    memcpy(out, e->words, (size_t)e->n_words * sizeof(uint32_t));
    Py_ssize_t m = e->n_words;
    uint64_t point = e->lower + (((uint64_t)1 << 32) - 1);
    if (e->inverted) {
        int carry = point < e->lower;
        out[m++] = carry ? e->first_inverted + 1 : e->first_inverted;
        for (Py_ssize_t i = 1; i < e->inverted; i++) out[m++] = carry ? 0 : UINT32_MAX;
    }
    uint32_t point_word = (uint32_t)(point >> 32);
    out[m++] = point_word;
    if ((uint32_t)((e->lower + e->range) >> 32) == point_word) out[m++] = 0;
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)out, m * (Py_ssize_t)sizeof(uint32_t));
    PyMem_Free(out);
    return bytes;
}

static int Encoder_init(Encoder *e, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, ":Encoder")) return -1;
    e->lower = 0, e->range = UINT64_MAX, e->inverted = 0, e->first_inverted = 0, e->n_words = 0, e->failed = 0,
    e->busy = 0;
    return 0;
}

static void Encoder_dealloc(Encoder *e) {
    PyMem_RawFree(e->words);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Encoder_methods[] = {
    {"categorical_rows", (PyCFunction)Encoder_categorical_rows, METH_VARARGS,
     "categorical_rows(table, rows, values): values[i] under table[rows[i]] (float32 rows, uint16 row numbers)"},
    {"categorical_alike", (PyCFunction)Encoder_categorical_alike, METH_VARARGS,
     "categorical_alike(probs, values): every value under one float32 row"},
    {"even_bits", (PyCFunction)Encoder_even_bits, METH_O, "even_bits(values): bits with P(one) = 1/2"},
    {"bernoulli", (PyCFunction)Encoder_bernoulli, METH_VARARGS, "bernoulli(p1, values): bits with P(one) = p1 (float64)"},
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
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Encoder_dealloc,
};


/* ------------------------------------------------------------------------------------------------------
 * Decoder: constriction's queue.RangeDecoder for the same models (its decode_symbol, quantile functions and
 * maybe_exhausted), so that a stream decodes to the same symbols and is judged used up alike, valid or not.
 * ------------------------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    uint64_t lower, range, point;
    uint32_t *words;
    Py_ssize_t n_words, pos;
    int busy;
} Decoder;

/* The next symbol's quantile in [0, 2^24), or -1 for data no encoder writes. */
static int64_t quantile(Decoder *d, uint64_t *scale) {
    *scale = d->range >> PRECISION;
    uint64_t q = (d->point - d->lower) / *scale;
    return q >= TOTAL ? -1 : (int64_t)q;
}

static void advance(Decoder *d, uint64_t scale, uint32_t left, uint32_t prob) {
    d->lower += scale * left;
    d->range = scale * prob;
    if (d->range < ((uint64_t)1 << 32)) {
        d->lower <<= 32;
        d->range <<= 32;
        d->point <<= 32;
        if (d->pos < d->n_words) d->point |= d->words[d->pos++];
    }
}

/* A symbol under a row with cumulatives c and scale (the encoder's encode_row, inverted). */
static int decode_row(Decoder *d, const float *c, float scale, Py_ssize_t k, int32_t *out) {
    uint64_t sc;
    int64_t q = quantile(d, &sc);
    if (q < 0) return -3;
    uint32_t left = 0, right = 0;
    Py_ssize_t v = 0;
    for (; v < k; v++) {
        right = v == k - 1 ? TOTAL : (uint32_t)(c[v + 1] * scale) + (uint32_t)v + 1;
        if ((uint64_t)q < right) break;
        left = right;
    }
    if (v == k || right <= left) return -3;
    advance(d, sc, left, right - left);
    *out = (int32_t)v;
    return 0;
}

static int decode_bit(Decoder *d, double p, int32_t *out) {
    if (!(p >= 0.0 && p <= 1.0)) return -2;
    double q1 = 1.0 - p, norm = q1 + p, scale = (double)(TOTAL - 2) / norm;
    uint32_t mid = (uint32_t)(q1 * scale) + 1;
    uint64_t sc;
    int64_t q = quantile(d, &sc);
    if (q < 0) return -3;
    *out = (uint64_t)q >= mid;
    if (*out) advance(d, sc, mid, TOTAL - mid);
    else advance(d, sc, 0, mid);
    return 0;
}

static PyObject *decode_failed(int rc) {
    if (rc == -3) PyErr_SetString(PyExc_ValueError, "range decoder: invalid compressed data");
    else if (rc == -1) PyErr_NoMemory();
    else PyErr_SetString(PyExc_ValueError, "range decoder: an invalid model");
    return NULL;
}

static int decoder_free(Decoder *d) {
    if (d->busy) PyErr_SetString(PyExc_RuntimeError, "range decoder: in use by another thread");
    return !d->busy;
}

/* Decoder(words uint32 (n)): reads the first two words as constriction's from_compressed does. */
static int Decoder_init(Decoder *d, PyObject *args, PyObject *kwds) {
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:Decoder", &o) || !decoder_free(d)) return -1;
    Buf b[1] = {0};
    if (get(o, &b[0], "I", 1, "words") < 0) {
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
    memcpy(words, b[0].b.buf, (size_t)n * sizeof(uint32_t));
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

/* categorical_rows(table float32 (L, K), rows uint16 (n) or None, out int32 (n)). */
static PyObject *Decoder_categorical_rows(Decoder *d, PyObject *args) {
    PyObject *o[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || !decoder_free(d)) return NULL;
    Buf b[3] = {0};
    PyObject *result = NULL;
    int identity = o[1] == Py_None;
    if (get(o[0], &b[0], "f", 2, "table") < 0 || (!identity && get(o[1], &b[1], "H", 1, "rows") < 0)) goto done;
    if (PyObject_GetBuffer(o[2], &b[2].b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND | PyBUF_WRITABLE) < 0) goto done;
    b[2].held = 1;
    Py_ssize_t n_rows = b[0].b.shape[0], k = b[0].b.shape[1], n = identity ? n_rows : b[1].b.shape[0];
    if (k < 2 || k > MAX_SYMBOLS || b[2].b.ndim != 1 || b[2].b.itemsize != 4 || b[2].b.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "categorical_rows: bad shapes");
        goto done;
    }
    const float *table = b[0].b.buf;
    const uint16_t *rows = identity ? NULL : b[1].b.buf;
    int32_t *out = b[2].b.buf;
    for (Py_ssize_t i = 0; i < n && rows; i++)
        if (rows[i] >= n_rows) { PyErr_SetString(PyExc_IndexError, "categorical_rows: row out of range"); goto done; }
    const Py_ssize_t stride = MAX_SYMBOLS + 2;
    float *cum = rows ? PyMem_RawMalloc((size_t)n_rows * stride * sizeof(float)) : NULL;
    char *made = rows ? PyMem_RawCalloc((size_t)n_rows, 1) : NULL;
    if (rows && (!cum || !made)) {
        PyMem_RawFree(cum), PyMem_RawFree(made);
        PyErr_NoMemory();
        goto done;
    }
    float c[MAX_SYMBOLS + 2];
    int rc = 0;
    d->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) {
        float *cr = c;
        if (rows) {
            cr = cum + (Py_ssize_t)rows[i] * stride;
            if (!made[rows[i]]) cr[stride - 1] = row_scale(table + (Py_ssize_t)rows[i] * k, k, cr), made[rows[i]] = 1;
        } else
            cr[stride - 1] = row_scale(table + i * k, k, cr);
        rc = row_ok(cr, k) ? decode_row(d, cr, cr[stride - 1], k, out + i) : -2;
    }
    Py_END_ALLOW_THREADS
    d->busy = 0;
    PyMem_RawFree(cum), PyMem_RawFree(made);
    if (rc) { decode_failed(rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 3);
    return result;
}

/* categorical_alike(probs float32 (K), out int32 (n)). */
static PyObject *Decoder_categorical_alike(Decoder *d, PyObject *args) {
    PyObject *o[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !decoder_free(d)) return NULL;
    Buf b[2] = {0};
    PyObject *result = NULL;
    if (get(o[0], &b[0], "f", 1, "probs") < 0) goto done;
    if (PyObject_GetBuffer(o[1], &b[1].b, PyBUF_C_CONTIGUOUS | PyBUF_ND | PyBUF_WRITABLE) < 0) goto done;
    b[1].held = 1;
    Py_ssize_t k = b[0].b.shape[0], n = b[1].b.len / 4;
    if (k < 2 || k > MAX_SYMBOLS || b[1].b.itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "categorical_alike: bad shapes");
        goto done;
    }
    int32_t *out = b[1].b.buf;
    float c[MAX_SYMBOLS + 1], scale = row_scale(b[0].b.buf, k, c);
    int rc = row_ok(c, k) ? 0 : -2;
    d->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = decode_row(d, c, scale, k, out + i);
    Py_END_ALLOW_THREADS
    d->busy = 0;
    if (rc) { decode_failed(rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 2);
    return result;
}

/* bernoulli(p1 float64 (n) or None for 1/2 each, out int32 (n)). */
static PyObject *Decoder_bernoulli(Decoder *d, PyObject *args) {
    PyObject *o[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || !decoder_free(d)) return NULL;
    Buf b[2] = {0};
    PyObject *result = NULL;
    int even = o[0] == Py_None;
    if (!even && get(o[0], &b[0], "d", 1, "p1") < 0) goto done;
    if (PyObject_GetBuffer(o[1], &b[1].b, PyBUF_C_CONTIGUOUS | PyBUF_ND | PyBUF_WRITABLE) < 0) goto done;
    b[1].held = 1;
    Py_ssize_t n = b[1].b.len / 4;
    if (b[1].b.itemsize != 4 || (!even && b[0].b.shape[0] != n)) {
        PyErr_SetString(PyExc_ValueError, "bernoulli: lengths differ");
        goto done;
    }
    const double *p = even ? NULL : b[0].b.buf;
    int32_t *out = b[1].b.buf;
    int rc = 0;
    d->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = decode_bit(d, p ? p[i] : 0.5, out + i);
    Py_END_ALLOW_THREADS
    d->busy = 0;
    if (rc) { decode_failed(rc); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 2);
    return result;
}

/* Whether the data may be used up: constriction's maybe_exhausted. */
static PyObject *Decoder_maybe_exhausted(Decoder *d, PyObject *Py_UNUSED(ignored)) {
    if (!decoder_free(d)) return NULL;
    int done = d->pos >= d->n_words &&
               (d->range == UINT64_MAX || d->point - d->lower < ((uint64_t)1 << 33) - 1);
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
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Decoder_dealloc,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_range", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__range(void) {
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&DecoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddObjectRef(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
