// Torch-side helpers for the CUDA glue files: device guard, current stream, error checks.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "utils.h"

namespace fastrlhf::ops {

// Launch on t's device and its current stream (so callers' stream semantics hold).
struct CudaContext {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit CudaContext(const Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
};

inline void check_cuda(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "fastrlhf.", op, ": CUDA error: ", cudaGetErrorString(e));
}

}  // namespace fastrlhf::ops
