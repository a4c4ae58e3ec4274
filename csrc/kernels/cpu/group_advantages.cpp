// CPU launcher for group_advantages (math in ../group_advantages.h): groups in parallel, three
// short passes per group (sum, squared deviations, output) over data that stays in L1.
#include <algorithm>

#include "../group_advantages.h"

namespace fastrlhf::kernels::group_advantages {
namespace {

// One group: three passes over G scores. `omp simd` pays off for long groups only; for the
// usual G = 4..16 its vector prologue/epilogue costs more than the loop.
template <typename S, bool kSimd>
void group(const S* x, S* out, int64_t G, const Params& p) {
  using A = acc_t<S>;
  const A x0 = load<A>(x);  // shift: statistics of x - x0
  A sum = 0, sq = 0;
  if constexpr (kSimd) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < G; ++i) sum += load<A>(x + i) - x0;
  } else {
    for (int64_t i = 0; i < G; ++i) sum += load<A>(x + i) - x0;
  }
  const A mean = sum / A(G);
  if constexpr (kSimd) {
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < G; ++i) sq += ((load<A>(x + i) - x0) - mean) * ((load<A>(x + i) - x0) - mean);
  } else {
    for (int64_t i = 0; i < G; ++i) sq += ((load<A>(x + i) - x0) - mean) * ((load<A>(x + i) - x0) - mean);
  }
  const A scale = output_scale(sq, G, p.normalize_std, p.leave_one_out, A(p.eps));
  for (int64_t i = 0; i < G; ++i) store(out + i, ((load<A>(x + i) - x0) - mean) * scale);
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  const int64_t G = p.group_size;
  const S* x = static_cast<const S*>(p.scores);
  S* out = static_cast<S*>(p.out);
  parallel_for(p.n_groups, std::max<int64_t>(1, 4096 / G), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if (G >= 64) group<S, true>(x + g * G, out + g * G, G, p);
      else group<S, false>(x + g * G, out + g * G, G, p);
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
