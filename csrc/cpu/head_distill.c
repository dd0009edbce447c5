/* head_distill.c: knowledge distillation's per-row math on a chunk of logits (tl.h's
 * tl_distill_rows_cpu): for each row of the student's s (Vs) and the teacher's t (Vt) logits, the row's
 * loss (1 - alpha) T^2 D(p_t^T || p_s^T) + alpha CE(s, y), and s overwritten with its gradient, which
 * the caller's GEMMs take back to the student's hidden states and head.
 *
 * Memory: s and t are each read three times (max, the sums, the gradient; jsd: four) and s written
 * once, row by row, a row (2 x 128 KB at V = 32000) staying in L2 between the passes; nothing else but
 * a copy of the n targets. Exps are recomputed in each pass rather than stored: t stays read-only and
 * no scratch is needed. Per element (kl): two exps for the sums and two for the gradient, one more in
 * each with a hard term at T != 1; jsd's pass for its two KLs takes three exps and a log, its gradient
 * two exps and a log.
 *
 * The row (head_distill_row.h) is written once over a small vector kit, compiled for AVX-512 (16
 * lanes, masked tails), AVX2 + FMA (8 lanes) and portable C (one lane), with tl_cpu_level choosing;
 * its exps are the fused head's (head_internal.h). Sums are in float64 in a fixed order, and rows run
 * in parallel, so the results do not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "head_internal.h"

/* What a row needs besides its logits and target: the sizes, 1/T, jsd's beta, the hard term's weight
 * alpha (0 without targets), the soft term's factors in the gradient (T (1 - alpha), or T) and in the
 * loss (T^2 (1 - alpha), or T^2). */
typedef struct {
    int64_t Vs, Vt;
    float inv_t, alpha;
    double beta, gsoft, lsoft;
} dr_spec;

typedef float (*dr_row_fn)(const dr_spec *sp, float *s, const float *t, int64_t y, int kind, int hard_t);

/* The row for each kit: DR_ROW(row) dispatches to row_of with kind and hard_t as constants. */
#define DR_ROW_ENTRY(attr)                                                                                     \
    attr static float DR_ROW(row)(const dr_spec *sp, float *s, const float *t, int64_t y, int kind, int hard_t) \
    {                                                                                                          \
        switch (kind * 2 + hard_t) {                                                                           \
        case 0: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_KL, 0);                                              \
        case 1: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_KL, 1);                                              \
        case 2: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_REVERSE_KL, 0);                                      \
        case 3: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_REVERSE_KL, 1);                                      \
        case 4: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_JSD, 0);                                             \
        default: return DR_ROW(row_of)(sp, s, t, y, TL_DIV_JSD, 1);                                            \
        }                                                                                                      \
    }

/* ---- portable C: one lane ------------------------------------------------------------------------- */

#define DR_KIT static inline __attribute__((always_inline))
#define DR_ROW(name) name##_portable
#define DR_W 1
#define VF float
#define VM int
#define VA double
#define vmask(left) 1
#define vload(p, m) ((void)(m), *(p))
#define vloadf(p, m, f) ((void)(m), *(p))
#define vstore(p, v, m) ((void)(m), *(p) = (v))
#define vset(x) (x)
#define vadd(a, b) ((a) + (b))
#define vsub(a, b) ((a) - (b))
#define vmul(a, b) ((a) * (b))
#define vdiv(a, b) ((a) / (b))
#define vmax(a, b) fmaxf(a, b)
#define vfma(a, b, c) ((a) * (b) + (c))
#define vabs(a) fabsf(a)
#define vexp(x) expf(x)
#define vpos(v, e) ((e) > 0.0f ? (v) : 0.0f)
#define vhmax(v) (v)
#define azero() 0.0
#define aadd(acc, v, m) ((void)(m), (acc) + (double)(v))
#define asum(acc) (acc)
#include "head_distill_row.h"
DR_ROW_ENTRY()
#undef DR_ROW

#ifdef TL_X86
/* ---- AVX-512: 16 lanes, masked loads and stores for the tail ---------------------------------------- */

#define A512 __attribute__((target("avx512f"), always_inline)) static inline
typedef struct {
    __m512d lo, hi;
} dr_acc512;

A512 __mmask16
vmask512(int64_t left)
{
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

A512 __m512
vpos512(__m512 v, __m512 e)
{
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ), v);
}

A512 dr_acc512
aadd512(dr_acc512 a, __m512 v, __mmask16 m)
{
    v = _mm512_maskz_mov_ps(m, v);
    a.lo = _mm512_add_pd(a.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    a.hi = _mm512_add_pd(a.hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    return a;
}

A512 double
asum512(dr_acc512 a)
{
    return _mm512_reduce_add_pd(_mm512_add_pd(a.lo, a.hi));
}

#define DR_KIT A512
#define DR_ROW(name) name##_avx512
#define DR_W 16
#define VF __m512
#define VM __mmask16
#define VA dr_acc512
#define vmask vmask512
#define vload(p, m) _mm512_maskz_loadu_ps(m, p)
#define vloadf(p, m, f) _mm512_mask_loadu_ps(_mm512_set1_ps(f), m, p)
#define vstore(p, v, m) _mm512_mask_storeu_ps(p, m, v)
#define vset _mm512_set1_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vfma _mm512_fmadd_ps
#define vabs _mm512_abs_ps
#define vexp exp512
#define vpos vpos512
#define vhmax _mm512_reduce_max_ps
#define azero() ((dr_acc512){_mm512_setzero_pd(), _mm512_setzero_pd()})
#define aadd aadd512
#define asum asum512
#include "head_distill_row.h"
DR_ROW_ENTRY(__attribute__((target("avx512f"))))
#undef DR_ROW

/* ---- AVX2 + FMA: 8 lanes, maskload and maskstore for the tail ------------------------------------------- */

#define A256 __attribute__((target("avx2,fma"), always_inline)) static inline
typedef struct {
    __m256d lo, hi;
} dr_acc256;

A256 __m256i
vmask256(int64_t left)
{
    return left >= 8 ? _mm256_set1_epi32(-1) : tail_mask256(left);
}

A256 __m256
vloadf256(const float *p, __m256i m, float f)
{
    return _mm256_blendv_ps(_mm256_set1_ps(f), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}

A256 __m256
vabs256(__m256 v)
{
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

A256 __m256
vpos256(__m256 v, __m256 e)
{
    return _mm256_and_ps(_mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ), v);
}

A256 float
vhmax256(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

A256 dr_acc256
aadd256(dr_acc256 a, __m256 v, __m256i m)
{
    v = _mm256_and_ps(v, _mm256_castsi256_ps(m));
    a.lo = _mm256_add_pd(a.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a.hi = _mm256_add_pd(a.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    return a;
}

A256 double
asum256(dr_acc256 a)
{
    double d[4];
    _mm256_storeu_pd(d, _mm256_add_pd(a.lo, a.hi));
    return (d[0] + d[1]) + (d[2] + d[3]);
}

#define DR_KIT A256
#define DR_ROW(name) name##_avx2
#define DR_W 8
#define VF __m256
#define VM __m256i
#define VA dr_acc256
#define vmask vmask256
#define vload(p, m) _mm256_maskload_ps(p, m)
#define vloadf vloadf256
#define vstore(p, v, m) _mm256_maskstore_ps(p, m, v)
#define vset _mm256_set1_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vfma _mm256_fmadd_ps
#define vabs vabs256
#define vexp exp256
#define vpos vpos256
#define vhmax vhmax256
#define azero() ((dr_acc256){_mm256_setzero_pd(), _mm256_setzero_pd()})
#define aadd aadd256
#define asum asum256
#include "head_distill_row.h"
DR_ROW_ENTRY(__attribute__((target("avx2,fma"))))
#undef DR_ROW
#endif

/* ---- the rows ------------------------------------------------------------------------------------- */

tl_status
tl_distill_rows_cpu(tl_tensor *s, const tl_tensor *t, const tl_tensor *target, const tl_distill_opts *o,
                    tl_tensor *loss, int64_t *bad_target, int nthreads)
{
    if (!o || !s || !t || !loss) return TL_ERR_VALUE;
    tl_status st = tl_check_distill_rows(s, t, target, o, loss, NULL);
    if (st) return st;
    const tl_tensor *all[] = {s, t, target, loss};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k] && (st = tl_check_cpu(all[k], all[k]->ndim))) return st;
    const int64_t n = s->shape[0], Vs = s->shape[1], Vt = t->shape[1];
    if (n == 0) return TL_OK;

    /* The targets, validated before anything is written (-1: an ignored row). */
    int64_t *tg = NULL;
    if (target) {
        if (!(tg = malloc((size_t)n * sizeof *tg))) return TL_ERR_NOMEM;
        if ((st = tl_head_targets(target, Vs, o->ignore_index, tg, bad_target))) {
            free(tg);
            return st;
        }
    }
    const int kind = o->divergence != TL_DIV_JSD ? o->divergence
                     : o->beta == 0.0f           ? TL_DIV_KL
                     : o->beta == 1.0f           ? TL_DIV_REVERSE_KL
                                                 : TL_DIV_JSD;
    const double T = o->temperature, soft = target ? 1.0 - (double)o->alpha : 1.0;
    const dr_spec sp = {Vs, Vt, (float)(1.0 / T), target ? o->alpha : 0.0f, o->beta, T * soft, T * T * soft};
    const int hard_t = sp.alpha != 0.0f && o->temperature != 1.0f;
    dr_row_fn row = row_portable;
#ifdef TL_X86
    const int level = tl_cpu_level();
    if (level >= 2) row = row_avx512;
    else if (level >= 1) row = row_avx2;
#endif
    const int nt = tl_threads(nthreads);
    float *sd = s->data, *ld = loss->data;
    const float *td = t->data;
    const int64_t ss = s->strides[0], ts = t->strides[0], ls = loss->strides[0];
#pragma omp parallel for num_threads(nt) if (nt > 1 && n > 1 && n * (Vs + Vt) >= (1 << 15)) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *si = sd + i * ss;
        const int64_t y = tg ? tg[i] : -1;
        if (tg && y < 0) {
            memset(si, 0, (size_t)Vs * sizeof(float));
            ld[i * ls] = 0.0f;
        } else {
            ld[i * ls] = row(&sp, si, td + i * ts, y, kind, hard_t);
        }
    }
    free(tg);
    return TL_OK;
}
