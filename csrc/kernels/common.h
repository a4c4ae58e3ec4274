// Framework-free helpers shared by every kernel: host/device qualifiers, accumulator types,
// status codes and the 16-bit float storage types used by the CPU launchers.
// No torch header may be included anywhere under csrc/kernels/.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FRL_HD __host__ __device__ __forceinline__
#else
#define FRL_HD inline
#endif

namespace fastrlhf::kernels {

// Storage dtype tag passed from the torch glue to the launchers.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Launcher result. CPU launchers report bad *values* (e.g. an index out of range) through it;
// shapes and dtypes are validated by the glue before any launcher runs.
enum class Status : int { kOk = 0, kIndexOutOfRange = 1, kCudaError = 2 };

// Accumulator type: fp32 for 16/32-bit storage, fp64 for fp64 storage.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// sqrt for float and double accumulators on host and device.
template <typename A>
FRL_HD A sqrt_acc(A x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// ----------------------------------------------------------------------------------------
// 16-bit storage types for the CPU path (bit layout identical to c10::Half / c10::BFloat16,
// so the glue can reinterpret data pointers). Conversions round to nearest even.
// ----------------------------------------------------------------------------------------
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

inline float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // subnormal (or zero): man * 2^-24
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}
inline fp16_t to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};                 // nan
  if (u >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};                // overflow -> inf
  if (u < 0x38800000u) {                                                        // subnormal / zero
    // add 0.5 to move the value to the subnormal grid and let the FPU round to nearest even
    const float mag = bits_to_float(u) + 0.5f;
    return fp16_t{uint16_t(sign | (float_to_bits(mag) - 0x3f000000u))};
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to nearest even
  return fp16_t{uint16_t(sign | (u >> 13))};
}

// Uniform load/store between storage and accumulator types on the CPU.
template <typename A> inline A load(const float* p) { return A(*p); }
template <typename A> inline A load(const double* p) { return A(*p); }
template <typename A> inline A load(const bf16_t* p) { return A(to_float(*p)); }
template <typename A> inline A load(const fp16_t* p) { return A(to_float(*p)); }
template <typename A> inline void store(float* p, A v) { *p = float(v); }
template <typename A> inline void store(double* p, A v) { *p = double(v); }
template <typename A> inline void store(bf16_t* p, A v) { *p = to_bf16(float(v)); }
template <typename A> inline void store(fp16_t* p, A v) { *p = to_fp16(float(v)); }

// Calls f(S{}) with the CPU storage type S of `dtype` and returns its result.
template <typename F>
auto dispatch_cpu(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(fp16_t{});
    case DType::kBFloat16: return f(bf16_t{});
    case DType::kFloat32: break;
  }
  return f(float{});
}

}  // namespace fastrlhf::kernels
