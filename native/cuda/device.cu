#include "device.hpp"

#include <cuda_runtime_api.h>

#include <exception>
#include <string>

namespace rag::cuda {

DeviceCount device_count() noexcept {
    try {
        int count = 0;
        const cudaError_t status = cudaGetDeviceCount(&count);
        if (status != cudaSuccess) {
            const char* message = cudaGetErrorString(status);
            (void)cudaGetLastError();  // clear the sticky-free error state so later runtime calls start clean
            return DeviceCount{0, message != nullptr && *message != '\0' ? message : "unknown CUDA error"};
        }
        if (count <= 0) return DeviceCount{0, "no CUDA device found"};
        return DeviceCount{count, std::string()};
    } catch (const std::exception& error) {  // std::string allocation is the only thing here that can throw
        return DeviceCount{0, error.what()};
    } catch (...) {
        return DeviceCount{0, "unknown error while probing CUDA devices"};
    }
}

std::string runtime_version() {
    return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace rag::cuda
