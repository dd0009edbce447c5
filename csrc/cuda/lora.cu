/* lora.cu: dropout and the LoRA linear layer on CUDA, the twins of cpu/lora.c (the math is in tl.h):
 *
 *   dropout:   out[i, k] = keep(i*D + k) ? x[i, k] / (1 - p) : 0     keep: tl_dropout_hash >= threshold
 *   forward:   xd = dropout(x)                          (x's dtype, in ws; x itself when p == 0)
 *              su = scale * xd A^T                      (cuBLAS, float32 accumulation, rounded to x's dtype)
 *              y  = x W^T + bias;  y += su B^T          (two cuBLAS calls on y, the second with beta = 1)
 *   backward:  sv = scale * dy B                        (x's dtype, in ws)
 *              dx = dropout'(sv A);  dx += dy W         (dropout' masks and scales with forward's mask)
 *              da = sv^T xd,  db = dy^T su              (float32 outputs of 16-bit products: cuBLAS's
 *                                                        16F/16BF x 16F/16BF -> 32F with compute 32F)
 * cuBLAS carries its partial sums in float32 itself, so of the CPU's workspace only the dropped x and
 * sv are used here: forward N*in floats when p > 0 (else none), backward N*r floats when dx or da is
 * wanted, plus N*in when da is and p > 0; the CPU's larger tl_lora_*_ws sizes are accepted too.
 * The mask is never stored: backward regenerates it from the seed, element for element. */
#include <stdint.h>

#include "cuda_common.h"

#define DROP_THREADS 256
#define DROP_MAX_BLOCKS 8192

/* out = dropout(x) over an N x D matrix, a grid-stride loop over the logical index e = i*D + k (the
 * hash's input, whatever the layout). col_major walks e in column order instead, so that a warp's
 * accesses stay coalesced when the output's unit stride is in dim 0; the hash still sees i*D + k. */
template <typename TX, typename TO>
static __global__ void __launch_bounds__(DROP_THREADS)
dropout_kernel(const TX *x, int64_t xs0, int64_t xs1, TO *out, int64_t os0, int64_t os1, int64_t N,
               int64_t D, int col_major, int drop, uint32_t threshold, float keep_scale, uint64_t seed)
{
    const int64_t n = N * D;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t i, k;
        if (col_major) {
            k = e / N;
            i = e - k * N;
        } else {
            i = e / D;
            k = e - i * D;
        }
        float v = load_f32(x + i * xs0 + k * xs1);
        if (drop) v = tl_dropout_hash(seed, (uint64_t)(i * D + k)) >= threshold ? v * keep_scale : 0.0f;
        store_f32(out + i * os0 + k * os1, v);
    }
}

template <typename TX, typename TO>
static void
dropout_go(const tl_tensor *x, tl_tensor *out, float p, float keep_scale, uint64_t seed, cudaStream_t s)
{
    const int64_t N = x->shape[0], D = x->shape[1], n = N * D;
    int64_t blocks = (n + DROP_THREADS - 1) / DROP_THREADS;
    if (blocks > DROP_MAX_BLOCKS) blocks = DROP_MAX_BLOCKS;
    const int col_major = N > 1 && D > 1 && out->strides[0] == 1 && out->strides[1] != 1;
    dropout_kernel<TX, TO><<<(unsigned)blocks, DROP_THREADS, 0, s>>>(
        (const TX *)x->data, x->strides[0], x->strides[1], (TO *)out->data, out->strides[0], out->strides[1], N,
        D, col_major, p > 0.0f, tl_dropout_threshold(p), keep_scale, seed);
}

template <typename TX>
static void
dropout_to(const tl_tensor *x, tl_tensor *out, float p, float keep_scale, uint64_t seed, cudaStream_t s)
{
    if (out->dtype == TL_FLOAT32)
        dropout_go<TX, float>(x, out, p, keep_scale, seed, s);
    else
        dropout_go<TX, TX>(x, out, p, keep_scale, seed, s);
}

/* The kernel for checked arguments on the current device; out may be x itself (in place). Kept
 * elements are multiplied by keep_scale: 1 / (1 - p) for dropout, 1 for the bare mask. */
static tl_status
dropout_run(const tl_tensor *x, tl_tensor *out, float p, float keep_scale, uint64_t seed, cudaStream_t s)
{
    if (x->shape[0] == 0 || x->shape[1] == 0) return TL_OK;
    tl_cuda_dispatch_float(x->dtype, [&](auto t) { dropout_to<decltype(t)>(x, out, p, keep_scale, seed, s); });
    return tl_cuda_check(cudaGetLastError(), "dropout kernel launch");
}

static int
valid_p(float p)
{
    return p >= 0.0f && p < 1.0f; /* false for NaN */
}

static float
drop_scale(float p)
{
    return 1.0f / (1.0f - p);
}

tl_status
tl_dropout_cuda(const tl_tensor *x, tl_tensor *out, float p, uint64_t seed, void *stream)
{
    tl_status st;
    if ((st = tl_cuda_check_in_out(x, 2, out, 2))) return st;
    const int dev = out->device_id;
    if (out->shape[0] != x->shape[0] || out->shape[1] != x->shape[1]) return TL_ERR_SHAPE;
    if (!valid_p(p)) return TL_ERR_VALUE;
    if (tl_numel(x) == 0) return TL_OK;
    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;
    st = dropout_run(x, out, p, drop_scale(p), seed, (cudaStream_t)stream);
    tl_cuda_leave(dev, prev);
    return st;
}

/* ---- LoRA ---------------------------------------------------------------------------------------- */

/* The float32 workspace this file uses (see the top), and whether ws provides it: float32, 1-D,
 * contiguous, on dev, of at least `need` elements (ws is not read when need == 0). */
static tl_status
check_ws(const tl_tensor *ws, int64_t need, int dev)
{
    tl_status st;
    if (need == 0) return TL_OK;
    if (!ws) return TL_ERR_VALUE;
    if ((st = tl_cuda_check_tensor(ws, 1, dev))) return st;
    if (ws->dtype != TL_FLOAT32 || (ws->strides[0] != 1 && ws->shape[0] > 1) || ws->shape[0] < need)
        return TL_ERR_VALUE;
    return TL_OK;
}

/* The transpose of a 2-D view (no copy). */
static tl_tensor
transposed(const tl_tensor *t)
{
    return tl_view2d(t->data, t->dtype, t->device, t->device_id, t->shape[1], t->shape[0], t->strides[1],
                     t->strides[0]);
}

/* A 2-D operand of the LoRA layer: on dev, of x's dtype, rows x cols. */
static tl_status
check_operand(const tl_tensor *t, tl_dtype dt, int64_t rows, int64_t cols, int dev)
{
    tl_status st;
    if ((st = tl_cuda_check_tensor(t, 2, dev))) return st;
    if (t->dtype != dt) return TL_ERR_DTYPE;
    if (t->shape[0] != rows || t->shape[1] != cols) return TL_ERR_SHAPE;
    return TL_OK;
}

/* What forward and backward check alike: x float on ctx's device; w (out x in), a (r x in), b (out x r),
 * rows_out (N x out: y or dy) and su (N x r) of x's dtype on that device. */
static tl_status
check_lora(const tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *a,
           const tl_tensor *b, const tl_tensor *rows_out, const tl_tensor *su)
{
    tl_status st;
    if (!ctx || !x || !w || !a || !b || !rows_out || !su) return TL_ERR_VALUE;
    const int dev = ctx->device_id;
    if ((st = tl_cuda_check_tensor(x, 2, dev))) return st;
    const tl_dtype dt = x->dtype;
    if (!tl_is_float_dtype(dt)) return TL_ERR_DTYPE;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->ndim == 2 ? w->shape[0] : -1,
                  r = a->ndim == 2 ? a->shape[0] : -1;
    if ((st = check_operand(w, dt, out, in, dev)) || (st = check_operand(a, dt, r, in, dev)) ||
        (st = check_operand(b, dt, out, r, dev)) || (st = check_operand(rows_out, dt, N, out, dev)) ||
        (st = check_operand(su, dt, N, r, dev)))
        return st;
    return TL_OK;
}

tl_status
tl_lora_forward_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                     const tl_tensor *a, const tl_tensor *b, float scale, float p, uint64_t seed, tl_tensor *y,
                     tl_tensor *su, tl_tensor *ws, void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32,
                     void *stream)
{
    tl_status st = check_lora(ctx, x, w, a, b, y, su);
    if (st) return st;
    const int dev = ctx->device_id;
    const tl_dtype dt = x->dtype;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if (bias) {
        if ((st = tl_cuda_check_tensor(bias, 1, dev))) return st;
        if (bias->dtype != dt) return TL_ERR_DTYPE;
        if (bias->shape[0] != out) return TL_ERR_SHAPE;
    }
    if (!valid_p(p)) return TL_ERR_VALUE;
    const int drop = p > 0.0f && N * in > 0;
    if ((st = check_ws(ws, drop ? N * in : 0, dev))) return st;

    /* Every GEMM checked before anything is written. */
    const tl_tensor xd = drop ? tl_view2d(ws->data, dt, TL_CUDA, dev, N, in, in, 1) : *x;
    const tl_tensor at = transposed(a), wt = transposed(w), bt = transposed(b);
    if ((st = tl_gemm_cuda_validate(ctx, &xd, &at, NULL, su, cublas_ws)) ||
        (st = tl_gemm_cuda_validate(ctx, x, &wt, bias, y, cublas_ws)) ||
        (r > 0 && (st = tl_gemm_cuda_validate(ctx, su, &bt, NULL, y, cublas_ws))))
        return st;

    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;
    tl_tensor xdw = xd;
    if (drop) st = dropout_run(x, &xdw, p, drop_scale(p), seed, (cudaStream_t)stream);
    if (!st) st = tl_gemm_cuda(ctx, &xd, &at, NULL, su, scale, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    if (!st) st = tl_gemm_cuda(ctx, x, &wt, bias, y, 1.0f, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    /* su as rounded to x's dtype is what backward sees (db = dy^T su): y is built from the same values. */
    if (!st && r > 0)
        st = tl_gemm_cuda(ctx, su, &bt, NULL, y, 1.0f, 1.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    tl_cuda_leave(dev, prev);
    return st;
}

tl_status
tl_lora_backward_cuda(tl_cuda_context *ctx, const tl_tensor *dy, const tl_tensor *x, const tl_tensor *w,
                      const tl_tensor *a, const tl_tensor *b, const tl_tensor *su, float scale, float p,
                      uint64_t seed, tl_tensor *dx, tl_tensor *da, tl_tensor *db, tl_tensor *ws,
                      void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32, void *stream)
{
    tl_status st = check_lora(ctx, x, w, a, b, dy, su);
    if (st) return st;
    const int dev = ctx->device_id;
    const tl_dtype dt = x->dtype;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if (dx && (st = check_operand(dx, dt, N, in, dev))) return st;
    if (da && (st = check_operand(da, TL_FLOAT32, r, in, dev))) return st;
    if (db && (st = check_operand(db, TL_FLOAT32, out, r, dev))) return st;
    if (!valid_p(p)) return TL_ERR_VALUE;
    const int drop = p > 0.0f && N * in > 0;
    const int64_t sv_room = dx || da ? N * r : 0, xd_room = da && drop ? N * in : 0;
    if ((st = check_ws(ws, sv_room + xd_room, dev))) return st;

    float *const wsf = sv_room + xd_room > 0 ? (float *)ws->data : NULL;
    const tl_tensor sv = tl_view2d(wsf, dt, TL_CUDA, dev, N, r, r, 1), svt = transposed(&sv);
    const tl_tensor xd = xd_room ? tl_view2d(wsf + sv_room, dt, TL_CUDA, dev, N, in, in, 1) : *x;
    const tl_tensor dyt = transposed(dy);
    if (sv_room && (st = tl_gemm_cuda_validate(ctx, dy, b, NULL, &sv, cublas_ws))) return st;
    if (dx && ((r > 0 && (st = tl_gemm_cuda_validate(ctx, &sv, a, NULL, dx, cublas_ws))) ||
               (st = tl_gemm_cuda_validate(ctx, dy, w, NULL, dx, cublas_ws))))
        return st;
    if (da && (st = tl_gemm_cuda_validate(ctx, &svt, &xd, NULL, da, cublas_ws))) return st;
    if (db && (st = tl_gemm_cuda_validate(ctx, &dyt, su, NULL, db, cublas_ws))) return st;

    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;
    const cudaStream_t s = (cudaStream_t)stream;
    tl_tensor svw = sv, xdw = xd;
    if (sv_room)
        st = tl_gemm_cuda(ctx, dy, b, NULL, &svw, scale, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    if (!st && dx) {
        /* The low-rank term went through dropout on the way in, so its gradient goes back through the
         * same mask: dx = dropout'(sv A) first, then dy W onto it. 1 / (1 - p) rides on the GEMM's
         * alpha and the mask multiplies by 1 or 0, so the term is rounded to x's dtype once. */
        float beta = 0.0f;
        if (r > 0) {
            st = tl_gemm_cuda(ctx, &sv, a, NULL, dx, drop ? drop_scale(p) : 1.0f, 0.0f, cublas_ws, cublas_ws_bytes,
                              allow_tf32, stream);
            if (!st && drop) st = dropout_run(dx, dx, p, 1.0f, seed, s);
            beta = 1.0f;
        }
        if (!st) st = tl_gemm_cuda(ctx, dy, w, NULL, dx, 1.0f, beta, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    }
    if (!st && da) {
        if (xd_room) st = dropout_run(x, &xdw, p, drop_scale(p), seed, s);
        if (!st)
            st = tl_gemm_cuda(ctx, &svt, &xd, NULL, da, 1.0f, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    }
    if (!st && db)
        st = tl_gemm_cuda(ctx, &dyt, su, NULL, db, 1.0f, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32, stream);
    tl_cuda_leave(dev, prev);
    return st;
}
