// Token log-probs (and entropies) from the last hidden states and the LM-head weight, forward
// and backward, on [vocab block x token chunk] tiles of the logits; the [N, V] logits never exist.
//
// The tile is vocab-major: L^T[v0:v0+vc, n0:n0+nc] = W[v0:v0+vc] h[n0:n0+nc]^T (+ bias), one GEMM.
// Per token (a column of the tile) the
// row statistics of token_logprobs.h -- max m, s = sum exp(x - m), e = sum exp(x - m)(x - m) with
// x = logit / temperature -- are updated online across vocab blocks:
//   m' = max(m, tile max),  r = exp(m - m'),  s' = r s + tile s,  e' = r (e + s (m - m')) + tile e
// and finalized as in token_logprobs (same row_stats (m, log s), same clamps).
// Backward: the tile is recomputed, turned into dlogits^T in place (token_logprobs' formula), then
//   grad_weight[v0:v0+vc] (+)= dL^T h[n0:n0+nc],  grad_hidden[n0:n0+nc] (+)= dL W[v0:v0+vc],
//   grad_bias[v0:v0+vc] (+)= row sums of dL^T.
// Loops: token chunks outer, vocab blocks inner, so a chunk's grad_hidden stays in cache and
// each block of grad_weight is read and written once per chunk. Only the tile (vc x nc) and a
// few [nc] vectors are allocated; fp32 on AVX-512 builds also packs the chunk's hidden states
// (h^T in 32-token strips; in the backward h in 32-column strips too: 2 x nc x H floats, padded
// to 32) and each work unit packs its operand strips (<= 112 x max(H, nc) or 2048 x 32 floats,
// freed after each product).
// GEMMs: fp32 on AVX-512 builds runs cpu/sgemm.h's micro-kernel on packed strips for chunks of
// >= 32 tokens (timed against the eager MKL composition in the linear_token_logprobs rows of
// bench/results/token_logprobs-cpu.json); fp64, other targets and smaller chunks run fixed panels
// of single-threaded calls of the injected BLAS (vocab-major, the orientation MKL runs fastest).
// Either way work units split only output entries, each a sum in a fixed order: for given tile
// sizes, results do not depend on the thread count.
#pragma once

#include "common.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "token_logprobs.h"

namespace fastrlhf::kernels::linear_token_logprobs {

struct Tiles {
  int64_t chunk = 0;  // tokens per chunk (nc)
  int64_t block = 0;  // vocab rows per block (vc)
};

// chunk_size > 0: that many tokens per chunk; 0: 512. The vocab block has about kTileElements /
// chunk rows, rounded down to a multiple of kBlockQuantum (at least one quantum, at most V): a
// tile of <= 2^20 logits up to chunks of 4096 tokens. The quantum is two of the fp32
// micro-kernel's work units (groups of 8 strips of 14 vocab rows, cpu/linear_token_logprobs.cpp),
// so a block splits evenly over two threads.
constexpr int64_t kDefaultChunk = 512;
constexpr int64_t kTileElements = int64_t(1) << 20;  // 4 MiB of fp32 logits
constexpr int64_t kBlockQuantum = 14 * 8 * 2;
inline Tiles choose_tiles(int64_t N, int64_t V, int64_t chunk_size) {
  Tiles t;
  t.chunk = chunk_size > 0 ? chunk_size : kDefaultChunk;
  if (t.chunk > N) t.chunk = N > 0 ? N : 1;
  t.block = kTileElements / t.chunk / kBlockQuantum * kBlockQuantum;
  if (t.block < kBlockQuantum) t.block = kBlockQuantum;
  if (t.block > V) t.block = V > 0 ? V : 1;
  return t;
}

struct Params {
  const void* hidden = nullptr;   // [N, H] contiguous
  const void* weight = nullptr;   // [V, H] contiguous
  const void* bias = nullptr;     // [V] or nullptr
  const int64_t* tokens = nullptr;  // [N]
  void* logprobs = nullptr;       // [N]
  void* entropy = nullptr;        // [N]
  void* row_stats = nullptr;      // [N, 2] (m, log s), as token_logprobs
  void* tile = nullptr;           // scratch: block * chunk elements
  void* scratch = nullptr;        // scratch: 4 * chunk elements
  int64_t N = 0, H = 0, V = 0;
  Tiles tiles;
  double inv_temperature = 1.0;
};

struct BackwardParams {
  const void* grad_logprobs = nullptr;  // [N] or nullptr (zeros)
  const void* grad_entropy = nullptr;   // [N] or nullptr (zeros)
  const void* hidden = nullptr;         // [N, H]
  const void* weight = nullptr;         // [V, H]
  const void* bias = nullptr;           // [V] or nullptr
  const int64_t* tokens = nullptr;      // [N] (validated by the forward)
  const void* row_stats = nullptr;      // [N, 2]
  const void* entropy = nullptr;        // [N]
  void* grad_hidden = nullptr;          // [N, H], fully written
  void* grad_weight = nullptr;          // [V, H], fully written (zeros when N == 0)
  void* grad_bias = nullptr;            // [V] or nullptr, fully written
  void* tile = nullptr;                 // scratch: block * chunk elements
  void* scratch = nullptr;              // scratch: 6 * chunk elements
  int64_t N = 0, H = 0, V = 0;
  Tiles tiles;
  double inv_temperature = 1.0;
};

// fp32 and fp64 (the dtypes the injected BLAS multiplies). kIndexOutOfRange for a token outside
// [0, V) (checked before any work).
Status launch_cpu(const Params& p, DType dtype, const cpu::Blas& blas, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const BackwardParams& p, DType dtype, const cpu::Blas& blas,
                           const cpu::ParallelFor& parallel_for);

}  // namespace fastrlhf::kernels::linear_token_logprobs
