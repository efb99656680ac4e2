// Software prefetch of rows a kernel is about to read at scattered places (a candidate's window vectors, its tokens,
// a dense row): the hardware prefetcher follows sequential streams, not jumps from one candidate to the next, and
// the query's encode has just pushed the index out of the caches.
#pragma once

#include <cstddef>

namespace rag {

// How many rows (or candidates) ahead of the one being scored a kernel asks for the next one's lines.
inline constexpr std::size_t kPrefetchAhead = 4;

inline void prefetch_bytes(const void* start, std::size_t bytes) {
    const char* p = static_cast<const char*>(start);
    for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// Into L2 only: for a whole request's rows asked for at once, which would not fit in L1.
inline void prefetch_bytes_l2(const void* start, std::size_t bytes) {
    const char* p = static_cast<const char*>(start);
    for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

}  // namespace rag
