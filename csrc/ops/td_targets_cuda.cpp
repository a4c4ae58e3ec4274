// CUDA implementations of fastrlhf::td_targets and fastrlhf::q_update.
#include "cuda_utils.h"
#include "td_targets.h"

namespace fastrlhf::ops {
namespace {

Tensor td_targets_cuda(const Tensor& rewards, const Tensor& next_q, const std::optional<Tensor>& dones,
                       const std::optional<Tensor>& next_actions, double gamma) {
  CudaContext ctx(next_q);
  auto c = prepare_td_targets(rewards, next_q, dones, next_actions, gamma);
  check_cuda(k::td_targets::launch_cuda(c.params, c.dtype, ctx.stream), "td_targets");
  return c.out;
}

Tensor q_update_cuda(const Tensor& q, const Tensor& actions, const Tensor& targets, double alpha) {
  CudaContext ctx(q);
  auto c = prepare_q_update(q, actions, targets, alpha);
  check_cuda(k::td_targets::launch_q_update_cuda(c.params, c.dtype, ctx.stream), "q_update");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("td_targets", &td_targets_cuda);
  m.impl("q_update", &q_update_cuda);
}

}  // namespace fastrlhf::ops
