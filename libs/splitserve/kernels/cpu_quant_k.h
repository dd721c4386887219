/* The K-quant super-blocks of cpu_quant.c (Q4_K, Q5_K, Q6_K): 256 weights of one row each, read in
 * GGUF's own bytes (included by cpu_quant.c inside its AVX2 target; see its notes for the layout).
 *
 *   Q4_K (144 bytes): float16 d, float16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8] (one
 *                     pair per sub-block of 32), 128 bytes qs: byte 32c + l holds weight 64c + l
 *                     (low nibble) and 64c + 32 + l (high nibble)
 *   Q5_K (176 bytes): as Q4_K, with 32 bytes qh before qs: bit s of qh[l] is bit 4 of weight 32s + l
 *   Q6_K (210 bytes): 128 bytes ql (byte 64h + l: low 4 bits of weight 128h + l, high nibble those of
 *                     128h + 64 + l), 64 bytes qh (bits 2i, 2i + 1 of qh[32h + l]: bits 4-5 of weight
 *                     128h + 32i + l), int8 scales sc[16] (one per 16 weights), float16 d last
 *
 * Numerics: the sub-block scales D = d * sc and M = dmin * m are exact float32 products (11-bit
 * float16 significand x 6-bit integer: 17 bits), and so is D * q for Q4_K/Q5_K codes (q < 32: at
 * most 22 bits): a weight fma(D, q, -M) is the one rounding of D * q - M that GGUF's reference
 * (`d * q - dm` in float32) makes, signed zeros included. Q6_K's d * sc (|sc| <= 128: at most 7
 * significant bits) times q - 32 (|q - 32| <= 32: at most 5) is exact too (23 bits): (d * sc) *
 * (q - 32) in float32, the reference's order, is the reference's value, and its
 * sign (a zero's included) is the product of the three signs, as the reference's.
 *
 * Layout: a tile's 4 rows keep their super-blocks whole and unchanged (cpu_quant.c), so a row's
 * scales sit next to its codes and a super-block is read in one forward stream; the scales are
 * decoded once per (row, super-block) into float32 D[], M[] and reused by its 8 sub-blocks. Speed,
 * one thread of a loaded 2-core AMD EPYC VM (CPU time, a [3072, 1536] weight, 2 rows of x): the
 * exact path 1.9 ms (Q4_K), 2.0 (Q5_K), 1.6 (Q6_K) against Q4_1's 1.2; the int8 path 1.2-1.3 ms
 * against Q4_1's 1.0; unpacking the whole weight (the tiled GEMM's share) 1.2, 1.7, 1.9 ms against
 * 1.1. The exact few-row path is the one left to tune.
 */

/* One row's super-block scales as float32: D[s] (Q4_K/Q5_K: sub-block s of 32; Q6_K: D[t] for
 * weights 16t to 16t + 15) and M[s] (Q4_K/Q5_K only). */
static inline __attribute__((always_inline)) void kscales(const uint8_t *row, const int kind, float D[16],
                                                          float M[8]) {
    uint16_t h;
    if (kind == KIND_Q6_K) {
        memcpy(&h, row + 208, sizeof h);
        const float d = _cvtsh_ss(h);
        for (int t = 0; t < 16; t++) D[t] = d * (float)(int8_t)row[192 + t];
        return;
    }
    memcpy(&h, row, sizeof h);
    const float d = _cvtsh_ss(h);
    memcpy(&h, row + 2, sizeof h);
    const float dmin = _cvtsh_ss(h);
    const uint8_t *s = row + 4; /* sub-blocks 0-3: low 6 bits of s[j] and s[j + 4]; 4-7: nibbles of
                                 * s[j + 4] with the top 2 bits of s[j - 4] and s[j] above */
    for (int j = 0; j < 4; j++) {
        D[j] = d * (float)(s[j] & 63);
        M[j] = dmin * (float)(s[j + 4] & 63);
    }
    for (int j = 4; j < 8; j++) {
        D[j] = d * (float)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        M[j] = dmin * (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* The 32 codes of sub-block s (weights 32s to 32s + 31) of a row's super-block, byte i for weight
 * 32s + i: Q4_K 0-15 and Q5_K 0-31 unsigned, Q6_K q - 32 signed (-32 to 31). The 16-bit shifts move
 * bits across byte edges, but the mask after each keeps only bits that came from their own byte. */
static inline __attribute__((always_inline)) __m256i kcodes(const uint8_t *row, const int kind, int s) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    if (kind == KIND_Q6_K) {
        const int h = s >> 2, i = s & 3;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(row + 64 * h + 32 * (i & 1)));
        const __m256i lo = _mm256_and_si256(i >> 1 ? _mm256_srli_epi16(ql, 4) : ql, nib);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(row + 128 + 32 * h));
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * i)), _mm256_set1_epi8(3));
        return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
    }
    const uint8_t *qs = row + (kind == KIND_Q5_K ? 48 : 16) + 32 * (s >> 1);
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)qs);
    const __m256i lo = _mm256_and_si256(s & 1 ? _mm256_srli_epi16(bytes, 4) : bytes, nib);
    if (kind == KIND_Q4_K) return lo;
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(row + 16));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), _mm256_set1_epi8(1));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

/* Sub-block s of a row's super-block as float32 (w[v]: weights 32s + 8v to + 7), GGUF's values. */
static inline __attribute__((always_inline)) void kunpack(const uint8_t *row, const int kind, int s, const float D[16],
                                                          const float M[8], __m256 w[4]) {
    const __m256i c = kcodes(row, kind, s);
    const __m128i half[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
    for (int v = 0; v < 4; v++) {
        const __m128i b = v & 1 ? _mm_srli_si128(half[v >> 1], 8) : half[v >> 1];
        if (kind == KIND_Q6_K) /* weights 0-15 of the sub-block take D[2s], 16-31 D[2s + 1] */
            w[v] = _mm256_mul_ps(_mm256_set1_ps(D[2 * s + (v >> 1)]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
        else
            w[v] = _mm256_fmadd_ps(_mm256_set1_ps(D[s]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                                   _mm256_set1_ps(-M[s]));
    }
}
