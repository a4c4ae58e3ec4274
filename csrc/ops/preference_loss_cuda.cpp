// CUDA implementation of fastrlhf::preference_loss and its backward.
#include "cuda_utils.h"
#include "preference_loss.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor> preference_loss_cuda(const Tensor& chosen, const Tensor& rejected,
                                                const std::optional<Tensor>& ref_chosen,
                                                const std::optional<Tensor>& ref_rejected,
                                                const std::optional<Tensor>& margin, double beta, int64_t loss_type,
                                                double label_smoothing, double normalizer) {
  auto c = prepare_preference_loss(chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type, label_smoothing,
                                   normalizer);
  alloc_preference_outputs(c);
  CudaContext ctx(chosen);
  check_cuda(k::preference_loss::launch_cuda(c.params, c.dtype, ctx.stream), "preference_loss");
  return {c.loss, c.stats};
}

Tensor preference_loss_backward_cuda(const Tensor& grad_loss, const Tensor& chosen, const Tensor& rejected,
                                     const std::optional<Tensor>& ref_chosen, const std::optional<Tensor>& ref_rejected,
                                     const std::optional<Tensor>& margin, double beta, int64_t loss_type,
                                     double label_smoothing, double normalizer) {
  auto c = prepare_preference_loss(chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type, label_smoothing,
                                   normalizer);
  alloc_preference_backward(c, grad_loss);
  CudaContext ctx(chosen);
  check_cuda(k::preference_loss::launch_backward_cuda(c.params, c.dtype, ctx.stream), "preference_loss_backward");
  return c.grad_chosen;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("preference_loss", &preference_loss_cuda);
  m.impl("preference_loss_backward", &preference_loss_backward_cuda);
}

}  // namespace fastrlhf::ops
