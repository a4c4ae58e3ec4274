// CPU implementations of fastrlhf::kl_penalty, policy_loss, value_loss and their backwards.
#include "losses.h"

namespace fastrlhf::ops {
namespace {

using Triple = std::tuple<Tensor, Tensor, Tensor>;

Tensor kl_penalty_cpu(const Tensor& logprobs, const Tensor& ref, int64_t estimator) {
  auto c = prepare_kl(logprobs, ref, estimator, std::nullopt);
  check_status(k::kl_penalty::launch_cpu(c.params, c.dtype, false, torch_parallel_for()), "kl_penalty");
  return c.out;
}

Tensor kl_penalty_backward_cpu(const Tensor& grad, const Tensor& logprobs, const Tensor& ref, int64_t estimator) {
  auto c = prepare_kl(logprobs, ref, estimator, grad);
  check_status(k::kl_penalty::launch_cpu(c.params, c.dtype, true, torch_parallel_for()), "kl_penalty_backward");
  return c.out;
}

Triple policy_loss_cpu(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                       const std::optional<Tensor>& ref_logprobs, const std::optional<Tensor>& entropy, double clip_low,
                       double clip_high, double dual_clip, double kl_coef, int64_t kl_estimator, double entropy_coef,
                       int64_t agg, double normalizer, double norm_length) {
  auto c = prepare_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_low, clip_high,
                               dual_clip, kl_coef, kl_estimator, entropy_coef);
  alloc_policy_forward(c, agg, normalizer, norm_length);
  check_status(k::policy_loss::launch_cpu(c.params, c.dtype, torch_parallel_for()), "policy_loss");
  return {c.loss, c.stats, c.row_weight};
}

std::tuple<Tensor, Tensor> policy_loss_backward_cpu(const Tensor& grad_loss, const Tensor& logprobs,
                                                    const Tensor& old_logprobs, const Tensor& advantages,
                                                    const Tensor& mask, const std::optional<Tensor>& ref_logprobs,
                                                    const Tensor& row_weight, double clip_low, double clip_high,
                                                    double dual_clip, double kl_coef, int64_t kl_estimator,
                                                    double entropy_coef, bool has_entropy) {
  auto c = prepare_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, std::nullopt, clip_low,
                               clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef);
  alloc_policy_backward(c, grad_loss, row_weight, has_entropy);
  check_status(k::policy_loss::launch_backward_cpu(c.params, c.dtype, torch_parallel_for()), "policy_loss_backward");
  return {c.grad_logprobs, c.grad_entropy};
}

Triple value_loss_cpu(const Tensor& values, const Tensor& old_values, const Tensor& returns, const Tensor& mask,
                      double clip, int64_t agg, double normalizer, double norm_length) {
  auto c = prepare_value_loss(values, old_values, returns, mask, clip);
  alloc_value_forward(c, agg, normalizer, norm_length);
  check_status(k::value_loss::launch_cpu(c.params, c.dtype, torch_parallel_for()), "value_loss");
  return {c.loss, c.stats, c.row_weight};
}

Tensor value_loss_backward_cpu(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                               const Tensor& returns, const Tensor& mask, const Tensor& row_weight, double clip) {
  auto c = prepare_value_loss(values, old_values, returns, mask, clip);
  alloc_value_backward(c, grad_loss, row_weight);
  check_status(k::value_loss::launch_backward_cpu(c.params, c.dtype, torch_parallel_for()), "value_loss_backward");
  return c.grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
  m.impl("policy_loss", &policy_loss_cpu);
  m.impl("policy_loss_backward", &policy_loss_backward_cpu);
  m.impl("value_loss", &value_loss_cpu);
  m.impl("value_loss_backward", &value_loss_backward_cpu);
}

}  // namespace fastrlhf::ops
