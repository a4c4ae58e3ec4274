// CUDA kernels for token_logprobs (math in ../token_logprobs.h). One block per row: a max pass
// and an exp-sum pass over the row (the second read mostly hits L2), block reductions in a
// fixed order; the backward writes dlogits in one grid-stride pass per row.
#include "../token_logprobs.h"
#include "common.cuh"

namespace fastrlhf::kernels::token_logprobs {
namespace {

constexpr int kThreads = 512;

template <typename S>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ A smem[32];
  const int64_t i = blockIdx.x;
  const S* x = static_cast<const S*>(p.logits) + i * p.V;
  const A inv_t = A(p.inv_temperature);
  const int64_t tok = p.tokens[i];
  FRL_DEVICE_CHECK(tok >= 0 && tok < p.V, "fastrlhf.token_logprobs: token out of range");

  A m = A(-INFINITY);
  bool nan = false;
  for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
    const A v = cuda::load<A>(x + j) * inv_t;
    nan |= v != v;
    m = fmax(m, v);
  }
  m = cuda::block_max(m, smem);
  A s = 0, e = 0;
  for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
    const ExpTerm<A> t = exp_term(cuda::load<A>(x + j) * inv_t, m);
    s += t.ex;
    e += t.ex_d;
  }
  s = cuda::block_sum(s, smem);
  e = cuda::block_sum(e, smem);
  // fmax drops NaN; make a NaN anywhere in the row poison the row, as on the CPU
  const bool any_nan = __syncthreads_or(nan);
  if (threadIdx.x == 0) {
    RowResult<A> r = finalize(m, s, e, cuda::load<A>(x + tok) * inv_t);
    if (any_nan) r = RowResult<A>{A(NAN), A(NAN), A(NAN), A(NAN)};
    static_cast<A*>(p.row_stats)[2 * i] = r.max;
    static_cast<A*>(p.row_stats)[2 * i + 1] = r.log_sum;
    static_cast<A*>(p.logprobs)[i] = r.logprob;
    static_cast<A*>(p.entropy)[i] = r.entropy;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams p) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t i = blockIdx.x;
  const S* x = static_cast<const S*>(p.logits) + i * p.V;
  S* dx = static_cast<S*>(p.grad_logits) + i * p.V;
  const A inv_t = A(p.inv_temperature);
  const A g = p.grad_logprobs ? static_cast<const A*>(p.grad_logprobs)[i] : A(0);
  const A h = p.grad_entropy ? static_cast<const A*>(p.grad_entropy)[i] : A(0);
  const A m = static_cast<const A*>(p.row_stats)[2 * i];
  const A log_s = static_cast<const A*>(p.row_stats)[2 * i + 1];
  const A H = static_cast<const A*>(p.entropy)[i];
  const int64_t tok = p.tokens[i];
  const bool nan_row = log_s != log_s;  // all -inf or a NaN: NaN gradient, as log_softmax's (and the CPU's)
  for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
    const A d = grad_element(cuda::load<A>(x + j) * inv_t, m, log_s, H, g, h) + (j == tok ? g : A(0));
    cuda::store(dx + j, nan_row ? A(NAN) : d * inv_t);
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    forward_kernel<decltype(s)><<<unsigned(p.N), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_cuda(const BackwardParams& p, DType dtype, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    backward_kernel<decltype(s)><<<unsigned(p.N), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::token_logprobs
