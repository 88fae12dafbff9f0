/*
 * GELU with the tanh approximation (Hendrycks & Gimpel 2016; GPT-2, BERT), forward and backward:
 *
 *     z = sqrt(2/pi) (x + 0.044715 x^3)
 *     GELU(x) = 0.5 x (1 + tanh z) = x s,           s = sigmoid(2z) = e / (1 + e),  e = exp(2z)
 *     GELU'(x) = s + 2 x s (1 - s) dz/dx,          dz/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 *
 * with 1 - s taken as 1 / (1 + e), not by subtraction, so the slope keeps its digits where s is
 * near 1.
 * (0.5 (1 + tanh z) = sigmoid(2z), which needs one exponential and no cancellation: 1 + tanh z
 * loses the low digits where tanh z is near -1.) PyTorch's CPU kernel evaluates tanh value by
 * value; here eight values go through one polynomial exponential (AVX2), so the activation of a
 * small GPT costs a memory pass instead of a large part of its training step.
 */
#include "kernels.h"

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* s = sigmoid(2z); *rest = 1 - s; *dz = dz/dx. */
static inline float gelu_s(float x, float *rest, float *dz) {
    const float x2 = x * x;
    float two_z = 2.0f * GELU_C * x * (1.0f + GELU_A * x2);
    two_z = two_z < EXP_LO ? EXP_LO : (two_z > EXP_HI ? EXP_HI : two_z);
    const float e = expf(two_z);
    *dz = GELU_C * (1.0f + 3.0f * GELU_A * x2);
    *rest = 1.0f / (1.0f + e);
    return e * *rest;
}

#ifdef __AVX2__
/* s = sigmoid(2z), 1 - s and dz/dx for eight values. */
static inline __m256 gelu_s8(__m256 x, __m256 *rest, __m256 *dz) {
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 two_z = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f * GELU_C), x),
                                 _mm256_fmadd_ps(_mm256_set1_ps(GELU_A), x2, _mm256_set1_ps(1.0f)));
    two_z = _mm256_min_ps(_mm256_max_ps(two_z, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    const __m256 e = exp8(two_z);
    *dz = _mm256_mul_ps(_mm256_set1_ps(GELU_C),
                        _mm256_fmadd_ps(_mm256_set1_ps(3.0f * GELU_A), x2, _mm256_set1_ps(1.0f)));
    *rest = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_mul_ps(e, *rest);
}
#endif

/* GELU'(x) = s + 2 x s (1 - s) dz/dx, with s = GELU(x) / x also returned. */
static inline float gelu_slope(float x, float *s) {
    float rest, dz;
    *s = gelu_s(x, &rest, &dz);
    return *s + 2.0f * x * *s * rest * dz;
}

#ifdef __AVX2__
static inline __m256 gelu_slope8(__m256 x, __m256 *s) {
    __m256 rest, dz;
    *s = gelu_s8(x, &rest, &dz);
    const __m256 tail = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), x),
                                      _mm256_mul_ps(_mm256_mul_ps(*s, rest), dz));
    return _mm256_add_ps(*s, tail);
}
#endif

/* y[i] = GELU(x[i]) for i < n. */
void lmarch_gelu_tanh_forward(const float *x, float *y, int64_t n, int threads) {
    const int64_t chunks = (n + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 32768)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * 256;
        const int64_t end = i + 256 < n ? i + 256 : n;
#ifdef __AVX2__
        for (; i + 8 <= end; i += 8) {
            __m256 rest, dz, v = _mm256_loadu_ps(x + i);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(v, gelu_s8(v, &rest, &dz)));
        }
#endif
        for (; i < end; i++) {
            float rest, dz;
            y[i] = x[i] * gelu_s(x[i], &rest, &dz);
        }
    }
}

/* dx[i] = g[i] GELU'(x[i]) for i < n. */
void lmarch_gelu_tanh_backward(const float *x, const float *g, float *dx, int64_t n, int threads) {
    const int64_t chunks = (n + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 32768)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * 256;
        const int64_t end = i + 256 < n ? i + 256 : n;
#ifdef __AVX2__
        for (; i + 8 <= end; i += 8) {
            __m256 s;
            const __m256 slope = gelu_slope8(_mm256_loadu_ps(x + i), &s);
            _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(g + i), slope));
        }
#endif
        for (; i < end; i++) {
            float s;
            dx[i] = g[i] * gelu_slope(x[i], &s);
        }
    }
}

/* y[i] = GELU(x[i]) and slope[i] = GELU'(x[i]) (y may be x): a training step that keeps the
 * slope instead of x turns the backward into one product, dx = g * slope (see
 * lmarch_mul_column_sums). */
void lmarch_gelu_tanh_forward_slope(const float *x, float *y, float *slope, int64_t n,
                                    int threads) {
    const int64_t chunks = (n + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 32768)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * 256;
        const int64_t end = i + 256 < n ? i + 256 : n;
#ifdef __AVX2__
        for (; i + 8 <= end; i += 8) {
            __m256 s;
            const __m256 v = _mm256_loadu_ps(x + i), slope_v = gelu_slope8(v, &s);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(v, s));
            _mm256_storeu_ps(slope + i, slope_v);
        }
#endif
        for (; i < end; i++) { /* x may be y: read it once */
            float s;
            const float v = x[i];
            slope[i] = gelu_slope(v, &s);
            y[i] = v * s;
        }
    }
}

/* The exact GELU (Hendrycks & Gimpel 2016; nanoGPT's nn.GELU()), forward with its slope:
 *
 *     GELU(x) = x Phi(x),   GELU'(x) = Phi(x) + x phi(x),
 *     Phi(x) = (1 + erf(x / sqrt 2)) / 2,   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
 *
 * erf(z) for z >= 0 by Abramowitz & Stegun 7.1.26: 1 - (a1 t + ... + a5 t^5) exp(-z^2),
 * t = 1 / (1 + p z), |error| <= 1.5e-7; erf is odd. exp(-z^2) = exp(-x^2 / 2) serves phi too. */
#define AS_P 0.3275911f
#define AS_A1 0.254829592f
#define AS_A2 -0.284496736f
#define AS_A3 1.421413741f
#define AS_A4 -1.453152027f
#define AS_A5 1.061405429f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

static inline float gelu_erf_slope(float x, float *phi_big) {
    const float z = fabsf(x) * INV_SQRT2, t = 1.0f / (1.0f + AS_P * z);
    const float poly = t * (AS_A1 + t * (AS_A2 + t * (AS_A3 + t * (AS_A4 + t * AS_A5))));
    float arg = -0.5f * x * x;
    arg = arg < EXP_LO ? EXP_LO : arg;
    const float e = expf(arg), erf_abs = 1.0f - poly * e;
    *phi_big = 0.5f * (1.0f + (x < 0 ? -erf_abs : erf_abs));
    return *phi_big + x * e * INV_SQRT_2PI;
}

/* y[i] = GELU(x[i]) and slope[i] = GELU'(x[i]), exact (erf) form; y may be x. (The same loop as
 * the tanh form's: shared through a function pointer, OpenMP's outlined body kept the slope
 * functions from inlining and the pass took 1.5x as long.) */
void lmarch_gelu_erf_forward_slope(const float *x, float *y, float *slope, int64_t n,
                                   int threads) {
    const int64_t chunks = (n + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 32768)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * 256;
        const int64_t end = i + 256 < n ? i + 256 : n;
#ifdef __AVX2__
        const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; i + 8 <= end; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(INV_SQRT2));
            const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(AS_P), z, one));
            __m256 poly = _mm256_fmadd_ps(t, _mm256_set1_ps(AS_A5), _mm256_set1_ps(AS_A4));
            poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(AS_A3));
            poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(AS_A2));
            poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(AS_A1));
            poly = _mm256_mul_ps(t, poly);
            const __m256 arg = _mm256_max_ps(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(v, v)),
                                             _mm256_set1_ps(EXP_LO));
            const __m256 e = exp8(arg);
            /* erf(x / sqrt 2) with the sign of x */
            const __m256 erf_abs = _mm256_fnmadd_ps(poly, e, one);
            const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, v));
            const __m256 big = _mm256_mul_ps(half, _mm256_add_ps(one, erf));
            const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(v, e), _mm256_set1_ps(INV_SQRT_2PI), big);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(v, big));
            _mm256_storeu_ps(slope + i, d);
        }
#endif
        for (; i < end; i++) { /* x may be y: read it once */
            float big;
            const float v = x[i];
            slope[i] = gelu_erf_slope(v, &big);
            y[i] = v * big;
        }
    }
}
