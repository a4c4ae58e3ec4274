// CPU launchers for policy_loss (math in ../policy_loss.h). Forward: rows in parallel, each row
// reduced into fp64 partials, then a serial finalize; backward: rows in parallel, elementwise.
// fp32 (the dtype of log-probs in practice) runs loops specialized on the KL estimator and on
// which optional terms are present, with `omp simd` reductions so they vectorize; other dtypes
// run the generic loop.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../policy_loss.h"

namespace fastrlhf::kernels::policy_loss {
namespace {

using kl_penalty::Estimator;

template <typename S>
const S* ptr(const void* p, int64_t o) {
  return p ? static_cast<const S*>(p) + o : nullptr;
}

int64_t row_grain(const Params& p) { return cpu::rows_grain(p.T, 4096); }

// ---- specialized fp32 rows ------------------------------------------------------------------

struct Coefs { float lo, hi, dual, kl_coef, ent_coef; };

template <Estimator E, bool kRef, bool kDual, bool kEnt>
void forward_row_f32(const Params& p, const Coefs& c, int64_t b) {
  const int64_t o = b * p.T, T = p.T;
  const float* __restrict lp = static_cast<const float*>(p.logprobs) + o;
  const float* __restrict old = static_cast<const float*>(p.old_logprobs) + o;
  const float* __restrict adv = static_cast<const float*>(p.advantages) + o;
  const float* __restrict ref = kRef ? static_cast<const float*>(p.ref_logprobs) + o : nullptr;
  const float* __restrict ent = kEnt ? static_cast<const float*>(p.entropy) + o : nullptr;
  const uint8_t* __restrict m = p.mask + o;
  float s_loss = 0, s_pg = 0, s_kl = 0, s_ent = 0, s_low = 0, s_high = 0, s_dual = 0, s_akl = 0, s_ratio = 0, s_len = 0,
        r_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(+ : s_loss, s_pg, s_kl, s_ent, s_low, s_high, s_dual, s_akl, s_ratio, s_len) \
    reduction(max : r_max)
  for (int64_t t = 0; t < T; ++t) {
    const float v = m[t] ? 1.0f : 0.0f;
    const float l = lp[t], a = adv[t], lr = l - old[t];
    const float ratio = fast_exp(lr);
    const float clipped = ratio < c.lo ? c.lo : (ratio > c.hi ? c.hi : ratio);
    const float pg1 = -a * ratio, pg2 = -a * clipped;
    float pg = pg1 > pg2 ? pg1 : pg2;
    float dual = 0;
    if constexpr (kDual) {
      const float pg3 = -a * c.dual;
      dual = (a < 0) & (pg3 < pg) ? 1.0f : 0.0f;
      pg = dual > 0 ? pg3 : pg;
    }
    const float kl = kRef ? kl_penalty::value_t<E>(l, ref[t]) : 0.0f;
    const float e = kEnt ? ent[t] : 0.0f;
    const float loss = pg + c.kl_coef * kl - c.ent_coef * e;
    const bool valid = v > 0;
    s_loss += valid ? loss : 0.0f;
    s_pg += valid ? pg : 0.0f;
    s_kl += valid ? kl : 0.0f;
    s_ent += valid ? e : 0.0f;
    s_low += (a < 0) & (ratio < c.lo) ? v : 0.0f;
    s_high += (a > 0) & (ratio > c.hi) ? v : 0.0f;
    s_dual += dual * v;
    s_akl += valid ? (ratio - 1.0f) - lr : 0.0f;
    s_ratio += valid ? ratio : 0.0f;
    r_max = (valid && ratio > r_max) ? ratio : r_max;
    s_len += v;
  }
  double* row = p.partials + b * kNumPartials;
  row[kLoss] = s_loss, row[kPg] = s_pg, row[kKl] = s_kl, row[kEntropy] = s_ent;
  row[kClip] = double(s_low) + double(s_high), row[kClipLow] = s_low, row[kClipHigh] = s_high;
  row[kDualClip] = s_dual, row[kApproxKl] = s_akl, row[kRatio] = s_ratio, row[kRatioMax] = r_max, row[kLen] = s_len;
}

template <Estimator E, bool kRef, bool kDual, bool kEnt>
void backward_row_f32(const Params& p, const Coefs& c, float g, int64_t b) {
  const int64_t o = b * p.T, T = p.T;
  const float* __restrict lp = static_cast<const float*>(p.logprobs) + o;
  const float* __restrict old = static_cast<const float*>(p.old_logprobs) + o;
  const float* __restrict adv = static_cast<const float*>(p.advantages) + o;
  const float* __restrict ref = kRef ? static_cast<const float*>(p.ref_logprobs) + o : nullptr;
  const uint8_t* __restrict m = p.mask + o;
  float* __restrict dl = static_cast<float*>(p.grad_logprobs) + o;
  const float w = g * static_cast<const float*>(p.row_weight)[b];
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const float l = lp[t], a = adv[t];
    const float ratio = fast_exp(l - old[t]);
    const bool clip_binds = ((a < 0) & (ratio < c.lo)) | ((a > 0) & (ratio > c.hi));
    const bool dual = kDual & (a < 0) & (ratio > c.dual);
    float d = clip_binds | dual ? 0.0f : -a * ratio;
    if constexpr (kRef) d += c.kl_coef * kl_penalty::grad_t<E>(l, ref[t]);
    dl[t] = m[t] ? w * d : 0.0f;
  }
  if constexpr (kEnt) {
    float* __restrict de = static_cast<float*>(p.grad_entropy) + o;
    const float ge = -w * c.ent_coef;
    for (int64_t t = 0; t < T; ++t) de[t] = m[t] ? ge : 0.0f;
  }
}

// Calls f.template operator()<E, kRef, kDual, kEnt>() for the terms present in p (with
// kEnt: the entropy input in the forward, grad_entropy in the backward).
template <typename F>
void with_flags(const Params& p, bool ent, F&& f) {
  auto dual_ent = [&]<Estimator E, bool kRef>() {
    const bool dual = p.dual_clip > 0;
    if (dual && ent) return f.template operator()<E, kRef, true, true>();
    if (dual) return f.template operator()<E, kRef, true, false>();
    if (ent) return f.template operator()<E, kRef, false, true>();
    return f.template operator()<E, kRef, false, false>();
  };
  if (!p.ref_logprobs) return dual_ent.template operator()<Estimator::kK1, false>();
  switch (p.kl_estimator) {
    case Estimator::kK1: return dual_ent.template operator()<Estimator::kK1, true>();
    case Estimator::kK2: return dual_ent.template operator()<Estimator::kK2, true>();
    case Estimator::kK3: return dual_ent.template operator()<Estimator::kK3, true>();
    case Estimator::kAbs: return dual_ent.template operator()<Estimator::kAbs, true>();
    case Estimator::kK3Unclamped: return dual_ent.template operator()<Estimator::kK3Unclamped, true>();
  }
}

Coefs coefs(const Params& p) {
  return Coefs{float(1 - p.clip_low), float(1 + p.clip_high), float(p.dual_clip), float(p.kl_coef),
               float(p.entropy_coef)};
}

// ---- generic rows (fp64 / fp16 / bf16) ------------------------------------------------------

template <typename S>
void forward_row(const Params& p, int64_t b) {
  using A = acc_t<S>;
  const int64_t o = b * p.T;
  const S *lp = ptr<S>(p.logprobs, o), *old = ptr<S>(p.old_logprobs, o), *adv = ptr<S>(p.advantages, o);
  const S *ref = ptr<S>(p.ref_logprobs, o), *ent = ptr<S>(p.entropy, o);
  const uint8_t* m = p.mask + o;
  double* row = p.partials + b * kNumPartials;
  init_partials(row);
  for (int64_t t = 0; t < p.T; ++t) {
    if (!m[t]) continue;
    const A l = load<A>(lp + t), ol = load<A>(old + t);
    const A e = ent ? load<A>(ent + t) : A(0);
    add_token(row, token(p, l, ol, load<A>(adv + t), ref ? load<A>(ref + t) : l, e), e, l - ol);
  }
}

template <typename S>
void backward_row(const Params& p, int64_t b) {
  using A = acc_t<S>;
  const int64_t o = b * p.T;
  const S *lp = ptr<S>(p.logprobs, o), *old = ptr<S>(p.old_logprobs, o), *adv = ptr<S>(p.advantages, o);
  const S* ref = ptr<S>(p.ref_logprobs, o);
  const uint8_t* m = p.mask + o;
  const A w = *static_cast<const A*>(p.grad_loss) * static_cast<const A*>(p.row_weight)[b];
  S* dl = static_cast<S*>(p.grad_logprobs) + o;
  S* de = p.grad_entropy ? static_cast<S*>(p.grad_entropy) + o : nullptr;
  for (int64_t t = 0; t < p.T; ++t) {
    const A l = load<A>(lp + t);
    const A d = token_grad(p, l, load<A>(old + t), load<A>(adv + t), ref ? load<A>(ref + t) : l);
    store(dl + t, m[t] ? w * d : A(0));
    if (de) store(de + t, m[t] ? -w * A(p.entropy_coef) : A(0));
  }
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  if constexpr (std::is_same_v<S, float>) {
    const Coefs c = coefs(p);
    with_flags(p, p.entropy != nullptr, [&]<Estimator E, bool kRef, bool kDual, bool kEnt>() {
      parallel_for(p.B, row_grain(p), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) forward_row_f32<E, kRef, kDual, kEnt>(p, c, b);
      });
    });
  } else {
    parallel_for(p.B, row_grain(p), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) forward_row<S>(p, b);
    });
  }
  finalize<acc_t<S>>(p);
}

template <typename S>
void run_backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  if constexpr (std::is_same_v<S, float>) {
    const Coefs c = coefs(p);
    const float g = *static_cast<const float*>(p.grad_loss);
    with_flags(p, p.grad_entropy != nullptr, [&]<Estimator E, bool kRef, bool kDual, bool kEnt>() {
      parallel_for(p.B, row_grain(p), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) backward_row_f32<E, kRef, kDual, kEnt>(p, c, g, b);
      });
    });
  } else {
    parallel_for(p.B, row_grain(p), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) backward_row<S>(p, b);
    });
  }
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
