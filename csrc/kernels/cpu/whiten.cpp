// CPU launcher for whiten (math in ../whiten.h). Two-pass statistics (sum, then squared
// deviations from the mean) over fixed chunks of kChunk elements, each chunk accumulated in
// kLanes independent lanes (vectorizable, and more accurate than one running sum); chunk partials
// are combined serially in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <vector>

#include "../whiten.h"

namespace fastrlhf::kernels::whiten {
namespace {

constexpr int64_t kChunk = 1 << 15;
constexpr int kLanes = 16;

template <typename A>
A lane_sum(const A* lanes) {
  A s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// Sum over [i0, i1) of f(x[i]) for valid elements, in kLanes lanes; also counts valid elements.
template <typename S, typename A, typename F>
void chunk_sum(const S* x, const uint8_t* mask, int64_t i0, int64_t i1, F f, A& sum, A& count) {
  A acc[kLanes] = {}, cnt[kLanes] = {};
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) {
      const bool valid = mask ? mask[i + l] != 0 : true;
      acc[l] += valid ? f(load<A>(x + i + l)) : A(0);
      cnt[l] += valid ? A(1) : A(0);
    }
  }
  for (int l = 0; i < i1; ++i, ++l) {
    const bool valid = mask ? mask[i] != 0 : true;
    acc[l] += valid ? f(load<A>(x + i)) : A(0);
    cnt[l] += valid ? A(1) : A(0);
  }
  sum = lane_sum(acc);
  count = lane_sum(cnt);
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  const int64_t n_chunks = (p.n + kChunk - 1) / kChunk;
  std::vector<A> sums(n_chunks), counts(n_chunks);
  auto chunk_range = [&](int64_t c) { return std::pair{c * kChunk, std::min(p.n, (c + 1) * kChunk)}; };

  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto [i0, i1] = chunk_range(c);
      chunk_sum<S, A>(x, p.mask, i0, i1, [](A v) { return v; }, sums[c], counts[c]);
    }
  });
  A sum = 0, count = 0;
  for (int64_t c = 0; c < n_chunks; ++c) sum += sums[c], count += counts[c];
  const A mean = count > A(0) ? sum / count : A(0);

  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto [i0, i1] = chunk_range(c);
      chunk_sum<S, A>(x, p.mask, i0, i1, [mean](A v) { return (v - mean) * (v - mean); },
                      sums[c], counts[c]);
    }
  });
  A sq = 0;
  for (int64_t c = 0; c < n_chunks; ++c) sq += sums[c];
  const A rstd = rstd_from(sq, count, p.unbiased, A(p.eps));

  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto [i0, i1] = chunk_range(c);
      for (int64_t i = i0; i < i1; ++i) {
        const bool valid = p.mask ? p.mask[i] != 0 : true;
        store(out + i, apply(load<A>(x + i), valid, mean, rstd, p.shift_mean));
      }
    }
  });
  *static_cast<A*>(p.mean) = mean;
  *static_cast<A*>(p.rstd) = rstd;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::whiten
