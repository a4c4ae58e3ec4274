// Shared glue for the loss ops (kl_penalty, policy_loss, value_loss): checks, outputs, params.
// CPU and CUDA files differ only in the launchers they call.
#pragma once

#include "kernels/kl_penalty.h"
#include "kernels/policy_loss.h"
#include "kernels/value_loss.h"
#include "utils.h"

namespace fastrlhf::ops {

// [B, T] float tensor with the shape, dtype and device of `ref`, made contiguous.
inline Tensor bt_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  check_same(t, ref, name, ref_name);
  check_dtype(t, ref.scalar_type(), name);
  return t.contiguous();
}

inline const void* opt_ptr(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

struct KlCall {
  Tensor logprobs, ref, grad, out;
  k::kl_penalty::Params params;
  k::DType dtype;
};

inline KlCall prepare_kl(const Tensor& logprobs, const Tensor& ref, int64_t estimator,
                         const std::optional<Tensor>& grad) {
  check_float(logprobs, "logprobs");
  TORCH_CHECK(estimator >= 0 && estimator <= 4, "fastrlhf: kl estimator code must be 0..4, got ", estimator);
  KlCall c;
  c.dtype = to_kernel_dtype(logprobs.scalar_type());
  c.logprobs = logprobs.contiguous();
  c.ref = bt_like(ref, logprobs, "ref_logprobs", "logprobs");
  if (grad.has_value()) c.grad = bt_like(*grad, logprobs, "grad", "logprobs");
  c.out = at::empty_like(c.logprobs);
  c.params = {c.logprobs.const_data_ptr(),
              c.ref.const_data_ptr(),
              c.out.data_ptr(),
              opt_ptr(c.grad),
              logprobs.numel(),
              static_cast<k::kl_penalty::Estimator>(estimator)};
  return c;
}

inline k::loss_agg::Config agg_config(int64_t agg, double normalizer, double norm_length, int64_t T) {
  TORCH_CHECK(agg >= 0 && agg <= 3, "fastrlhf: aggregation code must be 0..3, got ", agg);
  return k::loss_agg::Config{static_cast<k::loss_agg::Agg>(agg), normalizer, norm_length > 0 ? norm_length : double(T)};
}

struct PolicyLossCall {
  Tensor logprobs, old_logprobs, advantages, mask, ref, entropy;
  Tensor partials, loss, stats, row_weight, grad_loss, grad_logprobs, grad_entropy;
  k::policy_loss::Params params;
  k::DType dtype;
};

inline PolicyLossCall prepare_policy_loss(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                                          const Tensor& mask, const std::optional<Tensor>& ref_logprobs,
                                          const std::optional<Tensor>& entropy, double clip_low, double clip_high,
                                          double dual_clip, double kl_coef, int64_t kl_estimator, double entropy_coef) {
  TORCH_CHECK(logprobs.dim() == 2, "fastrlhf: logprobs must be [B, T], got ", logprobs.sizes());
  check_float(logprobs, "logprobs");
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 4, "fastrlhf: kl estimator code must be 0..4");
  PolicyLossCall c;
  c.dtype = to_kernel_dtype(logprobs.scalar_type());
  c.logprobs = logprobs.contiguous();
  c.old_logprobs = bt_like(old_logprobs, logprobs, "old_logprobs", "logprobs");
  c.advantages = bt_like(advantages, logprobs, "advantages", "logprobs");
  Tensor mask_holder;
  const uint8_t* m = bool_ptr(mask, mask_holder, logprobs, "mask", "logprobs");
  c.mask = mask_holder;
  if (ref_logprobs.has_value()) c.ref = bt_like(*ref_logprobs, logprobs, "ref_logprobs", "logprobs");
  if (entropy.has_value()) c.entropy = bt_like(*entropy, logprobs, "entropy", "logprobs");
  auto& p = c.params;
  p.logprobs = c.logprobs.const_data_ptr();
  p.old_logprobs = c.old_logprobs.const_data_ptr();
  p.advantages = c.advantages.const_data_ptr();
  p.mask = m;
  p.ref_logprobs = opt_ptr(c.ref);
  p.entropy = opt_ptr(c.entropy);
  p.B = logprobs.size(0);
  p.T = logprobs.size(1);
  p.clip_low = clip_low;
  p.clip_high = clip_high;
  p.dual_clip = dual_clip;
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.kl_estimator = static_cast<k::kl_penalty::Estimator>(kl_estimator);
  return c;
}

// Allocates the forward outputs of a loss call (PolicyLossCall / ValueLossCall) and points its
// kernel params at them.
template <typename Call>
void alloc_loss_forward(Call& c, const Tensor& like, int n_partials, int n_stats, int64_t agg, double normalizer,
                        double norm_length) {
  const auto opts = like.options().dtype(acc_type(like.scalar_type()));
  auto& p = c.params;
  c.partials = at::empty({p.B, n_partials}, like.options().dtype(at::kDouble));
  c.loss = at::empty({}, opts);
  c.stats = at::empty({n_stats}, opts);
  c.row_weight = at::empty({p.B}, opts);
  p.agg = agg_config(agg, normalizer, norm_length, p.T);
  p.partials = c.partials.template data_ptr<double>();
  p.loss = c.loss.data_ptr();
  p.stats = c.stats.data_ptr();
  p.row_weight = c.row_weight.data_ptr();
}

inline void alloc_policy_forward(PolicyLossCall& c, int64_t agg, double normalizer, double norm_length) {
  alloc_loss_forward(c, c.logprobs, k::policy_loss::kNumPartials, k::policy_loss::kNumStats, agg, normalizer,
                     norm_length);
}

// The backward's grad_loss (a scalar) and saved row_weight [B], checked (on like's device: the
// kernel reads them there) and converted to the accumulator dtype.
inline void backward_scalars(const Tensor& grad_loss, const Tensor& row_weight, const Tensor& like, int64_t B,
                             Tensor& grad_loss_out, Tensor& row_weight_out) {
  const auto acc = acc_type(like.scalar_type());
  TORCH_CHECK(grad_loss.numel() == 1, "fastrlhf: grad_loss must be a scalar");
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == B, "fastrlhf: row_weight must be [B]");
  TORCH_CHECK(grad_loss.device() == like.device() && row_weight.device() == like.device(),
              "fastrlhf: grad_loss and row_weight must be on ", like.device());
  grad_loss_out = grad_loss.to(acc).contiguous();
  row_weight_out = row_weight.to(acc).contiguous();
}

inline void alloc_policy_backward(PolicyLossCall& c, const Tensor& grad_loss, const Tensor& row_weight,
                                  bool has_entropy) {
  backward_scalars(grad_loss, row_weight, c.logprobs, c.params.B, c.grad_loss, c.row_weight);
  c.grad_logprobs = at::empty_like(c.logprobs);
  c.grad_entropy = has_entropy ? at::empty_like(c.logprobs) : at::empty({0}, c.logprobs.options());
  auto& p = c.params;
  p.grad_loss = c.grad_loss.const_data_ptr();
  p.row_weight = c.row_weight.data_ptr();
  p.grad_logprobs = c.grad_logprobs.data_ptr();
  p.grad_entropy = has_entropy ? c.grad_entropy.data_ptr() : nullptr;
}

struct ValueLossCall {
  Tensor values, old_values, returns, mask, partials, loss, stats, row_weight, grad_loss, grad_values;
  k::value_loss::Params params;
  k::DType dtype;
};

inline ValueLossCall prepare_value_loss(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                                        const Tensor& mask, double clip) {
  TORCH_CHECK(values.dim() == 2, "fastrlhf: values must be [B, T], got ", values.sizes());
  check_float(values, "values");
  ValueLossCall c;
  c.dtype = to_kernel_dtype(values.scalar_type());
  c.values = values.contiguous();
  c.old_values = bt_like(old_values, values, "old_values", "values");
  c.returns = bt_like(returns, values, "returns", "values");
  Tensor mask_holder;
  const uint8_t* m = bool_ptr(mask, mask_holder, values, "mask", "values");
  c.mask = mask_holder;
  auto& p = c.params;
  p.values = c.values.const_data_ptr();
  p.old_values = c.old_values.const_data_ptr();
  p.returns = c.returns.const_data_ptr();
  p.mask = m;
  p.B = values.size(0);
  p.T = values.size(1);
  p.clip = clip;
  return c;
}

inline void alloc_value_forward(ValueLossCall& c, int64_t agg, double normalizer, double norm_length) {
  alloc_loss_forward(c, c.values, k::value_loss::kNumPartials, k::value_loss::kNumStats, agg, normalizer, norm_length);
}

inline void alloc_value_backward(ValueLossCall& c, const Tensor& grad_loss, const Tensor& row_weight) {
  backward_scalars(grad_loss, row_weight, c.values, c.params.B, c.grad_loss, c.row_weight);
  c.grad_values = at::empty_like(c.values);
  c.params.grad_loss = c.grad_loss.const_data_ptr();
  c.params.row_weight = c.row_weight.data_ptr();
  c.params.grad_values = c.grad_values.data_ptr();
}

}  // namespace fastrlhf::ops
