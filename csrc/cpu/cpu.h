/* cpu.h: helpers shared by the CPU kernel files (internal; not part of the public header). */
#ifndef TL_CPU_H
#define TL_CPU_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "../tl.h"

/* A float32's bits and back (memcpy is the type pun that C allows). */
static inline uint32_t
tl_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float
tl_f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bfloat16 and IEEE half <-> float32, exact and portable (round to nearest even on the way down). */
static inline float
tl_bf16_to_f32(uint16_t h)
{
    return tl_f32_from_bits((uint32_t)h << 16);
}

static inline uint16_t
tl_f32_to_bf16(float f)
{
    uint32_t u = tl_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float
tl_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal half: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return tl_f32_from_bits(u);
}

static inline uint16_t
tl_f32_to_f16(float f)
{
    const uint32_t u = tl_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);           /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* overflow (after rounding) */
    if (a >= 0x38800000u) {                                            /* normal half */
        uint32_t r = a - 0x38000000u;                                  /* rebias exponent 127 -> 15 */
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign;                        /* rounds to zero */
    /* subnormal half: value = man * 2^-24 */
    uint32_t e = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* man * 2^(e-150) = q * 2^-24  =>  q = man >> (126 - e) */
    uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

/* Load element i (in elements) of a float32/bfloat16/float16 buffer as float32. */
static inline float
tl_load_f(const void *p, int64_t i, tl_dtype dt)
{
    switch (dt) {
    case TL_FLOAT32: return ((const float *)p)[i];
    case TL_BFLOAT16: return tl_bf16_to_f32(((const uint16_t *)p)[i]);
    case TL_FLOAT16: return tl_f16_to_f32(((const uint16_t *)p)[i]);
    default: return 0.0f;
    }
}

static inline void
tl_store_f(void *p, int64_t i, tl_dtype dt, float v)
{
    switch (dt) {
    case TL_FLOAT32: ((float *)p)[i] = v; break;
    case TL_BFLOAT16: ((uint16_t *)p)[i] = tl_f32_to_bf16(v); break;
    case TL_FLOAT16: ((uint16_t *)p)[i] = tl_f32_to_f16(v); break;
    default: break;
    }
}

/* The widest SIMD level the CPU kernels may use: 2 = AVX-512, 1 = AVX2+FMA, 0 = portable. It is what
 * the CPU supports, capped by TLTORCH_CPU_ISA=avx2|portable (for tests), read once: the first call
 * (made by the Python module at import, with the GIL held) fixes it for the process. */
int tl_cpu_level(void);
/* CLOCK_MONOTONIC in nanoseconds (-1 if unavailable). */
int64_t tl_now_ns(void);

/* Check a CPU tensor of `ndim` dims whose data pointer must be usable when it is not empty. */
tl_status tl_check_cpu(const tl_tensor *t, int ndim);
/* The threads a kernel asked for nthreads (<= 0: the default) takes now: at most 256, and no more than
 * the CPUs other processes leave free unless it does `flops` >= TL_LOAD_BIG_FLOPS of work (the rule and
 * TLTORCH_THREADS_LOAD: common.c); tl_threads: for a kernel of less or unknown work. Each call may give
 * a different count: a kernel that sizes buffers by it calls it once. */
#define TL_LOAD_BIG_FLOPS 4e9
int tl_threads_for(int nthreads, double flops);
int tl_threads(int nthreads);

/* A barrier for the threads of one parallel region (nth of them, as omp_get_num_threads() says) that
 * spins for a few tens of microseconds and then sleeps on a condition variable. OpenMP's own barriers
 * spin for milliseconds first (libgomp's default), which, when another process competes for the cores,
 * keeps a core busy while the thread it waits for is descheduled; a sleeping waiter frees its core for
 * that thread. Lets a GEMM run as one parallel region with its own barriers between blocks. */
typedef struct {
    atomic_int arrived;
    atomic_uint gen;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} tl_barrier;
/* 0 on success; nonzero (out of resources) leaves nothing to destroy. */
int tl_barrier_init(tl_barrier *b);
void tl_barrier_destroy(tl_barrier *b);
void tl_barrier_wait(tl_barrier *b, int nth);
/* C = alpha * A M^T + beta * C + bias without packing, for a short side: A (N x K) float32 with
 * unit-stride rows, M (R x K) any float dtype and strides (copied to float32 rows when it is not so),
 * C (N x R) any float dtype and strides. Each output is a dot product of two rows, 4 x 4 at a time.
 * Returns 1 when done, 0 when it does not apply (then use the GEMM: other dtypes, no AVX-512), -1 when
 * out of memory. `force`: also when the packed GEMM would be faster (the caller knows R is small). */
int tl_gemm_nt_direct(const tl_tensor *a, const tl_tensor *m, const tl_tensor *bias, tl_tensor *c, float alpha,
                      float beta, int nthreads, int force);
/* C = alpha * (A B + A2 B2) + beta C + bias (A2, B2 NULL: tl_gemm_cpu); ws as tl_gemm_cpu's for the
 * summed K. Internal to the CPU core (gemm.c). */
tl_status tl_gemm2_cpu(const tl_tensor *a, const tl_tensor *b, const tl_tensor *a2, const tl_tensor *b2,
                       const tl_tensor *bias, tl_tensor *c, float alpha, float beta, tl_tensor *ws, int nthreads);

#endif /* TL_CPU_H */
