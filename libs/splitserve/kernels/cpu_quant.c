/* y = x @ W^T for CPUs with W kept in GGUF's blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K), and the
 * two ways a model reads such a W besides: dequantized rows for a float32 GEMM over many rows (a
 * prefill chunk), and gathered rows (the token embedding). The blocks are the only copy of a
 * quantized weight a model holds (cpu_quant.py, CpuLinear).
 *
 * Q4_0, Q4_1 and Q8_0 store 32 weights a block with a float16 scale d: Q4_1 has a float16 minimum m
 * and four-bit codes (weight = d * q + m), Q4_0 four-bit codes around 8 (weight = d * (q - 8)), Q8_0
 * signed bytes (weight = d * q). The K-quants store 256 weights a super-block, with a 6- or 8-bit
 * scale (and a 6-bit min) per sub-block (cpu_quant_k.h): they are read a sub-block of 32 at a time,
 * so every loop below runs over blocks and, for the K-quants, their 8 sub-blocks.
 *
 * A float32 copy of the default model's projections is 430 MB, which a 2-core VM streams at
 * ~10 GB/s: ~40 ms a step whatever the rows, 34 ms for a single decode row. As Q4_1 blocks it is
 * 66 MB. Unpacking 32 weights costs as much as ~20 FMAs, so `linear` shares it between the rows of
 * x: up to 8 rows, each sub-block of a tile of 4 weight rows is unpacked into registers and used at
 * once by every row (`reg_tile`: 5 rows, a decode verifying 4 proposals, cost 1.9x one row instead
 * of 2.4x through an L1 tile); above, the tile is unpacked into an L1 buffer and every row of x run
 * against it (`tile`). Above ~48 rows the float32 GEMM's arithmetic wins: `dequantize` writes a
 * tile of weight rows (a few MB, reused) for it, which costs a small part of the GEMM's time.
 *
 * Layout (made at load time by cpu_quant.py from GGUF's blocks): the weight rows in tiles of 4
 * (the last one padded with zero rows), each tile's blocks in order, one *group* per (tile, block):
 *   Q4_1: float16 d[4], float16 m[4], then 4 x 16 bytes of codes (byte j: q[j] low nibble, q[j+16] high)
 *   Q4_0: float16 d[4], then 4 x 16 bytes of codes (as Q4_1)
 *   Q8_0: float16 d[4], then 4 x 32 int8 codes
 *   Q4_K, Q5_K, Q6_K: the 4 rows' super-blocks, each in GGUF's bytes (144, 176, 210), one after
 *     the other: a row's scales sit beside its codes, decoded once a super-block (`kscales`)
 * (GGUF's own float16 scales, converted to float32 exactly as a block is read): a tile is read as
 * one forward stream, and the blocks take GGUF's bytes (the default model's projections: 66 MB).
 *   x [M, K] float32 contiguous;  y [M, N] float32 contiguous;  bias [N] float32 or none
 *
 * Numerics: a Q4_1 weight is fma(q, d, m), one rounding of an exact product; Q4_0 (q - 8) * d and
 * Q8_0 q * d are exact products (the K-quants: cpu_quant_k.h): the very float32 values (signed zeros
 * included) of GGUF's reference dequantization, and so of HF transformers. Each output of `linear`
 * is a float32 dot product over K in 8 lanes, summed at the end: the order differs from a BLAS's
 * (last-bit differences) and does not depend on M or on the other rows.
 *
 * Work is split by tiles of weight rows (or by gathered rows) over the calling thread's OpenMP team
 * (torch's libgomp). The Python wrapper (cpu_quant.py) checks the tensors; this code trusts the
 * pointers it is handed, and checks only sizes and token ids.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "simd.h"
#include "kernel_api.h"

#define QBLOCK 32 /* weights per block */
#define TILE_N 4  /* weight rows unpacked together */
/* the block formats, as cpu_quant.py's KIND_CODES numbers them */
enum { KIND_Q8_0 = 0, KIND_Q4_1 = 1, KIND_Q4_0 = 2, KIND_Q4_K = 3, KIND_Q5_K = 4, KIND_Q6_K = 5, KINDS = 6 };
#define IS_K(kind) ((kind) >= KIND_Q4_K) /* super-blocks of 256 weights (cpu_quant_k.h) */
#define SUPER 256                         /* weights per K-quant super-block */
/* bytes of one row's K-quant super-block, GGUF's (cpu_quant_k.h has the layouts) */
#define K_BYTES(kind) ((kind) == KIND_Q4_K ? 144 : (kind) == KIND_Q5_K ? 176 : 210)
/* weights a block row holds, and its sub-blocks of 32 (the unit of unpacking and of x's int8 scales) */
#define BLOCK_WEIGHTS(kind) (IS_K(kind) ? SUPER : QBLOCK)
#define SUBS(kind) (BLOCK_WEIGHTS(kind) / QBLOCK)
/* float16 values one row carries in a group: d and m (Q4_1), d (Q4_0, Q8_0) */
#define ROW_HALVES(kind) ((kind) == KIND_Q4_1 ? 2 : 1)
/* bytes of one row's codes in a group: two 4-bit codes a byte, or one int8 each */
#define ROW_CODES(kind) ((kind) == KIND_Q8_0 ? QBLOCK : QBLOCK / 2)
/* bytes of one group: TILE_N scales (and mins), then TILE_N rows of codes; or TILE_N K-quant
 * super-blocks as GGUF stores them (K_BYTES, cpu_quant_k.h) */
#define GROUP_BYTES(kind) \
    (IS_K(kind) ? (size_t)TILE_N * K_BYTES(kind) : (size_t)TILE_N * (ROW_HALVES(kind) * sizeof(uint16_t) + ROW_CODES(kind)))
/* the first byte of row j's codes in a group */
#define ROW_CODES_AT(group, kind, j) ((group) + TILE_N * ROW_HALVES(kind) * sizeof(uint16_t) + (j) * ROW_CODES(kind))
#define TILE_M 3  /* rows of x run against them at once: 3 x 4 accumulators + 4 weight vectors */
#define MID_ROWS 8 /* up to this many rows of x take `reg_tile` (no L1 tile) */
/* Bytes ahead of the block being read that the few-row kernels ask the memory for (the tiles are
 * read in one forward stream a thread): a cold weight, read from memory, otherwise stalls them
 * ~2.5x (a decode step's projections, the default model on a 2-core VM: 12 ms without, 4.7 ms at
 * 8 KB, 4.5 ms with every weight in cache). A prefetch past the end faults nothing. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8192
#endif
/* ... except for a weight of this many rows or more (an LM head): a thread's share is then one long
 * stream, which the hardware's prefetchers follow alone, and the asks slowed it by ~15% (the default
 * model's Q8_0 LM head [49152 x 576] at one row, cold: 1.71-1.77 ms with them, 1.47-1.54 without) */
#ifndef PREFETCH_MAX_ROWS
#define PREFETCH_MAX_ROWS 16384
#endif
/* From this many rows of x the AMX copy runs, where the CPU has it (fewer: the AVX-512 VNNI copy,
 * 12 rows a pass). Its fixed cost is preparing the weights' tiles: the default model's 30 layers
 * with their weights cold from memory (a step) take 14.3 ms at 8 rows against VNNI's 11.7, 14.7
 * against 15.4 at 12, 19.4 against 24.1 at 16 and 27 against 41 at 32. */
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 13
#endif
/* From this many rows of x the wide copy runs where AVX-512 VNNI does and AMX does not take them
 * (cpu_quant_wide.h; its formats only) */
#ifndef WIDE_MIN_ROWS
#define WIDE_MIN_ROWS 3
#endif

#ifdef X86
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

/* The i-th float16 of a group (d[0..3], then m[0..3] for Q4_1) as float32: exact. */
static inline __attribute__((always_inline)) float group_half(const uint8_t *group, int i) {
    uint16_t h;
    memcpy(&h, group + 2 * i, sizeof h);
    return _cvtsh_ss(h);
}

/* Q4_1: the 32 weights of one block as float32, w[0] holding weights 0-7 ... w[3] 24-31. */
static inline __attribute__((always_inline)) void unpack_q4_1(const uint8_t *codes, float d, float m,
                                                             __m256 w[4]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, nib);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
}

/* Q4_0: the 32 weights (q - 8) * d of one block (an exact product, as GGUF computes it). */
static inline __attribute__((always_inline)) void unpack_q4_0(const uint8_t *codes, float d, __m256 w[4]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, nib);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256 vd = _mm256_set1_ps(d);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), eight)), vd);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), eight)), vd);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), eight)), vd);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), eight)), vd);
}

/* Q8_0: the 32 weights d * q of one block (q int8; the product is exact in float32). */
static inline __attribute__((always_inline)) void unpack_q8_0(const uint8_t *codes, float d, __m256 w[4]) {
    const __m256 vd = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * i)))),
                             vd);
}

#include "cpu_quant_k.h"

/* The scales of row j of a group as float32: d[0] (and m[0] for Q4_1), or a K-quant row's D and M
 * (kscales). Read once a block, then used for each of its sub-blocks. */
typedef struct {
    float d[16], m[8];
} BlockScales;

static inline __attribute__((always_inline)) void block_scales(const uint8_t *group, const int kind, int j,
                                                               BlockScales *sc) {
    if (IS_K(kind)) {
        kscales(group + j * K_BYTES(kind), kind, sc->d, sc->m);
        return;
    }
    sc->d[0] = group_half(group, j);
    sc->m[0] = kind == KIND_Q4_1 ? group_half(group, TILE_N + j) : 0.0f;
}

/* Row j of a group (see the layout above): its 32 weights of sub-block s (0 for the 32-weight
 * formats) as float32, GGUF's values. */
static inline __attribute__((always_inline)) void unpack(const uint8_t *group, const int kind, int j, int s,
                                                         const BlockScales *sc, __m256 w[4]) {
    if (IS_K(kind))
        kunpack(group + j * K_BYTES(kind), kind, s, sc->d, sc->m, w);
    else if (kind == KIND_Q4_1)
        unpack_q4_1(ROW_CODES_AT(group, kind, j), sc->d[0], sc->m[0], w);
    else if (kind == KIND_Q4_0)
        unpack_q4_0(ROW_CODES_AT(group, kind, j), sc->d[0], w);
    else
        unpack_q8_0(ROW_CODES_AT(group, kind, j), sc->d[0], w);
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
        for (int j = 0; j < nb; j++) y[i * ldy + j] = hsum((v8f)acc[i][j]) + (bias ? bias[j] : 0.0f);
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

/* Up to eight rows of x (decode steps, or sequences verifying their proposals): weight rows j0 ..
 * j0 + nj - 1 of the tile against rows 0 .. mb - 1 of x, each sub-block unpacked once into
 * registers and used at once by every row, no L1 tile (unpacking costs as much as ~20 FMAs: here the
 * rows share it). mb * nj accumulators (at most 12) + 4 weight vectors fit the 16 registers, and the
 * nj weight rows interleaved give both FMA units independent chains. The same single accumulator
 * per output, over k in the same order, as `tile`: a row gives the same bits on every path. */
static inline __attribute__((always_inline)) void reg_rows(const float *x, long k, const uint8_t *groups,
                                                          size_t group_bytes, const int kind, const float *bias, float *y,
                                                          long ldy, const int mb, const int nj, const int j0) {
    const long blocks = k / BLOCK_WEIGHTS(kind);
    __m256 acc[MID_ROWS][TILE_N];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nj; j++) acc[i][j] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const uint8_t *group = groups + b * group_bytes;
        _mm_prefetch((const char *)group + PREFETCH_AHEAD, _MM_HINT_T0);
        for (int j = 0; j < nj; j++) {
            BlockScales sc;
            block_scales(group, kind, j0 + j, &sc);
            for (int s = 0; s < SUBS(kind); s++) {
                __m256 w[4];
                unpack(group, kind, j0 + j, s, &sc, w);
                const float *xs = x + b * BLOCK_WEIGHTS(kind) + s * QBLOCK;
                for (int i = 0; i < mb; i++)
                    for (int v = 0; v < 4; v++)
                        acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i * k + v * 8), w[v], acc[i][j]);
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nj; j++) y[i * ldy + j0 + j] = hsum((v8f)acc[i][j]) + (bias ? bias[j0 + j] : 0.0f);
}

/* The nb (<= TILE_N) weight rows of a tile against mb (<= MID_ROWS) rows of x: in chunks of as many
 * weight rows as keep mb * chunk <= 12 accumulators, each chunk's size a constant. */
static inline __attribute__((always_inline)) void reg_tile(const float *x, long k, const uint8_t *groups,
                                                          size_t group_bytes, const int kind, const float *bias,
                                                          float *y, long ldy, int mb, int nb) {
#define REG(MB, NJ, J0) reg_rows(x, k, groups, group_bytes, kind, bias, y, ldy, MB, NJ, J0)
#define REG_CASE(MB, CHUNK)                                                                  \
    case MB:                                                                                 \
        for (int j0 = 0; j0 < nb; j0 += CHUNK) {                                             \
            const int left = nb - j0;                                                        \
            if (left >= CHUNK) REG(MB, CHUNK, j0);                                           \
            else if (left == 3) REG(MB, 3, j0);                                              \
            else if (left == 2) REG(MB, 2, j0);                                              \
            else REG(MB, 1, j0);                                                             \
        }                                                                                    \
        break;
    switch (mb) {
        REG_CASE(1, 4) REG_CASE(2, 4) REG_CASE(3, 4) REG_CASE(4, 3) REG_CASE(5, 2) REG_CASE(6, 2)
        REG_CASE(7, 1) REG_CASE(8, 1)
    }
#undef REG_CASE
#undef REG
}

/* `kind` is a constant in each caller below: the unpacking is compiled once per format, with no
 * branch on the format in the inner loops. */
static inline __attribute__((always_inline)) int linear_kind(const float *x, const uint8_t *packed, const int kind,
                                                             const float *bias, float *y, long m_rows, long n, long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N;
    const size_t group_bytes = GROUP_BYTES(kind);
    int failed = 0;
#pragma omp parallel
    {
        float *w = m_rows > MID_ROWS ? aligned_alloc(32, (size_t)TILE_N * k * sizeof(float)) : NULL;
        if (m_rows > MID_ROWS && w == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            const long n0 = t * TILE_N;
            const int nb = n - n0 < TILE_N ? (int)(n - n0) : TILE_N;
            const uint8_t *groups = packed + (size_t)t * blocks * group_bytes;
            if (m_rows <= MID_ROWS) {
                reg_tile(x, k, groups, group_bytes, kind, bias ? bias + n0 : NULL, y + n0, n, (int)m_rows, nb);
                continue;
            }
            if (w == NULL) continue;
            for (long b = 0; b < blocks; b++)
                for (int j = 0; j < nb; j++) {
                    BlockScales sc;
                    block_scales(groups + b * group_bytes, kind, j, &sc);
                    for (int s = 0; s < SUBS(kind); s++) {
                        __m256 v[4];
                        unpack(groups + b * group_bytes, kind, j, s, &sc, v);
                        float *out = w + j * k + b * BLOCK_WEIGHTS(kind) + s * QBLOCK;
                        for (int q = 0; q < 4; q++) _mm256_storeu_ps(out + q * 8, v[q]);
                    }
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

static int linear_quant(const float *x, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows,
                        long n, long k) {
    switch (kind) {
    case KIND_Q4_1: return linear_kind(x, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    case KIND_Q4_0: return linear_kind(x, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    case KIND_Q4_K: return linear_kind(x, packed, KIND_Q4_K, bias, y, m_rows, n, k);
    case KIND_Q5_K: return linear_kind(x, packed, KIND_Q5_K, bias, y, m_rows, n, k);
    case KIND_Q6_K: return linear_kind(x, packed, KIND_Q6_K, bias, y, m_rows, n, k);
    default: return linear_kind(x, packed, KIND_Q8_0, bias, y, m_rows, n, k);
    }
}

/* Weight row r (r < the padded rows) as float32 into out[k]: its tile's groups, row r % 4 of each. */
static inline __attribute__((always_inline)) void unpack_row_kind(const uint8_t *packed, const int kind, long r,
                                                                 long k, float *out) {
    const long blocks = k / BLOCK_WEIGHTS(kind);
    const size_t group_bytes = GROUP_BYTES(kind);
    const uint8_t *groups = packed + (size_t)(r / TILE_N) * blocks * group_bytes;
    for (long b = 0; b < blocks; b++) {
        BlockScales sc;
        block_scales(groups + b * group_bytes, kind, (int)(r % TILE_N), &sc);
        for (int s = 0; s < SUBS(kind); s++) {
            __m256 v[4];
            unpack(groups + b * group_bytes, kind, (int)(r % TILE_N), s, &sc, v);
            for (int q = 0; q < 4; q++) _mm256_storeu_ps(out + b * BLOCK_WEIGHTS(kind) + s * QBLOCK + q * 8, v[q]);
        }
    }
}

/* unpack_row_kind with the format a constant in each copy */
static void unpack_row(const uint8_t *packed, int kind, long r, long k, float *out) {
    switch (kind) {
    case KIND_Q4_1: unpack_row_kind(packed, KIND_Q4_1, r, k, out); break;
    case KIND_Q4_0: unpack_row_kind(packed, KIND_Q4_0, r, k, out); break;
    case KIND_Q4_K: unpack_row_kind(packed, KIND_Q4_K, r, k, out); break;
    case KIND_Q5_K: unpack_row_kind(packed, KIND_Q5_K, r, k, out); break;
    case KIND_Q6_K: unpack_row_kind(packed, KIND_Q6_K, r, k, out); break;
    default: unpack_row_kind(packed, KIND_Q8_0, r, k, out);
    }
}

/* Rows [r0, r1) of W as float32 [r1 - r0][k]: the tile a float32 GEMM then runs over many rows of x. */
static void dequantize_rows(const uint8_t *packed, int kind, long r0, long r1, long k, float *out) {
#pragma omp parallel for schedule(static)
    for (long r = r0; r < r1; r++) unpack_row(packed, kind, r, k, out + (r - r0) * k);
}

/* out[i] = W row ids[i] (the embedding lookup); every id is checked before any row is read. Returns
 * -1, or the position of the first id outside [0, n). */
static long gather_rows(const uint8_t *packed, int kind, const int64_t *ids, long count, long n, long k, float *out) {
    for (long i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return i;
#pragma omp parallel for schedule(static) if (count >= 64)
    for (long i = 0; i < count; i++) unpack_row(packed, kind, (long)ids[i], k, out + i * k);
    return -1;
}


/* ---- The int8 path: activations quantized per block, integer dot products ----
 *
 * Each row of x is quantized per block of 32 to int8 codes c with a float32 scale dx = max|x| / 127
 * (c = round(x / dx), in [-127, 127]) and s = dx * sum(c). A block's dot product with a weight row
 * is then an integer one, scaled once:
 *   Q8_0  dw * dx * sum(qw * c)
 *   Q4_0  dw * dx * sum(qw * c) - 8 * dw * s       (qw the unsigned 4-bit codes)
 *   Q4_1  dw * dx * sum(qw * c) + mw * s
 *   Q4_K, Q5_K  per sub-block of 32: D * dx * sum(qw * c) - M * s   (qw unsigned, < 16 or < 32)
 *   Q6_K  per sub-block: (D0 * dx, D1 * dx) times the sums over its two halves of (qw - 32) * c
 * The integer sums come from `maddubs` (unsigned x signed bytes to 16-bit pairs: at most
 * 2 x 128 x 127 = 32,512 for Q8_0's |w| <= 128, 2 x 32 x 127 = 8,128 for Q6_K's |qw - 32| <= 32,
 * 2 x 31 x 127 = 7,874 for Q5_K: never saturating) and `madd` with ones to int32 lanes of 4 bytes
 * each, or from one `dpbusd` on CPUs with VNNI: the same integers, so the same bits on either. The
 * weights of a tile are transposed so that a vector's lanes are its 4 columns, twice: lanes 0-3 the
 * first 16 weights of a block (a Q6_K sub-block's first scale), 4-7 the last 16
 * (cpu_quant_int8.h). Signed codes (Q8_0, Q6_K) go in as |w| and x with w's sign. Per column:
 *   - every format but Q6_K: a sub-block's two halves' integer sums are added (exact), and its
 *     float32 (that sum times (dw * dx), then the minimum's term mw * s, -8 dw * s or -M * s, each a
 *     fused multiply-add) goes into one of two chains by the sub-block's parity, even or odd; the
 *     output is (even + odd) + bias;
 *   - Q6_K: each half's sum times (its D * dx) goes into its own chain, and the output is
 *     (first + second) + bias.
 * Nothing depends on the other rows of x, so a row's output is the same alone or in any batch. On
 * CPUs with AMX, 13 rows and more take the integer sums from tile dot products and then the same
 * float arithmetic (cpu_quant_amx.h): the same bits again. (One sum a sub-block instead of one a
 * half took a 16-row step's AMX matmuls from 12-16 ms to 10-12: half the tile products, stores and
 * float arithmetic. The per-format results moved by a rounding, ~1e-7 relative.) On AVX-512 VNNI,
 * 3 rows and more of the unsigned-code formats run the wide copy (cpu_quant_wide.h): 16 weight rows
 * in a vector's lanes, the same integers and float arithmetic, the same bits once more. */

#define XQ_BLOCK_BYTES 128 /* one block of x's codes, expanded: 4 vectors of 32 bytes (cpu_quant_int8.h) */

typedef struct {
    int8_t *codes; /* [m][blocks][XQ_BLOCK_BYTES]: block codes c expanded, vector p = [c[4p..4p+3] x 4 |
                    * c[16+4p..16+4p+3] x 4] (the lanes of a transposed weight tile) */
    float *d;      /* [m][blocks] dx */
    float *s;      /* [m][blocks] dx * sum(codes of the block) */
} XQ;

/* One block of x: its codes c (byte i: weight i), *d = dx and *s = dx * sum(c) */
static inline __attribute__((always_inline)) __m256i quantize_codes(const float *x, float *d, float *s) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float mx = _mm_cvtss_f32(m4);
    const float dx = mx / 127.0f;
    const __m256 id = _mm256_set1_ps(dx != 0.0f ? 1.0f / dx : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    *d = dx;
    *s = dx * (float)_mm_cvtsi128_si32(s4);
    /* packs interleave the 128-bit lanes: bytes come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] | q0[4:8] ...;
     * the permutation puts them back in order */
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    return _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* One block of x, its codes stored expanded (XQ) */
static inline __attribute__((always_inline)) void quantize_block(const float *x, int8_t *codes, float *d, float *s) {
    const __m256i c = quantize_codes(x, d, s);
    for (int p = 0; p < 4; p++)
        _mm256_store_si256((__m256i *)codes + p,
                           _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(p, p, p, p, p + 4, p + 4, p + 4, p + 4)));
}

static void quantize_x(const float *x, long m, long k, XQ q) {
    const long blocks = k / QBLOCK;
#pragma omp parallel for schedule(static) if (m * blocks >= 4096)
    for (long r = 0; r < m; r++)
        for (long b = 0; b < blocks; b++)
            quantize_block(x + r * k + b * QBLOCK, q.codes + ((size_t)r * blocks + b) * XQ_BLOCK_BYTES, q.d + r * blocks + b,
                           q.s + r * blocks + b);
}

/* x's codes whole (32 a block, not expanded) and their scales, the same as quantize_x's: block b of
 * row r at index r * row_step + b * block_step (codes at 32 times it). In order ([m_pad][k], d and s
 * [m][blocks]: row_step = blocks, block_step = 1), rows m .. m_pad - 1 zeros: the AMX copy's operand,
 * whole A tiles; by sub-block, then row ([blocks][m][32]: row_step = 1, block_step = m = m_pad): the
 * wide copy's, a pass's rows of one sub-block side by side. */
static void quantize_x_whole(const float *x, long m, long m_pad, long k, long row_step, long block_step,
                             int8_t *codes, float *d, float *s) {
    const long blocks = k / QBLOCK;
#pragma omp parallel for schedule(static) if (m * blocks >= 4096)
    for (long r = 0; r < m; r++)
        for (long b = 0; b < blocks; b++) {
            const long at = r * row_step + b * block_step;
            _mm256_storeu_si256((__m256i *)(codes + (size_t)at * QBLOCK),
                                quantize_codes(x + r * k + b * QBLOCK, d + at, s + at));
        }
    memset(codes + (size_t)m * k, 0, (size_t)(m_pad - m) * k);
}

/* The 32 codes of weight row j of a group as bytes in x's order: 4-bit codes unsigned 0-15 (byte i:
 * code i), Q8_0 signed. */
static inline __attribute__((always_inline)) __m256i weight_codes(const uint8_t *group, const int kind, int j) {
    const uint8_t *codes = ROW_CODES_AT(group, kind, j);
    if (kind == KIND_Q8_0) return _mm256_loadu_si256((const __m256i *)codes);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i nib = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nib), _mm_and_si128(bytes, nib));
}

/* A K-quant tile's scales for one super-block, transposed: d[t][j], m[s][j] of row j (kscales) */
typedef struct {
    float d[16][4], m[8][4];
} KScales4;

static inline __attribute__((always_inline)) void kscales4(const uint8_t *group, const int kind, KScales4 *ks) {
    for (int j = 0; j < TILE_N; j++) {
        float D[16], M[8];
        kscales(group + j * K_BYTES(kind), kind, D, M);
        for (int t = 0; t < (kind == KIND_Q6_K ? 16 : 8); t++) ks->d[t][j] = D[t];
        if (kind != KIND_Q6_K)
            for (int t = 0; t < 8; t++) ks->m[t][j] = M[t];
    }
}

/* the copy of the int8 kernel for AVX2: maddubs + madd */
#define INT8_NAME(f) f##_avx2
#define INT8_DOT_ACC(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#define INT8_ROWS 8
#include "cpu_quant_int8.h"
#undef INT8_NAME
#undef INT8_DOT_ACC
#undef INT8_ROWS

#pragma GCC pop_options

/* The copies of the int8 kernel for CPUs with VNNI (one dpbusd instead of maddubs + madd: the same
 * integers), chosen at run time (`int8_variant`). */
#if __GNUC__ >= 11
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define INT8_NAME(f) f##_avx512vnni
#define INT8_DOT_ACC(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define INT8_ROWS 12
#include "cpu_quant_int8.h"
#undef INT8_NAME
#undef INT8_DOT_ACC
#undef INT8_ROWS
#include "cpu_quant_wide.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define INT8_NAME(f) f##_avxvnni
#define INT8_DOT_ACC(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#define INT8_ROWS 8
#include "cpu_quant_int8.h"
#undef INT8_NAME
#undef INT8_DOT_ACC
#undef INT8_ROWS
#pragma GCC pop_options
#define HAVE_VNNI_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")
#include "cpu_quant_amx.h"
#pragma GCC pop_options
#endif

/* Linux gives a process AMX's tile data only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM). It is
 * asked on the first call that would run the AMX copy, not at import: a process that never does (a
 * decode worker serving one stream) keeps the ordinary signal frames and context switches.
 * amx_supported: the kernel offers it (ARCH_GET_XCOMP_SUPP) on a CPU with the instructions;
 * amx_state: 0 not asked yet, 1 granted, -1 refused. */
static int amx_supported = 0;
static int amx_state = 0;

static void amx_probe(void) {
#if defined(HAVE_VNNI_COPIES) && defined(__linux__)
    __builtin_cpu_init();
    unsigned long features = 0;
    if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") &&
        syscall(SYS_arch_prctl, 0x1021 /* ARCH_GET_XCOMP_SUPP */, &features) == 0)
        amx_supported = (features >> 18) & 1; /* XFEATURE_XTILEDATA */
#endif
}

static int amx_ready(void) {
#if defined(HAVE_VNNI_COPIES) && defined(__linux__)
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state == 0) { /* asking twice (two threads at once) is harmless */
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    }
    return state == 1;
#else
    return 0;
#endif
}

/* The copies of the int8 kernel: 3 (AMX tiles for AMX_MIN_ROWS rows and more, the AVX-512 VNNI
 * copy below), 2 (AVX-512 VNNI: the wide copy from WIDE_MIN_ROWS rows of its formats, else the
 * 256-bit one), 1 (AVX-VNNI) or 0 (AVX2). Every copy gives the same bits. Whether this CPU runs copy
 * v: an AVX-512 VNNI CPU need not have AVX-VNNI (Zen 4 has not: the copy would die of SIGILL). */
static int int8_variant_runs(int v) {
    if (v == 0) return 1;
#ifdef HAVE_VNNI_COPIES
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512bw");
    if (v == 1) return __builtin_cpu_supports("avxvnni") != 0; /* AVX-VNNI: not on every AVX-512 VNNI CPU (Zen 4) */
    if (v == 2) return avx512;
    if (v == 3) return avx512 && amx_supported;
#endif
    return 0;
}

/* The copy that runs by default; `set_int8_variant` may pick another that the CPU runs */
static int int8_variant_best(void) {
    for (int v = 3; v > 0; v--)
        if (int8_variant_runs(v)) return v;
    return 0;
}

static int int8_variant = 0;

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
/* y = x @ W^T (+ bias) by the int8 path: x quantized into a buffer of this call, then the copy of
 * the kernel this CPU runs best. -1 when out of memory. */
static int linear_int8(const float *x, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows,
                       long n, long k) {
    const long blocks = k / QBLOCK;
#ifdef HAVE_VNNI_COPIES
    const int amx = int8_variant == 3 && m_rows >= AMX_MIN_ROWS && amx_ready();
    if (amx || (int8_variant >= 2 && m_rows >= WIDE_MIN_ROWS && WIDE_KIND(kind))) { /* x's codes whole */
        const long m_pad = amx ? (m_rows + AMX_M - 1) / AMX_M * AMX_M : m_rows;
        const size_t code_bytes = ((size_t)m_pad * k + 63) & ~(size_t)63;
        const size_t scale_bytes = ((size_t)m_rows * blocks * sizeof(float) + 63) & ~(size_t)63;
        char *buf = aligned_alloc(64, code_bytes + 2 * scale_bytes);
        if (buf == NULL) return -1;
        int8_t *codes = (int8_t *)buf;
        float *xd = (float *)(buf + code_bytes), *xs = (float *)(buf + code_bytes + scale_bytes);
        quantize_x_whole(x, m_rows, m_pad, k, amx ? blocks : 1, amx ? 1 : m_rows, codes, xd, xs);
        const int rc = amx ? amx_linear(codes, xd, xs, packed, kind, bias, y, m_rows, n, k)
                           : wide_linear(codes, xd, xs, packed, kind, bias, y, m_rows, n, k);
        free(buf);
        return rc;
    }
#endif
    const size_t code_bytes = (size_t)m_rows * blocks * XQ_BLOCK_BYTES;
    const size_t scale_bytes = ((size_t)m_rows * blocks * sizeof(float) + 31) & ~(size_t)31;
    char *buf = aligned_alloc(32, code_bytes + 2 * scale_bytes);
    if (buf == NULL) return -1;
    XQ q = {(int8_t *)buf, (float *)(buf + code_bytes), (float *)(buf + code_bytes + scale_bytes)};
    quantize_x(x, m_rows, k, q);
    int rc;
#ifdef HAVE_VNNI_COPIES
    if (int8_variant >= 2) rc = linear_int8_avx512vnni(q, packed, kind, bias, y, m_rows, n, k);
    else if (int8_variant == 1) rc = linear_int8_avxvnni(q, packed, kind, bias, y, m_rows, n, k);
    else
#endif
        rc = linear_int8_avx2(q, packed, kind, bias, y, m_rows, n, k);
    free(buf);
    return rc;
}

/* The quantized linear other C code calls (kernel_api.h): exact or int8 */
static int api_linear(const float *x, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows,
                      long n, long k, int int8) {
    return int8 ? linear_int8(x, packed, kind, bias, y, m_rows, n, k) : linear_quant(x, packed, kind, bias, y, m_rows, n, k);
}
#pragma GCC pop_options
#endif /* X86 */

#define PTR(v) ((void *)(uintptr_t)(v))

/* The sizes every entry point takes: a known format, n > 0 weight rows of k (whole blocks). */
static int check_sizes(const char *fn, int kind, long rows, long n, long k) {
    if (kind < 0 || kind >= KINDS || rows < 0 || n <= 0 || k <= 0 || k % BLOCK_WEIGHTS(kind)) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes: kind %d, rows %ld, n %ld, k %ld (a multiple of %d)", fn, kind,
                     rows, n, k, kind >= 0 && kind < KINDS ? BLOCK_WEIGHTS(kind) : QBLOCK);
        return -1;
    }
#ifdef X86
    return 0;
#else
    PyErr_SetString(PyExc_RuntimeError, "the quantized kernels are built for x86 (AVX2) only");
    return -1;
#endif
}

/* linear(x, packed, bias (0: none), y: data pointers as ints, kind, rows, n, k, int8) */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long x, packed, bias, y;
    int kind, int8 = 0;
    long rows, n, k;
    if (!PyArg_ParseTuple(args, "KKKKilll|p", &x, &packed, &bias, &y, &kind, &rows, &n, &k, &int8)) return NULL;
    if (check_sizes("linear", kind, rows, n, k)) return NULL;
    int rc = 0;
#ifdef X86
    Py_BEGIN_ALLOW_THREADS
    rc = api_linear(PTR(x), PTR(packed), kind, bias ? PTR(bias) : NULL, PTR(y), rows, n, k, int8);
    Py_END_ALLOW_THREADS
#endif
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequantize(packed, out: data pointers as ints, kind, r0, r1, n, k): rows [r0, r1) of W */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    unsigned long long packed, out;
    int kind;
    long r0, r1, n, k;
    if (!PyArg_ParseTuple(args, "KKillll", &packed, &out, &kind, &r0, &r1, &n, &k)) return NULL;
    if (check_sizes("dequantize", kind, r1 - r0, n, k)) return NULL;
    if (r0 < 0 || r1 > n) {
        PyErr_Format(PyExc_ValueError, "dequantize: rows [%ld, %ld) are outside the weight's %ld", r0, r1, n);
        return NULL;
    }
#ifdef X86
    Py_BEGIN_ALLOW_THREADS
    dequantize_rows(PTR(packed), kind, r0, r1, k, PTR(out));
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

/* gather(packed, ids (int64), out: data pointers as ints, kind, count, n, k) -> -1, or the position
 * of the first id outside [0, n) (then nothing is written) */
static PyObject *py_gather(PyObject *self, PyObject *args) {
    unsigned long long packed, ids, out;
    int kind;
    long count, n, k;
    if (!PyArg_ParseTuple(args, "KKKilll", &packed, &ids, &out, &kind, &count, &n, &k)) return NULL;
    if (check_sizes("gather", kind, count, n, k)) return NULL;
    long bad = -1;
#ifdef X86
    Py_BEGIN_ALLOW_THREADS
    bad = gather_rows(PTR(packed), kind, PTR(ids), count, n, k, PTR(out));
    Py_END_ALLOW_THREADS
#endif
    return PyLong_FromLong(bad);
}

/* int8_variants() -> the best copy of the int8 kernel this CPU runs (0 AVX2, 1 AVX-VNNI, 2 AVX-512 VNNI,
 * 3 AMX for many rows) */
static PyObject *py_int8_variants(PyObject *self, PyObject *noargs) {
#ifdef X86
    return PyLong_FromLong(int8_variant_best());
#else
    return PyLong_FromLong(-1);
#endif
}

/* int8_runnable() -> the copies this CPU runs, in order (an AVX-512 VNNI CPU may lack AVX-VNNI) */
static PyObject *py_int8_runnable(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
#ifdef X86
    for (int v = 0; out != NULL && v <= 3; v++) {
        if (!int8_variant_runs(v)) continue;
        PyObject *item = PyLong_FromLong(v);
        if (item == NULL || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
#endif
    return out;
}

/* set_int8_variant(v): run copy v (one int8_runnable() lists) from now on */
static PyObject *py_set_int8_variant(PyObject *self, PyObject *args) {
    int v;
    if (!PyArg_ParseTuple(args, "i", &v)) return NULL;
#ifdef X86
    if (!int8_variant_runs(v)) {
        PyErr_Format(PyExc_ValueError, "int8 variant %d: this CPU cannot run it (int8_runnable() lists those it can)",
                     v);
        return NULL;
    }
    int8_variant = v;
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "x @ W^T with W in GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K; see cpu_quant.py)."},
    {"int8_variants", py_int8_variants, METH_NOARGS, "The best int8 kernel copy this CPU runs."},
    {"int8_runnable", py_int8_runnable, METH_NOARGS, "The int8 kernel copies this CPU runs."},
    {"set_int8_variant", py_set_int8_variant, METH_VARARGS, "Selects the int8 kernel copy."},
    {"dequantize", py_dequantize, METH_VARARGS, "Rows [r0, r1) of a packed W as float32."},
    {"gather", py_gather, METH_VARARGS, "Rows ids of a packed W as float32 (the embedding lookup)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_quant", NULL, -1, methods};

#ifdef X86
static QuantApi api = {api_linear};
#endif

PyMODINIT_FUNC PyInit__cpu_quant(void) {
    PyObject *mod = simd_module_create(&module);
#ifdef X86
    if (mod != NULL) {
        amx_probe();
        int8_variant = int8_variant_best();
    }
    if (mod != NULL && add_api_capsule(mod, &api, QUANT_API_NAME) < 0) Py_CLEAR(mod);
#else
    if (mod != NULL && PyModule_AddIntConstant(mod, "supported", 0) < 0) Py_CLEAR(mod); /* x86 only */
#endif
    return mod;
}
