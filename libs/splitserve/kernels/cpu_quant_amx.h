/* The int8 kernel of cpu_quant.c on AMX tiles, for many rows of x (prefill chunks, a batch of
 * decodes): the integer sums come from tile dot products, 16 rows of x by 16 weight rows at once,
 * and the float arithmetic after them is the AVX-512 VNNI copy's, operation for operation, so a row
 * gives the same bits here as there (and so on every path: cold, cached, decoded, verified).
 *
 * What the VNNI copy computes for row r of x and weight row j, per sub-block of 32 weights: the
 * integer sums of its two halves (weights 0-15 and 16-31: a Q6_K sub-block has one scale per half),
 * each times (the half's weight scale * dx) into its own float32 accumulator with one fused
 * multiply-add, then the minimum's term (mw * s, fused) into both (the second half's coefficient is
 * 0), and at the end the two accumulators summed, then the bias. Here the same, but for the second
 * half's 0 * s: with s finite it adds a zero to an accumulator that started at +0 and so is never
 * -0 (round to nearest makes an exact cancellation +0), which changes no bit; skipping it took 4% off
 * a 16-row step. (With a non-finite activation both copies' outputs are non-finite, not always the
 * same non-finite value.) Here:
 *   - a C tile per half: int32 [16 rows of x][16 weight rows], from tdpbsud (x signed, codes
 *     unsigned) or tdpbssd (Q8_0, Q6_K: signed codes); the integers equal dpbusd's on (|w|, x with
 *     w's sign) exactly;
 *   - A tiles: x's codes in order (`quantize_x_plain`), 16 rows by the 16 bytes of a half;
 *   - B tiles: a half's codes of 16 weight rows, 4 bytes of a row side by side (tdp's layout: row
 *     p, bytes 4c..4c+3: weights 4p..4p+3 of weight row c), made by the VNNI copy's 4-byte
 *     transpose of each packed tile of 4 rows (`amx_prep`), once per (16 weight rows, sub-block),
 *     then used by every 16 rows of x;
 *   - the tile products of AMX_CHUNK sub-blocks are issued (over two pairs of C tiles by turns)
 *     and stored before their float arithmetic runs, 4 rows of x at a time: 8 accumulators of 16
 *     lanes in registers, independent chains.
 * One tdp takes ~16 cycles whatever its depth; the float arithmetic after the tiles and preparing
 * the weights' B tiles are what bound it (below ~12 rows the preparation costs more than the tiles
 * save: AMX_MIN_ROWS in cpu_quant.c).
 *
 * Linux hands out AMX state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, once, on
 * the first call that would use it: `amx_ready` in cpu_quant.c); each thread loads the tile
 * configuration at the start of its share of a call and releases the tiles at the end. */

#define AMX_N 16 /* weight rows of a B tile: 4 packed tiles of TILE_N */
#define AMX_M 16 /* rows of x of an A tile */

/* One (16 weight rows, sub-block): the B tiles of both halves, the halves' scales, the minimum's
 * coefficients (what INT8_NAME(Prep) holds for 4 weight rows, for 16). */
typedef struct {
    uint8_t b[2][4][64];
    float d[2][AMX_N];
    float m[AMX_N];
} __attribute__((aligned(64))) AmxPrep;

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) AmxConfig;

/* tiles 0-1 and 6-7: C of the two halves (two sub-blocks); 2-3: A (x's codes) of the two halves;
 * 4-5: B of the two halves */
static void amx_configure(void) {
    AmxConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.colsb[t] = AMX_N * 4;
        c.rows[t] = AMX_M;
        c.colsb[2 + t] = 16;
        c.rows[2 + t] = AMX_M;
        c.colsb[4 + t] = AMX_N * 4;
        c.rows[4 + t] = 4;
        c.colsb[6 + t] = AMX_N * 4;
        c.rows[6 + t] = AMX_M;
    }
    _tile_loadconfig(&c);
}

/* Sub-block s of block b of column tile ct (weight rows 16 ct ..): its B tiles and scales. Packed
 * tiles past the weight's (the last column tile of an n not a multiple of 16) are zeros. */
static inline __attribute__((always_inline)) void amx_prep(const uint8_t *packed, const int kind, long ct, long tiles,
                                                          long blocks, size_t group_bytes, long b, int s,
                                                          const KScales4 *ks, AmxPrep *p) {
    for (int g = 0; g < AMX_N / TILE_N; g++) {
        const long t = ct * (AMX_N / TILE_N) + g;
        if (t >= tiles) {
            for (int h = 0; h < 2; h++)
                for (int v = 0; v < 4; v++) memset(&p->b[h][v][g * 16], 0, 16);
            for (int j = 0; j < TILE_N; j++) p->d[0][g * 4 + j] = p->d[1][g * 4 + j] = p->m[g * 4 + j] = 0.0f;
            continue;
        }
        const uint8_t *group = packed + ((size_t)t * blocks + b) * group_bytes;
        __m256i c[4], tr[4];
        for (int j = 0; j < TILE_N; j++)
            c[j] = IS_K(kind) ? kcodes(group + j * K_BYTES(kind), kind, s) : weight_codes(group, kind, j);
        transpose_avx512vnni(c, tr);
        for (int v = 0; v < 4; v++) {
            _mm_storeu_si128((__m128i *)&p->b[0][v][g * 16], _mm256_castsi256_si128(tr[v]));
            _mm_storeu_si128((__m128i *)&p->b[1][v][g * 16], _mm256_extracti128_si256(tr[v], 1));
        }
        __m128 d0, d1, m = _mm_setzero_ps();
        if (IS_K(kind)) {
            const KScales4 *k4 = &ks[g];
            if (kind == KIND_Q6_K) {
                d0 = _mm_loadu_ps(k4->d[2 * s]);
                d1 = _mm_loadu_ps(k4->d[2 * s + 1]);
            } else {
                d0 = d1 = _mm_loadu_ps(k4->d[s]);
                m = _mm_sub_ps(_mm_setzero_ps(), _mm_loadu_ps(k4->m[s]));
            }
        } else {
            d0 = d1 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)group));
            if (kind == KIND_Q4_1) m = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + 8)));
            else if (kind == KIND_Q4_0) m = _mm_mul_ps(d0, _mm_set1_ps(-8.0f));
        }
        _mm_storeu_ps(&p->d[0][g * 4], d0);
        _mm_storeu_ps(&p->d[1][g * 4], d1);
        _mm_storeu_ps(&p->m[g * 4], m);
    }
}

#define AMX_CHUNK 8 /* sub-blocks whose tile products are stored before their float arithmetic runs */

/* Rows r0 .. r0 + mb - 1 (mb <= 16) of x against column tile ct, every sub-block prepared in
 * `preps`: y's nb (<= 16) columns from n0. The tile products of AMX_CHUNK sub-blocks are issued
 * and stored first, then their float arithmetic runs 4 rows at a time (their 8 accumulators stay
 * in registers over the chunk): the tiles' latency is not waited for once a sub-block, and the
 * stored products are read well after they were written. */
static inline __attribute__((always_inline)) void amx_rows(const int8_t *codes, const float *xd, const float *xs,
                                                          long r0, int mb, long k, const int kind,
                                                          const AmxPrep *preps, const float *bias, float *y, long n,
                                                          long n0, int nb) {
    const long xblocks = k / QBLOCK;
    const int is_signed = kind == KIND_Q8_0 || kind == KIND_Q6_K;
    __m512 acc[AMX_M][2];
    int32_t cbuf[AMX_CHUNK][2][AMX_M][AMX_N] __attribute__((aligned(64)));
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long x0 = 0; x0 < xblocks; x0 += AMX_CHUNK) {
        const int nx = xblocks - x0 < AMX_CHUNK ? (int)(xblocks - x0) : AMX_CHUNK;
        /* two pairs of C tiles, by turns (0-1, 6-7): a sub-block's products are stored after the
         * next one's are issued, so the tiles never wait on their own latency. (Tile numbers are
         * immediates: the pair is a macro argument.) */
#define AMX_PRODUCTS(C0, C1)                 \
    do {                                     \
        _tile_zero(C0);                      \
        _tile_zero(C1);                      \
        if (is_signed) {                     \
            _tile_dpbssd(C0, 2, 4);          \
            _tile_dpbssd(C1, 3, 5);          \
        } else {                             \
            _tile_dpbsud(C0, 2, 4);          \
            _tile_dpbsud(C1, 3, 5);          \
        }                                    \
    } while (0)
#define AMX_STORE(C0, C1, c)                      \
    do {                                          \
        _tile_stored(C0, cbuf[c][0], 64);         \
        _tile_stored(C1, cbuf[c][1], 64);         \
    } while (0)
        for (int c = 0; c < nx; c++) {
            const AmxPrep *p = preps + x0 + c;
            const int8_t *a = codes + (size_t)r0 * k + (x0 + c) * QBLOCK;
            _tile_loadd(2, a, k);
            _tile_loadd(3, a + 16, k);
            _tile_loadd(4, p->b[0], 64);
            _tile_loadd(5, p->b[1], 64);
            if (c & 1) {
                AMX_PRODUCTS(6, 7);
                AMX_STORE(0, 1, c - 1);
            } else {
                AMX_PRODUCTS(0, 1);
                if (c > 0) AMX_STORE(6, 7, c - 1);
            }
        }
        if (nx & 1) /* the last one: even, in 0-1 */
            AMX_STORE(0, 1, nx - 1);
        else
            AMX_STORE(6, 7, nx - 1);
#undef AMX_PRODUCTS
#undef AMX_STORE
        /* 4 rows at a time: 8 independent accumulator chains */
        for (int i0 = 0; i0 < mb; i0 += 4) {
            const int ni = mb - i0 < 4 ? mb - i0 : 4;
            __m512 a0[4], a1[4];
            for (int i = 0; i < 4; i++) {
                a0[i] = acc[i0 + i][0];
                a1[i] = acc[i0 + i][1];
            }
            for (int c = 0; c < nx; c++) {
                const AmxPrep *p = preps + x0 + c;
                const __m512 d0 = _mm512_load_ps(p->d[0]), d1 = _mm512_load_ps(p->d[1]), m = _mm512_load_ps(p->m);
                for (int i = 0; i < 4; i++) {
                    if (i >= ni) break;
                    const long at = (r0 + i0 + i) * xblocks + x0 + c;
                    const __m512 vxd = _mm512_set1_ps(xd[at]);
                    const __m512 dd0 = _mm512_mul_ps(d0, vxd);
                    const __m512 dd1 = kind == KIND_Q6_K ? _mm512_mul_ps(d1, vxd) : dd0;
                    a0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][0][i0 + i])), dd0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][1][i0 + i])), dd1, a1[i]);
                    if (!is_signed) /* (the VNNI copy also adds 0 * xs to the second half: a no-op on
                                     * finite activations, left out here; see the top of this file) */
                        a0[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[at]), a0[i]);
                }
            }
            for (int i = 0; i < ni; i++) {
                acc[i0 + i][0] = a0[i];
                acc[i0 + i][1] = a1[i];
            }
        }
    }
    const __mmask16 cols = (__mmask16)((1u << nb) - 1);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(cols, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < mb; i++)
        _mm512_mask_storeu_ps(y + (r0 + i) * n + n0, cols, _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), vb));
}

/* y = x @ W^T (+ bias) for x's plain codes (`quantize_x_plain`, rows padded to a multiple of 16 with
 * zeros), split by column tiles of 16 weight rows over the OpenMP team. -1 when out of memory. */
static inline __attribute__((always_inline)) int amx_linear_kind(const int8_t *codes, const float *xd,
                                                                const float *xs, const uint8_t *packed,
                                                                const int kind, const float *bias, float *y,
                                                                long m_rows, long n, long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N, xblocks = k / QBLOCK;
    const long ctiles = (n + AMX_N - 1) / AMX_N;
    const size_t group_bytes = GROUP_BYTES(kind);
    int failed = 0;
#pragma omp parallel
    {
        AmxPrep *preps = aligned_alloc(64, (size_t)xblocks * sizeof(AmxPrep));
        if (preps == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        amx_configure();
#pragma omp for schedule(static)
        for (long ct = 0; ct < ctiles; ct++) {
            if (preps == NULL) continue;
            for (long b = 0; b < blocks; b++) {
                for (int g = 0; g < AMX_N / TILE_N; g++) /* 4 streams of weights from memory: ask ahead */
                    _mm_prefetch((const char *)packed + ((size_t)(ct * (AMX_N / TILE_N) + g) * blocks + b) * group_bytes +
                                     PREFETCH_AHEAD, _MM_HINT_T0);
                KScales4 ks[AMX_N / TILE_N];
                if (IS_K(kind))
                    for (int g = 0; g < AMX_N / TILE_N; g++)
                        if (ct * (AMX_N / TILE_N) + g < tiles)
                            kscales4(packed + ((size_t)(ct * (AMX_N / TILE_N) + g) * blocks + b) * group_bytes, kind,
                                     &ks[g]);
                for (int s = 0; s < SUBS(kind); s++)
                    amx_prep(packed, kind, ct, tiles, blocks, group_bytes, b, s, ks, preps + b * SUBS(kind) + s);
            }
            const long n0 = ct * AMX_N;
            const int nb = n - n0 < AMX_N ? (int)(n - n0) : AMX_N;
            for (long r0 = 0; r0 < m_rows; r0 += AMX_M) {
                const int mb = m_rows - r0 < AMX_M ? (int)(m_rows - r0) : AMX_M;
                amx_rows(codes, xd, xs, r0, mb, k, kind, preps, bias, y, n, n0, nb);
            }
        }
        _tile_release();
        free(preps);
    }
    return failed ? -1 : 0;
}

static int amx_linear(const int8_t *codes, const float *xd, const float *xs, const uint8_t *packed, int kind,
                      const float *bias, float *y, long m_rows, long n, long k) {
    switch (kind) {
    case KIND_Q4_1: return amx_linear_kind(codes, xd, xs, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    case KIND_Q4_0: return amx_linear_kind(codes, xd, xs, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    case KIND_Q4_K: return amx_linear_kind(codes, xd, xs, packed, KIND_Q4_K, bias, y, m_rows, n, k);
    case KIND_Q5_K: return amx_linear_kind(codes, xd, xs, packed, KIND_Q5_K, bias, y, m_rows, n, k);
    case KIND_Q6_K: return amx_linear_kind(codes, xd, xs, packed, KIND_Q6_K, bias, y, m_rows, n, k);
    default: return amx_linear_kind(codes, xd, xs, packed, KIND_Q8_0, bias, y, m_rows, n, k);
    }
}
