// Score fusion: merges a BM25 and a dense candidate list into one ranking.
//
// Pure C++17, no Python. The semantics are specified by rag_service/reference.py (fuse_reference); the two must
// agree on ids exactly and on scores to 1e-6 relative. All arithmetic is done in double in the same operation order
// as the reference (the build sets -ffp-contract=off), so exact ties break identically in both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace rag {

enum class FusionMethod {
    kRrf,       // (1 - w) / (rrf_k + rank_bm25) + w / (rrf_k + rank_dense), ranks 1-based
    kWeighted,  // (1 - w) * minmax(bm25) + w * minmax(dense)
};

// "rrf" or "weighted"; anything else throws std::invalid_argument naming `method`.
FusionMethod parse_fusion_method(std::string_view name);

// One retriever's candidates in rank order (position 0 is rank 1). Non-owning.
struct RankedList {
    const std::int64_t* ids = nullptr;
    const float* scores = nullptr;
    std::size_t size = 0;
};

struct FusionParams {
    FusionMethod method = FusionMethod::kWeighted;
    double dense_weight = 0.5;  // w, in [0, 1]
    std::int64_t top_k = 10;    // >= 1
    double rrf_k = 60.0;        // > 0 and finite
};

// The fused top-k, best first: fused descending, exact ties by id ascending. bm25/dense hold each retriever's raw
// score, NaN where the id is absent from that list.
struct FusionResult {
    std::vector<std::int64_t> ids;
    std::vector<float> fused;
    std::vector<float> bm25;
    std::vector<float> dense;
};

// Throws std::invalid_argument (message names the argument) when params are out of range, a score is NaN/inf or an
// id repeats within one list. Does not allocate beyond O(|bm25| + |dense|) and never touches Python.
FusionResult fuse(const RankedList& bm25, const RankedList& dense, const FusionParams& params);

}  // namespace rag
