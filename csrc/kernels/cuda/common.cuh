// CUDA-side helpers shared by the kernels in this folder: storage types, loads/stores to the
// accumulator type, dtype dispatch and deterministic warp/block reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "../common.h"

// A device-side check that is never compiled out (assert() is, under the Release build's
// -DNDEBUG): prints the message and traps, which surfaces on the host as a CUDA error at the next
// synchronization -- the behaviour of torch's own index checks (CUDA_KERNEL_ASSERT).
#define FRL_DEVICE_CHECK(cond, msg)               \
  do {                                            \
    if (!(cond)) {                                \
      printf("fastrlhf device check: %s\n", msg); \
      __trap();                                   \
    }                                             \
  } while (0)

namespace fastrlhf::kernels::cuda {

template <typename A> __device__ __forceinline__ A load(const float* p) { return A(*p); }
template <typename A> __device__ __forceinline__ A load(const double* p) { return A(*p); }
template <typename A> __device__ __forceinline__ A load(const __half* p) { return A(__half2float(*p)); }
template <typename A> __device__ __forceinline__ A load(const __nv_bfloat16* p) { return A(__bfloat162float(*p)); }
template <typename A> __device__ __forceinline__ void store(float* p, A v) { *p = float(v); }
template <typename A> __device__ __forceinline__ void store(double* p, A v) { *p = double(v); }
template <typename A> __device__ __forceinline__ void store(__half* p, A v) { *p = __float2half_rn(float(v)); }
template <typename A> __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
  *p = __float2bfloat16_rn(float(v));
}

template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Calls f(S{}) with the CUDA storage type S of `dtype` and returns its result.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: break;
  }
  return f(float{});
}

// Butterfly sum over a warp: every lane gets the total, in the same order on every run.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the total.
// `smem` holds >= 32 values. Fixed reduction tree: deterministic.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < n_warps ? smem[lane] : A(0);
  return warp_sum(v);
}

// Block-wide max (NaN-ignoring, like fmax) under the same rules as block_sum.
template <typename A>
__device__ __forceinline__ A block_max(A v, A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < n_warps ? smem[lane] : A(-INFINITY);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

}  // namespace fastrlhf::kernels::cuda
