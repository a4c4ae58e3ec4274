// CUDA implementation of fastrlhf::group_advantages.
#include "cuda_utils.h"
#include "group_advantages.h"

namespace fastrlhf::ops {
namespace {

Tensor group_advantages_cuda(const Tensor& scores, int64_t group_size, bool normalize_std, bool leave_one_out,
                             double eps) {
  CudaContext ctx(scores);
  auto c = prepare_group_advantages(scores, group_size, normalize_std, leave_one_out, eps);
  check_cuda(k::group_advantages::launch_cuda(c.params, c.dtype, ctx.stream), "group_advantages");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }

}  // namespace fastrlhf::ops
