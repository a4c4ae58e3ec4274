// Generalized advantage estimation (and plain discounted returns) as a reverse scan.
//
// Per row, walking t from T-1 down to 0, with state s = (A, nv): the advantage and the value of
// the next *valid* step (initially A = 0, nv = last_value, or 0 when there is none):
//   valid t, done d:  delta = r_t + gamma * (1 - d) * nv - v_t
//                     A_t   = delta + gamma * lam * (1 - d) * A
//                     s    <- (A_t, v_t)
//   invalid t:        output 0, s unchanged (the step is transparent: its reward, value and done
//                     flag are ignored)
// Discounted returns are the same scan with v == 0 and lam == 1: R_t = r_t + gamma (1-d) R.
//
// The step is an affine map of s, so a run of steps composes into one map (a 3x3 matrix acting on
// (A, nv, 1), stored as 5 numbers). Chunked launchers (CPU with few long rows, CUDA blocks) scan
// chunk maps to get each chunk's carry-in, then replay their chunk sequentially.
#pragma once

#include "common.h"

namespace fastrlhf::kernels::gae {

// Launch parameters: every tensor is contiguous [B, T] (last_values [B]).
struct Params {
  const void* rewards = nullptr;      // [B, T] storage dtype
  const void* values = nullptr;       // [B, T] or nullptr (== 0: discounted returns)
  const uint8_t* mask = nullptr;      // [B, T] bool or nullptr (all valid)
  const uint8_t* dones = nullptr;     // [B, T] bool or nullptr (no episode ends)
  const void* last_values = nullptr;  // [B] or nullptr (bootstrap 0 after the last valid step)
  void* advantages = nullptr;         // [B, T] out (the returns, for discounted_returns)
  void* returns = nullptr;            // [B, T] out or nullptr: A + v at valid steps, 0 elsewhere
  int64_t B = 0, T = 0;
  double gamma = 1.0, lam = 1.0;
};

template <typename A>
struct State {
  A adv;  // advantage of the next valid step (0 after the last)
  A nv;   // value of the next valid step (last_value after the last)
};

// One step of the recurrence, branch-free. Returns the output for step t (0 if invalid).
// A done step selects instead of multiplying by 0, so a NaN/Inf after an episode end never
// leaks into the finished episode.
template <typename A>
FRL_HD A step(State<A>& s, A r, A v, bool valid, bool done, A gamma, A gamma_lam) {
  const A delta = (done ? r : r + gamma * s.nv) - v;
  const A adv = done ? delta : delta + gamma_lam * s.adv;
  s.adv = valid ? adv : s.adv;
  s.nv = valid ? v : s.nv;
  return valid ? adv : A(0);
}

// The affine map s_in -> s_out of a run of steps:
//   adv_out = c_adv + m_adv * adv_in + m_nv * nv_in       (no input term at all when `cut`)
//   nv_out  = p + q * nv_in                                (q is exactly 0 or 1)
// `cut`: the run holds a valid done step, so its output does not depend on the input state.
// Keeping that as a flag (not as m_adv = m_nv = 0) matters: (gamma lam)^n underflows to an exact
// 0 after ~2000 steps in fp32, and such a 0 must still multiply (NaN/Inf propagate as in the
// sequential recurrence), while a cut must not.
template <typename A>
struct Map {
  A c_adv, m_adv, m_nv, p, q;
  bool cut;
};

template <typename A>
FRL_HD Map<A> identity_map() { return Map<A>{A(0), A(1), A(0), A(0), A(1), false}; }

template <typename A>
FRL_HD Map<A> step_map(A r, A v, bool valid, bool done, A gamma, A gamma_lam) {
  if (!valid) return identity_map<A>();
  if (done) return Map<A>{r - v, A(0), A(0), v, A(0), true};
  return Map<A>{r - v, gamma_lam, gamma, v, A(0), false};
}

// q is 0 (a valid step) or 1 (none): q * x selects, so a masked NaN never enters.
template <typename A>
FRL_HD A select_q(A q, A x) { return q == A(0) ? A(0) : x; }

// Composition "left after right": the map of steps [i, k) given `left` for [i, j) and `right`
// for [j, k). The scan runs right to left, so `right` is applied to the state first.
template <typename A>
FRL_HD Map<A> compose(const Map<A>& left, const Map<A>& right) {
  const bool cut = left.cut || right.cut;
  return Map<A>{left.c_adv + (left.cut ? A(0) : left.m_adv * right.c_adv + left.m_nv * right.p),
                cut ? A(0) : left.m_adv * right.m_adv,
                cut ? A(0) : left.m_adv * right.m_nv + left.m_nv * right.q,
                left.p + select_q(left.q, right.p),
                left.q * right.q,
                cut};
}

template <typename A>
FRL_HD State<A> apply(const Map<A>& m, const State<A>& s) {
  return State<A>{m.c_adv + (m.cut ? A(0) : m.m_adv * s.adv + m.m_nv * s.nv), m.p + select_q(m.q, s.nv)};
}

}  // namespace fastrlhf::kernels::gae

// ---- launchers ---------------------------------------------------------------------------
#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::gae {
// CPU: rows in parallel; rows much longer than they are many are split into fixed chunks of
// time that are scanned in parallel and stitched with their affine maps.
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// CUDA: one block per row; each thread owns a contiguous chunk of time; chunk maps are scanned
// across the block to give every thread its carry-in. No host synchronization.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::gae
