"""How fast this CPU multiplies matrices: the ceiling on GPT training throughput here.

Measures, on the products of the tiny GPT's training step (nanoGPT's CPU shape: 768 rows, 128
wide, MLP 512), the GFLOP/s of PyTorch's BLAS (MKL in the x86 wheels) and of numpy's (OpenBLAS),
the machine's fused multiply-add peak (a C loop of independent AVX2 FMAs on every thread), and
the rate of a GEMM's inner loop with its operands in L1 (a 6 x 16 register block: the best any
GEMM can do here). Both C programs are compiled here with the system compiler. Both BLAS
libraries reaching about the inner loop's rate says the ceiling is the machine's, not a
library's. (numpy's BLAS keeps its
own thread count: all cores unless OPENBLAS_NUM_THREADS says otherwise.)

    python benchmarks/blas_rate.py [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

# (m, k, n) of the tiny GPT's forward products; the backward's are the same sizes transposed
SHAPES = [(768, 128, 384), (768, 128, 128), (768, 128, 512), (768, 512, 128)]

FMA_LOOP = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    const int threads = atoi(argv[1]);
    const long steps = 20000000;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        const double t0 = omp_get_wtime();
        float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        { /* ten independent chains, in registers: enough to keep both FMA pipes busy */
            __m256 a0 = _mm256_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                   a6 = a0, a7 = a0, a8 = a0, a9 = a0;
            const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
            for (long i = 0; i < steps; i++) {
                a0 = _mm256_fmadd_ps(a0, m, c), a1 = _mm256_fmadd_ps(a1, m, c);
                a2 = _mm256_fmadd_ps(a2, m, c), a3 = _mm256_fmadd_ps(a3, m, c);
                a4 = _mm256_fmadd_ps(a4, m, c), a5 = _mm256_fmadd_ps(a5, m, c);
                a6 = _mm256_fmadd_ps(a6, m, c), a7 = _mm256_fmadd_ps(a7, m, c);
                a8 = _mm256_fmadd_ps(a8, m, c), a9 = _mm256_fmadd_ps(a9, m, c);
            }
            a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
            a0 = _mm256_add_ps(a0, _mm256_add_ps(a8, a9));
            float f[8];
            _mm256_storeu_ps(f, a0);
            sink += f[0];
        }
        const double rate = 16.0 * 10 * steps * threads / (omp_get_wtime() - t0) / 1e9;
        if (rate > best) best = rate;
        if (sink == 0) printf("?");
    }
    printf("%.1f\n", best);
    return 0;
}
"""


MICRO_KERNEL = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
/* The inner loop of a GEMM (a 6 x 16 block of C in twelve registers, += a packed 6-row panel of
 * A times a packed 16-column panel of B, K = 128) with its operands resident in L1: an upper
 * bound for any GEMM at these sizes on this core. */
static void block(const float *a, const float *b, float *c, int k) {
    __m256 acc[6][2];
    for (int r = 0; r < 6; r++)
        for (int h = 0; h < 2; h++) acc[r][h] = _mm256_loadu_ps(c + 16 * r + 8 * h);
    for (int p = 0; p < k; p++) {
        const __m256 b0 = _mm256_load_ps(b + 16 * p), b1 = _mm256_load_ps(b + 16 * p + 8);
        for (int r = 0; r < 6; r++) {
            const __m256 av = _mm256_broadcast_ss(a + 6 * p + r);
            acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < 6; r++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(c + 16 * r + 8 * h, acc[r][h]);
}
int main(int argc, char **argv) {
    const int threads = atoi(argv[1]), k = 128, calls = 1000000;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float *a = aligned_alloc(64, 6 * k * 4), *b = aligned_alloc(64, 16 * k * 4);
            float *c = aligned_alloc(64, 96 * 4);
            for (int i = 0; i < 6 * k; i++) a[i] = 1e-3f * (i % 7);
            for (int i = 0; i < 16 * k; i++) b[i] = 1e-3f * (i % 5);
            for (int i = 0; i < 96; i++) c[i] = 0;
            for (int i = 0; i < calls; i++) block(a, b, c, k);
            if (c[0] == 12345.0f) printf("?");
            free(a), free(b), free(c);
        }
        const double rate = 2.0 * 96 * k * calls * threads / (omp_get_wtime() - t0) / 1e9;
        if (rate > best) best = rate;
    }
    printf("%.1f\n", best);
    return 0;
}
"""


def run_c(source: str, threads: int) -> float:
    """Compile ``source`` with the system compiler (AVX2, FMA, OpenMP), run it, read a number."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "rate.c", Path(tmp) / "rate"
        src.write_text(source)
        flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
        subprocess.run(["cc", *flags, str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True)
        return float(out.stdout)


def rate(multiply, m: int, k: int, n: int, repeats: int = 7, calls: int = 200) -> float:
    """Median GFLOP/s of ``multiply()`` (an [m, k] x [k, n] product) over the repeats."""
    for _ in range(10):
        multiply()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            multiply()
        times.append((time.perf_counter() - start) / calls)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        an, bn = a.numpy().copy(), b.numpy().copy()  # numpy's own BLAS
        rows.append(
            {
                "shape": [m, k, n],
                "torch_gflops": round(rate(lambda a=a, b=b: torch.mm(a, b), m, k, n), 1),
                "numpy_gflops": round(rate(lambda an=an, bn=bn: an @ bn, m, k, n), 1),
            }
        )
    peak, kernel = run_c(FMA_LOOP, args.threads), run_c(MICRO_KERNEL, args.threads)
    print(
        f"{args.threads} threads; FMA peak {peak:.0f} GFLOP/s; a GEMM's 6x16 inner loop with its"
        f" operands in L1: {kernel:.0f} GFLOP/s ({kernel / peak:.0%} of the peak)"
    )
    print("| m, k, n | torch (MKL) | numpy (OpenBLAS) | torch / peak |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['shape']} | {row['torch_gflops']:.0f} | {row['numpy_gflops']:.0f} | "
            f"{row['torch_gflops'] / peak:.0%} |"
        )
    if args.json:
        result = {"threads": args.threads, "fma_peak_gflops": peak, "micro_kernel_gflops": kernel}
        print(json.dumps({**result, "products": rows}))


if __name__ == "__main__":
    main()
