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
  auto r = forward_outputs(c);
  check_status(k::attention::launch_cpu(c.params, c.dtype, torch_parallel_for(), torch_blas()), "attention");
  return {r.out, r.lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    bool causal, double scale, const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
    const std::optional<Tensor>& key_lengths, const std::optional<Tensor>& key_start) {
  auto c = prepare(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start);
  auto t = prepare_backward(c, grad_out, out, lse);
  check_status(k::attention::launch_backward_cpu(c.params, c.dtype, torch_parallel_for(), torch_blas()),
               "attention_backward");
  return {t.dq, t.dk, t.dv};
}

Tensor decode_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                            double scale) {
  auto c = prepare_decode(q, k_cache, v_cache, cache_seqlens, scale);
  auto r = forward_outputs(c);  // (the CPU decode kernel writes lse too)
  check_status(k::attention::launch_decode_cpu(c.params, c.dtype, torch_parallel_for()), "decode_attention");
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace fastrlhf::ops
