// The CUDA launchers of ../../attention.h: argument and grid checks, the choice between the
// tensor-core and the CUDA-core kernels, dispatch on dtype and head dim. The kernels are in the
// other files of this folder (see attention_common.cuh).
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention_common.cuh"

namespace fastrlhf::kernels::attention {

using namespace detail;

namespace {

__global__ void padded_table_kernel(const PaddedTable t, Seq* seqs) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= t.B) return;
  const int64_t k_end = t.key_lengths ? t.key_lengths[b] : t.Tk;
  const int64_t k_begin = t.key_start ? t.key_start[b] : 0;
  if (t.decode) {
    FRL_DEVICE_CHECK(k_end >= t.Tq && k_end <= t.Tk, "fastrlhf.decode_attention: cache_seqlens out of [Tq, Tmax]");
  } else {
    FRL_DEVICE_CHECK(k_end >= 0 && k_end <= t.Tk, "fastrlhf.attention: key_lengths out of [0, Tk]");
    FRL_DEVICE_CHECK(k_begin >= 0 && k_begin <= t.Tk, "fastrlhf.attention: key_start out of [0, Tk]");
  }
  seqs[b] = padded_seq(b, t.H, t.Hkv, t.Tq, t.Tk, t.D, k_begin, k_end, t.decode);
}

// Compute capability major of the current device (0 if unknown).
int compute_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  return major;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The tensor-core kernels need 16-bit storage, D in {32, 64, 96, 128}, sm_80+ (their largest
// shared-memory need, ~70 KB for dK/dV at D = 128, is below every sm_80+ opt-in limit), and
// 16-byte aligned rows (cp.async): base pointers aligned and strides multiples of 8 elements (the
// glue's sequence offsets are multiples of D).
// Whether the tensor-core kernels were compiled for sm_80+ in the code this GPU runs (a build for
// older archs JIT-compiles PTX in which they are traps).
bool tc_compiled();

bool use_tensor_cores(const Params& p, DType dtype, std::initializer_list<const void*> ptrs) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  if (p.D != 32 && p.D != 64 && p.D != 96 && p.D != 128) return false;
  for (int64_t s : {p.q_head_stride, p.q_row_stride, p.k_head_stride, p.k_row_stride})
    if (s % 8 != 0) return false;
  for (const void* ptr : ptrs)
    if (!aligned16(ptr)) return false;
  return compute_major() >= 8 && tc_compiled();
}

// f(T{}, std::integral_constant<int, D>{}) for the tensor-core dtypes and head dims.
template <typename F>
cudaError_t dispatch_tc(DType dtype, int64_t D, F&& f) {
  auto with_type = [&](auto t) -> cudaError_t {
    switch (D) {
      case 32: return f(t, std::integral_constant<int, 32>{});
      case 64: return f(t, std::integral_constant<int, 64>{});
      case 96: return f(t, std::integral_constant<int, 96>{});
      case 128: return f(t, std::integral_constant<int, 128>{});
      default: return cudaErrorInvalidValue;
    }
  };
  return dtype == DType::kBFloat16 ? with_type(__nv_bfloat16{}) : with_type(__half{});
}

bool tc_compiled() {
  static const bool ok = [] {
    cudaFuncAttributes a{};
    return tc_forward_attributes<__half, 64>(&a) == cudaSuccess && a.ptxVersion >= 80;
  }();
  return ok;
}

cudaError_t forward(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n_seq == 0 || p.max_q_len == 0 || p.H == 0) return cudaSuccess;
  if (use_tensor_cores(p, dtype, {p.q, p.k, p.v, p.o})) {
    return dispatch_tc(dtype, p.D, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int D = decltype(d)::value;
      return run_tc_forward<T, D>(p, stream);
    });
  }
  return run_simple_forward(p, dtype, stream);
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) { return forward(p, dtype, stream); }

cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  // (no keys at all still needs dq = 0: the dq kernels write every row)
  if (p.n_seq == 0 || p.H == 0 || p.max_q_len == 0) return cudaSuccess;
  const unsigned n_rb = row_blocks(p.max_q_len);
  if (!grid_fits(int64_t(n_rb) * p.n_seq, p.H) || !grid_fits(int64_t(row_blocks(p.max_k_len)) * p.n_seq, p.Hkv))
    return cudaErrorInvalidConfiguration;
  cudaError_t e = run_delta(p, dtype, stream);
  if (e != cudaSuccess) return e;
  if (use_tensor_cores(p, dtype, {p.q, p.k, p.v, p.o, p.dout, p.dq, p.dk, p.dv})) {
    return dispatch_tc(dtype, p.D, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int D = decltype(d)::value;
      return run_tc_backward<T, D>(p, stream);
    });
  }
  return run_simple_backward(p, dtype, stream);
}

cudaError_t launch_decode_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n_seq == 0 || p.max_q_len == 0 || p.H == 0) return cudaSuccess;
  if (p.max_q_len > kDecodeMaxQueries) return forward(p, dtype, stream);  // a prefill chunk
  if (p.n_splits < 1 || (p.n_splits > 1 && (!p.partial_out || !p.partial_lse))) return cudaErrorInvalidValue;
  if (!grid_fits(p.n_seq * p.n_splits, p.Hkv) || !grid_fits(int64_t(row_blocks(p.max_q_len)) * p.n_seq, p.H))
    return cudaErrorInvalidConfiguration;
  return run_decode(p, dtype, stream);
}

cudaError_t launch_padded_table_cuda(const PaddedTable& t, Seq* seqs, cudaStream_t stream) {
  if (t.B == 0) return cudaSuccess;
  padded_table_kernel<<<cuda::ceil_div(t.B, 128), 128, 0, stream>>>(t, seqs);
  return cudaGetLastError();
}

}  // namespace fastrlhf::kernels::attention
