// Scaled dot-product attention with an online (flash) softmax, forward and backward, and KV-cache
// decode, over a per-sequence description that covers the padded [B, H, T, D] layout (optional
// per-row key_lengths / key_start), the packed varlen layout [total, H, D] with cu_seqlens, and
// decode against a cache with per-row lengths. GQA/MQA: query head h reads kv head
// h / (H / Hkv), without copying K/V.
//
// For sequence b, query row i (0-based in the sequence) attends to keys j with
//   k_begin(b) <= j < k_end(b)   and, when causal,   j <= i + causal_offset(b)
// scores s_ij = scale * q_i . k_j;  out_i = sum_j softmax_j(s_i.) v_j;  lse_i = logsumexp_j s_ij.
// A query row with no visible key gets out = 0 and lse = -inf (its gradient is 0).
#pragma once

#include "common.h"
#include "math.h"

namespace fastrlhf::kernels::attention {

// Where sequence b lives: element (row t, head h, dim d) of Q is at
//   q + q_off[b] + h * q_head_stride + t * q_row_stride + d      (likewise k, v, o)
struct Seq {
  int64_t q_off, k_off;  // element offsets of the sequence's first row (head 0)
  int64_t q_len, k_begin, k_end;
  int64_t causal_offset;
  int64_t lse_off;  // offset of (head 0, row 0) in lse; lse row stride is lse_row_stride
};

struct Params {
  const void* q = nullptr;  // storage dtype
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;        // like q
  float* lse = nullptr;     // fp32 (fp64 for fp64: then it points to double)
  const Seq* seqs = nullptr;  // [n_seq]
  int64_t n_seq = 0, H = 0, Hkv = 0, D = 0;
  int64_t q_head_stride = 0, q_row_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t lse_head_stride = 0, lse_row_stride = 0;
  bool causal = false;
  double scale = 1.0;
  // backward
  const void* dout = nullptr;  // like o
  void* dq = nullptr;          // like q
  void* dk = nullptr;          // like k
  void* dv = nullptr;          // like v
  void* delta = nullptr;       // workspace like lse: rowsum(dout * o)
  // ---- CUDA launchers only (the CPU launchers read the table on the host and ignore these) ----
  // `seqs` then points to device memory, so the launchers take the grid size from these bounds:
  int64_t max_q_len = 0;  // >= every seqs[b].q_len
  int64_t max_k_len = 0;  // >= every seqs[b].k_end
  // `lse` may be null for launch_cuda / launch_decode_cuda (not written then).
  // Split-KV decode: the keys of each sequence are cut into n_splits chunks handled by separate
  // blocks, whose partial results go to two workspaces of the accumulator type (fp32, fp64 for
  // fp64), indexed by the row's lse index r = lse_off + h * lse_head_stride + i * lse_row_stride:
  int64_t n_splits = 1;
  void* partial_out = nullptr;  // [n_rows][n_splits][D]: out of the chunk (normalized), 0 if empty
  void* partial_lse = nullptr;  // [n_rows][n_splits]: logsumexp of the chunk, -inf if empty
};

// Sequence b of the padded layout: q [B, H, Tq, D], k/v [B, Hkv, Tk, D], lse [B, H, Tq], keys
// [k_begin, k_end) (key_start / key_lengths). Causal alignment: the last query sees key Tk - 1;
// for decode (new tokens at the end of each row's cache) it sees key k_end - 1.
FRL_HD Seq padded_seq(int64_t b, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t k_begin,
                      int64_t k_end, bool decode) {
  return Seq{b * H * Tq * D, b * Hkv * Tk * D, Tq, k_begin, k_end, (decode ? k_end : Tk) - Tq, b * H * Tq};
}

FRL_HD int64_t visible_end(const Seq& s, int64_t i, bool causal) {
  int64_t e = s.k_end;
  if (causal) {
    const int64_t c = i + s.causal_offset + 1;
    e = c < e ? c : e;
  }
  return e;
}

// A row's softmax sum l -> the factor its output accumulator is scaled by: 1 / l; 0 for a row
// that sees no key (l = 0: the output is 0, by convention); NaN for a row whose scores were NaN
// (l = NaN), so a NaN query or key never turns into a silent 0 row.
template <typename A>
FRL_HD A inv_row_sum(A l) { return l > A(0) ? A(1) / l : (l == A(0) ? A(0) : l); }

// A row's log-sum-exp from its running max m and sum l: -inf without visible keys, NaN after NaN.
template <typename A>
FRL_HD A row_lse(A m, A l) { return l > A(0) ? m + log_acc(l) : (l == A(0) ? A(-INFINITY) : l); }

}  // namespace fastrlhf::kernels::attention

#include "cpu/blas.h"
#include "cpu/parallel.h"
#if defined(FASTRLHF_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastrlhf::kernels::attention {
// CPU: the forward parallel over (sequence, head, query block), the backward over (sequence, kv
// head); tiles multiplied with the injected BLAS, key chunks skipped where the causal mask hides
// them entirely.
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for, const cpu::Blas& blas);
// Few query rows per sequence (decode): one task per (sequence, kv head) covering the group's
// query heads, K and V streamed once, no staging.
Status launch_decode_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);

// CUDA decode plan. Sequences with more than kDecodeMaxQueries query rows run the forward kernel
// (tensor cores where it can), one block per (query block, head). Otherwise one block per
// (sequence, kv head, key chunk) covers the rows of all query heads of the group, and the number
// of chunks is chosen so that about 2 blocks of work per SM exist (chunks of >= kDecodeMinChunk
// keys, at most kDecodeMaxSplits): the result for Params::n_splits (1: no workspace needed).
constexpr int64_t kDecodeMaxQueries = 16;
constexpr int64_t kDecodeMinChunk = 256;
constexpr int64_t kDecodeMaxSplits = 64;
inline int64_t decode_num_splits(int64_t n_seq, int64_t Hkv, int64_t max_q_len, int64_t max_k_len, int num_sms) {
  if (max_q_len > kDecodeMaxQueries || n_seq * Hkv == 0) return 1;
  const int64_t want = (2 * int64_t(num_sms) + n_seq * Hkv - 1) / (n_seq * Hkv);
  const int64_t most = (max_k_len + kDecodeMinChunk - 1) / kDecodeMinChunk;
  int64_t s = want < most ? want : most;
  s = s < kDecodeMaxSplits ? s : kDecodeMaxSplits;
  return s < 1 ? 1 : s;
}

#if defined(FASTRLHF_WITH_CUDA)
// CUDA (csrc/kernels/cuda/attention/, launchers in launch.cu). `p.seqs` is a device pointer; grid sizes come from
// p.max_q_len / p.max_k_len. bf16/fp16 with D in {32, 64, 96, 128} (16-byte aligned rows) on
// sm_80+ run tensor-core kernels (mma.sync m16n8k16, fp32 accumulation, P and dS rounded to the
// storage dtype before their matmuls, as FlashAttention-2); everything else (fp32, fp64, other D)
// runs CUDA-core kernels with one warp per row. Every output element has one writer and a fixed
// summation order: deterministic.
cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream);
// Needs p.delta (like lse); dq written for every row, dk/dv only for keys some row sees (the glue
// zero-fills them).
cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream);
// Needs p.n_splits (decode_num_splits) and, when it is > 1, p.partial_out / p.partial_lse.
cudaError_t launch_decode_cuda(const Params& p, DType dtype, cudaStream_t stream);

// The padded layout's table built on the device (no host sync): seqs[b] = padded_seq(b, ...)
// with k_begin = key_start[b] (0 when null) and k_end = key_lengths[b] (Tk when null). Values
// outside [0, Tk] (decode: key_lengths outside [Tq, Tk]) trap (FRL_DEVICE_CHECK), like torch's
// index checks, since they cannot be reported without a sync.
struct PaddedTable {
  const int64_t* key_lengths = nullptr;  // [B] or null
  const int64_t* key_start = nullptr;    // [B] or null
  int64_t B = 0, H = 0, Hkv = 0, Tq = 0, Tk = 0, D = 0;
  bool decode = false;
};
cudaError_t launch_padded_table_cuda(const PaddedTable& t, Seq* seqs, cudaStream_t stream);
#endif
}  // namespace fastrlhf::kernels::attention
