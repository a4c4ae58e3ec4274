// Masked whitening: statistics over the valid elements only, as PPO implementations whiten
// advantages (TRL / verl masked_whiten).
//   n = #valid, mean = sum(x) / n, var = sum((x - mean)^2) / (n - unbiased)  (0 when n <= unbiased)
//   rstd = 1 / sqrt(var + eps)
//   out = (x - mean) * rstd (+ mean when !shift_mean) at valid elements, 0 elsewhere.
// Reductions run over fixed-size chunks combined in a fixed order: deterministic for any number
// of threads (CPU) and any launch (CUDA).
#pragma once

#include "common.h"

namespace fastrlhf::kernels::whiten {

struct Params {
  const void* x = nullptr;         // [n] storage dtype
  const uint8_t* mask = nullptr;   // [n] bool or nullptr
  void* out = nullptr;             // [n] storage dtype
  void* mean = nullptr;            // [] accumulator dtype (float, or double for fp64)
  void* rstd = nullptr;            // [] accumulator dtype
  int64_t n = 0;
  bool shift_mean = true, unbiased = true;
  double eps = 1e-8;
};

template <typename A>
FRL_HD A rstd_from(A sq_dev_sum, A count, bool unbiased, A eps) {
  const A denom = count - (unbiased ? A(1) : A(0));
  const A var = denom > A(0) ? sq_dev_sum / denom : A(0);
  return A(1) / sqrt_acc(var + eps);
}

template <typename A>
FRL_HD A apply(A x, bool valid, A mean, A rstd, bool shift_mean) {
  const A y = (x - mean) * rstd + (shift_mean ? A(0) : mean);
  return valid ? y : A(0);
}

}  // namespace fastrlhf::kernels::whiten

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::whiten {
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// Three kernels, no host sync: partial (count, sum) per block; every block reduces the partials
// to the mean and writes partial squared deviations; every block reduces those and applies.
// `workspace` holds at least workspace_bytes(n) bytes.
int64_t workspace_bytes(int64_t n);
cudaError_t launch_cuda(const Params& p, DType dtype, void* workspace, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::whiten
