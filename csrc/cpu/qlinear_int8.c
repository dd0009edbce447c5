/* qlinear_int8.c: the int8 linear layer for inference, activations and weights both in 8 bits:
 *
 *     y[m, n] = sum_g a_s[m, g] * w_s[g, n] * (sum_{k in g} q[m, k] w[n, k] - zp[m, g] * wsum[g, n]) + bias[n]
 *
 * K is cut into groups g of G consecutive inputs (the last may be shorter), each zero-padded to a multiple
 * of 64 bytes when G is one of 64, of 32 when G is one of 32 (an AMX tile's row), else of 4. The weight W
 * (N x K) is int8 with a float32 scale per output channel and group w_s[g, n] (a per-channel scale is the
 * same in every group), packed once (tl_int8_pack_cpu) into slivers of NR = 32 columns: for each 4
 * consecutive (padded) k the 4 bytes of each column (the VNNI/AMX operand layout: a 16-column half of 16
 * (or 8) such rows is an AMX tile), then
 * per group the sliver's scales and v[g, n] = w_s[g, n] * wsum[g, n], wsum the group's sum of the
 * column's int8 weights. Each call quantises x per row and group to uint8, asymmetrically (GELU outputs are
 * one-sided): lo = min(0, min x), hi = max(0, max x), a_s = (hi - lo) / 255, zp = rint(-lo / a_s),
 * q = clamp(rint(x / a_s) + zp, 0, 255) (x / a_s as x * (1 / a_s)), into the caller's workspace,
 * with u[m, g] = a_s[m, g] * zp[m, g]. Then, per output, in this order of float32 operations:
 *     f = 0;  for each g:  acc = sum_k q w (int32, exact);  f = fma(a_s, acc * w_s, f);  f = fma(-u, v, f)
 *     y = f + bias
 * which the AMX path (tdpbusd: 32 x 32 outputs, 64 or 32 k at a time, in four 16 x 16 int32 tiles), the
 * AVX512-VNNI path (vpdpbusd: uint8 x int8 in fours into int32; 4 x 32 outputs) and the portable path
 * all follow, so their results are bitwise equal, and equal for any thread count (each output is one
 * tile's). acc * w_s is exact in its conversion to float32 for G <= 512 (|acc| <= 255 * 127 * G < 2^24).
 * A row whose group holds a NaN or an infinity gives NaN outputs (its scale is NaN).
 *
 * The scheme, from all-MiniLM-L6-v2 (simulated in float64 torch: the cosine of the mean-pooled
 * last_hidden_state to the float32 body's, min over 512 generated reviews padded to 64 tokens):
 *     int8 weights, float32 x:        one scale a channel 0.99855; groups of 128 0.99922, of 64 0.99952
 *     float32 weights, 8-bit x:       a scale a row 0.99625 (the FFN's first layer, after a LayerNorm with
 *                                     one hidden dimension ~15x the rest, alone 0.99874); a row plus the
 *                                     4 largest columns kept in float 0.99951
 *     both, a scale a channel:        x per row 0.99479, per group of 128 0.99749, of 64 0.99810 (+ the 4
 *                                     largest columns in float 0.99844), per row + 4 columns 0.99812
 *     both, weight groups too:        groups of 128 0.99751, of 64 0.99885 (+ 4 columns 0.99938), of 32
 *                                     0.99920; symmetric int8 x instead of uint8 with a zero point, groups
 *                                     of 64: 0.99777
 *     torch's quantize_dynamic: per-row, per-channel, symmetric weights: far below (0.80-0.87).
 * So asymmetric x in groups of 64 (FrozenLinear's INT8_GROUP), a scale per channel (the stored
 * format) or per channel and group of the weight; the weight's own rounding then sets the floor.
 *
 * Memory: the packed weight, N_pad * (K_pad + 8 * groups) bytes (N_pad, K_pad: N and K padded as above);
 * the workspace, M_pad * (K_pad + 8 * groups) bytes (M_pad: M rounded up to 32): x's rows quantised,
 * then their scales, read by every thread. Rows go in chunks of ~256 KB of A, each multiplied against
 * all of a thread's B slivers while the thread quantises its share of the next chunk between slivers,
 * so that reading x (float, often from DRAM: on a busy 2-core VM a float32 row read costs as much as
 * its AMX products) overlaps the tile products. An output of NT_BYTES or more is written with streaming
 * stores (whole lines, no read of them first, not kept in the caches): 4096 x 768 -> 3072 in float32,
 * AMX, one thread, took 54 ms with ordinary stores and 29 ms streamed.
 *
 * What bounds the AMX path: per group each 32 x 32 block stores its four int32 tiles (4 KB) and converts
 * and scales them in vectors (4 operations a 16 outputs), and the tile stores do not overlap the vector
 * work (in L1, one thread: the epilogue alone 55 ns a block and group, tile stores and epilogue 97-118,
 * products, stores and epilogue 86-93; groups of 32 so run at ~0.9 of the VNNI ceiling at best, groups
 * of 64 at about twice that). Phases that keep f in registers over 2 or 4 groups ran slower (123-143 ns).
 *
 * AMX (Sapphire Rapids on): the process asks Linux for the tile state once (arch_prctl); where that is
 * refused, or TLTORCH_CPU_ISA is avx512, avx2 or portable, the VNNI or portable path runs instead.
 */
#define _GNU_SOURCE /* syscall under -std=c11 */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TL_X86 1
#endif
#if defined(__linux__) && defined(TL_X86)
#include <sys/syscall.h>
#include <unistd.h>
#define TL_AMX 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define NR TL_INT8_NR /* columns of a sliver: two zmm of int32, or two AMX tiles */
#define MR 4          /* rows of a VNNI or portable tile: 8 int32 sums and 8 outputs in zmm (with 6, GCC spills) */
#define MB 32         /* rows of an AMX block (two tiles); the workspace's rows are padded to it */
#define NV (NR / 16)
#define HEADER 64     /* bytes before the slivers */
#define MAGIC 0x38494c54 /* "TLI8" */
#define A_BLOCK_BYTES (256 << 10)
#define AMX_MIN_ROWS 24 /* fewer rows go to VNNI (see tl_int8_linear_cpu) */
#define NT_BYTES (4 << 20) /* outputs this large are streamed past the caches */

typedef struct {
    int64_t N, K, G, groups, unit, kpad; /* unit: each group's padding; kpad: K with every group padded */
    int sh;                              /* log2(unit) for the tiled layouts (unit 32 or 64), else 0 */
    int64_t sliver;                      /* bytes of one packed sliver (NR columns) */
} layout;

static inline int64_t
group_len(const layout *L, int64_t g)
{
    return g < L->groups - 1 ? L->G : L->K - g * L->G;
}

static inline int64_t
group_pad(const layout *L, int64_t g)
{
    return (group_len(L, g) + L->unit - 1) / L->unit * L->unit;
}

static layout
layout_of(int64_t N, int64_t K, int64_t G)
{
    layout L;
    L.N = N;
    L.K = K;
    L.G = G;
    L.unit = G % 64 == 0 ? 64 : G % 32 == 0 ? 32 : 4;
    L.sh = L.unit == 64 ? 6 : L.unit == 32 ? 5 : 0;
    L.groups = K > 0 ? (K + G - 1) / G : 0;
    L.kpad = L.groups ? (L.groups - 1) * G + group_pad(&L, L.groups - 1) : 0;
    L.sliver = NR * L.kpad + 8 * NR * L.groups;
    return L;
}

int64_t
tl_int8_packed_bytes(int64_t N, int64_t K, int64_t group)
{
    if (N < 0 || K < 0 || !tl_int8_group_ok(group)) return -1;
    const layout L = layout_of(N, K, group);
    return HEADER + (N + NR - 1) / NR * L.sliver;
}

int64_t
tl_int8_linear_ws_bytes(int64_t M, int64_t K, int64_t group)
{
    if (M < 0 || K < 0 || !tl_int8_group_ok(group)) return -1;
    const layout L = layout_of(0, K, group);
    return (M + MB - 1) / MB * MB * (L.kpad + 8 * L.groups);
}

tl_status
tl_int8_packed_info(const tl_tensor *packed, int64_t *N, int64_t *K, int64_t *group)
{
    tl_status st = tl_check_cpu(packed, 1);
    if (st) return st;
    if (packed->dtype != TL_UINT8 && packed->dtype != TL_INT8) return TL_ERR_DTYPE;
    if ((packed->strides[0] != 1 && packed->shape[0] > 1) || ((uintptr_t)packed->data & 3)) return TL_ERR_LAYOUT;
    if (packed->shape[0] < HEADER) return TL_ERR_VALUE;
    int64_t h[5];
    memcpy(h, packed->data, sizeof h);
    if (h[0] != MAGIC || h[1] != NR || tl_int8_packed_bytes(h[2], h[3], h[4]) < 0 ||
        packed->shape[0] < tl_int8_packed_bytes(h[2], h[3], h[4]))
        return TL_ERR_VALUE;
    *N = h[2];
    *K = h[3];
    *group = h[4];
    return TL_OK;
}

/* ---- the instruction sets ----------------------------------------------------------------------- */

static int
has_vnni(void)
{
#ifdef TL_X86
    static int v = -1;
    int r = __atomic_load_n(&v, __ATOMIC_ACQUIRE);
    if (r < 0) {
        __builtin_cpu_init();
        r = tl_cpu_level() >= 2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vnni");
        __atomic_store_n(&v, r, __ATOMIC_RELEASE);
    }
    return r;
#else
    return 0;
#endif
}

/* AMX-INT8 with the tile state granted to this process (Linux asks for it: ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA), unless TLTORCH_CPU_ISA caps the level at avx512 or below. */
static int
has_amx(void)
{
#ifdef TL_AMX
    static int v = -1;
    int r = __atomic_load_n(&v, __ATOMIC_ACQUIRE);
    if (r < 0) {
        const char *cap = getenv("TLTORCH_CPU_ISA");
        unsigned a, b, c, d;
        r = 0;
        if (has_vnni() && !(cap && (!strcmp(cap, "avx512") || !strcmp(cap, "avx2") || !strcmp(cap, "portable")))) {
            __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
            if ((d >> 24 & 1) && (d >> 25 & 1)) /* AMX-TILE, AMX-INT8 */
                r = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
        }
        __atomic_store_n(&v, r, __ATOMIC_RELEASE);
    }
    return r;
#else
    return 0;
#endif
}

const char *
tl_int8_isa(void)
{
    return has_amx() ? "amx" : has_vnni() ? "avx512vnni" : "portable";
}

/* ---- packing the weight ------------------------------------------------------------------------- */

tl_status
tl_int8_pack_cpu(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *packed)
{
    tl_status st;
    if ((st = tl_check_cpu(w, 2)) || (st = tl_check_cpu(packed, 1))) return st;
    if (w_scale->device != TL_CPU) return TL_ERR_DEVICE;
    if (w->dtype != TL_INT8 || w_scale->dtype != TL_FLOAT32 || (packed->dtype != TL_UINT8 && packed->dtype != TL_INT8))
        return TL_ERR_DTYPE;
    const int64_t N = w->shape[0], K = w->shape[1];
    if (!tl_int8_group_ok(group)) return TL_ERR_VALUE;
    const layout L = layout_of(N, K, group);
    /* w_scale: (N,) one scale a channel, or (N, groups) */
    if (!(w_scale->ndim == 1 && w_scale->shape[0] == N) &&
        !(w_scale->ndim == 2 && w_scale->shape[0] == N && w_scale->shape[1] == L.groups))
        return TL_ERR_SHAPE;
    if (tl_numel(w_scale) > 0 && !w_scale->data) return TL_ERR_VALUE;
    if (packed->shape[0] < tl_int8_packed_bytes(N, K, group)) return TL_ERR_SHAPE;
    if ((packed->strides[0] != 1 && packed->shape[0] > 1) || ((uintptr_t)packed->data & 3)) return TL_ERR_LAYOUT;

    uint8_t *base = packed->data;
    const int64_t hdr[5] = {MAGIC, NR, N, K, group};
    memset(base, 0, HEADER);
    memcpy(base, hdr, sizeof hdr);
    const int8_t *wd = w->data;
    const float *sd = w_scale->data;
    const int64_t ws0 = w->strides[0], ws1 = w->strides[1];
    const int64_t ss0 = w_scale->strides[0], ss1 = w_scale->ndim == 2 ? w_scale->strides[1] : 0;
    const int64_t nsl = (N + NR - 1) / NR;
    for (int64_t s = 0; s < nsl; s++) {
        uint8_t *sl = base + HEADER + s * L.sliver;
        float *scales = (float *)(sl + NR * L.kpad), *v = scales + NR * L.groups;
        memset(sl, 0, (size_t)L.sliver);
        for (int j = 0; j < NR; j++) {
            const int64_t n = s * NR + j;
            if (n >= N) break;
            int64_t kp = 0; /* k's place in the padded row */
            for (int64_t g = 0; g < L.groups; g++) {
                const int64_t len = group_len(&L, g);
                int32_t sum = 0;
                for (int64_t i = 0; i < len; i++) {
                    const int8_t q = wd[n * ws0 + (g * group + i) * ws1];
                    sl[((kp + i) / 4) * (4 * NR) + 4 * j + (kp + i) % 4] = (uint8_t)q;
                    sum += q;
                }
                kp += group_pad(&L, g);
                const float sc = sd[n * ss0 + g * ss1];
                scales[g * NR + j] = sc;
                v[g * NR + j] = sc * (float)sum;
            }
        }
    }
    return TL_OK;
}

/* ---- quantising x ------------------------------------------------------------------------------- */

/* The workspace: the rows of x quantised, kpad bytes each (padding: zeros), M_pad of them (rows past M:
 * zeros), then a_s[M_pad][groups] and u[M_pad][groups]. With groups padded to 64 or 32 bytes the rows
 * are stored in blocks of 16, each block's k in chunks of that many bytes of its 16 rows: an AMX tile
 * (1 KB or 512 bytes) each, read whole; else row after row. */
typedef struct {
    uint8_t *q;
    float *as, *u;
} arows;

static arows
arows_of(void *ws, const layout *L, int64_t M)
{
    const int64_t mpad = (M + MB - 1) / MB * MB;
    arows A;
    A.q = ws;
    A.as = (float *)(A.q + mpad * L->kpad);
    A.u = A.as + mpad * L->groups;
    return A;
}

/* Where byte k of quantised row m lives; 16 consecutive k (from a multiple of 16) are contiguous. */
static inline uint8_t *
qa(const arows *A, const layout *L, int64_t m, int64_t k)
{
    if (L->sh)
        return A->q + (m >> 4) * 16 * L->kpad + ((k >> L->sh) << (L->sh + 4)) + (m & 15) * L->unit +
               (k & (L->unit - 1));
    return A->q + m * L->kpad + k;
}

/* The offset of byte k of a row from its byte 0, in either layout. */
static inline int64_t
qa_off(const layout *L, int64_t k)
{
    return L->sh ? ((k >> L->sh) << (L->sh + 4)) + (k & (L->unit - 1)) : k;
}

/* The scale and zero point of a group whose extremes (with 0) are lo <= 0 <= hi; bad: it held a NaN or
 * an infinity. Returns 1 / a_s for the quantisation. */
static inline float
group_params(float lo, float hi, int bad, float *a_s, int32_t *zp)
{
    float s = (hi - lo) / 255.0f;
    if (bad) {
        *a_s = NAN;
        *zp = 0;
        return 0.0f;
    }
    if (!(s >= 1.17549435e-38f)) s = 1.0f; /* all zeros, or a range so small that 1 / s would overflow */
    const float inv = 1.0f / s;
    long z = lrintf(-lo * inv);
    *zp = (int32_t)(z < 0 ? 0 : z > 255 ? 255 : z);
    *a_s = s;
    return inv;
}

/* Zeros over bytes [from, to) of row m's padded k (one group's padding), in either layout. */
static void
zero_run(const arows *A, const layout *L, int64_t m, int64_t from, int64_t to)
{
    while (from < to) {
        const int64_t run = L->sh ? L->unit - (from & (L->unit - 1)) : to - from;
        const int64_t n = run < to - from ? run : to - from;
        memset(qa(A, L, m, from), 0, (size_t)n);
        from += n;
    }
}

static inline uint8_t
quant1(float x, float inv, int32_t zp)
{
    long q = lrintf(x * inv) + zp;
    return (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
}

/* Row m of x (any dtype, any strides) into the workspace, scalar. */
static void
quant_row_scalar(const tl_tensor *x, int64_t m, const layout *L, const arows *A)
{
    const char *xd = x->data;
    const int64_t es = (int64_t)tl_dtype_size(x->dtype), s0 = x->strides[0], s1 = x->strides[1];
    float *as = A->as + m * L->groups, *u = A->u + m * L->groups;
    int64_t kp = 0;
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t len = group_len(L, g), k0 = g * L->G;
        float lo = 0.0f, hi = 0.0f;
        int bad = 0;
        for (int64_t i = 0; i < len; i++) {
            const float v = tl_load_f(xd + (m * s0 + (k0 + i) * s1) * es, 0, x->dtype);
            bad |= !isfinite(v);
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        int32_t zp;
        const float inv = group_params(lo, hi, bad, &as[g], &zp);
        u[g] = as[g] * (float)zp;
        for (int64_t i = 0; i < len; i++) {
            const float v = tl_load_f(xd + (m * s0 + (k0 + i) * s1) * es, 0, x->dtype);
            *qa(A, L, m, kp + i) = bad ? 0 : quant1(v, inv, zp);
        }
        zero_run(A, L, m, kp + len, kp + group_pad(L, g));
        kp += group_pad(L, g);
    }
}

#ifdef TL_X86
/* 16 elements of a unit-stride float32 or bfloat16 row (n of them, the rest 0). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline __m512
load16(const void *p, int bf16, int n)
{
    const __mmask16 m = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(m, p);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* quant_row_scalar for a float32 or bfloat16 row with unit column stride: the same values. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
quant_row_avx512(const void *row, int bf16, int64_t m, const layout *L, const arows *A)
{
    const int64_t es = bf16 ? 2 : 4;
    float *as = A->as + m * L->groups, *u = A->u + m * L->groups;
    int64_t kp = 0;
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t len = group_len(L, g);
        const char *p = (const char *)row + g * L->G * es;
        __m512 lo = _mm512_setzero_ps(), hi = lo, chk = lo;
        for (int64_t i = 0; i < len; i += 16) {
            _mm_prefetch(p + i * es + 1024, _MM_HINT_T0);
            const __m512 v = load16(p + i * es, bf16, (int)(len - i));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            chk = _mm512_add_ps(chk, _mm512_mul_ps(v, _mm512_setzero_ps())); /* NaN iff a NaN or inf */
        }
        const int bad = _mm512_cmp_ps_mask(chk, chk, _CMP_UNORD_Q) != 0;
        int32_t zp;
        const float inv = group_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), bad, &as[g], &zp);
        u[g] = as[g] * (float)zp;
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i vzp = _mm512_set1_epi32(zp), z = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
        for (int64_t i = 0; i < len; i += 16) {
            const int n = (int)(len - i < 16 ? len - i : 16);
            const __m512 v = load16(p + i * es, bf16, n);
            __m512i qv = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), vzp);
            qv = _mm512_min_epi32(_mm512_max_epi32(qv, z), top);
            if (bad) qv = z;
            /* n bytes only: with groups padded to 4, 16 could run into the next row's (another thread's) */
            _mm_mask_storeu_epi8(qa(A, L, m, kp + i), n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1),
                                 _mm512_cvtepi32_epi8(qv));
        }
        zero_run(A, L, m, kp + len, kp + group_pad(L, g));
        kp += group_pad(L, g);
    }
}
#endif

/* ---- the tiles: f[r][j] (before the bias) for rows m0.. of the workspace and one B sliver ---------- */

/* Rows m0 .. m0 + mn - 1 (mn <= MR; the tile's other rows repeat the last). */
static void
tile_portable(const layout *L, const arows *A, int64_t m0, int mn, const uint8_t *bp, float tile[][NR])
{
    const float *ws = (const float *)(bp + NR * L->kpad), *v = ws + NR * L->groups;
    for (int r = 0; r < mn; r++)
        for (int j = 0; j < NR; j++) tile[r][j] = 0.0f;
    int64_t kp = 0;
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t len = group_pad(L, g);
        for (int r = 0; r < mn; r++) {
            const uint8_t *a0 = qa(A, L, m0 + r, 0);
            const float as = A->as[(m0 + r) * L->groups + g], u = A->u[(m0 + r) * L->groups + g];
            for (int j = 0; j < NR; j++) {
                const int8_t *b = (const int8_t *)bp + kp * NR + 4 * j;
                int32_t acc = 0;
                for (int64_t k = kp; k < kp + len; k += 4, b += 4 * NR) {
                    const uint8_t *a = a0 + qa_off(L, k);
                    acc += a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3];
                }
                const float t = (float)acc * ws[g * NR + j];
                tile[r][j] = fmaf(-u, v[g * NR + j], fmaf(as, t, tile[r][j]));
            }
        }
        kp += len;
    }
}

#ifdef TL_X86
/* f = fma(-u, v, fma(a_s, acc * w_s, f)) for one row's two vectors. */
__attribute__((target("avx512f"), always_inline)) static inline void
epilogue(__m512 *f, const __m512i *acc, const __m512 *wv, const __m512 *vv, float as, float u)
{
    const __m512 sa = _mm512_set1_ps(as), su = _mm512_set1_ps(u);
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++)
        f[j] = _mm512_fnmadd_ps(su, vv[j], _mm512_fmadd_ps(sa, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[j]), wv[j]), f[j]));
}

/* One k step of 4 for the tile's rows: acc[r] += a[r][k..k+3] . b (vpdpbusd). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) static inline void
vnni_step(__m512i acc[MR][NV], const uint8_t *const ar[MR], int64_t ko, const uint8_t *b)
{
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) bv[j] = _mm512_loadu_si512(b + 64 * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        int32_t aw;
        memcpy(&aw, ar[r] + ko, 4);
        const __m512i av = _mm512_set1_epi32(aw);
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
    }
}

/* The tile's groups, f += each one's epilogue. Every group but the last is G bytes (G is a multiple of the
 * padding unit); its first len (a constant: 64, 32 or 4) go unrolled, with no loop carrying the int32
 * sums, which GCC would otherwise copy between registers at every step; the rest step by step. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) static inline void
vnni_groups(const layout *L, const uint8_t *const ar[MR], const float *const asr[MR], const float *const ur[MR],
            const uint8_t *bp, __m512 f[MR][NV], const int64_t len)
{
    const float *ws = (const float *)(bp + NR * L->kpad), *v = ws + NR * L->groups;
    const int64_t G = L->G, last = L->groups - 1;
    for (int64_t g = 0; g <= last; g++) {
        const int64_t kp0 = g * G, end = g < last ? kp0 + G : L->kpad;
        __m512i acc[MR][NV];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[r][j] = _mm512_setzero_si512();
        int64_t kp = kp0;
        if (kp + len <= end) {
            const int64_t ko = qa_off(L, kp);
            const uint8_t *b = bp + kp * NR;
#pragma GCC unroll 16
            for (int64_t i = 0; i < len; i += 4) {
                _mm_prefetch((const char *)(b + i * NR + 8 * 4 * NR), _MM_HINT_T0);
                vnni_step(acc, ar, ko + i, b + i * NR);
            }
            kp += len;
        }
        for (; kp < end; kp += 4) vnni_step(acc, ar, qa_off(L, kp), bp + kp * NR);
        __m512 wv[NV], vv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            wv[j] = _mm512_loadu_ps(ws + g * NR + 16 * j);
            vv[j] = _mm512_loadu_ps(v + g * NR + 16 * j);
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) epilogue(f[r], acc[r], wv, vv, asr[r][g], ur[r][g]);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void
tile_vnni(const layout *L, const arows *A, int64_t m0, int mn, const uint8_t *bp, float tile[][NR])
{
    const uint8_t *ar[MR];
    const float *asr[MR], *ur[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        const int64_t m = m0 + (r < mn ? r : mn - 1);
        ar[r] = qa(A, L, m, 0);
        asr[r] = A->as + m * L->groups;
        ur[r] = A->u + m * L->groups;
    }
    __m512 f[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) f[r][j] = _mm512_setzero_ps();
    /* len: 64 or 32 within one row of a tile of the AMX layouts */
    if (L->G % 64 == 0)
        vnni_groups(L, ar, asr, ur, bp, f, 64);
    else if (L->G >= 32)
        vnni_groups(L, ar, asr, ur, bp, f, 32);
    else
        vnni_groups(L, ar, asr, ur, bp, f, 4);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(&tile[r][16 * j], f[r][j]);
}
#endif

#ifdef TL_AMX
/* The tile registers' shapes (palette 1): C tiles 0-3 16 x 16 int32; A tiles 4-5 16 rows of unit bytes,
 * B tiles 6-7 unit / 4 rows of 64 bytes (16 columns' 4 bytes), unit 64 or 32. */
typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* A constant: GCC drops stores to a local configuration that only ldtilecfg reads. */
static const amx_config amx_tiles[2] __attribute__((aligned(64))) = {
    {.palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}},
    {.palette = 1, .colsb = {64, 64, 64, 64, 32, 32, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 8, 8}}};

__attribute__((target("amx-tile"))) static void
amx_begin(int64_t unit)
{
    _tile_loadconfig(&amx_tiles[unit == 32]);
}

__attribute__((target("amx-tile"))) static void
amx_end(void)
{
    _tile_release();
}

/* The int32 sums of group g's k in [kp, end) for the block's two 16-row halves a0, a1 and sliver bp: tiles 0-3
 * the block's four 16 x 16 quarters, 4-5 its two 16-row halves of A, 6-7 the sliver's two 16-column
 * halves of B. */
__attribute__((target("amx-tile,amx-int8"), always_inline)) static inline void
amx_group(const uint8_t *a0, const uint8_t *a1, const uint8_t *bp, int64_t kp, int64_t end, int64_t unit)
{
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (; kp < end; kp += unit) {
        const uint8_t *b = bp + kp * NR;
        _tile_loadd(4, a0 + kp * 16, unit);
        _tile_loadd(5, a1 + kp * 16, unit);
        _tile_loadd(6, b, 4 * NR);
        _tile_loadd(7, b + 64, 4 * NR);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
}

__attribute__((target("amx-tile"), always_inline)) static inline void
amx_store(int32_t c[MB][NR])
{
    _tile_stored(0, &c[0][0], 4 * NR);
    _tile_stored(1, &c[0][16], 4 * NR);
    _tile_stored(2, &c[16][0], 4 * NR);
    _tile_stored(3, &c[16][16], 4 * NR);
}

/* Rows m0 .. m0 + MB - 1 (the workspace holds them all). Group g + 1's tile products are issued before
 * group g's epilogue, so that the tile unit works while the vector units convert and scale. */
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl"))) static void
tile_amx(const layout *L, const arows *A, int64_t m0, const uint8_t *bp, float tile[][NR])
{
    const float *ws = (const float *)(bp + NR * L->kpad), *v = ws + NR * L->groups;
    const uint8_t *a0 = qa(A, L, m0, 0), *a1 = qa(A, L, m0 + 16, 0);
    const float *as = A->as + m0 * L->groups, *u = A->u + m0 * L->groups;
    int32_t c[2][MB][NR] __attribute__((aligned(64)));
    int64_t kp = group_pad(L, 0);
    amx_group(a0, a1, bp, 0, kp, L->unit);
    amx_store(c[0]);
    for (int64_t g = 0; g < L->groups; g++) {
        const int more = g + 1 < L->groups;
        if (more) amx_group(a0, a1, bp, kp, kp + group_pad(L, g + 1), L->unit);
        __m512 wv[NV], vv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            wv[j] = _mm512_loadu_ps(ws + g * NR + 16 * j);
            vv[j] = _mm512_loadu_ps(v + g * NR + 16 * j);
        }
        int32_t(*cg)[NR] = c[g & 1];
        for (int r = 0; r < MB; r++) {
            __m512 f[NV];
            __m512i acc[NV];
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) {
                f[j] = g ? _mm512_load_ps(&tile[r][16 * j]) : _mm512_setzero_ps();
                acc[j] = _mm512_load_si512(&cg[r][16 * j]);
            }
            epilogue(f, acc, wv, vv, as[r * L->groups + g], u[r * L->groups + g]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) _mm512_store_ps(&tile[r][16 * j], f[j]);
        }
        if (more) {
            amx_store(c[(g + 1) & 1]);
            kp += group_pad(L, g + 1);
        }
    }
}
#endif

#ifdef TL_X86
/* float32 -> bfloat16 as tl_f32_to_bf16 (round to nearest even, NaN kept quiet), 16 at a time. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline __m256i
to_bf16(__m512 x)
{
    const __m512i u = _mm512_castps_si512(x);
    const __m512i r = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i q = _mm512_mask_or_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(q);
}

/* y rows of a tile with unit column stride, float32 or bfloat16: tile + bias, nn <= NR columns. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
store_avx512(float tile[][NR], const float *bias, char *y, int64_t ys0, int bf16, int mn, int nn, int nt)
{
    for (int j = 0; j < NV; j++) {
        const int n = nn - 16 * j;
        if (n <= 0) break;
        const __mmask16 m = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
        const __m512 b = _mm512_loadu_ps(bias + 16 * j);
        for (int r = 0; r < mn; r++) {
            const __m512 o = _mm512_add_ps(_mm512_loadu_ps(&tile[r][16 * j]), b);
            char *p = y + (r * ys0 + 16 * j) * (bf16 ? 2 : 4);
            if (nt && n >= 16 && !((uintptr_t)p & (bf16 ? 31 : 63))) { /* whole lines, past the caches */
                if (bf16)
                    _mm256_stream_si256((__m256i *)p, to_bf16(o));
                else
                    _mm512_stream_ps((float *)p, o);
            } else if (bf16)
                _mm256_mask_storeu_epi16(p, m, to_bf16(o));
            else
                _mm512_mask_storeu_ps(p, m, o);
        }
    }
}
#endif

/* Quantise rows [m0, m1) of x into the workspace; rows from M on (the padding of the last block): zeros. */
static void
quant_rows(const tl_tensor *x, const layout *L, const arows *A, int64_t m0, int64_t m1, int64_t M, int fast_x)
{
    for (int64_t m = m0; m < m1; m++) {
        if (m >= M) {
            zero_run(A, L, m, 0, L->kpad);
            if (L->groups) { /* K = 0: no groups, and no scale arrays to clear (their pointers may be NULL) */
                memset(A->as + m * L->groups, 0, sizeof(float) * (size_t)L->groups);
                memset(A->u + m * L->groups, 0, sizeof(float) * (size_t)L->groups);
            }
            continue;
        }
#ifdef TL_X86
        if (fast_x) {
            quant_row_avx512((const char *)x->data + m * x->strides[0] * (int64_t)tl_dtype_size(x->dtype),
                             x->dtype == TL_BFLOAT16, m, L, A);
            continue;
        }
#endif
        quant_row_scalar(x, m, L, A);
    }
}

/* ---- the layer ---------------------------------------------------------------------------------- */

tl_status
tl_int8_linear_cpu(const tl_tensor *x, const tl_tensor *packed, const tl_tensor *bias, tl_tensor *y, tl_tensor *ws,
                   int nthreads)
{
    tl_status st;
    int64_t N, K, G;
    if ((st = tl_int8_packed_info(packed, &N, &K, &G)) || (st = tl_check_cpu(x, 2)) || (st = tl_check_cpu(y, 2)))
        return st;
    if (!tl_is_float_dtype(x->dtype) || (y->dtype != TL_FLOAT32 && y->dtype != x->dtype)) return TL_ERR_DTYPE;
    const int64_t M = x->shape[0];
    if (x->shape[1] != K || y->shape[0] != M || y->shape[1] != N) return TL_ERR_SHAPE;
    if (bias) {
        if ((st = tl_check_cpu(bias, 1))) return st;
        if (!tl_is_float_dtype(bias->dtype)) return TL_ERR_DTYPE;
        if (bias->shape[0] != N) return TL_ERR_SHAPE;
    }
    if (M == 0 || N == 0) return TL_OK;
    const layout L = layout_of(N, K, G);
    const int64_t need = tl_int8_linear_ws_bytes(M, K, G);
    if (!ws || ws->device != TL_CPU || ws->ndim != 1 || (ws->dtype != TL_UINT8 && ws->dtype != TL_INT8) ||
        ws->shape[0] < need || (ws->strides[0] != 1 && ws->shape[0] > 1) || (need > 0 && !ws->data) ||
        ((uintptr_t)ws->data & 3))
        return TL_ERR_VALUE;

    const uint8_t *bbase = (const uint8_t *)packed->data + HEADER;
    const arows A = arows_of(ws->data, &L, M);
    /* AMX for groups of 32 or 64 (or their multiples) from 24 rows: with the output streamed it wins at every
     * K (4096 x 384 -> 384, one thread: groups of 64 2.7 ms against VNNI's 3.1-3.7, of 32 4.1-4.6 against
     * 4.6-4.9); below 24 rows its blocks of 32 are mostly padding (16 x 384 -> 1536: 0.09 ms against 0.07). */
    const int vnni = has_vnni(), amx = vnni && L.sh && M >= AMX_MIN_ROWS && has_amx();
    const int fast_x = vnni && (x->dtype == TL_FLOAT32 || x->dtype == TL_BFLOAT16) && (x->strides[1] == 1 || K <= 1);
    const int fast_y = vnni && (y->dtype == TL_FLOAT32 || y->dtype == TL_BFLOAT16) && (y->strides[1] == 1 || N == 1);
    const int mr = amx ? MB : MR;
    const int nt_y = fast_y && (double)M * N * (double)tl_dtype_size(y->dtype) >= NT_BYTES;
    const int64_t mpad = (M + MB - 1) / MB * MB, nsl_b = (N + NR - 1) / NR;
    const int64_t row_bytes = L.kpad + 8 * L.groups;
    /* Chunks of rows (a multiple of both tiles' heights, ~A_BLOCK_BYTES of A), each read against all of a
     * thread's B slivers; a chunk's rows are quantised while the one before is multiplied. */
    int64_t chunk = row_bytes > 0 ? A_BLOCK_BYTES / row_bytes / 96 * 96 : mpad;
    if (chunk < 96) chunk = 96;
    const int64_t nch = (mpad + chunk - 1) / chunk;
    int nt = tl_threads_for(nthreads, 2.0 * (double)M * N * K);
    if ((double)M * N * K < 1e6) nt = 1;
    tl_barrier bar;
    if (nt > 1 && tl_barrier_init(&bar)) return TL_ERR_NOMEM;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        float tile[MB][NR] __attribute__((aligned(64)));
        float bvec[NR];
        const int64_t es = (int64_t)tl_dtype_size(y->dtype);
        /* this thread's share of chunk c's rows (rows past M, up to mpad: zeros) */
#define SHARE(c, lo, hi)                                                                                  \
    const int64_t lo##_c0 = (c) * chunk, lo##_n = ((c) + 1) * chunk < mpad ? chunk : mpad - (c) * chunk; \
    const int64_t lo = lo##_c0 + lo##_n * tid / nth, hi = lo##_c0 + lo##_n * (tid + 1) / nth
        int64_t qnext = 0, qend = 0; /* rows of the next chunk still to quantise */
        {
            SHARE(0, q0, q1);
            quant_rows(x, &L, &A, q0, q1, M, fast_x);
        }
#ifdef TL_AMX
        if (amx) amx_begin(L.unit);
#endif
        for (int64_t c = 0; c < nch; c++) {
            if (nth > 1) tl_barrier_wait(&bar, nth); /* chunk c quantised */
            if (c + 1 < nch) {
                SHARE(c + 1, q0, q1);
                qnext = q0;
                qend = q1;
            }
            /* chunk c's tiles: each thread a share of the B slivers (with fewer of them than threads, of
             * the chunk's A slivers) */
            const int64_t r0 = c * chunk, r1 = r0 + chunk < M ? r0 + chunk : M;
            int64_t js0 = 0, js1 = nsl_b, is0 = r0 / mr, is1 = r1 > r0 ? (r1 + mr - 1) / mr : is0;
            if (nsl_b >= nth) {
                js0 = nsl_b * tid / nth;
                js1 = nsl_b * (tid + 1) / nth;
            } else {
                const int64_t n = is1 - is0;
                is1 = is0 + n * (tid + 1) / nth;
                is0 = is0 + n * tid / nth;
            }
            for (int64_t js = js0; js < js1; js++) {
                const uint8_t *bp = bbase + js * L.sliver;
                const int nn = (int)(N - js * NR < NR ? N - js * NR : NR);
                for (int j = 0; j < NR; j++)
                    bvec[j] = bias && j < nn ? tl_load_f(bias->data, (js * NR + j) * bias->strides[0], bias->dtype)
                                             : 0.0f;
                for (int64_t is = is0; is < is1; is++) {
                    const int64_t m0 = is * mr;
                    const int mn = (int)(M - m0 < mr ? M - m0 : mr);
#ifdef TL_AMX
                    if (amx)
                        tile_amx(&L, &A, m0, bp, tile);
                    else
#endif
#ifdef TL_X86
                    if (vnni)
                        tile_vnni(&L, &A, m0, mn, bp, tile);
                    else
#endif
                        tile_portable(&L, &A, m0, mn, bp, tile);
                    char *yd = (char *)y->data + (m0 * y->strides[0] + js * NR * y->strides[1]) * es;
#ifdef TL_X86
                    if (fast_y) {
                        store_avx512(tile, bvec, yd, y->strides[0], y->dtype == TL_BFLOAT16, mn, nn, nt_y);
                        continue;
                    }
#endif
                    for (int r = 0; r < mn; r++)
                        for (int j = 0; j < nn; j++)
                            tl_store_f(yd, r * y->strides[0] + j * y->strides[1], y->dtype, tile[r][j] + bvec[j]);
                }
                /* a slice of the next chunk's rows, so that reading x overlaps the tiles */
                const int64_t upto = qnext + (qend - qnext + (js1 - js) - 1) / (js1 - js);
                quant_rows(x, &L, &A, qnext, upto, M, fast_x);
                qnext = upto;
            }
            quant_rows(x, &L, &A, qnext, qend, M, fast_x);
            qnext = qend;
        }
#undef SHARE
#ifdef TL_X86
        if (nt_y) _mm_sfence(); /* the streamed lines seen by the threads (and the caller) after */
#endif
#ifdef TL_AMX
        if (amx) amx_end();
#endif
    }
    if (nt > 1) tl_barrier_destroy(&bar);
    return TL_OK;
}

/* ---- the weight as a dense float tensor ------------------------------------------------------------ */

/* out[n, k] = w[n, k] * s, s = w_scale[n] or w_scale[n, k / group]: the product rounded to float32 (as
 * torch's w.float() * s), then to out's dtype. The
 * weight a bfloat16 GEMM (oneDNN's, AMX) multiplies when x is in bfloat16: there it runs 2-3x the int8
 * kernel's rate, so that reading the weight in 8 bits and expanding it per call wins from a few dozen rows. */

#ifdef TL_X86
/* n (<= 16) weights of one run of a group, times s, into out (float32 or bfloat16, unit stride). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline void
dequant16(const int8_t *w, float s, char *out, int bf16, int n)
{
    const __mmask16 m = (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w))),
                                   _mm512_set1_ps(s));
    if (bf16)
        _mm256_mask_storeu_epi16(out, m, to_bf16(v));
    else
        _mm512_mask_storeu_ps(out, m, v);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
dequant_row_avx512(const int8_t *w, const float *s, int64_t ss, int64_t K, int64_t group, char *out, int bf16)
{
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, g++) {
        const float sv = s[g * ss];
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        for (int64_t k = k0; k < k1; k += 16)
            dequant16(w + k, sv, out + k * es, bf16, (int)(k1 - k < 16 ? k1 - k : 16));
    }
}
#endif

tl_status
tl_int8_dequant_cpu(const tl_tensor *w, const tl_tensor *w_scale, int64_t group, tl_tensor *out, int nthreads)
{
    const tl_status st = tl_check_int8_dequant(w, w_scale, group, out, NULL);
    if (st) return st;
    const int64_t N = w->shape[0], K = w->shape[1];
    if (N == 0 || K == 0) return TL_OK;
    const int per_group = w_scale->ndim == 2;
    if (!per_group) group = K; /* one scale for the whole row */
    const int64_t ss = per_group ? w_scale->strides[1] : 0, es = (int64_t)tl_dtype_size(out->dtype);
#ifdef TL_X86
    const int fast = tl_cpu_level() >= 2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                     (w->strides[1] == 1 || K == 1) && (out->strides[1] == 1 || K == 1) &&
                     (out->dtype == TL_FLOAT32 || out->dtype == TL_BFLOAT16);
#endif
    const int nt = tl_threads_for(nthreads, 2.0 * (double)N * (double)K);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = (const int8_t *)w->data + n * w->strides[0];
        const float *sr = (const float *)w_scale->data + n * w_scale->strides[0];
        char *orow = (char *)out->data + n * out->strides[0] * es;
#ifdef TL_X86
        if (fast) {
            dequant_row_avx512(wr, sr, ss, K, group, orow, out->dtype == TL_BFLOAT16);
            continue;
        }
#endif
        for (int64_t k = 0; k < K; k++)
            tl_store_f(orow, k * out->strides[1], out->dtype, (float)wr[k * w->strides[1]] * sr[(k / group) * ss]);
    }
    return TL_OK;
}
