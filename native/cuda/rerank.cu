#include "rerank.hpp"

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace rag::cuda {
namespace {

void check(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return;
    const char* message = cudaGetErrorString(status);
    (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + (message != nullptr ? message : "unknown"));
}

// Device memory owned for the length of one call.
template <typename T>
class DeviceBuffer {
public:
    explicit DeviceBuffer(std::size_t count) : count_(count) {
        if (count_ > 0) check(cudaMalloc(reinterpret_cast<void**>(&ptr_), count_ * sizeof(T)), "cudaMalloc");
    }
    ~DeviceBuffer() {
        if (ptr_ != nullptr) (void)cudaFree(ptr_);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    T* get() const { return ptr_; }
    void upload(const T* host, std::size_t count) {
        if (count > 0) check(cudaMemcpy(ptr_, host, count * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    }
    void download(T* host, std::size_t count) const {
        if (count > 0) check(cudaMemcpy(host, ptr_, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    }

private:
    T* ptr_ = nullptr;
    std::size_t count_;
};

void check_launch(const char* kernel) {
    check(cudaGetLastError(), kernel);
    check(cudaDeviceSynchronize(), kernel);
}

constexpr int kWarp = 32;

__device__ inline float load_value(const std::int8_t* row, std::size_t i) { return static_cast<float>(row[i]); }
__device__ inline float load_value(const __half* row, std::size_t i) { return __half2float(row[i]); }
__device__ inline float load_value(const float* row, std::size_t i) { return row[i]; }

// One block per candidate: each warp takes windows round-robin and reduces its dot product with shuffles; then one
// thread turns the candidate's scores into max / top-2 mean / soft max, in the C++ kernel's operation order.
template <typename T>
__global__ void window_maxsim_kernel(const float* query, const T* rows, const float* scales, const std::int64_t* local,
                                     std::size_t d, double temperature, float* scores, float* out, int* bad) {
    const std::size_t i = blockIdx.x;
    const std::int64_t start = local[i];
    const std::int64_t stop = local[i + 1];
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    for (std::int64_t w = start + warp; w < stop; w += warps) {
        const T* row = rows + static_cast<std::size_t>(w) * d;
        float acc = 0.0f;
        for (std::size_t j = lane; j < d; j += kWarp) acc += query[j] * load_value(row, j);
        for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, offset);
        if (lane == 0) scores[w] = scales != nullptr ? acc * scales[w] : acc;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    float* row_out = out + 3 * i;
    const float nan = __int_as_float(0x7FC00000);
    bad[i] = 0;
    if (stop == start) {
        row_out[0] = row_out[1] = row_out[2] = nan;
        return;
    }
    float best = -INFINITY;
    float second = -INFINITY;
    for (std::int64_t w = start; w < stop; ++w) {
        const float s = scores[w];
        if (!isfinite(s)) {
            bad[i] = 1;
            return;
        }
        if (s > best) {
            second = best;
            best = s;
        } else if (s > second) {
            second = s;
        }
    }
    const double count = static_cast<double>(stop - start);
    double sum = 0.0;
    for (std::int64_t w = start; w < stop; ++w) sum += exp((static_cast<double>(scores[w]) - best) / temperature);
    const double soft = __dsub_rn(__dadd_rn(__dmul_rn(temperature, log(sum)), static_cast<double>(best)),
                                  __dmul_rn(temperature, log(count)));
    row_out[0] = best;
    row_out[1] = stop - start > 1 ? __fdiv_rn(__fadd_rn(best, second), 2.0f) : best;
    row_out[2] = static_cast<float>(fmin(soft, static_cast<double>(best)));
}

// C = A A^T with 16 x 16 shared-memory tiles.
constexpr int kTile = 16;

__global__ void similarity_kernel(const float* a, std::size_t m, std::size_t d, float* out) {
    __shared__ float rows[kTile][kTile + 1];
    __shared__ float cols[kTile][kTile + 1];
    const std::size_t r = static_cast<std::size_t>(blockIdx.y) * kTile + threadIdx.y;
    const std::size_t c = static_cast<std::size_t>(blockIdx.x) * kTile + threadIdx.y;
    const std::size_t out_c = static_cast<std::size_t>(blockIdx.x) * kTile + threadIdx.x;
    float acc = 0.0f;
    for (std::size_t k0 = 0; k0 < d; k0 += kTile) {
        const std::size_t k = k0 + threadIdx.x;
        rows[threadIdx.y][threadIdx.x] = (r < m && k < d) ? a[r * d + k] : 0.0f;
        cols[threadIdx.y][threadIdx.x] = (c < m && k < d) ? a[c * d + k] : 0.0f;
        __syncthreads();
        for (int j = 0; j < kTile; ++j) acc += rows[threadIdx.y][j] * cols[threadIdx.x][j];
        __syncthreads();
    }
    if (r < m && out_c < m) out[r * m + out_c] = acc;
}

// (value, index) argmax with ties to the lower index; index -1 means "none".
struct Best {
    double value;
    long long index;
};

__device__ inline Best better(Best a, Best b) {
    if (a.index < 0) return b;
    if (b.index < 0) return a;
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
}

__device__ Best block_argmax(Best mine, Best* shared) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        Best other;
        other.value = __shfl_down_sync(0xFFFFFFFFu, mine.value, offset);
        other.index = __shfl_down_sync(0xFFFFFFFFu, mine.index, offset);
        mine = better(mine, other);
    }
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    if (lane == 0) shared[warp] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        Best total = shared[0];
        for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) total = better(total, shared[w]);
        shared[0] = total;
    }
    __syncthreads();
    const Best result = shared[0];
    __syncthreads();  // shared is reused by the next reduction
    return result;
}

constexpr int kMmrThreads = 1024;

// The whole greedy loop in one block: every step is a pass over the picked row plus a block-wide argmax. Gains use
// explicitly rounded operations (no FMA contraction), so they equal the C++ kernel's doubles and ties break alike.
__global__ void mmr_kernel(const float* relevance, const float* sim, std::size_t m, double mmr_lambda,
                           std::size_t limit, double dedup_threshold, unsigned char* alive, double* nearest,
                           std::int64_t* chosen, int* n_chosen) {
    __shared__ Best shared[kMmrThreads / kWarp];
    for (std::size_t i = threadIdx.x; i < m; i += blockDim.x) {
        alive[i] = 1;
        nearest[i] = -INFINITY;
    }
    Best mine{-INFINITY, -1};
    for (std::size_t i = threadIdx.x; i < m; i += blockDim.x) {
        mine = better(mine, Best{static_cast<double>(relevance[i]), static_cast<long long>(i)});
    }
    Best pick = block_argmax(mine, shared);  // also a barrier after the initialisation above
    const double keep = __dsub_rn(1.0, mmr_lambda);
    std::size_t count = 0;
    while (pick.index >= 0) {
        const auto p = static_cast<std::size_t>(pick.index);
        if (threadIdx.x == 0) chosen[count] = pick.index;
        ++count;
        if (count == limit) break;  // the k-th pick's row is not read (as in the C++ kernel)
        const float* row = sim + p * m;
        for (std::size_t i = threadIdx.x; i < m; i += blockDim.x) {
            const double s = row[i];
            if (i == p || s > dedup_threshold) alive[i] = 0;
            nearest[i] = fmax(nearest[i], s);
        }
        __syncthreads();
        mine = Best{-INFINITY, -1};
        for (std::size_t i = threadIdx.x; i < m; i += blockDim.x) {
            if (!alive[i]) continue;
            const double gain = __dsub_rn(__dmul_rn(mmr_lambda, static_cast<double>(relevance[i])),
                                          __dmul_rn(keep, nearest[i]));
            mine = better(mine, Best{gain, static_cast<long long>(i)});
        }
        pick = block_argmax(mine, shared);
    }
    if (threadIdx.x == 0) *n_chosen = static_cast<int>(count);
}

}  // namespace

void window_maxsim(const float* query, const WindowStore& store, const std::int64_t* candidates, std::size_t m,
                   double temperature, float* out) {
    if (m == 0) return;
    const std::size_t elem = store.type == VectorType::kInt8 ? 1 : store.type == VectorType::kFloat16 ? 2 : 4;
    const std::size_t row_bytes = store.d * elem;
    // Gather the candidates' windows into one block (the store usually lives in a host memory map).
    std::vector<std::int64_t> local(m + 1, 0);
    for (std::size_t i = 0; i < m; ++i) {
        const auto c = candidates[i];
        local[i + 1] = local[i] + (store.offsets[c + 1] - store.offsets[c]);
    }
    const auto windows = static_cast<std::size_t>(local[m]);
    std::vector<unsigned char> rows(windows * row_bytes);
    std::vector<float> scales(store.type == VectorType::kInt8 ? windows : 0);
    const auto* base = static_cast<const unsigned char*>(store.vectors);
    for (std::size_t i = 0; i < m; ++i) {
        const auto c = candidates[i];
        const auto start = static_cast<std::size_t>(store.offsets[c]);
        const auto n = static_cast<std::size_t>(store.offsets[c + 1]) - start;
        if (n == 0) continue;
        std::memcpy(rows.data() + static_cast<std::size_t>(local[i]) * row_bytes, base + start * row_bytes,
                    n * row_bytes);
        if (!scales.empty()) std::memcpy(scales.data() + local[i], store.scales + start, n * sizeof(float));
    }

    DeviceBuffer<float> d_query(store.d);
    DeviceBuffer<unsigned char> d_rows(rows.size());
    DeviceBuffer<float> d_scales(scales.size());
    DeviceBuffer<std::int64_t> d_local(m + 1);
    DeviceBuffer<float> d_scores(std::max<std::size_t>(windows, 1));
    DeviceBuffer<float> d_out(3 * m);
    DeviceBuffer<int> d_bad(m);
    d_query.upload(query, store.d);
    d_rows.upload(rows.data(), rows.size());
    d_scales.upload(scales.data(), scales.size());
    d_local.upload(local.data(), m + 1);

    const dim3 grid(static_cast<unsigned>(m));
    const dim3 block(128);
    const float* scale_ptr = scales.empty() ? nullptr : d_scales.get();
    switch (store.type) {
        case VectorType::kInt8:
            window_maxsim_kernel<<<grid, block>>>(d_query.get(), reinterpret_cast<const std::int8_t*>(d_rows.get()),
                                                  scale_ptr, d_local.get(), store.d, temperature, d_scores.get(),
                                                  d_out.get(), d_bad.get());
            break;
        case VectorType::kFloat16:
            window_maxsim_kernel<<<grid, block>>>(d_query.get(), reinterpret_cast<const __half*>(d_rows.get()),
                                                  scale_ptr, d_local.get(), store.d, temperature, d_scores.get(),
                                                  d_out.get(), d_bad.get());
            break;
        default:
            window_maxsim_kernel<<<grid, block>>>(d_query.get(), reinterpret_cast<const float*>(d_rows.get()),
                                                  scale_ptr, d_local.get(), store.d, temperature, d_scores.get(),
                                                  d_out.get(), d_bad.get());
            break;
    }
    check_launch("window_maxsim_kernel");
    std::vector<int> bad(m);
    d_bad.download(bad.data(), m);
    d_out.download(out, 3 * m);
    for (std::size_t i = 0; i < m; ++i) {
        if (bad[i] == 0) continue;
        const auto c = candidates[i];
        throw std::invalid_argument("vectors (or scales) of chunk " + std::to_string(c) + " (rows " +
                                    std::to_string(store.offsets[c]) + ":" + std::to_string(store.offsets[c + 1]) +
                                    ") hold non-finite values");
    }
}

void similarity_matrix(const float* vectors, std::size_t m, std::size_t d, float* out) {
    if (m == 0) return;
    DeviceBuffer<float> d_vectors(m * d);
    DeviceBuffer<float> d_out(m * m);
    d_vectors.upload(vectors, m * d);
    const unsigned tiles = static_cast<unsigned>((m + kTile - 1) / kTile);
    similarity_kernel<<<dim3(tiles, tiles), dim3(kTile, kTile)>>>(d_vectors.get(), m, d, d_out.get());
    check_launch("similarity_kernel");
    d_out.download(out, m * m);
}

std::vector<std::int64_t> mmr_select(const float* relevance, const float* sim, std::size_t m, double mmr_lambda,
                                     std::int64_t k, double dedup_threshold) {
    std::vector<std::int64_t> chosen;
    if (m == 0 || k <= 0) return chosen;
    const std::size_t limit = std::min<std::size_t>(static_cast<std::size_t>(k), m);
    DeviceBuffer<float> d_relevance(m);
    DeviceBuffer<float> d_sim(m * m);
    DeviceBuffer<unsigned char> d_alive(m);
    DeviceBuffer<double> d_nearest(m);
    DeviceBuffer<std::int64_t> d_chosen(limit);
    DeviceBuffer<int> d_count(1);
    d_relevance.upload(relevance, m);
    d_sim.upload(sim, m * m);
    const unsigned threads = static_cast<unsigned>(
        std::min<std::size_t>(kMmrThreads, std::max<std::size_t>(kWarp, (m + kWarp - 1) / kWarp * kWarp)));
    mmr_kernel<<<1, threads>>>(d_relevance.get(), d_sim.get(), m, mmr_lambda, limit, dedup_threshold, d_alive.get(),
                               d_nearest.get(), d_chosen.get(), d_count.get());
    check_launch("mmr_kernel");
    int count = 0;
    d_count.download(&count, 1);
    chosen.resize(static_cast<std::size_t>(count));
    d_chosen.download(chosen.data(), chosen.size());
    return chosen;
}

}  // namespace rag::cuda
