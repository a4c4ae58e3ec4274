// Shared glue for gae / discounted_returns: checks, outputs and kernel params. The CPU and CUDA
// files differ only in the launcher they call.
#pragma once

#include "kernels/gae.h"
#include "utils.h"

namespace fastrlhf::ops {

struct GaeCall {
  Tensor rewards, values, mask, dones, last_values;  // contiguous inputs (undefined if absent)
  Tensor advantages, returns;                        // outputs
  k::gae::Params params;
  k::DType dtype;
};

inline GaeCall prepare_gae(const Tensor& rewards, const std::optional<Tensor>& values,
                           const std::optional<Tensor>& mask, const std::optional<Tensor>& dones,
                           const std::optional<Tensor>& last_values, double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "fastrlhf: rewards must be [B, T], got ", rewards.sizes());
  check_float(rewards, "rewards");
  GaeCall c;
  c.dtype = to_kernel_dtype(rewards.scalar_type());
  c.rewards = rewards.contiguous();
  auto& p = c.params;
  p.B = rewards.size(0);
  p.T = rewards.size(1);
  p.gamma = gamma;
  p.lam = lam;
  p.rewards = c.rewards.const_data_ptr();
  if (values.has_value()) {
    check_same(*values, rewards, "values", "rewards");
    check_dtype(*values, rewards.scalar_type(), "values");
    c.values = values->contiguous();
    p.values = c.values.const_data_ptr();
  }
  p.mask = bool_ptr(mask, c.mask, rewards, "mask", "rewards");
  p.dones = bool_ptr(dones, c.dones, rewards, "dones", "rewards");
  if (last_values.has_value()) {
    TORCH_CHECK(last_values->dim() == 1 && last_values->size(0) == p.B, "fastrlhf: last_values must be [B] = [", p.B,
                "], got ", last_values->sizes());
    TORCH_CHECK(last_values->device() == rewards.device(), "fastrlhf: last_values must be on ", rewards.device(),
                ", got ", last_values->device());
    check_dtype(*last_values, rewards.scalar_type(), "last_values");
    c.last_values = last_values->contiguous();
    p.last_values = c.last_values.const_data_ptr();
  }
  c.advantages = at::empty_like(c.rewards);
  p.advantages = c.advantages.data_ptr();
  if (values.has_value()) {
    c.returns = at::empty_like(c.rewards);
    p.returns = c.returns.data_ptr();
  }
  return c;
}

}  // namespace fastrlhf::ops
