// Dot products behind a run-time SIMD choice: one build runs on any x86-64 and uses AVX-512 or AVX2 (+FMA, F16C)
// where the CPU (and the OS, which must save the wide registers) supports them. Compiled without -march flags: the
// wide code paths carry per-function target attributes and are only called after the CPU check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace rag::simd {

enum class Level { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest level this CPU supports (cached after the first call; thread-safe).
Level best_level() noexcept;
// Whether this CPU can run `level`.
bool supported(Level level) noexcept;
// "scalar", "avx2", "avx512".
const char* name(Level level) noexcept;
// Parses a level name; "" or "auto" means best_level(). Throws std::invalid_argument naming `simd` for an unknown
// name or a level the CPU cannot run.
Level parse(std::string_view text);

// float32 accumulation of query . row for the three storage types (the int8 row is not scaled here). The order of
// additions differs between levels, so results agree to float32 rounding, not bit for bit.
struct Dots {
    float (*f32)(const float* q, const float* row, std::size_t d);
    float (*i8)(const float* q, const std::int8_t* row, std::size_t d);
    float (*f16)(const float* q, const std::uint16_t* row, std::size_t d);  // IEEE binary16 bits
    // out[r * ld + c] = a_r . b_c for r < 4, c < 4 (rows of a: a + r * d, of b: b + c * d): a 4 x 4 register tile
    // of a matrix product; rows and columns past the counts are not touched.
    void (*tile4x4)(const float* a, std::size_t a_rows, const float* b, std::size_t b_rows, std::size_t d,
                    float* out, std::size_t ld);
    // Gram-matrix micro-kernel (BLAS style: no horizontal sums) over one k-chunk: for r < 6 and c < gram_cols,
    // out[r * ld + c] (+)= sum_{k < kc} a[r][k] * panel[k * gram_cols + c] (+= when accumulate). gram_cols is 0 at
    // the scalar level (use tile4x4 there).
    std::size_t gram_cols;
    void (*gram)(const float* const* a, const float* panel, std::size_t kc, float* out, std::size_t ld,
                 bool accumulate);
    // One greedy MMR step after a pick whose similarity row is `row` (m floats): for each i, near[i] =
    // max(near[i], row[i]); lr[i] = -inf when row[i] > threshold (dropped); gain = lr[i] - keep * near[i] in double
    // (no FMA, so every level computes the same values). Returns the first index of the largest gain, or m when every
    // gain is -inf (lr[i] = -inf marks a picked or dropped candidate).
    std::size_t (*mmr_step)(const float* row, double* near, double* lr, std::size_t m, double keep, double threshold);
    // out[r] = q . rows[r] for r < count, exact integer dot products of int8 vectors (|sum| < 2^31 for d < 2^17):
    // every level returns the same values. Rows are taken four at a time, so four independent accumulator chains
    // hide the multiply-add latency; with AVX-512 VNNI one instruction multiplies and adds 64 byte pairs.
    void (*i8i8_rows)(const std::int8_t* q, const std::int8_t* const* rows, std::size_t count, std::size_t d,
                      std::int32_t* out);
    // out[r] = the sum of q[j] over the set bits j of row r, for count rows of `words` uint64 each, stored one after
    // the other (bit j of a row: bit j % 64 of its word j / 64); q has 64 * words entries. Exact integer sums: every
    // level returns the same values. With AVX-512 a row's word selects its 64 query bytes (a masked move) and VNNI
    // adds them, so a row of 384 bits costs six instructions' worth of work.
    void (*bits_rows)(const std::int8_t* q, const std::uint64_t* bits, std::size_t count, std::size_t words,
                      std::int32_t* out);
};

const Dots& dots(Level level) noexcept;

// Whether reading sign bits before sq8 codes pays at `level`: only where bits_rows has its AVX-512 VNNI kernel (a
// masked move and a multiply-add per 64 dimensions). The AVX2 and scalar kernels cost about what the codes' own dot
// products do, so the bits would only add a pass (bench/README.md, "The dense scan's sign bits").
bool bits_pay(Level level) noexcept;

// IEEE binary16 -> binary32 (exact), for the scalar path and tests.
float half_to_float(std::uint16_t bits) noexcept;

}  // namespace rag::simd
