/* qlinear_int8.c: the int8 linear layer for inference, activations and weights both in 8 bits:
 *
 *     y[m, n] = sum_g a_s[m, g] * w_s[g, n] * (sum_{k in g} q[m, k] w[n, k] - zp[m, g] * wsum[g, n]) + bias[n]
 *
 * K is cut into groups g of G consecutive inputs (the last may be shorter). The weight W (N x K) is int8
 * with a float32 scale per output channel and group w_s[g, n] (a per-channel scale is the same in every
 * group), packed once (tl_int8_pack_cpu) into slivers of NR = 32 columns: for each 4 consecutive k
 * (zero-padded to a multiple of 4 in every group) the 4 bytes of each column, then per group the
 * sliver's scales and v[g, n] = w_s[g, n] * wsum[g, n], wsum the group's sum of the column's int8
 * weights. Each call quantises x per row and group to uint8, asymmetrically (GELU outputs are
 * one-sided): lo = min(0, min x), hi = max(0, max x), a_s = (hi - lo) / 255, zp = rint(-lo / a_s),
 * q = clamp(rint(x / a_s) + zp, 0, 255) (x / a_s as x * (1 / a_s)), into the caller's workspace,
 * with u[m, g] = a_s[m, g] * zp[m, g]. Then, per output, in this order of float32 operations:
 *     f = 0;  for each g:  acc = sum_k q w (int32, exact);  f = fma(a_s, acc * w_s, f);  f = fma(-u, v, f)
 *     y = f + bias
 * which the AVX512-VNNI path (vpdpbusd: uint8 x int8 in fours into int32) and the portable path both
 * follow, so their results are bitwise equal, and equal for any thread count (each output is one
 * tile's). acc * w_s is exact in its conversion to float32 for G <= 512 (|acc| <= 255 * 127 * G < 2^24).
 * A row whose group holds a NaN or an infinity gives NaN outputs (its scale is NaN).
 *
 * Why groups: on all-MiniLM-L6-v2 (mean-pooled last_hidden_state over 512 generated reviews padded to
 * 64 tokens, cosine to the float32 body, min over sentences) int8 weights with one scale per channel
 * reach 0.99855 even with float32 activations (0.99922 with groups of 128, 0.99952 of 64); per-row
 * activation scales with float32 weights 0.99625, the FFN's first layer (after a LayerNorm whose
 * output has one hidden dimension ~15x the rest) alone 0.99874; torch's quantize_dynamic (per-row,
 * per-channel) far less.
 *
 * Memory: the packed weight, N_pad * (K_pad + 8 * groups) bytes (N_pad, K_pad: N and K padded as above);
 * the workspace, M_pad * (K_pad + 8 * groups) bytes (M_pad: M rounded up to MR), read by every thread;
 * a thread reads its own columns' slivers once per block of rows (at most ~512 KB of A).
 */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TL_X86 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define NR TL_INT8_NR /* columns of a sliver: two zmm of int32 */
#define MR 6          /* rows of a tile */
#define NV (NR / 16)
#define HEADER 64     /* bytes before the slivers */
#define MAGIC 0x38494c54 /* "TLI8" */
#define A_BLOCK_BYTES (512 << 10)

typedef struct {
    int64_t N, K, G, groups, kpad; /* kpad: K with every group padded to a multiple of 4 */
    int64_t sliver;                /* bytes of one packed sliver (NR columns) */
} layout;

/* Group g's first k and its length (the last may be shorter), and its offset in a padded row. */
static inline int64_t
group_len(const layout *L, int64_t g)
{
    return g < L->groups - 1 ? L->G : L->K - g * L->G;
}

static layout
layout_of(int64_t N, int64_t K, int64_t G)
{
    layout L;
    L.N = N;
    L.K = K;
    L.G = G;
    L.groups = K > 0 ? (K + G - 1) / G : 0;
    L.kpad = L.groups ? (L.groups - 1) * G + (((K - (L.groups - 1) * G) + 3) & ~(int64_t)3) : 0;
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
    return (M + MR - 1) / MR * MR * (L.kpad + 8 * L.groups);
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
                kp += (len + 3) & ~(int64_t)3;
                const float sc = sd[n * ss0 + g * ss1];
                scales[g * NR + j] = sc;
                v[g * NR + j] = sc * (float)sum;
            }
        }
    }
    return TL_OK;
}

/* ---- quantising x ------------------------------------------------------------------------------- */

/* The workspace: A slivers of MR rows, each MR * kpad bytes (for each 4 k, the MR rows' 4 bytes) followed
 * by [groups][MR] a_s and [groups][MR] u. Padding rows and padding k hold zeros. */
static inline int64_t
a_sliver_bytes(const layout *L)
{
    return MR * L->kpad + 8 * MR * L->groups;
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

static inline uint8_t
quant1(float x, float inv, int32_t zp)
{
    long q = lrintf(x * inv) + zp;
    return (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
}

/* Row m of x (any dtype, any strides) into its place in the A sliver, scalar. */
static void
quant_row_scalar(const tl_tensor *x, int64_t m, const layout *L, uint8_t *sl, int r)
{
    const char *xd = x->data;
    const int64_t es = (int64_t)tl_dtype_size(x->dtype), s0 = x->strides[0], s1 = x->strides[1];
    float *as = (float *)(sl + MR * L->kpad), *u = as + MR * L->groups;
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
        const float inv = group_params(lo, hi, bad, &as[g * MR + r], &zp);
        u[g * MR + r] = as[g * MR + r] * (float)zp;
        for (int64_t i = 0; i < len; i++) {
            const float v = tl_load_f(xd + (m * s0 + (k0 + i) * s1) * es, 0, x->dtype);
            sl[((kp + i) / 4) * (4 * MR) + 4 * r + (kp + i) % 4] = bad ? 0 : quant1(v, inv, zp);
        }
        kp += (len + 3) & ~(int64_t)3;
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
quant_row_avx512(const void *row, int bf16, const layout *L, uint8_t *sl, int r)
{
    const int64_t es = bf16 ? 2 : 4;
    float *as = (float *)(sl + MR * L->kpad), *u = as + MR * L->groups;
    int64_t kp = 0;
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t len = group_len(L, g);
        const char *p = (const char *)row + g * L->G * es;
        __m512 lo = _mm512_setzero_ps(), hi = lo, chk = lo;
        for (int64_t i = 0; i < len; i += 16) {
            const __m512 v = load16(p + i * es, bf16, (int)(len - i));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            chk = _mm512_add_ps(chk, _mm512_mul_ps(v, _mm512_setzero_ps())); /* NaN iff a NaN or inf */
        }
        const int bad = _mm512_cmp_ps_mask(chk, chk, _CMP_UNORD_Q) != 0;
        int32_t zp;
        const float inv = group_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), bad, &as[g * MR + r], &zp);
        u[g * MR + r] = as[g * MR + r] * (float)zp;
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i vzp = _mm512_set1_epi32(zp), z = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
        uint8_t *dst = sl + (kp / 4) * (4 * MR) + 4 * r;
        for (int64_t i = 0; i < len; i += 16) {
            const int n = (int)(len - i < 16 ? len - i : 16);
            const __m512 v = load16(p + i * es, bf16, n);
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), vzp);
            q = _mm512_min_epi32(_mm512_max_epi32(q, z), top);
            if (bad) q = z;
            /* 16 bytes, 4 per 4-k step, the steps MR * 4 bytes apart */
            const __m128i b = _mm512_cvtepi32_epi8(q);
            uint32_t wds[4];
            _mm_storeu_si128((__m128i *)wds, b);
            for (int t = 0; t < (n + 3) / 4; t++) {
                uint32_t wd = wds[t];
                if (n - 4 * t < 4) wd &= (1u << (8 * (n - 4 * t))) - 1u;
                memcpy(dst + (i / 4 + t) * (4 * MR), &wd, 4);
            }
        }
        kp += (len + 3) & ~(int64_t)3;
    }
}
#endif

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

const char *
tl_int8_isa(void)
{
    return has_vnni() ? "avx512vnni" : "portable";
}

/* ---- the tiles ---------------------------------------------------------------------------------- */

/* tile[r][j] = f (before the bias) for the MR rows of A sliver ap and the NR columns of B sliver bp. */
static void
tile_portable(const layout *L, const uint8_t *ap, const uint8_t *bp, float tile[MR][NR])
{
    const float *as = (const float *)(ap + MR * L->kpad), *u = as + MR * L->groups;
    const float *ws = (const float *)(bp + NR * L->kpad), *v = ws + NR * L->groups;
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) tile[r][j] = 0.0f;
    int64_t kq = 0; /* 4-k step */
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t steps = (group_len(L, g) + 3) / 4;
        int32_t acc[MR][NR] = {{0}};
        for (int64_t s = 0; s < steps; s++) {
            const uint8_t *a = ap + (kq + s) * 4 * MR, *b = bp + (kq + s) * 4 * NR;
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < NR; j++)
                    acc[r][j] += a[4 * r] * (int8_t)b[4 * j] + a[4 * r + 1] * (int8_t)b[4 * j + 1] +
                                 a[4 * r + 2] * (int8_t)b[4 * j + 2] + a[4 * r + 3] * (int8_t)b[4 * j + 3];
        }
        kq += steps;
        for (int r = 0; r < MR; r++)
            for (int j = 0; j < NR; j++) {
                const float t = (float)acc[r][j] * ws[g * NR + j];
                tile[r][j] = fmaf(-u[g * MR + r], v[g * NR + j], fmaf(as[g * MR + r], t, tile[r][j]));
            }
    }
}

#ifdef TL_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void
tile_vnni(const layout *L, const uint8_t *ap, const uint8_t *bp, float tile[MR][NR])
{
    const float *as = (const float *)(ap + MR * L->kpad), *u = as + MR * L->groups;
    const float *ws = (const float *)(bp + NR * L->kpad), *v = ws + NR * L->groups;
    __m512 f[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) f[r][j] = _mm512_setzero_ps();
    const uint8_t *a = ap, *b = bp;
    for (int64_t g = 0; g < L->groups; g++) {
        const int64_t steps = (group_len(L, g) + 3) / 4;
        __m512i acc[MR][NV];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[r][j] = _mm512_setzero_si512();
        for (int64_t s = 0; s < steps; s++, a += 4 * MR, b += 4 * NR) {
            __m512i bv[NV];
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) bv[j] = _mm512_loadu_si512(b + 64 * j);
            _mm_prefetch((const char *)(b + 8 * 4 * NR), _MM_HINT_T0);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                int32_t aw;
                memcpy(&aw, a + 4 * r, 4);
                const __m512i av = _mm512_set1_epi32(aw);
#pragma GCC unroll 4
                for (int j = 0; j < NV; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
            }
        }
        __m512 wv[NV], vv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            wv[j] = _mm512_loadu_ps(ws + g * NR + 16 * j);
            vv[j] = _mm512_loadu_ps(v + g * NR + 16 * j);
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const __m512 sa = _mm512_set1_ps(as[g * MR + r]), su = _mm512_set1_ps(u[g * MR + r]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) {
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), wv[j]);
                f[r][j] = _mm512_fnmadd_ps(su, vv[j], _mm512_fmadd_ps(sa, t, f[r][j]));
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(&tile[r][16 * j], f[r][j]);
}

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
store_avx512(float tile[MR][NR], const float *bias, char *y, int64_t ys0, int bf16, int mn, int nn)
{
    for (int j = 0; j < NV; j++) {
        const int n = nn - 16 * j;
        if (n <= 0) break;
        const __mmask16 m = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
        const __m512 b = _mm512_loadu_ps(bias + 16 * j);
        for (int r = 0; r < mn; r++) {
            const __m512 o = _mm512_add_ps(_mm512_loadu_ps(&tile[r][16 * j]), b);
            if (bf16)
                _mm256_mask_storeu_epi16(y + (r * ys0 + 16 * j) * 2, m, to_bf16(o));
            else
                _mm512_mask_storeu_ps(y + (r * ys0 + 16 * j) * 4, m, o);
        }
    }
}
#endif

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
    uint8_t *abase = ws->data;
    const int64_t asl = a_sliver_bytes(&L), nsl_a = (M + MR - 1) / MR, nsl_b = (N + NR - 1) / NR;
    const int vnni = has_vnni();
    const int fast_x = vnni && (x->dtype == TL_FLOAT32 || x->dtype == TL_BFLOAT16) && (x->strides[1] == 1 || K <= 1);
    const int fast_y = vnni && (y->dtype == TL_FLOAT32 || y->dtype == TL_BFLOAT16) && (y->strides[1] == 1 || N == 1);
    /* A slivers per block of rows: ~A_BLOCK_BYTES of A, read against each of a thread's B slivers */
    int64_t blk = asl > 0 ? A_BLOCK_BYTES / asl : nsl_a; /* K == 0: y = bias */
    if (blk < 1) blk = 1;
    int nt = tl_threads_for(nthreads, 2.0 * (double)M * N * K);
    if ((double)M * N * K < 1e6) nt = 1;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        /* quantise x: a share of the A slivers each */
        for (int64_t s = nsl_a * tid / nth; s < nsl_a * (tid + 1) / nth; s++) {
            uint8_t *sl = abase + s * asl;
            /* a last sliver's missing rows: zeros (q 0, scales 0); k's padding is multiplied by B's zeros */
            if ((s + 1) * MR > M) memset(sl, 0, (size_t)asl);
            for (int r = 0; r < MR && s * MR + r < M; r++) {
                const int64_t m = s * MR + r;
#ifdef TL_X86
                if (fast_x)
                    quant_row_avx512((const char *)x->data + m * x->strides[0] * (int64_t)tl_dtype_size(x->dtype),
                                     x->dtype == TL_BFLOAT16, &L, sl, r);
                else
#endif
                    quant_row_scalar(x, m, &L, sl, r);
            }
        }
#pragma omp barrier
        /* the tiles: each thread a share of the B slivers (or, with fewer of them than threads, of A's) */
        int64_t js0 = 0, js1 = nsl_b, is0 = 0, is1 = nsl_a;
        if (nsl_b >= nth) {
            js0 = nsl_b * tid / nth;
            js1 = nsl_b * (tid + 1) / nth;
        } else {
            is0 = nsl_a * tid / nth;
            is1 = nsl_a * (tid + 1) / nth;
        }
        float tile[MR][NR] __attribute__((aligned(64)));
        float bvec[NR];
        for (int64_t ib = is0; ib < is1; ib += blk) {
            const int64_t ie = ib + blk < is1 ? ib + blk : is1;
            for (int64_t js = js0; js < js1; js++) {
                const uint8_t *bp = bbase + js * L.sliver;
                const int nn = (int)(N - js * NR < NR ? N - js * NR : NR);
                for (int j = 0; j < NR; j++)
                    bvec[j] = bias && j < nn ? tl_load_f(bias->data, (js * NR + j) * bias->strides[0], bias->dtype)
                                             : 0.0f;
                for (int64_t is = ib; is < ie; is++) {
                    const int mn = (int)(M - is * MR < MR ? M - is * MR : MR);
#ifdef TL_X86
                    if (vnni)
                        tile_vnni(&L, abase + is * asl, bp, tile);
                    else
#endif
                        tile_portable(&L, abase + is * asl, bp, tile);
                    const int64_t es = (int64_t)tl_dtype_size(y->dtype);
                    char *yd = (char *)y->data + (is * MR * y->strides[0] + js * NR * y->strides[1]) * es;
#ifdef TL_X86
                    if (fast_y) {
                        store_avx512(tile, bvec, yd, y->strides[0], y->dtype == TL_BFLOAT16, mn, nn);
                        continue;
                    }
#endif
                    for (int r = 0; r < mn; r++)
                        for (int j = 0; j < nn; j++)
                            tl_store_f(yd, r * y->strides[0] + j * y->strides[1], y->dtype, tile[r][j] + bvec[j]);
                }
            }
        }
    }
    return TL_OK;
}
