// The rerank stage in one call: per-candidate (local) features, the features that need the whole candidate list, the
// linear model and the sort by score.
//
// Pure C++17, no Python. Built from the kernels in rerank.hpp (window_maxsim, proximity, linear_scores), called, not
// copied. The semantics are specified by rag_service/kernels/reference.py: lexical_features_reference (numba),
// local_features_reference, finish_features_reference and rank_reference. Column orders are LOCAL_COLUMNS and
// FEATURE_COLUMNS below and must match rag_service.search.rerank.LOCAL_FEATURES / FEATURES (the facade compares them
// at import). Every invalid argument throws std::invalid_argument naming it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rerank.hpp"
#include "helper.hpp"
#include "simd.hpp"

namespace rag {

inline constexpr const char* LOCAL_COLUMNS[] = {"bm25_raw", "bm25_title_raw", "bm25_window_raw", "coverage",
                                                "win_max", "win_top2", "win_soft", "proximity"};
inline constexpr std::size_t kLocalColumns = 8;
inline constexpr const char* FEATURE_COLUMNS[] = {"fused", "bm25", "dense", "win_max", "win_top2", "win_soft",
                                                  "bm25_title", "bm25_window", "proximity", "coverage", "rr_bm25",
                                                  "rr_dense", "prf"};
inline constexpr std::size_t kFeatureColumns = 13;

// Token streams with titles and windows: chunk c owns tokens[token_offsets[c]:token_offsets[c + 1]], whose first
// title_lengths[c] are its title, and windows window_offsets[c]:window_offsets[c + 1], window w covering the chunk's
// tokens [spans[2w], spans[2w + 1]) (positions within the chunk). Non-owning.
struct LexicalStore {
    TokenStore tokens;
    const std::int32_t* title_lengths = nullptr;  // tokens.n_chunks entries
    const std::int64_t* window_offsets = nullptr;  // tokens.n_chunks + 1 entries
    const std::int32_t* window_spans = nullptr;    // n_windows x 2
    std::size_t n_windows = 0;
    // Every chunk checked once (check_lexical_store, at load): a call then checks only its candidate ids.
    bool checked = false;
};

// Check every chunk's token offsets, title length, window offsets and window spans, then mark the store (and its
// token store) checked. Throw std::invalid_argument naming the chunk.
void check_lexical_store(LexicalStore& store);

struct Bm25Params {
    double k1 = 0.9;
    double b = 0.4;
    double avgdl = 1.0;       // chunk
    double avg_title = 1.0;   // title (b-normalisation of bm25_title)
    double avg_window = 1.0;  // window (of bm25_window)
};

// The query's distinct known terms with their count in the query and idf (q entries each).
struct QueryTerms {
    const std::int32_t* terms = nullptr;
    const double* count = nullptr;
    const double* idf = nullptr;
    std::size_t q = 0;
};

// out[i * 4 + 0..3] = BM25 of candidate i's chunk, of its title, best over its windows, idf-weighted coverage.
void lexical_features(const LexicalStore& store, const QueryTerms& query, const std::int64_t* candidates,
                      std::size_t m, const Bm25Params& params, float* out);

struct LocalStore {
    WindowStore windows;
    LexicalStore lexical;
    Bm25Params bm25;
    double temperature = 0.05;  // of the window soft max
};

// out[i * kLocalColumns + ...] in LOCAL_COLUMNS order (window columns NaN for a chunk without windows).
void local_features(const LocalStore& store, const float* query, const QueryTerms& terms,
                    const std::int64_t* candidates, std::size_t m, simd::Level level, float* out);

// A ranked id list (a retriever's result, best first).
struct IdList {
    const std::int64_t* ids = nullptr;
    std::size_t n = 0;
};

// The candidates (fused order) with their local rows and unit vectors: candidate i's vector is
// vectors + (rows ? rows[i] : i) * d.
struct FinishInput {
    const float* local = nullptr;  // m x kLocalColumns
    const float* vectors = nullptr;
    const std::int64_t* rows = nullptr;
    std::size_t n_rows = 0;  // rows of vectors (bounds of rows[i])
    std::size_t d = 0;
    const float* query = nullptr;  // d entries
    const std::int64_t* candidates = nullptr;
    const float* fused = nullptr;  // m entries
    std::size_t m = 0;
    IdList bm25_ranked;
    IdList dense_ranked;
};

// out[i * kFeatureColumns + ...] in FEATURE_COLUMNS order, candidates in the given order.
void finish_features(const FinishInput& input, simd::Level level, float* out);

struct LinearModel {
    const std::int64_t* columns = nullptr;  // positions in FEATURE_COLUMNS
    const float* weights = nullptr;
    std::size_t f = 0;
    double bias = 0.0;
};

// Scores features (m x kFeatureColumns) with the model and sorts by score, best first, ties in the given order:
// order[k] is the position of the k-th best; scores[k] its score. Throws like linear_scores on non-finite values.
void rank(const float* features, std::size_t m, const LinearModel& model, float* scores, std::int64_t* order);

// Where rerank writes, all in rank order: ids[m], scores[m], features[m x kFeatureColumns], order[m].
struct RerankOutput {
    std::int64_t* ids = nullptr;
    float* scores = nullptr;
    float* features = nullptr;
    std::int64_t* order = nullptr;
};

// local_features, finish_features (vectors: the store's dense rows of the candidates) and rank in one call.
// `helper`: a worker that may take part of the candidates' local features (nullptr: all on the caller's thread);
// the results are the same either way, each candidate's features being its own.
void rerank(const LocalStore& store, const float* dense_vectors, std::size_t n_dense, const float* query,
            const QueryTerms& terms, const std::int64_t* candidates, const float* fused, std::size_t m,
            const IdList& bm25_ranked, const IdList& dense_ranked, const LinearModel& model, simd::Level level,
            RerankOutput out, Helper* helper = nullptr);

}  // namespace rag
