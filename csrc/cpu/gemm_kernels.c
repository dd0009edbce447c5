/* gemm_kernels.c: the GEMM's micro-kernels, one per ISA, their descriptors (tl_isa_*) and the choice
 * among them for tl_cpu_level's SIMD level (tl_gemm_isa, at the end). Each computes an MR x NR tile of
 * float32 sums over one K block from a packed A sliver and a B sliver (packed, or float32 rows read in place): portable C (4 x 16),
 * AVX2+FMA (6 x 16), AVX-512 (12 x 32, with variants that add a whole tile to C in place or compute
 * only 16 columns) and AVX-512 BF16 (12 x 32 from bfloat16 pairs along k). Packing and the loops
 * around them: gemm_pack.c, gemm.c. */
#include "gemm_internal.h"

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
__attribute__((target("avx512f"))) void
tl_gemm_ukernel_avx512_to_c(int64_t kc, const float *ap, const float *bp, int64_t ldb, float *c, int64_t ldc,
                            int add, const float *bias)
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
__attribute__((target("avx512f"))) void
tl_gemm_ukernel_avx512_n16(int64_t kc, const void *ap, const void *bp, int64_t ldb, float *restrict tile)
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

const isa_desc tl_isa_portable = {4, 16, ukernel_portable, "portable", 0};
#ifdef TL_X86
const isa_desc tl_isa_avx2 = {6, 16, ukernel_avx2, "avx2", 0};
const isa_desc tl_isa_avx512 = {12, 32, ukernel_avx512, "avx512", 0};
const isa_desc tl_isa_avx512_bf16 = {12, 32, ukernel_avx512_bf16, "avx512_bf16", 1};
#endif

#ifdef TL_X86
/* The best of 5 runs of 12 independent chains of 2000 dot products (dot) or float32 FMAs, in ns. */
__attribute__((target("avx512f,avx512bf16"))) static int64_t
time_chains(int dot)
{
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a; /* pairs of 1.0 */
    const __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-7f);
    __m512 acc[12];
    for (int j = 0; j < 12; j++) acc[j] = _mm512_setzero_ps();
    int64_t best = -1;
    for (int rep = 0; rep < 5; rep++) {
        const int64_t t0 = tl_now_ns();
        for (int i = 0; i < 2000; i++)
#pragma GCC unroll 12
            for (int j = 0; j < 12; j++) acc[j] = dot ? _mm512_dpbf16_ps(acc[j], a, b) : _mm512_fmadd_ps(acc[j], x, y);
        const int64_t t = tl_now_ns() - t0;
        if (t0 >= 0 && t > 0 && (best < 0 || t < best)) best = t;
    }
    float sink[16];
    for (int j = 1; j < 12; j++) acc[0] = _mm512_add_ps(acc[0], acc[j]);
    _mm512_storeu_ps(sink, acc[0]);
    __asm__ volatile("" : : "r"(sink) : "memory");
    return best;
}

/* Whether bfloat16 GEMMs take the AVX512-BF16 dot product (vdpbf16ps: 32 multiply-adds an instruction
 * from pairs along k) or widen to float32 in packing for the FMA kernel (16 an instruction): the dot
 * product where it runs at least 1.25x the FMA's multiply-adds a ns, as measured once (~0.5 ms); on a
 * Xeon with AMX here it ran at half the FMA's rate (cpu_peak: 107 against 215 GFLOP/s a core), on
 * CPUs that issue it as fast as an FMA it is twice the rate. TLTORCH_BF16_DOT=1 or 0 decides instead
 * (read at each call). */
static int
bf16_dot(void)
{
    const char *e = getenv("TLTORCH_BF16_DOT");
    if (e && (e[0] == '0' || e[0] == '1') && !e[1]) return e[0] == '1';
    static int v = -1;
    int r = __atomic_load_n(&v, __ATOMIC_ACQUIRE);
    if (r < 0) {
        /* each twice, alternating, so that neither runs only while the core raises its clock */
        int64_t t[2] = {-1, -1}; /* [dot, fma] */
        for (int i = 0; i < 4; i++) {
            const int64_t ti = time_chains(!(i & 1));
            if (ti > 0 && (t[i & 1] < 0 || ti < t[i & 1])) t[i & 1] = ti;
        }
        const int64_t td = t[0], tf = t[1];
        /* 32 / td >= 1.25 * 16 / tf */
        r = td > 0 && tf > 0 && 32.0 * (double)tf >= 1.25 * 16.0 * (double)td;
        __atomic_store_n(&v, r, __ATOMIC_RELEASE);
    }
    return r;
}
#endif

/* The GEMM's micro-kernel for a dtype on this CPU (tl_cpu_level: its SIMD level, capped by
 * TLTORCH_CPU_ISA). */
const isa_desc *
tl_gemm_isa(tl_dtype dtype)
{
#ifdef TL_X86
    const int level = tl_cpu_level();
    /* bfloat16 inputs go to the dot-product instructions where they are fast (bf16_dot), else widened
     * to float32 in packing as float16 ones always are (rounding those to bfloat16 would lose 3 bits). */
    if (level >= 2 && dtype == TL_BFLOAT16 && __builtin_cpu_supports("avx512bf16") && bf16_dot())
        return &tl_isa_avx512_bf16;
    if (level >= 2) return &tl_isa_avx512;
    if (level >= 1) return &tl_isa_avx2;
#else
    (void)dtype;
#endif
    return &tl_isa_portable;
}

const char *
tl_gemm_bf16_isa(void)
{
    return tl_gemm_isa(TL_BFLOAT16)->name;
}
