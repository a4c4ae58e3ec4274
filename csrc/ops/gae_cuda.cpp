// CUDA implementations of fastrlhf::gae and fastrlhf::discounted_returns.
#include "cuda_utils.h"
#include "gae.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values, const std::optional<Tensor>& mask,
                                    const std::optional<Tensor>& dones, const std::optional<Tensor>& last_values,
                                    double gamma, double lam) {
  CudaContext ctx(rewards);
  GaeCall c = prepare_gae(rewards, values, mask, dones, last_values, gamma, lam);
  check_cuda(k::gae::launch_cuda(c.params, c.dtype, ctx.stream), "gae");
  return {c.advantages, c.returns};
}

Tensor discounted_returns_cuda(const Tensor& rewards, const std::optional<Tensor>& mask,
                               const std::optional<Tensor>& dones, double gamma) {
  CudaContext ctx(rewards);
  GaeCall c = prepare_gae(rewards, std::nullopt, mask, dones, std::nullopt, gamma, 1.0);
  check_cuda(k::gae::launch_cuda(c.params, c.dtype, ctx.stream), "discounted_returns");
  return c.advantages;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("discounted_returns", &discounted_returns_cuda);
}

}  // namespace fastrlhf::ops
