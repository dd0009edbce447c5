/* dequant.cu: the int8 frozen weight as a dense float tensor on CUDA, the twin of tl_int8_dequant_cpu
 * (csrc/cpu/qlinear_int8.c; tl.h has the contract):
 *
 *     out[n, k] = w[n, k] * s,   s = w_scale[n] or w_scale[n, k / group]
 *
 * the product rounded to float32, then to out's dtype. What cuBLAS multiplies for an int8
 * FrozenLinear: one pass over the weight per call, reading it in 8 bits. One thread per (n, k): a
 * block's threads take consecutive k of one row, so reads of w and writes of out are coalesced when
 * their unit stride is along K (as a weight's is). */
#include <limits.h>
#include <stdint.h>

#include "cuda_common.h"

#define DEQUANT_THREADS 256

template <typename TO>
static __global__ void __launch_bounds__(DEQUANT_THREADS)
dequant_kernel(const int8_t *w, int64_t ws0, int64_t ws1, const float *s, int64_t ss0, int64_t ss1, int64_t group,
               TO *out, int64_t os0, int64_t os1, int64_t N, int64_t K)
{
    const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y)
        store_f32(out + n * os0 + k * os1, (float)w[n * ws0 + k * ws1] * s[n * ss0 + (k / group) * ss1]);
}

tl_status
tl_int8_dequant_cuda(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *out, void *stream)
{
    tl_status st;
    if (!w || !w_scale || !out) return TL_ERR_VALUE;
    const int dev = out->device_id;
    if ((st = tl_cuda_check_tensor(w, 2, dev)) || (st = tl_cuda_check_tensor(out, 2, dev)) ||
        (st = tl_cuda_check_tensor(w_scale, w_scale->ndim == 2 ? 2 : 1, dev)))
        return st;
    if ((st = tl_check_int8_dequant(w, w_scale, group, out, NULL))) return st;
    const int64_t N = w->shape[0], K = w->shape[1];
    if (N == 0 || K == 0) return TL_OK;
    const int per_group = w_scale->ndim == 2;
    const int64_t ss1 = per_group ? w_scale->strides[1] : 0, g = per_group ? group : K;
    const int64_t bx = (K + DEQUANT_THREADS - 1) / DEQUANT_THREADS;
    if (bx > INT_MAX) return TL_ERR_SHAPE;
    const dim3 grid((unsigned)bx, (unsigned)(N < 65535 ? N : 65535));
    const cudaStream_t cs = (cudaStream_t)stream;
    return tl_cuda_launch_float(dev, out->dtype, "int8 dequant kernel launch", [&](auto t) {
        using TO = decltype(t);
        dequant_kernel<TO><<<grid, DEQUANT_THREADS, 0, cs>>>(
            (const int8_t *)w->data, w->strides[0], w->strides[1], (const float *)w_scale->data,
            w_scale->strides[0], ss1, g, (TO *)out->data, out->strides[0], out->strides[1], N, K);
    });
}
