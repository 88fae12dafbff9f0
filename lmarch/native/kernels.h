/*
 * kernels.h: the inline pieces the kernels share (not exported): half floats, vector dot
 * products, block-quantised row products, exp, and the dropout mask hash. The exported
 * interface is lmarch.h.
 *
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
#ifndef LMARCH_KERNELS_H
#define LMARCH_KERNELS_H

#include "lmarch.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK LMARCH_QK
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

#define EXP_LO -87.0f /* exp stays a normal float above this */
#define EXP_HI 88.0f

#ifdef __AVX2__
/* exp(x) for x in [EXP_LO, EXP_HI] (clamp first): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6
 * polynomial (Cephes' coefficients), 2^n built in the exponent bits. ~1 ulp. */
static inline __m256 exp8(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

#endif

/* a . b over n floats; with AVX2 as two 8-wide accumulators (a plain loop would be one long
 * chain of dependent additions: C may not reorder a float sum by itself). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    total = hsum8(_mm256_add_ps(acc0, acc1));
#else
    float part[8] = {0.0f};
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) part[j] += a[i + j] * b[i + j];
    for (int j = 0; j < 8; j++) total += part[j];
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* x [m, k] float32 -> codes int16 [m, k], scales e [m, k/32], block sums of x [m, k/32]. */
static inline void quantize_act(const float *x, int64_t m, int64_t k, int16_t *codes,
                                float *scale, float *sums) {
    const int64_t nb = k / QK;
    for (int64_t b = 0; b < m * nb; b++) {
        const float *xb = x + b * QK;
#ifdef __AVX2__
        /* the same rounding as lrintf (to nearest even, the default mode), eight at a time */
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], amax8 = _mm256_setzero_ps(), sum8 = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i]));
            sum8 = _mm256_add_ps(sum8, v[i]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float e = amax / ACT_MAX, inv = e > 0.0f ? 1.0f / e : 0.0f;
        const __m256 scale8 = _mm256_set1_ps(inv);
        for (int i = 0; i < 4; i += 2) {
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale8));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], scale8));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
            _mm256_storeu_si256((__m256i *)(codes + b * QK + 8 * i), packed);
        }
        scale[b] = e;
        sums[b] = hsum8(sum8);
#else
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
#endif
    }
}


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

static inline int act_rows_make(act_rows *r, const float *x, int64_t m, int64_t k) {
    const int64_t nb = m * (k / QK);
    r->mem = malloc((size_t)(nb * 2 * sizeof(float) + m * k * sizeof(int16_t)));
    if (!r->mem) return -1;
    r->e = (float *)r->mem;
    r->sx = r->e + nb;
    r->p = (int16_t *)(r->sx + nb);
    quantize_act(x, m, k, r->p, r->e, r->sx);
    return 0;
}

/* Dropout without a stored mask (Srivastava et al. 2014): element `index` of the stream `seed`
 * is kept when a counter-based hash of (seed, index) falls below keep * 2^24 (two rounds of
 * MurmurHash3's 32-bit finaliser), so the forward and the backward, on any thread, draw the
 * same mask from the seed alone (FlashAttention does the same with Philox counters). */
static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

/* The threshold for keeping with probability 1 - p. */
static inline uint32_t keep_threshold(float p) { return (uint32_t)((1.0 - (double)p) * 16777216.0); }

static inline int dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
    const uint32_t h = mix32((uint32_t)index ^ (uint32_t)seed);
    return (mix32(h + (uint32_t)(index >> 32) * 0x9e3779b9u + (uint32_t)(seed >> 32)) >> 8) <
           threshold;
}

#endif /* LMARCH_KERNELS_H */
