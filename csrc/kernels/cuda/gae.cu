// CUDA kernel for gae / discounted_returns (math in ../gae.h).
//
// One block per row. Thread i owns the contiguous steps [i*L, (i+1)*L) of its row.
//   1. each thread folds its steps (right to left) into one affine map;
//   2. the block scans the maps right to left (Hillis-Steele in shared memory), giving each
//      thread the state entering its chunk from the right;
//   3. each thread replays its steps from that state and writes the outputs.
// A long row thus runs as blockDim.x short chains instead of one latency-bound chain, and the
// scan order depends only on T, so results are deterministic.
#include "../gae.h"
#include "common.cuh"

namespace fastrlhf::kernels::gae {
namespace {

template <typename S, int kThreads>
__global__ void __launch_bounds__(kThreads) gae_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ Map<A> maps[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t T = p.T;
  const int64_t L = (T + kThreads - 1) / kThreads;
  const int64_t t0 = int64_t(threadIdx.x) * L < T ? int64_t(threadIdx.x) * L : T;
  const int64_t t1 = t0 + L < T ? t0 + L : T;
  const int64_t row = b * T;
  const S* r = static_cast<const S*>(p.rewards) + row;
  const S* v = p.values ? static_cast<const S*>(p.values) + row : nullptr;
  const uint8_t* m = p.mask ? p.mask + row : nullptr;
  const uint8_t* d = p.dones ? p.dones + row : nullptr;
  const A gamma = A(p.gamma), gamma_lam = A(p.gamma * p.lam);

  // 1. this thread's map
  Map<A> mine = identity_map<A>();
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const A vt = v ? cuda::load<A>(v + t) : A(0);
    mine = compose(step_map(cuda::load<A>(r + t), vt, m ? m[t] != 0 : true, d ? d[t] != 0 : false, gamma, gamma_lam),
                   mine);
  }
  // 2. inclusive right-to-left scan: maps[i] <- map of chunks i .. kThreads-1
  maps[threadIdx.x] = mine;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    Map<A> acc = maps[threadIdx.x];
    if (threadIdx.x + off < kThreads) acc = compose(acc, maps[threadIdx.x + off]);
    __syncthreads();
    maps[threadIdx.x] = acc;
    __syncthreads();
  }
  State<A> s{A(0), p.last_values ? cuda::load<A>(static_cast<const S*>(p.last_values) + b) : A(0)};
  if (threadIdx.x + 1 < kThreads) s = apply(maps[threadIdx.x + 1], s);

  // 3. replay with the true carry-in
  S* adv = static_cast<S*>(p.advantages) + row;
  S* ret = p.returns ? static_cast<S*>(p.returns) + row : nullptr;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const A vt = v ? cuda::load<A>(v + t) : A(0);
    const bool valid = m ? m[t] != 0 : true;
    const A a = step(s, cuda::load<A>(r + t), vt, valid, d ? d[t] != 0 : false, gamma, gamma_lam);
    cuda::store(adv + t, a);
    if (ret) cuda::store(ret + t, valid ? a + vt : A(0));
  }
}

template <typename S, int kThreads>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  gae_kernel<S, kThreads><<<unsigned(p.B), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    // about 4..16 steps per thread: short chains, and enough steps to amortize the scan
    if (p.T <= 512) return launch<S, 64>(p, stream);
    if (p.T <= 2048) return launch<S, 128>(p, stream);
    if (p.T <= 8192) return launch<S, 512>(p, stream);
    return launch<S, 1024>(p, stream);
  });
}

}  // namespace fastrlhf::kernels::gae
