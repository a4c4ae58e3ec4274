// Shared glue for sample (CPU and CUDA differ only in the launcher).
#pragma once

#include "kernels/sample.h"
#include "utils.h"

namespace fastrlhf::ops {

// Why a row of logits [B, V] has no distribution to sample from (the first such row), for errors.
inline std::string describe_bad_logits(const Tensor& logits) {
  const Tensor x = logits.to(at::kFloat);
  const Tensor nan = x.isnan().any(1), pinf = x.isposinf().any(1), all_ninf = x.isneginf().all(1);
  for (int64_t b = 0; b < x.size(0); ++b) {
    if (nan[b].item<bool>()) return "row " + std::to_string(b) + " of logits holds NaN";
    if (pinf[b].item<bool>())
      return "row " + std::to_string(b) + " of logits holds +inf (a certain token: mask the others with -inf instead)";
    if (all_ninf[b].item<bool>()) return "row " + std::to_string(b) + " of logits is all -inf (no token is allowed)";
  }
  return "a row of logits has no distribution (NaN, +inf or only -inf)";
}

struct SampleCall {
  Tensor logits, history, row_ids, tokens, logprobs, raw_logprobs, workspace;
  std::vector<Tensor> holders;  // contiguous per-row parameter tensors
  k::sample::Params params;
  k::DType dtype;
};

// Optional [B] per-row parameter -> RowParam (contiguous tensor of dtype T) or the scalar.
template <typename T>
k::sample::RowParam<T> row_param(SampleCall& c, const std::optional<Tensor>& t, double val, const char* name) {
  k::sample::RowParam<T> rp{nullptr, T(val)};
  if (!t.has_value()) return rp;
  const auto want = std::is_same_v<T, int64_t> ? at::kLong : at::kFloat;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c.params.B, "fastrlhf: ", name, " must be a scalar or [B] = [", c.params.B,
              "], got ", t->sizes());
  TORCH_CHECK(t->device() == c.logits.device(), "fastrlhf: ", name, " must be on ", c.logits.device());
  c.holders.push_back(t->to(want).contiguous());
  rp.arr = c.holders.back().const_data_ptr<T>();
  return rp;
}

inline SampleCall prepare_sample(const Tensor& logits, const std::optional<Tensor>& temperature, double temperature_val,
                                 const std::optional<Tensor>& top_k, int64_t top_k_val,
                                 const std::optional<Tensor>& top_p, double top_p_val,
                                 const std::optional<Tensor>& min_p, double min_p_val,
                                 const std::optional<Tensor>& epsilon, double epsilon_val,
                                 const std::optional<Tensor>& repetition_penalty, double repetition_penalty_val,
                                 const std::optional<Tensor>& presence_penalty, double presence_penalty_val,
                                 const std::optional<Tensor>& frequency_penalty, double frequency_penalty_val,
                                 const std::optional<Tensor>& token_history, int64_t seed, int64_t offset,
                                 const std::optional<Tensor>& row_ids) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "fastrlhf: logits must be [B, V] with V >= 1, got ",
              logits.sizes());
  check_float(logits, "logits");
  SampleCall c;
  c.holders.reserve(8);
  c.dtype = to_kernel_dtype(logits.scalar_type());
  c.logits = logits.contiguous();
  auto& p = c.params;
  p.logits = c.logits.const_data_ptr();
  p.B = logits.size(0);
  p.V = logits.size(1);
  p.temperature = row_param<float>(c, temperature, temperature_val, "temperature");
  p.top_k = row_param<int64_t>(c, top_k, double(top_k_val), "top_k");
  p.top_p = row_param<float>(c, top_p, top_p_val, "top_p");
  p.min_p = row_param<float>(c, min_p, min_p_val, "min_p");
  p.epsilon = row_param<float>(c, epsilon, epsilon_val, "epsilon");
  p.repetition_penalty = row_param<float>(c, repetition_penalty, repetition_penalty_val, "repetition_penalty");
  p.presence_penalty = row_param<float>(c, presence_penalty, presence_penalty_val, "presence_penalty");
  p.frequency_penalty = row_param<float>(c, frequency_penalty, frequency_penalty_val, "frequency_penalty");
  if (token_history.has_value()) {
    TORCH_CHECK(token_history->dim() == 2 && token_history->size(0) == p.B,
                "fastrlhf: token_history must be [B, L] = [", p.B, ", L], got ", token_history->sizes());
    check_dtype(*token_history, at::kLong, "token_history");
    TORCH_CHECK(token_history->device() == logits.device(), "fastrlhf: token_history must be on ", logits.device());
    c.history = token_history->contiguous();
    p.history = c.history.const_data_ptr<int64_t>();
    p.L = token_history->size(1);
  }
  if (row_ids.has_value()) {
    TORCH_CHECK(row_ids->dim() == 1 && row_ids->size(0) == p.B, "fastrlhf: row_ids must be [B] = [", p.B, "], got ",
                row_ids->sizes());
    check_dtype(*row_ids, at::kLong, "row_ids");
    TORCH_CHECK(row_ids->device() == logits.device(), "fastrlhf: row_ids must be on ", logits.device());
    c.row_ids = row_ids->contiguous();
    p.row_ids = c.row_ids.const_data_ptr<int64_t>();
  }
  p.seed = uint64_t(seed);
  p.offset = uint64_t(offset);
  c.tokens = at::empty({p.B}, logits.options().dtype(at::kLong));
  c.logprobs = at::empty({p.B}, logits.options().dtype(at::kFloat));
  c.raw_logprobs = at::empty({p.B}, logits.options().dtype(at::kFloat));
  p.tokens = c.tokens.data_ptr<int64_t>();
  p.logprobs = c.logprobs.data_ptr<float>();
  p.raw_logprobs = c.raw_logprobs.data_ptr<float>();
  return c;
}

}  // namespace fastrlhf::ops
