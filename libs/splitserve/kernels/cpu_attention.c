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
/* ql_attend (the AVX-512 copy's runs of many rows, query heads in vector lanes) */
#define QL_LANES 16
#define QL_MAX_RUN 16  /* rows of one sequence a run holds on the AVX-512 copy */
#define QL_MIN_PAIRS 8 /* (row, query head) pairs of a kv head from which a run takes ql_attend */
#define QL_KEYS 8      /* keys scored together, sharing each load of the queries' elements (4: 6% slower) */
_Static_assert(CHUNK % QL_KEYS == 0, "a chunk starts on a group of QL_KEYS keys");

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

/* a * b + c, fused (one rounding), whatever the compiler would contract */
static inline v8f fma8(v8f a, v8f b, v8f c) {
#ifdef X86
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    for (int i = 0; i < 8; i++) c[i] = fmaf(a[i], b[i], c[i]);
    return c;
#endif
}

/* One key's dot product with a query head, before its horizontal sum: qg[i] * k[8i..8i+7] summed
 * over i in 8 lanes, in this order, written out (every copy, ql_attend's too, makes the same): the
 * product of i = 1, a fused multiply-add of i = 0, then fused multiply-adds of i = 2, 3, ... */
static inline __attribute__((always_inline)) v8f key_lanes(const v8f *qg, const float *k, const int nvec) {
    if (nvec == 1) return qg[0] * load8(k);
    v8f sv = fma8(qg[0], load8(k), qg[1] * load8(k + 8));
    for (int i = 2; i < nvec; i++) sv = fma8(qg[i], load8(k + i * 8), sv);
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

/* The largest of m and s[0..n-1], scores ignoring NaN: the value `x > mx ? x : mx` over t in order
 * gives (max has no rounding: the order cannot change it; of two equal zeros either may come out, and
 * exp(s - mx) and exp(m - mx) are 1 for both), 8 lanes at a time. */
static inline float max_scores(const float *s, int n, float m) {
    int t = 0;
#ifdef X86
    if (n >= 8) {
        __m256 v = _mm256_set1_ps(m);
        for (; t + 8 <= n; t += 8) v = _mm256_max_ps(_mm256_loadu_ps(s + t), v); /* NaN in s: v kept */
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        m = _mm_cvtss_f32(h);
    }
#endif
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    return m;
}

/* *out[i] = s[i][0] + s[i][1] + ... + s[i][n[i] - 1], in that order, for `count` score rows: runs of
 * four rows of one length are added in step, so that four chains of dependent adds run at once. */
static inline void sum_rows(const float *const *s, const int *n, float *const *out, int count) {
    int i = 0;
    while (i < count) {
        if (i + 4 <= count && n[i + 1] == n[i] && n[i + 2] == n[i] && n[i + 3] == n[i]) {
            const float *s0 = s[i], *s1 = s[i + 1], *s2 = s[i + 2], *s3 = s[i + 3];
            float a = 0.0f, b = 0.0f, c = 0.0f, d = 0.0f;
            for (int t = 0; t < n[i]; t++) {
                a += s0[t];
                b += s1[t];
                c += s2[t];
                d += s3[t];
            }
            *out[i] = a, *out[i + 1] = b, *out[i + 2] = c, *out[i + 3] = d;
            i += 4;
        } else {
            float a = 0.0f;
            for (int t = 0; t < n[i]; t++) a += s[i][t];
            *out[i++] = a;
        }
    }
}

/* Copies the rows of a chunk (n tokens from position `start`, through the block table) of one kv
 * head into dst as float32, converted once, then read once per query head: [n][dim], or `paired`,
 * two keys side by side 8 floats at a time ([n / 2][dim / 8][2][8], an odd last key beside zeros),
 * as the 512-bit copy scores two keys per vector. An 8-bit row is dequantized with its scale
 * (scales: this kv head's, every kv_heads-th float). */
static inline __attribute__((always_inline)) void gather_chunk(
    const char *cache, int kind, const float *scales, int kv_heads, const int32_t *table, int start, int n,
    int block_size, size_t row_stride, size_t head_offset, int nvec, float *dst, const int paired) {
    float row[MAX_HEAD_DIM] __attribute__((aligned(32)));
    int block = start / block_size, offset = start % block_size; /* of position start + t, kept in step */
    for (int t = 0; t < n; t++, offset = offset + 1 == block_size ? (block++, 0) : offset + 1) {
        size_t slot = (size_t)table[block] * block_size + offset;
        const char *src = cache + slot * row_stride + head_offset;
        float *d = paired ? row : dst + (size_t)t * nvec * 8;
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
        if (paired) {
            float *pair = dst + (size_t)(t >> 1) * nvec * 16 + (t & 1) * 8;
            for (int i = 0; i < nvec; i++) store8(pair + i * 16, load8(row + i * 8));
        }
    }
    if (paired && (n & 1)) /* the odd last key's partner: zeros, scored and never used */
        for (int i = 0; i < nvec; i++) store8(dst + (size_t)(n >> 1) * nvec * 16 + i * 16 + 8, splat(0.0f));
}

/* The byte offset in a cache of one kv head's row at position `pos` of a sequence (its block table) */
static inline size_t cache_row(const int32_t *table, int pos, int block_size, size_t row_stride, size_t head_offset) {
    return ((size_t)table[pos / block_size] * block_size + pos % block_size) * row_stride + head_offset;
}

/* Of `left` keys from position `pos`, how many lie in pos's block */
static inline int block_keys(int pos, int left, int block_size) {
    const int in_block = block_size - pos % block_size;
    return left < in_block ? left : in_block;
}

/* Asks for the cache lines of one kv head's rows of a chunk (n tokens from position `start`) of one
 * cache (K or V) to be brought in while the chunk before it is computed: the rows lie 1-4 lines apart
 * through the block table, too scattered for the hardware prefetchers, and the gathers stalled on
 * them for a third of a multi-row run's time (perf, 16 rows over a 1K-token context). Into L2, not
 * L1 (locality 2: prefetcht1): a chunk's K and V (16 KB at head size 64) asked into L1 beside the
 * rows being computed pushed lines out before their use. 30 layers of 16 rows over 1K keys, cache
 * cold, Zen 4: 12.1-12.6 ms with L1 asks, 10.7-10.8 ms with L2 asks; one row: 5.7-6.3 against 3.8-4.2.
 * The next chunk's K is asked for as a chunk starts and its V once the chunk's scores are made, not
 * both at once (the two builds alternating in one process: 9.24 -> 9.02 and 9.33 -> 9.08 ms). */
static inline void prefetch_rows(const char *cache, const int32_t *table, int start, int n, int block_size,
                                 size_t row_stride, size_t head_offset, size_t row_bytes) {
    int block = start / block_size, offset = start % block_size;
    for (int t = 0; t < n; t++, offset = offset + 1 == block_size ? (block++, 0) : offset + 1) {
        const size_t at = ((size_t)table[block] * block_size + offset) * row_stride + head_offset;
        for (size_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(cache + at + b, 0, 2);
    }
}

/* 1: decode_all runs the AVX-512 copy (set_copy; the module starts with it where the CPU has AVX-512F
 * and DQ, its `avx512` constant, and the Python side then applies SPLITSERVE_CPU_ATTENTION_COPY) */
static int wide_copy = 0;

/* The keys of the chunk from `start` that a row attending to `len` tokens reads (none: <= 0) */
static inline int chunk_keys(int len, int start) { return len - start < CHUNK ? len - start : CHUNK; }

/* The attention of runs of rows (attend_impl, one copy per head size, attend_any), compiled twice: for
 * AVX2 + FMA (8 floats a vector) and, where the CPU has AVX-512, with 16: the same operations on
 * every float in the same order, so both copies give the same bits (decode_all picks one). */
#define WIDE 0
#define ROWS_FN(name) name##_avx2
#include "cpu_attention_rows.h"
#undef WIDE
#undef ROWS_FN
#ifdef X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#define WIDE 1
#define ROWS_FN(name) name##_avx512
#include "cpu_attention_rows.h"
#undef WIDE
#undef ROWS_FN

/* The AVX-512 copy's runs of many query rows: query heads in vector lanes.
 *
 * Attending with one query head at a time, a key's dot product runs along the head's dimension, in
 * 8 lanes that must then be summed across (hsum8), and every score, maximum, exponential and sum of
 * the softmax is made for one query at a time. Where a run holds many (row, query head) pairs of one
 * kv head (a prefill chunk, a prefix hit's new rows, a verified proposal), ql_attend puts 16 of them
 * in the 16 lanes of a vector instead: a key's element is broadcast and multiplied with 16 queries'
 * elements at once, and the softmax's maxima, exponentials and sums and the value sums are made
 * down the lanes, 16 queries an instruction, with no sum across lanes.
 *
 * The arithmetic is attend_impl's, float by float: each query's dot product keeps its 8 partial sums
 * (partial j: the products of dimensions j, j + 8, j + 16, ..., summed as key_lanes sums them) and
 * adds them as hsum does; the chunks, their maxima, the exponentials (the same polynomial), the sums,
 * the rescales (libm's expf) and the value sums come in the same order. So a row gets the same bits
 * here as alone in attend_impl, and as in the AVX2 copy. */
typedef int32_t v16i __attribute__((vector_size(64)));
EXP_NONPOSITIVE(exp_nonpositive16, v16f, v16i, splat16)

/* Partials j and j + 4 of QL_KEYS keys (rows of dim floats, `stride` floats apart from k) against the 16
 * lanes' queries (qt[d]: every lane's element d, times the softmax scale), added: pj + pj+4 for each
 * key into out. Partial pj: the product of dimension j + 8, a fused multiply-add of j, then of
 * j + 16, j + 24, ..., as key_lanes makes it. */
static inline __attribute__((always_inline)) void ql_partials(const __m512 *qt, const float *k, size_t stride,
                                                              const int nvec, const int j, __m512 *out) {
    __m512 a[QL_KEYS], b[QL_KEYS];
    for (int kk = 0; kk < QL_KEYS; kk++) {
        const float *key = k + kk * stride;
        if (nvec == 1) {
            a[kk] = _mm512_mul_ps(qt[j], _mm512_set1_ps(key[j]));
            b[kk] = _mm512_mul_ps(qt[j + 4], _mm512_set1_ps(key[j + 4]));
        } else {
            a[kk] = _mm512_fmadd_ps(qt[j], _mm512_set1_ps(key[j]),
                                    _mm512_mul_ps(qt[8 + j], _mm512_set1_ps(key[8 + j])));
            b[kk] = _mm512_fmadd_ps(qt[j + 4], _mm512_set1_ps(key[j + 4]),
                                    _mm512_mul_ps(qt[12 + j], _mm512_set1_ps(key[12 + j])));
        }
    }
    for (int i = 2; i < nvec; i++)
        for (int kk = 0; kk < QL_KEYS; kk++) {
            const float *key = k + kk * stride;
            a[kk] = _mm512_fmadd_ps(qt[8 * i + j], _mm512_set1_ps(key[8 * i + j]), a[kk]);
            b[kk] = _mm512_fmadd_ps(qt[8 * i + j + 4], _mm512_set1_ps(key[8 * i + j + 4]), b[kk]);
        }
    for (int kk = 0; kk < QL_KEYS; kk++) out[kk] = _mm512_add_ps(a[kk], b[kk]);
}

/* The keys' scores, lane by lane ((p0 + p4) + (p1 + p5)) + ((p2 + p6) + (p3 + p7)), as hsum adds them */
static inline __attribute__((always_inline)) void ql_scores(const __m512 *qt, const float *k, size_t stride,
                                                            const int nvec, __m512 *s) {
    __m512 p0[QL_KEYS], p1[QL_KEYS], p2[QL_KEYS], p3[QL_KEYS];
    ql_partials(qt, k, stride, nvec, 0, p0);
    ql_partials(qt, k, stride, nvec, 1, p1);
    for (int kk = 0; kk < QL_KEYS; kk++) p0[kk] = _mm512_add_ps(p0[kk], p1[kk]);
    ql_partials(qt, k, stride, nvec, 2, p2);
    ql_partials(qt, k, stride, nvec, 3, p3);
    for (int kk = 0; kk < QL_KEYS; kk++) s[kk] = _mm512_add_ps(p0[kk], _mm512_add_ps(p2[kk], p3[kk]));
}

/* acc[d0 .. d0 + W - 1] += p[t] * v[t][d] for n keys in order (v: rows `stride` floats apart, from
 * element d0), each lane only for the keys its row reaches (n_lane of them; every lane of the group
 * reaches the first `full` keys) */
#define QL_VALUES(W)                                                                                        \
    static inline __attribute__((always_inline)) void ql_values_##W(__m512 *acc, const __m512 *p,         \
                                                                    const float *v, size_t stride, int n, \
                                                                    int full, __m512i n_lane) {           \
        __m512 a[W];                                                                                        \
        for (int i = 0; i < W; i++) a[i] = acc[i];                                                          \
        int t = 0;                                                                                          \
        for (; t < full; t++, v += stride)                                                                  \
            for (int i = 0; i < W; i++) a[i] = _mm512_fmadd_ps(p[t], _mm512_set1_ps(v[i]), a[i]);           \
        for (; t < n; t++, v += stride) {                                                                   \
            const __mmask16 reach = _mm512_cmpgt_epi32_mask(n_lane, _mm512_set1_epi32(t));                  \
            for (int i = 0; i < W; i++) a[i] = _mm512_mask3_fmadd_ps(p[t], _mm512_set1_ps(v[i]), a[i], reach); \
        }                                                                                                   \
        for (int i = 0; i < W; i++) acc[i] = a[i];                                                          \
    }
QL_VALUES(16)
QL_VALUES(8)
#undef QL_VALUES

/* A chunk's scores (n keys, rows [n rounded up to QL_KEYS][dim]) and its value sums (acc, with the
 * softmax's weights p): functions of their own, the scores of each QL_KEYS keys a call of a copy per
 * head size, so that the compiler allocates each loop's registers apart and addresses a key's
 * elements as constant offsets from its row's pointer (inlined into one body, it kept accumulators
 * and addresses in memory). */
#define QL_SCORES_FOR(NVEC)                                                                       \
    static __attribute__((noinline)) void ql_scores_##NVEC(const __m512 *qt, const float *k, size_t stride, \
                                                           __m512 *s) {                                     \
        ql_scores(qt, k, stride, NVEC, s);                                                                  \
    }
QL_SCORES_FOR(4)
QL_SCORES_FOR(8)
QL_SCORES_FOR(16)
#undef QL_SCORES_FOR

/* The scores of n keys (n a multiple of QL_KEYS; rows `stride` floats apart) */
static void ql_scores_run(const __m512 *qt, const float *rows, size_t stride, int nvec, int n, __m512 *s) {
    const size_t step = (size_t)QL_KEYS * stride;
    for (int t = 0; t < n; t += QL_KEYS, rows += step, s += QL_KEYS)
        switch (nvec) {
        case 4: ql_scores_4(qt, rows, stride, s); break;
        case 8: ql_scores_8(qt, rows, stride, s); break;
        case 16: ql_scores_16(qt, rows, stride, s); break;
        default: ql_scores(qt, rows, stride, nvec, s);
        }
}

static __attribute__((noinline)) void ql_values_run(__m512 *acc, const __m512 *p, const float *rows, size_t stride,
                                                    int dim, int n, int full, __m512i n_lane) {
    int d = 0;
    for (; d + 16 <= dim; d += 16) ql_values_16(acc + d, p, rows + d, stride, n, full, n_lane);
    if (d < dim) ql_values_8(acc + d, p, rows + d, stride, n, full, n_lane);
}

/* One chunk's softmax step for the 16 lanes, as attend_impl makes it for each row: the chunk's
 * scores s[0 .. n - 1] (a lane's first n_lane of them its row's; every lane of the group reaches the
 * first `full`) become exp(s - the new maximum) in place; m and l, the lanes' running maxima and sums,
 * move on (in the lanes `active`, those whose rows reach the chunk), *corr gets exp(old m - new m),
 * and the lanes whose value sums must be rescaled by it are returned. Not inlined: in the kernel's
 * body the compiler kept the running maximum in memory, a store and a load per key. */
static __attribute__((noinline)) __mmask16 ql_softmax(__m512 *s, int n, int full, __m512i n_lane, __mmask16 active,
                                                      __m512 *m_io, __m512 *l_io, __m512 *corr_out) {
    const __m512 m = *m_io;
    __m512 mx = m;
    int t = 0;
    for (; t < full; t++) mx = _mm512_max_ps(s[t], mx); /* `s > mx ? s : mx` (a NaN score: mx) */
    for (; t < n; t++) /* past `full`, a lane's own keys only */
        mx = _mm512_mask_max_ps(mx, _mm512_cmpgt_epi32_mask(n_lane, _mm512_set1_epi32(t)), s[t], mx);
    /* corr = expf(m - mx), libm's, per lane where that is not expf(+-0) = 1 */
    const __m512 diff = _mm512_sub_ps(m, mx);
    const __mmask16 moved = _mm512_mask_cmp_ps_mask(active, diff, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    __m512 corr = _mm512_set1_ps(1.0f);
    if (moved) {
        float dv[QL_LANES] __attribute__((aligned(64))), cv[QL_LANES] __attribute__((aligned(64)));
        _mm512_store_ps(dv, diff);
        _mm512_store_ps(cv, corr);
        for (int lane = 0; lane < QL_LANES; lane++)
            if (moved >> lane & 1) cv[lane] = expf(dv[lane]);
        corr = _mm512_load_ps(cv);
    }
    *m_io = _mm512_mask_mov_ps(m, active, mx);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t < full; t++) {
        s[t] = (__m512)exp_nonpositive16((v16f)_mm512_sub_ps(s[t], mx));
        sum = _mm512_add_ps(sum, s[t]);
    }
    for (; t < n; t++) {
        s[t] = (__m512)exp_nonpositive16((v16f)_mm512_sub_ps(s[t], mx));
        sum = _mm512_mask_add_ps(sum, _mm512_cmpgt_epi32_mask(n_lane, _mm512_set1_epi32(t)), sum, s[t]);
    }
    *l_io = _mm512_mask_mov_ps(*l_io, active, _mm512_fmadd_ps(*l_io, corr, sum));
    *corr_out = corr;
    return _mm512_mask_cmp_ps_mask(active, corr, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
}

/* Pairs first .. first + lanes - 1 (lanes <= 16) of a run of nrows rows and one kv head: pair p is
 * row p / group's query head p % group of the kv head (q and out: the run's first row's first query
 * head of kv_head, rows q_stride apart), rows attending to len0 + row tokens; the rest as attend_impl. */
static inline __attribute__((always_inline)) void ql_attend_impl(
    const float *q, size_t q_stride, const char *k_cache, const char *v_cache, int kind, const float *k_scales,
    const float *v_scales, const int32_t *table, int len0, int first, int lanes, int block_size, int kv_heads,
    int kv_head, int group, float scale, float *out, const int nvec) {
    const int dim = nvec * 8;
    const size_t elem = kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1;
    const size_t row_stride = (size_t)kv_heads * dim * elem, head_offset = (size_t)kv_head * dim * elem;
    /* a float32 cache's rows are scored and summed where they lie (stride floats apart within a
     * block), not copied first: the copy took as long as the scores (perf, 16 rows over 1K keys);
     * a block then holds whole groups of QL_KEYS keys, as chunks start at multiples of CHUNK */
    const int direct = kind == KV_F32 && block_size % QL_KEYS == 0;
    const size_t stride = (size_t)kv_heads * dim;
    if (k_scales != NULL) {
        k_scales += kv_head;
        v_scales += kv_head;
    }
    __m512 qt[MAX_HEAD_DIM], acc[MAX_HEAD_DIM], s[CHUNK + QL_KEYS];
    float rows[(CHUNK + QL_KEYS) * MAX_HEAD_DIM] __attribute__((aligned(64))); /* a chunk's K or V */
    float lane_q[QL_LANES][MAX_HEAD_DIM] __attribute__((aligned(64)));
    int32_t lens[QL_LANES]; /* pairs go row by row: lane 0 holds the group's shortest row, lanes - 1 its longest */
    { /* the first chunk's K and V, asked for while the queries are laid out (0.1 ms of a hit's 9) */
        const int n0 = chunk_keys(len0 + (first + lanes - 1) / group, 0);
        prefetch_rows(k_cache, table, 0, n0, block_size, row_stride, head_offset, (size_t)dim * elem);
        prefetch_rows(v_cache, table, 0, n0, block_size, row_stride, head_offset, (size_t)dim * elem);
    }
    for (int lane = 0; lane < QL_LANES; lane++) {
        const int p = first + lane, r = p / group, g = p % group;
        lens[lane] = lane < lanes ? len0 + r : 0;
        for (int d = 0; d < dim; d++) /* q times the scale, as attend_impl's qg */
            lane_q[lane][d] = lane < lanes ? q[(size_t)r * q_stride + (size_t)g * dim + d] * scale : 0.0f;
    }
    for (int d = 0; d < dim; d++) {
        float col[QL_LANES] __attribute__((aligned(64)));
        for (int lane = 0; lane < QL_LANES; lane++) col[lane] = lane_q[lane][d];
        qt[d] = _mm512_load_ps(col);
        acc[d] = _mm512_setzero_ps();
    }
    const __m512i len_v = _mm512_loadu_si512(lens);
    const int len_max = lens[lanes - 1];
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps(), corr;
    for (int start = 0; start < len_max; start += CHUNK) {
        const int n = chunk_keys(len_max, start);
        const int next_n = start + CHUNK < len_max ? chunk_keys(len_max, start + CHUNK) : 0;
        if (next_n) prefetch_rows(k_cache, table, start + CHUNK, next_n, block_size, row_stride, head_offset, (size_t)dim * elem);
        const __m512i n_lane = _mm512_sub_epi32(len_v, _mm512_set1_epi32(start));
        const __mmask16 active = _mm512_cmpgt_epi32_mask(n_lane, _mm512_setzero_si512());
        /* the keys every lane of the group reaches: lane 0's (lanes past `lanes` hold nothing to keep) */
        const int full = chunk_keys(lens[0], start) > 0 ? chunk_keys(lens[0], start) : 0;
        if (direct) { /* float32 rows read where they lie, a block's keys at a time */
            for (int t = 0, seg; t < n; t += seg) {
                seg = block_keys(start + t, n - t, block_size);
                const float *row = (const float *)(k_cache + cache_row(table, start + t, block_size, row_stride, head_offset));
                const int whole = seg / QL_KEYS * QL_KEYS;
                ql_scores_run(qt, row, stride, nvec, whole, s + t);
                if (whole < seg) { /* the run's last keys (a chunk's end): copied, up to QL_KEYS with zeros */
                    memset(rows, 0, (size_t)QL_KEYS * dim * sizeof(float));
                    for (int r = whole; r < seg; r++)
                        memcpy(rows + (size_t)(r - whole) * dim, row + (size_t)r * stride, (size_t)dim * sizeof(float));
                    ql_scores_run(qt, rows, dim, nvec, QL_KEYS, s + t + whole);
                }
            }
        } else {
            /* the chunk's K rows as float32, one after another (as gathered for attend_impl), up to a
             * multiple of QL_KEYS with zeros (scored, never used) */
            gather_chunk(k_cache, kind, k_scales, kv_heads, table, start, n, block_size, row_stride, head_offset, nvec,
                         rows, 0);
            for (int t = n; t < (n + QL_KEYS - 1) / QL_KEYS * QL_KEYS; t++)
                memset(rows + (size_t)t * dim, 0, (size_t)dim * sizeof(float));
            ql_scores_run(qt, rows, dim, nvec, (n + QL_KEYS - 1) / QL_KEYS * QL_KEYS, s);
        }
        if (next_n) prefetch_rows(v_cache, table, start + CHUNK, next_n, block_size, row_stride, head_offset, (size_t)dim * elem);
        const __mmask16 rescale = ql_softmax(s, n, full, n_lane, active, &m, &l, &corr);
        if (rescale)
            for (int d = 0; d < dim; d++) acc[d] = _mm512_mask_mul_ps(acc[d], rescale, acc[d], corr);
        if (direct) {
            for (int t = 0, seg; t < n; t += seg) {
                seg = block_keys(start + t, n - t, block_size);
                const float *row = (const float *)(v_cache + cache_row(table, start + t, block_size, row_stride, head_offset));
                const int seg_full = full - t < 0 ? 0 : full - t < seg ? full - t : seg;
                ql_values_run(acc, s + t, row, stride, dim, seg, seg_full,
                              _mm512_sub_epi32(n_lane, _mm512_set1_epi32(t)));
            }
        } else {
            gather_chunk(v_cache, kind, v_scales, kv_heads, table, start, n, block_size, row_stride, head_offset, nvec,
                         rows, 0);
            ql_values_run(acc, s, rows, dim, dim, n, full, n_lane);
        }
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l);
    for (int d = 0; d < dim; d++) {
        float col[QL_LANES] __attribute__((aligned(64)));
        _mm512_store_ps(col, _mm512_mul_ps(acc[d], inv));
        for (int lane = 0; lane < lanes; lane++) lane_q[lane][d] = col[lane];
    }
    for (int lane = 0; lane < lanes; lane++) {
        const int p = first + lane, r = p / group, g = p % group;
        memcpy(out + (size_t)r * q_stride + (size_t)g * dim, lane_q[lane], (size_t)dim * sizeof(float));
    }
}

/* one copy per head size, as attend_any's */
#define QL_ARGS                                                                                                    \
    const float *q, size_t q_stride, const char *kc, const char *vc, int kind, const float *ks, const float *vs, \
        const int32_t *table, int len0, int first, int lanes, int block_size, int kv_heads, int kv_head, int group, \
        float scale, float *out
#define QL_PASS \
    q, q_stride, kc, vc, kind, ks, vs, table, len0, first, lanes, block_size, kv_heads, kv_head, group, scale, out
#define QL_FOR(NVEC) \
    static void ql_attend_##NVEC(QL_ARGS) { ql_attend_impl(QL_PASS, NVEC); }
QL_FOR(4)
QL_FOR(8)
QL_FOR(16)
#undef QL_FOR

static void ql_attend(QL_ARGS, int dim) {
    switch (dim) {
    case 32: ql_attend_4(QL_PASS); break;
    case 64: ql_attend_8(QL_PASS); break;
    case 128: ql_attend_16(QL_PASS); break;
    default: ql_attend_impl(QL_PASS, dim / 8);
    }
}
#pragma GCC pop_options
#endif

/* Whether a run of nrows rows takes ql_attend: the AVX-512 copy, where it holds enough (row, query
 * head) pairs per kv head to fill its lanes well, and always beyond what attend_impl takes */
static inline int lanes_run(int nrows, int group) {
#ifdef X86
    return wide_copy && (nrows * group >= QL_MIN_PAIRS || nrows > MAX_RUN);
#else
    return 0;
#endif
}

static void decode_all(const float *q, const char *k_cache, const char *v_cache, int kind, const float *k_scales,
                       const float *v_scales, const int32_t *tables, int max_blocks, const int32_t *seq_lens,
                       int batch, int heads, int kv_heads, int dim, int block_size, float scale, float *out) {
    const int group = heads / kv_heads;
#ifdef X86
    const int max_run = wide_copy ? QL_MAX_RUN : MAX_RUN;
#else
    const int max_run = MAX_RUN;
#endif
    /* Runs of rows of one sequence at consecutive positions (the same table, lengths one apart: a
     * prefill chunk, a verified proposal), at most max_run a run, share their gathered keys. */
    int starts[batch + 1];
    int runs = 0;
    for (int b = 0; b < batch; b++) {
        const int joins = b > 0 && b - starts[runs - 1] < max_run && seq_lens[b] == seq_lens[b - 1] + 1 &&
                          memcmp(tables + (size_t)b * max_blocks, tables + (size_t)(b - 1) * max_blocks,
                                 (size_t)max_blocks * sizeof(int32_t)) == 0;
        if (!joins) starts[runs++] = b;
    }
    starts[runs] = batch;
    /* The work items, numbered run by run (first_item[run]): a run in lanes, one item per kv head and
     * 16 of its (row, query head) pairs; else one per kv head, or per run where runs are many: a
     * run's kv heads go to one thread, one after another (the tokens' K/V rows hold every kv head side
     * by side, so the second head reads lines the first one brought into cache). */
    int first_item[runs + 1];
    int plain_runs = 0;
    for (int run = 0; run < runs; run++) plain_runs += !lanes_run(starts[run + 1] - starts[run], group);
    const int by_run = plain_runs >= 4 * omp_get_max_threads();
    first_item[0] = 0;
    for (int run = 0; run < runs; run++) {
        const int nrows = starts[run + 1] - starts[run];
        const int per_head = lanes_run(nrows, group) ? (nrows * group + QL_LANES - 1) / QL_LANES : 0;
        first_item[run + 1] = first_item[run] + (per_head ? per_head * kv_heads : by_run ? 1 : kv_heads);
    }
    const int items = first_item[runs];
    const size_t q_stride = (size_t)heads * dim;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        int lo = 0, hi = runs - 1; /* the run whose items hold it */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (first_item[mid] <= it) lo = mid;
            else hi = mid - 1;
        }
        const int run = lo, k = it - first_item[run];
        const int b = starts[run], nrows = starts[run + 1] - b;
        if (lanes_run(nrows, group)) {
#ifdef X86
            const int per_head = (nrows * group + QL_LANES - 1) / QL_LANES, h = k / per_head;
            const int first = (k % per_head) * QL_LANES, pairs = nrows * group;
            const size_t offset = (size_t)b * q_stride + (size_t)h * group * dim;
            ql_attend(q + offset, q_stride, k_cache, v_cache, kind, k_scales, v_scales, tables + (size_t)b * max_blocks,
                      seq_lens[b], first, pairs - first < QL_LANES ? pairs - first : QL_LANES, block_size, kv_heads, h,
                      group, scale, out + offset, dim);
#endif
            continue;
        }
        const int first = by_run ? 0 : k, last = by_run ? kv_heads : first + 1;
        for (int h = first; h < last; h++) {
            size_t offset = (size_t)b * q_stride + (size_t)h * group * dim;
#ifdef X86
            if (wide_copy)
                attend_any_avx512(q + offset, q_stride, k_cache, v_cache, kind, k_scales, v_scales,
                                  tables + (size_t)b * max_blocks, seq_lens[b], nrows, block_size, kv_heads, h, group,
                                  scale, out + offset, dim);
            else
#endif
                attend_any_avx2(q + offset, q_stride, k_cache, v_cache, kind, k_scales, v_scales,
                                tables + (size_t)b * max_blocks, seq_lens[b], nrows, block_size, kv_heads, h, group,
                                scale, out + offset, dim);
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

static int wide_supported(void) {
#ifdef X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

/* set_copy(wide): 1 runs the AVX-512 copy (ValueError where the CPU lacks it), 0 the AVX2 one */
static PyObject *py_set_copy(PyObject *self, PyObject *args) {
    int wide;
    if (!PyArg_ParseTuple(args, "p", &wide)) return NULL;
    if (wide && !wide_supported()) {
        PyErr_SetString(PyExc_ValueError, "this CPU has no AVX-512 (F and DQ): only the avx2 copy runs here");
        return NULL;
    }
    wide_copy = wide;
    Py_RETURN_NONE;
}

static PyObject *py_get_copy(PyObject *self, PyObject *args) { return PyUnicode_FromString(wide_copy ? "avx512" : "avx2"); }

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "Paged decode attention (see cpu_attention.py, which checks the tensors)."},
    {"set_copy", py_set_copy, METH_VARARGS, "Runs the AVX-512 copy (True) or the AVX2 one (False); the same bits."},
    {"copy", py_get_copy, METH_NOARGS, "The copy decode runs: 'avx512' or 'avx2'."},
    {"write_kv", py_write_kv, METH_VARARGS, "New K/V rows into an 8-bit cache, quantized (cpu_attention.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention", NULL, -1, methods};

static AttentionApi api = {decode_all, write_rows_8bit};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    wide_copy = wide_supported();
    PyObject *mod = simd_module_create(&module);
    if (mod != NULL && (PyModule_AddIntConstant(mod, "avx512", wide_copy) < 0 ||
                        add_api_capsule(mod, &api, ATTENTION_API_NAME) < 0))
        Py_CLEAR(mod);
    return mod;
}
