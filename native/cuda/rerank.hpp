// CUDA twins of the window MaxSim, similarity-matrix and MMR kernels (native/src/rerank.hpp). Plain C++ interface
// (no CUDA headers) so the bindings can call them; compiled only when the build has CUDA (RAG_HAS_CUDA=1).
//
// Arguments are checked by the caller with the C++ checks (rag::check_window_args, rag::check_mmr_args,
// rag::check_finite) before these run; a non-finite window score still throws std::invalid_argument, like the C++
// kernel. CUDA failures (no device, out of memory, launch errors) throw std::runtime_error with the runtime's message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/rerank.hpp"

namespace rag::cuda {

// out: m x 3 floats on the host. Copies the candidates' windows (gathered on the host) to the device.
void window_maxsim(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                   double temperature, float* out);

// out: m x m floats on the host.
void similarity_matrix(const float* vectors, std::size_t m, std::size_t d, float* out);

// Greedy MMR on the device (one thread block); the same picks as rag::mmr_select, ties included.
std::vector<std::int64_t> mmr_select(const float* relevance, const float* sim, std::size_t m, double mmr_lambda,
                                     std::int64_t k, double dedup_threshold);

}  // namespace rag::cuda
