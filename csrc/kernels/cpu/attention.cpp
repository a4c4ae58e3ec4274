// CPU launchers for attention (semantics in ../attention.h).
//
// Training forward and backward multiply tiles with the BLAS the torch glue injects
// (cpu/blas.h): per (sequence, head, block of query rows), S = scale Q K^T and the P V / dS K
// products on chunks of keys are GEMMs; the online softmax, masks and exp run between them,
// vectorized. Chunks wholly hidden by the causal mask or outside the key range are skipped.
// The backward recomputes P from the saved lse, one task per (sequence, kv head) owning its dK,
// dV and its group's dQ (5 GEMMs per tile). Each output element is written by one task in a
// fixed order: deterministic.
// Decode (few query rows): K and V streamed once per (sequence, kv head) by hand-vectorized
// dot products and register-held P.V accumulators (a GEMM call per row would cost more); in
// fp32 at the common head dims with the rows' q or accumulators held in registers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "parallel.h"
#include "simd.h"

namespace fastrlhf::kernels::attention {
namespace {

using cpu::TaskQueue;

constexpr int64_t kBK = 64;  // keys per decode tile, at most

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

struct Task { int64_t seq, head, block; };

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

// Score-matrix entries a (sequence, query rows [i0, i1)) task computes: its cost.
inline int64_t block_cost(const Seq& sq, int64_t i0, int64_t i1, bool causal) {
  return (i1 - i0) * std::max<int64_t>(0, visible_end(sq, i1 - 1, causal) - sq.k_begin);
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
    for (int64_t r = 0; r < nr; ++r) {
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

// fp32 decode for D = 16 * DV, R = 1 or 2 query rows at a time: the rows' q (for scores) or
// output accumulators (for P.V) live in vector registers, so each K / V row loaded serves R rows
// and scores are summed by hsum4 (the generic dot_keys / accumulate_values reload per row).
// s[rr * ls + jj] = q_rr . k_jj for keys jj < n.
template <int DV, int R>
void dot_keys_f32(const float* __restrict q, const float* __restrict k, int64_t ld, int64_t n, float* __restrict s,
                  int64_t ls) {
  using cpu::f32x16;
  constexpr int64_t D = 16 * DV;
  f32x16 qv[R][DV];
  for (int rr = 0; rr < R; ++rr)
    for (int d = 0; d < DV; ++d) qv[rr][d] = cpu::load16(q + rr * D + 16 * d);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    f32x16 a[R][4] = {};
    for (int d = 0; d < DV; ++d) {
      const float* kd = k + j * ld + 16 * d;
      const f32x16 x0 = cpu::load16(kd), x1 = cpu::load16(kd + ld), x2 = cpu::load16(kd + 2 * ld),
                   x3 = cpu::load16(kd + 3 * ld);
      for (int rr = 0; rr < R; ++rr) {
        a[rr][0] += qv[rr][d] * x0, a[rr][1] += qv[rr][d] * x1;
        a[rr][2] += qv[rr][d] * x2, a[rr][3] += qv[rr][d] * x3;
      }
    }
    for (int rr = 0; rr < R; ++rr) cpu::hsum4(a[rr][0], a[rr][1], a[rr][2], a[rr][3], s + rr * ls + j);
  }
  for (; j < n; ++j) {
    f32x16 a[2] = {};
    for (int d = 0; d < DV; ++d) {
      const f32x16 x = cpu::load16(k + j * ld + 16 * d);
      for (int rr = 0; rr < R; ++rr) a[rr] += qv[rr][d] * x;
    }
    float out[4];
    cpu::hsum4(a[0], a[1], a[0], a[1], out);
    for (int rr = 0; rr < R; ++rr) s[rr * ls + j] = out[rr];
  }
}

// acc[rr, 0..D) += sum_jj p[rr * ls + jj] v_jj over keys jj < n.
template <int DV, int R>
void accumulate_values_f32(const float* __restrict p, int64_t ls, const float* __restrict v, int64_t ld, int64_t n,
                           float* __restrict acc) {
  using cpu::f32x16;
  constexpr int64_t D = 16 * DV;
  f32x16 a[R][DV];
  for (int rr = 0; rr < R; ++rr)
    for (int d = 0; d < DV; ++d) a[rr][d] = cpu::load16(acc + rr * D + 16 * d);
  for (int64_t j = 0; j < n; ++j) {
    float pj[R];
    for (int rr = 0; rr < R; ++rr) pj[rr] = p[rr * ls + j];
    for (int d = 0; d < DV; ++d) {
      const f32x16 x = cpu::load16(v + j * ld + 16 * d);
      for (int rr = 0; rr < R; ++rr) a[rr][d] += pj[rr] * x;
    }
  }
  for (int rr = 0; rr < R; ++rr)
    for (int d = 0; d < DV; ++d) std::memcpy(acc + rr * D + 16 * d, &a[rr][d], sizeof(f32x16));
}

// P[r, 0..nk) = exp(S[r, jj] - base_r) where key jj is visible to row r (jj < vis[r]), else 0.
// A base of -inf with visible keys means every visible score was NaN (or -inf): P is NaN there, so
// the row's sum and output become NaN instead of a silent 0 (inv_row_sum).
template <typename A>
void masked_exp(A* __restrict s, int64_t nk, int64_t vis, A base) {
  if (vis <= 0 || base == neg_inf<A>()) {
    const int64_t lim = vis > 0 && base == neg_inf<A>() ? (vis < nk ? vis : nk) : 0;
    std::fill(s, s + lim, std::numeric_limits<A>::quiet_NaN());
    std::fill(s + lim, s + nk, A(0));
    return;
  }
#pragma omp simd
  for (int64_t jj = 0; jj < nk; ++jj) s[jj] = jj < vis ? fast_exp(s[jj] - base) : A(0);
}

#if defined(FASTRLHF_SIMD_EXP)
// fp32 on AVX-512: cpu::exp16 (half the instructions of the vectorized fast_exp), the partial
// last vector masked.
template <>
void masked_exp<float>(float* __restrict s, int64_t nk, int64_t vis, float base) {
  const int64_t lim = vis < nk ? vis : nk;
  int64_t jj = 0;
  if (lim > 0 && base == neg_inf<float>()) {  // every visible score NaN: see the generic masked_exp
    std::fill(s, s + lim, std::numeric_limits<float>::quiet_NaN());
    jj = lim;
  } else if (lim > 0) {
    const __m512 b = _mm512_set1_ps(base);
    for (; jj + 16 <= lim; jj += 16) _mm512_storeu_ps(s + jj, cpu::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + jj), b)));
    if (jj < lim) {
      const __mmask16 k = __mmask16((1u << (lim - jj)) - 1u);
      _mm512_mask_storeu_ps(s + jj, k, cpu::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + jj), b)));
      jj = lim;
    }
  }
  std::fill(s + jj, s + nk, 0.0f);
}
#endif

// One online-softmax step of a row over a chunk of scores s[0, nk), the first `vis` visible:
// s becomes P = exp(s - m_new) (0 past vis), the running max m and sum l move to the chunk, and
// the row's accumulator acc[0, D) is rescaled by exp(m_old - m_new) for the P V product to come.
template <typename A>
void online_softmax_step(A* __restrict s, int64_t nk, int64_t vis, A& m, A& l, A* __restrict acc, int64_t D) {
  constexpr int kLanes = 16;  // independent maxima: the loop vectorizes
  A lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, neg_inf<A>());
  int64_t j = 0;
  for (; j + kLanes <= vis; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane_max[l] = s[j + l] > lane_max[l] ? s[j + l] : lane_max[l];
  for (int l = 0; j < vis; ++j, ++l) lane_max[l] = s[j] > lane_max[l] ? s[j] : lane_max[l];
  A tile_max = lane_max[0];
  for (int l = 1; l < kLanes; ++l) tile_max = lane_max[l] > tile_max ? lane_max[l] : tile_max;
  const A m_new = tile_max > m ? tile_max : m;
  const A corr = m == neg_inf<A>() ? A(0) : fast_exp(m - m_new);
  masked_exp(s, nk, vis, m_new);
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t jj = 0; jj < nk; ++jj) sum += s[jj];
  l = l * corr + sum;
  m = m_new;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
}

// One decode tile in fp32 for D = 16 * DV: scores of all nr rows against the n keys (s, row
// stride kBK), softmax_step(r) per row (turns row r of s into P, rescales acc row r), then
// acc += P V. Rows in pairs up to D = 128; one at a time at D = 256 (16 registers of q or acc).
template <int DV, typename F>
void decode_tile_f32(const float* q, int64_t nr, const float* k, int64_t kld, const float* v, int64_t vld, int64_t n,
                     float* s, float* acc, F&& softmax_step) {
  constexpr int64_t D = 16 * DV;
  constexpr int R = DV <= 8 ? 2 : 1;
  int64_t r = 0;
  for (; r + R <= nr; r += R) dot_keys_f32<DV, R>(q + r * D, k, kld, n, s + r * kBK, kBK);
  if (r < nr) dot_keys_f32<DV, 1>(q + r * D, k, kld, n, s + r * kBK, kBK);
  for (r = 0; r < nr; ++r) softmax_step(r);
  for (r = 0; r + R <= nr; r += R) accumulate_values_f32<DV, R>(s + r * kBK, kBK, v, vld, n, acc + r * D);
  if (r < nr) accumulate_values_f32<DV, 1>(s + r * kBK, kBK, v, vld, n, acc + r * D);
}

// The head dims with a register-blocked fp32 decode tile; others take the generic one.
inline bool decode_tile_f32_supported(int64_t D) {
  return D == 32 || D == 64 || D == 80 || D == 96 || D == 112 || D == 128 || D == 256;
}

template <typename F>
void decode_tile_f32(int64_t D, const float* q, int64_t nr, const float* k, int64_t kld, const float* v, int64_t vld,
                     int64_t n, float* s, float* acc, F&& softmax_step) {
  switch (D / 16) {
    case 2: return decode_tile_f32<2>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    case 4: return decode_tile_f32<4>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    case 5: return decode_tile_f32<5>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    case 6: return decode_tile_f32<6>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    case 7: return decode_tile_f32<7>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    case 8: return decode_tile_f32<8>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
    default: return decode_tile_f32<16>(q, nr, k, kld, v, vld, n, s, acc, softmax_step);
  }
}

// Decode (few query rows per sequence): one task per (sequence, kv head) holding the rows of
// all query heads of its group, so K and V are read from memory once per group (straight from
// the cache when it is fp32, the next tile prefetched); per tile of keys: scores of all
// rows, then per row online_softmax_step() and P.V with accumulators in registers.
template <typename S>
void decode_forward(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  int64_t max_rows = 0;
  for (int64_t b = 0; b < p.n_seq; ++b) max_rows = std::max(max_rows, group * p.seqs[b].q_len);
  // keys per tile: 32 KiB of K (and of V), read once per pair of rows from L1/L2; a tile this
  // size amortizes the per-row softmax step over more keys than a small one
  const int64_t tile = std::clamp<int64_t>(32768 / (D * int64_t(sizeof(A))), 8, kBK);
  const bool fast = std::is_same_v<A, float> && decode_tile_f32_supported(D);
  std::vector<int64_t> cost(p.n_seq * p.Hkv);
  for (int64_t t = 0; t < int64_t(cost.size()); ++t) {
    const Seq& sq = p.seqs[t / p.Hkv];
    cost[t] = group * block_cost(sq, 0, sq.q_len, p.causal);
  }
  TaskQueue queue(cost);
  queue.run(parallel_for, [&] {
    std::vector<A> q(max_rows * D), acc(max_rows * D), s(max_rows * kBK), m(max_rows), l(max_rows);
    std::vector<A> kbuf(std::is_same_v<S, A> ? 0 : kBK * D), vbuf(kbuf.size());
    std::vector<int64_t> vis_end(max_rows);
    for (int64_t t; (t = queue.next()) >= 0;) {
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
        if constexpr (std::is_same_v<A, float>) {
          if (fast) {  // scores, then each row's softmax step, then P.V; rows in registers
            decode_tile_f32(D, q.data(), nr, kt, kld, vt, vld, n, s.data(), acc.data(), [&](int64_t r) {
              const int64_t vis = std::min(j1, vis_end[r]) - j0;
              A* sr = s.data() + r * kBK;
              if (vis <= 0) std::fill(sr, sr + n, A(0));
              else online_softmax_step(sr, n, vis, m[r], l[r], acc.data() + r * D, D);
            });
            continue;
          }
        }
        dot_keys(q.data(), nr, kt, kld, n, D, s.data(), kBK);  // every row against the whole tile
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t vis = std::min(j1, vis_end[r]) - j0;  // visible keys of this row in the tile
          if (vis <= 0) continue;
          A* sr = s.data() + r * kBK;
          online_softmax_step(sr, vis, vis, m[r], l[r], acc.data() + r * D, D);
          accumulate_values(sr, vt, vld, vis, D, acc.data() + r * D);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t h = hk * group + r / sq.q_len, i = r % sq.q_len;
        S* O = static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
        A* lse = static_cast<A*>(static_cast<void*>(p.lse)) + sq.lse_off + h * p.lse_head_stride;
        const A inv = inv_row_sum(l[r]);
        for (int64_t d = 0; d < D; ++d) store(O + d, acc[r * D + d] * inv);
        lse[i * p.lse_row_stride] = row_lse(m[r], l[r]);
      }
    }
  });
}

// ---- training forward and backward: tiles multiplied with the injected BLAS (cpu/blas.h) ----

constexpr int64_t kQB = 128;  // query rows per block (forward task, backward step)
constexpr int64_t kKV = 512;  // keys per chunk

// Forward, per (sequence, head, block of kQB query rows): per chunk of kKV keys,
// S = scale Q K^T (GEMM), online softmax per row, acc = corr * acc + P V (GEMM, beta = 1).
// fp32 / fp64 operands are read in place (row strides as leading dimensions); 16-bit ones are
// converted to fp32 tiles first.
template <typename S>
void forward(const Params& p, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas) {
  using A = acc_t<S>;
  const auto& gemm = blas.gemm<A>();
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  const auto tasks = tasks_for(p, p.H, kQB, [](const Seq& s) { return s.q_len; });
  std::vector<int64_t> cost(tasks.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    const Seq& sq = p.seqs[tasks[t].seq];
    const int64_t i0 = tasks[t].block * kQB;
    cost[t] = block_cost(sq, i0, std::min(sq.q_len, i0 + kQB), p.causal);
  }
  TaskQueue queue(cost);
  queue.run(parallel_for, [&] {
    std::vector<A> qbuf(std::is_same_v<S, A> ? 0 : kQB * D), kbuf(std::is_same_v<S, A> ? 0 : kKV * D),
        vbuf(kbuf.size()), sc(kQB * kKV), acc(kQB * D), m(kQB), l(kQB);
    for (int64_t t; (t = queue.next()) >= 0;) {
      const Task& tk = tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      const int64_t h = tk.head, hk = h / group;
      const int64_t i0 = tk.block * kQB, i1 = std::min(sq.q_len, i0 + kQB), nr = i1 - i0;
      const S* Q = static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride;
      const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
      const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
      int64_t ldq = 0;
      const A* q = as_acc_rows(Q, i0, nr, p.q_row_stride, D, qbuf.data(), &ldq);
      std::fill(acc.begin(), acc.begin() + nr * D, A(0));
      std::fill(m.begin(), m.end(), neg_inf<A>());
      std::fill(l.begin(), l.end(), A(0));
      const int64_t k_hi = visible_end(sq, i1 - 1, p.causal);
      for (int64_t j0 = sq.k_begin; j0 < k_hi; j0 += kKV) {
        const int64_t j1 = std::min(k_hi, j0 + kKV), nk = j1 - j0;
        int64_t ldk = 0, ldv = 0;
        const A* k = as_acc_rows(K, j0, nk, p.k_row_stride, D, kbuf.data(), &ldk);
        const A* v = as_acc_rows(V, j0, nk, p.k_row_stride, D, vbuf.data(), &ldv);
        gemm(false, true, nr, nk, D, scale, q, ldq, k, ldk, A(0), sc.data(), kKV);  // S [nr, nk]
        for (int64_t r = 0; r < nr; ++r)
          online_softmax_step(sc.data() + r * kKV, nk, std::min(j1, visible_end(sq, i0 + r, p.causal)) - j0, m[r], l[r],
                              acc.data() + r * D, D);
        gemm(false, false, nr, D, nk, A(1), sc.data(), kKV, v, ldv, A(1), acc.data(), D);  // acc += P V
      }
      S* O = static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride;
      A* lse = static_cast<A*>(static_cast<void*>(p.lse)) + sq.lse_off + h * p.lse_head_stride;
      for (int64_t r = 0; r < nr; ++r) {
        const A inv = inv_row_sum(l[r]);
        for (int64_t d = 0; d < D; ++d) store(O + (i0 + r) * p.q_row_stride + d, acc[r * D + d] * inv);
        lse[(i0 + r) * p.lse_row_stride] = row_lse(m[r], l[r]);
      }
    }
  });
}

// Backward, recomputing P from the saved lse. delta_i = dO_i . O_i, then one task per
// (sequence, kv head) owns dK, dV of that kv head and dQ of its group's query heads; per query
// block of kQB rows and chunk of kKV keys (5 GEMMs):
//   S = scale Q K^T, P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//   dQ += scale dS K, dK += scale dS^T Q.
// Every output element has one owner task and a fixed summation order: deterministic.
template <typename S>
void backward(const Params& p, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas) {
  using A = acc_t<S>;
  const auto& gemm = blas.gemm<A>();
  const int64_t D = p.D, group = p.H / p.Hkv;
  const A scale = A(p.scale);
  const A* lse_all = static_cast<const A*>(static_cast<const void*>(p.lse));
  A* delta_all = static_cast<A*>(p.delta);
  auto base = [&](const void* ptr, const Seq& sq, int64_t h) {
    return static_cast<const S*>(ptr) + sq.q_off + h * p.q_head_stride;
  };
  auto lse_index = [&](const Seq& sq, int64_t h, int64_t i) {
    return sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
  };
  const auto q_tasks = tasks_for(p, p.H, kQB, [](const Seq& s) { return s.q_len; });
  parallel_for(int64_t(q_tasks.size()), 1, [&](int64_t t0, int64_t t1) {  // delta
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = q_tasks[t];
      const Seq& sq = p.seqs[tk.seq];
      for (int64_t i = tk.block * kQB, i1 = std::min(sq.q_len, i + kQB); i < i1; ++i) {
        const S* o = base(p.o, sq, tk.head) + i * p.q_row_stride;
        const S* g = base(p.dout, sq, tk.head) + i * p.q_row_stride;
        A s = 0;
        for (int64_t d = 0; d < D; ++d) s += load<A>(g + d) * load<A>(o + d);
        delta_all[lse_index(sq, tk.head, i)] = s;
      }
    }
  });
  std::vector<int64_t> cost(p.n_seq * p.Hkv, 0);
  for (int64_t t = 0; t < int64_t(cost.size()); ++t) {
    const Seq& sq = p.seqs[t / p.Hkv];
    for (int64_t i0 = 0; i0 < sq.q_len; i0 += kQB)
      cost[t] += block_cost(sq, i0, std::min(sq.q_len, i0 + kQB), p.causal);
  }
  TaskQueue queue(cost);
  queue.run(parallel_for, [&] {  // dQ, dK, dV
    const bool stage = !std::is_same_v<S, A>;
    std::vector<A> qbuf(stage ? kQB * D : 0), gbuf(qbuf.size()), kbuf(stage ? kKV * D : 0), vbuf(kbuf.size());
    std::vector<A> sc(kQB * kKV), dp(kQB * kKV), dq(kQB * D), dk, dv;
    for (int64_t t; (t = queue.next()) >= 0;) {
      const Seq& sq = p.seqs[t / p.Hkv];
      const int64_t hk = t % p.Hkv, nkeys = sq.k_end;
      const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
      const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
      dk.assign(nkeys * D, A(0));
      dv.assign(nkeys * D, A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < sq.q_len; i0 += kQB) {
          const int64_t i1 = std::min(sq.q_len, i0 + kQB), nr = i1 - i0;
          int64_t ldq = 0, ldg = 0;
          const A* q = as_acc_rows(base(p.q, sq, h), i0, nr, p.q_row_stride, D, qbuf.data(), &ldq);
          const A* g = as_acc_rows(base(p.dout, sq, h), i0, nr, p.q_row_stride, D, gbuf.data(), &ldg);
          std::fill(dq.begin(), dq.begin() + nr * D, A(0));
          const int64_t k_hi = visible_end(sq, i1 - 1, p.causal);
          for (int64_t j0 = sq.k_begin; j0 < k_hi; j0 += kKV) {
            const int64_t j1 = std::min(k_hi, j0 + kKV), nk = j1 - j0;
            int64_t ldk = 0, ldv = 0;
            const A* k = as_acc_rows(K, j0, nk, p.k_row_stride, D, kbuf.data(), &ldk);
            const A* v = as_acc_rows(V, j0, nk, p.k_row_stride, D, vbuf.data(), &ldv);
            gemm(false, true, nr, nk, D, scale, q, ldq, k, ldk, A(0), sc.data(), kKV);  // S
            for (int64_t r = 0; r < nr; ++r)                                            // P
              masked_exp(sc.data() + r * kKV, nk, std::min(j1, visible_end(sq, i0 + r, p.causal)) - j0,
                         lse_all[lse_index(sq, h, i0 + r)]);
            gemm(true, false, nk, D, nr, A(1), sc.data(), kKV, g, ldg, A(1), dv.data() + j0 * D, D);  // dV += P^T dO
            gemm(false, true, nr, nk, D, A(1), g, ldg, v, ldv, A(0), dp.data(), kKV);                 // dP
            for (int64_t r = 0; r < nr; ++r) {                                                         // dS
              A* __restrict sr = sc.data() + r * kKV;
              const A* __restrict dpr = dp.data() + r * kKV;
              const A delta = delta_all[lse_index(sq, h, i0 + r)];
#pragma omp simd
              for (int64_t jj = 0; jj < nk; ++jj) sr[jj] *= dpr[jj] - delta;
            }
            gemm(false, false, nr, D, nk, scale, sc.data(), kKV, k, ldk, A(1), dq.data(), D);          // dQ
            gemm(true, false, nk, D, nr, scale, sc.data(), kKV, q, ldq, A(1), dk.data() + j0 * D, D);  // dK
          }
          S* DQ = static_cast<S*>(p.dq) + sq.q_off + h * p.q_head_stride;
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t d = 0; d < D; ++d) store(DQ + (i0 + r) * p.q_row_stride + d, dq[r * D + d]);
        }
      }
      S* DK = static_cast<S*>(p.dk) + sq.k_off + hk * p.k_head_stride;
      S* DV = static_cast<S*>(p.dv) + sq.k_off + hk * p.k_head_stride;
      for (int64_t j = 0; j < nkeys; ++j)
        for (int64_t d = 0; d < D; ++d) {
          store(DK + j * p.k_row_stride + d, dk[j * D + d]);
          store(DV + j * p.k_row_stride + d, dv[j * D + d]);
        }
    }
  });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas) {
  dispatch_cpu(dtype, [&](auto s) { forward<decltype(s)>(p, parallel_for, blas); });
  return Status::kOk;
}

Status launch_decode_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { decode_forward<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas) {
  dispatch_cpu(dtype, [&](auto s) { backward<decltype(s)>(p, parallel_for, blas); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::attention
