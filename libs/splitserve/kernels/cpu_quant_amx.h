/* The int8 kernel of cpu_quant.c on AMX tiles, for many rows of x (prefill chunks, a batch of
 * decodes): the integer sums come from tile dot products, 16 rows of x by 16 weight rows at once,
 * and the float arithmetic after them is the AVX-512 VNNI copy's, operation for operation, so a row
 * gives the same bits here as there (and so on every path: cold, cached, decoded, verified).
 *
 * Every format but Q6_K (one scale a sub-block of 32; `amx_linear_whole`): the weights are the A
 * tiles and x the B tiles, so C = [16 weight rows][16 rows of x] holds a sub-block's whole integer
 * sums (its two halves' in one product).
 *   - A tiles: 16 weight rows' 32 codes of a sub-block, each row in order as the format unpacks it
 *     (`amx_weights`: no transpose), made once per (16 weight rows, sub-block) and used by every
 *     16 rows of x; unsigned codes times signed x (tdpbusd), or Q8_0's signed ones (tdpbssd);
 *   - B tiles: x's codes, 4 bytes of each of 16 rows side by side (`amx_x`, once per call);
 *   - per output, as the VNNI copy's pairs of sub-blocks: float(C) * (dw * dx) fused into the chain
 *     of the sub-block's parity, then the minimum's term mw * s fused, and at the end (even + odd)
 *     + bias; 8 weight rows at a time, 16 chains of 16 rows of x in registers.
 * Q6_K (a scale per half of a sub-block; `amx_rows`) keeps a chain per half, so x is the A tiles:
 *   - a C tile per half: int32 [16 rows of x][16 weight rows], from tdpbssd; the integers equal
 *     dpbusd's on (|w|, x with w's sign) exactly;
 *   - A tiles: x's codes in order (`quantize_x_whole`), 16 rows by the 16 bytes of a half;
 *   - B tiles: a half's codes of 16 weight rows, 4 bytes of a row side by side (tdp's layout: row
 *     p, bytes 4c..4c+3: weights 4p..4p+3 of weight row c), made by the VNNI copy's 4-byte
 *     transpose of each packed tile of 4 rows (`amx_prep`), once per (16 weight rows, sub-block),
 *     then used by every 16 rows of x;
 *   - the tile products of AMX_CHUNK sub-blocks are issued (over two pairs of C tiles by turns)
 *     and stored before their float arithmetic runs, 4 rows of x at a time: 8 accumulators of 16
 *     lanes in registers, independent chains.
 * One tdp takes ~16 cycles whatever its depth; the float arithmetic after the tiles and preparing
 * the weights' tiles are what bound it (below ~12 rows the preparation costs more than the tiles
 * save: AMX_MIN_ROWS in cpu_quant.c).
 *
 * Linux hands out AMX state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, once, on
 * the first call that would use it: `amx_ready` in cpu_quant.c); each thread loads the tile
 * configuration at the start of its share of a call and releases the tiles at the end. */

#define AMX_N 16 /* weight rows of a B tile: 4 packed tiles of TILE_N */
#define AMX_M 16 /* rows of x of an A tile */

/* Q6_K, one (16 weight rows, sub-block): the B tiles of both halves, the halves' scales (what
 * INT8_NAME(Prep) holds for 4 weight rows, for 16) */
typedef struct {
    uint8_t b[2][4][64];
    float d[2][AMX_N];
} __attribute__((aligned(64))) AmxPrep;

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) AmxConfig;

/* A thread's buffer of a call (64-byte aligned); NULL, with *failed set, when out of memory */
static inline void *amx_thread_buffer(size_t bytes, int *failed) {
    void *p = aligned_alloc(64, bytes);
    if (p == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* Q6_K: tiles 0-1 and 6-7: C of the two halves (two sub-blocks); 2-3: A (x's codes) of the two
 * halves; 4-5: B of the two halves */
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

/* Q6_K: sub-block s of super-block b of column tile ct (weight rows 16 ct ..): its B tiles and the
 * halves' scales. Packed tiles past the weight's (the last column tile of an n not a multiple of 16)
 * are zeros. */
static inline __attribute__((always_inline)) void amx_prep(const uint8_t *packed, long ct, long tiles, long blocks,
                                                          size_t group_bytes, long b, int s, const KScales4 *ks,
                                                          AmxPrep *p) {
    for (int g = 0; g < AMX_N / TILE_N; g++) {
        const long t = ct * (AMX_N / TILE_N) + g;
        if (t >= tiles) {
            for (int h = 0; h < 2; h++)
                for (int v = 0; v < 4; v++) memset(&p->b[h][v][g * 16], 0, 16);
            for (int j = 0; j < TILE_N; j++) p->d[0][g * 4 + j] = p->d[1][g * 4 + j] = 0.0f;
            continue;
        }
        const uint8_t *group = packed + ((size_t)t * blocks + b) * group_bytes;
        __m256i c[4], tr[4];
        for (int j = 0; j < TILE_N; j++) c[j] = kcodes(group + j * K_BYTES(KIND_Q6_K), KIND_Q6_K, s);
        transpose_avx512vnni(c, tr);
        for (int v = 0; v < 4; v++) {
            _mm_storeu_si128((__m128i *)&p->b[0][v][g * 16], _mm256_castsi256_si128(tr[v]));
            _mm_storeu_si128((__m128i *)&p->b[1][v][g * 16], _mm256_extracti128_si256(tr[v], 1));
        }
        _mm_storeu_ps(&p->d[0][g * 4], _mm_loadu_ps(ks[g].d[2 * s]));
        _mm_storeu_ps(&p->d[1][g * 4], _mm_loadu_ps(ks[g].d[2 * s + 1]));
    }
}

#define AMX_CHUNK 8 /* sub-blocks whose tile products are stored before their float arithmetic runs */

/* Q6_K: rows r0 .. r0 + mb - 1 (mb <= 16) of x against column tile ct, every sub-block prepared in
 * `preps`: y's nb (<= 16) columns from n0. The tile products of AMX_CHUNK sub-blocks are issued
 * and stored first, then their float arithmetic runs 4 rows at a time (their 8 accumulators stay
 * in registers over the chunk): the tiles' latency is not waited for once a sub-block, and the
 * stored products are read well after they were written. */
static inline __attribute__((always_inline)) void amx_rows(const int8_t *codes, const float *xd, long r0, int mb,
                                                          long k, const AmxPrep *preps, const float *bias, float *y,
                                                          long n, long n0, int nb) {
    const long xblocks = k / QBLOCK;
    __m512 acc[AMX_M][2];
    int32_t cbuf[AMX_CHUNK][2][AMX_M][AMX_N] __attribute__((aligned(64)));
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long x0 = 0; x0 < xblocks; x0 += AMX_CHUNK) {
        const int nx = xblocks - x0 < AMX_CHUNK ? (int)(xblocks - x0) : AMX_CHUNK;
        /* two pairs of C tiles, by turns (0-1, 6-7): a sub-block's products are stored after the
         * next one's are issued, so the tiles never wait on their own latency. (Tile numbers are
         * immediates: the pair is a macro argument.) */
#define AMX_PRODUCTS(C0, C1)    \
    do {                        \
        _tile_zero(C0);         \
        _tile_zero(C1);         \
        _tile_dpbssd(C0, 2, 4); \
        _tile_dpbssd(C1, 3, 5); \
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
                const __m512 d0 = _mm512_load_ps(p->d[0]), d1 = _mm512_load_ps(p->d[1]);
                for (int i = 0; i < 4; i++) {
                    if (i >= ni) break;
                    const long at = (r0 + i0 + i) * xblocks + x0 + c;
                    const __m512 vxd = _mm512_set1_ps(xd[at]);
                    const __m512 dd0 = _mm512_mul_ps(d0, vxd), dd1 = _mm512_mul_ps(d1, vxd);
                    a0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][0][i0 + i])), dd0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][1][i0 + i])), dd1, a1[i]);
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

/* Every kind with one scale a sub-block (all but Q6_K) runs the other way round: the weights are the
 * A tiles and x the B tiles, C = [16 weight rows][16 rows of x]. A weight row's 32 codes of a
 * sub-block are then 32 bytes in order, as the formats unpack them (no 4-byte transpose), and x's
 * B tiles (4 bytes of a row side by side) are made once per call. Each sub-block is one tile product
 * (its two halves' integers summed: exact), its float arithmetic once, into the chain of its parity,
 * as the VNNI copy's pairs of sub-blocks (cpu_quant_int8.h): per output, acc_even or acc_odd =
 * fma(float(C), weight scale * dx, acc), then the minimum's term, fma(m, xs, acc); at the end
 * (acc_even + acc_odd) + bias. */

/* One (16 weight rows, sub-block): the A tile (row j: weight row j's 32 codes), scales, minimums'
 * coefficients (0 for Q8_0) */
typedef struct {
    uint8_t a[AMX_N][QBLOCK];
    float d[AMX_N];
    float m[AMX_N];
} __attribute__((aligned(64))) AmxWeights;

/* x by tiles of 16 rows and sub-blocks: the B tile [8][16 rows][4 bytes] and the 16 rows' dx and xs
 * side by side (rows past m: zeros) */
typedef struct {
    int8_t b[QBLOCK / 4][AMX_M][4];
    float d[AMX_M];
    float s[AMX_M];
} __attribute__((aligned(64))) AmxX;

static void amx_configure_whole(void) {
    AmxConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.colsb[0] = c.colsb[6] = AMX_M * 4; /* C: 16 weight rows by 16 rows of x */
    c.rows[0] = c.rows[6] = AMX_N;
    c.colsb[2] = QBLOCK; /* A: 16 weight rows' codes */
    c.rows[2] = AMX_N;
    c.colsb[4] = AMX_M * 4; /* B: x's codes, 4 bytes a row side by side */
    c.rows[4] = QBLOCK / 4;
    _tile_loadconfig(&c);
}

/* The A tiles, scales and minimums of column tile ct (weight rows 16 ct ..), every sub-block; rows
 * past the weight's (the last column tile) are zeros. */
static inline __attribute__((always_inline)) void amx_weights(const uint8_t *packed, const int kind, long ct,
                                                             long tiles, long blocks, size_t group_bytes,
                                                             AmxWeights *w) {
    for (int g = 0; g < AMX_N / TILE_N; g++) {
        const long t = ct * (AMX_N / TILE_N) + g;
        if (t >= tiles) {
            for (long xb = 0; xb < blocks * SUBS(kind); xb++) {
                memset(w[xb].a[g * TILE_N], 0, TILE_N * QBLOCK);
                for (int j = 0; j < TILE_N; j++) w[xb].d[g * TILE_N + j] = w[xb].m[g * TILE_N + j] = 0.0f;
            }
            continue;
        }
        const uint8_t *groups = packed + (size_t)t * blocks * group_bytes;
        for (long b = 0; b < blocks; b++) {
            const uint8_t *group = groups + b * group_bytes; /* asked for while the tile before computed */
            if (IS_K(kind)) {
                KScales4 ks;
                kscales4(group, kind, &ks);
                for (int s = 0; s < SUBS(kind); s++) {
                    AmxWeights *ws = w + b * SUBS(kind) + s;
                    for (int j = 0; j < TILE_N; j++)
                        _mm256_store_si256((__m256i *)ws->a[g * TILE_N + j], kcodes(group + j * K_BYTES(kind), kind, s));
                    _mm_storeu_ps(&ws->d[g * TILE_N], _mm_loadu_ps(ks.d[s]));
                    _mm_storeu_ps(&ws->m[g * TILE_N], _mm_sub_ps(_mm_setzero_ps(), _mm_loadu_ps(ks.m[s])));
                }
                continue;
            }
            AmxWeights *ws = w + b;
            const uint8_t *codes = ROW_CODES_AT(group, kind, 0);
            if (kind == KIND_Q8_0) { /* 4 rows of 32 codes, one after the other */
                _mm512_store_si512(ws->a[g * TILE_N], _mm512_loadu_si512(codes));
                _mm512_store_si512(ws->a[g * TILE_N + 2], _mm512_loadu_si512(codes + 64));
            } else { /* 4 rows of 16 bytes: row j's low nibbles are its codes 0-15, the high ones 16-31 */
                const __m512i v = _mm512_loadu_si512(codes), nib = _mm512_set1_epi8(0x0F);
                const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                /* [lo j | hi j] for rows 0-1, then 2-3 (64-bit lanes: lo's 0-7, hi's 8-15) */
                _mm512_store_si512(ws->a[g * TILE_N],
                                   _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi));
                _mm512_store_si512(ws->a[g * TILE_N + 2],
                                   _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi));
            }
            const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)group));
            __m128 m = _mm_setzero_ps();
            if (kind == KIND_Q4_1) m = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + 8)));
            else if (kind == KIND_Q4_0) m = _mm_mul_ps(d, _mm_set1_ps(-8.0f));
            _mm_storeu_ps(&ws->d[g * TILE_N], d);
            _mm_storeu_ps(&ws->m[g * TILE_N], m);
        }
    }
}

/* x's B tiles, scales and block sums for rows 16 rt .. 16 rt + 15 (those from m_rows on: zeros) */
static inline void amx_x(const int8_t *codes, const float *xd, const float *xs, long rt, long m_rows, long k,
                         AmxX *xt) {
    const long xblocks = k / QBLOCK;
    for (long xb = 0; xb < xblocks; xb++) {
        AmxX *t = xt + xb;
        for (int i = 0; i < AMX_M; i++) {
            const long r = rt * AMX_M + i;
            const int8_t *src = codes + (size_t)r * k + xb * QBLOCK; /* rows past m_rows: zeros already */
            for (int p = 0; p < QBLOCK / 4; p++) memcpy(t->b[p][i], src + 4 * p, 4);
            t->d[i] = r < m_rows ? xd[r * xblocks + xb] : 0.0f;
            t->s[i] = r < m_rows ? xs[r * xblocks + xb] : 0.0f;
        }
    }
}

/* The outputs of column tile ct (nb <= 16 weight rows from n0) for the rows of x tile rt (mb <= 16
 * from r0), every sub-block's A tile in `w`. */
static inline __attribute__((always_inline)) void amx_tile_whole(const AmxWeights *w, const AmxX *xt, long xblocks,
                                                                const int kind, const float *bias, float *y,
                                                                long n, long n0, int nb, long r0, int mb,
                                                                const char *next, size_t next_bytes) {
    const int is_signed = kind == KIND_Q8_0;
    __m512 acc[2][AMX_N]; /* [parity][weight row]: 16 rows of x a vector */
    int32_t cbuf[AMX_CHUNK][AMX_N][AMX_M] __attribute__((aligned(64)));
    for (int j = 0; j < AMX_N; j++) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
    for (long x0 = 0; x0 < xblocks; x0 += AMX_CHUNK) { /* x0 even: c's parity is the sub-block's */
        const int nx = xblocks - x0 < AMX_CHUNK ? (int)(xblocks - x0) : AMX_CHUNK;
        /* C tiles 0 and 6 by turns: a sub-block's product is stored after the next one's is issued */
#define AMX_PRODUCT(C)              \
    do {                            \
        _tile_zero(C);              \
        if (is_signed)              \
            _tile_dpbssd(C, 2, 4);  \
        else                        \
            _tile_dpbusd(C, 2, 4);  \
    } while (0)
        for (int c = 0; c < nx; c++) {
            /* the next column tile's blocks, a share a sub-block: its unpacking then reads cached
             * lines, and the memory works while the tiles compute (asked for all at once, or while
             * unpacking, the loads waited on memory for a third of the kernel's time) */
            for (size_t at = (size_t)(x0 + c) * next_bytes / xblocks; at < (size_t)(x0 + c + 1) * next_bytes / xblocks;
                 at += 64)
                _mm_prefetch(next + at, _MM_HINT_T0);
            _tile_loadd(2, w[x0 + c].a, QBLOCK);
            _tile_loadd(4, xt[x0 + c].b, AMX_M * 4);
            if (c & 1) {
                AMX_PRODUCT(6);
                _tile_stored(0, cbuf[c - 1], AMX_M * 4);
            } else {
                AMX_PRODUCT(0);
                if (c > 0) _tile_stored(6, cbuf[c - 1], AMX_M * 4);
            }
        }
        if (nx & 1)
            _tile_stored(0, cbuf[nx - 1], AMX_M * 4);
        else
            _tile_stored(6, cbuf[nx - 1], AMX_M * 4);
#undef AMX_PRODUCT
        for (int j0 = 0; j0 < AMX_N; j0 += 8) { /* 8 weight rows at a time: 16 chains in registers */
            __m512 a[2][8];
            for (int j = 0; j < 8; j++) a[0][j] = acc[0][j0 + j], a[1][j] = acc[1][j0 + j];
            for (int c = 0; c < nx; c++) {
                const AmxWeights *ws = w + x0 + c;
                const __m512 dx = _mm512_load_ps(xt[x0 + c].d), sx = _mm512_load_ps(xt[x0 + c].s);
                __m512 *ac = a[c & 1];
                for (int j = 0; j < 8; j++) {
                    const __m512 dd = _mm512_mul_ps(_mm512_set1_ps(ws->d[j0 + j]), dx);
                    ac[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][j0 + j])), dd, ac[j]);
                    if (!is_signed) ac[j] = _mm512_fmadd_ps(_mm512_set1_ps(ws->m[j0 + j]), sx, ac[j]);
                }
            }
            for (int j = 0; j < 8; j++) acc[0][j0 + j] = a[0][j], acc[1][j0 + j] = a[1][j];
        }
    }
    float out[AMX_N][AMX_M] __attribute__((aligned(64)));
    for (int j = 0; j < AMX_N; j++)
        _mm512_store_ps(out[j], _mm512_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]),
                                              _mm512_set1_ps(bias && j < nb ? bias[n0 + j] : 0.0f)));
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) y[(r0 + i) * n + n0 + j] = out[j][i];
}

/* y = x @ W^T (+ bias), every kind but Q6_K: x's B tiles made first (the team splits them), then the
 * column tiles split over the team, each one's A tiles made once for every tile of x's rows. */
static inline __attribute__((always_inline)) int amx_linear_whole(const int8_t *codes, const float *xd,
                                                                 const float *xs, const uint8_t *packed,
                                                                 const int kind, const float *bias, float *y,
                                                                 long m_rows, long n, long k) {
    const long blocks = k / BLOCK_WEIGHTS(kind), tiles = (n + TILE_N - 1) / TILE_N, xblocks = k / QBLOCK;
    const long ctiles = (n + AMX_N - 1) / AMX_N, rtiles = (m_rows + AMX_M - 1) / AMX_M;
    const size_t group_bytes = GROUP_BYTES(kind);
    AmxX *xt = aligned_alloc(64, (size_t)rtiles * xblocks * sizeof(AmxX));
    if (xt == NULL) return -1;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long rt = 0; rt < rtiles; rt++) amx_x(codes, xd, xs, rt, m_rows, k, xt + rt * xblocks);
        AmxWeights *w = amx_thread_buffer((size_t)xblocks * sizeof(AmxWeights), &failed);
        amx_configure_whole();
        /* the column tiles in contiguous shares of the team (as a static schedule), so that a thread
         * knows which one it takes next */
        const long nthreads = omp_get_num_threads(), id = omp_get_thread_num();
        const long share = ctiles / nthreads, extra = ctiles % nthreads;
        const long lo = id * share + (id < extra ? id : extra), hi = lo + share + (id < extra);
        const size_t ct_bytes = (size_t)(AMX_N / TILE_N) * blocks * group_bytes; /* a column tile's blocks */
        for (long ct = lo; ct < hi && w != NULL; ct++) {
            amx_weights(packed, kind, ct, tiles, blocks, group_bytes, w);
            const long n0 = ct * AMX_N;
            const int nb = n - n0 < AMX_N ? (int)(n - n0) : AMX_N;
            /* the next tile's blocks (its last: the weight's end, as far as they go) */
            const size_t next_at = (size_t)(ct + 1) * ct_bytes, total = (size_t)tiles * blocks * group_bytes;
            size_t next_bytes = 0;
            if (ct + 1 < hi && next_at < total) next_bytes = total - next_at < ct_bytes ? total - next_at : ct_bytes;
            for (long rt = 0; rt < rtiles; rt++) {
                const long r0 = rt * AMX_M;
                const int mb = m_rows - r0 < AMX_M ? (int)(m_rows - r0) : AMX_M;
                amx_tile_whole(w, xt + rt * xblocks, xblocks, kind, bias, y, n, n0, nb, r0, mb,
                               (const char *)packed + next_at, rt == 0 ? next_bytes : 0);
            }
        }
        _tile_release();
        free(w);
    }
    free(xt);
    return failed ? -1 : 0;
}

/* Q6_K: y = x @ W^T (+ bias) for x's plain codes (`quantize_x_whole`, rows padded to a multiple of
 * 16 with zeros), split by column tiles of 16 weight rows over the OpenMP team. -1 when out of
 * memory. */
static int amx_linear_q6_k(const int8_t *codes, const float *xd, const uint8_t *packed, const float *bias, float *y,
                           long m_rows, long n, long k) {
    const long blocks = k / SUPER, tiles = (n + TILE_N - 1) / TILE_N, xblocks = k / QBLOCK;
    const long ctiles = (n + AMX_N - 1) / AMX_N;
    const size_t group_bytes = GROUP_BYTES(KIND_Q6_K);
    int failed = 0;
#pragma omp parallel
    {
        AmxPrep *preps = amx_thread_buffer((size_t)xblocks * sizeof(AmxPrep), &failed);
        amx_configure();
#pragma omp for schedule(static)
        for (long ct = 0; ct < ctiles; ct++) {
            if (preps == NULL) continue;
            for (long b = 0; b < blocks; b++) {
                KScales4 ks[AMX_N / TILE_N];
                for (int g = 0; g < AMX_N / TILE_N; g++) { /* 4 streams of weights from memory: ask ahead */
                    const uint8_t *group = packed + ((size_t)(ct * (AMX_N / TILE_N) + g) * blocks + b) * group_bytes;
                    _mm_prefetch((const char *)group + PREFETCH_AHEAD, _MM_HINT_T0);
                    if (ct * (AMX_N / TILE_N) + g < tiles) kscales4(group, KIND_Q6_K, &ks[g]);
                }
                for (int s = 0; s < SUBS(KIND_Q6_K); s++)
                    amx_prep(packed, ct, tiles, blocks, group_bytes, b, s, ks, preps + b * SUBS(KIND_Q6_K) + s);
            }
            const long n0 = ct * AMX_N;
            const int nb = n - n0 < AMX_N ? (int)(n - n0) : AMX_N;
            for (long r0 = 0; r0 < m_rows; r0 += AMX_M) {
                const int mb = m_rows - r0 < AMX_M ? (int)(m_rows - r0) : AMX_M;
                amx_rows(codes, xd, r0, mb, k, preps, bias, y, n, n0, nb);
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
    case KIND_Q4_1: return amx_linear_whole(codes, xd, xs, packed, KIND_Q4_1, bias, y, m_rows, n, k);
    case KIND_Q4_0: return amx_linear_whole(codes, xd, xs, packed, KIND_Q4_0, bias, y, m_rows, n, k);
    case KIND_Q4_K: return amx_linear_whole(codes, xd, xs, packed, KIND_Q4_K, bias, y, m_rows, n, k);
    case KIND_Q5_K: return amx_linear_whole(codes, xd, xs, packed, KIND_Q5_K, bias, y, m_rows, n, k);
    case KIND_Q6_K: return amx_linear_q6_k(codes, xd, packed, bias, y, m_rows, n, k);
    default: return amx_linear_whole(codes, xd, xs, packed, KIND_Q8_0, bias, y, m_rows, n, k);
    }
}
