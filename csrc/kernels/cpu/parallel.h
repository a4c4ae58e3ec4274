// The CPU launchers own the parallel split, but not the thread pool: the torch glue passes a
// ParallelFor that runs on torch's intra-op pool (so torch.set_num_threads applies).
// Launchers choose their split from the problem shape only, never from the thread count, so
// results are bitwise identical whatever the number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

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

// Tasks handed out one at a time from a shared counter, each pool thread taking the next one
// when it finishes its last (largest first when costs are given). Tasks that differ in cost (the
// attention kernels' causal blocks and varlen sequences: up to T^2) or threads that run at
// different speeds (a shared machine) would leave a static split idle. Each task must write only
// its own outputs, so the schedule never changes the result.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : order_(std::max<int64_t>(n, 0)) {
    std::iota(order_.begin(), order_.end(), int64_t(0));
  }
  explicit TaskQueue(const std::vector<int64_t>& cost) : order_(cost.size()) {
    std::iota(order_.begin(), order_.end(), int64_t(0));
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  }
  int64_t size() const { return int64_t(order_.size()); }
  // The next task, or -1 once all are taken.
  int64_t next() {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    return i < size() ? order_[i] : -1;
  }
  // worker() (which sets up its buffers, then loops on next()) once per pool thread.
  template <typename F>
  void run(const ParallelFor& parallel_for, F&& worker) {
    parallel_for(size(), 1, [&](int64_t, int64_t) { worker(); });
  }

 private:
  std::vector<int64_t> order_;
  std::atomic<int64_t> next_{0};
};

}  // namespace fastrlhf::kernels::cpu
