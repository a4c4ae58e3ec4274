// CPU implementations of fastrlhf::td_targets and fastrlhf::q_update.
#include "td_targets.h"

namespace fastrlhf::ops {
namespace {

Tensor td_targets_cpu(const Tensor& rewards, const Tensor& next_q, const std::optional<Tensor>& dones,
                      const std::optional<Tensor>& next_actions, double gamma) {
  auto c = prepare_td_targets(rewards, next_q, dones, next_actions, gamma);
  TORCH_CHECK(k::td_targets::launch_cpu(c.params, c.dtype, torch_parallel_for()) == k::Status::kOk,
              "fastrlhf.td_targets: next_actions must be in [0, ", c.params.num_actions, ")");
  return c.out;
}

Tensor q_update_cpu(const Tensor& q, const Tensor& actions, const Tensor& targets, double alpha) {
  auto c = prepare_q_update(q, actions, targets, alpha);
  TORCH_CHECK(k::td_targets::launch_q_update_cpu(c.params, c.dtype, torch_parallel_for()) == k::Status::kOk,
              "fastrlhf.q_update: actions must be in [0, ", c.params.num_actions, ")");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("td_targets", &td_targets_cpu);
  m.impl("q_update", &q_update_cpu);
}

}  // namespace fastrlhf::ops
