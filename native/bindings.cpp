// pybind11 module rag_service._native: thin, strict boundary around the pure C++ kernels in native/src.
//
// Everything a caller can get wrong raises ValueError (std::invalid_argument, which pybind11 maps to ValueError)
// with a message naming the argument; nothing is converted silently (the Python facade rag_service/native.py does
// the lenient conversions). Compute runs with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "src/fusion.hpp"
#if defined(RAG_HAS_CUDA)
#include "cuda/device.hpp"
#endif

namespace py = pybind11;

#define RAG_STRINGIFY_(x) #x
#define RAG_STRINGIFY(x) RAG_STRINGIFY_(x)

namespace {

#if defined(RAG_HAS_CUDA)
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

bool native_byte_order(const py::dtype& dt) {
    const std::uint16_t probe = 1;
    const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
    const char order = dt.byteorder();
    return order == '=' || order == '|' || order == (little ? '<' : '>');
}

// A 1-D, C-contiguous, aligned, native-byte-order ndarray of exactly dtype T, or ValueError naming `name`.
template <typename T>
py::array checked_vector(const py::handle& obj, const char* name, const char* dtype_name) {
    if (!py::isinstance<py::array>(obj)) {
        fail(std::string(name) + " must be a numpy.ndarray of " + dtype_name + ", got " +
             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 1) fail(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + "-D");
    const py::dtype dt = arr.dtype();
    if (dt.normalized_num() != py::dtype::num_of<T>() || !native_byte_order(dt)) {
        fail(std::string(name) + " must have dtype " + dtype_name + ", got " + std::string(py::str(dt)));
    }
    if ((arr.flags() & py::array::c_style) == 0) fail(std::string(name) + " must be C-contiguous");
    if ((arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) == 0) fail(std::string(name) + " must be aligned");
    return arr;
}

rag::RankedList ranked_list(const py::handle& ids_obj, const py::handle& scores_obj, const char* ids_name,
                            const char* scores_name, py::array& ids_keep, py::array& scores_keep) {
    ids_keep = checked_vector<std::int64_t>(ids_obj, ids_name, "int64");
    scores_keep = checked_vector<float>(scores_obj, scores_name, "float32");
    if (ids_keep.shape(0) != scores_keep.shape(0)) {
        fail(std::string(ids_name) + " and " + scores_name + " must have the same length, got " +
             std::to_string(ids_keep.shape(0)) + " and " + std::to_string(scores_keep.shape(0)));
    }
    return rag::RankedList{static_cast<const std::int64_t*>(ids_keep.data()),
                           static_cast<const float*>(scores_keep.data()),
                           static_cast<std::size_t>(ids_keep.shape(0))};
}

// Hands the result's vectors to NumPy without copying: the four arrays share one base, a capsule that owns them.
py::tuple to_numpy(rag::FusionResult&& result) {
    auto owned = std::make_unique<rag::FusionResult>(std::move(result));
    rag::FusionResult* r = owned.get();
    const py::capsule base(r, [](void* p) noexcept { delete static_cast<rag::FusionResult*>(p); });
    owned.release();  // the capsule owns it now
    const auto k = static_cast<py::ssize_t>(r->ids.size());
    return py::make_tuple(py::array_t<std::int64_t>(k, r->ids.data(), base), py::array_t<float>(k, r->fused.data(), base),
                          py::array_t<float>(k, r->bm25.data(), base), py::array_t<float>(k, r->dense.data(), base));
}

py::tuple fuse(const py::handle& bm25_ids, const py::handle& bm25_scores, const py::handle& dense_ids,
               const py::handle& dense_scores, const std::string& method, double dense_weight, std::int64_t top_k,
               double rrf_k) {
    py::array keep[4];  // hold the checked arrays (and so their buffers) while the GIL is released
    const rag::RankedList bm25 = ranked_list(bm25_ids, bm25_scores, "bm25_ids", "bm25_scores", keep[0], keep[1]);
    const rag::RankedList dense = ranked_list(dense_ids, dense_scores, "dense_ids", "dense_scores", keep[2], keep[3]);
    const rag::FusionParams params{rag::parse_fusion_method(method), dense_weight, top_k, rrf_k};
    rag::FusionResult result;
    {
        py::gil_scoped_release release;
        result = rag::fuse(bm25, dense, params);
    }
    return to_numpy(std::move(result));
}

py::tuple cuda_device_count() {
#if defined(RAG_HAS_CUDA)
    rag::cuda::DeviceCount probe;
    {
        py::gil_scoped_release release;  // first CUDA call initialises the runtime: can take a while on a real GPU
        probe = rag::cuda::device_count();
    }
    return py::make_tuple(probe.count, probe.error);
#else
    return py::make_tuple(0, "built without CUDA");
#endif
}

std::string build_info() {
    std::string info = "rag_service._native " RAG_STRINGIFY(RAG_NATIVE_VERSION) "; C++" +
                       std::to_string(__cplusplus / 100 % 100);
#if defined(__clang__)
    info += "; clang " __clang_version__;
#elif defined(__GNUC__)
    info += "; gcc " __VERSION__;
#elif defined(_MSC_VER)
    info += "; msvc " + std::to_string(_MSC_VER);
#endif
#if defined(RAG_HAS_CUDA)
    info += "; CUDA " + rag::cuda::runtime_version() + " (cudart static, archs " RAG_CUDA_ARCHS ")";
#else
    info += "; no CUDA";
#endif
    return info;
}

}  // namespace

PYBIND11_MODULE(_native, m, py::mod_gil_not_used()) {
    m.doc() = "rag-service native kernels (C++17, optional CUDA). Use rag_service.native, not this module directly.";
    m.attr("__version__") = RAG_STRINGIFY(RAG_NATIVE_VERSION);
    m.attr("HAS_CUDA") = py::bool_(kHasCuda);
    m.attr("BUILD_INFO") = build_info();

    m.def("cuda_device_count", &cuda_device_count,
          "cuda_device_count() -> tuple[int, str]\n\n"
          "(device count, \"\") when the CUDA runtime answers, else (0, reason). Never raises.");

    m.def("fuse", &fuse, py::arg("bm25_ids"), py::arg("bm25_scores"), py::arg("dense_ids"), py::arg("dense_scores"),
          py::arg("method"), py::arg("dense_weight"), py::arg("top_k"), py::arg("rrf_k"),
          "fuse(bm25_ids, bm25_scores, dense_ids, dense_scores, method, dense_weight, top_k, rrf_k)\n"
          "    -> tuple[ids int64[k], fused float32[k], bm25 float32[k], dense float32[k]]\n\n"
          "Fuses two rank-ordered candidate lists (ids: 1-D C-contiguous int64, scores: 1-D C-contiguous float32,\n"
          "finite, no id twice in one list). method is 'rrf' or 'weighted'; 0 <= dense_weight <= 1; top_k >= 1;\n"
          "rrf_k > 0. Returns the top min(top_k, |union|) ids by fused score (ties: id ascending) with each\n"
          "retriever's raw score (NaN when absent). Every invalid argument raises ValueError. See\n"
          "rag_service.reference.fuse_reference for the exact semantics.");
}
