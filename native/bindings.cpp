// pybind11 module rag_service._native: thin, strict boundary around the pure C++ kernels in native/src.
//
// Everything a caller can get wrong raises ValueError (std::invalid_argument, which pybind11 maps to ValueError)
// with a message naming the argument; nothing is converted silently (the Python facade rag_service/native.py does
// the lenient conversions). Compute runs with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "src/fusion.hpp"
#include "src/rerank.hpp"
#include "src/rerank_core.hpp"

#include "src/retrieve.hpp"
#include "src/search_core.hpp"
#include "src/simd.hpp"
#include "src/wordpiece.hpp"
#if defined(RAG_HAS_CUDA)
#include "cuda/device.hpp"
#include "cuda/rerank.hpp"
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

// ---- rerank and context-filter kernels ----

std::string type_name(const py::handle& obj) { return std::string(py::str(py::type::handle_of(obj).attr("__name__"))); }

// A 2-D, C-contiguous, aligned, native-byte-order ndarray whose dtype is one of `allowed` (numpy type numbers), or
// ValueError naming `name`.
py::array checked_matrix(const py::handle& obj, const char* name, std::initializer_list<int> allowed,
                         const char* dtype_names) {
    if (!py::isinstance<py::array>(obj)) {
        fail(std::string(name) + " must be a numpy.ndarray of " + dtype_names + ", got " + type_name(obj));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 2) fail(std::string(name) + " must be 2-D, got " + std::to_string(arr.ndim()) + "-D");
    const py::dtype dt = arr.dtype();
    bool ok = false;
    for (const int num : allowed) ok |= dt.normalized_num() == num;
    if (!ok || !native_byte_order(dt)) {
        fail(std::string(name) + " must have dtype " + dtype_names + ", got " + std::string(py::str(dt)));
    }
    if ((arr.flags() & py::array::c_style) == 0) fail(std::string(name) + " must be C-contiguous");
    if ((arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) == 0) fail(std::string(name) + " must be aligned");
    return arr;
}

constexpr int kNpyInt8 = py::detail::npy_api::NPY_BYTE_;
constexpr int kNpyHalf = 23;  // NPY_HALF (pybind11 has no constant for it)
constexpr int kNpyFloat = py::detail::npy_api::NPY_FLOAT_;
// uint64 is NumPy's unsigned long on LP64 platforms and unsigned long long elsewhere.
constexpr int kNpyUint64 = sizeof(unsigned long) == 8 ? py::detail::npy_api::NPY_ULONG_
                                                      : py::detail::npy_api::NPY_ULONGLONG_;

template <typename T>
const T* data_of(const py::array& arr) {
    return static_cast<const T*>(arr.data());
}

std::size_t len(const py::array& arr) { return static_cast<std::size_t>(arr.shape(0)); }

rag::simd::Level simd_arg(const std::string& simd) { return rag::simd::parse(simd); }

void require_cuda([[maybe_unused]] const char* kernel) {
#if !defined(RAG_HAS_CUDA)
    throw std::runtime_error(std::string(kernel) + ": this rag_service._native was built without CUDA");
#endif
}

// offsets must have n_chunks + 1 >= 1 entries; the per-candidate ranges are checked by the kernels.
std::size_t chunks_of(const py::array& offsets, const char* name) {
    if (offsets.shape(0) < 1) fail(std::string(name) + " must have at least one entry (n_chunks + 1)");
    return len(offsets) - 1;
}

py::array_t<float> window_maxsim(const py::handle& query_obj, const py::handle& offsets_obj,
                                 const py::handle& vectors_obj, const py::handle& scales_obj,
                                 const py::handle& candidates_obj, double temperature, bool use_cuda,
                                 const std::string& simd) {
    const py::array query = checked_vector<float>(query_obj, "query", "float32");
    const py::array offsets = checked_vector<std::int64_t>(offsets_obj, "offsets", "int64");
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyInt8, kNpyHalf, kNpyFloat},
                                             "int8, float16 or float32");
    const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
    rag::WindowStore store;
    store.offsets = data_of<std::int64_t>(offsets);
    store.n_chunks = chunks_of(offsets, "offsets");
    store.vectors = vectors.data();
    store.n_windows = static_cast<std::size_t>(vectors.shape(0));
    store.d = static_cast<std::size_t>(vectors.shape(1));
    if (len(query) != store.d) {
        fail("vectors must have " + std::to_string(len(query)) + " columns (the query's dimension), got " +
             std::to_string(store.d));
    }
    const int num = vectors.dtype().normalized_num();
    py::array scales;
    if (num == kNpyInt8) {
        store.type = rag::VectorType::kInt8;
        if (scales_obj.is_none()) fail("scales is required (float32[n_windows]) when vectors are int8");
        scales = checked_vector<float>(scales_obj, "scales", "float32");
        if (len(scales) != store.n_windows) {
            fail("scales must have one entry per row of vectors (" + std::to_string(store.n_windows) + "), got " +
                 std::to_string(len(scales)));
        }
        store.scales = data_of<float>(scales);
    } else {
        store.type = num == kNpyHalf ? rag::VectorType::kFloat16 : rag::VectorType::kFloat32;
        if (!scales_obj.is_none()) {
            fail("scales must be None when vectors are " + std::string(py::str(vectors.dtype())) +
                 " (only int8 vectors are scaled)");
        }
    }
    const rag::simd::Level level = simd_arg(simd);
    if (use_cuda) require_cuda("window_maxsim");
    const std::size_t m = len(candidates);
    py::array_t<float> out({static_cast<py::ssize_t>(m), py::ssize_t{3}});
    float* result = out.mutable_data();
    {
        py::gil_scoped_release release;
        if (use_cuda) {
#if defined(RAG_HAS_CUDA)
            rag::check_window_args(data_of<float>(query), store, data_of<std::int64_t>(candidates), m, temperature);
            rag::cuda::window_maxsim(data_of<float>(query), store, data_of<std::int64_t>(candidates), m,
                                     temperature, result);
#endif
        } else {
            rag::window_maxsim(data_of<float>(query), store, data_of<std::int64_t>(candidates), m, temperature,
                               level, result);
        }
    }
    return out;
}

py::tuple proximity(const py::handle& terms_obj, const py::handle& offsets_obj, const py::handle& tokens_obj,
                    const py::handle& candidates_obj) {
    const py::array terms = checked_vector<std::int32_t>(terms_obj, "query_terms", "int32");
    const py::array offsets = checked_vector<std::int64_t>(offsets_obj, "token_offsets", "int64");
    const py::array tokens = checked_vector<std::int32_t>(tokens_obj, "tokens", "int32");
    const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
    const rag::TokenStore store{data_of<std::int64_t>(offsets), chunks_of(offsets, "token_offsets"),
                                data_of<std::int32_t>(tokens), len(tokens)};
    const std::size_t m = len(candidates);
    py::array_t<std::int32_t> span(static_cast<py::ssize_t>(m));
    py::array_t<std::int32_t> matched(static_cast<py::ssize_t>(m));
    std::int32_t* span_out = span.mutable_data();
    std::int32_t* matched_out = matched.mutable_data();
    {
        py::gil_scoped_release release;
        rag::proximity(data_of<std::int32_t>(terms), len(terms), store, data_of<std::int64_t>(candidates), m,
                       span_out, matched_out);
    }
    return py::make_tuple(span, matched);
}

py::array_t<float> linear_scores(const py::handle& features_obj, const py::handle& weights_obj, double bias) {
    const py::array features = checked_matrix(features_obj, "features", {kNpyFloat}, "float32");
    const py::array weights = checked_vector<float>(weights_obj, "weights", "float32");
    const std::size_t m = static_cast<std::size_t>(features.shape(0));
    const std::size_t f = static_cast<std::size_t>(features.shape(1));
    if (len(weights) != f) {
        fail("weights must have one entry per column of features (" + std::to_string(f) + "), got " +
             std::to_string(len(weights)));
    }
    py::array_t<float> out(static_cast<py::ssize_t>(m));
    float* result = out.mutable_data();
    {
        py::gil_scoped_release release;
        rag::linear_scores(data_of<float>(features), m, f, data_of<float>(weights), bias, result);
    }
    return out;
}

py::array_t<float> similarity_matrix(const py::handle& vectors_obj, bool use_cuda, const std::string& simd) {
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyFloat}, "float32");
    const rag::simd::Level level = simd_arg(simd);
    if (use_cuda) require_cuda("similarity_matrix");
    const std::size_t m = static_cast<std::size_t>(vectors.shape(0));
    const std::size_t d = static_cast<std::size_t>(vectors.shape(1));
    py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(m)});
    float* result = out.mutable_data();
    {
        py::gil_scoped_release release;
        if (use_cuda) {
#if defined(RAG_HAS_CUDA)
            rag::check_finite(data_of<float>(vectors), m, d, "vectors");
            rag::cuda::similarity_matrix(data_of<float>(vectors), m, d, result);
#endif
        } else {
            rag::similarity_matrix(data_of<float>(vectors), m, d, level, result);
        }
    }
    return out;
}

py::array_t<std::int64_t> mmr_select(const py::handle& relevance_obj, const py::handle& sim_obj, double mmr_lambda,
                                     std::int64_t k, double dedup_threshold, bool use_cuda,
                                     const std::string& simd) {
    const py::array relevance = checked_vector<float>(relevance_obj, "relevance", "float32");
    const py::array sim = checked_matrix(sim_obj, "sim", {kNpyFloat}, "float32");
    const std::size_t m = len(relevance);
    if (static_cast<std::size_t>(sim.shape(0)) != m || static_cast<std::size_t>(sim.shape(1)) != m) {
        fail("sim must be (" + std::to_string(m) + ", " + std::to_string(m) + ") (one row and column per relevance "
             "entry), got (" + std::to_string(sim.shape(0)) + ", " + std::to_string(sim.shape(1)) + ")");
    }
    const rag::simd::Level level = simd_arg(simd);
    if (use_cuda) require_cuda("mmr_select");
    auto chosen = std::make_unique<std::vector<std::int64_t>>();
    {
        py::gil_scoped_release release;
        if (use_cuda) {
#if defined(RAG_HAS_CUDA)
            rag::check_mmr_args(data_of<float>(relevance), data_of<float>(sim), m, mmr_lambda, k, dedup_threshold);
            *chosen = rag::cuda::mmr_select(data_of<float>(relevance), data_of<float>(sim), m, mmr_lambda, k,
                                            dedup_threshold);
            // The rows the greedy loop read, in pick order (all but the k-th pick's): the C++ kernel stops at the
            // first non-finite one, and the picks before it are the same on both.
            const std::size_t limit = std::min(m, static_cast<std::size_t>(std::max<std::int64_t>(k, 0)));
            const std::size_t read = chosen->size() == limit && limit > 0 ? limit - 1 : chosen->size();
            for (std::size_t j = 0; j < read; ++j) {
                const auto pick = static_cast<std::size_t>((*chosen)[j]);
                rag::check_sim_row(data_of<float>(sim) + pick * m, pick, m);
            }
#endif
        } else {
            *chosen = rag::mmr_select(data_of<float>(relevance), data_of<float>(sim), m, mmr_lambda, k,
                                      dedup_threshold, level);
        }
    }
    // Hand the vector to NumPy without copying: a capsule owns it.
    std::vector<std::int64_t>* owned = chosen.get();
    const py::capsule base(owned, [](void* p) noexcept { delete static_cast<std::vector<std::int64_t>*>(p); });
    chosen.release();
    return py::array_t<std::int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), base);
}

// ---- the rerank stage in one call (native/src/rerank_core.hpp) ----

namespace rerank_core {

rag::QueryTerms query_terms_of(const py::handle& terms_obj, const py::handle& counts_obj, const py::handle& idf_obj,
                               py::array keep[3]) {
    keep[0] = checked_vector<std::int32_t>(terms_obj, "query_terms", "int32");
    keep[1] = checked_vector<double>(counts_obj, "query_counts", "float64");
    keep[2] = checked_vector<double>(idf_obj, "query_idf", "float64");
    if (len(keep[1]) != len(keep[0]) || len(keep[2]) != len(keep[0])) {
        fail("query_terms, query_counts and query_idf must have the same length, got " + std::to_string(len(keep[0])) +
             ", " + std::to_string(len(keep[1])) + " and " + std::to_string(len(keep[2])));
    }
    return rag::QueryTerms{data_of<std::int32_t>(keep[0]), data_of<double>(keep[1]), data_of<double>(keep[2]),
                           len(keep[0])};
}

// The token streams with titles and windows; keep[0..4] hold the checked arrays.
rag::LexicalStore lexical_store_of(const py::handle& tokens_obj, const py::handle& token_offsets_obj,
                                   const py::handle& title_lengths_obj, const py::handle& window_offsets_obj,
                                   const py::handle& window_spans_obj, py::array keep[5]) {
    keep[0] = checked_vector<std::int32_t>(tokens_obj, "tokens", "int32");
    keep[1] = checked_vector<std::int64_t>(token_offsets_obj, "token_offsets", "int64");
    keep[2] = checked_vector<std::int32_t>(title_lengths_obj, "title_lengths", "int32");
    keep[3] = checked_vector<std::int64_t>(window_offsets_obj, "window_offsets", "int64");
    keep[4] = checked_matrix(window_spans_obj, "window_spans", {py::detail::npy_api::NPY_INT32_}, "int32");
    if (keep[4].shape(1) != 2) fail("window_spans must have 2 columns (start, stop), got " +
                                    std::to_string(keep[4].shape(1)));
    rag::LexicalStore s;
    s.tokens = rag::TokenStore{data_of<std::int64_t>(keep[1]), chunks_of(keep[1], "token_offsets"),
                               data_of<std::int32_t>(keep[0]), len(keep[0])};
    if (len(keep[2]) != s.tokens.n_chunks) {
        fail("title_lengths must have one entry per chunk (" + std::to_string(s.tokens.n_chunks) + "), got " +
             std::to_string(len(keep[2])));
    }
    if (chunks_of(keep[3], "window_offsets") != s.tokens.n_chunks) {
        fail("window_offsets must have n_chunks + 1 = " + std::to_string(s.tokens.n_chunks + 1) +
             " entries (as token_offsets), got " + std::to_string(len(keep[3])));
    }
    s.title_lengths = data_of<std::int32_t>(keep[2]);
    s.window_offsets = data_of<std::int64_t>(keep[3]);
    s.window_spans = data_of<std::int32_t>(keep[4]);
    s.n_windows = static_cast<std::size_t>(keep[4].shape(0));
    return s;
}

rag::Bm25Params bm25_params(double k1, double b, double avgdl, double avg_title, double avg_window) {
    rag::Bm25Params p;
    p.k1 = k1;
    p.b = b;
    p.avgdl = avgdl;
    p.avg_title = avg_title;
    p.avg_window = avg_window;
    return p;
}

py::array_t<float> lexical_features(const py::handle& tokens, const py::handle& token_offsets,
                                    const py::handle& title_lengths, const py::handle& window_offsets,
                                    const py::handle& window_spans, const py::handle& candidates_obj,
                                    const py::handle& terms, const py::handle& counts, const py::handle& idf,
                                    double k1, double b, double avgdl, double avg_title, double avg_window) {
    py::array keep_store[5];
    py::array keep_query[3];
    const rag::LexicalStore store =
        lexical_store_of(tokens, token_offsets, title_lengths, window_offsets, window_spans, keep_store);
    const rag::QueryTerms query = query_terms_of(terms, counts, idf, keep_query);
    const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
    const rag::Bm25Params params = bm25_params(k1, b, avgdl, avg_title, avg_window);
    const std::size_t m = len(candidates);
    py::array_t<float> out({static_cast<py::ssize_t>(m), py::ssize_t{4}});
    float* result = out.mutable_data();
    {
        py::gil_scoped_release release;
        rag::lexical_features(store, query, data_of<std::int64_t>(candidates), m, params, result);
    }
    return out;
}

rag::IdList id_list(const py::array& ids) { return rag::IdList{data_of<std::int64_t>(ids), len(ids)}; }

rag::LinearModel linear_model(const py::handle& columns_obj, const py::handle& weights_obj, double bias,
                              py::array keep[2]) {
    keep[0] = checked_vector<std::int64_t>(columns_obj, "columns", "int64");
    keep[1] = checked_vector<float>(weights_obj, "weights", "float32");
    if (len(keep[0]) != len(keep[1])) {
        fail("columns and weights must have the same length, got " + std::to_string(len(keep[0])) + " and " +
             std::to_string(len(keep[1])));
    }
    return rag::LinearModel{data_of<std::int64_t>(keep[0]), data_of<float>(keep[1]), len(keep[0]), bias};
}

py::array_t<float> finish_features(const py::handle& local_obj, const py::handle& vectors_obj,
                                   const py::handle& query_obj, const py::handle& candidates_obj,
                                   const py::handle& fused_obj, const py::handle& bm25_obj,
                                   const py::handle& dense_obj, const std::string& simd) {
    const py::array local = checked_matrix(local_obj, "local_features", {kNpyFloat}, "float32");
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyFloat}, "float32");
    const py::array query = checked_vector<float>(query_obj, "query", "float32");
    const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
    const py::array fused = checked_vector<float>(fused_obj, "fused_scores", "float32");
    const py::array bm25 = checked_vector<std::int64_t>(bm25_obj, "bm25_ranked", "int64");
    const py::array dense = checked_vector<std::int64_t>(dense_obj, "dense_ranked", "int64");
    const std::size_t m = len(candidates);
    if (static_cast<std::size_t>(local.shape(0)) != m || local.shape(1) != static_cast<py::ssize_t>(rag::kLocalColumns)) {
        fail("local_features must be (" + std::to_string(m) + ", " + std::to_string(rag::kLocalColumns) +
             ") (a row per candidate), got (" + std::to_string(local.shape(0)) + ", " +
             std::to_string(local.shape(1)) + ")");
    }
    if (static_cast<std::size_t>(vectors.shape(0)) != m || static_cast<std::size_t>(vectors.shape(1)) != len(query)) {
        fail("vectors must be (" + std::to_string(m) + ", " + std::to_string(len(query)) +
             ") (a row per candidate, the query's dimension), got (" + std::to_string(vectors.shape(0)) + ", " +
             std::to_string(vectors.shape(1)) + ")");
    }
    if (len(fused) != m) {
        fail("fused_scores must have one entry per candidate (" + std::to_string(m) + "), got " +
             std::to_string(len(fused)));
    }
    const rag::simd::Level level = simd_arg(simd);
    rag::FinishInput in;
    in.local = data_of<float>(local);
    in.vectors = data_of<float>(vectors);
    in.n_rows = m;
    in.d = len(query);
    in.query = data_of<float>(query);
    in.candidates = data_of<std::int64_t>(candidates);
    in.fused = data_of<float>(fused);
    in.m = m;
    in.bm25_ranked = id_list(bm25);
    in.dense_ranked = id_list(dense);
    py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(rag::kFeatureColumns)});
    float* result = out.mutable_data();
    {
        py::gil_scoped_release release;
        rag::finish_features(in, level, result);
    }
    return out;
}

py::tuple rank(const py::handle& features_obj, const py::handle& columns, const py::handle& weights, double bias) {
    const py::array features = checked_matrix(features_obj, "features", {kNpyFloat}, "float32");
    if (features.shape(1) != static_cast<py::ssize_t>(rag::kFeatureColumns)) {
        fail("features must have " + std::to_string(rag::kFeatureColumns) + " columns, got " +
             std::to_string(features.shape(1)));
    }
    py::array keep[2];
    const rag::LinearModel model = linear_model(columns, weights, bias, keep);
    const auto m = static_cast<std::size_t>(features.shape(0));
    py::array_t<float> scores(static_cast<py::ssize_t>(m));
    py::array_t<std::int64_t> order(static_cast<py::ssize_t>(m));
    float* s = scores.mutable_data();
    std::int64_t* o = order.mutable_data();
    {
        py::gil_scoped_release release;
        rag::rank(data_of<float>(features), m, model, s, o);
    }
    return py::make_tuple(scores, order);
}

// What a loaded index gives the reranker, checked once: requests pass only the query and the candidates.
class Core {
public:
    Core(const py::handle& window_offsets, const py::handle& window_vectors, const py::handle& window_scales,
         const py::handle& window_spans, const py::handle& tokens, const py::handle& token_offsets,
         const py::handle& title_lengths, const py::handle& dense_vectors, double k1, double b, double avgdl,
         double avg_title, double avg_window, double temperature, const std::string& simd)
        : level_(simd_arg(simd)) {
        store_.lexical = lexical_store_of(tokens, token_offsets, title_lengths, window_offsets, window_spans, keep_);
        keep_[5] = checked_matrix(window_vectors, "window_vectors", {kNpyInt8, kNpyHalf, kNpyFloat},
                                  "int8, float16 or float32");
        rag::WindowStore& w = store_.windows;
        w.offsets = data_of<std::int64_t>(keep_[3]);
        w.n_chunks = store_.lexical.tokens.n_chunks;
        w.vectors = keep_[5].data();
        w.n_windows = static_cast<std::size_t>(keep_[5].shape(0));
        w.d = static_cast<std::size_t>(keep_[5].shape(1));
        if (w.n_windows != store_.lexical.n_windows) {
            fail("window_spans must have one row per window vector (" + std::to_string(w.n_windows) + "), got " +
                 std::to_string(store_.lexical.n_windows));
        }
        const int num = keep_[5].dtype().normalized_num();
        if (num == kNpyInt8) {
            w.type = rag::VectorType::kInt8;
            if (window_scales.is_none()) fail("window_scales is required (float32[n_windows]) when vectors are int8");
            keep_[6] = checked_vector<float>(window_scales, "window_scales", "float32");
            if (len(keep_[6]) != w.n_windows) {
                fail("window_scales must have one entry per window (" + std::to_string(w.n_windows) + "), got " +
                     std::to_string(len(keep_[6])));
            }
            w.scales = data_of<float>(keep_[6]);
        } else {
            w.type = num == kNpyHalf ? rag::VectorType::kFloat16 : rag::VectorType::kFloat32;
            if (!window_scales.is_none()) fail("window_scales must be None when window vectors are not int8");
        }
        keep_[7] = checked_matrix(dense_vectors, "dense_vectors", {kNpyFloat}, "float32");
        if (static_cast<std::size_t>(keep_[7].shape(1)) != w.d) {
            fail("dense_vectors must have " + std::to_string(w.d) + " columns (as window_vectors), got " +
                 std::to_string(keep_[7].shape(1)));
        }
        store_.bm25 = bm25_params(k1, b, avgdl, avg_title, avg_window);
        store_.temperature = temperature;
        if (!(temperature > 0.0) || !std::isfinite(temperature)) {
            fail("temperature must be finite and > 0, got " + std::to_string(temperature));
        }
        // Every chunk's offsets and spans once, here: a request then checks only its candidate ids (on the cold
        // caches after the encode, the per-candidate checks cost ~15 µs of the rerank).
        rag::check_lexical_store(store_.lexical);
        rag::check_window_store(store_.windows);
    }

    py::array_t<float> local_features(const py::handle& query_obj, const py::handle& terms, const py::handle& counts,
                                      const py::handle& idf, const py::handle& candidates_obj) const {
        py::array keep_query[3];
        const py::array query = query_of(query_obj);
        const rag::QueryTerms q = query_terms_of(terms, counts, idf, keep_query);
        const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
        const std::size_t m = len(candidates);
        py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(rag::kLocalColumns)});
        float* result = out.mutable_data();
        {
            py::gil_scoped_release release;
            rag::local_features(store_, data_of<float>(query), q, data_of<std::int64_t>(candidates), m, level_,
                                result);
        }
        return out;
    }

    py::tuple rerank(const py::handle& query_obj, const py::handle& terms, const py::handle& counts,
                     const py::handle& idf, const py::handle& candidates_obj, const py::handle& fused_obj,
                     const py::handle& bm25_obj, const py::handle& dense_obj, const py::handle& columns,
                     const py::handle& weights, double bias, bool helper) const {
        py::array keep_query[3];
        py::array keep_model[2];
        const py::array query = query_of(query_obj);
        const rag::QueryTerms q = query_terms_of(terms, counts, idf, keep_query);
        const py::array candidates = checked_vector<std::int64_t>(candidates_obj, "candidates", "int64");
        const py::array fused = checked_vector<float>(fused_obj, "fused_scores", "float32");
        const py::array bm25 = checked_vector<std::int64_t>(bm25_obj, "bm25_ranked", "int64");
        const py::array dense = checked_vector<std::int64_t>(dense_obj, "dense_ranked", "int64");
        const rag::LinearModel model = linear_model(columns, weights, bias, keep_model);
        const std::size_t m = len(candidates);
        if (len(fused) != m) {
            fail("fused_scores must have one entry per candidate (" + std::to_string(m) + "), got " +
                 std::to_string(len(fused)));
        }
        const auto rows = static_cast<py::ssize_t>(m);
        py::array_t<std::int64_t> ids(rows);
        py::array_t<float> scores(rows);
        py::array_t<float> features({rows, static_cast<py::ssize_t>(rag::kFeatureColumns)});
        py::array_t<std::int64_t> order(rows);
        const rag::RerankOutput out{ids.mutable_data(), scores.mutable_data(), features.mutable_data(),
                                    order.mutable_data()};
        {
            py::gil_scoped_release release;
            const rag::Roused roused(helper ? &helper_ : nullptr);
            rag::rerank(store_, data_of<float>(keep_[7]), static_cast<std::size_t>(keep_[7].shape(0)),
                        data_of<float>(query), q, data_of<std::int64_t>(candidates), data_of<float>(fused), m,
                        id_list(bm25), id_list(dense), model, level_, out, helper ? &helper_ : nullptr);
        }
        return py::make_tuple(ids, scores, features, order);
    }

    // For search_core, which reranks with what this object holds.
    const rag::LocalStore& store() const { return store_; }
    const py::array& dense_vectors() const { return keep_[7]; }
    // The worker that takes part of a lone search's scan and rerank (a thread started on first use, one per loaded
    // index).
    rag::Helper& helper() const { return helper_; }

    py::array query_of(const py::handle& obj, const char* name = "query") const {
        py::array query = checked_vector<float>(obj, name, "float32");
        if (len(query) != store_.windows.d) {
            fail(std::string(name) + " must have " + std::to_string(store_.windows.d) +
                 " entries (the vectors' dimension), got " + std::to_string(len(query)));
        }
        return query;
    }

private:

    // tokens, token_offsets, title_lengths, window_offsets, window_spans, window_vectors, window_scales, dense_vectors
    py::array keep_[8];
    rag::LocalStore store_;
    rag::simd::Level level_;
    mutable rag::Helper helper_;
};

py::tuple names(const char* const* columns, std::size_t n) {
    py::tuple out(n);
    for (std::size_t i = 0; i < n; ++i) out[i] = py::str(columns[i]);
    return out;
}

void bind(py::module_& m) {
    m.attr("RERANK_LOCAL_FEATURES") = names(rag::LOCAL_COLUMNS, rag::kLocalColumns);
    m.attr("RERANK_FEATURES") = names(rag::FEATURE_COLUMNS, rag::kFeatureColumns);
    m.def("lexical_features", &lexical_features, py::arg("tokens"), py::arg("token_offsets"),
          py::arg("title_lengths"), py::arg("window_offsets"), py::arg("window_spans"), py::arg("candidates"),
          py::arg("query_terms"), py::arg("query_counts"), py::arg("query_idf"), py::arg("k1"), py::arg("b"),
          py::arg("avgdl"), py::arg("avg_title"), py::arg("avg_window"),
          "lexical_features(tokens, token_offsets, title_lengths, window_offsets, window_spans, candidates,\n"
          "                 query_terms, query_counts, query_idf, k1, b, avgdl, avg_title, avg_window)\n"
          "    -> float32[m, 4]\n\n"
          "BM25 of each candidate's chunk, title and best window, and idf-weighted coverage. See\n"
          "rag_service.kernels.reference.lexical_features_reference.");
    m.def("finish_features", &finish_features, py::arg("local_features"), py::arg("vectors"), py::arg("query"),
          py::arg("candidates"), py::arg("fused_scores"), py::arg("bm25_ranked"), py::arg("dense_ranked"),
          py::arg("simd") = "",
          "finish_features(local_features, vectors, query, candidates, fused_scores, bm25_ranked, dense_ranked,\n"
          "                simd='') -> float32[m, len(RERANK_FEATURES)]\n\n"
          "See rag_service.kernels.reference.finish_features_reference.");
    m.def("rank_features", &rank, py::arg("features"), py::arg("columns"), py::arg("weights"), py::arg("bias"),
          "rank_features(features, columns, weights, bias) -> tuple[scores float32[m], order int64[m]]\n\n"
          "Linear scores of features[:, columns], sorted best first (ties in the given order). See\n"
          "rag_service.kernels.reference.rank_reference.");
    py::class_<Core>(m, "RerankCore",
                     "The rerank stage over one loaded index: its windows, token streams and dense vectors (held,\n"
                     "checked once). See rag_service.kernels.native.RerankCore.")
        .def(py::init<const py::handle&, const py::handle&, const py::handle&, const py::handle&, const py::handle&,
                      const py::handle&, const py::handle&, const py::handle&, double, double, double, double, double,
                      double, const std::string&>(),
             py::arg("window_offsets"), py::arg("window_vectors"), py::arg("window_scales"), py::arg("window_spans"),
             py::arg("tokens"), py::arg("token_offsets"), py::arg("title_lengths"), py::arg("dense_vectors"),
             py::arg("k1"), py::arg("b"), py::arg("avgdl"), py::arg("avg_title"), py::arg("avg_window"),
             py::arg("temperature") = 0.05, py::arg("simd") = "")
        .def("local_features", &Core::local_features, py::arg("query"), py::arg("query_terms"),
             py::arg("query_counts"), py::arg("query_idf"), py::arg("candidates"),
             "local_features(query, query_terms, query_counts, query_idf, candidates)\n"
             "    -> float32[m, len(RERANK_LOCAL_FEATURES)]")
        .def("place_helper",
             [](const Core& core, const py::iterable& cpus) {
                 std::vector<int> list;
                 for (const py::handle cpu : cpus) list.push_back(cpu.cast<int>());
                 core.helper().place(list);
             },
             py::arg("cpus"),
             "place_helper(cpus) -> None\n\n"
             "Holds the worker thread that takes part of a lone search's work (helper=True) to these CPUs from its\n"
             "next job on (Linux; empty: anywhere).")
        .def("rouse_helper", [](const Core& core) { core.helper().rouse(rag::kSearchSpinNs); },
             "rouse_helper() -> None\n\n"
             "Wakes the worker thread ahead of a lone search's search_core(helper=True), which lets it rest when it\n"
             "ends: its wake-up (~0.1 ms on a VM) then overlaps the work before the call. It spins 2 ms at most.")
        .def_property_readonly("helper_jobs", [](const Core& core) { return core.helper().jobs(); },
                               "Jobs the worker thread has taken part in (a diagnostic: how often work was shared).")
        .def("rerank", &Core::rerank, py::arg("query"), py::arg("query_terms"), py::arg("query_counts"),
             py::arg("query_idf"), py::arg("candidates"), py::arg("fused_scores"), py::arg("bm25_ranked"),
             py::arg("dense_ranked"), py::arg("columns"), py::arg("weights"), py::arg("bias"),
             py::arg("helper") = false,
             "rerank(query, query_terms, query_counts, query_idf, candidates, fused_scores, bm25_ranked,\n"
             "       dense_ranked, columns, weights, bias, helper=False)\n"
             "    -> tuple[ids int64[m], scores float32[m], features float32[m, 13], order int64[m]]\n\n"
             "local_features, finish_features and rank_features in one call, GIL released throughout; helper:\n"
             "part of the candidates' local features on this core's worker thread (the same result).");
}

}  // namespace rerank_core

// ---- first stage in one call: BM25 top-depth, flat dense top-depth, fusion ----

// The checked arrays are kept as plain objects: a default-constructed py::array allocates an empty array.
struct PostingsArgs {
    py::object indptr, docs, weights, blocks;
    rag::Postings postings;
};

// A BlockBounds as Python holds it: the bounds and the arrays they were made from.
struct BlockBoundsObject {
    py::object indptr, docs, weights;
    rag::BlockBounds bounds;
};

PostingsArgs postings_arg(const py::handle& indptr_obj, const py::handle& docs_obj, const py::handle& weights_obj,
                          std::int64_t n_docs, const py::handle& blocks_obj = py::none()) {
    const py::array indptr = checked_vector<std::int64_t>(indptr_obj, "indptr", "int64");
    const py::array docs = checked_vector<std::int32_t>(docs_obj, "docs", "int32");
    const py::array weights = checked_vector<float>(weights_obj, "weights", "float32");
    if (indptr.shape(0) < 1) fail("indptr must have at least one entry (vocabulary + 1)");
    if (docs.shape(0) != weights.shape(0)) {
        fail("docs and weights must have the same length, got " + std::to_string(docs.shape(0)) + " and " +
             std::to_string(weights.shape(0)));
    }
    if (n_docs < 0) fail("n_docs must be >= 0, got " + std::to_string(n_docs));
    PostingsArgs a;
    a.indptr = indptr;
    a.docs = docs;
    a.weights = weights;
    a.postings = rag::Postings{data_of<std::int64_t>(indptr), len(indptr) - 1, data_of<std::int32_t>(docs),
                               data_of<float>(weights), len(docs), static_cast<std::size_t>(n_docs)};
    if (!blocks_obj.is_none()) {
        if (!py::isinstance<BlockBoundsObject>(blocks_obj)) fail("blocks must be a BlockBounds or None");
        a.blocks = py::reinterpret_borrow<py::object>(blocks_obj);
        a.postings.blocks = &blocks_obj.cast<const BlockBoundsObject&>().bounds;
    }
    return a;
}

std::unique_ptr<BlockBoundsObject> make_block_bounds(const py::handle& indptr, const py::handle& docs,
                                                     const py::handle& weights, std::int64_t n_docs,
                                                     std::int64_t shift, std::int64_t min_postings) {
    PostingsArgs p = postings_arg(indptr, docs, weights, n_docs);
    auto out = std::make_unique<BlockBoundsObject>();
    out->indptr = p.indptr;
    out->docs = p.docs;
    out->weights = p.weights;
    {
        py::gil_scoped_release release;
        out->bounds = rag::block_bounds(p.postings, shift,
                                        min_postings < 0 ? rag::kRowsPerBlock : static_cast<std::size_t>(min_postings));
    }
    return out;
}

// A bool[n] mask as bytes, or nullptr for None.
const std::uint8_t* mask_arg(const py::handle& mask_obj, std::size_t n, py::object& keep) {
    if (mask_obj.is_none()) return nullptr;
    const py::array mask = checked_vector<bool>(mask_obj, "mask", "bool");
    if (len(mask) != n) {
        fail("mask must have one entry per chunk (" + std::to_string(n) + "), got " + std::to_string(len(mask)));
    }
    keep = mask;
    return data_of<std::uint8_t>(mask);
}

struct DenseArgs {
    py::object vectors, query, codes, scale, base, bits;
    const float* query_data = nullptr;
    rag::DenseRows rows;
};

// The scanned rows: vectors and, when given, their sq8 codes and sign bits (an index's, checked once per index by
// PreparedSearch). The query is dense_query's.
DenseArgs dense_rows(const py::handle& vectors_obj, const py::handle& codes_obj, const py::handle& scale_obj,
                     const py::handle& base_obj, const py::handle& bits_obj) {
    DenseArgs a;
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyFloat}, "float32");
    a.vectors = vectors;
    a.rows.vectors = data_of<float>(vectors);
    a.rows.n = static_cast<std::size_t>(vectors.shape(0));
    a.rows.d = static_cast<std::size_t>(vectors.shape(1));
    const bool any = !codes_obj.is_none() || !scale_obj.is_none() || !base_obj.is_none();
    if (!any) {
        if (!bits_obj.is_none()) fail("code_bits needs codes (the sign bits go with the sq8 codes)");
        return a;
    }
    if (codes_obj.is_none() || scale_obj.is_none() || base_obj.is_none()) {
        fail("codes, code_scale and code_base come together (all None or all arrays)");
    }
    const py::array codes = checked_matrix(codes_obj, "codes", {kNpyInt8}, "int8");
    if (static_cast<std::size_t>(codes.shape(0)) != a.rows.n || static_cast<std::size_t>(codes.shape(1)) != a.rows.d) {
        fail("codes must have the shape of vectors (" + std::to_string(a.rows.n) + ", " + std::to_string(a.rows.d) +
             "), got (" + std::to_string(codes.shape(0)) + ", " + std::to_string(codes.shape(1)) + ")");
    }
    const py::array scale = checked_vector<float>(scale_obj, "code_scale", "float32");
    const py::array base = checked_vector<float>(base_obj, "code_base", "float32");
    if (len(scale) != a.rows.d || len(base) != a.rows.d) {
        fail("code_scale and code_base must have " + std::to_string(a.rows.d) + " entries (the columns of vectors)");
    }
    a.codes = codes;
    a.scale = scale;
    a.base = base;
    a.rows.codes = data_of<std::int8_t>(codes);
    a.rows.scale = data_of<float>(scale);
    a.rows.base = data_of<float>(base);
    if (!bits_obj.is_none()) {
        const py::array bits = checked_matrix(bits_obj, "code_bits", {kNpyUint64}, "uint64");
        const std::size_t words = (a.rows.d + 63) / 64;
        if (static_cast<std::size_t>(bits.shape(0)) != a.rows.n || static_cast<std::size_t>(bits.shape(1)) != words) {
            fail("code_bits must have shape (" + std::to_string(a.rows.n) + ", " + std::to_string(words) +
                 ") (rows of vectors, ceil(d / 64) words), got (" + std::to_string(bits.shape(0)) + ", " +
                 std::to_string(bits.shape(1)) + ")");
        }
        a.bits = bits;
        a.rows.bits = data_of<std::uint64_t>(bits);
        a.rows.words = words;
    }
    return a;
}

// A request's query for the rows of `a` (float32, one entry per column).
void dense_query(DenseArgs& a, const py::handle& query_obj) {
    const py::array query = checked_vector<float>(query_obj, "query", "float32");
    if (len(query) != a.rows.d) {
        fail("query must have " + std::to_string(a.rows.d) + " entries (the columns of vectors), got " +
             std::to_string(len(query)));
    }
    a.query = query;
    a.query_data = data_of<float>(query);
}

DenseArgs dense_arg(const py::handle& vectors_obj, const py::handle& query_obj, const py::handle& codes_obj,
                    const py::handle& scale_obj, const py::handle& base_obj, const py::handle& bits_obj) {
    DenseArgs a = dense_rows(vectors_obj, codes_obj, scale_obj, base_obj, bits_obj);
    dense_query(a, query_obj);
    return a;
}

// Hands hits to NumPy without copying: both arrays share one base, a capsule that owns them.
py::tuple hits_to_numpy(rag::Hits&& hits) {
    auto owned = std::make_unique<rag::Hits>(std::move(hits));
    rag::Hits* h = owned.get();
    const py::capsule base(h, [](void* p) noexcept { delete static_cast<rag::Hits*>(p); });
    owned.release();
    const auto k = static_cast<py::ssize_t>(h->ids.size());
    return py::make_tuple(py::array_t<std::int64_t>(k, h->ids.data(), base),
                          py::array_t<float>(k, h->scores.data(), base));
}

py::tuple bm25_top(const py::handle& indptr, const py::handle& docs, const py::handle& weights, std::int64_t n_docs,
                   const py::handle& term_ids_obj, const py::handle& mask_obj, std::int64_t depth,
                   const py::handle& blocks) {
    const PostingsArgs p = postings_arg(indptr, docs, weights, n_docs, blocks);
    const py::array terms = checked_vector<std::int64_t>(term_ids_obj, "term_ids", "int64");
    py::object mask_keep;
    const std::uint8_t* mask = mask_arg(mask_obj, p.postings.n_docs, mask_keep);
    rag::Hits hits;
    {
        py::gil_scoped_release release;
        hits = rag::bm25_top(p.postings, data_of<std::int64_t>(terms), len(terms), mask, depth);
    }
    return hits_to_numpy(std::move(hits));
}

py::tuple dense_top(const py::handle& vectors, const py::handle& query, const py::handle& mask_obj,
                    std::int64_t depth, const py::handle& codes, const py::handle& code_scale,
                    const py::handle& code_base, std::int64_t oversample, const std::string& simd,
                    const py::handle& code_bits) {
    const DenseArgs a = dense_arg(vectors, query, codes, code_scale, code_base, code_bits);
    py::object mask_keep;
    const std::uint8_t* mask = mask_arg(mask_obj, a.rows.n, mask_keep);
    const rag::simd::Level level = simd_arg(simd);
    rag::Hits hits;
    {
        py::gil_scoped_release release;
        hits = rag::dense_top(a.rows, a.query_data, mask, depth, oversample, level);
    }
    return hits_to_numpy(std::move(hits));
}

py::tuple dense_above(const py::handle& vectors_obj, const py::handle& codes_obj, const py::handle& scale_obj,
                      const py::handle& slack_obj, const py::handle& norm_obj, const py::handle& query_obj,
                      const py::handle& mask_obj, double min_score, std::int64_t depth, const std::string& simd) {
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyFloat}, "float32");
    const py::array codes = checked_matrix(codes_obj, "codes", {kNpyInt8}, "int8");
    const py::array query = checked_vector<float>(query_obj, "query", "float32");
    rag::CodedRows rows;
    rows.vectors = data_of<float>(vectors);
    rows.n = static_cast<std::size_t>(vectors.shape(0));
    rows.d = static_cast<std::size_t>(vectors.shape(1));
    if (static_cast<std::size_t>(codes.shape(0)) != rows.n || static_cast<std::size_t>(codes.shape(1)) != rows.d) {
        fail("codes must have the shape of vectors (" + std::to_string(rows.n) + ", " + std::to_string(rows.d) +
             "), got (" + std::to_string(codes.shape(0)) + ", " + std::to_string(codes.shape(1)) + ")");
    }
    if (len(query) != rows.d) {
        fail("query must have " + std::to_string(rows.d) + " entries (the columns of vectors), got " +
             std::to_string(len(query)));
    }
    py::array per_row[3];
    const char* names[3] = {"code_scale", "code_slack", "code_norm"};
    const py::handle objs[3] = {scale_obj, slack_obj, norm_obj};
    for (int r = 0; r < 3; ++r) {
        per_row[r] = checked_vector<float>(objs[r], names[r], "float32");
        if (len(per_row[r]) != rows.n) {
            fail(std::string(names[r]) + " must have one entry per row of vectors (" + std::to_string(rows.n) +
                 "), got " + std::to_string(len(per_row[r])));
        }
    }
    rows.codes = data_of<std::int8_t>(codes);
    rows.scale = data_of<float>(per_row[0]);
    rows.slack = data_of<float>(per_row[1]);
    rows.norm = data_of<float>(per_row[2]);
    py::object mask_keep;
    const std::uint8_t* mask = mask_arg(mask_obj, rows.n, mask_keep);
    const rag::simd::Level level = simd_arg(simd);
    rag::Hits hits;
    {
        py::gil_scoped_release release;
        hits = rag::dense_above(rows, data_of<float>(query), mask, min_score, depth, level);
    }
    return hits_to_numpy(std::move(hits));
}

// Writes into the caller's arrays (rows of a growing matrix's columns), so a cache entry's row costs no allocation.
void row_quantize(const py::handle& vectors_obj, const py::handle& codes_obj, const py::handle& scale_obj,
                  const py::handle& slack_obj, const py::handle& norm_obj) {
    const py::array vectors = checked_matrix(vectors_obj, "vectors", {kNpyFloat}, "float32");
    py::array codes = checked_matrix(codes_obj, "codes", {kNpyInt8}, "int8");
    const auto n = static_cast<std::size_t>(vectors.shape(0));
    const auto d = static_cast<std::size_t>(vectors.shape(1));
    if (static_cast<std::size_t>(codes.shape(0)) != n || static_cast<std::size_t>(codes.shape(1)) != d) {
        fail("codes must have the shape of vectors (" + std::to_string(n) + ", " + std::to_string(d) + "), got (" +
             std::to_string(codes.shape(0)) + ", " + std::to_string(codes.shape(1)) + ")");
    }
    py::array per_row[3];
    const char* names[3] = {"scale", "slack", "norm"};
    const py::handle objs[3] = {scale_obj, slack_obj, norm_obj};
    for (int r = 0; r < 3; ++r) {
        per_row[r] = checked_vector<float>(objs[r], names[r], "float32");
        if (len(per_row[r]) != n) {
            fail(std::string(names[r]) + " must have one entry per row of vectors (" + std::to_string(n) + "), got " +
                 std::to_string(len(per_row[r])));
        }
    }
    const py::array* const outputs[4] = {&codes, &per_row[0], &per_row[1], &per_row[2]};
    const char* output_names[4] = {"codes", "scale", "slack", "norm"};
    for (int r = 0; r < 4; ++r) {
        if (!outputs[r]->writeable()) fail(std::string(output_names[r]) + " must be writeable");
    }
    py::gil_scoped_release release;
    rag::row_quantize(data_of<float>(vectors), n, d, static_cast<std::int8_t*>(codes.mutable_data()),
                      static_cast<float*>(per_row[0].mutable_data()), static_cast<float*>(per_row[1].mutable_data()),
                      static_cast<float*>(per_row[2].mutable_data()));
}

// retrieve()'s arguments, checked; the arrays are kept alive by the struct.
struct FirstStageArgs {
    PostingsArgs p;
    py::object terms, mask;
    const std::uint8_t* mask_data = nullptr;
    DenseArgs dense;
    py::object given[2];  // the dense list passed in (or empty) when there is no scan
    bool scan = false;
    py::array bm25_keep[2];  // the BM25 list passed in, when it was ranked beforehand
    rag::RankedList bm25_list;
    const rag::RankedList* bm25_given = nullptr;
    rag::DenseSource source;
    rag::FusionParams fusion;
    rag::simd::Level level = rag::simd::Level::kScalar;
};

// The index's part of the first stage's arguments: the postings and, for a scan (vectors given), the rows.
void first_stage_index(FirstStageArgs& a, const py::handle& indptr, const py::handle& docs, const py::handle& weights,
                       std::int64_t n_docs, const py::handle& vectors, const py::handle& codes,
                       const py::handle& code_scale, const py::handle& code_base, const py::handle& code_bits,
                       std::int64_t oversample, const py::handle& blocks) {
    a.p = postings_arg(indptr, docs, weights, n_docs, blocks);
    a.scan = !vectors.is_none();
    if (a.scan) {
        a.dense = dense_rows(vectors, codes, code_scale, code_base, code_bits);
        if (a.dense.rows.n != a.p.postings.n_docs) {
            fail("vectors must have one row per chunk (n_docs = " + std::to_string(n_docs) + "), got " +
                 std::to_string(a.dense.rows.n));
        }
        a.source.oversample = oversample;
    } else if (!code_bits.is_none()) {
        fail("code_bits needs vectors to scan");
    }
}

// The request's part, on an `a` that first_stage_index filled; in place: source.rows points into a.dense.
void first_stage_request(FirstStageArgs& a, const py::handle& term_ids_obj, const py::handle& mask_obj,
                         const py::handle& query, const py::handle& dense_ids, const py::handle& dense_scores,
                         const std::string& method, double dense_weight, std::int64_t top_k, double rrf_k,
                         rag::simd::Level level, const py::handle& bm25_ids, const py::handle& bm25_scores) {
    if (bm25_ids.is_none() != bm25_scores.is_none()) {
        fail("bm25_ids and bm25_scores come together (both None or both arrays)");
    }
    if (!bm25_ids.is_none()) {
        a.bm25_list = ranked_list(bm25_ids, bm25_scores, "bm25_ids", "bm25_scores", a.bm25_keep[0], a.bm25_keep[1]);
        a.bm25_given = &a.bm25_list;
    }
    a.terms = checked_vector<std::int64_t>(term_ids_obj, "term_ids", "int64");
    a.mask_data = mask_arg(mask_obj, a.p.postings.n_docs, a.mask);
    if (a.scan != !query.is_none()) fail("vectors and query come together (both None or both arrays)");
    if (a.scan) {
        if (!dense_ids.is_none() || !dense_scores.is_none()) {
            fail("dense_ids and dense_scores must be None when vectors are scanned");
        }
        dense_query(a.dense, query);
        a.source.rows = &a.dense.rows;
        a.source.query = a.dense.query_data;
    } else {
        if (dense_ids.is_none() != dense_scores.is_none()) {
            fail("dense_ids and dense_scores come together (both None or both arrays)");
        }
        if (!dense_ids.is_none()) {
            py::array ids_keep, scores_keep;
            a.source.precomputed = ranked_list(dense_ids, dense_scores, "dense_ids", "dense_scores", ids_keep,
                                               scores_keep);
            a.given[0] = ids_keep;
            a.given[1] = scores_keep;
        } else {
            a.given[0] = py::array_t<std::int64_t>(0);
            a.given[1] = py::array_t<float>(0);
        }
    }
    a.fusion = rag::FusionParams{rag::parse_fusion_method(method), dense_weight, top_k, rrf_k};
    a.level = level;
}

// The first stage's nine outputs (retrieve()'s tuple, times last) as arrays over r, owned by base.
py::tuple first_stage_tuple(const FirstStageArgs& a, rag::RetrieveResult* r, const py::capsule& base,
                            py::tuple times) {
    auto ids = [&base](std::vector<std::int64_t>& v) {
        return py::array_t<std::int64_t>(static_cast<py::ssize_t>(v.size()), v.data(), base);
    };
    auto floats = [&base](std::vector<float>& v) {
        return py::array_t<float>(static_cast<py::ssize_t>(v.size()), v.data(), base);
    };
    const py::object d_ids = a.scan ? py::object(ids(r->dense.ids)) : a.given[0];
    const py::object d_scores = a.scan ? py::object(floats(r->dense.scores)) : a.given[1];
    return py::make_tuple(ids(r->bm25.ids), floats(r->bm25.scores), d_ids, d_scores, ids(r->fused.ids),
                          floats(r->fused.fused), floats(r->fused.bm25), floats(r->fused.dense), times);
}

py::tuple retrieve(const py::handle& indptr, const py::handle& docs, const py::handle& weights, std::int64_t n_docs,
                   const py::handle& term_ids_obj, const py::handle& mask_obj, std::int64_t depth,
                   const py::handle& vectors, const py::handle& query, const py::handle& codes,
                   const py::handle& code_scale, const py::handle& code_base, std::int64_t oversample,
                   const py::handle& dense_ids, const py::handle& dense_scores, const std::string& method,
                   double dense_weight, std::int64_t top_k, double rrf_k, const std::string& simd,
                   const py::handle& bm25_ids, const py::handle& bm25_scores, const py::handle& code_bits,
                   const py::handle& blocks) {
    FirstStageArgs a;
    first_stage_index(a, indptr, docs, weights, n_docs, vectors, codes, code_scale, code_base, code_bits, oversample,
                      blocks);
    first_stage_request(a, term_ids_obj, mask_obj, query, dense_ids, dense_scores, method, dense_weight, top_k, rrf_k,
                        simd_arg(simd), bm25_ids, bm25_scores);
    auto owned = std::make_unique<rag::RetrieveResult>();
    {
        py::gil_scoped_release release;
        *owned = rag::retrieve(a.p.postings, data_of<std::int64_t>(a.terms), len(a.terms), a.mask_data, depth,
                               a.source, a.fusion, a.level, a.bm25_given);
    }
    rag::RetrieveResult* r = owned.get();
    const py::capsule base(r, [](void* q) noexcept { delete static_cast<rag::RetrieveResult*>(q); });
    owned.release();  // the capsule owns it now
    return first_stage_tuple(a, r, base,
                             py::make_tuple(r->times.bm25_ns, r->times.dense_ns, r->times.fusion_ns));
}

// ---- one request's ranking in one call: first stage, confidence rule, rerank (native/src/search_core.hpp) ----

// search_core's per-index arguments: the first stage's (first_stage_index), the rerank core, the linear model and
// the idf table. Checked once by a PreparedSearch, per call by search_core.
struct SearchIndexArgs {
    FirstStageArgs first;
    py::object core_keep;
    const rerank_core::Core* core = nullptr;
    py::array model_keep[2];
    rag::LinearModel model;
    py::array idf_table;  // float64 idf by term id, when has_idf
    bool has_idf = false;
    rag::simd::Level level = rag::simd::Level::kScalar;
};

void search_index_args(SearchIndexArgs& s, const py::handle& core_obj, const py::handle& indptr,
                       const py::handle& docs, const py::handle& weights, std::int64_t n_docs,
                       const py::handle& vectors, const py::handle& codes, const py::handle& code_scale,
                       const py::handle& code_base, const py::handle& code_bits, std::int64_t oversample,
                       const py::handle& columns, const py::handle& model_weights, double bias,
                       const py::handle& idf_table, const py::handle& blocks, const std::string& simd) {
    if (!py::isinstance<rerank_core::Core>(core_obj)) fail("core must be a RerankCore");
    s.core_keep = py::reinterpret_borrow<py::object>(core_obj);
    s.core = &core_obj.cast<const rerank_core::Core&>();
    first_stage_index(s.first, indptr, docs, weights, n_docs, vectors, codes, code_scale, code_base, code_bits,
                      oversample, blocks);
    if (s.core->store().lexical.tokens.n_chunks != s.first.p.postings.n_docs) {
        fail("core must hold one token stream per chunk (n_docs = " + std::to_string(n_docs) + "), got " +
             std::to_string(s.core->store().lexical.tokens.n_chunks));
    }
    if (static_cast<std::size_t>(s.core->dense_vectors().shape(0)) != s.first.p.postings.n_docs) {
        fail("core's dense_vectors must have one row per chunk (n_docs = " + std::to_string(n_docs) + "), got " +
             std::to_string(s.core->dense_vectors().shape(0)));
    }
    s.model = rerank_core::linear_model(columns, model_weights, bias, s.model_keep);
    s.has_idf = !idf_table.is_none();
    if (s.has_idf) s.idf_table = checked_vector<double>(idf_table, "idf_table", "float64");
    s.level = simd_arg(simd);
}

// One request's search_core over the index arguments `s` (`query`: the scan's, None without a scan).
py::tuple search_with(const SearchIndexArgs& s, const py::handle& term_ids_obj, const py::handle& mask_obj,
                      std::int64_t depth, const py::handle& query, const py::handle& dense_ids,
                      const py::handle& dense_scores, const std::string& method, double dense_weight,
                      std::int64_t top_k, double rrf_k, const py::handle& rerank_query_obj,
                      const py::handle& query_terms, const py::handle& query_counts, const py::handle& query_idf,
                      std::int64_t rerank_depth, bool confidence, std::int64_t agree_top, std::int64_t agree_min,
                      const py::handle& bm25_ids, const py::handle& bm25_scores, bool helper) {
    FirstStageArgs a = s.first;
    first_stage_request(a, term_ids_obj, mask_obj, query, dense_ids, dense_scores, method, dense_weight, top_k, rrf_k,
                        s.level, bm25_ids, bm25_scores);
    if (rerank_depth < 0) fail("rerank_depth must be >= 0, got " + std::to_string(rerank_depth));
    if (confidence && agree_top < 0) fail("agree_top must be >= 0, got " + std::to_string(agree_top));
    const rerank_core::Core& core = *s.core;
    py::array keep_query[3];
    const py::array rerank_query = core.query_of(rerank_query_obj, "rerank_query");
    rag::RerankInput rerank;
    rerank.store = &core.store();
    rerank.dense_vectors = data_of<float>(core.dense_vectors());
    rerank.n_dense = static_cast<std::size_t>(core.dense_vectors().shape(0));
    rerank.query = data_of<float>(rerank_query);
    // Without query_terms, the rerank's terms are derived from BM25's input here (distinct ids, counts, idf from
    // the table), which costs the request no NumPy calls of its own.
    std::vector<std::int32_t> own_terms;
    std::vector<double> own_counts, own_idf;
    if (query_terms.is_none()) {
        if (!s.has_idf) fail("search_core needs query_terms, query_counts and query_idf, or idf_table");
        rerank.terms = rag::distinct_query_terms(data_of<std::int64_t>(a.terms), len(a.terms),
                                                 data_of<double>(s.idf_table), len(s.idf_table), own_terms,
                                                 own_counts, own_idf);
    } else {
        rerank.terms = rerank_core::query_terms_of(query_terms, query_counts, query_idf, keep_query);
    }
    rerank.model = s.model;
    rerank.depth = rerank_depth;
    rerank.helper = helper ? &core.helper() : nullptr;
    a.source.helper = rerank.helper;
    const rag::Confidence rule{confidence, agree_top, agree_min};
    auto owned = std::make_unique<rag::SearchCoreResult>();
    {
        py::gil_scoped_release release;
        *owned = rag::search_core(a.p.postings, data_of<std::int64_t>(a.terms), len(a.terms), a.mask_data, depth,
                                  a.source, a.fusion, rule, rerank, a.level, a.bm25_given);
    }
    rag::SearchCoreResult* r = owned.get();
    const py::capsule base(r, [](void* q) noexcept { delete static_cast<rag::SearchCoreResult*>(q); });
    owned.release();  // the capsule owns it now
    const rag::RetrieveTimes& t = r->first.times;
    const py::tuple first =
        first_stage_tuple(a, &r->first, base, py::make_tuple(t.bm25_ns, t.dense_ns, t.fusion_ns, r->rerank_ns));
    const auto m = static_cast<py::ssize_t>(r->ids.size());
    return py::make_tuple(first, r->confident, r->agreement, py::array_t<std::int64_t>(m, r->ids.data(), base),
                          py::array_t<float>(m, r->scores.data(), base),
                          py::array_t<float>({m, static_cast<py::ssize_t>(rag::kFeatureColumns)}, r->features.data(),
                                             base),
                          py::array_t<std::int64_t>(m, r->order.data(), base));
}

py::tuple search_core(const py::handle& core, const py::handle& indptr, const py::handle& docs,
                      const py::handle& weights, std::int64_t n_docs, const py::handle& term_ids_obj,
                      const py::handle& mask_obj, std::int64_t depth, const py::handle& vectors,
                      const py::handle& query, const py::handle& codes, const py::handle& code_scale,
                      const py::handle& code_base, std::int64_t oversample, const py::handle& dense_ids,
                      const py::handle& dense_scores, const std::string& method, double dense_weight,
                      std::int64_t top_k, double rrf_k, const py::handle& rerank_query_obj,
                      const py::handle& query_terms, const py::handle& query_counts, const py::handle& query_idf,
                      const py::handle& columns, const py::handle& model_weights, double bias,
                      std::int64_t rerank_depth, bool confidence, std::int64_t agree_top, std::int64_t agree_min,
                      const std::string& simd, const py::handle& idf_table, const py::handle& bm25_ids,
                      const py::handle& bm25_scores, const py::handle& code_bits, bool helper,
                      const py::handle& blocks) {
    SearchIndexArgs s;
    // The idf table is the rerank's only where query_terms are not given (checked where it is read).
    search_index_args(s, core, indptr, docs, weights, n_docs, vectors, codes, code_scale, code_base, code_bits,
                      oversample, columns, model_weights, bias, query_terms.is_none() ? idf_table : py::handle(Py_None),
                      blocks, simd);
    return search_with(s, term_ids_obj, mask_obj, depth, query, dense_ids, dense_scores, method, dense_weight, top_k,
                       rrf_k, rerank_query_obj, query_terms, query_counts, query_idf, rerank_depth, confidence,
                       agree_top, agree_min, bm25_ids, bm25_scores, helper);
}

// search_core with an index's arguments checked once, at load (kernels.native.SearchCall): a request passes only
// its own, which spares it a dozen array checks on caches that its encode has just flushed.
class PreparedSearch {
public:
    PreparedSearch(const py::handle& core, const py::handle& indptr, const py::handle& docs,
                   const py::handle& weights, std::int64_t n_docs, const py::handle& vectors, const py::handle& codes,
                   const py::handle& code_scale, const py::handle& code_base, const py::handle& code_bits,
                   std::int64_t oversample, const py::handle& columns, const py::handle& model_weights, double bias,
                   const py::handle& idf_table, const py::handle& blocks) {
        search_index_args(args_, core, indptr, docs, weights, n_docs, vectors, codes, code_scale, code_base,
                          code_bits, oversample, columns, model_weights, bias, idf_table, blocks, "");
    }

    // `query`: the scan's (when the index is scanned) and the rerank's.
    py::tuple call(const py::handle& term_ids, const py::handle& query, const py::handle& mask, std::int64_t depth,
                   const py::handle& dense_ids, const py::handle& dense_scores, const std::string& method,
                   double dense_weight, std::int64_t top_k, double rrf_k, const py::handle& query_terms,
                   const py::handle& query_counts, const py::handle& query_idf, std::int64_t rerank_depth,
                   bool confidence, std::int64_t agree_top, std::int64_t agree_min, const py::handle& bm25_ids,
                   const py::handle& bm25_scores, bool helper) const {
        return search_with(args_, term_ids, mask, depth, args_.first.scan ? query : py::handle(Py_None), dense_ids,
                           dense_scores, method, dense_weight, top_k, rrf_k, query, query_terms, query_counts,
                           query_idf, rerank_depth, confidence, agree_top, agree_min, bm25_ids, bm25_scores, helper);
    }

private:
    SearchIndexArgs args_;
};

py::list simd_levels() {
    py::list levels;
    for (const auto level : {rag::simd::Level::kScalar, rag::simd::Level::kAvx2, rag::simd::Level::kAvx512}) {
        if (rag::simd::supported(level)) levels.append(rag::simd::name(level));
    }
    return levels;
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

// ---- a plain reply's contexts as wire bytes (rag_service/api/reply.py, _contexts) ----

void put_varint(std::string& out, std::uint64_t n) {
    while (n >= 0x80) {
        out.push_back(static_cast<char>((n & 0x7F) | 0x80));
        n >>= 7;
    }
    out.push_back(static_cast<char>(n));
}

std::size_t varint_size(std::uint64_t n) {
    std::size_t size = 1;
    for (; n >= 0x80; n >>= 7) ++size;
    return size;
}

// float32 as protobuf's float field stores it: rounded to nearest; a finite double beyond float's range becomes
// the infinity of its sign, as struct.pack's overflow handling in reply.py makes it.
float as_float32(double x) {
    constexpr double kOverflow = 3.4028235677973366e38;  // FLT_MAX plus half its last unit: rounds up to infinity
    constexpr float kInfinity = std::numeric_limits<float>::infinity();
    if (std::isfinite(x) && std::fabs(x) >= kOverflow) return x > 0 ? kInfinity : -kInfinity;
    return static_cast<float>(x);
}

template <class T>
std::vector<T> list_of(const py::sequence& items) {
    std::vector<T> out;
    out.reserve(py::len(items));
    for (const py::handle item : items) out.push_back(item.cast<T>());
    return out;
}

py::bytes join_contexts(const py::bytes& blob, const py::buffer& offsets, const py::sequence& chunk_list,
                        const py::sequence& score_list, const py::sequence& token_list, const py::bytes& context_bytes,
                        const py::bytes& score_bytes, const py::bytes& tokens_bytes) {
    const auto chunks = list_of<std::int64_t>(chunk_list);
    const auto scores = list_of<double>(score_list);
    const auto tokens = list_of<std::int64_t>(token_list);
    const std::string context_tag(context_bytes);
    const std::string score_tag(score_bytes);
    const std::string tokens_tag(tokens_bytes);
    const py::buffer_info at = offsets.request();
    if (at.ndim != 1 || at.itemsize != 8 || (at.format != "q" && at.format != "l")) {
        fail("offsets must be a one-dimensional int64 buffer (array('q'))");
    }
    const auto* off = static_cast<const std::int64_t*>(at.ptr);
    const auto n_chunks = static_cast<std::int64_t>(at.shape[0]) - 1;
    char* base = nullptr;
    Py_ssize_t blob_size = 0;
    if (PyBytes_AsStringAndSize(blob.ptr(), &base, &blob_size) != 0) throw py::error_already_set();
    if (scores.size() != chunks.size() || tokens.size() != chunks.size()) {
        fail("chunks, scores and tokens must have one entry per context (" + std::to_string(chunks.size()) + ", " +
             std::to_string(scores.size()) + ", " + std::to_string(tokens.size()) + ")");
    }
    if (score_tag.size() != 1) fail("score_tag must be one byte (a field number below 16)");
    // Each context's body (static bytes, score, token count) is sized once: the total reserves the output, the
    // sizes prefix the bodies.
    std::vector<std::size_t> bodies(chunks.size());
    std::size_t total = 0;
    for (std::size_t i = 0; i < chunks.size(); ++i) {
        const std::int64_t c = chunks[i];
        if (c < 0 || c >= n_chunks) {
            fail("chunks[" + std::to_string(i) + "] = " + std::to_string(c) + " is outside [0, " +
                 std::to_string(n_chunks) + ")");
        }
        if (off[c] < 0 || off[c + 1] < off[c] || off[c + 1] > blob_size) {
            fail("offsets of chunk " + std::to_string(c) + " are not a range of the " + std::to_string(blob_size) +
                 " bytes");
        }
        if (tokens[i] < 0) fail("tokens[" + std::to_string(i) + "] is negative");
        bodies[i] = static_cast<std::size_t>(off[c + 1] - off[c]) + 5 +
                    (tokens[i] != 0 ? tokens_tag.size() + varint_size(static_cast<std::uint64_t>(tokens[i])) : 0);
        total += context_tag.size() + varint_size(bodies[i]) + bodies[i];
    }
    std::string out;
    out.reserve(total);
    for (std::size_t i = 0; i < chunks.size(); ++i) {
        const std::int64_t c = chunks[i];
        const auto static_size = static_cast<std::size_t>(off[c + 1] - off[c]);
        const auto count = static_cast<std::uint64_t>(tokens[i]);
        out += context_tag;
        put_varint(out, bodies[i]);
        out.append(base + off[c], static_size);
        out += score_tag;
        const float score = as_float32(scores[i]);
        char little[4];
        std::memcpy(little, &score, 4);  // x86-64 and AArch64: little-endian, as the wire wants
        out.append(little, 4);
        if (count != 0) {
            out += tokens_tag;
            put_varint(out, count);
        }
    }
    return py::bytes(out);
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

// A new int64 array holding `values` (a short result: a copy costs less than handing the vector over).
py::object int64_array(const std::vector<std::int64_t>& values) {
    py::array_t<std::int64_t> out(static_cast<py::ssize_t>(values.size()));
    if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(std::int64_t));
    return std::move(out);
}

}  // namespace

// ---- an ASCII query's BM25 term ids in one call (rag_service.retrievers.lexical.BM25Index.query_term_ids) ----

// word -> term id (-1: a stop word or a term the index lacks), for the words of ASCII queries: those the index's
// build saw in its corpus (seeded at load, kept for good) and those of queries seen since (learned, cleared at the
// caller's limit). For an ASCII string Python's `text.lower()` and `\w+` are ASCII's lower case and runs of
// [a-z0-9_], so this split gives the words the analyser's does; a query with another character, or with a word not
// held, is answered None and goes the Python way, which adds what it learns.
class WordIds {
public:
    // The ids >= 0 of `text`'s words in order (int64), or None.
    py::object lookup(const py::str& text) const {
        PyObject* obj = text.ptr();
        if (!PyUnicode_IS_ASCII(obj)) return py::none();
        const auto* data = static_cast<const char*>(PyUnicode_DATA(obj));
        const auto n = static_cast<std::size_t>(PyUnicode_GET_LENGTH(obj));
        std::vector<std::int64_t> ids;
        std::string word;
        {
            const std::lock_guard<std::mutex> hold(lock_);
            for (std::size_t i = 0; i <= n; ++i) {
                const char c = i < n ? data[i] : ' ';
                if (is_word(c)) {
                    word.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c);
                    continue;
                }
                if (word.empty()) continue;
                auto found = seeded_.find(word);
                if (found == seeded_.end()) {
                    found = learned_.find(word);
                    if (found == learned_.end()) return py::none();
                }
                if (found->second >= 0) ids.push_back(found->second);
                word.clear();
            }
        }
        return int64_array(ids);
    }

    // Learns words[i] -> ids[i] for the ASCII words among them (as the analyser split and lower-cased them).
    void add(const py::sequence& words, const py::sequence& ids) { put(learned_, words, ids); }

    // Holds words[i] -> ids[i] for the ASCII words among them for good: `clear` keeps them.
    void seed(const py::sequence& words, const py::sequence& ids) { put(seeded_, words, ids); }

    // Forgets the learned words.
    void clear() {
        const std::lock_guard<std::mutex> hold(lock_);
        learned_.clear();
    }

    // How many words were learned (the seeded ones not counted: `seeded`).
    std::size_t size() const {
        const std::lock_guard<std::mutex> hold(lock_);
        return learned_.size();
    }

    std::size_t seeded() const {
        const std::lock_guard<std::mutex> hold(lock_);
        return seeded_.size();
    }

private:
    using Map = std::unordered_map<std::string, std::int64_t>;

    static bool is_word(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
    }

    void put(Map& into, const py::sequence& words, const py::sequence& ids) {
        const std::size_t n = py::len(words);
        if (n != py::len(ids)) {
            fail("words and ids must have the same length, got " + std::to_string(n) + " and " +
                 std::to_string(py::len(ids)));
        }
        const std::lock_guard<std::mutex> hold(lock_);
        for (std::size_t i = 0; i < n; ++i) {
            const py::handle w = words[i];
            if (!PyUnicode_Check(w.ptr())) fail("words[" + std::to_string(i) + "] must be a str");
            if (!PyUnicode_IS_ASCII(w.ptr())) continue;
            into[w.cast<std::string>()] = ids[i].cast<std::int64_t>();
        }
    }

    mutable std::mutex lock_;
    Map seeded_;
    Map learned_;
};

// ---- the query encoder's token ids for ASCII text (rag_service.encoder.encode.OnnxEncoder) ----

// rag::WordPiece behind Python: `encode` answers a str's ids as an int64 array, or None for text the Hugging Face
// tokenizer must take (non-ASCII first of all, told without a copy).
class PyWordPiece {
public:
    PyWordPiece(const py::sequence& vocab, std::int64_t unk_id, std::int64_t cls_id, std::int64_t sep_id,
                std::size_t max_chars, std::size_t max_tokens, const py::sequence& added)
        : core_(strings(vocab, "vocab"), unk_id, cls_id, sep_id, max_chars, max_tokens, strings(added, "added")) {}

    py::object encode(const py::str& text) const {
        PyObject* obj = text.ptr();
        if (!PyUnicode_IS_ASCII(obj)) return py::none();
        const std::string_view view(static_cast<const char*>(PyUnicode_DATA(obj)),
                                    static_cast<std::size_t>(PyUnicode_GET_LENGTH(obj)));
        std::vector<std::int64_t> ids;
        if (!core_.encode(view, ids)) return py::none();
        return int64_array(ids);
    }

    std::size_t size() const { return core_.size(); }

private:
    static std::vector<std::string> strings(const py::sequence& items, const char* name) {
        std::vector<std::string> out;
        out.reserve(py::len(items));
        for (std::size_t i = 0; i < py::len(items); ++i) {
            const py::handle item = items[i];
            if (!PyUnicode_Check(item.ptr())) fail(std::string(name) + "[" + std::to_string(i) + "] must be a str");
            out.push_back(item.cast<std::string>());
        }
        return out;
    }

    rag::WordPiece core_;
};

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

    m.def("simd_level", [] { return std::string(rag::simd::name(rag::simd::best_level())); },
          "simd_level() -> str\n\nThe widest SIMD level the kernels use on this CPU: 'avx512', 'avx2' or 'scalar'.");
    m.def("join_contexts", &join_contexts, py::arg("blob"), py::arg("offsets"), py::arg("chunks"), py::arg("scores"),
          py::arg("tokens"), py::arg("context_tag"), py::arg("score_tag"), py::arg("tokens_tag"),
          "join_contexts(blob, offsets, chunks, scores, tokens, context_tag, score_tag, tokens_tag) -> bytes\n\n"
          "A plain reply's contexts as wire bytes: per context, context_tag, the length, the chunk's prepared static\n"
          "bytes blob[offsets[c]:offsets[c + 1]], score_tag and its score as float32, and tokens_tag with its token\n"
          "count when nonzero. rag_service.api.reply._contexts is the reference.");
    m.def("sign_bits_pay", [] { return rag::simd::bits_pay(rag::simd::best_level()); },
          "sign_bits_pay() -> bool\n\nWhether a dense scan gains from reading sign bits before the sq8 codes on this CPU\n"
          "(AVX-512 with VNNI).");
    m.def("simd_levels", &simd_levels,
          "simd_levels() -> list[str]\n\nEvery SIMD level this CPU can run (for forcing one with simd=..., in tests).");

    m.def("window_maxsim", &window_maxsim, py::arg("query"), py::arg("offsets"), py::arg("vectors"),
          py::arg("scales"), py::arg("candidates"), py::arg("temperature") = 0.05, py::arg("cuda") = false,
          py::arg("simd") = "",
          "window_maxsim(query, offsets, vectors, scales, candidates, temperature=0.05, cuda=False, simd='')\n"
          "    -> float32[m, 3]\n\n"
          "Per candidate chunk: max, top-2 mean and soft max of the query's dot products with the chunk's window\n"
          "vectors (CSR: offsets int64[n_chunks + 1]; vectors int8 with scales float32[n_windows], or float16 /\n"
          "float32 with scales=None); NaN row for a chunk without windows. simd forces 'scalar', 'avx2' or\n"
          "'avx512' ('' = best); cuda=True runs the CUDA twin. See rag_service.reference.window_maxsim_reference.");
    m.def("proximity", &proximity, py::arg("query_terms"), py::arg("token_offsets"), py::arg("tokens"),
          py::arg("candidates"),
          "proximity(query_terms, token_offsets, tokens, candidates) -> tuple[span int32[m], matched int32[m]]\n\n"
          "See rag_service.reference.proximity_reference.");
    m.def("linear_scores", &linear_scores, py::arg("features"), py::arg("weights"), py::arg("bias"),
          "linear_scores(features, weights, bias) -> float32[m]\n\n"
          "See rag_service.reference.linear_scores_reference.");
    m.def("similarity_matrix", &similarity_matrix, py::arg("vectors"), py::arg("cuda") = false,
          py::arg("simd") = "",
          "similarity_matrix(vectors, cuda=False, simd='') -> float32[m, m]\n\n"
          "See rag_service.reference.similarity_matrix_reference.");
    m.def("mmr_select", &mmr_select, py::arg("relevance"), py::arg("sim"), py::arg("mmr_lambda"), py::arg("k"),
          py::arg("dedup_threshold"), py::arg("cuda") = false, py::arg("simd") = "",
          "mmr_select(relevance, sim, mmr_lambda, k, dedup_threshold, cuda=False, simd='') -> int64[<= k]\n\n"
          "See rag_service.reference.mmr_select_reference.");

    rerank_core::bind(m);

    // ---- first stage in one call ----
    py::class_<BlockBoundsObject>(m, "BlockBounds",
                                  "Each long posting list's largest weight per block of 2^shift chunks, and where its\n"
                                  "postings of each block begin, made from one index's postings (lists in ascending\n"
                                  "chunk order). Passed as `blocks` with those same arrays, bm25_top ranks a query\n"
                                  "of long lists block by block, best bound first, with the answer it gives without.")
        .def(py::init(&make_block_bounds), py::arg("indptr"), py::arg("docs"), py::arg("weights"),
             py::arg("n_docs"), py::arg("shift") = 6, py::arg("min_postings") = -1,
             "BlockBounds(indptr, docs, weights, n_docs, shift=6, min_postings=-1): rows for the lists of at least\n"
             "min_postings postings (-1: as many as there are blocks). Raises ValueError naming the first posting\n"
             "out of ascending order or range.")
        .def_property_readonly("shift", [](const BlockBoundsObject& o) { return o.bounds.shift; })
        .def_property_readonly("n_blocks", [](const BlockBoundsObject& o) { return o.bounds.n_blocks; })
        .def_property_readonly("rows", [](const BlockBoundsObject& o) { return o.bounds.rows; },
                               "How many lists have bounds stored (the others are bounded per query).")
        .def_property_readonly("nbytes", [](const BlockBoundsObject& o) {
            return o.bounds.row.size() * sizeof(std::int32_t) + o.bounds.max.size() * sizeof(float) +
                   o.bounds.start.size() * sizeof(std::uint32_t);
        });
    m.def("bm25_top", &bm25_top, py::arg("indptr"), py::arg("docs"), py::arg("weights"), py::arg("n_docs"),
          py::arg("term_ids"), py::arg("mask"), py::arg("depth"), py::arg("blocks") = py::none(),
          "bm25_top(indptr, docs, weights, n_docs, term_ids, mask, depth, blocks=None)\n"
          "    -> tuple[ids int64[k], scores float32[k]]\n\n"
          "Top min(depth, n_docs) chunks with a BM25 score > 0 over impact postings (indptr int64[vocab + 1], docs\n"
          "int32, weights float32), mask bool[n_docs] or None; blocks: these postings' BlockBounds (the same answer,\n"
          "fewer postings read). See rag_service.kernels.reference.bm25_top_reference.");
    m.def("dense_top", &dense_top, py::arg("vectors"), py::arg("query"), py::arg("mask"), py::arg("depth"),
          py::arg("codes") = py::none(), py::arg("code_scale") = py::none(), py::arg("code_base") = py::none(),
          py::arg("oversample") = 0, py::arg("simd") = "", py::arg("code_bits") = py::none(),
          "dense_top(vectors, query, mask, depth, codes=None, code_scale=None, code_base=None, oversample=0, simd='',\n"
          "          code_bits=None) -> tuple[ids int64[k], scores float32[k]]\n\n"
          "Top min(depth, allowed) rows of vectors float32[n, d] by inner product with query; oversample >= 1 scans\n"
          "the sq8 codes (int8[n, d], row ~ code_base + code_scale * code) for oversample * depth candidates and\n"
          "rescores them exactly; code_bits (uint64[n, ceil(d / 64)], the rows' centred signs) choose the codes read\n"
          "on a large index. See rag_service.kernels.reference.dense_top_reference.");
    m.def("dense_above", &dense_above, py::arg("vectors"), py::arg("codes"), py::arg("code_scale"),
          py::arg("code_slack"), py::arg("code_norm"), py::arg("query"), py::arg("mask"), py::arg("min_score"),
          py::arg("depth"), py::arg("simd") = "",
          "dense_above(vectors, codes, code_scale, code_slack, code_norm, query, mask, min_score, depth, simd='')\n"
          "-> (ids int64, scores float32): the top `depth` rows allowed by mask with inner product >= min_score,\n"
          "scored exactly with the float rows; the per-row codes (row_quantize) only rule rows out. See\n"
          "rag_service.kernels.reference.dense_above_reference.");
    m.def("row_quantize", &row_quantize, py::arg("vectors"), py::arg("codes"), py::arg("scale"), py::arg("slack"),
          py::arg("norm"),
          "row_quantize(vectors, codes, scale, slack, norm) -> None\n\n"
          "Writes the int8 codes (int8[n, d]) and per-row scale, slack and norm (float32[n]) of vectors float32[n, d]\n"
          "into the given arrays. See rag_service.kernels.reference.row_quantize_reference.");
    m.def("retrieve", &retrieve, py::arg("indptr"), py::arg("docs"), py::arg("weights"), py::arg("n_docs"),
          py::arg("term_ids"), py::arg("mask"), py::arg("depth"), py::arg("vectors"), py::arg("query"),
          py::arg("codes"), py::arg("code_scale"), py::arg("code_base"), py::arg("oversample"), py::arg("dense_ids"),
          py::arg("dense_scores"), py::arg("method"), py::arg("dense_weight"), py::arg("top_k"), py::arg("rrf_k"),
          py::arg("simd") = "", py::arg("bm25_ids") = py::none(), py::arg("bm25_scores") = py::none(),
          py::arg("code_bits") = py::none(), py::arg("blocks") = py::none(),
          "retrieve(...) -> tuple[bm25_ids, bm25_scores, dense_ids, dense_scores, fused_ids, fused, fused_bm25,\n"
          "    fused_dense, (bm25_ns, dense_ns, fusion_ns)]\n\n"
          "bm25_top (or the given bm25_ids/bm25_scores, ranked beforehand: bm25_ns 0), then dense_top over\n"
          "vectors/query (or the given dense_ids/dense_scores, or no dense list when all four are None), then fuse,\n"
          "in one call with the GIL released. See rag_service.kernels.reference.retrieve_reference.");
    py::class_<WordIds>(m, "WordIds",
                        "WordIds()\n\nword -> BM25 term id (-1: a stop word or an unknown term) for the words of\n"
                        "ASCII queries: the index corpus's words (seeded) and those of queries seen since\n"
                        "(learned): BM25Index.query_term_ids' memo, in C++.")
        .def(py::init<>())
        .def("lookup", &WordIds::lookup, py::arg("text"),
             "lookup(text) -> int64 array | None\n\nThe term ids >= 0 of an ASCII text's words, in order (its\n"
             "lower-cased runs of [A-Za-z0-9_]); None when the text has another character or a word not held.")
        .def("add", &WordIds::add, py::arg("words"), py::arg("ids"),
             "add(words, ids) -> None\n\nLearns words[i] -> ids[i] for the ASCII words (lower-cased, as the\n"
             "analyser's words); raises ValueError when the lengths differ.")
        .def("seed", &WordIds::seed, py::arg("words"), py::arg("ids"),
             "seed(words, ids) -> None\n\nAs add, but held for good: clear() keeps them.")
        .def("clear", &WordIds::clear, "clear() -> None\n\nForgets the learned words (the seeded ones stay).")
        .def_property_readonly("seeded", &WordIds::seeded, "How many words were seeded.")
        .def("__len__", &WordIds::size, "How many words were learned.");
    py::class_<PyWordPiece>(m, "WordPiece",
                            "WordPiece(vocab, unk_id, cls_id, sep_id, max_chars, max_tokens, added)\n\n"
                            "A BERT WordPiece tokenizer for ASCII text (lower-cased; whitespace and punctuation split;\n"
                            "greedy longest pieces, '##' inside a word): vocab[i] is the piece of id i; a word over\n"
                            "max_chars characters is unknown; at most max_tokens pieces, then [CLS] ... [SEP];\n"
                            "`added`: lower-cased added-token texts, text holding one is not handled.")
        .def(py::init<const py::sequence&, std::int64_t, std::int64_t, std::int64_t, std::size_t, std::size_t,
                      const py::sequence&>(),
             py::arg("vocab"), py::arg("unk_id"), py::arg("cls_id"), py::arg("sep_id"), py::arg("max_chars"),
             py::arg("max_tokens"), py::arg("added"))
        .def("encode", &PyWordPiece::encode, py::arg("text"),
             "encode(text) -> int64 array | None\n\n[CLS], the text's piece ids, [SEP]; None for text with a\n"
             "character outside printable ASCII, tab, newline and carriage return, or holding an added token.")
        .def("__len__", &PyWordPiece::size, "The vocabulary's size.");
    py::class_<PreparedSearch>(m, "PreparedSearch",
                               "PreparedSearch(core, indptr, docs, weights, n_docs, vectors, codes, code_scale,\n"
                               "               code_base, code_bits, oversample, columns, model_weights, bias,\n"
                               "               idf_table, blocks)\n\n"
                               "search_core's per-index arguments, checked once (each raises ValueError naming it).\n"
                               "vectors None: no scan, each call passes its dense list. Calling it runs search_core\n"
                               "with a request's own arguments; the same tuple.")
        .def(py::init<const py::handle&, const py::handle&, const py::handle&, const py::handle&, std::int64_t,
                      const py::handle&, const py::handle&, const py::handle&, const py::handle&, const py::handle&,
                      std::int64_t, const py::handle&, const py::handle&, double, const py::handle&,
                      const py::handle&>(),
             py::arg("core"), py::arg("indptr"), py::arg("docs"), py::arg("weights"), py::arg("n_docs"),
             py::arg("vectors"), py::arg("codes"), py::arg("code_scale"), py::arg("code_base"), py::arg("code_bits"),
             py::arg("oversample"), py::arg("columns"), py::arg("model_weights"), py::arg("bias"),
             py::arg("idf_table"), py::arg("blocks"))
        .def("__call__", &PreparedSearch::call, py::arg("term_ids"), py::arg("query"), py::arg("mask"),
             py::arg("depth"), py::arg("dense_ids"), py::arg("dense_scores"), py::arg("method"),
             py::arg("dense_weight"), py::arg("top_k"), py::arg("rrf_k"), py::arg("query_terms"),
             py::arg("query_counts"), py::arg("query_idf"), py::arg("rerank_depth"), py::arg("confidence"),
             py::arg("agree_top"), py::arg("agree_min"), py::arg("bm25_ids"), py::arg("bm25_scores"),
             py::arg("helper"),
             "(term_ids, query, mask, depth, dense_ids, dense_scores, method, dense_weight, top_k, rrf_k,\n"
             " query_terms, query_counts, query_idf, rerank_depth, confidence, agree_top, agree_min, bm25_ids,\n"
             " bm25_scores, helper) -> search_core's tuple. query: the scan's (a scanned index) and the rerank's;\n"
             "query_terms None: the rerank's terms come from the idf table.");
    m.def("search_core", &search_core, py::arg("core"), py::arg("indptr"), py::arg("docs"), py::arg("weights"),
          py::arg("n_docs"), py::arg("term_ids"), py::arg("mask"), py::arg("depth"), py::arg("vectors"),
          py::arg("query"), py::arg("codes"), py::arg("code_scale"), py::arg("code_base"), py::arg("oversample"),
          py::arg("dense_ids"), py::arg("dense_scores"), py::arg("method"), py::arg("dense_weight"), py::arg("top_k"),
          py::arg("rrf_k"), py::arg("rerank_query"), py::arg("query_terms"), py::arg("query_counts"),
          py::arg("query_idf"), py::arg("columns"), py::arg("model_weights"), py::arg("bias"),
          py::arg("rerank_depth"), py::arg("confidence"), py::arg("agree_top"), py::arg("agree_min"),
          py::arg("simd") = "", py::arg("idf_table") = py::none(), py::arg("bm25_ids") = py::none(),
          py::arg("bm25_scores") = py::none(), py::arg("code_bits") = py::none(), py::arg("helper") = false,
          py::arg("blocks") = py::none(),
          "search_core(core, <retrieve's arguments>, rerank_query, query_terms, query_counts, query_idf, columns,\n"
          "            model_weights, bias, rerank_depth, confidence, agree_top, agree_min, simd='', idf_table=None,\n"
          "            bm25_ids=None, bm25_scores=None, code_bits=None, helper=False, blocks=None)\n"
          "    -> tuple[retrieve's tuple (times: bm25, dense, fusion, rerank ns), confident, agreement, ids, scores,\n"
          "             features, order]\n\n"
          "retrieve, the confidence rule (skip the rerank when the top agree_top BM25 and dense ids share at least\n"
          "agree_min) and core.rerank of the fused top rerank_depth, in one call with the GIL released (helper: part\n"
          "of the scan and the rerank on core's worker thread, for a search alone in the server). With\n"
          "query_terms None, the rerank's terms are term_ids' distinct ids, their counts and idf_table[id]. See\n"
          "rag_service.kernels.native.search_core.");
}
