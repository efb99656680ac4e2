// Rerank features and context-filter kernels: window MaxSim, term proximity, linear scores, similarity matrix, MMR.
//
// Pure C++17, no Python. The semantics are specified by the NumPy references in rag_service/reference.py
// (window_maxsim_reference, proximity_reference, linear_scores_reference, similarity_matrix_reference,
// mmr_select_reference); the native results agree to float32 rounding (1e-5 relative), MMR picks exactly. Every
// invalid argument throws std::invalid_argument with a message naming it. Large calls run on several threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "simd.hpp"

namespace rag {

enum class VectorType { kInt8, kFloat16, kFloat32 };

// CSR window store: chunk c owns rows offsets[c]:offsets[c + 1] of vectors (n_windows x d, row-major). Non-owning.
struct WindowStore {
    const std::int64_t* offsets = nullptr;
    std::size_t n_chunks = 0;  // offsets has n_chunks + 1 entries
    const void* vectors = nullptr;
    VectorType type = VectorType::kFloat32;
    const float* scales = nullptr;  // n_windows entries when type is kInt8, else unused
    std::size_t n_windows = 0;
    std::size_t d = 0;
    // Every chunk's offsets checked once (check_window_store, at load): a call then checks only its candidate ids.
    bool checked = false;
};

// Bytes of one stored vector element of that type.
std::size_t element_bytes(VectorType type);

// out[i * 3 + 0..2] = max, top-2 mean, soft max (temperature) of candidate i's window scores; NaN for a candidate
// without windows. query has store.d entries. threads = 0 picks by the amount of work.
void window_maxsim(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                   double temperature, simd::Level level, float* out, unsigned threads = 0);

// Checks window_maxsim's arguments (also used before the CUDA twin runs): query finite, temperature > 0, every
// candidate in range with offsets 0 <= offsets[c] <= offsets[c + 1] <= n_windows, scales finite for int8.
void check_window_args(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                       double temperature);

struct TokenStore {
    const std::int64_t* offsets = nullptr;
    std::size_t n_chunks = 0;
    const std::int32_t* tokens = nullptr;
    std::size_t n_tokens = 0;
    // Every chunk's offsets checked once (check_token_store, at load): a call then checks only its candidate ids.
    bool checked = false;
};

// Check every chunk's offsets (a range within the rows), then mark the store checked. Throw std::invalid_argument
// naming the chunk.
void check_window_store(WindowStore& store);
void check_token_store(TokenStore& store);

// The shortest stretch of a chunk holding every distinct query term present in it, from the chunk's query-term hits
// (positions ascending; slot = the term's index in the query, < q): span = its length in tokens, matched = the
// distinct terms present (both 0 without a hit). n_tokens is the chunk's length; counts holds q zeros and is left
// zeroed.
void hit_span(const std::int64_t* pos, const std::int32_t* slot, std::size_t hits, std::int64_t n_tokens,
              std::int32_t* counts, std::int32_t& span, std::int32_t& matched);

// span[i], matched[i] for candidate i (see proximity_reference).
void proximity(const std::int32_t* query_terms, std::size_t q, const TokenStore& store,
               const std::int64_t* candidates, std::size_t m, std::int32_t* span, std::int32_t* matched,
               unsigned threads = 0);

// out[i] = sum_j features[i, j] * weights[j] (float64, j ascending) + bias, rounded to float32.
void linear_scores(const float* features, std::size_t m, std::size_t f, const float* weights, double bias,
                   float* out);

// out[i, j] = vectors[i] . vectors[j] (m x m, symmetric: each pair computed once).
void similarity_matrix(const float* vectors, std::size_t m, std::size_t d, simd::Level level, float* out,
                       unsigned threads = 0);

// Greedy MMR with dedup (see mmr_select_reference); the chosen indices in pick order.
std::vector<std::int64_t> mmr_select(const float* relevance, const float* sim, std::size_t m, double mmr_lambda,
                                     std::int64_t k, double dedup_threshold, simd::Level level);
// Checks mmr_select's scalar arguments and relevance (also used before the CUDA twin runs); sim rows are checked
// as they are picked (check_sim_row), since only those are read.
void check_mmr_args(const float* relevance, const float* sim, std::size_t m, double mmr_lambda, std::int64_t k,
                    double dedup_threshold);

// Throws std::invalid_argument when row `pick` of sim (m entries) holds a non-finite value.
void check_sim_row(const float* row, std::size_t pick, std::size_t m);

// Throws std::invalid_argument naming `name` at the first non-finite value of a rows x cols matrix (cols = 1: a
// vector, reported by index).
void check_finite(const float* values, std::size_t rows, std::size_t cols, const char* name);

}  // namespace rag
