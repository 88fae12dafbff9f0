/*
 * One pre-norm LLaMA decoder layer for one new token, in a single call:
 *
 *     h  = RMSNorm(x) g_attn                         RMSNorm: x / sqrt(mean(x^2) + eps)
 *     q, k, v = W_qkv h                              (rows: H query heads, H_kv key, H_kv value)
 *     q, k = RoPE(q, pos), RoPE(k, pos)              pairs (j, j + r/2) of the first r dims
 *     K[pos], V[pos] = k, v                          the static cache of this layer
 *     a_i = sum_s softmax_s(q_i . K[s] / sqrt(D)) V[s],   s = 0 .. pos, head i reads
 *                                                    key/value head i / (H / H_kv)   (GQA)
 *     x  = x + W_o a
 *     h  = RMSNorm(x) g_ffn
 *     x  = x + W_down (SiLU(W_gate h) * (W_up h))    (SwiGLU; W_gate, W_up: halves of W_gu)
 *
 * Every matrix is in a GGUF block format (Q4_1 or Q8_0, see kernels.h). The PyTorch model runs
 * the same equations as ~25 operators a layer; while decoding one token each of them takes
 * longer to dispatch than to compute, so here the whole layer is one OpenMP parallel region:
 * the four products split their rows across threads, attention splits its heads, and the
 * small vector steps run on one thread between barriers.
 */
#include "kernels.h"


/* Row j of w [n, k] against one quantised activation row. */
static inline float matrix_row(const lmarch_matrix *w, int64_t j, int64_t k, const act_rows *a) {
    const int64_t nb = k / QK;
    if (w->type == LMARCH_MAT_Q4_1)
        return dot_q4_1((const uint8_t *)w->codes + j * (k / 2), w->constants + j * nb * 2, a->p,
                        a->e, a->sx, nb);
    return dot_q8_0((const int8_t *)w->codes + j * k, w->constants + j * nb, a->p, a->e, nb);
}

/* Lay out quantised-activation scratch for one row of k inside mem; returns the bytes used. */
static size_t act_row_at(act_rows *a, char *mem, int64_t k) {
    a->e = (float *)mem;
    a->sx = a->e + k / QK;
    a->p = (int16_t *)(a->sx + k / QK);
    a->mem = NULL;
    return (size_t)(2 * (k / QK) * sizeof(float) + k * sizeof(int16_t));
}

static void rms_norm(const float *x, const float *g, int64_t n, float eps, float *y) {
    const float ss = dot_f32(x, x, n);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * g[i];
}

/* Rotate the pairs (v_j, v_{j + r/2}), j < r/2, by the angles whose cos/sin are given. */
static void rope(float *v, const float *cos, const float *sin, int64_t r) {
    const int64_t half = r / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = v[j], b = v[j + half];
        v[j] = a * cos[j] - b * sin[j];
        v[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

/* softmax(q . K[s] / sqrt(D)) V over s = 0 .. n-1, for one query head; scores: n floats. */
static void attend(const float *q, const float *keys, const float *values, int64_t n, int64_t d,
                   float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)d);
    float top = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        scores[s] = dot_f32(q, keys + s * d, d) * scale;
        top = scores[s] > top ? scores[s] : top;
    }
    float total = 0.0f;
    for (int64_t s = 0; s < n; s++) {
        scores[s] = expf(scores[s] - top);
        total += scores[s];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t s = 0; s < n; s++) {
        const float w = scores[s] * inv, *v = values + s * d;
        for (int64_t i = 0; i < d; i++) out[i] += w * v[i];
    }
}

/*
 * x [dim] <- the layer applied to x at position pos. keys/values: this layer's cache
 * [n_kv_heads, max_len, head_dim] (written at pos); cos/sin: the rotary angles of pos
 * [rotary_dim]. Returns 0, -1 when out of memory, -2 when pos is outside the cache.
 */
int lmarch_decoder_layer(const lmarch_layer *L, float *x, float *keys, float *values,
                         int64_t max_len, const float *cos, const float *sin, int64_t pos,
                         int threads) {
    const int64_t dim = L->dim, hd = L->head_dim, nh = L->n_heads, nkv = L->n_kv_heads;
    const int64_t n_qkv = (nh + 2 * nkv) * hd, hidden = L->hidden, rep = nh / nkv;
    const int64_t n_keys = pos + 1;
    if (pos < 0 || pos >= max_len) return -2;
    const int64_t widest = dim > hidden ? (dim > nh * hd ? dim : nh * hd)
                                        : (hidden > nh * hd ? hidden : nh * hd);
    const size_t act_bytes = (size_t)(2 * (widest / QK + 1) * sizeof(float) +
                                      (widest + QK) * sizeof(int16_t)) + 64;
    const size_t floats = (size_t)(dim + n_qkv + nh * hd + hidden + nh * n_keys);
    char *mem = (char *)malloc(act_bytes + floats * sizeof(float));
    if (!mem) return -1;
    float *h = (float *)(mem + act_bytes), *qkv = h + dim, *att = qkv + n_qkv;
    float *gate = att + nh * hd, *scores = gate + hidden;
    act_rows a;
    act_row_at(&a, mem, widest);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp single
        {
            rms_norm(x, L->norm_attn, dim, L->eps, h);
            quantize_act(h, 1, dim, a.p, a.e, a.sx);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n_qkv; j++) qkv[j] = matrix_row(&L->qkv, j, dim, &a);
#pragma omp single
        {
            for (int64_t i = 0; i < nh + nkv; i++) rope(qkv + i * hd, cos, sin, L->rotary_dim);
            const float *k = qkv + nh * hd, *v = k + nkv * hd;
            for (int64_t g = 0; g < nkv; g++) {
                memcpy(keys + (g * max_len + pos) * hd, k + g * hd, (size_t)hd * sizeof(float));
                memcpy(values + (g * max_len + pos) * hd, v + g * hd, (size_t)hd * sizeof(float));
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < nh; i++) {
            const int64_t g = i / rep;
            attend(qkv + i * hd, keys + g * max_len * hd, values + g * max_len * hd, n_keys, hd,
                   scores + i * n_keys, att + i * hd);
        }
#pragma omp single
        quantize_act(att, 1, nh * hd, a.p, a.e, a.sx);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < dim; j++) x[j] += matrix_row(&L->out, j, nh * hd, &a);
#pragma omp single
        {
            rms_norm(x, L->norm_ffn, dim, L->eps, h);
            quantize_act(h, 1, dim, a.p, a.e, a.sx);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < hidden; j++) {
            const float g = matrix_row(&L->gate_up, j, dim, &a);
            gate[j] = g / (1.0f + expf(-g)) * matrix_row(&L->gate_up, hidden + j, dim, &a);
        }
#pragma omp single
        quantize_act(gate, 1, hidden, a.p, a.e, a.sx);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < dim; j++) x[j] += matrix_row(&L->down, j, hidden, &a);
    }
    free(mem);
    return 0;
}
