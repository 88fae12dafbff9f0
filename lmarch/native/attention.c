/*
 * Causal self-attention for training, forward and backward, read straight from the packed
 * projection qkv [B, T, (H + 2 H_kv) D] (per position: H query heads, H_kv key heads, H_kv value
 * heads) and written as y [B, T, H D], the layout the output projection reads:
 *
 *     S = (Q / sqrt(D)) K^T,   P = softmax_rows(S + causal mask),   Y = P V
 *     L_i = log sum_j exp S_ij                        (kept for the backward)
 *
 * Query head h reads key/value head h / (H / H_kv) (grouped-query attention). The backward
 * recomputes P from L (Dao et al. 2022, FlashAttention: memory O(B H T), not O(B H T^2)) and,
 * with dY the gradient of Y and delta_i = dY_i . Y_i,
 *
 *     dV = P^T dY,   dP = dY V^T,   dS = P * (dP - delta),   dQ = dS K / sqrt(D),
 *     dK = dS^T Q / sqrt(D)
 *
 * With dropout p on the probabilities (training), P is replaced by Pd = P * M / (1 - p) in Y = Pd V,
 * M the keep mask drawn from a seed (dropout_keep in kernels.h: nothing stored, the backward
 * redraws it); then dV = Pd^T dY, dP = (dY V^T) * M / (1 - p), and delta_i = dY_i . Y_i still.
 *
 * One task is one (batch row, key/value head): it copies its heads into small padded matrices
 * (T rounded up to 16) and runs every product above through one register-tiled kernel, so at
 * a small model's lengths the work is arithmetic, not set-up. PyTorch's fused CPU kernel
 * spends most of its time at T = 64 on set-up and on the copies between layouts.
 */
#include "kernels.h"

/* What a product may skip because of the causal mask (i: row of C, j: column, p: inner). */
enum {
    FULL = 0,
    LOWER_OUT = 1, /* C is lower triangular: columns j <= i only (S = Q K^T, dP = dY V^T) */
    LOWER_A = 2,   /* A is lower triangular: p <= i only (Y = P V, dQ = dS K) */
    UPPER_A = 3,   /* A is upper triangular: p >= i only (dV = P^T dY, dK = dS^T Q) */
};

/* C [m, n] (+)= A [m, k] B [k, n], row-major; m % 4 == 0, n % 16 == 0. With trans_a, A is
 * stored transposed ([k, m]: the same tile reads four neighbours of one row, no copy needed).
 * Columns a LOWER_OUT product skips are left unwritten. */
static void matmul(const float *a, const float *b, float *c, int64_t m, int64_t k, int64_t n,
                   int accumulate, int tri, int trans_a) {
    const int64_t a_row = trans_a ? 1 : k, a_inner = trans_a ? m : 1; /* A(i, p) strides */
    for (int64_t i = 0; i < m; i += 4) {
        const int64_t n_end = tri == LOWER_OUT && i + 4 < n ? (i + 4 + 15) / 16 * 16 : n;
        const int64_t p_begin = tri == UPPER_A ? i : 0;
        const int64_t p_end = tri == LOWER_A && i + 4 < k ? i + 4 : k;
        for (int64_t j = 0; j < n_end; j += 16) {
#ifdef __AVX2__
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++)
                for (int h = 0; h < 2; h++)
                    acc[r][h] = accumulate ? _mm256_loadu_ps(c + (i + r) * n + j + 8 * h)
                                           : _mm256_setzero_ps();
            for (int64_t p = p_begin; p < p_end; p++) {
                const __m256 b0 = _mm256_loadu_ps(b + p * n + j);
                const __m256 b1 = _mm256_loadu_ps(b + p * n + j + 8);
                for (int r = 0; r < 4; r++) {
                    const __m256 av = _mm256_broadcast_ss(a + (i + r) * a_row + p * a_inner);
                    acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int h = 0; h < 2; h++)
                    _mm256_storeu_ps(c + (i + r) * n + j + 8 * h, acc[r][h]);
#else
            for (int r = 0; r < 4; r++)
                for (int64_t q = 0; q < 16; q++) {
                    float sum = accumulate ? c[(i + r) * n + j + q] : 0.0f;
                    for (int64_t p = p_begin; p < p_end; p++)
                        sum += a[(i + r) * a_row + p * a_inner] * b[p * n + j + q];
                    c[(i + r) * n + j + q] = sum;
                }
#endif
        }
    }
}

static void transpose(const float *a, float *out, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) out[j * rows + i] = a[i * cols + j];
}

/* rows [t, d] at src (row stride `stride`) times `scale` into dst [tp, d], zero rows past t. */
static void gather(const float *src, int64_t stride, int64_t t, int64_t tp, int64_t d,
                   float scale, float *dst) {
    for (int64_t i = 0; i < t; i++) {
        const float *from = src + i * stride;
        float *to = dst + i * d;
        for (int64_t c = 0; c < d; c++) to[c] = from[c] * scale;
    }
    memset(dst + t * d, 0, (size_t)((tp - t) * d) * sizeof(float));
}

/* row[j] = exp(row[j] - by) for j < n, rounded up to 8 values (the caller zeroes past n). */
static inline void exp_row(float *row, int64_t n, float by) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 shift = _mm256_set1_ps(by), lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
    for (; j < n; j += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(row + j), shift);
        _mm256_storeu_ps(row + j, exp8(_mm256_min_ps(_mm256_max_ps(x, lo), hi)));
    }
#endif
    for (; j < n; j++) {
        const float x = row[j] - by;
        row[j] = expf(x < EXP_LO ? EXP_LO : (x > EXP_HI ? EXP_HI : x));
    }
}

/* P_ij = exp(S_ij - shift_i) for j <= i < t, 0 elsewhere; with shift = NULL the row's own
 * log-sum-exp is used (and stored in lse_out). tp is a multiple of 16. */
static void causal_softmax(float *s, int64_t t, int64_t tp, const float *shift, float *lse_out) {
    for (int64_t i = 0; i < tp; i++) {
        float *row = s + i * tp;
        const int64_t n = i + 1;
        if (i >= t) {
            memset(row, 0, (size_t)tp * sizeof(float));
            continue;
        }
        float top = -INFINITY;
        if (!shift)
            for (int64_t j = 0; j < n; j++) top = row[j] > top ? row[j] : top;
        exp_row(row, n, shift ? shift[i] : top);
        memset(row + n, 0, (size_t)(tp - n) * sizeof(float));
        if (!shift) {
            float total = 0.0f;
            for (int64_t j = 0; j < n; j++) total += row[j];
            const float inv = 1.0f / total;
            for (int64_t j = 0; j < n; j++) row[j] *= inv;
            lse_out[i] = top + logf(total);
        }
    }
}

/* Dropout on the probabilities of one head: P_ij *= M_ij / (1 - p) for j <= i < t; the mask
 * index of (i, j) is (first + i) t + j, first = (batch row * H + head) * T. */
static void drop_probabilities(float *s, int64_t t, int64_t tp, uint64_t seed, uint64_t first,
                               float p) {
    const uint32_t threshold = keep_threshold(p);
    const float scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j <= i; j++)
            s[i * tp + j] *= dropout_keep(seed, (first + i) * t + j, threshold) ? scale : 0.0f;
}

typedef struct {
    float *q, *k, *kt, *v, *vt, *s, *s2, *dy, *dq, *dk, *dv;
} scratch;

static float *scratch_make(scratch *w, int64_t tp, int64_t d) {
    const int64_t td = tp * d, tt = tp * tp;
    float *mem = (float *)malloc((size_t)(9 * td + 2 * tt) * sizeof(float));
    if (!mem) return NULL;
    float *p = mem;
    w->q = p, p += td;
    w->k = p, p += td;
    w->kt = p, p += td;
    w->v = p, p += td;
    w->vt = p, p += td;
    w->dy = p, p += td;
    w->dq = p, p += td;
    w->dk = p, p += td;
    w->dv = p, p += td;
    w->s = p, p += tt;
    w->s2 = p;
    return mem;
}

/* Y and L (see above); dropout p on the probabilities when p > 0, its mask drawn from seed, with
 * batch row 0 here being row b_first of the whole batch. Returns 0, or -1 when out of memory. */
int lmarch_causal_attention_forward(const float *qkv, int64_t batch, int64_t t, int64_t heads,
                                    int64_t kv_heads, int64_t d, float *y, float *lse,
                                    int threads, float p, uint64_t seed, int64_t b_first) {
    const int64_t row = (heads + 2 * kv_heads) * d, rep = heads / kv_heads;
    const int64_t tp = (t + 15) / 16 * 16;
    const float scale = 1.0f / sqrtf((float)d);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        scratch w;
        float *mem = scratch_make(&w, tp, d);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t g = 0; g < kv_heads; g++) {
                if (!mem) continue;
                const float *base = qkv + b * t * row;
                gather(base + (heads + g) * d, row, t, tp, d, 1.0f, w.k);
                transpose(w.k, w.kt, tp, d);
                gather(base + (heads + kv_heads + g) * d, row, t, tp, d, 1.0f, w.v);
                for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                    gather(base + h * d, row, t, tp, d, scale, w.q);
                    matmul(w.q, w.kt, w.s, tp, d, tp, 0, LOWER_OUT, 0);
                    causal_softmax(w.s, t, tp, NULL, lse + (b * heads + h) * t);
                    if (p > 0.0f)
                        drop_probabilities(w.s, t, tp, seed, ((b_first + b) * heads + h) * t, p);
                    matmul(w.s, w.v, w.dq, tp, tp, d, 0, LOWER_A, 0);
                    for (int64_t i = 0; i < t; i++)
                        memcpy(y + (b * t + i) * heads * d + h * d, w.dq + i * d,
                               (size_t)d * sizeof(float));
                }
            }
        free(mem);
    }
    return failed ? -1 : 0;
}

/* dqkv (same layout as qkv, every element written) from dy, given y and L of the forward (and
 * its p, seed and b_first). */
int lmarch_causal_attention_backward(const float *qkv, const float *y, const float *dy,
                                     const float *lse, int64_t batch, int64_t t, int64_t heads,
                                     int64_t kv_heads, int64_t d, float *dqkv, int threads,
                                     float p, uint64_t seed, int64_t b_first) {
    const uint32_t threshold = keep_threshold(p);
    const float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const int64_t row = (heads + 2 * kv_heads) * d, rep = heads / kv_heads;
    const int64_t tp = (t + 15) / 16 * 16, out_row = heads * d;
    const float scale = 1.0f / sqrtf((float)d);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        scratch w;
        float *mem = scratch_make(&w, tp, d);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t g = 0; g < kv_heads; g++) {
                if (!mem) continue;
                const float *base = qkv + b * t * row;
                float *dbase = dqkv + b * t * row;
                gather(base + (heads + g) * d, row, t, tp, d, 1.0f, w.k);
                transpose(w.k, w.kt, tp, d);
                gather(base + (heads + kv_heads + g) * d, row, t, tp, d, 1.0f, w.v);
                transpose(w.v, w.vt, tp, d);
                memset(w.dk, 0, (size_t)(tp * d) * sizeof(float));
                memset(w.dv, 0, (size_t)(tp * d) * sizeof(float));
                for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                    const float *yh = y + b * t * out_row + h * d;
                    gather(base + h * d, row, t, tp, d, scale, w.q);
                    gather(dy + b * t * out_row + h * d, out_row, t, tp, d, 1.0f, w.dy);
                    matmul(w.q, w.kt, w.s, tp, d, tp, 0, LOWER_OUT, 0); /* S, then P from L */
                    causal_softmax(w.s, t, tp, lse + (b * heads + h) * t, NULL);
                    matmul(w.dy, w.vt, w.s2, tp, d, tp, 0, LOWER_OUT, 0); /* dP */
                    const uint64_t first = ((b_first + b) * heads + h) * t;
                    for (int64_t i = 0; i < tp; i++) {      /* dS = P (dP - delta) */
                        const float delta = i < t ? dot_f32(w.dy + i * d, yh + i * out_row, d) : 0;
                        const int64_t n = i < t ? i + 1 : 0; /* P is 0 elsewhere */
                        float *si = w.s + i * tp, *s2i = w.s2 + i * tp;
                        if (p > 0.0f) /* dP = dPd M / (1 - p); then P becomes Pd for dV */
                            for (int64_t j = 0; j < n; j++) {
                                const float m =
                                    dropout_keep(seed, (first + i) * t + j, threshold) ? keep_scale
                                                                                       : 0.0f;
                                s2i[j] = si[j] * (s2i[j] * m - delta);
                                si[j] *= m;
                            }
                        else
                            for (int64_t j = 0; j < n; j++) s2i[j] = si[j] * (s2i[j] - delta);
                        memset(s2i + n, 0, (size_t)(tp - n) * sizeof(float));
                    }
                    matmul(w.s2, w.k, w.dq, tp, tp, d, 0, LOWER_A, 0); /* dQ (scale below) */
                    for (int64_t i = 0; i < t; i++)
                        for (int64_t c = 0; c < d; c++)
                            dbase[i * row + h * d + c] = w.dq[i * d + c] * scale;
                    matmul(w.s, w.dy, w.dv, tp, tp, d, 1, UPPER_A, 1); /* dV += Pd^T dY */
                    matmul(w.s2, w.q, w.dk, tp, tp, d, 1, UPPER_A, 1); /* dK += dS^T Q/sqrt(D) */
                }
                for (int64_t i = 0; i < t; i++) {
                    memcpy(dbase + i * row + (heads + g) * d, w.dk + i * d, (size_t)d * sizeof(float));
                    memcpy(dbase + i * row + (heads + kv_heads + g) * d, w.dv + i * d,
                           (size_t)d * sizeof(float));
                }
            }
        free(mem);
    }
    return failed ? -1 : 0;
}
