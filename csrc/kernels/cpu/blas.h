// Matrix products for CPU kernels, injected by the torch glue like ParallelFor (kernels include
// no torch header): the glue passes ATen's CPU BLAS (MKL / OpenBLAS where torch has one), so
// kernels get library-quality GEMM micro-kernels on tiles without linking a BLAS themselves.
#pragma once

#include <cstdint>
#include <functional>

namespace fastrlhf::kernels::cpu {

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X^T when trans_X. A is [m, k]
// (or [k, m] when trans_a) with row stride lda; likewise B [k, n] / [n, k] with ldb; C with ldc.
template <typename T>
using Gemm = std::function<void(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc)>;

struct Blas {
  Gemm<float> sgemm;
  Gemm<double> dgemm;
  template <typename T>
  const Gemm<T>& gemm() const {
    if constexpr (sizeof(T) == sizeof(double)) return dgemm;
    else return sgemm;
  }
};

}  // namespace fastrlhf::kernels::cpu
