// Split-KV decode kernels and their launch (see attention_common.cuh for the folder's layout).
//
// Decode (split-KV, CUDA cores, every dtype): one block (8 warps) per (sequence, kv head, key
// chunk) covering the rows of all query heads of the group, so each K/V row of the chunk is read
// from memory once per group. Rows are spread over the warps; with fewer rows than warps, several
// warps share a row, each taking a slice of the chunk, and their states are combined in shared
// memory in slice order. Chunk results go to fp32 (fp64) workspaces; a merge kernel combines
// them by log-sum-exp in chunk order.
#include "attention_simple.cuh"

namespace fastrlhf::kernels::attention::detail {
namespace simple {

// grid (sequences x n_splits, Hkv), kWarps warps. Rows r = (query head hk * group + r / q_len,
// query i = r % q_len) of the group. With nr >= kWarps rows, warp w takes rows w, w + kWarps, ...
// over the whole chunk; with fewer, each row gets kWarps / nr warps that take consecutive slices
// of the chunk and are combined in slice order.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) decode_kernel(const Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ A sh_acc[kWarps][NPL * 32];
  __shared__ A sh_m[kWarps], sh_l[kWarps];
  const int64_t n_splits = p.n_splits;
  const int64_t b = blockIdx.x / n_splits, split = blockIdx.x % n_splits, hk = blockIdx.y;
  const Seq sq = p.seqs[b];
  if (sq.q_len == 0) return;
  const int D = int(p.D);
  const int64_t group = p.H / p.Hkv, nr = group * sq.q_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // this block's chunk of the keys any row sees, in multiples of 32 keys
  const int64_t k_lo = sq.k_begin, k_hi = visible_end(sq, sq.q_len - 1, p.causal);
  const int64_t span = max64(0, k_hi - k_lo);
  const int64_t chunk = ((span + n_splits - 1) / n_splits + 31) / 32 * 32;
  const int64_t c0 = k_lo + split * chunk, c1 = min64(k_hi, c0 + chunk);
  const int wpr = nr >= kWarps ? 1 : int(kWarps / nr);  // warps per row
  const int slots = kWarps / wpr;                       // rows in flight
  const int slot = warp % slots, slice = warp / slots;  // slice < wpr unless warp >= slots * wpr (idle)
  const int64_t sub = ((max64(0, c1 - c0) + wpr - 1) / wpr + 31) / 32 * 32;
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;

  for (int64_t r0 = 0; r0 < nr; r0 += slots) {  // same trip count in every warp
    const int64_t r = r0 + slot;
    const bool active = r < nr && slice < wpr;
    const int64_t h = hk * group + r / sq.q_len, i = r % sq.q_len;
    RowState<A, NPL> st;
    st.init();
    if (active) {
      A q[NPL];
      load_row(q, static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, D, A(p.scale));
      const int64_t lo = c0 + slice * sub;
      const int64_t hi = min64(min64(c1, lo + sub), visible_end(sq, i, p.causal));
      attend(st, q, K, V, p.k_row_stride, D, lo, hi);
    }
    if (wpr > 1) {  // combine the slices of each row (wpr > 1 only when nr < kWarps: one round)
      if (active) {
#pragma unroll
        for (int t = 0; t < NPL; ++t) sh_acc[warp][lane + 32 * t] = st.acc[t];
        if (lane == 0) sh_m[warp] = st.m, sh_l[warp] = st.l;
      }
      __syncthreads();
      if (active && slice == 0) {
        A m = neg_inf<A>();
        bool nan = false;  // a slice whose scores were NaN poisons the row (inv_row_sum)
        for (int s = 0; s < wpr; ++s)
          m = fmax(m, sh_m[slot + s * slots]), nan |= sh_l[slot + s * slots] != sh_l[slot + s * slots];
        st.init();
        st.m = m;
        if (nan) st.l = A(NAN);
        if (m != neg_inf<A>()) {
          for (int s = 0; s < wpr; ++s) {
            const int w = slot + s * slots;
            const A f = sh_m[w] == neg_inf<A>() ? A(0) : fast_exp(sh_m[w] - m);
            st.l += f * sh_l[w];
#pragma unroll
            for (int t = 0; t < NPL; ++t) st.acc[t] += f * sh_acc[w][lane + 32 * t];
          }
        }
      }
      __syncthreads();
    }
    if (!active || slice != 0) continue;
    if (n_splits == 1) {
      write_row<NPL, S>(p, sq, h, i, st);
    } else {  // this chunk's (normalized out, lse) for the merge
      const int64_t w = lse_index(p, sq, h, i) * n_splits + split;
      A* po = static_cast<A*>(p.partial_out) + w * D;
      const A inv = inv_row_sum(st.l);
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) po[d] = st.acc[t] * inv;
      }
      if (lane == 0) static_cast<A*>(p.partial_lse)[w] = row_lse(st.m, st.l);
    }
  }
}

// Combines the n_splits chunk results of each row by log-sum-exp, chunks in order; grid as
// forward_kernel.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) merge_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D), lane = threadIdx.x & 31;
  const int64_t n_splits = p.n_splits, w0 = lse_index(p, sq, h, i) * n_splits;
  const A* plse = static_cast<const A*>(p.partial_lse) + w0;
  const A* pout = static_cast<const A*>(p.partial_out) + w0 * D;
  A m = neg_inf<A>();
  bool nan = false;  // a chunk with NaN scores has a NaN lse: the row's output is NaN, not 0
  for (int64_t s = 0; s < n_splits; ++s) m = fmax(m, plse[s]), nan |= plse[s] != plse[s];
  RowState<A, NPL> st;
  st.init();
  st.m = m;
  if (nan) st.l = A(NAN);
  if (m != neg_inf<A>()) {
    for (int64_t s = 0; s < n_splits; ++s) {
      const A f = fast_exp(plse[s] - m);  // 0 for an empty chunk (lse -inf)
      st.l += f;
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) st.acc[t] += f * pout[s * D + d];
      }
    }
  }
  // out = sum_s f_s out_s / sum_s f_s, lse = m + log(sum_s f_s)
  write_row<NPL, S>(p, sq, h, i, st);
}

}  // namespace simple

cudaError_t run_decode(const Params& p, DType dtype, cudaStream_t stream) {
  return dispatch_simple(dtype, p.D, [&](auto s, auto npl) {
    using S = decltype(s);
    constexpr int NPL = decltype(npl)::value;
    simple::decode_kernel<S, NPL>
        <<<dim3(unsigned(p.n_seq * p.n_splits), unsigned(p.Hkv)), simple::kThreads, 0, stream>>>(p);
    if (p.n_splits > 1) {
      const unsigned n_rb = row_blocks(p.max_q_len);
      simple::merge_kernel<S, NPL>
          <<<dim3(unsigned(n_rb * p.n_seq), unsigned(p.H)), simple::kThreads, 0, stream>>>(p, int(n_rb));
    }
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::attention::detail
