// CUDA kernels for preference_loss (math in ../preference_loss.h): one block reduces the pairs
// (fp64, fixed order: deterministic, no host sync); the backward is elementwise.
#include "../preference_loss.h"
#include "common.cuh"

namespace fastrlhf::kernels::preference_loss {
namespace {

constexpr int kThreads = 256;

// Pair i's inputs (the optional ones 0 when absent).
template <typename A, typename S>
__device__ __forceinline__ A at(const void* x, int64_t i) {
  return x ? cuda::load<A>(static_cast<const S*>(x) + i) : A(0);
}

template <typename A, typename S>
__device__ __forceinline__ Pair<A> pair_at(const Params& p, int64_t i, A& chosen_reward) {
  const A c = at<A, S>(p.chosen, i), rc = at<A, S>(p.ref_chosen, i);
  chosen_reward = c - rc;
  return pair<A>(p, c, at<A, S>(p.rejected, i), rc, at<A, S>(p.ref_rejected, i), at<A, S>(p.margin, i));
}

template <typename S>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ double smem[32];
  double loss = 0, s[kNumStats] = {};
  for (int64_t i = threadIdx.x; i < p.B; i += kThreads) {
    A cr;
    const Pair<A> q = pair_at<A, S>(p, i, cr);
    add_pair(p, q, cr, loss, s);
  }
  const double inv_b = p.B > 0 ? 1.0 / double(p.B) : 0.0;
  loss = cuda::block_sum(loss, smem);
  if (threadIdx.x == 0) *static_cast<A*>(p.loss) = A(p.B > 0 ? loss * inv_normalizer(p) : 0.0);
  for (int k = 0; k < kNumStats; ++k) {
    const double total = cuda::block_sum(s[k], smem);
    if (threadIdx.x == 0) static_cast<A*>(p.stats)[k] = A(total * inv_b);
  }
}

template <typename S>
__global__ void backward_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  const A scale = A(double(*static_cast<const A*>(p.grad_loss)) * inv_normalizer(p));
  S* g = static_cast<S*>(p.grad_chosen);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.B; i += int64_t(gridDim.x) * blockDim.x) {
    A cr;
    cuda::store(g + i, scale * pair_at<A, S>(p, i, cr).grad);
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  return cuda::dispatch(dtype, [&](auto s) {
    forward_kernel<decltype(s)><<<1, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const int64_t blocks = (p.B + 255) / 256;
  return cuda::dispatch(dtype, [&](auto s) {
    backward_kernel<decltype(s)><<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::preference_loss
