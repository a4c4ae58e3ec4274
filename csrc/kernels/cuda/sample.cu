// CUDA kernel for sample (math and semantics in ../sample.h). One block per row:
//   1. raw max / NaN check / raw log-sum-exp (block reductions); fp32 copy of the row -> ws
//   2. penalties: history counts in a scratch row, then one pass over the vocabulary
//   3. greedy: block argmax; else e_j = exp(x_j / T - max) in ws
//   4. top-k / top-p thresholds by bisection on the float bits of e (31 block reductions each,
//      no sort), min-p, kept mass
//   5. the draw: per-thread contiguous chunks, block prefix sum of their kept mass, the owning
//      thread scans its chunk
// Every reduction has a fixed order: the same call gives the same tokens. No host sync.
#include "../sample.h"
#include "common.cuh"

namespace fastrlhf::kernels::sample {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint32_t fbits(float x) { return __float_as_uint(x); }

// count / mass of the row's e with bits >= t
__device__ float count_ge(const float* e, int64_t V, uint32_t t, float* smem) {
  float c = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) c += fbits(e[j]) >= t ? 1.0f : 0.0f;
  return cuda::block_sum(c, smem);
}
__device__ double mass_ge(const float* e, int64_t V, uint32_t t, double* smem) {
  double m = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) m += fbits(e[j]) >= t ? double(e[j]) : 0.0;
  return cuda::block_sum(m, smem);
}

// Exclusive prefix sum over the block (thread order), and the block total.
__device__ double block_exclusive_scan(double v, double* smem, double& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    double w = lane < (kThreads >> 5) ? smem[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    smem[lane] = w;  // inclusive scan of warp totals
  }
  __syncthreads();
  total = smem[(kThreads >> 5) - 1];
  return (warp > 0 ? smem[warp - 1] : 0.0) + inc - v;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) sample_kernel(Params p) {
  __shared__ float fsmem[32];
  __shared__ double dsmem[32];
  __shared__ int64_t chosen;
  const int64_t b = blockIdx.x, V = p.V;
  const S* x = static_cast<const S*>(p.logits) + b * V;
  float* e = p.workspace + b * V;

  // 1. raw statistics and the fp32 copy
  float m = -INFINITY;
  bool nan = false;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = cuda::load<float>(x + j);
    e[j] = v;
    nan |= v != v;
    m = fmaxf(m, v);
  }
  nan = __syncthreads_or(nan);
  FRL_DEVICE_CHECK(!nan, "fastrlhf.sample: logits contain NaN");
  const float raw_max = cuda::block_max(m, fsmem);
  FRL_DEVICE_CHECK(raw_max != INFINITY && raw_max != -INFINITY,
                   "fastrlhf.sample: a row of logits holds +inf or only -inf (no distribution to sample)");
  float rs = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) rs += __expf(e[j] - raw_max);
  const float raw_log_z = raw_max + logf(cuda::block_sum(rs, fsmem));

  // 2. penalties: history counts in a [V] scratch row (float atomics of 1.0 are exact integer
  //    sums, so the result is deterministic), then one pass over the vocabulary
  const float rep = p.repetition_penalty.at(b), pres = p.presence_penalty.at(b), freq = p.frequency_penalty.at(b);
  if (p.history && p.counts && (rep != 1.0f || pres != 0.0f || freq != 0.0f)) {
    const int64_t* h = p.history + b * p.L;
    float* cnt = p.counts + b * V;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) cnt[j] = 0.0f;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < p.L; i += kThreads) {
      const int64_t id = h[i];
      if (id >= 0 && id < V) atomicAdd(cnt + id, 1.0f);
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < V; j += kThreads) e[j] = penalize(e[j], int64_t(cnt[j]), rep, pres, freq);
    __syncthreads();
  }

  const float temperature = p.temperature.at(b), eps = p.epsilon.at(b);
  const int64_t k = p.top_k.at(b);
  const Branch br = choose(row_uniform(p.seed, p.offset, p.row_ids ? p.row_ids[b] : b), eps);
  const int64_t uniform_token = br.uniform ? min(V - 1, int64_t(br.u * double(V))) : -1;
  float lq = 0;
  if (temperature <= 0.0f || k == 1) {
    // 3a. greedy: max value, then the first index holding it
    float mv = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) mv = fmaxf(mv, e[j]);
    mv = cuda::block_max(mv, fsmem);
    double firstd = INFINITY;  // the first index holding the max (indices exact in double)
    for (int64_t j = threadIdx.x; j < V; j += kThreads)
      if (e[j] == mv) firstd = fmin(firstd, double(j));
    firstd = -cuda::block_max(-firstd, dsmem);
    const int64_t arg = int64_t(firstd);
    if (threadIdx.x == 0) {
      chosen = br.uniform ? uniform_token : arg;
      lq = log_q(chosen == arg, 1.0f, 1.0, eps, V);
    }
  } else {
    // 3b. e_j = exp(x_j / T - max)
    // tempered logits stored first, then their max, so exp(x - m) is exactly 1 at the max
    // (an FMA-contracted x * inv_t - m would disagree with the rounded product)
    const float inv_t = 1.0f / temperature;
    float mt = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float t = __fmul_rn(e[j], inv_t);  // __fmul_rn: never contracted into an FMA
      e[j] = t;
      mt = fmaxf(mt, t);
    }
    mt = cuda::block_max(mt, fsmem);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < V; j += kThreads) e[j] = e[j] == mt ? 1.0f : __expf(e[j] - mt);
    __syncthreads();

    // 4. thresholds (as float bits; e >= 0 so bits are ordered like values)
    uint32_t tau = 0;
    if (k > 0 && k < V) {  // largest t with count(e >= t) >= k
      uint32_t lo = 0, hi = fbits(1.0f);
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        if (count_ge(e, V, mid, fsmem) >= float(k)) lo = mid;
        else hi = mid - 1;
      }
      tau = lo;
    }
    const float top_p = p.top_p.at(b);
    if (top_p < 1.0f) {  // largest t >= tau with mass(e >= t) >= top_p * mass(e >= tau)
      const double target = double(top_p) * mass_ge(e, V, tau, dsmem);
      uint32_t lo = tau, hi = fbits(1.0f);
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        if (mass_ge(e, V, mid, dsmem) >= target) lo = mid;
        else hi = mid - 1;
      }
      tau = lo;
    }
    tau = max(tau, fbits(fmaxf(p.min_p.at(b), 0.0f)));

    // 5. the draw: contiguous chunks, prefix sums of their kept mass
    const int64_t chunk = (V + kThreads - 1) / kThreads;
    const int64_t j0 = min(V, int64_t(threadIdx.x) * chunk), j1 = min(V, j0 + chunk);
    double mine = 0;
    int64_t last_kept = -1;
    for (int64_t j = j0; j < j1; ++j)
      if (fbits(e[j]) >= tau) mine += e[j], last_kept = j;
    double z;
    const double before = block_exclusive_scan(mine, dsmem, z);
    const double last_any = cuda::block_max(double(last_kept), dsmem);
    if (threadIdx.x == 0) chosen = br.uniform ? uniform_token : int64_t(last_any);  // rounding fallback
    __syncthreads();
    if (!br.uniform) {
      const double target = br.u * z;
      // the owner: the last thread with kept mass whose chunk starts at or before the target
      // (a block max of thread ids: exactly one owner, whatever the rounding of the scan)
      const float owner = cuda::block_max(before <= target && mine > 0 ? float(threadIdx.x) : -1.0f, fsmem);
      if (float(threadIdx.x) == owner) {
        double c = before;
        int64_t pick = last_kept;  // rounding: the chunk's last kept token
        for (int64_t j = j0; j < j1; ++j) {
          if (fbits(e[j]) < tau) continue;
          c += e[j];
          if (c > target) {
            pick = j;
            break;
          }
        }
        chosen = pick;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) lq = log_q(fbits(e[chosen]) >= tau, e[chosen], z, eps, V);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.tokens[b] = chosen;
    p.logprobs[b] = lq;
    p.raw_logprobs[b] = cuda::load<float>(x + chosen) - raw_log_z;
  }
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return cuda::dispatch(dtype, [&](auto s) {
    sample_kernel<decltype(s)><<<unsigned(p.B), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::sample
