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
#include <vector>

#include "../attention.h"

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
  explicit Buffers(int64_t D) : q(kBQ * D), kt(D * kBK), v(kBK * D), vt(D * kBK), s(kBK), acc(kBQ * D), m(kBQ), l(kBQ) {}
};

// Stage keys [j0, j1) of (sequence, kv head): kt[d][jj] (transposed) and, optionally, v rows
// v[jj][d] and/or vt[d][jj]. Missing columns (jj >= j1 - j0) are zero.
template <typename S, typename A>
void stage_keys(const Params& p, const Seq& sq, int64_t hk, int64_t j0, int64_t j1, A* kt, A* v, A* vt) {
  const int64_t D = p.D, n = j1 - j0;
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
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
void scores(const A* q, const A* kt, int64_t D, A* s) {
  for (int64_t jj = 0; jj < kBK; ++jj) s[jj] = A(0);
  for (int64_t d = 0; d < D; ++d) {
    const A qd = q[d];
    const A* row = kt + d * kBK;
#pragma omp simd
    for (int64_t jj = 0; jj < kBK; ++jj) s[jj] += qd * row[jj];
  }
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
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t vis = std::min(j1, visible_end(sq, i0 + r, p.causal)) - j0;  // visible keys in tile
          if (vis <= 0) continue;
          A* s = buf.s.data();
          scores(buf.q.data() + r * D, buf.kt.data(), D, s);
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
          A* acc = buf.acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
          for (int64_t jj = 0; jj < vis; ++jj) {
            const A pj = s[jj];
            const A* vrow = buf.v.data() + jj * D;
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
  // dQ per (sequence, head, query block)
  parallel_for(int64_t(q_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> q(D), g(D), dq(D), kt(D * kBK), krow(kBK * D), vt(D * kBK), s(kBK), dp(kBK);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = q_tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      const int64_t h = tk.head, hk = h / group;
      const int64_t i0 = tk.block * kBQ, i1 = std::min(sq.q_len, i0 + kBQ);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t li = sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
        const A lse = lse_all[li], delta = delta_all[li];
        S* dq_out = static_cast<S*>(p.dq) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
        std::fill(dq.begin(), dq.end(), A(0));
        const int64_t ke = visible_end(sq, i, p.causal);
        if (lse != neg_inf<A>()) {
          const S* qr = row_ptr(p.q, sq, h, i);
          const S* gr = row_ptr(p.dout, sq, h, i);
          for (int64_t d = 0; d < D; ++d) q[d] = load<A>(qr + d) * scale, g[d] = load<A>(gr + d);
          for (int64_t j0 = sq.k_begin; j0 < ke; j0 += kBK) {
            const int64_t j1 = std::min(ke, j0 + kBK), n = j1 - j0;
            stage_keys<S, A>(p, sq, hk, j0, j1, kt.data(), nullptr, vt.data());
            scores(q.data(), kt.data(), D, s.data());
            scores(g.data(), vt.data(), D, dp.data());
            for (int64_t jj = 0; jj < n; ++jj) {
              const A pj = fast_exp(s[jj] - lse);
              const A ds = pj * (dp[jj] - delta);
              for (int64_t d = 0; d < D; ++d) dq[d] += ds * kt[d * kBK + jj];
            }
          }
        }
        for (int64_t d = 0; d < D; ++d) store(dq_out + d, dq[d] * scale);
      }
    }
  });
  // dK, dV per (sequence, kv head, key block)
  const auto k_tasks = tasks_for(p, p.Hkv, kBK, [](const Seq& s) { return s.k_end; });
  parallel_for(int64_t(k_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> kt(D * kBK), vt(D * kBK), q(D), g(D), s(kBK), dp(kBK), dk(kBK * D), dv(kBK * D);
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
          for (int64_t i = i_first; i < sq.q_len; ++i) {
            const int64_t li = sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
            const A lse = lse_all[li], delta = delta_all[li];
            if (lse == neg_inf<A>()) continue;
            const int64_t ke = std::min(j1, visible_end(sq, i, p.causal));
            if (ke <= jb) continue;
            const S* qr = row_ptr(p.q, sq, h, i);
            const S* gr = row_ptr(p.dout, sq, h, i);
            for (int64_t d = 0; d < D; ++d) q[d] = load<A>(qr + d) * scale, g[d] = load<A>(gr + d);
            scores(q.data(), kt.data(), D, s.data());
            scores(g.data(), vt.data(), D, dp.data());
            for (int64_t jj = jb - j0; jj < ke - j0; ++jj) {
              const A pj = fast_exp(s[jj] - lse);
              const A ds = pj * (dp[jj] - delta);
              A* dvr = dv.data() + jj * D;
              A* dkr = dk.data() + jj * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) dvr[d] += pj * g[d], dkr[d] += ds * q[d];
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

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { backward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::attention
