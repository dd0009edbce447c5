/* pool.c: one vector per sequence from its hidden states.
 *
 *     cls:  out[b, :] = h[b, 0, :]
 *     mean: out[b, :] = sum_{t: mask[b,t] != 0} h[b, t, :] / #{t: mask[b,t] != 0}
 *     max:  out[b, :] = max_{t: mask[b,t] != 0} h[b, t, :]      (NaN propagates, as in torch.amax)
 * A row with no counted token gives zeros (mean, max). Reads h once; sums in float32.
 * Work is shared out over (b, a block of POOL_DB features): each task walks its rows' T tokens over a
 * contiguous run of features, so the result does not depend on the thread count. */
#include <math.h>

#include "cpu.h"

#define POOL_DB 256

/* Whether token (b, t) counts: mask[b, t] != 0 (a float NaN counts, like any nonzero). */
static inline int
mask_on(const tl_tensor *m, int64_t b, int64_t t)
{
    if (!m) return 1;
    const int64_t i = b * m->strides[0] + t * m->strides[1];
    switch (m->dtype) {
    case TL_INT64: return ((const int64_t *)m->data)[i] != 0;
    case TL_INT32: return ((const int32_t *)m->data)[i] != 0;
    case TL_UINT8: return ((const uint8_t *)m->data)[i] != 0;
    default: return tl_load_f(m->data, i, m->dtype) != 0.0f;
    }
}

/* n features of one token, from element `off` of h with stride s, as float32 in dst (the dtype switch
 * outside the loops, so that each loop is a plain conversion). */
static void
load_row(const void *h, int64_t off, int64_t s, int64_t n, tl_dtype dt, float *dst)
{
    switch (dt) {
    case TL_FLOAT32: {
        const float *p = (const float *)h + off;
        for (int64_t j = 0; j < n; j++) dst[j] = p[j * s];
        break;
    }
    case TL_BFLOAT16: {
        const uint16_t *p = (const uint16_t *)h + off;
        for (int64_t j = 0; j < n; j++) dst[j] = tl_bf16_to_f32(p[j * s]);
        break;
    }
    default: {
        const uint16_t *p = (const uint16_t *)h + off;
        for (int64_t j = 0; j < n; j++) dst[j] = tl_f16_to_f32(p[j * s]);
        break;
    }
    }
}

tl_status
tl_pool_cpu(const tl_tensor *h, const tl_tensor *mask, int mode, tl_tensor *out, int nthreads)
{
    tl_status st;
    if ((st = tl_check_cpu(h, 3)) || (st = tl_check_cpu(out, 2))) return st;
    if (mask && (st = tl_check_cpu(mask, 2))) return st;
    if (mode != TL_POOL_CLS && mode != TL_POOL_MEAN && mode != TL_POOL_MAX) return TL_ERR_VALUE;
    if (!tl_is_float_dtype(h->dtype)) return TL_ERR_DTYPE;
    if (out->dtype != TL_FLOAT32 && out->dtype != h->dtype) return TL_ERR_DTYPE;
    if (mask && mask->dtype != TL_INT64 && mask->dtype != TL_INT32 && mask->dtype != TL_UINT8 &&
        mask->dtype != h->dtype)
        return TL_ERR_DTYPE;
    const int64_t B = h->shape[0], T = h->shape[1], D = h->shape[2];
    if (out->shape[0] != B || out->shape[1] != D) return TL_ERR_SHAPE;
    if (mask && (mask->shape[0] != B || mask->shape[1] != T)) return TL_ERR_SHAPE;
    if (mode == TL_POOL_CLS && T == 0 && B > 0 && D > 0) return TL_ERR_SHAPE;
    if (B == 0 || D == 0) return TL_OK;

    const int64_t hs0 = h->strides[0], hs1 = h->strides[1], hs2 = h->strides[2];
    const int64_t os0 = out->strides[0], os1 = out->strides[1];
    const int fast = h->dtype == TL_FLOAT32 && hs2 == 1;
    const int64_t nb = (D + POOL_DB - 1) / POOL_DB, tasks = B * nb;
    const int64_t work = mode == TL_POOL_CLS ? B * D : B * T * D;
    int nt = tl_threads(nthreads);
    if (work < 65536 || tasks < 2) nt = 1;

#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        float acc[POOL_DB], buf[POOL_DB];
        const int64_t b = task / nb, j0 = (task % nb) * POOL_DB;
        const int64_t jn = D - j0 < POOL_DB ? D - j0 : POOL_DB;
        const int64_t base = b * hs0 + j0 * hs2;
        int64_t count = 0;

        if (mode == TL_POOL_CLS) {
            load_row(h->data, base, hs2, jn, h->dtype, acc);
            count = 1;
        } else {
            const float init = mode == TL_POOL_MAX ? -INFINITY : 0.0f;
            for (int64_t j = 0; j < jn; j++) acc[j] = init;
            for (int64_t t = 0; t < T; t++) {
                if (!mask_on(mask, b, t)) continue;
                count++;
                const float *x = buf;
                if (fast)
                    x = (const float *)h->data + base + t * hs1;
                else
                    load_row(h->data, base + t * hs1, hs2, jn, h->dtype, buf);
                if (mode == TL_POOL_MEAN) {
                    for (int64_t j = 0; j < jn; j++) acc[j] += x[j];
                } else {
                    for (int64_t j = 0; j < jn; j++) acc[j] = x[j] > acc[j] || x[j] != x[j] ? x[j] : acc[j];
                }
            }
            if (count == 0) {
                for (int64_t j = 0; j < jn; j++) acc[j] = 0.0f;
            } else if (mode == TL_POOL_MEAN) {
                const float c = (float)count;
                for (int64_t j = 0; j < jn; j++) acc[j] /= c;
            }
        }
        const int64_t o = b * os0 + j0 * os1;
        if (out->dtype == TL_FLOAT32 && os1 == 1) {
            float *p = (float *)out->data + o;
            for (int64_t j = 0; j < jn; j++) p[j] = acc[j];
        } else {
            for (int64_t j = 0; j < jn; j++) tl_store_f(out->data, o + j * os1, out->dtype, acc[j]);
        }
    }
    return TL_OK;
}
