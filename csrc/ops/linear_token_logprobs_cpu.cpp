// CPU implementations of fastrlhf::linear_token_logprobs and its backward: the tiled kernel
// (csrc/kernels/linear_token_logprobs.h) for fp32/fp64; 16-bit dtypes take the composite.
#include "linear_token_logprobs.h"

#include "../kernels/linear_token_logprobs.h"
#include "token_logprobs.h"

namespace fastrlhf::ops {
namespace {

namespace ltl = k::linear_token_logprobs;

bool has_kernel(const Tensor& hidden) {
  return hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble;
}

const void* bias_ptr(const std::optional<Tensor>& bias, Tensor& holder) {
  if (!bias.has_value()) return nullptr;
  holder = bias->contiguous();
  return holder.const_data_ptr();
}

LinearLogprobsOutputs linear_token_logprobs_cpu(const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
                                                const std::optional<Tensor>& bias, double temperature,
                                                int64_t chunk_size) {
  if (!has_kernel(hidden))
    return linear_token_logprobs_composite(hidden, weight, tokens, bias, temperature, chunk_size);
  check_linear_token_logprobs(hidden, weight, tokens, bias, temperature, chunk_size);
  const Tensor h = hidden.contiguous(), w = weight.contiguous(), tok = tokens.contiguous();
  Tensor b;
  ltl::Params p;
  p.N = h.size(0), p.H = h.size(1), p.V = w.size(0);
  p.tiles = ltl::choose_tiles(p.N, p.V, chunk_size);
  const auto opts = h.options();
  Tensor logprobs = at::empty({p.N}, opts), entropy = at::empty({p.N}, opts), row_stats = at::empty({p.N, 2}, opts);
  Tensor tile = at::empty({p.tiles.block * p.tiles.chunk}, opts), scratch = at::empty({4 * p.tiles.chunk}, opts);
  p.hidden = h.const_data_ptr(), p.weight = w.const_data_ptr(), p.bias = bias_ptr(bias, b);
  p.tokens = tok.const_data_ptr<int64_t>();
  p.logprobs = logprobs.data_ptr(), p.entropy = entropy.data_ptr(), p.row_stats = row_stats.data_ptr();
  p.tile = tile.data_ptr(), p.scratch = scratch.data_ptr();
  p.inv_temperature = 1.0 / temperature;
  TORCH_CHECK(ltl::launch_cpu(p, to_kernel_dtype(h.scalar_type()), torch_blas(), torch_parallel_for()) ==
                  k::Status::kOk,
              "fastrlhf.linear_token_logprobs: tokens must be in [0, V) = [0, ", p.V, ")");
  return {logprobs, entropy, row_stats};
}

LinearLogprobsOutputs linear_token_logprobs_backward_cpu(const std::optional<Tensor>& grad_logprobs,
                                                         const std::optional<Tensor>& grad_entropy,
                                                         const Tensor& hidden, const Tensor& weight,
                                                         const Tensor& tokens, const std::optional<Tensor>& bias,
                                                         const Tensor& row_stats, const Tensor& entropy,
                                                         double temperature, int64_t chunk_size) {
  if (!has_kernel(hidden))
    return linear_token_logprobs_backward_composite(grad_logprobs, grad_entropy, hidden, weight, tokens, bias,
                                                    row_stats, entropy, temperature, chunk_size);
  check_linear_token_logprobs(hidden, weight, tokens, bias, temperature, chunk_size);
  const int64_t N = hidden.size(0);
  const auto dtype = hidden.scalar_type();
  const BackwardRows rows = prepare_backward_rows(grad_logprobs, grad_entropy, row_stats, entropy, N, hidden.device(),
                                                  dtype);  // fp32 / fp64: dtype = accumulator
  const Tensor h = hidden.contiguous(), w = weight.contiguous(), tok = tokens.contiguous();
  Tensor b;
  ltl::BackwardParams p;
  p.N = N, p.H = h.size(1), p.V = w.size(0);
  p.tiles = ltl::choose_tiles(p.N, p.V, chunk_size);
  const auto opts = h.options();
  Tensor grad_hidden = at::empty_like(h), grad_weight = at::empty_like(w);
  Tensor grad_bias = at::empty({bias.has_value() ? p.V : 0}, opts);
  Tensor tile = at::empty({p.tiles.block * p.tiles.chunk}, opts), scratch = at::empty({6 * p.tiles.chunk}, opts);
  p.grad_logprobs = rows.grad_logprobs.defined() ? rows.grad_logprobs.const_data_ptr() : nullptr;
  p.grad_entropy = rows.grad_entropy.defined() ? rows.grad_entropy.const_data_ptr() : nullptr;
  p.hidden = h.const_data_ptr(), p.weight = w.const_data_ptr(), p.bias = bias_ptr(bias, b);
  p.tokens = tok.const_data_ptr<int64_t>();
  p.row_stats = rows.row_stats.const_data_ptr(), p.entropy = rows.entropy.const_data_ptr();
  p.grad_hidden = grad_hidden.data_ptr(), p.grad_weight = grad_weight.data_ptr();
  p.grad_bias = bias.has_value() ? grad_bias.data_ptr() : nullptr;
  p.tile = tile.data_ptr(), p.scratch = scratch.data_ptr();
  p.inv_temperature = 1.0 / temperature;
  check_status(ltl::launch_backward_cpu(p, to_kernel_dtype(dtype), torch_blas(), torch_parallel_for()),
               "linear_token_logprobs_backward");
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("linear_token_logprobs", &linear_token_logprobs_cpu);
  m.impl("linear_token_logprobs_backward", &linear_token_logprobs_backward_cpu);
}

}  // namespace fastrlhf::ops
