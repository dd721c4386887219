/* Tiles of a Hugging Face quantized checkpoint's weights (GPTQ, AWQ, FP8) dequantized to float32,
 * for `packed_quant.PackedLinear`'s GEMM; the layouts are described in packed_quant.py. The packed
 * tensors are the model's only copy of those weights; a tile is written into a reused buffer.
 *
 *   gptq_tile  out [K, n1 - n0] = W^T[:, n0:n1]: q unpacked along the input dim of qweight
 *              [K * bits / 32, N], zeros along the output dim of qzeros [G, N * bits / 32]
 *   awq_tile   the same from AWQ's qweight [K, N / 8] and qzeros [G, N / 8] (interleaved nibbles)
 *   fp8_tile   out [n1 - n0, K] = W[n0:n1]: float8_e4m3fn bytes times a scale per tensor, per row
 *              or per (bn x bk) block
 *
 * Numerics: a weight is (float)(q - zero) * scale (an integer of at most 9 bits, exact in float, times
 * the float32 scale: one rounding, exact for float16 scales) or e4m3 value * scale (one rounding), the
 * same float32 numbers as the torch reference in packed_quant.py. Scales arrive as float32 (widened at
 * load: 1 / group_size of a float copy). Rows are split over the OpenMP team of the calling thread
 * (torch's libgomp) when a tile is large enough to pay for its wake-up.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#ifdef X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define PARALLEL_WEIGHTS (1L << 16) /* smaller tiles run on the calling thread alone */
#define PTR(type, v) ((type *)(uintptr_t)(v))

static const int AWQ_SHIFT[8] = {0, 16, 4, 20, 8, 24, 12, 28}; /* bit offset of column j of a word */
static float E4M3[256];                                         /* every float8_e4m3fn byte's value */

static void build_e4m3(void) {
    for (int b = 0; b < 256; b++) {
        int exp = (b >> 3) & 15, man = b & 7;
        float v = exp == 0 ? ldexpf((float)man, -9) : ldexpf((float)(8 + man), exp - 10);
        if (exp == 15 && man == 7) v = NAN;
        E4M3[b] = (b & 0x80) ? -v : v;
    }
}

/* zero (float) of each group and tile column: stored value + offset, unpacked along the output dim */
static void unpack_zeros(const int32_t *qz, long zcols, int bits, int per, long groups, long n0, long n, int offset,
                         int awq, float *zf) {
    uint32_t mask = (1u << bits) - 1;
    for (long g = 0; g < groups; g++) {
        for (long j = 0; j < n; j++) {
            long c = n0 + j;
            int shift = awq ? AWQ_SHIFT[c % 8] : (int)(c % per) * bits;
            uint32_t word = (uint32_t)qz[g * zcols + c / per];
            zf[g * n + j] = (float)(int)(((word >> shift) & mask) + offset);
        }
    }
}

static void gptq_rows(const int32_t *qw, const float *zf, const float *sf, const int64_t *g_idx, float *out, int bits,
                      long k, long N, long n0, long n, long group_size) {
    int per = 32 / bits;
    uint32_t mask = (1u << bits) - 1;
    long nt = k * n >= PARALLEL_WEIGHTS ? omp_get_max_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < k; r++) {
        long g = g_idx ? g_idx[r] : r / group_size;
        const uint32_t *words = (const uint32_t *)qw + (r / per) * N + n0;
        int shift = (int)(r % per) * bits;
        const float *z = zf + g * n, *s = sf + g * n;
        float *o = out + r * n;
        for (long j = 0; j < n; j++) o[j] = ((float)(int)((words[j] >> shift) & mask) - z[j]) * s[j];
    }
}

static void awq_rows(const int32_t *qw, const float *zf, const float *sf, float *out, long k, long N, long n0, long n,
                     long group_size) {
    long nt = k * n >= PARALLEL_WEIGHTS ? omp_get_max_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < k; r++) {
        long g = r / group_size;
        const uint32_t *words = (const uint32_t *)qw + r * (N / 8);
        const float *z = zf + g * n, *s = sf + g * n;
        float *o = out + r * n;
        for (long j = 0; j < n; j++) {
            long c = n0 + j;
            o[j] = ((float)(int)((words[c / 8] >> AWQ_SHIFT[c % 8]) & 15u) - z[j]) * s[j];
        }
    }
}

#ifdef X86
#pragma GCC pop_options
#endif

/* gptq_tile / awq_tile(qweight, qzeros, scales f32 [G, N], g_idx int64 [K] or 0, out, bits, K, N, n0, n1,
 * groups, group_size, zero_offset, awq) */
static PyObject *py_group_tile(PyObject *self, PyObject *args) {
    unsigned long long qw, qz, sc, gi, out;
    int bits, offset, awq;
    long k, N, n0, n1, groups, group_size;
    if (!PyArg_ParseTuple(args, "KKKKKillllllii", &qw, &qz, &sc, &gi, &out, &bits, &k, &N, &n0, &n1, &groups,
                          &group_size, &offset, &awq))
        return NULL;
    int per = 32 / (awq ? 4 : (bits > 0 ? bits : 1));
    if ((bits != 2 && bits != 4 && bits != 8) || (awq && bits != 4) || k <= 0 || N <= 0 || N % per || n0 < 0 ||
        n0 % 32 || n1 <= n0 || n1 > N || groups <= 0 || group_size <= 0) {
        PyErr_Format(PyExc_ValueError, "group_tile: bad sizes: bits %d, K %ld, N %ld, columns [%ld, %ld), groups %ld",
                     bits, k, N, n0, n1, groups);
        return NULL;
    }
    long n = n1 - n0;
    float *zf = malloc(sizeof(float) * groups * n * 2);
    if (zf == NULL) return PyErr_NoMemory();
    float *sf = zf + groups * n;
    Py_BEGIN_ALLOW_THREADS
    unpack_zeros(PTR(int32_t, qz), awq ? N / 8 : N / per, bits, per, groups, n0, n, offset, awq, zf);
    for (long g = 0; g < groups; g++)
        for (long j = 0; j < n; j++) sf[g * n + j] = PTR(float, sc)[g * N + n0 + j];
    if (awq)
        awq_rows(PTR(int32_t, qw), zf, sf, PTR(float, out), k, N, n0, n, group_size);
    else
        gptq_rows(PTR(int32_t, qw), zf, sf, gi ? PTR(int64_t, gi) : NULL, PTR(float, out), bits, k, N, n0, n,
                  group_size);
    Py_END_ALLOW_THREADS
    free(zf);
    Py_RETURN_NONE;
}

/* fp8_tile(weight uint8 [N, K], scale f32, out [n1 - n0, K], K, n0, n1, scale_rows (1: per tensor), bn, bk):
 * scale [scale_rows, 1] with bn = bk = 0, or the [ceil(N / bn), K / bk] block grid */
static PyObject *py_fp8_tile(PyObject *self, PyObject *args) {
    unsigned long long w, sc, out;
    long k, n0, n1, scale_rows, bn, bk;
    if (!PyArg_ParseTuple(args, "KKKllllll", &w, &sc, &out, &k, &n0, &n1, &scale_rows, &bn, &bk)) return NULL;
    if (k <= 0 || n0 < 0 || n1 <= n0 || (bn > 0 && (bk <= 0 || k % bk))) {
        PyErr_Format(PyExc_ValueError, "fp8_tile: bad sizes: K %ld, rows [%ld, %ld), block %ldx%ld", k, n0, n1, bn, bk);
        return NULL;
    }
    const uint8_t *wb = PTR(uint8_t, w);
    const float *s = PTR(float, sc);
    float *o = PTR(float, out);
    long nt = (n1 - n0) * k >= PARALLEL_WEIGHTS ? omp_get_max_threads() : 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = n0; r < n1; r++) {
        const uint8_t *src = wb + r * k;
        float *dst = o + (r - n0) * k;
        if (bn > 0) {
            const float *row = s + (r / bn) * (k / bk);
            for (long c = 0; c < k; c++) dst[c] = E4M3[src[c]] * row[c / bk];
        } else {
            float f = s[scale_rows == 1 ? 0 : r];
            for (long c = 0; c < k; c++) dst[c] = E4M3[src[c]] * f;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"group_tile", py_group_tile, METH_VARARGS, "A GPTQ or AWQ tile of W^T as float32 (see packed_quant.py)."},
    {"fp8_tile", py_fp8_tile, METH_VARARGS, "An FP8 tile of W's rows as float32 (see packed_quant.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed_quant", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packed_quant(void) {
    build_e4m3();
    return simd_module_create(&module);
}
