/* head_internal.h: what the fused head's files share, internal to the CPU core (not part of tl.h): the
 * row primitives' table and the per-row math (head_rows.c) that the driver (head.c) calls, and the vector
 * exps and the targets' validation, which distillation's rows (head_distill.c) use too. */
#ifndef TL_HEAD_INTERNAL_H
#define TL_HEAD_INTERNAL_H

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TL_X86 1
#endif

typedef struct {
    float (*max)(const float *z, int64_t n);
    float (*sumexp)(const float *z, int64_t n, float m);            /* sum exp(z - m) */
    float (*expsum)(float *z, int64_t n, float m);                  /* z = exp(z - m); the same sum */
    void (*grad)(float *z, int64_t n, float m, float a, float s); /* z = s * a * exp(z - m) */
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float *y, float a, const float *x, int64_t n);     /* y += a x */
    float (*xexp)(const float *z, int64_t n, float m);              /* sum exp(z - m) (z - m) */
} row_ops;

/* What a row's math needs besides its logits and target: the cross-entropy's class weights (NULL: all
 * 1), 1 - eps, eps / C and sum_c w_c; the logits' transform z <- (softcap > 0 ? softcap tanh(z / softcap)
 * : z) * inv_temp; the z-loss's scale; whether dz is wanted. */
typedef struct {
    const float *cwf;
    float keep, epsc, wall;
    float softcap, inv_temp, zs;
    int grads;
} row_spec;

/* A copy of the N targets, each validated: tg[i] = target[i], or -1 where it is ignore_index. TL_ERR_INDEX
 * (*bad_target set) at the first outside [0, C). The kernels' rows read the copy, not the caller's memory,
 * which another thread (or an output aliasing it) could change meanwhile. */
tl_status tl_head_targets(const tl_tensor *target, int64_t C, int64_t ignore_index, int64_t *tg, int64_t *bad_target);
/* The row primitives for this CPU (tl_cpu_level). */
row_ops tl_head_row_ops(void);
/* One row: z (C float32 logits of a row that is not ignored, target t) -> the row's loss; with
 * sp->grads, z becomes s * dloss/dz in place (through the transform). u: C floats of scratch when
 * sp->softcap > 0, else unused. lse, ent: NULL, or where the row's log-sum-exp and entropy go (of the
 * transformed logits). */
float tl_head_row(const row_ops *ops, const row_spec *sp, float *z, float *u, int64_t C, int64_t t, float s,
                  float *lse, float *ent);
/* Whether sp is plain cross-entropy (no transform, no z-loss): what the few-classes kernel handles. */
static inline int
tl_head_plain(const row_spec *sp)
{
    return sp->softcap == 0.0f && sp->inv_temp == 1.0f && sp->zs == 0.0f;
}

#ifdef TL_X86
/* The vector exps' common part, for a W-bit vector x (W = 512 or 256; ROUND: that width's rounding
 * instruction): x = n ln2 + r with n = round(x log2e) and r = x - n ln2 in two steps (ln2 = hi + lo,
 * so r is exact to rounding; |r| <= ln2/2), and p = e^r by its Taylor polynomial to r^6 in Horner form
 * (relative error < 2e-7 on that interval). Declares n and p; the caller multiplies p by 2^n. */
#define EXP_N_POLY(W, ROUND, x, n, p)                                                                   \
    const __m##W n = ROUND(_mm##W##_mul_ps(x, _mm##W##_set1_ps(1.44269504088896341f)),                   \
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                               \
    __m##W p, r_ = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(0.693359375f), x);                             \
    r_ = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(-2.12194440e-4f), r_);                                   \
    p = _mm##W##_set1_ps(1.0f / 720.0f);                                                                 \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(1.0f / 120.0f));                                       \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(1.0f / 24.0f));                                        \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(1.0f / 6.0f));                                         \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(0.5f));                                                \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(1.0f));                                                \
    p = _mm##W##_fmadd_ps(p, r_, _mm##W##_set1_ps(1.0f))

/* exp(x) for x <= 0 (all we need: z - max and z - lse): EXP_N_POLY's p times 2^n by vscalefps, which
 * also underflows cleanly to 0 for very negative x. */
__attribute__((target("avx512f"))) static inline __m512
exp512(__m512 x)
{
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* a NaN x stays NaN (maxps returns its 2nd operand) */
    EXP_N_POLY(512, _mm512_roundscale_ps, x, n, p);
    return _mm512_scalef_ps(p, n);
}

/* The same on AVX2 + FMA: 2^n is built in the exponent bits (n clamped to the normal range, so very
 * negative x gives a tiny normal number times a polynomial < 2 instead of 0: below 2^-125, harmless for
 * a softmax whose largest term is 1). */
__attribute__((target("avx2,fma"))) static inline __m256
exp256(__m256 x)
{
    /* Below -87 the result would need a subnormal 2^n: 0 instead (exp(-inf) must be exactly 0). */
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* a NaN x stays NaN (maxps returns its 2nd operand) */
    EXP_N_POLY(256, _mm256_round_ps, x, n, p);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* n - i lanes (1..7) of a tail as a mask for maskload/maskstore. */
__attribute__((target("avx2"))) static inline __m256i
tail_mask256(int64_t left)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}


/* Blocks of up to SK_RB rows for the few-classes path (C <= SKINNY_C): each 16-float slice of the rows
 * of x is loaded once and used against every class (and each slice of W once for every row), so the
 * row pass streams x and W from L1 instead of calling a dot product or axpy per (row, class). Rows and
 * classes beyond rb and C are clamped duplicates whose results are dropped; a row's sums run in the
 * same order whatever rb is. */
#define SK_RB 4

/* The few-classes path's AVX-512 kernels (head_rows.c), for rb <= SK_RB rows and C <= SKINNY_C classes,
 * z holding SKINNY_C floats a row: the logits, dx, dW's share, and the loss and dz of one row. */
void tl_head_sk_logits_avx512(const float *const *xr, int rb, const float *w, int64_t ldw, int64_t C, int64_t D,
                              float *z);
void tl_head_sk_dx_avx512(const float *z, int rb, const float *w, int64_t ldw, int64_t C, int64_t D,
                          float *const *dxr);
void tl_head_sk_dw_avx512(const float *z, int rb, const float *const *xr, int64_t C, int64_t D, float *dw);
float tl_head_sk_row_avx512(float *z, int64_t C, int64_t t, const float *cwf, float keep, float epsc, float wall,
                            int grads, float s);
#else
#define SK_RB 1
#endif

#endif /* TL_HEAD_INTERNAL_H */
