// CPU launchers for linear_token_logprobs (tiling and math in ../linear_token_logprobs.h).
#include "../linear_token_logprobs.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "sgemm.h"

namespace fastrlhf::kernels::linear_token_logprobs {
namespace {

using token_logprobs::exp_term;
using token_logprobs::ExpTerm;
using token_logprobs::finalize;
using token_logprobs::grad_element;
using token_logprobs::RowResult;

// BLAS path (fp64, builds without AVX-512, chunks under kMinPackedChunk tokens): the GEMMs run as
// a fixed grid of panels inside parallel_for, each panel one single-threaded BLAS call
// (csrc/ops/utils.h torch_gemm): results do not depend on the thread count (cpu/parallel.h), and
// a 512-token chunk still gives 16-32 panels for many-core machines. Panels split only output
// dimensions, never a sum. The fp32 AVX-512 path (below) follows the same rules.
constexpr int64_t kTokenPanel = 128, kVocabPanel = 256, kHiddenPanel = 256;
template <typename F>
void for_panels(int64_t rows, int64_t row_panel, int64_t cols, int64_t col_panel, const cpu::ParallelFor& parallel_for,
                F&& f) {
  const int64_t pr = (rows + row_panel - 1) / row_panel, pc = (cols + col_panel - 1) / col_panel;
  parallel_for(pr * pc, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t r0 = q / pc * row_panel, c0 = q % pc * col_panel;
      f(r0, std::min(rows, r0 + row_panel), c0, std::min(cols, c0 + col_panel));
    }
  });
}

// The chunk's hidden states packed for the AVX-512 micro-kernel (cpu/sgemm.h), once per chunk and
// shared by every vocabulary block: h^T in strips of 32 tokens (the B operand of the logits) and,
// for the backward, h in strips of 32 hidden columns (the B operand of grad_weight).
struct ChunkPacks {
  std::vector<float> h_t;  // [ceil(nc / 32)][H][32]
  std::vector<float> h;    // [ceil(H / 32)][nc][32] (backward only)
};

#if defined(FASTRLHF_SGEMM_AVX512)
namespace sg = cpu::sgemm;
constexpr int64_t kGroupRows = sg::kMr * 8;  // vocab rows per work unit: 8 strips of A packed together
static_assert(kBlockQuantum % (2 * kGroupRows) == 0, "vocab blocks: an even number of work units");
// Below this many tokens per chunk the 32-token strips would mostly multiply padding: BLAS path.
constexpr int64_t kMinPackedChunk = 32;
// Work units per product: at least kMinUnits (a second split, of tokens or hidden columns, when
// the first gives fewer), so machines with many cores have work too. Shapes alone decide.
constexpr int64_t kMinUnits = 16;
// grad_hidden packs W's 32-column strip kSubBlock vocab rows at a time (bounded scratch).
constexpr int64_t kSubBlock = 2048;

inline int64_t strips(int64_t n, int64_t w) { return (n + w - 1) / w; }
inline int64_t parts_for(int64_t units, int64_t max_parts) {
  return std::max<int64_t>(1, std::min(max_parts, strips(kMinUnits, std::max<int64_t>(1, units))));
}

void pack_chunk(const float* hidden, int64_t H, int64_t n0, int64_t nc, bool backward, ChunkPacks& packs,
                const cpu::ParallelFor& parallel_for) {
  const int64_t ts = strips(nc, sg::kNr), hs = strips(H, sg::kNr);
  packs.h_t.resize(ts * H * sg::kNr);
  parallel_for(ts, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t q = s0; q < s1; ++q)
      sg::pack_b_transposed(hidden + (n0 + q * sg::kNr) * H, H, std::min<int64_t>(sg::kNr, nc - q * sg::kNr), H,
                            packs.h_t.data() + q * H * sg::kNr);
  });
  if (!backward) return;
  packs.h.resize(hs * nc * sg::kNr);
  parallel_for(hs, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t q = s0; q < s1; ++q)
      sg::pack_b_rows(hidden + n0 * H + q * sg::kNr, H, std::min<int64_t>(sg::kNr, H - q * sg::kNr), nc,
                      packs.h.data() + q * nc * sg::kNr);
  });
}

// C[rows, cols] (+)= A[rows, K] B[K, cols], A row-major (row stride lda), B packed as 32-column
// strips ([K][32] each, padded), C row stride ldc. Work units: a group of 8 strips of A (packed
// once per unit) x a range of B strips.
void row_group_product(int64_t rows, const float* a, int64_t lda, int64_t K, const float* b, int64_t cols, float* c,
                       int64_t ldc, bool accumulate, const cpu::ParallelFor& parallel_for) {
  const int64_t groups = strips(rows, kGroupRows), bs = strips(cols, sg::kNr);
  const int64_t parts = parts_for(groups, bs), per_part = strips(bs, parts);
  cpu::TaskQueue queue(groups * parts);
  queue.run(parallel_for, [&] {
    const std::unique_ptr<float[]> pa(new float[size_t(kGroupRows) * K]);  // uninitialized
    for (int64_t u; (u = queue.next()) >= 0;) {
      const int64_t g = u / parts, s0 = u % parts * per_part, s1 = std::min(bs, s0 + per_part);
      const int64_t rb = g * kGroupRows, re = std::min(rows, rb + kGroupRows), ns = strips(re - rb, sg::kMr);
      auto strip_rows = [&](int64_t q) { return int(std::min<int64_t>(sg::kMr, re - rb - q * sg::kMr)); };
      for (int64_t q = 0; q < ns; ++q)
        sg::pack_a_rows(a + (rb + q * sg::kMr) * lda, lda, strip_rows(q), K, pa.get() + q * sg::kMr * K);
      for (int64_t t = s0; t < s1; ++t) {
        const int64_t n = std::min<int64_t>(sg::kNr, cols - t * sg::kNr);
        for (int64_t q = 0; q < ns; ++q)
          sg::tile_rows(strip_rows(q), K, pa.get() + q * sg::kMr * K, sg::kMr, b + t * K * sg::kNr, sg::kNr,
                        c + (rb + q * sg::kMr) * ldc + t * sg::kNr, ldc, accumulate, sg::lo_mask(n), sg::hi_mask(n));
      }
    }
  });
}
#endif

template <typename T>
struct Tile {
  const T* hidden;
  const T* weight;
  const T* bias;
  int64_t H;
  int64_t n0, nc, v0, vc;  // token chunk and vocab block
  T* data;                 // [vc, nc]: data[v * nc + n] = logit(token n0 + n, vocab v0 + v)

  T bias_at(int64_t v) const { return bias != nullptr ? bias[v0 + v] : T(0); }
  // data = W[v0:v0+vc] h[n0:n0+nc]^T (the bias is added where the tile is read)
  void compute(const cpu::Gemm<T>& gemm, const cpu::ParallelFor& parallel_for) const {
    for_panels(vc, kVocabPanel, nc, kTokenPanel, parallel_for, [&](int64_t v, int64_t v1, int64_t n, int64_t n1) {
      gemm(false, true, v1 - v, n1 - n, H, T(1), weight + (v0 + v) * H, H, hidden + (n0 + n) * H, H, T(0),
           data + v * nc + n, nc);
    });
  }
  // grad_weight[v0:v0+vc] (+)= dL^T h_chunk, with data = dL^T; accumulate: beta = 1
  void grad_weight(const cpu::Gemm<T>& gemm, const cpu::ParallelFor& parallel_for, bool accumulate, T* gw) const {
    for_panels(vc, kVocabPanel, H, kHiddenPanel, parallel_for, [&](int64_t v, int64_t v1, int64_t d, int64_t d1) {
      gemm(false, false, v1 - v, d1 - d, nc, T(1), data + v * nc, nc, hidden + n0 * H + d, H, accumulate ? T(1) : T(0),
           gw + (v0 + v) * H + d, H);
    });
  }
  // grad_hidden[n0:n0+nc] (+)= dL W[v0:v0+vc]
  void grad_hidden(const cpu::Gemm<T>& gemm, const cpu::ParallelFor& parallel_for, bool accumulate, T* gh) const {
    for_panels(nc, kTokenPanel, H, kHiddenPanel, parallel_for, [&](int64_t n, int64_t n1, int64_t d, int64_t d1) {
      gemm(true, false, n1 - n, d1 - d, vc, T(1), data + n, nc, weight + v0 * H + d, H, accumulate ? T(1) : T(0),
           gh + (n0 + n) * H + d, H);
    });
  }

#if defined(FASTRLHF_SGEMM_AVX512)
  // The same three products on the AVX-512 micro-kernel (fp32 only). Work units (row_group_product,
  // and grad_hidden's 32-column hidden strips x ranges of token strips) are handed out from a
  // TaskQueue (a thread slowed by a shared machine takes fewer); scratch is allocated per worker.
  void compute_packed(const ChunkPacks& packs, const cpu::ParallelFor& parallel_for) const {
    static_assert(std::is_same_v<T, float>);
    row_group_product(vc, weight + v0 * H, H, H, packs.h_t.data(), nc, data, nc, false, parallel_for);
  }
  void grad_weight_packed(const ChunkPacks& packs, const cpu::ParallelFor& parallel_for, bool accumulate,
                          float* gw) const {
    row_group_product(vc, data, nc, nc, packs.h.data(), H, gw + v0 * H, H, accumulate, parallel_for);
  }
  // dL^T is read in place (a_k = nc: 14 consecutive tokens per vocab row); W's 32-column strip
  // is packed kSubBlock vocab rows at a time, each sub-block's sum added to C in order.
  void grad_hidden_packed(const cpu::ParallelFor& parallel_for, bool accumulate, float* gh) const {
    const int64_t hs = strips(H, sg::kNr), ns = strips(nc, sg::kMr);
    const int64_t parts = parts_for(hs, ns), per_part = strips(ns, parts);
    cpu::TaskQueue queue(hs * parts);
    queue.run(parallel_for, [&] {
      const std::unique_ptr<float[]> b(new float[size_t(std::min(vc, kSubBlock)) * sg::kNr]);
      for (int64_t u; (u = queue.next()) >= 0;) {
        const int64_t j = u / parts, s0 = u % parts * per_part, s1 = std::min(ns, s0 + per_part);
        const int64_t cols = std::min<int64_t>(sg::kNr, H - j * sg::kNr);
        for (int64_t k0 = 0; k0 < vc; k0 += kSubBlock) {
          const int64_t kc = std::min(kSubBlock, vc - k0);
          sg::pack_b_rows(weight + (v0 + k0) * H + j * sg::kNr, H, cols, kc, b.get());
          for (int64_t q = s0; q < s1; ++q) {
            const int64_t n = q * sg::kMr;
            sg::tile_rows(int(std::min<int64_t>(sg::kMr, nc - n)), kc, data + k0 * nc + n, nc, b.get(), sg::kNr,
                          gh + (n0 + n) * H + j * sg::kNr, H, accumulate || k0 > 0, sg::lo_mask(cols),
                          sg::hi_mask(cols));
          }
        }
      }
    });
  }
#endif
};

// Whether a chunk's products run on cpu/sgemm.h's micro-kernel instead of the injected BLAS.
template <typename T>
bool packed_gemm(int64_t nc) {
#if defined(FASTRLHF_SGEMM_AVX512)
  return std::is_same_v<T, float> && nc >= kMinPackedChunk;
#else
  (void)nc;
  return false;
#endif
}

// Tokens (tile columns) per work unit of the statistics pass. The pass walks the tile's rows in
// order, each row's kCols entries contiguous (so the hardware prefetcher streams the tile), and
// keeps the unit's per-token accumulators in L1.
constexpr int64_t kCols = 64;
// Independent partial sums per grad_bias row (vectorized, short fp32 chains).
constexpr int kLanes = 32;

// Online row statistics of tokens [c, c + w) of the tile (w <= kCols): their running m, s, e
// are updated with the tile's vc logits x = (logit + bias) * inv_t. Within the tile each token
// sums vc terms in order; tiles are merged by the rescaling in linear_token_logprobs.h.
template <typename T>
void update_stats(const Tile<T>& t, int64_t c, int64_t w, T inv_t, T* m, T* s, T* e) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T bm[kCols], ref[kCols], ts[kCols], te[kCols];
  for (int64_t l = 0; l < w; ++l) bm[l] = kNegInf, ts[l] = T(0), te[l] = T(0);
  for (int64_t v = 0; v < t.vc; ++v) {
    const T* row = t.data + v * t.nc + c;
    const T b = t.bias_at(v);
    for (int64_t l = 0; l < w; ++l) {
      const T x = (row[l] + b) * inv_t;
      bm[l] = x > bm[l] ? x : bm[l];
    }
  }
  for (int64_t l = 0; l < w; ++l) {
    const T mo = m[l], mn = bm[l] > mo ? bm[l] : mo;
    // rescale the running sums to the new max; a token with no finite logit so far has none
    const bool live = mo > kNegInf;
    const T r = live ? fast_exp(mo - mn) : T(0);
    e[l] = live ? r * (e[l] + s[l] * (mo - mn)) : T(0);
    s[l] = live ? r * s[l] : T(0);
    m[l] = mn;
    ref[l] = mn > kNegInf ? mn : T(0);  // all -inf so far: exp(-inf - 0) = 0, not NaN
  }
  for (int64_t v = 0; v < t.vc; ++v) {
    const T* row = t.data + v * t.nc + c;
    const T b = t.bias_at(v);
    for (int64_t l = 0; l < w; ++l) {
      const ExpTerm<T> et = exp_term((row[l] + b) * inv_t, ref[l]);
      ts[l] += et.ex;
      te[l] += et.ex_d;
    }
  }
  for (int64_t l = 0; l < w; ++l) s[l] += ts[l], e[l] += te[l];
}

// The chosen tokens' scaled logits that fall in this tile's vocab block -> x_tok.
template <typename T>
void gather_tokens(const Tile<T>& t, const int64_t* tokens, T inv_t, T* x_tok) {
  for (int64_t n = 0; n < t.nc; ++n) {
    const int64_t v = tokens[t.n0 + n] - t.v0;
    if (v >= 0 && v < t.vc) x_tok[n] = (t.data[v * t.nc + n] + t.bias_at(v)) * inv_t;
  }
}

template <typename T>
void compute_setup(const void* hidden, int64_t H, int64_t n0, int64_t nc, bool backward, ChunkPacks& packs,
                   const cpu::ParallelFor& parallel_for) {
#if defined(FASTRLHF_SGEMM_AVX512)
  if constexpr (std::is_same_v<T, float>)
    if (packed_gemm<T>(nc)) pack_chunk(static_cast<const float*>(hidden), H, n0, nc, backward, packs, parallel_for);
#endif
}

template <typename T>
void compute_tile(const Tile<T>& t, const cpu::Gemm<T>& gemm, const ChunkPacks& packs,
                  const cpu::ParallelFor& parallel_for) {
#if defined(FASTRLHF_SGEMM_AVX512)
  if constexpr (std::is_same_v<T, float>)
    if (packed_gemm<T>(t.nc)) return t.compute_packed(packs, parallel_for);
#endif
  t.compute(gemm, parallel_for);
}

template <typename T>
Status run(const Params& p, const cpu::Blas& blas, const cpu::ParallelFor& parallel_for) {
  const T inv_t = T(p.inv_temperature);
  for (int64_t i = 0; i < p.N; ++i)
    if (p.tokens[i] < 0 || p.tokens[i] >= p.V) return Status::kIndexOutOfRange;
  const auto& gemm = blas.gemm<T>();
  const int64_t NC = p.tiles.chunk, VC = p.tiles.block;
  T* m = static_cast<T*>(p.scratch);
  T* s = m + NC;
  T* e = s + NC;
  T* x_tok = e + NC;
  ChunkPacks packs;
  for (int64_t n0 = 0; n0 < p.N; n0 += NC) {
    const int64_t nc = std::min(NC, p.N - n0);
    std::fill(m, m + nc, -std::numeric_limits<T>::infinity());
    std::fill(s, s + nc, T(0));
    std::fill(e, e + nc, T(0));
    compute_setup<T>(p.hidden, p.H, n0, nc, false, packs, parallel_for);
    for (int64_t v0 = 0; v0 < p.V; v0 += VC) {
      const Tile<T> t{static_cast<const T*>(p.hidden),
                      static_cast<const T*>(p.weight),
                      static_cast<const T*>(p.bias),
                      p.H,
                      n0,
                      nc,
                      v0,
                      std::min(VC, p.V - v0),
                      static_cast<T*>(p.tile)};
      compute_tile(t, gemm, packs, parallel_for);
      gather_tokens(t, p.tokens, inv_t, x_tok);
      parallel_for((nc + kCols - 1) / kCols, 1, [&](int64_t u0, int64_t u1) {
        const T it = inv_t;
        for (int64_t c = u0 * kCols; c < std::min(nc, u1 * kCols); c += kCols)
          update_stats(t, c, std::min(kCols, nc - c), it, m + c, s + c, e + c);
      });
    }
    T* lp = static_cast<T*>(p.logprobs) + n0;
    T* ent = static_cast<T*>(p.entropy) + n0;
    T* stats = static_cast<T*>(p.row_stats) + 2 * n0;
    for (int64_t n = 0; n < nc; ++n) {
      const RowResult<T> r = finalize(m[n], s[n], e[n], x_tok[n]);
      lp[n] = r.logprob, ent[n] = r.entropy;
      stats[2 * n] = r.max, stats[2 * n + 1] = r.log_sum;
    }
  }
  return Status::kOk;
}

template <typename T>
Status run_backward(const BackwardParams& p, const cpu::Blas& blas, const cpu::ParallelFor& parallel_for) {
  const T inv_t = T(p.inv_temperature);
  const auto& gemm = blas.gemm<T>();
  T* gw = static_cast<T*>(p.grad_weight);
  T* gb = static_cast<T*>(p.grad_bias);
  if (p.N == 0) {
    std::fill(gw, gw + p.V * p.H, T(0));
    if (gb != nullptr) std::fill(gb, gb + p.V, T(0));
    return Status::kOk;
  }
  const int64_t NC = p.tiles.chunk, VC = p.tiles.block;
  // per-chunk token vectors, contiguous so the tile pass vectorizes over tokens
  T* m = static_cast<T*>(p.scratch);
  T* log_s = m + NC;
  T* ent = log_s + NC;
  T* g = ent + NC;
  T* h = g + NC;
  T* x_tok = h + NC;
  const T* stats = static_cast<const T*>(p.row_stats);
  const bool with_entropy = p.grad_entropy != nullptr;
  ChunkPacks packs;
  for (int64_t n0 = 0; n0 < p.N; n0 += NC) {
    const int64_t nc = std::min(NC, p.N - n0);
    compute_setup<T>(p.hidden, p.H, n0, nc, true, packs, parallel_for);
    const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 15) / nc);  // tile rows per task: >= 32K logits
    for (int64_t n = 0; n < nc; ++n) {
      m[n] = stats[2 * (n0 + n)], log_s[n] = stats[2 * (n0 + n) + 1];
      ent[n] = static_cast<const T*>(p.entropy)[n0 + n];
      g[n] = p.grad_logprobs != nullptr ? static_cast<const T*>(p.grad_logprobs)[n0 + n] : T(0);
      h[n] = with_entropy ? static_cast<const T*>(p.grad_entropy)[n0 + n] : T(0);
    }
    for (int64_t v0 = 0; v0 < p.V; v0 += VC) {
      const Tile<T> t{static_cast<const T*>(p.hidden),
                      static_cast<const T*>(p.weight),
                      static_cast<const T*>(p.bias),
                      p.H,
                      n0,
                      nc,
                      v0,
                      std::min(VC, p.V - v0),
                      static_cast<T*>(p.tile)};
      compute_tile(t, gemm, packs, parallel_for);
      gather_tokens(t, p.tokens, inv_t, x_tok);
      // logits -> dlogits in place, rows (vocab entries) in parallel, vectorized over tokens
      parallel_for(t.vc, row_grain, [&](int64_t r0, int64_t r1) {
        const T it = inv_t;  // locals, not captures: stores to the tile could alias captured floats
        const T *mm = m, *ls = log_s, *H = ent, *gg = g, *hh = h;
        const int64_t cols = nc;
        for (int64_t v = r0; v < r1; ++v) {
          T* row = t.data + v * cols;
          const T b = t.bias_at(v);
          if (!with_entropy) {  // dlogits = -g p / temperature
            for (int64_t n = 0; n < cols; ++n) row[n] = -gg[n] * it * fast_exp(((row[n] + b) * it - mm[n]) - ls[n]);
          } else {
            for (int64_t n = 0; n < cols; ++n)
              row[n] = grad_element((row[n] + b) * it, mm[n], ls[n], H[n], gg[n], hh[n]) * it;
          }
        }
      });
      // the chosen tokens' + g, recomputed from their logit (as token_logprobs' backward)
      for (int64_t n = 0; n < nc; ++n) {
        const int64_t v = p.tokens[n0 + n] - v0;
        if (v >= 0 && v < t.vc)
          t.data[v * nc + n] = (grad_element(x_tok[n], m[n], log_s[n], ent[n], g[n], h[n]) + g[n]) * inv_t;
      }
      bool done = false;
#if defined(FASTRLHF_SGEMM_AVX512)
      if constexpr (std::is_same_v<T, float>) {
        if (packed_gemm<T>(nc)) {
          t.grad_weight_packed(packs, parallel_for, n0 > 0, gw);
          t.grad_hidden_packed(parallel_for, v0 > 0, static_cast<T*>(p.grad_hidden));
          done = true;
        }
      }
#endif
      if (!done) {
        t.grad_weight(gemm, parallel_for, n0 > 0, gw);
        t.grad_hidden(gemm, parallel_for, v0 > 0, static_cast<T*>(p.grad_hidden));
      }
      if (gb != nullptr) {
        parallel_for(t.vc, row_grain, [&](int64_t r0, int64_t r1) {
          for (int64_t v = r0; v < r1; ++v) {
            const T* row = t.data + v * nc;
            T acc[kLanes] = {};
            int64_t n = 0;
            for (; n + kLanes <= nc; n += kLanes)
              for (int l = 0; l < kLanes; ++l) acc[l] += row[n + l];
            for (int l = 0; n < nc; ++n, ++l) acc[l] += row[n];
            T sum = T(0);
            for (int l = 0; l < kLanes; ++l) sum += acc[l];
            gb[v0 + v] = (n0 == 0 ? T(0) : gb[v0 + v]) + sum;
          }
        });
      }
    }
  }
  return Status::kOk;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::Blas& blas, const cpu::ParallelFor& parallel_for) {
  if (dtype == DType::kFloat64) return run<double>(p, blas, parallel_for);
  return run<float>(p, blas, parallel_for);
}

Status launch_backward_cpu(const BackwardParams& p, DType dtype, const cpu::Blas& blas,
                           const cpu::ParallelFor& parallel_for) {
  if (dtype == DType::kFloat64) return run_backward<double>(p, blas, parallel_for);
  return run_backward<float>(p, blas, parallel_for);
}

}  // namespace fastrlhf::kernels::linear_token_logprobs
