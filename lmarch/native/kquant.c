/*
 * Matrix products with weights in GGUF's Q4_K and Q6_K super-block formats, as stored.
 *
 * A super-block holds 256 weights of a row (layouts in lmarch/weights/gguf_kquants.py):
 *
 *     Q4_K:  w = d sc_j q - dmin m_j     8 sub-blocks of 32, q in 0..15, sc_j, m_j 6-bit
 *     Q6_K:  w = d sc_j q                16 sub-blocks of 16, q in -32..31, sc_j int8
 *
 * The activations are quantised per block of 32 to 16-bit integers exactly as for Q4_1
 * (kernels.h: x_i ~= e p_i, plus the float sum of each block), so that each super-block of a
 * weight row contributes, over its eight blocks a of 32 activations,
 *
 *     Q4_K:  sum_a [ d e_a sum_i (sc_j q_i) p_i  -  dmin m_a sum_i x_i ]
 *     Q6_K:  sum_a   d e_a sum_i (sc_j q_i) p_i
 *
 * The small scale is folded into the codes (|sc q| <= 945 for Q4_K, <= 4096 for Q6_K, both fit
 * int16 and keep a pair of products below 2^31), so a block is the same integer dot product as
 * a Q4_1 block: two vpmaddwd with AVX2. A super-block is unpacked once into int16 codes and
 * then used for every activation row, which is what makes a prompt cheaper than its tokens.
 */
#include "kernels.h"

#define QK_K 256
#define Q4_K_BYTES 144
#define Q6_K_BYTES 210

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

/* One Q4_K super-block -> codes sc_j q [256], its d, and dmin m_j per block of 32 [8]. */
static inline float unpack_q4_k(const uint8_t *blk, int16_t *q, float *mins) {
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t *scales = blk + 4, *qs = blk + 16;
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        k4_scale_min(scales, j, &sc, &mn);
        const uint8_t *src = qs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        int16_t *dst = q + 32 * j;
        for (int i = 0; i < 32; i++) dst[i] = (int16_t)(((src[i] >> shift) & 15) * sc);
        mins[j] = dmin * (float)mn;
    }
    return d;
}

/* One Q6_K super-block -> codes sc_j q [256] and its d. */
static inline float unpack_q6_k(const uint8_t *blk, int16_t *q) {
    const int8_t *sc = (const int8_t *)(blk + 192);
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
}

/* d sum_a e_a sum_i q_i p_i over the eight blocks of one super-block. */
static inline float superblock_dot(const int16_t *q, const int16_t *p, const float *e, float d) {
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int a = 0; a < QK_K / QK; a++) {
        __m256i q_lo = _mm256_loadu_si256((const __m256i *)(q + QK * a));
        __m256i q_hi = _mm256_loadu_si256((const __m256i *)(q + QK * a + 16));
        __m256 s = _mm256_cvtepi32_ps(block_dot16(q_lo, q_hi, p + QK * a));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * e[a]), s, acc);
    }
    return hsum8(acc);
#else
    float total = 0.0f;
    for (int a = 0; a < QK_K / QK; a++) {
        int32_t s = 0;
        for (int i = 0; i < QK; i++) s += (int32_t)q[QK * a + i] * p[QK * a + i];
        total += d * e[a] * (float)s;
    }
    return total;
#endif
}

/* y [m, n] = x W^T for W [n, k] in Q4_K (q6 = 0) or Q6_K (q6 = 1) super-blocks. */
static int kquant_matmul(int q6, const float *x, int64_t m, int64_t k, const uint8_t *blocks,
                         int64_t n, float *y, int threads) {
    const int64_t nb = k / QK, nsb = k / QK_K, row_bytes = nsb * (q6 ? Q6_K_BYTES : Q4_K_BYTES);
    act_rows r;
    if (act_rows_make(&r, x, m, k)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int64_t j = 0; j < n; j++) {
        int16_t q[QK_K] __attribute__((aligned(32)));
        float mins[QK_K / QK];
        const uint8_t *row = blocks + j * row_bytes;
        for (int64_t i = 0; i < m; i++) y[i * n + j] = 0.0f;
        for (int64_t s = 0; s < nsb; s++) {
            float d;
            if (q6) {
                d = unpack_q6_k(row + s * Q6_K_BYTES, q);
            } else {
                d = unpack_q4_k(row + s * Q4_K_BYTES, q, mins);
            }
            for (int64_t i = 0; i < m; i++) {
                const int64_t a0 = i * nb + s * (QK_K / QK);
                float v = superblock_dot(q, r.p + i * k + s * QK_K, r.e + a0, d);
                if (!q6)
                    for (int a = 0; a < QK_K / QK; a++) v -= mins[a] * r.sx[a0 + a];
                y[i * n + j] += v;
            }
        }
    }
    free(r.mem);
    return 0;
}

int lmarch_q4_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads) {
    return kquant_matmul(0, x, m, k, blocks, n, y, threads);
}

int lmarch_q6_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads) {
    return kquant_matmul(1, x, m, k, blocks, n, y, threads);
}
