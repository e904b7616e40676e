#include "engine.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace pgpt {

KVCache::KVCache(const ModelShape& s, int B)
    : batch_size(B),
      layer_stride(2ull * B * s.n_heads * s.max_len * s.head_size()),
      kv(layer_stride * s.num_layers, 0.0f),  // zeros: no slot ever holds garbage
      pads(B, 0) {}

void KVCache::reset(const std::vector<int>& new_pads) {
    if (new_pads.empty())
        std::fill(pads.begin(), pads.end(), 0);
    else
        pads = new_pads;
}

Engine::Engine(const std::string& folder, const EngineOptions& options)
    : shape_(read_model_config(folder + "/model_config.json")),
      options_(options),
      weights_(std::make_unique<SafeTensors>(folder + "/model.safetensors")) {
    const int64_t C = shape_.d_model, F = shape_.d_ff, V = shape_.vocab_size, L = shape_.max_len;
    const SafeTensors& w = *weights_;
    auto bias = [&](const std::string& name, int64_t n) -> const float* {
        if (!shape_.bias) return nullptr;
        return w.get(name, {n});
    };
    tok_emb_ = w.get("tok_emb.weight", {V, C});
    pos_emb_ = w.get("pos_emb.weight", {L, C});
    lnf_w_ = w.get("ln_f.weight", {C});
    lnf_b_ = bias("ln_f.bias", C);
    const KernelSet ks = options.kernels;
    for (int i = 0; i < shape_.num_layers; ++i) {
        const std::string p = "blocks." + std::to_string(i) + ".";
        Layer l;
        l.ln1_w = w.get(p + "ln1.weight", {C});
        l.ln1_b = bias(p + "ln1.bias", C);
        l.ln2_w = w.get(p + "ln2.weight", {C});
        l.ln2_b = bias(p + "ln2.bias", C);
        l.qkv = prepare_linear(w.get(p + "attn.qkv.weight", {3 * C, C}), bias(p + "attn.qkv.bias", 3 * C),
                               3 * C, C, ks, options.int8);
        l.proj = prepare_linear(w.get(p + "attn.proj.weight", {C, C}), bias(p + "attn.proj.bias", C), C,
                                C, ks, options.int8);
        l.fc = prepare_linear(w.get(p + "ff.fc.weight", {F, C}), bias(p + "ff.fc.bias", F), F, C, ks,
                              options.int8);
        l.ff_proj = prepare_linear(w.get(p + "ff.proj.weight", {C, F}), bias(p + "ff.proj.bias", C), C,
                                   F, ks, options.int8);
        layers_.push_back(std::move(l));
    }
    // The head is the token embedding (V, C), read as a Linear without bias.
    head_ = prepare_linear(tok_emb_, nullptr, V, C, ks, options.int8 && options.int8_head);
}

void Engine::linear(const LinearWeights& lw, const float* x, int rows, float* y) const {
    if (options_.kernels == KernelSet::Naive)
        naive::linear(lw, x, rows, y);
    else
        optimized::linear(lw, x, rows, y, options_.threads);
}

namespace {

// Adds the time since the last mark to a stage's total, when the cache is profiling.
class StageClock {
  public:
    explicit StageClock(KVCache& c) : c_(c), last_(now()) {}
    void mark(Stage s) {
        if (!c_.profile) return;
        const auto t = now();
        c_.seconds[s] += std::chrono::duration<double>(t - last_).count();
        last_ = t;
    }

  private:
    static std::chrono::steady_clock::time_point now() { return std::chrono::steady_clock::now(); }
    KVCache& c_;
    std::chrono::steady_clock::time_point last_;
};

}  // namespace

void Engine::forward(KVCache& c, const int64_t* ids, int B, int T, int start, bool all_positions,
                     float* logits) const {
    const ModelShape& s = shape_;
    const int C = s.d_model, F = s.d_ff, V = s.vocab_size, R = B * T;
    const int nh = s.n_heads, hs = s.head_size(), L = s.max_len;
    if (B != c.batch_size)
        throw std::invalid_argument(std::to_string(B) + " rows given to a KV cache made for " +
                                    std::to_string(c.batch_size));
    if (T < 1 || start < 0 || start + T > L)
        throw std::invalid_argument("sequence of " + std::to_string(start + T) +
                                    " tokens is longer than max_len=" + std::to_string(L));
    for (int r = 0; r < R; ++r)
        if (ids[r] < 0 || ids[r] >= V)
            throw std::invalid_argument("token id " + std::to_string(ids[r]) +
                                        " is outside the vocabulary 0.." + std::to_string(V - 1));
    c.x.resize(static_cast<size_t>(R) * C);
    c.h.resize(static_cast<size_t>(R) * C);
    c.att.resize(static_cast<size_t>(R) * C);
    c.qkv.resize(static_cast<size_t>(R) * 3 * C);
    c.ff.resize(static_cast<size_t>(R) * F);
    StageClock clock(c);

    // Embeddings: a row padded by p tokens has its column i at position i - p (clamped at 0).
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            const int pos = std::max(start + t - c.pads[b], 0);
            const float* te = tok_emb_ + ids[b * T + t] * C;
            const float* pe = pos_emb_ + static_cast<size_t>(pos) * C;
            float* x = c.x.data() + static_cast<size_t>(b * T + t) * C;
            for (int i = 0; i < C; ++i) x[i] = te[i] + pe[i];
        }
    clock.mark(kEmbed);

    for (size_t li = 0; li < layers_.size(); ++li) {
        const Layer& l = layers_[li];
        float* keys = c.kv.data() + li * c.layer_stride;  // (B, nh, L, hs)
        float* values = keys + c.layer_stride / 2;
        // Attention: x += proj(attend(qkv(ln1(x))))
        layer_norm(c.x.data(), R, C, l.ln1_w, l.ln1_b, c.h.data());
        clock.mark(kNorm);
        linear(l.qkv, c.h.data(), R, c.qkv.data());  // (R, 3C): q | k | v, heads side by side
        for (int b = 0; b < B; ++b)
            for (int t = 0; t < T; ++t) {
                const float* row = c.qkv.data() + static_cast<size_t>(b * T + t) * 3 * C;
                for (int h = 0; h < nh; ++h) {
                    const size_t slot = ((static_cast<size_t>(b) * nh + h) * L + start + t) * hs;
                    std::memcpy(keys + slot, row + C + h * hs, sizeof(float) * hs);
                    std::memcpy(values + slot, row + 2 * C + h * hs, sizeof(float) * hs);
                }
            }
        clock.mark(kQKV);  // the projection and the cache writes
        const AttentionBatch a{B, T, start, nh, hs, L, c.pads.data(), keys, values};
        if (options_.kernels == KernelSet::Naive)
            naive::attention(a, c.qkv.data(), c.att.data());
        else
            optimized::attention(a, c.qkv.data(), c.att.data(), options_.threads);
        clock.mark(kAttention);
        linear(l.proj, c.att.data(), R, c.h.data());
        clock.mark(kProj);
        for (size_t i = 0; i < c.x.size(); ++i) c.x[i] += c.h[i];
        clock.mark(kResidual);
        // Feed-forward: x += proj(gelu(fc(ln2(x))))
        layer_norm(c.x.data(), R, C, l.ln2_w, l.ln2_b, c.h.data());
        clock.mark(kNorm);
        linear(l.fc, c.h.data(), R, c.ff.data());
        clock.mark(kFC);
        if (options_.kernels == KernelSet::Naive)
            gelu_tanh(c.ff.data(), c.ff.size());
        else
            optimized::gelu_tanh(c.ff.data(), c.ff.size());
        clock.mark(kGELU);
        linear(l.ff_proj, c.ff.data(), R, c.h.data());
        clock.mark(kFFProj);
        for (size_t i = 0; i < c.x.size(); ++i) c.x[i] += c.h[i];
        clock.mark(kResidual);
    }

    // Final norm and the tied head, over every position or each row's last one only (what
    // sampling needs: the head over all T positions would cost as much as the blocks).
    int rows = R;
    const float* src = c.x.data();
    if (!all_positions && T > 1) {
        c.head_in.resize(static_cast<size_t>(B) * C);
        for (int b = 0; b < B; ++b)
            std::memcpy(c.head_in.data() + static_cast<size_t>(b) * C,
                        c.x.data() + static_cast<size_t>(b * T + T - 1) * C, sizeof(float) * C);
        rows = B;
        src = c.head_in.data();
    }
    layer_norm(src, rows, C, lnf_w_, lnf_b_, c.h.data());
    clock.mark(kNorm);
    linear(head_, c.h.data(), rows, logits);
    clock.mark(kHead);
}

}  // namespace pgpt
