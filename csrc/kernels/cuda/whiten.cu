// CUDA kernels for whiten (math in ../whiten.h). A fixed grid of kBlocks blocks (fewer for
// small inputs) and three launches on one stream, no host synchronization:
//   1. partial_sums:  block j sums (x, count) over its grid-stride elements -> ws[j]
//   2. partial_sq:    every block reduces ws[0..nb) to the mean (same order in every block),
//                     then sums (x - mean)^2 over its elements -> ws2[j]
//   3. finalize:      every block reduces ws2 to the variance and writes its outputs;
//                     block 0 also writes mean and rstd.
// The reduction order depends only on n: deterministic.
#include "../whiten.h"
#include "common.cuh"

namespace fastrlhf::kernels::whiten {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 512;

int num_blocks(int64_t n) {
  const int64_t want = (n + kThreads * 8 - 1) / (kThreads * 8);
  return int(want < 1 ? 1 : (want > kMaxBlocks ? kMaxBlocks : want));
}

// Sums of x are fp64 for every dtype: equal inputs then give a mean exactly equal to them (the
// sum of n equal fp32 values is exact in fp64) and deviations of exactly 0, where an fp32 sum
// rounds and whitening would blow the rounding up into noise of ~1e-3.
template <typename A>
struct Workspace {
  double* sum;  // [nb]
  A* count;     // [nb]
  A* sq;        // [nb]
};

template <typename A>
Workspace<A> carve(void* ws, int nb) {
  double* sum = static_cast<double*>(ws);
  A* rest = reinterpret_cast<A*>(sum + nb);
  return Workspace<A>{sum, rest, rest + nb};
}

// Sum of the nb partials, by every thread of the block (identical result in every block).
template <typename A>
__device__ A reduce_partials(const A* part, int nb, A* smem) {
  A v = 0;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) v += part[i];
  return cuda::block_sum(v, smem);
}

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads) partial_sums(Params p, Workspace<A> ws) {
  __shared__ A smem[32];
  __shared__ double dsmem[32];
  const S* x = static_cast<const S*>(p.x);
  double sum = 0;
  A cnt = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const bool valid = p.mask ? p.mask[i] != 0 : true;
    sum += valid ? double(cuda::load<A>(x + i)) : 0.0;
    cnt += valid ? A(1) : A(0);
  }
  sum = cuda::block_sum(sum, dsmem);
  cnt = cuda::block_sum(cnt, smem);
  if (threadIdx.x == 0) ws.sum[blockIdx.x] = sum, ws.count[blockIdx.x] = cnt;
}

template <typename A>
__device__ A mean_of(const Workspace<A>& ws, int nb, A* smem, A& count) {
  __shared__ double dsmem[32];
  const double sum = reduce_partials(ws.sum, nb, dsmem);
  count = reduce_partials(ws.count, nb, smem);
  return count > A(0) ? A(sum / double(count)) : A(0);
}

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads) partial_sq(Params p, Workspace<A> ws) {
  __shared__ A smem[32];
  A count;
  const A mean = mean_of(ws, gridDim.x, smem, count);
  const S* x = static_cast<const S*>(p.x);
  A sq = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const bool valid = p.mask ? p.mask[i] != 0 : true;
    const A dv = cuda::load<A>(x + i) - mean;
    sq += valid ? dv * dv : A(0);
  }
  sq = cuda::block_sum(sq, smem);
  if (threadIdx.x == 0) ws.sq[blockIdx.x] = sq;
}

template <typename S, typename A>
__global__ void __launch_bounds__(kThreads) finalize(Params p, Workspace<A> ws) {
  __shared__ A smem[32];
  A count;
  const A mean = mean_of(ws, gridDim.x, smem, count);
  const A rstd = rstd_from(reduce_partials(ws.sq, gridDim.x, smem), count, p.unbiased, A(p.eps));
  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const bool valid = p.mask ? p.mask[i] != 0 : true;
    cuda::store(out + i, apply(cuda::load<A>(x + i), valid, mean, rstd, p.shift_mean));
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *static_cast<A*>(p.mean) = mean;
    *static_cast<A*>(p.rstd) = rstd;
  }
}

}  // namespace

int64_t workspace_bytes(int64_t /*n*/) { return int64_t(3) * kMaxBlocks * int64_t(sizeof(double)); }

cudaError_t launch_cuda(const Params& p, DType dtype, void* workspace, cudaStream_t stream) {
  const int nb = num_blocks(p.n);
  return cuda::dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    using A = typename cuda::AccOf<S>::type;
    const Workspace<A> ws = carve<A>(workspace, nb);
    partial_sums<S, A><<<nb, kThreads, 0, stream>>>(p, ws);
    partial_sq<S, A><<<nb, kThreads, 0, stream>>>(p, ws);
    finalize<S, A><<<nb, kThreads, 0, stream>>>(p, ws);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::whiten
