// CPU launchers for attention (semantics in ../attention.h).
//
// Forward, per (sequence, head, block of kBQ query rows): the rows (pre-scaled) and each tile of
// kBK keys are staged in fp32 buffers, K transposed, so that scores are outer-product
// accumulations vectorized over the tile's keys and P.V accumulations vectorized over D; an
// online softmax (running max, sum, rescaled accumulator) per row. Tiles entirely hidden by the
// causal mask or outside the key range are skipped.
// Backward (recompute from lse): delta = rowsum(dO * O); dQ per (sequence, head, query block);
// dK, dV per (sequence, kv head, key block) looping over the query heads of its group. Each
// output element is written by one task in a fixed order: deterministic.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "simd.h"

namespace fastrlhf::kernels::attention {
namespace {

constexpr int64_t kBQ = 32;   // query rows per task
constexpr int64_t kBK = 64;   // keys per tile

template <typename A>
constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

struct Task {
  int64_t seq, head, block;
};

// Tasks (sequence, head, block of `rows_per_block` along `len`) in a fixed order.
template <typename F>
std::vector<Task> tasks_for(const Params& p, int64_t heads, int64_t rows_per_block, F len_of) {
  std::vector<Task> t;
  for (int64_t b = 0; b < p.n_seq; ++b) {
    const int64_t n_blocks = (len_of(p.seqs[b]) + rows_per_block - 1) / rows_per_block;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t blk = 0; blk < n_blocks; ++blk) t.push_back(Task{b, h, blk});
  }
  return t;
}

template <typename S, typename A>
struct Buffers {
  std::vector<A> q, kt, v, vt, s, acc, m, l;
  explicit Buffers(int64_t D) : q(kBQ * D), kt(D * kBK), v(kBK * D), vt(D * kBK), s(kBQ * kBK), acc(kBQ * D), m(kBQ), l(kBQ) {}
};

// Stage keys [j0, j1) of (sequence, kv head): kt[d][jj] (transposed) and, optionally, v rows
// v[jj][d], vt[d][jj] and k rows kr[jj][d]. Missing columns (jj >= j1 - j0) are zero.
template <typename S, typename A>
void stage_keys(const Params& p, const Seq& sq, int64_t hk, int64_t j0, int64_t j1, A* kt, A* v, A* vt,
                A* kr = nullptr) {
  const int64_t D = p.D, n = j1 - j0;
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
  if (kr) {
    for (int64_t jj = 0; jj < kBK; ++jj)
      for (int64_t d = 0; d < D; ++d) kr[jj * D + d] = jj < n ? load<A>(K + (j0 + jj) * p.k_row_stride + d) : A(0);
  }
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t jj = 0; jj < kBK; ++jj) kt[d * kBK + jj] = jj < n ? load<A>(K + (j0 + jj) * p.k_row_stride + d) : A(0);
  }
  if (v) {
    for (int64_t jj = 0; jj < kBK; ++jj)
      for (int64_t d = 0; d < D; ++d) v[jj * D + d] = jj < n ? load<A>(V + (j0 + jj) * p.k_row_stride + d) : A(0);
  }
  if (vt) {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t jj = 0; jj < kBK; ++jj) vt[d * kBK + jj] = jj < n ? load<A>(V + (j0 + jj) * p.k_row_stride + d) : A(0);
  }
}

// s[jj] = sum_d q[d] * kt[d][jj] for one query row (q pre-scaled)
template <typename A>
void scores(const A* __restrict q, const A* __restrict kt, int64_t D, A* __restrict s) {
  A acc[kBK] = {};
  for (int64_t d = 0; d < D; ++d) {
    const A qd = q[d];
    const A* __restrict row = kt + d * kBK;
#pragma omp simd
    for (int64_t jj = 0; jj < kBK; ++jj) acc[jj] += qd * row[jj];
  }
  for (int64_t jj = 0; jj < kBK; ++jj) s[jj] = acc[jj];
}

// The same for kRows query rows at once (q rows D apart): each K^T row loaded once per kRows.
constexpr int64_t kRows = 4;  // the dK/dV accumulation below is written for exactly 4
template <typename A>
void scores_rows(const A* __restrict q, const A* __restrict kt, int64_t D, A* __restrict s) {
  A acc[kRows][kBK] = {};
  for (int64_t d = 0; d < D; ++d) {
    const A* __restrict row = kt + d * kBK;
    for (int64_t r = 0; r < kRows; ++r) {
      const A qd = q[r * D + d];
#pragma omp simd
      for (int64_t jj = 0; jj < kBK; ++jj) acc[r][jj] += qd * row[jj];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t jj = 0; jj < kBK; ++jj) s[r * kBK + jj] = acc[r][jj];
}

template <typename S>
void forward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  const auto tasks = tasks_for(p, p.H, kBQ, [](const Seq& s) { return s.q_len; });
  parallel_for(int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    Buffers<S, A> buf(D);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      const int64_t h = tk.head, hk = h / group;
      const int64_t i0 = tk.block * kBQ, i1 = std::min(sq.q_len, i0 + kBQ), nr = i1 - i0;
      const S* Q = static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < D; ++d) buf.q[r * D + d] = load<A>(Q + (i0 + r) * p.q_row_stride + d) * scale;
      std::fill(buf.acc.begin(), buf.acc.end(), A(0));
      std::fill(buf.m.begin(), buf.m.end(), neg_inf<A>());
      std::fill(buf.l.begin(), buf.l.end(), A(0));
      const int64_t k_lo = sq.k_begin, k_hi = visible_end(sq, i1 - 1, p.causal);
      for (int64_t j0 = k_lo; j0 < k_hi; j0 += kBK) {
        const int64_t j1 = std::min(k_hi, j0 + kBK);
        stage_keys<S, A>(p, sq, hk, j0, j1, buf.kt.data(), buf.v.data(), nullptr);
        int64_t r = 0;
        for (; r + kRows <= nr; r += kRows) scores_rows(buf.q.data() + r * D, buf.kt.data(), D, buf.s.data() + r * kBK);
        for (; r < nr; ++r) scores(buf.q.data() + r * D, buf.kt.data(), D, buf.s.data() + r * kBK);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t vis = std::min(j1, visible_end(sq, i0 + r, p.causal)) - j0;  // visible keys in tile
          if (vis <= 0) continue;
          A* s = buf.s.data() + r * kBK;
          A tile_max = neg_inf<A>();
          for (int64_t jj = 0; jj < vis; ++jj) tile_max = s[jj] > tile_max ? s[jj] : tile_max;
          const A m_new = tile_max > buf.m[r] ? tile_max : buf.m[r];
          const A corr = buf.m[r] == neg_inf<A>() ? A(0) : fast_exp(buf.m[r] - m_new);
          A sum = 0;
          for (int64_t jj = 0; jj < kBK; ++jj) {
            s[jj] = jj < vis ? fast_exp(s[jj] - m_new) : A(0);
            sum += s[jj];
          }
          buf.l[r] = buf.l[r] * corr + sum;
          buf.m[r] = m_new;
          A* __restrict acc = buf.acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
          for (int64_t jj = 0; jj < vis; ++jj) {
            const A pj = s[jj];
            const A* __restrict vrow = buf.v.data() + jj * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += pj * vrow[d];
          }
        }
      }
      S* O = static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride;
      A* lse = static_cast<A*>(static_cast<void*>(p.lse)) + sq.lse_off + h * p.lse_head_stride;
      for (int64_t r = 0; r < nr; ++r) {
        const A l = buf.l[r];
        const A inv = l > A(0) ? A(1) / l : A(0);
        for (int64_t d = 0; d < D; ++d) store(O + (i0 + r) * p.q_row_stride + d, buf.acc[r * D + d] * inv);
        lse[(i0 + r) * p.lse_row_stride] = l > A(0) ? buf.m[r] + std::log(l) : neg_inf<A>();
      }
    }
  });
}

// Decode helpers. Rows [j0, j0 + n) of one kv head of K or V as accumulator-type values with
// row stride *ld: the cache itself when its storage already is the accumulator type, else
// converted into buf (n x D).
template <typename S, typename A>
const A* as_acc_rows(const S* base, int64_t j0, int64_t n, int64_t stride, int64_t D, A* buf, int64_t* ld) {
  if constexpr (std::is_same_v<S, A>) {
    *ld = stride;
    return base + j0 * stride;
  } else {
    for (int64_t jj = 0; jj < n; ++jj)
      for (int64_t d = 0; d < D; ++d) buf[jj * D + d] = load<A>(base + (j0 + jj) * stride + d);
    *ld = D;
    return buf;
  }
}

// Ask for keys [j0, j1) of K and V ahead of their use (the hardware prefetcher alone leaves the
// first row of a tile waiting on memory).
template <typename S>
void prefetch_rows(const S* K, const S* V, int64_t j0, int64_t j1, int64_t stride, int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(S);
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t d = 0; d < D; d += kLine) {
      __builtin_prefetch(K + j * stride + d, 0, 1);  // into L2: the current tile owns L1
      __builtin_prefetch(V + j * stride + d, 0, 1);
    }
}

// s[r * ls + jj] = q_r . k_jj for rows r < nr (q rows D apart) and keys jj < n (rows ld apart).
// Keys in blocks of four, all rows per block: the block's K rows stay in L1 while every row
// uses them (K streams from memory once, evenly), and four independent accumulations overlap.
template <typename A>
void dot_keys(const A* __restrict q, int64_t nr, const A* __restrict k, int64_t ld, int64_t n, int64_t D,
              A* __restrict s, int64_t ls) {
  int64_t jj = 0;
  for (; jj + 4 <= n; jj += 4) {
    const A* __restrict k0 = k + jj * ld;
    const A* __restrict k1 = k0 + ld;
    const A* __restrict k2 = k1 + ld;
    const A* __restrict k3 = k2 + ld;
    int64_t r = 0;
    if constexpr (std::is_same_v<A, float>) {  // explicit vectors, two rows at a time
      const int64_t Dv = D & ~int64_t(15);
      for (; r + 2 <= nr && Dv == D; r += 2) {
        const float* __restrict q0 = q + r * D;
        const float* __restrict q1 = q0 + D;
        cpu::f32x16 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
        for (int64_t d = 0; d < D; d += 16) {
          const cpu::f32x16 x0 = cpu::load16(k0 + d), x1 = cpu::load16(k1 + d), x2 = cpu::load16(k2 + d),
                            x3 = cpu::load16(k3 + d), u = cpu::load16(q0 + d), w = cpu::load16(q1 + d);
          a0 += u * x0, a1 += u * x1, a2 += u * x2, a3 += u * x3;
          b0 += w * x0, b1 += w * x1, b2 += w * x2, b3 += w * x3;
        }
        cpu::hsum4(a0, a1, a2, a3, s + r * ls + jj);
        cpu::hsum4(b0, b1, b2, b3, s + (r + 1) * ls + jj);
      }
    }
    for (; r < nr; ++r) {
      const A* __restrict qr = q + r * D;
      A a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < D; ++d) {
        const A qd = qr[d];
        a0 += qd * k0[d];
        a1 += qd * k1[d];
        a2 += qd * k2[d];
        a3 += qd * k3[d];
      }
      A* sr = s + r * ls + jj;
      sr[0] = a0, sr[1] = a1, sr[2] = a2, sr[3] = a3;
    }
  }
  for (; jj < n; ++jj) {
    const A* __restrict kj = k + jj * ld;
    for (int64_t r = 0; r < nr; ++r) {
      const A* __restrict qr = q + r * D;
      A a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) a += qr[d] * kj[d];
      s[r * ls + jj] = a;
    }
  }
}

// acc[0, D) += sum_jj p[jj] * v_jj over n value rows (ld apart), D split into register-sized
// chunks held across the keys (no load/store of acc per key).
template <typename A>
void accumulate_values(const A* __restrict p, const A* __restrict v, int64_t ld, int64_t n, int64_t D,
                       A* __restrict acc) {
  constexpr int64_t W = 256 / sizeof(A);  // 64 floats: four 512-bit registers
  int64_t d0 = 0;
  for (; d0 + W <= D; d0 += W) {
    A a[W];
#pragma omp simd
    for (int64_t dd = 0; dd < W; ++dd) a[dd] = acc[d0 + dd];
    for (int64_t jj = 0; jj < n; ++jj) {
      const A pj = p[jj];
      const A* __restrict vr = v + jj * ld + d0;
#pragma omp simd
      for (int64_t dd = 0; dd < W; ++dd) a[dd] += pj * vr[dd];
    }
#pragma omp simd
    for (int64_t dd = 0; dd < W; ++dd) acc[d0 + dd] = a[dd];
  }
  if (d0 < D) {
    for (int64_t jj = 0; jj < n; ++jj) {
      const A pj = p[jj];
      const A* __restrict vr = v + jj * ld;
#pragma omp simd
      for (int64_t d = d0; d < D; ++d) acc[d] += pj * vr[d];
    }
  }
}

// Decode (few query rows per sequence): one task per (sequence, kv head) holding the rows of
// all query heads of its group, so K and V are read from memory once per group (straight from
// the cache when it is fp32, the next tile prefetched); per L1-sized tile of keys: scores of all
// rows, then per row the online softmax of forward() and P.V with accumulators in registers.
template <typename S>
void decode_forward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  int64_t max_rows = 0;
  for (int64_t b = 0; b < p.n_seq; ++b) max_rows = std::max(max_rows, group * p.seqs[b].q_len);
  // keys per tile: one tile of K and of V (8 KiB each) stays in L1 while every row uses it
  const int64_t tile = std::clamp<int64_t>(8192 / (D * int64_t(sizeof(A))), 8, kBK);
  parallel_for(p.n_seq * p.Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> q(max_rows * D), acc(max_rows * D), s(max_rows * kBK), m(max_rows), l(max_rows);
    std::vector<A> kbuf(std::is_same_v<S, A> ? 0 : kBK * D), vbuf(kbuf.size());
    std::vector<int64_t> vis_end(max_rows);
    for (int64_t t = t0; t < t1; ++t) {
      const Seq& sq = p.seqs[t / p.Hkv];
      const int64_t hk = t % p.Hkv, nr = group * sq.q_len;  // row r = (head hk*group + r / q_len, i = r % q_len)
      if (nr == 0) continue;
      std::fill(acc.begin(), acc.begin() + nr * D, A(0));
      std::fill(m.begin(), m.begin() + nr, neg_inf<A>());
      std::fill(l.begin(), l.begin() + nr, A(0));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t h = hk * group + r / sq.q_len, i = r % sq.q_len;
        const S* Q = static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = load<A>(Q + d) * scale;
        vis_end[r] = visible_end(sq, i, p.causal);
      }
      const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
      const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
      const int64_t k_hi = *std::max_element(vis_end.begin(), vis_end.begin() + nr);
      for (int64_t j0 = sq.k_begin; j0 < k_hi; j0 += tile) {
        const int64_t j1 = std::min(k_hi, j0 + tile), n = j1 - j0;
        int64_t kld = 0, vld = 0;
        const A* kt = as_acc_rows(K, j0, n, p.k_row_stride, D, kbuf.data(), &kld);
        const A* vt = as_acc_rows(V, j0, n, p.k_row_stride, D, vbuf.data(), &vld);
        prefetch_rows(K, V, std::min(j1, k_hi), std::min(j1 + tile, k_hi), p.k_row_stride, D);
        dot_keys(q.data(), nr, kt, kld, n, D, s.data(), kBK);  // every row against the whole tile
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t vis = std::min(j1, vis_end[r]) - j0;  // visible keys of this row in the tile
          if (vis <= 0) continue;
          A* sr = s.data() + r * kBK;
          A tile_max = neg_inf<A>();
          for (int64_t jj = 0; jj < vis; ++jj) tile_max = sr[jj] > tile_max ? sr[jj] : tile_max;
          const A m_new = tile_max > m[r] ? tile_max : m[r];
          const A corr = m[r] == neg_inf<A>() ? A(0) : fast_exp(m[r] - m_new);
          A sum = 0;
          for (int64_t jj = 0; jj < vis; ++jj) {
            sr[jj] = fast_exp(sr[jj] - m_new);
            sum += sr[jj];
          }
          l[r] = l[r] * corr + sum;
          m[r] = m_new;
          A* __restrict ar = acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
          accumulate_values(sr, vt, vld, vis, D, ar);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t h = hk * group + r / sq.q_len, i = r % sq.q_len;
        S* O = static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
        A* lse = static_cast<A*>(static_cast<void*>(p.lse)) + sq.lse_off + h * p.lse_head_stride;
        const A inv = l[r] > A(0) ? A(1) / l[r] : A(0);
        for (int64_t d = 0; d < D; ++d) store(O + d, acc[r * D + d] * inv);
        lse[i * p.lse_row_stride] = l[r] > A(0) ? m[r] + std::log(l[r]) : neg_inf<A>();
      }
    }
  });
}

template <typename S>
void backward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  const A* lse_all = static_cast<const A*>(static_cast<const void*>(p.lse));
  A* delta_all = static_cast<A*>(p.delta);
  auto row_ptr = [&](const void* base, const Seq& sq, int64_t h, int64_t i) {
    return static_cast<const S*>(base) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
  };
  // delta_i = sum_d dO_i * O_i
  const auto q_tasks = tasks_for(p, p.H, kBQ, [](const Seq& s) { return s.q_len; });
  parallel_for(int64_t(q_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = q_tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      for (int64_t i = tk.block * kBQ, i1 = std::min(sq.q_len, i + kBQ); i < i1; ++i) {
        const S* o = row_ptr(p.o, sq, tk.head, i);
        const S* g = row_ptr(p.dout, sq, tk.head, i);
        A s = 0;
        for (int64_t d = 0; d < D; ++d) s += load<A>(g + d) * load<A>(o + d);
        delta_all[sq.lse_off + tk.head * p.lse_head_stride + i * p.lse_row_stride] = s;
      }
    }
  });
  // dQ per (sequence, head, query block): each key tile staged once for the block's rows
  parallel_for(int64_t(q_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> q(kBQ * D), g(kBQ * D), dq(kBQ * D), kt(D * kBK), vt(D * kBK), kr(kBK * D), s(kBQ * kBK),
        dp(kBQ * kBK);
    std::vector<A> lse_r(kBQ), delta_r(kBQ);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = q_tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      const int64_t h = tk.head, hk = h / group;
      const int64_t i0 = tk.block * kBQ, i1 = std::min(sq.q_len, i0 + kBQ), nr = i1 - i0;
      std::fill(dq.begin(), dq.end(), A(0));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t li = sq.lse_off + h * p.lse_head_stride + (i0 + r) * p.lse_row_stride;
        lse_r[r] = lse_all[li], delta_r[r] = delta_all[li];
        const S* qr = row_ptr(p.q, sq, h, i0 + r);
        const S* gr = row_ptr(p.dout, sq, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = load<A>(qr + d) * scale, g[r * D + d] = load<A>(gr + d);
      }
      const int64_t ke_block = visible_end(sq, i1 - 1, p.causal);
      for (int64_t j0 = sq.k_begin; j0 < ke_block; j0 += kBK) {
        const int64_t j1 = std::min(ke_block, j0 + kBK);
        stage_keys<S, A>(p, sq, hk, j0, j1, kt.data(), nullptr, vt.data(), kr.data());
        int64_t r = 0;
        for (; r + kRows <= nr; r += kRows) {
          scores_rows(q.data() + r * D, kt.data(), D, s.data() + r * kBK);
          scores_rows(g.data() + r * D, vt.data(), D, dp.data() + r * kBK);
        }
        for (; r < nr; ++r) {
          scores(q.data() + r * D, kt.data(), D, s.data() + r * kBK);
          scores(g.data() + r * D, vt.data(), D, dp.data() + r * kBK);
        }
        for (int64_t r = 0; r < nr; ++r) {
          if (lse_r[r] == neg_inf<A>()) continue;
          const int64_t n = std::min(j1, visible_end(sq, i0 + r, p.causal)) - j0;
          A* __restrict dqr = dq.data() + r * D;
          for (int64_t jj = 0; jj < n; ++jj) {
            const A pj = fast_exp(s[r * kBK + jj] - lse_r[r]);
            const A ds = pj * (dp[r * kBK + jj] - delta_r[r]);
            const A* __restrict krow = kr.data() + jj * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dqr[d] += ds * krow[d];
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        S* dq_out = static_cast<S*>(p.dq) + sq.q_off + h * p.q_head_stride + (i0 + r) * p.q_row_stride;
        for (int64_t d = 0; d < D; ++d) store(dq_out + d, dq[r * D + d] * scale);
      }
    }
  });
  // dK, dV per (sequence, kv head, key block)
  const auto k_tasks = tasks_for(p, p.Hkv, kBK, [](const Seq& s) { return s.k_end; });
  parallel_for(int64_t(k_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> kt(D * kBK), vt(D * kBK), q(kRows * D), g(kRows * D), s(kRows * kBK), dp(kRows * kBK);
    std::vector<A> dk(kBK * D), dv(kBK * D);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = k_tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      const int64_t hk = tk.head;
      const int64_t j0 = tk.block * kBK, j1 = std::min(sq.k_end, j0 + kBK), n = j1 - j0;
      std::fill(dk.begin(), dk.end(), A(0));
      std::fill(dv.begin(), dv.end(), A(0));
      const int64_t jb = std::max(j0, sq.k_begin);  // first key of the block inside the key range
      if (jb < j1) {
        stage_keys<S, A>(p, sq, hk, j0, j1, kt.data(), nullptr, vt.data());
        // rows that can see any key of [jb, j1): causal needs i + offset >= jb
        const int64_t i_first = p.causal ? std::max<int64_t>(0, jb - sq.causal_offset) : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t ib = i_first; ib < sq.q_len; ib += kRows) {
            const int64_t nr = std::min(kRows, sq.q_len - ib);
            for (int64_t r = 0; r < nr; ++r) {
              const S* qr = row_ptr(p.q, sq, h, ib + r);
              const S* gr = row_ptr(p.dout, sq, h, ib + r);
              for (int64_t d = 0; d < D; ++d) q[r * D + d] = load<A>(qr + d) * scale, g[r * D + d] = load<A>(gr + d);
            }
            if (nr == kRows) {
              scores_rows(q.data(), kt.data(), D, s.data());
              scores_rows(g.data(), vt.data(), D, dp.data());
            } else {
              for (int64_t r = 0; r < nr; ++r) {
                scores(q.data() + r * D, kt.data(), D, s.data() + r * kBK);
                scores(g.data() + r * D, vt.data(), D, dp.data() + r * kBK);
              }
            }
            // probabilities and score gradients of the group's rows (0 where a key is hidden),
            // then dV, dK rows updated once per group: P^T dO and dS^T Q on the tile
            A pr[kRows][kBK], dsr[kRows][kBK];
            for (int64_t r = 0; r < kRows; ++r) {
              const int64_t i = ib + r;
              const int64_t li = sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
              const A lse = r < nr ? lse_all[li] : neg_inf<A>(), delta = r < nr ? delta_all[li] : A(0);
              const int64_t ke = r < nr && lse != neg_inf<A>() ? std::min(j1, visible_end(sq, i, p.causal)) : j0;
              for (int64_t jj = 0; jj < kBK; ++jj) {
                const bool vis = jj >= jb - j0 && jj < ke - j0;
                const A pj = vis ? fast_exp(s[r * kBK + jj] - lse) : A(0);
                pr[r][jj] = pj;
                dsr[r][jj] = vis ? pj * (dp[r * kBK + jj] - delta) : A(0);
              }
            }
            if (nr < kRows) {  // rows beyond the sequence: zero inputs (their weights are 0 too)
              for (int64_t r = nr; r < kRows; ++r)
                for (int64_t d = 0; d < D; ++d) q[r * D + d] = g[r * D + d] = A(0);
            }
            for (int64_t jj = jb - j0; jj < n; ++jj) {
              A* __restrict dvr = dv.data() + jj * D;
              A* __restrict dkr = dk.data() + jj * D;
              const A p0 = pr[0][jj], p1 = pr[1][jj], p2 = pr[2][jj], p3 = pr[3][jj];
              const A s0 = dsr[0][jj], s1 = dsr[1][jj], s2 = dsr[2][jj], s3 = dsr[3][jj];
              if (p0 == A(0) && p1 == A(0) && p2 == A(0) && p3 == A(0)) continue;
              const A *__restrict g0 = g.data(), *__restrict g1 = g0 + D, *__restrict g2 = g1 + D, *__restrict g3 = g2 + D;
              const A *__restrict q0 = q.data(), *__restrict q1 = q0 + D, *__restrict q2 = q1 + D, *__restrict q3 = q2 + D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) {
                dvr[d] += p0 * g0[d] + p1 * g1[d] + p2 * g2[d] + p3 * g3[d];
                dkr[d] += s0 * q0[d] + s1 * q1[d] + s2 * q2[d] + s3 * q3[d];
              }
            }
          }
        }
      }
      S* DK = static_cast<S*>(p.dk) + sq.k_off + hk * p.k_head_stride;
      S* DV = static_cast<S*>(p.dv) + sq.k_off + hk * p.k_head_stride;
      for (int64_t jj = 0; jj < n; ++jj)
        for (int64_t d = 0; d < D; ++d) {
          store(DK + (j0 + jj) * p.k_row_stride + d, dk[jj * D + d]);
          store(DV + (j0 + jj) * p.k_row_stride + d, dv[jj * D + d]);
        }
    }
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { forward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

Status launch_decode_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { decode_forward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { backward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::attention
