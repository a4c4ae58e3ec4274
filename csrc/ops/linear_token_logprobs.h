// fastrlhf::linear_token_logprobs: input checks and the device-generic composite (row chunks of
// ATen matmul + the device's token_logprobs kernels), which the CPU kernel falls back on for
// 16-bit dtypes (linear_token_logprobs_cpu.cpp).
#pragma once

#include "utils.h"

namespace fastrlhf::ops {

using LinearLogprobsOutputs = std::tuple<Tensor, Tensor, Tensor>;

// Shapes, dtypes, devices, temperature > 0 and chunk_size >= 0 (0: the implementation picks).
void check_linear_token_logprobs(const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
                                 const std::optional<Tensor>& bias, double temperature, int64_t chunk_size);

// -> (logprobs [N], entropy [N], row_stats [N, 2]); row_stats as token_logprobs' (m, log s)
LinearLogprobsOutputs linear_token_logprobs_composite(const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
                                                      const std::optional<Tensor>& bias, double temperature,
                                                      int64_t chunk_size);
// -> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0])
LinearLogprobsOutputs linear_token_logprobs_backward_composite(const std::optional<Tensor>& grad_logprobs,
                                                               const std::optional<Tensor>& grad_entropy,
                                                               const Tensor& hidden, const Tensor& weight,
                                                               const Tensor& tokens, const std::optional<Tensor>& bias,
                                                               const Tensor& row_stats, const Tensor& entropy,
                                                               double temperature, int64_t chunk_size);

}  // namespace fastrlhf::ops
