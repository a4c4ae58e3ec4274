// Shared glue for attention / attention_backward / decode_attention: layout and shape checks, the
// strides of the padded and varlen layouts, and the per-sequence table (csrc/kernels/attention.h).
// The CPU glue always builds the table on the host; the CUDA glue builds it on the device for the
// padded layouts (no host sync) and uploads the host table for varlen (see attention_cuda.cpp).
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels/attention.h"
#include "utils.h"

namespace fastrlhf::ops {

namespace ka = k::attention;

struct AttnCall {
  Tensor q, k, v;                // contiguous
  std::vector<ka::Seq> seqs;     // host table; empty when prepare(..., host_table = false) got a padded layout
  ka::Params params;             // pointers to q/k/v and, with a host table, to `seqs`
  k::DType dtype;
  bool varlen = false;
  std::vector<int64_t> lse_shape;  // padded [B, H, Tq], varlen [total, H]
};

inline std::vector<int64_t> to_vec(const Tensor& t) {
  const Tensor c = t.to(at::kCPU).to(at::kLong).contiguous();
  return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

// Checks the inputs and fills the layout of one call. host_table = false (CUDA, padded layout):
// key_lengths / key_start are only shape-checked, never read, and `seqs` stays empty; the caller
// builds the table where it runs (values are then checked there). The varlen layout always reads
// cu_seqlens on the host (its table and the longest sequence size the launch).
inline AttnCall prepare(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                        const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
                        const std::optional<Tensor>& key_lengths, const std::optional<Tensor>& key_start,
                        bool host_table = true) {
  check_float(q, "q");
  check_dtype(k, q.scalar_type(), "k");
  check_dtype(v, q.scalar_type(), "v");
  TORCH_CHECK(k.sizes() == v.sizes(), "fastrlhf: k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  AttnCall c;
  c.varlen = cu_seqlens_q.has_value();
  c.dtype = to_kernel_dtype(q.scalar_type());
  c.q = q.contiguous(), c.k = k.contiguous(), c.v = v.contiguous();
  auto& p = c.params;
  if (!c.varlen) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "fastrlhf: padded attention takes q [B, H, T, D], k/v [B, Hkv, T, D]");
    const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
    TORCH_CHECK(k.size(0) == B && k.size(3) == D, "fastrlhf: k must be [B, Hkv, Tk, D] = [", B, ", *, *, ", D, "]");
    TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "fastrlhf: q heads ", H, " must be a multiple of kv heads ", Hkv);
    if (host_table) {
      const std::vector<int64_t> kl = key_lengths ? to_vec(*key_lengths) : std::vector<int64_t>(B, Tk);
      const std::vector<int64_t> ks = key_start ? to_vec(*key_start) : std::vector<int64_t>(B, 0);
      TORCH_CHECK(int64_t(kl.size()) == B && int64_t(ks.size()) == B, "fastrlhf: key_lengths/key_start must be [B]");
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(kl[b] >= 0 && kl[b] <= Tk && ks[b] >= 0 && ks[b] <= Tk, "fastrlhf: key_lengths/key_start of row ",
                    b, " out of [0, ", Tk, "]");
        c.seqs.push_back(ka::padded_seq(b, H, Hkv, Tq, Tk, D, ks[b], kl[b], /*decode=*/false));
      }
    } else {
      for (const auto* t : {&key_lengths, &key_start})
        TORCH_CHECK(!t->has_value() || (*t)->numel() == B, "fastrlhf: key_lengths/key_start must be [B]");
    }
    p.H = H, p.Hkv = Hkv, p.D = D;
    p.q_head_stride = Tq * D, p.q_row_stride = D, p.k_head_stride = Tk * D, p.k_row_stride = D;
    p.lse_head_stride = Tq, p.lse_row_stride = 1;
    p.n_seq = B;
    p.max_q_len = Tq, p.max_k_len = Tk;
    c.lse_shape = {B, H, Tq};
  } else {
    TORCH_CHECK(cu_seqlens_k.has_value(), "fastrlhf: varlen attention needs cu_seqlens for keys too");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "fastrlhf: varlen attention takes q [total, H, D], k/v [total, Hkv, D]");
    const int64_t H = q.size(1), D = q.size(2), Hkv = k.size(1);
    TORCH_CHECK(k.size(2) == D, "fastrlhf: k head dim ", k.size(2), " != q head dim ", D);
    TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "fastrlhf: q heads ", H, " must be a multiple of kv heads ", Hkv);
    const auto cq = to_vec(*cu_seqlens_q), ck = to_vec(*cu_seqlens_k);
    TORCH_CHECK(cq.size() == ck.size() && cq.size() >= 1, "fastrlhf: cu_seqlens must be [B + 1]");
    TORCH_CHECK(cq.front() == 0 && ck.front() == 0 && cq.back() == q.size(0) && ck.back() == k.size(0),
                "fastrlhf: cu_seqlens must start at 0 and end at the total number of tokens");
    for (size_t b = 0; b + 1 < cq.size(); ++b) {
      TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "fastrlhf: cu_seqlens must be non-decreasing");
      const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
      c.seqs.push_back(ka::Seq{cq[b] * H * D, ck[b] * Hkv * D, lq, 0, lk, lk - lq, cq[b] * H});
      p.max_q_len = std::max(p.max_q_len, lq);
      p.max_k_len = std::max(p.max_k_len, lk);
    }
    p.H = H, p.Hkv = Hkv, p.D = D;
    p.q_head_stride = D, p.q_row_stride = H * D, p.k_head_stride = D, p.k_row_stride = Hkv * D;
    p.lse_head_stride = 1, p.lse_row_stride = H;
    p.n_seq = int64_t(c.seqs.size());
    c.lse_shape = {q.size(0), H};
  }
  TORCH_CHECK(p.D >= 1 && p.D <= 256, "fastrlhf: head dim must be in [1, 256], got ", p.D);
  p.q = c.q.const_data_ptr(), p.k = c.k.const_data_ptr(), p.v = c.v.const_data_ptr();
  p.seqs = c.seqs.empty() ? nullptr : c.seqs.data();
  p.causal = causal;
  p.scale = scale;
  return c;
}

// decode_attention's inputs: q [B, H, Tq, D] are the last Tq positions of each row, so key j is
// visible to query i iff j < cache_seqlens[b] and j <= i + cache_seqlens[b] - Tq.
inline AttnCall prepare_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& cache_seqlens, double scale, bool host_table = true) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4,
              "fastrlhf: decode_attention takes q [B, H, Tq, D], caches [B, Hkv, Tmax, D]");
  auto c = prepare(q, k_cache, v_cache, /*causal=*/true, scale, std::nullopt, std::nullopt, cache_seqlens, std::nullopt,
                   host_table);
  const int64_t Tq = q.size(2);
  for (auto& s : c.seqs) {
    TORCH_CHECK(s.k_end >= Tq, "fastrlhf: cache_seqlens must count the ", Tq, " new tokens already in the cache");
    s.causal_offset = s.k_end - Tq;
  }
  return c;
}

// The forward's outputs (out like q, lse [lse_shape] in the accumulator dtype) with c.params
// pointing at them.
struct ForwardOutputs { Tensor out, lse; };

inline ForwardOutputs forward_outputs(AttnCall& c) {
  ForwardOutputs r{at::empty_like(c.q), at::empty(c.lse_shape, c.q.options().dtype(acc_type(c.q.scalar_type())))};
  c.params.o = r.out.data_ptr();
  c.params.lse = static_cast<float*>(r.lse.data_ptr());
  return r;
}

// The backward's inputs in the layout the kernels read (grad_out and out like q, lse in the
// accumulator dtype on q's device), its outputs dq, dk, dv (dk / dv zeroed: keys no query sees
// are never written) and the delta workspace, with c.params pointing at all of them.
struct BackwardTensors { Tensor grad_out, out, lse, dq, dk, dv, delta; };

inline BackwardTensors prepare_backward(AttnCall& c, const Tensor& grad_out, const Tensor& out, const Tensor& lse) {
  const Tensor& q = c.q;
  check_same(grad_out, q, "grad_out", "q");
  check_same(out, q, "out", "q");
  BackwardTensors t;
  t.grad_out = grad_out.to(q.scalar_type()).contiguous();
  t.out = out.to(q.scalar_type()).contiguous();
  t.lse = lse.to(q.device(), acc_type(q.scalar_type())).contiguous();
  TORCH_CHECK(t.lse.sizes() == at::IntArrayRef(c.lse_shape), "fastrlhf: lse has the wrong shape ", t.lse.sizes());
  t.dq = at::empty_like(q), t.dk = at::zeros_like(c.k), t.dv = at::zeros_like(c.v);
  t.delta = at::empty_like(t.lse);
  auto& p = c.params;
  p.o = const_cast<void*>(t.out.const_data_ptr());
  p.lse = static_cast<float*>(const_cast<void*>(t.lse.const_data_ptr()));
  p.dout = t.grad_out.const_data_ptr();
  p.dq = t.dq.data_ptr(), p.dk = t.dk.data_ptr(), p.dv = t.dv.data_ptr();
  p.delta = t.delta.data_ptr();
  return t;
}

}  // namespace fastrlhf::ops
