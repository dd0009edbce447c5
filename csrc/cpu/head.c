/* head.c: fused linear + softmax + cross-entropy (the classifier or vocabulary head), forward and
 * backward in one pass over the rows, a chunk of rows at a time (the math is in tl.h):
 *
 *   for each chunk of R rows:   Z = X[chunk] W^T + b          (R x C float32, the caller's workspace)
 *                               per row: max, lse, loss; dz overwrites z in place (when grads are wanted)
 *                               dX[chunk] = dZ W;   dW += dZ^T X[chunk];   db += colsum(dZ)
 *
 * Memory: the workspace holds R x C logits, R x D float32 partials of dX, and R losses; nothing of size
 * N x C ever exists. X is read twice per chunk (forward GEMM, dW), W three times (Z, dX, and its
 * packing), dW read and written once per chunk. The row pass reads each z twice (max, sum of exp) and
 * writes dz once, with a vectorised exp on AVX-512 and AVX2; one exp per logit when the exps can be
 * kept in z until dz is formed from them (gradients without label smoothing).
 * Results do not depend on the thread count: each row's sums run in a fixed order, losses are added
 * in row order in double precision, and the GEMMs are deterministic. */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TL_X86 1
#endif

/* ---- row primitives: max, sum of exp, the gradient row ------------------------------------------- */

typedef struct {
    float (*max)(const float *z, int64_t n);
    float (*sumexp)(const float *z, int64_t n, float m);            /* sum exp(z - m) */
    float (*expsum)(float *z, int64_t n, float m);                  /* z = exp(z - m); the same sum */
    void (*grad)(float *z, int64_t n, float m, float a, float s); /* z = s * a * exp(z - m) */
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float *y, float a, const float *x, int64_t n);     /* y += a x */
} row_ops;

static float
max_portable(const float *z, int64_t n)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = z[i] > m ? z[i] : m;
    return m;
}

/* The row ops sumexp_<isa> (z read only) and expsum_<isa> (exps stored over z) from exps_<isa>. */
#define EXPS_OPS(isa, attr)                                                                             \
    attr static float sumexp_##isa(const float *z, int64_t n, float m)                                  \
    {                                                                                                   \
        return exps_##isa((float *)z, n, m, 0); /* never written */                                     \
    }                                                                                                   \
    attr static float expsum_##isa(float *z, int64_t n, float m) { return exps_##isa(z, n, m, 1); }

/* exp(z - m) summed in order (in double), stored over z when `store`. */
static inline float
exps_portable(float *z, int64_t n, float m, const int store)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float e = expf(z[i] - m);
        if (store) z[i] = e;
        s += e;
    }
    return (float)s;
}

EXPS_OPS(portable, )

static void
grad_portable(float *z, int64_t n, float lse, float a, float s)
{
    const float sa = s * a;
    for (int64_t i = 0; i < n; i++) z[i] = sa * expf(z[i] - lse);
}

static float
dot_portable(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) acc[0] += a[i] * b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static void
axpy_portable(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#ifdef TL_X86
/* exp(x) for x <= 0 (all we need: z - max and z - lse): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor
 * polynomial to r^6 (relative error < 2e-7 on that interval), times 2^n by vscalefps, which also
 * underflows cleanly to 0 for very negative x. */
__attribute__((target("avx512f"))) static inline __m512
exp512(__m512 x)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* a NaN x stays NaN (maxps returns its 2nd operand) */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) static float
max_avx512(const float *z, int64_t n)
{
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(z + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(z + i + 16));
    }
    for (; i + 16 <= n; i += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(z + i));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, z + i));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

/* exp(z - m) summed in two interleaved vector sums, stored over z when `store`. */
__attribute__((target("avx512f"), always_inline)) static inline float
exps_avx512(float *z, int64_t n, float m, const int store)
{
    const __m512 vm = _mm512_set1_ps(m);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm));
        const __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(z + i + 16), vm));
        if (store) {
            _mm512_storeu_ps(z + i, e0);
            _mm512_storeu_ps(z + i + 16, e1);
        }
        s0 = _mm512_add_ps(s0, e0);
        s1 = _mm512_add_ps(s1, e1);
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + i), vm)));
        if (store) _mm512_mask_storeu_ps(z + i, k, e);
        s0 = _mm512_add_ps(s0, e);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

EXPS_OPS(avx512, __attribute__((target("avx512f"))))

__attribute__((target("avx512f"))) static void
grad_avx512(float *z, int64_t n, float lse, float a, float s)
{
    const __m512 vl = _mm512_set1_ps(lse), sa = _mm512_set1_ps(s * a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(z + i, _mm512_mul_ps(sa, exp512(_mm512_sub_ps(_mm512_loadu_ps(z + i), vl))));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + i), vl));
        _mm512_mask_storeu_ps(z + i, k, _mm512_mul_ps(sa, e));
    }
}

__attribute__((target("avx512f"))) static float
dot_avx512(const float *a, const float *b, int64_t n)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx512f"))) static void
axpy_avx512(float *y, float a, const float *x, int64_t n)
{
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, x + i),
                                                         _mm512_maskz_loadu_ps(k, y + i)));
    }
}
/* Blocks of up to SK_RB rows for the few-classes path (C <= SKINNY_C): each 16-float slice of the rows
 * of x is loaded once and used against every class (and each slice of W once for every row), so the
 * row pass streams x and W from L1 instead of calling a dot product or axpy per (row, class). Rows and
 * classes beyond rb and C are clamped duplicates whose results are dropped; a row's sums run in the
 * same order whatever rb is. */
#define SK_RB 4

static inline __mmask16
tail_mask16(int64_t left)
{
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* z[r * SKINNY_C + c] = x_r . w_c for r < rb, c < C */
__attribute__((target("avx512f"))) static void
sk_logits_avx512(const float *const *xr, int rb, const float *w, int64_t ldw, int64_t C, int64_t D, float *z)
{
    for (int64_t c0 = 0; c0 < C; c0 += 4) {
        const float *wc[4];
        for (int j = 0; j < 4; j++) wc[j] = w + (c0 + j < C ? c0 + j : C - 1) * ldw;
        const float *xp[SK_RB];
        for (int r = 0; r < SK_RB; r++) xp[r] = xr[r < rb ? r : rb - 1];
        __m512 acc[SK_RB][4];
        for (int r = 0; r < SK_RB; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 k = tail_mask16(D - d);
            __m512 wv[4];
            for (int j = 0; j < 4; j++) wv[j] = _mm512_maskz_loadu_ps(k, wc[j] + d);
            for (int r = 0; r < SK_RB; r++) {
                const __m512 xv = _mm512_maskz_loadu_ps(k, xp[r] + d);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
            }
        }
        float out[SK_RB][4]; /* constant indices only, so acc stays in registers */
        for (int r = 0; r < SK_RB; r++)
            for (int j = 0; j < 4; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
        for (int r = 0; r < rb; r++)
            for (int j = 0; j < 4 && c0 + j < C; j++) z[r * TL_XENT_SKINNY_C + c0 + j] = out[r][j];
    }
}

/* dx_r = sum_c z[r][c] w_c (overwritten) for r < rb */
__attribute__((target("avx512f"))) static void
sk_dx_avx512(const float *z, int rb, const float *w, int64_t ldw, int64_t C, int64_t D, float *const *dxr)
{
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 k = tail_mask16(D - d);
        __m512 acc[SK_RB];
        for (int r = 0; r < SK_RB; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c++) {
            const __m512 wv = _mm512_maskz_loadu_ps(k, w + c * ldw + d);
            for (int r = 0; r < SK_RB; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(z[(r < rb ? r : 0) * TL_XENT_SKINNY_C + c]), wv, acc[r]);
        }
        for (int r = 0; r < SK_RB; r++) /* constant indices only, so acc stays in registers */
            _mm512_mask_storeu_ps(dxr[r < rb ? r : rb - 1] + d, r < rb ? k : (__mmask16)0, acc[r]);
    }
}

/* dw_c += sum_r z[r][c] x_r for c < C (rows r < rb; the rest weigh 0) */
__attribute__((target("avx512f"))) static void
sk_dw_avx512(const float *z, int rb, const float *const *xr, int64_t C, int64_t D, float *dw)
{
    const float *xp[SK_RB];
    for (int r = 0; r < SK_RB; r++) xp[r] = xr[r < rb ? r : rb - 1];
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 k = tail_mask16(D - d);
        __m512 xv[SK_RB];
        for (int r = 0; r < SK_RB; r++) xv[r] = _mm512_maskz_loadu_ps(k, xp[r] + d);
        for (int64_t c = 0; c < C; c++) {
            __m512 acc = _mm512_maskz_loadu_ps(k, dw + c * D + d);
            for (int r = 0; r < SK_RB; r++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(r < rb ? z[r * TL_XENT_SKINNY_C + c] : 0.0f), xv[r], acc);
            _mm512_mask_storeu_ps(dw + c * D + d, k, acc);
        }
    }
}

/* The same on AVX2 + FMA: 2^n is built in the exponent bits (n clamped to the normal range, so very
 * negative x gives a tiny normal number times a polynomial < 2 instead of 0: below 2^-125, harmless for
 * a softmax whose largest term is 1). */
__attribute__((target("avx2,fma"))) static inline __m256
exp256(__m256 x)
{
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    /* Below -87 the result would need a subnormal 2^n: 0 instead (exp(-inf) must be exactly 0). */
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* a NaN x stays NaN (maxps returns its 2nd operand) */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* n - i lanes (1..7) of a tail as a mask for maskload/maskstore. */
__attribute__((target("avx2"))) static inline __m256i
tail_mask256(int64_t left)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) static float
max_avx2(const float *z, int64_t n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(z + i));
    float buf[8];
    _mm256_storeu_ps(buf, m);
    float r = buf[0];
    for (int j = 1; j < 8; j++) r = buf[j] > r ? buf[j] : r;
    for (; i < n; i++) r = z[i] > r ? z[i] : r;
    return r;
}

/* exp(z - m) summed in one vector sum, stored over z when `store`. */
__attribute__((target("avx2,fma"), always_inline)) static inline float
exps_avx2(float *z, int64_t n, float m, const int store)
{
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm));
        if (store) _mm256_storeu_ps(z + i, e);
        s = _mm256_add_ps(s, e);
    }
    if (i < n) {
        __m256i k = tail_mask256(n - i);
        __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(z + i, k), vm)), _mm256_castsi256_ps(k));
        if (store) _mm256_maskstore_ps(z + i, k, e);
        s = _mm256_add_ps(s, e);
    }
    float buf[8];
    _mm256_storeu_ps(buf, s);
    return ((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7]));
}

EXPS_OPS(avx2, __attribute__((target("avx2,fma"))))

__attribute__((target("avx2,fma"))) static void
grad_avx2(float *z, int64_t n, float lse, float a, float s)
{
    const __m256 vl = _mm256_set1_ps(lse), sa = _mm256_set1_ps(s * a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(z + i, _mm256_mul_ps(sa, exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i), vl))));
    if (i < n) {
        __m256i k = tail_mask256(n - i);
        _mm256_maskstore_ps(z + i, k, _mm256_mul_ps(sa, exp256(_mm256_sub_ps(_mm256_maskload_ps(z + i, k), vl))));
    }
}

__attribute__((target("avx2,fma"))) static float
dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float buf[8], r = 0.0f;
    _mm256_storeu_ps(buf, _mm256_add_ps(s0, s1));
    for (; i < n; i++) r += a[i] * b[i];
    return r + (((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7])));
}

__attribute__((target("avx2,fma"))) static void
axpy_avx2(float *y, float a, const float *x, int64_t n)
{
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif

static row_ops
select_row_ops(void)
{
    row_ops ops = {max_portable, sumexp_portable, expsum_portable, grad_portable, dot_portable, axpy_portable};
#ifdef TL_X86
    const int level = tl_cpu_level();
    if (level >= 2)
        ops = (row_ops){max_avx512, sumexp_avx512, expsum_avx512, grad_avx512, dot_avx512, axpy_avx512};
    else if (level >= 1)
        ops = (row_ops){max_avx2, sumexp_avx2, expsum_avx2, grad_avx2, dot_avx2, axpy_avx2};
#endif
    return ops;
}

/* One row: z (C float32 logits) -> the row's loss; with `grads`, z becomes s * dloss/dz in place. */
static float
row_loss_grad(const row_ops *ops, float *z, int64_t C, int64_t t, const float *cwf, float keep, float epsc,
              float wall, int grads, float s)
{
    /* For a confident row (p_t near 1) the loss -log p_t and dz_t ~ p_t - 1 are small differences that a
     * rounded lse or a rounded sum would swamp. So the other classes are summed on their own: with
     * e_t = exp(z_t - m) and S' = sum_{c != t} exp(z_c - m), -log p_t = log1p(S'/e_t) and
     * p_t - 1 = -S'/(S' + e_t), both accurate to rounding; the rest use p_c = exp(z_c - m) / S. */
    const float m = ops->max(z, C);
    const float zt = z[t];
    /* Without label smoothing the gradient needs only the exps: they are stored over z as they are
     * summed (the target's too, about 0; dz_t is set on its own below), and dz is then a multiple of
     * them; the same values, one exp each. */
    const int keep_exps = grads && epsc == 0.0f;
    z[t] = -INFINITY;
    const double sum_ex = keep_exps ? ops->expsum(z, C, m) : ops->sumexp(z, C, m);
    z[t] = zt;
    const double et = exp((double)zt - m), sum = sum_ex + et;
    const float wt = cwf ? cwf[t] : 1.0f;
    const double nll = et > 1e-300 ? log1p(sum_ex / et) : ((double)m - zt) + log(sum);
    double loss = (double)keep * wt * nll;
    if (epsc > 0.0f) { /* sum_c w_c (lse - z_c): every term >= 0, no cancellation */
        const double logsum = log(sum);
        double sm = 0.0;
        if (cwf)
            for (int64_t c = 0; c < C; c++) sm += (double)cwf[c] * (((double)m - z[c]) + logsum);
        else
            for (int64_t c = 0; c < C; c++) sm += ((double)m - z[c]) + logsum;
        loss += (double)epsc * sm;
    }
    if (grads) {
        const double wall_eps = (double)epsc * wall;
        const float a = (float)(((double)keep * wt + wall_eps) / sum);
        if (keep_exps) {
            const float sa = s * a;
            for (int64_t c = 0; c < C; c++) z[c] *= sa;
        } else {
            ops->grad(z, C, m, a, s);
        }
        /* s (a p_t - keep w_t) with a = keep w_t + eps/C sum_c w_c, rearranged to avoid p_t - 1 */
        z[t] = (float)(s * (wall_eps * et - (double)keep * wt * sum_ex) / sum);
        if (epsc > 0.0f) {
            if (cwf)
                for (int64_t c = 0; c < C; c++) z[c] -= s * epsc * cwf[c];
            else
                for (int64_t c = 0; c < C; c++) z[c] -= s * epsc;
        }
    }
    return (float)loss;
}

/* The gradient's scale for row i: the upstream gradient of that row (when given) times the reduction's
 * own factor (1/sum of target weights for the mean). */
static inline float
row_scale(const tl_tensor *grad_rows, int64_t i, int reduction, float mean_scale)
{
    const float r = reduction == TL_REDUCE_MEAN ? mean_scale : 1.0f;
    return grad_rows ? r * tl_load_f(grad_rows->data, i * grad_rows->strides[0], grad_rows->dtype) : r;
}

#ifdef TL_X86
/* row_loss_grad for a row of C <= 16 classes, held in one vector: the same formulas, with the exps
 * computed once and reused for dz. */
__attribute__((target("avx512f"))) static float
sk_row_avx512(float *z, int64_t C, int64_t t, const float *cwf, float keep, float epsc, float wall, int grads,
              float s)
{
    const __mmask16 k = tail_mask16(C), kt = (__mmask16)(k & ~(1u << t));
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, z);
    const float m = _mm512_reduce_max_ps(v), zt = z[t];
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(v, _mm512_set1_ps(m))));
    float ev[16];
    _mm512_storeu_ps(ev, e);
    const double sum_ex = _mm512_mask_reduce_add_ps(kt, e), et = ev[t], sum = sum_ex + et;
    const float wt = cwf ? cwf[t] : 1.0f;
    const double nll = et > 0.0 ? log1p(sum_ex / et) : ((double)m - zt) + log(sum);
    double loss = (double)keep * wt * nll;
    if (epsc > 0.0f) {
        const double logsum = log(sum);
        double sm = 0.0;
        for (int64_t c = 0; c < C; c++) sm += (cwf ? (double)cwf[c] : 1.0) * (((double)m - z[c]) + logsum);
        loss += (double)epsc * sm;
    }
    if (grads) {
        const double wall_eps = (double)epsc * wall;
        const float sa = s * (float)(((double)keep * wt + wall_eps) / sum);
        _mm512_mask_storeu_ps(z, k, _mm512_mul_ps(_mm512_set1_ps(sa), e));
        z[t] = (float)(s * (wall_eps * et - (double)keep * wt * sum_ex) / sum);
        if (epsc > 0.0f)
            for (int64_t c = 0; c < C; c++) z[c] -= s * epsc * (cwf ? cwf[c] : 1.0f);
    }
    return (float)loss;
}
#endif

/* ---- the fused head ----------------------------------------------------------------------------- */

static int64_t
load_index(const tl_tensor *t, int64_t i)
{
    const int64_t off = i * t->strides[0];
    return t->dtype == TL_INT64 ? ((const int64_t *)t->data)[off] : ((const int32_t *)t->data)[off];
}

/* tl_check_xent's requirements (csrc/check.c), on the CPU, and the workspace's. */
static tl_status
check_xent(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
           const tl_tensor *cw, const tl_xent_opts *o, const tl_tensor *grad_rows, const tl_tensor *loss,
           const tl_tensor *dx, const tl_tensor *dw, const tl_tensor *db, const tl_tensor *ws)
{
    const tl_tensor *all[] = {x, w, target, bias, cw, grad_rows, dx, dw, db};
    tl_status st = tl_check_xent(x, w, bias, target, cw, o, grad_rows, loss, dx, dw, db, 0, NULL);
    if (st) return st;
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k] && (st = tl_check_cpu(all[k], all[k]->ndim))) return st;
    if (loss && (loss->device != TL_CPU || (tl_numel(loss) > 0 && !loss->data))) return TL_ERR_VALUE;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    if (C <= TL_XENT_SKINNY_C && !ws) return TL_OK; /* the single-pass path needs no workspace */
    if (!ws || (st = tl_check_cpu(ws, 1))) return ws ? st : TL_ERR_VALUE;
    if (ws->dtype != TL_FLOAT32 || (ws->strides[0] != 1 && ws->shape[0] > 1)) return TL_ERR_VALUE;
    if (N > 0 && ws->shape[0] < C + D + 1) return TL_ERR_VALUE; /* room for one row */
    return TL_OK;
}

/* Few classes (C <= SKINNY_C): one pass over the rows, no GEMM. Each row of x is read once (as float32)
 * for its C dot products, softmax, loss and dz, then dx_i = dz_i W and the row's share of dW and db.
 * Rows go in blocks of SK_RB (AVX-512) or one at a time. dW and db gather in SKINNY_PARTS fixed row
 * ranges and are added in range order at the end, so the result does not depend on the thread count.
 * Scratch (malloc): W as float32 unless it already is with unit column stride, b as float32, and per
 * range C x D + C accumulators and 2 SK_RB rows of D floats. */
#define SKINNY_C TL_XENT_SKINNY_C
#define SKINNY_PARTS 8
#ifndef SK_RB
#define SK_RB 1
#endif

static tl_status
xent_skinny(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const int64_t *tg,
            const float *cwf, const tl_xent_opts *o, const tl_tensor *grad_rows, tl_tensor *loss,
            tl_tensor *dx, tl_tensor *dw, tl_tensor *db, const row_ops *ops, float wall, float mean_scale,
            int nt, double *total)
{
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    const int grads = dx || dw || db;
#ifdef TL_X86
    const int blocked = tl_cpu_level() >= 2;
#else
    const int blocked = 0;
#endif
    const int rbmax = blocked ? SK_RB : 1;
    const int64_t parts = N < SKINNY_PARTS * 64 ? (N + 63) / 64 : SKINNY_PARTS;
    const int64_t per_part = C * D + C + 2 * SK_RB * D;
    const int w_direct = w->dtype == TL_FLOAT32 && (w->strides[1] == 1 || D <= 1);
    const int64_t wcopy = w_direct ? 0 : C * D;
    float *wf = malloc(((size_t)(wcopy + C) + (size_t)parts * (size_t)per_part + 1) * sizeof(float));
    double *ploss = malloc(((size_t)parts + 1) * sizeof(double));
    if (!wf || !ploss) {
        free(wf);
        free(ploss);
        return TL_ERR_NOMEM;
    }
    float *bf = wf + wcopy, *acc = bf + C;
    const float *wp = wf;
    int64_t ldw = D;
    if (w_direct) {
        wp = (const float *)w->data;
        ldw = w->strides[0];
    } else {
        for (int64_t c = 0; c < C; c++)
            for (int64_t d = 0; d < D; d++) wf[c * D + d] = tl_load_f(w->data, c * w->strides[0] + d * w->strides[1], w->dtype);
    }
    for (int64_t c = 0; c < C; c++) bf[c] = bias ? tl_load_f(bias->data, c * bias->strides[0], bias->dtype) : 0.0f;
    const float keep = 1.0f - o->label_smoothing, epsc = o->label_smoothing / (float)C;

#pragma omp parallel for num_threads(nt) if (nt > 1 && parts > 1 && N * D * C >= (1 << 17)) schedule(static)
    for (int64_t p = 0; p < parts; p++) {
        float *pdw = acc + p * per_part, *pdb = pdw + C * D, *xbuf = pdb + C, *dxbuf = xbuf + SK_RB * D;
        float z[SK_RB * SKINNY_C];
        double lsum = 0.0;
        memset(pdw, 0, (size_t)(C * D + C) * sizeof(float));
        const int64_t r0 = N * p / parts, r1 = N * (p + 1) / parts;
        for (int64_t i0 = r0; i0 < r1; i0 += rbmax) {
            const int rb = (int)(r1 - i0 < rbmax ? r1 - i0 : rbmax);
            const float *xi[SK_RB];
            float *dxi[SK_RB];
            for (int r = 0; r < rb; r++) {
                const int64_t i = i0 + r;
                if (x->dtype == TL_FLOAT32 && (x->strides[1] == 1 || D <= 1)) {
                    xi[r] = (const float *)x->data + i * x->strides[0];
                } else {
                    float *xr = xbuf + r * D;
                    for (int64_t d = 0; d < D; d++)
                        xr[d] = tl_load_f(x->data, i * x->strides[0] + d * x->strides[1], x->dtype);
                    xi[r] = xr;
                }
            }
#ifdef TL_X86
            if (blocked)
                sk_logits_avx512(xi, rb, wp, ldw, C, D, z);
            else
#endif
                for (int r = 0; r < rb; r++)
                    for (int64_t c = 0; c < C; c++) z[r * SKINNY_C + c] = ops->dot(xi[r], wp + c * ldw, D);
            for (int r = 0; r < rb; r++) {
                const int64_t i = i0 + r, t = tg[i]; /* validated; -1: ignored */
                float *zr = z + r * SKINNY_C, li = 0.0f;
                if (t < 0) {
                    for (int64_t c = 0; c < C; c++) zr[c] = 0.0f;
                } else {
                    for (int64_t c = 0; c < C; c++) zr[c] += bf[c];
                    const float sc = row_scale(grad_rows, i, o->reduction, mean_scale);
#ifdef TL_X86
                    if (blocked)
                        li = sk_row_avx512(zr, C, t, cwf, keep, epsc, wall, grads, sc);
                    else
#endif
                        li = row_loss_grad(ops, zr, C, t, cwf, keep, epsc, wall, grads, sc);
                }
                lsum += li;
                if (loss && o->reduction == TL_REDUCE_NONE)
                    tl_store_f(loss->data, i * loss->strides[0], loss->dtype, li);
            }
            if (!grads) continue;
            if (dx) {
                const int direct = dx->dtype == TL_FLOAT32 && (dx->strides[1] == 1 || D <= 1);
                for (int r = 0; r < rb; r++)
                    dxi[r] = direct ? (float *)dx->data + (i0 + r) * dx->strides[0] : dxbuf + r * D;
                if (D > 0) { /* an empty dx may have no data */
#ifdef TL_X86
                    if (blocked) {
                        sk_dx_avx512(z, rb, wp, ldw, C, D, dxi);
                        for (int r = 0; r < rb; r++) /* an ignored row's dx is exactly 0, as below */
                            if (tg[i0 + r] < 0) memset(dxi[r], 0, (size_t)D * sizeof(float));
                    } else
#endif
                        for (int r = 0; r < rb; r++) {
                            memset(dxi[r], 0, (size_t)D * sizeof(float));
                            for (int64_t c = 0; c < C; c++)
                                if (z[r * SKINNY_C + c] != 0.0f) ops->axpy(dxi[r], z[r * SKINNY_C + c], wp + c * ldw, D);
                        }
                }
                if (!direct)
                    for (int r = 0; r < rb; r++)
                        for (int64_t d = 0; d < D; d++)
                            tl_store_f(dx->data, (i0 + r) * dx->strides[0] + d * dx->strides[1], dx->dtype, dxi[r][d]);
            }
            if (dw && D > 0) {
#ifdef TL_X86
                if (blocked)
                    sk_dw_avx512(z, rb, xi, C, D, pdw);
                else
#endif
                    for (int r = 0; r < rb; r++)
                        for (int64_t c = 0; c < C; c++)
                            if (z[r * SKINNY_C + c] != 0.0f) ops->axpy(pdw + c * D, z[r * SKINNY_C + c], xi[r], D);
            }
            for (int r = 0; r < rb; r++)
                for (int64_t c = 0; c < C; c++) pdb[c] += z[r * SKINNY_C + c];
        }
        ploss[p] = lsum;
    }
    *total = 0.0;
    for (int64_t p = 0; p < parts; p++) *total += ploss[p];
    if (dw || db)
        for (int64_t c = 0; c < C; c++) {
            if (dw && parts > 0 && (dw->strides[1] == 1 || D <= 1)) { /* the same sums, unit-stride sweeps */
                float *dst = (float *)dw->data + c * dw->strides[0];
                for (int64_t d = 0; d < D; d++) dst[d] = 0.0f + acc[c * D + d];
                for (int64_t p = 1; p < parts; p++) {
                    const float *src = acc + p * per_part + c * D;
                    for (int64_t d = 0; d < D; d++) dst[d] += src[d];
                }
            } else if (dw) {
                for (int64_t d = 0; d < D; d++) {
                    float v = 0.0f;
                    for (int64_t p = 0; p < parts; p++) v += acc[p * per_part + c * D + d];
                    ((float *)dw->data)[c * dw->strides[0] + d * dw->strides[1]] = v;
                }
            }
            if (db) {
                float v = 0.0f;
                for (int64_t p = 0; p < parts; p++) v += acc[p * per_part + C * D + c];
                ((float *)db->data)[c * db->strides[0]] = v;
            }
        }
    free(wf);
    free(ploss);
    return TL_OK;
}

tl_status
tl_linear_xent_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                   const tl_tensor *cw, const tl_xent_opts *o, const tl_tensor *grad_rows, tl_tensor *loss,
                   tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws, int64_t *bad_target,
                   int nthreads)
{
    tl_status st = check_xent(x, w, bias, target, cw, o, grad_rows, loss, dx, dw, db, ws);
    if (st) return st;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    const int nt = tl_threads(nthreads);
    const float eps = o->label_smoothing, keep = 1.0f - eps, epsc = eps / (float)C;
    const int grads = dx || dw || db;

    /* Pass over the targets: validate all of them before writing anything, and the mean's divisor.
     * The validated targets are kept in a private copy (-1 for an ignored row) that the row passes use:
     * the caller's target memory is not read again, so a target changed meanwhile (another thread, or
     * an output aliasing it) cannot send a row out of bounds. */
    double wsum = 0.0, wall = 0.0;
    int64_t *tg = malloc(((size_t)N + 1) * sizeof(int64_t));
    if (!tg) return TL_ERR_NOMEM;
    for (int64_t i = 0; i < N; i++) {
        const int64_t t = load_index(target, i);
        tg[i] = -1;
        if (t == o->ignore_index) continue;
        if (t < 0 || t >= C) {
            if (bad_target) *bad_target = t;
            free(tg);
            return TL_ERR_INDEX;
        }
        tg[i] = t;
        wsum += cw ? tl_load_f(cw->data, t * cw->strides[0], cw->dtype) : 1.0;
    }
    for (int64_t c = 0; c < C; c++) wall += cw ? tl_load_f(cw->data, c * cw->strides[0], cw->dtype) : 1.0;
    /* The gradient of the mean is scaled by 1/wsum; with every target ignored the loss is 0/0 = NaN
     * (as in torch) and every row's gradient is zero, not NaN. */
    const float mean_scale = wsum != 0.0 ? (float)(1.0 / wsum) : 0.0f;

    /* db accumulates over chunks from zero; dW's first chunk overwrites it (beta = 0), so only an empty
     * batch needs it zeroed here. */
    if (db)
        for (int64_t c = 0; c < C; c++) ((float *)db->data)[c * db->strides[0]] = 0.0f;
    if (dw && N == 0)
        for (int64_t c = 0; c < C; c++)
            for (int64_t d = 0; d < D; d++) ((float *)dw->data)[c * dw->strides[0] + d * dw->strides[1]] = 0.0f;
    /* Class weights as float32 (a small scratch of C floats), or NULL. */
    float *cwf = NULL;
    if (cw) {
        if (!(cwf = malloc((size_t)C * sizeof(float)))) {
            free(tg);
            return TL_ERR_NOMEM;
        }
        for (int64_t c = 0; c < C; c++) cwf[c] = tl_load_f(cw->data, c * cw->strides[0], cw->dtype);
    }

    const row_ops ops = select_row_ops();
    double total = 0.0;
    if (C <= SKINNY_C) {
        st = xent_skinny(x, w, bias, tg, cwf, o, grad_rows, loss, dx, dw, db, &ops, (float)wall,
                         mean_scale, nt, &total);
        if (st) goto done;
        goto reduce;
    }

    const int64_t per_row = C + D + 1;
    int64_t R = ws->shape[0] / per_row;
    if (R > N) R = N;
    if (R < 1) R = 1;
    float *zbuf = (float *)ws->data;            /* R x C logits, then dz */
    float *dxws = zbuf + R * C;                 /* R x D float32 partials of a low-precision dX */
    float *lrow = dxws + R * D;                 /* R row losses */
    tl_tensor wt = tl_view2d(w->data, w->dtype, TL_CPU, 0, D, C, w->strides[1], w->strides[0]); /* W^T */

    for (int64_t i0 = 0; i0 < N; i0 += R) {
        const int64_t rows = N - i0 < R ? N - i0 : R;
        tl_tensor xr = tl_row_block(x, i0, rows);
        tl_tensor z = tl_view2d(zbuf, TL_FLOAT32, TL_CPU, 0, rows, C, C, 1);
        if ((st = tl_gemm_cpu(&xr, &wt, bias, &z, 1.0f, 0.0f, NULL, nthreads))) goto done;

#pragma omp parallel for num_threads(nt) if (nt > 1 && rows * C >= 4096) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *zr = zbuf + r * C;
            const int64_t t = tg[i0 + r]; /* validated; -1: ignored */
            if (t < 0) {
                lrow[r] = 0.0f;
                if (grads) memset(zr, 0, (size_t)C * sizeof(float));
                continue;
            }
            lrow[r] = row_loss_grad(&ops, zr, C, t, cwf, keep, epsc, (float)wall, grads,
                                    row_scale(grad_rows, i0 + r, o->reduction, mean_scale));
        }

        for (int64_t r = 0; r < rows; r++) total += lrow[r];
        if (loss && o->reduction == TL_REDUCE_NONE)
            for (int64_t r = 0; r < rows; r++)
                tl_store_f(loss->data, (i0 + r) * loss->strides[0], loss->dtype, lrow[r]);

        if (dx) {
            tl_tensor dxr = tl_row_block(dx, i0, rows);
            tl_tensor dxw1 = tl_view2d(dxws, TL_FLOAT32, TL_CPU, 0, 1, rows * D, rows * D, 1);
            dxw1.ndim = 1;
            dxw1.shape[0] = rows * D;
            dxw1.strides[0] = 1;
            /* dX = dZ W (a float32 dZ against W in its own dtype: the core GEMM mixes them) */
            if ((st = tl_gemm_cpu(&z, w, NULL, &dxr, 1.0f, 0.0f, &dxw1, nthreads))) goto done;
        }
        if (dw) {
            tl_tensor zt = tl_view2d(zbuf, TL_FLOAT32, TL_CPU, 0, C, rows, 1, C); /* dZ^T */
            if ((st = tl_gemm_cpu(&zt, &xr, NULL, dw, 1.0f, i0 == 0 ? 0.0f : 1.0f, NULL, nthreads))) goto done;
        }
        if (db) {
            if ((st = tl_colsum_cpu(&z, db, 1.0f, nt))) goto done;
        }
    }

reduce:
    if (loss && o->reduction != TL_REDUCE_NONE) {
        const double v = o->reduction == TL_REDUCE_MEAN ? total / wsum : total; /* 0/0: NaN, as torch */
        tl_store_f(loss->data, 0, loss->dtype, (float)v);
    }
done:
    free(cwf);
    free(tg);
    return st;
}
