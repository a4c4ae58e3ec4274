// CUDA implementation of fastrlhf::sample.
#include "cuda_utils.h"
#include "sample.h"

namespace fastrlhf::ops {
namespace {

using Triple = std::tuple<Tensor, Tensor, Tensor>;

Triple sample_cuda(const Tensor& logits, const std::optional<Tensor>& temperature, double temperature_val,
                   const std::optional<Tensor>& top_k, int64_t top_k_val, const std::optional<Tensor>& top_p,
                   double top_p_val, const std::optional<Tensor>& min_p, double min_p_val,
                   const std::optional<Tensor>& epsilon, double epsilon_val,
                   const std::optional<Tensor>& repetition_penalty, double repetition_penalty_val,
                   const std::optional<Tensor>& presence_penalty, double presence_penalty_val,
                   const std::optional<Tensor>& frequency_penalty, double frequency_penalty_val,
                   const std::optional<Tensor>& token_history, int64_t seed, int64_t offset,
                   const std::optional<Tensor>& row_ids) {
  CudaContext ctx(logits);
  auto c = prepare_sample(logits, temperature, temperature_val, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val,
                          epsilon, epsilon_val, repetition_penalty, repetition_penalty_val, presence_penalty,
                          presence_penalty_val, frequency_penalty, frequency_penalty_val, token_history, seed, offset,
                          row_ids);
  // [B, V] processed rows, and [B, V] history counts when there is a history
  const int64_t rows = c.params.history ? 2 * c.params.B : c.params.B;
  c.workspace = at::empty({rows, c.params.V}, logits.options().dtype(at::kFloat));
  c.params.workspace = c.workspace.data_ptr<float>();
  if (c.params.history) c.params.counts = c.params.workspace + c.params.B * c.params.V;
  check_cuda(k::sample::launch_cuda(c.params, c.dtype, ctx.stream), "sample");
  return {c.tokens, c.logprobs, c.raw_logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace fastrlhf::ops
