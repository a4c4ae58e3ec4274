// Pairwise preference losses over sequence-level scores (DPO, IPO, hinge / SLiC, Bradley-Terry
// reward models), fused forward and backward.
//
// Per pair, with h = (chosen - ref_chosen) - (rejected - ref_rejected) and z = beta h - margin:
//   sigmoid: loss = -(1 - eps) log s(z) - eps log s(-z)      d loss / dh = beta (-(1 - eps) s(-z) + eps s(z))
//   ipo:     loss = (h - margin - 1 / (2 beta))^2            d loss / dh = 2 (h - margin - 1 / (2 beta))
//   hinge:   loss = max(0, 1 - z)                            d loss / dh = -beta where z < 1, else 0
// summed over pairs and divided by the normalizer (default: the number of pairs);
// d loss / d chosen = d loss / dh, d loss / d rejected = -d loss / dh (the references are constants).
#pragma once

#include "common.h"
#include "math.h"

namespace fastrlhf::kernels::preference_loss {

enum class LossType : int { kSigmoid = 0, kIpo = 1, kHinge = 2 };

// Stats vector (means over pairs, accumulator dtype).
enum Stat : int { kRewardsChosen = 0, kRewardsRejected, kRewardMargin, kAccuracy, kNumStats };

struct Params {
  const void* chosen = nullptr;        // [B] storage dtype
  const void* rejected = nullptr;      // [B]
  const void* ref_chosen = nullptr;    // [B] or nullptr (0)
  const void* ref_rejected = nullptr;  // [B] or nullptr (0)
  const void* margin = nullptr;        // [B] or nullptr (0)
  int64_t B = 0;
  double beta = 0.1, label_smoothing = 0, normalizer = 0;  // normalizer <= 0: B
  LossType loss_type = LossType::kSigmoid;
  void* loss = nullptr;   // [] accumulator dtype (forward)
  void* stats = nullptr;  // [kNumStats] accumulator dtype (forward)
  const void* grad_loss = nullptr;  // [] accumulator dtype (backward)
  void* grad_chosen = nullptr;      // [B] storage dtype (backward)
};

// log(sigmoid(z)) without overflow: min(z, 0) - log1p(exp(-|z|)).
template <typename A>
FRL_HD A log_sigmoid(A z) {
  const A a = z < A(0) ? z : -z;  // -|z|
#if defined(__CUDA_ARCH__)
  const A l = ::log1p(::exp(a));
#else
  const A l = std::log1p(std::exp(a));
#endif
  return (z < A(0) ? z : A(0)) - l;
}

template <typename A>
FRL_HD A sigmoid(A z) {
#if defined(__CUDA_ARCH__)
  return A(1) / (A(1) + ::exp(-z));
#else
  return A(1) / (A(1) + std::exp(-z));
#endif
}

template <typename A>
struct Pair {
  A h;     // (chosen - ref_chosen) - (rejected - ref_rejected)
  A loss;  // the pair's loss (not normalized)
  A grad;  // d loss / dh
};

template <typename A>
FRL_HD Pair<A> pair(const Params& p, A c, A r, A rc, A rr, A m) {
  const A h = (c - rc) - (r - rr);
  const A beta = A(p.beta);
  const A z = beta * h - m;
  switch (p.loss_type) {
    case LossType::kIpo: {
      const A d = h - m - A(0.5) / beta;
      return Pair<A>{h, d * d, A(2) * d};
    }
    case LossType::kHinge: return Pair<A>{h, z < A(1) ? A(1) - z : A(0), z < A(1) ? -beta : A(0)};
    case LossType::kSigmoid: break;
  }
  const A eps = A(p.label_smoothing);
  const A loss = -(A(1) - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
  return Pair<A>{h, loss, beta * (-(A(1) - eps) * sigmoid(-z) + eps * sigmoid(z))};
}

// Adds pair q (its chosen reward c - ref_c in cr) to the running loss and stats sums (fp64).
template <typename A>
FRL_HD void add_pair(const Params& p, const Pair<A>& q, A cr, double& loss, double* s) {
  loss += double(q.loss);
  s[kRewardsChosen] += p.beta * double(cr);
  s[kRewardsRejected] += p.beta * double(cr - q.h);
  s[kRewardMargin] += p.beta * double(q.h);
  s[kAccuracy] += q.h > A(0) ? 1.0 : 0.0;
}

FRL_HD double inv_normalizer(const Params& p) { return p.normalizer > 0 ? 1.0 / p.normalizer : 1.0 / double(p.B); }

}  // namespace fastrlhf::kernels::preference_loss

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::preference_loss {
// CPU: the pairs in order, sums in fp64 (deterministic). Backward: elementwise.
Status launch_cpu(const Params& p, DType dtype);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// CUDA: one block strides over the pairs, fp64 block reductions in a fixed order (deterministic,
// no host sync). Backward: elementwise.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::preference_loss
