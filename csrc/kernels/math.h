// Elementary functions shared by kernels. On the CPU, fast_exp is a branch-free polynomial the
// compiler vectorizes (std::exp is a scalar libm call); on CUDA it maps to the hardware path.
#pragma once

#include <bit>
#include <cstdint>

#include "common.h"

namespace fastrlhf::kernels {

// exp(x) for float, within ~2 ulp; exactly 0 for x < -87.3 (including -inf), NaN propagates.
// Cephes-style: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by bits.
FRL_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float xc = x > 88.0f ? 88.0f : (x < -88.0f ? -88.0f : x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick (floorf/roundf calls block vectorization)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
  const float out = y * scale;
  return x < -87.3f ? 0.0f : (x != x ? x : out);
#endif
}

FRL_HD double fast_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename A>
FRL_HD A log_acc(A x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

}  // namespace fastrlhf::kernels
