/* head.c: fused linear + softmax + cross-entropy (the classifier or vocabulary head), forward and
 * backward in one pass over the rows, a chunk of rows at a time (the math is in tl.h):
 *
 *   for each chunk of R rows:   Z = X[chunk] W^T + b          (R x C float32, the caller's workspace)
 *                               per row: softcap and temperature, max, lse, loss (z-loss included),
 *                               entropy; dz overwrites z in place (when grads are wanted)
 *                               dX[chunk] = dZ W;   dW += dZ^T X[chunk];   db += colsum(dZ)
 *
 * Memory: the workspace holds R x C logits, R x D float32 partials of dX, and R losses; nothing of size
 * N x C ever exists. X is read twice per chunk (forward GEMM, dW), W three times (Z, dX, and its
 * packing), dW read and written once per chunk. The row pass reads each z twice (max, sum of exp) and
 * writes dz once, with a vectorised exp on AVX-512 and AVX2; one exp per logit when the exps can be
 * kept in z until dz is formed from them (gradients without label smoothing).
 * Results do not depend on the thread count: each row's sums run in a fixed order, losses are added
 * in row order in double precision, and the GEMMs are deterministic.
 * The per-row math (max, lse, loss, dz) and the few-classes path's vector kernels are in head_rows.c. */
#include <stdlib.h>

#include "head_internal.h"

/* The gradient's scale for row i: the upstream gradient of that row (when given) times the reduction's
 * own factor (1/sum of target weights for the mean). */
static inline float
row_scale(const tl_tensor *grad_rows, int64_t i, int reduction, float mean_scale)
{
    const float r = reduction == TL_REDUCE_MEAN ? mean_scale : 1.0f;
    return grad_rows ? r * tl_load_f(grad_rows->data, i * grad_rows->strides[0], grad_rows->dtype) : r;
}

/* ---- the fused head ----------------------------------------------------------------------------- */

static int64_t
load_index(const tl_tensor *t, int64_t i)
{
    const int64_t off = i * t->strides[0];
    return t->dtype == TL_INT64 ? ((const int64_t *)t->data)[off] : ((const int32_t *)t->data)[off];
}

tl_status
tl_head_targets(const tl_tensor *target, int64_t C, int64_t ignore_index, int64_t *tg, int64_t *bad_target)
{
    for (int64_t i = 0; i < target->shape[0]; i++) {
        const int64_t t = load_index(target, i);
        tg[i] = -1;
        if (t == ignore_index) continue;
        if (t < 0 || t >= C) {
            if (bad_target) *bad_target = t;
            return TL_ERR_INDEX;
        }
        tg[i] = t;
    }
    return TL_OK;
}

/* The floats of ws a row takes: its logits, dX's float32 partials, its loss, and with a softcap the
 * tanh of its logits. */
static int64_t
ws_per_row(int64_t D, int64_t C, const tl_head_opts *o)
{
    return C + D + 1 + (o->softcap > 0.0f ? C : 0);
}

/* tl_check_head's requirements (csrc/check.c), on the CPU, and the workspace's. */
static tl_status
check_head(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
           const tl_tensor *cw, const tl_head_opts *o, const tl_tensor *grad_rows, const tl_tensor *loss,
           const tl_tensor *lse, const tl_tensor *ent, const tl_tensor *dx, const tl_tensor *dw, const tl_tensor *db,
           const tl_tensor *ws)
{
    const tl_tensor *all[] = {x, w, target, bias, cw, grad_rows, lse, ent, dx, dw, db};
    tl_status st = tl_check_head(x, w, bias, target, cw, o, grad_rows, loss, lse, ent, dx, dw, db, 0, NULL);
    if (st) return st;
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k] && (st = tl_check_cpu(all[k], all[k]->ndim))) return st;
    if (loss && (loss->device != TL_CPU || (tl_numel(loss) > 0 && !loss->data))) return TL_ERR_VALUE;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    if (C <= TL_XENT_SKINNY_C && !ws) return TL_OK; /* the single-pass path needs no workspace */
    if (!ws || (st = tl_check_cpu(ws, 1))) return ws ? st : TL_ERR_VALUE;
    if (ws->dtype != TL_FLOAT32 || (ws->strides[0] != 1 && ws->shape[0] > 1)) return TL_ERR_VALUE;
    if (N > 0 && ws->shape[0] < ws_per_row(D, C, o)) return TL_ERR_VALUE; /* room for one row */
    return TL_OK;
}

/* A row's lse and entropy into the outputs that want them (ignored rows: 0). */
static inline void
store_row_stats(tl_tensor *lse, tl_tensor *ent, int64_t i, float l, float h)
{
    if (lse) ((float *)lse->data)[i * lse->strides[0]] = l;
    if (ent) ((float *)ent->data)[i * ent->strides[0]] = h;
}

/* Few classes (C <= SKINNY_C): one pass over the rows, no GEMM. Each row of x is read once (as float32)
 * for its C dot products, softmax, loss and dz, then dx_i = dz_i W and the row's share of dW and db.
 * Rows go in blocks of SK_RB (AVX-512) or one at a time. dW and db gather in SKINNY_PARTS fixed row
 * ranges and are added in range order at the end, so the result does not depend on the thread count.
 * Scratch (malloc): W as float32 unless it already is with unit column stride, b as float32, and per
 * range C x D + C accumulators and 2 SK_RB rows of D floats. */
#define SKINNY_C TL_XENT_SKINNY_C
#define SKINNY_PARTS 8

static tl_status
xent_skinny(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const int64_t *tg,
            const row_spec *sp, const tl_xent_opts *o, const tl_tensor *grad_rows, tl_tensor *loss, tl_tensor *lse,
            tl_tensor *ent, tl_tensor *dx, tl_tensor *dw, tl_tensor *db, const row_ops *ops, float mean_scale,
            int nt, double *total)
{
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    const int grads = sp->grads;
    const float *cwf = sp->cwf;
#ifdef TL_X86
    const int blocked = tl_cpu_level() >= 2;
    /* the one-vector row kernel: plain cross-entropy, no statistics */
    const int sk_row = blocked && tl_head_plain(sp) && !lse && !ent;
#else
    const int blocked = 0;
#endif
    const int rbmax = blocked ? SK_RB : 1;
    const int64_t parts = N < SKINNY_PARTS * 64 ? (N + 63) / 64 : SKINNY_PARTS;
    const int64_t per_part = C * D + C + 2 * SK_RB * D;
    const int w_direct = w->dtype == TL_FLOAT32 && (w->strides[1] == 1 || D <= 1);
    const int64_t wcopy = w_direct ? 0 : C * D;
    float *wf = malloc(((size_t)(wcopy + C) + (size_t)parts * (size_t)per_part + 1) * sizeof(float));
    double *ploss = malloc(((size_t)parts + 1) * sizeof(double));
    if (!wf || !ploss) {
        free(wf);
        free(ploss);
        return TL_ERR_NOMEM;
    }
    float *bf = wf + wcopy, *acc = bf + C;
    const float *wp = wf;
    int64_t ldw = D;
    if (w_direct) {
        wp = (const float *)w->data;
        ldw = w->strides[0];
    } else {
        for (int64_t c = 0; c < C; c++)
            for (int64_t d = 0; d < D; d++) wf[c * D + d] = tl_load_f(w->data, c * w->strides[0] + d * w->strides[1], w->dtype);
    }
    for (int64_t c = 0; c < C; c++) bf[c] = bias ? tl_load_f(bias->data, c * bias->strides[0], bias->dtype) : 0.0f;

#pragma omp parallel for num_threads(nt) if (nt > 1 && parts > 1 && N * D * C >= (1 << 17)) schedule(static)
    for (int64_t p = 0; p < parts; p++) {
        float *pdw = acc + p * per_part, *pdb = pdw + C * D, *xbuf = pdb + C, *dxbuf = xbuf + SK_RB * D;
        float z[SK_RB * SKINNY_C], u[SKINNY_C];
        double lsum = 0.0;
        memset(pdw, 0, (size_t)(C * D + C) * sizeof(float));
        const int64_t r0 = N * p / parts, r1 = N * (p + 1) / parts;
        for (int64_t i0 = r0; i0 < r1; i0 += rbmax) {
            const int rb = (int)(r1 - i0 < rbmax ? r1 - i0 : rbmax);
            const float *xi[SK_RB];
            float *dxi[SK_RB];
            for (int r = 0; r < rb; r++) {
                const int64_t i = i0 + r;
                if (x->dtype == TL_FLOAT32 && (x->strides[1] == 1 || D <= 1)) {
                    xi[r] = (const float *)x->data + i * x->strides[0];
                } else {
                    float *xr = xbuf + r * D;
                    for (int64_t d = 0; d < D; d++)
                        xr[d] = tl_load_f(x->data, i * x->strides[0] + d * x->strides[1], x->dtype);
                    xi[r] = xr;
                }
            }
#ifdef TL_X86
            if (blocked)
                tl_head_sk_logits_avx512(xi, rb, wp, ldw, C, D, z);
            else
#endif
                for (int r = 0; r < rb; r++)
                    for (int64_t c = 0; c < C; c++) z[r * SKINNY_C + c] = ops->dot(xi[r], wp + c * ldw, D);
            for (int r = 0; r < rb; r++) {
                const int64_t i = i0 + r, t = tg[i]; /* validated; -1: ignored */
                float *zr = z + r * SKINNY_C, li = 0.0f, l = 0.0f, h = 0.0f;
                if (t < 0) {
                    for (int64_t c = 0; c < C; c++) zr[c] = 0.0f;
                } else {
                    for (int64_t c = 0; c < C; c++) zr[c] += bf[c];
                    const float sc = row_scale(grad_rows, i, o->reduction, mean_scale);
#ifdef TL_X86
                    if (sk_row)
                        li = tl_head_sk_row_avx512(zr, C, t, cwf, sp->keep, sp->epsc, sp->wall, grads, sc);
                    else
#endif
                        li = tl_head_row(ops, sp, zr, u, C, t, sc, lse ? &l : NULL, ent ? &h : NULL);
                }
                store_row_stats(lse, ent, i, l, h);
                lsum += li;
                if (loss && o->reduction == TL_REDUCE_NONE)
                    tl_store_f(loss->data, i * loss->strides[0], loss->dtype, li);
            }
            if (!grads) continue;
            if (dx) {
                const int direct = dx->dtype == TL_FLOAT32 && (dx->strides[1] == 1 || D <= 1);
                for (int r = 0; r < rb; r++)
                    dxi[r] = direct ? (float *)dx->data + (i0 + r) * dx->strides[0] : dxbuf + r * D;
                if (D > 0) { /* an empty dx may have no data */
#ifdef TL_X86
                    if (blocked) {
                        tl_head_sk_dx_avx512(z, rb, wp, ldw, C, D, dxi);
                        for (int r = 0; r < rb; r++) /* an ignored row's dx is exactly 0, as below */
                            if (tg[i0 + r] < 0) memset(dxi[r], 0, (size_t)D * sizeof(float));
                    } else
#endif
                        for (int r = 0; r < rb; r++) {
                            memset(dxi[r], 0, (size_t)D * sizeof(float));
                            for (int64_t c = 0; c < C; c++)
                                if (z[r * SKINNY_C + c] != 0.0f) ops->axpy(dxi[r], z[r * SKINNY_C + c], wp + c * ldw, D);
                        }
                }
                if (!direct)
                    for (int r = 0; r < rb; r++)
                        for (int64_t d = 0; d < D; d++)
                            tl_store_f(dx->data, (i0 + r) * dx->strides[0] + d * dx->strides[1], dx->dtype, dxi[r][d]);
            }
            if (dw && D > 0) {
#ifdef TL_X86
                if (blocked)
                    tl_head_sk_dw_avx512(z, rb, xi, C, D, pdw);
                else
#endif
                    for (int r = 0; r < rb; r++)
                        for (int64_t c = 0; c < C; c++)
                            if (z[r * SKINNY_C + c] != 0.0f) ops->axpy(pdw + c * D, z[r * SKINNY_C + c], xi[r], D);
            }
            for (int r = 0; r < rb; r++)
                for (int64_t c = 0; c < C; c++) pdb[c] += z[r * SKINNY_C + c];
        }
        ploss[p] = lsum;
    }
    *total = 0.0;
    for (int64_t p = 0; p < parts; p++) *total += ploss[p];
    if (dw || db)
        for (int64_t c = 0; c < C; c++) {
            if (dw && parts > 0 && (dw->strides[1] == 1 || D <= 1)) { /* the same sums, unit-stride sweeps */
                float *dst = (float *)dw->data + c * dw->strides[0];
                for (int64_t d = 0; d < D; d++) dst[d] = 0.0f + acc[c * D + d];
                for (int64_t p = 1; p < parts; p++) {
                    const float *src = acc + p * per_part + c * D;
                    for (int64_t d = 0; d < D; d++) dst[d] += src[d];
                }
            } else if (dw) {
                for (int64_t d = 0; d < D; d++) {
                    float v = 0.0f;
                    for (int64_t p = 0; p < parts; p++) v += acc[p * per_part + c * D + d];
                    ((float *)dw->data)[c * dw->strides[0] + d * dw->strides[1]] = v;
                }
            }
            if (db) {
                float v = 0.0f;
                for (int64_t p = 0; p < parts; p++) v += acc[p * per_part + C * D + c];
                ((float *)db->data)[c * db->strides[0]] = v;
            }
        }
    free(wf);
    free(ploss);
    return TL_OK;
}

tl_status
tl_linear_head_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                   const tl_tensor *cw, const tl_head_opts *ho, const tl_tensor *grad_rows, tl_tensor *loss,
                   tl_tensor *lse, tl_tensor *ent, tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws,
                   int64_t *bad_target, int nthreads)
{
    tl_status st = check_head(x, w, bias, target, cw, ho, grad_rows, loss, lse, ent, dx, dw, db, ws);
    if (st) return st;
    const tl_xent_opts *o = &ho->xent;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    const int nt = tl_threads(nthreads);
    const float eps = o->label_smoothing;
    const int grads = dx || dw || db;

    /* Pass over the targets: validate all of them before writing anything, and the mean's divisor.
     * The validated targets are kept in a private copy (-1 for an ignored row) that the row passes use:
     * the caller's target memory is not read again, so a target changed meanwhile (another thread, or
     * an output aliasing it) cannot send a row out of bounds. */
    double wsum = 0.0, wall = 0.0;
    int64_t *tg = malloc(((size_t)N + 1) * sizeof(int64_t));
    if (!tg) return TL_ERR_NOMEM;
    if ((st = tl_head_targets(target, C, o->ignore_index, tg, bad_target))) {
        free(tg);
        return st;
    }
    for (int64_t i = 0; i < N; i++)
        if (tg[i] >= 0) wsum += cw ? tl_load_f(cw->data, tg[i] * cw->strides[0], cw->dtype) : 1.0;
    for (int64_t c = 0; c < C; c++) wall += cw ? tl_load_f(cw->data, c * cw->strides[0], cw->dtype) : 1.0;
    /* The gradient of the mean is scaled by 1/wsum; with every target ignored the loss is 0/0 = NaN
     * (as in torch) and every row's gradient is zero, not NaN. */
    const float mean_scale = wsum != 0.0 ? (float)(1.0 / wsum) : 0.0f;

    /* db accumulates over chunks from zero; dW's first chunk overwrites it (beta = 0), so only an empty
     * batch needs it zeroed here. */
    if (db)
        for (int64_t c = 0; c < C; c++) ((float *)db->data)[c * db->strides[0]] = 0.0f;
    if (dw && N == 0)
        for (int64_t c = 0; c < C; c++)
            for (int64_t d = 0; d < D; d++) ((float *)dw->data)[c * dw->strides[0] + d * dw->strides[1]] = 0.0f;
    /* Class weights as float32 (a small scratch of C floats), or NULL. */
    float *cwf = NULL;
    if (cw) {
        if (!(cwf = malloc((size_t)C * sizeof(float)))) {
            free(tg);
            return TL_ERR_NOMEM;
        }
        for (int64_t c = 0; c < C; c++) cwf[c] = tl_load_f(cw->data, c * cw->strides[0], cw->dtype);
    }

    const row_ops ops = tl_head_row_ops();
    const row_spec sp = {cwf, 1.0f - eps, eps / (float)C, (float)wall, ho->softcap, 1.0f / ho->temperature,
                         ho->lse_square_scale, grads};
    double total = 0.0;
    if (C <= SKINNY_C) {
        st = xent_skinny(x, w, bias, tg, &sp, o, grad_rows, loss, lse, ent, dx, dw, db, &ops, mean_scale, nt,
                         &total);
        if (st) goto done;
        goto reduce;
    }

    int64_t R = ws->shape[0] / ws_per_row(D, C, ho);
    if (R > N) R = N;
    if (R < 1) R = 1;
    float *zbuf = (float *)ws->data;            /* R x C logits, then dz */
    float *dxws = zbuf + R * C;                 /* R x D float32 partials of a low-precision dX */
    float *lrow = dxws + R * D;                 /* R row losses */
    float *ubuf = lrow + R;                     /* with a softcap, R x C tanh of the logits */
    tl_tensor wt = tl_view2d(w->data, w->dtype, TL_CPU, 0, D, C, w->strides[1], w->strides[0]); /* W^T */

    for (int64_t i0 = 0; i0 < N; i0 += R) {
        const int64_t rows = N - i0 < R ? N - i0 : R;
        tl_tensor xr = tl_row_block(x, i0, rows);
        tl_tensor z = tl_view2d(zbuf, TL_FLOAT32, TL_CPU, 0, rows, C, C, 1);
        if ((st = tl_gemm_cpu(&xr, &wt, bias, &z, 1.0f, 0.0f, NULL, nthreads))) goto done;

#pragma omp parallel for num_threads(nt) if (nt > 1 && rows * C >= 4096) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *zr = zbuf + r * C, l = 0.0f, h = 0.0f;
            const int64_t t = tg[i0 + r]; /* validated; -1: ignored */
            if (t < 0) {
                lrow[r] = 0.0f;
                if (grads) memset(zr, 0, (size_t)C * sizeof(float));
            } else {
                lrow[r] = tl_head_row(&ops, &sp, zr, ubuf + r * C, C, t,
                                      row_scale(grad_rows, i0 + r, o->reduction, mean_scale), lse ? &l : NULL,
                                      ent ? &h : NULL);
            }
            store_row_stats(lse, ent, i0 + r, l, h);
        }

        for (int64_t r = 0; r < rows; r++) total += lrow[r];
        if (loss && o->reduction == TL_REDUCE_NONE)
            for (int64_t r = 0; r < rows; r++)
                tl_store_f(loss->data, (i0 + r) * loss->strides[0], loss->dtype, lrow[r]);

        if (dx) {
            tl_tensor dxr = tl_row_block(dx, i0, rows);
            tl_tensor dxw1 = tl_view2d(dxws, TL_FLOAT32, TL_CPU, 0, 1, rows * D, rows * D, 1);
            dxw1.ndim = 1;
            dxw1.shape[0] = rows * D;
            dxw1.strides[0] = 1;
            /* dX = dZ W (a float32 dZ against W in its own dtype: the core GEMM mixes them) */
            if ((st = tl_gemm_cpu(&z, w, NULL, &dxr, 1.0f, 0.0f, &dxw1, nthreads))) goto done;
        }
        if (dw) {
            tl_tensor zt = tl_view2d(zbuf, TL_FLOAT32, TL_CPU, 0, C, rows, 1, C); /* dZ^T */
            if ((st = tl_gemm_cpu(&zt, &xr, NULL, dw, 1.0f, i0 == 0 ? 0.0f : 1.0f, NULL, nthreads))) goto done;
        }
        if (db) {
            if ((st = tl_colsum_cpu(&z, db, 1.0f, nt))) goto done;
        }
    }

reduce:
    if (loss && o->reduction != TL_REDUCE_NONE) {
        const double v = o->reduction == TL_REDUCE_MEAN ? total / wsum : total; /* 0/0: NaN, as torch */
        tl_store_f(loss->data, 0, loss->dtype, (float)v);
    }
done:
    free(cwf);
    free(tg);
    return st;
}

tl_status
tl_linear_xent_cpu(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
                   const tl_tensor *cw, const tl_xent_opts *o, const tl_tensor *grad_rows, tl_tensor *loss,
                   tl_tensor *dx, tl_tensor *dw, tl_tensor *db, tl_tensor *ws, int64_t *bad_target,
                   int nthreads)
{
    if (!o) return TL_ERR_VALUE;
    const tl_head_opts ho = {*o, 0.0f, 1.0f, 0.0f};
    return tl_linear_head_cpu(x, w, bias, target, cw, &ho, grad_rows, loss, NULL, NULL, dx, dw, db, ws, bad_target,
                              nthreads);
}
