/* adamw.cu: one AdamW step on CUDA, in place, the twin of cpu/adamw.c (tl.h has the contract):
 *
 *     p <- p (1 - lr wd);   m <- lerp(m, g, 1 - b1);   v <- b2 v + (1 - b2) g^2
 *     p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - b_k^step
 *
 * float32, every operation in cpu/adamw.c's order (which is torch.optim.AdamW's), each rounded to
 * nearest on its own (the _rn intrinsics keep nvcc from fusing a multiply and an add), with the same
 * scalars formed in double on the host: the CPU and the GPU give the same bits. Each element is read
 * and written once (p, g, m, v) in one grid-stride loop. */
#include <math.h>
#include <stdint.h>

#include "cuda_common.h"

#define ADAMW_THREADS 256
#define ADAMW_MAX_BLOCKS 8192

typedef struct {
    float decay;     /* 1 - lr wd */
    float lerp_w;    /* torch's lerp(m, g, w), w = 1 - b1, in the form exact at its nearer end: */
    int lerp_from_m; /* m + w (g - m) when |w| < 0.5, else g - (1 - w)(g - m) = g + lerp_w (g - m) */
    float b2, w2;    /* b2 and 1 - b2 */
    float neg_step;  /* -lr / bc1 */
    float bc2_sqrt;
    float eps;
} adamw_coefs;

template <typename TP, typename TG>
static __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel(TP *param, int64_t sp, const TG *grad, int64_t sg, float *m, int64_t sm, float *v, int64_t sv,
             int64_t n, adamw_coefs c)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = load_f32(grad + i * sg);
        const float p = __fmul_rn(load_f32(param + i * sp), c.decay);
        float mm = m[i * sm], vv = v[i * sv];
        mm = __fadd_rn(c.lerp_from_m ? mm : g, __fmul_rn(c.lerp_w, __fsub_rn(g, mm)));
        vv = __fadd_rn(__fmul_rn(vv, c.b2), __fmul_rn(__fmul_rn(c.w2, g), g));
        const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), c.bc2_sqrt), c.eps);
        m[i * sm] = mm;
        v[i * sv] = vv;
        store_f32(param + i * sp, __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step, mm), den)));
    }
}

template <typename TP>
static void
adamw_launch(tl_tensor *param, const tl_tensor *grad, tl_tensor *m, tl_tensor *v, const adamw_coefs &c,
             unsigned blocks, cudaStream_t s)
{
    const int64_t n = param->shape[0];
    if (grad->dtype == TL_FLOAT32)
        adamw_kernel<TP, float><<<blocks, ADAMW_THREADS, 0, s>>>((TP *)param->data, param->strides[0],
                                                                  (const float *)grad->data, grad->strides[0],
                                                                  (float *)m->data, m->strides[0], (float *)v->data,
                                                                  v->strides[0], n, c);
    else
        adamw_kernel<TP, TP><<<blocks, ADAMW_THREADS, 0, s>>>((TP *)param->data, param->strides[0],
                                                               (const TP *)grad->data, grad->strides[0],
                                                               (float *)m->data, m->strides[0], (float *)v->data,
                                                               v->strides[0], n, c);
}

tl_status
tl_adamw_cuda(tl_tensor *param, const tl_tensor *grad, tl_tensor *exp_avg, tl_tensor *exp_avg_sq,
              const tl_adamw_opts *o, void *stream)
{
    tl_status st;
    if (!param || !grad || !exp_avg || !exp_avg_sq || !o) return TL_ERR_VALUE;
    const int dev = param->device_id;
    if ((st = tl_cuda_check_tensor(param, 1, dev)) || (st = tl_cuda_check_tensor(grad, 1, dev)) ||
        (st = tl_cuda_check_tensor(exp_avg, 1, dev)) || (st = tl_cuda_check_tensor(exp_avg_sq, 1, dev)))
        return st;
    if (!tl_is_float_dtype(param->dtype)) return TL_ERR_DTYPE;
    if (grad->dtype != TL_FLOAT32 && grad->dtype != param->dtype) return TL_ERR_DTYPE;
    if (exp_avg->dtype != TL_FLOAT32 || exp_avg_sq->dtype != TL_FLOAT32) return TL_ERR_DTYPE;
    const int64_t n = param->shape[0];
    if (grad->shape[0] != n || exp_avg->shape[0] != n || exp_avg_sq->shape[0] != n) return TL_ERR_SHAPE;
    if (!isfinite(o->lr) || !isfinite(o->eps) || !isfinite(o->weight_decay) || !(o->beta1 >= 0.0) ||
        !(o->beta1 < 1.0) || !(o->beta2 >= 0.0) || !(o->beta2 < 1.0) || o->step < 1)
        return TL_ERR_VALUE;
    if (n == 0) return TL_OK;

    /* The scalars torch forms in Python (double) and hands to float32 kernels, as cpu/adamw.c forms them. */
    const double lr = o->lr, b1 = o->beta1, b2 = o->beta2, step = (double)o->step;
    const double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
    adamw_coefs c;
    c.decay = (float)(1.0 - lr * (double)o->weight_decay);
    const float w1 = (float)(1.0 - b1);
    c.lerp_from_m = fabsf(w1) < 0.5f;
    c.lerp_w = c.lerp_from_m ? w1 : -(1.0f - w1);
    c.b2 = (float)o->beta2;
    c.w2 = (float)(1.0 - b2);
    c.neg_step = (float)(-(lr / bc1));
    c.bc2_sqrt = (float)sqrt(bc2);
    c.eps = (float)o->eps;
    int64_t blocks = (n + ADAMW_THREADS - 1) / ADAMW_THREADS;
    if (blocks > ADAMW_MAX_BLOCKS) blocks = ADAMW_MAX_BLOCKS;

    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;
    const cudaStream_t s = (cudaStream_t)stream;
    switch (param->dtype) {
    case TL_FLOAT32: adamw_launch<float>(param, grad, exp_avg, exp_avg_sq, c, (unsigned)blocks, s); break;
    case TL_BFLOAT16: adamw_launch<__nv_bfloat16>(param, grad, exp_avg, exp_avg_sq, c, (unsigned)blocks, s); break;
    default: adamw_launch<__half>(param, grad, exp_avg, exp_avg_sq, c, (unsigned)blocks, s); break;
    }
    st = tl_cuda_check(cudaGetLastError(), "adamw kernel launch");
    tl_cuda_leave(dev, prev);
    return st;
}
