/* lora.c: the LoRA linear layer, y = x W^T + bias + scale * dropout(x) A^T B^T, forward and backward.
 *
 * The low-rank product rides inside the base GEMM: y = [x | su] [W^T ; B^T] over K = in + r (gemm.c's
 * tl_gemm2_cpu), so y is written once, with no separate add or scaled copy; likewise
 * dx = [dy | sv] [W ; A]. The scale is folded into the small N x r products su and sv, which are each
 * computed once and shared (su: y and db; sv: dx and da). Dropout keeps no mask: it is a hash of the
 * element's index and a seed (tl.h), drawn again in backward. */
#include "cpu.h"

/* t's transpose, as a view (no copy). */
static tl_tensor
transposed(const tl_tensor *t)
{
    tl_tensor v = *t;
    v.shape[0] = t->shape[1];
    v.shape[1] = t->shape[0];
    v.strides[0] = t->strides[1];
    v.strides[1] = t->strides[0];
    return v;
}

/* `n` float32 elements of the workspace from *off on, or NULL when n == 0. */
static tl_tensor *
ws_take(const tl_tensor *ws, int64_t *off, int64_t n, tl_tensor *slot)
{
    if (n == 0) return NULL;
    *slot = tl_view2d((float *)ws->data + *off, TL_FLOAT32, TL_CPU, 0, 1, n, n, 1);
    slot->ndim = 1;
    slot->shape[0] = n;
    slot->strides[0] = 1;
    *off += n;
    return slot;
}

static tl_status
check_ws(const tl_tensor *ws, int64_t need)
{
    if (need == 0) return TL_OK;
    if (!ws) return TL_ERR_VALUE;
    tl_status st = tl_check_cpu(ws, 1);
    if (st) return st;
    if (ws->dtype != TL_FLOAT32 || ws->strides[0] != 1 || ws->shape[0] < need) return TL_ERR_VALUE;
    return TL_OK;
}

static int
valid_p(float p)
{
    return p >= 0.0f && p < 1.0f; /* false for NaN */
}

/* ---- dropout ------------------------------------------------------------------------------------ */

tl_status
tl_dropout_cpu(const tl_tensor *x, tl_tensor *out, float p, uint64_t seed, int nthreads)
{
    tl_status st;
    if ((st = tl_check_cpu(x, 2)) || (st = tl_check_cpu(out, 2))) return st;
    if (!tl_is_float_dtype(x->dtype)) return TL_ERR_DTYPE;
    if (!tl_is_float_dtype(out->dtype)) return TL_ERR_DTYPE;
    if (out->shape[0] != x->shape[0] || out->shape[1] != x->shape[1]) return TL_ERR_SHAPE;
    if (!valid_p(p)) return TL_ERR_VALUE;
    const int64_t N = x->shape[0], D = x->shape[1];
    const uint32_t thr = tl_dropout_threshold(p);
    const float inv = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    int nt = tl_threads(nthreads);
    if (N * D < 32768) nt = 1;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const int64_t xrow = i * x->strides[0], orow = i * out->strides[0];
        float v[256];
        for (int64_t k0 = 0; k0 < D; k0 += 256) {
            const int64_t kn = D - k0 < 256 ? D - k0 : 256;
            const uint64_t base = (uint64_t)(i * D + k0);
            for (int64_t k = 0; k < kn; k++) v[k] = tl_load_f(x->data, xrow + (k0 + k) * x->strides[1], x->dtype);
            if (p > 0.0f)
                for (int64_t k = 0; k < kn; k++)
                    v[k] = tl_dropout_hash(seed, base + (uint64_t)k) >= thr ? v[k] * inv : 0.0f;
            for (int64_t k = 0; k < kn; k++) tl_store_f(out->data, orow + (k0 + k) * out->strides[1], out->dtype, v[k]);
        }
    }
    return TL_OK;
}

/* ---- the rank-r products su and sv: tl_gemm_nt_direct (gemm_direct.c) computes them without packing ---- */

/* out (N x r) = alpha * x (N x K) m^T. Returns 1 when done, 0 when the GEMM must do it, -1 out of memory. */
static int
skinny(const tl_tensor *x, const tl_tensor *m, float alpha, tl_tensor *out, int nthreads)
{
    return tl_gemm_nt_direct(x, m, NULL, out, alpha, 0.0f, nthreads, 1);
}

/* ---- the layer ---------------------------------------------------------------------------------- */

static tl_status
check_layer(const tl_tensor *x, const tl_tensor *w, const tl_tensor *a, const tl_tensor *b, float p)
{
    tl_status st;
    const tl_tensor *ts[] = {x, w, a, b};
    for (int i = 0; i < 4; i++) {
        if ((st = tl_check_cpu(ts[i], 2))) return st;
        if (ts[i]->dtype != x->dtype) return TL_ERR_DTYPE;
    }
    if (!tl_is_float_dtype(x->dtype)) return TL_ERR_DTYPE;
    const int64_t in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if (w->shape[1] != in || a->shape[1] != in || b->shape[0] != out || b->shape[1] != r) return TL_ERR_SHAPE;
    if (!valid_p(p)) return TL_ERR_VALUE;
    return TL_OK;
}

static tl_status
check_out(const tl_tensor *t, tl_dtype dtype, int64_t rows, int64_t cols)
{
    tl_status st = tl_check_cpu(t, 2);
    if (st) return st;
    if (t->dtype != dtype) return TL_ERR_DTYPE;
    if (t->shape[0] != rows || t->shape[1] != cols) return TL_ERR_SHAPE;
    return TL_OK;
}

/* dropout(x) in the workspace, in x's dtype (so that 16-bit GEMMs keep their fast kernels), or x itself. */
static tl_status
dropped_x(const tl_tensor *x, float p, uint64_t seed, const tl_tensor *ws, int64_t *off, tl_tensor *slot,
          const tl_tensor **xin, int nthreads)
{
    const int64_t N = x->shape[0], in = x->shape[1];
    *xin = x;
    if (p <= 0.0f || N * in == 0) return TL_OK;
    *slot = tl_view2d((float *)ws->data + *off, x->dtype, TL_CPU, 0, N, in, in, 1);
    *off += N * in;
    *xin = slot;
    return tl_dropout_cpu(x, slot, p, seed, nthreads);
}

tl_status
tl_lora_forward_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *a,
                    const tl_tensor *b, float scale, float p, uint64_t seed, tl_tensor *y, tl_tensor *su,
                    tl_tensor *ws, int nthreads)
{
    tl_status st;
    if ((st = check_layer(x, w, a, b, p))) return st;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if ((st = check_out(y, x->dtype, N, out)) || (st = check_out(su, x->dtype, N, r))) return st;
    if ((st = check_ws(ws, tl_lora_forward_ws(N, in, out, r, p, x->dtype)))) return st;
    if (N == 0) return TL_OK;

    int64_t off = 0;
    tl_tensor xd, su_part, y_part;
    const tl_tensor *xin;
    if ((st = dropped_x(x, p, seed, ws, &off, &xd, &xin, nthreads))) return st;
    tl_tensor *su_ws = x->dtype != TL_FLOAT32 && in > TL_GEMM_KC ? ws_take(ws, &off, N * r, &su_part) : NULL;
    tl_tensor *y_ws = x->dtype != TL_FLOAT32 && in + r > TL_GEMM_KC ? ws_take(ws, &off, N * out, &y_part) : NULL;

    /* su^T (r x N) = scale * A (r x in) @ dropout(x)^T: the rank r is the GEMM's M, which wastes less of
     * the micro-kernel than r as its N would. */
    tl_tensor suT = transposed(su), xinT = transposed(xin);
    const int done = skinny(xin, a, scale, su, nthreads);
    if (done < 0) return TL_ERR_NOMEM;
    if (!done && (st = tl_gemm2_cpu(a, &xinT, NULL, NULL, NULL, &suT, scale, 0.0f, su_ws, nthreads))) return st;
    /* y = [x | su] [W^T ; B^T] + bias */
    tl_tensor wT = transposed(w), bT = transposed(b);
    return tl_gemm2_cpu(x, &wT, su, &bT, bias, y, 1.0f, 0.0f, y_ws, nthreads);
}

tl_status
tl_lora_backward_cpu(const tl_tensor *dy, const tl_tensor *x, const tl_tensor *w, const tl_tensor *a,
                     const tl_tensor *b, const tl_tensor *su, float scale, float p, uint64_t seed,
                     tl_tensor *dx, tl_tensor *da, tl_tensor *db, tl_tensor *ws, int nthreads)
{
    tl_status st;
    if ((st = check_layer(x, w, a, b, p))) return st;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if ((st = check_out(dy, x->dtype, N, out)) || (st = check_out(su, x->dtype, N, r))) return st;
    if ((dx && (st = check_out(dx, x->dtype, N, in))) || (da && (st = check_out(da, TL_FLOAT32, r, in))) ||
        (db && (st = check_out(db, TL_FLOAT32, out, r))))
        return st;
    if ((st = check_ws(ws, tl_lora_backward_ws(N, in, out, r, p, x->dtype, dx != NULL, da != NULL)))) return st;

    int64_t off = 0;
    tl_tensor sv_t, sv_part, region, xd;
    const tl_tensor *xin;
    /* sv = scale * dy B (N x r, in x's dtype), as sv^T = scale * B^T dy^T: rank r as the GEMM's M. */
    sv_t = tl_view2d(ws ? ws->data : NULL, x->dtype, TL_CPU, 0, N, r, r, 1);
    off += N * r;
    tl_tensor *sv_ws = x->dtype != TL_FLOAT32 && out > TL_GEMM_KC ? ws_take(ws, &off, N * r, &sv_part) : NULL;
    if (dx || da) {
        tl_tensor svT = transposed(&sv_t), bT = transposed(b), dyT = transposed(dy);
        const int done = skinny(dy, &bT, scale, &sv_t, nthreads);
        if (done < 0) return TL_ERR_NOMEM;
        if (!done && (st = tl_gemm2_cpu(&bT, &dyT, NULL, NULL, NULL, &svT, scale, 0.0f, sv_ws, nthreads)))
            return st;
    }
    /* The N x in region (tl_lora_backward_ws), used in turn. */
    const int64_t region_off = off;
    tl_tensor *dx_ws = x->dtype != TL_FLOAT32 && out + r > TL_GEMM_KC ? ws_take(ws, &off, N * in, &region) : NULL;
    if (dx && p <= 0.0f) { /* dx = [dy | sv] [W ; A] */
        if ((st = tl_gemm2_cpu(dy, w, &sv_t, a, NULL, dx, 1.0f, 0.0f, dx_ws, nthreads))) return st;
    } else if (dx && N * in > 0) {
        /* The low-rank term went through dropout in forward: dx = dropout(sv A) + dy W, the mask drawn
         * again from the seed. sv A goes to the region (float32), then masked into dx, then the base
         * GEMM adds to it (beta = 1) with the region as its partial sums. */
        tl_tensor t = tl_view2d((float *)ws->data + region_off, TL_FLOAT32, TL_CPU, 0, N, in, in, 1);
        if ((st = tl_gemm2_cpu(&sv_t, a, NULL, NULL, NULL, &t, 1.0f, 0.0f, NULL, nthreads))) return st;
        if ((st = tl_dropout_cpu(&t, dx, p, seed, nthreads))) return st;
        tl_tensor part = t;
        part.ndim = 1;
        part.shape[0] = N * in;
        part.strides[0] = 1;
        if ((st = tl_gemm2_cpu(dy, w, NULL, NULL, NULL, dx, 1.0f, 1.0f, x->dtype != TL_FLOAT32 ? &part : NULL,
                               nthreads)))
            return st;
    }
    if (da) { /* da = sv^T dropout(x) */
        off = region_off;
        if ((st = dropped_x(x, p, seed, ws, &off, &xd, &xin, nthreads))) return st;
        tl_tensor svT = transposed(&sv_t);
        if ((st = tl_gemm2_cpu(&svT, xin, NULL, NULL, NULL, da, 1.0f, 0.0f, NULL, nthreads))) return st;
    }
    if (db) { /* db = dy^T su, as db^T = su^T dy (rank r as M) */
        tl_tensor dbT = transposed(db), suT = transposed(su);
        if ((st = tl_gemm2_cpu(&suT, dy, NULL, NULL, NULL, &dbT, 1.0f, 0.0f, NULL, nthreads))) return st;
    }
    return TL_OK;
}
