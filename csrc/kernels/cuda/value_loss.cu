// CUDA kernels for value_loss (math in ../value_loss.h): per-row block reductions (fp64, fixed
// order), a one-block device finalize, an elementwise backward. No host synchronization.
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

constexpr int kFinalizeThreads = 256;

// One block: batch counts, the batch-wide shift (first non-empty row), row weights and the row
// terms reduced in a fixed order.
template <typename S>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ double smem[32];
  const double* part = p.partials;
  double n_tok = 0, n_seq = 0, neg_first = -HUGE_VAL;
  for (int64_t b = threadIdx.x; b < p.B; b += kFinalizeThreads) {
    const double len = part[b * kNumPartials + kLen];
    n_tok += len;
    n_seq += len > 0 ? 1 : 0;
    if (len > 0 && neg_first == -HUGE_VAL) neg_first = -double(b);  // this thread's first
  }
  const loss_agg::BatchCounts n{cuda::block_sum(n_tok, smem), cuda::block_sum(n_seq, smem)};
  neg_first = cuda::block_max(neg_first, smem);
  double c_r = 0, c_res = 0;
  if (neg_first > -HUGE_VAL) {
    const double* first = part + int64_t(-neg_first) * kNumPartials;
    c_r = first[kRShift], c_res = first[kResShift];
  }
  double t[kNumTerms] = {}, rt[kNumTerms];
  for (int64_t b = threadIdx.x; b < p.B; b += kFinalizeThreads) {
    const double* row = part + b * kNumPartials;
    const double w = loss_agg::row_weight_of(p.agg, row[kLen], n);
    static_cast<A*>(p.row_weight)[b] = A(w);
    row_terms(row, w, c_r, c_res, rt);
    for (int k = 0; k < kNumTerms; ++k) t[k] += rt[k];
  }
  for (int k = 0; k < kNumTerms; ++k) t[k] = cuda::block_sum(t[k], smem);
  if (threadIdx.x == 0) write_outputs<A>(p, t, c_r, n.n_tok);
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
    finalize_kernel<S><<<1, kFinalizeThreads, 0, stream>>>(p);
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
