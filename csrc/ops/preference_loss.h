// Shared glue for preference_loss: checks, contiguous inputs, outputs and kernel params. The CPU
// and CUDA files differ only in the launchers they call.
#pragma once

#include "kernels/preference_loss.h"
#include "utils.h"

namespace fastrlhf::ops {

struct PreferenceLossCall {
  Tensor chosen, rejected, ref_chosen, ref_rejected, margin, loss, stats, grad_loss, grad_chosen;
  k::preference_loss::Params params;
  k::DType dtype;
};

inline PreferenceLossCall prepare_preference_loss(const Tensor& chosen, const Tensor& rejected,
                                                  const std::optional<Tensor>& ref_chosen,
                                                  const std::optional<Tensor>& ref_rejected,
                                                  const std::optional<Tensor>& margin, double beta, int64_t loss_type,
                                                  double label_smoothing, double normalizer) {
  TORCH_CHECK(chosen.dim() == 1, "fastrlhf: chosen must be [B], got ", chosen.sizes());
  check_float(chosen, "chosen");
  TORCH_CHECK(loss_type >= 0 && loss_type <= 2, "fastrlhf: preference loss type code must be 0..2, got ", loss_type);
  TORCH_CHECK(beta > 0, "fastrlhf: beta must be > 0, got ", beta);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 0.5, "fastrlhf: label_smoothing must be in [0, 0.5], got ",
              label_smoothing);
  TORCH_CHECK(ref_chosen.has_value() == ref_rejected.has_value(),
              "fastrlhf: pass both ref_chosen and ref_rejected, or neither");
  PreferenceLossCall c;
  c.dtype = to_kernel_dtype(chosen.scalar_type());
  auto like = [&](const Tensor& t, const char* name) {
    check_same(t, chosen, name, "chosen");
    check_dtype(t, chosen.scalar_type(), name);
    return t.contiguous();
  };
  c.chosen = chosen.contiguous();
  c.rejected = like(rejected, "rejected");
  if (ref_chosen.has_value()) c.ref_chosen = like(*ref_chosen, "ref_chosen");
  if (ref_rejected.has_value()) c.ref_rejected = like(*ref_rejected, "ref_rejected");
  if (margin.has_value()) c.margin = like(*margin, "margin");
  auto opt = [](const Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  auto& p = c.params;
  p.chosen = c.chosen.const_data_ptr();
  p.rejected = c.rejected.const_data_ptr();
  p.ref_chosen = opt(c.ref_chosen);
  p.ref_rejected = opt(c.ref_rejected);
  p.margin = opt(c.margin);
  p.B = chosen.size(0);
  p.beta = beta;
  p.label_smoothing = label_smoothing;
  p.normalizer = normalizer;
  p.loss_type = static_cast<k::preference_loss::LossType>(loss_type);
  return c;
}

// Forward outputs: loss [] and stats [kNumStats] in the accumulator dtype.
inline void alloc_preference_outputs(PreferenceLossCall& c) {
  const auto opts = c.chosen.options().dtype(acc_type(c.chosen.scalar_type()));
  c.loss = at::empty({}, opts);
  c.stats = at::empty({k::preference_loss::kNumStats}, opts);
  c.params.loss = c.loss.data_ptr();
  c.params.stats = c.stats.data_ptr();
}

// Backward: grad_loss (a [] tensor, cast to the accumulator dtype) -> grad_chosen like chosen.
inline void alloc_preference_backward(PreferenceLossCall& c, const Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "fastrlhf: grad_loss must be a scalar, got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == c.chosen.device(), "fastrlhf: grad_loss must be on ", c.chosen.device());
  c.grad_loss = grad_loss.reshape({}).to(acc_type(c.chosen.scalar_type())).contiguous();
  c.grad_chosen = at::empty_like(c.chosen);
  c.params.grad_loss = c.grad_loss.const_data_ptr();
  c.params.grad_chosen = c.grad_chosen.data_ptr();
}

}  // namespace fastrlhf::ops
