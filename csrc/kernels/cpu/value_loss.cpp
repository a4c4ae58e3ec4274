// CPU launchers for value_loss (math in ../value_loss.h): rows in parallel, each row reduced
// with `omp simd` reductions (vectorized) into fp64 partials, serial finalize; backward
// elementwise.
#include <algorithm>

#include "../value_loss.h"

namespace fastrlhf::kernels::value_loss {
namespace {

template <typename S>
void forward_row(const Params& p, int64_t b) {
  using A = acc_t<S>;
  const A clip = A(p.clip);  // token() is branch-free: no need to specialize on clip
  const int64_t o = b * p.T, T = p.T;
  const S* __restrict v = static_cast<const S*>(p.values) + o;
  const S* __restrict old = static_cast<const S*>(p.old_values) + o;
  const S* __restrict ret = static_cast<const S*>(p.returns) + o;
  const uint8_t* __restrict m = p.mask + o;
  int64_t t0 = 0;  // first valid step: its return and residual shift the row's sums
  while (t0 < T && !m[t0]) ++t0;
  const A shift_r = t0 < T ? load<A>(ret + t0) : A(0);
  const A shift_res = t0 < T ? load<A>(ret + t0) - load<A>(v + t0) : A(0);
  A s_loss = 0, s_clip = 0, s_r = 0, s_r2 = 0, s_res = 0, s_res2 = 0, s_v = 0, s_len = 0;
#pragma omp simd reduction(+ : s_loss, s_clip, s_r, s_r2, s_res, s_res2, s_v, s_len)
  for (int64_t t = 0; t < T; ++t) {
    const A valid = m[t] != 0 ? A(1) : A(0);  // a number, not a bool: keeps the loop vectorizable
    const A vv = load<A>(v + t), r = load<A>(ret + t);
    const Token<A> k = token(vv, load<A>(old + t), r, clip);
    const A dr = r - shift_r, dres = (r - vv) - shift_res;
    s_loss += valid > A(0) ? k.loss : A(0);  // selects: masked NaN/Inf never enter
    s_clip += valid > A(0) ? k.clipped : A(0);
    s_r += valid > A(0) ? dr : A(0);
    s_r2 += valid > A(0) ? dr * dr : A(0);
    s_res += valid > A(0) ? dres : A(0);
    s_res2 += valid > A(0) ? dres * dres : A(0);
    s_v += valid > A(0) ? vv : A(0);
    s_len += valid;
  }
  double* row = p.partials + b * kNumPartials;
  row[kLoss] = s_loss, row[kClip] = s_clip, row[kRShift] = shift_r, row[kR] = s_r, row[kR2] = s_r2;
  row[kResShift] = shift_res, row[kRes] = s_res, row[kRes2] = s_res2, row[kV] = s_v, row[kLen] = s_len;
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  parallel_for(p.B, cpu::rows_grain(p.T, 4096), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) forward_row<S>(p, b);
  });
  finalize<acc_t<S>>(p);
}

template <typename S>
void run_backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A g = *static_cast<const A*>(p.grad_loss), clip = A(p.clip);
  parallel_for(p.B, cpu::rows_grain(p.T, 4096), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * p.T;
      const S* v = static_cast<const S*>(p.values) + o;
      const S* old = static_cast<const S*>(p.old_values) + o;
      const S* ret = static_cast<const S*>(p.returns) + o;
      const uint8_t* m = p.mask + o;
      S* dv = static_cast<S*>(p.grad_values) + o;
      const A w = g * static_cast<const A*>(p.row_weight)[b];
#pragma omp simd
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
