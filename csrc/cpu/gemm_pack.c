/* gemm_pack.c: the GEMM's packing. A block of A (rows of MR) or of B (columns of NR) is copied into
 * the contiguous float32 slivers the micro-kernels read, whatever its strides and dtype: bfloat16 and
 * float16 widened, an int8 weight times its per-channel scale; float32 rows that run across a sliver
 * go through 16 x 16 AVX-512 register transposes. For the bfloat16 dot-product kernel, both operands
 * are packed as (k, k+1) pairs instead. */
#include "gemm_internal.h"

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
__attribute__((target("avx512f"))) void
tl_gemm_pack_rows_across_avx512(const float *m, int64_t ldm, int64_t kc, int jn, int w, float *d)
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

/* dk[i] = element `off` of line i (lines[i] its start) as float32, for i < n: one k of a sliver's
 * rows of A or columns of B, in their dtype (float32, bfloat16, float16, or an int8 weight). */
static inline void
load_lines(float *dk, const char *const *lines, int n, int64_t off, tl_dtype dtype)
{
    switch (dtype) {
    case TL_FLOAT32:
        for (int i = 0; i < n; i++) dk[i] = ((const float *)lines[i])[off];
        break;
    case TL_BFLOAT16:
        for (int i = 0; i < n; i++) dk[i] = tl_bf16_to_f32(((const uint16_t *)lines[i])[off]);
        break;
    case TL_INT8:
        for (int i = 0; i < n; i++) dk[i] = (float)((const int8_t *)lines[i])[off];
        break;
    default:
        for (int i = 0; i < n; i++) dk[i] = tl_f16_to_f32(((const uint16_t *)lines[i])[off]);
        break;
    }
}

/* dst[s][koff + k][r] = src[(i0 + s*MR + r), k0 + k] for k < kc and the rows [i0, i0+mc), zero past
 * mc; a sliver holds kstride values of k (a K block may be packed from two sources, each at its offset).
 * The loop runs over k outside and the sliver's rows inside, so that the writes are contiguous (2-4x
 * faster than row by row, whose writes stride by MR). */
void
tl_gemm_pack_a(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, int64_t s_begin,
               int64_t s_end, float *dst, int64_t kstride, int64_t koff)
{
    const int64_t sa0 = a->strides[0], sa1 = a->strides[1];
    const int64_t es = (int64_t)tl_dtype_size(a->dtype);
#ifdef TL_X86
    if (a->dtype == TL_FLOAT32 && sa1 == 1 && sa0 != 1 && mr <= 16 && tl_cpu_level() >= 2) {
        for (int64_t s = s_begin; s < s_end; s++) /* row-major A: its rows packed across */
            tl_gemm_pack_rows_across_avx512((const float *)a->data + (i0 + s * mr) * sa0 + k0, sa0, kc,
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
            load_lines(dk, rows, rn, k * sa1, a->dtype);
            for (int r = rn; r < mr; r++) dk[r] = 0.0f;
        }
    }
}

/* dst[s][koff + k][j] = src[k0 + k, j0 + s*NR + j] (times its scale) for the columns [j0, j0+nc), zero
 * past nc; k outside, the sliver's columns inside, slivers of kstride values of k, as in
 * tl_gemm_pack_a. B may also be int8 (a quantised weight, with its scale). */
void
tl_gemm_pack_b(const tl_tensor *b, const bscale *sc, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr,
               float *dst, int64_t kstride, int64_t koff)
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
            /* B = M^T, M's rows contiguous */
            tl_gemm_pack_rows_across_avx512((const float *)col0, sb1, kc, jn, nr, d);
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
            load_lines(dk, cols, jn, k * sb0, b->dtype);
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
 * kstride and koff count pairs. Both through pack_pairs: the slivers [s_begin, s_end) of w lines (A's
 * rows, B's columns) from line l0 on, n lines in all (zero past them), line l's element k at
 * p[l * sl + k * sk]. */
static void
pack_pairs(const uint16_t *p, int64_t sl, int64_t sk, int64_t l0, int64_t n, int64_t k0, int64_t kc, int w,
           int64_t s_begin, int64_t s_end, uint16_t *dst, int64_t kstride, int64_t koff)
{
    const int64_t kp = (kc + 1) / 2;
    for (int64_t s = s_begin; s < s_end; s++) {
        uint16_t *d = dst + s * w * 2 * kstride + koff * w * 2;
        const int ln = (int)(n - s * w < w ? n - s * w : w);
        const uint16_t *lines[NR_MAX > MR_MAX ? NR_MAX : MR_MAX];
        for (int i = 0; i < ln; i++) lines[i] = p + (l0 + s * w + i) * sl + k0 * sk;
        for (int64_t k = 0; k < kp; k++) {
            uint16_t *dk = d + k * w * 2;
            const int64_t o0 = 2 * k * sk, o1 = o0 + sk;
            const int odd = 2 * k + 1 < kc;
            for (int i = 0; i < ln; i++) {
                dk[2 * i] = lines[i][o0];
                dk[2 * i + 1] = odd ? lines[i][o1] : 0;
            }
            for (int i = ln; i < w; i++) dk[2 * i] = dk[2 * i + 1] = 0;
        }
    }
}

void
tl_gemm_pack_a_pairs(const tl_tensor *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, int64_t s_begin,
                     int64_t s_end, uint16_t *dst, int64_t kstride, int64_t koff)
{
    pack_pairs(a->data, a->strides[0], a->strides[1], i0, mc, k0, kc, mr, s_begin, s_end, dst, kstride, koff);
}

void
tl_gemm_pack_b_pairs(const tl_tensor *b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr, uint16_t *dst,
                     int64_t kstride, int64_t koff)
{
    pack_pairs(b->data, b->strides[1], b->strides[0], j0, nc, k0, kc, nr, 0, (nc + nr - 1) / nr, dst, kstride,
               koff);
}
