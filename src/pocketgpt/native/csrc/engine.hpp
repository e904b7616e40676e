// GPTMini inference: the forward pass of pocketgpt/model.py (learned positions, pre-LayerNorm
// blocks, fused qkv, GELU (tanh), tied head) over a preallocated KV cache, with left padding.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "model_file.hpp"

namespace pgpt {

struct EngineOptions {
    KernelSet kernels = KernelSet::Optimized;
    bool int8 = false;       // every Linear in int8 (per output channel)
    bool int8_head = false;  // the tied head too
    int threads = 1;         // OpenMP threads of the optimized kernels
};

// The stages of a forward pass a profile splits its time into.
enum Stage { kEmbed, kNorm, kQKV, kAttention, kProj, kFC, kGELU, kFFProj, kResidual, kHead, kStages };
constexpr const char* kStageNames[kStages] = {"embed", "layer_norm", "qkv", "attention", "attn_proj",
                                              "ff_fc", "gelu", "ff_proj", "residual", "head"};

// One sequence batch's keys and values for every layer, plus the forward's scratch space, so
// concurrent generations (each with its own cache) share nothing writable.
struct KVCache {
    KVCache(const ModelShape& s, int batch_size);
    void reset(const std::vector<int>& pads);  // pads: (B,) left padding per row, or empty

    int batch_size;
    size_t layer_stride;     // floats per layer: 2 * B * nh * L * hs (keys, then values)
    std::vector<float> kv;   // (layers, 2, B, nh, L, hs)
    std::vector<int> pads;   // (B,)
    std::vector<float> x, h, qkv, att, ff, head_in;  // scratch, grown on demand
    // Seconds spent per stage over every forward since profiling was switched on; off by
    // default (two clock reads per stage are cheap but not free).
    bool profile = false;
    std::array<double, kStages> seconds{};
};

class Engine {
  public:
    Engine(const std::string& folder, const EngineOptions& options);

    const ModelShape& shape() const { return shape_; }
    const EngineOptions& options() const { return options_; }

    // ids (B, T) at cache slots start..start+T-1 -> logits (B, T, V) into `logits` when
    // all_positions, else (B, V) of each row's last token.
    void forward(KVCache& cache, const int64_t* ids, int B, int T, int start, bool all_positions,
                 float* logits) const;

  private:
    struct Layer {
        const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
        LinearWeights qkv, proj, fc, ff_proj;
    };

    void linear(const LinearWeights& lw, const float* x, int rows, float* y) const;

    ModelShape shape_;
    EngineOptions options_;
    std::unique_ptr<SafeTensors> weights_;  // the memory map every raw pointer below points into
    const float *tok_emb_, *pos_emb_, *lnf_w_, *lnf_b_;
    std::vector<Layer> layers_;
    LinearWeights head_;
};

}  // namespace pgpt
