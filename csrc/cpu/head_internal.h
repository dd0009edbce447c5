/* head_internal.h: what the fused head's two files share, internal to the CPU core (not part of tl.h):
 * the row primitives' table and the per-row math (head_rows.c) that the driver (head.c) calls. */
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
