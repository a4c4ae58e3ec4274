// Explicit 512-bit float vectors for CPU kernels whose hot loop the auto-vectorizer handles badly
// (horizontal sums: GCC scalarizes `omp simd` reductions into 16 dependent adds per value).
// GCC/Clang vector extensions: AVX-512 registers where the target has them, pairs of AVX2
// registers (or narrower) elsewhere.
// One exception, behind FASTRLHF_SIMD_EXP (compiled for AVX-512 targets only): exp16(), the
// exponential the softmax-type kernels spend most of their time in. Kernels keep their portable
// loop (fast_exp, auto-vectorized) for other targets.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FASTRLHF_SIMD_EXP 1
#endif

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

#if defined(FASTRLHF_SIMD_EXP)
// exp(x) for 16 floats: fast_exp's range reduction and polynomial (../math.h, same results to
// rounding), with 2^n applied by vscalefps and n rounded by vrndscaleps -- about half the
// instructions GCC makes of the vectorized fast_exp. As fast_exp: x > 88 is clamped (finite),
// lanes with x < -87.3 (and -inf) are exactly 0, NaN propagates. `live` gets the lanes that are
// not below -87.3 (NaN lanes included), for masking terms like p * log p where p = 0.
inline __m512 exp16(__m512 x, __mmask16& live) {
  live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  // max/min return their second operand for a NaN: x stays NaN
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-88.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, y, n);
}

inline __m512 exp16(__m512 x) {
  __mmask16 live;
  return exp16(x, live);
}
#endif

}  // namespace fastrlhf::kernels::cpu
