// CPU launchers for td_targets and q_update (math in ../td_targets.h): rows in parallel.
#include <algorithm>
#include <atomic>
#include <limits>

#include "../td_targets.h"

namespace fastrlhf::kernels::td_targets {
namespace {

template <typename S>
Status run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const S* r = static_cast<const S*>(p.rewards);
  const S* q = static_cast<const S*>(p.next_q);
  S* out = static_cast<S*>(p.out);
  const int64_t na = p.num_actions;
  const A gamma = A(p.gamma);
  std::atomic<bool> bad{false};
  parallel_for(p.n, std::max<int64_t>(1, 16384 / std::max<int64_t>(na, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const bool done = p.dones ? p.dones[i] != 0 : false;
      A next = 0;
      if (!done) {
        const S* row = q + i * na;
        if (p.next_actions) {
          const int64_t a = p.next_actions[i];
          if (a < 0 || a >= na) {
            bad = true;
            continue;
          }
          next = load<A>(row + a);
        } else {
          // vectorized max ignoring NaN, plus a NaN count: a NaN anywhere in the row propagates
          A m = -std::numeric_limits<A>::infinity();
          int nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
          for (int64_t a = 0; a < na; ++a) {
            const A v = load<A>(row + a);
            m = v > m ? v : m;
            nans += v != v;
          }
          next = nans ? std::numeric_limits<A>::quiet_NaN() : m;
        }
      }
      store(out + i, target(load<A>(r + i), next, done, gamma));
    }
  });
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

template <typename S>
Status run_q_update(const QUpdateParams& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const S* q = static_cast<const S*>(p.q);
  const S* y = static_cast<const S*>(p.targets);
  S* out = static_cast<S*>(p.out);
  const int64_t na = p.num_actions;
  const A alpha = A(p.alpha);
  std::atomic<bool> bad{false};
  parallel_for(p.n, std::max<int64_t>(1, 16384 / std::max<int64_t>(na, 1)), [&](int64_t i0, int64_t i1) {
    std::copy(q + i0 * na, q + i1 * na, out + i0 * na);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t a = p.actions[i];
      if (a < 0 || a >= na) {
        bad = true;
        continue;
      }
      store(out + i * na + a, updated(load<A>(q + i * na + a), load<A>(y + i), alpha));
    }
  });
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  return dispatch_cpu(dtype, [&](auto s) { return run<decltype(s)>(p, parallel_for); });
}

Status launch_q_update_cpu(const QUpdateParams& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  return dispatch_cpu(dtype, [&](auto s) { return run_q_update<decltype(s)>(p, parallel_for); });
}

}  // namespace fastrlhf::kernels::td_targets
