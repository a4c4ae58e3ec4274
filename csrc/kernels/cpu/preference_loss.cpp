// CPU launcher for preference_loss (math in ../preference_loss.h). Pairs go in fixed blocks of
// kBlock: each block gathers its h = (chosen - ref_chosen) - (rejected - ref_rejected) and margins
// into local arrays (one loop per present input, so no per-pair test of optional pointers), then
// one `omp simd` loop per block computes the losses and reduces them into fp64 partials. Blocks run
// in parallel; their partials are summed in block order, so the result does not depend on the
// thread count. The backward is the same shape, elementwise.
#include "../preference_loss.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastrlhf::kernels::preference_loss {
namespace {

constexpr int64_t kBlock = 1024;

enum Partial : int { kLoss = 0, kChosen, kH, kCorrect, kNumPartials };

// Block [i0, i0 + n): cr = chosen - ref_chosen, h, m (0 without margins).
template <typename A, typename S>
void gather(const Params& p, int64_t i0, int64_t n, A* cr, A* h, A* m) {
  auto in = [&](const void* x) { return static_cast<const S*>(x) + i0; };
  const S* c = in(p.chosen);
  const S* r = in(p.rejected);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) cr[i] = load<A>(c + i), h[i] = -load<A>(r + i);
  if (p.ref_chosen) {
    const S* rc = in(p.ref_chosen);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) cr[i] -= load<A>(rc + i);
  }
  if (p.ref_rejected) {
    const S* rr = in(p.ref_rejected);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] += load<A>(rr + i);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] += cr[i];  // (c - rc) - (r - rr)
  if (p.margin) {
    const S* mg = in(p.margin);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) m[i] = load<A>(mg + i);
  } else {
    for (int64_t i = 0; i < n; ++i) m[i] = A(0);
  }
}

template <LossType L, typename S>
void forward_block(const Params& p, int64_t blk, double* out) {
  using A = acc_t<S>;
  const int64_t i0 = blk * kBlock, n = std::min(kBlock, p.B - i0);
  A cr[kBlock], h[kBlock], m[kBlock], loss[kBlock];
  gather<A, S>(p, i0, n, cr, h, m);
  const A beta = A(p.beta), eps = A(p.label_smoothing);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) loss[i] = pair_of<L>(beta, eps, h[i], m[i]).loss;
  // a separate loop: a select converted to fp64 inside the reduction becomes a branch (no vectors)
  double s_loss = 0, s_cr = 0, s_h = 0, s_correct = 0;
#pragma omp simd reduction(+ : s_loss, s_cr, s_h, s_correct)
  for (int64_t i = 0; i < n; ++i) {
    s_loss += double(loss[i]);
    s_cr += double(cr[i]);
    s_h += double(h[i]);
    s_correct += h[i] > A(0) ? 1.0 : 0.0;
  }
  out[kLoss] = s_loss, out[kChosen] = s_cr, out[kH] = s_h, out[kCorrect] = s_correct;
}

template <LossType L, typename S>
void forward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t blocks = (p.B + kBlock - 1) / kBlock;
  std::vector<double> part(size_t(blocks) * kNumPartials);
  parallel_for(blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) forward_block<L, S>(p, b, part.data() + b * kNumPartials);
  });
  double t[kNumPartials] = {};
  for (int64_t b = 0; b < blocks; ++b)  // block order: a fixed summation order
    for (int k = 0; k < kNumPartials; ++k) t[k] += part[size_t(b) * kNumPartials + k];
  const double inv_b = p.B > 0 ? 1.0 / double(p.B) : 0.0;
  *static_cast<A*>(p.loss) = A(p.B > 0 ? t[kLoss] * inv_normalizer(p) : 0.0);
  A* stats = static_cast<A*>(p.stats);
  stats[kRewardsChosen] = A(p.beta * t[kChosen] * inv_b);
  stats[kRewardsRejected] = A(p.beta * (t[kChosen] - t[kH]) * inv_b);  // rejected - ref_rejected = cr - h
  stats[kRewardMargin] = A(p.beta * t[kH] * inv_b);
  stats[kAccuracy] = A(t[kCorrect] * inv_b);
}

template <LossType L, typename S>
void backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A scale = A(double(*static_cast<const A*>(p.grad_loss)) * inv_normalizer(p));
  const A beta = A(p.beta), eps = A(p.label_smoothing);
  S* g = static_cast<S*>(p.grad_chosen);
  const int64_t blocks = (p.B + kBlock - 1) / kBlock;
  parallel_for(blocks, 16, [&](int64_t b0, int64_t b1) {
    A cr[kBlock], h[kBlock], m[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, n = std::min(kBlock, p.B - i0);
      gather<A, S>(p, i0, n, cr, h, m);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(g + i0 + i, scale * pair_of<L>(beta, eps, h[i], m[i]).grad);
    }
  });
}

// f<LossType>() for the runtime loss type.
template <typename F>
void dispatch_loss(LossType t, F&& f) {
  switch (t) {
    case LossType::kIpo: return f(std::integral_constant<LossType, LossType::kIpo>{});
    case LossType::kHinge: return f(std::integral_constant<LossType, LossType::kHinge>{});
    case LossType::kSigmoid: return f(std::integral_constant<LossType, LossType::kSigmoid>{});
  }
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) {
    dispatch_loss(p.loss_type, [&](auto l) { forward<decltype(l)::value, decltype(s)>(p, parallel_for); });
  });
  return Status::kOk;
}

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) {
    dispatch_loss(p.loss_type, [&](auto l) { backward<decltype(l)::value, decltype(s)>(p, parallel_for); });
  });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::preference_loss
