// Loss aggregation shared by policy_loss and value_loss.
//
// A token loss l[b, t] over valid tokens (mask) becomes loss = sum_b w_b * sum_t mask l[b, t]
// with a per-row weight w_b:
//   token-mean               w = 1 / N_tok                 (N_tok: valid tokens)
//   seq-mean-token-mean      w = 1 / (len_b * N_seq)       (N_seq: rows with a valid token)
//   seq-mean-token-sum       w = 1 / N_seq
//   seq-mean-token-sum-norm  w = 1 / (L * N_seq)           (Dr. GRPO: L a constant length)
// N_tok (token-mean) or N_seq (the seq-mean modes) may be replaced by a caller-given global
// normalizer (e.g. valid tokens across micro-batches and data-parallel ranks), which makes
// gradient accumulation exact. A zero denominator gives weight 0 (an empty batch has loss 0).
#pragma once

#include "common.h"

namespace fastrlhf::kernels::loss_agg {

enum class Agg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

struct Config {
  Agg agg = Agg::kTokenMean;
  double normalizer = 0;   // > 0: replaces N_tok / N_seq
  double norm_length = 0;  // L for seq-mean-token-sum-norm (> 0)
};

// Weight of each valid token of a row with `len` valid tokens, given the batch counts.
FRL_HD double row_weight(const Config& c, double len, double n_tok, double n_seq) {
  if (len <= 0) return 0;
  const double tok = c.normalizer > 0 ? c.normalizer : n_tok;
  const double seq = c.normalizer > 0 ? c.normalizer : n_seq;
  double denom = 0;
  switch (c.agg) {
    case Agg::kTokenMean: denom = tok; break;
    case Agg::kSeqMeanTokenMean: denom = len * seq; break;
    case Agg::kSeqMeanTokenSum: denom = seq; break;
    case Agg::kSeqMeanTokenSumNorm: denom = c.norm_length * seq; break;
  }
  return denom > 0 ? 1.0 / denom : 0.0;
}

struct BatchCounts {
  double n_tok, n_seq;  // valid tokens; rows with at least one valid token
};

FRL_HD double row_weight_of(const Config& c, double len, const BatchCounts& n) {
  return row_weight(c, len, n.n_tok, n.n_seq);
}

// From per-row partials (row b at partials + b * stride, its valid-token count at len_index):
// the batch counts, and each row's token weight written to row_weight[b].
template <typename A>
FRL_HD BatchCounts weigh_rows(const Config& c, const double* partials, int64_t B, int stride,
                                                   int len_index, A* row_weight) {
  BatchCounts n{0, 0};
  for (int64_t b = 0; b < B; ++b) {
    const double len = partials[b * stride + len_index];
    n.n_tok += len;
    n.n_seq += len > 0 ? 1 : 0;
  }
  for (int64_t b = 0; b < B; ++b) row_weight[b] = A(row_weight_of(c, partials[b * stride + len_index], n));
  return n;
}

}  // namespace fastrlhf::kernels::loss_agg
