// CPU launchers for value_loss (math in ../value_loss.h): rows in parallel, fp64 row partials,
// serial finalize; backward elementwise.
#include <algorithm>

#include "../value_loss.h"

namespace fastrlhf::kernels::value_loss {
namespace {

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A clip = A(p.clip);
  parallel_for(p.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * p.T;
      const S* v = static_cast<const S*>(p.values) + o;
      const S* old = static_cast<const S*>(p.old_values) + o;
      const S* ret = static_cast<const S*>(p.returns) + o;
      const uint8_t* m = p.mask + o;
      A s[kNumPartials] = {};
      for (int64_t t = 0; t < p.T; ++t) {
        const bool valid = m[t] != 0;
        const A vv = load<A>(v + t), r = load<A>(ret + t);
        const Token<A> k = token(vv, load<A>(old + t), r, clip);
        const A res = r - vv;
        s[kLoss] += valid ? k.loss : A(0);
        s[kClip] += valid && k.clipped ? A(1) : A(0);
        s[kR] += valid ? r : A(0);
        s[kR2] += valid ? r * r : A(0);
        s[kRes] += valid ? res : A(0);
        s[kRes2] += valid ? res * res : A(0);
        s[kV] += valid ? vv : A(0);
        s[kLen] += valid ? A(1) : A(0);
      }
      double* row = p.partials + b * kNumPartials;
      for (int k = 0; k < kNumPartials; ++k) row[k] = double(s[k]);
    }
  });
  finalize<A>(p);
}

template <typename S>
void run_backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A g = *static_cast<const A*>(p.grad_loss), clip = A(p.clip);
  parallel_for(p.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * p.T;
      const S* v = static_cast<const S*>(p.values) + o;
      const S* old = static_cast<const S*>(p.old_values) + o;
      const S* ret = static_cast<const S*>(p.returns) + o;
      const uint8_t* m = p.mask + o;
      S* dv = static_cast<S*>(p.grad_values) + o;
      const A w = g * static_cast<const A*>(p.row_weight)[b];
      for (int64_t t = 0; t < p.T; ++t) {
        const A d = token_grad(load<A>(v + t), load<A>(old + t), load<A>(ret + t), clip);
        store(dv + t, m[t] ? w * d : A(0));
      }
    }
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { run_backward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::value_loss
