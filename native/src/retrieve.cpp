#include "retrieve.hpp"

#include "prefetch.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace rag {

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

struct Hit {
    float score;
    std::int64_t id;
};

// Rank order: score descending, then id ascending. As a heap comparator it keeps the worst hit at the root.
inline bool better(const Hit& a, const Hit& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// The best `depth` hits offered. Offers go to a buffer of 2 x depth; a full buffer is cut to its best `depth` by one
// selection (nth_element), whose worst becomes the bar a later offer must beat. Amortised O(1) per offer, where a
// binary heap paid a sift of log(depth) mispredicted branches for every offer that got in: SciFact's dense scan
// (10,435 rows into a top 200) spent ~75 µs of its ~180 there.
class TopK {
public:
    explicit TopK(std::size_t depth) : depth_(std::max<std::size_t>(depth, 1)) { buffer_.reserve(2 * depth_); }

    // Whether a bar is set: then only a hit better than worst() can still get in.
    bool full() const { return has_bar_; }
    const Hit& worst() const { return bar_; }

    void offer(float score, std::int64_t id) {
        const Hit hit{score, id};
        if (has_bar_ && !better(hit, bar_)) return;
        buffer_.push_back(hit);
        if (buffer_.size() == 2 * depth_) cut();
    }

    // The kept hits, best first.
    std::vector<Hit> take() {
        std::vector<Hit> out = take_unordered();
        std::sort(out.begin(), out.end(), better);
        return out;
    }

    // The kept hits in no particular order.
    std::vector<Hit> take_unordered() {
        if (buffer_.size() > depth_) cut();
        return std::move(buffer_);
    }

private:
    void cut() {
        std::nth_element(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(depth_ - 1), buffer_.end(),
                         better);
        buffer_.resize(depth_);
        bar_ = buffer_[depth_ - 1];
        has_bar_ = true;
    }

    std::size_t depth_;
    std::vector<Hit> buffer_;
    Hit bar_{0.0f, 0};
    bool has_bar_ = false;
};

Hits to_hits(const std::vector<Hit>& sorted, std::size_t limit) {
    const std::size_t k = std::min(limit, sorted.size());
    Hits out;
    out.ids.resize(k);
    out.scores.resize(k);
    for (std::size_t i = 0; i < k; ++i) {
        out.ids[i] = sorted[i].id;
        out.scores[i] = sorted[i].score;
    }
    return out;
}

// Per-thread score accumulator: zero between calls (every touched entry is reset while ranking), so a request does
// not allocate and clear n_docs floats.
std::vector<float>& accumulator(std::size_t n_docs) {
    thread_local std::vector<float> acc;
    if (acc.size() != n_docs) acc.assign(n_docs, 0.0f);
    return acc;
}

// The first row at or after i that the mask allows (n when none; every row without a mask). A selective mask is
// mostly zero bytes, skipped eight at a time: byte by byte, the mask of a 1M-row index alone cost ~1 ms per query.
inline std::size_t next_allowed(const std::uint8_t* mask, std::size_t i, std::size_t n) {
    if (mask == nullptr) return i;
    for (; i < n && (i & 7) != 0; ++i) {
        if (mask[i] != 0) return i;
    }
    for (; i + 8 <= n; i += 8) {
        std::uint64_t word;
        std::memcpy(&word, mask + i, sizeof word);
        if (word != 0) break;
    }
    while (i < n && mask[i] == 0) ++i;
    return i;
}

// The rows a masked scan reads lie scattered over the matrix (1.5 GB of floats at 1M rows), each a cache miss that
// the hardware prefetcher cannot foresee: asking for the next few allowed rows ahead overlaps those misses.
// Calls visit(i) for every row i the mask allows, in id order, with rows of `row_bytes` at `base` prefetched
// kPrefetchAhead allowed rows ahead. The mask is read once: allowed ids are gathered a block at a time. Without a mask
// the rows are read in order, which the hardware prefetches itself.
template <class Visit>
void scan_allowed(const std::uint8_t* mask, std::size_t n, const std::uint8_t* base, std::size_t row_bytes,
                  Visit&& visit) {
    if (mask == nullptr) {
        for (std::size_t i = 0; i < n; ++i) visit(i);
        return;
    }
    constexpr std::size_t kBlock = 64;
    std::size_t ids[kBlock];
    std::size_t next = next_allowed(mask, 0, n);
    while (next < n) {
        std::size_t count = 0;
        for (; count < kBlock && next < n; next = next_allowed(mask, next + 1, n)) ids[count++] = next;
        for (std::size_t k = 0; k < count && k < kPrefetchAhead; ++k) {
            prefetch_bytes(base + ids[k] * row_bytes, row_bytes);
        }
        for (std::size_t k = 0; k < count; ++k) {
            if (k + kPrefetchAhead < count) prefetch_bytes(base + ids[k + kPrefetchAhead] * row_bytes, row_bytes);
            visit(ids[k]);
        }
    }
}

// round(q[j] * scale[j] * 127 / max_j |q[j] * scale[j]|), every step in float32 (rounding half to even), as
// kernels.reference.quantize_query computes it: the same candidates on every platform.
// A null scale means 1 throughout.
std::vector<std::int8_t> quantize_query(const float* query, const float* scale, std::size_t d) {
    std::vector<float> qs(d);
    float largest = 0.0f;
    for (std::size_t j = 0; j < d; ++j) {
        qs[j] = scale == nullptr ? query[j] : query[j] * scale[j];
        largest = std::max(largest, std::fabs(qs[j]));
    }
    const float inv = largest > 0.0f ? 127.0f / largest : 0.0f;
    std::vector<std::int8_t> out(d);
    for (std::size_t j = 0; j < d; ++j) out[j] = static_cast<std::int8_t>(std::nearbyint(qs[j] * inv));
    return out;
}

// Chunks in which a dense scan shares its work with the helper (share): rows of sign bits, kept rows' codes, float
// rows rescored.
constexpr std::size_t kShareBits = 2048;
constexpr std::size_t kShareCodes = 256;
constexpr std::size_t kShareRows = 32;

// The `keep` rows (keep < rows.n) with the largest sum of the int8 query's entries over their set sign bits, ties
// by id ascending, in ascending id order. The query is quantized as the codes' query is, without the codes' scale:
// the bits stand for the centred row's signs, and the centring adds the same q . mean to every row. Selection by
// counting: the sums lie within +-127 * d, so a histogram of their top bits finds the bucket that holds the keep-th
// largest, and only that bucket is sorted to find it exactly.
std::vector<std::int64_t> bits_top(const DenseRows& rows, const float* query, std::size_t keep,
                                   const simd::Dots& dots, Helper* helper) {
    const std::size_t n = rows.n;
    const std::size_t words = rows.words;
    std::vector<std::int8_t> q(words * 64, 0);
    const std::vector<std::int8_t> qq = quantize_query(query, nullptr, rows.d);
    std::copy(qq.begin(), qq.end(), q.begin());
    std::vector<std::int32_t> sum_buffer(n);
    std::int32_t* const sums = sum_buffer.data();
    share(helper, n, kShareBits, [&](std::size_t begin, std::size_t end) {
        dots.bits_rows(q.data(), rows.bits + begin * words, end - begin, words, sums + begin);
    });
    // |sum| <= 127 * d, so the sums offset by that bound fit the histogram after a fixed shift.
    const auto bound = static_cast<std::int32_t>(127 * rows.d);
    constexpr std::size_t kBuckets = 4096;
    unsigned shift = 0;
    while ((static_cast<std::uint32_t>(2 * bound) >> shift) >= kBuckets) ++shift;
    std::uint32_t counts[kBuckets] = {};
    for (std::size_t i = 0; i < n; ++i) ++counts[static_cast<std::uint32_t>(sums[i] + bound) >> shift];
    // The bucket holding the keep-th largest sum, and how many sums lie above it.
    std::size_t above = 0;
    std::size_t bucket = kBuckets;
    while (bucket > 0) {
        --bucket;
        if (above + counts[bucket] >= keep) break;
        above += counts[bucket];
    }
    std::vector<std::int32_t> inside(counts[bucket]);
    std::size_t m = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const std::int32_t x = sums[i];
        inside[m] = x;  // written always, kept only when in the bucket: no branch per sum
        m += (static_cast<std::uint32_t>(x + bound) >> shift) == bucket ? 1 : 0;
        if (m == inside.size()) break;
    }
    // The keep-th largest sum overall is the (keep - above)-th largest inside the bucket.
    const std::size_t rank = keep - above - 1;
    std::nth_element(inside.begin(), inside.begin() + static_cast<std::ptrdiff_t>(rank), inside.end(),
                     std::greater<>());
    const std::int32_t bar = inside[rank];
    // Sums equal to bar that are kept: bar's own place and those above it inside the bucket.
    std::size_t ties = 1;
    for (std::size_t i = 0; i < rank; ++i) ties += inside[i] == bar ? 1 : 0;
    std::vector<std::int64_t> out(keep);
    std::int64_t* const kept = out.data();
    std::size_t k = 0;
    for (std::size_t i = 0; i < n && k < keep; ++i) {
        const std::int32_t x = sums[i];
        kept[k] = static_cast<std::int64_t>(i);
        const bool tie = x == bar && ties > 0;
        ties -= tie ? 1 : 0;
        k += (x > bar || tie) ? 1 : 0;
    }
    return out;
}

// bm25_top reads its sums in chunk order once the query's postings reach 1/kScanRatio of the chunks, on an index
// whose sums outgrow the core's own caches (kScanMinChunks floats): there a stream of the sums costs about what that
// many postings' random reads do (1M chunks: p50 6.4 -> 4.4 ms, p99 19.6 -> 7.5), while on a small index the
// postings' reads hit the cache and the scan only adds work (SciFact's 10,435 chunks: 53 -> 66 µs at p50).
constexpr std::size_t kScanRatio = 8;
constexpr std::size_t kScanMinChunks = std::size_t{1} << 17;

// With bounds, bm25_top ranks block by block once the query's postings reach kBlocksRatio per block: below that the
// postings pass costs less than the bounds' sweep over every block.
constexpr std::size_t kBlocksRatio = 2;
// Blocks are taken best bound first by a counting sort of their bounds into this many ranges.
constexpr std::size_t kBlockBuckets = 1024;

// Blocks scored best bound first before the rest are taken in chunk order: enough to set a bar near the final
// depth-th score, few enough that their scattered reads cost little.
constexpr std::size_t kBestFirstBlocks = 32;

// bm25_top with bounds. A block's bound is the sum, in query-term order and in float32 like the scores, of each
// term's largest weight in it; float addition rounds monotonically, so no chunk of the block sums to more. Each
// chunk's sum is made in query-term order, as the postings pass makes it. The blocks with the best bounds are
// scored first, until the top has a bar (the depth-th score so far) and kBestFirstBlocks are done; then the others
// in chunk order (the lists' postings read as a stream), skipping every block whose bound is below the bar. A block
// skipped holds no chunk that could enter the top, so the top is the postings pass's.
Hits bm25_top_blocks(const Postings& p, const std::int64_t* term_ids, std::size_t n_query_terms,
                     const std::uint8_t* mask, std::size_t depth) {
    const BlockBounds& bb = *p.blocks;
    const std::size_t nb = bb.n_blocks;
    const std::size_t n = p.n_docs;
    const unsigned shift = bb.shift;
    const std::size_t width = std::size_t{1} << shift;
    struct Scratch {
        std::vector<float> bound, sums, top_of;
        std::vector<std::uint32_t> count, order, starts;
        std::vector<const std::uint32_t*> first;  // per query term: offsets of its blocks' first postings
    };
    thread_local Scratch w;
    w.bound.assign(nb, 0.0f);
    float* const bound = w.bound.data();
    // A short list's offsets per block are made here (its length plus a pass over the blocks), once per term.
    std::size_t short_lists = 0;
    for (std::size_t k = 0; k < n_query_terms; ++k) short_lists += bb.row[static_cast<std::size_t>(term_ids[k])] < 0;
    w.starts.resize(short_lists * (nb + 1));
    w.first.assign(n_query_terms, nullptr);
    std::size_t made = 0;
    for (std::size_t k = 0; k < n_query_terms; ++k) {
        const std::int64_t t = term_ids[k];
        const std::int32_t r = bb.row[static_cast<std::size_t>(t)];
        if (r >= 0) {
            w.first[k] = bb.start.data() + static_cast<std::size_t>(r) * (nb + 1);
            const float* mx = bb.max.data() + static_cast<std::size_t>(r) * nb;
            for (std::size_t b = 0; b < nb; ++b) bound[b] += mx[b];
            continue;
        }
        const std::int64_t lo = p.indptr[t];
        const auto len = static_cast<std::uint32_t>(p.indptr[t + 1] - lo);
        for (std::size_t e = 0; e < k; ++e) {
            if (term_ids[e] == t) w.first[k] = w.first[e];
        }
        std::uint32_t* first = nullptr;
        if (w.first[k] == nullptr) {
            first = w.starts.data() + (made++) * (nb + 1);
            w.first[k] = first;
        }
        std::uint32_t q = 0;
        std::size_t b = 0;
        while (q < len) {
            const std::size_t here = static_cast<std::size_t>(p.docs[lo + q]) >> shift;
            if (here >= nb) {
                fail("docs[" + std::to_string(lo + q) + "] = " + std::to_string(p.docs[lo + q]) + " is outside [0, " +
                     std::to_string(n) + "): the postings changed after the bounds were made");
            }
            if (first != nullptr) {
                for (; b <= here; ++b) first[b] = q;
            }
            // At least 0: a chunk without the term adds nothing to its sum (as the rows' bounds, made from 0).
            float best = 0.0f;
            while (q < len && (static_cast<std::size_t>(p.docs[lo + q]) >> shift) == here) {
                best = std::max(best, p.weights[lo + q++]);
            }
            bound[here] += best;
        }
        if (first != nullptr) {
            for (; b <= nb; ++b) first[b] = len;
        }
    }
    if (mask != nullptr) {
        // A block the mask shuts entirely offers nothing.
        for (std::size_t b = 0; b < nb; ++b) {
            if (bound[b] <= 0.0f) continue;
            const std::size_t lo = b << shift;
            const std::size_t hi = std::min(n, lo + width);
            if (next_allowed(mask, lo, hi) >= hi) bound[b] = 0.0f;
        }
    }
    float highest = 0.0f;
    for (std::size_t b = 0; b < nb; ++b) highest = std::max(highest, bound[b]);
    TopK top(std::min(depth, n));
    if (!(highest > 0.0f)) return to_hits(top.take(), depth);

    w.sums.assign(width, 0.0f);
    float* const sums = w.sums.data();
    // Scores block b's chunks and offers them; its bound is then set to 0, which marks it done.
    const auto score = [&](std::size_t b) {
        const auto lo = static_cast<std::int32_t>(b << shift);
        const auto span = static_cast<std::uint32_t>(std::min(n, (b << shift) + width) - (b << shift));
        for (std::size_t k = 0; k < n_query_terms; ++k) {
            const std::int64_t base = p.indptr[term_ids[k]];
            const std::uint32_t* first = w.first[k];
            for (std::int64_t q = base + first[b]; q < base + first[b + 1]; ++q) {
                const auto u = static_cast<std::uint32_t>(p.docs[q] - lo);
                if (u >= span) {
                    std::fill(sums, sums + width, 0.0f);
                    fail("docs[" + std::to_string(q) + "] = " + std::to_string(p.docs[q]) +
                         " is not in the block its bounds place it in: the postings changed after the bounds were "
                         "made");
                }
                sums[u] += p.weights[q];
            }
        }
        // Only a sum that reaches the bar (and is > 0) can get in: one comparison per chunk, a branch the predictor
        // gets right once the bar is near the final one (most of a block's chunks fall below it).
        const float least = std::numeric_limits<float>::denorm_min();
        const float bar = top.full() ? std::max(top.worst().score, least) : least;
        for (std::uint32_t u = 0; u < span; ++u) {
            if (sums[u] >= bar && (mask == nullptr || mask[static_cast<std::size_t>(lo) + u] != 0)) {
                top.offer(sums[u], lo + static_cast<std::int64_t>(u));
            }
        }
        std::fill(sums, sums + span, 0.0f);
        bound[b] = 0.0f;
    };

    // Best first: a counting sort of the blocks by range of bound; top_of[j] is the largest bound in ranges j and
    // below, so that the loop can stop without trusting the ranges' edges.
    const float per = static_cast<float>(kBlockBuckets - 1) / highest;
    const auto bucket = [per](float v) { return std::min(kBlockBuckets - 1, static_cast<std::size_t>(v * per)); };
    w.count.assign(kBlockBuckets + 1, 0);
    w.top_of.assign(kBlockBuckets, 0.0f);
    for (std::size_t b = 0; b < nb; ++b) {
        if (bound[b] <= 0.0f) continue;
        const std::size_t j = bucket(bound[b]);
        ++w.count[j + 1];
        w.top_of[j] = std::max(w.top_of[j], bound[b]);
    }
    for (std::size_t j = 1; j < kBlockBuckets; ++j) w.top_of[j] = std::max(w.top_of[j], w.top_of[j - 1]);
    for (std::size_t j = 0; j < kBlockBuckets; ++j) w.count[j + 1] += w.count[j];  // count[j]: range j's first slot
    w.order.resize(w.count[kBlockBuckets]);
    {
        std::vector<std::uint32_t> next(w.count.begin(), w.count.end() - 1);
        for (std::size_t b = 0; b < nb; ++b) {
            if (bound[b] > 0.0f) w.order[next[bucket(bound[b])]++] = static_cast<std::uint32_t>(b);
        }
    }
    std::size_t done = 0;
    bool rest = false;
    for (std::size_t j = kBlockBuckets; j-- > 0 && !rest;) {
        if (top.full() && w.top_of[j] < top.worst().score) return to_hits(top.take(), depth);
        for (std::uint32_t slot = w.count[j]; slot < w.count[j + 1]; ++slot) {
            const std::size_t b = w.order[slot];
            if (top.full() && bound[b] < top.worst().score) continue;
            score(b);
            if (top.full() && ++done >= kBestFirstBlocks) {
                rest = true;
                break;
            }
        }
    }
    if (rest) {
        for (std::size_t b = 0; b < nb; ++b) {
            if (bound[b] > 0.0f && !(bound[b] < top.worst().score)) score(b);
        }
    }
    return to_hits(top.take(), depth);
}

std::int64_t elapsed_ns(std::chrono::steady_clock::time_point since) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

Hits bm25_top(const Postings& p, const std::int64_t* term_ids, std::size_t n_query_terms, const std::uint8_t* mask,
              std::int64_t depth) {
    if (depth < 1) fail("depth must be >= 1, got " + std::to_string(depth));
    for (std::size_t k = 0; k < n_query_terms; ++k) {
        const std::int64_t t = term_ids[k];
        if (t < 0 || static_cast<std::size_t>(t) >= p.n_terms) {
            fail("term_ids[" + std::to_string(k) + "] = " + std::to_string(t) + " is outside [0, " +
                 std::to_string(p.n_terms) + ")");
        }
        const std::int64_t lo = p.indptr[t];
        const std::int64_t hi = p.indptr[t + 1];
        if (lo < 0 || hi < lo || static_cast<std::size_t>(hi) > p.n_postings) {
            fail("indptr[" + std::to_string(t) + ":" + std::to_string(t + 2) + "] = [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "] is not a range of the " + std::to_string(p.n_postings) + " postings");
        }
    }
    const std::size_t n = p.n_docs;
    TopK top(std::min(static_cast<std::size_t>(depth), std::max<std::size_t>(n, 1)));
    if (n == 0 || n_query_terms == 0) return to_hits(top.take(), static_cast<std::size_t>(depth));
    std::size_t total = 0;
    for (std::size_t k = 0; k < n_query_terms; ++k) {
        total += static_cast<std::size_t>(p.indptr[term_ids[k] + 1] - p.indptr[term_ids[k]]);
    }
    if (p.blocks != nullptr) {
        const BlockBounds& bb = *p.blocks;
        if (bb.indptr != p.indptr || bb.docs != p.docs || bb.weights != p.weights || bb.n_terms != p.n_terms ||
            bb.n_docs != n) {
            fail("blocks were made from other postings");
        }
        if (total >= kBlocksRatio * bb.n_blocks) {
            return bm25_top_blocks(p, term_ids, n_query_terms, mask, static_cast<std::size_t>(depth));
        }
    }
    std::vector<float>& acc = accumulator(n);
    // Same additions in the same order as the numba scorer: float32, query term by query term, postings in order.
    for (std::size_t k = 0; k < n_query_terms; ++k) {
        const std::int64_t t = term_ids[k];
        for (std::int64_t q = p.indptr[t]; q < p.indptr[t + 1]; ++q) {
            const std::int32_t d = p.docs[q];
            if (d < 0 || static_cast<std::size_t>(d) >= n) {
                acc.assign(n, 0.0f);  // leave the buffer clean for the next call
                fail("docs[" + std::to_string(q) + "] = " + std::to_string(d) + " is outside [0, " +
                     std::to_string(n) + ")");
            }
            acc[static_cast<std::size_t>(d)] += p.weights[q];
        }
    }
    // Offers chunk d's sum, if it is a score the mask allows, and clears it: zeroing marks the chunk as offered and
    // leaves the buffer clean for the next call.
    float* const sums = acc.data();
    const auto settle = [sums, mask, &top](std::size_t d) {
        const float s = sums[d];
        sums[d] = 0.0f;
        if (s <= 0.0f) return;
        if (mask != nullptr && mask[d] == 0) return;
        top.offer(s, static_cast<std::int64_t>(d));
    };
    if (n >= kScanMinChunks && total * kScanRatio >= n) {
        // Postings that cover much of the index: read the sums in chunk order, a stream, rather than at each
        // posting again, a random read and write apiece (at 1M chunks, ~half of the scorer's time). Offers then come
        // in id order; the top is the same whatever the order. Blocks left at zero are skipped, and only the blocks
        // read nonzero are cleared.
        constexpr std::size_t kBlock = 16;
        for (std::size_t base = 0; base < n; base += kBlock) {
            const std::size_t end = std::min(n, base + kBlock);
            std::uint32_t any = 0;
            for (std::size_t d = base; d < end; ++d) {
                std::uint32_t bits;
                std::memcpy(&bits, sums + d, sizeof bits);
                any |= bits;
            }
            if (any == 0) continue;
            for (std::size_t d = base; d < end; ++d) settle(d);
        }
        return to_hits(top.take(), static_cast<std::size_t>(depth));
    }
    // Visit only the chunks a query term touches (a chunk met again has a zero sum by then).
    for (std::size_t k = 0; k < n_query_terms; ++k) {
        const std::int64_t t = term_ids[k];
        for (std::int64_t q = p.indptr[t]; q < p.indptr[t + 1]; ++q) settle(static_cast<std::size_t>(p.docs[q]));
    }
    return to_hits(top.take(), static_cast<std::size_t>(depth));
}

BlockBounds block_bounds(const Postings& p, std::int64_t shift, std::size_t min_postings) {
    if (shift < 0 || shift > static_cast<std::int64_t>(kBlocksMaxShift)) {
        fail("shift must be in [0, " + std::to_string(kBlocksMaxShift) + "], got " + std::to_string(shift));
    }
    const std::size_t n = p.n_docs;
    BlockBounds bb;
    bb.shift = static_cast<unsigned>(shift);
    bb.n_blocks = (n + (std::size_t{1} << shift) - 1) >> shift;
    bb.indptr = p.indptr;
    bb.docs = p.docs;
    bb.weights = p.weights;
    bb.n_terms = p.n_terms;
    bb.n_docs = n;
    bb.row.assign(p.n_terms, -1);
    const std::size_t least = std::max<std::size_t>(min_postings == kRowsPerBlock ? bb.n_blocks : min_postings, 1);
    if (p.indptr[0] < 0) fail("indptr[0] = " + std::to_string(p.indptr[0]) + " is negative");
    for (std::size_t t = 0; t < p.n_terms; ++t) {
        const std::int64_t lo = p.indptr[t];
        const std::int64_t hi = p.indptr[t + 1];
        if (hi < lo || static_cast<std::size_t>(hi) > p.n_postings) {
            fail("indptr[" + std::to_string(t) + ":" + std::to_string(t + 2) + "] = [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "] is not a range of the " + std::to_string(p.n_postings) + " postings");
        }
        for (std::int64_t q = lo; q < hi; ++q) {
            const std::int32_t d = p.docs[q];
            if (d < 0 || static_cast<std::size_t>(d) >= n || (q > lo && d <= p.docs[q - 1])) {
                fail("docs[" + std::to_string(q) + "] = " + std::to_string(d) + " is not in [0, " +
                     std::to_string(n) + ") after the list's previous chunk: bounds need each list in ascending "
                     "chunk order");
            }
        }
        if (static_cast<std::size_t>(hi - lo) >= least) {
            bb.row[t] = static_cast<std::int32_t>(bb.rows++);
        }
    }
    const std::size_t nb = bb.n_blocks;
    bb.max.assign(bb.rows * nb, 0.0f);
    bb.start.assign(bb.rows * (nb + 1), 0);
    for (std::size_t t = 0; t < p.n_terms; ++t) {
        const std::int32_t r = bb.row[t];
        if (r < 0) continue;
        float* mx = bb.max.data() + static_cast<std::size_t>(r) * nb;
        std::uint32_t* first = bb.start.data() + static_cast<std::size_t>(r) * (nb + 1);
        const std::int64_t lo = p.indptr[t];
        const auto len = static_cast<std::uint32_t>(p.indptr[t + 1] - lo);
        std::uint32_t q = 0;
        for (std::size_t b = 0; b < nb; ++b) {
            first[b] = q;
            float best = 0.0f;
            while (q < len && (static_cast<std::size_t>(p.docs[lo + q]) >> shift) == b) {
                best = std::max(best, p.weights[lo + q]);
                ++q;
            }
            mx[b] = best;
        }
        first[nb] = len;
    }
    return bb;
}

Hits dense_top(const DenseRows& rows, const float* query, const std::uint8_t* mask, std::int64_t depth,
               std::int64_t oversample, simd::Level level, Helper* helper) {
    if (depth < 1) fail("depth must be >= 1, got " + std::to_string(depth));
    if (oversample < 0) fail("oversample must be >= 0, got " + std::to_string(oversample));
    if (oversample > 0 && rows.codes == nullptr) fail("oversample > 0 needs codes (the sq8 codes of the vectors)");
    const std::size_t d = rows.d;
    for (std::size_t j = 0; j < d; ++j) {
        if (!std::isfinite(query[j])) fail("query[" + std::to_string(j) + "] is not finite");
    }
    const simd::Dots& dots = simd::dots(level);
    const std::size_t n = rows.n;
    const auto k = static_cast<std::size_t>(depth);
    if (oversample == 0) {
        TopK top(std::min(k, std::max<std::size_t>(n, 1)));
        scan_allowed(mask, n, reinterpret_cast<const std::uint8_t*>(rows.vectors), d * sizeof(float),
                     [&](std::size_t i) {
                         const float s = dots.f32(query, rows.vectors + i * d, d);
                         // Rows come in id order, so a score equal to the worst kept loses its tie: only a higher
                         // one enters.
                         if (!top.full() || s > top.worst().score) top.offer(s, static_cast<std::int64_t>(i));
                     });
        return to_hits(top.take(), k);
    }
    // Decoded inner product = q . base + (q * scale) . code; the first term is the same for every row, so the codes
    // are ranked by the second alone, with q * scale itself quantized to int8 (symmetric, its largest entry at 127):
    // an exact integer dot product per row, which VNNI computes 64 bytes per instruction. Only which rows become
    // candidates depends on the rounding; their scores are the float rows' exact ones.
    const std::vector<std::int8_t> qq = quantize_query(query, rows.scale, d);
    // Clamped before multiplying, so no depth or oversample overflows the product.
    const std::size_t cap = std::max<std::size_t>(n, 1);
    const auto factor = static_cast<std::size_t>(oversample);
    const std::size_t wide_k = factor >= cap ? cap : std::min(std::min(k, cap) * factor, cap);
    TopK wide(wide_k);
    // Rows are scored a block at a time, so the kernel can run several rows' accumulator chains side by side.
    constexpr std::size_t kBlock = 64;
    const std::int8_t* block[kBlock];
    std::int64_t block_ids[kBlock];
    std::int32_t block_scores[kBlock];
    std::size_t passing[kBlock];
    std::size_t count = 0;
    // Once the bar is set, most rows fall below it: the block's rows that beat it are listed without a branch per
    // row (a compare and a conditional count), and only those are offered. Offering row by row behind a branch
    // cost as much as the kernel itself on SciFact (10,435 rows into a top 200).
    // Offers the block's scored rows (block_ids, block_scores) in their order.
    auto offer_block = [&]() {
        // Exact in a float below d = 1032 (|s| <= 127 * 128 * d); above, rounded as the reference rounds it.
        if (!wide.full()) {
            for (std::size_t j = 0; j < count; ++j) wide.offer(static_cast<float>(block_scores[j]), block_ids[j]);
        } else {
            const float bar = wide.worst().score;
            std::size_t m = 0;
            for (std::size_t j = 0; j < count; ++j) {
                passing[m] = j;
                m += static_cast<float>(block_scores[j]) > bar ? 1 : 0;
            }
            // offer() checks against the bar again: it may rise within the block.
            for (std::size_t t = 0; t < m; ++t) {
                wide.offer(static_cast<float>(block_scores[passing[t]]), block_ids[passing[t]]);
            }
        }
        count = 0;
    };
    auto flush = [&]() {
        dots.i8i8_rows(qq.data(), block, count, d, block_scores);
        offer_block();
    };
    const std::size_t keep = bits_keep(wide_k);
    if (mask == nullptr && rows.bits != nullptr && keep * kBitsMinRatio <= n) {
        // The codes of the rows the sign bits keep, in id order (so offers come in the order of a full scan, and
        // ties fall the same way).
        const std::vector<std::int64_t> kept = bits_top(rows, query, keep, dots, helper);
        // Their codes scored first (shared with the helper: the rows lie apart, each a wait on memory), then offered
        // in id order as a scan would.
        std::vector<std::int32_t> kept_scores(kept.size());
        share(helper, kept.size(), kShareCodes, [&](std::size_t begin, std::size_t end) {
            const std::int8_t* rows_of[kBlock];
            for (std::size_t b = begin; b < end; b += kBlock) {
                const std::size_t n_block = std::min(kBlock, end - b);
                for (std::size_t j = 0; j < n_block; ++j) {
                    // Rows apart from each other: the hardware prefetcher does not follow them.
                    if (b + j + kPrefetchAhead < end) {
                        prefetch_bytes(rows.codes + static_cast<std::size_t>(kept[b + j + kPrefetchAhead]) * d, d);
                    }
                    rows_of[j] = rows.codes + static_cast<std::size_t>(kept[b + j]) * d;
                }
                dots.i8i8_rows(qq.data(), rows_of, n_block, d, kept_scores.data() + b);
            }
        });
        for (std::size_t r = 0; r < kept.size(); r += kBlock) {
            count = std::min(kBlock, kept.size() - r);
            std::copy_n(kept.data() + r, count, block_ids);
            std::copy_n(kept_scores.data() + r, count, block_scores);
            offer_block();
        }
    } else if (mask == nullptr) {
        // Every row, a block at a time: no per-row visit (the rows are read in order, which the hardware
        // prefetches itself).
        for (std::size_t start = 0; start < n; start += kBlock) {
            count = std::min(kBlock, n - start);
            for (std::size_t j = 0; j < count; ++j) {
                block[j] = rows.codes + (start + j) * d;
                block_ids[j] = static_cast<std::int64_t>(start + j);
            }
            flush();
        }
    } else {
        scan_allowed(mask, n, reinterpret_cast<const std::uint8_t*>(rows.codes), d, [&](std::size_t i) {
            block[count] = rows.codes + i * d;
            block_ids[count] = static_cast<std::int64_t>(i);
            if (++count == kBlock) flush();
        });
        flush();
    }
    std::vector<Hit> candidates = wide.take_unordered();
    // Ascending ids read the (memory-mapped) float rows in file order.
    std::sort(candidates.begin(), candidates.end(), [](const Hit& a, const Hit& b) { return a.id < b.id; });
    TopK top(std::min(k, std::max<std::size_t>(candidates.size(), 1)));
    const std::size_t row_bytes = d * sizeof(float);
    // Exact scores (shared with the helper, as the codes were), then offered in id order.
    std::vector<float> exact(candidates.size());
    share(helper, candidates.size(), kShareRows, [&](std::size_t begin, std::size_t end) {
        for (std::size_t c = begin; c < end; ++c) {
            if (c + kPrefetchAhead < end) {
                prefetch_bytes(rows.vectors + static_cast<std::size_t>(candidates[c + kPrefetchAhead].id) * d,
                               row_bytes);
            }
            exact[c] = dots.f32(query, rows.vectors + static_cast<std::size_t>(candidates[c].id) * d, d);
        }
    });
    for (std::size_t c = 0; c < candidates.size(); ++c) top.offer(exact[c], candidates[c].id);
    return to_hits(top.take(), k);
}

void row_quantize(const float* rows, std::size_t n, std::size_t d, std::int8_t* codes, float* scale, float* slack,
                  float* norm) {
    for (std::size_t i = 0; i < n * d; ++i) {
        if (!std::isfinite(rows[i])) {
            fail("vectors[" + std::to_string(i / d) + ", " + std::to_string(i % d) + "] is not finite");
        }
    }
    const auto up = [](double x) {
        return std::nextafter(static_cast<float>(x), std::numeric_limits<float>::infinity());
    };
    for (std::size_t i = 0; i < n; ++i) {
        const float* row = rows + i * d;
        std::int8_t* code = codes + i * d;
        float largest = 0.0f;
        for (std::size_t j = 0; j < d; ++j) largest = std::max(largest, std::fabs(row[j]));
        const float inv = largest > 0.0f ? 127.0f / largest : 0.0f;
        const float s = largest / 127.0f;
        double err2 = 0.0;
        double decoded2 = 0.0;
        for (std::size_t j = 0; j < d; ++j) {
            const float c = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[j] * inv)));
            code[j] = static_cast<std::int8_t>(c);
            const double decoded = static_cast<double>(c) * static_cast<double>(s);
            const double err = static_cast<double>(row[j]) - decoded;
            err2 += err * err;
            decoded2 += decoded * decoded;
        }
        scale[i] = s;
        slack[i] = up(std::sqrt(err2));
        norm[i] = up(std::sqrt(decoded2));
    }
}

Hits dense_above(const CodedRows& rows, const float* query, const std::uint8_t* mask, double min_score,
                 std::int64_t depth, simd::Level level) {
    if (depth < 1) fail("depth must be >= 1, got " + std::to_string(depth));
    if (std::isnan(min_score)) fail("min_score must be a number, got NaN");
    const std::size_t d = rows.d;
    double q_norm2 = 0.0;
    float largest = 0.0f;
    for (std::size_t j = 0; j < d; ++j) {
        if (!std::isfinite(query[j])) fail("query[" + std::to_string(j) + "] is not finite");
        q_norm2 += static_cast<double>(query[j]) * query[j];
        largest = std::max(largest, std::fabs(query[j]));
    }
    const std::vector<std::int8_t> qq = quantize_query(query, nullptr, d);
    // The quantized query decodes as qq * q_scale; q_err is how far that lies from the query.
    const double q_scale = static_cast<double>(largest) / 127.0;
    double q_err2 = 0.0;
    for (std::size_t j = 0; j < d; ++j) {
        const double e = static_cast<double>(query[j]) - qq[j] * q_scale;
        q_err2 += e * e;
    }
    const double q_norm = std::sqrt(q_norm2);
    const double q_err = std::sqrt(q_err2);
    // q . row = qd . cd + q . (row - cd) + (q - qd) . cd for the decoded vectors qd and cd, so
    // |q . row - qd . cd| <= |q| slack + q_err |cd| (Cauchy-Schwarz). The float sum that gives the exact score is
    // itself within (d + 1) 2^-24 |q| |row| of the real one, whatever its order: a generous 2^-23 (d + 2) covers it,
    // and 1e-9 the rounding of this bound's own double arithmetic.
    const double sum_err = std::ldexp(static_cast<double>(d) + 2.0, -23) * q_norm;
    struct Candidate {
        double upper, lower;
        std::int64_t id;
    };
    std::vector<Candidate> candidates;
    constexpr std::size_t kBlock = 64;
    const std::int8_t* block[kBlock];
    std::int64_t block_ids[kBlock];
    std::int32_t block_dots[kBlock];
    std::size_t count = 0;
    const simd::Dots& dots = simd::dots(level);
    auto flush = [&]() {
        dots.i8i8_rows(qq.data(), block, count, d, block_dots);
        for (std::size_t j = 0; j < count; ++j) {
            const auto i = static_cast<std::size_t>(block_ids[j]);
            const double approx = static_cast<double>(block_dots[j]) * q_scale * rows.scale[i];
            const double bound = q_norm * rows.slack[i] + q_err * rows.norm[i] +
                                 sum_err * (static_cast<double>(rows.norm[i]) + rows.slack[i]) + 1e-9;
            if (approx + bound >= min_score) candidates.push_back({approx + bound, approx - bound, block_ids[j]});
        }
        count = 0;
    };
    scan_allowed(mask, rows.n, reinterpret_cast<const std::uint8_t*>(rows.codes), d, [&](std::size_t i) {
        block[count] = rows.codes + i * d;
        block_ids[count] = static_cast<std::int64_t>(i);
        if (++count == kBlock) flush();
    });
    flush();
    const auto k = static_cast<std::size_t>(depth);
    if (candidates.size() > k) {
        // A row whose upper bound lies below the k-th best lower bound has k rows strictly ahead of it.
        std::nth_element(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(k - 1), candidates.end(),
                         [](const Candidate& a, const Candidate& b) { return a.lower > b.lower; });
        const double bar = candidates[k - 1].lower;
        candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                        [bar](const Candidate& c) { return c.upper < bar; }),
                         candidates.end());
    }
    TopK top(std::min(k, std::max<std::size_t>(candidates.size(), 1)));
    for (const Candidate& c : candidates) {
        const float s = dots.f32(query, rows.vectors + static_cast<std::size_t>(c.id) * d, d);
        if (static_cast<double>(s) >= min_score) top.offer(s, c.id);
    }
    return to_hits(top.take(), k);
}

RetrieveResult retrieve(const Postings& postings, const std::int64_t* term_ids, std::size_t n_query_terms,
                        const std::uint8_t* mask, std::int64_t depth, const DenseSource& dense,
                        const FusionParams& fusion, simd::Level level, const RankedList* bm25_given) {
    RetrieveResult out;
    auto start = std::chrono::steady_clock::now();
    if (bm25_given != nullptr) {
        out.bm25.ids.assign(bm25_given->ids, bm25_given->ids + bm25_given->size);
        out.bm25.scores.assign(bm25_given->scores, bm25_given->scores + bm25_given->size);
    } else {
        out.bm25 = bm25_top(postings, term_ids, n_query_terms, mask, depth);
        out.times.bm25_ns = elapsed_ns(start);
    }
    start = std::chrono::steady_clock::now();
    RankedList dense_list = dense.precomputed;
    if (dense.rows != nullptr) {
        out.dense = dense_top(*dense.rows, dense.query, mask, depth, dense.oversample, level, dense.helper);
        dense_list = RankedList{out.dense.ids.data(), out.dense.scores.data(), out.dense.ids.size()};
    }
    out.times.dense_ns = elapsed_ns(start);
    start = std::chrono::steady_clock::now();
    out.fused = fuse(RankedList{out.bm25.ids.data(), out.bm25.scores.data(), out.bm25.ids.size()}, dense_list,
                     fusion);
    out.times.fusion_ns = elapsed_ns(start);
    return out;
}

}  // namespace rag
