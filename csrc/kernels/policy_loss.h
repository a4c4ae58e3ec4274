// PPO / GRPO policy loss, fused: clipped surrogate (asymmetric clip, dual clip), optional KL to
// a reference policy inside the loss and an entropy bonus, aggregated (loss_agg.h), with the
// diagnostics trainers log, in one pass forward and one pass backward.
//
// Per valid token, with r = exp(logp - old) and advantage a:
//   pg   = max(-a r, -a clip(r, 1 - clip_low, 1 + clip_high))
//   pg   = min(pg, -a dual_clip)                  if a < 0 and dual_clip > 0 (dual-clip PPO)
//   loss = pg + kl_coef * kl(logp, ref) - entropy_coef * entropy
// Gradient w.r.t. logp: -a r on the unclipped branch, 0 where a clip binds, plus
// kl_coef * dkl/dlogp; w.r.t. entropy: -entropy_coef; both times the row weight.
#pragma once

#include "common.h"
#include "kl_penalty.h"
#include "loss_agg.h"
#include "math.h"

namespace fastrlhf::kernels::policy_loss {

// Per-row partial sums (fp64), reduced in a fixed order after the row pass.
enum Partial : int {
  kLoss = 0,     // sum of mask * token loss
  kPg,           // sum of mask * pg
  kKl,           // sum of kl value (unscaled)
  kEntropy,      // sum of entropy
  kClip,         // tokens where a clip binds
  kClipLow,      // ... the lower clip (a < 0, r < 1 - clip_low)
  kClipHigh,     // ... the upper clip (a > 0, r > 1 + clip_high)
  kDualClip,     // tokens where the dual clip binds
  kApproxKl,     // sum of (r - 1) - log r
  kRatio,        // sum of r
  kRatioMax,     // max of r (-inf for an empty row)
  kLen,          // valid tokens
  kNumPartials
};

// Stats vector returned by the op (all fp32/fp64 scalars, token means over valid tokens).
enum Stat : int {
  kStatPgLoss = 0,
  kStatKl,
  kStatEntropy,
  kStatClipFrac,
  kStatClipFracLow,
  kStatClipFracHigh,
  kStatDualClipFrac,
  kStatApproxKl,
  kStatRatioMean,
  kStatRatioMax,
  kNumStats
};

struct Params {
  const void* logprobs = nullptr;      // [B, T] storage dtype
  const void* old_logprobs = nullptr;  // [B, T]
  const void* advantages = nullptr;    // [B, T]
  const uint8_t* mask = nullptr;       // [B, T] bool
  const void* ref_logprobs = nullptr;  // [B, T] or nullptr (no KL term)
  const void* entropy = nullptr;       // [B, T] or nullptr (no entropy term)
  int64_t B = 0, T = 0;
  double clip_low = 0.2, clip_high = 0.2, dual_clip = 0;  // dual_clip <= 0: off
  double kl_coef = 0, entropy_coef = 0;
  kl_penalty::Estimator kl_estimator = kl_penalty::Estimator::kK3;
  loss_agg::Config agg;
  // forward outputs
  double* partials = nullptr;  // [B, kNumPartials] workspace
  void* loss = nullptr;        // [] accumulator dtype
  void* stats = nullptr;       // [kNumStats] accumulator dtype
  void* row_weight = nullptr;  // [B] accumulator dtype (saved for backward)
  // backward
  const void* grad_loss = nullptr;   // [] accumulator dtype
  void* grad_logprobs = nullptr;     // [B, T] storage dtype
  void* grad_entropy = nullptr;      // [B, T] storage dtype or nullptr
};

template <typename A>
struct Token {
  A loss, pg, kl, ratio;
  bool clip_low, clip_high, dual;
};

template <typename A>
FRL_HD Token<A> token(const Params& p, A logp, A old, A adv, A ref, A ent) {
  const A ratio = fast_exp(logp - old);
  const A lo = A(1) - A(p.clip_low), hi = A(1) + A(p.clip_high);
  const A clipped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const A pg1 = -adv * ratio, pg2 = -adv * clipped;
  A pg = pg1 > pg2 ? pg1 : pg2;
  const bool clip_low = adv < A(0) && ratio < lo;
  const bool clip_high = adv > A(0) && ratio > hi;
  bool dual = false;
  if (p.dual_clip > 0 && adv < A(0)) {
    const A pg3 = -adv * A(p.dual_clip);
    dual = pg3 < pg;
    pg = dual ? pg3 : pg;
  }
  const A kl = p.ref_logprobs ? kl_penalty::value(p.kl_estimator, logp, ref) : A(0);
  const A loss = pg + A(p.kl_coef) * kl - A(p.entropy_coef) * ent;
  return Token<A>{loss, pg, kl, ratio, clip_low, clip_high, dual};
}

// A row's partials before its first token; add_token adds one valid token (kRatioMax is a
// running max, NaN-ignoring like fmax). Shared by the generic CPU rows and the CUDA rows kernel.
FRL_HD void init_partials(double* s) {
  for (int k = 0; k < kNumPartials; ++k) s[k] = 0;
  s[kRatioMax] = -HUGE_VAL;
}

template <typename A>
FRL_HD void add_token(double* s, const Token<A>& k, A entropy, A log_ratio) {
  s[kLoss] += k.loss;
  s[kPg] += k.pg;
  s[kKl] += k.kl;
  s[kEntropy] += entropy;
  s[kClip] += (k.clip_low || k.clip_high) ? 1 : 0;
  s[kClipLow] += k.clip_low ? 1 : 0;
  s[kClipHigh] += k.clip_high ? 1 : 0;
  s[kDualClip] += k.dual ? 1 : 0;
  s[kApproxKl] += double((k.ratio - A(1)) - log_ratio);
  s[kRatio] += k.ratio;
  s[kRatioMax] = double(k.ratio) > s[kRatioMax] ? double(k.ratio) : s[kRatioMax];
  s[kLen] += 1;
}

// d token loss / d logp.
template <typename A>
FRL_HD A token_grad(const Params& p, A logp, A old, A adv, A ref) {
  const A ratio = fast_exp(logp - old);
  const A lo = A(1) - A(p.clip_low), hi = A(1) + A(p.clip_high);
  const bool clip_binds = ((adv < A(0)) & (ratio < lo)) | ((adv > A(0)) & (ratio > hi));
  const bool dual = (p.dual_clip > 0) & (adv < A(0)) & (ratio > A(p.dual_clip));
  A g = (clip_binds || dual) ? A(0) : -adv * ratio;
  if (p.ref_logprobs) g += A(p.kl_coef) * kl_penalty::grad(p.kl_estimator, logp, ref);
  return g;
}

// ---- finalize: row weights, loss and stats from the [B, kNumPartials] partials ------------
// Each row contributes kNumTerms sums (its weighted loss and pg, and its stat sums) and its ratio
// max; totals -> outputs. The CPU adds rows serially; CUDA reduces them in one block.
constexpr int kNumTerms = 2 + (kRatio - kKl + 1);  // loss, pg, then kKl..kRatio

FRL_HD void row_terms(const double* row, double w, double* t) {
  t[0] = w * row[kLoss];
  t[1] = w * row[kPg];
  for (int k = kKl; k <= kRatio; ++k) t[2 + k - kKl] = row[k];
}

template <typename A>
FRL_HD void write_outputs(const Params& p, const double* t, double ratio_max, double n_tok) {
  const double inv = n_tok > 0 ? 1.0 / n_tok : 0.0;
  auto mean = [&](int k) { return A(t[2 + k - kKl] * inv); };
  A* st = static_cast<A*>(p.stats);
  st[kStatPgLoss] = A(t[1]);
  st[kStatKl] = mean(kKl);
  st[kStatEntropy] = mean(kEntropy);
  st[kStatClipFrac] = mean(kClip);
  st[kStatClipFracLow] = mean(kClipLow);
  st[kStatClipFracHigh] = mean(kClipHigh);
  st[kStatDualClipFrac] = mean(kDualClip);
  st[kStatApproxKl] = mean(kApproxKl);
  st[kStatRatioMean] = mean(kRatio);
  st[kStatRatioMax] = A(n_tok > 0 ? ratio_max : 0.0);
  *static_cast<A*>(p.loss) = A(t[0]);
}

// Serial finalize (CPU), rows in order: deterministic.
template <typename A>
FRL_HD void finalize(const Params& p) {
  const double* part = p.partials;
  const loss_agg::BatchCounts n = loss_agg::weigh_rows(p.agg, part, p.B, kNumPartials, kLen,
                                                       static_cast<A*>(p.row_weight));
  double t[kNumTerms] = {}, rt[kNumTerms];
  double ratio_max = -HUGE_VAL;
  for (int64_t b = 0; b < p.B; ++b) {
    const double* row = part + b * kNumPartials;
    row_terms(row, loss_agg::row_weight_of(p.agg, row[kLen], n), rt);
    for (int k = 0; k < kNumTerms; ++k) t[k] += rt[k];
    ratio_max = row[kRatioMax] > ratio_max ? row[kRatioMax] : ratio_max;
  }
  write_outputs<A>(p, t, ratio_max, n.n_tok);
}

}  // namespace fastrlhf::kernels::policy_loss

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::policy_loss {
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// Forward: one block per row writes its partials; one block finalizes (rows strided over its
// threads, fixed-order block reductions). Backward: elementwise over [B, T]. No host sync.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::policy_loss
