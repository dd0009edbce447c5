/* bind_head.c: the fused linear + cross-entropy head, linear_xent and linear_head (with softcap, temperature,
 * z-loss, lse and entropy) (csrc/cpu/head.c, csrc/cuda/head.cu), for tltorch._C and tltorch._cuda, and
 * tltorch._cuda's xent_workspace (the workspace its plan asks for); distillation's rows, distill_rows
 * (csrc/cpu/head_distill.c), for tltorch._C. */
#include "bind.h"

/* linear_xent's options: ignore_index, label_smoothing in [0, 1], reduction (TL_REDUCE_*). */
static int
get_opts(PyObject *ignore_index, PyObject *label_smoothing, PyObject *reduction, tl_xent_opts *o)
{
    float eps;
    int red;
    long long ign = PyLong_AsLongLong(ignore_index);
    if (ign == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument 'ignore_index' must be an int of at most 64 bits");
        return -1;
    }
    if (tl_get_float(label_smoothing, "label_smoothing", &eps) < 0 || tl_get_int(reduction, "reduction", &red) < 0)
        return -1;
    if (!(eps >= 0.0f && eps <= 1.0f)) { /* %R: PyErr_Format has no float conversion */
        PyErr_Format(PyExc_ValueError, "argument 'label_smoothing' must be in [0, 1], got %R", label_smoothing);
        return -1;
    }
    if (red < TL_REDUCE_MEAN || red > TL_REDUCE_NONE) {
        PyErr_Format(PyExc_ValueError, "argument 'reduction' must be 0 (mean), 1 (sum) or 2 (none)");
        return -1;
    }
    o->ignore_index = ign;
    o->label_smoothing = eps;
    o->reduction = red;
    return 0;
}

/* The float32 workspace, for chunks of (numel - extra) / (CU + D + 1) rows (tl.h; CU: C, or 2C on the CPU with
 * a softcap): room for one row at least, after CUDA's extra; None on the CPU with at most TL_XENT_SKINNY_C
 * classes (one pass, no GEMM). */
static int
check_ws(tl_call *k, const tl_arg *ws, int64_t N, int64_t D, int64_t CU, int64_t C)
{
    const int cpu = k->dev->device == TL_CPU;
    const int64_t extra = cpu ? 0 : TL_XENT_CUDA_WS_EXTRA;
    const tl_tensor *t = &ws->t;
    if (ws->via && tl_check_ndim(t, 1, &k->why)) return tl_raise_check(&k->why);
    if (ws->via ? t->dtype == TL_FLOAT32 && (t->strides[0] == 1 || t->shape[0] <= 1) &&
                      (N == 0 || t->shape[0] >= extra + CU + D + 1)
                : cpu && C <= TL_XENT_SKINNY_C)
        return ws->via && tl_check_writable(t, &k->why) ? tl_raise_check(&k->why) : 0;
    if (cpu)
        PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %s + D + 1 = "
                     "%lld elements (None only with at most %d classes)", CU > C ? "2C" : "C", (long long)(CU + D + 1),
                     TL_XENT_SKINNY_C);
    else
        PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %d + C + D + 1 "
                     "= %lld elements (on CUDA for any number of classes)", TL_XENT_CUDA_WS_EXTRA,
                     (long long)(extra + C + D + 1));
    return -1;
}

#define STR(x) #x
#define XSTR(x) STR(x)

PyDoc_STRVAR(linear_xent_cpu_doc, "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
             "reduction, grad_rows, loss, dx, dw, db, ws, nthreads): the fused linear + cross-entropy head, in place.");
PyDoc_STRVAR(linear_xent_cuda_doc, "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
             "reduction, grad_rows, loss, dx, dw, db, ws, cublas_ws, allow_tf32): the fused linear + cross-entropy "
             "head, in place, on the current stream; ws: float32 of " XSTR(TL_XENT_CUDA_WS_EXTRA) " + rows * (C + D "
             "+ 1) elements.");
PyDoc_STRVAR(linear_head_cpu_doc, "linear_head(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
             "reduction, softcap, temperature, lse_square_scale, grad_rows, loss, lse, entropy, dx, dw, db, ws, "
             "nthreads): linear_xent with the logits softcapped and divided by the temperature, a z-loss, and each "
             "row's log-sum-exp and entropy (float32, or None); with softcap > 0 a row of ws takes 2C + D + 1.");
PyDoc_STRVAR(linear_head_cuda_doc, "linear_head(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
             "reduction, softcap, temperature, lse_square_scale, grad_rows, loss, lse, entropy, dx, dw, db, ws, "
             "cublas_ws, allow_tf32): linear_xent with the logits softcapped and divided by the temperature, a "
             "z-loss, and each row's log-sum-exp and entropy (float32, or None), on the current stream.");

/* linear_head's three options after linear_xent's: softcap, temperature, lse_square_scale. */
static int
get_head_opts(PyObject *const *args, tl_head_opts *o)
{
    if (tl_get_float(args[0], "softcap", &o->softcap) < 0 || tl_get_float(args[1], "temperature", &o->temperature) < 0 ||
        tl_get_float(args[2], "lse_square_scale", &o->lse_square_scale) < 0)
        return -1;
    if (!(o->softcap >= 0.0f && o->softcap <= 3.0e38f)) {
        PyErr_Format(PyExc_ValueError, "argument 'softcap' must be a finite number > 0 (or 0: none), got %R", args[0]);
        return -1;
    }
    if (!(o->temperature > 0.0f && o->temperature <= 3.0e38f)) {
        PyErr_Format(PyExc_ValueError, "argument 'temperature' must be a finite number > 0, got %R", args[1]);
        return -1;
    }
    if (!(o->lse_square_scale >= 0.0f && o->lse_square_scale <= 3.0e38f)) {
        PyErr_Format(PyExc_ValueError, "argument 'lse_square_scale' must be a finite number >= 0, got %R", args[2]);
        return -1;
    }
    return 0;
}

/* linear_xent (head == 0) and linear_head (head == 1): the same call, linear_head with three options after
 * reduction and the lse and entropy outputs after loss. reduction: 0 mean, 1 sum, 2 none; optional tensors may
 * be None. On CUDA every C takes the workspace (its plan: xent_workspace), and dw may be in x's dtype where the
 * plan writes each of its rows once. */
static PyObject *
head_call(PyObject *mod, PyObject *const *args, Py_ssize_t nargs, int head)
{
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("weight"), bias = TL_ARG_INIT("bias"),
           target = TL_ARG_INIT("target"), cw = TL_ARG_INIT("class_weight"), grow = TL_ARG_INIT("grad_rows"),
           loss = TL_ARG_INIT("loss"), lse = TL_ARG_INIT("lse"), ent = TL_ARG_INIT("entropy"), dx = TL_ARG_INIT("dx"),
           dw = TL_ARG_INIT("dw"), db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&x, &w, &target, &ws, &bias, &cw, &grow, &loss, &dx, &dw, &db, &lse, &ent};
    static const int xent_pos[] = {0, 1, 3, 13, 2, 4, 8, 9, 10, 11, 12};
    static const int head_pos[] = {0, 1, 3, 18, 2, 4, 11, 12, 15, 16, 17, 13, 14};
    tl_call k;
    tl_head_opts o = {{0, 0.0f, 0}, 0.0f, 1.0f, 0.0f};
    int64_t bad = 0;
    tl_status st = TL_RAISED;

    if (head ? tl_call_begin(&k, mod, args, nargs, 19, TL_TAIL_CUBLAS, "linear_head(x, w, bias, target, "
                             "class_weight, ignore_index, label_smoothing, reduction, softcap, temperature, "
                             "lse_square_scale, grad_rows, loss, lse, entropy, dx, dw, db, ws") < 0
             : tl_call_begin(&k, mod, args, nargs, 14, TL_TAIL_CUBLAS, "linear_xent(x, w, bias, target, "
                             "class_weight, ignore_index, label_smoothing, reduction, grad_rows, loss, dx, dw, db, "
                             "ws") < 0)
        return NULL;
    if (get_opts(args[5], args[6], args[7], &o.xent) < 0 || (head && get_head_opts(args + 8, &o) < 0) ||
        tl_call_tail(&k) < 0)
        return NULL;
    if (head ? tl_call_import(&k, t, head_pos, TL_COUNT(head_pos), 3) < 0
             : tl_call_import(&k, t, xent_pos, TL_COUNT(xent_pos), 3) < 0)
        goto end;
    const int cpu = k.dev->device == TL_CPU;
    if (tl_call_check(&k, tl_check_head(&x.t, &w.t, tl_opt(&bias), &target.t, tl_opt(&cw), &o, tl_opt(&grow),
                                        tl_opt(&loss), tl_opt(&lse), tl_opt(&ent), tl_opt(&dx), tl_opt(&dw),
                                        tl_opt(&db), !cpu, &k.why)) < 0)
        goto end;
    const int64_t N = x.t.shape[0], D = x.t.shape[1], C = w.t.shape[0];
    if (check_ws(&k, &ws, N, D, C + (cpu && o.softcap > 0.0f ? C : 0), C) < 0 || tl_call_cublas(&k, &k.cws, &x) < 0)
        goto end;

    Py_BEGIN_ALLOW_THREADS
    if (cpu)
        st = k.dev->cpu.linear_head(&x.t, &w.t, tl_opt(&bias), &target.t, tl_opt(&cw), &o, tl_opt(&grow),
                                    tl_opt(&loss), tl_opt(&lse), tl_opt(&ent), tl_opt(&dx), tl_opt(&dw), tl_opt(&db),
                                    tl_opt(&ws), &bad, k.nthreads);
    else
        st = k.dev->cuda.linear_head(k.ctx, &x.t, &w.t, tl_opt(&bias), &target.t, tl_opt(&cw), &o, tl_opt(&grow),
                                     tl_opt(&loss), tl_opt(&lse), tl_opt(&ent), tl_opt(&dx), tl_opt(&dw), tl_opt(&db),
                                     &ws.t, k.cws_data, k.cws_bytes, k.tf32, &bad, k.s.stream);
    Py_END_ALLOW_THREADS
    if (st == TL_ERR_INDEX) {
        PyErr_Format(PyExc_ValueError, "target holds class index %lld, outside [0, %lld) and not ignore_index "
                     "(%lld)", (long long)bad, (long long)C, (long long)o.xent.ignore_index);
        st = TL_RAISED;
    } else if (st == TL_ERR_DTYPE && dw.via && dw.t.dtype != TL_FLOAT32) { /* only CUDA takes such a dw */
        PyErr_SetString(PyExc_TypeError, "argument 'dw' must be float32 with this workspace: chunks of rows add up "
                        "into it (xent_workspace says when it may be in x's dtype)");
        st = TL_RAISED;
    }
end:
    return tl_call_end(&k, t, head ? TL_COUNT(head_pos) : TL_COUNT(xent_pos), st, head ? "linear_head" : "linear_xent",
                       "x and weight each need a unit stride in one dim and a leading dimension covering the other; dx "
                       "and dw a unit stride in dim 1 and rows at least as far apart as they are long");
}

static PyObject *
py_linear_xent(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    return head_call(mod, args, nargs, 0);
}

static PyObject *
py_linear_head(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    return head_call(mod, args, nargs, 1);
}

PyDoc_STRVAR(xent_workspace_doc, "xent_workspace(N, D, C, dx_acc, budget) -> (floats, dw_narrow): linear_xent's "
             "float32 workspace for these sizes within budget elements where it can (the whole batch, else blocks of "
             "classes, else chunks of rows), and whether dw may then be in x's dtype; dx_acc: dx is bfloat16/float16.");

static PyObject *
py_xent_workspace(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    long long v[5];
    if (tl_nargs_is(nargs, 5, "xent_workspace(N, D, C, dx_acc, budget)") < 0) return NULL;
    for (int k = 0; k < 5; k++) {
        v[k] = PyLong_AsLongLong(args[k]);
        if (v[k] == -1 && PyErr_Occurred()) return NULL;
        if (v[k] < 0) {
            PyErr_SetString(PyExc_ValueError, "xent_workspace: sizes must be >= 0");
            return NULL;
        }
    }
    if (v[2] < 1 || v[4] < 1) {
        PyErr_SetString(PyExc_ValueError, "xent_workspace: C and budget must be >= 1");
        return NULL;
    }
    int narrow = 0;
    const int64_t n = tl_module_of(mod)->dev->cuda.xent_workspace(v[0], v[1], v[2], v[3] != 0, v[4], &narrow);
    return Py_BuildValue("(LO)", (long long)n, narrow ? Py_True : Py_False);
}

PyDoc_STRVAR(distill_rows_doc, "distill_rows(s, t, target, ignore_index, temperature, alpha, divergence, beta, loss, "
             "nthreads): each row's distillation loss into loss, and s overwritten with its gradient (float32 logits "
             "of the student s and the teacher t; divergence 0 kl, 1 reverse_kl, 2 jsd; target None: the soft term "
             "alone).");

static PyObject *
py_distill_rows(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg s = TL_ARG_INIT("s"), t = TL_ARG_INIT("t"), target = TL_ARG_INIT("target"), loss = TL_ARG_INIT("loss");
    tl_arg *a[] = {&s, &t, &loss, &target};
    static const int pos[] = {0, 1, 8, 2};
    tl_call k;
    tl_distill_opts o;
    int64_t bad = 0;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 9, TL_TAIL_NONE, "distill_rows(s, t, target, ignore_index, temperature, "
                      "alpha, divergence, beta, loss") < 0)
        return NULL;
    long long ign = PyLong_AsLongLong(args[3]);
    if (ign == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument 'ignore_index' must be an int of at most 64 bits");
        return NULL;
    }
    o.ignore_index = ign;
    if (tl_get_float(args[4], "temperature", &o.temperature) < 0 || tl_get_float(args[5], "alpha", &o.alpha) < 0 ||
        tl_get_int(args[6], "divergence", &o.divergence) < 0 || tl_get_float(args[7], "beta", &o.beta) < 0 ||
        tl_call_tail(&k) < 0)
        return NULL;
    if (tl_call_import(&k, a, pos, TL_COUNT(pos), 3) < 0 ||
        tl_call_check(&k, tl_check_distill_rows(&s.t, &t.t, tl_opt(&target), &o, &loss.t, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->cpu.distill_rows(&s.t, &t.t, tl_opt(&target), &o, &loss.t, &bad, k.nthreads);
    Py_END_ALLOW_THREADS
    if (st == TL_ERR_INDEX) {
        PyErr_Format(PyExc_ValueError, "target holds class index %lld, outside [0, %lld) (s's classes) and not "
                     "ignore_index (%lld)", (long long)bad, (long long)s.t.shape[1], ign);
        st = TL_RAISED;
    }
end:
    return tl_call_end(&k, a, TL_COUNT(pos), st, "distill_rows", NULL);
}

const tl_family tl_head_family = {
    .cpu = (PyMethodDef[]){TL_METHOD("linear_xent", py_linear_xent, linear_xent_cpu_doc),
                           TL_METHOD("linear_head", py_linear_head, linear_head_cpu_doc),
                           TL_METHOD("distill_rows", py_distill_rows, distill_rows_doc), {NULL}},
    .cuda = (PyMethodDef[]){TL_METHOD("linear_xent", py_linear_xent, linear_xent_cuda_doc),
                            TL_METHOD("linear_head", py_linear_head, linear_head_cuda_doc),
                            TL_METHOD("xent_workspace", py_xent_workspace, xent_workspace_doc), {NULL}},
};
