// The fast set: packed panels, register tiles, a fused softmax, OpenMP.
//
// GCC compiles each hot function for AVX-512, AVX2+FMA and baseline x86-64
// (target_clones); the loader picks the best one for the CPU at run time, so one build serves
// any x86-64 machine. Elsewhere (ARM) the plain build is used.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PGPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PGPT_CLONES
#endif

namespace pgpt::optimized {

namespace {

// 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones (GCC's vector extension maps
// it onto whatever the clone being compiled has). aligned(4): loads need no 64-byte alignment.
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));

inline __attribute__((always_inline)) f32x16 load16(const float* p) {
    return *reinterpret_cast<const f32x16*>(p);
}

// acc[i] (16 columns) = x row i (of MR, stride K) times one panel (K, 16). Each k is one
// broadcast of x and one vector multiply-add per row into accumulators that stay in registers.
// With one or two rows (a decoding step) a single chain of dependent adds would wait on the
// adder's latency, so even and odd k go to two accumulator sets, summed at the end.
template <int MR>
inline __attribute__((always_inline)) void tile(const float* x, int K, const float* panel,
                                                f32x16 (&acc)[kTileRows]) {
    constexpr int SETS = MR <= 2 ? 2 : 1;
    f32x16 a[SETS][MR];
    for (int s = 0; s < SETS; ++s)
        for (int i = 0; i < MR; ++i) a[s][i] = f32x16{};
    int k = 0;
    for (; k + SETS <= K; k += SETS)
        for (int s = 0; s < SETS; ++s) {
            const f32x16 w = load16(panel + static_cast<size_t>(k + s) * kPanel);
            for (int i = 0; i < MR; ++i) a[s][i] += x[static_cast<size_t>(i) * K + k + s] * w;
        }
    for (; k < K; ++k) {
        const f32x16 w = load16(panel + static_cast<size_t>(k) * kPanel);
        for (int i = 0; i < MR; ++i) a[0][i] += x[static_cast<size_t>(i) * K + k] * w;
    }
    for (int i = 0; i < MR; ++i) {
        acc[i] = a[0][i];
        for (int s = 1; s < SETS; ++s) acc[i] += a[s][i];
    }
}

inline __attribute__((always_inline)) void panel_rows(const LinearWeights& lw, const float* panel,
                                                      int p, const float* x, int rows, float* y) {
    const int K = lw.in, N = lw.out, n0 = p * kPanel, nn = std::min(kPanel, N - n0);
    f32x16 acc[kTileRows];
    for (int m = 0; m < rows; m += kTileRows) {
        const int mr = std::min(kTileRows, rows - m);
        const float* xm = x + static_cast<size_t>(m) * K;
        switch (mr) {
            case 4: tile<4>(xm, K, panel, acc); break;
            case 3: tile<3>(xm, K, panel, acc); break;
            case 2: tile<2>(xm, K, panel, acc); break;
            default: tile<1>(xm, K, panel, acc); break;
        }
        for (int i = 0; i < mr; ++i) {
            float* yr = y + static_cast<size_t>(m + i) * N + n0;
            for (int j = 0; j < nn; ++j) {
                float v = acc[i][j];
                if (lw.int8) v *= lw.scale[n0 + j];  // dequantize once per output, not per k
                yr[j] = v + (lw.bias ? lw.bias[n0 + j] : 0.0f);
            }
        }
    }
}

// One thread's share of the panels. Kept apart from the OpenMP region so that the CPU-specific
// clones apply to it (GCC outlines an OpenMP region body into a function of its own).
PGPT_CLONES void linear_panels(const LinearWeights& lw, const float* x, int rows, float* y, int p0,
                               int p1) {
    const size_t panel_size = static_cast<size_t>(lw.in) * kPanel;
    if (!lw.int8) {
        for (int p = p0; p < p1; ++p) panel_rows(lw, lw.packed.data() + p * panel_size, p, x, rows, y);
        return;
    }
    // int8: widen one panel at a time into a small fp32 buffer that stays in L1 (a plain loop
    // the compiler vectorizes: sign-extend, convert), then run the fp32 tiles on it. The weights
    // travel from memory as int8, a quarter of the bytes; the scale is applied per output.
    std::vector<float> buf(panel_size);
    for (int p = p0; p < p1; ++p) {
        const int8_t* q = lw.q.data() + p * panel_size;
        for (size_t i = 0; i < panel_size; ++i) buf[i] = static_cast<float>(q[i]);
        panel_rows(lw, buf.data(), p, x, rows, y);
    }
}

// One query row of one head: scores, then a fused softmax and weighted sum of values.
PGPT_CLONES void attend(const AttentionBatch& a, const float* qkv, float* out, int it, float* s) {
    const int hs = a.head_size, C = a.n_heads * hs;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const int b = it / (a.n_heads * a.T), h = (it / a.T) % a.n_heads, t = it % a.T;
    const int col = a.start + t;
    const int first = col >= a.pads[b] ? a.pads[b] : col;  // padding queries: self only
    const float* q = qkv + static_cast<size_t>(b * a.T + t) * 3 * C + h * hs;
    const size_t head = (static_cast<size_t>(b) * a.n_heads + h) * a.max_len;
    const float* keys = a.keys + head * hs;
    const float* values = a.values + head * hs;
    // Pass 1: scaled scores and their max.
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = first; j <= col; ++j) {
        const float* k = keys + static_cast<size_t>(j) * hs;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < hs; ++d) dot += q[d] * k[d];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
    }
    // Pass 2, fused: exponentiate, sum and accumulate the values in one sweep; the division by
    // the sum happens once per output element instead of once per weight.
    float* o = out + static_cast<size_t>(b * a.T + t) * C + h * hs;
    for (int d = 0; d < hs; ++d) o[d] = 0.0f;
    float sum = 0.0f;
    for (int j = first; j <= col; ++j) {
        const float e = std::exp(s[j] - mx);
        sum += e;
        const float* v = values + static_cast<size_t>(j) * hs;
#pragma omp simd
        for (int d = 0; d < hs; ++d) o[d] += e * v[d];
    }
    const float inv = 1.0f / sum;
    for (int d = 0; d < hs; ++d) o[d] *= inv;
}

}  // namespace

// GELU (tanh form) with a tanh the compiler can vectorize: std::tanh is a library call per
// element, which leaves the loop scalar. tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|),
// and exp by range reduction: e = 2^n * exp(r), |r| <= ln2/2, exp(r) by its degree-6 Taylor
// polynomial (relative error < 2e-7, i.e. about one float rounding), 2^n built in the exponent
// bits. No calls, no branches: 16 elements per instruction on AVX-512.
PGPT_CLONES void gelu_tanh(float* x, size_t n) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    for (size_t i = 0; i < n; ++i) {
        const float v = x[i];
        const float u = k * (v + 0.044715f * v * v * v);
        const float a2 = 2.0f * std::fabs(u);
        const float a = a2 < 80.0f ? a2 : 80.0f;  // e = exp(-a); e^-80 ~ 0 in fp32
        // n = round(-a / ln2): adding and subtracting 1.5 * 2^23 rounds to an integer without
        // a call (std::floor would keep the loop scalar)
        const float t = (-a * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
        const float r = -a - t * 0.6931471805599453f;
        float p = 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        const int32_t bits = (static_cast<int32_t>(t) + 127) << 23;  // 2^n, n in [-116, 0]
        float scale;
        std::memcpy(&scale, &bits, sizeof scale);
        const float e = p * scale;
        const float th = std::copysign((1.0f - e) / (1.0f + e), u);
        x[i] = 0.5f * v * (1.0f + th);
    }
}

void linear(const LinearWeights& lw, const float* x, int rows, float* y, int threads) {
    const int panels = (lw.out + kPanel - 1) / kPanel;
    // Threads split the output columns (panels): each reads only its own weights, and all of x,
    // which is what a one-token step (rows = B) needs. Tiny layers stay on one thread.
    const bool parallel = threads > 1 && static_cast<size_t>(rows) * lw.in * lw.out >= 32768;
    if (!parallel) return linear_panels(lw, x, rows, y, 0, panels);
#pragma omp parallel num_threads(threads)
    {
        const int n = omp_get_num_threads(), id = omp_get_thread_num();
        linear_panels(lw, x, rows, y, panels * id / n, panels * (id + 1) / n);
    }
}

void attention(const AttentionBatch& a, const float* qkv, float* out, int threads) {
    const int items = a.B * a.n_heads * a.T;
    const size_t work = static_cast<size_t>(items) * (a.start + a.T) * a.head_size;
    const bool parallel = threads > 1 && items > 1 && work >= 16384;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        std::vector<float> s(a.max_len);  // this thread's scores
#pragma omp for schedule(static)
        for (int it = 0; it < items; ++it) attend(a, qkv, out, it, s.data());
    }
}

}  // namespace pgpt::optimized
