/* adamw.cu: one AdamW step on CUDA, in place, the twin of cpu/adamw.c (tl.h has the contract):
 *
 *     g <- g + 2 l2sp (p - anchor)   (L2-SP, with an anchor only)
 *     p <- p (1 - lr wd);   m <- lerp(m, g, 1 - b1);   v <- b2 v + (1 - b2) g^2
 *     p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - b_k^step
 *
 * float32, every operation in cpu/adamw.c's order (which is torch.optim.AdamW's), each rounded to
 * nearest on its own (the _rn intrinsics keep nvcc from fusing a multiply and an add), with the same
 * scalars formed in double on the host (adamw_coefs.h): the CPU and the GPU give the same bits. Each
 * element is read and written once (p, g, m, v; the anchor read) in one grid-stride loop. */
#include <math.h>
#include <stdint.h>

#include "../adamw_coefs.h"
#include "cuda_common.h"

#define ADAMW_THREADS 256
#define ADAMW_MAX_BLOCKS 8192

template <typename TP, typename TG>
static __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel(TP *param, int64_t sp, const TG *grad, int64_t sg, float *m, int64_t sm, float *v, int64_t sv,
             const TP *anchor, int64_t sa, int64_t n, tl_adamw_coefs c)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float p0 = load_f32(param + i * sp);
        float g = load_f32(grad + i * sg);
        if (c.anchored) g = __fadd_rn(g, __fmul_rn(c.l2, __fsub_rn(p0, load_f32(anchor + i * sa))));
        const float p = __fmul_rn(p0, c.decay);
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
adamw_launch(tl_tensor *param, const tl_tensor *grad, tl_tensor *m, tl_tensor *v, const tl_tensor *anchor,
             const tl_adamw_coefs &c, unsigned blocks, cudaStream_t s)
{
    const int64_t n = param->shape[0];
    const TP *a = c.anchored ? (const TP *)anchor->data : nullptr;
    const int64_t sa = c.anchored ? anchor->strides[0] : 0;
    if (grad->dtype == TL_FLOAT32)
        adamw_kernel<TP, float><<<blocks, ADAMW_THREADS, 0, s>>>((TP *)param->data, param->strides[0],
                                                                  (const float *)grad->data, grad->strides[0],
                                                                  (float *)m->data, m->strides[0], (float *)v->data,
                                                                  v->strides[0], a, sa, n, c);
    else
        adamw_kernel<TP, TP><<<blocks, ADAMW_THREADS, 0, s>>>((TP *)param->data, param->strides[0],
                                                               (const TP *)grad->data, grad->strides[0],
                                                               (float *)m->data, m->strides[0], (float *)v->data,
                                                               v->strides[0], a, sa, n, c);
}

tl_status
tl_adamw_cuda(tl_tensor *param, const tl_tensor *grad, tl_tensor *exp_avg, tl_tensor *exp_avg_sq,
              const tl_tensor *anchor, const tl_adamw_opts *o, void *stream)
{
    tl_status st;
    if (!param || !grad || !exp_avg || !exp_avg_sq || !o) return TL_ERR_VALUE;
    const int dev = param->device_id;
    if ((st = tl_cuda_check_tensor(param, 1, dev)) || (st = tl_cuda_check_tensor(grad, 1, dev)) ||
        (st = tl_cuda_check_tensor(exp_avg, 1, dev)) || (st = tl_cuda_check_tensor(exp_avg_sq, 1, dev)) ||
        (anchor && (st = tl_cuda_check_tensor(anchor, 1, dev))))
        return st;
    tl_adamw_coefs c;
    if ((st = tl_adamw_setup(param, grad, exp_avg, exp_avg_sq, anchor, o, &c))) return st;
    const int64_t n = param->shape[0];
    if (n == 0) return TL_OK;
    int64_t blocks = (n + ADAMW_THREADS - 1) / ADAMW_THREADS;
    if (blocks > ADAMW_MAX_BLOCKS) blocks = ADAMW_MAX_BLOCKS;

    const cudaStream_t s = (cudaStream_t)stream;
    return tl_cuda_launch_float(dev, param->dtype, "adamw kernel launch", [&](auto t) {
        adamw_launch<decltype(t)>(param, grad, exp_avg, exp_avg_sq, anchor, c, (unsigned)blocks, s);
    });
}
