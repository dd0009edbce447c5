/* adamw_coefs.h: what cpu/adamw.c and cuda/adamw.cu share (internal): the argument checks of tl.h's
 * contract and the per-step scalars.
 *
 * torch forms the scalars in Python (double) and hands them to float32 kernels; both backends take them
 * from this one function, on the host, so that the CPU and the GPU round them alike and give the same
 * bits. Plain C, also compiled as CUDA C++ (host code only). */
#ifndef TL_ADAMW_COEFS_H
#define TL_ADAMW_COEFS_H

#include <math.h>

#include "tl.h"

typedef struct {
    float decay;     /* 1 - lr wd */
    float lerp_w;    /* torch's lerp(m, g, w), w = 1 - b1, in the form exact at its nearer end: */
    int lerp_from_m; /* m + w (g - m) when |w| < 0.5, else g - (1 - w)(g - m) = g + lerp_w (g - m) */
    float b2, w2;    /* b2 and 1 - b2 */
    float neg_step;  /* -lr / bc1 */
    float bc2_sqrt;
    float eps;
    float l2;        /* 2 l2sp: the L2-SP term's gradient is l2 (p - anchor) */
    int anchored;    /* an anchor and l2sp != 0: else the term is left out (no read of the anchor) */
} tl_adamw_coefs;

/* The checks tl.h's contract asks of the tensors' dtypes and sizes and of the hyperparameters (the
 * tensors' device, rank and memory are each backend's), and c from o. */
static inline tl_status
tl_adamw_setup(const tl_tensor *param, const tl_tensor *grad, const tl_tensor *exp_avg,
               const tl_tensor *exp_avg_sq, const tl_tensor *anchor, const tl_adamw_opts *o, tl_adamw_coefs *c)
{
    if (!o) return TL_ERR_VALUE;
    if (!tl_is_float_dtype(param->dtype)) return TL_ERR_DTYPE;
    if (grad->dtype != param->dtype && grad->dtype != TL_FLOAT32) return TL_ERR_DTYPE;
    if (exp_avg->dtype != TL_FLOAT32 || exp_avg_sq->dtype != TL_FLOAT32) return TL_ERR_DTYPE;
    if (anchor && anchor->dtype != param->dtype) return TL_ERR_DTYPE;
    const int64_t n = param->shape[0];
    if (grad->shape[0] != n || exp_avg->shape[0] != n || exp_avg_sq->shape[0] != n) return TL_ERR_SHAPE;
    if (anchor && anchor->shape[0] != n) return TL_ERR_SHAPE;
    if (!isfinite(o->lr) || !isfinite(o->eps) || !isfinite(o->weight_decay) || !(o->beta1 >= 0.0) ||
        !(o->beta1 < 1.0) || !(o->beta2 >= 0.0) || !(o->beta2 < 1.0) || o->step < 1 ||
        !(o->l2sp >= 0.0) || !isfinite(o->l2sp))
        return TL_ERR_VALUE;

    const double lr = o->lr, b1 = o->beta1, b2 = o->beta2, step = (double)o->step;
    const double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
    c->decay = (float)(1.0 - lr * (double)o->weight_decay);
    const float w1 = (float)(1.0 - b1);
    c->lerp_from_m = fabsf(w1) < 0.5f;
    c->lerp_w = c->lerp_from_m ? w1 : -(1.0f - w1);
    c->b2 = (float)o->beta2;
    c->w2 = (float)(1.0 - b2);
    c->neg_step = (float)(-(lr / bc1));
    c->bc2_sqrt = (float)sqrt(bc2);
    c->eps = (float)o->eps;
    /* 2 (float)l2sp, exactly: the gradient autograd forms for l2sp * sum((p - anchor)^2) */
    c->l2 = 2.0f * (float)o->l2sp;
    c->anchored = anchor != NULL && o->l2sp != 0.0;
    return TL_OK;
}

#endif /* TL_ADAMW_COEFS_H */
