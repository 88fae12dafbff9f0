/*
 * A pre-LN GPT-2 block, forward and backward, with the batch split across threads (the
 * equations are in gpt_block.py's docstring).
 *
 * Every step of the block but the weight gradients works row by row, and attention sequence by
 * sequence, so each thread takes whole sequences and runs the block over them from start to
 * finish: LayerNorm, products, attention, GELU, with no barrier between them. The products go
 * to the BLAS that PyTorch itself uses (its sgemm, whose address Python hands over), which
 * inside a parallel region runs on the calling thread alone. At a small model's sizes this beats
 * handing each product to the BLAS's own two-thread split: that split costs ~13% in
 * efficiency (two threads reach ~1.75x one), there is a barrier after every operation, and each
 * thread's rows stay in its own cache from one step to the next.
 *
 * The weight and bias gradients are sums over all rows: each thread sums over its own rows, into
 * the gradient itself (thread 0) or into its own buffer, and the buffers are added in thread
 * order afterwards, so for a given thread count the result does not depend on scheduling.
 */
#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Fortran BLAS: column-major C = alpha op(A) op(B) + beta C. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
static sgemm_fn sgemm = NULL;

void lmarch_set_sgemm(void *fn) { sgemm = (sgemm_fn)fn; }

/* Row-major C [m, n] = beta C + op(A) op(B), A stored [m, k] (or [k, m] with ta), B stored
 * [k, n] (or [n, k] with tb); a row-major matrix is its transpose in column-major terms, so
 * this is the column-major product C^T = op(B)^T op(A)^T. */
static void gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *a,
                 const float *b, float beta, float *c) {
    const char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
    const int im = (int)m, in = (int)n, ik = (int)k;
    const int lda = ta ? im : ik, ldb = tb ? ik : in;
    const float one = 1.0f;
    sgemm(&fb, &fa, &in, &im, &ik, &one, b, &ldb, a, &lda, &beta, c, &in);
}

/* 1 when the sgemm handed over multiplies correctly (and with 32-bit sizes). */
int lmarch_sgemm_check(void) {
    if (!sgemm) return 0;
    const float a[6] = {1, 2, 3, 4, 5, 6}; /* [2, 3] */
    const float b[6] = {1, 0, 2, 1, 0, 3}; /* [3, 2] stored as [2, 3] (transposed) */
    float c[4] = {-1, -1, -1, -1};
    gemm(0, 1, 2, 2, 3, a, b, 0.0f, c); /* c = a b^T */
    const float want[4] = {7, 10, 16, 22};
    for (int i = 0; i < 4; i++)
        if (c[i] != want[i]) return 0;
    return 1;
}

/* Parameter and saved-tensor slots (lmarch.h), by short names. */
enum {
    LN1_W = LMARCH_GPT_LN1_W, LN1_B = LMARCH_GPT_LN1_B, QKV_W = LMARCH_GPT_QKV_W,
    QKV_B = LMARCH_GPT_QKV_B, OUT_W = LMARCH_GPT_OUT_W, OUT_B = LMARCH_GPT_OUT_B,
    LN2_W = LMARCH_GPT_LN2_W, LN2_B = LMARCH_GPT_LN2_B, FC_W = LMARCH_GPT_FC_W,
    FC_B = LMARCH_GPT_FC_B, PR_W = LMARCH_GPT_PR_W, PR_B = LMARCH_GPT_PR_B,
    N_PARAMS = LMARCH_GPT_N_PARAMS
};
enum {
    LN1 = LMARCH_GPT_SAVED_LN1, MEAN1 = LMARCH_GPT_SAVED_MEAN1, RSTD1 = LMARCH_GPT_SAVED_RSTD1,
    QKV = LMARCH_GPT_SAVED_QKV, ATT = LMARCH_GPT_SAVED_ATT, LSE = LMARCH_GPT_SAVED_LSE,
    X1 = LMARCH_GPT_SAVED_X1, LN2 = LMARCH_GPT_SAVED_LN2, MEAN2 = LMARCH_GPT_SAVED_MEAN2,
    RSTD2 = LMARCH_GPT_SAVED_RSTD2, SLOPE = LMARCH_GPT_SAVED_SLOPE, ACT = LMARCH_GPT_SAVED_ACT
};

typedef struct {
    int64_t batch, t, c, heads, kv_heads, d, hidden, exact_gelu;
    int64_t width, att; /* (H + 2 H_kv) D and H D */
    float drop[2];      /* attention, MLP */
    uint64_t seeds[3];  /* probabilities, attention branch, MLP branch */
} dims_t;

static dims_t read_dims(const lmarch_gpt_shape *v) {
    dims_t s = {v->batch,    v->t,      v->c,          v->heads, v->kv_heads,
                v->head_dim, v->hidden, v->exact_gelu, 0,        0,
                {v->dropout_attn, v->dropout_mlp},
                {v->seed_probs, v->seed_attn, v->seed_mlp}};
    s.width = (s.heads + 2 * s.kv_heads) * s.d;
    s.att = s.heads * s.d;
    return s;
}

static inline void thread_info(int *id, int *count) {
#ifdef _OPENMP
    *id = omp_get_thread_num();
    *count = omp_get_num_threads();
#else
    *id = 0;
    *count = 1;
#endif
}

/* p: the 12 parameters; s: the 12 saved tensors, written (slots in lmarch.h). Returns 0, or
 * -1 when out of memory (or no sgemm). */
int lmarch_gpt_block_forward(const float *x, const float *const *p, float *const *s, float *y,
                             const lmarch_gpt_shape *shape, int threads) {
    if (!sgemm) return -1;
    const dims_t z = read_dims(shape);
    const float *drop = z.drop, eps[2] = {shape->eps1, shape->eps2};
    const uint64_t *seeds = z.seeds;
    const int dropping = drop[0] > 0.0f || drop[1] > 0.0f;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int id, count;
        thread_info(&id, &count);
        const int64_t b0 = z.batch * id / count, b1 = z.batch * (id + 1) / count;
        const int64_t r = b0 * z.t, n = (b1 - b0) * z.t; /* this thread's rows */
        float *branch = dropping ? malloc((size_t)(n * z.c + 1) * sizeof(float)) : NULL;
        if (dropping && !branch) {
#pragma omp atomic write
            failed = 1;
        }
        if (n > 0 && (branch || !dropping)) {
            const float *xr = x + r * z.c;
            float *ln1 = s[LN1] + r * z.c, *qkv = s[QKV] + r * z.width, *att = s[ATT] + r * z.att;
            float *x1 = s[X1] + r * z.c, *ln2 = s[LN2] + r * z.c, *act = s[ACT] + r * z.hidden;
            lmarch_layer_norm_forward(xr, p[LN1_W], p[LN1_B], ln1, s[MEAN1] + r, s[RSTD1] + r, n,
                                      z.c, eps[0], 1);
            lmarch_rows_plus_bias(NULL, p[QKV_B], qkv, n, z.width, 1);
            gemm(0, 1, n, z.width, z.c, ln1, p[QKV_W], 1.0f, qkv);
            if (lmarch_causal_attention_forward(qkv, b1 - b0, z.t, z.heads, z.kv_heads, z.d, att,
                                                s[LSE] + b0 * z.heads * z.t, 1, drop[0],
                                                seeds[0], b0)) {
#pragma omp atomic write
                failed = 1;
            }
            if (drop[0] > 0.0f) { /* x1 = x + Dropout(att W_o^T + b_o) */
                lmarch_rows_plus_bias(NULL, p[OUT_B], branch, n, z.c, 1);
                gemm(0, 1, n, z.c, z.att, att, p[OUT_W], 1.0f, branch);
                lmarch_add_dropped(xr, branch, x1, n, z.c, r, drop[0], seeds[1], 1);
            } else {
                lmarch_rows_plus_bias(xr, p[OUT_B], x1, n, z.c, 1);
                gemm(0, 1, n, z.c, z.att, att, p[OUT_W], 1.0f, x1);
            }
            lmarch_layer_norm_forward(x1, p[LN2_W], p[LN2_B], ln2, s[MEAN2] + r, s[RSTD2] + r, n,
                                      z.c, eps[1], 1);
            lmarch_rows_plus_bias(NULL, p[FC_B], act, n, z.hidden, 1);
            gemm(0, 1, n, z.hidden, z.c, ln2, p[FC_W], 1.0f, act); /* h, then GELU(h) in place */
            (z.exact_gelu ? lmarch_gelu_erf_forward_slope : lmarch_gelu_tanh_forward_slope)(
                act, act, s[SLOPE] + r * z.hidden, n * z.hidden, 1);
            if (drop[1] > 0.0f) { /* y = x1 + Dropout(a W_pr^T + b_pr) */
                lmarch_rows_plus_bias(NULL, p[PR_B], branch, n, z.c, 1);
                gemm(0, 1, n, z.c, z.hidden, act, p[PR_W], 1.0f, branch);
                lmarch_add_dropped(x1, branch, y + r * z.c, n, z.c, r, drop[1], seeds[2], 1);
            } else {
                lmarch_rows_plus_bias(x1, p[PR_B], y + r * z.c, n, z.c, 1);
                gemm(0, 1, n, z.c, z.hidden, act, p[PR_W], 1.0f, y + r * z.c);
            }
        }
        free(branch);
    }
    return failed ? -1 : 0;
}

/* Sizes of the 12 gradients (0 for an absent bias). */
static void grad_sizes(const dims_t *z, const float *const *p, int64_t *size) {
    const int64_t full[N_PARAMS] = {z->c,          z->c,     z->width * z->c, z->width,
                                    z->c * z->att, z->c,     z->c,            z->c,
                                    z->hidden * z->c, z->hidden, z->c * z->hidden, z->c};
    for (int i = 0; i < N_PARAMS; i++) size[i] = p[i] ? full[i] : 0;
}

/* dx and the 12 gradients g (NULL where p is NULL), written, from dy; shape as given to the
 * forward. */
int lmarch_gpt_block_backward(const float *dy, const float *x, const float *const *p,
                              const float *const *s, float *dx, float *const *g,
                              const lmarch_gpt_shape *shape, int threads) {
    if (!sgemm) return -1;
    const dims_t z = read_dims(shape);
    const float *drop = z.drop;
    const uint64_t *seeds = z.seeds;
    int64_t size[N_PARAMS], total = 0;
    grad_sizes(&z, p, size);
    for (int i = 0; i < N_PARAMS; i++) total += size[i];
    if (threads < 1) threads = 1;
    /* thread 0 writes into g; thread t > 0 into partial + (t - 1) * total */
    float *partial = threads > 1 ? malloc((size_t)(threads - 1) * total * sizeof(float)) : NULL;
    if (threads > 1 && !partial) return -1;
    int failed = 0, used = 1;
#pragma omp parallel num_threads(threads)
    {
        int id, count;
        thread_info(&id, &count);
        if (id == 0) used = count;
        float *mine[N_PARAMS];
        int64_t off = 0;
        for (int i = 0; i < N_PARAMS; i++) {
            mine[i] = !size[i] ? NULL : id == 0 ? g[i] : partial + (id - 1) * total + off;
            off += size[i];
        }
        const int64_t b0 = z.batch * id / count, b1 = z.batch * (id + 1) / count;
        const int64_t r = b0 * z.t, n = (b1 - b0) * z.t;
        /* this thread's scratch: dh [n, F], dx1, dln, dbranch [n, C], datt [n, HD], dqkv [n, W] */
        float *mem = malloc((size_t)(n * (z.hidden + 3 * z.c + z.att + z.width) + 1) * sizeof(float));
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
        if (mem && n == 0) /* no rows: this thread's share of every sum is zero */
            for (int i = 0; i < N_PARAMS; i++)
                if (mine[i]) memset(mine[i], 0, (size_t)size[i] * sizeof(float));
        if (mem && n > 0) {
            float *dh = mem, *dx1 = dh + n * z.hidden, *dln = dx1 + n * z.c;
            float *dbranch = dln + n * z.c, *datt = dbranch + n * z.c, *dqkv = datt + n * z.att;
            const float *dyr = dy + r * z.c, *ln1 = s[LN1] + r * z.c, *qkv = s[QKV] + r * z.width;
            const float *att = s[ATT] + r * z.att, *x1 = s[X1] + r * z.c, *ln2 = s[LN2] + r * z.c;
            const float *act = s[ACT] + r * z.hidden, *lse = s[LSE] + b0 * z.heads * z.t;
            /* MLP; its branch's gradient is dy, or dy M / (1 - p) under dropout */
            const float *dmlp = dyr;
            if (drop[1] > 0.0f) {
                lmarch_add_dropped(NULL, dyr, dbranch, n, z.c, r, drop[1], seeds[2], 1);
                dmlp = dbranch;
            }
            gemm(1, 0, z.c, z.hidden, n, dmlp, act, 0.0f, mine[PR_W]); /* dW_pr = dy^T a */
            if (mine[PR_B]) lmarch_mul_column_sums((float *)dmlp, NULL, mine[PR_B], n, z.c, 1);
            gemm(0, 0, n, z.hidden, z.c, dmlp, p[PR_W], 0.0f, dh); /* da = dy W_pr */
            if (lmarch_mul_column_sums(dh, s[SLOPE] + r * z.hidden, mine[FC_B], n, z.hidden, 1)) {
#pragma omp atomic write
                failed = 1;
            }
            gemm(1, 0, z.hidden, z.c, n, dh, ln2, 0.0f, mine[FC_W]); /* dW_fc = dh^T LN2(x1) */
            gemm(0, 0, n, z.c, z.hidden, dh, p[FC_W], 0.0f, dln);    /* dLN2 = dh W_fc */
            if (lmarch_layer_norm_backward(dln, x1, s[MEAN2] + r, s[RSTD2] + r, p[LN2_W], dyr,
                                           dx1, mine[LN2_W], mine[LN2_B], n, z.c, 1)) {
#pragma omp atomic write
                failed = 1;
            }
            /* attention; its branch's gradient is dx1, or dx1 M / (1 - p) under dropout */
            float *dattn = dx1;
            if (drop[0] > 0.0f) {
                lmarch_add_dropped(NULL, dx1, dbranch, n, z.c, r, drop[0], seeds[1], 1);
                dattn = dbranch;
            }
            if (mine[OUT_B]) lmarch_mul_column_sums(dattn, NULL, mine[OUT_B], n, z.c, 1);
            gemm(1, 0, z.c, z.att, n, dattn, att, 0.0f, mine[OUT_W]); /* dW_o = dx1^T att */
            gemm(0, 0, n, z.att, z.c, dattn, p[OUT_W], 0.0f, datt);   /* datt = dx1 W_o */
            if (lmarch_causal_attention_backward(qkv, att, datt, lse, b1 - b0, z.t, z.heads,
                                                 z.kv_heads, z.d, dqkv, 1, drop[0], seeds[0],
                                                 b0)) {
#pragma omp atomic write
                failed = 1;
            }
            if (mine[QKV_B]) lmarch_mul_column_sums(dqkv, NULL, mine[QKV_B], n, z.width, 1);
            gemm(1, 0, z.width, z.c, n, dqkv, ln1, 0.0f, mine[QKV_W]); /* dW_qkv = dqkv^T LN1(x) */
            gemm(0, 0, n, z.c, z.width, dqkv, p[QKV_W], 0.0f, dln);    /* dLN1 = dqkv W_qkv */
            if (lmarch_layer_norm_backward(dln, x + r * z.c, s[MEAN1] + r, s[RSTD1] + r, p[LN1_W],
                                           dx1, dx + r * z.c, mine[LN1_W], mine[LN1_B], n, z.c,
                                           1)) {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(mem);
    }
    /* add the other threads' sums, in thread order */
    if (!failed && used > 1) {
        int64_t off = 0;
        for (int i = 0; i < N_PARAMS; i++) {
            if (!size[i]) continue;
            float *dst = g[i];
            const int64_t len = size[i], at = off;
#pragma omp parallel for schedule(static) num_threads(threads) if (len >= 65536)
            for (int64_t j = 0; j < len; j++) {
                float v = dst[j];
                for (int t = 1; t < used; t++) v += partial[(t - 1) * total + at + j];
                dst[j] = v;
            }
            off += size[i];
        }
    }
    free(partial);
    return failed ? -1 : 0;
}
