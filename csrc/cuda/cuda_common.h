/* cuda_common.h: what the CUDA kernel files share (internal; not part of the public header): the
 * context's layout, error recording, the current-device guard and float32 <-> storage conversions. */
#ifndef TL_CUDA_COMMON_H
#define TL_CUDA_COMMON_H

#include <pthread.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../tl.h"

struct tl_cuda_context {
    int device_id;
    cublasHandle_t blas;  /* created on device_id */
    pthread_mutex_t lock; /* a call sets the handle's stream and workspace, then runs: one at a time */
};

/* TL_OK when the call succeeded; otherwise the failure becomes this thread's tl_cuda_last_error()
 * ("what: name (code N)") and the status is TL_ERR_CUDA / TL_ERR_CUBLAS. */
tl_status tl_cuda_check(cudaError_t err, const char *what);
tl_status tl_cublas_check(cublasStatus_t st, const char *what);
/* Record a failure that is ours, not the runtime's (e.g. "device 3 does not exist"). */
void tl_cuda_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Make `dev` the current device, remembering the previous one; tl_cuda_leave restores it. */
tl_status tl_cuda_enter(int dev, int *prev);
void tl_cuda_leave(int dev, int prev);

/* Storage <-> float32, overloaded on the element type; rounding to nearest even on the way down. */
static __device__ __forceinline__ float
load_f32(const float *p)
{
    return *p;
}
static __device__ __forceinline__ float
load_f32(const __nv_bfloat16 *p)
{
    return __bfloat162float(*p);
}
static __device__ __forceinline__ float
load_f32(const __half *p)
{
    return __half2float(*p);
}
static __device__ __forceinline__ void
store_f32(float *p, float v)
{
    *p = v;
}
static __device__ __forceinline__ void
store_f32(__nv_bfloat16 *p, float v)
{
    *p = __float2bfloat16(v);
}
static __device__ __forceinline__ void
store_f32(__half *p, float v)
{
    *p = __float2half(v);
}

#endif /* TL_CUDA_COMMON_H */
