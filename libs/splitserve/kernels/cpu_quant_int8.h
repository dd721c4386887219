/* The int8 kernel of cpu_quant.c (see its notes there), written once and compiled twice, by
 * including this file under two instruction sets: INT8_DOT(u, s) is the sum over each 4 bytes of
 * u[i] * s[i] (u unsigned, s signed) in 8 int32 lanes, INT8_NAME(f) names this copy's functions. */

static inline __attribute__((always_inline)) __m256i INT8_NAME(block_dot)(__m256i w, __m256i xc, const int kind) {
    if (kind == KIND_Q8_0 || kind == KIND_Q6_K) /* signed x signed: |w| times x with w's sign */
        return INT8_DOT(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xc, w));
    return INT8_DOT(w, xc);
}

/* y[i][j] for rows i < mb of quantized x (codes at xc + i * k) and weight rows j < nb of a tile. */
static inline __attribute__((always_inline)) void INT8_NAME(int8_rows)(XQ q, long i0, long k, const uint8_t *groups,
                                                           size_t group_bytes, const int kind, const float *bias,
                                                           float *y, long ldy, const int mb, const int nb) {
    const long blocks = k / BLOCK_WEIGHTS(kind), xblocks = k / QBLOCK;
    __m256 acc[2][TILE_N];
    float corr[2][TILE_N];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            acc[i][j] = _mm256_setzero_ps();
            corr[i][j] = 0.0f;
        }
    for (long b = 0; b < blocks; b++) {
        const uint8_t *group = groups + b * group_bytes;
        for (int j = 0; j < nb; j++) {
            BlockScales sc;
            block_scales(group, kind, j, &sc);
            for (int s = 0; s < SUBS(kind); s++) {
                const __m256i w = IS_K(kind) ? kcodes(group + j * K_BYTES(kind), kind, s) : weight_codes(group, kind, j);
                const long xb = b * SUBS(kind) + s; /* x's block of 32 */
                for (int i = 0; i < mb; i++) {
                    const long r = i0 + i;
                    const float dx = q.d[r * xblocks + xb], sx = q.s[r * xblocks + xb];
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(q.codes + r * k + xb * QBLOCK));
                    const __m256 p = _mm256_cvtepi32_ps(INT8_NAME(block_dot)(w, xv, kind));
                    /* Q6_K: lanes 0-3 sum weights 0-15 of the sub-block (scale D[2s]), 4-7 weights 16-31 */
                    const __m256 scale = kind == KIND_Q6_K
                        ? _mm256_set_m128(_mm_set1_ps(sc.d[2 * s + 1] * dx), _mm_set1_ps(sc.d[2 * s] * dx))
                        : _mm256_set1_ps(sc.d[s] * dx);
                    acc[i][j] = _mm256_fmadd_ps(p, scale, acc[i][j]);
                    if (kind == KIND_Q4_1 || kind == KIND_Q4_K || kind == KIND_Q5_K)
                        corr[i][j] = __builtin_fmaf(sc.m[s], sx, corr[i][j]);
                    else if (kind == KIND_Q4_0) corr[i][j] = __builtin_fmaf(sc.d[0], sx, corr[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            float v = hsum((v8f)acc[i][j]);
            if (kind == KIND_Q4_1) v += corr[i][j];
            else if (kind == KIND_Q4_K || kind == KIND_Q5_K) v -= corr[i][j]; /* the mins: weight D * q - M */
            else if (kind == KIND_Q4_0) v = __builtin_fmaf(-8.0f, corr[i][j], v);
            y[i * ldy + j] = v + (bias ? bias[j] : 0.0f);
        }
}

static inline __attribute__((always_inline)) void INT8_NAME(linear_int8_kind)(XQ q, const uint8_t *packed, const int kind,
                                                                  const float *bias, float *y, long m_rows, long n,
                                                                  long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N;
    const size_t group_bytes = GROUP_BYTES(kind);
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tiles; t++) {
        const long n0 = t * TILE_N;
        const int nb = n - n0 < TILE_N ? (int)(n - n0) : TILE_N;
        const uint8_t *groups = packed + (size_t)t * blocks * group_bytes;
        for (long i0 = 0; i0 < m_rows; i0 += 2) {
            const int mb = m_rows - i0 < 2 ? (int)(m_rows - i0) : 2;
            float *yt = y + i0 * n + n0;
            const float *bt = bias ? bias + n0 : NULL;
            if (mb == 2) INT8_NAME(int8_rows)(q, i0, k, groups, group_bytes, kind, bt, yt, n, 2, nb);
            else INT8_NAME(int8_rows)(q, i0, k, groups, group_bytes, kind, bt, yt, n, 1, nb);
        }
    }
}


static void INT8_NAME(linear_int8)(XQ q, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows,
                                   long n, long k) {
    switch (kind) {
    case KIND_Q4_1: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_1, bias, y, m_rows, n, k); break;
    case KIND_Q4_0: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_0, bias, y, m_rows, n, k); break;
    case KIND_Q4_K: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_K, bias, y, m_rows, n, k); break;
    case KIND_Q5_K: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q5_K, bias, y, m_rows, n, k); break;
    case KIND_Q6_K: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q6_K, bias, y, m_rows, n, k); break;
    default: INT8_NAME(linear_int8_kind)(q, packed, KIND_Q8_0, bias, y, m_rows, n, k);
    }
}
