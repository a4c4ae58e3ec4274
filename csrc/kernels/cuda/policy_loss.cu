// CUDA kernels for policy_loss (math in ../policy_loss.h): one block per row reduces its fp64
// partials in a fixed order; one block finalizes (row weights, loss, stats) on the device; the
// backward is elementwise. No host synchronization.
#include "../policy_loss.h"
#include "common.cuh"

namespace fastrlhf::kernels::policy_loss {
namespace {

constexpr int kThreads = 128;

template <typename S>
__global__ void __launch_bounds__(kThreads) rows_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ double smem[32];
  const int64_t b = blockIdx.x, o = b * p.T;
  const S* lp = static_cast<const S*>(p.logprobs) + o;
  const S* old = static_cast<const S*>(p.old_logprobs) + o;
  const S* adv = static_cast<const S*>(p.advantages) + o;
  const S* ref = p.ref_logprobs ? static_cast<const S*>(p.ref_logprobs) + o : nullptr;
  const S* ent = p.entropy ? static_cast<const S*>(p.entropy) + o : nullptr;
  const uint8_t* m = p.mask + o;
  double s[kNumPartials];
  init_partials(s);
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    if (!m[t]) continue;
    const A l = cuda::load<A>(lp + t), ol = cuda::load<A>(old + t);
    const A e = ent ? cuda::load<A>(ent + t) : A(0);
    add_token(s, token(p, l, ol, cuda::load<A>(adv + t), ref ? cuda::load<A>(ref + t) : l, e), e, l - ol);
  }
  double* row = p.partials + b * kNumPartials;
  for (int k = 0; k < kNumPartials; ++k) {
    const double v = k == kRatioMax ? cuda::block_max(s[k], smem) : cuda::block_sum(s[k], smem);
    if (threadIdx.x == 0) row[k] = v;
  }
}

constexpr int kFinalizeThreads = 256;

// One block: batch counts, row weights and the row terms reduced in a fixed order.
template <typename S>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ double smem[32];
  const double* part = p.partials;
  double n_tok = 0, n_seq = 0;
  for (int64_t b = threadIdx.x; b < p.B; b += kFinalizeThreads) {
    const double len = part[b * kNumPartials + kLen];
    n_tok += len;
    n_seq += len > 0 ? 1 : 0;
  }
  const loss_agg::BatchCounts n{cuda::block_sum(n_tok, smem), cuda::block_sum(n_seq, smem)};
  double t[kNumTerms] = {}, rt[kNumTerms];
  double ratio_max = -HUGE_VAL;
  for (int64_t b = threadIdx.x; b < p.B; b += kFinalizeThreads) {
    const double* row = part + b * kNumPartials;
    const double w = loss_agg::row_weight_of(p.agg, row[kLen], n);
    static_cast<A*>(p.row_weight)[b] = A(w);
    row_terms(row, w, rt);
    for (int k = 0; k < kNumTerms; ++k) t[k] += rt[k];
    ratio_max = fmax(ratio_max, row[kRatioMax]);
  }
  for (int k = 0; k < kNumTerms; ++k) t[k] = cuda::block_sum(t[k], smem);
  ratio_max = cuda::block_max(ratio_max, smem);
  if (threadIdx.x == 0) write_outputs<A>(p, t, ratio_max, n.n_tok);
}

template <typename S>
__global__ void backward_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  const A g = *static_cast<const A*>(p.grad_loss);
  const int64_t n = p.B * p.T;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A w = g * static_cast<const A*>(p.row_weight)[i / p.T];
    const bool valid = p.mask[i] != 0;
    const A l = cuda::load<A>(static_cast<const S*>(p.logprobs) + i);
    const A r = p.ref_logprobs ? cuda::load<A>(static_cast<const S*>(p.ref_logprobs) + i) : l;
    const A d = token_grad(p, l, cuda::load<A>(static_cast<const S*>(p.old_logprobs) + i),
                           cuda::load<A>(static_cast<const S*>(p.advantages) + i), r);
    cuda::store(static_cast<S*>(p.grad_logprobs) + i, valid ? w * d : A(0));
    if (p.grad_entropy) cuda::store(static_cast<S*>(p.grad_entropy) + i, valid ? -w * A(p.entropy_coef) : A(0));
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return unsigned(blocks < 8192 ? (blocks < 1 ? 1 : blocks) : 8192);
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  return cuda::dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    if (p.B > 0) rows_kernel<S><<<unsigned(p.B), kThreads, 0, stream>>>(p);
    finalize_kernel<S><<<1, kFinalizeThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.B * p.T == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    backward_kernel<decltype(s)><<<grid_for(p.B * p.T), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::policy_loss
