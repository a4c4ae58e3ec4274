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

// The per-pair math must inline into the CPU launcher's `omp simd` loops (GCC leaves a function
// this size out of line there, and a call per pair runs 10x slower than the vectorized loop).
#if defined(__CUDACC__)
#define FRL_PAIR_INLINE FRL_HD
#else
#define FRL_PAIR_INLINE inline __attribute__((always_inline))
#endif

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
// log(1 + x) for x in [0, 1]: float by 2 atanh(s) = log(1 + x), s = x / (2 + x) in [0, 1/3], a
// polynomial in s^2 (branch-free, vectorizes; relative error ~1 ulp, exact near 0); double by libm.
FRL_PAIR_INLINE float log1p_unit(float x) {
  const float s = x / (2.0f + x), s2 = s * s;
  float y = 1.0f / 15.0f;
  y = y * s2 + 1.0f / 13.0f;
  y = y * s2 + 1.0f / 11.0f;
  y = y * s2 + 1.0f / 9.0f;
  y = y * s2 + 1.0f / 7.0f;
  y = y * s2 + 1.0f / 5.0f;
  y = y * s2 + 1.0f / 3.0f;
  return 2.0f * s * (y * s2 + 1.0f);
}

FRL_PAIR_INLINE double log1p_unit(double x) {
#if defined(__CUDA_ARCH__)
  return ::log1p(x);
#else
  return std::log1p(x);
#endif
}

// log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)), stable for every z. Every operation runs
// unconditionally and the branches are selects of computed values: the loops that call these
// vectorize (a division inside a conditional arm is not speculated under strict FP rules).
template <typename A>
FRL_PAIR_INLINE A log_sigmoid(A z) {
  const A neg = -z;
  const A a = z < A(0) ? z : neg;  // -|z|
  const A low = z < A(0) ? z : A(0);
  return low - log1p_unit(fast_exp(a));
}

template <typename A>
FRL_PAIR_INLINE A sigmoid(A z) {
  const A neg = -z;
  const A e = fast_exp(z < A(0) ? z : neg);  // exp(-|z|) in (0, 1]: never overflows
  const A num = z < A(0) ? e : A(1);
  return num / (A(1) + e);
}

template <typename A>
struct Pair {
  A h;     // (chosen - ref_chosen) - (rejected - ref_rejected)
  A loss;  // the pair's loss (not normalized)
  A grad;  // d loss / dh
};

// Pair loss and d loss / dh of h = (chosen - ref_chosen) - (rejected - ref_rejected), margin m.
template <LossType L, typename A>
FRL_PAIR_INLINE Pair<A> pair_of(A beta, A eps, A h, A m) {
  const A z = beta * h - m;
  if constexpr (L == LossType::kIpo) {
    const A d = h - m - A(0.5) / beta;
    return Pair<A>{h, d * d, A(2) * d};
  } else if constexpr (L == LossType::kHinge) {
    const A gap = A(1) - z;
    return Pair<A>{h, gap > A(0) ? gap : A(0), gap > A(0) ? -beta : A(0)};
  } else {  // -(1 - eps) log s(z) - eps log s(-z) with log s(-z) = log s(z) - z and s(-z) = 1 - s(z)
    return Pair<A>{h, eps * z - log_sigmoid(z), beta * (sigmoid(z) - (A(1) - eps))};
  }
}

template <typename A>
FRL_HD Pair<A> pair(const Params& p, A c, A r, A rc, A rr, A m) {
  const A h = (c - rc) - (r - rr), beta = A(p.beta), eps = A(p.label_smoothing);
  switch (p.loss_type) {
    case LossType::kIpo: return pair_of<LossType::kIpo>(beta, eps, h, m);
    case LossType::kHinge: return pair_of<LossType::kHinge>(beta, eps, h, m);
    case LossType::kSigmoid: break;
  }
  return pair_of<LossType::kSigmoid>(beta, eps, h, m);
}

// One pair into the CUDA kernel's per-thread sums (the CPU launcher sums whole blocks of pairs).
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
// CPU: fixed blocks of pairs in parallel, fp64 partials summed in block order (the same bits for
// any thread count). Backward: elementwise.
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// CUDA: one block strides over the pairs, fp64 block reductions in a fixed order (deterministic,
// no host sync). Backward: elementwise.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::preference_loss
