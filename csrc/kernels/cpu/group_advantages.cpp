// CPU launcher for group_advantages (math in ../group_advantages.h): groups in parallel, three
// short vectorized passes per group (sum, squared deviations, output) over data that stays in L1.
#include <algorithm>

#include "../group_advantages.h"

namespace fastrlhf::kernels::group_advantages {
namespace {

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t G = p.group_size;
  const A eps = A(p.eps);
  const S* x_all = static_cast<const S*>(p.scores);
  S* out_all = static_cast<S*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 4096 / G);
  parallel_for(p.n_groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const S* x = x_all + g * G;
      S* out = out_all + g * G;
      const A x0 = load<A>(x);  // shift: statistics of x - x0
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < G; ++i) sum += load<A>(x + i) - x0;
      const A mean = sum / A(G);
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < G; ++i) {
        const A d = (load<A>(x + i) - x0) - mean;
        sq += d * d;
      }
      const A scale = output_scale(sq, G, p.normalize_std, p.leave_one_out, eps);
#pragma omp simd
      for (int64_t i = 0; i < G; ++i) store(out + i, ((load<A>(x + i) - x0) - mean) * scale);
    }
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.n_groups == 0) return Status::kOk;
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::group_advantages
