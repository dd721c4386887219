/* y = x @ W^T for CPUs with W kept in GGUF's blocks (Q4_1 or Q8_0): the projections and LM head of
 * a quantized model at the row counts of decoding and prefix hits (1-48 rows), where a float32 GEMM
 * is bound by reading its weights.
 *
 * Both formats store 32 weights a block with a float16 scale d: Q4_1 has a float16 minimum m and
 * four-bit codes (weight = d * q + m), Q8_0 signed bytes (weight = d * q). A float32 copy of the
 * default model's projections is 430 MB, which a 2-core VM streams at ~10 GB/s: ~40 ms a step
 * whatever the rows, 34 ms for a single decode row. As Q4_1 blocks it is 80 MB. This kernel turns a
 * tile of 4 weight rows back into float32 in an L1 buffer, then runs every row of x against it: the
 * arithmetic per weight grows with the rows, the unpacking does not.
 *
 * Layout (made at load time by cpu_quant.py from GGUF's blocks):
 *   codes   Q4_1: [N, K / 2] uint8, per block of 32, byte j holds q[j] (low nibble) and q[j + 16] (high)
 *           Q8_0: [N, K] int8
 *   scales  [N, K / 32] float32 (d, converted exactly from float16)
 *   mins    [N, K / 32] float32 (m; Q4_1 only)
 *   x       [M, K] float32 contiguous;  y [M, N] float32 contiguous;  bias [N] float32 or none
 *
 * Numerics: a Q4_1 weight is fma(q, d, m), one rounding of an exact product, and a Q8_0 weight d * q
 * (exact): the very float32 values of GGUF's reference dequantization, and so of HF transformers and
 * of the model's float32 copy. Each output is a float32 dot product over K in 8 lanes, summed at the
 * end: the order differs from a BLAS's (last-bit differences) and does not depend on M or on the
 * other rows.
 *
 * Work is split by tiles of output features over the calling thread's OpenMP team (torch's libgomp).
 * The Python wrapper (cpu_quant.py) checks the tensors; this code trusts the pointers it is handed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QBLOCK 32 /* weights per block */
#define TILE_N 4  /* weight rows unpacked together */
#define TILE_M 3  /* rows of x run against them at once: 3 x 4 accumulators + 4 weight vectors */

#ifdef X86
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* Q4_1: the 32 weights of one block, as float32, into dst[0..31]. */
static inline void unpack_block(const uint8_t *codes, float d, float m, float *dst) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, nib);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm));
    _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm));
    _mm256_storeu_ps(dst + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm));
    _mm256_storeu_ps(dst + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm));
}

/* Q8_0: the 32 weights d * q of one block (q int8; the product is exact in float32). */
static inline void unpack_block_q8_0(const uint8_t *codes, float d, float *dst) {
    const __m256 vd = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++) {
        const __m128i q = _mm_loadl_epi64((const __m128i *)(codes + 8 * i));
        _mm256_storeu_ps(dst + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd));
    }
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[i][j] = dot(x row i, w row j) (+ bias[j]) for i < mb, j < nb; w [nb][k] float32 (the L1 tile). */
static inline __attribute__((always_inline)) void tile(const float *x, long ldx, const float *w, long k,
                                                      const float *bias, float *y, long ldy, const int mb,
                                                      const int nb) {
    __m256 acc[TILE_M][TILE_N];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = _mm256_setzero_ps();
    for (long p = 0; p < k; p += 8) {
        __m256 wv[TILE_N];
        for (int j = 0; j < nb; j++) wv[j] = _mm256_loadu_ps(w + j * k + p);
        for (int i = 0; i < mb; i++) {
            const __m256 xv = _mm256_loadu_ps(x + i * ldx + p);
            for (int j = 0; j < nb; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) y[i * ldy + j] = hsum256(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

#define TILE_CASE(MB, NB) \
    case (MB) * 8 + (NB): tile(x, ldx, w, k, bias, y, ldy, MB, NB); break;

static void tile_any(const float *x, long ldx, const float *w, long k, const float *bias, float *y, long ldy,
                     int mb, int nb) {
    switch (mb * 8 + nb) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3) TILE_CASE(2, 4)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 3) TILE_CASE(3, 4)
    }
}

/* mins == NULL: Q8_0 codes (k bytes a row), else Q4_1 (k / 2 bytes a row). */
static int linear_quant(const float *x, const uint8_t *codes, const float *scales, const float *mins,
                        const float *bias, float *y, long m_rows, long n, long k) {
    const long blocks = k / QBLOCK, tiles = (n + TILE_N - 1) / TILE_N;
    int failed = 0;
#pragma omp parallel
    {
        float *w = aligned_alloc(32, (size_t)TILE_N * k * sizeof(float));
        if (w == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            if (w == NULL) continue;
            const long n0 = t * TILE_N;
            const int nb = n - n0 < TILE_N ? (int)(n - n0) : TILE_N;
            for (int j = 0; j < nb; j++) {
                const long row = n0 + j;
                if (mins)
                    for (long b = 0; b < blocks; b++)
                        unpack_block(codes + (row * blocks + b) * (QBLOCK / 2), scales[row * blocks + b],
                                     mins[row * blocks + b], w + j * k + b * QBLOCK);
                else
                    for (long b = 0; b < blocks; b++)
                        unpack_block_q8_0(codes + (row * blocks + b) * QBLOCK, scales[row * blocks + b],
                                          w + j * k + b * QBLOCK);
            }
            for (long i0 = 0; i0 < m_rows; i0 += TILE_M) {
                const int mb = m_rows - i0 < TILE_M ? (int)(m_rows - i0) : TILE_M;
                tile_any(x + i0 * k, k, w, k, bias ? bias + n0 : NULL, y + i0 * n + n0, n, mb, nb);
            }
        }
        free(w);
    }
    return failed ? -1 : 0;
}

#pragma GCC pop_options
#endif /* X86 */

#define PTR(v) ((void *)(uintptr_t)(v))

/* linear(x, codes, scales, mins (0: Q8_0, else Q4_1), bias (0: none), y: data pointers as ints,
 *        rows, n, k) */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long x, codes, scales, mins, bias, y;
    long rows, n, k;
    if (!PyArg_ParseTuple(args, "KKKKKKlll", &x, &codes, &scales, &mins, &bias, &y, &rows, &n, &k)) return NULL;
    if (rows < 0 || n <= 0 || k <= 0 || k % QBLOCK) {
        PyErr_Format(PyExc_ValueError, "linear: bad sizes: rows %ld, n %ld, k %ld (a multiple of %d)", rows, n,
                     k, QBLOCK);
        return NULL;
    }
#ifdef X86
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = linear_quant(PTR(x), PTR(codes), PTR(scales), mins ? PTR(mins) : NULL, bias ? PTR(bias) : NULL, PTR(y),
                      rows, n, k);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "the quantized linear kernel is built for x86 (AVX2) only");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "x @ W^T with W in Q4_1 or Q8_0 blocks (see cpu_quant.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_quant", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_quant(void) {
    PyObject *mod = simd_module_create(&module);
#ifndef X86
    if (mod != NULL && PyModule_AddIntConstant(mod, "supported", 0) < 0) Py_CLEAR(mod); /* x86 only */
#endif
    return mod;
}
