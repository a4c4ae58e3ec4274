// CPU launcher for sample (math and semantics in ../sample.h).
//
// Rows in parallel; with fewer than 4 rows, the chunks of each row in parallel instead.
// Per row, on an fp32 copy of the logits (L2-resident for V <= ~200K):
//   1. raw max / NaN check, raw sum of exps (for raw_logprobs)          -- vectorized
//   2. penalties at the history's distinct ids (sorted history, O(L log L))
//   3. temperature, max, e_j = exp(x_j - max) in place, Z              -- vectorized
//   4. top-k / top-p thresholds: one histogram pass over the float bits of e (count and mass per
//      bin, bins ordered like e), then quickselect inside the one bin where the k-th element /
//      the top_p mass falls -- no sort of the vocabulary
//   5. the draw: inverse CDF over the kept tokens in index order
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../sample.h"
#include "simd.h"

namespace fastrlhf::kernels::sample {
namespace {

constexpr int kLanes = 32;
constexpr int kBinShift = 20;                     // e in [0, 1]: float bits >> 20 < 1024
constexpr int kBins = (0x3f800000 >> kBinShift) + 1;

inline int bin_of(float e) { return int(std::bit_cast<uint32_t>(e) >> kBinShift); }

// Rows are processed in fixed chunks of kChunk tokens: every reduction is a per-chunk partial
// combined in chunk order, so a row's arithmetic is the same whether its chunks run on one
// thread (many rows: rows in parallel) or on all of them (few rows: chunks in parallel).
constexpr int64_t kChunk = 8192;

struct Scratch {
  std::vector<float> e;      // [V]
  std::vector<float> cands;  // values of one histogram bin
  std::vector<int64_t> hist_ids;
  std::vector<float> c_max;       // [n_chunks]
  std::vector<int64_t> c_arg;     // [n_chunks]
  std::vector<double> c_sum;      // [n_chunks]
  std::vector<int32_t> c_count;   // [n_chunks, kBins]
  std::vector<double> c_mass;     // [n_chunks, kBins]
  int32_t count[kBins];
  double mass[kBins];
  void resize(int64_t V) {
    const int64_t n = (V + kChunk - 1) / kChunk;
    e.resize(V);
    c_max.resize(n), c_arg.resize(n), c_sum.resize(n), c_count.resize(n * kBins), c_mass.resize(n * kBins);
  }
};

struct Chunks {
  const cpu::ParallelFor& pf;
  int64_t V, n;
  explicit Chunks(const cpu::ParallelFor& pf, int64_t V) : pf(pf), V(V), n((V + kChunk - 1) / kChunk) {}
  // f(c, j0, j1) for every chunk, possibly in parallel
  template <typename F>
  void each(F&& f) const {
    pf(n, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) f(c, c * kChunk, std::min(V, (c + 1) * kChunk));
    });
  }
};

template <typename S>
void load_chunk(const S* x, int64_t len, float* out, float& max_out, int64_t& nan_out) {
  float m[kLanes];
  int n[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = load<float>(x + j + l);
      out[j + l] = v;
      m[l] = v > m[l] ? v : m[l];
      n[l] += v != v;
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const float v = load<float>(x + j);
    out[j] = v;
    m[l] = v > m[l] ? v : m[l];
    n[l] += v != v;
  }
  max_out = m[0];
  nan_out = 0;
  for (int l = 0; l < kLanes; ++l) max_out = m[l] > max_out ? m[l] : max_out, nan_out += n[l];
}

// sum_j exp(x_j - shift) over a chunk; optionally writes the exps back.
float sum_exp(float* x, int64_t len, float shift, bool write) {
  float s[kLanes] = {};
  int64_t j = 0;
#if defined(FASTRLHF_SIMD_EXP)  // AVX-512: cpu::exp16, same 2 x 16 lanes
  {
    const __m512 sh = _mm512_set1_ps(shift);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (; j + kLanes <= len; j += kLanes) {
      const __m512 e0 = cpu::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), sh));
      const __m512 e1 = cpu::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), sh));
      if (write) _mm512_storeu_ps(x + j, e0), _mm512_storeu_ps(x + j + 16, e1);
      s0 = _mm512_add_ps(s0, e0), s1 = _mm512_add_ps(s1, e1);
    }
    _mm512_storeu_ps(s, s0), _mm512_storeu_ps(s + 16, s1);
  }
#endif
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = fast_exp(x[j + l] - shift);
      if (write) x[j + l] = e;
      s[l] += e;
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const float e = fast_exp(x[j] - shift);
    if (write) x[j] = e;
    s[l] += e;
  }
  float total = 0;
  for (int l = 0; l < kLanes; ++l) total += s[l];
  return total;
}

float scale_and_max(float* x, int64_t len, float scale) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[j + l] * scale;
      x[j + l] = v;
      m[l] = v > m[l] ? v : m[l];
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const float v = x[j] * scale;
    x[j] = v;
    m[l] = v > m[l] ? v : m[l];
  }
  float out = m[0];
  for (int l = 1; l < kLanes; ++l) out = m[l] > out ? m[l] : out;
  return out;
}

// Largest v among `c` with sum of values >= v reaching `target` (sum of values > v below it):
// keeping every value >= v is the smallest prefix (in descending order) with mass >= target.
float mass_select(std::vector<float>& c, double target) {
  size_t lo = 0, hi = c.size();
  double acc = 0;  // mass known to lie above [lo, hi)
  while (hi > lo) {
    const float pivot = c[lo + (hi - lo) / 2];
    // three-way partition of [lo, hi): > pivot | == pivot | < pivot
    size_t gt = lo, eq = lo, lt = hi;
    while (eq < lt) {
      if (c[eq] > pivot) std::swap(c[gt++], c[eq++]);
      else if (c[eq] < pivot) std::swap(c[eq], c[--lt]);
      else ++eq;
    }
    double m_gt = 0, m_eq = 0;
    for (size_t i = lo; i < gt; ++i) m_gt += c[i];
    for (size_t i = gt; i < eq; ++i) m_eq += c[i];
    if (acc + m_gt >= target && gt > lo) {
      hi = gt;
    } else if (acc + m_gt + m_eq >= target) {
      return pivot;
    } else {
      acc += m_gt + m_eq;
      lo = lt;
    }
  }
  return c.empty() ? 0.0f : *std::min_element(c.begin(), c.end());  // rounding: keep all
}

void gather_bin(const float* e, int64_t V, int bin, float floor_value, std::vector<float>& out) {
  out.clear();
  for (int64_t j = 0; j < V; ++j)
    if (bin_of(e[j]) == bin && e[j] >= floor_value) out.push_back(e[j]);
}

// e-space threshold of top-k then top-p (0 when neither is active).
float topk_topp_threshold(Scratch& s, const Chunks& ch, int64_t k, float top_p) {
  const int64_t V = ch.V;
  const bool use_k = k > 0 && k < V, use_p = top_p < 1.0f;
  if (!use_k && !use_p) return 0.0f;
  const float* e = s.e.data();
  ch.each([&](int64_t c, int64_t j0, int64_t j1) {  // per-chunk histograms of count and mass
    int32_t* cnt = s.c_count.data() + c * kBins;
    double* mass = s.c_mass.data() + c * kBins;
    std::memset(cnt, 0, kBins * sizeof(int32_t));
    std::memset(mass, 0, kBins * sizeof(double));
    for (int64_t j = j0; j < j1; ++j) {
      const int b = bin_of(e[j]);
      cnt[b] += 1;
      mass[b] += e[j];
    }
  });
  std::memset(s.count, 0, sizeof(s.count));
  std::memset(s.mass, 0, sizeof(s.mass));
  for (int64_t c = 0; c < ch.n; ++c) {  // merged in chunk order
    for (int b = 0; b < kBins; ++b) s.count[b] += s.c_count[c * kBins + b], s.mass[b] += s.c_mass[c * kBins + b];
  }
  float tau_k = 0.0f;
  int bin_k = -1;          // bin holding the k-th largest value
  double z_k = 0;          // mass of the top-k set
  if (use_k) {
    int64_t acc = 0;
    double m_above = 0;
    for (int b = kBins - 1; b >= 0; --b) {
      if (acc + s.count[b] >= k) {
        gather_bin(e, V, b, 0.0f, s.cands);
        const int64_t r = k - acc;  // r-th largest inside the bin
        std::nth_element(s.cands.begin(), s.cands.begin() + (r - 1), s.cands.end(), std::greater<float>());
        tau_k = s.cands[r - 1];
        bin_k = b;
        z_k = m_above;
        for (float c : s.cands) z_k += c >= tau_k ? c : 0.0f;
        break;
      }
      acc += s.count[b];
      m_above += s.mass[b];
    }
  } else {
    for (int b = 0; b < kBins; ++b) z_k += s.mass[b];
  }
  if (!use_p) return tau_k;
  const double target = double(top_p) * z_k;
  double acc = 0;
  for (int b = kBins - 1; b >= 0; --b) {
    if (b < bin_k) break;
    double bin_mass = s.mass[b];
    if (b == bin_k) {  // only the part of the boundary bin inside the top-k set
      gather_bin(e, V, b, tau_k, s.cands);
      bin_mass = 0;
      for (float c : s.cands) bin_mass += c;
    }
    if (acc + bin_mass >= target) {
      if (b != bin_k) gather_bin(e, V, b, tau_k, s.cands);
      return std::max(tau_k, mass_select(s.cands, target - acc));
    }
    acc += bin_mass;
  }
  return tau_k;  // rounding left the target unreached: keep the top-k set
}

template <typename S>
bool run_row(const Params& p, int64_t b, Scratch& s, const cpu::ParallelFor& inner) {
  const int64_t V = p.V;
  const Chunks ch(inner, V);
  const S* x = static_cast<const S*>(p.logits) + b * V;
  float* e = s.e.data();
  int64_t nans = 0;
  std::vector<int64_t> c_nan(ch.n);
  ch.each([&](int64_t c, int64_t j0, int64_t j1) { load_chunk(x + j0, j1 - j0, e + j0, s.c_max[c], c_nan[c]); });
  float raw_max = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < ch.n; ++c) raw_max = s.c_max[c] > raw_max ? s.c_max[c] : raw_max, nans += c_nan[c];
  // no distribution: a NaN, a +inf (certainty is not a probability we can sample with the others),
  // or only -inf logits; the glue names the row
  if (nans || raw_max == std::numeric_limits<float>::infinity() || raw_max == -std::numeric_limits<float>::infinity())
    return false;
  ch.each([&](int64_t c, int64_t j0, int64_t j1) { s.c_sum[c] = sum_exp(e + j0, j1 - j0, raw_max, false); });
  double raw_sum = 0;
  for (int64_t c = 0; c < ch.n; ++c) raw_sum += s.c_sum[c];
  const float raw_log_z = raw_max + float(std::log(raw_sum));

  // penalties at the distinct ids of the history
  if (p.history) {
    const float rep = p.repetition_penalty.at(b), pres = p.presence_penalty.at(b), freq = p.frequency_penalty.at(b);
    if (rep != 1.0f || pres != 0.0f || freq != 0.0f) {
      s.hist_ids.clear();
      for (int64_t i = 0; i < p.L; ++i) {
        const int64_t id = p.history[b * p.L + i];
        if (id >= 0 && id < V) s.hist_ids.push_back(id);
      }
      std::sort(s.hist_ids.begin(), s.hist_ids.end());
      for (size_t i = 0; i < s.hist_ids.size();) {
        size_t j = i;
        while (j < s.hist_ids.size() && s.hist_ids[j] == s.hist_ids[i]) ++j;
        const int64_t id = s.hist_ids[i];
        e[id] = penalize(e[id], int64_t(j - i), rep, pres, freq);
        i = j;
      }
    }
  }

  const float temperature = p.temperature.at(b), eps = p.epsilon.at(b);
  const int64_t k = p.top_k.at(b);
  const Branch br = choose(row_uniform(p.seed, p.offset, p.row_ids ? p.row_ids[b] : b), eps);
  int64_t token = 0;
  float lq;
  if (temperature <= 0.0f || k == 1) {  // greedy: argmax of the penalized logits (first index)
    ch.each([&](int64_t c, int64_t j0, int64_t j1) {
      int64_t arg = j0;
      for (int64_t j = j0 + 1; j < j1; ++j) arg = e[j] > e[arg] ? j : arg;
      s.c_arg[c] = arg;
    });
    int64_t arg = s.c_arg[0];
    for (int64_t c = 1; c < ch.n; ++c) arg = e[s.c_arg[c]] > e[arg] ? s.c_arg[c] : arg;
    token = br.uniform ? std::min<int64_t>(V - 1, int64_t(br.u * double(V))) : arg;
    lq = log_q(token == arg, 1.0f, 1.0, eps, V);
  } else {
    // tempered logits stored first, then their max: exp(x - m) is then exactly 1 at the max
    // (computing x * inv_t - m in one expression lets the compiler fuse it into an FMA whose
    // unrounded product disagrees with the rounded one the max was taken of)
    const float inv_t = 1.0f / temperature;
    ch.each([&](int64_t c, int64_t j0, int64_t j1) { s.c_max[c] = scale_and_max(e + j0, j1 - j0, inv_t); });
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < ch.n; ++c) m = s.c_max[c] > m ? s.c_max[c] : m;
    ch.each([&](int64_t c, int64_t j0, int64_t j1) { sum_exp(e + j0, j1 - j0, m, true); });  // e in (0, 1]
    float tau = topk_topp_threshold(s, ch, k, p.top_p.at(b));
    tau = std::max(tau, p.min_p.at(b));  // e_max = 1: min-p relative to the largest probability
    ch.each([&](int64_t c, int64_t j0, int64_t j1) {
      double z = 0;
      for (int64_t j = j0; j < j1; ++j) z += e[j] >= tau ? e[j] : 0.0f;
      s.c_sum[c] = z;
    });
    double z = 0;
    for (int64_t c = 0; c < ch.n; ++c) z += s.c_sum[c];
    if (br.uniform) {
      token = std::min<int64_t>(V - 1, int64_t(br.u * double(V)));
    } else {
      // the chunk holding the target (chunk order), then inverse CDF inside it
      const double target = br.u * z;
      double before = 0;
      int64_t c = 0, last_nonempty = 0;
      for (; c < ch.n; ++c) {
        if (s.c_sum[c] > 0) last_nonempty = c;
        if (before + s.c_sum[c] > target) break;
        before += s.c_sum[c];
      }
      if (c == ch.n) {  // rounding: the target is not below z; take the last kept token
        c = last_nonempty;
        before = 0;
        for (int64_t i = 0; i < c; ++i) before += s.c_sum[i];
      }
      double acc = before;
      int64_t last = -1;
      token = -1;
      for (int64_t j = c * kChunk, j1 = std::min(V, (c + 1) * kChunk); j < j1; ++j) {
        if (e[j] < tau) continue;
        last = j;
        acc += e[j];
        if (acc > target) {
          token = j;
          break;
        }
      }
      if (token < 0) token = last;  // target within rounding of the chunk's end: its last kept token
      if (token < 0) token = int64_t(std::max_element(e, e + V) - e);  // cannot happen (max e = 1)
    }
    lq = log_q(e[token] >= tau, e[token], z, eps, V);
  }
  p.tokens[b] = token;
  p.logprobs[b] = lq;
  p.raw_logprobs[b] = load<float>(x + token) - raw_log_z;
  return true;
}

template <typename S>
Status run(const Params& p, const cpu::ParallelFor& parallel_for) {
  std::atomic<bool> bad{false};
  if (p.B < 4) {  // few rows: each row's chunks in parallel
    auto s = std::make_unique<Scratch>();
    s->resize(p.V);
    for (int64_t b = 0; b < p.B; ++b)
      if (!run_row<S>(p, b, *s, parallel_for)) bad = true;
  } else {  // rows in parallel, each row's chunks in order on its thread
    parallel_for(p.B, 1, [&](int64_t b0, int64_t b1) {
      auto s = std::make_unique<Scratch>();
      s->resize(p.V);
      for (int64_t b = b0; b < b1; ++b)
        if (!run_row<S>(p, b, *s, cpu::serial_for)) bad = true;
    });
  }
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.B == 0) return Status::kOk;
  return dispatch_cpu(dtype, [&](auto s) { return run<decltype(s)>(p, parallel_for); });
}

}  // namespace fastrlhf::kernels::sample
