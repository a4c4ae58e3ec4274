// Launches of the CUDA-core forward and backward kernels (attention_simple.cuh).
#include "attention_simple.cuh"

namespace fastrlhf::kernels::attention::detail {

cudaError_t run_simple_forward(const Params& p, DType dtype, cudaStream_t stream) {
  return dispatch_simple(dtype, p.D, [&](auto s, auto npl) {
    const unsigned n_rb = row_blocks(p.max_q_len);
    if (!grid_fits(int64_t(n_rb) * p.n_seq, p.H)) return cudaErrorInvalidConfiguration;
    simple::forward_kernel<decltype(s), decltype(npl)::value>
        <<<dim3(unsigned(n_rb * p.n_seq), unsigned(p.H)), simple::kThreads, 0, stream>>>(p, int(n_rb));
    return cudaGetLastError();
  });
}

cudaError_t run_delta(const Params& p, DType dtype, cudaStream_t stream) {
  const unsigned n_rb = row_blocks(p.max_q_len);
  const dim3 q_grid(unsigned(n_rb * p.n_seq), unsigned(p.H));
  return cuda::dispatch(dtype, [&](auto s) {
    simple::delta_kernel<decltype(s)><<<q_grid, simple::kThreads, 0, stream>>>(p, int(n_rb));
    return cudaGetLastError();
  });
}

cudaError_t run_simple_backward(const Params& p, DType dtype, cudaStream_t stream) {
  const unsigned n_rb = row_blocks(p.max_q_len);
  const dim3 q_grid(unsigned(n_rb * p.n_seq), unsigned(p.H));
  return dispatch_simple(dtype, p.D, [&](auto s, auto npl) {
    using S = decltype(s);
    constexpr int NPL = decltype(npl)::value;
    simple::dq_kernel<S, NPL><<<q_grid, simple::kThreads, 0, stream>>>(p, int(n_rb));
    const unsigned n_kb = row_blocks(p.max_k_len);
    if (n_kb > 0)
      simple::dkdv_kernel<S, NPL>
          <<<dim3(unsigned(n_kb * p.n_seq), unsigned(p.Hkv)), simple::kThreads, 0, stream>>>(p, int(n_kb));
    return cudaGetLastError();
  });
}

}  // namespace fastrlhf::kernels::attention::detail
