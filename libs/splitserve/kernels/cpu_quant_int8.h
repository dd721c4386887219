/* The int8 kernel of cpu_quant.c (see its notes there), written once and compiled twice, by
 * including this file under two instruction sets: INT8_DOT(u, s) is the sum over each 4 bytes of
 * u[i] * s[i] (u unsigned, s signed) in 8 int32 lanes, INT8_NAME(f) names this copy's functions. */

static inline __attribute__((always_inline)) __m256i INT8_NAME(block_dot)(__m256i w, __m256i xc, const int kind) {
    if (kind == KIND_Q8_0) /* signed x signed: |w| times x with w's sign */
        return INT8_DOT(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xc, w));
    return INT8_DOT(w, xc);
}

/* y[i][j] for rows i < mb of quantized x (codes at xc + i * k) and weight rows j < nb of a tile. */
static inline __attribute__((always_inline)) void INT8_NAME(int8_rows)(XQ q, long i0, long k, const uint8_t *groups,
                                                           size_t group_bytes, const int kind, const float *bias,
                                                           float *y, long ldy, const int mb, const int nb) {
    const long blocks = k / QBLOCK;
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
            const float dw = group_half(group, j), mw = kind == KIND_Q4_1 ? group_half(group, TILE_N + j) : 0.0f;
            const __m256i w = weight_codes(group, kind, j);
            for (int i = 0; i < mb; i++) {
                const long r = i0 + i;
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(q.codes + r * k + b * QBLOCK));
                const __m256 p = _mm256_cvtepi32_ps(INT8_NAME(block_dot)(w, xv, kind));
                acc[i][j] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * q.d[r * blocks + b]), acc[i][j]);
                if (kind == KIND_Q4_1) corr[i][j] = __builtin_fmaf(mw, q.s[r * blocks + b], corr[i][j]);
                else if (kind == KIND_Q4_0) corr[i][j] = __builtin_fmaf(dw, q.s[r * blocks + b], corr[i][j]);
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            float v = hsum((v8f)acc[i][j]);
            if (kind == KIND_Q4_1) v += corr[i][j];
            else if (kind == KIND_Q4_0) v = __builtin_fmaf(-8.0f, corr[i][j], v);
            y[i * ldy + j] = v + (bias ? bias[j] : 0.0f);
        }
}

static inline __attribute__((always_inline)) void INT8_NAME(linear_int8_kind)(XQ q, const uint8_t *packed, const int kind,
                                                                  const float *bias, float *y, long m_rows, long n,
                                                                  long k) {
    const long blocks = k / QBLOCK, tiles = (n + TILE_N - 1) / TILE_N;
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
    if (kind == KIND_Q4_1) INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    else if (kind == KIND_Q4_0) INT8_NAME(linear_int8_kind)(q, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    else INT8_NAME(linear_int8_kind)(q, packed, KIND_Q8_0, bias, y, m_rows, n, k);
}
