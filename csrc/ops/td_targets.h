// Shared glue for td_targets and q_update (CPU and CUDA differ only in the launcher).
#pragma once

#include "kernels/td_targets.h"
#include "utils.h"

namespace fastrlhf::ops {

struct TdTargetsCall {
  Tensor rewards, next_q, dones, next_actions, out;
  k::td_targets::Params params;
  k::DType dtype;
};

inline TdTargetsCall prepare_td_targets(const Tensor& rewards, const Tensor& next_q, const std::optional<Tensor>& dones,
                                        const std::optional<Tensor>& next_actions, double gamma) {
  check_float(next_q, "next_q");
  TORCH_CHECK(next_q.dim() >= 1 && next_q.size(-1) >= 1, "fastrlhf: next_q must be [..., A] with A >= 1, got ",
              next_q.sizes());
  TORCH_CHECK(rewards.sizes() == next_q.sizes().slice(0, next_q.dim() - 1),
              "fastrlhf: rewards must be next_q's shape without the action dim ",
              next_q.sizes().slice(0, next_q.dim() - 1), ", got ", rewards.sizes());
  TORCH_CHECK(rewards.device() == next_q.device(), "fastrlhf: rewards and next_q devices differ");
  check_dtype(rewards, next_q.scalar_type(), "rewards");
  TdTargetsCall c;
  c.dtype = to_kernel_dtype(next_q.scalar_type());
  c.rewards = rewards.contiguous();
  c.next_q = next_q.contiguous();
  auto& p = c.params;
  p.dones = bool_ptr(dones, c.dones, rewards, "dones", "rewards");
  if (next_actions.has_value()) {
    check_same(*next_actions, rewards, "next_actions", "rewards");
    check_dtype(*next_actions, at::kLong, "next_actions");
    c.next_actions = next_actions->contiguous();
    p.next_actions = c.next_actions.const_data_ptr<int64_t>();
  }
  c.out = at::empty_like(c.rewards);
  p.rewards = c.rewards.const_data_ptr();
  p.next_q = c.next_q.const_data_ptr();
  p.out = c.out.data_ptr();
  p.n = rewards.numel();
  p.num_actions = next_q.size(-1);
  p.gamma = gamma;
  return c;
}

struct QUpdateCall {
  Tensor q, actions, targets, out;
  k::td_targets::QUpdateParams params;
  k::DType dtype;
};

inline QUpdateCall prepare_q_update(const Tensor& q, const Tensor& actions, const Tensor& targets, double alpha) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() >= 1 && q.size(-1) >= 1, "fastrlhf: q must be [..., A] with A >= 1, got ", q.sizes());
  const auto lead = q.sizes().slice(0, q.dim() - 1);
  TORCH_CHECK(actions.sizes() == lead, "fastrlhf: actions must be ", lead, ", got ", actions.sizes());
  TORCH_CHECK(targets.sizes() == lead, "fastrlhf: targets must be ", lead, ", got ", targets.sizes());
  TORCH_CHECK(actions.device() == q.device() && targets.device() == q.device(),
              "fastrlhf: q, actions and targets must be on one device");
  check_dtype(actions, at::kLong, "actions");
  check_dtype(targets, q.scalar_type(), "targets");
  QUpdateCall c;
  c.dtype = to_kernel_dtype(q.scalar_type());
  c.q = q.contiguous();
  c.actions = actions.contiguous();
  c.targets = targets.contiguous();
  c.out = at::empty_like(c.q);
  c.params = {c.q.const_data_ptr(),
              c.actions.const_data_ptr<int64_t>(),
              c.targets.const_data_ptr(),
              c.out.data_ptr(),
              actions.numel(),
              q.size(-1),
              alpha};
  return c;
}

}  // namespace fastrlhf::ops
