/* gemm_direct.c: the GEMM's paths that skip packing A, for shapes where packing costs as much as the
 * arithmetic: dot products of rows for a short side of A M^T (tl_gemm_nt_direct, also LoRA's rank-r
 * products), A's rows broadcast against M^T packed once for many rows against 32-512 (gemm_nt_rows, the
 * head's Z = X W^T), and A^T's rows broadcast in place for few rows given transposed (tl_gemm_tn_bcast,
 * dW = dZ^T X). Each returns 0 where it does not apply, and the driver (gemm.c) packs instead. */
#include "gemm_internal.h"

/* ---- without packing: C = alpha * A M^T (+ beta C + bias) for a short side -------------------------
 * Each output is the dot product of a row of A and a row of M. Blocks of 4 rows of each and a 4 x 4
 * block of accumulators: 8 loads per 16 FMAs, nothing packed, each row of M read from memory once
 * (the j blocks are the outer loop, A's rows stay in cache). It wins when one side is short (a LoRA
 * rank, a small batch through a linear layer) and packing would cost more than the arithmetic. */
#ifdef TL_X86
/* The two 8-float halves of a vector, added. */
__attribute__((target("avx512f"))) static inline __m256
add_halves(__m512 a)
{
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/* [sum a, sum b, sum c, sum d] of four 16-float vectors: halves added, then horizontal pairs. */
__attribute__((target("avx512f"))) static inline __m128
reduce4(__m512 a, __m512 b, __m512 c, __m512 d)
{
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(add_halves(a), add_halves(b)),
                                    _mm256_hadd_ps(add_halves(c), add_halves(d)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

__attribute__((target("avx512f"))) static void
direct_block(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t K, const float *a, int64_t lda, const float *m,
             int64_t ldm, float alpha, float beta, const tl_tensor *bias, const tl_tensor *c)
{
    const int64_t kfull = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - kfull)) - 1u);
    const int fast = c->dtype == TL_FLOAT32 && c->strides[1] == 1 && beta == 0.0f;
    for (int64_t j = j0; j < j1; j += 4) {
        const float *mr[4];
        for (int q = 0; q < 4; q++) mr[q] = m + (j + q < j1 ? j + q : j1 - 1) * ldm; /* clamped: not stored */
        float bj[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (bias)
            for (int u = 0; u < 4 && j + u < j1; u++) bj[u] = tl_load_f(bias->data, (j + u) * bias->strides[0], bias->dtype);
        const __m128 bv = _mm_loadu_ps(bj);
        for (int64_t i = i0; i < i1; i += 4) {
            const float *ar[4];
            for (int q = 0; q < 4; q++) ar[q] = a + (i + q < i1 ? i + q : i1 - 1) * lda;
            __m512 acc[4][4];
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
#pragma GCC unroll 4
                for (int u = 0; u < 4; u++) acc[q][u] = _mm512_setzero_ps();
            for (int64_t k = 0; k < kfull; k += 16) {
                __m512 av[4];
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) av[q] = _mm512_loadu_ps(ar[q] + k);
#pragma GCC unroll 4
                for (int u = 0; u < 4; u++) {
                    const __m512 mv = _mm512_loadu_ps(mr[u] + k);
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++) acc[q][u] = _mm512_fmadd_ps(av[q], mv, acc[q][u]);
                }
            }
            if (tail) {
                __m512 av[4];
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) av[q] = _mm512_maskz_loadu_ps(tail, ar[q] + kfull);
#pragma GCC unroll 4
                for (int u = 0; u < 4; u++) {
                    const __m512 mv = _mm512_maskz_loadu_ps(tail, mr[u] + kfull);
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++) acc[q][u] = _mm512_fmadd_ps(av[q], mv, acc[q][u]);
                }
            }
            float sums[4][4];
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) _mm_storeu_ps(sums[q], reduce4(acc[q][0], acc[q][1], acc[q][2], acc[q][3]));
            if (fast) { /* float32 C with unit column stride, no beta: a row's 1-4 sums in one store */
                const int64_t nj = j1 - j < 4 ? j1 - j : 4;
                for (int q = 0; q < 4 && i + q < i1; q++) {
                    const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(alpha), _mm_loadu_ps(sums[q])), bv);
                    float *cp = (float *)c->data + (i + q) * c->strides[0] + j;
                    if (nj == 4) {
                        _mm_storeu_ps(cp, v);
                    } else {
                        float tmp[4];
                        _mm_storeu_ps(tmp, v);
                        for (int64_t u = 0; u < nj; u++) cp[u] = tmp[u];
                    }
                }
                continue;
            }
            for (int q = 0; q < 4 && i + q < i1; q++)
                for (int u = 0; u < 4 && j + u < j1; u++) {
                    const int64_t off = (i + q) * c->strides[0] + (j + u) * c->strides[1];
                    float v = alpha * sums[q][u];
                    if (beta != 0.0f) v += beta * tl_load_f(c->data, off, c->dtype);
                    v += bj[u];
                    tl_store_f(c->data, off, c->dtype, v);
                }
        }
    }
}
#endif

#ifdef TL_X86
/* A tile of mr x 32 (two vectors of columns; halves = 1: only the first 16) of C = [C +] A B [+ bias],
 * masked by m0/m1 for a last partial sliver, with A(i, k) = a[k * lda + i * ars] read by broadcast
 * (bcast_loop); bias: the tile's 32 floats, or NULL. */
__attribute__((target("avx512f"), always_inline)) static inline void
bcast_tile(const int mr, const int halves, int64_t K, const float *a, int64_t lda, int64_t ars, const float *b,
           int64_t ldb, float *c, int64_t ldc, const float *bias, const __mmask16 m0, const __mmask16 m1,
           int accumulate)
{
    __m512 acc0[12], acc1[12];
    bcast_loop(mr, halves, K, a, lda, ars, b, ldb, m0, m1, acc0, acc1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias && halves == 2 ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    /* C is added after the block's own sums (not used as their starting value), so that a long K
     * adds rounded block sums instead of one long chain of small terms to a large one. */
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        __m512 v0 = acc0[i], v1 = acc1[i];
        if (accumulate) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c + i * ldc));
            if (halves == 2) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + i * ldc + 16));
        }
        if (bias) {
            v0 = _mm512_add_ps(v0, b0);
            v1 = _mm512_add_ps(v1, b1);
        }
        _mm512_mask_storeu_ps(c + i * ldc, m0, v0);
        if (halves == 2) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, v1);
    }
}

/* bcast_tile for mr <= 12 rows and nn <= 32 columns known only at run time: a whole 12 x 32 tile with
 * constant masks (plain loads and stores), else one of the instances for mr rows, with half the work
 * for at most 16 columns. */
__attribute__((target("avx512f"), always_inline)) static inline void
bcast_tile_any(int mr, int64_t nn, int64_t K, const float *a, int64_t lda, int64_t ars, const float *b, int64_t ldb,
               float *c, int64_t ldc, const float *bias, int accumulate)
{
    if (mr == 12 && nn == 32) {
        bcast_tile(12, 2, K, a, lda, ars, b, ldb, c, ldc, bias, 0xffff, 0xffff, accumulate);
        return;
    }
    const __mmask16 m0 = nn >= 16 ? 0xffff : (__mmask16)((1u << nn) - 1u);
    const __mmask16 m1 = nn >= 32 ? 0xffff : nn > 16 ? (__mmask16)((1u << (nn - 16)) - 1u) : 0;
    if (nn > 16) {
        switch (mr) {
#define TILE(r) case r: bcast_tile(r, 2, K, a, lda, ars, b, ldb, c, ldc, bias, m0, m1, accumulate); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#undef TILE
        }
    } else {
        switch (mr) {
#define TILE(r) case r: bcast_tile(r, 1, K, a, lda, ars, b, ldb, c, ldc, bias, m0, 0, accumulate); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#undef TILE
        }
    }
}

/* C (M x N, rows ldc apart) = [C +] A B, single-threaded: A(i, k) = a[k * lda + i] (A^T in row-major
 * order), B's rows of N floats ldb apart. */
__attribute__((target("avx512f"))) static void
bcast_gemm(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const float *b, int64_t ldb, float *c,
           int64_t ldc, int accumulate)
{
    /* Column slivers outer: a sliver of B (K x 32) stays in cache while every row block of A passes. */
    for (int64_t j = 0; j < N; j += 32) {
        const int64_t nn = N - j < 32 ? N - j : 32;
        for (int64_t i = 0; i < M; i += 12)
            bcast_tile_any((int)(M - i < 12 ? M - i : 12), nn, K, a + i, lda, 1, b + j, ldb, c + i * ldc + j, ldc,
                           NULL, accumulate);
    }
}

/* C (+)= A B with few rows of A, given as A^T in row-major order (a transposed view: dZ^T, a rank-r
 * product's transpose), all float32 with unit inner strides: nothing packed, C's tiles read and written
 * once per K block instead of going through the micro-kernel's tile buffer. Threads take contiguous
 * ranges of 32-column slivers; each K block of A (BC_KC x M, in L2) serves all of a thread's slivers.
 * Returns 1 when done, 0 when it does not apply. */
#define BC_KC 128
#define BC_M_MAX 256

int
tl_gemm_tn_bcast(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c, float alpha,
                 float beta, int nthreads)
{
    const int64_t M = a->shape[0], K = a->shape[1], N = b->shape[1];
    if (tl_cpu_level() < 2 || a->dtype != TL_FLOAT32 || b->dtype != TL_FLOAT32 || c->dtype != TL_FLOAT32 ||
        bias || alpha != 1.0f || (beta != 0.0f && beta != 1.0f) || M > BC_M_MAX || K < 64 ||
        (a->strides[0] != 1 && M > 1) || (b->strides[1] != 1 && N > 1) || (c->strides[1] != 1 && N > 1))
        return 0;
    int nt = tl_threads_for(nthreads, 2.0 * (double)M * N * K);
    const int64_t nsl = (N + 31) / 32;
    if ((double)M * N * K < 1e6) nt = 1;
    if (nt > nsl) nt = (int)nsl;
    const float *ap = a->data, *bp = b->data;
    float *cp = c->data;
    const int64_t lda = a->strides[1], ldb = b->strides[0], ldc = c->strides[0];
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        TEAM_IDS(tid, nth);
        const int64_t j0 = nsl * tid / nth * 32, j1 = nsl * (tid + 1) / nth * 32;
        const int64_t jn = (j1 < N ? j1 : N) - j0;
        for (int64_t k0 = 0; k0 < K; k0 += BC_KC) {
            const int64_t kc = K - k0 < BC_KC ? K - k0 : BC_KC;
            if (jn > 0)
                bcast_gemm(M, jn, kc, ap + k0 * lda, lda, bp + k0 * ldb + j0, ldb, cp + j0, ldc, k0 > 0 || beta != 0.0f);
        }
    }
    return 1;
}
#endif

#ifdef TL_X86
/* C = alpha A M^T [+ C] [+ bias] for many rows of A against a short M (a classifier's weight: Z = X W^T;
 * a linear layer of 32-512 outputs): alpha M^T is packed once into 32-column slivers (R x K floats, zero
 * past R) and A's rows are read in place by broadcast, 12 at a time (bcast_loop with lda = 1), so A is
 * not packed and no dot product is reduced across lanes. Threads take contiguous ranges of 12-row
 * blocks. A float32 with unit column stride; C float32 with unit column stride; beta 0 or 1; M and the
 * bias any float dtype and strides. Where packing M would cost more than the direct dot products or the
 * general GEMM save (fewer than 1024 rows for R <= 128, 96 beyond), it declines.
 * Returns 1 when done, 0 when it does not apply, -1 when out of memory. */
#define NTR_R_MAX 512
#define NTR_TAIL 12

__attribute__((target("avx512f"))) static void
ntr_block(int mr, int64_t K, const float *a, int64_t lda, const float *wp, int64_t nsl, int64_t R, float *c,
          int64_t ldc, const float *bias, int accumulate)
{
    for (int64_t s = 0; s < nsl; s++)
        bcast_tile_any(mr, R - s * 32 < 32 ? R - s * 32 : 32, K, a, 1, lda, wp + s * 32 * K, 32, c + s * 32, ldc,
                       bias + s * 32, accumulate);
}

static int
gemm_nt_rows(const tl_tensor *a, const tl_tensor *m, const tl_tensor *bias, tl_tensor *c, float alpha, float beta,
             int nthreads)
{
    const int64_t N = a->shape[0], K = a->shape[1], R = m->shape[0];
    if (tl_cpu_level() < 2 || a->dtype != TL_FLOAT32 || c->dtype != TL_FLOAT32 || !tl_is_float_dtype(m->dtype) ||
        (beta != 0.0f && beta != 1.0f) || (a->strides[1] != 1 && K > 1) ||
        (c->strides[1] != 1 && R > 1) || R < 32 || R > NTR_R_MAX || K < 16 || N < (R <= 128 ? 1024 : 96))
        return 0;
    /* A last sliver of at most NTR_TAIL columns costs less as dot products (direct_block) than as a
     * 16-column tile, when M is float32 rows that direct_block can read. */
    const int m_rows = m->dtype == TL_FLOAT32 && (m->strides[1] == 1 || K == 1);
    const int64_t tail = m_rows && R % 32 <= NTR_TAIL ? R % 32 : 0, Rs = R - tail;
    const int64_t nsl = (Rs + 31) / 32;
    float *wp = scratch_alloc((size_t)(nsl * 32 * K + nsl * 32));
    if (!wp) return -1;
    float *bp = wp + nsl * 32 * K;
    int nt = tl_threads_for(nthreads, 2.0 * (double)N * K * R);
    const int64_t nrb = (N + 11) / 12;
    if ((double)N * K * R < 1e6) nt = 1;
    if (nt > nrb) nt = (int)nrb;
    /* 12 rows of A whose stride is a multiple of 512 floats map to a few L1 sets (more lines than
     * ways): each thread then copies its 12-row block to rows K + 16 floats apart. */
    const int64_t lda = a->strides[0], ldc = c->strides[0], ldr = K + 16;
    float *arows = NULL;
    if (lda % 512 == 0 && !(arows = scratch_alloc((size_t)(nt * 12 * ldr)))) {
        free(wp);
        return -1;
    }
    for (int64_t j = 0; j < nsl * 32; j++)
        bp[j] = bias && j < Rs ? tl_load_f(bias->data, j * bias->strides[0], bias->dtype) : 0.0f;
    const float *ap = a->data;
    float *cp = c->data;
    tl_barrier bar;
    if (tl_barrier_init(&bar)) {
        free(wp);
        free(arows);
        return -1;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        TEAM_IDS(tid, nth);
        /* Pack alpha M^T: each thread a share of the slivers. Float32 rows of M go across through the
         * GEMM's register transposes; other dtypes and strides 64 k at a time (8 KB of the sliver, in
         * L1, filled by 32 rows of M read along k). */
        for (int64_t sl = nsl * tid / nth; sl < nsl * (tid + 1) / nth; sl++) {
            float *ws = wp + sl * 32 * K;
            if (m_rows) {
                tl_gemm_pack_rows_across_avx512((const float *)m->data + sl * 32 * m->strides[0], m->strides[0],
                                                K, (int)(Rs - sl * 32 < 32 ? Rs - sl * 32 : 32), 32, ws);
                if (alpha != 1.0f)
                    for (int64_t i = 0; i < 32 * K; i++) ws[i] *= alpha;
                continue;
            }
            for (int64_t k0 = 0; k0 < K; k0 += 64) {
                const int64_t k1 = K - k0 < 64 ? K : k0 + 64;
                for (int64_t r = sl * 32; r < sl * 32 + 32; r++) {
                    float *dst = ws + r % 32;
                    if (r >= Rs)
                        for (int64_t k = k0; k < k1; k++) dst[k * 32] = 0.0f;
                    else
                        for (int64_t k = k0; k < k1; k++)
                            dst[k * 32] = alpha * tl_load_f(m->data, r * m->strides[0] + k * m->strides[1], m->dtype);
                }
            }
        }
        tl_barrier_wait(&bar, nth);
        const int64_t b0 = nrb * tid / nth, b1 = nrb * (tid + 1) / nth;
        for (int64_t rb = b0; rb < b1; rb++) {
            const int64_t i0 = rb * 12;
            const int mr = (int)(N - i0 < 12 ? N - i0 : 12);
            const float *ai = ap + i0 * lda;
            int64_t ldai = lda;
            if (arows) { /* rows a multiple of 2 KB apart share L1 sets: copy them apart first */
                for (int i = 0; i < mr; i++) memcpy(arows + tid * 12 * ldr + i * ldr, ai + i * lda, (size_t)K * sizeof(float));
                ai = arows + tid * 12 * ldr;
                ldai = ldr;
            }
            ntr_block(mr, K, ai, ldai, wp, nsl, Rs, cp + i0 * ldc, ldc, bp, beta != 0.0f);
            if (tail)
                direct_block(i0, i0 + mr, Rs, R, K, ap, lda, m->data, m->strides[0], alpha, beta, bias, c);
        }
    }
    tl_barrier_destroy(&bar);
    free(wp);
    free(arows);
    return 1;
}
#endif

int
tl_gemm_nt_direct(const tl_tensor *a, const tl_tensor *m, const tl_tensor *bias, tl_tensor *c, float alpha,
                  float beta, int nthreads, int force)
{
#ifdef TL_X86
    const int64_t N = a->shape[0], K = a->shape[1], R = m->shape[0];
    if (tl_cpu_level() < 2 || a->dtype != TL_FLOAT32 || (a->strides[1] != 1 && K > 1) || N == 0 || R == 0 ||
        K == 0 || !tl_is_float_dtype(m->dtype) || !tl_is_float_dtype(c->dtype))
        return 0;
    const int rows = gemm_nt_rows(a, m, bias, c, alpha, beta, nthreads);
    if (rows) return rows;
    const int m_rows = m->dtype == TL_FLOAT32 && (m->strides[1] == 1 || K == 1);
    /* Unforced, only where packing would dominate: a short side of A, and M already in float32 rows. */
    if (!force && ((N > 64 && R > 128) || !m_rows)) return 0;
    const float *mp = m->data;
    float *copy = NULL;
    int64_t ldm = m->strides[0];
    if (!m_rows) {
        copy = malloc((size_t)(R * K) * sizeof(float));
        if (!copy) return -1;
        for (int64_t j = 0; j < R; j++)
            for (int64_t k = 0; k < K; k++)
                copy[j * K + k] = tl_load_f(m->data, j * m->strides[0] + k * m->strides[1], m->dtype);
        mp = copy;
        ldm = K;
    }
    int nt = tl_threads_for(nthreads, 2.0 * (double)N * K * R);
    if ((double)N * K * R < 1e6) nt = 1;
    /* Share out whichever side is longer, in blocks of 64 rows (a multiple of 4). */
    const int by_rows = N >= R;
    const int64_t len = by_rows ? N : R, nblk = (len + 63) / 64;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t s0 = blk * 64, s1 = len - s0 < 64 ? len : s0 + 64;
        if (by_rows)
            direct_block(s0, s1, 0, R, K, a->data, a->strides[0], mp, ldm, alpha, beta, bias, c);
        else
            direct_block(0, N, s0, s1, K, a->data, a->strides[0], mp, ldm, alpha, beta, bias, c);
    }
    free(copy);
    return 1;
#else
    (void)a, (void)m, (void)bias, (void)c, (void)alpha, (void)beta, (void)nthreads, (void)force;
    return 0;
#endif
}

