/* cuda_common.h: what the CUDA kernel files share (internal; not part of the public header): the
 * cuBLAS entry points (opened at run time), the context's layout, error recording, the current-device
 * guard and float32 <-> storage conversions. */
#ifndef TL_CUDA_COMMON_H
#define TL_CUDA_COMMON_H

#include <pthread.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../tl.h"

/* cuBLAS is not linked: tl_cublas_load opens libcublas.so.<CUBLAS_VER_MAJOR> with dlopen on the first
 * context creation (common.cu says where it looks), so that tltorch._cuda imports where there is no
 * cuBLAS at all. cublas_v2.h still declares the prototypes; the table holds exactly the functions the
 * kernels call, each typed as its prototype and named as its exported symbol (the _v2 names that
 * cublas_v2.h's macros map cublasCreate & co. to). Calling a cuBLAS function directly instead compiles
 * and links, but leaves an undefined symbol that makes `import tltorch._cuda` fail: add it here. */
#define TL_CUBLAS_FUNCTIONS(X)                                                                          \
    X(cublasCreate_v2, &::cublasCreate_v2)                                                              \
    X(cublasDestroy_v2, &::cublasDestroy_v2)                                                            \
    X(cublasSetStream_v2, &::cublasSetStream_v2)                                                        \
    X(cublasSetWorkspace_v2, &::cublasSetWorkspace_v2)                                                  \
    X(cublasSetMathMode, &::cublasSetMathMode)                                                          \
    X(cublasGemmEx, static_cast<tl_cublasGemmEx_fn>(&::cublasGemmEx))                                   \
    X(cublasGemmEx_64, &::cublasGemmEx_64)                                                              \
    X(cublasGetStatusName, &::cublasGetStatusName)

/* C++ also sees an inline overload of cublasGemmEx (a cudaDataType compute type, for old code): this
 * picks the exported one, and fails to compile if the header's prototype ever stops matching. */
typedef cublasStatus_t(CUBLASWINAPI *tl_cublasGemmEx_fn)(
    cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *, const void *,
    cudaDataType, int, const void *, cudaDataType, int, const void *, void *, cudaDataType, int,
    cublasComputeType_t, cublasGemmAlgo_t);

typedef struct {
#define TL_CUBLAS_FIELD(name, prototype) decltype(prototype) name;
    TL_CUBLAS_FUNCTIONS(TL_CUBLAS_FIELD)
#undef TL_CUBLAS_FIELD
} tl_cublas_api;

/* cuBLAS's entry points, loading the library on the first call (thread-safe; a failed load is tried
 * again on the next call). NULL when it cannot be loaded, with the reason, and how to install cuBLAS,
 * in this thread's tl_cuda_last_error(). */
const tl_cublas_api *tl_cublas_load(void);

struct tl_cuda_context {
    int device_id;
    const tl_cublas_api *cublas; /* the loaded library's entry points */
    cublasHandle_t blas;         /* created on device_id */
    pthread_mutex_t lock;        /* a call sets the handle's stream and workspace, then runs: one at a time */
    /* What the handle was last given (under lock), so that a call on the same stream with the same
     * workspace makes no cublasSetStream / cublasSetWorkspace calls (each a host cost on every GEMM). */
    int bound;
    cudaStream_t bound_stream;
    void *bound_ws;
    size_t bound_ws_bytes;
};

/* TL_OK when the call succeeded; otherwise the failure becomes this thread's tl_cuda_last_error()
 * ("what: name (code N)") and the status is TL_ERR_CUDA / TL_ERR_CUBLAS. */
tl_status tl_cuda_check(cudaError_t err, const char *what);
tl_status tl_cublas_check(const tl_cublas_api *cublas, cublasStatus_t st, const char *what);
/* Record a failure that is ours, not the runtime's (e.g. "device 3 does not exist"). */
void tl_cuda_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What tl_gemm_cuda checks before it runs anything (dtypes, shapes, devices, layouts, the workspace's
 * alignment), without running it: a caller that issues several GEMMs validates them all up front. */
tl_status tl_gemm_cuda_validate(const tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b,
                                const tl_tensor *bias, const tl_tensor *c, const void *cublas_ws);

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

/* A CUDA tensor of `ndim` dims on device `dev` whose memory is there when it has elements. */
static inline tl_status
tl_cuda_check_tensor(const tl_tensor *t, int ndim, int dev)
{
    if (t->device != TL_CUDA || t->device_id != dev) return TL_ERR_DEVICE;
    if (t->ndim != ndim) return TL_ERR_SHAPE;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] < 0 || t->strides[i] < 0) return TL_ERR_SHAPE;
    if (tl_numel(t) > 0 && t->data == NULL) return TL_ERR_VALUE;
    return TL_OK;
}

/* The contract of an op from x (x_ndim dims) to out (out_ndim dims): both CUDA tensors on out's device,
 * x of a float dtype, out float32 or x's dtype. */
static inline tl_status
tl_cuda_check_in_out(const tl_tensor *x, int x_ndim, const tl_tensor *out, int out_ndim)
{
    tl_status st;
    if (!x || !out) return TL_ERR_VALUE;
    const int dev = out->device_id;
    if ((st = tl_cuda_check_tensor(x, x_ndim, dev)) || (st = tl_cuda_check_tensor(out, out_ndim, dev))) return st;
    if (!tl_is_float_dtype(x->dtype)) return TL_ERR_DTYPE;
    if (out->dtype != TL_FLOAT32 && out->dtype != x->dtype) return TL_ERR_DTYPE;
    return TL_OK;
}

/* launch(T{}) with T the storage type of the float dtype `dtype` (float, __nv_bfloat16, else __half):
 * one launcher template serves the three dtypes. */
template <typename Launch>
static inline void
tl_cuda_dispatch_float(tl_dtype dtype, Launch &&launch)
{
    switch (dtype) {
    case TL_FLOAT32: launch(float{}); break;
    case TL_BFLOAT16: launch(__nv_bfloat16{}); break;
    default: launch(__half{}); break;
    }
}

/* tl_cuda_dispatch_float on device `dev` (made current for the launch, then restored); the status is
 * the launch's, recorded as `what` on failure. */
template <typename Launch>
static inline tl_status
tl_cuda_launch_float(int dev, tl_dtype dtype, const char *what, Launch &&launch)
{
    tl_status st;
    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;
    tl_cuda_dispatch_float(dtype, launch);
    st = tl_cuda_check(cudaGetLastError(), what);
    tl_cuda_leave(dev, prev);
    return st;
}

#endif /* TL_CUDA_COMMON_H */
