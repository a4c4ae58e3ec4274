// CPU launcher for sample (math and semantics in ../sample.h).
//
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

namespace fastrlhf::kernels::sample {
namespace {

constexpr int kLanes = 32;
constexpr int kBinShift = 20;                     // e in [0, 1]: float bits >> 20 < 1024
constexpr int kBins = (0x3f800000 >> kBinShift) + 1;

inline int bin_of(float e) { return int(std::bit_cast<uint32_t>(e) >> kBinShift); }

struct Scratch {
  std::vector<float> e;      // [V]
  std::vector<float> cands;  // values of one histogram bin
  std::vector<int64_t> hist_ids;
  int32_t count[kBins];
  double mass[kBins];
};

template <typename S>
void load_row(const S* x, int64_t V, float* out, float& raw_max, bool& nan) {
  float m[kLanes];
  int n[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = load<float>(x + j + l);
      out[j + l] = v;
      m[l] = v > m[l] ? v : m[l];
      n[l] += v != v;
    }
  }
  for (int l = 0; j < V; ++j, ++l) {
    const float v = load<float>(x + j);
    out[j] = v;
    m[l] = v > m[l] ? v : m[l];
    n[l] += v != v;
  }
  raw_max = m[0];
  int nans = 0;
  for (int l = 0; l < kLanes; ++l) raw_max = m[l] > raw_max ? m[l] : raw_max, nans += n[l];
  nan = nans > 0;
}

// sum_j exp(scale * x_j - shift) (raw: scale 1); optionally writes the exps back.
float sum_exp(float* x, int64_t V, float scale, float shift, bool write) {
  float s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = fast_exp(x[j + l] * scale - shift);
      if (write) x[j + l] = e;
      s[l] += e;
    }
  }
  for (int l = 0; j < V; ++j, ++l) {
    const float e = fast_exp(x[j] * scale - shift);
    if (write) x[j] = e;
    s[l] += e;
  }
  float total = 0;
  for (int l = 0; l < kLanes; ++l) total += s[l];
  return total;
}

float max_of(const float* x, int64_t V, float scale) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = x[j + l] * scale > m[l] ? x[j + l] * scale : m[l];
  for (int l = 0; j < V; ++j, ++l) m[l] = x[j] * scale > m[l] ? x[j] * scale : m[l];
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
float topk_topp_threshold(Scratch& s, int64_t V, int64_t k, float top_p) {
  const bool use_k = k > 0 && k < V, use_p = top_p < 1.0f;
  if (!use_k && !use_p) return 0.0f;
  const float* e = s.e.data();
  std::memset(s.count, 0, sizeof(s.count));
  std::memset(s.mass, 0, sizeof(s.mass));
  for (int64_t j = 0; j < V; ++j) {
    const int b = bin_of(e[j]);
    s.count[b] += 1;
    s.mass[b] += e[j];
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
bool run_row(const Params& p, int64_t b, Scratch& s) {
  const int64_t V = p.V;
  const S* x = static_cast<const S*>(p.logits) + b * V;
  float* e = s.e.data();
  float raw_max;
  bool nan;
  load_row(x, V, e, raw_max, nan);
  if (nan) return false;
  const float raw_log_z = raw_max + std::log(sum_exp(e, V, 1.0f, raw_max, false));

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
  const Branch br = choose(row_uniform(p.seed, p.offset, b), eps);
  int64_t token = 0;
  float lq;
  if (temperature <= 0.0f || k == 1) {  // greedy: argmax of the penalized logits
    int64_t arg = 0;
    for (int64_t j = 1; j < V; ++j) arg = e[j] > e[arg] ? j : arg;
    token = br.uniform ? std::min<int64_t>(V - 1, int64_t(br.u * double(V))) : arg;
    lq = log_q(token == arg, 1.0f, 1.0, eps, V);
  } else {
    // tempered logits stored first, then their max: exp(x - m) is then exactly 1 at the max
    // (computing x * inv_t - m in one expression lets the compiler fuse it into an FMA whose
    // unrounded product disagrees with the rounded one the max was taken of)
    const float inv_t = 1.0f / temperature;
    for (int64_t j = 0; j < V; ++j) e[j] *= inv_t;
    const float m = max_of(e, V, 1.0f);
    sum_exp(e, V, 1.0f, m, true);  // e_j = exp(x_j / T - m) in place, max e = 1
    float tau = topk_topp_threshold(s, V, k, p.top_p.at(b));
    tau = std::max(tau, p.min_p.at(b));  // e_max = 1: min-p relative to the largest probability
    double z = 0;
    for (int64_t j = 0; j < V; ++j) z += e[j] >= tau ? e[j] : 0.0f;
    if (br.uniform) {
      token = std::min<int64_t>(V - 1, int64_t(br.u * double(V)));
    } else {
      const double target = br.u * z;
      double c = 0;
      int64_t last = -1;
      token = -1;
      for (int64_t j = 0; j < V; ++j) {
        if (e[j] < tau) continue;
        last = j;
        c += e[j];
        if (c > target) {
          token = j;
          break;
        }
      }
      if (token < 0) token = last;  // target within rounding of z: the last kept token
      if (token < 0) token = int64_t(std::max_element(e, e + V) - e);  // nothing kept: cannot
                                                                        // happen (max e = 1)
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
  parallel_for(p.B, 1, [&](int64_t b0, int64_t b1) {
    auto s = std::make_unique<Scratch>();
    s->e.resize(p.V);
    for (int64_t b = b0; b < b1; ++b)
      if (!run_row<S>(p, b, *s)) bad = true;
  });
  return bad ? Status::kIndexOutOfRange : Status::kOk;
}

}  // namespace

Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for) {
  if (p.B == 0) return Status::kOk;
  return dispatch_cpu(dtype, [&](auto s) { return run<decltype(s)>(p, parallel_for); });
}

}  // namespace fastrlhf::kernels::sample
