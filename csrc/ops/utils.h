// Torch-side helpers shared by the op glue files (csrc/ops/*): argument checks, dtype mapping,
// the ParallelFor handed to CPU launchers, and launcher status handling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "kernels/common.h"
#include "kernels/cpu/parallel.h"

namespace fastrlhf::ops {

using at::Tensor;
namespace k = fastrlhf::kernels;

inline k::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kDouble: return k::DType::kFloat64;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastrlhf: unsupported dtype ", t);
  }
}

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn,
              "fastrlhf: ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
  (void)to_kernel_dtype(t.scalar_type());
}

inline void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastrlhf: ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "fastrlhf: ", name, " must be on ", ref.device(),
              " like ", ref_name, ", got ", t.device());
}

inline void check_dtype(const Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "fastrlhf: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

// Optional bool tensor with the shape/device of `ref` -> contiguous uint8 data pointer or null.
inline const uint8_t* bool_ptr(const std::optional<Tensor>& t, Tensor& holder, const Tensor& ref,
                               const char* name, const char* ref_name) {
  if (!t.has_value()) return nullptr;
  check_same(*t, ref, name, ref_name);
  check_dtype(*t, at::kBool, name);
  holder = t->contiguous();
  return reinterpret_cast<const uint8_t*>(holder.const_data_ptr());
}

// torch's intra-op thread pool as a kernels::cpu::ParallelFor.
inline k::cpu::ParallelFor torch_parallel_for() {
  return [](int64_t n, int64_t grain, const k::cpu::Body& body) {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { body(b, e); });
  };
}

inline void check_status(k::Status s, const char* op) {
  TORCH_CHECK(s != k::Status::kIndexOutOfRange, "fastrlhf.", op, ": an index is out of range");
  TORCH_CHECK(s == k::Status::kOk, "fastrlhf.", op, ": kernel failed (status ", int(s), ")");
}

}  // namespace fastrlhf::ops
