// CPU implementations of fastrlhf::gae and fastrlhf::discounted_returns.
#include "gae.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values, const std::optional<Tensor>& mask,
                                   const std::optional<Tensor>& dones, const std::optional<Tensor>& last_values,
                                   double gamma, double lam) {
  GaeCall c = prepare_gae(rewards, values, mask, dones, last_values, gamma, lam);
  check_status(k::gae::launch_cpu(c.params, c.dtype, torch_parallel_for()), "gae");
  return {c.advantages, c.returns};
}

Tensor discounted_returns_cpu(const Tensor& rewards, const std::optional<Tensor>& mask,
                              const std::optional<Tensor>& dones, double gamma) {
  GaeCall c = prepare_gae(rewards, std::nullopt, mask, dones, std::nullopt, gamma, 1.0);
  check_status(k::gae::launch_cpu(c.params, c.dtype, torch_parallel_for()), "discounted_returns");
  return c.advantages;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
}

}  // namespace fastrlhf::ops
