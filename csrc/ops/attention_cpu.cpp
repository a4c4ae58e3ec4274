// CPU implementations of fastrlhf::attention, attention_backward and decode_attention: the
// layout checks and the per-sequence table come from attention.h (shared with the CUDA glue,
// attention_cuda.cpp), then outputs and the CPU launchers.
#include "attention.h"

namespace fastrlhf::ops {
namespace {

std::tuple<Tensor, Tensor> attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                                         const std::optional<Tensor>& cu_seqlens_q,
                                         const std::optional<Tensor>& cu_seqlens_k,
                                         const std::optional<Tensor>& key_lengths,
                                         const std::optional<Tensor>& key_start) {
  auto c = prepare(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start);
  Tensor out = at::empty_like(c.q);
  Tensor lse = at::empty(c.lse_shape, q.options().dtype(acc_type(q.scalar_type())));
  c.params.o = out.data_ptr();
  c.params.lse = static_cast<float*>(lse.data_ptr());
  check_status(k::attention::launch_cpu(c.params, c.dtype, torch_parallel_for(), torch_blas()), "attention");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    bool causal, double scale, const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
    const std::optional<Tensor>& key_lengths, const std::optional<Tensor>& key_start) {
  auto c = prepare(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start);
  check_same(grad_out, q, "grad_out", "q");
  check_same(out, q, "out", "q");
  const Tensor g = grad_out.to(q.scalar_type()).contiguous(), o = out.contiguous(), l = lse.to(acc_type(q.scalar_type())).contiguous();
  TORCH_CHECK(l.sizes() == at::IntArrayRef(c.lse_shape), "fastrlhf: lse has the wrong shape ", l.sizes());
  Tensor dq = at::empty_like(c.q), dk = at::zeros_like(c.k), dv = at::zeros_like(c.v);
  Tensor delta = at::empty_like(l);
  auto& p = c.params;
  p.o = const_cast<void*>(o.const_data_ptr());
  p.lse = static_cast<float*>(const_cast<void*>(l.const_data_ptr()));
  p.dout = g.const_data_ptr();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.delta = delta.data_ptr();
  check_status(k::attention::launch_backward_cpu(p, c.dtype, torch_parallel_for(), torch_blas()), "attention_backward");
  return {dq, dk, dv};
}

Tensor decode_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                            double scale) {
  auto c = prepare_decode(q, k_cache, v_cache, cache_seqlens, scale);
  Tensor out = at::empty_like(c.q);
  Tensor lse = at::empty(c.lse_shape, q.options().dtype(acc_type(q.scalar_type())));
  c.params.o = out.data_ptr();
  c.params.lse = static_cast<float*>(lse.data_ptr());
  check_status(k::attention::launch_decode_cpu(c.params, c.dtype, torch_parallel_for()), "decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace fastrlhf::ops
