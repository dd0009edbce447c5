/* gemm_internal.h: what the GEMM's files share, internal to the CPU core (not part of tl.h): the
 * micro-kernel descriptor and the kernels (gemm_kernels.c), the packing routines (gemm_pack.c), the
 * paths without packing (gemm_direct.c) that the driver (gemm.c) calls, the broadcast loop that the
 * AVX-512 micro-kernels and the direct paths are built from, and the sliver sizes they agree on. */
#ifndef TL_GEMM_INTERNAL_H
#define TL_GEMM_INTERNAL_H

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

#define MR_MAX 12 /* the largest micro-kernel tile: MR rows x NR columns */
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

/* The micro-kernels, one per ISA (gemm_kernels.c), and the one for a dtype on this CPU (common.c, beside
 * tl_cpu_level). */
extern const isa_desc tl_isa_portable;
const isa_desc *tl_gemm_isa(tl_dtype dtype);
#ifdef TL_X86
extern const isa_desc tl_isa_avx2, tl_isa_avx512, tl_isa_avx512_bf16;

/* acc0[i], acc1[i] (i < mr) = sum over k < K of A(i, k) times the two 16-column halves of B's row k, with
 * A(i, k) = a[k * lda + i * ars] read by broadcast (a packed sliver: lda = MR, ars = 1; A's own rows:
 * lda = 1, ars = their stride) and B's rows ldb apart, masked by m0/m1 for a partial sliver; with
 * halves = 1 only the first (acc1 untouched). mr, halves, ars = 1 and the masks are constants where it
 * is inlined, so the accumulators stay in registers: the float32 micro-kernel (gemm_kernels.c) and the
 * broadcast GEMMs (gemm_direct.c) share it. */
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

/* Variants of the float32 AVX-512 micro-kernel (gemm_kernels.c): a 12 x 32 tile added to C in place,
 * and a last sliver of at most 16 columns. */
void tl_gemm_ukernel_avx512_to_c(int64_t kc, const float *ap, const float *bp, int64_t ldb, float *c, int64_t ldc,
                                 int add, const float *bias);
void tl_gemm_ukernel_avx512_n16(int64_t kc, const void *ap, const void *bp, int64_t ldb, float *restrict tile);
#endif

/* ---- packing (gemm_pack.c) ---- */

/* A stored weight's per-channel scale, applied as B is packed: B[k, j] * scale[k] (axis 0) or
 * B[k, j] * scale[j] (axis 1). */
typedef struct {
    const tl_tensor *t; /* NULL: no scale */
    int axis;
} bscale;

void tl_gemm_pack_a(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, int64_t s_begin,
                    int64_t s_end, float *dst, int64_t kstride, int64_t koff);
void tl_gemm_pack_b(const tl_tensor *b, const bscale *sc, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr,
                    float *dst, int64_t kstride, int64_t koff);
void tl_gemm_pack_a_pairs(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr,
                          int64_t s_begin, int64_t s_end, uint16_t *dst, int64_t kstride, int64_t koff);
void tl_gemm_pack_b_pairs(const tl_tensor *b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr, uint16_t *dst,
                          int64_t kstride, int64_t koff);
#ifdef TL_X86
void tl_gemm_pack_rows_across_avx512(const float *m, int64_t ldm, int64_t kc, int jn, int w, float *d);

/* C (+)= A B with A given transposed, without packing (gemm_direct.c): 1 when done, 0 when it does not
 * apply. */
int tl_gemm_tn_bcast(const tl_tensor *a, const tl_tensor *b, const tl_tensor *bias, tl_tensor *c, float alpha,
                     float beta, int nthreads);
#endif

/* Packing buffers: 64-byte aligned, whole cache lines. */
static inline void *
scratch_alloc(size_t nfloats)
{
    size_t bytes = (nfloats * sizeof(float) + 63) / 64 * 64;
    return aligned_alloc(64, bytes ? bytes : 64);
}

#endif /* TL_GEMM_INTERNAL_H */
