// CPU launcher for whiten (math in ../whiten.h). Statistics per fixed chunk of kChunk elements
// (count, mean, sum of squared deviations: two passes over a chunk that stays in L2), chunks
// combined with Chan's formula serially in chunk order -- so results do not depend on the thread
// count -- then one apply pass. Memory traffic: about two reads and one write of x.
#include <algorithm>
#include <vector>

#include "../whiten.h"

namespace fastrlhf::kernels::whiten {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Stats { double n, mean, m2; };

// Valid elements of [i0, i1) as numbers (1/0), not bools, so that the loops vectorize.
// The sum runs over x - shift, shift = the chunk's first valid element (as group_advantages
// shifts): equal inputs then give a mean equal to them and deviations of exactly 0, where a plain
// fp32 sum rounds and whitening would blow the rounding up into noise of ~1e-3.
template <typename S, typename A, bool kMask>
Stats chunk_stats(const S* x, const uint8_t* mask, int64_t i0, int64_t i1) {
  int64_t first = i0;
  if constexpr (kMask)
    while (first < i1 && !mask[first]) ++first;
  const A shift = first < i1 ? load<A>(x + first) : A(0);
  A sum = 0, cnt = 0;
#pragma omp simd reduction(+ : sum, cnt)
  for (int64_t i = i0; i < i1; ++i) {
    const A v = kMask ? (mask[i] ? A(1) : A(0)) : A(1);
    const A xv = load<A>(x + i) - shift;
    sum += v > A(0) ? xv : A(0);  // select: masked NaN/Inf never enter
    cnt += v;
  }
  const A mean = cnt > A(0) ? shift + sum / cnt : A(0);
  A sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = i0; i < i1; ++i) {
    const A v = kMask ? (mask[i] ? A(1) : A(0)) : A(1);
    const A d = load<A>(x + i) - mean;
    sq += v > A(0) ? d * d : A(0);
  }
  return Stats{double(cnt), double(mean), double(sq)};
}

// Chan et al.: the statistics of the union of two disjoint sets.
Stats merge(const Stats& a, const Stats& b) {
  const double n = a.n + b.n;
  if (!(n > 0)) return Stats{0, 0, 0};
  if (!(a.n > 0)) return b;
  if (!(b.n > 0)) return a;
  const double delta = b.mean - a.mean;
  return Stats{n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

template <typename S, bool kMask>
void run_masked(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  const int64_t n_chunks = (p.n + kChunk - 1) / kChunk;
  std::vector<Stats> parts(n_chunks);
  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      parts[c] = chunk_stats<S, A, kMask>(x, p.mask, c * kChunk, std::min(p.n, (c + 1) * kChunk));
  });
  Stats total{0, 0, 0};
  for (const Stats& s : parts) total = merge(total, s);
  const A mean = A(total.mean);
  const A rstd = rstd_from(A(total.m2), A(total.n), p.unbiased, A(p.eps));
  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i1 = std::min(p.n, (c + 1) * kChunk);
#pragma omp simd
      for (int64_t i = c * kChunk; i < i1; ++i) {
        const bool valid = kMask ? p.mask[i] != 0 : true;
        store(out + i, apply(load<A>(x + i), valid, mean, rstd, p.shift_mean));
      }
    }
  });
  *static_cast<A*>(p.mean) = mean;
  *static_cast<A*>(p.rstd) = rstd;
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  if (p.mask) run_masked<S, true>(p, parallel_for);
  else run_masked<S, false>(p, parallel_for);
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::whiten
