// CUDA kernels for td_targets and q_update (math in ../td_targets.h). td_targets: one warp per
// row (max over actions by lane strides + butterfly max); q_update: a grid-stride copy with the
// taken action's entry updated. Bad actions trip FRL_DEVICE_CHECK (like torch.gather).
#include "../td_targets.h"
#include "common.cuh"

namespace fastrlhf::kernels::td_targets {
namespace {

constexpr int kWarps = 8;

template <typename A>
__device__ __forceinline__ A warp_nan_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename S>
__global__ void __launch_bounds__(kWarps * 32) td_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= p.n) return;
  const int lane = threadIdx.x & 31;
  const bool done = p.dones ? p.dones[i] != 0 : false;
  const int64_t na = p.num_actions;
  const S* row = static_cast<const S*>(p.next_q) + i * na;
  A next = 0;
  if (!done) {
    if (p.next_actions) {
      const int64_t a = p.next_actions[i];
      FRL_DEVICE_CHECK(a >= 0 && a < na, "fastrlhf.td_targets: next_actions out of range");
      next = cuda::load<A>(row + a);
    } else {
      A m = -INFINITY;
      for (int64_t a = lane; a < na; a += 32) m = nan_max(m, cuda::load<A>(row + a));
      next = warp_nan_max(m);
    }
  }
  if (lane == 0) {
    const A r = cuda::load<A>(static_cast<const S*>(p.rewards) + i);
    cuda::store(static_cast<S*>(p.out) + i, target(r, next, done, A(p.gamma)));
  }
}

template <typename S>
__global__ void q_update_kernel(QUpdateParams p) {
  using A = typename cuda::AccOf<S>::type;
  const S* q = static_cast<const S*>(p.q);
  S* out = static_cast<S*>(p.out);
  const int64_t total = p.n * p.num_actions;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = j / p.num_actions, a = j % p.num_actions;
    const int64_t taken = p.actions[i];
    FRL_DEVICE_CHECK(taken >= 0 && taken < p.num_actions, "fastrlhf.q_update: actions out of range");
    if (a == taken) {
      cuda::store(out + j,
                  updated(cuda::load<A>(q + j), cuda::load<A>(static_cast<const S*>(p.targets) + i), A(p.alpha)));
    } else {
      out[j] = q[j];
    }
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    td_kernel<decltype(s)><<<cuda::ceil_div(p.n, kWarps), kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_q_update_cuda(const QUpdateParams& p, DType dtype, cudaStream_t stream) {
  const int64_t total = p.n * p.num_actions;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + 255) / 256;
  return cuda::dispatch(dtype, [&](auto s) {
    q_update_kernel<decltype(s)><<<unsigned(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::td_targets
