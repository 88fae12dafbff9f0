/*
 * LayerNorm forward and backward over rows of a [N, C] matrix (Ba et al. 2016), and the
 * row-wise helpers a fused transformer block needs around its matrix products.
 *
 *     mu = mean_j x_j,   r = 1 / sqrt(mean_j (x_j - mu)^2 + eps),   xhat_j = (x_j - mu) r
 *     y_j = g_j xhat_j + b_j
 *
 * Backward, with dy the gradient of y and u_j = g_j dy_j:
 *
 *     dx_j = r (u_j - mean_k u_k - xhat_j mean_k (u_k xhat_k))
 *     dg_j = sum_rows dy_j xhat_j,      db_j = sum_rows dy_j
 *
 * The forward keeps mu and r per row for the backward. Sums over rows (dg, db, a bias's
 * gradient) are taken per thread over a fixed share of the rows and added in thread order,
 * so for a given thread count the result does not depend on scheduling: training stays
 * bit-reproducible.
 */
#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* How many threads the enclosing parallel region really has (OpenMP may give fewer). */
static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* [first, end) rows of thread `id` of `count` (a fixed split: reductions stay in order). */
static inline void share(int64_t n, int id, int count, int64_t *first, int64_t *end) {
    *first = n * id / count;
    *end = n * (id + 1) / count;
}

/* y = LayerNorm(x) with gain g and bias b (b may be NULL); mean and rstd per row. */
void lmarch_layer_norm_forward(const float *x, const float *g, const float *b, float *y,
                               float *mean, float *rstd, int64_t n, int64_t c, float eps,
                               int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * c >= 16384)
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * c;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < c; j++) sum += row[j];
        const float mu = sum / (float)c;
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < c; j++) {
            const float d = row[j] - mu;
            sq += d * d;
        }
        const float r = 1.0f / sqrtf(sq / (float)c + eps);
        float *out = y + i * c;
        for (int64_t j = 0; j < c; j++) out[j] = (row[j] - mu) * r * g[j] + (b ? b[j] : 0.0f);
        mean[i] = mu;
        rstd[i] = r;
    }
}

/* Adds `count` partial rows of width w (laid out one after another) into out, in order. */
static void reduce_partials(const float *partial, int count, int64_t w, float *out) {
    for (int64_t j = 0; j < w; j++) {
        float s = 0.0f;
        for (int t = 0; t < count; t++) s += partial[t * w + j];
        out[j] = s;
    }
}

/* dx = residual + LayerNorm'(x)^T dy (residual may be NULL); dg, db (db may be NULL) are
 * written (not accumulated). Returns 0, or 1 when out of memory. */
int lmarch_layer_norm_backward(const float *dy, const float *x, const float *mean,
                               const float *rstd, const float *g, const float *residual,
                               float *dx, float *dg, float *db, int64_t n, int64_t c,
                               int threads) {
    if (threads < 1 || n * c < 16384) threads = 1;
    float *partial = calloc((size_t)threads * 2 * (size_t)c, sizeof(float));
    if (!partial) return 1;
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        const int id = thread_id(), count = thread_count();
        if (id == 0) used = count;
        int64_t first, end;
        share(n, id, count, &first, &end);
        float *pg = partial + (size_t)id * 2 * c, *pb = pg + c;
        for (int64_t i = first; i < end; i++) {
            const float *xr = x + i * c, *dr = dy + i * c;
            const float mu = mean[i], r = rstd[i];
            float su = 0.0f, sux = 0.0f;
#pragma omp simd reduction(+ : su, sux)
            for (int64_t j = 0; j < c; j++) {
                const float xh = (xr[j] - mu) * r, u = g[j] * dr[j];
                su += u;
                sux += u * xh;
                pg[j] += dr[j] * xh;
                pb[j] += dr[j];
            }
            su /= (float)c;
            sux /= (float)c;
            float *out = dx + i * c;
            const float *res = residual ? residual + i * c : NULL;
            for (int64_t j = 0; j < c; j++) {
                const float xh = (xr[j] - mu) * r;
                out[j] = (res ? res[j] : 0.0f) + r * (g[j] * dr[j] - su - xh * sux);
            }
        }
    }
    float *tmp = malloc(2 * (size_t)c * sizeof(float));
    if (!tmp) {
        free(partial);
        return 1;
    }
    reduce_partials(partial, used, 2 * c, tmp); /* partial is [thread][dg | db] */
    memcpy(dg, tmp, (size_t)c * sizeof(float));
    if (db) memcpy(db, tmp + c, (size_t)c * sizeof(float));
    free(tmp);
    free(partial);
    return 0;
}

/* out[i, :] = base[i, :] + bias for the n rows (base or bias may be NULL: zero). */
void lmarch_rows_plus_bias(const float *base, const float *bias, float *out, int64_t n,
                           int64_t c, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * c >= 65536)
    for (int64_t i = 0; i < n; i++) {
        float *o = out + i * c;
        const float *src = base ? base + i * c : NULL;
        for (int64_t j = 0; j < c; j++) o[j] = (src ? src[j] : 0.0f) + (bias ? bias[j] : 0.0f);
    }
}

/* x[i, j] *= scale[i, j] (scale may be NULL: x as it is), then sums[j] = sum_i x[i, j] (sums
 * may be NULL): a gradient through an elementwise function given its slope, and the gradient
 * of the bias before it, in one pass. Returns 0, or 1 when out of memory. */
int lmarch_mul_column_sums(float *x, const float *scale, float *sums, int64_t n, int64_t c,
                           int threads) {
    if (threads < 1 || n * c < 16384) threads = 1;
    float *partial = calloc((size_t)threads * (size_t)c, sizeof(float));
    if (!partial) return 1;
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        const int id = thread_id(), count = thread_count();
        if (id == 0) used = count;
        int64_t first, end;
        share(n, id, count, &first, &end);
        float *p = partial + (size_t)id * c;
        for (int64_t i = first; i < end; i++) {
            float *row = x + i * c;
            if (scale)
                for (int64_t j = 0; j < c; j++) row[j] *= scale[i * c + j];
            if (sums)
                for (int64_t j = 0; j < c; j++) p[j] += row[j];
        }
    }
    if (sums) reduce_partials(partial, used, c, sums);
    free(partial);
    return 0;
}

/* out = base + o * M / (1 - p) for the n rows (base may be NULL: zero), M the dropout mask of
 * stream `seed` at element (row0 + i) c + j (dropout_keep in kernels.h): a residual branch's
 * dropout, forward (base = the residual) and backward (base = NULL, o = the gradient). */
void lmarch_add_dropped(const float *base, const float *o, float *out, int64_t n, int64_t c,
                        int64_t row0, float p, uint64_t seed, int threads) {
    const uint32_t threshold = keep_threshold(p);
    const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * c >= 65536)
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            const float m = dropout_keep(seed, (uint64_t)(row0 + i) * c + j, threshold) ? scale : 0;
            out[i * c + j] = (base ? base[i * c + j] : 0.0f) + o[i * c + j] * m;
        }
}
