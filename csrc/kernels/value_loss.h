// Clipped value loss (PPO), fused forward and backward, aggregated as in loss_agg.h, with the
// clip fraction and the explained variance in the same pass.
//
// Per valid token, with v_clip = old + clip(v - old, -clip, clip):
//   loss = 0.5 * max((v - R)^2, (v_clip - R)^2)        (clip <= 0: 0.5 (v - R)^2)
// Gradient: (v - R) on the unclipped branch, 0 where the clipped branch (|v - old| > clip, a
// constant in v) is the larger one.
// explained_variance = 1 - Var(R - v) / Var(R) over valid tokens (NaN when Var(R) = 0, as CleanRL).
#pragma once

#include "common.h"
#include "loss_agg.h"

namespace fastrlhf::kernels::value_loss {

// Returns R and residuals R - v are summed shifted by the row's first valid value (kRShift,
// kResShift); finalize re-centres every row on the first non-empty row's shift, so the
// variances in explained_variance are exactly 0 for constant returns and free of the
// E[x^2] - E[x]^2 cancellation of large means.
enum Partial : int { kLoss = 0, kClip, kRShift, kR, kR2, kResShift, kRes, kRes2, kV, kLen, kNumPartials };
enum Stat : int { kStatClipFrac = 0, kStatExplainedVariance, kStatValueMean, kStatReturnMean, kNumStats };

struct Params {
  const void* values = nullptr;      // [B, T] storage dtype
  const void* old_values = nullptr;  // [B, T]
  const void* returns = nullptr;     // [B, T]
  const uint8_t* mask = nullptr;     // [B, T] bool
  int64_t B = 0, T = 0;
  double clip = 0.2;  // <= 0: unclipped
  loss_agg::Config agg;
  double* partials = nullptr;  // [B, kNumPartials]
  void* loss = nullptr;        // [] accumulator dtype
  void* stats = nullptr;       // [kNumStats]
  void* row_weight = nullptr;  // [B]
  const void* grad_loss = nullptr;  // [] (backward)
  void* grad_values = nullptr;      // [B, T] (backward)
};

template <typename A>
struct Token {
  A loss;
  A clipped;  // 1 where the clipped branch is the larger one, else 0 (a number, not a bool:
              // bool members keep compilers from vectorizing the CPU loop)
};

// The clipped branch counts only where the clip binds (|v - old| > clip): inside the range
// v_clip = v up to rounding, which must not count as "clipped".
template <typename A>
FRL_HD Token<A> token(A v, A old, A ret, A clip) {
  const A d1 = v - ret;
  const A l1 = d1 * d1;
  const A dv = v - old;
  const A vc = old + (dv < -clip ? -clip : clip);
  const A d2 = vc - ret;
  const A l2 = d2 * d2;
  // clip <= 0: off. `&`, not `&&`: keeps the CPU loop vectorizable
  const bool clipped = (clip > A(0)) & ((dv < -clip) | (dv > clip)) & (l2 > l1);
  return Token<A>{A(0.5) * (clipped ? l2 : l1), clipped ? A(1) : A(0)};
}

// Where the clipped branch is taken v_clip is constant in v: gradient 0; else v - R.
template <typename A>
FRL_HD A token_grad(A v, A old, A ret, A clip) {
  return token(v, old, ret, clip).clipped > A(0) ? A(0) : v - ret;
}

// ---- finalize: row weights, loss and stats from the [B, kNumPartials] partials ------------
// Each row contributes kNumTerms sums; the returns and residual sums are re-centred on one
// batch-wide shift c (the first non-empty row's): with d = s_b - c,
//   sum (x - c) = S1 + n d,   sum (x - c)^2 = S2 + 2 d S1 + n d^2.
// The CPU adds rows serially; CUDA reduces them in one block.
enum Term : int { kTLoss = 0, kTClip, kTV, kTR1, kTR2, kTRes1, kTRes2, kNumTerms };

FRL_HD void row_terms(const double* row, double w, double c_r, double c_res, double* t) {
  const double n_b = row[kLen];
  for (int k = 0; k < kNumTerms; ++k) t[k] = 0;
  if (!(n_b > 0)) return;
  const double dr = row[kRShift] - c_r, dres = row[kResShift] - c_res;
  t[kTLoss] = w * row[kLoss];
  t[kTClip] = row[kClip];
  t[kTV] = row[kV];
  t[kTR1] = row[kR] + n_b * dr;
  t[kTR2] = row[kR2] + 2 * dr * row[kR] + n_b * dr * dr;
  t[kTRes1] = row[kRes] + n_b * dres;
  t[kTRes2] = row[kRes2] + 2 * dres * row[kRes] + n_b * dres * dres;
}

template <typename A>
FRL_HD void write_outputs(const Params& p, const double* t, double c_r, double n_tok) {
  const double inv = n_tok > 0 ? 1.0 / n_tok : 0.0;
  const double var_r = (t[kTR2] - t[kTR1] * t[kTR1] * inv) * inv;
  const double var_res = (t[kTRes2] - t[kTRes1] * t[kTRes1] * inv) * inv;
  A* st = static_cast<A*>(p.stats);
  st[kStatClipFrac] = A(t[kTClip] * inv);
  st[kStatExplainedVariance] = A(var_r > 0 ? 1.0 - var_res / var_r : NAN);
  st[kStatValueMean] = A(t[kTV] * inv);
  st[kStatReturnMean] = A(c_r + t[kTR1] * inv);
  *static_cast<A*>(p.loss) = A(t[kTLoss]);
}

// Serial finalize (CPU), rows in order: deterministic.
template <typename A>
FRL_HD void finalize(const Params& p) {
  const double* part = p.partials;
  const loss_agg::BatchCounts n = loss_agg::weigh_rows(p.agg, part, p.B, kNumPartials, kLen,
                                                       static_cast<A*>(p.row_weight));
  double c_r = 0, c_res = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    if (part[b * kNumPartials + kLen] > 0) {
      c_r = part[b * kNumPartials + kRShift], c_res = part[b * kNumPartials + kResShift];
      break;
    }
  }
  double t[kNumTerms] = {}, rt[kNumTerms];
  for (int64_t b = 0; b < p.B; ++b) {
    const double* row = part + b * kNumPartials;
    row_terms(row, loss_agg::row_weight_of(p.agg, row[kLen], n), c_r, c_res, rt);
    for (int k = 0; k < kNumTerms; ++k) t[k] += rt[k];
  }
  write_outputs<A>(p, t, c_r, n.n_tok);
}

}  // namespace fastrlhf::kernels::value_loss

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::value_loss {
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::value_loss
