// CPU launcher for gae / discounted_returns (math in ../gae.h).
//
// Many rows: rows are split across threads; within a thread kRows rows are scanned together,
// interleaved, so that kRows independent dependency chains hide the FMA latency of the scan.
// Few long rows: each row is cut into kChunk-step chunks; pass 1 computes every chunk's affine
// map in parallel, a short serial pass turns them into carry-in states, pass 2 replays each
// chunk from its carry-in in parallel.
#include <algorithm>
#include <vector>

#include "../gae.h"

namespace fastrlhf::kernels::gae {
namespace {

constexpr int kRows = 8;
constexpr int64_t kChunk = 2048;           // time steps per chunk in the chunked mode
constexpr int64_t kChunkedMaxRows = 8;     // rows below this count ...
constexpr int64_t kChunkedMinT = 4 * kChunk;  // ... and at least this long use the chunked mode

template <typename S>
struct Row {
  const S* r;
  const S* v;
  const uint8_t* m;
  const uint8_t* d;
  S* adv;
  S* ret;
};

template <typename S>
Row<S> row_ptrs(const Params& p, int64_t b) {
  const int64_t o = b * p.T;
  auto at = [o](const void* base) { return base ? static_cast<const S*>(base) + o : nullptr; };
  return Row<S>{at(p.rewards),
                at(p.values),
                p.mask ? p.mask + o : nullptr,
                p.dones ? p.dones + o : nullptr,
                static_cast<S*>(p.advantages) + o,
                p.returns ? static_cast<S*>(p.returns) + o : nullptr};
}

template <typename S, typename A>
A initial_nv(const Params& p, int64_t b) {
  return p.last_values ? load<A>(static_cast<const S*>(p.last_values) + b) : A(0);
}

// Scans steps [t_begin, t_end) of R rows backwards from the given states, writing outputs.
template <typename S, typename A, int R>
void scan_rows(const Row<S>* rows, State<A>* st, int64_t t_begin, int64_t t_end, A gamma,
               A gamma_lam) {
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      const Row<S>& w = rows[k];
      const A r = load<A>(w.r + t);
      const A v = w.v ? load<A>(w.v + t) : A(0);
      const bool valid = w.m ? w.m[t] != 0 : true;
      const bool done = w.d ? w.d[t] != 0 : false;
      const A adv = step(st[k], r, v, valid, done, gamma, gamma_lam);
      store(w.adv + t, adv);
      if (w.ret) store(w.ret + t, valid ? adv + v : A(0));
    }
  }
}

template <typename S, typename A>
void run_rows(const Params& p, int64_t b0, int64_t b1) {
  const A gamma = A(p.gamma), gamma_lam = A(p.gamma * p.lam);
  int64_t b = b0;
  for (; b + kRows <= b1; b += kRows) {
    Row<S> rows[kRows];
    State<A> st[kRows];
    for (int k = 0; k < kRows; ++k) {
      rows[k] = row_ptrs<S>(p, b + k);
      st[k] = State<A>{A(0), initial_nv<S, A>(p, b + k)};
    }
    scan_rows<S, A, kRows>(rows, st, 0, p.T, gamma, gamma_lam);
  }
  for (; b < b1; ++b) {
    Row<S> row = row_ptrs<S>(p, b);
    State<A> st{A(0), initial_nv<S, A>(p, b)};
    scan_rows<S, A, 1>(&row, &st, 0, p.T, gamma, gamma_lam);
  }
}

template <typename S, typename A>
void run_chunked(const Params& p, const cpu::ParallelFor& parallel_for) {
  const A gamma = A(p.gamma), gamma_lam = A(p.gamma * p.lam);
  const int64_t n_chunks = (p.T + kChunk - 1) / kChunk;
  const int64_t n_tasks = p.B * n_chunks;
  std::vector<Map<A>> maps(n_tasks);
  std::vector<State<A>> carry(n_tasks);

  // pass 1: the affine map of every chunk
  parallel_for(n_tasks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_chunks, c = i % n_chunks;
      const Row<S> w = row_ptrs<S>(p, b);
      const int64_t t0 = c * kChunk, t1 = std::min(p.T, t0 + kChunk);
      Map<A> m = identity_map<A>();
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const A v = w.v ? load<A>(w.v + t) : A(0);
        const bool valid = w.m ? w.m[t] != 0 : true;
        const bool done = w.d ? w.d[t] != 0 : false;
        m = compose(step_map(load<A>(w.r + t), v, valid, done, gamma, gamma_lam), m);
      }
      maps[i] = m;
    }
  });
  // serial: carry-in state of every chunk, right to left
  for (int64_t b = 0; b < p.B; ++b) {
    State<A> s{A(0), initial_nv<S, A>(p, b)};
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      carry[b * n_chunks + c] = s;
      s = apply(maps[b * n_chunks + c], s);
    }
  }
  // pass 2: replay every chunk from its carry-in
  parallel_for(n_tasks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_chunks, c = i % n_chunks;
      const Row<S> w = row_ptrs<S>(p, b);
      State<A> s = carry[i];
      scan_rows<S, A, 1>(&w, &s, c * kChunk, std::min(p.T, (c + 1) * kChunk), gamma, gamma_lam);
    }
  });
}

template <typename S>
void run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  if (p.B < kChunkedMaxRows && p.T >= kChunkedMinT) {
    run_chunked<S, A>(p, parallel_for);
    return;
  }
  // grain: enough rows that each task streams at least ~64K steps
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 16) / std::max<int64_t>(p.T, 1));
  parallel_for(p.B, grain, [&](int64_t b0, int64_t b1) { run_rows<S, A>(p, b0, b1); });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.B == 0 || p.T == 0) return Status::kOk;
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::gae
