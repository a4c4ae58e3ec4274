// Log-probability of chosen tokens (and the entropy of each position's distribution) from
// logits, forward and backward, without materializing softmax.
//
// Per row, with x_j = logits_j / temperature over the vocabulary j < V:
//   m = max_j x_j,  s = sum_j exp(x_j - m),  e = sum_j exp(x_j - m) (x_j - m)
//   logprob = (x_tok - m) - log s,  entropy H = log s - e / s       (log-sum-exp = m + log s)
// Backward, with p_j = exp((x_j - m) - log s) and upstream grads g (logprob) and h (entropy):
//   dlogits_j = ( g (1[j = tok] - p_j) - h p_j ((x_j - m) - log s + H) ) / temperature
// m and log s are kept apart (saved as the row's "stats"): m + log s rounds to ulp(m), which for
// logits ~1e4 in fp32 would cost 5e-4 of accuracy in log-probs and probabilities.
// Terms with p_j = 0 contribute exactly 0 (so -inf logits are fine). A row whose logits are all
// -inf has no distribution: its outputs are NaN. NaN logits propagate to their row.
#pragma once

#include "common.h"
#include "math.h"

namespace fastrlhf::kernels::token_logprobs {

struct Params {
  const void* logits = nullptr;    // [N, V] storage dtype, rows contiguous
  const int64_t* tokens = nullptr; // [N]
  void* logprobs = nullptr;        // [N] accumulator dtype (fp32, fp64 for fp64 logits)
  void* entropy = nullptr;         // [N] accumulator dtype
  void* row_stats = nullptr;       // [N, 2] accumulator dtype: (m, log s), saved for backward
  int64_t N = 0, V = 0;
  double inv_temperature = 1.0;
};

struct BackwardParams {
  const void* grad_logprobs = nullptr;  // [N] accumulator dtype, or nullptr (zeros)
  const void* grad_entropy = nullptr;   // [N] accumulator dtype, or nullptr (zeros)
  const void* logits = nullptr;         // [N, V]
  const int64_t* tokens = nullptr;      // [N] (validated by the forward)
  const void* row_stats = nullptr;      // [N, 2] (m, log s)
  const void* entropy = nullptr;        // [N]
  void* grad_logits = nullptr;          // [N, V] storage dtype; may be logits itself (in place)
  int64_t N = 0, V = 0;
  double inv_temperature = 1.0;
};

// exp(x - m) and its contribution to e, with the 0 * -inf case defined as 0.
template <typename A>
struct ExpTerm {
  A ex, ex_d;  // exp(x - m), exp(x - m) * (x - m)
};

template <typename A>
FRL_HD ExpTerm<A> exp_term(A x, A m) {
  const A d = x - m;
  const A ex = fast_exp(d);
  return ExpTerm<A>{ex, ex * (ex > A(0) ? d : A(0))};
}

template <typename A>
struct RowResult {
  A max, log_sum, logprob, entropy;
};

template <typename A>
FRL_HD RowResult<A> finalize(A m, A s, A e, A x_tok) {
  const A log_s = log_acc(s);
  // clamps: log p <= 0 and H >= 0 exactly, whatever the rounding (or FMA contraction) of x - m
  const A lp = (x_tok - m) - log_s, H = log_s - e / s;
  return RowResult<A>{m, log_s, lp > A(0) ? A(0) : lp, H < A(0) ? A(0) : H};
}

// dlogits_j for one element (before the 1[j = tok] g term and the 1/temperature scale).
template <typename A>
FRL_HD A grad_element(A x, A m, A log_s, A H, A g, A h) {
  const A d = (x - m) - log_s;  // log p_j
  const A p = fast_exp(d);
  return p > A(0) ? -p * (g + h * (d + H)) : A(0);
}

}  // namespace fastrlhf::kernels::token_logprobs

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::token_logprobs {
// CPU: rows in parallel; per row a max pass and a fused exp-sum pass (the row is re-read from
// L2), 32 accumulator lanes each; backward writes dlogits in one pass. kIndexOutOfRange for a token
// outside [0, V).
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const BackwardParams& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// CUDA: one block per row, block reductions in a fixed order; tokens out of range trip a
// device-side check (FRL_DEVICE_CHECK).
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_backward_cuda(const BackwardParams& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::token_logprobs
