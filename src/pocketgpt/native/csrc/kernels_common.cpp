// Kernels both sets share (layer norm, GELU: O(rows * C), cheap next to the matmuls) and the
// weight preparation: int8 quantization and packing into panels.
#include <cmath>
#include <vector>

#include "kernels.hpp"

namespace pgpt {

void layer_norm(const float* x, int rows, int C, const float* weight, const float* bias, float* y) {
    for (int m = 0; m < rows; ++m) {
        const float* r = x + static_cast<size_t>(m) * C;
        float mean = 0.0f;
        for (int c = 0; c < C; ++c) mean += r[c];
        mean /= C;
        float var = 0.0f;
        for (int c = 0; c < C; ++c) var += (r[c] - mean) * (r[c] - mean);
        const float inv = 1.0f / std::sqrt(var / C + 1e-5f);  // PyTorch's eps
        float* o = y + static_cast<size_t>(m) * C;
        for (int c = 0; c < C; ++c) o[c] = (r[c] - mean) * inv * weight[c] + (bias ? bias[c] : 0.0f);
    }
}

void gelu_tanh(float* x, size_t n) {
    const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
    for (size_t i = 0; i < n; ++i) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
}

LinearWeights prepare_linear(const float* w, const float* bias, int out, int in, KernelSet kernels,
                             bool int8) {
    LinearWeights lw;
    lw.in = in;
    lw.out = out;
    lw.bias = bias;
    lw.int8 = int8;
    if (int8) {  // symmetric, per output channel: q = round(w / scale), scale = max|w| / 127
        lw.scale.resize(out);
        std::vector<int8_t> rows(static_cast<size_t>(out) * in);
        for (int o = 0; o < out; ++o) {
            const float* r = w + static_cast<size_t>(o) * in;
            float amax = 0.0f;
            for (int k = 0; k < in; ++k) amax = std::max(amax, std::fabs(r[k]));
            const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
            lw.scale[o] = s;
            for (int k = 0; k < in; ++k)
                rows[static_cast<size_t>(o) * in + k] = static_cast<int8_t>(std::lround(r[k] / s));
        }
        if (kernels == KernelSet::Naive) {
            lw.q = std::move(rows);
            return lw;
        }
        const int panels = (out + kPanel - 1) / kPanel;
        lw.q.assign(static_cast<size_t>(panels) * in * kPanel, 0);
        for (int o = 0; o < out; ++o)
            for (int k = 0; k < in; ++k)
                lw.q[(static_cast<size_t>(o / kPanel) * in + k) * kPanel + o % kPanel] =
                    rows[static_cast<size_t>(o) * in + k];
        return lw;
    }
    if (kernels == KernelSet::Naive) {
        lw.w = w;  // read in place from the memory map
        return lw;
    }
    // Panel p holds output columns 16p..16p+15 for every k, so the kernel reads it front to back
    // and one k is 16 adjacent floats (zero-padded past `out`).
    const int panels = (out + kPanel - 1) / kPanel;
    lw.packed.assign(static_cast<size_t>(panels) * in * kPanel, 0.0f);
    for (int o = 0; o < out; ++o)
        for (int k = 0; k < in; ++k)
            lw.packed[(static_cast<size_t>(o / kPanel) * in + k) * kPanel + o % kPanel] =
                w[static_cast<size_t>(o) * in + k];
    return lw;
}

}  // namespace pgpt
