// CPU implementation of fastrlhf::group_advantages.
#include "group_advantages.h"

namespace fastrlhf::ops {
namespace {

Tensor group_advantages_cpu(const Tensor& scores, int64_t group_size, bool normalize_std, bool leave_one_out,
                            double eps) {
  auto c = prepare_group_advantages(scores, group_size, normalize_std, leave_one_out, eps);
  check_status(k::group_advantages::launch_cpu(c.params, c.dtype, torch_parallel_for()), "group_advantages");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace fastrlhf::ops
