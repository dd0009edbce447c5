/* head_rows.c: the fused head's per-row math. A row of C float32 logits z with target t gives
 *   loss = keep w_t (lse - z_t) + eps/C sum_c w_c (lse - z_c) + zs lse^2,
 *          lse = m + log sum_c exp(z_c - m),  m = max z
 *   dz_c = s (a p_c - keep w_t [c = t] - eps/C w_c),   a = keep w_t + eps/C sum_c w_c + 2 zs lse,  p = softmax(z)
 *   entropy = lse - sum_c p_c z_c
 * (tl_head_row, dz written over z; the logits first softcapped and divided by the temperature, dz taken
 * back through that), built from the row primitives max, sum of exp, the gradient row, dot, axpy and
 * the entropy's sum in portable, AVX2 and AVX-512 versions with vectorised exps; and the
 * few-classes path's AVX-512 kernels for blocks of rows (logits, dx, dW's share, and a row of at most
 * 16 classes held in one vector). The loops over the rows are in head.c. */
#include <math.h>

#include "head_internal.h"

/* ---- row primitives: max, sum of exp, the gradient row ------------------------------------------- */

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

static float
xexp_portable(const float *z, int64_t n, float m)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float d = z[i] - m;
        s += expf(d) * d;
    }
    return (float)s;
}

#ifdef TL_X86
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

/* sum exp(z - m) (z - m), each term <= 0 (the entropy's sum); masked lanes add nothing. */
__attribute__((target("avx512f"))) static float
xexp_avx512(const float *z, int64_t n, float m)
{
    const __m512 vm = _mm512_set1_ps(m);
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + i), vm);
        s0 = _mm512_mask3_fmadd_ps(exp512(d), d, s0, k);
    }
    return _mm512_reduce_add_ps(s0);
}

static inline __mmask16
tail_mask16(int64_t left)
{
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* z[r * SKINNY_C + c] = x_r . w_c for r < rb, c < C */
__attribute__((target("avx512f"))) void
tl_head_sk_logits_avx512(const float *const *xr, int rb, const float *w, int64_t ldw, int64_t C, int64_t D,
                         float *z)
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
__attribute__((target("avx512f"))) void
tl_head_sk_dx_avx512(const float *z, int rb, const float *w, int64_t ldw, int64_t C, int64_t D, float *const *dxr)
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
__attribute__((target("avx512f"))) void
tl_head_sk_dw_avx512(const float *z, int rb, const float *const *xr, int64_t C, int64_t D, float *dw)
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

__attribute__((target("avx2,fma"))) static float
xexp_avx2(const float *z, int64_t n, float m)
{
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(z + i), vm);
        s = _mm256_fmadd_ps(exp256(d), d, s);
    }
    float buf[8], r = 0.0f;
    _mm256_storeu_ps(buf, s);
    for (; i < n; i++) r += expf(z[i] - m) * (z[i] - m);
    return r + (((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7])));
}
#endif

row_ops
tl_head_row_ops(void)
{
    row_ops ops = {max_portable, sumexp_portable, expsum_portable, grad_portable, dot_portable, axpy_portable,
                   xexp_portable};
#ifdef TL_X86
    const int level = tl_cpu_level();
    if (level >= 2)
        ops = (row_ops){max_avx512, sumexp_avx512, expsum_avx512, grad_avx512, dot_avx512, axpy_avx512, xexp_avx512};
    else if (level >= 1)
        ops = (row_ops){max_avx2, sumexp_avx2, expsum_avx2, grad_avx2, dot_avx2, axpy_avx2, xexp_avx2};
#endif
    return ops;
}

/* The row's loss and dz (over z) for the logits as they are (already transformed), with s the dz's scale;
 * the z-loss zs lse^2 adds 2 zs lse p_c to dz_c, i.e. 2 zs lse to a's numerator. */
static float
row_loss_grad(const row_ops *ops, const row_spec *sp, float *z, int64_t C, int64_t t, float s, float *lse_out,
              float *ent_out)
{
    /* For a confident row (p_t near 1) the loss -log p_t and dz_t ~ p_t - 1 are small differences that a
     * rounded lse or a rounded sum would swamp. So the other classes are summed on their own: with
     * e_t = exp(z_t - m) and S' = sum_{c != t} exp(z_c - m), -log p_t = log1p(S'/e_t) and
     * p_t - 1 = -S'/(S' + e_t), both accurate to rounding; the rest use p_c = exp(z_c - m) / S. */
    const float *cwf = sp->cwf;
    const float keep = sp->keep, epsc = sp->epsc, m = ops->max(z, C);
    const int grads = sp->grads;
    /* The entropy H = lse - sum_c p_c z_c = log S - sum_c e_c (z_c - m) / S: both terms >= 0. Read before
     * anything below writes z. */
    const float xe = ent_out ? ops->xexp(z, C, m) : 0.0f;
    const float zt = z[t];
    /* Without label smoothing the gradient needs only the exps: they are stored over z as they are
     * summed (the target's too, about 0; dz_t is set on its own below), and dz is then a multiple of
     * them; the same values, one exp each. */
    const int keep_exps = grads && epsc == 0.0f;
    z[t] = -INFINITY;
    const double sum_ex = keep_exps ? ops->expsum(z, C, m) : ops->sumexp(z, C, m);
    z[t] = zt;
    const double et = exp((double)zt - m), sum = sum_ex + et, lse = (double)m + log(sum);
    const float wt = cwf ? cwf[t] : 1.0f;
    const double nll = et > 1e-300 ? log1p(sum_ex / et) : ((double)m - zt) + log(sum);
    double loss = (double)keep * wt * nll + (double)sp->zs * lse * lse;
    if (lse_out) *lse_out = (float)lse;
    if (ent_out) *ent_out = (float)(log(sum) - xe / sum);
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
        const double wall_eps = (double)epsc * sp->wall, zl = 2.0 * sp->zs * lse;
        const float a = (float)(((double)keep * wt + wall_eps + zl) / sum);
        if (keep_exps) {
            const float sa = s * a;
            for (int64_t c = 0; c < C; c++) z[c] *= sa;
        } else {
            ops->grad(z, C, m, a, s);
        }
        /* s (a p_t - keep w_t) with a = keep w_t + eps/C sum_c w_c + 2 zs lse, rearranged to avoid p_t - 1 */
        z[t] = (float)(s * ((wall_eps + zl) * et - (double)keep * wt * sum_ex) / sum);
        if (epsc > 0.0f) {
            if (cwf)
                for (int64_t c = 0; c < C; c++) z[c] -= s * epsc * cwf[c];
            else
                for (int64_t c = 0; c < C; c++) z[c] -= s * epsc;
        }
    }
    return (float)loss;
}

/* z' = softcap tanh(z / softcap) / T (or z / T): the row's math on z', and dz taken back through it,
 * dz = dz' (1 - tanh^2) / T, the 1/T folded into the scale. */
float
tl_head_row(const row_ops *ops, const row_spec *sp, float *z, float *u, int64_t C, int64_t t, float s, float *lse,
            float *ent)
{
    const float cap = sp->softcap, it = sp->inv_temp;
    if (cap > 0.0f) {
        const float k = cap * it;
        for (int64_t c = 0; c < C; c++) {
            u[c] = tanhf(z[c] / cap);
            z[c] = k * u[c];
        }
    } else if (it != 1.0f) {
        for (int64_t c = 0; c < C; c++) z[c] *= it;
    }
    const float loss = row_loss_grad(ops, sp, z, C, t, s * it, lse, ent);
    if (sp->grads && cap > 0.0f)
        for (int64_t c = 0; c < C; c++) z[c] *= 1.0f - u[c] * u[c];
    return loss;
}
#ifdef TL_X86
/* row_loss_grad for a row of C <= 16 classes (plain cross-entropy), held in one vector: the same formulas, with the
 * exps computed once and reused for dz. */
__attribute__((target("avx512f"))) float
tl_head_sk_row_avx512(float *z, int64_t C, int64_t t, const float *cwf, float keep, float epsc, float wall,
                      int grads, float s)
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
