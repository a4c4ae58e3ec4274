// Group-relative advantages (GRPO, Dr. GRPO, RLOO) over consecutive groups of scores.
//
// For a group x_1..x_G with mean m and unbiased standard deviation s (s = 0 when G = 1):
// (computed on x - x_1, which the result does not depend on: a constant group gives exactly 0
// even when its mean is not representable)
//   baseline  = m                          (GRPO, Dr. GRPO)
//             = (sum - x_i) / (G - 1)      (RLOO, leave_one_out; x_i - baseline = G/(G-1) (x_i - m))
//   advantage = (x_i - baseline) / (s + eps)   if normalize_std   else   x_i - baseline
#pragma once

#include "common.h"

namespace fastrlhf::kernels::group_advantages {

struct Params {
  const void* scores = nullptr;  // [n_groups * group_size]
  void* out = nullptr;           // same shape/dtype
  int64_t n_groups = 0, group_size = 0;
  bool normalize_std = true, leave_one_out = false;
  double eps = 1e-6;
};

// The output is (x - mean) * scale; the scale of a group from its size and sum of squared
// deviations from the mean.
template <typename A>
FRL_HD A output_scale(A sq_dev_sum, int64_t G, bool normalize_std, bool leave_one_out, A eps) {
  A scale = leave_one_out ? A(G) / A(G - 1) : A(1);
  if (normalize_std) {
    const A var = G > 1 ? sq_dev_sum / A(G - 1) : A(0);
    scale = scale / (sqrt_acc(var) + eps);
  }
  return scale;
}

}  // namespace fastrlhf::kernels::group_advantages

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::group_advantages {
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// One warp per group, shuffle reductions in a fixed order.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::group_advantages
