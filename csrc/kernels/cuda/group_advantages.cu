// CUDA kernel for group_advantages (math in ../group_advantages.h): one warp per group, lanes
// stride over the group, butterfly shuffles for the sums (fixed order: deterministic).
#include "../group_advantages.h"
#include "common.cuh"

namespace fastrlhf::kernels::group_advantages {
namespace {

constexpr int kWarps = 8;

template <typename S>
__global__ void __launch_bounds__(kWarps * 32) group_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t g = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (g >= p.n_groups) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  const int64_t G = p.group_size;
  const S* x = static_cast<const S*>(p.scores) + g * G;
  S* out = static_cast<S*>(p.out) + g * G;

  const A x0 = cuda::load<A>(x);  // shift: statistics of x - x0
  A sum = 0;
  for (int64_t i = lane; i < G; i += 32) sum += cuda::load<A>(x + i) - x0;
  const A mean = cuda::warp_sum(sum) / A(G);
  A sq = 0;
  for (int64_t i = lane; i < G; i += 32) {
    const A dv = (cuda::load<A>(x + i) - x0) - mean;
    sq += dv * dv;
  }
  sq = cuda::warp_sum(sq);
  const A scale = output_scale(sq, G, p.normalize_std, p.leave_one_out, A(p.eps));
  for (int64_t i = lane; i < G; i += 32) cuda::store(out + i, ((cuda::load<A>(x + i) - x0) - mean) * scale);
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n_groups == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    group_kernel<decltype(s)><<<cuda::ceil_div(p.n_groups, kWarps), kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::group_advantages
