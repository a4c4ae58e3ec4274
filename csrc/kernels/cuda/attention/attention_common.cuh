// CUDA kernels for attention (semantics in ../../attention.h), split by family as FlashAttention
// splits its own:
//   attention_common.cuh   this file: what both families share, and the entry points that tie the
//                          translation units together
//   attention_tc.cuh       tensor-core kernels (templates), instantiated per dtype and head dim in
//                          tc_{fwd,bwd}_hdim<D>_<dtype>.cu (written by generate_instantiations.py)
//   attention_simple.cuh   CUDA-core kernels (templates); attention_simple.cu launches the forward
//                          and backward ones
//   decode.cu              split-KV decode and its merge
//   launch.cu              the launchers of ../../attention.h: checks, grid limits, dispatch
#pragma once

#include <cstdint>

#include "../../attention.h"
#include "../common.cuh"

namespace fastrlhf::kernels::attention::detail {

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Index of (sequence, head h, row i) in lse / delta / the decode workspaces.
__device__ __forceinline__ int64_t lse_index(const Params& p, const Seq& sq, int64_t h, int64_t i) {
  return sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
}

// Grids: x up to 2^31 - 1 blocks, y up to 65535 (the CUDA limits); a batch beyond them is an error,
// never a silently truncated launch.
inline bool grid_fits(int64_t x, int64_t y) { return x <= 2147483647 && y <= 65535; }

namespace simple {

constexpr int kWarps = 8;  // rows per block
constexpr int kThreads = kWarps * 32;

}  // namespace simple

inline unsigned row_blocks(int64_t rows) { return cuda::ceil_div(rows, simple::kWarps); }

// ---- entry points of the other translation units ------------------------------------------

// Tensor-core kernels for storage type T (__nv_bfloat16, __half) and head dim D: defined in
// attention_tc.cuh, explicitly instantiated in tc_{fwd,bwd}_hdim<D>_<dtype>.cu. Other files see
// only these declarations, so their calls link to those instantiations.
template <typename T, int D>
cudaError_t run_tc_forward(const Params& p, cudaStream_t stream);
template <typename T, int D>
cudaError_t run_tc_backward(const Params& p, cudaStream_t stream);  // dQ, then dK / dV
// cudaFuncGetAttributes of forward_tc<T, D> (the kernel lives in its instantiation file).
template <typename T, int D>
cudaError_t tc_forward_attributes(cudaFuncAttributes* attr);

// CUDA-core kernels (attention_simple.cu): the forward; delta = rowsum(dO * O), which both
// backward paths need first; dQ, then dK / dV. The caller has checked the grid limits.
cudaError_t run_simple_forward(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t run_delta(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t run_simple_backward(const Params& p, DType dtype, cudaStream_t stream);

// Split-KV decode and, with p.n_splits > 1, the merge (decode.cu); the caller has checked p.
cudaError_t run_decode(const Params& p, DType dtype, cudaStream_t stream);

}  // namespace fastrlhf::kernels::attention::detail
