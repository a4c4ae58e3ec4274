// CPU launcher for preference_loss (math in ../preference_loss.h).
#include "../preference_loss.h"

namespace fastrlhf::kernels::preference_loss {
namespace {

// Pair i's inputs (the optional ones 0 when absent).
template <typename A, typename S>
Pair<A> pair_at(const Params& p, int64_t i, A& chosen_reward) {
  auto at = [&](const void* x) { return x ? load<A>(static_cast<const S*>(x) + i) : A(0); };
  const A c = at(p.chosen), rc = at(p.ref_chosen);
  chosen_reward = c - rc;
  return pair<A>(p, c, at(p.rejected), rc, at(p.ref_rejected), at(p.margin));
}

template <typename S>
void forward(const Params& p) {
  using A = acc_t<S>;
  double loss = 0, s[kNumStats] = {};
  for (int64_t i = 0; i < p.B; ++i) {  // pairs in order: a fixed summation order
    A cr;
    const Pair<A> q = pair_at<A, S>(p, i, cr);
    add_pair(p, q, cr, loss, s);
  }
  const double inv_b = p.B > 0 ? 1.0 / double(p.B) : 0.0;
  *static_cast<A*>(p.loss) = A(p.B > 0 ? loss * inv_normalizer(p) : 0.0);
  for (int k = 0; k < kNumStats; ++k) static_cast<A*>(p.stats)[k] = A(s[k] * inv_b);
}

template <typename S>
void backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A scale = A(double(*static_cast<const A*>(p.grad_loss)) * inv_normalizer(p));
  S* g = static_cast<S*>(p.grad_chosen);
  parallel_for(p.B, 1 << 14, [&](int64_t i0, int64_t i1) {
    A cr;
    for (int64_t i = i0; i < i1; ++i) store(g + i, scale * pair_at<A, S>(p, i, cr).grad);
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype) {
  dispatch_cpu(dtype, [&](auto s) { forward<decltype(s)>(p); });
  return Status::kOk;
}

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { backward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::preference_loss
