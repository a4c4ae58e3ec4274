// Every fastrlhf op schema, in one place, plus the pybind11 module fastrlhf._C (build info).
// Backends add implementations with TORCH_LIBRARY_IMPL in csrc/ops/<op>_{cpu,cuda}.cpp; Python
// adds fake (meta) implementations and autograd in python/fastrlhf/ops/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <thread>

TORCH_LIBRARY(fastrlhf, m) {
  // ---- advantages and returns (python/fastrlhf/ops/{gae,group_advantages,whiten,td}.py) ----
  // rewards/values [B, T]; mask/dones [B, T] bool; last_values [B]  -> (advantages, returns)
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? dones, Tensor? last_values, "
        "float gamma, float lam) -> (Tensor, Tensor)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? dones, float gamma) -> Tensor");
  // scores [N], N = groups * group_size                                       -> advantages [N]
  m.def("group_advantages(Tensor scores, int group_size, bool normalize_std, bool leave_one_out, "
        "float eps) -> Tensor");
  // x [...], mask like x  -> (whitened like x, mean [] fp32/fp64, rstd [] fp32/fp64)
  m.def("whiten(Tensor x, Tensor? mask, bool shift_mean, bool unbiased, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  // rewards [...], next_q [..., A], dones [...] bool, next_actions [...] int64 -> targets [...]
  m.def("td_targets(Tensor rewards, Tensor next_q, Tensor? dones, Tensor? next_actions, "
        "float gamma) -> Tensor");
  // q [..., A], actions [...] int64, targets [...]                           -> updated q [..., A]
  m.def("q_update(Tensor q, Tensor actions, Tensor targets, float alpha) -> Tensor");

  // ---- fused log-probs (python/fastrlhf/ops/token_logprobs.py, linear_token_logprobs.py) ----
  // logits [N, V], tokens [N] int64 -> (logprobs [N], entropy [N], row_stats [N, 2]) in fp32
  // (fp64 for fp64); row_stats = (max, log sum exp(x - max)): log-sum-exp = their sum
  m.def("token_logprobs(Tensor logits, Tensor tokens, float temperature) -> (Tensor, Tensor, Tensor)");
  // -> grad_logits [N, V] in the logits dtype
  m.def("token_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, "
        "Tensor tokens, Tensor row_stats, Tensor entropy, float temperature) -> Tensor");
  // the same, writing grad_logits over logits (contiguous): a chunked caller's only [n, V] buffer
  m.def("token_logprobs_backward_(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, "
        "Tensor tokens, Tensor row_stats, Tensor entropy, float temperature) -> ()");
  // hidden [N, H], weight [V, H], tokens [N], bias [V] -> (logprobs [N], entropy [N], row_stats [N, 2])
  m.def("linear_token_logprobs(Tensor hidden, Tensor weight, Tensor tokens, Tensor? bias, "
        "float temperature, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // -> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0] without bias)
  m.def("linear_token_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor hidden, "
        "Tensor weight, Tensor tokens, Tensor? bias, Tensor row_stats, Tensor entropy, float temperature, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)");

  // ---- RL losses (python/fastrlhf/ops/{kl_penalty,policy_loss,value_loss}.py) ----
  // estimator: 0 k1, 1 k2, 2 k3, 3 abs.  logprobs/ref [...] -> kl [...]
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  // [B, T] inputs; agg: 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum,
  // 3 seq-mean-token-sum-norm; dual_clip/normalizer/norm_length <= 0: off / from the batch / T
  // -> (loss [], stats [10], row_weight [B])
  m.def("policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor? ref_logprobs, Tensor? entropy, float clip_low, float clip_high, float dual_clip, "
        "float kl_coef, int kl_estimator, float entropy_coef, int agg, float normalizer, "
        "float norm_length) -> (Tensor, Tensor, Tensor)");
  // -> (grad_logprobs [B, T], grad_entropy [B, T] or [0])
  m.def("policy_loss_backward(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, "
        "Tensor advantages, Tensor mask, Tensor? ref_logprobs, Tensor row_weight, float clip_low, "
        "float clip_high, float dual_clip, float kl_coef, int kl_estimator, float entropy_coef, "
        "bool has_entropy) -> (Tensor, Tensor)");
  // clip <= 0: unclipped -> (loss [], stats [4], row_weight [B])
  m.def("value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, "
        "int agg, float normalizer, float norm_length) -> (Tensor, Tensor, Tensor)");
  m.def("value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, "
        "Tensor mask, Tensor row_weight, float clip) -> Tensor");

  // ---- pairwise preference losses (python/fastrlhf/ops/preference_loss.py) ----
  // chosen / rejected / refs / margin [B]; loss_type 0 sigmoid, 1 ipo, 2 hinge -> (loss [], stats [4])
  m.def("preference_loss(Tensor chosen, Tensor rejected, Tensor? ref_chosen, Tensor? ref_rejected, Tensor? margin, "
        "float beta, int loss_type, float label_smoothing, float normalizer) -> (Tensor, Tensor)");
  // -> grad_chosen [B] (grad_rejected = -grad_chosen)
  m.def("preference_loss_backward(Tensor grad_loss, Tensor chosen, Tensor rejected, Tensor? ref_chosen, "
        "Tensor? ref_rejected, Tensor? margin, float beta, int loss_type, float label_smoothing, float normalizer) "
        "-> Tensor");

  // ---- sampling (python/fastrlhf/ops/sample.py) ----
  // logits [B, V]; each parameter a [B] tensor or the scalar after it; token_history [B, L]
  // (-1 padding); row_ids [B] int64 Philox row counters (default: the row index)
  // -> (tokens [B] int64, logprobs [B] fp32, raw_logprobs [B] fp32)
  m.def("sample(Tensor logits, Tensor? temperature, float temperature_val, Tensor? top_k, int top_k_val, "
        "Tensor? top_p, float top_p_val, Tensor? min_p, float min_p_val, Tensor? epsilon, float epsilon_val, "
        "Tensor? repetition_penalty, float repetition_penalty_val, Tensor? presence_penalty, "
        "float presence_penalty_val, Tensor? frequency_penalty, float frequency_penalty_val, "
        "Tensor? token_history, int seed, int offset, Tensor? row_ids) -> (Tensor, Tensor, Tensor)");

  // ---- attention (python/fastrlhf/ops/attention.py) ----
  // padded: q [B, H, Tq, D], k/v [B, Hkv, Tk, D], key_lengths/key_start [B] -> (out like q, lse [B, H, Tq])
  // varlen: q [Nq, H, D], k/v [Nk, Hkv, D], cu_seqlens_q/k [B + 1]        -> (out like q, lse [Nq, H])
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, Tensor? key_lengths, Tensor? key_start) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? key_lengths, Tensor? key_start) "
        "-> (Tensor, Tensor, Tensor)");
  // q [B, H, Tq, D] (the newest Tq positions), caches [B, Hkv, Tmax, D], cache_seqlens [B] -> like q
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrlhf compiled kernels (ops are registered under torch.ops.fastrlhf)";
  m.def(
      "build_info",
      []() {
        py::dict info;
#if defined(FASTRLHF_WITH_CUDA)
        info["with_cuda"] = true;
        info["cuda_version"] = FASTRLHF_CUDA_VERSION;
        info["cuda_archs"] = FASTRLHF_CUDA_ARCHS;
#else
        info["with_cuda"] = false;
        info["cuda_version"] = py::none();
        info["cuda_archs"] = "";
#endif
        info["torch_version"] = FASTRLHF_TORCH_VERSION;
#if defined(FASTRLHF_CPU_ARCH)
        info["cpu_arch"] = FASTRLHF_CPU_ARCH;
#else
        info["cpu_arch"] = "";
#endif
        py::list features;
#if defined(__AVX2__)
        features.append("avx2");
#endif
#if defined(__FMA__)
        features.append("fma");
#endif
#if defined(__AVX512F__)
        features.append("avx512f");
#endif
#if defined(__ARM_NEON)
        features.append("neon");
#endif
        info["cpu_features"] = features;
        info["compiler"] = __VERSION__;
        return info;
      },
      "Dict describing how this extension was built (CUDA, archs, torch version, CPU features).");
}
