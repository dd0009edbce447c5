/* gemm.c: C[M,N] = alpha * A[M,K] @ B[K,N] + beta * C[M,N] + bias[N], float32 accumulation.
 *
 * Blocked in the manner of Goto and BLIS, with the operands' roles chosen for a broadcast-A kernel:
 *   for ic (MC rows of A):  for pc (KC of K):
 *       pack A[ic:ic+MC, pc:pc+KC] into MR-row slivers            (shared by all threads, ~L3)
 *       for each work item (an NC-column block of B, maybe a share of the A slivers), in parallel:
 *           pack B[pc:pc+KC, jc:jc+NC] into NR-column slivers    (per thread, ~L2)
 *           for each A sliver (MR x KC, stays in L1):  for each B sliver:  MR x NR micro-kernel
 * Packing reads any strides and converts bfloat16/float16 to float32, so the micro-kernels see only
 * contiguous float32; float32 rows that run across a sliver (row-major A, B = W^T) go through 16 x 16
 * register transposes, and a sliver's rows adjacent in memory (A = dZ^T) are copied as runs. Partial
 * sums live in C itself when C is float32; otherwise in the caller's float32 workspace, rounded to C's
 * dtype once after the last K block. Each C element is summed in the same order whatever the thread
 * count, so results do not depend on it.
 * Memory: A is read ceil(N/NC) times per K block, B ceil(M/MC) times, C once per K block;
 * scratch: MC x KC + threads x KC x NC floats (at most 6 MB + 0.5 MB per thread).
 * Three shapes skip packing A: a short side of A M^T (tl_gemm_nt_direct, dot products); many rows of
 * a float32 A against an M of 32-512 rows (gemm_nt_rows: A's rows broadcast in place against M^T packed
 * once, as in the head's Z = X W^T); and float32 C (+)= A B with few rows of A given as a transposed
 * view (tl_gemm_tn_bcast: A^T's rows broadcast in place, as the head's dW = dZ^T X and LoRA's rank-r
 * gradients have it).
 * Files: this one holds the driver (blocking, threads, writing tiles back) and the entry points; the
 * micro-kernels are in gemm_kernels.c, the packing in gemm_pack.c, the paths without packing in
 * gemm_direct.c, the column sums (tl_colsum_cpu) in gemm_colsum.c; gemm_internal.h joins them. */
#include "gemm_internal.h"

#define KC TL_GEMM_KC
#ifndef KC_F32
#define KC_F32 512 /* float32 K blocks (balanced, >= KC: K <= KC is always one block, so needs no ws) */
#endif
#define MC_MAX 4032 /* a multiple of every MR (gemm_kernels.c); A's block (6 MB) sits in L3 */
#define NC_MAX 320 /* a multiple of every NR */

/* ---- writing a tile back ------------------------------------------------------------------------ */

typedef struct {
    const tl_tensor *a, *b, *bias;
    tl_tensor *c;
    float *ws; /* float32 partials (ld = N) when C is not float32 and K spans several blocks */
    float alpha, beta;
    int64_t M, N, K;
} gemm_job;

/* C[i0:i0+mn, j0:j0+nn] (+)= alpha * tile, adding beta*C + bias on the first K block and rounding to
 * C's dtype on the last one. Each row goes through a float32 line buffer in short, branch-free loops
 * that the compiler vectorises, whatever C's dtype and strides. */
static void
store_tile(const gemm_job *g, const float *tile, int nr, int64_t i0, int64_t j0, int mn, int nn,
           int first, int last)
{
    const tl_tensor *c = g->c;
    const int64_t sc0 = c->strides[0], sc1 = c->strides[1];
    const int c_f32 = c->dtype == TL_FLOAT32, unit = sc1 == 1;
    const float alpha = g->alpha, beta = g->beta;
    float bias[NR_MAX], v[NR_MAX];
    if (first && g->bias)
        for (int j = 0; j < nn; j++)
            bias[j] = tl_load_f(g->bias->data, (j0 + j) * g->bias->strides[0], g->bias->dtype);
    else
        for (int j = 0; j < nn; j++) bias[j] = 0.0f;
    for (int r = 0; r < mn; r++) {
        const float *t = tile + r * nr;
        const int64_t crow = (i0 + r) * sc0 + j0 * sc1;
        float *wp = g->ws ? g->ws + (i0 + r) * g->N + j0 : NULL;
        if (c_f32 && unit) { /* the common case: C is its own accumulator */
            float *cp = (float *)c->data + crow;
            if (!first)
                for (int j = 0; j < nn; j++) cp[j] += alpha * t[j];
            else if (beta != 0.0f)
                for (int j = 0; j < nn; j++) cp[j] = alpha * t[j] + beta * cp[j] + bias[j];
            else
                for (int j = 0; j < nn; j++) cp[j] = alpha * t[j] + bias[j];
            continue;
        }
        /* v = what this K block adds to what came before */
        if (!first) {
            const float *prev = c_f32 ? NULL : wp;
            if (prev)
                for (int j = 0; j < nn; j++) v[j] = alpha * t[j] + prev[j];
            else
                for (int j = 0; j < nn; j++) v[j] = alpha * t[j] + ((const float *)c->data)[crow + j * sc1];
        } else {
            for (int j = 0; j < nn; j++) v[j] = alpha * t[j] + bias[j];
            if (beta != 0.0f)
                for (int j = 0; j < nn; j++) v[j] += beta * tl_load_f(c->data, crow + j * sc1, c->dtype);
        }
        if (!last && !c_f32) { /* partial sums wait in the float32 workspace */
            memcpy(wp, v, (size_t)nn * sizeof(float));
        } else if (c->dtype == TL_BFLOAT16 && unit) {
            uint16_t *cp = (uint16_t *)c->data + crow;
            for (int j = 0; j < nn; j++) cp[j] = tl_f32_to_bf16(v[j]);
        } else {
            for (int j = 0; j < nn; j++) tl_store_f(c->data, crow + j * sc1, c->dtype, v[j]);
        }
    }
}

/* Ask for the C tile's lines while the micro-kernel computes, so its update does not wait on memory. */
static inline void
prefetch_tile(const tl_tensor *c, int64_t i0, int64_t j0, int mn, int nn)
{
    const int64_t es = (int64_t)tl_dtype_size(c->dtype);
    if (c->strides[1] != 1) return;
    for (int r = 0; r < mn; r++) {
        const char *p = (const char *)c->data + ((i0 + r) * c->strides[0] + j0) * es;
        __builtin_prefetch(p, 1, 3);
        if (nn * es > 64) __builtin_prefetch(p + 64, 1, 3);
    }
}

/* K == 0: C = beta * C + bias. */
static void
gemm_k0(const gemm_job *g)
{
    const tl_tensor *c = g->c;
    for (int64_t i = 0; i < g->M; i++)
        for (int64_t j = 0; j < g->N; j++) {
            int64_t off = i * c->strides[0] + j * c->strides[1];
            float v = g->bias ? tl_load_f(g->bias->data, j * g->bias->strides[0], g->bias->dtype) : 0.0f;
            if (g->beta != 0.0f) v += g->beta * tl_load_f(c->data, off, c->dtype);
            tl_store_f(c->data, off, c->dtype, v);
        }
}

/* ---- the driver --------------------------------------------------------------------------------- */


static tl_status
check_float_2d(const tl_tensor *t)
{
    tl_status st = tl_check_cpu(t, 2);
    return st ? st : tl_is_float_dtype(t->dtype) ? TL_OK : TL_ERR_DTYPE;
}

static tl_status
check_args(const tl_tensor *a, const tl_tensor *b, const bscale *sc, const tl_tensor *a2, const tl_tensor *b2,
           const tl_tensor *bias, const tl_tensor *c, const tl_tensor *ws)
{
    tl_status st;
    if ((st = check_float_2d(a)) || (st = tl_check_cpu(b, 2)) || (st = tl_check_cpu(c, 2))) return st;
    if (!tl_is_float_dtype(b->dtype) && !(b->dtype == TL_INT8 && sc->t)) return TL_ERR_DTYPE;
    if (c->dtype != TL_FLOAT32 && c->dtype != a->dtype && (c->dtype != b->dtype || !tl_is_float_dtype(b->dtype)))
        return TL_ERR_DTYPE;
    if (sc->t) {
        if ((st = tl_check_cpu(sc->t, 1))) return st;
        if (!tl_is_float_dtype(sc->t->dtype)) return TL_ERR_DTYPE;
        if ((sc->axis != 0 && sc->axis != 1) || sc->t->shape[0] != b->shape[sc->axis]) return TL_ERR_SHAPE;
    }
    if (a->shape[1] != b->shape[0] || c->shape[0] != a->shape[0] || c->shape[1] != b->shape[1])
        return TL_ERR_SHAPE;
    int64_t K = a->shape[1];
    if (!a2 != !b2) return TL_ERR_VALUE;
    if (a2) {
        if ((st = check_float_2d(a2)) || (st = check_float_2d(b2))) return st;
        if (a2->shape[1] != b2->shape[0] || a2->shape[0] != c->shape[0] || b2->shape[1] != c->shape[1])
            return TL_ERR_SHAPE;
        K += a2->shape[1];
    }
    if (bias) {
        if ((st = tl_check_cpu(bias, 1))) return st;
        if (!tl_is_float_dtype(bias->dtype)) return TL_ERR_DTYPE;
        if (bias->shape[0] != c->shape[1]) return TL_ERR_SHAPE;
    }
    if (c->dtype != TL_FLOAT32 && K > KC && tl_numel(c) > 0) {
        if (!ws) return TL_ERR_VALUE;
        if ((st = tl_check_cpu(ws, 1))) return st;
        if (ws->dtype != TL_FLOAT32 || ws->strides[0] != 1 || ws->shape[0] < tl_numel(c))
            return TL_ERR_VALUE;
    }
    return TL_OK;
}

/* The K blocks: segment 1's in equal steps of at most kc_blk; a short segment 2 (at most half a block,
 * or all of K fitting one block) rides along in segment 1's last block, so that it costs no extra pass
 * over C; a long one gets blocks of its own. */
typedef struct {
    int64_t k1, n1; /* [k1, k1+n1) of segment 1 */
    int64_t k2, n2; /* [k2, k2+n2) of segment 2 */
} kblock;

static int64_t
kblocks(int64_t K1, int64_t K2, int64_t kc_blk, kblock *out)
{
    const int ride = K2 > 0 && K1 > 0 && (K2 <= kc_blk / 2 || K1 + K2 <= kc_blk); /* K <= KC: one block */
    /* blocks of equal size, none above kc_blk: as few passes over C as the block size allows */
    const int64_t nb1 = (K1 + kc_blk - 1) / kc_blk, step = nb1 ? (K1 + nb1 - 1) / nb1 : kc_blk;
    int64_t n = 0;
    for (int64_t pc = 0; pc < K1; pc += step, n++) {
        kblock b = {pc, K1 - pc < step ? K1 - pc : step, 0, 0};
        if (ride && pc + b.n1 == K1) b.n2 = K2;
        if (out) out[n] = b;
    }
    if (!ride)
        for (int64_t pc = 0; pc < K2; pc += kc_blk, n++)
            if (out) out[n] = (kblock){0, 0, pc, K2 - pc < kc_blk ? K2 - pc : kc_blk};
    return n;
}


/* C = alpha * (A B + A2 B2) + beta C + bias: a GEMM over the concatenation [A | A2] [B ; B2] of the two
 * K ranges (A2 and B2 both NULL: a plain GEMM). The CPU core's LoRA kernels add their low-rank product
 * inside the base GEMM this way. */
static tl_status
gemm_run(const tl_tensor *a, const tl_tensor *b, bscale sc, const tl_tensor *a2, const tl_tensor *b2,
         const tl_tensor *bias, tl_tensor *c, float alpha, float beta, tl_tensor *ws, int nthreads)
{
    tl_status st = check_args(a, b, &sc, a2, b2, bias, c, ws);
    if (st) return st;
    const int64_t M = a->shape[0], K1 = a->shape[1], N = b->shape[1], K2 = a2 ? a2->shape[1] : 0;
    const int64_t K = K1 + K2;
    gemm_job g = {a, b, bias, c, NULL, alpha, beta, M, N, K};
    if (M == 0 || N == 0) return TL_OK;
    if (K == 0) {
        gemm_k0(&g);
        return TL_OK;
    }
    if (c->dtype != TL_FLOAT32 && K > KC) g.ws = (float *)ws->data; /* required by check_args */
#ifdef TL_X86
    if (!a2 && !sc.t && tl_gemm_tn_bcast(a, b, bias, c, alpha, beta, nthreads)) return TL_OK;
#endif
    if (!a2 && !sc.t && (b->strides[0] == 1 || K == 1)) { /* B = M^T with M's rows contiguous */
        const tl_tensor bT = {.data = b->data, .dtype = b->dtype, .device = b->device, .ndim = 2,
                              .shape = {N, K}, .strides = {b->strides[1], b->strides[0]}};
        const int done = tl_gemm_nt_direct(a, &bT, bias, c, alpha, beta, nthreads, 0);
        if (done) return done < 0 ? TL_ERR_NOMEM : TL_OK;
    }

    tl_dtype dt = a->dtype == b->dtype && !sc.t ? a->dtype : TL_FLOAT32;
    if (K2 && (a2->dtype != dt || b2->dtype != dt)) dt = TL_FLOAT32;
    const isa_desc *isa = tl_gemm_isa(dt);
    const int mr = isa->mr, nr = isa->nr, pairs = isa->bf16_pairs;
    int nt = tl_threads_for(nthreads, 2.0 * (double)M * N * K);
    /* Below ~2 MFLOP the fork/join costs more than a second thread saves. */
    if ((double)M * N * K < 1e6) nt = 1;

    /* Column blocks: at most NC_MAX wide, as many as a multiple of the thread count when N allows, all
     * of about equal width. When there are fewer column blocks than threads, the A slivers of each
     * block are shared out too. */
    int64_t nblk = (N + NC_MAX - 1) / NC_MAX;
    if (nblk < nt) nblk = (N + nr - 1) / nr < nt ? (N + nr - 1) / nr : nt;
    else if (nblk % nt) nblk += nt - nblk % nt;
    int64_t nc = (N + nblk - 1) / nblk;
    nc = (nc + nr - 1) / nr * nr;
    nblk = (N + nc - 1) / nc;
    const int64_t msplit = nblk >= nt ? 1 : (nt + nblk - 1) / nblk;
    /* With few rows of A, packing B costs as much as multiplying by it: float32 B with contiguous rows
     * is then read in place (full slivers; a partial last sliver is still packed). */
    const int b_direct = !pairs && !sc.t && !a2 && b->dtype == TL_FLOAT32 && (b->strides[1] == 1 || N == 1) &&
                         (M <= 4 * mr || (M <= 128 && N <= 1024));
    /* Row blocks of equal height, so that B is packed as few times as possible. */
    const int64_t nblk_m = (M + MC_MAX - 1) / MC_MAX;
    const int64_t mc_max = ((M + nblk_m - 1) / nblk_m + mr - 1) / mr * mr;
    /* K blocks of KC floats, or of 2*KC bfloat16 (the same bytes) for the pair kernel: fewer passes
     * over C, and no float32 partials at all for K <= 2*KC. A sliver row holds kstep floats (pairs). */
    const int64_t kc_blk = pairs ? 2 * KC : KC_F32;
    const int64_t nkb = kblocks(K1, K2, kc_blk, NULL);
    kblock *blocks = malloc((size_t)nkb * sizeof *blocks);
    if (!blocks) return TL_ERR_NOMEM;
    kblocks(K1, K2, kc_blk, blocks);
    int64_t kstep_max = 0;
    for (int64_t q = 0; q < nkb; q++) {
        const int64_t ks = pairs ? (blocks[q].n1 + 1) / 2 + (blocks[q].n2 + 1) / 2 : blocks[q].n1 + blocks[q].n2;
        if (ks > kstep_max) kstep_max = ks;
    }

    float *apack = scratch_alloc((size_t)(mc_max * kstep_max));
    float *bpack = scratch_alloc((size_t)nt * (size_t)(kstep_max * nc));
    if (!apack || !bpack) {
        free(apack);
        free(bpack);
        free(blocks);
        return TL_ERR_NOMEM;
    }

    /* Whole tiles of the float32 kernel go straight into C, without the tile buffer, where C is float32
     * with unit column stride, alpha is 1 and beta 0 or 1, and a bias is float32 with unit stride. */
#ifdef TL_X86
    const int to_c = isa == &tl_isa_avx512 && c->dtype == TL_FLOAT32 && (c->strides[1] == 1 || N == 1) &&
                     alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
                     (!bias || (bias->dtype == TL_FLOAT32 && (bias->strides[0] == 1 || N == 1)));
#endif
    /* One parallel region for the whole GEMM; between blocks the team meets at tl_barrier (which sleeps
     * when a thread is late) rather than at the end of a region per block. */
    tl_barrier bar;
    if (tl_barrier_init(&bar)) {
        free(apack);
        free(bpack);
        free(blocks);
        return TL_ERR_NOMEM;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        TEAM_IDS(tid, nth);
        float *bp = bpack + (size_t)tid * (size_t)(kstep_max * nc);
        float tile[MR_MAX * NR_MAX] __attribute__((aligned(64)));
        for (int64_t ic = 0; ic < M; ic += mc_max) {
            const int64_t mc = M - ic < mc_max ? M - ic : mc_max;
            const int64_t nsl_a = (mc + mr - 1) / mr;
            for (int64_t q = 0; q < nkb; q++) {
                const kblock kb = blocks[q];
                const int first = q == 0, last = q == nkb - 1;
                const int64_t kp1 = pairs ? (kb.n1 + 1) / 2 : kb.n1; /* segment 2's offset in a sliver row */
                const int64_t kstep = kp1 + (pairs ? (kb.n2 + 1) / 2 : kb.n2);
                const int64_t kc_kernel = pairs ? 2 * kstep : kstep; /* the pair kernel runs (kc+1)/2 steps */
                /* Pack A: contiguous shares of the slivers. */
                int64_t s0 = nsl_a * tid / nth, s1 = nsl_a * (tid + 1) / nth;
                if (pairs) {
                    if (kb.n1) tl_gemm_pack_a_pairs(a, ic, mc, kb.k1, kb.n1, mr, s0, s1, (uint16_t *)apack, kstep, 0);
                    if (kb.n2)
                        tl_gemm_pack_a_pairs(a2, ic, mc, kb.k2, kb.n2, mr, s0, s1, (uint16_t *)apack, kstep, kp1);
                } else {
                    if (kb.n1) tl_gemm_pack_a(a, ic, mc, kb.k1, kb.n1, mr, s0, s1, apack, kstep, 0);
                    if (kb.n2) tl_gemm_pack_a(a2, ic, mc, kb.k2, kb.n2, mr, s0, s1, apack, kstep, kp1);
                }
                tl_barrier_wait(&bar, nth); /* A packed */
#pragma omp for schedule(dynamic, 1) nowait
                for (int64_t w = 0; w < nblk * msplit; w++) {
                    const int64_t jb = w / msplit, part = w % msplit;
                    const int64_t j0 = jb * nc, ncw = N - j0 < nc ? N - j0 : nc;
                    const int64_t is0 = nsl_a * part / msplit, is1 = nsl_a * (part + 1) / msplit;
                    if (is0 == is1) continue;
                    const int64_t nfull = b_direct ? ncw / nr * nr : 0; /* columns read in place */
                    if (b_direct) {
                        if (ncw > nfull)
                            tl_gemm_pack_b(b, &sc, kb.k1, kb.n1, j0 + nfull, ncw - nfull, nr, bp, kstep, 0);
                    } else if (pairs) {
                        if (kb.n1) tl_gemm_pack_b_pairs(b, kb.k1, kb.n1, j0, ncw, nr, (uint16_t *)bp, kstep, 0);
                        if (kb.n2) tl_gemm_pack_b_pairs(b2, kb.k2, kb.n2, j0, ncw, nr, (uint16_t *)bp, kstep, kp1);
                    } else {
                        if (kb.n1) tl_gemm_pack_b(b, &sc, kb.k1, kb.n1, j0, ncw, nr, bp, kstep, 0);
                        if (kb.n2) tl_gemm_pack_b(b2, NULL, kb.k2, kb.n2, j0, ncw, nr, bp, kstep, kp1);
                    }
                    const int64_t nsl_b = (ncw + nr - 1) / nr;
                    for (int64_t is = is0; is < is1; is++) {
                        const float *ap = apack + is * mr * kstep;
                        const int mn = (int)(mc - is * mr < mr ? mc - is * mr : mr);
                        for (int64_t js = 0; js < nsl_b; js++) {
                            const int nn = (int)(ncw - js * nr < nr ? ncw - js * nr : nr);
                            const int in_place = js * nr < nfull; /* B's sliver read where it is */
                            const float *bs = in_place ? (const float *)b->data + kb.k1 * b->strides[0] + j0 + js * nr
                                                       : bp + (js - nfull / nr) * nr * kstep;
                            const int64_t ldbs = in_place ? b->strides[0] : nr;
                            prefetch_tile(c, ic + is * mr, j0 + js * nr, mn, nn);
#ifdef TL_X86
                            if (to_c && mn == 12 && nn == 32) {
                                tl_gemm_ukernel_avx512_to_c(
                                    kc_kernel, ap, bs, ldbs,
                                    (float *)c->data + (ic + is * mr) * c->strides[0] + j0 + js * nr, c->strides[0],
                                    !first || beta != 0.0f,
                                    first && bias ? (const float *)bias->data + j0 + js * nr : NULL);
                                continue;
                            }
                            if (!in_place && nn <= 16 && isa == &tl_isa_avx512)
                                tl_gemm_ukernel_avx512_n16(kc_kernel, ap, bs, nr, tile);
                            else
#endif
                                isa->kernel(kc_kernel, ap, bs, ldbs, tile);
                            store_tile(&g, tile, nr, ic + is * mr, j0 + js * nr, mn, nn, first, last);
                        }
                    }
                }
                if (ic + mc < M || q + 1 < nkb)
                    tl_barrier_wait(&bar, nth); /* A's block no longer read: the next may be packed over it */
            }
        }
    }
    tl_barrier_destroy(&bar);
    free(apack);
    free(bpack);
    free(blocks);
    return TL_OK;
}

tl_status
tl_gemm2_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *a2, const tl_tensor *b2,
             const tl_tensor *bias, tl_tensor *c, float alpha, float beta, tl_tensor *ws, int nthreads)
{
    return gemm_run(a, b, (bscale){NULL, 0}, a2, b2, bias, c, alpha, beta, ws, nthreads);
}

tl_status
tl_gemm_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c, float alpha,
            float beta, tl_tensor *ws, int nthreads)
{
    return gemm_run(a, b, (bscale){NULL, 0}, NULL, NULL, bias, c, alpha, beta, ws, nthreads);
}

tl_status
tl_qgemm_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *b_scale, int scale_axis,
             const tl_tensor *bias, tl_tensor *c, float alpha, float beta, tl_tensor *ws, int nthreads)
{
    if (b->dtype == TL_INT8 && !b_scale) return TL_ERR_VALUE;
    return gemm_run(a, b, (bscale){b_scale, scale_axis}, NULL, NULL, bias, c, alpha, beta, ws, nthreads);
}
