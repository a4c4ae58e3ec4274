// CUDA implementations of fastrlhf::token_logprobs and its backward (out of place and in place).
#include "cuda_utils.h"
#include "token_logprobs.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor, Tensor> token_logprobs_cuda(const Tensor& logits, const Tensor& tokens, double temperature) {
  CudaContext ctx(logits);
  auto c = prepare_token_logprobs(logits, tokens, temperature);
  check_cuda(k::token_logprobs::launch_cuda(c.params, c.dtype, ctx.stream), "token_logprobs");
  return {c.logprobs, c.entropy, c.row_stats};
}

// in_place: dlogits written over logits (token_logprobs_backward_)
Tensor run_backward(const std::optional<Tensor>& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                    const Tensor& logits, const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                    double temperature, bool in_place) {
  CudaContext ctx(logits);
  auto c = prepare_token_logprobs_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature,
                                           in_place);
  check_cuda(k::token_logprobs::launch_backward_cuda(c.params, c.dtype, ctx.stream), "token_logprobs_backward");
  return c.grad_logits;
}

Tensor token_logprobs_backward_cuda(const std::optional<Tensor>& grad_logprobs,
                                    const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                                    const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                                    double temperature) {
  return run_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature, false);
}

void token_logprobs_backward_inplace_cuda(const std::optional<Tensor>& grad_logprobs,
                                          const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                                          const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                                          double temperature) {
  run_backward(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cuda);
}

}  // namespace fastrlhf::ops
