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
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), "fastrlhf: tokens must be [N] = [", logits.size(0),
              "], got ", tokens.sizes());
  check_dtype(tokens, at::kLong, "tokens");
  TORCH_CHECK(tokens.device() == logits.device(), "fastrlhf: tokens must be on ", logits.device());
  TORCH_CHECK(temperature > 0, "fastrlhf: temperature must be > 0, got ", temperature);
}

inline TokenLogprobsCall prepare_token_logprobs(const Tensor& logits, const Tensor& tokens, double temperature) {
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
  c.params = {c.logits.const_data_ptr(),
              c.tokens.const_data_ptr<int64_t>(),
              c.logprobs.data_ptr(),
              c.entropy.data_ptr(),
              c.row_stats.data_ptr(),
              N,
              logits.size(1),
              1.0 / temperature};
  return c;
}

struct TokenLogprobsBackwardCall {
  Tensor grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, grad_logits;
  k::token_logprobs::BackwardParams params;
  k::DType dtype;
};

// The backward's per-row inputs -- upstream grads [N] (either may be absent), the saved
// row_stats [N, 2] and entropy [N] -- checked and made contiguous in the accumulator dtype.
// Shared with linear_token_logprobs' CPU backward.
struct BackwardRows {
  Tensor grad_logprobs, grad_entropy, row_stats, entropy;  // undefined where a grad is absent
};

inline BackwardRows prepare_backward_rows(const std::optional<Tensor>& grad_logprobs,
                                          const std::optional<Tensor>& grad_entropy, const Tensor& row_stats,
                                          const Tensor& entropy, int64_t N, const c10::Device& device,
                                          at::ScalarType acc) {
  auto row_vec = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "fastrlhf: ", name, " must be [N] = [", N, "], got ", t.sizes());
    TORCH_CHECK(t.device() == device, "fastrlhf: ", name, " must be on ", device);
    return t.to(acc).contiguous();
  };
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == N && row_stats.size(1) == 2,
              "fastrlhf: row_stats must be [N, 2], got ", row_stats.sizes());
  TORCH_CHECK(row_stats.device() == device, "fastrlhf: row_stats must be on ", device);
  BackwardRows r;
  r.row_stats = row_stats.to(acc).contiguous();
  r.entropy = row_vec(entropy, "entropy");
  if (grad_logprobs.has_value()) r.grad_logprobs = row_vec(*grad_logprobs, "grad_logprobs");
  if (grad_entropy.has_value()) r.grad_entropy = row_vec(*grad_entropy, "grad_entropy");
  return r;
}

// in_place: dlogits overwrite logits (token_logprobs_backward_), which must then be contiguous.
inline TokenLogprobsBackwardCall prepare_token_logprobs_backward(const std::optional<Tensor>& grad_logprobs,
                                                                 const std::optional<Tensor>& grad_entropy,
                                                                 const Tensor& logits, const Tensor& tokens,
                                                                 const Tensor& row_stats, const Tensor& entropy,
                                                                 double temperature, bool in_place = false) {
  check_logits_tokens(logits, tokens, temperature);
  TORCH_CHECK(!in_place || logits.is_contiguous(), "fastrlhf: token_logprobs_backward_ needs contiguous logits");
  const auto acc = acc_type(logits.scalar_type());
  TokenLogprobsBackwardCall c;
  c.dtype = to_kernel_dtype(logits.scalar_type());
  c.logits = logits.contiguous();
  c.tokens = tokens.contiguous();
  BackwardRows rows = prepare_backward_rows(grad_logprobs, grad_entropy, row_stats, entropy, logits.size(0),
                                            logits.device(), acc);
  c.grad_logprobs = rows.grad_logprobs, c.grad_entropy = rows.grad_entropy;
  c.row_stats = rows.row_stats, c.entropy = rows.entropy;
  c.grad_logits = in_place ? c.logits : empty_like_output(c.logits);
  c.params = {c.grad_logprobs.defined() ? c.grad_logprobs.const_data_ptr() : nullptr,
              c.grad_entropy.defined() ? c.grad_entropy.const_data_ptr() : nullptr,
              c.logits.const_data_ptr(),
              c.tokens.const_data_ptr<int64_t>(),
              c.row_stats.const_data_ptr(),
              c.entropy.const_data_ptr(),
              c.grad_logits.data_ptr(),
              logits.size(0),
              logits.size(1),
              1.0 / temperature};
  return c;
}

}  // namespace fastrlhf::ops
