// Shared glue for group_advantages (CPU and CUDA differ only in the launcher).
#pragma once

#include "kernels/group_advantages.h"
#include "utils.h"

namespace fastrlhf::ops {

struct GroupAdvantagesCall {
  Tensor scores, out;
  k::group_advantages::Params params;
  k::DType dtype;
};

inline GroupAdvantagesCall prepare_group_advantages(const Tensor& scores, int64_t group_size, bool normalize_std,
                                                    bool leave_one_out, double eps) {
  TORCH_CHECK(scores.dim() == 1, "fastrlhf: scores must be 1-D [N], got ", scores.sizes());
  check_float(scores, "scores");
  TORCH_CHECK(group_size >= 1, "fastrlhf: group_size must be >= 1, got ", group_size);
  TORCH_CHECK(scores.size(0) % group_size == 0, "fastrlhf: group_size ", group_size,
              " must divide the number of scores ", scores.size(0));
  TORCH_CHECK(!leave_one_out || group_size >= 2, "fastrlhf: leave_one_out needs group_size >= 2, got ", group_size);
  GroupAdvantagesCall c;
  c.dtype = to_kernel_dtype(scores.scalar_type());
  c.scores = scores.contiguous();
  c.out = at::empty_like(c.scores);
  c.params = {c.scores.const_data_ptr(),
              c.out.data_ptr(),
              scores.size(0) / group_size,
              group_size,
              normalize_std,
              leave_one_out,
              eps};
  return c;
}

}  // namespace fastrlhf::ops
