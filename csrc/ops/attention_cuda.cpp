// CUDA implementations of fastrlhf::attention, attention_backward and decode_attention.
//
// The per-sequence table (kernels/attention.h Seq) must be in device memory:
// * padded layouts (and decode): built on the device by a tiny kernel from key_lengths /
//   key_start / cache_seqlens, so these calls never synchronize with the host (decode runs every
//   generation step; CUDA graphs can capture it). Out-of-range values cannot be reported without
//   a sync, so the table kernel traps on them (a CUDA error at the next sync, like torch's index
//   checks); the Python layer checks them first in eager mode.
// * varlen: the table and the longest sequence (the grid size) come from cu_seqlens on the host
//   (one sync, as FlashAttention's max_seqlen); the table is uploaded from pinned memory
//   without blocking.
// Outputs and workspaces are allocated with torch on q's device; launches go on the current
// stream.
#include <ATen/cuda/CUDAContext.h>

#include <cstring>

#include "attention.h"
#include "cuda_utils.h"

namespace fastrlhf::ops {
namespace {

static_assert(sizeof(ka::Seq) == 7 * sizeof(int64_t), "Seq is uploaded as 7 int64 per sequence");

void check_devices(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fastrlhf: q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
}

// [n] int64 on q's device, or null.
std::optional<Tensor> long_on(const std::optional<Tensor>& t, const Tensor& q) {
  if (!t.has_value()) return std::nullopt;
  return t->to(q.device(), at::kLong).contiguous();
}

// Puts the table of `c` on the device and points c.params.seqs at it; the returned tensor owns it.
Tensor device_table(AttnCall& c, const Tensor& q, const std::optional<Tensor>& key_lengths,
                    const std::optional<Tensor>& key_start, bool decode, cudaStream_t stream) {
  const int64_t n = c.params.n_seq;
  Tensor table;
  if (c.varlen) {
    Tensor host = at::empty({n, 7}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    if (n > 0) std::memcpy(host.data_ptr(), c.seqs.data(), n * sizeof(ka::Seq));
    table = host.to(q.device(), /*non_blocking=*/true);  // on the current stream; torch keeps `host` alive
  } else {
    table = at::empty({n, 7}, q.options().dtype(at::kLong));
    const auto kl = long_on(key_lengths, q), ks = long_on(key_start, q);
    ka::PaddedTable t;
    t.key_lengths = kl ? kl->const_data_ptr<int64_t>() : nullptr;
    t.key_start = ks ? ks->const_data_ptr<int64_t>() : nullptr;
    t.B = n, t.H = c.params.H, t.Hkv = c.params.Hkv, t.Tq = c.q.size(2), t.Tk = c.k.size(2), t.D = c.params.D;
    t.decode = decode;
    check_cuda(ka::launch_padded_table_cuda(t, reinterpret_cast<ka::Seq*>(table.data_ptr<int64_t>()), stream),
               decode ? "decode_attention" : "attention");
  }
  c.params.seqs = reinterpret_cast<const ka::Seq*>(table.const_data_ptr<int64_t>());
  return table;
}

std::tuple<Tensor, Tensor> attention_cuda(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                                          const std::optional<Tensor>& cu_seqlens_q,
                                          const std::optional<Tensor>& cu_seqlens_k,
                                          const std::optional<Tensor>& key_lengths,
                                          const std::optional<Tensor>& key_start) {
  CudaContext ctx(q);
  check_devices(q, k, v);
  auto c = prepare(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start, /*host_table=*/false);
  const Tensor table = device_table(c, q, key_lengths, key_start, /*decode=*/false, ctx.stream);
  auto r = forward_outputs(c);
  check_cuda(ka::launch_cuda(c.params, c.dtype, ctx.stream), "attention");
  return {r.out, r.lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    bool causal, double scale, const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
    const std::optional<Tensor>& key_lengths, const std::optional<Tensor>& key_start) {
  CudaContext ctx(q);
  check_devices(q, k, v);
  auto c = prepare(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start, /*host_table=*/false);
  auto t = prepare_backward(c, grad_out, out, lse);
  const Tensor table = device_table(c, q, key_lengths, key_start, /*decode=*/false, ctx.stream);
  check_cuda(ka::launch_backward_cuda(c.params, c.dtype, ctx.stream), "attention_backward");
  return {t.dq, t.dk, t.dv};
}

Tensor decode_attention_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                             double scale) {
  CudaContext ctx(q);
  check_devices(q, k_cache, v_cache);
  auto c = prepare_decode(q, k_cache, v_cache, cache_seqlens, scale, /*host_table=*/false);
  const Tensor table = device_table(c, q, cache_seqlens, std::nullopt, /*decode=*/true, ctx.stream);
  auto& p = c.params;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.n_splits = ka::decode_num_splits(p.n_seq, p.Hkv, p.max_q_len, p.max_k_len, sms);
  Tensor partial_out, partial_lse;
  if (p.n_splits > 1) {  // rows are indexed like lse: [B, H, Tq]
    const auto acc = q.options().dtype(acc_type(q.scalar_type()));
    const int64_t rows = p.n_seq * p.H * p.max_q_len;
    partial_out = at::empty({rows, p.n_splits, p.D}, acc);
    partial_lse = at::empty({rows, p.n_splits}, acc);
    p.partial_out = partial_out.data_ptr();
    p.partial_lse = partial_lse.data_ptr();
  }
  Tensor out = at::empty_like(c.q);
  p.o = out.data_ptr();
  p.lse = nullptr;  // decode_attention returns no lse
  check_cuda(ka::launch_decode_cuda(p, c.dtype, ctx.stream), "decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace fastrlhf::ops
