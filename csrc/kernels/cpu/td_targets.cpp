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
          if (a < 0 || a >= na) { bad = true; continue; }
          next = load<A>(row + a);
        } else {
          // 8 independent running maxima, then combined (NaN propagates through nan_max)
          A m[8];
          for (int l = 0; l < 8; ++l) m[l] = -std::numeric_limits<A>::infinity();
          int64_t a = 0;
          for (; a + 8 <= na; a += 8)
            for (int l = 0; l < 8; ++l) m[l] = nan_max(m[l], load<A>(row + a + l));
          for (; a < na; ++a) m[0] = nan_max(m[0], load<A>(row + a));
          next = m[0];
          for (int l = 1; l < 8; ++l) next = nan_max(next, m[l]);
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
      if (a < 0 || a >= na) { bad = true; continue; }
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
