// Batched sampling from logits: penalties -> temperature -> top-k -> top-p -> min-p -> draw,
// with epsilon-greedy mixing, per-row parameters, counter-based randomness. No sort of the
// vocabulary: thresholds are found by selection (CPU: histogram + quickselect; CUDA: bisection
// on the float bits with block reductions).
//
// Per row, with x = penalized logits / temperature and e_j = exp(x_j - max x):
//   top-k  keeps e_j >= (k-th largest e)                             (ties at the boundary kept)
//   top-p  keeps the largest e_j whose mass reaches top_p of the top-k mass (ties kept)
//   min-p  keeps e_j >= min_p (relative to the largest probability)
//   q_j  = (1 - eps) * [j kept] e_j / Z_kept + eps / V       (the distribution drawn from)
// Greedy (temperature 0 or top_k 1): the kept set is the argmax (first index on ties).
// Penalties (Hugging Face / OpenAI conventions) for tokens in the row's history, c_j = count:
//   repetition: x_j = x_j < 0 ? x_j * r : x_j / r   (c_j > 0)
//   presence / frequency: x_j -= presence * [c_j > 0] + frequency * c_j
// Outputs: token, log q_token (the processed distribution), and the raw log-softmax of the
// unmodified logits at the token.
#pragma once

#include "common.h"
#include "math.h"

namespace fastrlhf::kernels::sample {

// A per-row parameter: a [B] array, or one value for every row (FlashInfer's convention).
template <typename T>
struct RowParam {
  const T* arr = nullptr;
  T val{};
  FRL_HD T at(int64_t b) const { return arr ? arr[b] : val; }
};

struct Params {
  const void* logits = nullptr;  // [B, V] storage dtype
  int64_t B = 0, V = 0;
  RowParam<float> temperature{nullptr, 1.0f};  // 0: greedy
  RowParam<int64_t> top_k{nullptr, 0};         // <= 0 or >= V: off; 1: greedy
  RowParam<float> top_p{nullptr, 1.0f};        // 1: off
  RowParam<float> min_p{nullptr, 0.0f};        // 0: off
  RowParam<float> epsilon{nullptr, 0.0f};
  RowParam<float> repetition_penalty{nullptr, 1.0f};
  RowParam<float> presence_penalty{nullptr, 0.0f};
  RowParam<float> frequency_penalty{nullptr, 0.0f};
  const int64_t* history = nullptr;  // [B, L], -1 = padding
  int64_t L = 0;
  uint64_t seed = 0, offset = 0;
  const int64_t* row_ids = nullptr;  // [B] Philox row counters (null: the row index), so a row's draw
                                     // does not depend on its position in the batch
  int64_t* tokens = nullptr;     // [B]
  float* logprobs = nullptr;     // [B]
  float* raw_logprobs = nullptr; // [B]
  float* workspace = nullptr;    // CUDA: [B, V] floats (the processed row)
  float* counts = nullptr;       // CUDA, with penalties: [B, V] floats (history counts)
};

// ---- randomness: Philox4x32-10 (Salmon et al. 2011), keyed by the seed --------------------
struct Philox {
  static FRL_HD void round(uint32_t* c, const uint32_t* k) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0], p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t h0 = uint32_t(p0 >> 32), l0 = uint32_t(p0), h1 = uint32_t(p1 >> 32), l1 = uint32_t(p1);
    const uint32_t n0 = h1 ^ c[1] ^ k[0], n2 = h0 ^ c[3] ^ k[1];
    c[0] = n0, c[1] = l1, c[2] = n2, c[3] = l0;
  }
  // Four 32-bit words for counter (offset, row) under key seed.
  static FRL_HD void generate(uint64_t seed, uint64_t offset, uint64_t row, uint32_t* out) {
    uint32_t c[4] = {uint32_t(offset), uint32_t(offset >> 32), uint32_t(row), uint32_t(row >> 32)};
    uint32_t k[2] = {uint32_t(seed), uint32_t(seed >> 32)};
    for (int i = 0; i < 10; ++i) {
      round(c, k);
      k[0] += 0x9E3779B9u, k[1] += 0xBB67AE85u;
    }
    for (int i = 0; i < 4; ++i) out[i] = c[i];
  }
};

// The row's uniform in [0, 1) with 53 random bits: one draw decides both the epsilon branch and
// the token (see choose()).
FRL_HD double row_uniform(uint64_t seed, uint64_t offset, int64_t row) {
  uint32_t w[4];
  Philox::generate(seed, offset, uint64_t(row), w);
  const uint64_t bits = (uint64_t(w[0]) << 21) | uint64_t(w[1] >> 11);  // 53 bits
  return double(bits) * (1.0 / 9007199254740992.0);
}

// Penalized logit of a token seen `count` times in the history.
FRL_HD float penalize(float x, int64_t count, float repetition, float presence, float frequency) {
  if (count <= 0) return x;
  x = x < 0 ? x * repetition : x / repetition;
  return x - presence - frequency * float(count);
}

// Splitting u: with probability eps a uniform token, else a draw from the kept set.
struct Branch {
  bool uniform;
  double u;  // uniform in [0, 1) for the chosen branch
};

FRL_HD Branch choose(double u, float eps) {
  if (eps > 0 && u < eps) return Branch{true, u / eps};
  return Branch{false, eps > 0 ? (u - eps) / (1.0 - eps) : u};
}

// log q_token given whether it is kept, its e and the kept mass.
FRL_HD float log_q(bool kept, float e, double z_kept, float eps, int64_t V) {
  const double filtered = kept ? double(e) / z_kept : 0.0;
  const double q = (1.0 - eps) * filtered + double(eps) / double(V);
  return float(::log(q));
}

}  // namespace fastrlhf::kernels::sample

#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::sample {
// CPU: rows in parallel; per row a few vectorized passes over an fp32 copy of the row and
// histogram + quickselect for the thresholds. kIndexOutOfRange: a row without a distribution
// (NaN, +inf, or only -inf logits).
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
#if defined(FASTRLHF_WITH_CUDA)
// CUDA: one block per row; thresholds by bisection on float bits with block reductions; the
// draw by a block-wide prefix sum. No host synchronization; a row with NaN, +inf or only -inf
// logits trips a device-side check.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::sample
