/* The int8 kernel of cpu_quant.c for 3 rows of x and more on AVX-512 VNNI (where AMX does not take
 * them: from AMX_MIN_ROWS on a CPU with it): 16 weight rows in the lanes of a 512-bit vector, each 4
 * bytes of x broadcast against them.
 *
 * The 256-bit copy (cpu_quant_int8.h) holds 4 weight rows in a vector and x's codes expanded to
 * match (each 4 bytes repeated in 4 lanes): a sub-block of one row of x against one tile is 8 dot
 * products of 32 multiplies, 8 loads of x and ~12 shuffles and float operations, for 4 outputs.
 * Here a vector's 16 int32 lanes are 16 weight rows (4 packed tiles, one "wide tile"), so the same
 * sub-block is 8 dot products of 64 multiplies, each against 4 bytes of x broadcast (x's codes by
 * sub-block, then row: quantize_x_whole), and the float work after them is spread over 16 outputs:
 * ~4 operations a sub-block and row instead of ~12 for 4. The default model's four projections x
 * 30 layers, 16 rows, on a 2-core Zen 4: 17.4 -> 9.1 ms (docs/performance.md, session 15).
 *
 * The weights of a wide tile are prepared once a call into a thread's buffer (`wide_prep`: Q4_0 and
 * Q4_1 straight from the packed bytes, the K-quants and a last wide tile of fewer than 4 packed
 * tiles through the 256-bit copy's `prep` of each packed tile, its lanes moved into place), then
 * every row of x runs against them, up to WIDE_ROWS rows a pass: per row, one int32 vector of a
 * sub-block's sums and the two float chains (even and odd sub-blocks) stay in registers. The
 * passes ask for the next wide tile's blocks, each its share, spread over its sub-blocks.
 *
 * Numerics: the integer sums are exact, so their order is free; each float operation is the 256-bit
 * copy's, in the same order per output (per sub-block: fma(float(isum), d * dx, chain), then
 * fma(m, dx * sum(x), chain) for the formats with a minimum; at the end (even + odd) + bias, or +
 * 0.0f): a row gives the same bits here as on every other path and copy. Formats whose codes are
 * unsigned (Q4_0, Q4_1, Q4_K, Q5_K) run here; the signed ones (Q8_0, Q6_K) would need x to take
 * each weight's sign lane by lane, which a broadcast operand cannot, and keep the 256-bit copy. */

#define WIDE_N 16   /* weight rows of a wide tile: 4 packed tiles of TILE_N */
#define WIDE_ROWS 8 /* rows of x a pass: 8 sums + 16 chains + a weight vector and scales in 32 registers */

#define WIDE_KIND(kind) ((kind) == KIND_Q4_1 || (kind) == KIND_Q4_0 || (kind) == KIND_Q4_K || (kind) == KIND_Q5_K)

/* One sub-block of a wide tile: u[p] lane c = weight row c's codes 4p .. 4p + 3; d, m lane c = the
 * row's scale and minimum coefficient (the 256-bit prep's, lane for lane) */
typedef struct {
    __m512i u[8];
    __m512 d, m;
} WidePrep;

/* Q4_0 / Q4_1, a wide tile of 4 whole packed tiles: block b's 16 rows of 16 code bytes (4 x 64
 * bytes, a packed tile's rows one after the other: dword 4j + v of tile a = row j's bytes 4v ..
 * 4v + 3) transposed by dwords into 4 vectors (lane 4a + j), whose low nibbles are codes 4v ..
 * 4v + 3 and high nibbles codes 16 + 4v ..; the float16 scales (and mins) of the 16 rows
 * converted as the 256-bit prep converts them. */
static inline __attribute__((always_inline)) void wide_prep_q4(const uint8_t *groups, long blocks, size_t group_bytes,
                                                               const int kind, WidePrep *wp) {
    const size_t tile_bytes = (size_t)blocks * group_bytes;
    const size_t codes_at = (size_t)TILE_N * ROW_HALVES(kind) * sizeof(uint16_t);
    /* [tile a col v, tile a+1 col v] for v = 0, 1 (lo) and 2, 3 (hi): dword i of a row of 4 rows */
    const __m512i lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i hi = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (long b = 0; b < blocks; b++) {
        const uint8_t *g0 = groups + b * group_bytes;
        __m512i z[4];
        for (int a = 0; a < 4; a++) z[a] = _mm512_loadu_si512(g0 + a * tile_bytes + codes_at);
        const __m512i a01 = _mm512_permutex2var_epi32(z[0], lo, z[1]), b01 = _mm512_permutex2var_epi32(z[0], hi, z[1]);
        const __m512i a23 = _mm512_permutex2var_epi32(z[2], lo, z[3]), b23 = _mm512_permutex2var_epi32(z[2], hi, z[3]);
        const __m512i t[4] = {_mm512_shuffle_i64x2(a01, a23, 0x44), _mm512_shuffle_i64x2(a01, a23, 0xEE),
                              _mm512_shuffle_i64x2(b01, b23, 0x44), _mm512_shuffle_i64x2(b01, b23, 0xEE)};
        WidePrep *w = wp + b;
        for (int v = 0; v < 4; v++) {
            _mm512_store_si512(&w->u[v], _mm512_and_si512(t[v], nib));
            _mm512_store_si512(&w->u[v + 4], _mm512_and_si512(_mm512_srli_epi16(t[v], 4), nib));
        }
        __m256i d16 = _mm256_setzero_si256(), m16 = _mm256_setzero_si256();
        for (int a = 0; a < 4; a++) {
            const uint8_t *g = g0 + a * tile_bytes;
            d16 = _mm256_mask_loadu_epi16(d16, (__mmask16)(0xF << (4 * a)), (const uint16_t *)g - 4 * a);
            if (kind == KIND_Q4_1)
                m16 = _mm256_mask_loadu_epi16(m16, (__mmask16)(0xF << (4 * a)), (const uint16_t *)(g + 8) - 4 * a);
        }
        const __m512 d = _mm512_cvtph_ps(d16);
        _mm512_store_ps(&w->d, d);
        _mm512_store_ps(&w->m, kind == KIND_Q4_1 ? _mm512_cvtph_ps(m16) : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)));
    }
}

/* The sub-blocks of a wide tile made of `count` (1-4) packed tiles from `groups` on (the absent
 * ones: zero codes and scales, outputs never stored) */
static inline __attribute__((always_inline)) void wide_prep(const uint8_t *groups, int count, long blocks,
                                                            size_t group_bytes, const int kind, WidePrep *wp) {
    const long xblocks = blocks * SUBS(kind);
    if (count == 4 && (kind == KIND_Q4_0 || kind == KIND_Q4_1)) {
        wide_prep_q4(groups, blocks, group_bytes, kind, wp);
        return;
    }
    if (count < 4) memset(wp, 0, (size_t)xblocks * sizeof(WidePrep));
    for (int a = 0; a < count; a++) {
        const uint8_t *tile = groups + (size_t)a * blocks * group_bytes;
        for (long b = 0; b < blocks; b++) {
            const uint8_t *group = tile + b * group_bytes;
            KScales4 ks;
            if (IS_K(kind)) kscales4(group, kind, &ks);
            for (int s = 0; s < SUBS(kind); s++) {
                Prep_avx512vnni p;
                prep_avx512vnni(group, kind, s, &ks, &p);
                WidePrep *w = wp + b * SUBS(kind) + s;
                for (int v = 0; v < 4; v++) { /* p.u[v] = [rows 0-3 of bytes 4v.. | of bytes 16 + 4v..] */
                    memcpy((char *)&w->u[v] + 16 * a, &p.u[v], 16);
                    memcpy((char *)&w->u[v + 4] + 16 * a, (const char *)&p.u[v] + 16, 16);
                }
                memcpy((char *)&w->d + 16 * a, &p.d, 16); /* the low halves: rows 0-3 */
                memcpy((char *)&w->m + 16 * a, &p.m, 16);
            }
        }
    }
}

/* One sub-block of rows `at` .. at + R - 1 (x by sub-blocks: quantize_x_whole) into their chains */
static inline __attribute__((always_inline)) void wide_sub(const WidePrep *p, const int8_t *codes, const float *xd,
                                                           const float *xs, long at, const int R, const int kind,
                                                           __m512 *chain) {
    const int8_t *xc = codes + (size_t)at * QBLOCK;
    __m512i isum[WIDE_ROWS];
    for (int i = 0; i < R; i++) isum[i] = _mm512_setzero_si512();
    for (int v = 0; v < 8; v++) {
        const __m512i u = _mm512_load_si512(&p->u[v]);
        for (int i = 0; i < R; i++) {
            int32_t four;
            memcpy(&four, xc + i * QBLOCK + 4 * v, sizeof four);
            isum[i] = _mm512_dpbusd_epi32(isum[i], u, _mm512_set1_epi32(four));
        }
    }
    const __m512 d = _mm512_load_ps(&p->d), m = _mm512_load_ps(&p->m);
    for (int i = 0; i < R; i++) {
        __m512 c = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d, _mm512_set1_ps(xd[at + i])), chain[i]);
        if (kind != KIND_Q8_0) c = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[at + i]), c);
        chain[i] = c;
    }
}

/* Rows r0 .. r0 + R - 1 of x against a prepared wide tile: outputs n0 .. n0 + nvalid - 1 (bias: the
 * tile's own 16, or NULL) */
static inline __attribute__((always_inline)) void wide_rows(const WidePrep *wp, long xblocks, const int8_t *codes,
                                                            const float *xd, const float *xs, long m_rows, long r0,
                                                            const int R, const int kind, const float *bias, float *y,
                                                            long n, long n0, int nvalid, const char *ask,
                                                            long ask_lines) {
    __m512 even[WIDE_ROWS], odd[WIDE_ROWS];
    for (int i = 0; i < R; i++) even[i] = odd[i] = _mm512_setzero_ps();
    for (long xb = 0; xb < xblocks; xb++) {
        for (long l = xb * ask_lines / xblocks; l < (xb + 1) * ask_lines / xblocks; l++)
            _mm_prefetch(ask + 64 * l, _MM_HINT_T0);
        /* (the chains by name, not chain[i][xb & 1]: an index known only at run time kept them in memory) */
        if (xb & 1) wide_sub(wp + xb, codes, xd, xs, xb * m_rows + r0, R, kind, odd);
        else wide_sub(wp + xb, codes, xd, xs, xb * m_rows + r0, R, kind, even);
    }
    const __mmask16 keep = (__mmask16)((1u << nvalid) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    for (int i = 0; i < R; i++)
        _mm512_mask_storeu_ps(y + (r0 + i) * n + n0, keep, _mm512_add_ps(_mm512_add_ps(even[i], odd[i]), add));
}

/* wide_rows with R (1 .. WIDE_ROWS) a constant in each copy */
static inline __attribute__((always_inline)) void wide_any(const WidePrep *wp, long xblocks, const int8_t *codes,
                                                           const float *xd, const float *xs, long m_rows, long r0,
                                                           int R, const int kind, const float *bias, float *y,
                                                           long n, long n0, int nvalid, const char *ask,
                                                           long ask_lines) {
#define WIDE_CASE(RR) \
    case RR: wide_rows(wp, xblocks, codes, xd, xs, m_rows, r0, RR, kind, bias, y, n, n0, nvalid, ask, ask_lines); break;
    switch (R) {
        WIDE_CASE(1) WIDE_CASE(2) WIDE_CASE(3) WIDE_CASE(4) WIDE_CASE(5) WIDE_CASE(6) WIDE_CASE(7) WIDE_CASE(8)
    }
#undef WIDE_CASE
}

/* y = x @ W^T (+ bias) from x's codes and scales by sub-blocks (quantize_x_whole); wide tiles
 * split over the OpenMP team, rows in passes of at most WIDE_ROWS, as even as they go (16: 8 + 8,
 * 12: 6 + 6). Returns -1 when out of memory. */
static inline __attribute__((always_inline)) int wide_linear_kind(const int8_t *codes, const float *xd,
                                                                  const float *xs, const uint8_t *packed,
                                                                  const int kind, const float *bias, float *y,
                                                                  long m_rows, long n, long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N, xblocks = k / QBLOCK;
    const long wides = (tiles + 3) / 4;
    const size_t group_bytes = GROUP_BYTES(kind);
    const long passes = (m_rows + WIDE_ROWS - 1) / WIDE_ROWS;
    int failed = 0;
#pragma omp parallel
    {
        WidePrep *wp = aligned_alloc(64, (size_t)xblocks * sizeof(WidePrep));
        if (wp == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long w = 0; w < wides; w++) {
            if (wp == NULL) continue;
            const long t0 = 4 * w, n0 = t0 * TILE_N;
            const int count = tiles - t0 < 4 ? (int)(tiles - t0) : 4;
            const int nvalid = n - n0 < WIDE_N ? (int)(n - n0) : WIDE_N;
            wide_prep(packed + (size_t)t0 * blocks * group_bytes, count, blocks, group_bytes, kind, wp);
            /* the passes ask for the next wide tile's blocks from memory (the thread's next one; at
             * the end of its share, the next thread's first), each pass its share of the lines: asked
             * by the first pass alone, the memory sat idle through the others (the projections x 30
             * layers in one process, builds alternating: 16 rows 8.2 -> 7.8 ms, 12 rows 7.7 -> 6.5) */
            const long next = t0 + 4, next_count = tiles - next < 4 ? tiles - next : 4;
            const char *ask = next_count > 0 ? (const char *)packed + (size_t)next * blocks * group_bytes : NULL;
            const long ask_lines = next_count > 0 ? (long)((size_t)next_count * blocks * group_bytes / 64) : 0;
            for (long pass = 0, r0 = 0; pass < passes; pass++) {
                const long r1 = m_rows * (pass + 1) / passes;
                const long l0 = ask_lines * pass / passes, l1 = ask_lines * (pass + 1) / passes;
                wide_any(wp, xblocks, codes, xd, xs, m_rows, r0, (int)(r1 - r0), kind, bias ? bias + n0 : NULL, y, n,
                         n0, nvalid, ask ? ask + 64 * l0 : NULL, l1 - l0);
                r0 = r1;
            }
        }
        free(wp);
    }
    return failed ? -1 : 0;
}

static int wide_linear(const int8_t *codes, const float *xd, const float *xs, const uint8_t *packed, int kind,
                       const float *bias, float *y, long m_rows, long n, long k) {
    switch (kind) {
    case KIND_Q4_1: return wide_linear_kind(codes, xd, xs, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    case KIND_Q4_0: return wide_linear_kind(codes, xd, xs, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    case KIND_Q4_K: return wide_linear_kind(codes, xd, xs, packed, KIND_Q4_K, bias, y, m_rows, n, k);
    default: return wide_linear_kind(codes, xd, xs, packed, KIND_Q5_K, bias, y, m_rows, n, k);
    }
}
