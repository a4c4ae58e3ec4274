// CUDA implementation of fastrlhf::whiten.
#include "cuda_utils.h"
#include "whiten.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor, Tensor> whiten_cuda(const Tensor& x, const std::optional<Tensor>& mask, bool shift_mean,
                                               bool unbiased, double eps) {
  CudaContext ctx(x);
  auto c = prepare_whiten(x, mask, shift_mean, unbiased, eps);
  Tensor ws = at::empty({k::whiten::workspace_bytes(c.params.n)}, x.options().dtype(at::kByte));
  check_cuda(k::whiten::launch_cuda(c.params, c.dtype, ws.data_ptr(), ctx.stream), "whiten");
  return {c.out, c.mean, c.rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("whiten", &whiten_cuda); }

}  // namespace fastrlhf::ops
