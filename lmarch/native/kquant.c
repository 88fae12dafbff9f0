/*
 * Matrix products with weights in GGUF's Q4_K, Q5_K and Q6_K super-block formats, as stored.
 *
 * A super-block holds 256 weights of a row (layouts in lmarch/weights/gguf_kquants.py):
 *
 *     Q4_K:  w = d sc_j q - dmin m_j     8 sub-blocks of 32, q in 0..15, sc_j, m_j 6-bit
 *     Q5_K:  the same with q in 0..31    (a fifth bit per weight from a bit plane qh)
 *     Q6_K:  w = d sc_j q                16 sub-blocks of 16, q in -32..31, sc_j int8
 *
 * The activations are quantised per block of 32 to 16-bit integers exactly as for Q4_1
 * (kernels.h: x_i ~= e p_i, plus the float sum of each block), so that each super-block of a
 * weight row contributes, over its eight blocks a of 32 activations,
 *
 *     Q4_K, Q5_K:  sum_a [ d e_a sum_i (sc_j q_i) p_i  -  dmin m_a sum_i x_i ]
 *     Q6_K:        sum_a   d e_a sum_i (sc_j q_i) p_i
 *
 * Two paths. Decoding (one activation row, AVX2): each super-block is read straight from its
 * bytes, the codes widened in registers and each block's integer sum scaled by d sc_j e_a, as
 * the Q4_1 kernel does (about as fast as Q4_1 per weight). Several rows (a prompt), or no AVX2:
 * a super-block is unpacked once into int16 codes with the small scale folded in
 * (|sc q| <= 945 for Q4_K, 1953 for Q5_K, 4096 for Q6_K: all fit int16 and keep a pair of
 * products below 2^31) and then used for up to KQ_ROWS activation rows.
 */
#include "kernels.h"

#define QK_K 256
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176
#define Q6_K_BYTES 210

enum kquant_type { KQ4, KQ5, KQ6 };
static const int64_t KQ_BYTES[3] = {Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES};

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

/* Sub-block j's 6-bit scale and min of a Q4_K super-block (llama.cpp's get_scale_min_k4). */
static inline void k4_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One Q4_K (qh NULL) or Q5_K super-block -> codes sc_j q [256], its d, and dmin m_j per block
 * of 32 [8]. Q5_K's fifth bit of weight i of run j is bit j of qh[i]. */
static inline float unpack_k4(const uint8_t *blk, const uint8_t *qs, const uint8_t *qh,
                              int16_t *q, float *mins) {
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t *scales = blk + 4;
    int sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
        k4_scale_min(scales, j, &sc[j], &mn[j]);
        mins[j] = dmin * (float)mn[j];
    }
#ifdef __AVX2__
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m256i bits = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) { /* 32 bytes: low nibbles run 2c, high nibbles run 2c + 1 */
        const __m256i r = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        __m256i runs[2] = {_mm256_and_si256(r, m4), _mm256_and_si256(_mm256_srli_epi16(r, 4), m4)};
        for (int t = 0; t < 2; t++) {
            const __m256i fifth = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * c + t), one);
            runs[t] = _mm256_or_si256(runs[t], _mm256_slli_epi16(fifth, 4));
            const __m256i s16 = _mm256_set1_epi16((int16_t)sc[2 * c + t]);
            __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(runs[t]));
            __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(runs[t], 1));
            int16_t *dst = q + 32 * (2 * c + t);
            _mm256_store_si256((__m256i *)dst, _mm256_mullo_epi16(lo, s16));
            _mm256_store_si256((__m256i *)(dst + 16), _mm256_mullo_epi16(hi, s16));
        }
    }
#else
    for (int j = 0; j < 8; j++) {
        const uint8_t *src = qs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        for (int i = 0; i < 32; i++) {
            const int fifth = qh ? ((qh[i] >> j) & 1) << 4 : 0;
            q[32 * j + i] = (int16_t)((((src[i] >> shift) & 15) | fifth) * sc[j]);
        }
    }
#endif
    return d;
}

/* One Q6_K super-block -> codes sc_j q [256] and its d. */
static inline float unpack_q6_k(const uint8_t *blk, int16_t *q) {
    const int8_t *sc = (const int8_t *)(blk + 192);
#ifdef __AVX2__
    /* runs of 32 codes: run 4h + s takes nibble s / 2 of ql[64h + 32 (s % 2) + i] and bits
     * 2s, 2s+1 of qh[32h + i]; its halves have scales sc[2 (4h + s)] and sc[2 (4h + s) + 1] */
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), off = _mm256_set1_epi16(32);
    for (int h = 0; h < 2; h++) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        const __m256i low[4] = {_mm256_and_si256(ql0, m4), _mm256_and_si256(ql1, m4),
                                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4)};
        for (int s = 0; s < 4; s++) {
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m2);
            const __m256i codes = _mm256_or_si256(low[s], _mm256_slli_epi16(high, 4));
            const int run = 4 * h + s;
            __m256i lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes)), off);
            __m256i hi =
                _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1)), off);
            lo = _mm256_mullo_epi16(lo, _mm256_set1_epi16(sc[2 * run]));
            hi = _mm256_mullo_epi16(hi, _mm256_set1_epi16(sc[2 * run + 1]));
            _mm256_store_si256((__m256i *)(q + 32 * run), lo);
            _mm256_store_si256((__m256i *)(q + 32 * run + 16), hi);
        }
    }
    return half_at(blk + 208);
#else
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
        int16_t *dst = q + 128 * h;
        for (int i = 0; i < 32; i++) {
            dst[i] = (int16_t)(((ql[i] & 15) | ((qh[i] & 3) << 4)) - 32);
            dst[32 + i] = (int16_t)(((ql[32 + i] & 15) | (((qh[i] >> 2) & 3) << 4)) - 32);
            dst[64 + i] = (int16_t)(((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32);
            dst[96 + i] = (int16_t)(((ql[32 + i] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32);
        }
    }
    for (int e = 0; e < QK_K; e++) q[e] = (int16_t)(q[e] * sc[e / 16]);
    return half_at(blk + 208);
#endif
}

/* A running sum of products: eight lanes with AVX2 (summed at the end), one float without. */
#ifdef __AVX2__
typedef __m256 kacc;
#define KACC_ZERO _mm256_setzero_ps()
#define KACC_TOTAL(a) hsum8(a)
#else
typedef float kacc;
#define KACC_ZERO 0.0f
#define KACC_TOTAL(a) (a)
#endif

/* acc + d sum_a e_a sum_i q_i p_i over the eight blocks of one super-block, minus
 * sum_a mins_a sx_a when mins is given (Q4_K). With AVX2 the eight blocks are independent
 * products added as a tree, so consecutive super-blocks chain through one addition only. */
static inline kacc superblock_dot(kacc acc, const int16_t *q, const int16_t *p, const float *e,
                                  float d, const float *mins, const float *sx) {
#ifdef __AVX2__
    __m256 v[QK_K / QK];
    for (int a = 0; a < QK_K / QK; a++) {
        __m256i q_lo = _mm256_load_si256((const __m256i *)(q + QK * a));
        __m256i q_hi = _mm256_load_si256((const __m256i *)(q + QK * a + 16));
        __m256 s = _mm256_cvtepi32_ps(block_dot16(q_lo, q_hi, p + QK * a));
        v[a] = _mm256_mul_ps(_mm256_set1_ps(d * e[a]), s);
    }
    __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                               _mm256_add_ps(_mm256_add_ps(v[4], v[5]), _mm256_add_ps(v[6], v[7])));
    if (mins) sum = _mm256_fnmadd_ps(_mm256_loadu_ps(mins), _mm256_loadu_ps(sx), sum);
    return _mm256_add_ps(acc, sum);
#else
    float total = 0.0f;
    for (int a = 0; a < QK_K / QK; a++) {
        int32_t s = 0;
        for (int i = 0; i < QK; i++) s += (int32_t)q[QK * a + i] * p[QK * a + i];
        total += d * e[a] * (float)s;
        if (mins) total -= mins[a] * sx[a];
    }
    return acc + total;
#endif
}

#ifdef __AVX2__
/* The 6-bit scales (bytes 0-7) and mins (bytes 8-15) of a Q4_K super-block, unpacked from
 * its 12 bytes four at a time (the way llama.cpp's own kernels do). */
static inline void k4_scales_mins8(const uint8_t *packed, uint32_t out[4]) {
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, low2 = 0x03030303u;
    uint32_t u[3];
    memcpy(u, packed, 12);
    out[0] = u[0] & low6;
    out[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
    out[2] = u[1] & low6;
    out[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
}

/* Eight unsigned bytes as eight floats. */
static inline __m256 bytes8_to_ps(const void *b) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b)));
}

/* sum_i q_i p_i of one block of 32 unsigned byte codes, as eight float lanes. */
static inline __m256 run_dot(__m256i codes, const int16_t *p) {
    const __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes));
    const __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1));
    return _mm256_cvtepi32_ps(block_dot16(lo, hi, p));
}

/* One activation row (decoding) against one Q4_K (qh NULL) or Q5_K super-block straight from
 * its bytes: the codes stay in registers and d sc_j e_a multiplies each block's integer sum,
 * as for Q4_1; two accumulators carry the sum from one super-block to the next. */
static inline void k4_row_dot(__m256 acc[2], const uint8_t *blk, const uint8_t *qs,
                              const uint8_t *qh, const int16_t *p, const float *e,
                              const float *sx) {
    uint32_t sm[4];
    k4_scales_mins8(blk + 4, sm);
    float scale[8] __attribute__((aligned(32)));
    const __m256 d = _mm256_set1_ps(half_at(blk)), dmin = _mm256_set1_ps(half_at(blk + 2));
    _mm256_store_ps(scale, _mm256_mul_ps(_mm256_mul_ps(d, bytes8_to_ps(sm)), _mm256_loadu_ps(e)));
    acc[1] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, bytes8_to_ps(sm + 2)), _mm256_loadu_ps(sx),
                              acc[1]);
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m256i bits = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
#define LMARCH_FIFTH(j) _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, (j)), one), 4)
#define LMARCH_Q4K_RUN(c)                                                                        \
    do {                                                                                         \
        const __m256i r = _mm256_loadu_si256((const __m256i *)(qs + 32 * (c)));                  \
        const __m256i c0 = _mm256_or_si256(_mm256_and_si256(r, m4), LMARCH_FIFTH(2 * (c)));      \
        const __m256i c1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(r, 4), m4),        \
                                           LMARCH_FIFTH(2 * (c) + 1));                           \
        const __m256 f0 = run_dot(c0, p + QK * (2 * (c)));                                       \
        const __m256 f1 = run_dot(c1, p + QK * (2 * (c) + 1));                                   \
        acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + 2 * (c)), f0, acc[0]);              \
        acc[1] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + 2 * (c) + 1), f1, acc[1]);          \
    } while (0)
    LMARCH_Q4K_RUN(0);
    LMARCH_Q4K_RUN(1);
    LMARCH_Q4K_RUN(2);
    LMARCH_Q4K_RUN(3);
#undef LMARCH_Q4K_RUN
#undef LMARCH_FIFTH
}

/* One activation row against one Q6_K super-block straight from its bytes; the sixteen
 * scales d e_a sc_j (two sub-blocks of 16 a block of 32) are made eight at a time. */
static inline void q6_k_row_dot(__m256 acc[2], const uint8_t *blk, const int16_t *p,
                                const float *e) {
    const int8_t *sc = (const int8_t *)(blk + 192);
    float scale[16] __attribute__((aligned(32)));
    const __m256 d = _mm256_set1_ps(half_at(blk + 208)), ev = _mm256_loadu_ps(e);
    const __m256 e_lo = _mm256_permutevar8x32_ps(ev, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    const __m256 e_hi = _mm256_permutevar8x32_ps(ev, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
    const __m256 s_lo =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)sc)));
    const __m256 s_hi =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8))));
    _mm256_store_ps(scale, _mm256_mul_ps(_mm256_mul_ps(d, e_lo), s_lo));
    _mm256_store_ps(scale + 8, _mm256_mul_ps(_mm256_mul_ps(d, e_hi), s_hi));
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), off = _mm256_set1_epi16(32);
    for (int h = 0; h < 2; h++) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
#define LMARCH_Q6K_RUN(s, low)                                                                   \
    do {                                                                                         \
        const int a = 4 * h + (s);                                                               \
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * (s)), m2);              \
        const __m256i codes = _mm256_or_si256((low), _mm256_slli_epi16(high, 4));               \
        const __m256i lo =                                                                       \
            _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes)), off);          \
        const __m256i hi =                                                                       \
            _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1)), off);     \
        const __m256i *pa = (const __m256i *)(p + QK * a);                                       \
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(lo, _mm256_loadu_si256(pa)));          \
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(hi, _mm256_loadu_si256(pa + 1)));      \
        acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + 2 * a), f0, acc[0]);                \
        acc[1] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + 2 * a + 1), f1, acc[1]);            \
    } while (0)
        LMARCH_Q6K_RUN(0, _mm256_and_si256(ql0, m4));
        LMARCH_Q6K_RUN(1, _mm256_and_si256(ql1, m4));
        LMARCH_Q6K_RUN(2, _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4));
        LMARCH_Q6K_RUN(3, _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4));
#undef LMARCH_Q6K_RUN
    }
}
#endif

#define KQ_ROWS 8 /* activation rows sharing one unpacking of a super-block */

/* Where a Q4_K / Q5_K super-block keeps its low nibbles (qs) and fifth bits (qh, Q5_K only). */
static inline void k4_planes(int type, const uint8_t *blk, const uint8_t **qs,
                             const uint8_t **qh) {
    *qh = type == KQ5 ? blk + 16 : NULL;
    *qs = type == KQ5 ? blk + 48 : blk + 16;
}

/* y [m, n] = x W^T for W [n, k] in super-blocks of ``type`` (a kquant_type). */
static int kquant_matmul(int type, const float *x, int64_t m, int64_t k, const uint8_t *blocks,
                         int64_t n, float *y, int threads) {
    const int q6 = type == KQ6, bytes = (int)KQ_BYTES[type];
    const int64_t nb = k / QK, nsb = k / QK_K, row_bytes = nsb * bytes;
    act_rows r;
    if (act_rows_make(&r, x, m, k)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int64_t j = 0; j < n; j++) {
        int16_t q[QK_K] __attribute__((aligned(32)));
        float mins[QK_K / QK];
        const uint8_t *row = blocks + j * row_bytes;
#ifdef __AVX2__
        if (m == 1) { /* decoding: one pass over the row's bytes, nothing unpacked to memory */
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t s = 0; s < nsb; s++) {
                const int64_t a0 = s * (QK_K / QK);
                const uint8_t *blk = row + s * bytes, *qs, *qh;
                if (q6) {
                    q6_k_row_dot(acc, blk, r.p + s * QK_K, r.e + a0);
                } else {
                    k4_planes(type, blk, &qs, &qh);
                    k4_row_dot(acc, blk, qs, qh, r.p + s * QK_K, r.e + a0, r.sx + a0);
                }
            }
            y[j] = hsum8(_mm256_add_ps(acc[0], acc[1]));
            continue;
        }
#endif
        for (int64_t i0 = 0; i0 < m; i0 += KQ_ROWS) {
            const int rows = m - i0 < KQ_ROWS ? (int)(m - i0) : KQ_ROWS;
            kacc acc[KQ_ROWS];
            for (int t = 0; t < rows; t++) acc[t] = KACC_ZERO;
            for (int64_t s = 0; s < nsb; s++) {
                const uint8_t *blk = row + s * bytes, *qs, *qh;
                k4_planes(type, blk, &qs, &qh);
                const float d = q6 ? unpack_q6_k(blk, q) : unpack_k4(blk, qs, qh, q, mins);
                for (int t = 0; t < rows; t++) {
                    const int64_t i = i0 + t, a0 = i * nb + s * (QK_K / QK);
                    acc[t] = superblock_dot(acc[t], q, r.p + i * k + s * QK_K, r.e + a0, d,
                                            q6 ? NULL : mins, r.sx + a0);
                }
            }
            for (int t = 0; t < rows; t++) y[(i0 + t) * n + j] = KACC_TOTAL(acc[t]);
        }
    }
    free(r.mem);
    return 0;
}

int lmarch_q4_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads) {
    return kquant_matmul(KQ4, x, m, k, blocks, n, y, threads);
}

int lmarch_q6_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads) {
    return kquant_matmul(KQ6, x, m, k, blocks, n, y, threads);
}

int lmarch_q5_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads) {
    return kquant_matmul(KQ5, x, m, k, blocks, n, y, threads);
}
