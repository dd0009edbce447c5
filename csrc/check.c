/* check.c: every op's argument checks, once, for both devices (tl.h's tl_check_*): the dims, dtypes and
 * sizes an op's tensors must agree on, and, for the bindings, that its outputs may be written. Each check
 * stops at the first unmet requirement, in a fixed order (the order the messages of tltorch._C and
 * tltorch._cuda follow), and describes it in a tl_check for the caller to word. No Python, no device:
 * tltorch._C and tltorch._cuda compile this file, their bindings word the messages, and the kernels that
 * call a check (the fused head's) return its status. */
#include "tl.h"

#define FLOATS "float32, bfloat16 or float16"

/* Record the unmet requirement (tl_check's fields); returns its status. */
static tl_status
unmet(tl_check *why, tl_status st, tl_need need, const tl_tensor *arg, const tl_tensor *ref, int dim, int64_t want,
      const char *what)
{
    why->status = st;
    why->need = need;
    why->arg = arg;
    why->ref = ref;
    why->dim = dim;
    why->want = want;
    why->what = what;
    return st;
}

static tl_status
need_text(const tl_tensor *t, tl_status st, const char *what, tl_check *why)
{
    return unmet(why, st, TL_NEED_TEXT, t, NULL, 0, 0, what);
}

static tl_status
need_ndim(const tl_tensor *t, int ndim, tl_check *why)
{
    return t->ndim == ndim ? TL_OK : unmet(why, TL_ERR_SHAPE, TL_NEED_NDIM, t, NULL, 0, ndim, NULL);
}

/* A dtype among `what`, as `ok` says. */
static tl_status
need_dtype(const tl_tensor *t, int ok, const char *what, tl_check *why)
{
    return ok ? TL_OK : unmet(why, TL_ERR_DTYPE, TL_NEED_DTYPE, t, NULL, 0, 0, what);
}

static tl_status
need_float(const tl_tensor *t, tl_check *why)
{
    return need_dtype(t, tl_is_float_dtype(t->dtype), FLOATS, why);
}

static tl_status
need_index(const tl_tensor *t, tl_check *why)
{
    return need_dtype(t, t->dtype == TL_INT64 || t->dtype == TL_INT32, "int64 or int32 class indices", why);
}

static tl_status
need_dtype_of(const tl_tensor *t, const tl_tensor *ref, tl_check *why)
{
    return t->dtype == ref->dtype ? TL_OK : unmet(why, TL_ERR_DTYPE, TL_NEED_DTYPE_OF, t, ref, 0, 0, NULL);
}

/* `what` (a dtype of a wider set, by name) or ref's dtype; `ok` says whether t has the first. */
static tl_status
need_dtype_or(const tl_tensor *t, int ok, const char *what, const tl_tensor *ref, tl_check *why)
{
    return ok || t->dtype == ref->dtype ? TL_OK : unmet(why, TL_ERR_DTYPE, TL_NEED_DTYPE_OR, t, ref, 0, 0, what);
}

static tl_status
need_f32_or(const tl_tensor *t, const tl_tensor *ref, tl_check *why)
{
    return need_dtype_or(t, t->dtype == TL_FLOAT32, "float32", ref, why);
}

static tl_status
need_dtype_is(const tl_tensor *t, tl_dtype dtype, tl_check *why)
{
    return t->dtype == dtype ? TL_OK : unmet(why, TL_ERR_DTYPE, TL_NEED_DTYPE_IS, t, NULL, 0, dtype, NULL);
}

static tl_status
need_size(const tl_tensor *t, int dim, int64_t size, const char *what, tl_check *why)
{
    return t->shape[dim] == size ? TL_OK : unmet(why, TL_ERR_SHAPE, TL_NEED_SIZE, t, NULL, dim, size, what);
}

/* Checked where the caller says which tensors are read-only (the bindings): for the kernels, outputs that
 * overlap decide the results, not what memory is touched. */
static tl_status
need_writable(const tl_tensor *t, tl_check *why)
{
    if (!why->readonly) return TL_OK;
    if (why->readonly(t)) return unmet(why, TL_ERR_VALUE, TL_NEED_WRITABLE, t, NULL, 0, 0, NULL);
    if (tl_numel(t) == 0) return TL_OK; /* nothing will be written */
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] > 1 && t->strides[i] == 0)
            return unmet(why, TL_ERR_LAYOUT, TL_NEED_NO_BROADCAST, t, NULL, i, 0, NULL);
    /* No two elements may share memory (threads would race on them): with the dims of size > 1 sorted
     * by |stride|, each stride must step over everything the smaller ones span. */
    int64_t st[TL_MAX_NDIM], sz[TL_MAX_NDIM];
    int n = 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] > 1) {
            int64_t s = t->strides[i] < 0 ? -t->strides[i] : t->strides[i];
            int k = n++;
            while (k > 0 && st[k - 1] > s) {
                st[k] = st[k - 1];
                sz[k] = sz[k - 1];
                k--;
            }
            st[k] = s;
            sz[k] = t->shape[i];
        }
    int64_t span = 1; /* elements covered by the smaller strides, +1 */
    for (int k = 0; k < n; k++) {
        if (st[k] < span) {
            why->got = st[k];
            return unmet(why, TL_ERR_LAYOUT, TL_NEED_NO_OVERLAP, t, NULL, 0, span, NULL);
        }
        span = st[k] * (sz[k] - 1) + span;
    }
    return TL_OK;
}

/* The bytes [lo, hi) that a tensor's elements span (lo == hi when it is empty). */
static void
byte_span(const tl_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    const int64_t es = (int64_t)tl_dtype_size(t->dtype);
    int64_t a = 0, b = 0;
    if (tl_numel(t) == 0 || !t->data) {
        *lo = *hi = 0;
        return;
    }
    for (int i = 0; i < t->ndim; i++) {
        const int64_t ext = (t->shape[i] - 1) * t->strides[i];
        if (ext < 0) a += ext;
        else b += ext;
    }
    *lo = (uintptr_t)((const char *)t->data + a * es);
    *hi = (uintptr_t)((const char *)t->data + (b + 1) * es);
}

/* out and in (NULL: none) share no byte: out is written while other threads read in. */
static tl_status
need_apart(const tl_tensor *out, const tl_tensor *in, tl_check *why)
{
    uintptr_t l1, h1, l2, h2;
    if (!out || !in) return TL_OK;
    byte_span(out, &l1, &h1);
    byte_span(in, &l2, &h2);
    if (l1 == h1 || l2 == h2 || h1 <= l2 || h2 <= l1) return TL_OK;
    return unmet(why, TL_ERR_LAYOUT, TL_NEED_APART, out, in, 0, 0, NULL);
}

/* ---- the primitives, for the callers' own checks -------------------------------------------------- */

tl_status
tl_check_ndim(const tl_tensor *t, int ndim, tl_check *why)
{
    tl_check none = {0};
    return need_ndim(t, ndim, why ? why : &none);
}

tl_status
tl_check_writable(const tl_tensor *t, tl_check *why)
{
    tl_check none = {0};
    return need_writable(t, why ? why : &none);
}

/* ---- gemm, qgemm, colsum ------------------------------------------------------------------------- */

/* c (M, N) of a's float dtype or float32, written; bias NULL or (N,) of c's dtype or float32. */
static tl_status
gemm_out(const tl_tensor *a, const tl_tensor *b, const tl_tensor *c, const tl_tensor *bias, tl_check *why)
{
    if (need_size(b, 0, a->shape[1], "a.shape[1]", why) || need_size(c, 0, a->shape[0], "a.shape[0]", why) ||
        need_size(c, 1, b->shape[1], "b.shape[1]", why) || need_writable(c, why))
        return why->status;
    if (bias && (need_ndim(bias, 1, why) || need_f32_or(bias, c, why) ||
                 need_size(bias, 0, c->shape[1], "c.shape[1]", why)))
        return why->status;
    return TL_OK;
}

tl_status
tl_check_gemm(const tl_tensor *a, const tl_tensor *b, const tl_tensor *c, const tl_tensor *bias, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(a, 2, why) || need_ndim(b, 2, why) || need_ndim(c, 2, why)) return why->status;
    if (need_float(a, why) || need_dtype_of(b, a, why) || need_f32_or(c, a, why)) return why->status;
    return gemm_out(a, b, c, bias, why);
}

tl_status
tl_check_qgemm(const tl_tensor *a, const tl_tensor *b, const tl_tensor *scale, int axis, const tl_tensor *c,
               const tl_tensor *bias, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(a, 2, why) || need_ndim(b, 2, why) || need_ndim(c, 2, why) || need_float(a, why))
        return why->status;
    if (need_dtype(b, b->dtype == TL_INT8 ? scale != NULL : tl_is_float_dtype(b->dtype),
                   "float32, bfloat16, float16, or int8 with a scale", why))
        return why->status;
    if (scale && (need_ndim(scale, 1, why) || need_float(scale, why) ||
                  need_size(scale, 0, b->shape[axis], axis ? "b's columns" : "b's rows", why)))
        return why->status;
    if (need_f32_or(c, a, why)) return why->status;
    return gemm_out(a, b, c, bias, why);
}

tl_status
tl_check_colsum(const tl_tensor *x, const tl_tensor *out, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(x, 2, why) || need_ndim(out, 1, why) || need_float(x, why) || need_f32_or(out, x, why) ||
        need_size(out, 0, x->shape[1], "x.shape[1]", why) || need_writable(out, why))
        return why->status;
    return TL_OK;
}

/* ---- the fused head ------------------------------------------------------------------------------ */

tl_status
tl_check_xent(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
              const tl_tensor *cw, const tl_xent_opts *o, const tl_tensor *grow, const tl_tensor *loss,
              const tl_tensor *dx, const tl_tensor *dw, const tl_tensor *db, int dw_of_x, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (o->reduction < TL_REDUCE_MEAN || o->reduction > TL_REDUCE_NONE)
        return need_text(NULL, TL_ERR_VALUE, "argument 'reduction' must be 0 (mean), 1 (sum) or 2 (none)", why);
    if (!(o->label_smoothing >= 0.0f && o->label_smoothing <= 1.0f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'label_smoothing' must be in [0, 1]", why);
    if (need_ndim(x, 2, why) || need_ndim(w, 2, why) || need_ndim(target, 1, why)) return why->status;
    if (need_float(x, why) || need_dtype_of(w, x, why) || need_index(target, why)) return why->status;
    const int64_t N = x->shape[0], D = x->shape[1], C = w->shape[0];
    if (need_size(w, 1, D, "x.shape[1]", why) || need_size(target, 0, N, "x.shape[0]", why)) return why->status;
    if (C < 1) return need_text(w, TL_ERR_SHAPE, "must have at least one class (row)", why);
    if (bias && (need_ndim(bias, 1, why) || need_dtype_of(bias, x, why) || need_size(bias, 0, C, "classes", why)))
        return why->status;
    if (cw && (need_ndim(cw, 1, why) || need_f32_or(cw, x, why) || need_size(cw, 0, C, "classes", why)))
        return why->status;
    if (grow && (need_ndim(grow, 1, why) || need_float(grow, why) || need_size(grow, 0, N, "rows", why)))
        return why->status;
    if (loss) {
        if (need_f32_or(loss, x, why) || need_writable(loss, why)) return why->status;
        if (o->reduction == TL_REDUCE_NONE) {
            if (need_ndim(loss, 1, why) || need_size(loss, 0, N, "rows", why)) return why->status;
        } else if (tl_numel(loss) != 1) {
            return need_text(loss, TL_ERR_SHAPE, "must hold one element for mean/sum", why);
        }
    }
    if (dx && (need_ndim(dx, 2, why) || need_f32_or(dx, x, why) || need_size(dx, 0, N, "rows", why) ||
               need_size(dx, 1, D, "features", why) || need_writable(dx, why)))
        return why->status;
    for (int k = 0; k < 2; k++) {
        const tl_tensor *g = k ? db : dw;
        if (!g) continue;
        /* dW in W's dtype: where the kernel writes each row of dW once (tl.h) */
        if (g->dtype != TL_FLOAT32 && (k || !dw_of_x || g->dtype != x->dtype))
            return need_text(g, TL_ERR_DTYPE, !k && dw_of_x ? "must be float32 (an accumulator) or of x's dtype"
                                                            : "must be float32 (an accumulator)", why);
        if (need_ndim(g, k ? 1 : 2, why) || need_size(g, 0, C, "classes", why) ||
            (!k && need_size(g, 1, D, "features", why)) || need_writable(g, why))
            return why->status;
    }
    return TL_OK;
}

/* ---- the fused head's options beyond cross-entropy ----------------------------------------------- */

tl_status
tl_check_head(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *target,
              const tl_tensor *cw, const tl_head_opts *o, const tl_tensor *grow, const tl_tensor *loss,
              const tl_tensor *lse, const tl_tensor *ent, const tl_tensor *dx, const tl_tensor *dw, const tl_tensor *db,
              int dw_of_x, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (!(o->softcap >= 0.0f && o->softcap <= 3.0e38f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'softcap' must be a finite number > 0 (or 0: none)", why);
    if (!(o->temperature > 0.0f && o->temperature <= 3.0e38f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'temperature' must be a finite number > 0", why);
    if (!(o->lse_square_scale >= 0.0f && o->lse_square_scale <= 3.0e38f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'lse_square_scale' must be a finite number >= 0", why);
    if (tl_check_xent(x, w, bias, target, cw, &o->xent, grow, loss, dx, dw, db, dw_of_x, why)) return why->status;
    for (int k = 0; k < 2; k++) {
        const tl_tensor *t = k ? ent : lse;
        if (t && (need_ndim(t, 1, why) || need_dtype_is(t, TL_FLOAT32, why) ||
                  need_size(t, 0, x->shape[0], "rows", why) || need_writable(t, why)))
            return why->status;
    }
    return TL_OK;
}

/* ---- knowledge distillation's rows --------------------------------------------------------------- */

/* Logits of n rows: float32, 2-D, at least one class, each row contiguous. */
static tl_status
need_logits(const tl_tensor *z, int64_t n, tl_check *why)
{
    if (need_ndim(z, 2, why) || need_dtype_is(z, TL_FLOAT32, why) || need_size(z, 0, n, "s.shape[0]", why))
        return why->status;
    if (z->shape[1] < 1) return need_text(z, TL_ERR_SHAPE, "must have at least one class (column)", why);
    if (z->strides[1] != 1 && z->shape[1] > 1 && n > 0)
        return need_text(z, TL_ERR_LAYOUT, "must have unit stride in dim 1 (each row's logits contiguous)", why);
    return TL_OK;
}

tl_status
tl_check_distill_rows(const tl_tensor *s, const tl_tensor *t, const tl_tensor *target, const tl_distill_opts *o,
                      const tl_tensor *loss, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (!(o->temperature > 0.0f && o->temperature <= 3.0e38f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'temperature' must be a finite number > 0", why);
    if (!(o->alpha >= 0.0f && o->alpha <= 1.0f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'alpha' must be in [0, 1]", why);
    if (o->divergence < TL_DIV_KL || o->divergence > TL_DIV_JSD)
        return need_text(NULL, TL_ERR_VALUE, "argument 'divergence' must be 0 (kl), 1 (reverse_kl) or 2 (jsd)", why);
    if (!(o->beta >= 0.0f && o->beta <= 1.0f))
        return need_text(NULL, TL_ERR_VALUE, "argument 'beta' must be in [0, 1]", why);
    if (need_ndim(s, 2, why)) return why->status;
    const int64_t n = s->shape[0];
    if (need_logits(s, n, why) || need_logits(t, n, why)) return why->status;
    /* A class one side lacks has probability 0 there: KL against it is infinite where the other has mass. */
    const int div = o->divergence != TL_DIV_JSD ? o->divergence
                    : o->beta == 0.0f           ? TL_DIV_KL
                    : o->beta == 1.0f           ? TL_DIV_REVERSE_KL
                                                : TL_DIV_JSD;
    if (div == TL_DIV_KL && t->shape[1] > s->shape[1])
        return need_text(t, TL_ERR_SHAPE, "has more classes than s: KL(p_t || p_s) is infinite where s has no "
                         "class (the forward KL needs s.shape[1] >= t.shape[1])", why);
    if (div == TL_DIV_REVERSE_KL && s->shape[1] > t->shape[1])
        return need_text(s, TL_ERR_SHAPE, "has more classes than t: KL(p_s || p_t) is infinite where t has no "
                         "class (the reverse KL needs t.shape[1] >= s.shape[1])", why);
    if (target && (need_ndim(target, 1, why) || need_index(target, why) ||
                   need_size(target, 0, n, "s.shape[0]", why)))
        return why->status;
    if (need_ndim(loss, 1, why) || need_dtype_is(loss, TL_FLOAT32, why) || need_size(loss, 0, n, "s.shape[0]", why))
        return why->status;
    /* s and loss are written while other threads read t (and target) */
    if (need_writable(s, why) || need_writable(loss, why) || need_apart(s, t, why) || need_apart(loss, s, why) ||
        need_apart(loss, t, why) || need_apart(s, target, why) || need_apart(loss, target, why))
        return why->status;
    return TL_OK;
}

/* ---- dropout and LoRA ---------------------------------------------------------------------------- */

tl_status
tl_check_dropout(const tl_tensor *x, const tl_tensor *out, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(x, 2, why) || need_float(x, why) || need_ndim(out, 2, why) || need_f32_or(out, x, why) ||
        need_writable(out, why) || need_size(out, 0, x->shape[0], "x's rows", why) ||
        need_size(out, 1, x->shape[1], "x's columns", why))
        return why->status;
    return TL_OK;
}

/* The layer: x (N, in), w (out, in), a (r, in), b (out, r), bias NULL or (out,), one float dtype. */
static tl_status
lora_layer(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *a, const tl_tensor *b,
           tl_check *why)
{
    if (need_ndim(x, 2, why) || need_ndim(w, 2, why) || need_ndim(a, 2, why) || need_ndim(b, 2, why))
        return why->status;
    if (need_float(x, why) || need_dtype_of(w, x, why) || need_dtype_of(a, x, why) || need_dtype_of(b, x, why))
        return why->status;
    const int64_t in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if (need_size(w, 1, in, "x's in_features", why) || need_size(a, 1, in, "x's in_features", why) ||
        need_size(b, 0, out, "w's out_features", why) || need_size(b, 1, r, "a's rank", why))
        return why->status;
    if (bias && (need_ndim(bias, 1, why) || need_dtype_of(bias, x, why) ||
                 need_size(bias, 0, out, "w's out_features", why)))
        return why->status;
    return TL_OK;
}

/* An output (NULL: not wanted) of rows x cols, of ref's dtype or float32 (f32). */
static tl_status
lora_out(const tl_tensor *t, const tl_tensor *ref, int64_t rows, int64_t cols, int f32, tl_check *why)
{
    if (!t) return TL_OK;
    if (need_ndim(t, 2, why) || need_writable(t, why) || need_dtype_is(t, f32 ? TL_FLOAT32 : ref->dtype, why) ||
        need_size(t, 0, rows, "rows", why) || need_size(t, 1, cols, "columns", why))
        return why->status;
    return TL_OK;
}

tl_status
tl_check_lora_forward(const tl_tensor *x, const tl_tensor *w, const tl_tensor *bias, const tl_tensor *a,
                      const tl_tensor *b, const tl_tensor *y, const tl_tensor *su, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (lora_layer(x, w, bias, a, b, why)) return why->status;
    const int64_t N = x->shape[0], out = w->shape[0], r = a->shape[0];
    return lora_out(y, x, N, out, 0, why) || lora_out(su, x, N, r, 0, why) ? why->status : TL_OK;
}

tl_status
tl_check_lora_backward(const tl_tensor *dy, const tl_tensor *x, const tl_tensor *w, const tl_tensor *a,
                       const tl_tensor *b, const tl_tensor *su, const tl_tensor *dx, const tl_tensor *da,
                       const tl_tensor *db, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (lora_layer(x, w, NULL, a, b, why)) return why->status;
    const int64_t N = x->shape[0], in = x->shape[1], out = w->shape[0], r = a->shape[0];
    if (need_ndim(dy, 2, why) || need_dtype_of(dy, x, why) || need_size(dy, 0, N, "x's rows", why) ||
        need_size(dy, 1, out, "w's out_features", why) || need_ndim(su, 2, why) || need_dtype_of(su, x, why) ||
        need_size(su, 0, N, "x's rows", why) || need_size(su, 1, r, "a's rank", why))
        return why->status;
    if (lora_out(dx, x, N, in, 0, why) || lora_out(da, x, r, in, 1, why) || lora_out(db, x, out, r, 1, why))
        return why->status;
    return TL_OK;
}

/* ---- pooling and AdamW --------------------------------------------------------------------------- */

tl_status
tl_check_pool(const tl_tensor *h, const tl_tensor *mask, int mode, const tl_tensor *out, int apart, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(h, 3, why) || need_ndim(out, 2, why) || need_float(h, why) || need_f32_or(out, h, why))
        return why->status;
    const int64_t B = h->shape[0], T = h->shape[1], D = h->shape[2];
    if (need_size(out, 0, B, "h.shape[0]", why) || need_size(out, 1, D, "h.shape[2]", why) ||
        need_writable(out, why))
        return why->status;
    if (mask) {
        const tl_dtype md = mask->dtype;
        if (need_dtype_or(mask, md == TL_INT64 || md == TL_INT32 || md == TL_UINT8, "int64, int32, uint8 (bool)",
                          h, why) ||
            need_ndim(mask, 2, why) || need_size(mask, 0, B, "h.shape[0]", why) ||
            need_size(mask, 1, T, "h.shape[1]", why))
            return why->status;
    }
    if (mode == TL_POOL_CLS && T == 0 && B > 0 && D > 0)
        return need_text(h, TL_ERR_SHAPE, "has no tokens (h.shape[1] == 0); cls pooling takes the first one", why);
    if (apart && (need_apart(out, h, why) || need_apart(out, mask, why))) return why->status;
    return TL_OK;
}

tl_status
tl_check_adamw(const tl_tensor *param, const tl_tensor *grad, const tl_tensor *exp_avg, const tl_tensor *exp_avg_sq,
               const tl_tensor *anchor, int apart, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    const tl_tensor *all[] = {param, grad, exp_avg, exp_avg_sq, anchor};
    const int n = anchor ? 5 : 4;
    for (int k = 0; k < n; k++)
        if (need_ndim(all[k], 1, why)) return why->status;
    if (need_float(param, why) || need_f32_or(grad, param, why)) return why->status;
    for (int k = 2; k < 4; k++)
        if (need_dtype(all[k], all[k]->dtype == TL_FLOAT32, "float32 (optimizer state is kept in float32)", why))
            return why->status;
    if (anchor && need_dtype_of(anchor, param, why)) return why->status;
    for (int k = 1; k < n; k++)
        if (need_size(all[k], 0, param->shape[0], "param's numel", why)) return why->status;
    if (need_writable(param, why) || need_writable(exp_avg, why) || need_writable(exp_avg_sq, why))
        return why->status;
    /* Each element is read and written by one thread: the three outputs must not share memory with
     * each other or with the tensors read. */
    if (apart && (need_apart(param, exp_avg, why) || need_apart(param, exp_avg_sq, why) ||
                  need_apart(exp_avg, exp_avg_sq, why) || need_apart(param, grad, why) ||
                  need_apart(exp_avg, grad, why) || need_apart(exp_avg_sq, grad, why) ||
                  need_apart(param, anchor, why) || need_apart(exp_avg, anchor, why) ||
                  need_apart(exp_avg_sq, anchor, why)))
        return why->status;
    return TL_OK;
}

/* ---- the int8 linear layer ----------------------------------------------------------------------- */

tl_status
tl_check_int8_linear(const tl_tensor *x, const tl_tensor *bias, const tl_tensor *y, int64_t N, int64_t K,
                     tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (need_ndim(x, 2, why) || need_float(x, why) || need_size(x, 1, K, "the weight's in_features", why))
        return why->status;
    if (bias && (need_ndim(bias, 1, why) || need_f32_or(bias, x, why) ||
                 need_size(bias, 0, N, "the weight's out_features", why)))
        return why->status;
    if (need_ndim(y, 2, why) || need_f32_or(y, x, why) || need_size(y, 0, x->shape[0], "x.shape[0]", why) ||
        need_size(y, 1, N, "the weight's out_features", why) || need_writable(y, why) || need_apart(y, x, why))
        return why->status;
    return TL_OK;
}

/* w (N, K) int8 and its float32 scales, (N,) or (N, ceil(K / group)). */
static tl_status
need_int8_weight(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_check *why)
{
    if (need_ndim(w, 2, why) || need_dtype_is(w, TL_INT8, why) || need_dtype_is(w_scale, TL_FLOAT32, why))
        return why->status;
    if (w_scale->ndim == 1 ? need_size(w_scale, 0, w->shape[0], "w.shape[0]", why)
        : w_scale->ndim == 2 ? need_size(w_scale, 0, w->shape[0], "w.shape[0]", why) ||
                                   need_size(w_scale, 1, (w->shape[1] + group - 1) / group, "the groups of w's rows",
                                             why)
                             : need_text(w_scale, TL_ERR_SHAPE, "must have 1 dim (a scale a channel) or 2 (a scale a "
                                                                "channel and group)", why))
        return why->status;
    return TL_OK;
}

tl_status
tl_check_int8_pack(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (!tl_int8_group_ok(group))
        return need_text(NULL, TL_ERR_VALUE, "argument 'group' must be a multiple of 4 in [4, 512]", why);
    return need_int8_weight(w, w_scale, group, why);
}

tl_status
tl_check_int8_dequant(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, const tl_tensor *out, tl_check *why)
{
    tl_check none = {0};
    if (!why) why = &none;
    if (group < 1) return need_text(NULL, TL_ERR_VALUE, "argument 'group' must be positive", why);
    if (need_int8_weight(w, w_scale, group, why) || need_ndim(out, 2, why) || need_float(out, why) ||
        need_size(out, 0, w->shape[0], "w.shape[0]", why) || need_size(out, 1, w->shape[1], "w.shape[1]", why) ||
        need_writable(out, why) || need_apart(out, w, why) || need_apart(out, w_scale, why))
        return why->status;
    return TL_OK;
}
