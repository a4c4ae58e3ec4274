// CUDA kernels for value_loss (math in ../value_loss.h): per-row block reductions (fp64, fixed
// order), a single-thread device finalize, an elementwise backward. No host synchronization.
#include "../value_loss.h"
#include "common.cuh"

namespace fastrlhf::kernels::value_loss {
namespace {

constexpr int kThreads = 128;

template <typename S>
__global__ void __launch_bounds__(kThreads) rows_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ double smem[32];
  const int64_t b = blockIdx.x, o = b * p.T;
  const S* v = static_cast<const S*>(p.values) + o;
  const S* old = static_cast<const S*>(p.old_values) + o;
  const S* ret = static_cast<const S*>(p.returns) + o;
  const uint8_t* m = p.mask + o;
  // first valid step (block-wide min, as a max of negated indices): its return and residual
  // shift the row's sums (see value_loss.h)
  double neg_first = -HUGE_VAL;
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    if (m[t]) {
      neg_first = -double(t);
      break;
    }
  }
  neg_first = cuda::block_max(neg_first, smem);
  const bool any = neg_first > -HUGE_VAL;
  const int64_t t0 = any ? int64_t(-neg_first) : 0;
  const A shift_r = any ? cuda::load<A>(ret + t0) : A(0);
  const A shift_res = any ? cuda::load<A>(ret + t0) - cuda::load<A>(v + t0) : A(0);
  double s[kNumPartials] = {};
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    if (!m[t]) continue;
    const A vv = cuda::load<A>(v + t), r = cuda::load<A>(ret + t);
    const Token<A> k = token(vv, cuda::load<A>(old + t), r, A(p.clip));
    const double dr = double(r - shift_r), dres = double((r - vv) - shift_res);
    s[kLoss] += k.loss;
    s[kClip] += k.clipped;
    s[kR] += dr;
    s[kR2] += dr * dr;
    s[kRes] += dres;
    s[kRes2] += dres * dres;
    s[kV] += vv;
    s[kLen] += 1;
  }
  double* row = p.partials + b * kNumPartials;
  for (int k = 0; k < kNumPartials; ++k) {
    const double total = cuda::block_sum(s[k], smem);
    if (threadIdx.x == 0) row[k] = total;
  }
  if (threadIdx.x == 0) row[kRShift] = shift_r, row[kResShift] = shift_res;
}

template <typename S>
__global__ void finalize_kernel(Params p) {
  finalize<typename cuda::AccOf<S>::type>(p);
}

template <typename S>
__global__ void backward_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  const A g = *static_cast<const A*>(p.grad_loss);
  const int64_t n = p.B * p.T;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A w = g * static_cast<const A*>(p.row_weight)[i / p.T];
    const A d = token_grad(cuda::load<A>(static_cast<const S*>(p.values) + i),
                           cuda::load<A>(static_cast<const S*>(p.old_values) + i),
                           cuda::load<A>(static_cast<const S*>(p.returns) + i), A(p.clip));
    cuda::store(static_cast<S*>(p.grad_values) + i, p.mask[i] ? w * d : A(0));
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  return cuda::dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    if (p.B > 0) rows_kernel<S><<<unsigned(p.B), kThreads, 0, stream>>>(p);
    finalize_kernel<S><<<1, 1, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  const int64_t n = p.B * p.T;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  return cuda::dispatch(dtype, [&](auto s) {
    backward_kernel<decltype(s)><<<unsigned(blocks < 8192 ? blocks : 8192), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::value_loss
