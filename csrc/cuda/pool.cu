/* pool.cu: pooling a sequence of hidden states into one vector per sequence on CUDA, the twin of
 * cpu/pool.c (tl.h has the contract):
 *
 *   CLS:   out[b, d] = h[b, 0, d]
 *   MEAN:  out[b, d] = sum_{t: mask[b,t] != 0} h[b, t, d] / #{t: mask[b,t] != 0}     (0 when none)
 *   MAX:   out[b, d] = max_{t: mask[b,t] != 0} h[b, t, d]                           (0 when none)
 *
 * One thread per (b, d), walking t: h is read once, out written once, float32 accumulation. The
 * threads of a block share b and take consecutive d, so their loads of h are coalesced when h's unit
 * stride is along D (as it is for hidden states), and they all read the same mask element. */
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "cuda_common.h"

#define POOL_THREADS 256

/* mask[b, t] != 0, for every mask dtype tl.h allows; the dtype is the same for every thread. */
static __device__ __forceinline__ int
mask_on(const void *m, int64_t i, tl_dtype dt)
{
    switch (dt) {
    case TL_INT64: return ((const int64_t *)m)[i] != 0;
    case TL_INT32: return ((const int32_t *)m)[i] != 0;
    case TL_UINT8: return ((const uint8_t *)m)[i] != 0;
    case TL_BFLOAT16: return load_f32((const __nv_bfloat16 *)m + i) != 0.0f;
    case TL_FLOAT16: return load_f32((const __half *)m + i) != 0.0f;
    default: return load_f32((const float *)m + i) != 0.0f;
    }
}

template <typename TH, typename TO>
static __global__ void __launch_bounds__(POOL_THREADS)
pool_kernel(const TH *h, int64_t hs0, int64_t hs1, int64_t hs2, const void *mask, int64_t ms0, int64_t ms1,
            tl_dtype mdt, TO *out, int64_t os0, int64_t os1, int64_t B, int64_t T, int64_t D, int mode)
{
    const int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
        const TH *p = h + b * hs0 + d * hs2;
        float v = 0.0f;
        if (mode == TL_POOL_CLS) {
            v = load_f32(p);
        } else {
            float acc = mode == TL_POOL_MAX ? -INFINITY : 0.0f;
            int64_t n = 0;
            for (int64_t t = 0; t < T; t++) {
                if (mask && !mask_on(mask, b * ms0 + t * ms1, mdt)) continue;
                const float e = load_f32(p + t * hs1);
                if (mode == TL_POOL_MEAN)
                    acc += e;
                else if (acc == acc && (e > acc || e != e)) /* a NaN wins and stays, as in torch.amax */
                    acc = e;
                n++;
            }
            v = n == 0 ? 0.0f : mode == TL_POOL_MEAN ? acc / (float)n : acc;
        }
        store_f32(out + b * os0 + d * os1, v);
    }
}

template <typename TH>
static void
pool_launch(const tl_tensor *h, const tl_tensor *mask, int mode, tl_tensor *out, dim3 grid, cudaStream_t s)
{
    const void *m = mask ? mask->data : NULL;
    const int64_t ms0 = mask ? mask->strides[0] : 0, ms1 = mask ? mask->strides[1] : 0;
    const tl_dtype mdt = mask ? mask->dtype : TL_UINT8;
    const int64_t B = h->shape[0], T = h->shape[1], D = h->shape[2];
    if (out->dtype == TL_FLOAT32)
        pool_kernel<TH, float><<<grid, POOL_THREADS, 0, s>>>((const TH *)h->data, h->strides[0], h->strides[1],
                                                              h->strides[2], m, ms0, ms1, mdt, (float *)out->data,
                                                              out->strides[0], out->strides[1], B, T, D, mode);
    else
        pool_kernel<TH, TH><<<grid, POOL_THREADS, 0, s>>>((const TH *)h->data, h->strides[0], h->strides[1],
                                                           h->strides[2], m, ms0, ms1, mdt, (TH *)out->data,
                                                           out->strides[0], out->strides[1], B, T, D, mode);
}

tl_status
tl_pool_cuda(const tl_tensor *h, const tl_tensor *mask, int mode, tl_tensor *out, void *stream)
{
    tl_status st;
    if ((st = tl_cuda_check_in_out(h, 3, out, 2))) return st;
    const int dev = out->device_id;
    const int64_t B = h->shape[0], T = h->shape[1], D = h->shape[2];
    if (out->shape[0] != B || out->shape[1] != D) return TL_ERR_SHAPE;
    if (mode != TL_POOL_CLS && mode != TL_POOL_MEAN && mode != TL_POOL_MAX) return TL_ERR_VALUE;
    if (mask) {
        if ((st = tl_cuda_check_tensor(mask, 2, dev))) return st;
        const tl_dtype md = mask->dtype;
        if (md != TL_INT64 && md != TL_INT32 && md != TL_UINT8 && md != h->dtype) return TL_ERR_DTYPE;
        if (mask->shape[0] != B || mask->shape[1] != T) return TL_ERR_SHAPE;
    }
    if (mode == TL_POOL_CLS && T == 0 && B > 0 && D > 0) return TL_ERR_SHAPE;
    if (B == 0 || D == 0) return TL_OK;
    const int64_t bx = (D + POOL_THREADS - 1) / POOL_THREADS;
    if (bx > INT_MAX) return TL_ERR_SHAPE;
    const dim3 grid((unsigned)bx, (unsigned)(B < 65535 ? B : 65535));

    const cudaStream_t s = (cudaStream_t)stream;
    return tl_cuda_launch_float(dev, h->dtype, "pool kernel launch",
                                [&](auto t) { pool_launch<decltype(t)>(h, mask, mode, out, grid, s); });
}
