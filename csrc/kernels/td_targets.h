// Value-based (TD) targets and the tabular Q update.
//   q_learning: y = r + gamma * (1 - done) * max_a' Q(s', a')
//   sarsa:      y = r + gamma * (1 - done) * Q(s', a'_taken)
//   q_update:   Q(s, a) <- Q(s, a) + alpha * (y - Q(s, a))
// At done steps y = r exactly: next_q is not read, so garbage (even NaN) terminal rows are
// harmless. Otherwise NaN in the next_q row propagates.
#pragma once

#include "common.h"

namespace fastrlhf::kernels::td_targets {

struct Params {
  const void* rewards = nullptr;         // [N]
  const void* next_q = nullptr;          // [N, A]
  const uint8_t* dones = nullptr;        // [N] or nullptr
  const int64_t* next_actions = nullptr; // [N] (sarsa) or nullptr (q_learning: max)
  void* out = nullptr;                   // [N]
  int64_t n = 0, num_actions = 0;
  double gamma = 1.0;
};

struct QUpdateParams {
  const void* q = nullptr;          // [N, A]
  const int64_t* actions = nullptr; // [N]
  const void* targets = nullptr;    // [N]
  void* out = nullptr;              // [N, A]
  int64_t n = 0, num_actions = 0;
  double alpha = 1.0;
};

// NaN-propagating max step.
template <typename A>
FRL_HD A nan_max(A m, A x) { return (x > m || x != x) ? x : m; }

template <typename A>
FRL_HD A target(A r, A next, bool done, A gamma) { return done ? r : r + gamma * next; }

template <typename A>
FRL_HD A updated(A q, A y, A alpha) { return q + alpha * (y - q); }

}  // namespace fastrlhf::kernels::td_targets

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::td_targets {
// CPU launchers return kIndexOutOfRange for an action outside [0, A); CUDA kernels trap with a
// device-side check (FRL_DEVICE_CHECK), as torch's own gather does.
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_q_update_cpu(const QUpdateParams& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_q_update_cuda(const QUpdateParams& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::td_targets
