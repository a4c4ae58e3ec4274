// CPU launchers for policy_loss (math in ../policy_loss.h). Forward: rows in parallel, each row
// accumulated in accumulator-type lanes and written as fp64 partials, then a serial finalize;
// backward: rows in parallel, elementwise.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../policy_loss.h"

namespace fastrlhf::kernels::policy_loss {
namespace {

template <typename S>
const S* ptr(const void* p, int64_t o) { return p ? static_cast<const S*>(p) + o : nullptr; }

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  parallel_for(p.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * p.T;
      const S *lp = ptr<S>(p.logprobs, o), *old = ptr<S>(p.old_logprobs, o), *adv = ptr<S>(p.advantages, o);
      const S *ref = ptr<S>(p.ref_logprobs, o), *ent = ptr<S>(p.entropy, o);
      const uint8_t* m = p.mask + o;
      A s[kNumPartials] = {};
      A ratio_max = -std::numeric_limits<A>::infinity();
      for (int64_t t = 0; t < p.T; ++t) {
        const bool valid = m[t] != 0;
        const A l = load<A>(lp + t), ol = load<A>(old + t);
        const Token<A> k = token(p, l, ol, load<A>(adv + t), ref ? load<A>(ref + t) : l,
                                 ent ? load<A>(ent + t) : A(0));
        const A v = valid ? A(1) : A(0);
        s[kLoss] += valid ? k.loss : A(0);
        s[kPg] += valid ? k.pg : A(0);
        s[kKl] += valid ? k.kl : A(0);
        s[kEntropy] += valid && ent ? load<A>(ent + t) : A(0);
        s[kClip] += (k.clip_low || k.clip_high) ? v : A(0);
        s[kClipLow] += k.clip_low ? v : A(0);
        s[kClipHigh] += k.clip_high ? v : A(0);
        s[kDualClip] += k.dual ? v : A(0);
        s[kApproxKl] += valid ? (k.ratio - A(1)) - (l - ol) : A(0);
        s[kRatio] += valid ? k.ratio : A(0);
        ratio_max = valid && k.ratio > ratio_max ? k.ratio : ratio_max;
        s[kLen] += v;
      }
      double* row = p.partials + b * kNumPartials;
      for (int k = 0; k < kNumPartials; ++k) row[k] = double(s[k]);
      row[kRatioMax] = double(ratio_max);
    }
  });
  finalize<A>(p);
}

template <typename S>
void run_backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A g = *static_cast<const A*>(p.grad_loss);
  parallel_for(p.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * p.T;
      const S *lp = ptr<S>(p.logprobs, o), *old = ptr<S>(p.old_logprobs, o), *adv = ptr<S>(p.advantages, o);
      const S* ref = ptr<S>(p.ref_logprobs, o);
      const uint8_t* m = p.mask + o;
      const A w = g * static_cast<const A*>(p.row_weight)[b];
      S* dl = static_cast<S*>(p.grad_logprobs) + o;
      S* de = p.grad_entropy ? static_cast<S*>(p.grad_entropy) + o : nullptr;
      for (int64_t t = 0; t < p.T; ++t) {
        const A l = load<A>(lp + t);
        const A d = token_grad(p, l, load<A>(old + t), load<A>(adv + t), ref ? load<A>(ref + t) : l);
        store(dl + t, m[t] ? w * d : A(0));
      }
      if (de) {
        for (int64_t t = 0; t < p.T; ++t) store(de + t, m[t] ? -w * A(p.entropy_coef) : A(0));
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

}  // namespace fastrlhf::kernels::policy_loss
