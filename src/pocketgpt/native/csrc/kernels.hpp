// The engine's compute kernels, in two sets selectable at load time:
//   naive      plain loops over the weights as stored (out, in); one thread; the reference.
//   optimized  weights packed into panels of 16 output columns, a 4-row x 16-column register
//              tile (the inner loop is 16 independent multiply-adds: one or two SIMD
//              instructions), a fused one-pass softmax, and OpenMP threads over panels/heads.
// Both read fp32 weights or per-output-channel symmetric int8 weights (dequantized in the inner
// loop: acc += x * q, then y = acc * scale + bias). Activations are always fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pgpt {

enum class KernelSet { Naive, Optimized };

constexpr int kPanel = 16;  // output columns per packed panel (two AVX2 / one AVX-512 register)
constexpr int kTileRows = 4;  // rows of x per register tile

// One Linear layer, y (rows, out) = x (rows, in) @ W^T + b, in the layout its kernel reads.
struct LinearWeights {
    int in = 0, out = 0;
    const float* bias = nullptr;   // (out,) or nullptr
    const float* w = nullptr;      // naive fp32: the file's (out, in) rows, memory-mapped
    std::vector<float> packed;     // optimized fp32: panel p, column k -> 16 floats
    std::vector<int8_t> q;         // int8: (out, in) rows (naive) or panels (optimized)
    std::vector<float> scale;      // int8: (out,) max|w| / 127 per output channel
    bool int8 = false;
};

// Lays out W (out, in) for `kernels`, quantizing it when `int8`.
LinearWeights prepare_linear(const float* w, const float* bias, int out, int in, KernelSet kernels,
                             bool int8);

// Rows of x that share one sequence batch: the attention's view of the KV cache.
struct AttentionBatch {
    int B, T, start;            // B rows of T new tokens at cache slots start..start+T-1
    int n_heads, head_size, max_len;
    const int* pads;            // (B,) left padding per row
    const float* keys;          // (B, nh, L, hs) this layer's keys
    const float* values;        // (B, nh, L, hs)
};

namespace naive {
void linear(const LinearWeights& lw, const float* x, int rows, float* y);
// qkv (B*T, 3C) -> out (B*T, C); reads queries from qkv, keys and values from the cache.
void attention(const AttentionBatch& a, const float* qkv, float* out);
}  // namespace naive

namespace optimized {
void linear(const LinearWeights& lw, const float* x, int rows, float* y, int threads);
void attention(const AttentionBatch& a, const float* qkv, float* out, int threads);
void gelu_tanh(float* x, size_t n);  // a vectorizable tanh, within ~2 float roundings of std::tanh
}  // namespace optimized

// Shared by both sets: cheap next to the matmuls (O(rows * C) work).
void layer_norm(const float* x, int rows, int C, const float* weight, const float* bias, float* y);
void gelu_tanh(float* x, size_t n);  // std::tanh: the reference

}  // namespace pgpt
