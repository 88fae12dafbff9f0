/* Matrix products in GGUF's Q4_1 and Q8_0 block formats (equations in kernels.h). */
#include "kernels.h"

/* Four activation rows (i0 .. i0+3) against one Q4_1 row: each block's codes are widened once
 * and used four times, which is what makes a prompt (many rows) cheaper than four tokens. */
static inline void dot_q4_1_x4(const uint8_t *w, const uint16_t *dm, const act_rows *r,
                               int64_t i0, int64_t k, float out[4]) {
    const int64_t nb = k / QK;
#ifdef __AVX2__
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(w + b * 16));
        __m256i q_lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
        __m256i q_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
        const float d = half_to_float(dm[2 * b]), m = half_to_float(dm[2 * b + 1]);
        for (int t = 0; t < 4; t++) {
            const int64_t row = i0 + t;
            __m256 f = _mm256_cvtepi32_ps(block_dot16(q_lo, q_hi, r->p + row * k + b * QK));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * r->e[row * nb + b]), f, acc[t]);
            tail[t] += m * r->sx[row * nb + b];
        }
    }
    for (int t = 0; t < 4; t++) out[t] = hsum8(acc[t]) + tail[t];
#else
    for (int t = 0; t < 4; t++)
        out[t] = dot_q4_1(w, dm, r->p + (i0 + t) * k, r->e + (i0 + t) * nb, r->sx + (i0 + t) * nb,
                          nb);
#endif
}

/* y[i * stride] for every activation row i: one Q4_1 row of W against all m rows of x. */
static inline void q4_1_row(const uint8_t *w, const uint16_t *dm, const act_rows *r, int64_t m,
                            int64_t k, float *y, int64_t stride) {
    const int64_t nb = k / QK;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        float o[4];
        dot_q4_1_x4(w, dm, r, i, k, o);
        for (int t = 0; t < 4; t++) y[(i + t) * stride] = o[t];
    }
    for (; i < m; i++)
        y[i * stride] = dot_q4_1(w, dm, r->p + i * k, r->e + i * nb, r->sx + i * nb, nb);
}

/*
 * y [m, n] = x W^T for x float32 [m, k] and W [n, k] in Q4_1 blocks: codes uint8 [n, k/2],
 * dm float16 [n, k/32, 2]. Each thread takes a contiguous range of rows of W and runs every
 * activation row against them while they sit in cache. Returns 0, or -1 when out of memory.
 */
int lmarch_q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *codes,
                       const uint16_t *dm, int64_t n, float *y, int threads) {
    const int64_t nb = k / QK;
    act_rows r;
    if (act_rows_make(&r, x, m, k)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int64_t j = 0; j < n; j++) q4_1_row(codes + j * (k / 2), dm + j * nb * 2, &r, m, k, y + j, n);
    free(r.mem);
    return 0;
}

/* y [m, n] = x W^T for W [n, k] in Q8_0 blocks: codes int8 [n, k], d float16 [n, k/32]. */
int lmarch_q8_0_matmul(const float *x, int64_t m, int64_t k, const int8_t *codes,
                       const uint16_t *d, int64_t n, float *y, int threads) {
    const int64_t nb = k / QK;
    act_rows r;
    if (act_rows_make(&r, x, m, k)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < m; i++)
            y[i * n + j] = dot_q8_0(codes + j * k, d + j * nb, r.p + i * k, r.e + i * nb, nb);
    }
    free(r.mem);
    return 0;
}

/*
 * A SwiGLU feed-forward block in one call: y = W_down (SiLU(W_gate x) * (W_up x)), with
 * W_gate and W_up the two halves (rows 0..h-1 and h..2h-1) of one Q4_1 matrix gu [2h, k]
 * and W_down a Q4_1 matrix [k, h]. One parallel region: each thread computes its share of the
 * hidden units, then (after a barrier) its share of the outputs. h must be a multiple of 32.
 */
int lmarch_q4_1_swiglu(const float *x, int64_t m, int64_t k, const uint8_t *gu_codes,
                       const uint16_t *gu_dm, int64_t h, const uint8_t *dn_codes,
                       const uint16_t *dn_dm, float *y, int threads) {
    const int64_t nb = k / QK, hb = h / QK;
    act_rows r, rh;
    if (act_rows_make(&r, x, m, k)) return -1;
    float *hidden = (float *)malloc((size_t)(2 * m * h) * sizeof(float));
    float *gate = hidden ? hidden + m * h : NULL;
    rh.mem = malloc((size_t)(m * hb * 2 * sizeof(float) + m * h * sizeof(int16_t)));
    if (!hidden || !rh.mem) {
        free(r.mem);
        free(hidden);
        free(rh.mem);
        return -1;
    }
    rh.e = (float *)rh.mem;
    rh.sx = rh.e + m * hb;
    rh.p = (int16_t *)(rh.sx + m * hb);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < h; j++) {
            q4_1_row(gu_codes + j * (k / 2), gu_dm + j * nb * 2, &r, m, k, gate + j, h);
            q4_1_row(gu_codes + (h + j) * (k / 2), gu_dm + (h + j) * nb * 2, &r, m, k,
                     hidden + j, h);
            for (int64_t i = 0; i < m; i++) {
                const float g = gate[i * h + j];
                hidden[i * h + j] *= g / (1.0f + expf(-g));
            }
        }
#pragma omp single
        quantize_act(hidden, m, h, rh.p, rh.e, rh.sx);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k; j++)
            q4_1_row(dn_codes + j * (h / 2), dn_dm + j * hb * 2, &rh, m, h, y + j, k);
    }
    free(r.mem);
    free(hidden);
    free(rh.mem);
    return 0;
}

/* 2 when built with AVX2, 0 for the portable C path (reported by lmarch for the record). */
int lmarch_blockq_simd(void) {
#ifdef __AVX2__
    return 2;
#else
    return 0;
#endif
}
