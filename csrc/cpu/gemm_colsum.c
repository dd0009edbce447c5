/* gemm_colsum.c: out[N] = beta * out + the sums of x's M rows, float32 accumulation (the bias gradient
 * of a linear layer, db = sum of dZ's rows): columns shared out in blocks of 64, each summed in row
 * order, whatever the thread count or ISA. */
#include "gemm_internal.h"

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
