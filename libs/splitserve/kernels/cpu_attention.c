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
 *   k/v cache  [num_blocks, block_size, kv_heads, head_dim] float32, bfloat16, int8 or fp8 e4m3fn, contiguous
 *   k/v scales [num_blocks, block_size, kv_heads] float32, an 8-bit cache's (one per token and kv head)
 *   tables     [B, max_blocks] int32 (padded; only the first ceil(len / block_size) are read)
 *   seq_lens   [B] int32, context length including the new token (its K/V already written)
 *   out        [B, heads, head_dim] float32, contiguous
 * Query head h attends with kv head h / (heads / kv_heads), as in HF's repeat_kv. An 8-bit cache's rows
 * are dequantized as they are gathered (float(q) * scale, the float32 product kv_quant.dequantize
 * makes), so the kernel attends over the very floats the torch path reads; `write_rows_8bit` stores
 * new rows as kv_quant.quantize does, bit for bit (the module's flags hold no -ffast-math: the
 * divisions and roundings below are IEEE ones).
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
#define MAX_RUN 8         /* query rows of one sequence that share a gathered chunk */

#include "simd.h"
#include "kernel_api.h"
#ifdef X86
#include <immintrin.h>
#endif

#ifdef X86
/* The kernel is compiled for AVX2 + FMA; the module says whether this CPU has them (`supported`)
 * and the Python side falls back to the torch path where it does not. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

/* 8 bytes widened to 8 int32 lanes, sign- or zero-extended (vpmovsxbd / vpmovzxbd on x86: the generic
 * vector conversion of an 8-byte vector compiles to byte-by-byte inserts there). */
static inline v8i widen8_i8(const void *p) {
#ifdef X86
    return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    int8_t b __attribute__((vector_size(8)));
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, v8i);
#endif
}

static inline v8i widen8_u8(const void *p) {
#ifdef X86
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    uint8_t b __attribute__((vector_size(8)));
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, v8i);
#endif
}

/* 8 fp8 e4m3fn bytes as float32, exactly. A normal byte's exponent and mantissa move into place
 * (exponent bias 7 -> 127: + 120); a subnormal one (exponent 0) is its mantissa times 2^-9; the
 * magnitude 0x7f is NaN. No float32 subnormal is formed (no slow path, and no reliance on the
 * denormals mode). */
static inline v8f fp8_to_float8(const void *p) {
    const v8i b = widen8_u8(p);
    const v8i mag = b & 0x7f;
    const v8i normal = (mag << 20) + (120 << 23);
    const v8i sub = (v8i)(__builtin_convertvector(mag, v8f) * splat(0x1p-9f));
    const v8i is_sub = mag < 8, is_nan = mag == 0x7f;
    v8i r = (normal & ~is_sub) | (sub & is_sub);
    r = (r & ~is_nan) | (0x7fc00000 & is_nan);
    return (v8f)(r | ((b & 0x80) << 24));
}

/* 16 fp8 bytes times sc into d [16], the same floats as fp8_to_float8 (x86): every e4m3fn value
 * is a bfloat16 one, so a normal byte becomes its bfloat16 bits in 16-bit lanes (16 bytes an
 * instruction, not 8) and then float32 by a shift; 16 bytes holding a subnormal, zero or NaN take
 * fp8_to_float8. */
static inline void fp8x16_scaled(const uint8_t *src, v8f sc, float *d) {
#ifdef X86
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src));
    const __m256i mag = _mm256_and_si256(w, _mm256_set1_epi16(0x7f));
    const __m256i odd = _mm256_or_si256(_mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag),
                                        _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)));
    if (_mm256_testz_si256(odd, odd)) {
        __m256i h = _mm256_add_epi16(_mm256_slli_epi16(mag, 4), _mm256_set1_epi16(120 << 7));
        h = _mm256_or_si256(h, _mm256_and_si256(_mm256_slli_epi16(w, 8), _mm256_set1_epi16((short)0x8000)));
        const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16);
        const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16);
        store8(d, (v8f)lo * sc);
        store8(d + 8, (v8f)hi * sc);
        return;
    }
#endif
    store8(d, fp8_to_float8(src) * sc);
    store8(d + 8, fp8_to_float8(src + 8) * sc);
}

/* f (|f| <= 448, kv_quant clamps first) to e4m3fn, rounded to nearest, ties to even. Below 2^-6 the
 * steps are 2^-9: rintf(|f| * 2^9) (an exact scaling) counts them, and 8 of them is the smallest
 * normal, whose byte is 8 too. Above, the float32 mantissa's top 3 bits stay: adding 2^19 - 1 plus
 * the kept lowest bit rounds the 20 dropped ones half to even (a carry bumps the exponent), and the
 * exponent is rebased from 127 to 7. */
static inline uint8_t fp8_from_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    bits &= 0x7fffffffu;
    float a;
    memcpy(&a, &bits, sizeof a);
    if (a != a) return sign | 0x7f;
    if (a < 0x1p-6f) return sign | (uint8_t)rintf(a * 512.0f);
    bits += 0x7ffffu + ((bits >> 20) & 1u);
    return sign | (uint8_t)((bits >> 20) - (120u << 3));
}

/* One kv head's row x [dim] into values [dim] and *scale as kv_quant.quantize makes them: the
 * float32 amax (a NaN spreads, as the quiet NaN 0x7fc00000 whatever its payload, as torch's amax
 * gives it), scale = amax / QMAX, q = x / scale (divided, not multiplied by a reciprocal), then
 * int8: rintf (half to even) clamped to +-127; fp8: clamped to +-448 and rounded to e4m3fn. A zero
 * (or NaN) scale stores zeros. */
static void quantize_row(const float *x, int dim, int kind, uint8_t *values, float *scale) {
    float amax = 0.0f;
    for (int d = 0; d < dim; d++) {
        const float a = fabsf(x[d]);
        amax = (a > amax || a != a) ? a : amax;
    }
    if (amax != amax) amax = NAN;
    const float s = amax / (kind == KV_INT8 ? 127.0f : 448.0f);
    *scale = s;
    if (!(s > 0.0f)) {
        memset(values, 0, (size_t)dim);
        return;
    }
    for (int d = 0; d < dim; d++) {
        float q = x[d] / s;
        if (kind == KV_INT8) {
            q = rintf(q);
            q = q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q;
            values[d] = q == q ? (uint8_t)(int8_t)q : 0;
        } else {
            q = q < -448.0f ? -448.0f : q > 448.0f ? 448.0f : q;
            values[d] = fp8_from_float(q);
        }
    }
}

/* See kernel_api.h: row r's kv head h goes to values[slot][h][:] and scales[slot][h]. */
static void write_rows_8bit(const float *src, long src_stride, const int64_t *slots, long m, int kv_heads, int dim,
                            int kind, uint8_t *values, float *scales) {
    const long items = m * kv_heads;
#pragma omp parallel for schedule(static) if (items >= 256)
    for (long it = 0; it < items; it++) {
        const long r = it / kv_heads, h = it % kv_heads;
        const size_t at = (size_t)slots[r] * kv_heads + h;
        quantize_row(src + r * src_stride + h * dim, dim, kind, values + at * dim, scales + at);
    }
}

static inline v8f load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8i wide = __builtin_convertvector(h, v8i) << 16; /* bf16 is the top half of a float32 */
    return (v8f)wide;
}

/* One key's dot product with a query head, before its horizontal sum: qg[i] * k[8i..8i+7] summed
 * over i in 8 lanes (a product, then fused multiply-adds in order) */
static inline __attribute__((always_inline)) v8f key_lanes(const v8f *qg, const float *k, const int nvec) {
    v8f sv = qg[0] * load8(k);
    for (int i = 1; i < nvec; i++) sv += qg[i] * load8(k + i * 8);
    return sv;
}

/* hsum of each of v[0..7] (lane j of the result: hsum(v[j])), the very additions hsum makes in the
 * same order, for 8 vectors at once: the 128-bit halves added pairwise (v0 + v4, v1 + v5, ...), then
 * two horizontal adds ((v0 + v4) + (v1 + v5) and (v2 + v6) + (v3 + v7), then their sum), then the
 * lanes put back in order. */
static inline v8f hsum8(const v8f v[8]) {
#ifdef X86
    __m256 h[4];
    for (int p = 0; p < 4; p++) {
        const __m256 a = (__m256)v[2 * p], b = (__m256)v[2 * p + 1];
        h[p] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    /* h[p] = [v(2p) lo + hi | v(2p+1) lo + hi]; after two hadds: [s0 s2 s4 s6 | s1 s3 s5 s7] */
    const __m256 w = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return (v8f)_mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#else
    v8f out;
    for (int j = 0; j < 8; j++) out[j] = hsum(v[j]);
    return out;
#endif
}

/* Copies the rows of a chunk (n tokens from position `start`, through the block table) of one kv
 * head into dst [n][dim] as float32: contiguous, converted once, then read once per query head.
 * An 8-bit row is dequantized with its scale (scales: this kv head's, every kv_heads-th float). */
static inline __attribute__((always_inline)) void gather_chunk(
    const char *cache, int kind, const float *scales, int kv_heads, const int32_t *table, int start, int n,
    int block_size, size_t row_stride, size_t head_offset, int nvec, float *dst) {
    for (int t = 0; t < n; t++) {
        int pos = start + t;
        size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const char *src = cache + slot * row_stride + head_offset;
        float *d = dst + (size_t)t * nvec * 8;
        if (kind == KV_F32) {
            memcpy(d, src, (size_t)nvec * 32);
        } else if (kind == KV_BF16) {
            for (int i = 0; i < nvec; i++) store8(d + i * 8, load8_bf16((const uint16_t *)src + i * 8));
        } else if (kind == KV_INT8) { /* float(q) * scale: kv_quant.dequantize's float32 product */
            const v8f sc = splat(scales[slot * kv_heads]);
            for (int i = 0; i < nvec; i++) store8(d + i * 8, __builtin_convertvector(widen8_i8(src + i * 8), v8f) * sc);
        } else {
            const v8f sc = splat(scales[slot * kv_heads]);
            int i = 0;
            for (; i + 2 <= nvec; i += 2) fp8x16_scaled((const uint8_t *)src + i * 8, sc, d + i * 8);
            if (i < nvec) store8(d + i * 8, fp8_to_float8(src + i * 8) * sc);
        }
    }
}

/* The keys of the chunk from `start` that a row attending to `len` tokens reads (none: <= 0) */
static inline int chunk_keys(int len, int start) { return len - start < CHUNK ? len - start : CHUNK; }

/* One kv head of `nrows` query rows of one sequence, at consecutive positions (row r attends to
 * len0 + r tokens: a decode row, or the rows of a prefill chunk or of a verified proposal, each up to
 * its own position): row r's q [group][dim] (its query heads, consecutive) at q + r * q_stride, its
 * out likewise. A chunk of keys and values is gathered once for all the rows; each row's arithmetic
 * is the one a row alone gets (the same chunks, scores, softmax and sums in the same order), so a
 * row's output does not depend on the rows beside it. Inlined into one copy per head size, so that
 * the loops over dim unroll and a query head's accumulator stays in registers. */
static inline __attribute__((always_inline)) void attend_impl(
    const float *q, size_t q_stride, const char *k_cache, const char *v_cache, int kind, const float *k_scales,
    const float *v_scales, const int32_t *table, int len0, int nrows, int block_size, int kv_heads, int kv_head,
    int group, float scale, float *out, const int nvec) {
    const int dim = nvec * 8;
    const size_t elem = kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1;
    const size_t row_stride = (size_t)kv_heads * dim * elem; /* bytes from one token to the next */
    const size_t head_offset = (size_t)kv_head * dim * elem;
    if (k_scales != NULL) { /* from here on: this kv head's */
        k_scales += kv_head;
        v_scales += kv_head;
    }
    float rows[CHUNK * MAX_HEAD_DIM] __attribute__((aligned(32)));
    float scores[MAX_RUN][MAX_GROUP][CHUNK] __attribute__((aligned(32)));
    v8f acc[MAX_RUN][MAX_GROUP][MAX_HEAD_DIM / 8]; /* 128 KB of stack at most; what is used: nrows x group x nvec */
    float m[MAX_RUN][MAX_GROUP], l[MAX_RUN][MAX_GROUP];
    for (int r = 0; r < nrows; r++)
        for (int g = 0; g < group; g++) {
            for (int i = 0; i < nvec; i++) acc[r][g][i] = splat(0.0f);
            m[r][g] = -INFINITY;
            l[r][g] = 0.0f;
        }
    const int len_max = len0 + nrows - 1;
    for (int start = 0; start < len_max; start += CHUNK) {
        const int n_max = chunk_keys(len_max, start);
        gather_chunk(k_cache, kind, k_scales, kv_heads, table, start, n_max, block_size, row_stride, head_offset,
                     nvec, rows);
        for (int r = 0; r < nrows; r++) {
            const int n = chunk_keys(len0 + r, start);
            if (n <= 0) continue;
            const float *qr = q + (size_t)r * q_stride;
            for (int g = 0; g < group; g++) {
                v8f qg[MAX_HEAD_DIM / 8];
                for (int i = 0; i < nvec; i++) qg[i] = load8(qr + (size_t)g * dim + i * 8) * splat(scale);
                int t = 0;
                for (; t + 8 <= n; t += 8) { /* 8 keys' lane sums, then their 8 hsums at once */
                    v8f sv[8];
                    for (int j = 0; j < 8; j++) sv[j] = key_lanes(qg, rows + (size_t)(t + j) * dim, nvec);
                    store8(&scores[r][g][t], hsum8(sv));
                }
                for (; t < n; t++) scores[r][g][t] = hsum(key_lanes(qg, rows + (size_t)t * dim, nvec));
            }
            for (int g = 0; g < group; g++) {
                float mx = m[r][g];
                for (int t = 0; t < n; t++) mx = scores[r][g][t] > mx ? scores[r][g][t] : mx;
                const float corr = expf(m[r][g] - mx); /* 0 on the first chunk (m = -inf) */
                m[r][g] = mx;
                const int padded = (n + 7) & ~7;
                for (int t = n; t < padded; t++) scores[r][g][t] = mx; /* exp'd, never used */
                for (int t = 0; t < padded; t += 8)
                    store8(&scores[r][g][t], exp_nonpositive(load8(&scores[r][g][t]) - splat(mx)));
                float sum = 0.0f;
                for (int t = 0; t < n; t++) sum += scores[r][g][t];
                l[r][g] = l[r][g] * corr + sum;
                if (corr != 1.0f)
                    for (int i = 0; i < nvec; i++) acc[r][g][i] *= splat(corr);
            }
        }
        gather_chunk(v_cache, kind, v_scales, kv_heads, table, start, n_max, block_size, row_stride, head_offset,
                     nvec, rows);
        for (int r = 0; r < nrows; r++) {
            const int n = chunk_keys(len0 + r, start);
            if (n <= 0) continue;
            for (int g = 0; g < group; g++) {
                v8f a[MAX_HEAD_DIM / 8];
                for (int i = 0; i < nvec; i++) a[i] = acc[r][g][i];
                for (int t = 0; t < n; t++) {
                    const v8f p = splat(scores[r][g][t]);
                    const float *v = rows + (size_t)t * dim;
                    for (int i = 0; i < nvec; i++) a[i] += p * load8(v + i * 8);
                }
                for (int i = 0; i < nvec; i++) acc[r][g][i] = a[i];
            }
        }
    }
    for (int r = 0; r < nrows; r++)
        for (int g = 0; g < group; g++) {
            const v8f inv = splat(1.0f / l[r][g]);
            for (int i = 0; i < nvec; i++) store8(out + (size_t)r * q_stride + (size_t)g * dim + i * 8, acc[r][g][i] * inv);
        }
}

#define ATTEND_ARGS                                                                                               \
    const float *q, size_t q_stride, const char *kc, const char *vc, int kind, const float *ks, const float *vs, \
        const int32_t *table, int len0, int nrows, int block_size, int kv_heads, int kv_head, int group, float scale, \
        float *out
#define ATTEND_PASS q, q_stride, kc, vc, kind, ks, vs, table, len0, nrows, block_size, kv_heads, kv_head, group, scale, out
/* one copy per head size, and within it one for a single row (a decode: fixed-size arrays) */
#define ATTEND_FOR(NVEC)                                                                                 \
    static void attend_##NVEC(ATTEND_ARGS) {                                                             \
        if (nrows == 1)                                                                                  \
            attend_impl(q, q_stride, kc, vc, kind, ks, vs, table, len0, 1, block_size, kv_heads, kv_head, \
                        group, scale, out, NVEC);                                                        \
        else                                                                                             \
            attend_impl(ATTEND_PASS, NVEC);                                                              \
    }
ATTEND_FOR(4)  /* head_dim 32 */
ATTEND_FOR(8)  /* 64 */
ATTEND_FOR(16) /* 128 */

static void attend_any(ATTEND_ARGS, int dim) {
    switch (dim) {
    case 32: attend_4(ATTEND_PASS); break;
    case 64: attend_8(ATTEND_PASS); break;
    case 128: attend_16(ATTEND_PASS); break;
    default: attend_impl(ATTEND_PASS, dim / 8);
    }
}

static void decode_all(const float *q, const char *k_cache, const char *v_cache, int kind, const float *k_scales,
                       const float *v_scales, const int32_t *tables, int max_blocks, const int32_t *seq_lens,
                       int batch, int heads, int kv_heads, int dim, int block_size, float scale, float *out) {
    const int group = heads / kv_heads;
    /* Runs of rows of one sequence at consecutive positions (the same table, lengths one apart: a
     * prefill chunk, a verified proposal), at most MAX_RUN a run, share their gathered keys. */
    int starts[batch + 1];
    int runs = 0;
    for (int b = 0; b < batch; b++) {
        const int joins = b > 0 && b - starts[runs - 1] < MAX_RUN && seq_lens[b] == seq_lens[b - 1] + 1 &&
                          memcmp(tables + (size_t)b * max_blocks, tables + (size_t)(b - 1) * max_blocks,
                                 (size_t)max_blocks * sizeof(int32_t)) == 0;
        if (!joins) starts[runs++] = b;
    }
    starts[runs] = batch;
    /* A run's kv heads go to one thread, one after another: the tokens' K/V rows hold every kv
     * head side by side, so the second head reads lines the first one brought into cache. Only
     * too few runs to keep the team busy split by kv head. */
    const int by_run = runs >= 4 * omp_get_max_threads();
    const int items = by_run ? runs : runs * kv_heads;
    const size_t q_stride = (size_t)heads * dim;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        const int run = by_run ? it : it / kv_heads;
        const int b = starts[run], nrows = starts[run + 1] - b;
        const int first = by_run ? 0 : it % kv_heads, last = by_run ? kv_heads : first + 1;
        for (int h = first; h < last; h++) {
            size_t offset = (size_t)b * q_stride + (size_t)h * group * dim;
            attend_any(q + offset, q_stride, k_cache, v_cache, kind, k_scales, v_scales, tables + (size_t)b * max_blocks,
                       seq_lens[b], nrows, block_size, kv_heads, h, group, scale, out + offset, dim);
        }
    }
}

#ifdef X86
#pragma GCC pop_options
#endif

/* decode(q, k_cache, v_cache, k_scales, v_scales, tables, seq_lens, out: data pointers as ints (the
 *        scales 0 unless 8-bit), then kind (KV_*), max_blocks, num_blocks, batch, heads, kv_heads,
 *        head_dim, block_size, scale) */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long q, kc, vc, ks, vs, tables, lens, out;
    int kind, max_blocks, num_blocks, batch, heads, kv_heads, dim, block_size;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKKKiiiiiiiif", &q, &kc, &vc, &ks, &vs, &tables, &lens, &out, &kind,
                          &max_blocks, &num_blocks, &batch, &heads, &kv_heads, &dim, &block_size, &scale))
        return NULL;
    if (kind < KV_F32 || kind > KV_FP8 || (kind >= KV_INT8) != (ks != 0 && vs != 0)) {
        PyErr_Format(PyExc_ValueError, "cache kind %d: 0-3, with scales exactly for the 8-bit ones (2, 3)", kind);
        return NULL;
    }
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
    decode_all((const float *)(uintptr_t)q, (const char *)(uintptr_t)kc, (const char *)(uintptr_t)vc, kind,
               (const float *)(uintptr_t)ks, (const float *)(uintptr_t)vs, tables_p, max_blocks, lens_p, batch, heads,
               kv_heads, dim, block_size, scale, (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* write_kv(k, v, k_cache, v_cache, k_scales, v_scales, slots: data pointers as ints, then rows,
 *          num_slots, kv_heads, head_dim, kind): k and v [rows][kv_heads][head_dim] float32, slots
 *          int64; every slot is checked to lie inside the cache first */
static PyObject *py_write_kv(PyObject *self, PyObject *args) {
    unsigned long long k, v, kc, vc, ks, vs, slots;
    long rows, num_slots;
    int kv_heads, dim, kind;
    if (!PyArg_ParseTuple(args, "KKKKKKKlliii", &k, &v, &kc, &vc, &ks, &vs, &slots, &rows, &num_slots, &kv_heads,
                          &dim, &kind))
        return NULL;
    if ((kind != KV_INT8 && kind != KV_FP8) || rows < 0 || kv_heads <= 0 || dim <= 0) {
        PyErr_Format(PyExc_ValueError, "write_kv: cache kind %d (2 int8, 3 fp8), %ld rows, %d kv heads, head_dim %d",
                     kind, rows, kv_heads, dim);
        return NULL;
    }
    const int64_t *slots_p = (const int64_t *)(uintptr_t)slots;
    for (long r = 0; r < rows; r++)
        if (slots_p[r] < 0 || slots_p[r] >= num_slots) {
            PyErr_Format(PyExc_ValueError, "row %ld: slot %lld outside the cache's %ld slots", r,
                         (long long)slots_p[r], num_slots);
            return NULL;
        }
    const long stride = (long)kv_heads * dim;
    Py_BEGIN_ALLOW_THREADS
    write_rows_8bit((const float *)(uintptr_t)k, stride, slots_p, rows, kv_heads, dim, kind, (uint8_t *)(uintptr_t)kc,
                    (float *)(uintptr_t)ks);
    write_rows_8bit((const float *)(uintptr_t)v, stride, slots_p, rows, kv_heads, dim, kind, (uint8_t *)(uintptr_t)vc,
                    (float *)(uintptr_t)vs);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "Paged decode attention (see cpu_attention.py, which checks the tensors)."},
    {"write_kv", py_write_kv, METH_VARARGS, "New K/V rows into an 8-bit cache, quantized (cpu_attention.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention", NULL, -1, methods};

static AttentionApi api = {decode_all, write_rows_8bit};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    PyObject *mod = simd_module_create(&module);
    if (mod != NULL && add_api_capsule(mod, &api, ATTENTION_API_NAME) < 0) Py_CLEAR(mod);
    return mod;
}
