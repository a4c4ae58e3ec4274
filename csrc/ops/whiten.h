// Shared glue for whiten (CPU and CUDA differ only in the launcher).
#pragma once

#include "kernels/whiten.h"
#include "utils.h"

namespace fastrlhf::ops {

struct WhitenCall {
  Tensor x, mask, out, mean, rstd;
  k::whiten::Params params;
  k::DType dtype;
};

inline WhitenCall prepare_whiten(const Tensor& x, const std::optional<Tensor>& mask, bool shift_mean, bool unbiased,
                                 double eps) {
  check_float(x, "x");
  WhitenCall c;
  c.dtype = to_kernel_dtype(x.scalar_type());
  c.x = x.contiguous();
  auto& p = c.params;
  p.mask = bool_ptr(mask, c.mask, x, "mask", "x");
  c.out = at::empty_like(c.x);
  const auto acc = acc_type(x.scalar_type());
  c.mean = at::empty({}, x.options().dtype(acc));
  c.rstd = at::empty({}, x.options().dtype(acc));
  p.x = c.x.const_data_ptr();
  p.out = c.out.data_ptr();
  p.mean = c.mean.data_ptr();
  p.rstd = c.rstd.data_ptr();
  p.n = x.numel();
  p.shift_mean = shift_mean;
  p.unbiased = unbiased;
  p.eps = eps;
  return c;
}

}  // namespace fastrlhf::ops
