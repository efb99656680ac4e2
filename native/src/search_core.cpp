#include "search_core.hpp"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <stdexcept>
#include <string>

namespace rag {

std::int64_t agreement(const std::int64_t* a, std::size_t na, const std::int64_t* b, std::size_t nb,
                       std::int64_t top) {
    const auto limit = static_cast<std::size_t>(std::max<std::int64_t>(top, 0));
    std::vector<std::int64_t> left(a, a + std::min(na, limit));
    std::vector<std::int64_t> right(b, b + std::min(nb, limit));
    std::sort(left.begin(), left.end());
    std::sort(right.begin(), right.end());
    std::vector<std::int64_t> shared;
    std::set_intersection(left.begin(), left.end(), right.begin(), right.end(), std::back_inserter(shared));
    return static_cast<std::int64_t>(shared.size());
}

QueryTerms distinct_query_terms(const std::int64_t* term_ids, std::size_t n, const double* idf_table,
                                std::size_t vocab, std::vector<std::int32_t>& terms, std::vector<double>& counts,
                                std::vector<double>& idf) {
    std::vector<std::int64_t> sorted(term_ids, term_ids + n);
    std::sort(sorted.begin(), sorted.end());
    terms.clear();
    counts.clear();
    idf.clear();
    for (std::size_t i = 0; i < n;) {
        const std::int64_t term = sorted[i];
        if (term < 0 || static_cast<std::uint64_t>(term) >= vocab) {
            throw std::invalid_argument("term_ids must be in [0, " + std::to_string(vocab) + ") (the idf table), got " +
                                        std::to_string(term));
        }
        std::size_t j = i + 1;
        while (j < n && sorted[j] == term) ++j;
        terms.push_back(static_cast<std::int32_t>(term));
        counts.push_back(static_cast<double>(j - i));
        idf.push_back(idf_table[term]);
        i = j;
    }
    return QueryTerms{terms.data(), counts.data(), idf.data(), terms.size()};
}

SearchCoreResult search_core(const Postings& postings, const std::int64_t* term_ids, std::size_t n_query_terms,
                             const std::uint8_t* mask, std::int64_t depth, const DenseSource& dense,
                             const FusionParams& fusion, const Confidence& confidence, const RerankInput& rerank,
                             simd::Level level, const RankedList* bm25_given) {
    if (rerank.depth < 0) throw std::invalid_argument("rerank_depth must be >= 0, got " + std::to_string(rerank.depth));
    if (confidence.enabled && confidence.top < 0) {
        throw std::invalid_argument("agree_top must be >= 0, got " + std::to_string(confidence.top));
    }
    if (rerank.depth > 0 && (rerank.store == nullptr || rerank.query == nullptr)) {
        throw std::invalid_argument("rerank_depth > 0 needs the rerank store and query");
    }
    SearchCoreResult out;
    // Spinning from now until the call ends, the helper takes its share of the scan and the rerank without a
    // wake-up once it is up.
    const Roused roused(rerank.helper);
    const Roused roused_dense(dense.helper != rerank.helper ? dense.helper : nullptr);
    out.first = retrieve(postings, term_ids, n_query_terms, mask, depth, dense, fusion, level, bm25_given);
    const RetrieveResult& first = out.first;
    if (confidence.enabled) {
        // The dense list is the scan's, or the one passed in (the lexical route has none: it never reranks).
        const bool scanned = dense.rows != nullptr;
        const std::int64_t* dense_ids = scanned ? first.dense.ids.data() : dense.precomputed.ids;
        const std::size_t n_dense = scanned ? first.dense.ids.size() : dense.precomputed.size;
        out.agreement = agreement(first.bm25.ids.data(), first.bm25.ids.size(), dense_ids, n_dense, confidence.top);
        out.confident = out.agreement >= confidence.min_shared;
        if (out.confident) return out;
    }
    if (rerank.depth == 0) return out;
    const auto start = std::chrono::steady_clock::now();
    const std::size_t m = std::min(static_cast<std::size_t>(rerank.depth), first.fused.ids.size());
    out.ids.resize(m);
    out.scores.resize(m);
    out.features.resize(m * kFeatureColumns);
    out.order.resize(m);
    const bool scanned = dense.rows != nullptr;
    const IdList dense_ranked = scanned ? IdList{first.dense.ids.data(), first.dense.ids.size()}
                                        : IdList{dense.precomputed.ids, dense.precomputed.size};
    if (m > 0) {
        rag::rerank(*rerank.store, rerank.dense_vectors, rerank.n_dense, rerank.query, rerank.terms,
                    first.fused.ids.data(), first.fused.fused.data(), m,
                    IdList{first.bm25.ids.data(), first.bm25.ids.size()}, dense_ranked, rerank.model, level,
                    RerankOutput{out.ids.data(), out.scores.data(), out.features.data(), out.order.data()},
                    rerank.helper);
    }
    out.rerank_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
                        .count();
    return out;
}

}  // namespace rag
