// A model folder on disk: model_config.json (the shape) and model.safetensors (the weights),
// read without PyTorch. The weights file is memory-mapped; its header is parsed and every
// tensor's dtype, shape and byte range are checked before a pointer into it is handed out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace pgpt {

// A file that cannot be used (missing, truncated, corrupt, another architecture). The message
// is one line naming the file and the problem; Python sees it as pocketgpt's ModelFileError.
struct ModelFileError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct ModelShape {
    int vocab_size = 0, d_model = 0, n_heads = 0, d_ff = 0, num_layers = 0, max_len = 0;
    bool bias = true;
    int head_size() const { return d_model / n_heads; }
};

// Reads model_config.json; refuses an architecture the engine does not implement, naming the key.
ModelShape read_model_config(const std::string& path);

// A read-only memory map of a whole file, unmapped on destruction.
class MappedFile {
  public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const unsigned char* data() const { return data_; }
    size_t size() const { return size_; }

  private:
    const unsigned char* data_ = nullptr;
    size_t size_ = 0;
};

struct TensorRef {
    std::vector<int64_t> shape;
    const float* data = nullptr;  // into the mapping (or into `copy` when misaligned)
    size_t numel = 0;
};

// The F32 tensors of a safetensors file, by name.
class SafeTensors {
  public:
    explicit SafeTensors(const std::string& path);
    bool has(const std::string& name) const { return tensors_.count(name) > 0; }
    // The tensor called name, checked to have exactly this shape.
    const float* get(const std::string& name, const std::vector<int64_t>& shape) const;

  private:
    std::string path_;
    MappedFile file_;
    std::map<std::string, TensorRef> tensors_;
    std::vector<std::vector<float>> copies_;  // tensors whose offset is not 4-byte aligned
};

}  // namespace pgpt
