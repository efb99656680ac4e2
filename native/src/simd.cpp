#include "simd.hpp"

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RAG_X86_SIMD 1
#include <immintrin.h>
#endif

namespace rag::simd {

float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t exponent = (h >> 10) & 0x1Fu;
    std::uint32_t mantissa = h & 0x3FFu;
    std::uint32_t bits;
    if (exponent == 0x1Fu) {  // inf / NaN
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {  // normal
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {  // zero
        bits = sign;
    } else {  // subnormal: normalise
        exponent = 113;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

namespace {

// ---- scalar: four partial sums, so the compiler keeps independent chains (and may vectorise to SSE2) ----

template <typename Load>
float dot_scalar(const float* q, std::size_t d, Load load) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    std::size_t i = 0;
    for (; i + 4 <= d; i += 4) {
        for (std::size_t l = 0; l < 4; ++l) acc[l] += q[i + l] * load(i + l);
    }
    for (; i < d; ++i) acc[0] += q[i] * load(i);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

float f32_scalar(const float* q, const float* r, std::size_t d) {
    return dot_scalar(q, d, [r](std::size_t i) { return r[i]; });
}
float i8_scalar(const float* q, const std::int8_t* r, std::size_t d) {
    return dot_scalar(q, d, [r](std::size_t i) { return static_cast<float>(r[i]); });
}
float f16_scalar(const float* q, const std::uint16_t* r, std::size_t d) {
    return dot_scalar(q, d, [r](std::size_t i) { return half_to_float(r[i]); });
}
void i8i8_rows_scalar(const std::int8_t* q, const std::int8_t* const* rows, std::size_t count, std::size_t d,
                      std::int32_t* out) {
    for (std::size_t r = 0; r < count; ++r) {
        std::int32_t acc = 0;
        for (std::size_t i = 0; i < d; ++i) {
            acc += static_cast<std::int32_t>(q[i]) * static_cast<std::int32_t>(rows[r][i]);
        }
        out[r] = acc;
    }
}
void bits_rows_scalar(const std::int8_t* q, const std::uint64_t* bits, std::size_t count, std::size_t words,
                      std::int32_t* out) {
    for (std::size_t r = 0; r < count; ++r) {
        std::int32_t acc = 0;
        for (std::size_t w = 0; w < words; ++w) {
            for (std::uint64_t m = bits[r * words + w]; m != 0; m &= m - 1) {
                acc += q[w * 64 + static_cast<std::size_t>(__builtin_ctzll(m))];
            }
        }
        out[r] = acc;
    }
}
void tile_scalar(const float* a, std::size_t ar, const float* b, std::size_t br, std::size_t d, float* out,
                 std::size_t ld) {
    for (std::size_t r = 0; r < ar; ++r) {
        for (std::size_t c = 0; c < br; ++c) out[r * ld + c] = f32_scalar(a + r * d, b + c * d, d);
    }
}

constexpr double kMinusInf = -std::numeric_limits<double>::infinity();

inline void mmr_one(const float* row, double* near, double* lr, std::size_t i, double keep, double threshold,
                    double& best, std::size_t& next) {
    const double s = row[i];
    const double n = near[i] < s ? s : near[i];
    near[i] = n;
    const double l = s > threshold ? kMinusInf : lr[i];
    lr[i] = l;
    const double gain = l - keep * n;
    if (gain > best) {
        best = gain;
        next = i;
    }
}

std::size_t mmr_step_scalar(const float* row, double* near, double* lr, std::size_t m, double keep,
                            double threshold) {
    double best = kMinusInf;
    std::size_t next = m;
    for (std::size_t i = 0; i < m; ++i) mmr_one(row, near, lr, i, keep, threshold, best, next);
    return next;
}

// Lane-wise (value, index) bests -> the first index of the largest value, then the scalar tail from `from`.
std::size_t mmr_finish(const double* values, const std::int64_t* indices, std::size_t lanes, const float* row,
                       double* near, double* lr, std::size_t from, std::size_t m, double keep, double threshold) {
    double best = kMinusInf;
    std::size_t next = m;
    for (std::size_t l = 0; l < lanes; ++l) {
        const auto index = static_cast<std::size_t>(indices[l]);
        if (values[l] > best || (values[l] == best && index < next)) {
            best = values[l];
            next = index;
        }
    }
    if (best == kMinusInf) next = m;
    for (std::size_t i = from; i < m; ++i) mmr_one(row, near, lr, i, keep, threshold, best, next);
    return next;
}

#if defined(RAG_X86_SIMD)

// ---- AVX2 + FMA + F16C ----
#define RAG_AVX2 __attribute__((target("avx2,fma,f16c")))

RAG_AVX2 inline float hsum256(__m256 v) {
    const __m128 lo = _mm256_castps256_ps128(v);
    const __m128 hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

// Storage adapters: load 8 values as float32 lanes, or one value as a float for the tail.
struct F32x8 {
    RAG_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
    static float one(float x) { return x; }
};
struct I8x8 {
    RAG_AVX2 static __m256 load(const std::int8_t* p) {
        std::int64_t raw;
        std::memcpy(&raw, p, 8);
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(raw)));
    }
    static float one(std::int8_t x) { return static_cast<float>(x); }
};
struct F16x8 {
    RAG_AVX2 static __m256 load(const std::uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static float one(std::uint16_t x) { return half_to_float(x); }
};

template <typename Adapter, typename T>
RAG_AVX2 inline float dot_avx2(const float* q, const T* r, std::size_t d) {
    __m256 a0 = _mm256_setzero_ps();
    __m256 a1 = _mm256_setzero_ps();
    std::size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), Adapter::load(r + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), Adapter::load(r + i + 8), a1);
    }
    if (i + 8 <= d) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), Adapter::load(r + i), a0);
        i += 8;
    }
    float total = hsum256(_mm256_add_ps(a0, a1));
    for (; i < d; ++i) total += q[i] * Adapter::one(r[i]);
    return total;
}

RAG_AVX2 float f32_avx2(const float* q, const float* r, std::size_t d) { return dot_avx2<F32x8>(q, r, d); }
RAG_AVX2 float i8_avx2(const float* q, const std::int8_t* r, std::size_t d) { return dot_avx2<I8x8>(q, r, d); }
RAG_AVX2 float f16_avx2(const float* q, const std::uint16_t* r, std::size_t d) { return dot_avx2<F16x8>(q, r, d); }

RAG_AVX2 inline std::int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

RAG_AVX2 inline __m256i widen16(const std::int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Bytes widened to int16, then vpmaddwd: 16 products per instruction, pairs summed into int32 (no overflow: int8
// products are at most 2^14). Two rows at a time, each read front to back (see i8i8_rows_vnni_fixed).
RAG_AVX2 void i8i8_rows_avx2(const std::int8_t* q, const std::int8_t* const* rows, std::size_t count, std::size_t d,
                             std::int32_t* out) {
    const std::size_t body = d - d % 32;
    auto row_dot = [&](const std::int8_t* row) RAG_AVX2 {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0;
        std::size_t i = 0;
        for (; i < body; i += 32) {
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(widen16(q + i), widen16(row + i)));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(widen16(q + i + 16), widen16(row + i + 16)));
        }
        if (i + 16 <= d) {
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(widen16(q + i), widen16(row + i)));
            i += 16;
        }
        std::int32_t total = hsum_epi32(_mm256_add_epi32(a0, a1));
        for (; i < d; ++i) total += static_cast<std::int32_t>(q[i]) * static_cast<std::int32_t>(row[i]);
        return total;
    };
    std::size_t r = 0;
    for (; r + 2 <= count; r += 2) {
        out[r] = row_dot(rows[r]);
        out[r + 1] = row_dot(rows[r + 1]);
    }
    if (r < count) out[r] = row_dot(rows[r]);
}

// Each 32 bits of a row become a byte mask (byte i takes bit i: the word's bytes spread eight to a lane, then
// compared with one bit per byte), which selects the query's bytes; vpmaddubsw and vpmaddwd add them into int32.
RAG_AVX2 void bits_rows_avx2(const std::int8_t* q, const std::uint64_t* bits, std::size_t count, std::size_t words,
                             std::int32_t* out) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                            3, 3, 3, 3, 3, 3, 3);
    const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (std::size_t r = 0; r < count; ++r) {
        const std::uint64_t* row = bits + r * words;
        __m256i acc = _mm256_setzero_si256();
        for (std::size_t h = 0; h < 2 * words; ++h) {
            const auto half = static_cast<std::uint32_t>(row[h / 2] >> (32 * (h % 2)));
            __m256i m = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(half)), spread);
            m = _mm256_cmpeq_epi8(_mm256_and_si256(m, select), select);
            const __m256i picked = _mm256_and_si256(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * h)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, picked), ones16));
        }
        out[r] = hsum_epi32(acc);
    }
}

// 6 rows x 16 columns: 12 accumulators + 2 panel loads + 1 broadcast = 15 of the 16 ymm registers. Written out
// register by register: as an indexed array the accumulators ended up in memory (one store-load chain per FMA).
RAG_AVX2 void gram_avx2(const float* const* a, const float* panel, std::size_t kc, float* out, std::size_t ld,
                       bool accumulate) {
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (std::size_t k = 0; k < kc; ++k) {
        const __m256 b0 = _mm256_loadu_ps(panel + k * 16);
        const __m256 b1 = _mm256_loadu_ps(panel + k * 16 + 8);
        __m256 x0 = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(x0, b0, c00);
        c01 = _mm256_fmadd_ps(x0, b1, c01);
        __m256 x1 = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(x1, b0, c10);
        c11 = _mm256_fmadd_ps(x1, b1, c11);
        __m256 x2 = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(x2, b0, c20);
        c21 = _mm256_fmadd_ps(x2, b1, c21);
        __m256 x3 = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(x3, b0, c30);
        c31 = _mm256_fmadd_ps(x3, b1, c31);
        __m256 x4 = _mm256_broadcast_ss(a4 + k);
        c40 = _mm256_fmadd_ps(x4, b0, c40);
        c41 = _mm256_fmadd_ps(x4, b1, c41);
        __m256 x5 = _mm256_broadcast_ss(a5 + k);
        c50 = _mm256_fmadd_ps(x5, b0, c50);
        c51 = _mm256_fmadd_ps(x5, b1, c51);
    }
    const __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int i = 0; i < 12; ++i) {
        float* dst = out + (i / 2) * ld + (i % 2) * 8;
        _mm256_storeu_ps(dst, accumulate ? _mm256_add_ps(_mm256_loadu_ps(dst), acc[i]) : acc[i]);
    }
}

// Lanes keep their own first maximum (strict >, indices grow within a lane); mmr_finish merges them.
RAG_AVX2 std::size_t mmr_step_avx2(const float* row, double* near, double* lr, std::size_t m, double keep,
                                   double threshold) {
    const __m256d k = _mm256_set1_pd(keep);
    const __m256d t = _mm256_set1_pd(threshold);
    const __m256d dropped = _mm256_set1_pd(kMinusInf);
    __m256d best = dropped;
    __m256i best_i = _mm256_set1_epi64x(static_cast<long long>(m));
    __m256i index = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i step = _mm256_set1_epi64x(4);
    std::size_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const __m256d s = _mm256_cvtps_pd(_mm_loadu_ps(row + i));
        const __m256d old = _mm256_loadu_pd(near + i);
        const __m256d n = _mm256_blendv_pd(old, s, _mm256_cmp_pd(old, s, _CMP_LT_OQ));
        _mm256_storeu_pd(near + i, n);
        const __m256d l = _mm256_blendv_pd(_mm256_loadu_pd(lr + i), dropped, _mm256_cmp_pd(s, t, _CMP_GT_OQ));
        _mm256_storeu_pd(lr + i, l);
        const __m256d gain = _mm256_sub_pd(l, _mm256_mul_pd(k, n));
        const __m256d better = _mm256_cmp_pd(gain, best, _CMP_GT_OQ);
        best = _mm256_blendv_pd(best, gain, better);
        best_i = _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(best_i), _mm256_castsi256_pd(index), better));
        index = _mm256_add_epi64(index, step);
    }
    alignas(32) double values[4];
    alignas(32) std::int64_t indices[4];
    _mm256_store_pd(values, best);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), best_i);
    return mmr_finish(values, indices, 4, row, near, lr, i, m, keep, threshold);
}

// 4 x 4 tile: each step loads 4 + 4 vectors for 16 FMAs (a single dot would load 2 per FMA).
RAG_AVX2 void tile_avx2(const float* a, std::size_t ar, const float* b, std::size_t br, std::size_t d, float* out,
                        std::size_t ld) {
    if (ar != 4 || br != 4 || d % 8 != 0) {
        for (std::size_t r = 0; r < ar; ++r) {
            for (std::size_t c = 0; c < br; ++c) out[r * ld + c] = f32_avx2(a + r * d, b + c * d, d);
        }
        return;
    }
    __m256 acc[4][4];
    for (auto& row : acc) {
        for (auto& x : row) x = _mm256_setzero_ps();
    }
    for (std::size_t i = 0; i < d; i += 8) {
        __m256 bv[4];
        for (std::size_t c = 0; c < 4; ++c) bv[c] = _mm256_loadu_ps(b + c * d + i);
        for (std::size_t r = 0; r < 4; ++r) {
            const __m256 av = _mm256_loadu_ps(a + r * d + i);
            for (std::size_t c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(av, bv[c], acc[r][c]);
        }
    }
    for (std::size_t r = 0; r < 4; ++r) {
        for (std::size_t c = 0; c < 4; ++c) out[r * ld + c] = hsum256(acc[r][c]);
    }
}

// ---- AVX-512 (F; BW and VL are not needed by these loops) ----
#define RAG_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

template <typename Load>
RAG_AVX512 inline float dot_avx512(const float* q, std::size_t d, Load load) {
    __m512 a0 = _mm512_setzero_ps();
    __m512 a1 = _mm512_setzero_ps();
    std::size_t i = 0;
    for (; i + 32 <= d; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load(i, static_cast<__mmask16>(0xFFFF)), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), load(i + 16, static_cast<__mmask16>(0xFFFF)), a1);
    }
    for (; i < d; i += 16) {  // the last one or two steps, masked: no scalar tail
        const std::size_t left = d - i;
        const auto mask = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + i), load(i, mask), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

RAG_AVX512 float f32_avx512(const float* q, const float* r, std::size_t d) {
    return dot_avx512(q, d, [r](std::size_t i, __mmask16 m) RAG_AVX512 { return _mm512_maskz_loadu_ps(m, r + i); });
}
RAG_AVX512 float i8_avx512(const float* q, const std::int8_t* r, std::size_t d) {
    return dot_avx512(q, d, [r](std::size_t i, __mmask16 m) RAG_AVX512 {
        // a masked byte load needs AVX512BW; copy the tail instead (at most once per row)
        __m128i bytes;
        if (m == 0xFFFF) {
            bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i));
        } else {
            alignas(16) std::int8_t tail[16] = {};
            std::memcpy(tail, r + i, static_cast<std::size_t>(__builtin_popcount(m)));
            bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
        }
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    });
}
RAG_AVX512 float f16_avx512(const float* q, const std::uint16_t* r, std::size_t d) {
    return dot_avx512(q, d, [r](std::size_t i, __mmask16 m) RAG_AVX512 {
        __m256i halves;
        if (m == 0xFFFF) {
            halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i));
        } else {
            alignas(32) std::uint16_t tail[16] = {};
            std::memcpy(tail, r + i, sizeof(std::uint16_t) * static_cast<std::size_t>(__builtin_popcount(m)));
            halves = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
        return _mm512_cvtph_ps(halves);
    });
}

RAG_AVX512 void tile_avx512(const float* a, std::size_t ar, const float* b, std::size_t br, std::size_t d, float* out,
                            std::size_t ld) {
    if (ar != 4 || br != 4 || d % 16 != 0) {
        for (std::size_t r = 0; r < ar; ++r) {
            for (std::size_t c = 0; c < br; ++c) out[r * ld + c] = f32_avx512(a + r * d, b + c * d, d);
        }
        return;
    }
    __m512 acc[4][4];
    for (auto& row : acc) {
        for (auto& x : row) x = _mm512_setzero_ps();
    }
    for (std::size_t i = 0; i < d; i += 16) {
        __m512 bv[4];
        for (std::size_t c = 0; c < 4; ++c) bv[c] = _mm512_loadu_ps(b + c * d + i);
        for (std::size_t r = 0; r < 4; ++r) {
            const __m512 av = _mm512_loadu_ps(a + r * d + i);
            for (std::size_t c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(av, bv[c], acc[r][c]);
        }
    }
    for (std::size_t r = 0; r < 4; ++r) {
        for (std::size_t c = 0; c < 4; ++c) out[r * ld + c] = _mm512_reduce_add_ps(acc[r][c]);
    }
}

// 6 rows x 32 columns: 12 zmm accumulators, the panel read contiguously (128 bytes per k).
RAG_AVX512 void gram_avx512(const float* const* a, const float* panel, std::size_t kc, float* out, std::size_t ld,
                           bool accumulate) {
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (std::size_t k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_loadu_ps(panel + k * 32);
        const __m512 b1 = _mm512_loadu_ps(panel + k * 32 + 16);
        __m512 x0 = _mm512_set1_ps(a0[k]);
        c00 = _mm512_fmadd_ps(x0, b0, c00);
        c01 = _mm512_fmadd_ps(x0, b1, c01);
        __m512 x1 = _mm512_set1_ps(a1[k]);
        c10 = _mm512_fmadd_ps(x1, b0, c10);
        c11 = _mm512_fmadd_ps(x1, b1, c11);
        __m512 x2 = _mm512_set1_ps(a2[k]);
        c20 = _mm512_fmadd_ps(x2, b0, c20);
        c21 = _mm512_fmadd_ps(x2, b1, c21);
        __m512 x3 = _mm512_set1_ps(a3[k]);
        c30 = _mm512_fmadd_ps(x3, b0, c30);
        c31 = _mm512_fmadd_ps(x3, b1, c31);
        __m512 x4 = _mm512_set1_ps(a4[k]);
        c40 = _mm512_fmadd_ps(x4, b0, c40);
        c41 = _mm512_fmadd_ps(x4, b1, c41);
        __m512 x5 = _mm512_set1_ps(a5[k]);
        c50 = _mm512_fmadd_ps(x5, b0, c50);
        c51 = _mm512_fmadd_ps(x5, b1, c51);
    }
    const __m512 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int i = 0; i < 12; ++i) {
        float* dst = out + (i / 2) * ld + (i % 2) * 16;
        _mm512_storeu_ps(dst, accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst), acc[i]) : acc[i]);
    }
}

RAG_AVX512 std::size_t mmr_step_avx512(const float* row, double* near, double* lr, std::size_t m, double keep,
                                       double threshold) {
    const __m512d k = _mm512_set1_pd(keep);
    const __m512d t = _mm512_set1_pd(threshold);
    const __m512d dropped = _mm512_set1_pd(kMinusInf);
    __m512d best = dropped;
    __m512i best_i = _mm512_set1_epi64(static_cast<long long>(m));
    __m512i index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i step = _mm512_set1_epi64(8);
    std::size_t i = 0;
    for (; i + 8 <= m; i += 8) {
        const __m512d s = _mm512_cvtps_pd(_mm256_loadu_ps(row + i));
        const __m512d old = _mm512_loadu_pd(near + i);
        const __m512d n = _mm512_mask_mov_pd(old, _mm512_cmp_pd_mask(old, s, _CMP_LT_OQ), s);
        _mm512_storeu_pd(near + i, n);
        const __m512d l = _mm512_mask_mov_pd(_mm512_loadu_pd(lr + i), _mm512_cmp_pd_mask(s, t, _CMP_GT_OQ), dropped);
        _mm512_storeu_pd(lr + i, l);
        const __m512d gain = _mm512_sub_pd(l, _mm512_mul_pd(k, n));
        const __mmask8 better = _mm512_cmp_pd_mask(gain, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_pd(best, better, gain);
        best_i = _mm512_mask_mov_epi64(best_i, better, index);
        index = _mm512_add_epi64(index, step);
    }
    alignas(64) double values[8];
    alignas(64) std::int64_t indices[8];
    _mm512_store_pd(values, best);
    _mm512_store_si512(indices, best_i);
    return mmr_finish(values, indices, 8, row, near, lr, i, m, keep, threshold);
}

// ---- AVX-512 VNNI (with BW for the masked byte loads of the tail) ----
#define RAG_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

// vpdpbusd multiplies unsigned by signed bytes, so the rows' bytes are offset by 128 (their top bit flipped) and
// 128 * sum(q) is taken off again: sum q * (r + 128) - 128 * sum q = sum q * r, exactly.
//
// Measured on SciFact's 10,435 x 384 codes (AMD EPYC, VNNI): the query held in registers and two rows at a time, each
// read front to back, scan 5.6 ns/row in cache and 10-17 ns/row from DRAM; four rows read in interleaved 64-byte
// steps were faster in cache (6.9) but twice as slow from DRAM (21-30 ns/row): the hardware prefetcher follows one
// forward stream best.
template <std::size_t kChunks>
RAG_VNNI void i8i8_rows_vnni_fixed(const std::int8_t* q, const std::int8_t* const* rows, std::size_t count,
                                   std::size_t d, std::int32_t* out, std::int32_t offset) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    // Past the end of a row the masked loads read zeros, whose products with the query's zeros vanish.
    const __mmask64 tail = d % 64 == 0 ? ~0ULL : (~0ULL) >> (64 - d % 64);
    __m512i qv[kChunks];
    for (std::size_t c = 0; c < kChunks; ++c) {
        qv[c] = c + 1 < kChunks ? _mm512_loadu_si512(q + c * 64) : _mm512_maskz_loadu_epi8(tail, q + c * 64);
    }
    auto row_dot = [&](const std::int8_t* row) RAG_VNNI {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        for (std::size_t c = 0; c < kChunks; ++c) {
            const __m512i bytes =
                c + 1 < kChunks ? _mm512_loadu_si512(row + c * 64) : _mm512_maskz_loadu_epi8(tail, row + c * 64);
            if (c % 2 == 0) {
                a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(bytes, flip), qv[c]);
            } else {
                a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(bytes, flip), qv[c]);
            }
        }
        return _mm512_add_epi32(a0, a1);
    };
    std::size_t r = 0;
    for (; r + 2 <= count; r += 2) {
        const __m512i x = row_dot(rows[r]);
        const __m512i y = row_dot(rows[r + 1]);
        out[r] = _mm512_reduce_add_epi32(x) - offset;
        out[r + 1] = _mm512_reduce_add_epi32(y) - offset;
    }
    if (r < count) out[r] = _mm512_reduce_add_epi32(row_dot(rows[r])) - offset;
}

RAG_VNNI void i8i8_rows_vnni(const std::int8_t* q, const std::int8_t* const* rows, std::size_t count, std::size_t d,
                             std::int32_t* out) {
    std::int32_t offset = 0;
    for (std::size_t i = 0; i < d; ++i) offset += 128 * static_cast<std::int32_t>(q[i]);
    switch ((d + 63) / 64) {
        case 0: for (std::size_t r = 0; r < count; ++r) out[r] = 0; return;
        case 1: return i8i8_rows_vnni_fixed<1>(q, rows, count, d, out, offset);
        case 2: return i8i8_rows_vnni_fixed<2>(q, rows, count, d, out, offset);
        case 3: return i8i8_rows_vnni_fixed<3>(q, rows, count, d, out, offset);
        case 4: return i8i8_rows_vnni_fixed<4>(q, rows, count, d, out, offset);
        case 5: return i8i8_rows_vnni_fixed<5>(q, rows, count, d, out, offset);
        case 6: return i8i8_rows_vnni_fixed<6>(q, rows, count, d, out, offset);
        case 7: return i8i8_rows_vnni_fixed<7>(q, rows, count, d, out, offset);
        case 8: return i8i8_rows_vnni_fixed<8>(q, rows, count, d, out, offset);
        case 9: return i8i8_rows_vnni_fixed<9>(q, rows, count, d, out, offset);
        case 10: return i8i8_rows_vnni_fixed<10>(q, rows, count, d, out, offset);
        case 11: return i8i8_rows_vnni_fixed<11>(q, rows, count, d, out, offset);
        case 12: return i8i8_rows_vnni_fixed<12>(q, rows, count, d, out, offset);
        case 13: return i8i8_rows_vnni_fixed<13>(q, rows, count, d, out, offset);
        case 14: return i8i8_rows_vnni_fixed<14>(q, rows, count, d, out, offset);
        case 15: return i8i8_rows_vnni_fixed<15>(q, rows, count, d, out, offset);
        case 16: return i8i8_rows_vnni_fixed<16>(q, rows, count, d, out, offset);
        default: break;  // wider than 1,024: the AVX2 kernel
    }
    i8i8_rows_avx2(q, rows, count, d, out);
}

// The sums of 16 vectors of 16 int32 lanes, as one vector (lane r: the sum of a[r]): pairs interleaved and added,
// 32-bit then 64-bit, then the 128-bit lanes; ~3 instructions per vector against ~9 for a reduction of each.
RAG_VNNI inline __m512i sum16(const __m512i* a) {
    __m512i b[8];
    for (int k = 0; k < 8; ++k) {
        b[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * k], a[2 * k + 1]),
                                _mm512_unpackhi_epi32(a[2 * k], a[2 * k + 1]));
    }
    __m512i c[4];
    for (int k = 0; k < 4; ++k) {
        c[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * k], b[2 * k + 1]),
                                _mm512_unpackhi_epi64(b[2 * k], b[2 * k + 1]));
    }
    // Each 128-bit lane of c[k] now holds partial sums of rows 4k .. 4k + 3; add the four lanes.
    const __m512i d0 = _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
    const __m512i d1 = _mm512_add_epi32(_mm512_shuffle_i32x4(c[2], c[3], 0x88), _mm512_shuffle_i32x4(c[2], c[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(d0, d1, 0x88), _mm512_shuffle_i32x4(d0, d1, 0xDD));
}

// A row's word picks its 64 query bytes with one masked move; vpdpbusd adds them (as ones times the signed bytes)
// four at a time into int32 lanes. Sixteen rows at a time, summed together (sum16).
template <std::size_t kWords>
RAG_VNNI void bits_rows_vnni_fixed(const std::int8_t* q, const std::uint64_t* bits, std::size_t count,
                                   std::int32_t* out) {
    __m512i qv[kWords];
    for (std::size_t w = 0; w < kWords; ++w) qv[w] = _mm512_loadu_si512(q + 64 * w);
    const __m512i ones = _mm512_set1_epi8(1);
    auto row_sum = [&](const std::uint64_t* row) RAG_VNNI {
        __m512i acc = _mm512_setzero_si512();
        for (std::size_t w = 0; w < kWords; ++w) {
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_mov_epi8(static_cast<__mmask64>(row[w]), qv[w]));
        }
        return acc;
    };
    std::size_t r = 0;
    for (; r + 16 <= count; r += 16) {
        __m512i acc[16];
        for (std::size_t j = 0; j < 16; ++j) acc[j] = row_sum(bits + (r + j) * kWords);
        _mm512_storeu_si512(out + r, sum16(acc));
    }
    for (; r < count; ++r) out[r] = _mm512_reduce_add_epi32(row_sum(bits + r * kWords));
}

RAG_VNNI void bits_rows_vnni(const std::int8_t* q, const std::uint64_t* bits, std::size_t count, std::size_t words,
                             std::int32_t* out) {
    switch (words) {
        case 0: for (std::size_t r = 0; r < count; ++r) out[r] = 0; return;
        case 1: return bits_rows_vnni_fixed<1>(q, bits, count, out);
        case 2: return bits_rows_vnni_fixed<2>(q, bits, count, out);
        case 3: return bits_rows_vnni_fixed<3>(q, bits, count, out);
        case 4: return bits_rows_vnni_fixed<4>(q, bits, count, out);
        case 5: return bits_rows_vnni_fixed<5>(q, bits, count, out);
        case 6: return bits_rows_vnni_fixed<6>(q, bits, count, out);
        case 7: return bits_rows_vnni_fixed<7>(q, bits, count, out);
        case 8: return bits_rows_vnni_fixed<8>(q, bits, count, out);
        case 12: return bits_rows_vnni_fixed<12>(q, bits, count, out);
        case 16: return bits_rows_vnni_fixed<16>(q, bits, count, out);
        default: break;  // other widths: the AVX2 kernel
    }
    bits_rows_avx2(q, bits, count, words, out);
}

#endif  // RAG_X86_SIMD

constexpr Dots kScalarDots{f32_scalar, i8_scalar, f16_scalar, tile_scalar, 0, nullptr, mmr_step_scalar,
                            i8i8_rows_scalar, bits_rows_scalar};
#if defined(RAG_X86_SIMD)
constexpr Dots kAvx2Dots{f32_avx2, i8_avx2, f16_avx2, tile_avx2, 16, gram_avx2, mmr_step_avx2, i8i8_rows_avx2,
                          bits_rows_avx2};
constexpr Dots kAvx512Dots{f32_avx512, i8_avx512, f16_avx512, tile_avx512, 32, gram_avx512,
                            mmr_step_avx512, i8i8_rows_avx2, bits_rows_avx2};
// VNNI is not a level of its own: it only changes the integer dot, whose value is the same at every level.
constexpr Dots kAvx512VnniDots{f32_avx512, i8_avx512, f16_avx512, tile_avx512, 32, gram_avx512,
                                mmr_step_avx512, i8i8_rows_vnni, bits_rows_vnni};

bool has_vnni() noexcept {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}
#endif

Level detect() noexcept {
#if defined(RAG_X86_SIMD)
    // __builtin_cpu_supports also checks (through XGETBV) that the OS saves the AVX / AVX-512 register state.
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f")) return Level::kAvx512;
    if (avx2) return Level::kAvx2;
#endif
    return Level::kScalar;
}

}  // namespace

Level best_level() noexcept {
    static const Level level = detect();
    return level;
}

bool supported(Level level) noexcept { return static_cast<int>(level) <= static_cast<int>(best_level()); }

const char* name(Level level) noexcept {
    switch (level) {
        case Level::kAvx512: return "avx512";
        case Level::kAvx2: return "avx2";
        default: return "scalar";
    }
}

Level parse(std::string_view text) {
    Level level;
    if (text.empty() || text == "auto") return best_level();
    if (text == "scalar") {
        level = Level::kScalar;
    } else if (text == "avx2") {
        level = Level::kAvx2;
    } else if (text == "avx512") {
        level = Level::kAvx512;
    } else {
        throw std::invalid_argument("simd must be 'auto', 'scalar', 'avx2' or 'avx512', got '" + std::string(text) +
                                    "'");
    }
    if (!supported(level)) {
        throw std::invalid_argument("simd='" + std::string(text) + "' is not supported by this CPU (best: " +
                                    name(best_level()) + ")");
    }
    return level;
}

bool bits_pay(Level level) noexcept {
#if defined(RAG_X86_SIMD)
    static const bool vnni = has_vnni();
    return level == Level::kAvx512 && vnni;
#else
    (void)level;
    return false;
#endif
}

const Dots& dots(Level level) noexcept {
#if defined(RAG_X86_SIMD)
    if (level == Level::kAvx512) {
        static const bool vnni = has_vnni();
        return vnni ? kAvx512VnniDots : kAvx512Dots;
    }
    if (level == Level::kAvx2) return kAvx2Dots;
#endif
    (void)level;
    return kScalarDots;
}

}  // namespace rag::simd
