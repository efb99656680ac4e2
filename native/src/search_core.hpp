// One request's ranking in one call: the first stage (retrieve.hpp: BM25, the dense list, fusion), the confidence
// rule that can make the rerank unnecessary, and the rerank stage (rerank_core.hpp) over the fused top candidates.
//
// Pure C++17, no Python; calls retrieve() and rerank(), does not copy them. The Python pipeline makes the same
// decisions with two calls (rag_service.search.pipeline: native.retrieve, adaptive.agreement, RerankCore.rerank);
// rag_service.kernels.native.search_core composes the NumPy references of those parts as this function's reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "rerank_core.hpp"
#include "retrieve.hpp"

namespace rag {

// The confidence rule: skip the rerank when the top `top` ids of the BM25 list and of the dense list share at least
// `min_shared` ids (rag_service.search.adaptive.agreement).
struct Confidence {
    bool enabled = false;
    std::int64_t top = 5;  // >= 0
    std::int64_t min_shared = 4;
};

// What the rerank stage reads: the store built at load, the candidates' exact dense vectors, the query (d floats),
// its distinct known terms and the model.
struct RerankInput {
    const LocalStore* store = nullptr;
    const float* dense_vectors = nullptr;  // n_dense x store->windows.d
    std::size_t n_dense = 0;
    const float* query = nullptr;
    QueryTerms terms;
    LinearModel model;
    std::int64_t depth = 0;  // most fused candidates to rerank (0: none); the fused list may hold fewer
    // A worker on an idle core for part of the scan and the rerank (a search alone in the server); nullptr: none.
    Helper* helper = nullptr;
};

struct SearchCoreResult {
    RetrieveResult first;
    std::int64_t agreement = 0;  // shared top ids, when the confidence rule ran
    bool confident = false;      // the rule skipped the rerank
    // The reranked candidates (the fused top min(depth, fused count), unless confident), in rank order.
    std::vector<std::int64_t> ids;
    std::vector<float> scores;
    std::vector<float> features;  // ids.size() x kFeatureColumns
    std::vector<std::int64_t> order;
    std::int64_t rerank_ns = 0;
};

// The rerank's query terms from BM25's input: the distinct ids of `term_ids` (n ids with repeats) ascending, the
// times each occurs, and its idf from `idf_table` (one value per vocabulary id, `vocab` of them), written into the
// three vectors, which the returned QueryTerms points into. Throws std::invalid_argument for an id outside
// [0, vocab). rag_service.kernels.reference.distinct_query_terms is the reference.
QueryTerms distinct_query_terms(const std::int64_t* term_ids, std::size_t n, const double* idf_table,
                                std::size_t vocab, std::vector<std::int32_t>& terms, std::vector<double>& counts,
                                std::vector<double>& idf);

// How many of the top `top` ids two ranked lists (each without repeats) share.
std::int64_t agreement(const std::int64_t* a, std::size_t na, const std::int64_t* b, std::size_t nb,
                       std::int64_t top);

// retrieve() (with `bm25_given` as retrieve's), then the confidence rule over its BM25 and dense lists (when enabled,
// whatever rerank.depth), then rerank() of the fused top min(rerank.depth, fused count) unless the rule was met.
// Throws std::invalid_argument naming the argument, as retrieve() and rerank() do, and for rerank.depth < 0 or
// confidence.top < 0.
SearchCoreResult search_core(const Postings& postings, const std::int64_t* term_ids, std::size_t n_query_terms,
                             const std::uint8_t* mask, std::int64_t depth, const DenseSource& dense,
                             const FusionParams& fusion, const Confidence& confidence, const RerankInput& rerank,
                             simd::Level level, const RankedList* bm25_given = nullptr);

}  // namespace rag
