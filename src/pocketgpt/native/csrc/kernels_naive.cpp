// The readable reference: every kernel as the textbook writes it, one thread.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.hpp"

namespace pgpt::naive {

void linear(const LinearWeights& lw, const float* x, int rows, float* y) {
    for (int m = 0; m < rows; ++m) {
        for (int o = 0; o < lw.out; ++o) {
            float acc = 0.0f;
            if (lw.int8) {
                const int8_t* q = lw.q.data() + static_cast<size_t>(o) * lw.in;
                for (int k = 0; k < lw.in; ++k) acc += x[static_cast<size_t>(m) * lw.in + k] * q[k];
                acc *= lw.scale[o];
            } else {
                const float* w = lw.w + static_cast<size_t>(o) * lw.in;
                for (int k = 0; k < lw.in; ++k) acc += x[static_cast<size_t>(m) * lw.in + k] * w[k];
            }
            y[static_cast<size_t>(m) * lw.out + o] = acc + (lw.bias ? lw.bias[o] : 0.0f);
        }
    }
}

void attention(const AttentionBatch& a, const float* qkv, float* out) {
    const int hs = a.head_size, C = a.n_heads * hs;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    std::vector<float> p(a.max_len);  // attention weights of one query
    for (int b = 0; b < a.B; ++b)
        for (int h = 0; h < a.n_heads; ++h)
            for (int t = 0; t < a.T; ++t) {
                const int col = a.start + t;
                // A real query sees every real slot up to itself; a padding query only itself.
                const int first = col >= a.pads[b] ? a.pads[b] : col;
                const float* q = qkv + static_cast<size_t>(b * a.T + t) * 3 * C + h * hs;
                const size_t head = (static_cast<size_t>(b) * a.n_heads + h) * a.max_len;
                // 1. scores
                for (int j = first; j <= col; ++j) {
                    const float* k = a.keys + (head + j) * hs;
                    float s = 0.0f;
                    for (int d = 0; d < hs; ++d) s += q[d] * k[d];
                    p[j] = s * scale;
                }
                // 2. softmax: subtract the max so exp never overflows
                float mx = -std::numeric_limits<float>::infinity();
                for (int j = first; j <= col; ++j) mx = std::max(mx, p[j]);
                float sum = 0.0f;
                for (int j = first; j <= col; ++j) {
                    p[j] = std::exp(p[j] - mx);
                    sum += p[j];
                }
                for (int j = first; j <= col; ++j) p[j] /= sum;
                // 3. weighted sum of values
                float* o = out + static_cast<size_t>(b * a.T + t) * C + h * hs;
                for (int d = 0; d < hs; ++d) o[d] = 0.0f;
                for (int j = first; j <= col; ++j) {
                    const float* v = a.values + (head + j) * hs;
                    for (int d = 0; d < hs; ++d) o[d] += p[j] * v[d];
                }
            }
}

}  // namespace pgpt::naive
