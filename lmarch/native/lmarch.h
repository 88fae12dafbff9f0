/*
 * lmarch.h: the interface of lmarch's native library, declared once.
 *
 * Every function the library exports, every struct and every slot order shared with Python is
 * here. Each .c file includes this header (through kernels.h), so the compiler checks each
 * definition against its declaration; lmarch/native/abi.py reads this same file to declare the
 * functions to ctypes, to build the structs and the slot orders, and at load it compares each
 * struct's size here (lmarch_sizeof_<name>) with the size ctypes gives it.
 *
 * Kept to what abi.py reads: #define NAME integer, enum name { A, B, ... }, typedef struct
 * { fields } lmarch_<name>, and prototypes whose argument types are one word (int, int64_t,
 * uint64_t, float, void) or any pointer.
 */
#ifndef LMARCH_H
#define LMARCH_H

#include <stdint.h>

#define LMARCH_QK 32 /* inputs per block in the GGUF block formats */

/* ---- block-quantised products (blockq.c) ------------------------------------------------ */

/* y [m, n] = x [m, k] W^T, W in Q4_1 (codes [n, k/2], (d, m) float16 bits [n, k/32, 2]) or Q8_0
 * (codes [n, k], d float16 bits [n, k/32]). Return 0, or -1 when out of memory. */
int lmarch_q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *codes,
                       const uint16_t *dm, int64_t n, float *y, int threads);
int lmarch_q8_0_matmul(const float *x, int64_t m, int64_t k, const int8_t *codes,
                       const uint16_t *d, int64_t n, float *y, int threads);
/* y [m, k] = W_down (SiLU(W_gate x) * (W_up x)), gate and up the two halves (h rows each) of
 * one Q4_1 matrix, down Q4_1 [k, h]. Returns 0, or -1 when out of memory. */
int lmarch_q4_1_swiglu(const float *x, int64_t m, int64_t k, const uint8_t *gu_codes,
                       const uint16_t *gu_dm, int64_t h, const uint8_t *dn_codes,
                       const uint16_t *dn_dm, float *y, int threads);
/* 2 when built with AVX2, 0 for the portable C path. */
int lmarch_blockq_simd(void);

/* ---- products with K-quant weights as stored (kquant.c) --------------------------------- */

/* y [m, n] = x [m, k] W^T, W [n, k] in GGUF Q4_K / Q6_K / Q5_K super-blocks of 256 (rows of
 * k/256 blocks of 144 / 210 / 176 bytes, as in the file). Return 0, or -1 when out of memory. */
int lmarch_q4_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads);
int lmarch_q6_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads);
int lmarch_q5_k_matmul(const float *x, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
                       float *y, int threads);

/* ---- one LLaMA decoder layer for one token (decoder.c) ---------------------------------- */

enum lmarch_matrix_type { LMARCH_MAT_Q4_1, LMARCH_MAT_Q8_0 };

/* A weight matrix [n, k] in a block format: codes and float16 constants (bits). */
typedef struct {
    int64_t type; /* an lmarch_matrix_type */
    const void *codes;
    const uint16_t *constants;
} lmarch_matrix;

/* The weights and shape of one layer. */
typedef struct {
    int64_t dim, n_heads, n_kv_heads, head_dim, rotary_dim, hidden;
    float eps;
    const float *norm_attn, *norm_ffn;
    lmarch_matrix qkv, out, gate_up, down;
} lmarch_layer;

/* x [dim] <- the layer applied to x at position pos. keys/values: this layer's cache
 * [n_kv_heads, max_len, head_dim] (written at pos); cos/sin: the rotary angles of pos
 * [rotary_dim]. Returns 0, -1 when out of memory, -2 when pos is outside the cache. */
int lmarch_decoder_layer(const lmarch_layer *layer, float *x, float *keys, float *values,
                         int64_t max_len, const float *cos, const float *sin, int64_t pos,
                         int threads);

/* ---- activations (activations.c) -------------------------------------------------------- */

/* GELU, tanh form: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); dx = g GELU'(x). */
void lmarch_gelu_tanh_forward(const float *x, float *y, int64_t n, int threads);
void lmarch_gelu_tanh_backward(const float *x, const float *g, float *dx, int64_t n,
                               int threads);
/* GELU (tanh or erf form) and its slope GELU'(x) from one exponential; y may be x. */
void lmarch_gelu_tanh_forward_slope(const float *x, float *y, float *slope, int64_t n,
                                    int threads);
void lmarch_gelu_erf_forward_slope(const float *x, float *y, float *slope, int64_t n,
                                   int threads);

/* ---- causal self-attention over a packed projection (attention.c) ----------------------- */

/* y [B, T, H D] and the log-sum-exp of each row lse [B, H, T] from qkv [B, T, (H + 2 H_kv) D];
 * dropout p on the probabilities when p > 0, its mask drawn from seed, with batch row 0 here
 * being row b_first of the whole batch. Return 0, or -1 when out of memory. */
int lmarch_causal_attention_forward(const float *qkv, int64_t batch, int64_t t, int64_t heads,
                                    int64_t kv_heads, int64_t d, float *y, float *lse,
                                    int threads, float p, uint64_t seed, int64_t b_first);
int lmarch_causal_attention_backward(const float *qkv, const float *y, const float *dy,
                                     const float *lse, int64_t batch, int64_t t, int64_t heads,
                                     int64_t kv_heads, int64_t d, float *dqkv, int threads,
                                     float p, uint64_t seed, int64_t b_first);

/* ---- LayerNorm and row passes (rows.c) -------------------------------------------------- */

void lmarch_layer_norm_forward(const float *x, const float *g, const float *b, float *y,
                               float *mean, float *rstd, int64_t n, int64_t c, float eps,
                               int threads);
int lmarch_layer_norm_backward(const float *dy, const float *x, const float *mean,
                               const float *rstd, const float *g, const float *residual,
                               float *dx, float *dg, float *db, int64_t n, int64_t c,
                               int threads);
/* out = base + bias over rows (either may be NULL). */
void lmarch_rows_plus_bias(const float *base, const float *bias, float *out, int64_t n,
                           int64_t c, int threads);
/* x *= scale (when given), then sums = the column sums of x (when given). */
int lmarch_mul_column_sums(float *x, const float *scale, float *sums, int64_t n, int64_t c,
                           int threads);
/* out = base + Dropout_p(o), the mask of stream seed for rows row0 .. row0 + n (base may be
 * NULL). */
void lmarch_add_dropped(const float *base, const float *o, float *out, int64_t n, int64_t c,
                        int64_t row0, float p, uint64_t seed, int threads);

/* ---- the GPT-2 block (gpt_block.c) ------------------------------------------------------ */

/* Its parameters, in this order everywhere (NULL for an absent bias). */
enum lmarch_gpt_param {
    LMARCH_GPT_LN1_W, LMARCH_GPT_LN1_B, LMARCH_GPT_QKV_W, LMARCH_GPT_QKV_B,
    LMARCH_GPT_OUT_W, LMARCH_GPT_OUT_B, LMARCH_GPT_LN2_W, LMARCH_GPT_LN2_B,
    LMARCH_GPT_FC_W, LMARCH_GPT_FC_B, LMARCH_GPT_PR_W, LMARCH_GPT_PR_B, LMARCH_GPT_N_PARAMS
};

/* The tensors the forward saves for the backward, in this order. */
enum lmarch_gpt_saved {
    LMARCH_GPT_SAVED_LN1, LMARCH_GPT_SAVED_MEAN1, LMARCH_GPT_SAVED_RSTD1, LMARCH_GPT_SAVED_QKV,
    LMARCH_GPT_SAVED_ATT, LMARCH_GPT_SAVED_LSE, LMARCH_GPT_SAVED_X1, LMARCH_GPT_SAVED_LN2,
    LMARCH_GPT_SAVED_MEAN2, LMARCH_GPT_SAVED_RSTD2, LMARCH_GPT_SAVED_SLOPE,
    LMARCH_GPT_SAVED_ACT, LMARCH_GPT_N_SAVED
};

/* What the tensors do not say: sizes, the GELU's form (1 erf, 0 tanh), the two LayerNorm eps,
 * dropout on the attention (its probabilities and its residual branch) and on the MLP's
 * residual branch (0 when off), and the masks' three streams (see dropout_keep in kernels.h). */
typedef struct {
    int64_t batch, t, c, heads, kv_heads, head_dim, hidden, exact_gelu;
    float eps1, eps2, dropout_attn, dropout_mlp;
    uint64_t seed_probs, seed_attn, seed_mlp;
} lmarch_gpt_shape;

/* Hand over the Fortran sgemm_ of PyTorch's BLAS (NULL to forget it); 1 when it multiplies
 * correctly with 32-bit sizes. */
void lmarch_set_sgemm(void *fn);
int lmarch_sgemm_check(void);
/* y [B, T, C] from x, the parameters p and the shape; writes the saved tensors s. dx and the
 * gradients g (NULL where p is NULL) from dy. Return 0, or -1 when out of memory (or no sgemm). */
int lmarch_gpt_block_forward(const float *x, const float *const *p, float *const *s, float *y,
                             const lmarch_gpt_shape *shape, int threads);
int lmarch_gpt_block_backward(const float *dy, const float *x, const float *const *p,
                              const float *const *s, float *dx, float *const *g,
                              const lmarch_gpt_shape *shape, int threads);

/* ---- the sizes of the structs above, checked against Python's at load (abi.c) ----------- */

int64_t lmarch_sizeof_matrix(void);
int64_t lmarch_sizeof_layer(void);
int64_t lmarch_sizeof_gpt_shape(void);

#endif /* LMARCH_H */
