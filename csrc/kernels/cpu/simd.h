// Explicit 512-bit float vectors for CPU kernels whose hot loop the auto-vectorizer handles badly
// (horizontal sums: GCC scalarizes `omp simd` reductions into 16 dependent adds per value).
// GCC/Clang vector extensions: AVX-512 registers where the target has them, pairs of AVX2
// registers (or narrower) elsewhere. No intrinsics, no target checks.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastrlhf::kernels::cpu {

typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[i] = sum of the 16 lanes of v_i, for four vectors at once: a shuffle/add tree (8 shuffles,
// 4 adds) instead of 60 scalar adds. Deterministic (a fixed tree).
inline void hsum4(f32x16 a, f32x16 b, f32x16 c, f32x16 d, float* out) {
  // lanes 0-7: a's halves added, 8-15: b's; likewise c, d
  const f32x16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const f32x16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes 4i..4i+3: four partial sums of vector i (a, b, c, d)
  const f32x16 q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                   __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // lanes 2i, 2i+1: two partial sums of vector i
  const f32x16 h = __builtin_shufflevector(q, q, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                   __builtin_shufflevector(q, q, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  const f32x16 s = __builtin_shufflevector(h, h, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
                   __builtin_shufflevector(h, h, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
  out[0] = s[0], out[1] = s[1], out[2] = s[2], out[3] = s[3];
}

}  // namespace fastrlhf::kernels::cpu
