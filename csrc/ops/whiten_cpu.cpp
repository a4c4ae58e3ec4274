// CPU implementation of fastrlhf::whiten.
#include "whiten.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor, Tensor> whiten_cpu(const Tensor& x, const std::optional<Tensor>& mask, bool shift_mean,
                                              bool unbiased, double eps) {
  auto c = prepare_whiten(x, mask, shift_mean, unbiased, eps);
  check_status(k::whiten::launch_cpu(c.params, c.dtype, torch_parallel_for()), "whiten");
  return {c.out, c.mean, c.rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("whiten", &whiten_cpu); }

}  // namespace fastrlhf::ops
