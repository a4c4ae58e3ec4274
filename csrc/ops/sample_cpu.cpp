// CPU implementation of fastrlhf::sample.
#include "sample.h"

namespace fastrlhf::ops {
namespace {

using Triple = std::tuple<Tensor, Tensor, Tensor>;

Triple sample_cpu(const Tensor& logits, const std::optional<Tensor>& temperature, double temperature_val,
                  const std::optional<Tensor>& top_k, int64_t top_k_val, const std::optional<Tensor>& top_p,
                  double top_p_val, const std::optional<Tensor>& min_p, double min_p_val,
                  const std::optional<Tensor>& epsilon, double epsilon_val,
                  const std::optional<Tensor>& repetition_penalty, double repetition_penalty_val,
                  const std::optional<Tensor>& presence_penalty, double presence_penalty_val,
                  const std::optional<Tensor>& frequency_penalty, double frequency_penalty_val,
                  const std::optional<Tensor>& token_history, int64_t seed, int64_t offset,
                  const std::optional<Tensor>& row_ids) {
  auto c = prepare_sample(logits, temperature, temperature_val, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val,
                          epsilon, epsilon_val, repetition_penalty, repetition_penalty_val, presence_penalty,
                          presence_penalty_val, frequency_penalty, frequency_penalty_val, token_history, seed, offset,
                          row_ids);
  TORCH_CHECK(k::sample::launch_cpu(c.params, c.dtype, torch_parallel_for()) == k::Status::kOk,
              "fastrlhf.sample: ", describe_bad_logits(c.logits));
  return {c.tokens, c.logprobs, c.raw_logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace fastrlhf::ops
