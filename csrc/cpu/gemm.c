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
 * view (gemm_tn_bcast: A^T's rows broadcast in place, as the head's dW = dZ^T X and LoRA's rank-r
 * gradients have it). */
#include <stdlib.h>

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TL_X86 1
#endif
#ifdef _OPENMP
#include <omp.h>
/* This thread's number and the team's size inside a parallel region. */
#define TEAM_IDS(tid, nth) const int tid = omp_get_thread_num(), nth = omp_get_num_threads()
#else
#define TEAM_IDS(tid, nth) const int tid = 0, nth = 1
#endif

#define KC TL_GEMM_KC
#ifndef KC_F32
#define KC_F32 512 /* float32 K blocks (balanced, >= KC: K <= KC is always one block, so needs no ws) */
#endif
#define MC_MAX 4032 /* a multiple of every MR below; A's block (6 MB) sits in L3 */
#define NC_MAX 320 /* a multiple of every NR below */
#define MR_MAX 12
#define NR_MAX 32

/* tile = A sliver (packed) x B sliver: bp steps ldb elements per k (NR when packed; a row stride when B
 * is read in place). */
typedef void (*ukernel_fn)(int64_t kc, const void *ap, const void *bp, int64_t ldb, float *tile);

typedef struct {
    int mr, nr;
    ukernel_fn kernel;
    const char *name;
    int bf16_pairs; /* operands packed as bfloat16 pairs along k (for dot-product instructions) */
} isa_desc;

/* ---- micro-kernels: tile[MR][NR] = sum_k ap[k][0:MR] (outer) bp[k][0:NR] ------------------------ */

static void
ukernel_portable(int64_t kc, const void *ap_, const void *bp_, int64_t ldb, float *restrict tile)
{
    const float *restrict ap = ap_, *restrict bp = bp_;
    enum { MR = 4, NR = 16 };
    float acc[MR][NR] = {{0}};
    for (int64_t k = 0; k < kc; k++, ap += MR, bp += ldb)
        for (int r = 0; r < MR; r++)
            for (int j = 0; j < NR; j++) acc[r][j] += ap[r] * bp[j];
    memcpy(tile, acc, sizeof acc);
}

#ifdef TL_X86
__attribute__((target("avx2,fma"))) static void
ukernel_avx2(int64_t kc, const void *ap_, const void *bp_, int64_t ldb, float *restrict tile)
{
    const float *restrict ap = ap_, *restrict bp = bp_;
    enum { MR = 6, NR = 16 };
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < kc; k++, ap += MR, bp += ldb) {
        __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), a;
#define ROW(r, x0, x1)                                                                                  \
    a = _mm256_broadcast_ss(ap + r);                                                                    \
    x0 = _mm256_fmadd_ps(a, b0, x0);                                                                    \
    x1 = _mm256_fmadd_ps(a, b1, x1);
        ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41)
        ROW(5, c50, c51)
#undef ROW
    }
    __m256 out[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int i = 0; i < 12; i++) _mm256_storeu_ps(tile + 8 * i, out[i]);
}

/* acc0[i], acc1[i] (i < mr) = sum over k < K of A(i, k) times the two 16-column halves of B's row k, with
 * A(i, k) = a[k * lda + i * ars] read by broadcast (a packed sliver: lda = MR, ars = 1; A's own rows:
 * lda = 1, ars = their stride) and B's rows ldb apart, masked by m0/m1 for a partial sliver; with
 * halves = 1 only the first (acc1 untouched). mr, halves, ars = 1 and the masks are constants where it
 * is inlined, so the accumulators stay in registers: the float32 micro-kernel and the broadcast GEMMs
 * below share it. */
__attribute__((target("avx512f"), always_inline)) static inline void
bcast_loop(const int mr, const int halves, int64_t K, const float *a, int64_t lda, int64_t ars, const float *b,
           int64_t ldb, const __mmask16 m0, const __mmask16 m1, __m512 acc0[12], __m512 acc1[12])
{
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++, a += lda, b += ldb) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
        const __m512 b1 = halves == 2 ? _mm512_maskz_loadu_ps(m1, b + 16) : b0;
        _mm_prefetch((const char *)(b + 8 * ldb), _MM_HINT_T0);
        if (halves == 2) _mm_prefetch((const char *)(b + 8 * ldb + 16), _MM_HINT_T0);
#pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            const __m512 av = _mm512_set1_ps(a[i * ars]);
            acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
            if (halves == 2) acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
        }
    }
}

__attribute__((target("avx512f"))) static void
ukernel_avx512(int64_t kc, const void *ap, const void *bp, int64_t ldb, float *restrict tile)
{
    __m512 acc0[12], acc1[12];
    bcast_loop(12, 2, kc, ap, 12, 1, bp, ldb, 0xffff, 0xffff, acc0, acc1);
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) {
        _mm512_storeu_ps(tile + 32 * r, acc0[r]);
        _mm512_storeu_ps(tile + 32 * r + 16, acc1[r]);
    }
}

/* The same for a whole 12 x 32 tile of a float32 C with unit column stride and alpha 1, updated in
 * place without the tile buffer: C = acc [+ C] [+ bias] (bias: 32 floats or NULL), in store_tile's
 * order of additions. */
__attribute__((target("avx512f"))) static void
ukernel_avx512_to_c(int64_t kc, const float *ap, const float *bp, int64_t ldb, float *c, int64_t ldc, int add,
                    const float *bias)
{
    __m512 acc0[12], acc1[12];
    bcast_loop(12, 2, kc, ap, 12, 1, bp, ldb, 0xffff, 0xffff, acc0, acc1);
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) {
        float *cr = c + r * ldc;
        __m512 v0 = acc0[r], v1 = acc1[r];
        if (add) {
            v0 = _mm512_add_ps(v0, _mm512_loadu_ps(cr));
            v1 = _mm512_add_ps(v1, _mm512_loadu_ps(cr + 16));
        }
        if (bias) {
            v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias));
            v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + 16));
        }
        _mm512_storeu_ps(cr, v0);
        _mm512_storeu_ps(cr + 16, v1);
    }
}

/* The same for a last sliver of at most 16 columns (C = 100 is 3 x 32 + 4): half the work of the full
 * kernel; tile keeps its NR = 32 row stride and only its first 16 columns are written. */
__attribute__((target("avx512f"))) static void
ukernel_avx512_n16(int64_t kc, const void *ap, const void *bp, int64_t ldb, float *restrict tile)
{
    __m512 acc0[12], acc1[12];
    bcast_loop(12, 1, kc, ap, 12, 1, bp, ldb, 0xffff, 0, acc0, acc1);
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) _mm512_storeu_ps(tile + 32 * r, acc0[r]);
}

/* bfloat16 operands packed in pairs along k: ap[k/2][r] and bp[k/2][j] are 32-bit (k, k+1) pairs, and
 * vdpbf16ps adds a[k]*b[k] + a[k+1]*b[k+1] to each float32 lane (bf16 products fit in float32). The
 * instruction reads bfloat16 subnormals (|x| < 1.2e-38) as zero, as torch's own bf16 CPU GEMM does. */
__attribute__((target("avx512f,avx512bf16"))) static void
ukernel_avx512_bf16(int64_t kc, const void *ap_, const void *bp_, int64_t ldb, float *restrict tile)
{
    enum { MR = 12, NR = 32 };
    const uint32_t *restrict ap = ap_, *restrict bp = bp_;
    __m512 z = _mm512_setzero_ps();
    __m512 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z;
    __m512 c50 = z, c51 = z, c60 = z, c61 = z, c70 = z, c71 = z, c80 = z, c81 = z, c90 = z, c91 = z;
    __m512 ca0 = z, ca1 = z, cb0 = z, cb1 = z;
    for (int64_t k = 0; k < (kc + 1) / 2; k++, ap += MR, bp += ldb) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp), b1 = (__m512bh)_mm512_loadu_si512(bp + 16), a;
        _mm_prefetch((const char *)(bp + 8 * ldb), _MM_HINT_T0);
#define ROW(r, x0, x1)                                                                                  \
    a = (__m512bh)_mm512_set1_epi32((int)ap[r]);                                                        \
    x0 = _mm512_dpbf16_ps(x0, a, b0);                                                                   \
    x1 = _mm512_dpbf16_ps(x1, a, b1);
        ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41)
        ROW(5, c50, c51) ROW(6, c60, c61) ROW(7, c70, c71) ROW(8, c80, c81) ROW(9, c90, c91)
        ROW(10, ca0, ca1) ROW(11, cb0, cb1)
#undef ROW
    }
#define PUT(i, x) _mm512_storeu_ps(tile + 16 * (i), x);
    PUT(0, c00) PUT(1, c01) PUT(2, c10) PUT(3, c11) PUT(4, c20) PUT(5, c21) PUT(6, c30) PUT(7, c31)
    PUT(8, c40) PUT(9, c41) PUT(10, c50) PUT(11, c51) PUT(12, c60) PUT(13, c61) PUT(14, c70)
    PUT(15, c71) PUT(16, c80) PUT(17, c81) PUT(18, c90) PUT(19, c91) PUT(20, ca0) PUT(21, ca1)
    PUT(22, cb0) PUT(23, cb1)
#undef PUT
}
#endif

static const isa_desc isa_portable = {4, 16, ukernel_portable, "portable", 0};
#ifdef TL_X86
static const isa_desc isa_avx2 = {6, 16, ukernel_avx2, "avx2", 0};
static const isa_desc isa_avx512 = {12, 32, ukernel_avx512, "avx512", 0};
static const isa_desc isa_avx512_bf16 = {12, 32, ukernel_avx512_bf16, "avx512_bf16", 1};
#endif

/* The kernel for a dtype on this CPU (tl_cpu_level: its SIMD level, capped by TLTORCH_CPU_ISA). */
static const isa_desc *
select_isa(tl_dtype dtype)
{
#ifdef TL_X86
    const int level = tl_cpu_level();
    /* bfloat16 inputs go straight to the dot-product instructions; float16 ones are widened to
     * float32 in packing (rounding them to bfloat16 would lose 3 bits). */
    if (level >= 2 && dtype == TL_BFLOAT16 && __builtin_cpu_supports("avx512bf16")) return &isa_avx512_bf16;
    if (level >= 2) return &isa_avx512;
    if (level >= 1) return &isa_avx2;
#else
    (void)dtype;
#endif
    return &isa_portable;
}

const char *
tl_cpu_isa(void)
{
    return select_isa(TL_FLOAT32)->name;
}

/* ---- packing ------------------------------------------------------------------------------------ */

#ifdef TL_X86
/* r[j] = column j of the 16 x 16 block whose rows are r[0..15], by lane unpacks and shuffles. */
__attribute__((target("avx512f"), always_inline)) static inline void
transpose16(__m512 r[16])
{
    __m512 t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    /* t[4g + c], lane L: rows 4g..4g+3 of column 4L + c */
#pragma GCC unroll 4
    for (int g = 0; g < 16; g += 4) {
        const __m512 t0 = t[g], t1 = t[g + 1], t2 = t[g + 2], t3 = t[g + 3];
        t[g] = _mm512_shuffle_ps(t0, t2, 0x44);
        t[g + 1] = _mm512_shuffle_ps(t0, t2, 0xee);
        t[g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
        t[g + 3] = _mm512_shuffle_ps(t1, t3, 0xee);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
        const __m512 p0 = _mm512_shuffle_f32x4(t[c], t[4 + c], 0x88);
        const __m512 p1 = _mm512_shuffle_f32x4(t[c], t[4 + c], 0xdd);
        const __m512 q0 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], 0x88);
        const __m512 q1 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], 0xdd);
        r[c] = _mm512_shuffle_f32x4(p0, q0, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(p1, q1, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(p0, q0, 0xdd);
        r[12 + c] = _mm512_shuffle_f32x4(p1, q1, 0xdd);
    }
}

/* d[k][j] = m[j][k] for j < jn (zero up to w), k < kc: float32 rows of m (ldm apart) packed across,
 * w values per k (a sliver of B = M^T, w = NR, from a linear layer's weight in Z = X W^T; or an A
 * sliver, w = MR = 12, from row-major A). 16 rows x 16 k at a time through registers; the edges one
 * float at a time. */
__attribute__((target("avx512f"))) static void
pack_rows_across_avx512(const float *m, int64_t ldm, int64_t kc, int jn, int w, float *d)
{
    const int64_t kv = kc / 16 * 16;
    const int jv = w < 16 ? jn : jn / 16 * 16; /* rows taken 16 at a time (all jn of them when w < 16) */
    for (int h = 0; h < jv; h += 16) {
        const int rows = jv - h < 16 ? jv - h : 16;
        const __mmask16 keep = (__mmask16)((1u << rows) - 1u);
        const float *mh = m + h * ldm;
        for (int64_t k = 0; k < kv; k += 16) {
            __m512 r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) r[i] = i < rows ? _mm512_loadu_ps(mh + i * ldm + k) : _mm512_setzero_ps();
            transpose16(r);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) _mm512_mask_storeu_ps(d + (k + i) * w + h, keep, r[i]);
        }
        for (int64_t k = kv; k < kc; k++)
            for (int j = h; j < h + rows; j++) d[k * w + j] = m[j * ldm + k];
    }
    for (int64_t k = 0; k < kc; k++) {
        for (int j = jv; j < jn; j++) d[k * w + j] = m[j * ldm + k];
        for (int j = jn; j < w; j++) d[k * w + j] = 0.0f;
    }
}
#endif

/* dst[s][koff + k][r] = src[(i0 + s*MR + r), k0 + k] for k < kc and the rows [i0, i0+mc), zero past
 * mc; a sliver holds kstride values of k (a K block may be packed from two sources, each at its offset).
 * The loop runs over k outside and the sliver's rows inside, so that the writes are contiguous (2-4x
 * faster than row by row, whose writes stride by MR). */
static void
pack_a(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, int64_t s_begin,
       int64_t s_end, float *dst, int64_t kstride, int64_t koff)
{
    const int64_t sa0 = a->strides[0], sa1 = a->strides[1];
    const int64_t es = (int64_t)tl_dtype_size(a->dtype);
#ifdef TL_X86
    if (a->dtype == TL_FLOAT32 && sa1 == 1 && sa0 != 1 && mr <= 16 && tl_cpu_level() >= 2) {
        for (int64_t s = s_begin; s < s_end; s++) /* row-major A: its rows packed across */
            pack_rows_across_avx512((const float *)a->data + (i0 + s * mr) * sa0 + k0, sa0, kc,
                                    (int)(mc - s * mr < mr ? mc - s * mr : mr), mr,
                                    dst + s * mr * kstride + koff * mr);
        return;
    }
#endif
    if (a->dtype == TL_FLOAT32 && sa0 == 1 && sa1 != 1) {
        /* A given transposed (dZ^T in dW = dZ^T X): a sliver's rows at one k are adjacent floats. Copy
         * them as runs, 64 values of k at a time across the slivers, so each source row is read along
         * its length (the prefetchers follow it) rather than 12 floats per row down a column. */
        const float *src = (const float *)a->data + i0 + k0 * sa1;
        for (int64_t kb = 0; kb < kc; kb += 64) {
            const int64_t ke = kc - kb < 64 ? kc : kb + 64;
            for (int64_t s = s_begin; s < s_end; s++) {
                float *d = dst + s * mr * kstride + koff * mr;
                const int rn = (int)(mc - s * mr < mr ? mc - s * mr : mr);
                const float *col = src + s * mr;
                if (rn == 12 && mr == 12)
                    for (int64_t k = kb; k < ke; k++) memcpy(d + k * 12, col + k * sa1, 12 * sizeof(float));
                else
                    for (int64_t k = kb; k < ke; k++) {
                        memcpy(d + k * mr, col + k * sa1, (size_t)rn * sizeof(float));
                        for (int r = rn; r < mr; r++) d[k * mr + r] = 0.0f;
                    }
            }
        }
        return;
    }
    for (int64_t s = s_begin; s < s_end; s++) {
        float *d = dst + s * mr * kstride + koff * mr;
        const int rn = (int)(mc - s * mr < mr ? mc - s * mr : mr);
        const char *rows[MR_MAX];
        for (int r = 0; r < rn; r++) rows[r] = (const char *)a->data + ((i0 + s * mr + r) * sa0 + k0 * sa1) * es;
        for (int64_t k = 0; k < kc; k++) {
            float *dk = d + k * mr;
            const int64_t off = k * sa1;
            switch (a->dtype) {
            case TL_FLOAT32:
                for (int r = 0; r < rn; r++) dk[r] = ((const float *)rows[r])[off];
                break;
            case TL_BFLOAT16:
                for (int r = 0; r < rn; r++) dk[r] = tl_bf16_to_f32(((const uint16_t *)rows[r])[off]);
                break;
            default:
                for (int r = 0; r < rn; r++) dk[r] = tl_f16_to_f32(((const uint16_t *)rows[r])[off]);
                break;
            }
            for (int r = rn; r < mr; r++) dk[r] = 0.0f;
        }
    }
}

/* A stored weight's per-channel scale, applied as B is packed: B[k, j] * scale[k] (axis 0) or
 * B[k, j] * scale[j] (axis 1). */
typedef struct {
    const tl_tensor *t; /* NULL: no scale */
    int axis;
} bscale;

/* dst[s][koff + k][j] = src[k0 + k, j0 + s*NR + j] (times its scale) for the columns [j0, j0+nc), zero
 * past nc; k outside, the sliver's columns inside, slivers of kstride values of k, as in pack_a. B may
 * also be int8 (a quantised weight, with its scale). */
static void
pack_b(const tl_tensor *b, const bscale *sc, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr, float *dst,
       int64_t kstride, int64_t koff)
{
    const int64_t sb0 = b->strides[0], sb1 = b->strides[1];
    const int64_t es = (int64_t)tl_dtype_size(b->dtype);
    const int64_t nsl = (nc + nr - 1) / nr;
    const tl_tensor *st = sc ? sc->t : NULL;
    for (int64_t s = 0; s < nsl; s++) {
        float *d = dst + s * nr * kstride + koff * nr;
        const int jn = (int)(nc - s * nr < nr ? nc - s * nr : nr);
        const char *col0 = (const char *)b->data + (k0 * sb0 + (j0 + s * nr) * sb1) * es;
#ifdef TL_X86
        if (b->dtype == TL_FLOAT32 && sb0 == 1 && sb1 != 1 && !st && nr % 16 == 0 && tl_cpu_level() >= 2) {
            pack_rows_across_avx512((const float *)col0, sb1, kc, jn, nr, d); /* B = M^T, M's rows contiguous */
            continue;
        }
#endif
        if (b->dtype == TL_FLOAT32 && sb1 == 1 && !st) { /* rows of B are contiguous: copy them */
            for (int64_t k = 0; k < kc; k++) {
                memcpy(d + k * nr, col0 + k * sb0 * es, (size_t)jn * sizeof(float));
                for (int j = jn; j < nr; j++) d[k * nr + j] = 0.0f;
            }
            continue;
        }
        const char *cols[NR_MAX];
        float cs[NR_MAX];
        for (int j = 0; j < jn; j++) {
            cols[j] = col0 + j * sb1 * es;
            cs[j] = st && sc->axis == 1 ? tl_load_f(st->data, (j0 + s * nr + j) * st->strides[0], st->dtype) : 1.0f;
        }
        for (int64_t k = 0; k < kc; k++) {
            float *dk = d + k * nr;
            const int64_t off = k * sb0;
            switch (b->dtype) {
            case TL_FLOAT32:
                for (int j = 0; j < jn; j++) dk[j] = ((const float *)cols[j])[off];
                break;
            case TL_BFLOAT16:
                for (int j = 0; j < jn; j++) dk[j] = tl_bf16_to_f32(((const uint16_t *)cols[j])[off]);
                break;
            case TL_INT8:
                for (int j = 0; j < jn; j++) dk[j] = (float)((const int8_t *)cols[j])[off];
                break;
            default:
                for (int j = 0; j < jn; j++) dk[j] = tl_f16_to_f32(((const uint16_t *)cols[j])[off]);
                break;
            }
            if (st && sc->axis == 1)
                for (int j = 0; j < jn; j++) dk[j] *= cs[j];
            else if (st) {
                const float v = tl_load_f(st->data, (k0 + k) * st->strides[0], st->dtype);
                for (int j = 0; j < jn; j++) dk[j] *= v;
            }
            for (int j = jn; j < nr; j++) dk[j] = 0.0f;
        }
    }
}

/* The same blocks for the bfloat16 dot-product kernel: 32-bit (k, k+1) pairs, a zero after an odd kc.
 * dst[s][koff + k/2][r] = (A[i, k], A[i, k+1]) and dst[s][koff + k/2][j] = (B[k, j], B[k+1, j]);
 * kstride and koff count pairs. */
static void
pack_a_pairs(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, int64_t s_begin,
             int64_t s_end, uint16_t *dst, int64_t kstride, int64_t koff)
{
    const int64_t sa0 = a->strides[0], sa1 = a->strides[1], kp = (kc + 1) / 2;
    for (int64_t s = s_begin; s < s_end; s++) {
        uint16_t *d = dst + s * mr * 2 * kstride + koff * mr * 2;
        const int rn = (int)(mc - s * mr < mr ? mc - s * mr : mr);
        const uint16_t *rows[MR_MAX];
        for (int r = 0; r < rn; r++) rows[r] = (const uint16_t *)a->data + (i0 + s * mr + r) * sa0 + k0 * sa1;
        for (int64_t k = 0; k < kp; k++) {
            uint16_t *dk = d + k * mr * 2;
            const int64_t o0 = 2 * k * sa1, o1 = o0 + sa1;
            const int odd = 2 * k + 1 < kc;
            for (int r = 0; r < rn; r++) {
                dk[2 * r] = rows[r][o0];
                dk[2 * r + 1] = odd ? rows[r][o1] : 0;
            }
            for (int r = rn; r < mr; r++) dk[2 * r] = dk[2 * r + 1] = 0;
        }
    }
}

static void
pack_b_pairs(const tl_tensor *b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr, uint16_t *dst,
             int64_t kstride, int64_t koff)
{
    const int64_t sb0 = b->strides[0], sb1 = b->strides[1], kp = (kc + 1) / 2;
    const int64_t nsl = (nc + nr - 1) / nr;
    for (int64_t s = 0; s < nsl; s++) {
        uint16_t *d = dst + s * nr * 2 * kstride + koff * nr * 2;
        const int jn = (int)(nc - s * nr < nr ? nc - s * nr : nr);
        const uint16_t *cols[NR_MAX];
        for (int j = 0; j < jn; j++) cols[j] = (const uint16_t *)b->data + k0 * sb0 + (j0 + s * nr + j) * sb1;
        for (int64_t k = 0; k < kp; k++) {
            uint16_t *dk = d + k * nr * 2;
            const int64_t o0 = 2 * k * sb0, o1 = o0 + sb0;
            const int odd = 2 * k + 1 < kc;
            for (int j = 0; j < jn; j++) {
                dk[2 * j] = cols[j][o0];
                dk[2 * j + 1] = odd ? cols[j][o1] : 0;
            }
            for (int j = jn; j < nr; j++) dk[2 * j] = dk[2 * j + 1] = 0;
        }
    }
}

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

static void *
scratch_alloc(size_t nfloats)
{
    size_t bytes = (nfloats * sizeof(float) + 63) / 64 * 64;
    return aligned_alloc(64, bytes ? bytes : 64);
}

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

#ifdef TL_X86
static int gemm_tn_bcast(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c, float alpha,
                         float beta, int nthreads);
static int gemm_nt_rows(const tl_tensor *a, const tl_tensor *m, const tl_tensor *bias, tl_tensor *c, float alpha,
                        float beta, int nthreads);
#endif

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
    if (!a2 && !sc.t && gemm_tn_bcast(a, b, bias, c, alpha, beta, nthreads)) return TL_OK;
#endif
    if (!a2 && !sc.t && (b->strides[0] == 1 || K == 1)) { /* B = M^T with M's rows contiguous */
        const tl_tensor bT = {.data = b->data, .dtype = b->dtype, .device = b->device, .ndim = 2,
                              .shape = {N, K}, .strides = {b->strides[1], b->strides[0]}};
        const int done = tl_gemm_nt_direct(a, &bT, bias, c, alpha, beta, nthreads, 0);
        if (done) return done < 0 ? TL_ERR_NOMEM : TL_OK;
    }

    tl_dtype dt = a->dtype == b->dtype && !sc.t ? a->dtype : TL_FLOAT32;
    if (K2 && (a2->dtype != dt || b2->dtype != dt)) dt = TL_FLOAT32;
    const isa_desc *isa = select_isa(dt);
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
    const int to_c = isa == &isa_avx512 && c->dtype == TL_FLOAT32 && (c->strides[1] == 1 || N == 1) &&
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
                    if (kb.n1) pack_a_pairs(a, ic, mc, kb.k1, kb.n1, mr, s0, s1, (uint16_t *)apack, kstep, 0);
                    if (kb.n2) pack_a_pairs(a2, ic, mc, kb.k2, kb.n2, mr, s0, s1, (uint16_t *)apack, kstep, kp1);
                } else {
                    if (kb.n1) pack_a(a, ic, mc, kb.k1, kb.n1, mr, s0, s1, apack, kstep, 0);
                    if (kb.n2) pack_a(a2, ic, mc, kb.k2, kb.n2, mr, s0, s1, apack, kstep, kp1);
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
                        if (ncw > nfull) pack_b(b, &sc, kb.k1, kb.n1, j0 + nfull, ncw - nfull, nr, bp, kstep, 0);
                    } else if (pairs) {
                        if (kb.n1) pack_b_pairs(b, kb.k1, kb.n1, j0, ncw, nr, (uint16_t *)bp, kstep, 0);
                        if (kb.n2) pack_b_pairs(b2, kb.k2, kb.n2, j0, ncw, nr, (uint16_t *)bp, kstep, kp1);
                    } else {
                        if (kb.n1) pack_b(b, &sc, kb.k1, kb.n1, j0, ncw, nr, bp, kstep, 0);
                        if (kb.n2) pack_b(b2, NULL, kb.k2, kb.n2, j0, ncw, nr, bp, kstep, kp1);
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
                                ukernel_avx512_to_c(kc_kernel, ap, bs, ldbs,
                                                    (float *)c->data + (ic + is * mr) * c->strides[0] + j0 + js * nr,
                                                    c->strides[0], !first || beta != 0.0f,
                                                    first && bias ? (const float *)bias->data + j0 + js * nr : NULL);
                                continue;
                            }
                            if (!in_place && nn <= 16 && isa == &isa_avx512)
                                ukernel_avx512_n16(kc_kernel, ap, bs, nr, tile);
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

static int
gemm_tn_bcast(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c, float alpha,
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
                pack_rows_across_avx512((const float *)m->data + sl * 32 * m->strides[0], m->strides[0], K,
                                        (int)(Rs - sl * 32 < 32 ? Rs - sl * 32 : 32), 32, ws);
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

/* ---- column sums (the bias gradient) ------------------------------------------------------------ */

#ifdef TL_X86
/* acc[0:jn] = the sums of M rows (ld floats apart) of jn <= 64 float32 columns, each summed in row
 * order: four vector accumulators, so the sums stay in registers. */
__attribute__((target("avx512f"))) static void
colsum64_avx512(const float *x, int64_t ld, int64_t M, int64_t jn, float *acc)
{
    __mmask16 k[4];
    for (int v = 0; v < 4; v++) {
        const int64_t left = jn - 16 * v;
        k[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < M; i++) {
        const float *p = x + i * ld;
        a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(k[0], p));
        a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(k[1], p + 16));
        a2 = _mm512_add_ps(a2, _mm512_maskz_loadu_ps(k[2], p + 32));
        a3 = _mm512_add_ps(a3, _mm512_maskz_loadu_ps(k[3], p + 48));
    }
    _mm512_mask_storeu_ps(acc, k[0], a0);
    _mm512_mask_storeu_ps(acc + 16, k[1], a1);
    _mm512_mask_storeu_ps(acc + 32, k[2], a2);
    _mm512_mask_storeu_ps(acc + 48, k[3], a3);
}
#endif

tl_status
tl_colsum_cpu(const tl_tensor *x, tl_tensor *out, float beta, int nthreads)
{
    tl_status st;
    if ((st = tl_check_cpu(x, 2)) || (st = tl_check_cpu(out, 1))) return st;
    if (!tl_is_float_dtype(x->dtype)) return TL_ERR_DTYPE;
    if (out->dtype != TL_FLOAT32 && out->dtype != x->dtype) return TL_ERR_DTYPE;
    const int64_t M = x->shape[0], N = x->shape[1];
    if (out->shape[0] != N) return TL_ERR_SHAPE;
    const int64_t s0 = x->strides[0], s1 = x->strides[1];
    int nt = tl_threads(nthreads);
    if (M * N < 65536) nt = 1;
#ifdef TL_X86
    const int vec = tl_cpu_level() >= 2 && x->dtype == TL_FLOAT32 && (s1 == 1 || N == 1);
#else
    const int vec = 0;
#endif
    /* Columns are shared out in blocks of 64; each sums its rows in order, so the result does not
     * depend on the thread count (nor on the vector path: the same additions in the same order). */
    const int64_t nb = (N + 63) / 64;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t blk = 0; blk < nb; blk++) {
        float acc[64];
        const int64_t j0 = blk * 64, jn = N - j0 < 64 ? N - j0 : 64;
        if (vec) {
#ifdef TL_X86
            colsum64_avx512((const float *)x->data + j0 * s1, s0, M, jn, acc);
#endif
        } else {
            for (int64_t j = 0; j < jn; j++) acc[j] = 0.0f;
            for (int64_t i = 0; i < M; i++) {
                const int64_t row = i * s0 + j0 * s1;
                if (x->dtype == TL_FLOAT32 && s1 == 1) {
                    const float *p = (const float *)x->data + row;
                    for (int64_t j = 0; j < jn; j++) acc[j] += p[j];
                } else {
                    for (int64_t j = 0; j < jn; j++) acc[j] += tl_load_f(x->data, row + j * s1, x->dtype);
                }
            }
        }
        for (int64_t j = 0; j < jn; j++) {
            int64_t o = (j0 + j) * out->strides[0];
            float v = acc[j];
            if (beta != 0.0f) v += beta * tl_load_f(out->data, o, out->dtype);
            tl_store_f(out->data, o, out->dtype, v);
        }
    }
    return TL_OK;
}
