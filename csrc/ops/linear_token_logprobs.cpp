// fastrlhf::linear_token_logprobs and its backward: token log-probs (and entropies) straight
// from the last hidden states and the LM-head weight, never materializing the [N, V] logits.
// Rows are processed in chunks: logits_c = hidden_c @ weight^T (+ bias) -> the token_logprobs
// kernel of the device; the backward recomputes logits_c, turns them into dlogits_c in place with
// the token_logprobs_backward_ kernel, and accumulates grad_hidden_c = dlogits_c @ weight and
// grad_weight += dlogits_c^T @ hidden_c (fp32 accumulator for 16-bit weights).
// Device-generic (CompositeExplicitAutograd): the matmuls are ATen's, the fused part is ours.
// The CPU has its own tiled kernel for fp32/fp64 (linear_token_logprobs_cpu.cpp).
#include "linear_token_logprobs.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastrlhf::ops {
namespace {

using Triple = std::tuple<Tensor, Tensor, Tensor>;

Triple call_token_logprobs(const Tensor& logits, const Tensor& tokens, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastrlhf::token_logprobs", "")
                       .typed<Triple(const Tensor&, const Tensor&, double)>();
  return op.call(logits, tokens, temperature);
}

// dlogits written over the chunk's logits (one [n, V] buffer per chunk)
void call_token_logprobs_backward_(const std::optional<Tensor>& g, const std::optional<Tensor>& h, const Tensor& logits,
                                   const Tensor& tokens, const Tensor& row_stats, const Tensor& entropy,
                                   double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastrlhf::token_logprobs_backward_", "")
                       .typed<void(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, double)>();
  op.call(g, h, logits, tokens, row_stats, entropy, temperature);
}

Tensor chunk_logits(const Tensor& h, const Tensor& weight, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

// rows per chunk: chunk_size, or about 2^23 logits (32 MiB in fp32)
int64_t chunk_rows(int64_t chunk_size, int64_t V) {
  return chunk_size > 0 ? chunk_size : std::max<int64_t>(1, (int64_t(1) << 23) / std::max<int64_t>(1, V));
}

}  // namespace

void check_linear_token_logprobs(const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
                                 const std::optional<Tensor>& bias, double temperature, int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "fastrlhf: hidden must be [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "fastrlhf: weight must be [V, H] with H = ", hidden.size(1), ", got ", weight.sizes());
  check_float(hidden, "hidden");
  check_dtype(weight, hidden.scalar_type(), "weight");
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == hidden.size(0), "fastrlhf: tokens must be [N] = [", hidden.size(0),
              "], got ", tokens.sizes());
  TORCH_CHECK(weight.device() == hidden.device() && tokens.device() == hidden.device(),
              "fastrlhf: hidden, weight and tokens must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastrlhf: bias must be [V] = [", weight.size(0),
                "], got ", bias->sizes());
    check_dtype(*bias, hidden.scalar_type(), "bias");
    TORCH_CHECK(bias->device() == hidden.device(), "fastrlhf: bias must be on ", hidden.device());
  }
  TORCH_CHECK(temperature > 0, "fastrlhf: temperature must be > 0, got ", temperature);
  TORCH_CHECK(chunk_size >= 0, "fastrlhf: chunk_size must be >= 0 (0: automatic), got ", chunk_size);
}

Triple linear_token_logprobs_composite(const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
                                       const std::optional<Tensor>& bias, double temperature, int64_t chunk_size) {
  check_linear_token_logprobs(hidden, weight, tokens, bias, temperature, chunk_size);
  const int64_t N = hidden.size(0);
  chunk_size = chunk_rows(chunk_size, weight.size(0));
  const auto acc = acc_type(hidden.scalar_type());
  Tensor logprobs = at::empty({N}, hidden.options().dtype(acc));
  Tensor entropy = at::empty({N}, hidden.options().dtype(acc));
  Tensor row_stats = at::empty({N, 2}, hidden.options().dtype(acc));
  for (int64_t i0 = 0; i0 < N; i0 += chunk_size) {
    const int64_t n = std::min(chunk_size, N - i0);
    auto [lp, ent, l] = call_token_logprobs(chunk_logits(hidden.narrow(0, i0, n), weight, bias),
                                            tokens.narrow(0, i0, n), temperature);
    logprobs.narrow(0, i0, n).copy_(lp);
    entropy.narrow(0, i0, n).copy_(ent);
    row_stats.narrow(0, i0, n).copy_(l);
  }
  return {logprobs, entropy, row_stats};
}

Triple linear_token_logprobs_backward_composite(const std::optional<Tensor>& grad_logprobs,
                                                const std::optional<Tensor>& grad_entropy, const Tensor& hidden,
                                                const Tensor& weight, const Tensor& tokens,
                                                const std::optional<Tensor>& bias, const Tensor& row_stats,
                                                const Tensor& entropy, double temperature, int64_t chunk_size) {
  check_linear_token_logprobs(hidden, weight, tokens, bias, temperature, chunk_size);
  const int64_t N = hidden.size(0);
  chunk_size = chunk_rows(chunk_size, weight.size(0));
  const bool low_precision = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;
  Tensor grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  // grad_weight / grad_bias accumulate over chunks: fp32 for 16-bit weights
  Tensor grad_weight = at::zeros(weight.sizes(),
                                 weight.options().dtype(low_precision ? at::kFloat : weight.scalar_type()));
  Tensor grad_bias = bias.has_value() ? at::zeros({weight.size(0)}, grad_weight.options())
                                      : at::empty({0}, grad_weight.options());
  auto rows = [](const std::optional<Tensor>& t, int64_t i0, int64_t n) -> std::optional<Tensor> {
    if (!t.has_value()) return std::nullopt;
    return t->narrow(0, i0, n);
  };
  for (int64_t i0 = 0; i0 < N; i0 += chunk_size) {
    const int64_t n = std::min(chunk_size, N - i0);
    const Tensor h = hidden.narrow(0, i0, n);
    const Tensor dlogits = chunk_logits(h, weight, bias);
    call_token_logprobs_backward_(rows(grad_logprobs, i0, n), rows(grad_entropy, i0, n), dlogits,
                                  tokens.narrow(0, i0, n), row_stats.narrow(0, i0, n), entropy.narrow(0, i0, n),
                                  temperature);
    grad_hidden.narrow(0, i0, n).copy_(at::mm(dlogits, weight));
    if (low_precision) {
      grad_weight.addmm_(dlogits.t().to(at::kFloat), h.to(at::kFloat));
    } else {
      grad_weight.addmm_(dlogits.t(), h);
    }
    if (bias.has_value()) grad_bias.add_(dlogits.sum(0, /*keepdim=*/false, grad_bias.scalar_type()));
  }
  return {grad_hidden, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

TORCH_LIBRARY_IMPL(fastrlhf, CompositeExplicitAutograd, m) {
  m.impl("linear_token_logprobs", &linear_token_logprobs_composite);
  m.impl("linear_token_logprobs_backward", &linear_token_logprobs_backward_composite);
}

}  // namespace fastrlhf::ops
