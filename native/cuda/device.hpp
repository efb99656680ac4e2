// CUDA device probe. Plain C++ interface (no CUDA headers) so host-only translation units can call it; the
// implementation in device.cu is compiled only when the build has CUDA (RAG_HAS_CUDA=1).
#pragma once

#include <string>

namespace rag::cuda {

struct DeviceCount {
    int count = 0;      // devices the CUDA runtime can see
    std::string error;  // empty on success, else the CUDA runtime's error string
};

// Asks the CUDA runtime (statically linked) how many devices it sees. Never throws: a missing or too old driver,
// no device, or a broken installation all come back as {0, reason}.
DeviceCount device_count() noexcept;

// CUDA runtime version the module was compiled against, e.g. "13.0".
std::string runtime_version();

}  // namespace rag::cuda
