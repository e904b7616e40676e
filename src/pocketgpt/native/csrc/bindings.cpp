// pocketgpt.native._engine: the Python face of the engine (pybind11).
// Every call that computes releases the GIL, so several generations (each with its own KVCache)
// run at once in a serving process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include "engine.hpp"

namespace py = pybind11;
using pgpt::Engine;
using pgpt::KVCache;

namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

Engine* make_engine(const std::string& folder, const std::string& kernels,
                    const std::string& quantize, bool quantize_head, int threads) {
    pgpt::EngineOptions o;
    if (kernels == "naive")
        o.kernels = pgpt::KernelSet::Naive;
    else if (kernels == "optimized")
        o.kernels = pgpt::KernelSet::Optimized;
    else
        throw std::invalid_argument("kernels=" + kernels + " is not one of naive, optimized");
    if (quantize != "none" && quantize != "int8")
        throw std::invalid_argument("quantize=" + quantize + " is not one of none, int8");
    o.int8 = quantize == "int8";
    o.int8_head = quantize_head;
    o.threads = threads > 0 ? threads : omp_get_max_threads();
    py::gil_scoped_release release;  // packing and quantizing the weights takes a moment
    return new Engine(folder, o);
}

py::array_t<float> forward(const Engine& e, KVCache& cache, const IdArray& ids, int start,
                           bool all_positions) {
    if (ids.ndim() != 2)
        throw std::invalid_argument("ids must have shape (B, T), got " + std::to_string(ids.ndim()) +
                                    " dimensions");
    const int B = static_cast<int>(ids.shape(0)), T = static_cast<int>(ids.shape(1));
    const int V = e.shape().vocab_size;
    py::array_t<float> logits =
        all_positions ? py::array_t<float>({B, T, V}) : py::array_t<float>({B, V});
    float* out = logits.mutable_data();
    const int64_t* data = ids.data();
    {
        py::gil_scoped_release release;
        e.forward(cache, data, B, T, start, all_positions, out);
    }
    return logits;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "GPTMini inference in C++ (see pocketgpt.native)";
    // A model file the engine cannot use: pocketgpt.native raises ModelFileError from it.
    py::register_exception<pgpt::ModelFileError>(m, "EngineFileError", PyExc_ValueError);

    py::class_<KVCache>(m, "KVCache")
        .def_readonly("batch_size", &KVCache::batch_size)
        .def(
            "reset",
            [](KVCache& c, const IdArray& pads) {
                if (pads.ndim() != 1 || pads.shape(0) != c.batch_size)
                    throw std::invalid_argument("pads must have shape (" +
                                                std::to_string(c.batch_size) + ",)");
                std::vector<int> p(pads.data(), pads.data() + c.batch_size);
                c.reset(p);
            },
            py::arg("pads"))
        .def("clear_pads", [](KVCache& c) { c.reset({}); })
        .def(
            "start_profile",
            [](KVCache& c) {
                c.profile = true;
                c.seconds.fill(0.0);
            },
            "Time each stage of every forward from now on (profile() reads the totals).")
        .def("profile", [](const KVCache& c) {
            py::dict d;
            for (int s = 0; s < pgpt::kStages; ++s) d[pgpt::kStageNames[s]] = c.seconds[s];
            return d;
        });

    py::class_<Engine>(m, "Engine")
        .def(py::init(&make_engine), py::arg("folder"), py::arg("kernels") = "optimized",
             py::arg("quantize") = "none", py::arg("quantize_head") = false,
             py::arg("threads") = 1)
        .def("new_cache",
             [](const Engine& e, int batch_size) {
                 if (batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
                 return new KVCache(e.shape(), batch_size);
             },
             py::arg("batch_size"))
        .def("forward", &forward, py::arg("cache"), py::arg("ids"), py::arg("start"),
             py::arg("all_positions") = false)
        .def_property_readonly("threads", [](const Engine& e) { return e.options().threads; })
        .def_property_readonly("shape", [](const Engine& e) {
            const auto& s = e.shape();
            py::dict d;
            d["vocab_size"] = s.vocab_size;
            d["d_model"] = s.d_model;
            d["n_heads"] = s.n_heads;
            d["d_ff"] = s.d_ff;
            d["num_layers"] = s.num_layers;
            d["max_len"] = s.max_len;
            d["bias"] = s.bias;
            return d;
        });
}
