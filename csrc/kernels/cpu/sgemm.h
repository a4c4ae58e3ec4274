// fp32 GEMM building blocks for AVX-512 targets: a register-blocked micro-kernel and the packing
// routines around it, for kernels that lay out their own matrix products (the
// linear_token_logprobs tiles). Compiled where the build targets AVX-512 (FASTRLHF_CPU_ARCH=native
// on such a CPU). What it buys end to end: the linear_token_logprobs rows of
// bench/results/token_logprobs-cpu.json (kernel vs the eager MKL composition, same run).
//
// tile<R>: C[R x 32] (=|+=) sum_k A(i, k) B(k, j) with A(i, k) = a[k * a_k + i] (R consecutive
// values per k: a packed strip has a_k = R, a row-major matrix read as its transpose has
// a_k = its row stride) and B(k, j) = b[k * b_k + j] (32 consecutive values per k, a packed strip
// with b_k = 32). 2R zmm accumulators; per k one broadcast of A per row and two vector loads of B.
// Each C entry is one sum over k in order, so results depend only on the shapes.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FASTRLHF_SGEMM_AVX512 1

namespace fastrlhf::kernels::cpu::sgemm {

constexpr int kMr = 14;  // rows of A per strip (28 accumulators + 2 B vectors + 1 broadcast <= 32 zmm)
constexpr int kNr = 32;  // columns of B per strip

// Store masks for a strip of `cols` (<= 32) valid columns.
inline __mmask16 lo_mask(int64_t cols) { return cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u); }
inline __mmask16 hi_mask(int64_t cols) {
  return cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1u);
}

template <int R>
inline void tile(int64_t K, const float* __restrict a, int64_t a_k, const float* __restrict b, int64_t b_k, float* c,
                 int64_t ldc, bool accumulate, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) acc0[i] = _mm512_setzero_ps(), acc1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * b_k), b1 = _mm512_loadu_ps(b + k * b_k + 16);
    const float* ak = a + k * a_k;
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      const __m512 x = _mm512_set1_ps(ak[i]);
      acc0[i] = _mm512_fmadd_ps(x, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(x, b1, acc1[i]);
    }
  }
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc0[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), acc0[i]);
      acc1[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), acc1[i]);
    }
    _mm512_mask_storeu_ps(ci, m0, acc0[i]);
    _mm512_mask_storeu_ps(ci + 16, m1, acc1[i]);
  }
}

// tile<rows> for a runtime rows in [1, kMr] (0: nothing).
void tile_rows(int rows, int64_t K, const float* a, int64_t a_k, const float* b, int64_t b_k, float* c, int64_t ldc,
               bool accumulate, __mmask16 m0, __mmask16 m1);

// A strip from rows: dst[k * kMr + i] = src[i * ld + k] for i < rows, k < K (rows < kMr: lanes
// rows..kMr-1 may be zero-filled, inside the strip's K * kMr floats, and are never read).
void pack_a_rows(const float* src, int64_t ld, int rows, int64_t K, float* dst);
// B strip from rows: dst[k * kNr + j] = src[k * ld + j] for j < cols, 0 for cols <= j < kNr.
void pack_b_rows(const float* src, int64_t ld, int64_t cols, int64_t K, float* dst);
// B strip from the transpose: dst[k * kNr + j] = src[j * ld + k] for j < cols, 0 beyond.
void pack_b_transposed(const float* src, int64_t ld, int64_t cols, int64_t K, float* dst);

}  // namespace fastrlhf::kernels::cpu::sgemm

#endif
