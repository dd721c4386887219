/* Every decoder layer of a Llama model for a step of decode rows, in one call from Python.
 *
 * A decode step of one sequence on the default model runs ~20 torch or kernel calls a layer (norms,
 * four projections, RoPE, the KV write, attention, the activation, two residual adds) over 30
 * layers: at ~25 us of Python and dispatch each, ~15 ms a token, more than its weights take to read.
 * `decode_layers` runs the same kernels from C, layer after layer, with no Python in between:
 *   h = rms_norm(x);  qkv = h @ Wqkv^T (+ b);  q, k = rope(q), rope(k);  write k, v into their slots
 *   a = paged attention(q);  x += a @ Wo^T;  h = rms_norm(x);  x += (silu(g) * u) @ Wdown^T, [g|u] = h @ Wgu^T
 * Each kernel is the very function the per-op path calls, reached through its extension's table
 * (kernel_api.h): the outputs are the same bits either way, and a row's output does not depend on
 * the other rows of the step. The cache is float32 (a quantized model computes in float32, and its
 * cache has the compute dtype), or 8-bit (int8 or fp8 e4m3fn values and float32 scales per token
 * and kv head, kernels/kv_quant.py): new rows are then quantized by the attention extension's
 * `write_rows_8bit`, the function the per-op path's CPU write calls, to kv_quant.quantize's bits.
 *
 *   plan    int64 [layers][PLAN_FIELDS]: per layer the pointers and formats below (cpu_layers.py)
 *   x       [m][hidden] float32, the residual stream, updated in place
 *   cos/sin [m][head_dim] float32, each row's RoPE factors (the signed sin, as cpu_ops takes them)
 *   slots   [m] int64, each row's cache slot; tables [m][max_blocks] int32; seq_lens [m] int32
 *           (context length with the new token)
 *   keep    [n] int32, ascending: the rows whose output is read (their logits), or all rows. The
 *           last layer writes every row's K and V, then attends and runs its MLP for these rows
 *           only: the others' outputs are never read (a prefix hit's 16 rows sample one; a prompt's
 *           chunk before its last samples none). Their rows of x are then left undefined.
 * The Python entry checks every index the kernels will follow (slots, block ids, lengths) first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "kernel_api.h"

enum { P_IN_NORM, P_POST_NORM, P_QKV, P_QKV_KIND, P_QKV_BIAS, P_O, P_O_KIND, P_GU, P_GU_KIND, P_DOWN, P_DOWN_KIND,
       P_K_CACHE, P_V_CACHE, P_K_SCALES, P_V_SCALES, P_KV_KIND, PLAN_FIELDS };

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter, block_size, max_blocks, int8;
    float eps, scale;
} Shape;

static const OpsApi *ops;
static const AttentionApi *attention;
static const QuantApi *quant;

#define PTR(T, v) ((T)(uintptr_t)(v))

/* rows of kv_heads * head_dim floats at src (row stride src_stride) into their slots of a cache:
 * copied into a float32 one, quantized with their scales into an 8-bit one (kind KV_INT8, KV_FP8) */
static void write_slots(const float *src, long src_stride, const int64_t *slots, long m, const Shape *d, int kind,
                        char *cache, float *scales) {
    const long n = (long)d->kv_heads * d->head_dim;
    if (kind == KV_F32)
        for (long r = 0; r < m; r++)
            memcpy((float *)cache + slots[r] * n, src + r * src_stride, (size_t)n * sizeof(float));
    else
        attention->write_rows_8bit(src, src_stride, slots, m, d->kv_heads, d->head_dim, kind, (uint8_t *)cache, scales);
}

/* x += y over count floats, spread over the OpenMP team for a prefill chunk's rows (each float's
 * add is the same one whichever thread makes it) */
static void add_rows(float *x, const float *y, long count) {
#pragma omp parallel for schedule(static) if (count >= 65536)
    for (long i = 0; i < count; i++) x[i] = x[i] + y[i];
}

/* The scratch of one step, by phase of a layer (what one phase writes, the other never reads):
 *   h [m][hidden] (a norm's output) and out [m][hidden] (a projection's, added into x): both phases;
 *   attention: qkv [m][q + 2kv], q [m][q], k [m][kv], a [m][q];
 *   MLP, over the same floats: gu [m][2 inter], act [m][inter].
 * 22.5 KiB a row instead of 31.5 for the default model (5.6 MiB for a piece of 256 rows, the most
 * cpu_layers.py hands one call); 0 when out of memory. */
typedef struct {
    float *h, *out, *qkv, *q, *k, *a, *gu, *act;
} Scratch;

static long rounded(long n) { return (n + 15) & ~15L; } /* 64-byte steps */

static float *scratch_alloc(Scratch *s, long m, const Shape *d) {
    const long q = (long)d->heads * d->head_dim, kv = (long)d->kv_heads * d->head_dim;
    const long attn = rounded(m * (q + 2 * kv)) + rounded(m * q) + rounded(m * kv) + rounded(m * q);
    const long mlp = rounded(m * 2L * d->inter) + rounded(m * (long)d->inter);
    const long total = 2 * rounded(m * (long)d->hidden) + (attn > mlp ? attn : mlp);
    float *base = aligned_alloc(64, (size_t)total * sizeof(float));
    if (base == NULL) return NULL;
    s->h = base;
    s->out = s->h + rounded(m * (long)d->hidden);
    float *phase = s->out + rounded(m * (long)d->hidden);
    s->qkv = phase;
    s->q = s->qkv + rounded(m * (q + 2 * kv));
    s->k = s->q + rounded(m * q);
    s->a = s->k + rounded(m * kv);
    s->gu = phase;
    s->act = s->gu + rounded(m * 2L * d->inter);
    return base;
}

/* From the attention on, for m rows whose queries are in s->q: attention over the cache, the output
 * projection and the MLP, each added into x */
static int attend_and_mlp(const int64_t *p, const Scratch *s, float *x, long m, const int32_t *tables,
                          const int32_t *seq_lens, const Shape *d) {
    const long q = (long)d->heads * d->head_dim;
    const char *k_cache = PTR(const char *, p[P_K_CACHE]), *v_cache = PTR(const char *, p[P_V_CACHE]);
    const float *k_scales = PTR(const float *, p[P_K_SCALES]), *v_scales = PTR(const float *, p[P_V_SCALES]);
    int rc = 0;
    attention->decode_all(s->q, k_cache, v_cache, (int)p[P_KV_KIND], k_scales, v_scales, tables, d->max_blocks, seq_lens,
                          (int)m, d->heads, d->kv_heads, d->head_dim, d->block_size, d->scale, s->a);
    rc |= quant->linear(s->a, PTR(const uint8_t *, p[P_O]), (int)p[P_O_KIND], NULL, s->out, m, d->hidden, q, d->int8);
    add_rows(x, s->out, m * d->hidden);
    ops->rms_norm_rows(x, PTR(const float *, p[P_POST_NORM]), s->h, m, d->hidden, d->eps);
    rc |= quant->linear(s->h, PTR(const uint8_t *, p[P_GU]), (int)p[P_GU_KIND], NULL, s->gu, m, 2L * d->inter,
                        d->hidden, d->int8);
    ops->silu_mul_rows(s->gu, s->act, m, d->inter);
    rc |= quant->linear(s->act, PTR(const uint8_t *, p[P_DOWN]), (int)p[P_DOWN_KIND], NULL, s->out, m, d->hidden,
                        d->inter, d->int8);
    add_rows(x, s->out, m * d->hidden);
    return rc;
}

/* attend_and_mlp for rows keep[0 .. n - 1] (ascending) only: their queries, rows of x, tables and
 * lengths moved to the front (row keep[i] to row i: never over one still to be read), run, and their
 * rows of x moved back (from the last, for the same reason) */
static int attend_and_mlp_kept(const int64_t *p, const Scratch *s, float *x, const int32_t *keep, long n,
                               const int32_t *tables, const int32_t *seq_lens, const Shape *d) {
    if (n == 0) return 0;
    const long q = (long)d->heads * d->head_dim, hidden = d->hidden, mb = d->max_blocks;
    int32_t *kept_tables = malloc((size_t)(n * mb + n) * sizeof(int32_t));
    if (kept_tables == NULL) return -1;
    int32_t *kept_lens = kept_tables + n * mb;
    for (long i = 0; i < n; i++) {
        const long r = keep[i];
        memmove(s->q + i * q, s->q + r * q, (size_t)q * sizeof(float));
        memmove(x + i * hidden, x + r * hidden, (size_t)hidden * sizeof(float));
        memcpy(kept_tables + i * mb, tables + r * mb, (size_t)mb * sizeof(int32_t));
        kept_lens[i] = seq_lens[r];
    }
    const int rc = attend_and_mlp(p, s, x, n, kept_tables, kept_lens, d);
    for (long i = n - 1; i >= 0; i--) memmove(x + (long)keep[i] * hidden, x + i * hidden, (size_t)hidden * sizeof(float));
    free(kept_tables);
    return rc;
}

static int decode_layers(const int64_t *plan, int layers, float *x, long m, const float *cos, const float *sin,
                         const int64_t *slots, const int32_t *tables, const int32_t *seq_lens, const int32_t *keep,
                         long kept, const Shape *d) {
    Scratch s;
    float *base = scratch_alloc(&s, m, d);
    if (base == NULL) return -1;
    const long q = (long)d->heads * d->head_dim, kv = (long)d->kv_heads * d->head_dim, nqkv = q + 2 * kv;
    int rc = 0;
    for (int l = 0; l < layers && rc == 0; l++) {
        const int64_t *p = plan + (size_t)l * PLAN_FIELDS;
        char *k_cache = PTR(char *, p[P_K_CACHE]), *v_cache = PTR(char *, p[P_V_CACHE]);
        float *k_scales = PTR(float *, p[P_K_SCALES]), *v_scales = PTR(float *, p[P_V_SCALES]);
        const int kind = (int)p[P_KV_KIND];
        ops->rms_norm_rows(x, PTR(const float *, p[P_IN_NORM]), s.h, m, d->hidden, d->eps);
        rc |= quant->linear(s.h, PTR(const uint8_t *, p[P_QKV]), (int)p[P_QKV_KIND], PTR(const float *, p[P_QKV_BIAS]),
                            s.qkv, m, nqkv, d->hidden, d->int8);
        ops->rope_rows(s.qkv, nqkv, cos, sin, s.q, m, d->heads, d->head_dim);
        ops->rope_rows(s.qkv + q, nqkv, cos, sin, s.k, m, d->kv_heads, d->head_dim);
        write_slots(s.k, kv, slots, m, d, kind, k_cache, k_scales);
        write_slots(s.qkv + q + kv, nqkv, slots, m, d, kind, v_cache, v_scales);
        if (l == layers - 1 && kept < m)
            rc |= attend_and_mlp_kept(p, &s, x, keep, kept, tables, seq_lens, d);
        else
            rc |= attend_and_mlp(p, &s, x, m, tables, seq_lens, d);
    }
    free(base);
    return rc ? -1 : 0;
}

/* Every index the kernels follow lies inside the cache; else a ValueError naming the row. */
static int check_indices(const int64_t *slots, const int32_t *tables, const int32_t *lens, long m, long num_blocks,
                         const Shape *d) {
    const long capacity = num_blocks * d->block_size;
    for (long r = 0; r < m; r++) {
        if (slots[r] < 0 || slots[r] >= capacity) {
            PyErr_Format(PyExc_ValueError, "row %ld: slot %lld outside the cache's %ld slots", r, (long long)slots[r],
                         capacity);
            return -1;
        }
        const int len = lens[r];
        if (len <= 0 || (long)len > (long)d->max_blocks * d->block_size) {
            PyErr_Format(PyExc_ValueError, "row %ld: context length %d outside (0, %ld] (its block table)", r, len,
                         (long)d->max_blocks * d->block_size);
            return -1;
        }
        for (int i = 0; i < (len + d->block_size - 1) / d->block_size; i++) {
            const int32_t blk = tables[r * d->max_blocks + i];
            if (blk < 0 || blk >= num_blocks) {
                PyErr_Format(PyExc_ValueError, "row %ld: block id %d outside the cache's %ld blocks", r, blk, num_blocks);
                return -1;
            }
        }
    }
    return 0;
}

/* decode_layers(plan, x, cos, sin, slots, tables, seq_lens, keep: data pointers as ints, kept (-1:
 *               every row, keep unread), layers, m, num_blocks, max_blocks, block_size, hidden, heads,
 *               kv_heads, head_dim, inter, eps, scale, int8) */
static PyObject *py_decode_layers(PyObject *self, PyObject *args) {
    unsigned long long plan, x, c, s, slots, tables, lens, keep;
    int layers, int8;
    long m, num_blocks, kept;
    Shape d;
    if (!PyArg_ParseTuple(args, "KKKKKKKKlilliiiiiiiffp", &plan, &x, &c, &s, &slots, &tables, &lens, &keep, &kept,
                          &layers, &m, &num_blocks, &d.max_blocks, &d.block_size, &d.hidden, &d.heads, &d.kv_heads,
                          &d.head_dim, &d.inter, &d.eps, &d.scale, &int8))
        return NULL;
    d.int8 = int8;
    if (layers < 0 || m < 0 || num_blocks <= 0 || d.max_blocks < 0 || d.block_size <= 0 || d.hidden <= 0 ||
        d.hidden % 32 || d.kv_heads <= 0 || d.heads % d.kv_heads || d.heads / d.kv_heads > 16 || d.head_dim <= 0 ||
        d.head_dim % 8 || d.head_dim > 256 || (d.heads * d.head_dim) % 32 || d.inter <= 0 || d.inter % 32) {
        PyErr_Format(PyExc_ValueError, "decode_layers: bad sizes: layers %d, rows %ld, hidden %d, heads %d over %d kv, "
                     "head_dim %d, intermediate %d, %ld blocks of %d", layers, m, d.hidden, d.heads, d.kv_heads,
                     d.head_dim, d.inter, num_blocks, d.block_size);
        return NULL;
    }
    if (ops == NULL || attention == NULL || quant == NULL || quant->linear == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "decode_layers: the CPU kernels it calls are not available");
        return NULL;
    }
    for (int l = 0; l < layers; l++) { /* each layer's cache kind, with scales exactly for the 8-bit ones */
        const int64_t *p = PTR(const int64_t *, plan) + (size_t)l * PLAN_FIELDS;
        const int kind = (int)p[P_KV_KIND], scaled = p[P_K_SCALES] != 0 && p[P_V_SCALES] != 0;
        if ((kind != KV_F32 && kind != KV_INT8 && kind != KV_FP8) || scaled != (kind != KV_F32)) {
            PyErr_Format(PyExc_ValueError, "decode_layers: layer %d: cache kind %lld (0 float32, 2 int8, 3 fp8), "
                         "scales %s", l, (long long)kind, scaled ? "given" : "missing");
            return NULL;
        }
    }
    if (check_indices(PTR(const int64_t *, slots), PTR(const int32_t *, tables), PTR(const int32_t *, lens), m,
                      num_blocks, &d))
        return NULL;
    if (kept < 0) {
        kept = m;
    } else if (kept > m) {
        PyErr_Format(PyExc_ValueError, "decode_layers: %ld kept rows of %ld", kept, m);
        return NULL;
    } else {
        const int32_t *k = PTR(const int32_t *, keep);
        for (long i = 0; i < kept; i++)
            if (k[i] < 0 || k[i] >= m || (i > 0 && k[i] <= k[i - 1])) {
                PyErr_Format(PyExc_ValueError, "decode_layers: keep[%ld] = %d: the kept rows must ascend within "
                             "[0, %ld)", i, k[i], m);
                return NULL;
            }
    }
    int rc = 0;
    if (m > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = decode_layers(PTR(const int64_t *, plan), layers, PTR(float *, x), m, PTR(const float *, c),
                           PTR(const float *, s), PTR(const int64_t *, slots), PTR(const int32_t *, tables),
                           PTR(const int32_t *, lens), PTR(const int32_t *, keep), kept, &d);
        Py_END_ALLOW_THREADS
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_layers", py_decode_layers, METH_VARARGS, "Every decoder layer for a step of decode rows (cpu_layers.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_layers", NULL, -1, methods};

/* The table `name` of the extension `module` (imported first: the capsule is one of its attributes). */
static void *import_api(const char *module, const char *name) {
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL) return NULL;
    Py_DECREF(mod);
    return PyCapsule_Import(name, 0);
}

PyMODINIT_FUNC PyInit__cpu_layers(void) {
    PyObject *mod = simd_module_create(&module);
    if (mod == NULL) return NULL;
    ops = import_api("splitserve.kernels._cpu_ops", OPS_API_NAME);
    attention = ops ? import_api("splitserve.kernels._cpu_attention", ATTENTION_API_NAME) : NULL;
    quant = attention ? import_api("splitserve.kernels._cpu_quant", QUANT_API_NAME) : NULL;
    if (quant == NULL) Py_CLEAR(mod); /* the ImportError of the table that is missing */
    if (mod != NULL && PyModule_AddIntConstant(mod, "plan_fields", PLAN_FIELDS) < 0) Py_CLEAR(mod);
    return mod;
}
