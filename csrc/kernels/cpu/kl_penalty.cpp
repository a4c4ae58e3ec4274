// CPU launcher for kl_penalty (math in ../kl_penalty.h): elementwise, chunks in parallel, the
// estimator switch hoisted out of the loop.
#include "../kl_penalty.h"

namespace fastrlhf::kernels::kl_penalty {
namespace {

template <typename S, Estimator E>
void run(const Params& p, bool backward, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const S* lp = static_cast<const S*>(p.logprobs);
  const S* ref = static_cast<const S*>(p.ref);
  const S* g = static_cast<const S*>(p.grad);
  S* out = static_cast<S*>(p.out);
  parallel_for(p.n, 1 << 14, [&](int64_t i0, int64_t i1) {
    if (backward) {
      for (int64_t i = i0; i < i1; ++i) store(out + i, load<A>(g + i) * grad(E, load<A>(lp + i), load<A>(ref + i)));
    } else {
      for (int64_t i = i0; i < i1; ++i) store(out + i, value(E, load<A>(lp + i), load<A>(ref + i)));
    }
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, bool backward, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) {
    using S = decltype(s);
    switch (p.estimator) {
      case Estimator::kK1: return run<S, Estimator::kK1>(p, backward, parallel_for);
      case Estimator::kK2: return run<S, Estimator::kK2>(p, backward, parallel_for);
      case Estimator::kK3: return run<S, Estimator::kK3>(p, backward, parallel_for);
      case Estimator::kAbs: return run<S, Estimator::kAbs>(p, backward, parallel_for);
      case Estimator::kK3Unclamped: return run<S, Estimator::kK3Unclamped>(p, backward, parallel_for);
    }
  });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::kl_penalty
