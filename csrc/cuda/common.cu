/* common.cu: the CUDA plumbing of tltorch._cuda: device queries, the per-device context (a cuBLAS
 * handle created on its device), the current-device guard and the thread's last error text.
 * No kernels and no tensor memory: a context owns only its cuBLAS handle (cuBLAS allocates its own
 * small default workspace inside cublasCreate; calls that pass a workspace use the caller's). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_common.h"

/* Per thread, so that a message describes the failure of this thread's call. */
static thread_local char last_error[512];

void
tl_cuda_set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

const char *
tl_cuda_last_error(void)
{
    return last_error[0] ? last_error : "no CUDA error recorded";
}

tl_status
tl_cuda_check(cudaError_t err, const char *what)
{
    if (err == cudaSuccess) return TL_OK;
    tl_cuda_set_error("%s: %s: %s (code %d)", what, cudaGetErrorName(err), cudaGetErrorString(err),
                      (int)err);
    /* Clear a non-sticky error so that the next launch check (ours or torch's) does not report it. */
    (void)cudaGetLastError();
    return TL_ERR_CUDA;
}

tl_status
tl_cublas_check(cublasStatus_t st, const char *what)
{
    if (st == CUBLAS_STATUS_SUCCESS) return TL_OK;
    tl_cuda_set_error("%s: %s (code %d)", what, cublasGetStatusName(st), (int)st);
    return TL_ERR_CUBLAS;
}

tl_status
tl_cuda_enter(int dev, int *prev)
{
    tl_status st = tl_cuda_check(cudaGetDevice(prev), "cudaGetDevice");
    if (st) return st;
    return *prev == dev ? TL_OK : tl_cuda_check(cudaSetDevice(dev), "cudaSetDevice");
}

void
tl_cuda_leave(int dev, int prev)
{
    if (prev != dev) (void)tl_cuda_check(cudaSetDevice(prev), "cudaSetDevice (restoring)");
}

int
tl_cuda_device_count(void)
{
    int n = 0;
    /* No driver or no GPU is an answer (0), not an error; the reason stays in last_error. */
    if (tl_cuda_check(cudaGetDeviceCount(&n), "cudaGetDeviceCount")) return 0;
    return n;
}

static tl_status
check_device(int device_id)
{
    int n = 0;
    tl_status st = tl_cuda_check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    if (st) return st;
    if (device_id < 0 || device_id >= n) {
        tl_cuda_set_error("CUDA device %d does not exist (%d visible)", device_id, n);
        return TL_ERR_DEVICE;
    }
    return TL_OK;
}

tl_status
tl_cuda_device_name(int device_id, char *buf, size_t len)
{
    if (!buf || len == 0) return TL_ERR_VALUE;
    buf[0] = '\0';
    tl_status st = check_device(device_id);
    if (st) return st;
    cudaDeviceProp prop;
    st = tl_cuda_check(cudaGetDeviceProperties(&prop, device_id), "cudaGetDeviceProperties");
    if (st) return st;
    snprintf(buf, len, "%.*s", (int)sizeof prop.name, prop.name);
    return TL_OK;
}

tl_status
tl_cuda_context_create(int device_id, tl_cuda_context **out)
{
    if (!out) return TL_ERR_VALUE;
    *out = NULL;
    tl_status st = check_device(device_id);
    if (st) return st;
    tl_cuda_context *ctx = (tl_cuda_context *)calloc(1, sizeof *ctx);
    if (!ctx) return TL_ERR_NOMEM;
    if (pthread_mutex_init(&ctx->lock, NULL) != 0) {
        free(ctx);
        return TL_ERR_NOMEM;
    }
    ctx->device_id = device_id;

    int prev = -1;
    st = tl_cuda_enter(device_id, &prev);
    if (!st) {
        st = tl_cublas_check(cublasCreate(&ctx->blas), "cublasCreate");
        /* Float32 accumulation is the contract, bfloat16/float16 outputs included: no split-K partial
         * sums rounded to the output's dtype (the pointer mode stays host: alpha, beta are floats). */
        if (!st) {
            st = tl_cublas_check(cublasSetMathMode(ctx->blas, (cublasMath_t)(
                                     CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                                 "cublasSetMathMode");
            if (st) (void)cublasDestroy(ctx->blas);
        }
        tl_cuda_leave(device_id, prev);
    }
    if (st) {
        pthread_mutex_destroy(&ctx->lock);
        free(ctx);
        return st;
    }
    *out = ctx;
    return TL_OK;
}

void
tl_cuda_context_destroy(tl_cuda_context *ctx)
{
    if (!ctx) return;
    int prev = -1;
    /* cuBLAS frees its workspace on the handle's device; if the device cannot be made current (the
     * process is tearing CUDA down) the handle is left behind rather than freed on the wrong one. */
    if (tl_cuda_enter(ctx->device_id, &prev) == TL_OK) {
        (void)cublasDestroy(ctx->blas);
        tl_cuda_leave(ctx->device_id, prev);
    }
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}
