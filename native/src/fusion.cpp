#include "fusion.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace rag {
namespace {

constexpr std::uint32_t kNone = 0xFFFFFFFFu;  // "no slot" / "absent from this list"

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string fmt(double value) {
    std::ostringstream out;
    out << value;
    return out.str();
}

void validate_params(const FusionParams& p) {
    if (!(p.dense_weight >= 0.0 && p.dense_weight <= 1.0)) {
        fail("dense_weight must be in [0, 1], got " + fmt(p.dense_weight));
    }
    if (p.top_k < 1) fail("top_k must be >= 1, got " + std::to_string(p.top_k));
    if (!(p.rrf_k > 0.0) || !std::isfinite(p.rrf_k)) fail("rrf_k must be finite and > 0, got " + fmt(p.rrf_k));
}

// Branch-free scan (vectorises): true when no element has an all-ones exponent, i.e. none is NaN or +-inf.
bool all_finite(const float* s, std::size_t n) {
    std::uint32_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, s + i, sizeof bits);
        bad |= static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
    }
    return bad == 0;
}

void check_finite(const float* s, std::size_t n, const char* name) {
    if (all_finite(s, n)) return;
    for (std::size_t i = 0; i < n; ++i) {
        if (!std::isfinite(s[i])) {
            fail(std::string(name) + " must be finite, got " + fmt(s[i]) + " at index " + std::to_string(i));
        }
    }
}

// min and max of n >= 1 finite floats. Eight independent lanes keep the loop free of one long dependency chain
// (min/max are exact, so the lane split cannot change the result).
void min_max(const float* s, std::size_t n, float& lo, float& hi) {
    constexpr std::size_t kLanes = 8;
    float lo_l[kLanes];
    float hi_l[kLanes];
    for (std::size_t l = 0; l < kLanes; ++l) lo_l[l] = hi_l[l] = s[0];
    std::size_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (std::size_t l = 0; l < kLanes; ++l) {
            const float x = s[i + l];
            lo_l[l] = x < lo_l[l] ? x : lo_l[l];
            hi_l[l] = x > hi_l[l] ? x : hi_l[l];
        }
    }
    for (; i < n; ++i) {
        lo_l[0] = s[i] < lo_l[0] ? s[i] : lo_l[0];
        hi_l[0] = s[i] > hi_l[0] ? s[i] : hi_l[0];
    }
    lo = lo_l[0];
    hi = hi_l[0];
    for (std::size_t l = 1; l < kLanes; ++l) {
        lo = lo_l[l] < lo ? lo_l[l] : lo;
        hi = hi_l[l] > hi ? hi_l[l] : hi;
    }
}

// out[i] = this list's weighted contribution to the fused score of the id at rank i + 1, in exactly the operation
// order of the reference: factor * ((s - lo) / (hi - lo)) or factor * 1.0; factor / (rrf_k + rank).
void contributions(const float* s, std::size_t n, FusionMethod method, double factor, double rrf_k, double* out) {
    if (n == 0) return;
    if (method == FusionMethod::kRrf) {
        // int32 rank: int -> double converts in SIMD registers, so this loop vectorises (n < 2^29 is checked)
        const auto count = static_cast<std::int32_t>(n);
        for (std::int32_t i = 0; i < count; ++i) out[i] = factor / (rrf_k + static_cast<double>(i + 1));
        return;
    }
    float lo;
    float hi;
    min_max(s, n, lo, hi);
    if (hi > lo) {
        const double dlo = lo;
        const double range = static_cast<double>(hi) - dlo;
        for (std::size_t i = 0; i < n; ++i) out[i] = factor * ((static_cast<double>(s[i]) - dlo) / range);
    } else {
        for (std::size_t i = 0; i < n; ++i) out[i] = factor * 1.0;
    }
}

// Per-thread scratch, reused across calls so the common case does no allocation and touches warm memory. Released
// after a call that needed more than kKeepBytes, so one huge request does not pin memory in every worker thread.
struct Scratch {
    std::vector<std::uint32_t> table;       // open-addressing hash table: union slot, or kNone when empty
    std::vector<std::int64_t> union_ids;    // slot -> id
    std::vector<std::uint32_t> dense_pos;   // slot -> position in the dense list, or kNone
    std::vector<std::uint32_t> dense_slot;  // dense position -> slot
    std::vector<double> fused;              // slot -> fused score
    std::vector<double> dense_part;         // dense position -> dense contribution

    static constexpr std::size_t kKeepBytes = std::size_t{8} << 20;

    std::size_t bytes() const {
        return table.capacity() * 4 + union_ids.capacity() * 8 + dense_pos.capacity() * 4 +
               dense_slot.capacity() * 4 + fused.capacity() * 8 + dense_part.capacity() * 8;
    }
};

// Releases the thread's scratch when it grew past Scratch::kKeepBytes (also on the exception path).
struct ScratchGuard {
    Scratch& scratch;
    ~ScratchGuard() {
        if (scratch.bytes() > Scratch::kKeepBytes) scratch = Scratch{};
    }
};

// Linear probing over a power-of-two table of slots, load <= 1/2, Fibonacci hashing (runs of consecutive chunk ids
// spread out). Most probes end at the first cell, so the loop below is well predicted, and "new id" vs "seen id" is
// resolved without a branch by the callers.
struct IdTable {
    std::uint32_t* cells;
    const std::int64_t* ids;  // slot -> id, for comparing
    std::size_t mask;
    int shift;

    std::size_t home(std::int64_t id) const {
        return static_cast<std::size_t>((static_cast<std::uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift);
    }
    // The cell holding `id`, or the empty cell where it belongs.
    std::size_t find(std::int64_t id) const {
        std::size_t h = home(id);
        while (cells[h] != kNone && ids[cells[h]] != id) h = (h + 1) & mask;
        return h;
    }
};

struct Candidate {
    double score;
    std::int64_t id;
    std::uint32_t slot;
};

// Fused descending, exact ties by id ascending. Ids are unique in the union, so this is a total order and the
// selected top-k does not depend on the selection algorithm.
struct Better {
    bool operator()(const Candidate& a, const Candidate& b) const {
        return a.score > b.score || (a.score == b.score && a.id < b.id);
    }
};

// The first repeated id of a list, for the error message (slow path, only after the fast scan found one).
[[noreturn]] void fail_duplicate(const std::int64_t* ids, std::size_t n, const char* name) {
    std::vector<std::pair<std::int64_t, std::size_t>> seen;
    seen.reserve(n);
    for (std::size_t i = 0; i < n; ++i) seen.emplace_back(ids[i], i);
    std::sort(seen.begin(), seen.end());
    std::size_t first = 0;
    std::size_t second = n;  // the smallest position whose id occurred at an earlier position
    for (std::size_t i = 1; i < seen.size(); ++i) {
        if (seen[i].first == seen[i - 1].first && seen[i].second < second) {
            std::size_t run = i - 1;
            while (run > 0 && seen[run - 1].first == seen[i].first) --run;
            first = seen[run].second;
            second = seen[i].second;
        }
    }
    fail(std::string(name) + " must not repeat an id: " + std::to_string(ids[second]) + " at positions " +
         std::to_string(first) + " and " + std::to_string(second));
}

// The top k of n candidates (slots 0..n-1 of union_ids/fused), best first.
std::vector<Candidate> select_top_k(const std::int64_t* union_ids, const double* fused, std::size_t n,
                                    std::size_t k) {
    std::vector<Candidate> top;
    if (k * 8 <= n) {
        // Bounded heap with the worst kept candidate on top: most candidates lose one well-predicted compare.
        top.reserve(k);
        std::uint32_t s = 0;
        for (; s < n && top.size() < k; ++s) {
            top.push_back(Candidate{fused[s], union_ids[s], s});
            std::push_heap(top.begin(), top.end(), Better{});
        }
        double worst = top.front().score;  // a candidate below the worst kept score cannot enter (ties can)
        for (; s < n; ++s) {
            if (fused[s] < worst) continue;
            const Candidate c{fused[s], union_ids[s], s};
            if (Better{}(c, top.front())) {
                std::pop_heap(top.begin(), top.end(), Better{});
                top.back() = c;
                std::push_heap(top.begin(), top.end(), Better{});
                worst = top.front().score;
            }
        }
        std::sort_heap(top.begin(), top.end(), Better{});
        return top;
    }
    top.resize(n);
    for (std::uint32_t s = 0; s < n; ++s) top[s] = Candidate{fused[s], union_ids[s], s};
    const auto kth = top.begin() + static_cast<std::ptrdiff_t>(k);
    if (k < n) std::nth_element(top.begin(), kth, top.end(), Better{});
    std::sort(top.begin(), kth, Better{});
    top.resize(k);
    return top;
}

}  // namespace

FusionMethod parse_fusion_method(std::string_view name) {
    if (name == "rrf") return FusionMethod::kRrf;
    if (name == "weighted") return FusionMethod::kWeighted;
    fail("method must be 'rrf' or 'weighted', got '" + std::string(name) + "'");
}

FusionResult fuse(const RankedList& bm25, const RankedList& dense, const FusionParams& params) {
    validate_params(params);
    check_finite(bm25.scores, bm25.size, "bm25_scores");
    check_finite(dense.scores, dense.size, "dense_scores");
    const std::size_t n1 = bm25.size;
    const std::size_t n2 = dense.size;
    const std::size_t n = n1 + n2;
    if (n >= (std::size_t{1} << 29)) fail("bm25_ids/dense_ids: too many candidates (" + std::to_string(n) + ")");

    thread_local Scratch scratch;
    const ScratchGuard guard{scratch};
    std::size_t capacity = 16;
    int bits = 4;
    while (capacity < 2 * n) {
        capacity <<= 1;
        ++bits;
    }
    scratch.table.assign(capacity, kNone);
    scratch.union_ids.resize(n);
    scratch.dense_pos.resize(n);
    scratch.dense_slot.resize(n2);
    scratch.fused.resize(n);
    scratch.dense_part.resize(n2);
    std::int64_t* union_ids = scratch.union_ids.data();
    std::uint32_t* dense_pos = scratch.dense_pos.data();
    std::uint32_t* dense_slot = scratch.dense_slot.data();
    const IdTable table{scratch.table.data(), union_ids, capacity - 1, 64 - bits};

    // Union: bm25 position i owns slot i; ids only in the dense list get slots n1, n1 + 1, ... Duplicates are only
    // counted here (no branch); the message comes from a slow second look.
    std::uint32_t repeated = 0;
    for (std::uint32_t i = 0; i < n1; ++i) {
        const std::int64_t id = bm25.ids[i];
        const std::size_t cell = table.find(id);
        repeated |= static_cast<std::uint32_t>(table.cells[cell] != kNone);
        table.cells[cell] = i;
        union_ids[i] = id;
    }
    if (repeated != 0) fail_duplicate(bm25.ids, n1, "bm25_ids");
    std::fill(dense_pos, dense_pos + n, kNone);
    std::uint32_t n_union = static_cast<std::uint32_t>(n1);
    for (std::uint32_t j = 0; j < n2; ++j) {
        const std::int64_t id = dense.ids[j];
        const std::size_t cell = table.find(id);
        const std::uint32_t found = table.cells[cell];
        const bool is_new = found == kNone;
        const std::uint32_t slot = is_new ? n_union : found;
        repeated |= static_cast<std::uint32_t>(dense_pos[slot] != kNone);
        table.cells[cell] = slot;
        union_ids[slot] = id;
        dense_pos[slot] = j;
        dense_slot[j] = slot;
        n_union += static_cast<std::uint32_t>(is_new);
    }
    if (repeated != 0) fail_duplicate(dense.ids, n2, "dense_ids");

    // fused[slot] = bm25 contribution + dense contribution; an absent id contributes 0 (0 + x == x exactly).
    const double w = params.dense_weight;
    double* fused = scratch.fused.data();
    double* dense_part = scratch.dense_part.data();
    contributions(bm25.scores, n1, params.method, 1.0 - w, params.rrf_k, fused);
    std::fill(fused + n1, fused + n_union, 0.0);
    contributions(dense.scores, n2, params.method, w, params.rrf_k, dense_part);
    for (std::size_t j = 0; j < n2; ++j) fused[dense_slot[j]] += dense_part[j];

    const std::size_t k = static_cast<std::size_t>(
        std::min<std::uint64_t>(static_cast<std::uint64_t>(params.top_k), n_union));
    const std::vector<Candidate> top = select_top_k(union_ids, fused, n_union, k);

    constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
    FusionResult out;
    out.ids.resize(k);
    out.fused.resize(k);
    out.bm25.resize(k);
    out.dense.resize(k);
    for (std::size_t r = 0; r < k; ++r) {
        const Candidate& c = top[r];
        out.ids[r] = c.id;
        out.fused[r] = static_cast<float>(c.score);
        out.bm25[r] = c.slot < n1 ? bm25.scores[c.slot] : kNaN;
        out.dense[r] = dense_pos[c.slot] != kNone ? dense.scores[dense_pos[c.slot]] : kNaN;
    }
    return out;
}

}  // namespace rag
