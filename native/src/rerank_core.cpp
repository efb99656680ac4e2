#include "rerank_core.hpp"

#include "prefetch.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace rag {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

bool is_finite(double x) { return std::isfinite(x); }

// Query term id -> position in the query's term list (the first, when an id repeats): open addressing, load <= 1/2.
class TermSlots {
public:
    explicit TermSlots(const QueryTerms& query) {
        while (capacity_ < 2 * query.q) capacity_ <<= 1;
        keys_.assign(capacity_, -1);
        slots_.assign(capacity_, -1);
        for (std::size_t j = 0; j < query.q; ++j) {
            const std::int32_t term = query.terms[j];
            std::size_t h = home(term);
            while (keys_[h] != -1 && keys_[h] != term) h = (h + 1) & (capacity_ - 1);
            if (keys_[h] == term) continue;
            keys_[h] = term;
            slots_[h] = static_cast<std::int32_t>(j);
        }
    }

    // -1 for a token that is no query term (stop words are stored as -1 and never match: terms are >= 0).
    std::int32_t find(std::int32_t token) const {
        if (token < 0) return -1;
        std::size_t h = home(token);
        while (keys_[h] != -1) {
            if (keys_[h] == token) return slots_[h];
            h = (h + 1) & (capacity_ - 1);
        }
        return -1;
    }

private:
    std::size_t home(std::int32_t term) const {
        return static_cast<std::size_t>((static_cast<std::uint32_t>(term) * 0x9E3779B1u) >> 7) & (capacity_ - 1);
    }

    std::size_t capacity_ = 8;
    std::vector<std::int32_t> keys_;
    std::vector<std::int32_t> slots_;
};

void check_query_terms(const QueryTerms& query) {
    for (std::size_t j = 0; j < query.q; ++j) {
        if (query.terms[j] < 0) {
            fail("query_terms must be >= 0, got " + std::to_string(query.terms[j]) + " at index " + std::to_string(j));
        }
        if (!is_finite(query.count[j])) fail("query_counts must be finite (index " + std::to_string(j) + ")");
        if (!is_finite(query.idf[j])) fail("query_idf must be finite (index " + std::to_string(j) + ")");
    }
}

// The proximity's terms must be distinct: the first id that repeats an earlier one, as rag::proximity reports it.
void check_distinct_terms(const QueryTerms& query) {
    if (query.q >= (std::size_t{1} << 24)) fail("query_terms: too many terms (" + std::to_string(query.q) + ")");
    std::vector<std::pair<std::int32_t, std::size_t>> order(query.q);
    for (std::size_t j = 0; j < query.q; ++j) order[j] = {query.terms[j], j};
    std::sort(order.begin(), order.end());
    std::size_t at = query.q;
    std::size_t first = 0;
    for (std::size_t k = 1; k < order.size(); ++k) {
        // the second occurrence of a term (its group sorted by position) is where a scan would see it repeat
        const bool second = order[k].first == order[k - 1].first && (k < 2 || order[k - 2].first != order[k].first);
        if (second && order[k].second < at) {
            at = order[k].second;
            first = order[k - 1].second;
        }
    }
    if (at < query.q) {
        fail("query_terms must not repeat an id: " + std::to_string(query.terms[at]) + " at positions " +
             std::to_string(first) + " and " + std::to_string(at));
    }
}

void check_params(const Bm25Params& p) {
    if (!is_finite(p.k1) || !is_finite(p.b) || !is_finite(p.avgdl) || !is_finite(p.avg_title) ||
        !is_finite(p.avg_window)) {
        fail("BM25 parameters (k1, b, avgdl, avg_title, avg_window) must be finite");
    }
}

// Every range a candidate's lexical features read lies inside the store.
void check_chunk(const LexicalStore& s, std::int64_t c) {
    const std::int64_t start = s.tokens.offsets[c];
    const std::int64_t stop = s.tokens.offsets[c + 1];
    if (start < 0 || stop < start || stop > static_cast<std::int64_t>(s.tokens.n_tokens)) {
        fail("token_offsets of chunk " + std::to_string(c) + " are not a range within tokens");
    }
    const std::int64_t n = stop - start;
    if (s.title_lengths[c] < 0 || s.title_lengths[c] > n) {
        fail("title_lengths of chunk " + std::to_string(c) + " is " + std::to_string(s.title_lengths[c]) +
             ", not within its " + std::to_string(n) + " tokens");
    }
    const std::int64_t w0 = s.window_offsets[c];
    const std::int64_t w1 = s.window_offsets[c + 1];
    if (w0 < 0 || w1 < w0 || w1 > static_cast<std::int64_t>(s.n_windows)) {
        fail("window_offsets of chunk " + std::to_string(c) + " are not a range within window_spans");
    }
    for (std::int64_t w = w0; w < w1; ++w) {
        const std::int32_t a = s.window_spans[2 * w];
        const std::int32_t e = s.window_spans[2 * w + 1];
        if (a < 0 || e < a || e > n) {
            fail("window_spans row " + std::to_string(w) + " is [" + std::to_string(a) + ", " + std::to_string(e) +
                 "), not within chunk " + std::to_string(c) + "'s " + std::to_string(n) + " tokens");
        }
    }
}

// The candidate ids are chunks; a store not checked at load has each candidate's chunk checked here.
void check_lexical_candidates(const LexicalStore& s, const std::int64_t* candidates, std::size_t m) {
    const auto n_chunks = static_cast<std::int64_t>(s.tokens.n_chunks);
    for (std::size_t i = 0; i < m; ++i) {
        const std::int64_t c = candidates[i];
        if (c < 0 || c >= n_chunks) {
            fail("candidates must be in [0, " + std::to_string(n_chunks) + "), got " + std::to_string(c) +
                 " at index " + std::to_string(i));
        }
        if (!s.checked) check_chunk(s, c);
    }
}

// BM25 of the term frequencies tf (operation order of the reference, so the float64 sums agree bit for bit).
double bm25(const QueryTerms& query, const double* tf, double length, double average, const Bm25Params& p) {
    const double norm = p.k1 * (1.0 - p.b + p.b * length / std::max(average, 1e-9));
    double score = 0.0;
    for (std::size_t j = 0; j < query.q; ++j) {
        if (tf[j] > 0) score += query.count[j] * query.idf[j] * tf[j] * (p.k1 + 1.0) / (tf[j] + norm);
    }
    return score;
}

// With span and matched (else nullptr): also the proximity of each candidate (rag::proximity's values, from the
// same pass over its tokens).
void lexical_unchecked(const LexicalStore& s, const QueryTerms& query, const std::int64_t* candidates, std::size_t m,
                       const Bm25Params& p, float* out, std::int32_t* span = nullptr,
                       std::int32_t* matched = nullptr) {
    const TermSlots slots(query);
    // 4096-bit filter of the query terms: rejects almost every token (most are no query term) with one load, before
    // the hash probe
    constexpr std::uint32_t kFilterBits = 4096;
    std::uint64_t filter[kFilterBits / 64] = {};
    for (std::size_t j = 0; j < query.q; ++j) {
        const auto bit = static_cast<std::uint32_t>(query.terms[j]) & (kFilterBits - 1);
        filter[bit / 64] |= std::uint64_t{1} << (bit % 64);
    }
    double total_idf = 0.0;
    for (std::size_t j = 0; j < query.q; ++j) total_idf += query.idf[j];
    std::vector<double> tf(query.q);
    // The chunk's query-term occurrences, by position: title and window counts read these instead of every token.
    std::vector<std::int64_t> hit_pos;
    std::vector<std::int32_t> hit_slot;
    std::vector<std::int32_t> present(span != nullptr ? query.q : 0, 0);
    // A candidate's tokens (~1 KB) and window spans lie far from the previous candidate's: asked for ahead, with
    // the offsets that locate them asked for further ahead still.
    auto prefetch_chunk = [&](std::size_t r) {
        const std::int64_t c = candidates[r];
        const std::int64_t first = s.tokens.offsets[c];
        prefetch_bytes(s.tokens.tokens + first, static_cast<std::size_t>(s.tokens.offsets[c + 1] - first) * 4);
        const std::int64_t w = s.window_offsets[c];
        prefetch_bytes(s.window_spans + 2 * w, static_cast<std::size_t>(s.window_offsets[c + 1] - w) * 8);
    };
    auto prefetch_offsets = [&](std::size_t r) {
        const std::int64_t c = candidates[r];
        __builtin_prefetch(s.tokens.offsets + c, 0, 3);
        __builtin_prefetch(s.window_offsets + c, 0, 3);
        __builtin_prefetch(s.title_lengths + c, 0, 3);
    };
    for (std::size_t r = 0; r < m && r < 2 * kPrefetchAhead; ++r) prefetch_offsets(r);
    for (std::size_t r = 0; r < m && r < kPrefetchAhead; ++r) prefetch_chunk(r);
    for (std::size_t r = 0; r < m; ++r) {
        if (r + 2 * kPrefetchAhead < m) prefetch_offsets(r + 2 * kPrefetchAhead);
        if (r + kPrefetchAhead < m) prefetch_chunk(r + kPrefetchAhead);
        const std::int64_t c = candidates[r];
        const std::int64_t start = s.tokens.offsets[c];
        const auto n = static_cast<std::size_t>(s.tokens.offsets[c + 1] - start);
        hit_pos.clear();
        hit_slot.clear();
        for (std::size_t k = 0; k < n; ++k) {
            const std::int32_t token = s.tokens.tokens[start + static_cast<std::int64_t>(k)];
            const auto bit = static_cast<std::uint32_t>(token) & (kFilterBits - 1);
            if (token < 0 || ((filter[bit / 64] >> (bit % 64)) & 1u) == 0) continue;
            const std::int32_t slot = slots.find(token);
            if (slot < 0) continue;
            hit_pos.push_back(static_cast<std::int64_t>(k));
            hit_slot.push_back(slot);
        }
        if (span != nullptr) {
            hit_span(hit_pos.data(), hit_slot.data(), hit_pos.size(), static_cast<std::int64_t>(n), present.data(),
                     span[r], matched[r]);
        }
        float* row = out + 4 * r;
        // tf of the hits at positions [a, e)
        auto count = [&](std::int64_t a, std::int64_t e) {
            std::fill(tf.begin(), tf.end(), 0.0);
            auto h = static_cast<std::size_t>(std::lower_bound(hit_pos.begin(), hit_pos.end(), a) - hit_pos.begin());
            for (; h < hit_pos.size() && hit_pos[h] < e; ++h) tf[static_cast<std::size_t>(hit_slot[h])] += 1.0;
        };
        count(0, static_cast<std::int64_t>(n));
        double covered = 0.0;
        for (std::size_t j = 0; j < query.q; ++j) {
            if (tf[j] > 0) covered += query.idf[j];
        }
        row[0] = static_cast<float>(bm25(query, tf.data(), static_cast<double>(n), p.avgdl, p));
        row[3] = static_cast<float>(total_idf > 0 ? covered / total_idf : 0.0);
        const std::int64_t tl = s.title_lengths[c];
        count(0, tl);
        row[1] = static_cast<float>(bm25(query, tf.data(), static_cast<double>(tl), p.avg_title, p));
        double best = 0.0;
        for (std::int64_t w = s.window_offsets[c]; w < s.window_offsets[c + 1]; ++w) {
            const std::int64_t a = s.window_spans[2 * w];
            const std::int64_t e = s.window_spans[2 * w + 1];
            count(a, e);
            const double score = bm25(query, tf.data(), static_cast<double>(e - a), p.avg_window, p);
            if (score > best) best = score;
        }
        row[2] = static_cast<float>(best);
    }
}

// rank_of[i] = position of candidates[i] in `ranked` (the last, when an id repeats), -1 when absent; without a map:
// the candidates sorted once, each ranked id found by binary search.
void ranks_in(const IdList& ranked, const std::int64_t* candidates, std::size_t m,
              const std::vector<std::size_t>& by_id, std::vector<std::int64_t>& rank_of) {
    rank_of.assign(m, -1);
    for (std::size_t r = 0; r < ranked.n; ++r) {
        const std::int64_t id = ranked.ids[r];
        auto it = std::lower_bound(by_id.begin(), by_id.end(), id,
                                   [&](std::size_t i, std::int64_t value) { return candidates[i] < value; });
        // a candidate id may repeat: every copy takes the rank
        for (; it != by_id.end() && candidates[*it] == id; ++it) rank_of[*it] = static_cast<std::int64_t>(r);
    }
}

constexpr double kRankK = 10.0;
// Fewer candidates than this stay on one thread: sharing them with the helper costs more than it saves.
constexpr std::size_t kSplitCandidates = 16;
constexpr std::size_t kPrfTop = 3;

float by_max(float value, float top) { return top > 0.0f ? value / top : 0.0f; }

// Every candidate's tokens, window spans and window vectors (and, for the whole rerank, its dense row), asked for
// at once into L2 before the passes that read them. They lie anywhere in the stores and are cold after the encode
// and the dense scan; asked for only a few candidates ahead, as the passes do, most of each miss stayed exposed
// (SciFact, plain_stages.py: rerank 288 -> 211 us p50). Candidates must be checked: their offsets are read.
void prefetch_candidates(const LocalStore& store, const float* vectors, std::size_t d,
                         const std::int64_t* candidates, std::size_t m) {
    const WindowStore& windows = store.windows;
    const LexicalStore& lexical = store.lexical;
    const std::size_t row_bytes = windows.d * element_bytes(windows.type);
    for (std::size_t r = 0; r < m; ++r) {
        const std::int64_t c = candidates[r];
        const std::int64_t w = windows.offsets[c];
        prefetch_bytes_l2(static_cast<const char*>(windows.vectors) + static_cast<std::size_t>(w) * row_bytes,
                          static_cast<std::size_t>(windows.offsets[c + 1] - w) * row_bytes);
        const std::int64_t first = lexical.tokens.offsets[c];
        prefetch_bytes_l2(lexical.tokens.tokens + first,
                          static_cast<std::size_t>(lexical.tokens.offsets[c + 1] - first) * sizeof(std::int32_t));
        const std::int64_t s = lexical.window_offsets[c];
        prefetch_bytes_l2(lexical.window_spans + 2 * s,
                          static_cast<std::size_t>(lexical.window_offsets[c + 1] - s) * 2 * sizeof(std::int32_t));
    }
    if (vectors == nullptr) return;
    for (std::size_t r = 0; r < m; ++r) {
        prefetch_bytes_l2(vectors + static_cast<std::size_t>(candidates[r]) * d, d * sizeof(float));
    }
}

// local_features, with the candidates' dense rows (vectors, d columns; none when null) prefetched as well for the
// finish that follows.
void local_features_prefetching(const LocalStore& store, const float* query, const QueryTerms& terms,
                                const std::int64_t* candidates, std::size_t m, simd::Level level, float* out,
                                const float* vectors, std::size_t d) {
    if (store.windows.n_chunks != store.lexical.tokens.n_chunks) {
        fail("window_offsets and token_offsets must describe the same chunks (" +
             std::to_string(store.windows.n_chunks) + " and " + std::to_string(store.lexical.tokens.n_chunks) + ")");
    }
    check_query_terms(terms);
    check_params(store.bm25);
    check_lexical_candidates(store.lexical, candidates, m);
    prefetch_candidates(store, vectors, d, candidates, m);
    std::vector<float> scratch(4 * m);  // window (3) then lexical (4) columns
    window_maxsim(query, store.windows, candidates, m, store.temperature, level, scratch.data());
    for (std::size_t i = 0; i < m; ++i) std::copy_n(scratch.data() + 3 * i, 3, out + i * kLocalColumns + 4);
    check_distinct_terms(terms);
    // One pass over each candidate's tokens gives its BM25 counts and its proximity (rag::proximity's values).
    std::vector<std::int32_t> span(m);
    std::vector<std::int32_t> matched(m);
    lexical_unchecked(store.lexical, terms, candidates, m, store.bm25, scratch.data(), span.data(), matched.data());
    for (std::size_t i = 0; i < m; ++i) std::copy_n(scratch.data() + 4 * i, 4, out + i * kLocalColumns);
    for (std::size_t i = 0; i < m; ++i) {
        out[i * kLocalColumns + 7] =
            matched[i] >= 2 ? static_cast<float>(static_cast<double>(matched[i]) / std::max(span[i], 1)) : 0.0f;
    }
}

}  // namespace

void check_lexical_store(LexicalStore& store) {
    for (std::size_t c = 0; c < store.tokens.n_chunks; ++c) check_chunk(store, static_cast<std::int64_t>(c));
    store.checked = true;
    store.tokens.checked = true;
}

void lexical_features(const LexicalStore& store, const QueryTerms& query, const std::int64_t* candidates,
                      std::size_t m, const Bm25Params& params, float* out) {
    check_query_terms(query);
    check_params(params);
    check_lexical_candidates(store, candidates, m);
    lexical_unchecked(store, query, candidates, m, params, out);
}

void local_features(const LocalStore& store, const float* query, const QueryTerms& terms,
                    const std::int64_t* candidates, std::size_t m, simd::Level level, float* out) {
    local_features_prefetching(store, query, terms, candidates, m, level, out, nullptr, 0);
}

void finish_features(const FinishInput& in, simd::Level level, float* out) {
    const std::size_t m = in.m;
    if (m == 0) return;
    check_finite(in.query, in.d, 1, "query");
    check_finite(in.fused, m, 1, "fused_scores");
    for (std::size_t i = 0; i < m; ++i) {
        const std::int64_t row = in.rows ? in.rows[i] : static_cast<std::int64_t>(i);
        if (row < 0 || static_cast<std::size_t>(row) >= in.n_rows) {
            fail("candidates must be in [0, " + std::to_string(in.n_rows) + ") (rows of vectors), got " +
                 std::to_string(row) + " at index " + std::to_string(i));
        }
    }
    for (std::size_t i = 0; i < m; ++i) {
        const float* row = in.local + i * kLocalColumns;
        for (std::size_t j = 0; j < kLocalColumns; ++j) {
            // the window columns are NaN for a chunk without windows; everything else must be finite
            if (!std::isfinite(row[j]) && !(j >= 4 && j < 7 && std::isnan(row[j]))) {
                fail("local_features must be finite (NaN allowed in the window columns), got " +
                     std::to_string(row[j]) + " at [" + std::to_string(i) + ", " + std::to_string(j) + "]");
            }
        }
    }
    const simd::Dots& dots = simd::dots(level);
    auto vector_of = [&](std::size_t i) {
        return in.vectors + static_cast<std::size_t>(in.rows ? in.rows[i] : static_cast<std::int64_t>(i)) * in.d;
    };
    // PRF centroid: float32 mean of the best fused candidates' vectors, scaled to unit length.
    const std::size_t top = std::min(kPrfTop, m);
    std::vector<float> centroid(vector_of(0), vector_of(0) + in.d);
    for (std::size_t i = 1; i < top; ++i) {
        const float* v = vector_of(i);
        for (std::size_t k = 0; k < in.d; ++k) centroid[k] += v[k];
    }
    double square = 0.0;
    for (std::size_t k = 0; k < in.d; ++k) {
        centroid[k] /= static_cast<float>(top);
        square += static_cast<double>(centroid[k]) * centroid[k];
    }
    const auto norm = static_cast<float>(std::max(static_cast<double>(static_cast<float>(std::sqrt(square))), 1e-12));
    for (float& x : centroid) x /= norm;

    float top_bm25 = -std::numeric_limits<float>::infinity();
    float top_title = top_bm25;
    float top_window = top_bm25;
    for (std::size_t i = 0; i < m; ++i) {
        const float* row = in.local + i * kLocalColumns;
        top_bm25 = std::max(top_bm25, row[0]);
        top_title = std::max(top_title, row[1]);
        top_window = std::max(top_window, row[2]);
    }
    std::vector<std::size_t> by_id(m);
    std::iota(by_id.begin(), by_id.end(), std::size_t{0});
    std::stable_sort(by_id.begin(), by_id.end(),
                     [&](std::size_t a, std::size_t b) { return in.candidates[a] < in.candidates[b]; });
    std::vector<std::int64_t> rank_bm25;
    std::vector<std::int64_t> rank_dense;
    ranks_in(in.bm25_ranked, in.candidates, m, by_id, rank_bm25);
    ranks_in(in.dense_ranked, in.candidates, m, by_id, rank_dense);
    auto reciprocal = [](std::int64_t r) {
        return r < 0 ? 0.0f : static_cast<float>(kRankK / (kRankK + static_cast<double>(r)));
    };
    for (std::size_t i = 0; i < m && i < kPrefetchAhead; ++i) prefetch_bytes(vector_of(i), in.d * sizeof(float));
    for (std::size_t i = 0; i < m; ++i) {
        if (i + kPrefetchAhead < m) prefetch_bytes(vector_of(i + kPrefetchAhead), in.d * sizeof(float));
        const float* local = in.local + i * kLocalColumns;
        const float* v = vector_of(i);
        float* row = out + i * kFeatureColumns;
        const float dense = dots.f32(in.query, v, in.d);
        row[0] = in.fused[i];
        row[1] = by_max(local[0], top_bm25);
        row[2] = dense;
        for (std::size_t j = 0; j < 3; ++j) row[3 + j] = std::isnan(local[4 + j]) ? dense : local[4 + j];
        row[6] = by_max(local[1], top_title);
        row[7] = by_max(local[2], top_window);
        row[8] = local[7];
        row[9] = local[3];
        row[10] = reciprocal(rank_bm25[i]);
        row[11] = reciprocal(rank_dense[i]);
        row[12] = dots.f32(centroid.data(), v, in.d);
    }
}

void rank(const float* features, std::size_t m, const LinearModel& model, float* scores, std::int64_t* order) {
    for (std::size_t j = 0; j < model.f; ++j) {
        if (model.columns[j] < 0 || model.columns[j] >= static_cast<std::int64_t>(kFeatureColumns)) {
            fail("columns must be in [0, " + std::to_string(kFeatureColumns) + "), got " +
                 std::to_string(model.columns[j]) + " at index " + std::to_string(j));
        }
    }
    std::vector<float> picked(m * model.f);
    for (std::size_t i = 0; i < m; ++i) {
        for (std::size_t j = 0; j < model.f; ++j) {
            picked[i * model.f + j] = features[i * kFeatureColumns + static_cast<std::size_t>(model.columns[j])];
        }
    }
    std::vector<float> raw(m);
    linear_scores(picked.data(), m, model.f, model.weights, model.bias, raw.data());
    std::vector<std::int64_t> idx(m);
    std::iota(idx.begin(), idx.end(), std::int64_t{0});
    std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
        return raw[static_cast<std::size_t>(a)] > raw[static_cast<std::size_t>(b)];
    });
    for (std::size_t k = 0; k < m; ++k) {
        order[k] = idx[k];
        scores[k] = raw[static_cast<std::size_t>(idx[k])];
    }
}

void rerank(const LocalStore& store, const float* dense_vectors, std::size_t n_dense, const float* query,
            const QueryTerms& terms, const std::int64_t* candidates, const float* fused, std::size_t m,
            const IdList& bm25_ranked, const IdList& dense_ranked, const LinearModel& model, simd::Level level,
            RerankOutput out, Helper* helper) {
    std::vector<float> local(m * kLocalColumns);
    const std::size_t d = store.windows.d;
    // Shared with the helper a quarter at a time, when it is free: its reads of the candidates' tokens and window
    // vectors then wait beside the caller's, on another core. Fewer candidates stay with the caller.
    share(m >= kSplitCandidates ? helper : nullptr, m, (m + 3) / 4, [&](std::size_t begin, std::size_t end) {
        local_features_prefetching(store, query, terms, candidates + begin, end - begin, level,
                                   local.data() + begin * kLocalColumns, dense_vectors, d);
    });
    FinishInput in;
    in.local = local.data();
    in.vectors = dense_vectors;
    in.rows = candidates;
    in.n_rows = n_dense;
    in.d = store.windows.d;
    in.query = query;
    in.candidates = candidates;
    in.fused = fused;
    in.m = m;
    in.bm25_ranked = bm25_ranked;
    in.dense_ranked = dense_ranked;
    std::vector<float> features(m * kFeatureColumns);
    finish_features(in, level, features.data());
    rank(features.data(), m, model, out.scores, out.order);
    for (std::size_t k = 0; k < m; ++k) {
        const auto i = static_cast<std::size_t>(out.order[k]);
        out.ids[k] = candidates[i];
        std::copy_n(features.data() + i * kFeatureColumns, kFeatureColumns, out.features + k * kFeatureColumns);
    }
}

}  // namespace rag
