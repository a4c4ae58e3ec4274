// Shared glue for token_logprobs (CPU and CUDA differ only in the launcher).
#pragma once

#include "kernels/token_logprobs.h"
#include "utils.h"

namespace fastrlhf::ops {

struct TokenLogprobsCall {
  Tensor logits, tokens, logprobs, entropy, row_stats;
  k::token_logprobs::Params params;
  k::DType dtype;
};

inline void check_logits_tokens(const Tensor& logits, const Tensor& tokens, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "fastrlhf: logits must be [N, V] with V >= 1, got ",
              logits.sizes());
  check_float(logits, "logits");
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), "fastrlhf: tokens must be [N] = [",
              logits.size(0), "], got ", tokens.sizes());
  check_dtype(tokens, at::kLong, "tokens");
  TORCH_CHECK(tokens.device() == logits.device(), "fastrlhf: tokens must be on ", logits.device());
  TORCH_CHECK(temperature > 0, "fastrlhf: temperature must be > 0, got ", temperature);
}

inline TokenLogprobsCall prepare_token_logprobs(const Tensor& logits, const Tensor& tokens,
                                                double temperature) {
  check_logits_tokens(logits, tokens, temperature);
  TokenLogprobsCall c;
  c.dtype = to_kernel_dtype(logits.scalar_type());
  c.logits = logits.contiguous();
  c.tokens = tokens.contiguous();
  const auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  const int64_t N = logits.size(0);
  c.logprobs = at::empty({N}, opts);
  c.entropy = at::empty({N}, opts);
  c.row_stats = at::empty({N, 2}, opts);
  c.params = {c.logits.const_data_ptr(), c.tokens.const_data_ptr<int64_t>(), c.logprobs.data_ptr(),
              c.entropy.data_ptr(), c.row_stats.data_ptr(), N, logits.size(1), 1.0 / temperature};
  return c;
}

struct TokenLogprobsBackwardCall {
  Tensor grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, grad_logits;
  k::token_logprobs::BackwardParams params;
  k::DType dtype;
};

inline TokenLogprobsBackwardCall prepare_token_logprobs_backward(
    const std::optional<Tensor>& grad_logprobs, const std::optional<Tensor>& grad_entropy,
    const Tensor& logits, const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
    double temperature) {
  check_logits_tokens(logits, tokens, temperature);
  const auto acc = acc_type(logits.scalar_type());
  TokenLogprobsBackwardCall c;
  auto row_vec = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "fastrlhf: ", name, " must be [N], got ",
                t.sizes());
    TORCH_CHECK(t.device() == logits.device(), "fastrlhf: ", name, " must be on ", logits.device());
    return t.to(acc).contiguous();
  };
  c.dtype = to_kernel_dtype(logits.scalar_type());
  c.logits = logits.contiguous();
  c.tokens = tokens.contiguous();
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == logits.size(0) && row_stats.size(1) == 2,
              "fastrlhf: row_stats must be [N, 2], got ", row_stats.sizes());
  TORCH_CHECK(row_stats.device() == logits.device(), "fastrlhf: row_stats must be on ", logits.device());
  c.row_stats = row_stats.to(acc).contiguous();
  c.entropy = row_vec(entropy, "entropy");
  if (grad_logprobs.has_value()) c.grad_logprobs = row_vec(*grad_logprobs, "grad_logprobs");
  if (grad_entropy.has_value()) c.grad_entropy = row_vec(*grad_entropy, "grad_entropy");
  c.grad_logits = empty_like_output(c.logits);
  c.params = {c.grad_logprobs.defined() ? c.grad_logprobs.const_data_ptr() : nullptr,
              c.grad_entropy.defined() ? c.grad_entropy.const_data_ptr() : nullptr,
              c.logits.const_data_ptr(), c.tokens.const_data_ptr<int64_t>(), c.row_stats.const_data_ptr(),
              c.entropy.const_data_ptr(), c.grad_logits.data_ptr(), logits.size(0), logits.size(1),
              1.0 / temperature};
  return c;
}

}  // namespace fastrlhf::ops
