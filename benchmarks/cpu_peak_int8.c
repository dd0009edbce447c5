/* cpu_peak_int8.c: this CPU's AVX512-VNNI ceiling, the rate of independent vpdpbusd zmm instructions
 * (64 uint8 x int8 products added into 16 int32 lanes: 128 int8 operations each) on 1 and 2 threads.
 *
 *     gcc -O2 -fopenmp -mavx512f -mavx512vnni benchmarks/cpu_peak_int8.c -o /tmp/cpu_peak_int8
 *     /tmp/cpu_peak_int8 [seconds per measurement, default 0.5]
 *
 * Each thread runs 12 independent accumulator chains in registers (more than the instruction's latency
 * times its throughput needs), so the loop is bound by its throughput alone; the best of 5 measurements
 * is reported in GOPS (1e9 int8 multiply-adds counted as two operations), the unit
 * benchmarks/bench_frozen.py --int8 reports the int8 linear layer in.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define ITERS 4096

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Runs rounds of ITERS x CHAINS vpdpbusd; returns the instructions executed. The chains are named
 * variables, not an array: GCC kept an array of 24 on the stack at -O2, loading and storing every
 * accumulator each step, and the loop then measured 2.7 vpdpbusd per ns where the CPU runs 6.7. */
__attribute__((noinline)) static long
spin(long rounds, int *sink)
{
    const __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01ff01ff);
    __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2),
            c3 = _mm512_set1_epi32(3), c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5),
            c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7), c8 = _mm512_set1_epi32(8),
            c9 = _mm512_set1_epi32(9), c10 = _mm512_set1_epi32(10), c11 = _mm512_set1_epi32(11);
    for (long r = 0; r < rounds; r++)
        for (int it = 0; it < ITERS; it++) {
#define STEP(c) c = _mm512_dpbusd_epi32(c, a, b)
            STEP(c0); STEP(c1); STEP(c2); STEP(c3); STEP(c4); STEP(c5);
            STEP(c6); STEP(c7); STEP(c8); STEP(c9); STEP(c10); STEP(c11);
#undef STEP
            /* in registers, and not folded across iterations */
            __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5));
            __asm__ volatile("" : "+v"(c6), "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
        }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                 _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
    *sink = _mm512_reduce_add_epi32(s);
    return rounds * ITERS * CHAINS;
}

int
main(int argc, char **argv)
{
    const double secs = argc > 1 ? atof(argv[1]) : 0.5;
    int sink = 0;
    /* rounds for about `secs` on one thread */
    double t0 = now();
    long rounds = 1;
    while (now() - t0 < 0.05) rounds += spin(rounds, &sink) > 0 ? rounds : 0;
    rounds = (long)(rounds * secs / (now() - t0) * 0.5) + 1;
    for (int nt = 1; nt <= 2; nt++) {
        double best = 0.0;
        for (int rep = 0; rep < 5; rep++) {
            long total = 0;
            const double t = now();
#pragma omp parallel num_threads(nt) reduction(+ : total)
            total += spin(rounds, &sink);
            const double gops = (double)total * 128.0 / (now() - t) / 1e9;
            if (gops > best) best = gops;
        }
        printf("%d thread%s: %.0f GOPS (%.1f vpdpbusd zmm per ns)\n", nt, nt > 1 ? "s" : "", best, best / 128.0);
    }
    return sink == 42 ? 1 : 0;
}
