/*
 * Block-quantised matrix products for CPU decoding, in the block formats of llama.cpp's GGUF
 * files. A row of the weight is cut into blocks of 32 inputs; each block keeps 4- or 8-bit
 * codes and half-precision constants:
 *
 *     Q4_1:  w_i = d q_i + m      q_i in 0..15, two codes a byte (q_i low nibble of byte i,
 *                                  q_{i+16} high nibble), d and m as float16
 *     Q8_0:  w_i = d q_i          q_i in -127..127, d as float16
 *
 * The activations are quantised the same way per block of 32, to 16-bit integers
 * (p_i = round(x_i / e), e = max|x| / 32767), so the inner product of a block is an integer
 * dot product:
 *
 *     sum_i w_i x_i  ~=  d e sum_i q_i p_i  +  m sum_i x_i
 *
 * (the second term uses the exact float sum of x). The rounding of x moves each output by
 * about 1e-5 of its size; llama.cpp rounds activations to 8 bits instead, ~200x coarser, which
 * on SmolLM2 flipped the top token at 9% of positions. With AVX2 a block is one widening of
 * the codes and two vpmaddwd; that keeps 4-bit decoding bound by memory, not by unpacking.
 * Without AVX2 the same equation runs as plain C.
 *
 * Rows of the output are split across OpenMP threads (the process's runtime: torch's).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32
#define ACT_MAX 32767.0f /* activations: 16-bit codes per block */

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* x [m, k] float32 -> codes int16 [m, k], scales e [m, k/32], block sums of x [m, k/32]. */
void lmarch_quantize_act(const float *x, int64_t m, int64_t k, int16_t *codes, float *scale,
                         float *sums) {
    const int64_t nb = k / QK;
    for (int64_t b = 0; b < m * nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            sum += xb[i];
        }
        const float e = amax / ACT_MAX, inv = e > 0.0f ? 1.0f / e : 0.0f;
        for (int i = 0; i < QK; i++) codes[b * QK + i] = (int16_t)lrintf(xb[i] * inv);
        scale[b] = e;
        sums[b] = sum;
    }
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_i q_i p_i of one block as 8 int32 lanes: q widened to 16 bits, two vpmaddwd. */
static inline __m256i block_dot16(__m256i q_lo, __m256i q_hi, const int16_t *p) {
    __m256i p0 = _mm256_loadu_si256((const __m256i *)p);
    __m256i p1 = _mm256_loadu_si256((const __m256i *)(p + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(q_lo, p0), _mm256_madd_epi16(q_hi, p1));
}
#endif

#ifdef __AVX2__
/* Eight blocks' (d, m) pairs, stored interleaved as float16, as two float vectors. */
static inline void load_dm8(const uint16_t *dm, __m256 *d, __m256 *m) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));       /* d0 m0 .. d3 m3 */
    __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + 8))); /* d4 m4 .. d7 m7 */
    /* per 128-bit lane: [d0 d1 d4 d5 | d2 d3 d6 d7]; then put the 64-bit pairs in order */
    __m256 ds = _mm256_shuffle_ps(a, c, 0x88), ms = _mm256_shuffle_ps(a, c, 0xDD);
    *d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ds), 0xD8));
    *m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ms), 0xD8));
}

static inline __m256 q4_block(const uint8_t *w, const int16_t *p) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m128i r = _mm_loadu_si128((const __m128i *)w);
    __m256i q_lo = _mm256_cvtepu8_epi16(_mm_and_si128(r, low));                    /* q 0..15 */
    __m256i q_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(r, 4), low)); /* 16..31 */
    return _mm256_cvtepi32_ps(block_dot16(q_lo, q_hi, p));
}
#endif

/* One Q4_1 row (nb blocks) against one quantised activation row. With AVX2 the block
 * constants are handled eight blocks at a time (d e and m sum(x) as vectors), leaving each
 * block one load, one widening pair, two vpmaddwd and one fused multiply-add. */
static inline float dot_q4_1(const uint8_t *w, const uint16_t *dm, const int16_t *p,
                             const float *e, const float *sx, int64_t nb) {
    float tail = 0.0f;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), tails = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 d, m;
        load_dm8(dm + 2 * b, &d, &m);
        float scale[8] __attribute__((aligned(32)));
        _mm256_store_ps(scale, _mm256_mul_ps(d, _mm256_loadu_ps(e + b)));
        tails = _mm256_fmadd_ps(m, _mm256_loadu_ps(sx + b), tails);
        for (int i = 0; i < 8; i += 2) {
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + i),
                                   q4_block(w + (b + i) * 16, p + (b + i) * QK), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + i + 1),
                                   q4_block(w + (b + i + 1) * 16, p + (b + i + 1) * QK), acc1);
        }
    }
    for (; b < nb; b++) {
        __m256 f = q4_block(w + b * 16, p + b * QK);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(dm[2 * b]) * e[b]), f, acc0);
        tail += half_to_float(dm[2 * b + 1]) * sx[b];
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), tails)) + tail;
#else
    float total = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int i = 0; i < QK / 2; i++) {
            s += (int32_t)(w[b * 16 + i] & 15) * p[b * QK + i];
            s += (int32_t)(w[b * 16 + i] >> 4) * p[b * QK + i + QK / 2];
        }
        total += half_to_float(dm[2 * b]) * e[b] * (float)s;
        tail += half_to_float(dm[2 * b + 1]) * sx[b];
    }
    return total + tail;
#endif
}

#ifdef __AVX2__
static inline __m256 q8_block(const int8_t *w, const int16_t *p) {
    __m128i w_lo = _mm_loadu_si128((const __m128i *)w);
    __m128i w_hi = _mm_loadu_si128((const __m128i *)(w + 16));
    return _mm256_cvtepi32_ps(
        block_dot16(_mm256_cvtepi8_epi16(w_lo), _mm256_cvtepi8_epi16(w_hi), p));
}
#endif

/* One Q8_0 row against one quantised activation row. */
static inline float dot_q8_0(const int8_t *w, const uint16_t *d, const int16_t *p, const float *e,
                             int64_t nb) {
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        float scale[8] __attribute__((aligned(32)));
        __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b)));
        _mm256_store_ps(scale, _mm256_mul_ps(d8, _mm256_loadu_ps(e + b)));
        for (int i = 0; i < 8; i += 2) {
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + i),
                                   q8_block(w + (b + i) * QK, p + (b + i) * QK), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + i + 1),
                                   q8_block(w + (b + i + 1) * QK, p + (b + i + 1) * QK), acc1);
        }
    }
    for (; b < nb; b++) {
        __m256 scale = _mm256_set1_ps(half_to_float(d[b]) * e[b]);
        acc0 = _mm256_fmadd_ps(scale, q8_block(w + b * QK, p + b * QK), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
#else
    float total = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int i = 0; i < QK; i++) s += (int32_t)w[b * QK + i] * p[b * QK + i];
        total += half_to_float(d[b]) * e[b] * (float)s;
    }
    return total;
#endif
}

/* Activations quantised into one scratch allocation: codes [m, k], scales and sums [m, k/32]. */
typedef struct {
    int16_t *p;
    float *e, *sx;
    void *mem;
} act_rows;

static int act_rows_make(act_rows *r, const float *x, int64_t m, int64_t k) {
    const int64_t nb = m * (k / QK);
    r->mem = malloc((size_t)(nb * 2 * sizeof(float) + m * k * sizeof(int16_t)));
    if (!r->mem) return -1;
    r->e = (float *)r->mem;
    r->sx = r->e + nb;
    r->p = (int16_t *)(r->sx + nb);
    lmarch_quantize_act(x, m, k, r->p, r->e, r->sx);
    return 0;
}

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
        lmarch_quantize_act(hidden, m, h, rh.p, rh.e, rh.sx);
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
