// The first stage in one call: BM25 top-depth over impact postings, a flat dense top-depth scan (float32 rows, or
// sq8 codes followed by exact float rescoring) and fusion (fusion.hpp).
//
// Pure C++17, no Python. Semantics are specified by the NumPy references in rag_service/kernels/reference.py
// (bm25_top_reference, dense_top_reference, retrieve_reference); BM25 scores are the numba scorer's
// (rag_service/retrievers/lexical.py, _top_n) bit for bit: float32 sums in the same order. Every list is ordered by
// score descending, exact ties by id ascending.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fusion.hpp"
#include "helper.hpp"
#include "simd.hpp"

namespace rag {

struct BlockBounds;

// Impact postings (CSC): the postings of term t are [indptr[t], indptr[t + 1]) in docs / weights. Non-owning.
struct Postings {
    const std::int64_t* indptr = nullptr;
    std::size_t n_terms = 0;  // indptr has n_terms + 1 entries
    const std::int32_t* docs = nullptr;
    const float* weights = nullptr;
    std::size_t n_postings = 0;
    std::size_t n_docs = 0;
    // Bounds per block of chunks made from these postings (block_bounds below), or nullptr: bm25_top then scores
    // every posting of the query's terms.
    const BlockBounds* blocks = nullptr;
};

// Each long list's largest weight per block of 2^shift consecutive chunks, and where the list's postings of each
// block begin, made once from a loaded index's postings (block_bounds). With them bm25_top ranks a query whose
// lists cover much of the index block by block, best bound first, and stops where no block left can reach its
// depth-th score: at 1M chunks a query of common words touches a few percent of its postings. A list shorter than
// min_postings gets no row: its bounds are found per query from its own postings.
struct BlockBounds {
    unsigned shift = 0;
    std::size_t n_blocks = 0;  // ceil(n_docs / 2^shift)
    std::size_t rows = 0;      // lists with a row
    // The postings these were made from: bm25_top refuses bounds made from other arrays.
    const std::int64_t* indptr = nullptr;
    const std::int32_t* docs = nullptr;
    const float* weights = nullptr;
    std::size_t n_terms = 0;
    std::size_t n_docs = 0;
    std::vector<std::int32_t> row;     // per term: its row, -1 for a list without one
    std::vector<float> max;            // [rows x n_blocks]: max(0, the row's weights in the block)
    std::vector<std::uint32_t> start;  // [rows x (n_blocks + 1)]: offset in the list of the block's first posting
};

constexpr unsigned kBlocksMaxShift = 12;
// block_bounds' min_postings that gives rows to the lists of at least as many postings as there are blocks.
constexpr std::size_t kRowsPerBlock = static_cast<std::size_t>(-1);

// The bounds of `postings` in blocks of 2^shift chunks (shift in [0, kBlocksMaxShift]), with rows for the lists of
// at least min_postings postings (kRowsPerBlock: as many as there are blocks). Every list must be in ascending chunk
// order without repeats, each chunk in [0, n_docs): throws std::invalid_argument naming the first posting that is
// not, or a shift out of range.
BlockBounds block_bounds(const Postings& postings, std::int64_t shift, std::size_t min_postings);

// Dense rows, float32 [n x d], and optionally their sq8 codes: int8 [n x d] with a per-dimension affine decode
// x[j] ~= base[j] + scale[j] * code[j]. Non-owning.
struct DenseRows {
    const float* vectors = nullptr;
    std::size_t n = 0;
    std::size_t d = 0;
    const std::int8_t* codes = nullptr;  // nullptr: no codes
    const float* scale = nullptr;
    const float* base = nullptr;
    // Optional sign bits of the rows beside the codes: bit j of row i set where vectors[i][j] is above the column's
    // mean, packed `words` = ceil(d / 64) uint64 per row (bit j in word j / 64, bit j % 64; the padding bits clear).
    // An unfiltered scan of a large index reads these (an eighth of the codes' bytes) to choose the rows whose codes
    // it reads (dense_top). nullptr: none.
    const std::uint64_t* bits = nullptr;
    std::size_t words = 0;
};

struct Hits {
    std::vector<std::int64_t> ids;
    std::vector<float> scores;
};

// The top min(depth, n_docs) chunks with a BM25 score > 0 (the sum, in query-term order, of each query term's impact;
// a repeated term counts twice), allowed by mask (one byte per chunk, nonzero = allowed; nullptr = all). Throws
// std::invalid_argument naming the argument for a term id outside [0, n_terms), a posting range outside the
// postings, a chunk id outside [0, n_docs), depth < 1, or bounds (postings.blocks) made from other postings.
// The answer is the same with bounds and without: they only decide which postings are read.
Hits bm25_top(const Postings& postings, const std::int64_t* term_ids, std::size_t n_query_terms,
              const std::uint8_t* mask, std::int64_t depth);

// The top min(depth, allowed rows) rows by inner product with query (d floats), allowed by mask. oversample == 0
// scans the float rows; oversample >= 1 (needs codes) scans the codes for the best oversample * depth rows by the
// decoded inner product and returns those rescored exactly with the float rows (scores are float inner products
// either way). With sign bits, no mask and at least kBitsMinRatio times bits_keep(...) rows, the codes read are only
// those of the bits_keep rows with the best sum of the int8 query's entries over their set bits (ties: id
// ascending). Throws std::invalid_argument naming the argument for depth < 1, oversample > 0 without codes or a
// non-finite query.
// `helper`: a worker that may take part of the scan's reads (nullptr: all on the caller's thread); the result is
// the same either way.
Hits dense_top(const DenseRows& rows, const float* query, const std::uint8_t* mask, std::int64_t depth,
               std::int64_t oversample, simd::Level level, Helper* helper = nullptr);

// How many rows the sign bits keep for a scan that takes wide_k candidates from the codes: kBitsFactor of them, at
// least kBitsMinKeep. The bits' ranking is coarse (a row's 384 signs against the query), so they keep five times what
// the codes pass on and never fewer than a thousand rows: on SciFact's chunks with all-MiniLM-L6-v2 the scan then
// returns 99.9% of the exact top 100 and all of the top 10 (bench/README.md, "The dense scan's sign bits"). The bits
// are read only where they keep at most a kBitsMinRatio-th of the rows.
constexpr std::size_t kBitsFactor = 5;
constexpr std::size_t kBitsMinKeep = 1024;
constexpr std::size_t kBitsMinRatio = 4;
inline std::size_t bits_keep(std::size_t wide_k) {
    return wide_k > kBitsMinKeep / kBitsFactor ? wide_k * kBitsFactor : kBitsMinKeep;
}

// Rows each coded with its own scale, for a matrix that grows a row at a time (the semantic cache's query
// embeddings): row ~= scale[i] * code[i] (int8, the row's largest magnitude at 127), with slack[i] >=
// ||row - scale[i] * code[i]|| and norm[i] >= ||scale[i] * code[i]|| (row_quantize below;
// kernels.reference.row_quantize_reference is its specification). Non-owning.
struct CodedRows {
    const float* vectors = nullptr;  // float32 [n x d]
    std::size_t n = 0;
    std::size_t d = 0;
    const std::int8_t* codes = nullptr;  // [n x d]
    const float* scale = nullptr;        // [n]
    const float* slack = nullptr;        // [n]
    const float* norm = nullptr;         // [n]
};

// Codes and bounds of n float32 rows of d (row-major) into codes [n x d], scale, slack and norm [n], as
// kernels.reference.row_quantize_reference: code = rint(row * (127 / max|row|)) in float32 (half to even), scale =
// max|row| / 127, and the two bounds summed in double and rounded up to the next float; a zero row codes to zeros
// with scale 0. Every row is checked before any output is written: throws std::invalid_argument naming the first
// non-finite entry.
void row_quantize(const float* rows, std::size_t n, std::size_t d, std::int8_t* codes, float* scale, float* slack,
                  float* norm);

// The top min(depth, ...) rows allowed by mask whose inner product with query is >= min_score, best first (ties: id
// ascending), scored exactly with the float rows: the result of dense_top over the float rows with the scores below
// min_score dropped. The codes only decide which rows get an exact score: the integer dot product with the quantized
// query, widened by a bound on the decode's error (the slack and norm above, the query's own rounding and the float
// sum's rounding), rules out the rows that cannot reach min_score or the depth-th best. Throws
// std::invalid_argument naming the argument for depth < 1, a NaN min_score or a non-finite query.
Hits dense_above(const CodedRows& rows, const float* query, const std::uint8_t* mask, double min_score,
                 std::int64_t depth, simd::Level level);

struct RetrieveTimes {
    std::int64_t bm25_ns = 0;
    std::int64_t dense_ns = 0;
    std::int64_t fusion_ns = 0;
};

struct RetrieveResult {
    Hits bm25;
    Hits dense;
    FusionResult fused;
    RetrieveTimes times;
};

// What the dense side of retrieve() is: a scan (rows + query), hits computed elsewhere (an HNSW or GPU index), or
// nothing (the lexical route: fusion sees an empty dense list).
struct DenseSource {
    const DenseRows* rows = nullptr;  // scan when set
    const float* query = nullptr;
    std::int64_t oversample = 0;
    Helper* helper = nullptr;  // a worker on an idle core for part of the scan (dense_top)
    RankedList precomputed;  // used when rows is nullptr (size 0 = no dense list)
};

// bm25_top + dense_top (or the precomputed dense list) + fuse, in one call; the dense depth is `depth` too.
// `bm25_given`: the BM25 list ranked already (bm25_top on a thread beside the query's encode), taken as it is in
// place of bm25_top (term_ids and mask are then not read for it; bm25_ns stays 0); nullptr: ranked here.
RetrieveResult retrieve(const Postings& postings, const std::int64_t* term_ids, std::size_t n_query_terms,
                        const std::uint8_t* mask, std::int64_t depth, const DenseSource& dense,
                        const FusionParams& fusion, simd::Level level, const RankedList* bm25_given = nullptr);

}  // namespace rag
