/* cpu_peak_int8.c: this CPU's AVX512-VNNI ceiling, the rate of independent vpdpbusd zmm instructions
 * (64 uint8 x int8 products added into 16 int32 lanes: 128 int8 operations each) on 1 and 2 threads.
 *
 *     gcc -O2 -fopenmp -mavx512f -mavx512vnni benchmarks/cpu_peak_int8.c -o /tmp/cpu_peak_int8
 *     /tmp/cpu_peak_int8 [seconds per measurement, default 0.5]
 *
 * Each thread runs 24 independent accumulator chains (more than latency x throughput needs), so the
 * loop is bound by the instruction's throughput alone; the best of 5 measurements is reported in
 * GOPS (1e9 int8 multiply-adds counted as two operations), the unit benchmarks/bench_frozen.py --int8
 * reports the int8 linear layer in.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 24
#define ITERS 4096

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Runs rounds of ITERS x CHAINS vpdpbusd; returns the instructions executed. */
__attribute__((noinline)) static long
spin(long rounds, int *sink)
{
    __m512i acc[CHAINS];
    const __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01ff01ff);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    for (long r = 0; r < rounds; r++)
        for (int it = 0; it < ITERS; it++) {
#pragma GCC unroll 24
            for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
            __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
        }
    __m512i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_epi32(s, acc[i]);
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
