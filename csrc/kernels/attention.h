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
};

FRL_HD int64_t visible_end(const Seq& s, int64_t i, bool causal) {
  int64_t e = s.k_end;
  if (causal) {
    const int64_t c = i + s.causal_offset + 1;
    e = c < e ? c : e;
  }
  return e;
}

}  // namespace fastrlhf::kernels::attention

#include "cpu/parallel.h"

namespace fastrlhf::kernels::attention {
// CPU: parallel over (sequence, head, query block) for the forward and dQ, over (sequence, kv
// head, key block) for dK/dV; key tiles skipped where the causal mask hides them entirely.
Status launch_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
Status launch_backward_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
// Few query rows per sequence (decode): one task per (sequence, kv head) covering the group's
// query heads, K and V streamed once, no staging.
Status launch_decode_cpu(const Params& p, DType dtype, const cpu::ParallelFor& parallel_for);
}  // namespace fastrlhf::kernels::attention
