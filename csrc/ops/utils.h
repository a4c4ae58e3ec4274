// Torch-side helpers shared by the op glue files (csrc/ops/*): argument checks, dtype mapping,
// the ParallelFor handed to CPU launchers, and launcher status handling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/common.h"
#include "kernels/cpu/blas.h"
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

// The accumulator dtype of a storage dtype: fp64 for fp64, fp32 otherwise (kernels/common.h Acc).
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn, "fastrlhf: ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  (void)to_kernel_dtype(t.scalar_type());
}

inline void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastrlhf: ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "fastrlhf: ", name, " must be on ", ref.device(), " like ", ref_name,
              ", got ", t.device());
}

inline void check_dtype(const Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "fastrlhf: ", name, " must be ", want, ", got ", t.scalar_type());
}

// Optional bool tensor with the shape/device of `ref` -> contiguous uint8 data pointer or null.
inline const uint8_t* bool_ptr(const std::optional<Tensor>& t, Tensor& holder, const Tensor& ref, const char* name,
                               const char* ref_name) {
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

// The BLAS torch links (MKL on x86 wheels, OpenBLAS elsewhere) for kernels that multiply tiles
// (csrc/kernels/cpu/blas.h). Its Fortran sgemm_/dgemm_ are called directly when the torch
// library exports them (weak symbols: no load failure where it does not), else ATen's addmm on
// views of the buffers. Each call runs single-threaded (MKL: a thread-local setting; elsewhere
// inside an at::parallel_for region): the kernels parallelize over their own tiles, and a BLAS
// that splits one product over threads would round differently for another thread count.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

template <typename T>
k::cpu::Gemm<T> torch_gemm() {
  return [](bool ta, bool tb, int64_t m, int64_t n, int64_t kk, T alpha, const T* a, int64_t lda, const T* b,
            int64_t ldb, T beta, T* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (kk == 0) {  // C = beta C (BLAS would reject the leading dimensions of empty A / B)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
      return;
    }
    auto* fortran = [] {
      if constexpr (std::is_same_v<T, float>) return sgemm_;
      else return dgemm_;
    }();
    constexpr int64_t kMaxInt = 2147483647;
    if (fortran != nullptr && std::max({m, n, kk, lda, ldb, ldc}) <= kMaxInt) {
      // column-major BLAS: the row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T
      const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
      const int M = int(n), N = int(m), K = int(kk), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
      const int before = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
      fortran(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(before);
      return;
    }
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
      Tensor t = at::from_blob(const_cast<T*>(ptr), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
      return trans ? t.t() : t;
    };
    Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    C.addmm_(view(a, m, kk, lda, ta), view(b, kk, n, ldb, tb), beta, alpha);  // beta = 0 ignores C
  };
}

inline k::cpu::Blas torch_blas() { return k::cpu::Blas{torch_gemm<float>(), torch_gemm<double>()}; }

// Large CPU outputs are written once right after allocation, so first-touch page faults (and
// the kernel zeroing each 4 KiB page) can cost more than the op itself. Ask Linux for
// transparent huge pages on the buffer before it is touched: 512x fewer faults. A hint only
// (no-op where THP is off or the tensor is not on the CPU).
inline Tensor empty_like_output(const Tensor& like) {
  Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = out.nbytes();
  if (out.is_cpu() && bytes >= 16 * kHuge) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(out.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(out.data_ptr()) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

inline void check_status(k::Status s, const char* op) {
  TORCH_CHECK(s != k::Status::kIndexOutOfRange, "fastrlhf.", op, ": an index is out of range");
  TORCH_CHECK(s == k::Status::kOk, "fastrlhf.", op, ": kernel failed (status ", int(s), ")");
}

}  // namespace fastrlhf::ops
