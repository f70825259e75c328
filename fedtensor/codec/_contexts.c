/* The encoder's context modelling in compiled code: the coded sites of a block grid with their local
 * contexts (fedtensor.codec.blockcoef), and the adaptive models of a run of chunks (fedtensor.codec.entropy).
 *
 * Both replace numpy code that is a few hundred small numpy calls per slab; here each is one pass over
 * the coefficients. The decoder uses chunk_models too (a chunk's model, then its counts), finds each
 * pass's sites with pass_sites, a chunk's non-zeros with chunk_nonzeros, their signed values with
 * chunk_values and its escapes' values with eg_values. The numpy code stays, as the
 * fallback and as the reference the tests compare with.
 * The range coding itself stays with constriction, called from Python.
 *
 * The models must be bit-identical to numpy's (the decoder computes them there): every probability is
 * the same IEEE double expression, evaluated in the same order, without contraction into fused
 * multiply-adds (setup.py compiles with -ffp-contract=off), and cast to float32 where numpy casts.
 * Counts are integers held in doubles, so their order of summation does not matter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define UNARY_CAP 14
#define LEVELS (UNARY_CAP + 1) /* unary levels and, last, the sign */
#define SYMBOLS (UNARY_CAP + 2)
#define EG_CAP 40
#define WEIGHT 2.0
#define CLIP 1e-5
#define LUT_SIZE 2048 /* activity bins of 0 … 2047: sums of six saturated terms stay below it */
#define SIZE_CAP ((Py_ssize_t)1 << 26) /* bound of table sizes and chunk counts passed in */

static double p_one(double ones, double total, double prior) {
    double p = (ones + WEIGHT * prior) / (total + WEIGHT);
    if (p < CLIP) p = CLIP; /* numpy: maximum, then minimum */
    if (p > 1 - CLIP) p = 1 - CLIP;
    return p;
}

static double backoff(double ones, double total) { return (ones + WEIGHT * 0.5) / (total + WEIGHT); }

typedef struct {
    Py_buffer b;
    int held;
} Buf;

static void release(Buf *b, int n) {
    for (int i = 0; i < n; i++)
        if (b[i].held) PyBuffer_Release(&b[i].b);
}

static int get(PyObject *obj, Buf *out, Py_ssize_t itemsize, Py_ssize_t count, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, &out->b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    out->held = 1;
    if (out->b.itemsize != itemsize || (count >= 0 && out->b.len != count * itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s has the wrong item size or length", name);
        return -1;
    }
    return 0;
}

static PyObject *chunk_models(PyObject *self, PyObject *args) {
    PyObject *o[18];
    Py_ssize_t n_keys, n_mag_keys, n_classes, mode;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOOOnnnn", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &o[16], &o[17], &n_keys,
                          &n_mag_keys, &n_classes, &mode))
        return NULL;
    if (mode < 1 || mode > 3) {
        PyErr_SetString(PyExc_ValueError, "chunk_models: mode is 1 (models), 2 (counts) or 3 (both)");
        return NULL;
    }
    /* Bounds far above any real table keep every product of sizes below 2^63 (it would wrap). */
    if (n_keys < 0 || n_keys > SIZE_CAP || n_mag_keys < 0 || n_mag_keys > SIZE_CAP || n_classes < 0 ||
        n_classes > SIZE_CAP) {
        PyErr_SetString(PyExc_ValueError, "chunk_models: table sizes out of range");
        return NULL;
    }
    Buf b[18];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    /* cls, key0, mkey0 (n_chunks); bounds (n_chunks + 1); local (symbols, uint16); nz (positions of the non-zeros,
       ascending), sym_nz (their symbols, 1 … UNARY_CAP + 1), neg (their signs); esc (positions of the
       escapes, ascending), nbits (their Exp-Golomb length symbols); mag_of (local contexts). */
    if (get(o[0], &b[0], 8, -1, 0, "cls") < 0) goto done;
    Py_ssize_t n_chunks = b[0].b.len / 8;
    if (n_chunks > SIZE_CAP) { PyErr_SetString(PyExc_ValueError, "chunk_models: too many chunks"); goto done; }
    if (get(o[1], &b[1], 8, n_chunks, 0, "key0") < 0 || get(o[2], &b[2], 8, n_chunks, 0, "mkey0") < 0 ||
        get(o[3], &b[3], 8, n_chunks + 1, 0, "bounds") < 0 || get(o[4], &b[4], 2, -1, 0, "local") < 0 ||
        get(o[5], &b[5], 8, -1, 0, "nz") < 0)
        goto done;
    Py_ssize_t n_sym = b[4].b.len / 2, n_nz = b[5].b.len / 8;
    if (get(o[6], &b[6], 8, n_nz, 0, "sym_nz") < 0 || get(o[7], &b[7], 8, n_nz, 0, "neg") < 0 ||
        get(o[8], &b[8], 8, -1, 0, "esc") < 0)
        goto done;
    Py_ssize_t n_esc = b[8].b.len / 8;
    if (get(o[9], &b[9], 8, n_esc, 0, "nbits") < 0 || get(o[10], &b[10], 8, -1, 0, "mag_of") < 0) goto done;
    Py_ssize_t n_local = b[10].b.len / 8;
    if (n_local > 65536) { /* local contexts are uint16 */
        PyErr_SetString(PyExc_ValueError, "chunk_models: too many local contexts");
        goto done;
    }
    const int64_t *cls = b[0].b.buf, *key0 = b[1].b.buf, *mkey0 = b[2].b.buf, *bounds = b[3].b.buf,
                  *nz = b[5].b.buf, *sym_nz = b[6].b.buf, *neg = b[7].b.buf, *esc = b[8].b.buf,
                  *nbits = b[9].b.buf, *mag_of = b[10].b.buf;
    const uint16_t *local = b[4].b.buf;
    int64_t n_mag = 0;
    for (Py_ssize_t l = 0; l < n_local; l++) {
        if (mag_of[l] < 0 || mag_of[l] >= n_mag_keys) {
            PyErr_SetString(PyExc_ValueError, "chunk_models: magnitude key out of range");
            goto done;
        }
        if (mag_of[l] + 1 > n_mag) n_mag = mag_of[l] + 1;
    }
    /* Tables (updated): zero (n_classes, 2, n_keys), zero_pooled (2, n_keys), mag (n_classes, 2, n_mag_keys,
       LEVELS), mag_pooled (2, n_mag_keys, LEVELS), eg (2, EG_CAP). Out: symbol tables (n_chunks, n_local,
       SYMBOLS) float32 (the rows of the local contexts each chunk holds), P(negative) (n_chunks, n_mag),
       length distributions (n_chunks, EG_CAP): written in modes 1 and 3. */
    if (get(o[11], &b[11], 8, n_classes * 2 * n_keys, 1, "zero") < 0 ||
        get(o[12], &b[12], 8, 2 * n_keys, 1, "zero_pooled") < 0 ||
        get(o[13], &b[13], 8, n_classes * 2 * n_mag_keys * LEVELS, 1, "mag") < 0 ||
        get(o[14], &b[14], 8, 2 * n_mag_keys * LEVELS, 1, "mag_pooled") < 0 ||
        get(o[15], &b[15], 8, 2 * EG_CAP, 1, "eg") < 0 ||
        get(o[16], &b[16], 4, n_chunks * n_local * SYMBOLS, 1, "tables") < 0 ||
        get(o[17], &b[17], 8, n_chunks * (n_mag + EG_CAP), 1, "signs_and_lengths") < 0)
        goto done;
    double *zero = b[11].b.buf, *zero_pooled = b[12].b.buf, *mag = b[13].b.buf, *mag_pooled = b[14].b.buf,
           *eg = b[15].b.buf;
    float *tables = b[16].b.buf;
    double *p_neg = b[17].b.buf, *dist = p_neg + n_chunks * n_mag;

    /* Every index is checked before use: a bad call raises, never writes out of bounds. */
    if (bounds[0] != 0 || bounds[n_chunks] != n_sym) {
        PyErr_SetString(PyExc_ValueError, "chunk_models: bounds do not cover the symbols");
        goto done;
    }
    for (Py_ssize_t c = 0; c < n_chunks; c++) {
        if (cls[c] < 0 || cls[c] >= n_classes || key0[c] < 0 || key0[c] > n_keys - n_local || mkey0[c] < 0 ||
            mkey0[c] > n_mag_keys - n_mag || bounds[c + 1] < bounds[c]) {
            PyErr_SetString(PyExc_ValueError, "chunk_models: chunk out of range");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n_sym; i++)
        if (local[i] >= n_local) { PyErr_SetString(PyExc_ValueError, "chunk_models: local context out of range"); goto done; }
    for (Py_ssize_t j = 0; j < n_nz; j++)
        if (nz[j] < 0 || nz[j] >= n_sym || (j && nz[j] <= nz[j - 1]) || sym_nz[j] < 1 || sym_nz[j] > UNARY_CAP + 1) {
            PyErr_SetString(PyExc_ValueError, "chunk_models: non-zeros out of range");
            goto done;
        }
    for (Py_ssize_t j = 0; j < n_esc; j++)
        if (esc[j] < 0 || esc[j] >= n_sym || (j && esc[j] <= esc[j - 1]) || nbits[j] < 0 || nbits[j] >= EG_CAP) {
            PyErr_SetString(PyExc_ValueError, "chunk_models: escapes out of range");
            goto done;
        }

    int failed;
    Py_BEGIN_ALLOW_THREADS
    double *pm = PyMem_RawMalloc(sizeof(double) * (size_t)(n_mag * LEVELS + n_mag * SYMBOLS + 1) +
                                 sizeof(int64_t) * (size_t)(2 * n_local + n_mag * (SYMBOLS + 1)));
    double *reach = pm + n_mag * LEVELS;
    /* A chunk's histograms: of its local contexts, of those of its non-zeros, and per magnitude key of
       its symbols 1 … UNARY_CAP + 1 and (last) its negatives. */
    int64_t *hist = (int64_t *)(reach + n_mag * SYMBOLS + 1), *all = hist + n_mag * (SYMBOLS + 1),
            *nonzero = all + n_local;
    Py_ssize_t j = 0, e = 0;
    for (Py_ssize_t c = 0; pm && c < n_chunks; c++) {
        double *z0 = zero + (cls[c] * 2) * n_keys + key0[c], *z1 = z0 + n_keys;
        double *zc0 = zero_pooled + key0[c], *zc1 = zc0 + n_keys;
        double *m0 = mag + ((cls[c] * 2) * n_mag_keys + mkey0[c]) * LEVELS, *m1 = m0 + n_mag_keys * LEVELS;
        double *mc0 = mag_pooled + mkey0[c] * LEVELS, *mc1 = mc0 + n_mag_keys * LEVELS;
        /* Its local contexts' histogram: the rows its model needs, and its counts. */
        memset(hist, 0, sizeof(int64_t) * (size_t)(2 * n_local + n_mag * (SYMBOLS + 1)));
        for (int64_t i = bounds[c]; i < bounds[c + 1]; i++) all[local[i]]++;
        /* The chunk's model (entropy._p_levels, _reach, _p_nonzero, _symbol_table, _length_dist). */
        for (int64_t k = 0; mode & 1 && k < n_mag; k++) {
            double *p = pm + k * LEVELS, *r = reach + k * SYMBOLS, cum = 1.0;
            for (int lev = 0; lev < LEVELS; lev++) {
                Py_ssize_t at = k * LEVELS + lev;
                p[lev] = p_one(m0[at], m1[at], backoff(mc0[at], mc1[at]));
            }
            for (int lev = 0; lev < UNARY_CAP; lev++) {
                r[lev] = cum * (1 - p[lev]);
                cum *= p[lev];
            }
            r[UNARY_CAP] = cum;
            p_neg[c * n_mag + k] = p[UNARY_CAP];
        }
        double *d = dist + c * EG_CAP, cum = 1.0;
        for (int k = 0; mode & 1 && k < EG_CAP; k++) {
            double pe = p_one(eg[k], eg[EG_CAP + k], 0.5);
            d[k] = cum * (1 - pe);
            cum *= pe;
        }
        /* The rows of the local contexts the chunk holds (the others are never read; a chunk of a
           hundred thousand symbols holds a few hundred contexts, one of a few hundred a few dozen). */
        float *table = tables + c * n_local * SYMBOLS;
        for (Py_ssize_t l = 0; mode & 1 && l < n_local; l++) {
            if (!all[l]) continue;
            double pnz = p_one(z0[l], z1[l], backoff(zc0[l], zc1[l]));
            const double *r = reach + mag_of[l] * SYMBOLS;
            float *row = table + l * SYMBOLS;
            row[0] = (float)(1 - pnz);
            for (int s = 0; s <= UNARY_CAP; s++) row[s + 1] = (float)(r[s] * pnz);
        }
        if (!(mode & 2)) continue;
        /* Then its counts (entropy._counts, _length_counts), added to the tables at its end. */
        for (; j < n_nz && nz[j] < bounds[c + 1]; j++) {
            int64_t l = local[nz[j]], *h = hist + mag_of[l] * (SYMBOLS + 1);
            nonzero[l]++;
            h[sym_nz[j]]++;
            h[SYMBOLS] += neg[j];
        }
        for (Py_ssize_t l = 0; l < n_local; l++) {
            z1[l] += (double)all[l], zc1[l] += (double)all[l];
            z0[l] += (double)nonzero[l], zc0[l] += (double)nonzero[l];
        }
        for (int64_t k = 0; k < n_mag; k++) {
            const int64_t *h = hist + k * (SYMBOLS + 1);
            int64_t tail[SYMBOLS + 1]; /* tail[s] = #(symbol >= s), s >= 1 */
            tail[SYMBOLS] = 0;
            for (int t = SYMBOLS - 1; t >= 1; t--) tail[t] = tail[t + 1] + h[t];
            Py_ssize_t at = k * LEVELS;
            for (int lev = 0; lev < UNARY_CAP; lev++) {
                m0[at + lev] += (double)tail[lev + 2], mc0[at + lev] += (double)tail[lev + 2];
                m1[at + lev] += (double)tail[lev + 1], mc1[at + lev] += (double)tail[lev + 1];
            }
            m0[at + UNARY_CAP] += (double)h[SYMBOLS], mc0[at + UNARY_CAP] += (double)h[SYMBOLS];
            m1[at + UNARY_CAP] += (double)tail[1], mc1[at + UNARY_CAP] += (double)tail[1];
        }
        for (; e < n_esc && esc[e] < bounds[c + 1]; e++) {
            for (int64_t k = 0; k <= nbits[e]; k++) {
                eg[EG_CAP + k] += 1;
                if (k < nbits[e]) eg[k] += 1;
            }
        }
    }
    failed = pm == NULL;
    PyMem_RawFree(pm);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release(b, 18);
    return result;
}


/* The inputs both site functions read: coef (n, B) int32 in lattice order; eob (n) in the anchors-first
 * numbering; perm (n); nbr (6, n); bounds (D + 2); order (B); parents (3 × width per degree, degree after
 * degree); lut (LUT_SIZE) uint8 (constant from its last entry on: an end of block's distance beyond it reads
 * the last). Every index is checked before use. */
typedef struct {
    Py_ssize_t n, nb, n_degrees, max_width, n_anchor, n_bins;
    const int32_t *coef;
    const int64_t *eob, *perm, *nbr, *bounds, *order, *parents;
    const uint8_t *lut;
} Lattice;

static int lattice(PyObject **o, Buf *b, Py_ssize_t n_anchor, Py_ssize_t n_bins, Py_ssize_t abs_cap, Lattice *L) {
    if (get(o[1], &b[1], 8, -1, 0, "eob") < 0) return -1;
    Py_ssize_t n = b[1].b.len / 8;
    if (get(o[5], &b[5], 8, -1, 0, "order") < 0) return -1;
    Py_ssize_t nb = b[5].b.len / 8;
    if (get(o[0], &b[0], 4, n * nb, 0, "coef") < 0 || get(o[2], &b[2], 8, n, 0, "perm") < 0 ||
        get(o[3], &b[3], 8, 6 * n, 0, "nbr") < 0 || get(o[4], &b[4], 8, -1, 0, "bounds") < 0)
        return -1;
    Py_ssize_t n_degrees = b[4].b.len / 8 - 2; /* degrees 1 … n_degrees after the DC */
    const int64_t *bounds = b[4].b.buf;
    if (n_degrees < 0 || bounds[0] != 0 || bounds[n_degrees + 1] != nb) {
        PyErr_SetString(PyExc_ValueError, "block sites: bounds do not cover the bands");
        return -1;
    }
    Py_ssize_t max_width = 1;
    for (Py_ssize_t d = 0; d <= n_degrees; d++) {
        if (bounds[d + 1] <= bounds[d]) { PyErr_SetString(PyExc_ValueError, "block sites: empty degree"); return -1; }
        if (bounds[d + 1] - bounds[d] > max_width) max_width = bounds[d + 1] - bounds[d];
    }
    if (get(o[6], &b[6], 8, 3 * (nb - bounds[1]), 0, "parents") < 0 || get(o[7], &b[7], 1, LUT_SIZE, 0, "lut") < 0)
        return -1;
    if (abs_cap < 1 || abs_cap > 85 || 6 * abs_cap >= LUT_SIZE) { /* uint8 parent sums, in-table sums */
        PyErr_SetString(PyExc_ValueError, "block sites: saturation out of range");
        return -1;
    }
    const int64_t *perm = b[2].b.buf, *nbr = b[3].b.buf, *order = b[5].b.buf, *parents = b[6].b.buf;
    const uint8_t *lut = b[7].b.buf;
    if (n_bins < 1 || n_bins > 40 || n_bins * n_bins * n_bins > 65536) {
        PyErr_SetString(PyExc_ValueError, "block sites: local contexts must fit 16 bits");
        return -1;
    }
    for (Py_ssize_t i = 0; i < LUT_SIZE; i++)
        if (lut[i] >= n_bins) { PyErr_SetString(PyExc_ValueError, "block sites: bin out of range"); return -1; }
    if (n_anchor < 0 || n_anchor > n) { PyErr_SetString(PyExc_ValueError, "block sites: bad anchor count"); return -1; }
    for (Py_ssize_t i = 0; i < n; i++)
        if (perm[i] < 0 || perm[i] >= n) { PyErr_SetString(PyExc_ValueError, "block sites: perm out of range"); return -1; }
    for (Py_ssize_t i = 0; i < 6 * n; i++)
        if (nbr[i] < 0 || nbr[i] > n) { PyErr_SetString(PyExc_ValueError, "block sites: neighbour out of range"); return -1; }
    for (Py_ssize_t i = 0; i < nb; i++)
        if (order[i] < 0 || order[i] >= nb) { PyErr_SetString(PyExc_ValueError, "block sites: order out of range"); return -1; }
    for (Py_ssize_t d = 1; d <= n_degrees; d++) {
        const int64_t *par = parents + 3 * (bounds[d] - bounds[1]);
        for (Py_ssize_t i = 0; i < 3 * (bounds[d + 1] - bounds[d]); i++)
            if (par[i] < 0 || par[i] > bounds[d] - bounds[d - 1]) {
                PyErr_SetString(PyExc_ValueError, "block sites: parent out of range");
                return -1;
            }
    }
    *L = (Lattice){n, nb, n_degrees, max_width, n_anchor, n_bins, b[0].b.buf, b[1].b.buf, perm, nbr, bounds, order,
                   parents, lut};
    return 0;
}

/* Both site functions' first inputs: the lattice (o[0…7], see above) and the output local (o[8], uint16),
 * whose length is the capacity in sites. */
static int site_inputs(PyObject **o, Buf *b, Py_ssize_t n_anchor, Py_ssize_t n_bins, Py_ssize_t abs_cap, Lattice *L,
                       Py_ssize_t *capacity) {
    if (lattice(o, b, n_anchor, n_bins, abs_cap, L) < 0 || get(o[8], &b[8], 2, -1, 1, "local") < 0) return -1;
    *capacity = b[8].b.len / 2;
    return 0;
}

/* Row i of ``out`` (stride ``stride``): the saturated |coefficients| of degree d of block i (anchors-first
 * numbering), for blocks numbered first … last − 1 whose end of block reaches d (the others' rows are
 * left as they are). */
static void saturated(const Lattice *L, Py_ssize_t d, Py_ssize_t first, Py_ssize_t last, int64_t abs_cap,
                      uint8_t *out, Py_ssize_t stride) {
    Py_ssize_t lo = L->bounds[d], width = L->bounds[d + 1] - lo;
    for (Py_ssize_t i = first; i < last; i++) {
        if (L->eob[i] < d) continue;
        const int32_t *row = L->coef + L->perm[i] * L->nb;
        for (Py_ssize_t c = 0; c < width; c++) {
            int64_t a = row[L->order[lo + c]];
            a = a < 0 ? -a : a;
            out[i * stride + c] = (uint8_t)(a < abs_cap ? a : abs_cap);
        }
    }
}

/* Row i of ``out`` (stride ``stride``): the saturated |DC| of block i (anchors-first numbering), every block:
 * the previous degree of degree 1. */
static void saturated_dc(const Lattice *L, int64_t abs_cap, uint8_t *out, Py_ssize_t stride) {
    for (Py_ssize_t i = 0; i < L->n; i++) {
        int64_t a = L->coef[L->perm[i] * L->nb];
        a = a < 0 ? -a : a;
        out[i * stride] = (uint8_t)(a < abs_cap ? a : abs_cap);
    }
}

/* The parents' sums of degree d (``parent``) from the previous degree's saturated |coefficients| (``prev``). */
static void parent_sums(const Lattice *L, Py_ssize_t d, const uint8_t *prev, uint8_t *parent, Py_ssize_t stride) {
    Py_ssize_t width = L->bounds[d + 1] - L->bounds[d];
    const int64_t *par = L->parents + 3 * (L->bounds[d] - L->bounds[1]);
    for (Py_ssize_t i = 0; i < L->n; i++) {
        const uint8_t *p = prev + i * stride;
        uint8_t *out = parent + i * stride;
        for (Py_ssize_t c = 0; c < width; c++)
            out[c] = (uint8_t)(p[par[c]] + p[par[width + c]] + p[par[2 * width + c]]);
    }
    memset(parent + L->n * stride, 0, (size_t)stride);
}

/* The sites of pass ``pass`` of degree d: their local contexts, and their flat positions in coef (``at``, a
 * decoder's) or their values (``values``, an encoder's; either may be NULL), from the parents' sums and, for
 * pass 1, pass 0's saturated values (``cur``). Returns the count, or −1 past ``capacity``. */
static Py_ssize_t pass_sites_of(const Lattice *L, Py_ssize_t d, int pass, const uint8_t *parent, const uint8_t *cur,
                                Py_ssize_t stride, uint16_t *local, int64_t *at, int32_t *values,
                                Py_ssize_t capacity) {
    Py_ssize_t lo = L->bounds[d], width = L->bounds[d + 1] - lo, n = L->n, sites = 0;
    Py_ssize_t first = pass ? L->n_anchor : 0, last = pass ? n : L->n_anchor;
    const uint8_t *nsrc = pass ? cur : parent, *lut = L->lut;
    for (Py_ssize_t i = first; i < last; i++) {
        if (L->eob[i] < d) continue;
        if (sites + width > capacity) return -1;
        int64_t extra = L->eob[i] - d;
        int ebin = lut[extra < 0 ? 0 : (extra >= LUT_SIZE ? LUT_SIZE - 1 : extra)];
        const uint8_t *pr = parent + i * stride, *nb_rows[6];
        for (int k = 0; k < 6; k++) nb_rows[k] = nsrc + L->nbr[k * n + i] * stride;
        for (Py_ssize_t c = 0; c < width; c++) {
            unsigned sum = (unsigned)nb_rows[0][c] + nb_rows[1][c] + nb_rows[2][c] + nb_rows[3][c] + nb_rows[4][c] +
                           nb_rows[5][c];
            if (!pass) sum /= 2;
            int64_t flat = L->perm[i] * L->nb + L->order[lo + c];
            local[sites] = (uint16_t)((lut[pr[c]] * L->n_bins + lut[sum]) * L->n_bins + ebin);
            if (at) at[sites] = flat;
            if (values) values[sites] = L->coef[flat];
            sites++;
        }
    }
    return sites;
}

/* Readies ``work`` for pass ``pass`` of degree d and returns the parents' sums in it (and, in *cur, the degree's
 * saturated |coefficients|), from the values coded since the pass before: a grid's passes are readied in
 * order, degree after degree from degree 1, pass 0 then pass 1. ``work`` holds 3 planes of (n + 1) rows of
 * ``stride`` bytes (each with an all-zero row "outside the lattice" and column "no parent"): the saturated
 * |coefficients| of odd and of even degrees, and the parents' sums. Pass 0 completes the previous degree's
 * (its pass-1 sites) and sums the parents; pass 1 adds the degree's pass-0 sites, which its contexts read. */
static uint8_t *ready_pass(const Lattice *L, Py_ssize_t d, int pass, int64_t abs_cap, uint8_t *work, Py_ssize_t stride,
                           uint8_t **cur) {
    Py_ssize_t plane = (L->n + 1) * stride;
    uint8_t *parent = work + 2 * plane, *prev = work + ((d - 1) & 1) * plane;
    *cur = work + (d & 1) * plane;
    if (pass) {
        saturated(L, d, 0, L->n_anchor, abs_cap, *cur, stride);
        return parent;
    }
    if (d == 1) {
        memset(work, 0, (size_t)(3 * plane));
        saturated_dc(L, abs_cap, prev, stride);
    } else {
        saturated(L, d - 1, L->n_anchor, L->n, abs_cap, prev, stride);
    }
    parent_sums(L, d, prev, parent, stride);
    memset(*cur, 0, (size_t)plane);
    return parent;
}

/* The sites blockcoef.code_block_coefficients codes after the DC, in its order, with their local
 * contexts and values: see that function for the scheme. Returns (sites, calls); calls rows are (degree,
 * pass, start, stop) into local and values. */
static PyObject *block_sites(PyObject *self, PyObject *args) {
    PyObject *o[11];
    Py_ssize_t n_anchor, n_bins, abs_cap;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOnnn", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &n_anchor, &n_bins, &abs_cap))
        return NULL;
    Buf b[11];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    uint8_t *work = NULL;
    Lattice L;
    /* The lattice and local (see site_inputs); out: values (capacity) int32, calls (2 D, 4) int64. */
    Py_ssize_t capacity;
    if (site_inputs(o, b, n_anchor, n_bins, abs_cap, &L, &capacity) < 0) goto done;
    if (get(o[9], &b[9], 4, capacity, 1, "values") < 0 || get(o[10], &b[10], 8, 2 * L.n_degrees * 4, 1, "calls") < 0)
        goto done;
    uint16_t *local = b[8].b.buf;
    int32_t *values = b[9].b.buf;
    int64_t *calls = b[10].b.buf;

    Py_ssize_t stride = L.max_width + 1;
    work = PyMem_RawMalloc((size_t)(3 * (L.n + 1) * stride)); /* see ready_pass */
    if (!work) { PyErr_NoMemory(); goto done; }
    Py_ssize_t sites = 0, n_calls = 0;
    int overflow = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t d = 1; d <= L.n_degrees && !overflow; d++) {
        int any = 0;
        for (Py_ssize_t i = 0; i < L.n && !any; i++) any = L.eob[i] >= d;
        if (!any) break; /* eob >= d is monotone in d */
        for (int pass = 0; pass < 2; pass++) {
            uint8_t *cur, *parent = ready_pass(&L, d, pass, abs_cap, work, stride, &cur);
            Py_ssize_t got = pass_sites_of(&L, d, pass, parent, cur, stride, local + sites, NULL, values + sites,
                                           capacity - sites);
            if (got < 0) { overflow = 1; break; }
            if (got) {
                int64_t *call = calls + 4 * n_calls++;
                call[0] = d, call[1] = pass, call[2] = sites, call[3] = sites + got;
            }
            sites += got;
        }
    }
    Py_END_ALLOW_THREADS
    if (overflow) {
        PyErr_SetString(PyExc_ValueError, "block_sites: more sites than the capacity given");
        goto done;
    }
    result = Py_BuildValue("nn", sites, n_calls);
done:
    PyMem_RawFree(work);
    release(b, 11);
    return result;
}

/* A decoder's sites of one pass (degree ≥ 1, pass 0 or 1), as block_sites finds them, from the coefficients
 * decoded before it (coef holds zeros where none are decoded yet): their local contexts and flat positions
 * in coef. Returns the count.
 *
 * A grid's calls come as a decoder makes them, with the same arrays: degree after degree, pass 0 then pass
 * 1, from degree 1. ``work`` (uint8, 3 (n + 1) (max width + 1) bytes) carries what the calls share from one
 * to the next, as it does between block_sites' passes (see ready_pass): each call reads only the values
 * decoded since the last, not a degree's rows anew into a fresh buffer (the head CT's decode makes 760). */
static PyObject *pass_sites(PyObject *self, PyObject *args) {
    PyObject *o[11];
    Py_ssize_t degree, pass, n_anchor, n_bins, abs_cap;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOnnnnn", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &degree, &pass, &n_anchor, &n_bins, &abs_cap))
        return NULL;
    Buf b[11];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    Lattice L;
    /* The lattice and local (see site_inputs); out: at (capacity) int64; work, see above. */
    Py_ssize_t capacity;
    if (site_inputs(o, b, n_anchor, n_bins, abs_cap, &L, &capacity) < 0) goto done;
    if (get(o[9], &b[9], 8, capacity, 1, "at") < 0) goto done;
    Py_ssize_t stride = L.max_width + 1, rows = L.n + 1, got = 0;
    if (get(o[10], &b[10], 1, 3 * rows * stride, 1, "work") < 0) goto done;
    if (degree < 1 || degree > L.n_degrees || pass < 0 || pass > 1) {
        PyErr_SetString(PyExc_ValueError, "pass_sites: no such degree or pass");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    uint8_t *cur, *parent = ready_pass(&L, degree, (int)pass, abs_cap, b[10].b.buf, stride, &cur);
    got = pass_sites_of(&L, degree, (int)pass, parent, cur, stride, b[8].b.buf, b[9].b.buf, NULL, capacity);
    Py_END_ALLOW_THREADS
    if (got < 0) PyErr_SetString(PyExc_ValueError, "pass_sites: more sites than the capacity given");
    else result = PyLong_FromSsize_t(got);
done:
    release(b, 11);
    return result;
}

/* The numbers of non-zeros and of escapes (|v| > UNARY_CAP) among values (int32 or int64): the room binarise's
 * outputs need. */
static PyObject *binarise_counts(PyObject *self, PyObject *args) {
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O", &o)) return NULL;
    Buf b;
    memset(&b, 0, sizeof b);
    PyObject *result = NULL;
    if (PyObject_GetBuffer(o, &b.b, PyBUF_C_CONTIGUOUS) < 0) goto done;
    b.held = 1;
    Py_ssize_t wide = b.b.itemsize, n = wide ? b.b.len / wide : 0, k = 0, e = 0;
    if (wide != 4 && wide != 8) { PyErr_SetString(PyExc_ValueError, "binarise_counts: values must be int32 or int64"); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v = wide == 4 ? (int64_t)((const int32_t *)b.b.buf)[i] : ((const int64_t *)b.b.buf)[i];
        k += v != 0;
        e += v > UNARY_CAP || v < -UNARY_CAP;
    }
    result = Py_BuildValue("nn", k, e);
done:
    release(&b, 1);
    return result;
}

/* An encoder's decisions for a chunk run's values (entropy._binarise, with the non-zeros' magnitude keys
 * and the escapes' Exp-Golomb lengths): one pass over the values instead of a dozen numpy ones. Outputs
 * have room for the non-zeros and escapes (binarise_counts); returns (non-zeros, escapes), or raises
 * OverflowError for a value whose magnitude the coder cannot hold (numpy's abs overflows in the value's
 * own type, or |v| − UNARY_CAP ≥ 2**EG_CAP). */
static PyObject *binarise(PyObject *self, PyObject *args) {
    PyObject *o[11];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10]))
        return NULL;
    Buf b[11];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    /* values (n) int32 or int64; local (n) uint16; mag_of (n_local) int64. Out: sym (n) int32; nz, sym_nz,
       neg, mnz int64, room for the non-zeros; esc, rest, nbits int64, room for the escapes (binarise_counts
       counts both; too little room raises). */
    if (PyObject_GetBuffer(o[0], &b[0].b, PyBUF_C_CONTIGUOUS) < 0) goto done;
    b[0].held = 1;
    Py_ssize_t wide = b[0].b.itemsize, n = wide ? b[0].b.len / wide : 0;
    if (wide != 4 && wide != 8) {
        PyErr_SetString(PyExc_ValueError, "binarise: values must be int32 or int64");
        goto done;
    }
    if (get(o[1], &b[1], 2, n, 0, "local") < 0 || get(o[2], &b[2], 8, -1, 0, "mag_of") < 0 ||
        get(o[3], &b[3], 4, n, 1, "sym") < 0)
        goto done;
    for (int i = 4; i < 11; i++)
        if (get(o[i], &b[i], 8, -1, 1, "binarise output") < 0) goto done;
    Py_ssize_t n_local = b[2].b.len / 8, room_nz = b[4].b.len / 8, room_esc = b[8].b.len / 8;
    for (int i = 5; i < 8; i++)
        if (b[i].b.len / 8 != room_nz) { PyErr_SetString(PyExc_ValueError, "binarise: non-zero outputs differ in length"); goto done; }
    if (b[9].b.len / 8 != room_esc || b[10].b.len / 8 != room_esc) {
        PyErr_SetString(PyExc_ValueError, "binarise: escape outputs differ in length");
        goto done;
    }
    const uint16_t *local = b[1].b.buf;
    const int64_t *mag_of = b[2].b.buf;
    int32_t *sym = b[3].b.buf;
    int64_t *nz = b[4].b.buf, *sym_nz = b[5].b.buf, *neg = b[6].b.buf, *mnz = b[7].b.buf, *esc = b[8].b.buf,
            *rest = b[9].b.buf, *nbits = b[10].b.buf;
    for (Py_ssize_t l = 0; l < n_local; l++)
        if (mag_of[l] < 0) { PyErr_SetString(PyExc_ValueError, "binarise: negative magnitude key"); goto done; }
    Py_ssize_t k = 0, e = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v = wide == 4 ? (int64_t)((const int32_t *)b[0].b.buf)[i] : ((const int64_t *)b[0].b.buf)[i];
        if (local[i] >= n_local) { bad = 2; break; }
        if (v == 0) { sym[i] = 0; continue; }
        if ((wide == 4 && v == INT32_MIN) || (wide == 8 && v == INT64_MIN)) { bad = 1; break; }
        int64_t a = v < 0 ? -v : v;
        int32_t s = a > UNARY_CAP ? UNARY_CAP + 1 : (int32_t)a;
        if (k == room_nz || (s > UNARY_CAP && e == room_esc)) { bad = 3; break; }
        sym[i] = s;
        nz[k] = i, sym_nz[k] = s, neg[k] = v < 0, mnz[k] = mag_of[local[i]];
        k++;
        if (s > UNARY_CAP) {
            int64_t r = a - UNARY_CAP;
            if (r >= ((int64_t)1 << EG_CAP)) { bad = 1; break; }
            esc[e] = i, rest[e] = r, nbits[e] = 63 - __builtin_clzll((unsigned long long)r);
            e++;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad == 1) PyErr_SetString(PyExc_OverflowError, "value too large for the entropy coder");
    else if (bad == 2) PyErr_SetString(PyExc_ValueError, "binarise: local context out of range");
    else if (bad == 3) PyErr_SetString(PyExc_ValueError, "binarise: more non-zeros or escapes than room for them");
    else result = Py_BuildValue("nn", k, e);
done:
    release(b, 11);
    return result;
}

/* An encoder's coder inputs for a chunk run beyond its symbols, from binarise's decisions and chunk_models's
 * sign models: each non-zero's P(negative) and sign, each escape's length symbol and the raw bits below the
 * leading one of its remainder (most significant first, escape after escape), and where each chunk starts in
 * each of them (marks rows: non-zeros, escapes, bits). Returns the number of bits. */
static PyObject *chunk_symbols(PyObject *self, PyObject *args) {
    PyObject *o[13];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11], &o[12]))
        return NULL;
    Buf b[13];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    /* bounds (n_chunks + 1); nz, mnz, neg (non-zeros); esc, rest, nbits (escapes): int64; p_neg (n_chunks,
       n_mag) float64. Out: psign (non-zeros) float64, sign (non-zeros) int32, length (escapes) int32, bits
       (capacity) int32, marks (3, n_chunks + 1) int64. */
    if (get(o[0], &b[0], 8, -1, 0, "bounds") < 0 || get(o[1], &b[1], 8, -1, 0, "nz") < 0) goto done;
    Py_ssize_t n_chunks = b[0].b.len / 8 - 1, n_nz = b[1].b.len / 8;
    if (n_chunks < 0) { PyErr_SetString(PyExc_ValueError, "chunk_symbols: no bounds"); goto done; }
    if (get(o[2], &b[2], 8, n_nz, 0, "mnz") < 0 || get(o[3], &b[3], 8, n_nz, 0, "neg") < 0 ||
        get(o[4], &b[4], 8, -1, 0, "esc") < 0)
        goto done;
    Py_ssize_t n_esc = b[4].b.len / 8;
    if (get(o[5], &b[5], 8, n_esc, 0, "rest") < 0 || get(o[6], &b[6], 8, n_esc, 0, "nbits") < 0 ||
        get(o[7], &b[7], 8, -1, 0, "p_neg") < 0 || get(o[8], &b[8], 8, n_nz, 1, "psign") < 0 ||
        get(o[9], &b[9], 4, n_nz, 1, "sign") < 0 || get(o[10], &b[10], 4, n_esc, 1, "length") < 0 ||
        get(o[11], &b[11], 4, -1, 1, "bits") < 0 || get(o[12], &b[12], 8, 3 * (n_chunks + 1), 1, "marks") < 0)
        goto done;
    Py_ssize_t n_mag = n_chunks ? b[7].b.len / 8 / n_chunks : 0, capacity = b[11].b.len / 4;
    const int64_t *bounds = b[0].b.buf, *nz = b[1].b.buf, *mnz = b[2].b.buf, *neg = b[3].b.buf, *esc = b[4].b.buf,
                  *rest = b[5].b.buf, *nbits = b[6].b.buf;
    const double *p_neg = b[7].b.buf;
    double *psign = b[8].b.buf;
    int32_t *sign = b[9].b.buf, *length = b[10].b.buf, *bits = b[11].b.buf;
    int64_t *marks = b[12].b.buf;
    if (n_chunks && b[7].b.len != 8 * n_chunks * n_mag) {
        PyErr_SetString(PyExc_ValueError, "chunk_symbols: sign models are not one row per chunk");
        goto done;
    }
    for (Py_ssize_t c = 0; c < n_chunks; c++)
        if (bounds[c + 1] < bounds[c]) { PyErr_SetString(PyExc_ValueError, "chunk_symbols: bounds decrease"); goto done; }
    Py_ssize_t total = 0;
    for (Py_ssize_t j = 0; j < n_nz; j++)
        if (mnz[j] < 0 || mnz[j] >= n_mag || (j && nz[j] <= nz[j - 1])) {
            PyErr_SetString(PyExc_ValueError, "chunk_symbols: non-zeros out of range");
            goto done;
        }
    for (Py_ssize_t e = 0; e < n_esc; e++) {
        if (nbits[e] < 0 || nbits[e] >= EG_CAP || (e && esc[e] <= esc[e - 1]) || rest[e] >> nbits[e] != 1) {
            PyErr_SetString(PyExc_ValueError, "chunk_symbols: escapes out of range");
            goto done;
        }
        total += nbits[e];
    }
    if (total > capacity) { PyErr_SetString(PyExc_ValueError, "chunk_symbols: more bits than the capacity given"); goto done; }
    Py_ssize_t j = 0, e = 0, k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c <= n_chunks; c++) {
        marks[c] = j, marks[n_chunks + 1 + c] = e, marks[2 * (n_chunks + 1) + c] = k;
        if (c == n_chunks) break;
        for (; j < n_nz && nz[j] < bounds[c + 1]; j++) {
            psign[j] = p_neg[c * n_mag + mnz[j]];
            sign[j] = (int32_t)neg[j];
        }
        for (; e < n_esc && esc[e] < bounds[c + 1]; e++) {
            length[e] = (int32_t)nbits[e];
            for (int64_t s = nbits[e] - 1; s >= 0; s--) bits[k++] = (int32_t)((rest[e] >> s) & 1);
        }
    }
    /* non-zeros or escapes past the last bound belong to no chunk: they are not coded */
    for (; j < n_nz; j++) psign[j] = 0.5, sign[j] = 0;
    for (; e < n_esc; e++) length[e] = 0;
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(k);
done:
    release(b, 13);
    return result;
}

/* A decoder's Exp-Golomb values from their length symbols nbits (int64, each in [0, EG_CAP)) and the raw bits
 * below each leading one (int32, most significant first, value after value: sum(nbits) of them, as
 * chunk_symbols lays them out): out[i] = 2**nbits[i] + those bits (int64). */
static PyObject *eg_values(PyObject *self, PyObject *args) {
    PyObject *o[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2])) return NULL;
    Buf b[3];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(o[0], &b[0], 8, -1, 0, "nbits") < 0 || get(o[1], &b[1], 4, -1, 0, "bits") < 0) goto done;
    Py_ssize_t n = b[0].b.len / 8, n_bits = b[1].b.len / 4, total = 0;
    if (get(o[2], &b[2], 8, n, 1, "out") < 0) goto done;
    const int64_t *nbits = b[0].b.buf;
    const int32_t *bits = b[1].b.buf;
    int64_t *out = b[2].b.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (nbits[i] < 0 || nbits[i] >= EG_CAP) { PyErr_SetString(PyExc_ValueError, "eg_values: length out of range"); goto done; }
        total += nbits[i];
    }
    if (total != n_bits) { PyErr_SetString(PyExc_ValueError, "eg_values: bits do not match the lengths"); goto done; }
    for (Py_ssize_t i = 0, k = 0; i < n; i++) {
        int64_t v = 1;
        for (int64_t j = 0; j < nbits[i]; j++) v = (v << 1) | (bits[k++] & 1);
        out[i] = v;
    }
    result = Py_NewRef(Py_None);
done:
    release(b, 3);
    return result;
}

/* A decoder's non-zeros of a chunk, from its decoded symbols sym (int32, each in [0, SYMBOLS)) and local contexts
 * local (uint16, one per symbol): their positions nz and symbols sym_nz (int64), each one's P(negative)
 * psign = p_neg[mag_of[local]] (float64; p_neg: one per magnitude key), and the positions of the escapes
 * (symbol UNARY_CAP + 1) esc (int64). Outputs hold at least one item per symbol. Returns (non-zeros, escapes). */
static PyObject *chunk_nonzeros(PyObject *self, PyObject *args) {
    PyObject *o[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7])) return NULL;
    Buf b[8];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(o[0], &b[0], 4, -1, 0, "sym") < 0) goto done;
    Py_ssize_t n = b[0].b.len / 4;
    if (get(o[1], &b[1], 2, n, 0, "local") < 0 || get(o[2], &b[2], 8, -1, 0, "mag_of") < 0 ||
        get(o[3], &b[3], 8, -1, 0, "p_neg") < 0 || get(o[4], &b[4], 8, -1, 1, "nz") < 0 ||
        get(o[5], &b[5], 8, -1, 1, "sym_nz") < 0 || get(o[6], &b[6], 8, -1, 1, "psign") < 0 ||
        get(o[7], &b[7], 8, -1, 1, "esc") < 0)
        goto done;
    Py_ssize_t n_local = b[2].b.len / 8, n_mag = b[3].b.len / 8;
    if (b[4].b.len < 8 * n || b[5].b.len < 8 * n || b[6].b.len < 8 * n || b[7].b.len < 8 * n) {
        PyErr_SetString(PyExc_ValueError, "chunk_nonzeros: outputs shorter than the symbols");
        goto done;
    }
    const int32_t *sym = b[0].b.buf;
    const uint16_t *local = b[1].b.buf;
    const int64_t *mag_of = b[2].b.buf;
    const double *p_neg = b[3].b.buf;
    int64_t *nz = b[4].b.buf, *sym_nz = b[5].b.buf, *esc = b[7].b.buf;
    double *psign = b[6].b.buf;
    for (Py_ssize_t i = 0; i < n_local; i++)
        if (mag_of[i] < 0 || mag_of[i] >= n_mag) { PyErr_SetString(PyExc_ValueError, "chunk_nonzeros: magnitude key out of range"); goto done; }
    Py_ssize_t k = 0, e = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t v = sym[i];
        if (v == 0) continue;
        if (v < 0 || v >= SYMBOLS || local[i] >= n_local) { PyErr_SetString(PyExc_ValueError, "chunk_nonzeros: symbol or context out of range"); goto done; }
        nz[k] = i, sym_nz[k] = v, psign[k] = p_neg[mag_of[local[i]]];
        if (v > UNARY_CAP) esc[e++] = i;
        k++;
    }
    result = Py_BuildValue("nn", k, e);
done:
    release(b, 8);
    return result;
}

/* A decoder's values of a chunk from chunk_nonzeros' nz and sym_nz, and the decoded signs neg (int32, 1:
 * negative): ±|v|, |v| = sym_nz below the escape symbol, else the escape's magnitude from escval (int64, one per
 * escape in order), written at out[start + nz] (out int64), or, given positions at (int64), at out[at[start + nz]]
 * (out int32: the decoder's coefficients, written in place; a value beyond int32 is a corrupted stream). neg is
 * widened into neg64 (int64) for chunk_models' counts. */
static PyObject *chunk_values(PyObject *self, PyObject *args) {
    PyObject *o[7];
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "OOOOnOOO", &o[0], &o[1], &o[2], &o[3], &start, &o[4], &o[5], &o[6])) return NULL;
    Buf b[7];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    int placed = o[6] != Py_None;
    if (get(o[0], &b[0], 8, -1, 0, "nz") < 0) goto done;
    Py_ssize_t k = b[0].b.len / 8;
    if (get(o[1], &b[1], 8, k, 0, "sym_nz") < 0 || get(o[2], &b[2], 4, k, 0, "neg") < 0 ||
        get(o[3], &b[3], 8, -1, 0, "escval") < 0 || get(o[4], &b[4], placed ? 4 : 8, -1, 1, "out") < 0 ||
        get(o[5], &b[5], 8, k, 1, "neg64") < 0 || (placed && get(o[6], &b[6], 8, -1, 0, "at") < 0))
        goto done;
    Py_ssize_t n_esc = b[3].b.len / 8, n_out = b[4].b.len / (placed ? 4 : 8), t = 0;
    Py_ssize_t n_pos = placed ? b[6].b.len / 8 : n_out;
    const int64_t *nz = b[0].b.buf, *sym_nz = b[1].b.buf, *escval = b[3].b.buf, *at = b[6].b.buf;
    const int32_t *neg = b[2].b.buf;
    int64_t *neg64 = b[5].b.buf;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (start < 0 || nz[j] < 0 || nz[j] >= n_pos - start) { PyErr_SetString(PyExc_ValueError, "chunk_values: position out of range"); goto done; }
        int64_t mag = sym_nz[j];
        if (mag > UNARY_CAP) {
            if (t == n_esc) { PyErr_SetString(PyExc_ValueError, "chunk_values: more escapes than values"); goto done; }
            mag = escval[t++];
        }
        int64_t v = neg[j] ? -mag : mag;
        neg64[j] = neg[j] != 0;
        if (!placed) { ((int64_t *)b[4].b.buf)[start + nz[j]] = v; continue; }
        int64_t p = at[start + nz[j]];
        if (p < 0 || p >= n_out) { PyErr_SetString(PyExc_ValueError, "chunk_values: position out of range"); goto done; }
        if (v < INT32_MIN || v > INT32_MAX) { PyErr_SetString(PyExc_OverflowError, "chunk_values: value beyond int32"); goto done; }
        ((int32_t *)b[4].b.buf)[p] = (int32_t)v;
    }
    if (t != n_esc) { PyErr_SetString(PyExc_ValueError, "chunk_values: fewer escapes than values"); goto done; }
    result = Py_NewRef(Py_None);
done:
    release(b, 7);
    return result;
}

static PyMethodDef methods[] = {
    {"block_sites", block_sites, METH_VARARGS,
     "block_sites(coef, eob, perm, nbr, bounds, order, parents, lut, local, values, calls, n_anchor, n_bins, "
     "abs_cap) -> (sites, calls)\n\nThe coded sites of a block grid after its DC, with their local contexts "
     "(see blockcoef.code_block_coefficients)."},
    {"pass_sites", pass_sites, METH_VARARGS,
     "pass_sites(coef, eob, perm, nbr, bounds, order, parents, lut, local, at, work, degree, pass, n_anchor, "
     "n_bins, abs_cap) -> sites\n\nA decoder's sites of one pass, with their local contexts and positions in coef "
     "(a grid's passes in order, sharing work)."},
    {"binarise", binarise, METH_VARARGS,
     "binarise(values, local, mag_of, sym, nz, sym_nz, neg, mnz, esc, rest, nbits) -> (non-zeros, escapes)\n\n"
     "An encoder's decisions for values (see entropy._binarise)."},
    {"binarise_counts", binarise_counts, METH_VARARGS,
     "binarise_counts(values) -> (non-zeros, escapes)\n\nThe room binarise's outputs need."},
    {"chunk_symbols", chunk_symbols, METH_VARARGS,
     "chunk_symbols(bounds, nz, mnz, neg, esc, rest, nbits, p_neg, psign, sign, length, bits, marks) -> bits\n\n"
     "An encoder's sign models and signs, Exp-Golomb lengths and raw bits per chunk of a run."},
    {"chunk_nonzeros", chunk_nonzeros, METH_VARARGS,
     "chunk_nonzeros(sym, local, mag_of, p_neg, nz, sym_nz, psign, esc) -> (non-zeros, escapes)\n\n"
     "A decoder's non-zeros of a chunk, their symbols and sign models, and its escapes."},
    {"chunk_values", chunk_values, METH_VARARGS,
     "chunk_values(nz, sym_nz, neg, escval, start, out, neg64, at)\n\nA decoder's signed values of a chunk, "
     "at their places in out (at None) or at their positions at in int32 out."},
    {"eg_values", eg_values, METH_VARARGS,
     "eg_values(nbits, bits, out)\n\nA decoder's Exp-Golomb values from their lengths and raw bits."},
    {"chunk_models", chunk_models, METH_VARARGS,
     "chunk_models(cls, key0, mkey0, bounds, local, nz, sym_nz, neg, esc, nbits, mag_of, zero, zero_pooled, mag, "
     "mag_pooled, eg, tables, signs_and_lengths, n_keys, n_mag_keys, n_classes, mode)\n\n"
     "Each chunk's model from the count tables (mode 1), its counts added to them (2), or both, the model "
     "first (3; see entropy.SignedCoder)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_contexts", NULL, -1, methods};

PyMODINIT_FUNC PyInit__contexts(void) { return PyModule_Create(&module); }
