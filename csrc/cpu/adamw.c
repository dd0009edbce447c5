/* adamw.c: one AdamW step in place, in one pass over (param, grad, exp_avg, exp_avg_sq[, anchor]).
 *
 *     g <- g + 2 l2sp (p - anchor)   (L2-SP: the gradient of l2sp ||p - anchor||^2; with an anchor only)
 *     p <- p (1 - lr wd);   m <- lerp(m, g, 1 - b1);   v <- b2 v + (1 - b2) g^2
 *     p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - b_k^step
 * in float32, each operation in the order torch.optim.AdamW (foreach=False) performs it, with the
 * scalars that torch forms in double (1 - lr wd, lr / bc1, sqrt(bc2)) formed in double and rounded
 * once (the hyperparameters arrive as doubles, as torch holds them).
 * Touches 7 floats per element (4 read, 3 written; 8 with an anchor): memory bound once vectorised, which the
 * contiguous float32 case is with AVX2 or AVX-512 (chosen at run time). */
#include <math.h>

#include "../adamw_coefs.h"
#include "cpu.h"

/* a: the anchor's value, read only when c->anchored. */
static inline float
adamw_one(float p, float g, float a, float *m, float *v, const tl_adamw_coefs *c)
{
    float mm = *m, vv = *v;
    if (c->anchored) g = g + c->l2 * (p - a);
    p *= c->decay;
    mm = (c->lerp_from_m ? mm : g) + c->lerp_w * (g - mm);
    vv = vv * c->b2 + c->w2 * g * g;
    *m = mm;
    *v = vv;
    return p + c->neg_step * mm / (sqrtf(vv) / c->bc2_sqrt + c->eps);
}

/* The contiguous float32 case. The portable loop stays scalar (the compiler guards sqrtf for errno,
 * which blocks vectorising); the AVX2 and AVX-512 loops do the same operations in the same order, no
 * FMA, so every path gives the same bits. */
static void
contig_f32(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
           const float *restrict a, int64_t n, const tl_adamw_coefs *c)
{
    const tl_adamw_coefs k = *c; /* a local copy: the stores below cannot alias it */
    for (int64_t i = 0; i < n; i++) p[i] = adamw_one(p[i], g[i], k.anchored ? a[i] : 0.0f, &m[i], &v[i], &k);
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define ADAMW_SIMD(W, VT, PS)                                                                         \
    const VT decay = PS(set1)(c->decay), lw = PS(set1)(c->lerp_w), b2 = PS(set1)(c->b2),              \
             w2 = PS(set1)(c->w2), ns = PS(set1)(c->neg_step), bc = PS(set1)(c->bc2_sqrt),            \
             eps = PS(set1)(c->eps), l2 = PS(set1)(c->l2);                                            \
    const int from_m = c->lerp_from_m, anchored = c->anchored;                                        \
    int64_t i = 0;                                                                                    \
    for (; i + (W) <= n; i += (W)) {                                                                  \
        const VT p0 = PS(loadu)(p + i);                                                               \
        VT gv = PS(loadu)(g + i);                                                                     \
        if (anchored) gv = PS(add)(gv, PS(mul)(l2, PS(sub)(p0, PS(loadu)(a + i))));                   \
        VT mv = PS(loadu)(m + i), vv = PS(loadu)(v + i);                                              \
        VT pv = PS(mul)(p0, decay);                                                                   \
        mv = PS(add)(from_m ? mv : gv, PS(mul)(lw, PS(sub)(gv, mv)));                                 \
        vv = PS(add)(PS(mul)(vv, b2), PS(mul)(PS(mul)(w2, gv), gv));                                  \
        const VT den = PS(add)(PS(div)(PS(sqrt)(vv), bc), eps);                                       \
        pv = PS(add)(pv, PS(div)(PS(mul)(ns, mv), den));                                              \
        PS(storeu)(m + i, mv);                                                                        \
        PS(storeu)(v + i, vv);                                                                        \
        PS(storeu)(p + i, pv);                                                                        \
    }                                                                                                 \
    if (i < n) contig_f32(p + i, g + i, m + i, v + i, anchored ? a + i : a, n - i, c);

#define PS256(op) _mm256_##op##_ps
#define PS512(op) _mm512_##op##_ps

__attribute__((target("avx2"))) static void
contig_f32_avx2(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                const float *restrict a, int64_t n, const tl_adamw_coefs *c)
{
    ADAMW_SIMD(8, __m256, PS256)
}

__attribute__((target("avx512f"))) static void
contig_f32_avx512(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                  const float *restrict a, int64_t n, const tl_adamw_coefs *c)
{
    ADAMW_SIMD(16, __m512, PS512)
}
#endif

/* Any dtype and strides: elements [i0, i1). */
static void
strided(tl_tensor *param, const tl_tensor *grad, float *m, int64_t ms, float *v, int64_t vs, const tl_tensor *anchor,
        int64_t i0, int64_t i1, const tl_adamw_coefs *c)
{
    const int64_t ps = param->strides[0], gs = grad->strides[0];
    for (int64_t i = i0; i < i1; i++) {
        const float p = tl_load_f(param->data, i * ps, param->dtype);
        const float g = tl_load_f(grad->data, i * gs, grad->dtype);
        const float a = c->anchored ? tl_load_f(anchor->data, i * anchor->strides[0], anchor->dtype) : 0.0f;
        tl_store_f(param->data, i * ps, param->dtype, adamw_one(p, g, a, &m[i * ms], &v[i * vs], c));
    }
}

tl_status
tl_adamw_cpu(tl_tensor *param, const tl_tensor *grad, tl_tensor *exp_avg, tl_tensor *exp_avg_sq,
             const tl_tensor *anchor, const tl_adamw_opts *o, int nthreads)
{
    tl_status st;
    if ((st = tl_check_cpu(param, 1)) || (st = tl_check_cpu(grad, 1)) || (st = tl_check_cpu(exp_avg, 1)) ||
        (st = tl_check_cpu(exp_avg_sq, 1)) || (anchor && (st = tl_check_cpu(anchor, 1))))
        return st;
    tl_adamw_coefs c;
    if ((st = tl_adamw_setup(param, grad, exp_avg, exp_avg_sq, anchor, o, &c))) return st;
    const int64_t n = param->shape[0];
    if (n == 0) return TL_OK;

    float *m = exp_avg->data, *v = exp_avg_sq->data;
    const float *a = c.anchored ? anchor->data : NULL;
    const int64_t ms = exp_avg->strides[0], vs = exp_avg_sq->strides[0];
    const int contig = param->dtype == TL_FLOAT32 && grad->dtype == TL_FLOAT32 &&
                       (param->strides[0] == 1 || n == 1) && (grad->strides[0] == 1 || n == 1) &&
                       (ms == 1 || n == 1) && (vs == 1 || n == 1) &&
                       (!c.anchored || anchor->strides[0] == 1 || n == 1);
    void (*kern)(float *restrict, const float *restrict, float *restrict, float *restrict, const float *restrict,
                 int64_t, const tl_adamw_coefs *) = contig_f32;
#if defined(__x86_64__) || defined(_M_X64)
    const int level = tl_cpu_level();
    if (level >= 2) kern = contig_f32_avx512;
    else if (level == 1) kern = contig_f32_avx2;
#endif

    int nt = tl_threads(nthreads);
    if (n < 65536) nt = 1;
    /* Chunks of 4096 elements (16 KB per float32 stream), a multiple of every vector width. */
    const int64_t chunk = 4096, nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t k = 0; k < nchunks; k++) {
        const int64_t i0 = k * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
        if (contig)
            kern((float *)param->data + i0, (const float *)grad->data + i0, m + i0, v + i0, a ? a + i0 : a,
                 i1 - i0, &c);
        else
            strided(param, grad, m, ms, v, vs, anchor, i0, i1, &c);
    }
    return TL_OK;
}
