// CUDA-core attention kernels (templates; see attention_common.cuh for the folder's layout).
//
// CUDA cores (fp32, fp64, any D <= 256, and everything the tensor-core path does not take): one
// warp per query row (forward, dQ) or key row (dK/dV); lane l owns dims l, l + 32, ...; dot
// products by warp butterfly sums; keys 32 at a time through the online softmax. Same order of
// operations as the CPU kernel's per-row math, accumulated in fp32 (fp64 for fp64).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_common.cuh"

namespace fastrlhf::kernels::attention::detail {

using cuda::load;
using cuda::store;
using cuda::warp_sum;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return A(-INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// =============================================================================================
// CUDA-core kernels: one warp per row, lane l owning dims l + 32 t (t < NPL, NPL * 32 >= D).
// =============================================================================================
namespace simple {

// kWarps (rows per block) and kThreads: attention_common.cuh (launch.cu sizes grids with them).

template <int NPL, typename S, typename A>
__device__ __forceinline__ void load_row(A (&x)[NPL], const S* row, int D, A mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    x[t] = d < D ? load<A>(row + d) * mul : A(0);
  }
}

template <int NPL, typename S, typename A>
__device__ __forceinline__ A dot_row(const A (&x)[NPL], const S* row, int D) {
  const int lane = threadIdx.x & 31;
  A s = 0;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) s += x[t] * load<A>(row + d);
  }
  return warp_sum(s);
}

template <int NPL, typename S, typename A>
__device__ __forceinline__ void store_row(S* row, const A (&x)[NPL], int D, A mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) store(row + d, x[t] * mul);
  }
}

// Online-softmax state of one query row (natural-log domain, scores already scaled).
template <typename A, int NPL>
struct RowState {
  A acc[NPL];  // sum_j exp(s_j - m) v_j (this lane's dims)
  A m, l;      // running max and sum of exp(s_j - m)
  __device__ void init() {
#pragma unroll
    for (int t = 0; t < NPL; ++t) acc[t] = A(0);
    m = neg_inf<A>();
    l = A(0);
  }
};

// Adds keys [j_lo, j_hi) of K / V (row stride `stride`) to the row state; q pre-scaled.
template <int NPL, typename S, typename A>
__device__ void attend(RowState<A, NPL>& st, const A (&q)[NPL], const S* K, const S* V, int64_t stride, int D,
                       int64_t j_lo, int64_t j_hi) {
  const int lane = threadIdx.x & 31;
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += 32) {
    const int n = int(min64(32, j_hi - j0));
    A s = neg_inf<A>();  // lane jj: score of key j0 + jj
    for (int jj = 0; jj < n; ++jj) {
      const A dot = dot_row(q, K + (j0 + jj) * stride, D);
      if (lane == jj) s = dot;
    }
    const A tile_max = warp_max(s);
    const A m_new = tile_max > st.m ? tile_max : st.m;
    const A corr = st.m == neg_inf<A>() ? A(0) : fast_exp(st.m - m_new);
    const A pj = lane < n ? fast_exp(s - m_new) : A(0);
    st.l = st.l * corr + warp_sum(pj);
    st.m = m_new;
#pragma unroll
    for (int t = 0; t < NPL; ++t) st.acc[t] *= corr;
    for (int jj = 0; jj < n; ++jj) {
      const A w = __shfl_sync(0xffffffffu, pj, jj);
      const S* v = V + (j0 + jj) * stride;
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) st.acc[t] += w * load<A>(v + d);
      }
    }
  }
}

// Final output row (storage dtype) and lse of a row state.
template <int NPL, typename S, typename A>
__device__ __forceinline__ void write_row(const Params& p, const Seq& sq, int64_t h, int64_t i,
                                          const RowState<A, NPL>& st) {
  const A inv = inv_row_sum(st.l);  // NaN scores -> a NaN row, never a silent 0 (attention.h)
  store_row(static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, st.acc, int(p.D), inv);
  if (p.lse && (threadIdx.x & 31) == 0) reinterpret_cast<A*>(p.lse)[lse_index(p, sq, h, i)] = row_lse(st.m, st.l);
}

// grid (row blocks x sequences, H): warp = query row
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D);
  const int64_t hk = h / (p.H / p.Hkv);
  A q[NPL];
  load_row(q, static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, D, A(p.scale));
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
  RowState<A, NPL> st;
  st.init();
  attend(st, q, K, V, p.k_row_stride, D, sq.k_begin, visible_end(sq, i, p.causal));
  write_row<NPL, S>(p, sq, h, i, st);
}

// delta_i = sum_d dO_i O_i, one warp per row (both backward paths).
template <typename S>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
  const S* o = static_cast<const S*>(p.o) + off;
  const S* g = static_cast<const S*>(p.dout) + off;
  A s = 0;
  for (int d = threadIdx.x & 31; d < p.D; d += 32) s += load<A>(g + d) * load<A>(o + d);
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) static_cast<A*>(p.delta)[lse_index(p, sq, h, i)] = s;
}

// dQ: one warp per query row, keys one at a time.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D);
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
  const A scale = A(p.scale);
  const A lse = static_cast<const A*>(static_cast<const void*>(p.lse))[lse_index(p, sq, h, i)];
  const A delta = static_cast<const A*>(p.delta)[lse_index(p, sq, h, i)];
  A q[NPL], g[NPL], dq[NPL] = {};
  load_row(q, static_cast<const S*>(p.q) + off, D, scale);
  load_row(g, static_cast<const S*>(p.dout) + off, D, A(1));
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
  const int64_t ke = lse == neg_inf<A>() ? sq.k_begin : visible_end(sq, i, p.causal);
  const int lane = threadIdx.x & 31;
  for (int64_t j = sq.k_begin; j < ke; ++j) {
    const S* k = K + j * p.k_row_stride;
    const A pj = fast_exp(dot_row(q, k, D) - lse);
    const A ds = pj * (dot_row(g, V + j * p.k_row_stride, D) - delta);
#pragma unroll
    for (int t = 0; t < NPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) dq[t] += ds * load<A>(k + d);
    }
  }
  store_row(static_cast<S*>(p.dq) + off, dq, D, scale);
}

// dK, dV: one warp per key row, over the query rows of every query head of the GQA group.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, hk = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (j < sq.k_begin || j >= sq.k_end) return;  // no row sees it: dk = dv = 0 (zero-filled)
  const int D = int(p.D);
  const int64_t group = p.H / p.Hkv;
  const int64_t kv_off = sq.k_off + hk * p.k_head_stride + j * p.k_row_stride;
  const A scale = A(p.scale);
  A k[NPL], v[NPL], dk[NPL] = {}, dv[NPL] = {};
  load_row(k, static_cast<const S*>(p.k) + kv_off, D, A(1));
  load_row(v, static_cast<const S*>(p.v) + kv_off, D, A(1));
  const A* lse_all = static_cast<const A*>(static_cast<const void*>(p.lse));
  const A* delta_all = static_cast<const A*>(p.delta);
  const int64_t i_first = p.causal ? max64(0, j - sq.causal_offset) : 0;  // rows that see key j
  const int lane = threadIdx.x & 31;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i = i_first; i < sq.q_len; ++i) {
      const A lse = lse_all[lse_index(p, sq, h, i)];
      if (lse == neg_inf<A>()) continue;
      const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
      const S* q = static_cast<const S*>(p.q) + off;
      const S* g = static_cast<const S*>(p.dout) + off;
      const A pj = fast_exp(dot_row(k, q, D) * scale - lse);
      const A ds = pj * (dot_row(v, g, D) - delta_all[lse_index(p, sq, h, i)]);
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          dv[t] += pj * load<A>(g + d);
          dk[t] += ds * (load<A>(q + d) * scale);
        }
      }
    }
  }
  store_row(static_cast<S*>(p.dk) + kv_off, dk, D, A(1));
  store_row(static_cast<S*>(p.dv) + kv_off, dv, D, A(1));
}

}  // namespace simple

// f(S{}, std::integral_constant<int, NPL>{}) with NPL * 32 >= D (NPL in 1, 2, 4, 8).
template <typename F>
cudaError_t dispatch_simple(DType dtype, int64_t D, F&& f) {
  return cuda::dispatch(dtype, [&](auto s) -> cudaError_t {
    if (D <= 32) return f(s, std::integral_constant<int, 1>{});
    if (D <= 64) return f(s, std::integral_constant<int, 2>{});
    if (D <= 128) return f(s, std::integral_constant<int, 4>{});
    return f(s, std::integral_constant<int, 8>{});
  });
}

}  // namespace fastrlhf::kernels::attention::detail
