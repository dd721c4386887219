/* The int8 kernel of cpu_quant.c (see its notes there), written once and compiled three times, by
 * including this file under three instruction sets: INT8_DOT_ACC(acc, u, s) adds to each of acc's 8
 * int32 lanes the sum over its 4 bytes of u[i] * s[i] (u unsigned, s signed), INT8_NAME(f) names
 * this copy's functions, INT8_ROWS is how many rows of x share one pass over a tile's weights.
 *
 * Columns in lanes: a tile's 4 weight rows are transposed, 4 bytes at a time, so that a vector of
 * 8 int32 lanes holds [rows 0-3 of bytes 4p..4p+3 | rows 0-3 of bytes 16+4p..16+4p+3] (p = 0..3,
 * `prep`), and x's codes are stored expanded to match (`quantize_x`: each 4 bytes repeated in 4
 * lanes). A sub-block of 32 weights against one row of x is then 4 dot-product instructions into
 * one int32 vector whose lanes are the 4 output columns, twice (the sub-block's two halves): the
 * weights are unpacked once per tile and used by every row of x, and a row's work has no
 * per-column scalar step. Q6_K scales each half: the vector times [the 4 rows' first scales | their
 * second ones] times x's scale (`row_step`). Every other format has one scale a sub-block, and
 * takes sub-blocks by pairs (`pair_step`): the halves' integers of the even one and of the odd one
 * are added lane by lane (one 128-bit shuffle each), so the vector holds [the even sub-block's 4
 * sums | the odd one's], scaled once, in two chains of float32 lanes; AMX's tile products give the
 * same sums and it keeps the same two chains (cpu_quant_amx.h). */

/* The weights of one sub-block of a tile, ready for every row of x: u (unsigned operands: the
 * codes, or |codes| for the signed formats), w (the signed codes whose signs x takes: Q8_0, Q6_K),
 * d ([D of rows 0-3 | the same], Q6_K: [D of the first 16 weights | of the last 16]) and m (the
 * coefficients of x's block sum, [rows 0-3 | 0]: the mins, -8 d for Q4_0, nothing for the signed
 * formats). */
typedef struct {
    __m256i u[4], w[4];
    __m256 d, m;
} INT8_NAME(Prep);

/* 4 rows' 32 codes (one vector each, byte i: weight i) transposed by 4 bytes (see above) */
static inline __attribute__((always_inline)) void INT8_NAME(transpose)(const __m256i c[4], __m256i t[4]) {
    const __m256i a = _mm256_unpacklo_epi32(c[0], c[1]), b = _mm256_unpacklo_epi32(c[2], c[3]);
    const __m256i e = _mm256_unpackhi_epi32(c[0], c[1]), f = _mm256_unpackhi_epi32(c[2], c[3]);
    t[0] = _mm256_unpacklo_epi64(a, b);
    t[1] = _mm256_unpackhi_epi64(a, b);
    t[2] = _mm256_unpacklo_epi64(e, f);
    t[3] = _mm256_unpackhi_epi64(e, f);
}

/* Sub-block s of a tile's group: `ks` holds the 4 rows' K-quant scales transposed ([t][row]) */
static inline __attribute__((always_inline)) void INT8_NAME(prep)(const uint8_t *group, const int kind, int s,
                                                                 const KScales4 *ks, INT8_NAME(Prep) *p) {
    __m256i c[4];
    for (int j = 0; j < TILE_N; j++)
        c[j] = IS_K(kind) ? kcodes(group + j * K_BYTES(kind), kind, s) : weight_codes(group, kind, j);
    if (kind == KIND_Q8_0 || kind == KIND_Q6_K) {
        INT8_NAME(transpose)(c, p->w);
        for (int v = 0; v < 4; v++) p->u[v] = _mm256_abs_epi8(p->w[v]);
    } else {
        INT8_NAME(transpose)(c, p->u);
    }
    if (IS_K(kind)) {
        if (kind == KIND_Q6_K) {
            p->d = _mm256_set_m128(_mm_loadu_ps(ks->d[2 * s + 1]), _mm_loadu_ps(ks->d[2 * s]));
            p->m = _mm256_setzero_ps();
        } else {
            const __m128 d4 = _mm_loadu_ps(ks->d[s]);
            p->d = _mm256_set_m128(d4, d4);
            p->m = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_sub_ps(_mm_setzero_ps(), _mm_loadu_ps(ks->m[s])), 0);
        }
        return;
    }
    const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)group));
    p->d = _mm256_set_m128(d4, d4);
    if (kind == KIND_Q4_1)
        p->m = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + 8))), 0);
    else if (kind == KIND_Q4_0)
        p->m = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_mul_ps(d4, _mm_set1_ps(-8.0f)), 0);
    else
        p->m = _mm256_setzero_ps();
}

/* Row r's integer sums of sub-block xb against the prepared weights, both halves ([columns 0-3 of
 * weights 0-15 | of weights 16-31]); the signed formats' x takes the weights' signs */
static inline __attribute__((always_inline)) __m256i INT8_NAME(row_isum)(const INT8_NAME(Prep) *p, const int kind,
                                                                         XQ q, long r, long xblocks, long xb) {
    const __m256i *xe = (const __m256i *)(q.codes + ((size_t)r * xblocks + xb) * XQ_BLOCK_BYTES);
    __m256i isum = _mm256_setzero_si256();
    for (int v = 0; v < 4; v++) {
        const __m256i xv = _mm256_load_si256(xe + v);
        isum = INT8_DOT_ACC(isum, p->u[v], (kind == KIND_Q8_0 || kind == KIND_Q6_K) ? _mm256_sign_epi8(xv, p->w[v]) : xv);
    }
    return isum;
}

/* Q6_K: acc += row r's sums of sub-block xb times the halves' scales times x's */
static inline __attribute__((always_inline)) __m256 INT8_NAME(row_step)(const INT8_NAME(Prep) *p, XQ q, long r,
                                                                        long xblocks, long xb, __m256 acc) {
    const __m256i isum = INT8_NAME(row_isum)(p, KIND_Q6_K, q, r, xblocks, xb);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(p->d, _mm256_set1_ps(q.d[r * xblocks + xb])), acc);
}

/* acc += a pair of sub-blocks (xb even, xb + 1) of row r: lanes 0-3 are the 4 columns' chain of the
 * even sub-blocks, lanes 4-7 the odd ones'. Each sub-block's two halves' integers are summed (exact),
 * then, as the AMX copy does it: its float times (weight scale * dx), fused into its chain, then the
 * minimum's term, fused. */
static inline __attribute__((always_inline)) __m256 INT8_NAME(pair_step)(__m256i ie, __m256i io, __m256 de,
                                                                         __m256 me, const INT8_NAME(Prep) *po,
                                                                         const int kind, XQ q, long r, long xblocks,
                                                                         long xb, __m256 acc) {
    /* [even lo | odd hi] + [even hi | odd lo] */
    const __m256i isum = _mm256_add_epi32(_mm256_blend_epi32(ie, io, 0xF0), _mm256_permute2x128_si256(ie, io, 0x21));
    const long at = r * xblocks + xb;
    const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1); /* [dx of xb x 4 | of xb + 1 x 4] */
    const __m256 dx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(q.d + at)))), pair);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(_mm256_permute2f128_ps(de, po->d, 0x20), dx), acc);
    if (kind != KIND_Q8_0) {
        const __m256 sx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(q.s + at)))), pair);
        acc = _mm256_fmadd_ps(_mm256_permute2f128_ps(me, po->m, 0x20), sx, acc);
    }
    return acc;
}

/* acc += the last sub-block xb (even: an odd count of them) of row r, into the even chain alone */
static inline __attribute__((always_inline)) __m256 INT8_NAME(tail_step)(__m256i ie, __m256 de, __m256 me,
                                                                         const int kind, XQ q, long r, long xblocks,
                                                                         long xb, __m256 acc) {
    const __m128i isum = _mm_add_epi32(_mm256_castsi256_si128(ie), _mm256_extracti128_si256(ie, 1));
    const long at = r * xblocks + xb;
    __m128 lo = _mm256_castps256_ps128(acc);
    lo = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(_mm256_castps256_ps128(de), _mm_set1_ps(q.d[at])), lo);
    if (kind != KIND_Q8_0) lo = _mm_fmadd_ps(_mm256_castps256_ps128(me), _mm_set1_ps(q.s[at]), lo);
    return _mm256_insertf128_ps(acc, lo, 0);
}

/* The nb (<= 4) outputs of each of rows r0 .. r0 + mb - 1 from their accumulators (lanes j and j + 4
 * are column j's two chains: Q6_K's halves, or the even and the odd sub-blocks) */
static inline __attribute__((always_inline)) void INT8_NAME(store_rows)(const __m256 *acc, const int mb, long r0,
                                                                       const float *bias, float *y, long n, int nb) {
    for (int i = 0; i < mb; i++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        float out[4];
        _mm_storeu_ps(out, v);
        float *yr = y + (r0 + i) * n;
        for (int j = 0; j < nb; j++) yr[j] = out[j] + (bias ? bias[j] : 0.0f);
    }
}

/* Rows r0 .. r0 + mb - 1 (mb <= INT8_ROWS) of x against one tile, every sub-block prepared here in
 * registers (few rows: a decode step) or read from `preps` (made once for all the row chunks). */
static inline __attribute__((always_inline)) void INT8_NAME(tile_rows)(XQ q, long r0, const int mb, long k,
                                                                      const uint8_t *groups, size_t group_bytes,
                                                                      const int kind, const INT8_NAME(Prep) *preps,
                                                                      const float *bias, float *y, long n, int nb) {
    const long blocks = k / BLOCK_WEIGHTS(kind), xblocks = k / QBLOCK;
    const int ask = n < PREFETCH_MAX_ROWS; /* the weights stream from memory: ask for them ahead */
    __m256 acc[INT8_ROWS];
    for (int i = 0; i < mb; i++) acc[i] = _mm256_setzero_ps();
    if (kind == KIND_Q6_K) {
        for (long b = 0; b < blocks; b++) {
            KScales4 ks;
            if (preps == NULL) {
                if (ask) _mm_prefetch((const char *)groups + b * group_bytes + PREFETCH_AHEAD, _MM_HINT_T0);
                kscales4(groups + b * group_bytes, kind, &ks);
            }
            for (int s = 0; s < SUBS(kind); s++) {
                const long xb = b * SUBS(kind) + s;
                INT8_NAME(Prep) local;
                const INT8_NAME(Prep) *p = preps ? preps + xb : &local;
                if (preps == NULL) INT8_NAME(prep)(groups + b * group_bytes, kind, s, &ks, &local);
                for (int i = 0; i < mb; i++) acc[i] = INT8_NAME(row_step)(p, q, r0 + i, xblocks, xb, acc[i]);
            }
        }
        INT8_NAME(store_rows)(acc, mb, r0, bias, y, n, nb);
        return;
    }
    /* one scale a sub-block: by pairs (xb, xb + 1), which for a K-quant lie in one super-block (8
     * sub-blocks) and otherwise are blocks b, b + 1; an odd last block goes alone (tail_step) */
    KScales4 ks; /* a K-quant super-block's scales, for its 4 pairs */
    for (long xb = 0; xb + 1 < xblocks; xb += 2) {
        INT8_NAME(Prep) le, lo;
        const INT8_NAME(Prep) *pe = preps ? preps + xb : &le, *po = preps ? preps + xb + 1 : &lo;
        if (preps == NULL) {
            const long b = xb / SUBS(kind);
            const int s = (int)(xb % SUBS(kind));
            const uint8_t *ge = groups + b * group_bytes, *go = IS_K(kind) ? ge : ge + group_bytes;
            if (s == 0) {
                if (ask) _mm_prefetch((const char *)ge + PREFETCH_AHEAD, _MM_HINT_T0);
                if (IS_K(kind)) kscales4(ge, kind, &ks);
            }
            INT8_NAME(prep)(ge, kind, s, &ks, &le);
            INT8_NAME(prep)(go, kind, IS_K(kind) ? s + 1 : 0, &ks, &lo);
        }
        for (int i = 0; i < mb; i++)
            acc[i] = INT8_NAME(pair_step)(INT8_NAME(row_isum)(pe, kind, q, r0 + i, xblocks, xb),
                                          INT8_NAME(row_isum)(po, kind, q, r0 + i, xblocks, xb + 1), pe->d, pe->m, po,
                                          kind, q, r0 + i, xblocks, xb, acc[i]);
    }
    if (xblocks & 1) { /* (never a K-quant: 8 sub-blocks a super-block) */
        const long xb = xblocks - 1;
        INT8_NAME(Prep) le;
        const INT8_NAME(Prep) *pe = preps ? preps + xb : &le;
        if (preps == NULL) INT8_NAME(prep)(groups + xb * group_bytes, kind, 0, &ks, &le);
        for (int i = 0; i < mb; i++)
            acc[i] = INT8_NAME(tail_step)(INT8_NAME(row_isum)(pe, kind, q, r0 + i, xblocks, xb), pe->d, pe->m, kind, q,
                                          r0 + i, xblocks, xb, acc[i]);
    }
    INT8_NAME(store_rows)(acc, mb, r0, bias, y, n, nb);
}

static inline __attribute__((always_inline)) void INT8_NAME(tile_any)(XQ q, long r0, int mb, long k,
                                                                     const uint8_t *groups, size_t group_bytes,
                                                                     const int kind, const INT8_NAME(Prep) *preps,
                                                                     const float *bias, float *y, long n, int nb) {
#define INT8_CASE(MB) \
    case MB: INT8_NAME(tile_rows)(q, r0, MB, k, groups, group_bytes, kind, preps, bias, y, n, nb); break;
    switch (mb) {
        INT8_CASE(1) INT8_CASE(2) INT8_CASE(3) INT8_CASE(4) INT8_CASE(5) INT8_CASE(6) INT8_CASE(7) INT8_CASE(8)
#if INT8_ROWS > 8
        INT8_CASE(9) INT8_CASE(10) INT8_CASE(11) INT8_CASE(12)
#endif
    }
#undef INT8_CASE
}

/* y = x @ W^T (+ bias) for quantized x, split by groups of tiles of weight rows over the OpenMP
 * team. Up to INT8_ROWS rows prepare each sub-block in registers. More rows prepare a group's tiles
 * once into a buffer of this thread (~64 KB: in L2) and run INT8_ROWS rows at a time against every
 * tile of the group, so those rows' codes stay in L1 while the group's weights pass. Returns -1
 * when out of memory. */
static inline __attribute__((always_inline)) int INT8_NAME(linear_int8_kind)(XQ q, const uint8_t *packed,
                                                                            const int kind, const float *bias,
                                                                            float *y, long m_rows, long n, long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N, xblocks = k / QBLOCK;
    const size_t group_bytes = GROUP_BYTES(kind);
    const size_t tile_preps = (size_t)xblocks * sizeof(INT8_NAME(Prep));
    long per_group = m_rows > INT8_ROWS ? (long)(65536 / tile_preps) : 1;
    const long share = tiles / (4L * omp_get_max_threads()); /* at least ~4 groups a thread */
    if (per_group > share) per_group = share;
    if (per_group < 1) per_group = 1;
    const long ngroups = (tiles + per_group - 1) / per_group;
    int failed = 0;
#pragma omp parallel
    {
        INT8_NAME(Prep) *preps = NULL;
        if (m_rows > INT8_ROWS) {
            preps = aligned_alloc(32, (size_t)per_group * tile_preps);
            if (preps == NULL) {
#pragma omp atomic write
                failed = 1;
            }
        }
#pragma omp for schedule(static)
        for (long g = 0; g < ngroups; g++) {
            const long t0 = g * per_group, t1 = t0 + per_group < tiles ? t0 + per_group : tiles;
            if (m_rows <= INT8_ROWS) {
                for (long t = t0; t < t1; t++) {
                    const long n0 = t * TILE_N;
                    const int nb = n - n0 < TILE_N ? (int)(n - n0) : TILE_N;
                    INT8_NAME(tile_any)(q, 0, (int)m_rows, k, packed + (size_t)t * blocks * group_bytes, group_bytes,
                                        kind, NULL, bias ? bias + n0 : NULL, y + n0, n, nb);
                }
                continue;
            }
            if (preps == NULL) continue;
            for (long t = t0; t < t1; t++) {
                const uint8_t *groups = packed + (size_t)t * blocks * group_bytes;
                INT8_NAME(Prep) *tp = preps + (t - t0) * xblocks;
                for (long b = 0; b < blocks; b++) {
                    KScales4 ks;
                    if (IS_K(kind)) kscales4(groups + b * group_bytes, kind, &ks);
                    for (int s = 0; s < SUBS(kind); s++)
                        INT8_NAME(prep)(groups + b * group_bytes, kind, s, &ks, tp + b * SUBS(kind) + s);
                }
            }
            for (long r0 = 0; r0 < m_rows; r0 += INT8_ROWS) {
                const int mb = m_rows - r0 < INT8_ROWS ? (int)(m_rows - r0) : INT8_ROWS;
                for (long t = t0; t < t1; t++) {
                    const long n0 = t * TILE_N;
                    const int nb = n - n0 < TILE_N ? (int)(n - n0) : TILE_N;
                    INT8_NAME(tile_any)(q, r0, mb, k, NULL, group_bytes, kind, preps + (t - t0) * xblocks,
                                        bias ? bias + n0 : NULL, y + n0, n, nb);
                }
            }
        }
        free(preps);
    }
    return failed ? -1 : 0;
}

static int INT8_NAME(linear_int8)(XQ q, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows,
                                  long n, long k) {
    switch (kind) {
    case KIND_Q4_1: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    case KIND_Q4_0: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    case KIND_Q4_K: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_K, bias, y, m_rows, n, k);
    case KIND_Q5_K: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q5_K, bias, y, m_rows, n, k);
    case KIND_Q6_K: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q6_K, bias, y, m_rows, n, k);
    default: return INT8_NAME(linear_int8_kind)(q, packed, KIND_Q8_0, bias, y, m_rows, n, k);
    }
}
