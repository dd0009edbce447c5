/* gemm.cu: GEMM with bias and column sums on CUDA, float32 accumulation.
 *
 *   tl_gemm_cuda:    C[M,N] = alpha * A[M,K] @ B[K,N] + beta * C[M,N] + bias[N]
 *   tl_colsum_cuda:  out[N] = beta * out[N] + sum_m x[m,n]
 *
 * The GEMM is cuBLAS's. tltorch thinks in row-major, cuBLAS in column-major: a row-major C is a
 * column-major C^T, so cuBLAS computes C^T[N,M] = B^T[N,K] @ A^T[K,M], and each of A, B is handed over
 * as "no transpose" when row-major (its memory already is X^T) or "transpose" when column-major.
 * With a bias, fill_kernel first writes C = beta*C + bias (one read and one write of C, N reads of
 * bias) and cuBLAS then accumulates onto it with beta = 1; without one cuBLAS applies beta itself.
 * colsum_kernel reads x once and writes out once; one block sums a strip of 32 columns.
 * Nothing here allocates: cuBLAS's scratch is the caller's workspace (or the handle's default). cuBLAS
 * is called through the context's table of entry points (cuda_common.h), never directly. */
#include <limits.h>
#include <stdint.h>

#include "cuda_common.h"

#define FILL_THREADS 256
#define STRIP 32     /* columns per colsum block: one warp wide */
#define ROW_LANES 32 /* rows summed in parallel per column in a colsum block: one warp wide */

static cudaDataType_t
cuda_dtype(tl_dtype d)
{
    switch (d) {
    case TL_BFLOAT16: return CUDA_R_16BF;
    case TL_FLOAT16: return CUDA_R_16F;
    default: return CUDA_R_32F;
    }
}

/* ---- kernels ------------------------------------------------------------------------------------ */

/* C[i, j] = beta * C[i, j] + bias[j]; beta == 0 never reads C, bias == NULL reads as 0. Threads run
 * along a row (coalesced on C's unit stride), grid.y strides over rows. */
template <typename TC, typename TB>
static __global__ void __launch_bounds__(FILL_THREADS)
fill_kernel(TC *c, int64_t ldc, const TB *bias, int64_t sbias, int64_t M, int64_t N, float beta)
{
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const float bj = bias ? load_f32(bias + j * sbias) : 0.0f;
    for (int64_t i = blockIdx.y; i < M; i += gridDim.y) {
        TC *p = c + i * ldc + j;
        store_f32(p, beta != 0.0f ? beta * load_f32(p) + bj : bj);
    }
}

/* C = bias (beta = 0) 16 bytes per thread: each thread packs its V = 16 / sizeof(TC) entries of the bias
 * once and stores them down its rows (c 16-byte aligned, ldc and N multiples of V). */
template <typename TC, typename TB>
static __global__ void __launch_bounds__(FILL_THREADS)
fill_vec_kernel(TC *c, int64_t ldc, const TB *bias, int64_t sbias, int64_t M, int64_t N)
{
    constexpr int V = 16 / sizeof(TC);
    const int64_t j0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (j0 >= N) return;
    uint4 pk;
    TC *e = reinterpret_cast<TC *>(&pk);
#pragma unroll
    for (int v = 0; v < V; v++) store_f32(e + v, bias ? load_f32(bias + (j0 + v) * sbias) : 0.0f);
    for (int64_t i = blockIdx.y; i < M; i += gridDim.y) *reinterpret_cast<uint4 *>(c + i * ldc + j0) = pk;
}

/* One launch of C = beta * C + bias: 16 bytes per thread where C allows it (beta = 0, aligned rows). */
template <typename TC, typename TB>
static void
fill_go(TC *c, int64_t ldc, const TB *bias, int64_t sb, int64_t M, int64_t N, float beta, dim3 grid,
        cudaStream_t stream)
{
    constexpr int V = 16 / sizeof(TC);
    if (beta == 0.0f && (uintptr_t)c % 16 == 0 && ldc % V == 0 && N % V == 0) {
        const dim3 vgrid((unsigned)((N / V + FILL_THREADS - 1) / FILL_THREADS), grid.y);
        fill_vec_kernel<TC, TB><<<vgrid, FILL_THREADS, 0, stream>>>(c, ldc, bias, sb, M, N);
    } else {
        fill_kernel<TC, TB><<<grid, FILL_THREADS, 0, stream>>>(c, ldc, bias, sb, M, N, beta);
    }
}

template <typename TC>
static void
fill_launch(TC *c, int64_t ldc, const tl_tensor *bias, int64_t M, int64_t N, float beta, dim3 grid,
            cudaStream_t stream)
{
    const int64_t sb = bias ? bias->strides[0] : 0;
    switch (bias ? bias->dtype : TL_FLOAT32) {
    case TL_BFLOAT16: fill_go(c, ldc, (const __nv_bfloat16 *)bias->data, sb, M, N, beta, grid, stream); break;
    case TL_FLOAT16: fill_go(c, ldc, (const __half *)bias->data, sb, M, N, beta, grid, stream); break;
    default: fill_go(c, ldc, bias ? (const float *)bias->data : (const float *)NULL, sb, M, N, beta, grid, stream);
    }
}

/* C = beta * C + bias over all of C, on `stream`. */
static tl_status
fill_c(tl_tensor *c, int64_t ldc, const tl_tensor *bias, float beta, cudaStream_t stream)
{
    const int64_t M = c->shape[0], N = c->shape[1];
    const int64_t bx = (N + FILL_THREADS - 1) / FILL_THREADS;
    if (bx > INT_MAX) return TL_ERR_SHAPE;
    const dim3 grid((unsigned)bx, (unsigned)(M < 65535 ? M : 65535));
    switch (c->dtype) {
    case TL_FLOAT32: fill_launch((float *)c->data, ldc, bias, M, N, beta, grid, stream); break;
    case TL_BFLOAT16: fill_launch((__nv_bfloat16 *)c->data, ldc, bias, M, N, beta, grid, stream); break;
    case TL_FLOAT16: fill_launch((__half *)c->data, ldc, bias, M, N, beta, grid, stream); break;
    default: return TL_ERR_DTYPE;
    }
    return tl_cuda_check(cudaGetLastError(), "gemm bias kernel launch");
}

/* out[j] = beta * out[j] + sum_i x[i, j] for the STRIP columns of this block. Thread (tx, ty) sums
 * column `lc` over the rows lr, lr + ROW_LANES, ...; the lanes of a warp run along whichever of x's
 * dims has the smaller stride, so that a warp's loads are coalesced for row- and column-major x. The
 * ROW_LANES partial sums of each column then meet in shared memory and one warp adds them (always in
 * the same order: the result does not depend on scheduling). */
template <typename TX, typename TO>
static __global__ void __launch_bounds__(STRIP * ROW_LANES)
colsum_kernel(const TX *x, int64_t s0, int64_t s1, int64_t M, int64_t N, TO *out, int64_t so,
              float beta, int rows_on_lanes)
{
    __shared__ float part[ROW_LANES][STRIP + 1]; /* +1: the transposed read is free of bank conflicts */
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int lc = rows_on_lanes ? ty : tx, lr = rows_on_lanes ? tx : ty;
    const int64_t j0 = (int64_t)blockIdx.x * STRIP;
    float acc = 0.0f;
    if (j0 + lc < N) {
        const TX *p = x + (j0 + lc) * s1;
#pragma unroll 4
        for (int64_t i = lr; i < M; i += ROW_LANES) acc += load_f32(p + i * s0);
    }
    part[lr][lc] = acc;
    __syncthreads();
    /* Warp ty adds up column ty: lane tx holds row lane tx's partial sum. */
    float v = part[tx][ty];
    for (int off = ROW_LANES / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (tx == 0 && j0 + ty < N) {
        TO *o = out + (j0 + ty) * so;
        store_f32(o, beta != 0.0f ? beta * load_f32(o) + v : v);
    }
}

template <typename TX>
static void
colsum_launch(const tl_tensor *x, tl_tensor *out, float beta, int rows_on_lanes, dim3 grid,
              cudaStream_t stream)
{
    const dim3 block(STRIP, ROW_LANES);
    const TX *xp = (const TX *)x->data;
    const int64_t M = x->shape[0], N = x->shape[1], s0 = x->strides[0], s1 = x->strides[1];
    if (out->dtype == TL_FLOAT32)
        colsum_kernel<TX, float><<<grid, block, 0, stream>>>(xp, s0, s1, M, N, (float *)out->data,
                                                              out->strides[0], beta, rows_on_lanes);
    else
        colsum_kernel<TX, TX><<<grid, block, 0, stream>>>(xp, s0, s1, M, N, (TX *)out->data,
                                                           out->strides[0], beta, rows_on_lanes);
}

/* ---- GEMM --------------------------------------------------------------------------------------- */

/* How cuBLAS reads X^T for a row-major [rows, cols] matrix X: a row-major X (unit stride in dim 1)
 * already is X^T in column-major order (op N, ld = stride[0]); a column-major X is X (op T,
 * ld = stride[1]). The leading dimension must cover the other dim (cuBLAS checks ld >= max(1, ...));
 * a dim of size 1 takes any stride, and then an unused ld is given its smallest valid value. 0 when
 * X has neither layout. */
static int
transposed_view(const tl_tensor *t, cublasOperation_t *op, int64_t *ld)
{
    const int64_t rows = t->shape[0], cols = t->shape[1], s0 = t->strides[0], s1 = t->strides[1];
    if (s1 == 1 || cols <= 1) {
        const int64_t need = cols > 1 ? cols : 1, l = rows > 1 ? s0 : need;
        if (l >= need) {
            *op = CUBLAS_OP_N;
            *ld = l;
            return 1;
        }
    }
    if (s0 == 1 || rows <= 1) {
        const int64_t need = rows > 1 ? rows : 1, l = cols > 1 ? s1 : need;
        if (l >= need) {
            *op = CUBLAS_OP_T;
            *ld = l;
            return 1;
        }
    }
    return 0;
}

static tl_status
check_gemm(const tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias,
           const tl_tensor *c)
{
    tl_status st;
    if (!ctx || !a || !b || !c) return TL_ERR_VALUE;
    const int dev = c->device_id;
    if (ctx->device_id != dev) return TL_ERR_DEVICE;
    if ((st = tl_cuda_check_tensor(a, 2, dev)) || (st = tl_cuda_check_tensor(b, 2, dev)) || (st = tl_cuda_check_tensor(c, 2, dev)))
        return st;
    if (!tl_is_float_dtype(a->dtype) || b->dtype != a->dtype) return TL_ERR_DTYPE;
    if (c->dtype != TL_FLOAT32 && c->dtype != a->dtype) return TL_ERR_DTYPE;
    if (a->shape[1] != b->shape[0] || c->shape[0] != a->shape[0] || c->shape[1] != b->shape[1])
        return TL_ERR_SHAPE;
    if (bias) {
        if ((st = tl_cuda_check_tensor(bias, 1, dev))) return st;
        if (!tl_is_float_dtype(bias->dtype)) return TL_ERR_DTYPE; /* any: a bf16 bias into float32 logits */
        if (bias->shape[0] != c->shape[1]) return TL_ERR_SHAPE;
    }
    return TL_OK;
}

/* cuBLAS's 32-bit entry point for the sizes it takes (the common, long-tested path), else _64. */
static cublasStatus_t
gemm_ex(const tl_cublas_api *cublas, cublasHandle_t h, cublasOperation_t opa, cublasOperation_t opb,
        int64_t m, int64_t n, int64_t k, const float *alpha, const void *A, cudaDataType_t at, int64_t lda,
        const void *B, cudaDataType_t bt, int64_t ldb, const float *beta, void *C, cudaDataType_t ct,
        int64_t ldc, cublasComputeType_t compute)
{
    if (m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX)
        return cublas->cublasGemmEx(h, opa, opb, (int)m, (int)n, (int)k, alpha, A, at, (int)lda, B, bt,
                                    (int)ldb, beta, C, ct, (int)ldc, compute, CUBLAS_GEMM_DEFAULT);
    return cublas->cublasGemmEx_64(h, opa, opb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc,
                                   compute, CUBLAS_GEMM_DEFAULT);
}

/* What tl_gemm_cuda checks before it touches anything, and how cuBLAS will read the operands. */
typedef struct {
    int64_t M, K, N, lda, ldb, ldc;
    cublasOperation_t opa, opb;
} gemm_plan;

static tl_status
plan_gemm(const tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias,
          const tl_tensor *c, const void *cublas_ws, gemm_plan *p)
{
    tl_status st = check_gemm(ctx, a, b, bias, c);
    if (st) return st;
    p->M = a->shape[0];
    p->K = a->shape[1];
    p->N = b->shape[1];
    p->opa = p->opb = CUBLAS_OP_N;
    p->lda = p->ldb = p->ldc = 1;
    if (p->M == 0 || p->N == 0) return TL_OK;

    /* C: unit stride along a row (any stride when N == 1), rows at least N apart. */
    if (!(c->strides[1] == 1 || p->N == 1)) return TL_ERR_LAYOUT;
    p->ldc = p->M > 1 ? c->strides[0] : p->N;
    if (p->ldc < p->N) return TL_ERR_LAYOUT;
    if (p->K > 0 && (!transposed_view(a, &p->opa, &p->lda) || !transposed_view(b, &p->opb, &p->ldb)))
        return TL_ERR_LAYOUT;
    /* cuBLAS rejects a workspace that is not 256-byte aligned. */
    if (cublas_ws && (uintptr_t)cublas_ws % 256 != 0) return TL_ERR_VALUE;
    return TL_OK;
}

tl_status
tl_gemm_cuda_validate(const tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b,
                      const tl_tensor *bias, const tl_tensor *c, const void *cublas_ws)
{
    gemm_plan p;
    return plan_gemm(ctx, a, b, bias, c, cublas_ws, &p);
}

tl_status
tl_gemm_cuda(tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias,
             tl_tensor *c, float alpha, float beta, void *cublas_ws, size_t cublas_ws_bytes,
             int allow_tf32, void *stream)
{
    gemm_plan p;
    tl_status st = plan_gemm(ctx, a, b, bias, c, cublas_ws, &p);
    if (st) return st;
    const int64_t M = p.M, K = p.K, N = p.N, lda = p.lda, ldb = p.ldb, ldc = p.ldc;
    const cublasOperation_t opa = p.opa, opb = p.opb;
    if (M == 0 || N == 0) return TL_OK;

    const cudaStream_t s = (cudaStream_t)stream;
    int prev = -1;
    if ((st = tl_cuda_enter(c->device_id, &prev))) return st;

    /* K == 0 is all epilogue: C = beta*C + bias, no GEMM. */
    float beta_gemm = beta;
    if (bias || K == 0) {
        st = fill_c(c, ldc, bias, beta, s);
        beta_gemm = 1.0f;
    }
    if (!st && K > 0) {
        const cublasComputeType_t compute = allow_tf32 && a->dtype == TL_FLOAT32
                                                ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                : CUBLAS_COMPUTE_32F;
        const tl_cublas_api *cublas = ctx->cublas;
        cublasHandle_t h = ctx->blas;
        pthread_mutex_lock(&ctx->lock);
        /* cublasSetStream resets the workspace to the handle's default pool: stream first. Only this
         * file's calls use the handle, so what it was last given still holds. */
        if (!(ctx->bound && ctx->bound_stream == s && ctx->bound_ws == cublas_ws &&
              ctx->bound_ws_bytes == (cublas_ws ? cublas_ws_bytes : 0))) {
            ctx->bound = 0;
            st = tl_cublas_check(cublas, cublas->cublasSetStream_v2(h, s), "cublasSetStream");
            if (!st && cublas_ws)
                st = tl_cublas_check(cublas, cublas->cublasSetWorkspace_v2(h, cublas_ws, cublas_ws_bytes),
                                     "cublasSetWorkspace");
            if (!st) {
                ctx->bound = 1;
                ctx->bound_stream = s;
                ctx->bound_ws = cublas_ws;
                ctx->bound_ws_bytes = cublas_ws ? cublas_ws_bytes : 0;
            }
        }
        /* C^T[N,M] = B^T[N,K] @ A^T[K,M]: B is cuBLAS's first operand, A its second. */
        if (!st)
            st = tl_cublas_check(cublas,
                                 gemm_ex(cublas, h, opb, opa, N, M, K, &alpha, b->data, cuda_dtype(b->dtype),
                                         ldb, a->data, cuda_dtype(a->dtype), lda, &beta_gemm, c->data,
                                         cuda_dtype(c->dtype), ldc, compute),
                                 "cublasGemmEx");
        pthread_mutex_unlock(&ctx->lock);
    }
    tl_cuda_leave(c->device_id, prev);
    return st;
}

/* ---- column sums -------------------------------------------------------------------------------- */

tl_status
tl_colsum_cuda(const tl_tensor *x, tl_tensor *out, float beta, void *stream)
{
    tl_status st;
    if ((st = tl_cuda_check_in_out(x, 2, out, 1))) return st;
    const int64_t N = x->shape[1];
    if (out->shape[0] != N) return TL_ERR_SHAPE;
    if (N == 0) return TL_OK;
    if (N > 1 && out->strides[0] == 0) return TL_ERR_LAYOUT; /* every column would write one element */
    const int64_t bx = (N + STRIP - 1) / STRIP;
    if (bx > INT_MAX) return TL_ERR_SHAPE;

    const cudaStream_t s = (cudaStream_t)stream;
    const int rows_on_lanes = N == 1 || x->strides[0] < x->strides[1];
    const dim3 grid((unsigned)bx);
    return tl_cuda_launch_float(out->device_id, x->dtype, "colsum kernel launch", [&](auto t) {
        colsum_launch<decltype(t)>(x, out, beta, rows_on_lanes, grid, s);
    });
}
