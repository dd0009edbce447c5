/* common.c: status and dtype tables, tensor checks, the thread count rule, the team barrier. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

const char *
tl_status_string(tl_status s)
{
    switch (s) {
    case TL_OK: return "ok";
    case TL_ERR_DTYPE: return "unsupported dtype";
    case TL_ERR_SHAPE: return "shape mismatch";
    case TL_ERR_DEVICE: return "wrong device";
    case TL_ERR_LAYOUT: return "unsupported memory layout";
    case TL_ERR_VALUE: return "invalid argument";
    case TL_ERR_INDEX: return "index out of range";
    case TL_ERR_NOMEM: return "out of memory";
    case TL_ERR_CUDA: return "CUDA error";
    case TL_ERR_CUBLAS: return "cuBLAS error";
    case TL_ERR_UNSUPPORTED: return "not supported by this build";
    }
    return "unknown status";
}

size_t
tl_dtype_size(tl_dtype d)
{
    static const size_t sizes[TL_NUM_DTYPES] = {4, 2, 2, 8, 8, 4, 1, 1};
    return (unsigned)d < TL_NUM_DTYPES ? sizes[d] : 0;
}

const char *
tl_dtype_name(tl_dtype d)
{
    static const char *names[TL_NUM_DTYPES] = {"float32", "float16", "bfloat16", "float64",
                                               "int64",   "int32",   "int8",     "uint8"};
    return (unsigned)d < TL_NUM_DTYPES ? names[d] : "unknown";
}

int64_t
tl_numel(const tl_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

tl_status
tl_check_cpu(const tl_tensor *t, int ndim)
{
    if (t->device != TL_CPU) return TL_ERR_DEVICE;
    if (t->ndim != ndim) return TL_ERR_SHAPE;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] < 0) return TL_ERR_SHAPE;
    if (tl_numel(t) > 0 && t->data == NULL) return TL_ERR_VALUE;
    return TL_OK;
}

int
tl_cpu_default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int
tl_threads(int nthreads)
{
    int n = nthreads > 0 ? nthreads : tl_cpu_default_threads();
    return n > 256 ? 256 : n;
}

/* How long a thread at tl_barrier_wait spins before it sleeps. */
#define TL_BARRIER_SPIN_NS 50000

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int
tl_barrier_init(tl_barrier *b)
{
    atomic_init(&b->arrived, 0);
    atomic_init(&b->gen, 0u);
    if (pthread_mutex_init(&b->mu, NULL)) return 1;
    if (pthread_cond_init(&b->cv, NULL)) {
        pthread_mutex_destroy(&b->mu);
        return 1;
    }
    return 0;
}

void
tl_barrier_destroy(tl_barrier *b)
{
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
}

void
tl_barrier_wait(tl_barrier *b, int nth)
{
    if (nth <= 1) return;
    /* The generation is read before this thread counts as arrived, so the last arrival cannot move it on
     * first; the last arrival resets the count before it publishes the new generation. */
    const unsigned gen = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        pthread_mutex_lock(&b->mu); /* a sleeper either sees the new generation or gets the broadcast */
        atomic_fetch_add_explicit(&b->gen, 1, memory_order_release);
        pthread_cond_broadcast(&b->cv);
        pthread_mutex_unlock(&b->mu);
        return;
    }
    const int64_t t0 = now_ns();
    for (int i = 1;; i++) {
        if (atomic_load_explicit(&b->gen, memory_order_acquire) != gen) return;
        cpu_relax();
        if (i % 64 == 0 && now_ns() - t0 > TL_BARRIER_SPIN_NS) break;
    }
    pthread_mutex_lock(&b->mu);
    while (atomic_load_explicit(&b->gen, memory_order_acquire) == gen) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

int
tl_cpu_level(void)
{
    /* Every caller computes the same value, so a race on first use is benign. */
    static int level = -1;
    int v = __atomic_load_n(&level, __ATOMIC_ACQUIRE);
    if (v >= 0) return v;
    v = 0;
#if defined(__x86_64__) || defined(_M_X64)
    const char *cap = getenv("TLTORCH_CPU_ISA");
    const int max = !cap ? 2 : !strcmp(cap, "portable") ? 0 : !strcmp(cap, "avx2") ? 1 : 2;
    __builtin_cpu_init();
    if (max >= 2 && __builtin_cpu_supports("avx512f")) v = 2;
    else if (max >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v = 1;
#endif
    __atomic_store_n(&level, v, __ATOMIC_RELEASE);
    return v;
}

tl_tensor
tl_view2d(void *data, tl_dtype dtype, tl_device device, int device_id, int64_t rows, int64_t cols, int64_t s0,
          int64_t s1)
{
    tl_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.device_id = device_id;
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.strides[0] = s0;
    t.strides[1] = s1;
    return t;
}

tl_tensor
tl_row_block(const tl_tensor *t, int64_t i0, int64_t rows)
{
    const int64_t es = (int64_t)tl_dtype_size(t->dtype);
    return tl_view2d(t->data ? (char *)t->data + i0 * t->strides[0] * es : NULL, t->dtype, t->device,
                     t->device_id, rows, t->shape[1], t->strides[0], t->strides[1]);
}
