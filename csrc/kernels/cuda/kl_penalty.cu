// CUDA launcher for kl_penalty (math in ../kl_penalty.h): a grid-stride elementwise kernel.
#include "../kl_penalty.h"
#include "common.cuh"

namespace fastrlhf::kernels::kl_penalty {
namespace {

template <typename S>
__global__ void kl_kernel(Params p, bool backward) {
  using A = typename cuda::AccOf<S>::type;
  const S* lp = static_cast<const S*>(p.logprobs);
  const S* ref = static_cast<const S*>(p.ref);
  S* out = static_cast<S*>(p.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * blockDim.x) {
    const A a = cuda::load<A>(lp + i), b = cuda::load<A>(ref + i);
    const A v = backward ? cuda::load<A>(static_cast<const S*>(p.grad) + i) * grad(p.estimator, a, b)
                         : value(p.estimator, a, b);
    cuda::store(out + i, v);
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, bool backward, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int64_t blocks = (p.n + 255) / 256;
  return cuda::dispatch(dtype, [&](auto s) {
    kl_kernel<decltype(s)><<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(p, backward);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::kl_penalty
