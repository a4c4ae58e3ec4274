// Per-token KL estimates between the policy and a reference policy from their log-probs
// (Schulman's k1/k2/k3 estimators). With d = logp - ref:
//   k1  = d                         (unbiased, can be negative)
//   k2  = d^2 / 2
//   k3  = exp(-d) + d - 1           ("low-variance KL"; as verl: the log-ratio -d is clamped to
//                                    [-20, 20] and the estimate to at most 10)
//   k3 unclamped: the same without either clamp (as TRL; for -d past ~88 exp overflows in fp32)
//   abs = |d|
// All depend on d only, so d/d ref = -d/d logp.
#pragma once

#include "common.h"
#include "math.h"

namespace fastrlhf::kernels::kl_penalty {

enum class Estimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3, kK3Unclamped = 4 };

constexpr double kK3LogRatioClamp = 20.0;
constexpr double kK3Max = 10.0;

template <typename A>
FRL_HD A value(Estimator est, A logp, A ref) {
  const A d = logp - ref;
  switch (est) {
    case Estimator::kK1: return d;
    case Estimator::kK2: return A(0.5) * d * d;
    case Estimator::kAbs: return d < A(0) ? -d : d;
    case Estimator::kK3Unclamped: return fast_exp(-d) + d - A(1);
    case Estimator::kK3: break;
  }
  A lr = -d;  // log(ref / pi)
  lr = lr > A(kK3LogRatioClamp) ? A(kK3LogRatioClamp) : (lr < A(-kK3LogRatioClamp) ? A(-kK3LogRatioClamp) : lr);
  const A k = fast_exp(lr) - lr - A(1);
  return k > A(kK3Max) ? A(kK3Max) : k;
}

// d value / d logp (0 where a clamp is active; the subgradient of |d| at 0 is 0).
template <typename A>
FRL_HD A grad(Estimator est, A logp, A ref) {
  const A d = logp - ref;
  switch (est) {
    case Estimator::kK1: return A(1);
    case Estimator::kK2: return d;
    case Estimator::kAbs: return d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
    case Estimator::kK3Unclamped: return A(1) - fast_exp(-d);
    case Estimator::kK3: break;
  }
  const A lr = -d;
  const A lc = lr > A(kK3LogRatioClamp) ? A(kK3LogRatioClamp) : (lr < A(-kK3LogRatioClamp) ? A(-kK3LogRatioClamp) : lr);
  const A e = fast_exp(lc);
  // 0 where either clamp is active; written without && so that callers' loops vectorize
  return (lc == lr) & (e - lr - A(1) <= A(kK3Max)) ? A(1) - e : A(0);  // d/dlogp of exp(-d) + d - 1
}

// Compile-time estimator: lets a caller's loop vectorize (no switch inside it).
template <Estimator E, typename A>
FRL_HD A value_t(A logp, A ref) { return value(E, logp, ref); }
template <Estimator E, typename A>
FRL_HD A grad_t(A logp, A ref) { return grad(E, logp, ref); }

struct Params {
  const void* logprobs = nullptr;  // [n] storage dtype
  const void* ref = nullptr;       // [n]
  void* out = nullptr;             // [n] kl, or d kl/d logp (backward, times grad)
  const void* grad = nullptr;      // [n] upstream grad (backward only)
  int64_t n = 0;
  Estimator estimator = Estimator::kK1;
};

}  // namespace fastrlhf::kernels::kl_penalty

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::kl_penalty {
// forward: out = value(logp, ref); backward: out = grad_out * d value / d logp.
Status launch_cpu(const Params& p, DType dtype, bool backward, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
cudaError_t launch_cuda(const Params& p, DType dtype, bool backward, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::kl_penalty
