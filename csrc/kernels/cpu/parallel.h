// The CPU launchers own the parallel split, but not the thread pool: the torch glue passes a
// ParallelFor that runs on torch's intra-op pool (so torch.set_num_threads applies).
// Launchers choose their split from the problem shape only, never from the thread count, so
// results are bitwise identical whatever the number of threads.
#pragma once

#include <cstdint>
#include <functional>

namespace fastrlhf::kernels::cpu {

using Body = std::function<void(int64_t begin, int64_t end)>;
// Calls body on disjoint sub-ranges covering [0, n), each at least `grain` long (but the last).
using ParallelFor = std::function<void(int64_t n, int64_t grain, const Body& body)>;

// Grain (in rows) so that each task covers at least `elements` elements of rows `row_len` long.
inline int64_t rows_grain(int64_t row_len, int64_t elements) {
  const int64_t g = elements / (row_len > 1 ? row_len : 1);
  return g > 1 ? g : 1;
}

inline void serial_for(int64_t n, int64_t /*grain*/, const Body& body) {
  if (n > 0) body(0, n);
}

}  // namespace fastrlhf::kernels::cpu
