#include "rerank.hpp"

#include "prefetch.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace rag {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string fmt(double value) {
    std::ostringstream out;
    out << value;
    return out.str();
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Work (multiply-adds or tokens) per extra thread below which a call stays on the calling thread: starting a thread
// costs ~20-50 us, about what one core does with 1-2 M multiply-adds.
constexpr std::size_t kWorkPerThread = std::size_t{1} << 21;

// glibc answers hardware_concurrency by opening and parsing /sys/devices/system/cpu/online: three system calls that
// cost more than a small call's whole work, so it is read once.
unsigned hardware_threads() {
    static const unsigned hardware = std::max(1u, std::thread::hardware_concurrency());
    return hardware;
}

unsigned pick_threads(unsigned requested, std::size_t work, std::size_t items) {
    if (requested != 0) return static_cast<unsigned>(std::max<std::size_t>(1, std::min<std::size_t>(requested, items)));
    const std::size_t by_work = work / kWorkPerThread;
    if (by_work <= 1 || items <= 1) return 1;
    const unsigned hardware = hardware_threads();
    return static_cast<unsigned>(std::max<std::size_t>(1, std::min<std::size_t>({hardware, by_work, items})));
}

// Runs body(begin, end) over [0, n) on `threads` threads (the caller takes the first share); rethrows the first
// exception after all have finished.
template <typename Body>
void parallel_for(std::size_t n, unsigned threads, Body body) {
    if (threads <= 1 || n < 2) {
        body(std::size_t{0}, n);
        return;
    }
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(threads);
    pool.reserve(threads - 1);
    const std::size_t step = (n + threads - 1) / threads;
    for (unsigned t = 1; t < threads; ++t) {
        const std::size_t begin = std::min(n, t * step);
        const std::size_t end = std::min(n, begin + step);
        pool.emplace_back([&, t, begin, end] {
            try {
                body(begin, end);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    }
    try {
        body(0, std::min(n, step));
    } catch (...) {
        errors[0] = std::current_exception();
    }
    for (auto& thread : pool) thread.join();
    for (auto& error : errors) {
        if (error) std::rethrow_exception(error);
    }
}

bool finite(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7F800000u) != 0x7F800000u;
}

void check_offsets(const std::int64_t* offsets, std::size_t rows, std::int64_t c, const char* offsets_name,
                   const char* rows_name) {
    const std::int64_t start = offsets[c];
    const std::int64_t stop = offsets[c + 1];
    if (start < 0 || stop < start || stop > static_cast<std::int64_t>(rows)) {
        fail(std::string(offsets_name) + " of chunk " + std::to_string(c) + " are [" + std::to_string(start) + ", " +
             std::to_string(stop) + "), not a range within the " + std::to_string(rows) + " rows of " + rows_name);
    }
}

// The candidate ids are chunks; a store not checked at load has each candidate's offsets checked here.
void check_candidates(const std::int64_t* offsets, std::size_t n_chunks, std::size_t rows, bool checked,
                      const std::int64_t* candidates, std::size_t m, const char* offsets_name,
                      const char* rows_name) {
    const auto n = static_cast<std::int64_t>(n_chunks);
    for (std::size_t i = 0; i < m; ++i) {
        const std::int64_t c = candidates[i];
        if (c < 0 || c >= n) {
            fail("candidates must be in [0, " + std::to_string(n_chunks) + "), got " + std::to_string(c) +
                 " at index " + std::to_string(i));
        }
        if (!checked) check_offsets(offsets, rows, c, offsets_name, rows_name);
    }
}

float dot_row(const simd::Dots& dots, const float* query, const WindowStore& s, std::size_t row) {
    switch (s.type) {
        case VectorType::kInt8:
            return dots.i8(query, static_cast<const std::int8_t*>(s.vectors) + row * s.d, s.d) * s.scales[row];
        case VectorType::kFloat16:
            return dots.f16(query, static_cast<const std::uint16_t*>(s.vectors) + row * s.d, s.d);
        default:
            return dots.f32(query, static_cast<const float*>(s.vectors) + row * s.d, s.d);
    }
}

}  // namespace

std::size_t element_bytes(VectorType type) {
    switch (type) {
        case VectorType::kInt8: return 1;
        case VectorType::kFloat16: return 2;
        default: return 4;
    }
}

void check_finite(const float* values, std::size_t rows, std::size_t cols, const char* name) {
    const std::size_t n = rows * cols;
    std::uint32_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) {  // branch-free first pass (vectorises)
        std::uint32_t bits;
        std::memcpy(&bits, values + i, sizeof bits);
        bad |= static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
    }
    if (bad == 0) return;
    for (std::size_t i = 0; i < n; ++i) {
        if (!finite(values[i])) {
            const std::string where = cols == 1 ? "index " + std::to_string(i)
                                                : "[" + std::to_string(i / cols) + ", " + std::to_string(i % cols) + "]";
            fail(std::string(name) + " must be finite, got " + fmt(values[i]) + " at " + where);
        }
    }
}

void check_window_args(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                       double temperature) {
    check_finite(query, store.d, 1, "query");
    if (!(temperature > 0.0) || !std::isfinite(temperature)) {
        fail("temperature must be finite and > 0, got " + fmt(temperature));
    }
    check_candidates(store.offsets, store.n_chunks, store.n_windows, store.checked, candidates, m, "offsets",
                     "vectors");
}

void window_maxsim(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                   double temperature, simd::Level level, float* out, unsigned threads) {
    check_window_args(query, store, candidates, m, temperature);
    const simd::Dots& dots = simd::dots(level);
    std::size_t windows = 0;
    for (std::size_t i = 0; i < m; ++i) {
        windows += static_cast<std::size_t>(store.offsets[candidates[i] + 1] - store.offsets[candidates[i]]);
    }
    std::atomic<std::size_t> first_bad{m};  // lowest candidate index with a non-finite score
    const double t = temperature;
    parallel_for(m, pick_threads(threads, windows * store.d, m), [&](std::size_t begin, std::size_t end) {
        std::vector<float> scores;
        const std::size_t row_bytes = store.d * element_bytes(store.type);
        auto prefetch = [&](std::size_t i) {
            const auto c = candidates[i];
            const auto first = static_cast<std::size_t>(store.offsets[c]);
            const auto count = static_cast<std::size_t>(store.offsets[c + 1]) - first;
            prefetch_bytes(static_cast<const char*>(store.vectors) + first * row_bytes, count * row_bytes);
        };
        for (std::size_t i = begin; i < end && i < begin + kPrefetchAhead; ++i) prefetch(i);
        for (std::size_t i = begin; i < end; ++i) {
            if (i + kPrefetchAhead < end) prefetch(i + kPrefetchAhead);
            const auto c = candidates[i];
            const auto start = static_cast<std::size_t>(store.offsets[c]);
            const auto stop = static_cast<std::size_t>(store.offsets[c + 1]);
            float* row = out + 3 * i;
            if (stop == start) {
                row[0] = row[1] = row[2] = kNaN;
                continue;
            }
            scores.resize(stop - start);
            bool ok = true;
            float best = -std::numeric_limits<float>::infinity();
            float second = best;
            for (std::size_t w = start; w < stop; ++w) {
                const float s = dot_row(dots, query, store, w);
                ok &= finite(s);
                scores[w - start] = s;
                if (s > best) {
                    second = best;
                    best = s;
                } else if (s > second) {
                    second = s;
                }
            }
            if (!ok) {
                std::size_t seen = first_bad.load();
                while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
                }
                continue;
            }
            row[0] = best;
            row[1] = scores.size() > 1 ? (best + second) / 2.0f : best;
            // log-sum-exp around the max (no overflow), minus log(count) so the soft max never exceeds the max
            double sum = 0.0;
            const double top = best;
            for (const float s : scores) sum += std::exp((static_cast<double>(s) - top) / t);
            const double soft = t * std::log(sum) + top - t * std::log(static_cast<double>(scores.size()));
            row[2] = static_cast<float>(std::min(soft, top));
        }
    });
    const std::size_t bad = first_bad.load();
    if (bad < m) {
        const auto c = candidates[bad];
        fail("vectors (or scales) of chunk " + std::to_string(c) + " (rows " + std::to_string(store.offsets[c]) +
             ":" + std::to_string(store.offsets[c + 1]) + ") hold non-finite values");
    }
}

void hit_span(const std::int64_t* pos, const std::int32_t* slot, std::size_t hits, std::int64_t n_tokens,
              std::int32_t* counts, std::int32_t& span, std::int32_t& matched) {
    std::int32_t need = 0;
    for (std::size_t h = 0; h < hits; ++h) {
        need += counts[static_cast<std::size_t>(slot[h])] == 0;
        counts[static_cast<std::size_t>(slot[h])] = 1;
    }
    for (std::size_t h = 0; h < hits; ++h) counts[static_cast<std::size_t>(slot[h])] = 0;
    matched = need;
    if (need == 0) {
        span = 0;
        return;
    }
    // sliding window over the hits: extend right; shrink left while every present term stays covered
    std::int64_t best = n_tokens;
    std::int32_t inside = 0;
    std::size_t left = 0;
    for (std::size_t right = 0; right < hits; ++right) {
        inside += counts[static_cast<std::size_t>(slot[right])]++ == 0;
        while (inside == need) {
            best = std::min(best, pos[right] - pos[left] + 1);
            inside -= --counts[static_cast<std::size_t>(slot[left])] == 0;
            ++left;
        }
    }
    for (std::size_t h = left; h < hits; ++h) counts[static_cast<std::size_t>(slot[h])] = 0;
    span = static_cast<std::int32_t>(std::min<std::int64_t>(best, std::numeric_limits<std::int32_t>::max()));
}

void proximity(const std::int32_t* query_terms, std::size_t q, const TokenStore& store,
               const std::int64_t* candidates, std::size_t m, std::int32_t* span, std::int32_t* matched,
               unsigned threads) {
    if (q >= (std::size_t{1} << 24)) fail("query_terms: too many terms (" + std::to_string(q) + ")");
    for (std::size_t i = 0; i < q; ++i) {
        if (query_terms[i] < 0) {
            fail("query_terms must be >= 0, got " + std::to_string(query_terms[i]) + " at index " + std::to_string(i));
        }
    }
    // Open-addressing table term -> slot (load <= 1/2), behind a 4096-bit filter (512 bytes, stays in L1) that
    // rejects almost every token with one load and no unpredictable branch: about 40% of tokens are -1 (stop words),
    // in no pattern a branch predictor could learn.
    std::size_t capacity = 8;
    while (capacity < 2 * q) capacity <<= 1;
    std::vector<std::int32_t> keys(capacity, -1);
    std::vector<std::int32_t> slots(capacity, -1);
    constexpr std::uint32_t kFilterBits = 4096;
    std::uint64_t filter[kFilterBits / 64] = {};
    const std::size_t mask = capacity - 1;
    auto home = [mask](std::int32_t term) {
        return static_cast<std::size_t>((static_cast<std::uint32_t>(term) * 0x9E3779B1u) >> 7) & mask;
    };
    for (std::size_t i = 0; i < q; ++i) {
        const std::int32_t term = query_terms[i];
        std::size_t h = home(term);
        while (keys[h] != -1 && keys[h] != term) h = (h + 1) & mask;
        if (keys[h] == term) {
            std::size_t first = 0;
            while (query_terms[first] != term) ++first;
            fail("query_terms must not repeat an id: " + std::to_string(term) + " at positions " +
                 std::to_string(first) + " and " + std::to_string(i));
        }
        keys[h] = term;
        slots[h] = static_cast<std::int32_t>(i);
        const auto bit = static_cast<std::uint32_t>(term) & (kFilterBits - 1);
        filter[bit / 64] |= std::uint64_t{1} << (bit % 64);
    }
    check_candidates(store.offsets, store.n_chunks, store.n_tokens, store.checked, candidates, m, "token_offsets",
                     "tokens");
    std::size_t total = 0;
    for (std::size_t i = 0; i < m; ++i) {
        total += static_cast<std::size_t>(store.offsets[candidates[i] + 1] - store.offsets[candidates[i]]);
    }
    parallel_for(m, pick_threads(threads, total * 4, m), [&](std::size_t begin, std::size_t end) {
        std::vector<std::int64_t> hit_pos;
        std::vector<std::int32_t> hit_slot;
        std::vector<std::int32_t> counts(q, 0);
        for (std::size_t i = begin; i < end; ++i) {
            const auto c = candidates[i];
            const auto start = static_cast<std::size_t>(store.offsets[c]);
            const auto stop = static_cast<std::size_t>(store.offsets[c + 1]);
            hit_pos.clear();
            hit_slot.clear();
            for (std::size_t p = start; p < stop; ++p) {
                const std::int32_t token = store.tokens[p];
                const auto bit = static_cast<std::uint32_t>(token) & (kFilterBits - 1);
                const std::uint64_t maybe = (filter[bit / 64] >> (bit % 64)) & static_cast<std::uint64_t>(token >= 0);
                if (maybe == 0) continue;
                std::size_t h = home(token);
                while (keys[h] != -1 && keys[h] != token) h = (h + 1) & mask;
                if (keys[h] != token) continue;
                hit_pos.push_back(static_cast<std::int64_t>(p - start));
                hit_slot.push_back(slots[h]);
            }
            hit_span(hit_pos.data(), hit_slot.data(), hit_pos.size(), static_cast<std::int64_t>(stop - start),
                     counts.data(), span[i], matched[i]);
        }
    });
}

void linear_scores(const float* features, std::size_t m, std::size_t f, const float* weights, double bias,
                   float* out) {
    check_finite(weights, f, 1, "weights");
    check_finite(features, m, f, "features");
    if (!std::isfinite(bias)) fail("bias must be finite, got " + fmt(bias));
    for (std::size_t i = 0; i < m; ++i) {
        const float* row = features + i * f;
        double total = 0.0;
        for (std::size_t j = 0; j < f; ++j) total += static_cast<double>(row[j]) * static_cast<double>(weights[j]);
        out[i] = static_cast<float>(total + bias);
    }
}

namespace {

// The scalar level: 4 x 4 dot-product tiles over the upper triangle, mirrored.
void similarity_tiles(const float* vectors, std::size_t m, std::size_t d, const simd::Dots& dots, float* out,
                      unsigned n_threads) {
    constexpr std::size_t kTile = 4;
    const std::size_t tiles = (m + kTile - 1) / kTile;
    // Row-tile ti computes the tiles (ti, tj >= ti) and mirrors them; the triangle is uneven, so threads take row
    // tiles round-robin rather than in blocks.
    parallel_for(n_threads, n_threads, [&](std::size_t first, std::size_t last) {
        for (std::size_t t = first; t < last; ++t) {
            for (std::size_t ti = t; ti < tiles; ti += n_threads) {
                const std::size_t r0 = ti * kTile;
                const std::size_t rows = std::min(kTile, m - r0);
                float block[kTile * kTile];
                for (std::size_t tj = ti; tj < tiles; ++tj) {
                    const std::size_t c0 = tj * kTile;
                    const std::size_t cols = std::min(kTile, m - c0);
                    dots.tile4x4(vectors + r0 * d, rows, vectors + c0 * d, cols, d, block, kTile);
                    for (std::size_t r = 0; r < rows; ++r) {
                        for (std::size_t c = 0; c < cols; ++c) {
                            out[(r0 + r) * m + c0 + c] = block[r * kTile + c];
                            out[(c0 + c) * m + r0 + r] = block[r * kTile + c];
                        }
                    }
                }
            }
        }
    });
}

// SIMD levels: a GotoBLAS-style loop over a packed copy. Column panels of gram_cols rows are packed [k][c] in
// k-chunks of kKc, so one chunk (16 KiB at AVX-512) stays in L1 while every row block of 6 passes over it; only
// blocks on or right of the diagonal are computed, into padded scratch, and the upper triangle is mirrored at the
// end (exactly symmetric). Threads own row blocks (round-robin: the triangle is uneven).
struct GramScratch {
    std::vector<float> packed;
    std::vector<float> result;  // rows padded to a multiple of 6, columns to a multiple of gram_cols
};

void similarity_gram(const float* vectors, std::size_t m, std::size_t d, const simd::Dots& dots, float* out,
                     unsigned n_threads) {
    constexpr std::size_t kRows = 6;
    constexpr std::size_t kKc = 128;
    const std::size_t cols = dots.gram_cols;
    const std::size_t panels = (m + cols - 1) / cols;
    const std::size_t ld = panels * cols;
    const std::size_t blocks = (m + kRows - 1) / kRows;
    thread_local GramScratch scratch;
    scratch.packed.resize(panels * cols * d);
    scratch.result.resize(blocks * kRows * ld);
    float* packed = scratch.packed.data();
    float* result = scratch.result.data();
    // packed[p][k][c] = vectors[p * cols + c][k], 0 past m (only the last panel has padding)
    for (std::size_t p = 0; p < panels; ++p) {
        float* dst = packed + p * cols * d;
        const std::size_t width = std::min(cols, m - p * cols);
        if (width < cols) std::fill(dst, dst + cols * d, 0.0f);
        for (std::size_t c = 0; c < width; ++c) {
            const float* src = vectors + (p * cols + c) * d;
            for (std::size_t k = 0; k < d; ++k) dst[k * cols + c] = src[k];
        }
    }
    parallel_for(n_threads, n_threads, [&](std::size_t first, std::size_t last) {
        for (std::size_t t = first; t < last; ++t) {
            for (std::size_t p = 0; p < panels; ++p) {
                const std::size_t j0 = p * cols;
                for (std::size_t k0 = 0; k0 < d; k0 += kKc) {
                    const std::size_t kc = std::min(kKc, d - k0);
                    const float* chunk = packed + p * cols * d + k0 * cols;
                    for (std::size_t b = t; b < blocks && b * kRows < j0 + cols; b += n_threads) {
                        const std::size_t i0 = b * kRows;
                        const std::size_t rows = std::min(kRows, m - i0);
                        const float* a[kRows];
                        for (std::size_t r = 0; r < kRows; ++r) a[r] = vectors + (i0 + std::min(r, rows - 1)) * d + k0;
                        dots.gram(a, chunk, kc, result + i0 * ld + j0, ld, k0 != 0);
                    }
                }
            }
        }
    });
    // out[i][j] = result[min(i,j)][max(i,j)]: rows copied, the lower triangle read through 32 x 32 tiles
    constexpr std::size_t kT = 32;
    for (std::size_t i0 = 0; i0 < m; i0 += kT) {
        const std::size_t i1 = std::min(m, i0 + kT);
        for (std::size_t j0 = 0; j0 < m; j0 += kT) {
            const std::size_t j1 = std::min(m, j0 + kT);
            for (std::size_t i = i0; i < i1; ++i) {
                for (std::size_t j = j0; j < j1; ++j) {
                    out[i * m + j] = j >= i ? result[i * ld + j] : result[j * ld + i];
                }
            }
        }
    }
}

}  // namespace

void similarity_matrix(const float* vectors, std::size_t m, std::size_t d, simd::Level level, float* out,
                       unsigned threads) {
    check_finite(vectors, m, d, "vectors");
    if (m == 0) return;
    const simd::Dots& dots = simd::dots(level);
    const unsigned n_threads = pick_threads(threads, m * m * d / 2, (m + 5) / 6);
    // Below ~128 rows the packing and mirroring cost more than the gram kernel saves over 4 x 4 dot tiles (measured).
    if (dots.gram_cols == 0 || d == 0 || m <= 128) {
        similarity_tiles(vectors, m, d, dots, out, n_threads);
    } else {
        similarity_gram(vectors, m, d, dots, out, n_threads);
    }
}

void check_sim_row(const float* row, std::size_t pick, std::size_t m) {
    try {
        check_finite(row, m, 1, "sim");
    } catch (const std::invalid_argument&) {
        std::size_t j = 0;
        while (finite(row[j])) ++j;
        fail("sim must be finite, got " + fmt(row[j]) + " at [" + std::to_string(pick) + ", " + std::to_string(j) +
             "]");
    }
}

void check_mmr_args(const float* relevance, const float* sim, std::size_t m, double mmr_lambda, std::int64_t k,
                    double dedup_threshold) {
    if (!(mmr_lambda >= 0.0 && mmr_lambda <= 1.0)) fail("mmr_lambda must be in [0, 1], got " + fmt(mmr_lambda));
    if (k < 0) fail("k must be >= 0, got " + std::to_string(k));
    if (std::isnan(dedup_threshold)) fail("dedup_threshold must be a number, got nan");
    check_finite(relevance, m, 1, "relevance");
}

std::vector<std::int64_t> mmr_select(const float* relevance, const float* sim, std::size_t m, double mmr_lambda,
                                     std::int64_t k, double dedup_threshold, simd::Level level) {
    check_mmr_args(relevance, sim, m, mmr_lambda, k, dedup_threshold);
    std::vector<std::int64_t> chosen;
    if (m == 0 || k == 0) return chosen;
    const std::size_t limit = std::min<std::size_t>(static_cast<std::size_t>(k), m);
    chosen.reserve(limit);
    // lr[i] = lambda * relevance[i] (the same product every step), -inf once i is picked or dropped
    std::vector<double> lr(m);
    for (std::size_t i = 0; i < m; ++i) lr[i] = mmr_lambda * static_cast<double>(relevance[i]);
    std::vector<double> nearest(m, -std::numeric_limits<double>::infinity());
    const double keep = 1.0 - mmr_lambda;
    const auto step = simd::dots(level).mmr_step;
    std::size_t pick = 0;
    for (std::size_t i = 1; i < m; ++i) {
        if (relevance[i] > relevance[pick]) pick = i;
    }
    while (true) {
        chosen.push_back(static_cast<std::int64_t>(pick));
        lr[pick] = -std::numeric_limits<double>::infinity();
        if (chosen.size() == limit) break;
        const float* row = sim + pick * m;
        check_sim_row(row, pick, m);
        // One pass: drop near-duplicates of the pick, update each candidate's nearest pick, take the best gain
        // lambda * rel - (1 - lambda) * nearest (double, the reference's operation order: equal gains tie alike;
        // the first index wins). m back means every candidate is picked or dropped.
        const std::size_t next = step(row, nearest.data(), lr.data(), m, keep, dedup_threshold);
        if (next == m) break;
        pick = next;
    }
    return chosen;
}

void check_window_store(WindowStore& store) {
    for (std::size_t c = 0; c < store.n_chunks; ++c) {
        check_offsets(store.offsets, store.n_windows, static_cast<std::int64_t>(c), "offsets", "vectors");
    }
    store.checked = true;
}

void check_token_store(TokenStore& store) {
    for (std::size_t c = 0; c < store.n_chunks; ++c) {
        check_offsets(store.offsets, store.n_tokens, static_cast<std::int64_t>(c), "token_offsets", "tokens");
    }
    store.checked = true;
}

}  // namespace rag
