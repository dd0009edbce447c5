/* head.cu: fused linear + softmax + cross-entropy on CUDA, the twin of cpu/head.c (the math is in tl.h):
 *
 *   once:                       check every target, sum_w = sum_i w_t, sum_c w_c     (one block, one sync)
 *   for each chunk of R rows:   Z = X[chunk] W^T + b                     (cuBLAS, R x C float32 in ws)
 *                               per row (one block): lse by an online max + sum of exp, the row's loss,
 *                               and dz written over z in place (when gradients are wanted)
 *                               db += colsum(dZ);  dZ rounded to x's dtype in place (bf16/f16 x only)
 *                               dX[chunk] = a dZ W;   dW = a dZ^T X[chunk] + (first chunk ? 0 : dW)
 *   at the end:                 db *= a;  the mean or sum of the row losses
 * or, when the whole batch's logits do not fit in ws but all rows of a block of classes do (tl.h's plan),
 * by blocks of classes: each row's log-sum-exp over all blocks first, then each block's logits again
 * for its dz, dW rows (written once), db entries and term of dX (xent_by_classes).
 * where a is the mean's 1/sum_w (1 for sum and none) and dZ carries grad_rows[i] (tl.h's s_i = both).
 * tl_linear_head_cuda's options (tl.h) ride along: each logit is softcapped and divided by the temperature
 * as it is read (head_z), the z-loss joins each row's loss and dz, dz is taken back through the transform
 * as it is written (head_dz), and the rows' lse and entropy go to their outputs; by blocks of classes the
 * entropy's sum sum_c exp(z_c - m) (z_c - m) is carried along with (m, sum of exp), in the entropy output.
 *
 * Memory: ws holds a small header (TL_XENT_CUDA_WS_EXTRA floats: the targets' verdict, sum_w, sum_c w_c,
 * the running loss in double), then the CPU layout: R x C logits, R x D (unused here) and R row losses.
 * The row kernel reads each z twice (lse, then loss and gradient) and writes dz once; the rounding
 * kernel reads dz once more and writes half as many bytes.
 * Results are deterministic: every reduction runs in a fixed order (no atomics), losses are summed in
 * double, and the GEMMs are cuBLAS's (deterministic for a fixed workspace and shapes). */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_common.h"

#define FULL_MASK 0xffffffffu
#define ROW_THREADS 256     /* at most, per row block; fewer (a multiple of 32) when C is small */
#define PREP_THREADS 1024   /* the one block of the targets' check */
#define SUM_THREADS 256     /* the one block that adds up a chunk's row losses */
#define NARROW_THREADS 256  /* per row block of the in-place rounding */
#define SCALE_THREADS 256

/* The header at the front of ws (16-byte aligned inside its TL_XENT_CUDA_WS_EXTRA floats). */
typedef struct {
    double wsum;        /* sum over non-ignored rows of w_t (1 without class weights) */
    double wall;        /* sum over classes of w_c */
    double total;       /* sum of the row losses of the chunks done so far */
    long long bad_row;  /* first row whose target is out of range and not ignore_index, or -1 */
    long long bad_value;
} xent_header;

static_assert(sizeof(xent_header) + 15 <= TL_XENT_CUDA_WS_EXTRA * sizeof(float),
              "the header must fit the documented extra workspace");

/* ---- device helpers ---------------------------------------------------------------------------- */

/* Element i (in elements) of a float32/bfloat16/float16 buffer, as float32; the dtype is a run-time
 * value that is the same for every thread, so the switch does not diverge. */
static __device__ __forceinline__ float
load_any(const void *p, int64_t i, tl_dtype dt)
{
    switch (dt) {
    case TL_BFLOAT16: return load_f32((const __nv_bfloat16 *)p + i);
    case TL_FLOAT16: return load_f32((const __half *)p + i);
    default: return load_f32((const float *)p + i);
    }
}

static __device__ __forceinline__ void
store_any(void *p, int64_t i, tl_dtype dt, float v)
{
    switch (dt) {
    case TL_BFLOAT16: store_f32((__nv_bfloat16 *)p + i, v); break;
    case TL_FLOAT16: store_f32((__half *)p + i, v); break;
    default: store_f32((float *)p + i, v); break;
    }
}

static __device__ __forceinline__ int64_t
load_index(const void *p, int64_t i, int is64)
{
    return is64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}

/* (m, s) <- the pair for the union of two sets, where s = sum exp(z - m) over a set and m its max.
 * An empty set is (-inf, 0); two empty sets stay empty (no exp(-inf - -inf) = NaN). */
static __device__ __forceinline__ void
lse_merge(float &m, float &s, float m2, float s2)
{
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

/* v into a thread's running (max, sum of exp) pair; -inf adds nothing (and -inf - -inf would be NaN). */
static __device__ __forceinline__ void
lse_add(float &m, float &s, float v)
{
    if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
    } else if (v != -INFINITY) {
        s += expf(v - m);
    }
}

/* The entropy's running sums: (m, s, q) with s = sum exp(z - m) and q = sum exp(z - m) (z - m) over a
 * set; moving to a larger max mx rescales both, q <- exp(m - mx) (q + (m - mx) s). An empty set is
 * (-inf, 0, 0) and adds nothing. */
static __device__ __forceinline__ void
lseq_merge(float &m, float &s, float &q, float m2, float s2, float q2)
{
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        q = q2;
        return;
    }
    const float mx = fmaxf(m, m2), r1 = expf(m - mx), r2 = expf(m2 - mx);
    q = r1 * (q + (m - mx) * s) + r2 * (q2 + (m2 - mx) * s2);
    s = s * r1 + s2 * r2;
    m = mx;
}

/* The threads' pairs (with Q, triples: q in part_q) merged over the block (part_m, part_s, part_q: a
 * float per warp of shared memory). Every thread merges the warps' values in the same order: the same
 * (m, s, q) everywhere, no broadcast. */
template <bool Q>
static __device__ __forceinline__ void
block_lse_q(float &m, float &s, float &q, float *part_m, float *part_s, float *part_q)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, off), s2 = __shfl_xor_sync(FULL_MASK, s, off);
        if (Q)
            lseq_merge(m, s, q, m2, s2, __shfl_xor_sync(FULL_MASK, q, off));
        else
            lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_s[warp] = s;
        if (Q) part_q[warp] = q;
    }
    __syncthreads();
    m = -INFINITY;
    s = q = 0.0f;
    for (int k = 0; k < nwarps; k++) {
        if (Q)
            lseq_merge(m, s, q, part_m[k], part_s[k], part_q[k]);
        else
            lse_merge(m, s, part_m[k], part_s[k]);
    }
}

static __device__ __forceinline__ void
block_lse(float &m, float &s, float *part_m, float *part_s)
{
    float q = 0.0f;
    block_lse_q<false>(m, s, q, part_m, part_s, NULL);
}

/* Butterfly sums over a warp: every lane ends with the same value, added in the same order. */
static __device__ __forceinline__ double
warp_sum(double v)
{
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

/* The sum of v over the block, in thread 0 (other threads: garbage). part: nwarps doubles of shared
 * memory, not in use by another reduction until the caller's next __syncthreads. */
static __device__ __forceinline__ double
block_sum(double v, double *part)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x == 0)
        for (int k = 0; k < nwarps; k++) t += part[k];
    return t;
}

/* ---- kernels ----------------------------------------------------------------------------------- */

/* One block over all targets: the first bad row (the smallest index, as the CPU's loop finds it),
 * sum_w over the valid rows and sum_c w_c, in double, in a fixed order. Also clears the running loss. */
static __global__ void __launch_bounds__(PREP_THREADS)
prepass_kernel(const void *target, int64_t st, int t64, int64_t N, int64_t C, int64_t ignore_index,
               const void *cw, int64_t scw, tl_dtype cwdt, xent_header *h)
{
    __shared__ double part_w[PREP_THREADS / 32], part_a[PREP_THREADS / 32];
    __shared__ long long part_b[PREP_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double wsum = 0.0, wall = 0.0;
    long long bad = LLONG_MAX;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        const int64_t t = load_index(target, i * st, t64);
        if (t == ignore_index) continue;
        if (t < 0 || t >= C) {
            bad = i; /* this thread's rows only grow: its first bad one is its smallest */
            break;
        }
        wsum += cw ? (double)load_any(cw, t * scw, cwdt) : 1.0;
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) wall += cw ? (double)load_any(cw, c * scw, cwdt) : 1.0;
    wsum = warp_sum(wsum);
    wall = warp_sum(wall);
    for (int off = 16; off > 0; off >>= 1) {
        const long long o = __shfl_xor_sync(FULL_MASK, bad, off);
        bad = o < bad ? o : bad;
    }
    if (lane == 0) {
        part_w[warp] = wsum;
        part_a[warp] = wall;
        part_b[warp] = bad;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        wsum = wall = 0.0;
        bad = LLONG_MAX;
        for (int k = 0; k < nwarps; k++) {
            wsum += part_w[k];
            wall += part_a[k];
            bad = part_b[k] < bad ? part_b[k] : bad;
        }
        h->wsum = wsum;
        h->wall = wall;
        h->total = 0.0;
        h->bad_row = bad == LLONG_MAX ? -1 : bad;
        h->bad_value = bad == LLONG_MAX ? 0 : (long long)load_index(target, bad * st, t64);
    }
}

typedef struct {
    float *z;             /* the chunk's rows x C logits (row stride C); dz on the way out */
    int64_t C, i0;        /* classes; the chunk's first row */
    const void *target;
    int64_t st;
    int t64;
    int64_t ignore_index;
    const void *cw; /* NULL: every class weight is 1 */
    int64_t scw;
    tl_dtype cwdt;
    const void *grow; /* the upstream gradient per row, or NULL (1); the mean's 1/sum_w is not here */
    int64_t sgr;
    tl_dtype grdt;
    float *lrow;      /* the chunk's row losses */
    void *loss_none;  /* reduction none: the (N,) loss tensor, else NULL */
    int64_t sloss;
    tl_dtype ldt;
    float keep, epsc, wall; /* 1 - eps, eps / C, sum_c w_c */
    int smooth, grads;      /* eps > 0; write dz */
    /* By class blocks only: each row's running (max, sum of exp) over the classes seen so far (other
     * than its target), z_t, and sum_c w_c z_c; after the last block the finalize kernel replaces
     * m, s, zt by what the gradient kernel reads (m, sa, gt) and fills se. */
    double *st_zs;
    float *st_m, *st_s, *st_zt, *st_se;
    double walld; /* sum_c w_c, unrounded */
    const void *bias; /* by class blocks: added here (the GEMM writes X W^T alone); NULL: none */
    int64_t sbias;
    tl_dtype bdt;
    /* tl_linear_head_cuda's: the transform z <- (softcap > 0 ? softcap tanh(z / softcap) : z) * inv_t,
     * the z-loss's scale, and the lse and entropy outputs (NULL: not wanted; by class blocks the entropy
     * output holds each row's running q until the finalize kernel) */
    float softcap, inv_t, zs;
    float *lse_out, *ent_out;
    int64_t slse, sent;
} row_args;

/* A raw logit v (X W^T + b) as the softmax sees it. */
static __device__ __forceinline__ float
head_z(const row_args &a, float v)
{
    return a.softcap > 0.0f ? a.softcap * tanhf(v / a.softcap) * a.inv_t : v * a.inv_t;
}

/* g = dloss/dz' taken back to the raw logit v: g (1 - tanh^2(v / softcap)) / T. */
static __device__ __forceinline__ float
head_dz(const row_args &a, float v, float g)
{
    if (a.softcap > 0.0f) {
        const float u = tanhf(v / a.softcap);
        return g * a.inv_t * (1.0f - u * u);
    }
    return g * a.inv_t;
}

/* A row's lse and entropy into their outputs (where wanted). */
static __device__ __forceinline__ void
store_stats(const row_args &a, int64_t row, float lse, float ent)
{
    if (a.lse_out) a.lse_out[row * a.slse] = lse;
    if (a.ent_out) a.ent_out[row * a.sent] = ent;
}

/* One block per row r of the chunk:
 *   pass 1: lse = m + log sum exp(z - m), each thread's online (m, s) merged across the block;
 *   pass 2: the smoothing term sum_c w_c (lse - z_c) (every term >= 0) and, when grads, dz in place:
 *           dz_c = g [ p_c (keep w_t + epsc sum w) - keep w_t [c == t] - epsc w_c ]  (in head.c's order),
 *           g = grad_rows[row] or 1: s_i without the mean's 1/sum_w, which the caller applies later.
 * Ignored rows: loss 0, dz 0. Every thread of a block sees the same target, so the early return and
 * the branches around __syncthreads are uniform. */
static __global__ void __launch_bounds__(ROW_THREADS)
xent_row_kernel(row_args a)
{
    __shared__ float part_m[ROW_THREADS / 32], part_s[ROW_THREADS / 32];
    __shared__ double part_d[ROW_THREADS / 32], part_e[ROW_THREADS / 32];
    const int64_t r = blockIdx.x, C = a.C, row = a.i0 + r;
    float *z = a.z + r * C;
    const int64_t t = load_index(a.target, row * a.st, a.t64);
    /* Out-of-range targets were refused before this ran; the bounds only keep a stray value from
     * reading outside the row. */
    if (t == a.ignore_index || t < 0 || t >= C) {
        if (a.grads)
            for (int64_t c = threadIdx.x; c < C; c += blockDim.x) z[c] = 0.0f;
        if (threadIdx.x == 0) {
            a.lrow[r] = 0.0f;
            if (a.loss_none) store_any(a.loss_none, row * a.sloss, a.ldt, 0.0f);
            store_stats(a, row, 0.0f, 0.0f);
        }
        return;
    }
    /* Every thread reads z_t before pass 2 (after a barrier) overwrites the row. As in the CPU twin
     * (head_rows.c, row_loss_grad), the other classes are summed on their own, S' = sum_{c != t} exp(z_c - m),
     * so that -log p_t = log1p(S'/e_t) and p_t - 1 = -S'/(S' + e_t) stay accurate for confident rows. */
    const float zt = head_z(a, z[t]);

    float mx = -INFINITY, s = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) lse_add(mx, s, c == t ? -INFINITY : head_z(a, z[c]));
    block_lse(mx, s, part_m, part_s);
    const float m = fmaxf(mx, zt);
    const double sum_ex = mx == -INFINITY ? 0.0 : (double)s * exp((double)mx - m);
    const double et = exp((double)zt - m), sum = sum_ex + et, logsum = log(sum), lse = (double)m + logsum;
    const float lsum = (float)logsum;

    const float wt = a.cw ? load_any(a.cw, t * a.scw, a.cwdt) : 1.0f;
    float smooth = 0.0f, ent = 0.0f;
    if (a.grads || a.smooth || a.ent_out) {
        const float si = a.grow ? load_any(a.grow, row * a.sgr, a.grdt) : 1.0f;
        /* the z-loss adds 2 zs lse to a (tl.h) */
        const double wz = (double)a.epsc * a.wall + 2.0 * a.zs * lse;
        const float sa = (float)(si * ((double)a.keep * wt + wz) / sum), se = si * a.epsc;
        /* s (a p_t - keep w_t), rearranged to avoid p_t - 1 */
        const float gt = (float)(si * (wz * et - (double)a.keep * wt * sum_ex) / sum);
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
            const float raw = z[c], v = head_z(a, raw);
            const float wc = a.cw ? load_any(a.cw, c * a.scw, a.cwdt) : 1.0f;
            if (a.smooth) smooth += wc * ((m - v) + lsum);
            if (a.ent_out) ent += expf(v - m) * (v - m);
            if (a.grads) {
                float g = c == t ? gt : sa * expf(v - m);
                if (a.smooth) g -= se * wc;
                z[c] = head_dz(a, raw, g);
            }
        }
    }
    double smooth_sum = 0.0, ent_sum = 0.0;
    if (a.smooth) smooth_sum = block_sum((double)smooth, part_d);
    if (a.ent_out) ent_sum = block_sum((double)ent, part_e);
    if (threadIdx.x == 0) {
        const double nll = et > 1e-300 ? log1p(sum_ex / et) : ((double)m - zt) + logsum;
        double li = (double)a.keep * wt * nll + (double)a.zs * lse * lse;
        if (a.smooth) li += (double)a.epsc * smooth_sum;
        a.lrow[r] = (float)li;
        if (a.loss_none) store_any(a.loss_none, row * a.sloss, a.ldt, (float)li);
        /* H = lse - sum_c p_c z_c = log S - sum_c e_c (z_c - m) / S */
        store_stats(a, row, (float)lse, (float)(logsum - ent_sum / sum));
    }
}

/* ---- the same by blocks of classes (a vocabulary too large for whole rows of logits) -----------------
 * All N rows at once, Cb classes at a time, in two passes over the classes: the first computes each
 * row's log-sum-exp (xent_stats_kernel on every block, then xent_finalize_kernel), the second
 * recomputes each block's logits and turns them into dz (xent_grad_kernel) for the block's dX and dW
 * GEMMs. dW's rows of a block are written once, by one GEMM over all rows: no float32 accumulator
 * across chunks, so dW can be written in W's dtype directly. The row's quantities are head.c's. */

/* One block per row: merge the block of classes z[0, cb) (classes c0 + c) into the row's running
 * (max, sum of exp) over the non-target classes, record z_t when the target is in the block, and add
 * sum_c w_c z_c (label smoothing). first: the block at c0 = 0 (the running values start empty). */
static __global__ void __launch_bounds__(ROW_THREADS)
xent_stats_kernel(row_args a, int64_t c0, int64_t cb, int first)
{
    __shared__ float part_m[ROW_THREADS / 32], part_s[ROW_THREADS / 32], part_q[ROW_THREADS / 32];
    __shared__ double part_d[ROW_THREADS / 32];
    const int64_t r = blockIdx.x;
    const float *z = a.z + r * cb;
    const int64_t t = load_index(a.target, r * a.st, a.t64);
    if (t == a.ignore_index || t < 0 || t >= a.C) return; /* uniform over the block */
    float m = -INFINITY, s = 0.0f, q = 0.0f;
    double zs = 0.0;
    for (int64_t c = threadIdx.x; c < cb; c += blockDim.x) {
        const float zc = head_z(a, a.bias ? z[c] + load_any(a.bias, (c0 + c) * a.sbias, a.bdt) : z[c]);
        if (a.ent_out)
            lseq_merge(m, s, q, c0 + c == t ? -INFINITY : zc, 1.0f, 0.0f);
        else
            lse_add(m, s, c0 + c == t ? -INFINITY : zc);
        if (a.smooth) zs += (double)(a.cw ? load_any(a.cw, (c0 + c) * a.scw, a.cwdt) : 1.0f) * zc;
    }
    if (a.ent_out)
        block_lse_q<true>(m, s, q, part_m, part_s, part_q);
    else
        block_lse(m, s, part_m, part_s);
    if (a.smooth) zs = block_sum(zs, part_d);
    if (threadIdx.x == 0) {
        float rm = first ? -INFINITY : a.st_m[r], rs = first ? 0.0f : a.st_s[r];
        if (a.ent_out) {
            float rq = first ? 0.0f : a.ent_out[r * a.sent];
            lseq_merge(rm, rs, rq, m, s, q);
            a.ent_out[r * a.sent] = rq;
        } else {
            lse_merge(rm, rs, m, s);
        }
        a.st_m[r] = rm;
        a.st_s[r] = rs;
        if (t >= c0 && t < c0 + cb)
            a.st_zt[r] = head_z(a, a.bias ? z[t - c0] + load_any(a.bias, t * a.sbias, a.bdt) : z[t - c0]);
        if (a.smooth) a.st_zs[r] = (first ? 0.0 : a.st_zs[r]) + zs;
    }
}

/* One thread per row, after the last block of the first pass: the row's loss (xent_row_kernel's
 * formulas; the smoothing term as sum_c w_c (m + lse') - sum_c w_c z_c in double) and the values of its
 * gradient: st_m <- m, st_s <- sa, st_zt <- gt, st_se <- se. */
static __global__ void
xent_finalize_kernel(row_args a, int64_t N)
{
    for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < N; r += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = load_index(a.target, r * a.st, a.t64);
        if (t == a.ignore_index || t < 0 || t >= a.C) {
            a.lrow[r] = 0.0f;
            if (a.loss_none) store_any(a.loss_none, r * a.sloss, a.ldt, 0.0f);
            store_stats(a, r, 0.0f, 0.0f);
            continue;
        }
        const float mx = a.st_m[r], sx = a.st_s[r], zt = a.st_zt[r], m = fmaxf(mx, zt);
        const double sum_ex = mx == -INFINITY ? 0.0 : (double)sx * exp((double)mx - m);
        const double et = exp((double)zt - m), sum = sum_ex + et, logsum = log(sum), lse = (double)m + logsum;
        const float wt = a.cw ? load_any(a.cw, t * a.scw, a.cwdt) : 1.0f;
        const float si = a.grow ? load_any(a.grow, r * a.sgr, a.grdt) : 1.0f;
        const double wz = (double)a.epsc * a.wall + 2.0 * a.zs * lse; /* the z-loss adds 2 zs lse to a */
        a.st_m[r] = m;
        a.st_s[r] = (float)(si * ((double)a.keep * wt + wz) / sum);
        a.st_zt[r] = (float)(si * (wz * et - (double)a.keep * wt * sum_ex) / sum);
        a.st_se[r] = si * a.epsc;
        const double nll = et > 1e-300 ? log1p(sum_ex / et) : ((double)m - zt) + logsum;
        double li = (double)a.keep * wt * nll + (double)a.zs * lse * lse;
        if (a.smooth) li += (double)a.epsc * (a.walld * ((double)m + logsum) - a.st_zs[r]);
        a.lrow[r] = (float)li;
        if (a.loss_none) store_any(a.loss_none, r * a.sloss, a.ldt, (float)li);
        if (a.ent_out) { /* q over the other classes (relative to mx) and the target's term, relative to m */
            const double q = mx == -INFINITY ? 0.0
                                             : exp((double)mx - m) * ((double)a.ent_out[r * a.sent] +
                                                                      ((double)mx - m) * sx);
            store_stats(a, r, (float)lse, (float)(logsum - (q + et * ((double)zt - m)) / sum));
        } else {
            store_stats(a, r, (float)lse, 0.0f);
        }
    }
}

/* One block per row: the block's logits z[0, cb) (classes c0 + c) become dz, in place, as
 * xent_row_kernel writes them; ignored rows get zeros. T = float: float32 dz (row stride cb); else dz
 * rounded to T in the first half of the row's bytes (row stride 2 cb in T), as narrow_rows_kernel
 * does: each tile of blockDim.x elements is read before any of it is written. */
template <typename T>
static __global__ void __launch_bounds__(ROW_THREADS)
xent_grad_kernel(row_args a, int64_t c0, int64_t cb)
{
    const int64_t r = blockIdx.x;
    float *z = a.z + r * cb;
    T *out = reinterpret_cast<T *>(z);
    const int64_t t = load_index(a.target, r * a.st, a.t64);
    const int ignored = t == a.ignore_index || t < 0 || t >= a.C; /* uniform over the block */
    const float m = ignored ? 0.0f : a.st_m[r], sa = ignored ? 0.0f : a.st_s[r];
    const float gt = ignored ? 0.0f : a.st_zt[r], se = ignored ? 0.0f : a.st_se[r];
    for (int64_t base = 0; base < cb; base += blockDim.x) {
        const int64_t c = base + threadIdx.x;
        float g = 0.0f;
        if (c < cb && !ignored) {
            const float v = a.bias ? z[c] + load_any(a.bias, (c0 + c) * a.sbias, a.bdt) : z[c];
            g = c0 + c == t ? gt : sa * expf(head_z(a, v) - m);
            if (a.smooth) g -= se * (a.cw ? load_any(a.cw, (c0 + c) * a.scw, a.cwdt) : 1.0f);
            g = head_dz(a, v, g);
        }
        if (sizeof(T) < sizeof(float)) __syncthreads();
        if (c < cb) store_f32(out + c, g);
    }
}

/* dst = src over an N x D matrix: float32 (row stride D) to a strided matrix of dst's dtype. */
static __global__ void __launch_bounds__(SCALE_THREADS)
store_rows_kernel(const float *src, int64_t rows, int64_t cols, void *dst, int64_t s0, int64_t s1, tl_dtype dt)
{
    const int64_t n = rows * cols;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x)
        store_any(dst, (k / cols) * s0 + (k % cols) * s1, dt, src[k]);
}

/* dz rounded to T in place, one block per row: row r's T values go to the first half of its own bytes
 * (row stride 2C in T). Each tile of blockDim.x elements is read, then (after a barrier) written: a
 * write of element c lands on float c/2 < the tile's end, which every thread has read by then, and
 * never on a float of a later tile. */
template <typename T>
static __global__ void __launch_bounds__(NARROW_THREADS)
narrow_rows_kernel(float *z, int64_t C)
{
    float *row = z + (int64_t)blockIdx.x * C;
    T *out = reinterpret_cast<T *>(row);
    for (int64_t base = 0; base < C; base += blockDim.x) {
        const int64_t c = base + threadIdx.x;
        const float v = c < C ? row[c] : 0.0f;
        __syncthreads();
        if (c < C) store_f32(out + c, v);
    }
}

/* narrow_rows_kernel for x's dtype (bfloat16 or float16) over `rows` rows of C floats, on `s`. */
static tl_status
narrow_rows(float *z, int64_t rows, int64_t C, tl_dtype xdt, cudaStream_t s)
{
    if (xdt == TL_BFLOAT16)
        narrow_rows_kernel<__nv_bfloat16><<<(unsigned)rows, NARROW_THREADS, 0, s>>>(z, C);
    else
        narrow_rows_kernel<__half><<<(unsigned)rows, NARROW_THREADS, 0, s>>>(z, C);
    return tl_cuda_check(cudaGetLastError(), "linear_xent rounding kernel launch");
}

/* h->total += the chunk's row losses, in double, in a fixed order (one block). */
static __global__ void __launch_bounds__(SUM_THREADS)
add_losses_kernel(const float *lrow, int64_t rows, xent_header *h)
{
    __shared__ double part[SUM_THREADS / 32];
    double acc = 0.0;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += lrow[r];
    acc = block_sum(acc, part);
    if (threadIdx.x == 0) h->total += acc;
}

/* The mean or sum; h == NULL (no rows) reads as a total of 0. Mean of no weight: 0/0 = NaN, as torch. */
static __global__ void
final_loss_kernel(const xent_header *h, double wsum, int mean, void *loss, tl_dtype ldt)
{
    double v = h ? h->total : 0.0;
    if (mean) v = v / wsum;
    store_any(loss, 0, ldt, (float)v);
}

/* p[i, j] = scale * p[i, j] over a strided float32 matrix; scale 0 writes zeros without reading. */
static __global__ void __launch_bounds__(SCALE_THREADS)
scale_kernel(float *p, int64_t s0, int64_t s1, int64_t rows, int64_t cols, float scale)
{
    const int64_t n = rows * cols;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        float *q = p + (k / cols) * s0 + (k % cols) * s1;
        *q = scale == 0.0f ? 0.0f : scale * *q;
    }
}

/* ---- host side --------------------------------------------------------------------------------- */

/* dZ as the backward GEMMs read it: float32 with row stride C, or rounded to x's dtype in place with
 * row stride 2C (in elements of that dtype). */
static tl_tensor
dz_view(float *z, tl_dtype xdt, int dev, int64_t rows, int64_t C, int transposed)
{
    const int64_t ld = xdt == TL_FLOAT32 ? C : 2 * C;
    return transposed ? tl_view2d(z, xdt, TL_CUDA, dev, C, rows, 1, ld) : tl_view2d(z, xdt, TL_CUDA, dev, rows, C, ld, 1);
}

/* ---- the plan: rows or blocks of classes ------------------------------------------------------------ */

#define XENT_BLOCK_MIN 64    /* fewest classes in a block (and their multiple when there are several) */
#define XENT_BLOCK_MAX 4096  /* most classes in a block that tl_xent_cuda_workspace asks room for */

static int64_t
round64(int64_t v)
{
    return (v + 63) / 64 * 64;
}

/* Class blocks' layout after the header: sum_c w_c z_c (N doubles), then m, s, zt, se and the row
 * losses (N floats each), dX's float32 accumulator (N x D) when dx_acc, then the block's logits. */
static int64_t
class_acc_off(int64_t N)
{
    return round64(TL_XENT_CUDA_WS_EXTRA + 7 * N);
}

static int64_t
class_z_off(int64_t N, int64_t D, int dx_acc)
{
    return class_acc_off(N) + (dx_acc ? round64(N * D) : 0);
}

tl_xent_cuda_plan
tl_xent_cuda_plan_for(int64_t N, int64_t D, int64_t C, int dx_acc, int64_t ws_floats)
{
    tl_xent_cuda_plan p = {1, 0, -1, 0};
    const int64_t per_row = C + D + 1;
    if (N == 0) return p;
    if (N <= INT_MAX && ws_floats >= TL_XENT_CUDA_WS_EXTRA + N * per_row) {
        p.rows = N;
        return p;
    }
    const int64_t z_off = class_z_off(N, D, dx_acc), bmin = C < XENT_BLOCK_MIN ? C : XENT_BLOCK_MIN;
    if (N <= INT_MAX && ws_floats >= z_off + N * bmin) {
        int64_t cb = (ws_floats - z_off) / N;
        cb = cb >= C ? C : cb / XENT_BLOCK_MIN * XENT_BLOCK_MIN;
        p.rows = 0;
        p.block = cb;
        p.acc_off = dx_acc ? class_acc_off(N) : -1;
        p.z_off = z_off;
        return p;
    }
    int64_t R = (ws_floats - TL_XENT_CUDA_WS_EXTRA) / per_row;
    if (R > N) R = N;
    if (R > INT_MAX) R = INT_MAX; /* a grid's x dimension */
    p.rows = R < 1 ? 1 : R;
    return p;
}

/* Whether the plan writes each row of dW once (so dW may be in W's dtype): not with chunks of fewer
 * than N rows, which add up into it. */
static int
writes_dw_once(const tl_xent_cuda_plan *p, int64_t N)
{
    return p->block > 0 || p->rows >= N;
}

int64_t
tl_xent_cuda_workspace(int64_t N, int64_t D, int64_t C, int dx_acc, int64_t budget_floats, int *dw_narrow)
{
    const int64_t per_row = C + D + 1, z_off = class_z_off(N, D, dx_acc);
    const int64_t bmin = C < XENT_BLOCK_MIN ? C : XENT_BLOCK_MIN;
    int64_t ws = TL_XENT_CUDA_WS_EXTRA + N * per_row; /* the whole batch */
    if (N > 0 && !(ws <= budget_floats && N <= INT_MAX)) {
        if (N <= INT_MAX && z_off + N * bmin <= budget_floats) { /* blocks of classes */
            int64_t cb = (budget_floats - z_off) / N;
            if (cb > XENT_BLOCK_MAX) cb = XENT_BLOCK_MAX;
            ws = z_off + N * (cb >= C ? C : cb / XENT_BLOCK_MIN * XENT_BLOCK_MIN);
        } else { /* chunks of rows */
            int64_t R = (budget_floats - TL_XENT_CUDA_WS_EXTRA) / per_row;
            R = R < 1 ? 1 : R > N ? N : R;
            ws = TL_XENT_CUDA_WS_EXTRA + (R > INT_MAX ? INT_MAX : R) * per_row;
        }
    }
    const tl_xent_cuda_plan p = tl_xent_cuda_plan_for(N, D, C, dx_acc, ws);
    *dw_narrow = writes_dw_once(&p, N);
    return ws;
}

/* tl_check_head's requirements (csrc/check.c), on ctx's device, and the workspace's and GEMMs'. */
static tl_status
check_head(const tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
           const tl_tensor *target, const tl_tensor *cw, const tl_head_opts *ho, const tl_tensor *grad_rows,
           const tl_tensor *loss, const tl_tensor *lse, const tl_tensor *ent, const tl_tensor *dx, const tl_tensor *dw,
           const tl_tensor *db, const tl_tensor *ws, const void *cublas_ws)
{
    tl_status st;
    if (!ctx || !x || !w || !target || !ho || !ws) return TL_ERR_VALUE;
    const tl_xent_opts *o = &ho->xent;
    const int dev = ctx->device_id;
    if ((st = tl_check_head(x, w, bias, target, cw, ho, grad_rows, loss, lse, ent, dx, dw, db, 1, NULL))) return st;
    const tl_tensor *all[] = {x, w, target, bias, cw, grad_rows, lse, ent, dx, dw, db};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k] && (st = tl_cuda_check_tensor(all[k], all[k]->ndim, dev))) return st;
    if ((st = tl_cuda_check_tensor(ws, 1, dev))) return st;
    if (loss) {
        if (loss->device != TL_CUDA || loss->device_id != dev) return TL_ERR_DEVICE;
        if (tl_numel(loss) > 0 && !loss->data) return TL_ERR_VALUE;
        if (o->reduction == TL_REDUCE_NONE && loss->strides[0] < 0) return TL_ERR_SHAPE;
    }
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    if (ws->dtype != TL_FLOAT32 || (ws->strides[0] != 1 && ws->shape[0] > 1)) return TL_ERR_VALUE;
    if (N == 0) return TL_OK; /* no GEMM runs, no workspace is read */
    if (ws->shape[0] < TL_XENT_CUDA_WS_EXTRA + C + D + 1) return TL_ERR_VALUE; /* room for one row */
    const tl_xent_cuda_plan plan = tl_xent_cuda_plan_for(N, D, C, dx && dx->dtype != TL_FLOAT32, ws->shape[0]);
    if (dw && dw->dtype != TL_FLOAT32 && !writes_dw_once(&plan, N)) return TL_ERR_DTYPE;

    /* Every GEMM of the loop, checked now over all N rows (a chunk's views are the same strides over
     * fewer rows, which tl_gemm_cuda accepts whenever it accepts all of them), so that a layout it
     * cannot read is refused before anything is written. */
    float *zbuf = (float *)ws->data + TL_XENT_CUDA_WS_EXTRA;
    const tl_tensor wt = tl_view2d(w->data, w->dtype, TL_CUDA, dev, D, C, w->strides[1], w->strides[0]); /* W^T */
    const tl_tensor z = tl_view2d(zbuf, TL_FLOAT32, TL_CUDA, dev, N, C, C, 1);
    if ((st = tl_gemm_cuda_validate(ctx, x, &wt, bias, &z, cublas_ws))) return st;
    if (dx) {
        const tl_tensor dz = dz_view(zbuf, x->dtype, dev, N, C, 0);
        if ((st = tl_gemm_cuda_validate(ctx, &dz, w, NULL, dx, cublas_ws))) return st;
    }
    if (dw) {
        const tl_tensor dzt = dz_view(zbuf, x->dtype, dev, N, C, 1);
        if ((st = tl_gemm_cuda_validate(ctx, &dzt, x, NULL, dw, cublas_ws))) return st;
    }
    return TL_OK;
}

/* p = scale * p over a strided float32 matrix (scale 0: zeros), on `stream`. */
static tl_status
scale_f32(float *p, int64_t s0, int64_t s1, int64_t rows, int64_t cols, float scale, cudaStream_t stream)
{
    const int64_t n = rows * cols;
    if (n == 0) return TL_OK;
    int64_t blocks = (n + SCALE_THREADS - 1) / SCALE_THREADS;
    if (blocks > 4096) blocks = 4096;
    scale_kernel<<<(unsigned)blocks, SCALE_THREADS, 0, stream>>>(p, s0, s1, rows, cols, scale);
    return tl_cuda_check(cudaGetLastError(), "linear_xent scale kernel launch");
}

/* The batch by blocks of classes (the plan's block), all N rows at a time: a first pass for each row's
 * log-sum-exp and loss, and when gradients are wanted a second that recomputes each block's logits
 * (kept from the first pass when there is one block) and turns them into dz for the block's dW rows
 * (one GEMM, beta 0), its db entries and its term of dX (beta 1 after the first block; in the float32
 * accumulator when dx is bfloat16/float16, stored at the end). */
static tl_status
xent_by_classes(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, int sum_losses,
                tl_tensor *dx, tl_tensor *dw, tl_tensor *db, float su, const tl_xent_cuda_plan *plan, row_args ra,
                float *wsf, xent_header *hdr, void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32, void *stream)
{
    tl_status st = TL_OK;
    const int dev = ctx->device_id;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0], Cb = plan->block;
    const int64_t nblocks = (C + Cb - 1) / Cb;
    const cudaStream_t s = (cudaStream_t)stream;
    const int grads = dx || dw || db;
    float *const stats = wsf + TL_XENT_CUDA_WS_EXTRA;
    ra.st_zs = (double *)stats; /* 8-byte aligned: ws is, and the header is 64 floats */
    ra.st_m = stats + 2 * N;
    ra.st_s = ra.st_m + N;
    ra.st_zt = ra.st_s + N;
    ra.st_se = ra.st_zt + N;
    ra.lrow = ra.st_se + N;
    ra.z = wsf + plan->z_off;
    ra.i0 = 0;
    float *const acc = dx && dx->dtype != TL_FLOAT32 && nblocks > 1 ? wsf + plan->acc_off : NULL;
    ra.bias = bias ? bias->data : NULL;
    ra.sbias = bias ? bias->strides[0] : 0;
    ra.bdt = bias ? bias->dtype : TL_FLOAT32;
    /* dz straight in x's dtype when no float32 copy of it is wanted (db sums the float32 dz). */
    const int fused_narrow = x->dtype != TL_FLOAT32 && !db;

    for (int pass = 1; pass <= (grads ? 2 : 1) && !st; pass++) {
        for (int64_t c0 = 0; c0 < C && !st; c0 += Cb) {
            const int64_t cb = C - c0 < Cb ? C - c0 : Cb;
            const int threads = cb >= ROW_THREADS ? ROW_THREADS : (int)((cb + 31) / 32 * 32);
            tl_tensor z = tl_view2d(ra.z, TL_FLOAT32, TL_CUDA, dev, N, cb, cb, 1);
            const tl_tensor wb = tl_row_block(w, c0, cb);
            if (pass == 1 || nblocks > 1) {
                const tl_tensor wbt = tl_view2d(wb.data, w->dtype, TL_CUDA, dev, D, cb, w->strides[1], w->strides[0]);
                if ((st = tl_gemm_cuda(ctx, x, &wbt, NULL, &z, 1.0f, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32,
                                       stream)))
                    break;
            }
            if (pass == 1) {
                xent_stats_kernel<<<(unsigned)N, threads, 0, s>>>(ra, c0, cb, c0 == 0);
                st = tl_cuda_check(cudaGetLastError(), "linear_xent class-block statistics kernel launch");
                continue;
            }
            if (!fused_narrow)
                xent_grad_kernel<float><<<(unsigned)N, threads, 0, s>>>(ra, c0, cb);
            else if (x->dtype == TL_BFLOAT16)
                xent_grad_kernel<__nv_bfloat16><<<(unsigned)N, threads, 0, s>>>(ra, c0, cb);
            else
                xent_grad_kernel<__half><<<(unsigned)N, threads, 0, s>>>(ra, c0, cb);
            if ((st = tl_cuda_check(cudaGetLastError(), "linear_xent class-block gradient kernel launch"))) break;
            if (db) {
                tl_tensor dbb = *db;
                dbb.data = (float *)db->data + c0 * db->strides[0];
                dbb.shape[0] = cb;
                if ((st = tl_colsum_cuda(&z, &dbb, 1.0f, stream))) break;
            }
            if (x->dtype != TL_FLOAT32 && !fused_narrow && (st = narrow_rows(ra.z, N, cb, x->dtype, s))) break;
            if (dx) {
                const tl_tensor dz = dz_view(ra.z, x->dtype, dev, N, cb, 0);
                tl_tensor out = acc ? tl_view2d(acc, TL_FLOAT32, TL_CUDA, dev, N, D, D, 1) : *dx;
                if ((st = tl_gemm_cuda(ctx, &dz, &wb, NULL, &out, su, c0 == 0 ? 0.0f : 1.0f, cublas_ws,
                                       cublas_ws_bytes, allow_tf32, stream)))
                    break;
            }
            if (dw) {
                const tl_tensor dzt = dz_view(ra.z, x->dtype, dev, N, cb, 1);
                tl_tensor dwb = tl_row_block(dw, c0, cb);
                if ((st = tl_gemm_cuda(ctx, &dzt, x, NULL, &dwb, su, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32,
                                       stream)))
                    break;
            }
        }
        if (!st && pass == 1) {
            int64_t blocks = (N + 255) / 256;
            if (blocks > 4096) blocks = 4096;
            xent_finalize_kernel<<<(unsigned)blocks, 256, 0, s>>>(ra, N);
            st = tl_cuda_check(cudaGetLastError(), "linear_xent class-block loss kernel launch");
            if (!st && sum_losses) {
                add_losses_kernel<<<1, SUM_THREADS, 0, s>>>(ra.lrow, N, hdr);
                st = tl_cuda_check(cudaGetLastError(), "linear_xent loss sum kernel launch");
            }
        }
    }
    if (!st && acc) {
        int64_t blocks = (N * D + SCALE_THREADS - 1) / SCALE_THREADS;
        if (blocks > 4096) blocks = 4096;
        store_rows_kernel<<<(unsigned)blocks, SCALE_THREADS, 0, s>>>(acc, N, D, dx->data, dx->strides[0],
                                                                     dx->strides[1], dx->dtype);
        st = tl_cuda_check(cudaGetLastError(), "linear_xent dx store kernel launch");
    }
    return st;
}

tl_status
tl_linear_head_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                    const tl_tensor *target, const tl_tensor *cw, const tl_head_opts *ho,
                    const tl_tensor *grad_rows, tl_tensor *loss, tl_tensor *lse, tl_tensor *ent, tl_tensor *dx,
                    tl_tensor *dw, tl_tensor *db, tl_tensor *ws, void *cublas_ws, size_t cublas_ws_bytes,
                    int allow_tf32, int64_t *bad_target, void *stream)
{
    tl_status st = check_head(ctx, x, w, bias, target, cw, ho, grad_rows, loss, lse, ent, dx, dw, db, ws, cublas_ws);
    if (st) return st;
    const tl_xent_opts *o = &ho->xent;
    const int dev = ctx->device_id;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    const float eps = o->label_smoothing;
    const int grads = dx || dw || db, reduce = o->reduction != TL_REDUCE_NONE;
    const cudaStream_t s = (cudaStream_t)stream;
    float *const wsf = (float *)ws->data;
    xent_header *const hdr = (xent_header *)(((uintptr_t)wsf + 15) & ~(uintptr_t)15);
    int prev = -1;
    if ((st = tl_cuda_enter(dev, &prev))) return st;

    /* The targets, all of them, before anything is written; the host needs the verdict (and the mean's
     * divisor), hence the one synchronisation. */
    double wsum = 0.0, wall = (double)C;
    if (N > 0) {
        prepass_kernel<<<1, PREP_THREADS, 0, s>>>(target->data, target->strides[0], target->dtype == TL_INT64, N,
                                                  C, o->ignore_index, cw ? cw->data : NULL,
                                                  cw ? cw->strides[0] : 0, cw ? cw->dtype : TL_FLOAT32, hdr);
        xent_header h;
        if ((st = tl_cuda_check(cudaGetLastError(), "linear_xent target check kernel launch")) ||
            (st = tl_cuda_check(cudaMemcpyAsync(&h, hdr, sizeof h, cudaMemcpyDeviceToHost, s),
                                "linear_xent: cudaMemcpyAsync (target check)")) ||
            (st = tl_cuda_check(cudaStreamSynchronize(s), "linear_xent: cudaStreamSynchronize (target check)")))
            goto done;
        if (h.bad_row >= 0) {
            if (bad_target) *bad_target = h.bad_value;
            st = TL_ERR_INDEX;
            goto done;
        }
        wsum = h.wsum;
        wall = h.wall;
    }
    {
        /* s_i = grad_rows[i] * (the mean's 1/sum_w): the first factor goes into dz, the second is applied
         * after the row pass, as alpha of the dX and dW GEMMs and to db at the end, so that dz stays O(1)
         * (float16 would flush p / sum_w to zero for a large batch). With every target ignored the
         * mean's gradient is zero, not NaN (as on the CPU). */
        const float mean_scale = wsum != 0.0 ? (float)(1.0 / wsum) : 0.0f;
        const float su = o->reduction == TL_REDUCE_MEAN ? mean_scale : 1.0f;

        /* db accumulates over chunks from zero; dW's first chunk overwrites it (beta = 0), so only an
         * empty batch needs it zeroed here. */
        if (db && (st = scale_f32((float *)db->data, db->strides[0], 0, C, 1, 0.0f, s))) goto done;
        if (dw && N == 0 && (st = scale_f32((float *)dw->data, dw->strides[0], dw->strides[1], C, D, 0.0f, s)))
            goto done;

        const tl_xent_cuda_plan plan = tl_xent_cuda_plan_for(N, D, C, dx && dx->dtype != TL_FLOAT32, ws->shape[0]);
        const int64_t R = plan.rows;
        float *zbuf = wsf + TL_XENT_CUDA_WS_EXTRA; /* R x C logits, then dz */
        float *lrow = zbuf + R * C + R * D;        /* R row losses (R x D between them: unused here) */
        const tl_tensor wt = tl_view2d(w->data, w->dtype, TL_CUDA, dev, D, C, w->strides[1], w->strides[0]); /* W^T */
        const int rthreads = C >= ROW_THREADS ? ROW_THREADS : (int)((C + 31) / 32 * 32);

        row_args ra;
        memset(&ra, 0, sizeof ra);
        ra.z = zbuf;
        ra.C = C;
        ra.target = target->data;
        ra.st = target->strides[0];
        ra.t64 = target->dtype == TL_INT64;
        ra.ignore_index = o->ignore_index;
        ra.cw = cw ? cw->data : NULL;
        ra.scw = cw ? cw->strides[0] : 0;
        ra.cwdt = cw ? cw->dtype : TL_FLOAT32;
        ra.grow = grad_rows ? grad_rows->data : NULL;
        ra.sgr = grad_rows ? grad_rows->strides[0] : 0;
        ra.grdt = grad_rows ? grad_rows->dtype : TL_FLOAT32;
        ra.lrow = lrow;
        ra.loss_none = loss && !reduce ? loss->data : NULL;
        ra.sloss = loss && !reduce ? loss->strides[0] : 0;
        ra.ldt = loss ? loss->dtype : TL_FLOAT32;
        ra.keep = 1.0f - eps;
        ra.epsc = eps / (float)C;
        ra.wall = (float)wall;
        ra.smooth = eps > 0.0f;
        ra.grads = grads;
        ra.walld = wall;
        ra.softcap = ho->softcap;
        ra.inv_t = 1.0f / ho->temperature;
        ra.zs = ho->lse_square_scale;
        ra.lse_out = lse ? (float *)lse->data : NULL;
        ra.slse = lse ? lse->strides[0] : 0;
        ra.ent_out = ent ? (float *)ent->data : NULL;
        ra.sent = ent ? ent->strides[0] : 0;

        if (plan.block > 0 &&
            (st = xent_by_classes(ctx, x, w, bias, loss && reduce, dx, dw, db, su, &plan, ra, wsf, hdr, cublas_ws,
                                  cublas_ws_bytes, allow_tf32, stream)))
            goto done;
        for (int64_t i0 = 0; plan.block == 0 && i0 < N; i0 += R) {
            const int64_t rows = N - i0 < R ? N - i0 : R;
            const tl_tensor xr = tl_row_block(x, i0, rows);
            tl_tensor z = tl_view2d(zbuf, TL_FLOAT32, TL_CUDA, dev, rows, C, C, 1);
            if ((st = tl_gemm_cuda(ctx, &xr, &wt, bias, &z, 1.0f, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32,
                                   stream)))
                goto done;

            ra.i0 = i0;
            xent_row_kernel<<<(unsigned)rows, rthreads, 0, s>>>(ra);
            if ((st = tl_cuda_check(cudaGetLastError(), "linear_xent row kernel launch"))) goto done;
            if (loss && reduce) {
                add_losses_kernel<<<1, SUM_THREADS, 0, s>>>(lrow, rows, hdr);
                if ((st = tl_cuda_check(cudaGetLastError(), "linear_xent loss sum kernel launch"))) goto done;
            }
            if (!grads) continue;

            if (db && (st = tl_colsum_cuda(&z, db, 1.0f, stream))) goto done;
            if (x->dtype != TL_FLOAT32 && (st = narrow_rows(zbuf, rows, C, x->dtype, s))) goto done;
            if (dx) {
                const tl_tensor dz = dz_view(zbuf, x->dtype, dev, rows, C, 0);
                tl_tensor dxr = tl_row_block(dx, i0, rows);
                if ((st = tl_gemm_cuda(ctx, &dz, w, NULL, &dxr, su, 0.0f, cublas_ws, cublas_ws_bytes, allow_tf32,
                                       stream)))
                    goto done;
            }
            if (dw) {
                const tl_tensor dzt = dz_view(zbuf, x->dtype, dev, rows, C, 1);
                if ((st = tl_gemm_cuda(ctx, &dzt, &xr, NULL, dw, su, i0 == 0 ? 0.0f : 1.0f, cublas_ws,
                                       cublas_ws_bytes, allow_tf32, stream)))
                    goto done;
            }
        }

        if (db && su != 1.0f && (st = scale_f32((float *)db->data, db->strides[0], 0, C, 1, su, s))) goto done;
        if (loss && reduce) {
            final_loss_kernel<<<1, 1, 0, s>>>(N > 0 ? hdr : NULL, wsum, o->reduction == TL_REDUCE_MEAN,
                                              loss->data, loss->dtype);
            st = tl_cuda_check(cudaGetLastError(), "linear_xent final loss kernel launch");
        }
    }
done:
    tl_cuda_leave(dev, prev);
    return st;
}

tl_status
tl_linear_xent_cuda(tl_cuda_context *ctx, const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias,
                    const tl_tensor *target, const tl_tensor *cw, const tl_xent_opts *o,
                    const tl_tensor *grad_rows, tl_tensor *loss, tl_tensor *dx, tl_tensor *dw, tl_tensor *db,
                    tl_tensor *ws, void *cublas_ws, size_t cublas_ws_bytes, int allow_tf32,
                    int64_t *bad_target, void *stream)
{
    if (!o) return TL_ERR_VALUE;
    const tl_head_opts ho = {*o, 0.0f, 1.0f, 0.0f};
    return tl_linear_head_cuda(ctx, x, w, bias, target, cw, &ho, grad_rows, loss, NULL, NULL, dx, dw, db, ws,
                               cublas_ws, cublas_ws_bytes, allow_tf32, bad_target, stream);
}
