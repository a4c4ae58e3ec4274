// CPU implementations of fastrlhf::token_logprobs and its backward (out of place and in place).
#include "token_logprobs.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor, Tensor> token_logprobs_cpu(const Tensor& logits, const Tensor& tokens, double temperature) {
  auto c = prepare_token_logprobs(logits, tokens, temperature);
  TORCH_CHECK(k::token_logprobs::launch_cpu(c.params, c.dtype, torch_parallel_for()) == k::Status::kOk,
              "fastrlhf.token_logprobs: tokens must be in [0, V) = [0, ", c.params.V, ")");
  return {c.logprobs, c.entropy, c.row_stats};
}

// in_place: dlogits written over logits (token_logprobs_backward_)
Tensor run_backward(const std::optional<Tensor>& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                    const Tensor& logits, const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                    double temperature, bool in_place) {
  auto c = prepare_token_logprobs_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature,
                                           in_place);
  check_status(k::token_logprobs::launch_backward_cpu(c.params, c.dtype, torch_parallel_for()),
               "token_logprobs_backward");
  return c.grad_logits;
}

Tensor token_logprobs_backward_cpu(const std::optional<Tensor>& grad_logprobs,
                                   const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                                   const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                                   double temperature) {
  return run_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature, false);
}

void token_logprobs_backward_inplace_cpu(const std::optional<Tensor>& grad_logprobs,
                                         const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                                         const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                                         double temperature) {
  run_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cpu);
}

}  // namespace fastrlhf::ops
