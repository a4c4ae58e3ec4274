// CPU launcher for gae / discounted_returns (math in ../gae.h).
//
// Many rows: rows are split across threads; within a thread kRows rows are scanned together,
// interleaved, so that kRows independent dependency chains hide the latency of the scan. For
// fp32 on AVX2 machines the kRows = 8 rows are the lanes of one vector: 8x8 blocks are
// transposed in registers on the way in and out.
// Few long rows: each row is cut into kChunk-step chunks; pass 1 computes every chunk's affine
// map in parallel, a short serial pass turns them into carry-in states, pass 2 replays each
// chunk from its carry-in in parallel.
#include <algorithm>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

#include "../gae.h"

namespace fastrlhf::kernels::gae {
namespace {

constexpr int kRows = 8;
constexpr int64_t kChunk = 2048;              // time steps per chunk in the chunked mode
constexpr int64_t kChunkedMaxRows = 8;        // rows below this count ...
constexpr int64_t kChunkedMinT = 4 * kChunk;  // ... and at least this long use the chunked mode

// Calls f.template operator()<kValues, kMask, kDones>() for the tensors present in p (values
// and returns are present together: gae; or absent together: discounted_returns).
template <typename F>
void with_flags(const Params& p, F&& f) {
  const int key = (p.values ? 4 : 0) | (p.mask ? 2 : 0) | (p.dones ? 1 : 0);
  switch (key) {
    case 7: return f.template operator()<true, true, true>();
    case 6: return f.template operator()<true, true, false>();
    case 5: return f.template operator()<true, false, true>();
    case 4: return f.template operator()<true, false, false>();
    case 3: return f.template operator()<false, true, true>();
    case 2: return f.template operator()<false, true, false>();
    case 1: return f.template operator()<false, false, true>();
    default: return f.template operator()<false, false, false>();
  }
}

template <typename S, typename A>
A initial_nv(const Params& p, int64_t b) {
  return p.last_values ? load<A>(static_cast<const S*>(p.last_values) + b) : A(0);
}

// Scans steps [t_begin, t_end) of the R consecutive rows b.. backwards from states st (updated),
// writing advantages (and returns when kValues).
template <typename S, typename A, int R, bool kValues, bool kMask, bool kDones>
void scan_rows(const Params& p, int64_t b, State<A>* st, int64_t t_begin, int64_t t_end) {
  const A gamma = A(p.gamma), gamma_lam = A(p.gamma * p.lam);
  const int64_t T = p.T, o = b * T;
  const S* __restrict r = static_cast<const S*>(p.rewards) + o;
  const S* __restrict v = kValues ? static_cast<const S*>(p.values) + o : nullptr;
  const uint8_t* __restrict m = kMask ? p.mask + o : nullptr;
  const uint8_t* __restrict d = kDones ? p.dones + o : nullptr;
  S* __restrict adv = static_cast<S*>(p.advantages) + o;
  S* __restrict ret = kValues ? static_cast<S*>(p.returns) + o : nullptr;
  State<A> s[R];
  for (int k = 0; k < R; ++k) s[k] = st[k];
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k) {
      const int64_t i = k * T + t;
      const A vt = kValues ? load<A>(v + i) : A(0);
      const bool valid = kMask ? m[i] != 0 : true;
      const A a = step(s[k], load<A>(r + i), vt, valid, kDones ? d[i] != 0 : false, gamma, gamma_lam);
      store(adv + i, a);
      if constexpr (kValues) store(ret + i, valid ? a + vt : A(0));
    }
  }
  for (int k = 0; k < R; ++k) st[k] = s[k];
}

#if defined(__AVX2__) && defined(__FMA__)
// fp32 fast path: 8 rows as the 8 lanes of a vector. Each 8x8 block (8 rows x 8 steps) is
// loaded row-wise and transposed in registers, so lane k of vector i is step t+i of row k.
inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

struct Block8 { __m256 v[8]; };

// Loads the 8x8 block at rows b..b+7, steps t..t+7 and transposes it: v[i] = step t+i.
inline Block8 load_block(const float* base, int64_t T) {
  Block8 x;
  for (int k = 0; k < 8; ++k) x.v[k] = _mm256_loadu_ps(base + k * T);
  transpose8(x.v[0], x.v[1], x.v[2], x.v[3], x.v[4], x.v[5], x.v[6], x.v[7]);
  return x;
}
// Bytes -> lane masks: all ones where the byte is non-zero, else all zeros.
inline Block8 load_block(const uint8_t* base, int64_t T) {
  Block8 x;
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1);
  for (int k = 0; k < 8; ++k) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + k * T)));
    x.v[k] = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(w, zero), ones));
  }
  transpose8(x.v[0], x.v[1], x.v[2], x.v[3], x.v[4], x.v[5], x.v[6], x.v[7]);
  return x;
}
inline void store_block(Block8 x, float* base, int64_t T) {
  transpose8(x.v[0], x.v[1], x.v[2], x.v[3], x.v[4], x.v[5], x.v[6], x.v[7]);
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(base + k * T, x.v[k]);
}

// Scans steps [t_lo, t_hi) of rows b..b+7 ((t_hi - t_lo) % 8 == 0) from states st (updated).
template <bool kV, bool kM, bool kD>
void scan_rows8_avx2(const Params& p, int64_t b, State<float>* st, int64_t t_lo, int64_t t_hi) {
  const int64_t T = p.T, o = b * T;
  const __m256 gamma = _mm256_set1_ps(float(p.gamma)), gamma_lam = _mm256_set1_ps(float(p.gamma * p.lam));
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float adv0[8], nv0[8];
  for (int k = 0; k < 8; ++k) adv0[k] = st[k].adv, nv0[k] = st[k].nv;
  __m256 adv = _mm256_load_ps(adv0), nv = _mm256_load_ps(nv0);
  const float* r = static_cast<const float*>(p.rewards) + o;
  const float* v = kV ? static_cast<const float*>(p.values) + o : nullptr;
  float* out = static_cast<float*>(p.advantages) + o;
  float* ret = kV ? static_cast<float*>(p.returns) + o : nullptr;
  for (int64_t t = t_hi - 8; t >= t_lo; t -= 8) {
    const Block8 rb = load_block(r + t, T);
    Block8 vb, mb, db, ab, retb;
    if constexpr (kV) vb = load_block(v + t, T);
    if constexpr (kM) mb = load_block(p.mask + o + t, T);
    if constexpr (kD) db = load_block(p.dones + o + t, T);
    for (int i = 7; i >= 0; --i) {
      const __m256 vt = kV ? vb.v[i] : zero;
      __m256 boot = _mm256_fmadd_ps(gamma, nv, rb.v[i]);
      if constexpr (kD) boot = _mm256_blendv_ps(boot, rb.v[i], db.v[i]);  // done: no bootstrap
      const __m256 delta = _mm256_sub_ps(boot, vt);
      __m256 a = _mm256_fmadd_ps(gamma_lam, adv, delta);
      if constexpr (kD) a = _mm256_blendv_ps(a, delta, db.v[i]);
      if constexpr (kM) {
        const __m256 valid = mb.v[i];
        adv = _mm256_blendv_ps(adv, a, valid);
        nv = _mm256_blendv_ps(nv, vt, valid);
        ab.v[i] = _mm256_and_ps(a, valid);
        if constexpr (kV) retb.v[i] = _mm256_and_ps(_mm256_add_ps(a, vt), valid);
      } else {
        adv = a;
        nv = vt;
        ab.v[i] = a;
        if constexpr (kV) retb.v[i] = _mm256_add_ps(a, vt);
      }
    }
    store_block(ab, out + t, T);
    if constexpr (kV) store_block(retb, ret + t, T);
  }
  _mm256_store_ps(adv0, adv);
  _mm256_store_ps(nv0, nv);
  for (int k = 0; k < 8; ++k) st[k] = State<float>{adv0[k], nv0[k]};
}
#endif

template <typename S, typename A>
void run_rows(const Params& p, int64_t b0, int64_t b1) {
  with_flags(p, [&]<bool kV, bool kM, bool kD>() {
    int64_t b = b0;
    for (; b + kRows <= b1; b += kRows) {
      State<A> st[kRows];
      for (int k = 0; k < kRows; ++k) st[k] = State<A>{A(0), initial_nv<S, A>(p, b + k)};
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<S, float> && kRows == 8) {
        const int64_t head = p.T % 8;  // steps [0, head) finish on the scalar path
        scan_rows8_avx2<kV, kM, kD>(p, b, st, head, p.T);
        scan_rows<S, A, kRows, kV, kM, kD>(p, b, st, 0, head);
        continue;
      }
#endif
      scan_rows<S, A, kRows, kV, kM, kD>(p, b, st, 0, p.T);
    }
    for (; b < b1; ++b) {
      State<A> st{A(0), initial_nv<S, A>(p, b)};
      scan_rows<S, A, 1, kV, kM, kD>(p, b, &st, 0, p.T);
    }
  });
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
      const int64_t o = b * p.T, t0 = c * kChunk, t1 = std::min(p.T, t0 + kChunk);
      const S* r = static_cast<const S*>(p.rewards) + o;
      const S* v = p.values ? static_cast<const S*>(p.values) + o : nullptr;
      Map<A> m = identity_map<A>();
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const bool valid = p.mask ? p.mask[o + t] != 0 : true;
        const bool done = p.dones ? p.dones[o + t] != 0 : false;
        m = compose(step_map(load<A>(r + t), v ? load<A>(v + t) : A(0), valid, done, gamma, gamma_lam), m);
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
  with_flags(p, [&]<bool kV, bool kM, bool kD>() {
    parallel_for(n_tasks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / n_chunks, c = i % n_chunks;
        scan_rows<S, A, 1, kV, kM, kD>(p, b, &carry[i], c * kChunk, std::min(p.T, (c + 1) * kChunk));
      }
    });
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
  const int64_t grain = std::max<int64_t>(kRows, cpu::rows_grain(p.T, int64_t(1) << 16));
  parallel_for(p.B, grain, [&](int64_t b0, int64_t b1) { run_rows<S, A>(p, b0, b1); });
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.B == 0 || p.T == 0) return Status::kOk;
  dispatch_cpu(dtype, [&](auto s) { run<decltype(s)>(p, parallel_for); });
  return Status::kOk;
}

}  // namespace fastrlhf::kernels::gae
