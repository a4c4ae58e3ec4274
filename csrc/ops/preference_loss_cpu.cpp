// CPU implementation of fastrlhf::preference_loss and its backward.
#include "preference_loss.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor> preference_loss_cpu(const Tensor& chosen, const Tensor& rejected,
                                               const std::optional<Tensor>& ref_chosen,
                                               const std::optional<Tensor>& ref_rejected,
                                               const std::optional<Tensor>& margin, double beta, int64_t loss_type,
                                               double label_smoothing, double normalizer) {
  auto c = prepare_preference_loss(chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type, label_smoothing,
                                   normalizer);
  alloc_preference_outputs(c);
  check_status(k::preference_loss::launch_cpu(c.params, c.dtype, torch_parallel_for()), "preference_loss");
  return {c.loss, c.stats};
}

Tensor preference_loss_backward_cpu(const Tensor& grad_loss, const Tensor& chosen, const Tensor& rejected,
                                    const std::optional<Tensor>& ref_chosen, const std::optional<Tensor>& ref_rejected,
                                    const std::optional<Tensor>& margin, double beta, int64_t loss_type,
                                    double label_smoothing, double normalizer) {
  auto c = prepare_preference_loss(chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type, label_smoothing,
                                   normalizer);
  alloc_preference_backward(c, grad_loss);
  check_status(k::preference_loss::launch_backward_cpu(c.params, c.dtype, torch_parallel_for()),
               "preference_loss_backward");
  return c.grad_chosen;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("preference_loss", &preference_loss_cpu);
  m.impl("preference_loss_backward", &preference_loss_backward_cpu);
}

}  // namespace fastrlhf::ops
