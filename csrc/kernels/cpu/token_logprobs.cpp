// CPU launchers for token_logprobs (math in ../token_logprobs.h).
#include <algorithm>
#include <atomic>
#include <limits>

#include "../token_logprobs.h"
#include "simd.h"

namespace fastrlhf::kernels::token_logprobs {
namespace {

// Independent accumulator lanes per row: the lane loops vectorize (2 x 16-wide with
// AVX-512), and the lanes keep fp32 sums short.
constexpr int kLanes = 32;

template <typename S, typename A>
A row_max(const S* x, int64_t V, A inv_t) {
  A m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A v = load<A>(x + j + l) * inv_t;
      m[l] = v > m[l] ? v : m[l];
    }
  }
  for (int l = 0; j < V; ++j, ++l) {
    const A v = load<A>(x + j) * inv_t;
    m[l] = v > m[l] ? v : m[l];
  }
  A out = m[0];
  for (int l = 1; l < kLanes; ++l) out = m[l] > out ? m[l] : out;
  return out;
}

// The exp pass is compute-bound and re-reads its row from L2: meanwhile `next` (the following
// row, or nullptr) is requested from memory, so the next max pass does not wait on DRAM.
template <typename S, typename A>
void row_sums(const S* x, int64_t V, A inv_t, A m, A& s_out, A& e_out, const S* next) {
  A s[kLanes] = {}, e[kLanes] = {};
  int64_t j = 0;
  constexpr int64_t kLine = 64 / sizeof(S);
  for (; j + kLanes <= V; j += kLanes) {
    if (next != nullptr)
      for (int64_t c = 0; c < kLanes; c += kLine) __builtin_prefetch(next + j + c, 0, 2);
    for (int l = 0; l < kLanes; ++l) {
      const ExpTerm<A> t = exp_term(load<A>(x + j + l) * inv_t, m);
      s[l] += t.ex;
      e[l] += t.ex_d;
    }
  }
  for (int l = 0; j < V; ++j, ++l) {
    const ExpTerm<A> t = exp_term(load<A>(x + j) * inv_t, m);
    s[l] += t.ex;
    e[l] += t.ex_d;
  }
  s_out = 0, e_out = 0;
  for (int l = 0; l < kLanes; ++l) s_out += s[l], e_out += e[l];
}

#if defined(FASTRLHF_SIMD_EXP)
// fp32 logits on AVX-512: the exp pass on explicit vectors (cpu::exp16, half the instructions of
// the auto-vectorized loop); 2 x 16 accumulator lanes as above, reduced before the
// tail is added (a fixed order, not the portable loop's).
template <>
void row_sums<float, float>(const float* x, int64_t V, float inv_t, float m, float& s_out, float& e_out,
                            const float* next) {
  const __m512 it = _mm512_set1_ps(inv_t), mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, e0 = s0, e1 = s0;
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    if (next != nullptr) __builtin_prefetch(next + j, 0, 2), __builtin_prefetch(next + j + 16, 0, 2);
    const __m512 d0 = _mm512_fmsub_ps(_mm512_loadu_ps(x + j), it, mv);
    const __m512 d1 = _mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16), it, mv);
    __mmask16 k0, k1;
    const __m512 x0 = cpu::exp16(d0, k0), x1 = cpu::exp16(d1, k1);
    s0 = _mm512_add_ps(s0, x0), s1 = _mm512_add_ps(s1, x1);
    e0 = _mm512_mask3_fmadd_ps(x0, d0, e0, k0), e1 = _mm512_mask3_fmadd_ps(x1, d1, e1, k1);  // 0 * -inf: skipped
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)), e = _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
  for (; j < V; ++j) {
    const ExpTerm<float> t = exp_term(x[j] * inv_t, m);
    s += t.ex, e += t.ex_d;
  }
  s_out = s, e_out = e;
}

// One fp32 row of the backward on AVX-512 (same formulas as the portable loop in run_backward).
void backward_row_f32(const float* x, float* dx, int64_t V, float it, float m, float log_s, float H, float g, float h) {
  const __m512 vit = _mm512_set1_ps(it), vm = _mm512_set1_ps(m), vls = _mm512_set1_ps(log_s);
  int64_t j = 0;
  if (h == 0.0f) {
    const __m512 gt = _mm512_set1_ps(-g * it);
    for (; j + 16 <= V; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vit, vm), vls);
      _mm512_storeu_ps(dx + j, _mm512_mul_ps(gt, cpu::exp16(d)));
    }
    for (; j < V; ++j) dx[j] = -g * it * fast_exp((x[j] * it - m) - log_s);
  } else {
    const __m512 vg = _mm512_set1_ps(g), vh = _mm512_set1_ps(h), vH = _mm512_set1_ps(H);
    const __m512 neg_it = _mm512_set1_ps(-it), zero = _mm512_setzero_ps();
    for (; j + 16 <= V; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vit, vm), vls);
      const __m512 p = cpu::exp16(d);
      const __mmask16 pos = _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ);  // grad_element: 0 where !(p > 0)
      const __m512 t = _mm512_mul_ps(p, _mm512_fmadd_ps(vh, _mm512_add_ps(d, vH), vg));
      _mm512_storeu_ps(dx + j, _mm512_maskz_mul_ps(pos, t, neg_it));
    }
    for (; j < V; ++j) dx[j] = grad_element(x[j] * it, m, log_s, H, g, h) * it;
  }
}
#endif

template <typename S>
Status run(const Params& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A inv_t = A(p.inv_temperature);
  std::atomic<bool> bad{false};
  parallel_for(p.N, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const S* x = static_cast<const S*>(p.logits) + i * p.V;
      const int64_t tok = p.tokens[i];
      if (tok < 0 || tok >= p.V) {
        bad = true;
        continue;
      }
      const A m = row_max<S, A>(x, p.V, inv_t);
      A s, e;
      row_sums<S, A>(x, p.V, inv_t, m, s, e, i + 1 < i1 ? x + p.V : nullptr);
      const RowResult<A> r = finalize(m, s, e, load<A>(x + tok) * inv_t);
      static_cast<A*>(p.row_stats)[2 * i] = r.max;
      static_cast<A*>(p.row_stats)[2 * i + 1] = r.log_sum;
      static_cast<A*>(p.logprobs)[i] = r.logprob;
      static_cast<A*>(p.entropy)[i] = r.entropy;
    }
  });
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

template <typename S>
Status run_backward(const BackwardParams& p, const cpu::ParallelFor& parallel_for) {
  using A = acc_t<S>;
  const A inv_t = A(p.inv_temperature);
  std::atomic<bool> bad{false};
  parallel_for(p.N, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const S* x = static_cast<const S*>(p.logits) + i * p.V;
      S* dx = static_cast<S*>(p.grad_logits) + i * p.V;
      const A g = p.grad_logprobs ? static_cast<const A*>(p.grad_logprobs)[i] : A(0);
      const A h = p.grad_entropy ? static_cast<const A*>(p.grad_entropy)[i] : A(0);
      const A m = static_cast<const A*>(p.row_stats)[2 * i];
      const A log_s = static_cast<const A*>(p.row_stats)[2 * i + 1];
      const A H = static_cast<const A*>(p.entropy)[i];
      const int64_t tok = p.tokens[i], V = p.V;
      if (tok < 0 || tok >= V) {  // the op can be called directly, without the forward's check
        bad = true;
        continue;
      }
      if (log_s != log_s) {  // a row of all -inf or with a NaN: NaN gradient, as log_softmax's
        for (int64_t j = 0; j < V; ++j) store(dx + j, A(NAN));
        continue;
      }
      const A it = inv_t;  // locals, not captures: a store to dx could alias a captured float,
                           // and the loop would fall back to scalar code
      const A x_tok = load<A>(x + tok) * inv_t;  // read before the row is written: dx may be x
      // clang-format off: the `if` below continues the `else` of the #if branch
#if defined(FASTRLHF_SIMD_EXP)
      if constexpr (std::is_same_v<S, float>) {
        backward_row_f32(x, dx, V, it, m, log_s, H, g, h);
      } else
#endif
      if (h == A(0)) {  // no entropy gradient: dlogits_j = -g p_j (p_j = 0 gives -0 * g: no select)
        const A gt = -g * it;
        for (int64_t j = 0; j < V; ++j) store(dx + j, gt * fast_exp((load<A>(x + j) * it - m) - log_s));
      } else {
        for (int64_t j = 0; j < V; ++j) store(dx + j, grad_element(load<A>(x + j) * it, m, log_s, H, g, h) * it);
      }
      // clang-format on
      // the chosen token's + g, once per row (out of the vectorized loop); recomputed from the
      // logit in the accumulator type, so the storage rounding happens once
      const A d_tok = grad_element(x_tok, m, log_s, H, g, h) + g;
      store(dx + tok, d_tok * inv_t);
    }
  });
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.N == 0) return Status::kOk;
  return dispatch_cpu(dtype, [&](auto s) { return run<decltype(s)>(p, parallel_for); });
}

Status launch_backward_cpu(const BackwardParams& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.N == 0) return Status::kOk;
  return dispatch_cpu(dtype, [&](auto s) { return run_backward<decltype(s)>(p, parallel_for); });
}

}  // namespace fastrlhf::kernels::token_logprobs
