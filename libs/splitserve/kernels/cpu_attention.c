/* Paged decode attention for CPUs: one query token per sequence against its whole paged context.
 *
 * The torch path gathers every row's pages into a padded [B, S, kv_heads, head_dim] copy and runs
 * SDPA over it: the copy moves the whole context twice per layer and SDPA's flash kernel, made for
 * long query blocks, pays its setup for each single-token query. This kernel reads K and V straight
 * from the pages, row by row up to each row's own length (no padding), with an online softmax over
 * chunks of a page; the query heads that share a kv head are scored together, so each key and value
 * row is loaded once per (sequence, kv head). Rows are spread over the calling thread's OpenMP team
 * (torch's own libgomp, already loaded: one runtime, one team), see `decode_all`.
 *
 * Layout (the engine's KV cache):
 *   q          [B, heads, head_dim] float32, contiguous
 *   k/v cache  [num_blocks, block_size, kv_heads, head_dim] float32 or bfloat16, contiguous
 *   tables     [B, max_blocks] int32 (padded; only the first ceil(len / block_size) are read)
 *   seq_lens   [B] int32, context length including the new token (its K/V already written)
 *   out        [B, heads, head_dim] float32, contiguous
 * Query head h attends with kv head h / (heads / kv_heads), as in HF's repeat_kv.
 *
 * The Python entry point checks what it can (shapes, block ids inside the cache, lengths inside
 * the table); the kernel itself trusts the pointers it is handed, so only the wrapper in
 * cpu_attention.py calls it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16      /* query heads per kv head */
#define MAX_HEAD_DIM 256
#define CHUNK 32          /* keys scored before each softmax rescale */

#include "simd.h"
#include "kernel_api.h"

#ifdef X86
/* The kernel is compiled for AVX2 + FMA; the module says whether this CPU has them (`supported`)
 * and the Python side falls back to the torch path where it does not. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

static inline v8f load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8i wide = __builtin_convertvector(h, v8i) << 16; /* bf16 is the top half of a float32 */
    return (v8f)wide;
}

/* Copies the rows of a chunk (n tokens from position `start`, through the block table) of one kv
 * head into dst [n][dim] as float32: contiguous, converted once, then read once per query head. */
static inline __attribute__((always_inline)) void gather_chunk(
    const char *cache, int bf16, const int32_t *table, int start, int n, int block_size, size_t row_stride,
    size_t head_offset, int nvec, float *dst) {
    for (int t = 0; t < n; t++) {
        int pos = start + t;
        size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const char *src = cache + slot * row_stride + head_offset;
        float *d = dst + (size_t)t * nvec * 8;
        if (bf16)
            for (int i = 0; i < nvec; i++) store8(d + i * 8, load8_bf16((const uint16_t *)src + i * 8));
        else
            memcpy(d, src, (size_t)nvec * 32);
    }
}

/* One (sequence, kv head): q [group][dim] (its query heads, consecutive), out [group][dim].
 * Inlined into one copy per head size, so that the loops over dim unroll and a query head's
 * accumulator stays in registers. */
static inline __attribute__((always_inline)) void attend_impl(
    const float *q, const char *k_cache, const char *v_cache, int bf16, const int32_t *table, int len,
    int block_size, int kv_heads, int kv_head, int group, float scale, float *out, const int nvec) {
    const int dim = nvec * 8;
    const size_t elem = bf16 ? 2 : 4;
    const size_t row_stride = (size_t)kv_heads * dim * elem; /* bytes from one token to the next */
    const size_t head_offset = (size_t)kv_head * dim * elem;
    float rows[CHUNK * MAX_HEAD_DIM] __attribute__((aligned(32)));
    float scores[MAX_GROUP][CHUNK] __attribute__((aligned(32)));
    v8f acc[MAX_GROUP][MAX_HEAD_DIM / 8];
    float m[MAX_GROUP], l[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        for (int i = 0; i < nvec; i++) acc[g][i] = splat(0.0f);
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int start = 0; start < len; start += CHUNK) {
        const int n = len - start < CHUNK ? len - start : CHUNK;
        gather_chunk(k_cache, bf16, table, start, n, block_size, row_stride, head_offset, nvec, rows);
        for (int g = 0; g < group; g++) {
            v8f qg[MAX_HEAD_DIM / 8];
            for (int i = 0; i < nvec; i++) qg[i] = load8(q + (size_t)g * dim + i * 8) * splat(scale);
            for (int t = 0; t < n; t++) {
                const float *k = rows + (size_t)t * dim;
                v8f s = qg[0] * load8(k);
                for (int i = 1; i < nvec; i++) s += qg[i] * load8(k + i * 8);
                scores[g][t] = hsum(s);
            }
        }
        for (int g = 0; g < group; g++) {
            float mx = m[g];
            for (int t = 0; t < n; t++) mx = scores[g][t] > mx ? scores[g][t] : mx;
            const float corr = expf(m[g] - mx); /* 0 on the first chunk (m = -inf) */
            m[g] = mx;
            const int padded = (n + 7) & ~7;
            for (int t = n; t < padded; t++) scores[g][t] = mx; /* exp'd, never used */
            for (int t = 0; t < padded; t += 8) store8(&scores[g][t], exp_nonpositive(load8(&scores[g][t]) - splat(mx)));
            float sum = 0.0f;
            for (int t = 0; t < n; t++) sum += scores[g][t];
            l[g] = l[g] * corr + sum;
            if (corr != 1.0f)
                for (int i = 0; i < nvec; i++) acc[g][i] *= splat(corr);
        }
        gather_chunk(v_cache, bf16, table, start, n, block_size, row_stride, head_offset, nvec, rows);
        for (int g = 0; g < group; g++) {
            v8f a[MAX_HEAD_DIM / 8];
            for (int i = 0; i < nvec; i++) a[i] = acc[g][i];
            for (int t = 0; t < n; t++) {
                const v8f p = splat(scores[g][t]);
                const float *v = rows + (size_t)t * dim;
                for (int i = 0; i < nvec; i++) a[i] += p * load8(v + i * 8);
            }
            for (int i = 0; i < nvec; i++) acc[g][i] = a[i];
        }
    }
    for (int g = 0; g < group; g++) {
        const v8f inv = splat(1.0f / l[g]);
        for (int i = 0; i < nvec; i++) store8(out + (size_t)g * dim + i * 8, acc[g][i] * inv);
    }
}

#define ATTEND_FOR(NVEC)                                                                                        \
    static void attend_##NVEC(const float *q, const char *kc, const char *vc, int bf16, const int32_t *table,   \
                              int len, int block_size, int kv_heads, int kv_head, int group, float scale,        \
                              float *out) {                                                                     \
        attend_impl(q, kc, vc, bf16, table, len, block_size, kv_heads, kv_head, group, scale, out, NVEC);       \
    }
ATTEND_FOR(4)  /* head_dim 32 */
ATTEND_FOR(8)  /* 64 */
ATTEND_FOR(16) /* 128 */

static void attend_any(const float *q, const char *kc, const char *vc, int bf16, const int32_t *table, int len,
                       int block_size, int kv_heads, int kv_head, int dim, int group, float scale, float *out) {
    switch (dim) {
    case 32: attend_4(q, kc, vc, bf16, table, len, block_size, kv_heads, kv_head, group, scale, out); break;
    case 64: attend_8(q, kc, vc, bf16, table, len, block_size, kv_heads, kv_head, group, scale, out); break;
    case 128: attend_16(q, kc, vc, bf16, table, len, block_size, kv_heads, kv_head, group, scale, out); break;
    default:
        attend_impl(q, kc, vc, bf16, table, len, block_size, kv_heads, kv_head, group, scale, out, dim / 8);
    }
}

static void decode_all(const float *q, const char *k_cache, const char *v_cache, int bf16, const int32_t *tables,
                       int max_blocks, const int32_t *seq_lens, int batch, int heads, int kv_heads, int dim,
                       int block_size, float scale, float *out) {
    const int group = heads / kv_heads;
    /* A row's kv heads go to one thread, one after another: the tokens' K/V rows hold every kv
     * head side by side, so the second head reads lines the first one brought into cache. Only
     * batches too small to keep the team busy split rows by kv head. */
    const int by_row = batch >= 4 * omp_get_max_threads();
    const int items = by_row ? batch : batch * kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        const int b = by_row ? it : it / kv_heads;
        const int first = by_row ? 0 : it % kv_heads, last = by_row ? kv_heads : first + 1;
        for (int h = first; h < last; h++) {
            size_t offset = ((size_t)b * heads + (size_t)h * group) * dim;
            attend_any(q + offset, k_cache, v_cache, bf16, tables + (size_t)b * max_blocks, seq_lens[b], block_size,
                       kv_heads, h, dim, group, scale, out + offset);
        }
    }
}

#ifdef X86
#pragma GCC pop_options
#endif

/* decode(q, k_cache, v_cache, tables, seq_lens, out: data pointers as ints, then
 *        kv_bf16, max_blocks, num_blocks, batch, heads, kv_heads, head_dim, block_size, scale) */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long q, kc, vc, tables, lens, out;
    int bf16, max_blocks, num_blocks, batch, heads, kv_heads, dim, block_size;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKpiiiiiiif", &q, &kc, &vc, &tables, &lens, &out, &bf16, &max_blocks,
                          &num_blocks, &batch, &heads, &kv_heads, &dim, &block_size, &scale))
        return NULL;
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP) {
        PyErr_Format(PyExc_ValueError, "heads (%d) must be a multiple of kv_heads (%d), at most %d per kv head",
                     heads, kv_heads, MAX_GROUP);
        return NULL;
    }
    if (dim <= 0 || dim % 8 || dim > MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "head_dim %d: must be a multiple of 8 up to %d", dim, MAX_HEAD_DIM);
        return NULL;
    }
    if (block_size <= 0 || batch < 0 || max_blocks < 0) {
        PyErr_Format(PyExc_ValueError, "bad sizes: block_size %d, batch %d, max_blocks %d", block_size, batch,
                     max_blocks);
        return NULL;
    }
    const int32_t *lens_p = (const int32_t *)(uintptr_t)lens;
    const int32_t *tables_p = (const int32_t *)(uintptr_t)tables;
    for (int b = 0; b < batch; b++) { /* every page the kernel will read lies inside the cache */
        int len = lens_p[b];
        if (len <= 0 || (long long)len > (long long)max_blocks * block_size) {
            PyErr_Format(PyExc_ValueError, "row %d: context length %d outside (0, %lld] (its block table)", b, len,
                         (long long)max_blocks * block_size);
            return NULL;
        }
        for (int i = 0; i < (len + block_size - 1) / block_size; i++) {
            int32_t blk = tables_p[(size_t)b * max_blocks + i];
            if (blk < 0 || blk >= num_blocks) {
                PyErr_Format(PyExc_ValueError, "row %d: block id %d outside the cache's %d blocks", b, blk,
                             num_blocks);
                return NULL;
            }
        }
    }
    Py_BEGIN_ALLOW_THREADS
    decode_all((const float *)(uintptr_t)q, (const char *)(uintptr_t)kc, (const char *)(uintptr_t)vc, bf16, tables_p,
               max_blocks, lens_p, batch, heads, kv_heads, dim, block_size, scale, (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "Paged decode attention (see cpu_attention.py, which checks the tensors)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention", NULL, -1, methods};

static AttentionApi api = {decode_all};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    PyObject *mod = simd_module_create(&module);
    if (mod != NULL && add_api_capsule(mod, &api, ATTENTION_API_NAME) < 0) Py_CLEAR(mod);
    return mod;
}
