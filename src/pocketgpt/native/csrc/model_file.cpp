#include "model_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "json.hpp"

namespace pgpt {

namespace {

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw ModelFileError(path + " cannot be opened; expected a model folder written by pocketgpt");
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

int positive_int(const json::Value& cfg, const std::string& path, const char* key) {
    const json::Value* v = cfg.find(key);
    if (!v || v->kind != json::Value::Kind::Number || v->number < 1 ||
        v->number != std::floor(v->number) || v->number > 1e9)
        throw ModelFileError(path + ": " + key + " must be a positive integer");
    return static_cast<int>(v->number);
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

ModelShape read_model_config(const std::string& path) {
    std::string text = read_text(path);
    json::Value cfg;
    try {
        cfg = json::parse(text.data(), text.size());
    } catch (const std::runtime_error& e) {
        throw ModelFileError(path + " is not valid JSON (" + e.what() + ")");
    }
    const json::Value* arch = cfg.find("architecture");
    if (!arch || arch->kind != json::Value::Kind::String || arch->string != "GPTMini")
        throw ModelFileError(path + " does not describe a GPTMini model");
    // Variant keys (issue 16): the engine implements the default architecture only.
    struct Allowed {
        const char* key;
        const char* value;  // the one supported string value, or nullptr for booleans/null
    };
    for (const Allowed& a : {Allowed{"position", "learned"}, Allowed{"norm", "layernorm"},
                             Allowed{"activation", "gelu"}}) {
        const json::Value* v = cfg.find(a.key);
        if (v && !(v->kind == json::Value::Kind::String && v->string == a.value))
            throw ModelFileError(path + ": " + a.key + " is not " + a.value +
                                 "; the native engine runs the default architecture only");
    }
    if (const json::Value* v = cfg.find("qk_norm"); v && v->kind == json::Value::Kind::Bool && v->boolean)
        throw ModelFileError(path + ": qk_norm is true; the native engine does not implement it");
    if (const json::Value* v = cfg.find("logit_softcap"); v && v->kind != json::Value::Kind::Null)
        throw ModelFileError(path + ": logit_softcap is set; the native engine does not implement it");
    if (const json::Value* v = cfg.find("tie_embeddings"); v && v->kind == json::Value::Kind::Bool && !v->boolean)
        throw ModelFileError(path + ": tie_embeddings is false; the native engine needs a tied head");

    ModelShape s;
    s.vocab_size = positive_int(cfg, path, "vocab_size");
    s.d_model = positive_int(cfg, path, "d_model");
    s.n_heads = positive_int(cfg, path, "n_heads");
    s.d_ff = positive_int(cfg, path, "d_ff");
    s.num_layers = positive_int(cfg, path, "num_layers");
    s.max_len = positive_int(cfg, path, "max_len");
    if (s.d_model % s.n_heads)
        throw ModelFileError(path + ": d_model is not divisible by n_heads");
    if (const json::Value* v = cfg.find("bias"); v && v->kind == json::Value::Kind::Bool)
        s.bias = v->boolean;
    return s;
}

MappedFile::MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw ModelFileError(path + " cannot be opened (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        ::close(fd);
        throw ModelFileError(path + " cannot be read (" + std::strerror(errno) + ")");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            ::close(fd);
            throw ModelFileError(path + " cannot be memory-mapped (" + std::strerror(errno) + ")");
        }
        data_ = static_cast<const unsigned char*>(p);
    }
    ::close(fd);  // the mapping keeps the file's pages reachable
}

MappedFile::~MappedFile() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
}

SafeTensors::SafeTensors(const std::string& path) : path_(path), file_(path) {
    // Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
    const size_t size = file_.size();
    if (size < 8)
        throw ModelFileError(path + " is truncated (" + std::to_string(size) +
                             " bytes, not even a safetensors header); re-save or re-download it");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | file_.data()[i];
    if (n > size - 8)
        throw ModelFileError(path + " is truncated or corrupt (its header claims " +
                             std::to_string(n) + " bytes, the file has " + std::to_string(size) +
                             "); re-save or re-download it");
    json::Value header;
    try {
        header = json::parse(reinterpret_cast<const char*>(file_.data()) + 8, n);
    } catch (const std::runtime_error& e) {
        throw ModelFileError(path + " has a corrupt safetensors header (" + e.what() + ")");
    }
    if (header.kind != json::Value::Kind::Object)
        throw ModelFileError(path + " has a corrupt safetensors header (not a JSON object)");
    const size_t base = 8 + n, body = size - base;
    for (const auto& [name, info] : header.object) {
        if (name == "__metadata__") continue;
        const json::Value* dtype = info.find("dtype");
        const json::Value* shape = info.find("shape");
        const json::Value* offsets = info.find("data_offsets");
        if (!dtype || !shape || !offsets || dtype->kind != json::Value::Kind::String ||
            shape->kind != json::Value::Kind::Array || offsets->kind != json::Value::Kind::Array ||
            offsets->array.size() != 2)
            throw ModelFileError(path + ": tensor " + name + " has a corrupt header entry");
        if (dtype->string != "F32")
            throw ModelFileError(path + ": tensor " + name + " is " + dtype->string +
                                 "; the native engine reads float32 weights (save the model in fp32)");
        TensorRef t;
        t.numel = 1;
        for (const auto& d : shape->array) {
            if (d.kind != json::Value::Kind::Number || d.number < 0 || d.number > 1e12)
                throw ModelFileError(path + ": tensor " + name + " has a corrupt shape");
            t.shape.push_back(static_cast<int64_t>(d.number));
            t.numel *= static_cast<size_t>(d.number);
        }
        double a = offsets->array[0].number, b = offsets->array[1].number;
        if (a < 0 || b < a || b - a != 4.0 * t.numel)
            throw ModelFileError(path + ": tensor " + name + " has corrupt data offsets");
        if (b > static_cast<double>(body))
            throw ModelFileError(path + " is truncated: tensor " + name + " ends at byte " +
                                 std::to_string(static_cast<uint64_t>(b + base)) + " of " +
                                 std::to_string(size) + "; re-save or re-download it");
        const unsigned char* p = file_.data() + base + static_cast<size_t>(a);
        if (reinterpret_cast<uintptr_t>(p) % alignof(float) == 0) {
            t.data = reinterpret_cast<const float*>(p);
        } else {  // safetensors aligns to 8 bytes; a hand-made file may not
            copies_.emplace_back(t.numel);
            std::memcpy(copies_.back().data(), p, 4 * t.numel);
            t.data = copies_.back().data();
        }
        tensors_.emplace(name, std::move(t));
    }
}

const float* SafeTensors::get(const std::string& name, const std::vector<int64_t>& shape) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
        throw ModelFileError(path_ + " has no tensor " + name + "; is it a pocketgpt GPTMini model?");
    if (it->second.shape != shape)
        throw ModelFileError(path_ + ": tensor " + name + " has shape " + shape_text(it->second.shape) +
                             " but model_config.json implies " + shape_text(shape));
    return it->second.data;
}

}  // namespace pgpt
