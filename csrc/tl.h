/* tl.h: the tltorch C core's one public header.
 *
 * A tl_tensor is a borrowed, strided view of memory somebody else owns (torch's allocator, NumPy):
 * the core never allocates tensor-sized memory. Kernels validate what memory safety depends on and
 * return a tl_status; nothing here prints, exits or aborts. Every exported symbol starts with tl_. */
#ifndef TL_H
#define TL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TL_MAX_NDIM 8

typedef enum {
    TL_FLOAT32 = 0,
    TL_FLOAT16,
    TL_BFLOAT16,
    TL_FLOAT64,
    TL_INT64,
    TL_INT32,
    TL_INT8,
    TL_UINT8,
    TL_NUM_DTYPES
} tl_dtype;

typedef enum { TL_CPU = 1, TL_CUDA = 2 } tl_device;

typedef struct {
    void *data; /* address of element [0, ..., 0]; may be NULL when the tensor is empty */
    tl_dtype dtype;
    tl_device device;
    int device_id;
    int ndim;
    int64_t shape[TL_MAX_NDIM];
    int64_t strides[TL_MAX_NDIM]; /* in elements, any sign-free layout, 0 for broadcast dims */
} tl_tensor;

typedef enum {
    TL_OK = 0,
    TL_ERR_DTYPE,       /* a dtype the kernel does not take */
    TL_ERR_SHAPE,       /* shapes that do not agree */
    TL_ERR_DEVICE,      /* a tensor on a device the kernel does not run on */
    TL_ERR_LAYOUT,      /* strides the kernel cannot read (CUDA: no unit stride) */
    TL_ERR_VALUE,       /* a bad scalar argument or a missing workspace */
    TL_ERR_INDEX,       /* an index (class target) out of range */
    TL_ERR_NOMEM,       /* the core's small scratch could not be allocated */
    TL_ERR_CUDA,        /* the CUDA runtime reported an error */
    TL_ERR_CUBLAS,      /* cuBLAS reported an error */
    TL_ERR_UNSUPPORTED  /* not built into this library */
} tl_status;

const char *tl_status_string(tl_status s);

static inline int
tl_is_float_dtype(tl_dtype d)
{
    return d == TL_FLOAT32 || d == TL_BFLOAT16 || d == TL_FLOAT16;
}

/* A 2-D view of memory on a device, and rows [i0, i0+rows) of a 2-D tensor as a view. */
tl_tensor tl_view2d(void *data, tl_dtype dtype, tl_device device, int device_id, int64_t rows, int64_t cols,
                    int64_t s0, int64_t s1);
tl_tensor tl_row_block(const tl_tensor *t, int64_t i0, int64_t rows);
size_t tl_dtype_size(tl_dtype d);
const char *tl_dtype_name(tl_dtype d);
int64_t tl_numel(const tl_tensor *t);

/* ---- CPU ---------------------------------------------------------------------------------------- */

/* The instruction set the CPU kernels dispatch to on this machine: "avx512", "avx2" or "portable". */
const char *tl_cpu_isa(void);
/* The micro-kernel bfloat16 GEMMs take here: "avx512_bf16" (the AVX512-BF16 dot product, where it outruns
 * the float32 FMA; TLTORCH_BF16_DOT=1/0 decides instead) or that of tl_cpu_isa (widened to float32). */
const char *tl_gemm_bf16_isa(void);
/* Threads a kernel uses when asked for nthreads <= 0 (OpenMP's default, OMP_NUM_THREADS). */
int tl_cpu_default_threads(void);

/* GEMM with bias, float32 accumulation:
 *     C[M,N] = alpha * A[M,K] @ B[K,N] + beta * C[M,N] + bias[N]
 * a, b: 2-D, any strides, float32/bfloat16/float16 (the core also takes a and b of different float
 * dtypes; the Python binding asks for one). c: 2-D, any strides, float32 or a's or b's dtype.
 * bias: NULL or 1-D of N, any of the three float dtypes (the binding asks for float32 or c's).
 * beta == 0 never reads C (it may hold NaN).
 * ws: when c is not float32 and K > TL_GEMM_KC, a float32 contiguous scratch of >= M*N elements that
 * carries the partial sums between K blocks (so that rounding to c's dtype happens once); else NULL. */
#define TL_GEMM_KC 384
tl_status tl_gemm_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c,
                      float alpha, float beta, tl_tensor *ws, int nthreads);

/* GEMM with a stored weight: as tl_gemm_cpu, with B also int8 and B[k, n] multiplied by b_scale[k]
 * (scale_axis 0) or b_scale[n] (scale_axis 1) as it is read: a per-output-channel int8 weight
 * W[out, in] * s[out] serves y = x W^T (B = W^T, axis 1) and dx = dy W (B = W, axis 0) with no
 * dequantised copy. b_scale: NULL (float B only) or 1-D float32/bfloat16/float16. c: float32 or a's
 * dtype. */
tl_status tl_qgemm_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *b_scale, int scale_axis,
                       const tl_tensor *bias, tl_tensor *c, float alpha, float beta, tl_tensor *ws, int nthreads);

/* Column sums: out[N] = beta * out[N] + sum_m x[m, n], float32 accumulation.
 * x: 2-D float32/bfloat16/float16, any strides. out: 1-D of N, float32 or x's dtype. */
tl_status tl_colsum_cpu(const tl_tensor *x, tl_tensor *out, float beta, int nthreads);

/* Fused linear + softmax + cross-entropy over rows in chunks, never holding more than a chunk of logits:
 *     z_i = x_i W^T + b,  lse_i = log sum_c exp z_ic,  p_ic = exp(z_ic - lse_i)
 *     loss_i = (1-eps) w_t (lse_i - z_it) + (eps/C) sum_c w_c (lse_i - z_ic)   (t = target_i, w = class
 *              weights, all 1 without them; ignored rows: loss 0, no gradient)
 *     dz_ic = s_i [ p_ic ((1-eps) w_t + (eps/C) sum_c w_c) - (1-eps) w_t [c == t] - (eps/C) w_c ]
 *     dx = dz W,  dW = dz^T x,  db = sum_i dz_i
 * where s_i = (grad_rows ? grad_rows[i] : 1) times 1/sum_i w_t for the mean (1 for sum and none).
 * x: (N, D), w: (C, D), bias: NULL or (C,) — float32/bfloat16/float16, one dtype. target: (N,) int64 or
 * int32. class_weight: NULL or (C,) float32 or x's dtype. loss: NULL, a 1-element tensor (mean, sum) or
 * (N,) (none), float32 or x's dtype. dx: NULL or (N, D) of x's dtype or float32; dw: NULL or (C, D)
 * float32; db: NULL or (C,) float32 (each overwritten). ws: float32 contiguous; rows are processed in
 * chunks of ws.numel / (C + D + 1). With C <= TL_XENT_SKINNY_C a single pass needs no GEMM and no
 * workspace (ws may be NULL). A target outside [0, C) that is not ignore_index: TL_ERR_INDEX,
 * *bad_target set to it, and nothing written. */
enum { TL_REDUCE_MEAN = 0, TL_REDUCE_SUM = 1, TL_REDUCE_NONE = 2 };
#define TL_XENT_SKINNY_C 16
typedef struct {
    int64_t ignore_index;
    float label_smoothing;
    int reduction; /* TL_REDUCE_* */
} tl_xent_opts;

tl_status tl_linear_xent_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                             const tl_tensor *target, const tl_tensor *class_weight,
                             const tl_xent_opts *opts, const tl_tensor *grad_rows, tl_tensor *loss,
                             tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws,
                             int64_t *bad_target, int nthreads);

/* ---- LoRA (csrc/cpu/lora.c) -------------------------------------------------------------------- */

/* Dropout without a stored mask: element (i, k) of an N x D input is kept iff
 * tl_dropout_hash(seed, i * D + k) >= tl_dropout_threshold(p), and a kept element is scaled by
 * 1 / (1 - p). The CPU and CUDA kernels share these two functions, so they drop the same elements. */
#if defined(__CUDACC__)
#define TL_HOSTDEV __host__ __device__
#else
#define TL_HOSTDEV
#endif
static inline TL_HOSTDEV uint32_t
tl_dropout_hash(uint64_t seed, uint64_t idx)
{
    uint64_t z = seed + (idx + 1) * 0x9E3779B97F4A7C15ull; /* splitmix64's finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}
static inline TL_HOSTDEV uint32_t
tl_dropout_threshold(float p) /* p in [0, 1) */
{
    double t = (double)p * 4294967296.0;
    return t <= 0.0 ? 0u : t >= 4294967295.0 ? 4294967295u : (uint32_t)t;
}

/* out[N, D] = dropout(x[N, D]) as above (p == 0: a copy). x, out: float32/bfloat16/float16, any
 * strides. */
tl_status tl_dropout_cpu(const tl_tensor *x, tl_tensor *out, float p, uint64_t seed, int nthreads);

/* The LoRA linear layer, forward:
 *     su = scale * dropout(x) A^T          (N x r, kept by the caller for backward)
 *     y  = x W^T + bias + su B^T           (one GEMM over the concatenated K = in + r)
 * x: (N, in); w: (out, in); bias: NULL or (out,); a: (r, in); b: (out, r) — one float dtype, any
 * strides. y: (N, out) and su: (N, r), both of x's dtype. Dropout is drawn with `seed`
 * (tl_dropout_hash); p in [0, 1). ws: float32, contiguous, of >= tl_lora_forward_ws(...) elements
 * (NULL when that is 0): the dropped x (in x's dtype) and the GEMMs' float32 partial sums. */
static inline int64_t
tl_lora_forward_ws(int64_t N, int64_t in, int64_t out, int64_t r, float p, tl_dtype dtype)
{
    int64_t n = p > 0.0f ? N * in : 0;                 /* dropout(x) */
    if (dtype != TL_FLOAT32 && in > TL_GEMM_KC) n += N * r;      /* su's partial sums */
    if (dtype != TL_FLOAT32 && in + r > TL_GEMM_KC) n += N * out; /* y's partial sums */
    return n;
}
tl_status tl_lora_forward_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                              const tl_tensor *a, const tl_tensor *b, float scale, float p, uint64_t seed,
                              tl_tensor *y, tl_tensor *su, tl_tensor *ws, int nthreads);

/* Backward, from dy (N, out) and forward's su, with the same scale, p and seed:
 *     sv = scale * dy B                     (N x r, computed once, in x's dtype)
 *     dx = dy W + sv A                      (p == 0: one GEMM over the concatenated K = out + r)
 *     dx = dy W + dropout(sv A)             (p > 0: the same mask as forward's, on the low-rank term)
 *     da = sv^T dropout(x),   db = dy^T su  (float32 (r, in) and (out, r))
 * dy: x's dtype, any strides. Each of dx, da, db may be NULL (not wanted); W gets no gradient.
 * dx: (N, in) of x's dtype. ws: float32 contiguous of >= tl_lora_backward_ws(...) elements. */
static inline int64_t
tl_lora_backward_ws(int64_t N, int64_t in, int64_t out, int64_t r, float p, tl_dtype dtype, int want_dx,
                    int want_da)
{
    int64_t n = N * r;                                   /* sv (float32 room) */
    if (dtype != TL_FLOAT32 && out > TL_GEMM_KC) n += N * r; /* sv's partial sums */
    /* one N x in region, used in turn for dropout(sv A), dx's partial sums and dropout(x) */
    if ((p > 0.0f && (want_dx || want_da)) || (want_dx && dtype != TL_FLOAT32 && out + r > TL_GEMM_KC))
        n += N * in;
    return n;
}
tl_status tl_lora_backward_cpu(const tl_tensor *dy, const tl_tensor *x, const tl_tensor *w,
                               const tl_tensor *a, const tl_tensor *b, const tl_tensor *su, float scale,
                               float p, uint64_t seed, tl_tensor *dx, tl_tensor *da, tl_tensor *db,
                               tl_tensor *ws, int nthreads);

/* ---- the transfer-learning workflow (csrc/cpu/pool.c, csrc/cpu/adamw.c) ------------------------- */

/* Pooling a sequence of hidden states into one vector per sequence:
 *     TL_POOL_CLS: out[b] = h[b, 0];   TL_POOL_MEAN: the mean of h[b, t] over t with mask[b, t] != 0;
 *     TL_POOL_MAX: their elementwise maximum. A row whose mask is all zero gives zeros (mean, max).
 * h: (B, T, D) float32/bfloat16/float16, any strides; mask: NULL (every token counts) or (B, T) int64,
 * int32, uint8 (bool) or h's float dtype, any strides; out: (B, D), h's dtype or float32, any strides.
 * float32 accumulation. T == 0 with CLS: TL_ERR_SHAPE. */
enum { TL_POOL_CLS = 0, TL_POOL_MEAN = 1, TL_POOL_MAX = 2 };
tl_status tl_pool_cpu(const tl_tensor *h, const tl_tensor *mask, int mode, tl_tensor *out, int nthreads);

/* One AdamW step (torch.optim.AdamW's formula, maximize=False, amsgrad=False), in place, on n elements,
 * with an optional L2-SP term l2sp ||p - anchor||^2 in the loss (its gradient added to grad, coupled):
 *     g += 2 l2sp (p - anchor)   (only with an anchor and l2sp != 0)
 *     p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *     p -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
 * param: 1-D float32/bfloat16/float16, any stride; grad: 1-D of n, param's dtype or float32;
 * exp_avg, exp_avg_sq: 1-D of n float32 (any stride); anchor: NULL or 1-D of n in param's dtype (any
 * stride), read only. step >= 1, l2sp finite and >= 0. Math in float32; a bfloat16/float16 param is
 * rounded once per step. */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay, l2sp; /* as torch holds them; the kernels round once */
    int64_t step;
} tl_adamw_opts;
tl_status tl_adamw_cpu(tl_tensor *param, const tl_tensor *grad, tl_tensor *exp_avg, tl_tensor *exp_avg_sq,
                       const tl_tensor *anchor, const tl_adamw_opts *o, int nthreads);

/* ---- CUDA (tltorch._cuda) ---------------------------------------------------------------------- */

/* Opaque per-device state: the cuBLAS handle. Created lazily by tl_cuda_context_get. */
typedef struct tl_cuda_context tl_cuda_context;

tl_status tl_cuda_context_create(int device_id, tl_cuda_context **out);
void tl_cuda_context_destroy(tl_cuda_context *ctx);
/* Number of CUDA devices the driver reports (0 with no driver or no GPU), and a device's name. */
int tl_cuda_device_count(void);
tl_status tl_cuda_device_name(int device_id, char *buf, size_t len);
/* The last CUDA/cuBLAS error this thread saw, as text, for messages. */
const char *tl_cuda_last_error(void);

/* Same contract as tl_gemm_cpu, on `stream` (a cudaStream_t). a and b each need a unit stride in one
 * of their two dims, c a unit stride in dim 1; ws: NULL or a device scratch of ws_bytes for cuBLAS.
 * allow_tf32 lets float32 products use TF32 tensor cores. ws (float32 partials) is not needed. */
tl_status tl_gemm_cuda(tl_cuda_context *ctx, const tl_tensor *a, const tl_tensor *b,
                       const tl_tensor *bias, tl_tensor *c, float alpha, float beta,
                       void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32, void *stream);
tl_status tl_colsum_cuda(const tl_tensor *x, tl_tensor *out, float beta, void *stream);

/* tl_linear_xent_cpu's contract on `stream`, with tl_gemm_cuda's GEMMs (x and w need a unit stride in
 * one dim, dx and dw in dim 1; cublas_ws, cublas_ws_bytes, allow_tf32 as there; all tensors on ctx's
 * device). ws: float32, contiguous, of at least TL_XENT_CUDA_WS_EXTRA + C + D + 1 elements when N > 0:
 * the first TL_XENT_CUDA_WS_EXTRA hold the targets' check and the running loss, the rest the CPU's
 * layout for chunks of R = (ws.numel - TL_XENT_CUDA_WS_EXTRA) / (C + D + 1) rows (its R x D region is
 * unused here: cuBLAS carries dX's partial sums in float32 itself). cuBLAS multiplies only like dtypes,
 * so with bfloat16/float16 x the chunk's dZ is rounded to x's dtype, in place, for dX and dW (what
 * torch's own backward feeds its GEMMs); db sums the float32 dZ. The mean's 1/sum_w part of s_i is
 * applied as the GEMMs' alpha and to db at the end, so that float16 dZ is not flushed to zero by it.
 * ws is needed for every C (there is no single-pass path without a workspace here). dw may also be in
 * x's dtype where the plan below writes each of its rows once (not with chunks of fewer than N rows).
 * When N > 0 the targets are checked on the device and `stream` is synchronised once, before anything
 * is written (the host needs the verdict): the call cannot be captured in a CUDA graph. */
#define TL_XENT_CUDA_WS_EXTRA 64
/* How tl_linear_xent_cuda goes through a batch, from its sizes and ws's (ws_floats elements):
 *  - rows: chunks of `rows` rows, the CPU's layout above (rows == N: the whole batch at once, which a
 *    workspace of TL_XENT_CUDA_WS_EXTRA + N * (C + D + 1) floats allows);
 *  - blocks of classes (block > 0) when the whole batch does not fit but all N rows of `block` >= 64
 *    classes (or all C) do: each row's statistics (7 floats), dX's float32 accumulator (N x D; only
 *    when dx_acc: dx is bfloat16/float16) and N x block logits. Each row's log-sum-exp first, then
 *    the logits are recomputed block by block for the gradients (one more X W^T, in exchange for a
 *    workspace independent of C and dW written once per class, so in W's dtype if wanted).
 * With chunks of fewer than N rows dW must be float32 (the chunks add up into it). */
typedef struct {
    int64_t rows;           /* rows per chunk; 0 with blocks of classes */
    int64_t block;          /* classes per block; 0 with chunks of rows */
    int64_t acc_off, z_off; /* blocks: where dX's accumulator (-1: none) and the logits start in ws */
} tl_xent_cuda_plan;
tl_xent_cuda_plan tl_xent_cuda_plan_for(int64_t N, int64_t D, int64_t C, int dx_acc, int64_t ws_floats);
/* The workspace (floats) to give tl_linear_xent_cuda: the whole batch at once if that fits in
 * budget_floats, else blocks of classes (at most 4096, fewer if the budget says so), else chunks of rows
 * within the budget. *dw_narrow: whether dW may then be in W's dtype (else float32). */
int64_t tl_xent_cuda_workspace(int64_t N, int64_t D, int64_t C, int dx_acc, int64_t budget_floats, int *dw_narrow);
tl_status tl_linear_xent_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w,
                              const tl_tensor *bias, const tl_tensor *target, const tl_tensor *class_weight,
                              const tl_xent_opts *opts, const tl_tensor *grad_rows, tl_tensor *loss,
                              tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws, void *cublas_ws,
                              size_t cublas_ws_bytes, int allow_tf32, int64_t *bad_target, void *stream);

/* CUDA twins of the LoRA, pooling and AdamW kernels, on `stream`, with the CPU contracts above.
 * LoRA: x, w, a, b, dy each need a unit stride in one of their two dims (tl_gemm_cuda's rule), y, su,
 * dx, da, db a unit stride in dim 1; ws as on the CPU (device memory). The low-rank product is added
 * to y (and dx) by a second GEMM with beta = 1 on the same output. */
tl_status tl_dropout_cuda(const tl_tensor *x, tl_tensor *out, float p, uint64_t seed, void *stream);
tl_status tl_lora_forward_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w,
                               const tl_tensor *bias, const tl_tensor *a, const tl_tensor *b, float scale,
                               float p, uint64_t seed, tl_tensor *y, tl_tensor *su, tl_tensor *ws,
                               void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32, void *stream);
tl_status tl_lora_backward_cuda(tl_cuda_context *ctx, const tl_tensor *dy, const tl_tensor *x,
                                const tl_tensor *w, const tl_tensor *a, const tl_tensor *b,
                                const tl_tensor *su, float scale, float p, uint64_t seed, tl_tensor *dx,
                                tl_tensor *da, tl_tensor *db, tl_tensor *ws, void *cublas_ws,
                                size_t cublas_ws_bytes, int allow_tf32, void *stream);
tl_status tl_pool_cuda(const tl_tensor *h, const tl_tensor *mask, int mode, tl_tensor *out, void *stream);
tl_status tl_adamw_cuda(tl_tensor *param, const tl_tensor *grad, tl_tensor *exp_avg, tl_tensor *exp_avg_sq,
                        const tl_tensor *anchor, const tl_adamw_opts *o, void *stream);

/* ---- argument checks (csrc/check.c) ------------------------------------------------------------- */

/* Each op's tensors are checked by one function below, on either device: dims, dtypes, sizes, and, where
 * the caller says which tensors are read-only, that the outputs may be written (none read-only, no
 * element twice). It returns TL_OK or the status of the first unmet requirement, which it describes in
 * *why (NULL: not wanted) for the caller to word: the Python bindings build their messages from it
 * ("argument '<name>' ..."), the kernels return the status. Devices and workspaces are each device's
 * business. Optional tensors are NULL when absent. */
typedef enum {
    TL_NEED_NDIM = 1,    /* arg has `want` dims */
    TL_NEED_DTYPE,       /* arg's dtype is one of `what` ("float32, bfloat16 or float16") */
    TL_NEED_DTYPE_OF,    /* arg has ref's dtype */
    TL_NEED_DTYPE_OR,    /* arg's dtype is `what` or ref's */
    TL_NEED_DTYPE_IS,    /* arg's dtype is `want` (a tl_dtype) */
    TL_NEED_SIZE,        /* arg->shape[dim] == want, which is `what` ("x.shape[1]") */
    TL_NEED_WRITABLE,    /* arg is an output, and the caller may not write it (readonly) */
    TL_NEED_NO_BROADCAST, /* arg is an output with stride 0 in dim `dim` */
    TL_NEED_NO_OVERLAP,  /* arg is an output with a stride of `got` not stepping over the `want` elements
                          * the smaller strides span */
    TL_NEED_APART,       /* arg is an output sharing memory with ref */
    TL_NEED_TEXT,        /* `what` says it, after "argument '<arg>' " (arg NULL: all of it) */
} tl_need;

typedef struct tl_check {
    /* in: whether the caller may not write t (DLPack's read-only flag); NULL (and a NULL tl_check): outputs
     * are not checked for being writable (read-only, or overlapping themselves) */
    int (*readonly)(const tl_tensor *t);
    /* out: the first unmet requirement */
    tl_status status;
    tl_need need;
    const tl_tensor *arg, *ref;
    int dim;
    int64_t want, got;
    const char *what;
} tl_check;

/* Two of the requirements the op checks below are made of, for the callers' own checks (workspaces). */
tl_status tl_check_ndim(const tl_tensor *t, int ndim, tl_check *why);
tl_status tl_check_writable(const tl_tensor *t, tl_check *why);

/* tl_gemm_cpu's a, b, c, bias as the bindings take them: a and b of one float dtype. */
tl_status tl_check_gemm(const tl_tensor *a, const tl_tensor *b, const tl_tensor *c, const tl_tensor *bias,
                        tl_check *why);
/* tl_qgemm_cpu's: a float, b float or int8 with its scale along `axis` (0 or 1). */
tl_status tl_check_qgemm(const tl_tensor *a, const tl_tensor *b, const tl_tensor *scale, int axis,
                         const tl_tensor *c, const tl_tensor *bias, tl_check *why);
tl_status tl_check_colsum(const tl_tensor *x, const tl_tensor *out, tl_check *why);
/* The fused head's tensors and options; dw float32, or also x's dtype when dw_of_x (CUDA: its plan then
 * says whether it writes each row of dW once). */
tl_status tl_check_xent(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                        const tl_tensor *class_weight, const tl_xent_opts *o, const tl_tensor *grad_rows,
                        const tl_tensor *loss, const tl_tensor *dx, const tl_tensor *dw, const tl_tensor *db,
                        int dw_of_x, tl_check *why);
/* ---- the fused head's options beyond cross-entropy (csrc/cpu/head.c, csrc/cuda/head.cu) -------------
 * tl_linear_xent_cpu/cuda with the logits transformed before the softmax, a z-loss, and two more
 * per-row outputs:
 *     z_i = (softcap > 0 ? softcap tanh((x_i W^T + b) / softcap) : x_i W^T + b) / temperature
 *     loss_i += lse_square_scale lse_i^2          (dz_i gains s_i 2 lse_square_scale lse_i p_i)
 *     lse: NULL or (N,) float32, lse_i;  entropy: NULL or (N,) float32, lse_i - sum_c p_ic z_ic
 * (both of the transformed logits, 0 at ignored rows, in no gradient); dz is taken back through the
 * transform, dz (1 - tanh^2) / temperature, before dx, dW and db. On the CPU with softcap > 0 a row of
 * ws holds 2C + D + 1 floats (the tanh kept for the gradient), so rows go in chunks of
 * ws.numel / (2C + D + 1). Everything else is tl_linear_xent_cpu's/cuda's contract. */
typedef struct {
    tl_xent_opts xent;
    float softcap;          /* > 0, or 0: none */
    float temperature;      /* > 0 */
    float lse_square_scale; /* >= 0 */
} tl_head_opts;

tl_status tl_linear_head_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                             const tl_tensor *class_weight, const tl_head_opts *opts, const tl_tensor *grad_rows,
                             tl_tensor *loss, tl_tensor *lse, tl_tensor *entropy, tl_tensor *dx, tl_tensor *dw,
                             tl_tensor *db, tl_tensor *ws, int64_t *bad_target, int nthreads);
tl_status tl_linear_head_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                              const tl_tensor *target, const tl_tensor *class_weight, const tl_head_opts *opts,
                              const tl_tensor *grad_rows, tl_tensor *loss, tl_tensor *lse, tl_tensor *entropy,
                              tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws, void *cublas_ws,
                              size_t cublas_ws_bytes, int allow_tf32, int64_t *bad_target, void *stream);
/* tl_check_xent's checks, and the options' ranges and lse's and entropy's shape, dtype and writability. */
tl_status tl_check_head(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                        const tl_tensor *class_weight, const tl_head_opts *o, const tl_tensor *grad_rows,
                        const tl_tensor *loss, const tl_tensor *lse, const tl_tensor *entropy, const tl_tensor *dx,
                        const tl_tensor *dw, const tl_tensor *db, int dw_of_x, tl_check *why);
/* ---- end of the fused head's options ------------------------------------------------------------------ */

/* ---- knowledge distillation's rows (csrc/cpu/head_distill.c) ------------------------------------------
 * One chunk of a student's and a teacher's logits, s (n, Vs) and t (n, Vt), row by row: each row's loss,
 * and s overwritten with its gradient. With T = temperature, p_s = softmax(s / T) over Vs classes,
 * p_t = softmax(t / T) over Vt (aligned on the first min(Vs, Vt) classes; each side's extra classes have
 * probability 0 on the other side), y_i = target[i]:
 *     loss_i = (1 - alpha) T^2 D(p_t || p_s) + alpha (-log softmax(s_i)[y_i])   with targets (the hard
 *                                                                              term at temperature 1)
 *     loss_i = T^2 D(p_t || p_s)                                               without (target NULL)
 *     s_i <- dloss_i / ds_i
 * and, for a row whose target is ignore_index, loss_i = 0 and s_i <- 0. D by divergence:
 *     TL_DIV_KL          KL(p_t || p_s)                                 (needs Vs >= Vt)
 *     TL_DIV_REVERSE_KL  KL(p_s || p_t)                                 (needs Vt >= Vs)
 *     TL_DIV_JSD         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
 *                        (beta 0: KL, beta 1: REVERSE_KL, with their needs)
 * s, t: float32, each row's logits contiguous (unit stride in dim 1), sharing no memory; target: NULL or
 * (n,) int64/int32; loss: (n,) float32, any stride. Row sums in float64; rows run in parallel, each
 * row's arithmetic fixed, so results do not depend on the thread count. A target outside [0, Vs) that
 * is not ignore_index: TL_ERR_INDEX, *bad_target set to it, nothing written. */
enum { TL_DIV_KL = 0, TL_DIV_REVERSE_KL = 1, TL_DIV_JSD = 2 };
typedef struct {
    int64_t ignore_index;
    float temperature; /* finite, > 0 */
    float alpha;       /* in [0, 1]; unused without targets */
    int divergence;    /* TL_DIV_* */
    float beta;        /* in [0, 1]; TL_DIV_JSD's */
} tl_distill_opts;
tl_status tl_distill_rows_cpu(tl_tensor *s, const tl_tensor *t, const tl_tensor *target, const tl_distill_opts *opts,
                              tl_tensor *loss, int64_t *bad_target, int nthreads);
tl_status tl_check_distill_rows(const tl_tensor *s, const tl_tensor *t, const tl_tensor *target,
                                const tl_distill_opts *opts, const tl_tensor *loss, tl_check *why);
tl_status tl_check_dropout(const tl_tensor *x, const tl_tensor *out, tl_check *why);
tl_status tl_check_lora_forward(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *a,
                                const tl_tensor *b, const tl_tensor *y, const tl_tensor *su, tl_check *why);
tl_status tl_check_lora_backward(const tl_tensor *dy, const tl_tensor *x, const tl_tensor *w, const tl_tensor *a,
                                 const tl_tensor *b, const tl_tensor *su, const tl_tensor *dx, const tl_tensor *da,
                                 const tl_tensor *db, tl_check *why);
/* mode (TL_POOL_*): CLS needs a token; apart: out must also share no memory with h and mask. */
tl_status tl_check_pool(const tl_tensor *h, const tl_tensor *mask, int mode, const tl_tensor *out, int apart,
                        tl_check *why);
/* anchor: NULL or param's twin. apart: the three states must share no memory with each other, with grad
 * or with anchor. */
tl_status tl_check_adamw(const tl_tensor *param, const tl_tensor *grad, const tl_tensor *exp_avg,
                         const tl_tensor *exp_avg_sq, const tl_tensor *anchor, int apart, tl_check *why);

/* ---- the int8 linear layer (csrc/cpu/qlinear_int8.c) -------------------------------------------- */

/* Inference through a weight W (N x K, int8, float32 scales per output channel or per channel and group
 * of `group` inputs) with the activations quantised too, per row and group, to uint8 with a zero point:
 *     y[m, n] = sum_g a_s[m, g] w_s[g, n] (sum_{k in g} q[m, k] W[n, k] - zp[m, g] sum_{k in g} W[n, k])
 *               + bias[n]
 * (the file's header gives the quantisation and the order of operations, the same on every path and
 * thread count). group: a multiple of 4 in [4, TL_INT8_MAX_GROUP]; K > group makes several groups.
 * tl_int8_pack_cpu writes W in the kernel's layout into `packed` (1-D, uint8 or int8, contiguous, 4-byte
 * aligned, >= tl_int8_packed_bytes(N, K, group) bytes; it records N, K and group): w (N, K) int8, any
 * strides; w_scale (N,) or (N, ceil(K / group)) float32. tl_int8_linear_cpu: x (M, K) float32, bfloat16
 * or float16, any strides; bias NULL or (N,) of a float dtype; y (M, N) float32 or x's dtype, any strides;
 * ws 1-D uint8 or int8, contiguous, 4-byte aligned, >= tl_int8_linear_ws_bytes(M, K, group) bytes (the
 * quantised x). The sizes are -1 for a bad group or a negative size. tl_int8_packed_info reads N, K and
 * group back (TL_ERR_VALUE: not a packed weight). tl_int8_isa: "amx", "avx512vnni" or "portable" (AMX: with
 * groups of a multiple of 64 and K >= 768 only, VNNI otherwise; TLTORCH_CPU_ISA=avx512 turns it off). */
#define TL_INT8_NR 32
#define TL_INT8_MAX_GROUP 512
static inline int
tl_int8_group_ok(int64_t group)
{
    return group >= 4 && group <= TL_INT8_MAX_GROUP && group % 4 == 0;
}
int64_t tl_int8_packed_bytes(int64_t N, int64_t K, int64_t group);
int64_t tl_int8_linear_ws_bytes(int64_t M, int64_t K, int64_t group);
tl_status tl_int8_packed_info(const tl_tensor *packed, int64_t *N, int64_t *K, int64_t *group);
const char *tl_int8_isa(void);
tl_status tl_int8_pack_cpu(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *packed);
tl_status tl_int8_linear_cpu(const tl_tensor *x, const tl_tensor *packed, const tl_tensor *bias, tl_tensor *y,
                             tl_tensor *ws, int nthreads);
/* Their tensors as the bindings take them (N, K: the packed weight's): x (M, K) float, bias (N,) float32
 * or x's dtype, y (M, N) of x's dtype or float32; w (N, K) int8, w_scale (N,) or (N, groups) float32. */
tl_status tl_check_int8_linear(const tl_tensor *x, const tl_tensor *bias, const tl_tensor *y, int64_t N, int64_t K,
                               tl_check *why);
tl_status tl_check_int8_pack(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_check *why);

/* The int8 weight as a dense float tensor: out[n, k] = w[n, k] * w_scale[n] (w_scale (N,)) or
 * w_scale[n, k / group] (w_scale (N, ceil(K / group)); group >= 1), the product rounded to float32, then to
 * out's dtype (float32, bfloat16 or float16; (N, K), any strides, sharing no memory with w or w_scale).
 * w: int8, any strides. The CUDA twin runs on `stream`. */
tl_status tl_int8_dequant_cpu(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *out,
                              int nthreads);
tl_status tl_int8_dequant_cuda(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *out,
                               void *stream);
tl_status tl_check_int8_dequant(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, const tl_tensor *out,
                                tl_check *why);

#ifdef __cplusplus
}
#endif
#endif /* TL_H */
