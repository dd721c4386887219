/* The attention of a run of query rows, included twice by cpu_attention.c: WIDE 0 (AVX2 + FMA, 8 floats
 * a vector) and WIDE 1 (AVX-512, 16 floats a vector; ROWS_FN names each copy's functions). The wide
 * copy scores two keys per vector, each in its own 8 lanes (the keys gathered `paired`), and sums
 * values 16 floats at a time: per float, the same products, fused multiply-adds and sums in the same
 * order as the narrow copy, so the two give the same bits. */
#if WIDE
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline v16f fma16(v16f a, v16f b, v16f c) { return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static inline v16f splat16(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline v16f pair8(v8f lo, v8f hi) { return (v16f)_mm512_insertf32x8(_mm512_castps256_ps512((__m256)lo), (__m256)hi, 1); }
static inline v8f low8(v16f v) { return (v8f)_mm512_castps512_ps256((__m512)v); }
static inline v8f high8(v16f v) { return (v8f)_mm512_extractf32x8_ps((__m512)v, 1); }

/* key_lanes for the two keys of a pair at once (k: the pair's rows, [nvec][2][8]) */
static inline __attribute__((always_inline)) v16f pair_lanes(const v16f *qg2, const float *k, const int nvec) {
    if (nvec == 1) return qg2[0] * load16(k);
    v16f sv = fma16(qg2[0], load16(k), qg2[1] * load16(k + 16));
    for (int i = 2; i < nvec; i++) sv = fma16(qg2[i], load16(k + i * 16), sv);
    return sv;
}
#endif

/* One kv head of `nrows` query rows of one sequence, at consecutive positions (row r attends to
 * len0 + r tokens: a decode row, or the rows of a prefill chunk or of a verified proposal, each up to
 * its own position): row r's q [group][dim] (its query heads, consecutive) at q + r * q_stride, its
 * out likewise. A chunk of keys and values is gathered once for all the rows; each row's arithmetic
 * is the one a row alone gets (the same chunks, scores, softmax and sums in the same order), so a
 * row's output does not depend on the rows beside it. Inlined into one copy per head size, so that
 * the loops over dim unroll and a query head's accumulator stays in registers. */
static inline __attribute__((always_inline)) void ROWS_FN(attend_impl)(
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
    float rows[(CHUNK + 1) * MAX_HEAD_DIM] __attribute__((aligned(64))); /* + an odd key's partner */
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
        const int next_n = start + CHUNK < len_max ? chunk_keys(len_max, start + CHUNK) : 0;
        if (next_n) prefetch_rows(k_cache, table, start + CHUNK, next_n, block_size, row_stride, head_offset, (size_t)dim * elem);
        gather_chunk(k_cache, kind, k_scales, kv_heads, table, start, n_max, block_size, row_stride, head_offset,
                     nvec, rows, WIDE);
        /* the (row, head) pairs this chunk reaches, in order: their scores (exp'd in place), keys, sum
         * and accumulator, for the interleaved sums and, in the wide copy, the paired value sums */
        float corr[MAX_RUN][MAX_GROUP], sum[MAX_RUN][MAX_GROUP];
        const float *sum_of[MAX_RUN * MAX_GROUP];
        float *sum_to[MAX_RUN * MAX_GROUP];
        v8f *acc_of[MAX_RUN * MAX_GROUP];
        int sum_len[MAX_RUN * MAX_GROUP], count = 0;
        for (int r = 0; r < nrows; r++) {
            const int n = chunk_keys(len0 + r, start);
            if (n <= 0) continue;
            const float *qr = q + (size_t)r * q_stride;
            for (int g = 0; g < group; g++) {
                v8f qg[MAX_HEAD_DIM / 8];
                for (int i = 0; i < nvec; i++) qg[i] = load8(qr + (size_t)g * dim + i * 8) * splat(scale);
                int t = 0;
#if WIDE
                /* two keys a vector (the paired rows): lanes 0-7 one key's, 8-15 the next one's, each
                 * lane the very products and sums of key_lanes */
                v16f qg2[MAX_HEAD_DIM / 8];
                for (int i = 0; i < nvec; i++) qg2[i] = pair8(qg[i], qg[i]);
                for (; t + 8 <= n; t += 8) {
                    v8f sv[8];
                    for (int j = 0; j < 4; j++) {
                        const v16f kv = pair_lanes(qg2, rows + (size_t)(t / 2 + j) * dim * 2, nvec);
                        sv[2 * j] = low8(kv), sv[2 * j + 1] = high8(kv);
                    }
                    store8(&scores[r][g][t], hsum8(sv));
                }
                for (; t < n; t += 2) { /* the odd last key's partner is the zeros gather_chunk put */
                    const v16f kv = pair_lanes(qg2, rows + (size_t)(t / 2) * dim * 2, nvec);
                    scores[r][g][t] = hsum(low8(kv));
                    if (t + 1 < n) scores[r][g][t + 1] = hsum(high8(kv));
                }
#else
                for (; t + 8 <= n; t += 8) { /* 8 keys' lane sums, then their 8 hsums at once */
                    v8f sv[8];
                    for (int j = 0; j < 8; j++) sv[j] = key_lanes(qg, rows + (size_t)(t + j) * dim, nvec);
                    store8(&scores[r][g][t], hsum8(sv));
                }
                for (; t < n; t++) scores[r][g][t] = hsum(key_lanes(qg, rows + (size_t)t * dim, nvec));
#endif
            }
            for (int g = 0; g < group; g++) {
                const float mx = max_scores(scores[r][g], n, m[r][g]);
                corr[r][g] = expf(m[r][g] - mx); /* 0 on the first chunk (m = -inf) */
                m[r][g] = mx;
                const int padded = (n + 7) & ~7;
                for (int t = n; t < padded; t++) scores[r][g][t] = mx; /* exp'd, never used */
                for (int t = 0; t < padded; t += 8)
                    store8(&scores[r][g][t], exp_nonpositive(load8(&scores[r][g][t]) - splat(mx)));
                sum_of[count] = scores[r][g], sum_len[count] = n, acc_of[count] = acc[r][g], sum_to[count++] = &sum[r][g];
            }
        }
        sum_rows(sum_of, sum_len, sum_to, count); /* the rows' and heads' sums, interleaved */
        for (int r = 0; r < nrows; r++) {
            if (chunk_keys(len0 + r, start) <= 0) continue;
            for (int g = 0; g < group; g++) {
                l[r][g] = l[r][g] * corr[r][g] + sum[r][g];
                if (corr[r][g] != 1.0f)
                    for (int i = 0; i < nvec; i++) acc[r][g][i] *= splat(corr[r][g]);
            }
        }
        if (next_n) prefetch_rows(v_cache, table, start + CHUNK, next_n, block_size, row_stride, head_offset, (size_t)dim * elem);
        gather_chunk(v_cache, kind, v_scales, kv_heads, table, start, n_max, block_size, row_stride, head_offset,
                     nvec, rows, 0);
#if WIDE
        if (!(nvec & 1)) { /* 16 of the value's floats a vector, two query heads at once (of the
                            * rows' heads with the same keys): each lane's sum as the narrow copy's,
                            * with twice the independent chains of fused multiply-adds */
            for (int k = 0; k < count;) {
                const int both = k + 1 < count && sum_len[k + 1] == sum_len[k];
                v8f *acc0 = acc_of[k], *acc1 = acc_of[k + both];
                const float *s0 = sum_of[k], *s1 = sum_of[k + both];
                v16f a0[MAX_HEAD_DIM / 16], a1[MAX_HEAD_DIM / 16];
                for (int i = 0; i < nvec / 2; i++) a0[i] = pair8(acc0[2 * i], acc0[2 * i + 1]), a1[i] = a0[i];
                if (both) {
                    for (int i = 0; i < nvec / 2; i++) a1[i] = pair8(acc1[2 * i], acc1[2 * i + 1]);
                    for (int t = 0; t < sum_len[k]; t++) {
                        const v16f p0 = splat16(s0[t]), p1 = splat16(s1[t]);
                        const float *v = rows + (size_t)t * dim;
                        for (int i = 0; i < nvec / 2; i++) {
                            const v16f x = load16(v + i * 16);
                            a0[i] += p0 * x;
                            a1[i] += p1 * x;
                        }
                    }
                    for (int i = 0; i < nvec / 2; i++) acc1[2 * i] = low8(a1[i]), acc1[2 * i + 1] = high8(a1[i]);
                } else {
                    for (int t = 0; t < sum_len[k]; t++) {
                        const v16f p0 = splat16(s0[t]);
                        const float *v = rows + (size_t)t * dim;
                        for (int i = 0; i < nvec / 2; i++) a0[i] += p0 * load16(v + i * 16);
                    }
                }
                for (int i = 0; i < nvec / 2; i++) acc0[2 * i] = low8(a0[i]), acc0[2 * i + 1] = high8(a0[i]);
                k += 1 + both;
            }
            continue;
        }
#endif
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

#ifndef ATTEND_ARGS
#define ATTEND_ARGS                                                                                               \
    const float *q, size_t q_stride, const char *kc, const char *vc, int kind, const float *ks, const float *vs, \
        const int32_t *table, int len0, int nrows, int block_size, int kv_heads, int kv_head, int group, float scale, \
        float *out
#define ATTEND_PASS q, q_stride, kc, vc, kind, ks, vs, table, len0, nrows, block_size, kv_heads, kv_head, group, scale, out
#endif
/* one copy per head size, and within it one for a single row (a decode: fixed-size arrays) */
#define ATTEND_FOR(NVEC)                                                                                   \
    static void ROWS_FN(attend_##NVEC)(ATTEND_ARGS) {                                                      \
        if (nrows == 1)                                                                                    \
            ROWS_FN(attend_impl)(q, q_stride, kc, vc, kind, ks, vs, table, len0, 1, block_size, kv_heads, \
                                 kv_head, group, scale, out, NVEC);                                        \
        else                                                                                               \
            ROWS_FN(attend_impl)(ATTEND_PASS, NVEC);                                                       \
    }
ATTEND_FOR(4)  /* head_dim 32 */
ATTEND_FOR(8)  /* 64 */
ATTEND_FOR(16) /* 128 */
#undef ATTEND_FOR

static void ROWS_FN(attend_any)(ATTEND_ARGS, int dim) {
    switch (dim) {
    case 32: ROWS_FN(attend_4)(ATTEND_PASS); break;
    case 64: ROWS_FN(attend_8)(ATTEND_PASS); break;
    case 128: ROWS_FN(attend_16)(ATTEND_PASS); break;
    default: ROWS_FN(attend_impl)(ATTEND_PASS, dim / 8);
    }
}

