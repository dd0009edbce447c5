/* head_distill_row.h: one row of knowledge distillation (head_distill.c's math), written once for every
 * instruction set. head_distill.c includes it once per vector kit, having defined:
 *   DR_KIT        the attributes of a kit function (target, static, always inline); DR_ROW: the row's
 *   DR_ROW(name)  name with the kit's suffix
 *   DR_W          lanes per vector;  VF: a vector of floats;  VM: a lane mask;  VA: float64 accumulators
 *   vmask(left)   the first min(left, DR_W) lanes (left >= 1)
 *   vload(p, m), vloadf(p, m, f), vstore(p, v, m)   masked loads (0, or f, in lanes off the mask), store
 *   vset, vadd, vsub, vmul, vdiv, vmax, vfma(a, b, c) = a b + c, vabs
 *   vexp(x)       e^x for x <= 0 (-inf gives 0, NaN stays NaN)
 *   vpos(v, e)    v where e > 0, else 0 (a term p log(...) whose p is 0 adds 0, even where the log is -inf)
 *   vhmax(v)      the largest lane
 *   azero(), aadd(a, v, m) (the lanes of v on m, added in float64), asum(a) (in a fixed order)
 * and undefines them at its end, all but DR_ROW (which the includer still needs for the row's entry). */

/* log(1 + y) for y in [0, 1]: 2 atanh(z), z = y / (2 + y) in [0, 1/3], by its series to z^15 (truncation
 * < 2e-9 relative; accurate for tiny y, where 1 + y would round). */
DR_KIT VF
DR_ROW(log1p01)(VF y)
{
    const VF z = vdiv(y, vadd(vset(2.0f), y)), z2 = vmul(z, z);
    VF p = vset(1.0f / 15.0f);
    p = vfma(p, z2, vset(1.0f / 13.0f));
    p = vfma(p, z2, vset(1.0f / 11.0f));
    p = vfma(p, z2, vset(1.0f / 9.0f));
    p = vfma(p, z2, vset(1.0f / 7.0f));
    p = vfma(p, z2, vset(1.0f / 5.0f));
    p = vfma(p, z2, vset(1.0f / 3.0f));
    p = vfma(p, z2, vset(1.0f));
    return vmul(vadd(z, z), p);
}

/* log(1 + e^-d) = max(-d, 0) + log(1 + e^-|d|) */
DR_KIT VF
DR_ROW(softplus_neg)(VF d)
{
    const VF zero = vset(0.0f);
    return vadd(vmax(vsub(zero, d), zero), DR_ROW(log1p01)(vexp(vsub(zero, vabs(d)))));
}

/* The row (dr_spec: head_distill.c), with kind (TL_DIV_*, jsd's beta 0 and 1 already mapped) and hard_t
 * (a hard term at T != 1) constants, so that each combination compiles to its own loops. In a, b
 * (the scaled logits less their maximum, <= 0) with S_u = sum e^a, S_v = sum e^b, ls = a - log S_u,
 * lt = b - log S_v:
 *   kl   D = sum_t p_t (b - a) - log S_v + log S_u             g = c_s (p_s - p_t)
 *   rkl  D = sum_s p_s (a - b) - log S_u + log S_v = q - ...    g = c_s p_s ((a - b) - q)
 *   jsd  with d = ls - lt + log((1-beta)/beta) and sp = log(1 + e^-d):
 *        ls - lm = -log(1-beta) - sp,  lt - lm = -log(beta) - sp - d   (lm = log m; on a side's own
 *        classes the other's p is 0: ls - lm = -log(1-beta), lt - lm = -log(beta))
 *        D = beta sum p_t (lt - lm) + (1-beta) kls,  kls = sum p_s (ls - lm)
 *        g = c_s (1-beta) p_s ((ls - lm) - kls)
 * c_s = T (1 - alpha) (or T without targets): T^2 dD/du times du/ds = 1/T. The hard term adds
 * alpha (softmax(s) - onehot(y)); at T = 1 softmax(s) = p_s, so its part joins p_s's coefficient. */
DR_KIT float
DR_ROW(row_of)(const dr_spec *sp, float *s, const float *t, int64_t y, const int kind, const int hard_t)
{
    const int64_t Vs = sp->Vs, Vt = sp->Vt, V0 = Vs < Vt ? Vs : Vt;
    const VF it = vset(sp->inv_t);
    VF mxs = vset(-INFINITY), mxt = mxs;
    for (int64_t i = 0; i < Vs; i += DR_W) mxs = vmax(mxs, vloadf(s + i, vmask(Vs - i), -INFINITY));
    for (int64_t i = 0; i < Vt; i += DR_W) mxt = vmax(mxt, vloadf(t + i, vmask(Vt - i), -INFINITY));
    const float ms = vhmax(mxs), mt = vhmax(mxt), sy = y >= 0 ? s[y] : 0.0f;
    const VF vms = vset(ms), vmt = vset(mt);

    /* The sums: S_u and S_v over the shared classes (u0, v0) and each side's own (u1, v1); S_1 = sum
     * e^{s - max} (the hard term's, at T != 1); x, kl's or rkl's sum. */
    VA u0 = azero(), u1 = azero(), v0 = azero(), v1 = azero(), s1 = azero(), x = azero();
    for (int64_t i = 0; i < V0; i += DR_W) {
        const VM m = vmask(V0 - i);
        const VF ds = vsub(vload(s + i, m), vms), a = vmul(ds, it), b = vmul(vsub(vload(t + i, m), vmt), it);
        const VF ea = vexp(a), eb = vexp(b);
        u0 = aadd(u0, ea, m);
        v0 = aadd(v0, eb, m);
        if (hard_t) s1 = aadd(s1, vexp(ds), m);
        if (kind == TL_DIV_KL) x = aadd(x, vpos(vmul(eb, vsub(b, a)), eb), m);
        if (kind == TL_DIV_REVERSE_KL) x = aadd(x, vpos(vmul(ea, vsub(a, b)), ea), m);
    }
    for (int64_t i = V0; i < Vs; i += DR_W) {
        const VM m = vmask(Vs - i);
        const VF ds = vsub(vload(s + i, m), vms);
        u1 = aadd(u1, vexp(vmul(ds, it)), m);
        if (hard_t) s1 = aadd(s1, vexp(ds), m);
    }
    for (int64_t i = V0; i < Vt; i += DR_W) {
        const VM m = vmask(Vt - i);
        v1 = aadd(v1, vexp(vmul(vsub(vload(t + i, m), vmt), it)), m);
    }
    const double su0 = asum(u0), su = su0 + asum(u1), sv0 = asum(v0), sv = sv0 + asum(v1);
    const double lsu = log(su), lsv = log(sv), S1 = hard_t ? asum(s1) : su, beta = sp->beta;
    const double lb = kind == TL_DIV_JSD ? log(beta) : 0.0, l1b = kind == TL_DIV_JSD ? log1p(-beta) : 0.0;
    const VF vlsu = vset((float)lsu), vlsv = vset((float)lsv), c = vset((float)(l1b - lb)), rs0 = vset((float)-l1b),
             rt0 = vset((float)-lb);
    double D, q = 0.0, kls = 0.0;
    if (kind == TL_DIV_KL) {
        D = asum(x) / sv - lsv + lsu;
    } else if (kind == TL_DIV_REVERSE_KL) {
        q = asum(x) / su;
        D = q - lsu + lsv;
    } else {
        VA as = azero(), at = azero();
        for (int64_t i = 0; i < V0; i += DR_W) {
            const VM m = vmask(V0 - i);
            const VF ls = vsub(vmul(vsub(vload(s + i, m), vms), it), vlsu);
            const VF lt = vsub(vmul(vsub(vload(t + i, m), vmt), it), vlsv);
            const VF ps = vexp(ls), pt = vexp(lt), d = vadd(vsub(ls, lt), c), spd = DR_ROW(softplus_neg)(d);
            as = aadd(as, vmul(ps, vsub(rs0, spd)), m);
            at = aadd(at, vpos(vmul(pt, vsub(vsub(rt0, spd), d)), pt), m);
        }
        kls = asum(as) - l1b * (su - su0) / su;
        D = beta * (asum(at) - lb * (sv - sv0) / sv) + (1.0 - beta) * kls;
    }

    /* The gradient over s, the shared classes first, then the student's own. al: the hard term's weight
     * where it joins p_s's coefficient (T = 1). */
    const double cs = sp->gsoft * (kind == TL_DIV_JSD ? 1.0 - beta : 1.0), al = hard_t ? 0.0 : sp->alpha;
    const VF ch = vset((float)(sp->alpha / S1));
    if (kind == TL_DIV_KL) {
        const VF ks = vset((float)((cs + al) / su)), kt = vset((float)(cs / sv));
        for (int64_t i = 0; i < V0; i += DR_W) {
            const VM m = vmask(V0 - i);
            const VF ds = vsub(vload(s + i, m), vms), eb = vexp(vmul(vsub(vload(t + i, m), vmt), it));
            VF g = vsub(vmul(ks, vexp(vmul(ds, it))), vmul(kt, eb));
            if (hard_t) g = vfma(ch, vexp(ds), g);
            vstore(s + i, g, m);
        }
        for (int64_t i = V0; i < Vs; i += DR_W) {
            const VM m = vmask(Vs - i);
            const VF ds = vsub(vload(s + i, m), vms);
            VF g = vmul(ks, vexp(vmul(ds, it)));
            if (hard_t) g = vfma(ch, vexp(ds), g);
            vstore(s + i, g, m);
        }
    } else { /* g = p_s (c_s r + al) + the hard term at T != 1, r = dD/du / (c_s p_s) */
        const VF kq = vset((float)q), kk = vset((float)kls), vcs = vset((float)cs), val = vset((float)al);
        for (int64_t i = 0; i < V0; i += DR_W) {
            const VM m = vmask(V0 - i);
            const VF ds = vsub(vload(s + i, m), vms), a = vmul(ds, it), b = vmul(vsub(vload(t + i, m), vmt), it);
            const VF ps = vexp(vsub(a, vlsu));
            VF r;
            if (kind == TL_DIV_REVERSE_KL) {
                r = vsub(vsub(a, b), kq);
            } else {
                const VF d = vadd(vsub(vsub(a, vlsu), vsub(b, vlsv)), c);
                r = vsub(vsub(rs0, DR_ROW(softplus_neg)(d)), kk);
            }
            VF g = vmul(ps, vfma(vcs, r, val));
            if (hard_t) g = vfma(ch, vexp(ds), g);
            vstore(s + i, g, m);
        }
        for (int64_t i = V0; i < Vs; i += DR_W) { /* jsd only (rkl has Vs <= Vt): ls - lm = -log(1-beta) */
            const VM m = vmask(Vs - i);
            const VF ds = vsub(vload(s + i, m), vms), ps = vexp(vsub(vmul(ds, it), vlsu));
            VF g = vmul(ps, vfma(vcs, vsub(rs0, kk), val));
            if (hard_t) g = vfma(ch, vexp(ds), g);
            vstore(s + i, g, m);
        }
    }
    if (y >= 0 && sp->alpha != 0.0f) s[y] -= sp->alpha;
    double loss = sp->lsoft * D;
    if (y >= 0 && sp->alpha != 0.0f) loss += sp->alpha * (log(S1) - ((double)sy - ms));
    return (float)loss;
}

#undef DR_KIT
#undef DR_W
#undef VF
#undef VM
#undef VA
#undef vmask
#undef vload
#undef vloadf
#undef vstore
#undef vset
#undef vadd
#undef vsub
#undef vmul
#undef vdiv
#undef vmax
#undef vfma
#undef vabs
#undef vexp
#undef vpos
#undef vhmax
#undef azero
#undef aadd
#undef asum
