// Kernel-level timings of the native engine (docs/native.md, "Measured"): one linear layer of
// the head's shape (8192 x 128) at 1 and 16 rows, naive and optimized, fp32 and int8, one
// thread; and GELU's tanh, the library call against the vectorizable one. Build and run:
//
//   S=src/pocketgpt/native/csrc
//   g++ -O3 -std=c++17 -fopenmp -Wno-psabi -I$S benchmarks/native_kernels.cpp \
//       $S/kernels_naive.cpp $S/kernels_optimized.cpp $S/kernels_common.cpp -o /tmp/native_kernels
//   flock /tmp/bench.lock /tmp/native_kernels
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.hpp"

using namespace pgpt;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
    const int N = 8192, K = 128, reps = 200;
    std::vector<float> w(static_cast<size_t>(N) * K), x(16 * K), y(16 * static_cast<size_t>(N));
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    for (auto& v : w) v = normal(gen);
    for (auto& v : x) v = normal(gen);
    for (int rows : {1, 16})
        for (KernelSet ks : {KernelSet::Naive, KernelSet::Optimized})
            for (bool int8 : {false, true}) {
                const LinearWeights lw = prepare_linear(w.data(), nullptr, N, K, ks, int8);
                const auto t0 = std::chrono::steady_clock::now();
                for (int r = 0; r < reps; ++r) {
                    if (ks == KernelSet::Naive)
                        naive::linear(lw, x.data(), rows, y.data());
                    else
                        optimized::linear(lw, x.data(), rows, y.data(), 1);
                }
                const double s = seconds_since(t0) / reps;
                std::printf("linear %dx%d, %2d rows, %-9s %s: %8.1f us  %6.2f GFLOP/s\n", N, K, rows,
                            ks == KernelSet::Naive ? "naive" : "optimized", int8 ? "int8" : "fp32",
                            s * 1e6, 2.0 * rows * N * K / s / 1e9);
            }
    // GELU on activations of a realistic spread (the library tanh has fast paths near 0).
    const size_t n = 1 << 20;
    std::vector<float> src(n), a(n);
    std::normal_distribution<float> spread(0.0f, 1.5f);
    for (auto& v : src) v = spread(gen);
    for (int opt = 0; opt < 2; ++opt) {
        a = src;
        const auto t0 = std::chrono::steady_clock::now();
        (opt ? optimized::gelu_tanh : gelu_tanh)(a.data(), n);
        std::printf("gelu_tanh %-9s: %.2f ns per element\n", opt ? "optimized" : "std::tanh",
                    seconds_since(t0) / n * 1e9);
    }
    std::vector<float> ref = src, fast = src;
    gelu_tanh(ref.data(), n);
    optimized::gelu_tanh(fast.data(), n);
    double worst = 0;
    for (size_t i = 0; i < n; ++i) worst = std::max(worst, static_cast<double>(std::fabs(ref[i] - fast[i])));
    std::printf("gelu_tanh max abs difference: %.2g\n", worst);
}
