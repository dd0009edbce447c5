/* common.c: status and dtype tables, tensor checks, the thread count rule, the team barrier, and the
 * SIMD level (tl_cpu_level, and its name, tl_cpu_isa; gemm_kernels.c's tl_gemm_isa picks the micro-kernel
 * for it). */
#define _GNU_SOURCE /* clock_gettime under -std=c11; sched_getaffinity */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

static int64_t
clock_ns(clockid_t id)
{
    struct timespec t;
    if (clock_gettime(id, &t)) return -1;
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int64_t
tl_now_ns(void)
{
    return clock_ns(CLOCK_MONOTONIC);
}

/* ---- the thread count rule ----------------------------------------------------------------------
 * A team meets at barriers (its own, and OpenMP's at the end of every parallel region), so it runs at
 * the pace of its slowest member. When other processes keep the CPUs busy, the scheduler leaves one
 * member or another off a core for a time slice (milliseconds, against tenths of a millisecond between
 * the barriers of a GEMM in a small model) while the rest wait for it: two threads then take several
 * times as long as one. So a kernel takes no more threads than the CPUs that the other processes leave
 * free. Every LOAD_PERIOD_NS at most, one call measures it: the CPU time spent on this process's CPUs
 * (/proc/stat, including time the hypervisor gave to other machines), less this process's own
 * (CLOCK_PROCESS_CPUTIME_ID), over the wall time between two such calls, is what everyone else used,
 * in CPUs; averaged with the previous measurement and taken from this process's CPUs, it leaves the
 * free ones, rounded, at least one. What others use is measured, not what they want (they get less
 * while this process runs more threads), but the rounding absorbs the difference: a process that spins
 * on one core of two gets two thirds of it beside two threads of this one and all of it beside one, one
 * CPU busy either way.
 * A request for more threads than the process has CPUs is deliberate and kept, and so is every thread
 * of a kernel of TL_LOAD_BIG_FLOPS or more: its threads have enough work between barriers (tens of
 * milliseconds) that a time slice lost costs them little, and where the scheduler shares the CPUs thread
 * by thread (among the processes of one session or cgroup) the second thread brings a second share. On
 * 2 CPUs kept busy by others, a GEMM of 0.2 GFLOP took 6-16x as long on two threads as on one, one of
 * 8.6 GFLOP 0.7x (three spinning processes of the same session) to 1.1x (of other sessions, or other
 * sessions' torch jobs); at 2.4 GFLOP, 0.8x to 1.3x. TLTORCH_THREADS_LOAD
 * (read once): "off" turns the rule off; a number x >= 0 takes x CPUs as used by others instead of
 * measuring (for tests); anything else, or nothing, measures. The measurement is one per process, like
 * the OpenMP runtime's thread count. */
#ifdef __linux__
#define LOAD_PERIOD_NS 200000000

static struct {
    pthread_mutex_t mu;    /* held by the call that measures; the others read cap and ncpu meanwhile */
    int mode;              /* -1 not yet set up, 0 off, 1 measured, 2 fixed by TLTORCH_THREADS_LOAD */
    int have;              /* a previous measurement (t, busy, self) exists */
    cpu_set_t cpus;        /* this process's CPUs at set-up */
    int64_t t;             /* wall clock (ns), busy and own CPU time (s) at the previous measurement */
    double busy, self, others;
    atomic_llong next;     /* wall clock (ns) of the next measurement */
    atomic_int ncpu, cap;  /* CPUs of this process; of them, free (0: not known) */
} load = {.mu = PTHREAD_MUTEX_INITIALIZER, .mode = -1};

/* The CPU time (s) spent on this process's CPUs, from /proc/stat's per-CPU lines (user, nice, system,
 * idle, iowait, irq, softirq, steal; guest time is within user). Negative when it cannot be read. */
static double
busy_seconds(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1.0;
    const double tick = 1.0 / (double)sysconf(_SC_CLK_TCK);
    char line[512];
    double total = 0.0;
    int seen = 0;
    while (fgets(line, sizeof line, f) && !strncmp(line, "cpu", 3)) {
        unsigned cpu;
        unsigned long long v[8] = {0};
        if (sscanf(line, "cpu%u %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1], &v[2], &v[3], &v[4],
                   &v[5], &v[6], &v[7]) < 8)
            continue; /* the "cpu " line of all CPUs together */
        if (cpu < CPU_SETSIZE && CPU_ISSET(cpu, &load.cpus)) {
            total += (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * tick;
            seen++;
        }
    }
    fclose(f);
    return seen ? total : -1.0;
}

/* The free CPUs (at least 1) when others use `others` of ncpu. */
static int
free_cpus(double others, int ncpu)
{
    const int n = (int)((double)ncpu - others + 0.5); /* others <= ncpu but for a fixed x */
    return n < 1 ? 1 : n > ncpu ? ncpu : n;
}

/* Called with load.mu held, at `now` >= load.next. */
static void
load_measure(int64_t now)
{
    if (load.mode < 0) {
        const char *e = getenv("TLTORCH_THREADS_LOAD");
        char *end = NULL;
        const double x = e ? strtod(e, &end) : 0.0;
        load.mode = e && !strcmp(e, "off") ? 0 : e && end != e && !*end && x >= 0.0 ? 2 : 1;
        if (sched_getaffinity(0, sizeof load.cpus, &load.cpus)) load.mode = 0;
        atomic_store(&load.ncpu, CPU_COUNT(&load.cpus));
        if (load.mode == 2) atomic_store(&load.cap, free_cpus(x, CPU_COUNT(&load.cpus)));
    }
    if (load.mode != 1) {
        atomic_store(&load.next, INT64_MAX);
        return;
    }
    const double busy = busy_seconds(), self = (double)clock_ns(CLOCK_PROCESS_CPUTIME_ID) * 1e-9;
    if (busy < 0.0 || self < 0.0) { /* no /proc/stat here: no rule */
        load.mode = 0;
        atomic_store(&load.cap, 0);
        atomic_store(&load.next, INT64_MAX);
        return;
    }
    const int ncpu = atomic_load(&load.ncpu);
    if (load.have) {
        double x = ((busy - load.busy) - (self - load.self)) / ((double)(now - load.t) * 1e-9);
        x = x < 0.0 ? 0.0 : x > ncpu ? ncpu : x;
        load.others = atomic_load(&load.cap) ? 0.5 * (load.others + x) : x;
        atomic_store(&load.cap, free_cpus(load.others, ncpu));
    }
    load.have = 1;
    load.t = now;
    load.busy = busy;
    load.self = self;
    atomic_store(&load.next, now + LOAD_PERIOD_NS);
}

#endif /* __linux__ */

int
tl_threads_for(int nthreads, double flops)
{
    int n = nthreads > 0 ? nthreads : tl_cpu_default_threads();
    if (n > 256) n = 256;
#ifdef __linux__
    if (n <= 1 || flops >= TL_LOAD_BIG_FLOPS) return n;
    const int64_t now = tl_now_ns();
    if (now >= atomic_load_explicit(&load.next, memory_order_relaxed) && !pthread_mutex_trylock(&load.mu)) {
        if (now >= atomic_load(&load.next)) load_measure(now);
        pthread_mutex_unlock(&load.mu);
    }
    const int cap = atomic_load_explicit(&load.cap, memory_order_relaxed);
    return cap && cap < n && n <= atomic_load_explicit(&load.ncpu, memory_order_relaxed) ? cap : n;
#else
    (void)flops;
    return n;
#endif
}

int
tl_threads(int nthreads)
{
    return tl_threads_for(nthreads, 0.0);
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
    const int64_t t0 = tl_now_ns();
    for (int i = 1;; i++) {
        if (atomic_load_explicit(&b->gen, memory_order_acquire) != gen) return;
        cpu_relax();
        if (i % 64 == 0 && tl_now_ns() - t0 > TL_BARRIER_SPIN_NS) break;
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

/* The SIMD level's name: that of the float32 GEMM micro-kernel tl_gemm_isa picks for it (gemm_kernels.c;
 * not called here, as tltorch._cuda links this file without the CPU kernels). */
const char *
tl_cpu_isa(void)
{
    static const char *const names[] = {"portable", "avx2", "avx512"};
    return names[tl_cpu_level()];
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
