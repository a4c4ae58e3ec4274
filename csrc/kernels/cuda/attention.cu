// CUDA kernels for attention (semantics in ../attention.h). Two families:
//
// Tensor cores (bf16 / fp16, D in {32, 64, 96, 128}, 16-byte aligned rows, sm_80+), FlashAttention-2
// style, 4 warps per block, mma.sync.m16n8k16 (fp32 accumulation) on fragments loaded from
// shared memory with ldmatrix; global -> shared copies by cp.async, double-buffered. Shared tiles
// are row-major with rows of D + 8 elements (consecutive rows 16 bytes apart modulo 128: the 8
// rows an ldmatrix reads hit distinct banks).
//   forward_tc  one block per (64 query rows, head, sequence); warp w owns query rows
//               16w..16w+15 and keeps them (Q fragments), the output accumulator and the
//               running max / sum in registers; 64-key tiles of K and V stream through shared
//               memory; S = Q K^T, online softmax in fp32 (exp2 domain), P rounded to the storage
//               dtype, O += P V. Key tiles past the block's last visible key (causal) are not
//               loaded; a warp skips tiles its rows cannot see.
//   dq_tc       one block per (64 query rows, head, sequence): recompute S and dP = dO V^T per
//               key tile, P = exp(S - lse), dS = P (dP - delta), dQ += dS K.
//   dkdv_tc     one block per (64 keys, kv head, sequence): K and V stay in shared memory; the
//               block walks the query tiles of every query head of the GQA group (so dK / dV
//               need no atomics), computing S^T = K Q^T and dP^T = V dO^T, then
//               dV += P^T dO and dK += dS^T Q with the keys as the M dimension.
//   dQ and dK/dV are separate passes (S recomputed twice) instead of FlashAttention-2's atomic
//   dQ accumulation: every element has one writer and a fixed summation order (deterministic).
//
// CUDA cores (fp32, fp64, any D <= 256, and everything the tensor-core path does not take): one
// warp per query row (forward, dQ) or key row (dK/dV); lane l owns dims l, l + 32, ...; dot
// products by warp butterfly sums; keys 32 at a time through the online softmax. Same order of
// operations as the CPU kernel's per-row math, accumulated in fp32 (fp64 for fp64).
//
// Decode (split-KV, CUDA cores, every dtype): one block (8 warps) per (sequence, kv head, key
// chunk) covering the rows of all query heads of the group, so each K/V row of the chunk is read
// from memory once per group. Rows are spread over the warps; with fewer rows than warps, several
// warps share a row, each taking a slice of the chunk, and their states are combined in shared
// memory in slice order. Chunk results go to fp32 (fp64) workspaces; a merge kernel combines
// them by log-sum-exp in chunk order.
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../attention.h"
#include "common.cuh"

namespace fastrlhf::kernels::attention {
namespace {

using cuda::load;
using cuda::store;
using cuda::warp_sum;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return A(-INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Index of (sequence, head h, row i) in lse / delta / the decode workspaces.
__device__ __forceinline__ int64_t lse_index(const Params& p, const Seq& sq, int64_t h, int64_t i) {
  return sq.lse_off + h * p.lse_head_stride + i * p.lse_row_stride;
}

// =============================================================================================
// Tensor-core building blocks (sm_80+). Fragment layouts of mma.m16n8k16 (PTX ISA), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16, 4 regs of 2 elements): reg0 (row g, cols 2t, 2t+1), reg1 (row g+8, same cols),
//                                      reg2 (row g, cols 2t+8, 2t+9), reg3 (row g+8, cols 2t+8..)
//   B (16 x 8, 2 regs):                reg0 (rows 2t, 2t+1, col g), reg1 (rows 2t+8, 2t+9, col g)
//   C (16 x 8, 4 fp32):                c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same cols)
// So the C fragments of two adjacent 8-column tiles are, once packed to 16 bits, the A fragment
// of the 16-wide k-step they cover (pack_a): P and dS never leave registers.
// =============================================================================================
namespace tc {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FRL_TC_UNSUPPORTED 1  // device code for older GPUs: never launched (the host checks)
#endif

constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;        // extra elements per shared row

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);  // lo in the low 16 bits
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// c += a * b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FRL_TC_UNSUPPORTED)
  __trap();
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; lanes 8m..8m+7 give the row addresses of matrix m, and
// every lane receives (row lane/4, cols 2(lane%4), +1) of each matrix (.trans: the transpose).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#if defined(FRL_TC_UNSUPPORTED)
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#if defined(FRL_TC_UNSUPPORTED)
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr))
               : "memory");
#endif
}

// A fragment of the 16x16 block at (row0, k0) of a row-major [row][k] shared tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int ld, int row0, int k0, int lane) {
  ldmatrix_x4(a, s + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// B fragments of two 8-column tiles (n0, n0 + 8) for the k-step at k0, from a shared tile stored
// [n][k] (B^T row-major: K rows for S = Q K^T). b[0], b[1]: tile n0; b[2], b[3]: tile n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// The same from a shared tile stored [k][n] (row-major B: V rows for O = P V), transposed by
// ldmatrix.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* s, int ld, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// A fragment (16 rows x 16 k) from the fp32 C fragments of the two 8-column tiles c0 | c1.
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// acc[16 x 8 NT] += A (NK k-steps of 16, fragments a) * B^T where B^T is a shared [n][k] tile.
template <typename T, int NT, int NK>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const uint32_t (&a)[NK][4], const T* bt, int ld,
                                        int lane) {
#pragma unroll
  for (int ks = 0; ks < NK; ++ks) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_nk(b, bt, ld, np * 16, ks * 16, lane);
      mma<T>(acc[2 * np], a[ks], b[0], b[1]);
      mma<T>(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// acc[16 x 8 NT] += C (fp32 fragments of 16 x 8 NC, packed to T) * B where B is a shared [k][n]
// tile with NC * 8 rows.
template <typename T, int NT, int NC>
__device__ __forceinline__ void mma_cb(float (&acc)[NT][4], const float (&c)[NC][4], const T* bs, int ld,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < NC / 2; ++kk) {
    uint32_t a[4];
    pack_a<T>(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_kn(b, bs, ld, kk * 16, np * 16, lane);
      mma<T>(acc[2 * np], a, b[0], b[1]);
      mma<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// 16-byte global -> shared copy; with valid == false nothing is read and 16 zero bytes are written.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(FRL_TC_UNSUPPORTED)
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !defined(FRL_TC_UNSUPPORTED)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // all but the N most recent groups complete
#if !defined(FRL_TC_UNSUPPORTED)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Rows [r0, r0 + ROWS) of a [*, D] matrix at src (row stride `stride` elements) into the shared
// tile dst ([ROWS][D + kPad]); rows outside [lo, hi) become zeros without being read (so padding
// holding NaN never reaches a product).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int64_t r0, int64_t lo,
                                          int64_t hi) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % kThreads == 0, "tile copy must split evenly over the block");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int c = it * kThreads + int(threadIdx.x);
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t row = r0 + r;
    const bool valid = row >= lo && row < hi;
    cp_async16(dst + r * (D + kPad) + col, valid ? src + row * stride + col : src, valid);
  }
}

// Row max / sum over the 4 lanes (t = 0..3) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- forward -------------------------------------------------------------------------------

template <int D>
struct FwdCfg {
  static constexpr int kBQ = 64, kBK = 64, kLD = D + kPad;
  // two stages of (K tile, V tile); Q is staged once in the same space before the key loop
  static constexpr int kSmemElems = 4 * kBK * kLD;
  static_assert(kBQ <= 4 * kBK, "Q staging must fit");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_tc(const Params p, int n_qb) {
  using Cfg = FwdCfg<D>;
  constexpr int BQ = Cfg::kBQ, BK = Cfg::kBK, LD = Cfg::kLD, NT_S = BK / 8, NT_O = D / 8, NK = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const Ks = smem;                // [2][BK][LD]
  T* const Vs = smem + 2 * BK * LD;  // [2][BK][LD]

  const int64_t b = blockIdx.x / n_qb;
  const int64_t i0 = int64_t(n_qb - 1 - int(blockIdx.x % n_qb)) * BQ;  // the longest (causal) blocks first
  const int64_t h = blockIdx.y;
  const Seq sq = p.seqs[b];
  if (i0 >= sq.q_len) return;
  const int64_t hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const T* Q = static_cast<const T*>(p.q) + sq.q_off + h * p.q_head_stride;
  const T* K = static_cast<const T*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + sq.k_off + hk * p.k_head_stride;

  // keys [k_lo, k_hi) cover every key a row of the block sees
  const int64_t k_lo = sq.k_begin;
  const int64_t k_hi = visible_end(sq, min64(i0 + BQ, sq.q_len) - 1, p.causal);
  const int n_tiles = k_hi > k_lo ? int((k_hi - k_lo + BK - 1) / BK) : 0;

  // Q fragments: stage the block's rows, then keep this warp's 16 rows in registers
  uint32_t qf[NK][4];
  load_rows<BQ, D>(smem, Q, p.q_row_stride, i0, 0, sq.q_len);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < NK; ++ks) load_a(qf[ks], smem, LD, warp * 16, ks * 16, lane);
  __syncthreads();  // Q's space is reused by the K/V stages

  auto load_tile = [&](int tile, int stage) {
    const int64_t j0 = k_lo + int64_t(tile) * BK;
    load_rows<BK, D>(Ks + stage * BK * LD, K, p.k_row_stride, j0, k_lo, k_hi);
    load_rows<BK, D>(Vs + stage * BK * LD, V, p.k_row_stride, j0, k_lo, k_hi);
  };
  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();

  // this thread's rows: ra (C rows g) and ra + 8 (C rows g + 8); rows past q_len are computed
  // (on zero queries) but never written
  const int64_t ra = i0 + warp * 16 + g;
  const int64_t vend[2] = {visible_end(sq, ra, p.causal), visible_end(sq, ra + 8, p.causal)};
  const int64_t warp_last = min64(i0 + warp * 16 + 15, sq.q_len - 1);
  const int64_t warp_hi = warp_last >= i0 + warp * 16 ? visible_end(sq, warp_last, p.causal) : k_lo;

  const float sl2 = float(p.scale) * kLog2e;  // scores in the exp2 domain
  float o[NT_O][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    const int64_t j0 = k_lo + int64_t(tile) * BK;
    if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);  // that stage was released at the end of tile - 1
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group is complete
    __syncthreads();
    if (j0 < warp_hi) {  // warp-uniform: no row of this warp sees a key of the tile otherwise
      const T* Kt = Ks + stage * BK * LD;
      const T* Vt = Vs + stage * BK * LD;
      float s[NT_S][4] = {};
      mma_abt<T>(s, qf, Kt, LD, lane);
      // mask (key j0 + col visible to the row iff col < lim) and scale; tile max per row
      const int lim[2] = {int(max64(0, min64(BK, vend[0] - j0))), int(max64(0, min64(BK, vend[1] - j0)))};
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t4 + (e & 1);
          const float x = col < lim[e >> 1] ? s[nt][e] * sl2 : -INFINITY;
          s[nt][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      float corr[2], m_use[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], quad_max(mx[r]));
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: exp2(-inf - 0) = 0
        corr[r] = exp2f(m[r] - m_use[r]);
        m[r] = m_new;
      }
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2f(s[nt][e] - m_use[e >> 1]);
          s[nt][e] = pe;
          sum[e >> 1] += pe;
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) l[r] = l[r] * corr[r] + sum[r];  // per-lane partial row sums
#pragma unroll
      for (int nt = 0; nt < NT_O; ++nt) {
        o[nt][0] *= corr[0], o[nt][1] *= corr[0];
        o[nt][2] *= corr[1], o[nt][3] *= corr[1];
      }
      mma_cb<T>(o, s, Vt, LD, lane);  // O += P V
    }
    __syncthreads();  // release this stage
  }

  T* O = static_cast<T*>(p.o) + sq.q_off + h * p.q_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lr = quad_sum(l[r]);
    const int64_t i = ra + 8 * r;
    if (i >= sq.q_len) continue;
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    T* orow = O + i * p.q_row_stride;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t4) = pack2<T>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    if (p.lse && t4 == 0) p.lse[lse_index(p, sq, h, i)] = lr > 0.f ? (m[r] + log2f(lr)) * kLn2 : -INFINITY;
  }
}

// ---- backward: dQ --------------------------------------------------------------------------

template <int D>
struct DqCfg {
  static constexpr int kBQ = 64, kBK = D > 64 ? 32 : 64, kLD = D + kPad;
  // Q and dO are staged once (then held as fragments); afterwards two stages of (K, V) tiles
  static constexpr int kSmemElems = (2 * kBQ > 4 * kBK ? 2 * kBQ : 4 * kBK) * kLD;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_tc(const Params p, int n_qb) {
  using Cfg = DqCfg<D>;
  constexpr int BQ = Cfg::kBQ, BK = Cfg::kBK, LD = Cfg::kLD, NT_S = BK / 8, NT_O = D / 8, NK = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const Ks = smem;                // [2][BK][LD]
  T* const Vs = smem + 2 * BK * LD;  // [2][BK][LD]

  const int64_t b = blockIdx.x / n_qb;
  const int64_t i0 = int64_t(n_qb - 1 - int(blockIdx.x % n_qb)) * BQ;
  const int64_t h = blockIdx.y;
  const Seq sq = p.seqs[b];
  if (i0 >= sq.q_len) return;
  const int64_t hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int64_t q_base = sq.q_off + h * p.q_head_stride;
  const T* Q = static_cast<const T*>(p.q) + q_base;
  const T* dO = static_cast<const T*>(p.dout) + q_base;
  const T* K = static_cast<const T*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + sq.k_off + hk * p.k_head_stride;
  const int64_t k_lo = sq.k_begin;
  const int64_t k_hi = visible_end(sq, min64(i0 + BQ, sq.q_len) - 1, p.causal);
  const int n_tiles = k_hi > k_lo ? int((k_hi - k_lo + BK - 1) / BK) : 0;

  uint32_t qf[NK][4], gf[NK][4];  // Q and dO fragments of this warp's 16 rows
  load_rows<BQ, D>(smem, Q, p.q_row_stride, i0, 0, sq.q_len);
  load_rows<BQ, D>(smem + BQ * LD, dO, p.q_row_stride, i0, 0, sq.q_len);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < NK; ++ks) {
    load_a(qf[ks], smem, LD, warp * 16, ks * 16, lane);
    load_a(gf[ks], smem + BQ * LD, LD, warp * 16, ks * 16, lane);
  }
  __syncthreads();

  auto load_tile = [&](int tile, int stage) {
    const int64_t j0 = k_lo + int64_t(tile) * BK;
    load_rows<BK, D>(Ks + stage * BK * LD, K, p.k_row_stride, j0, k_lo, k_hi);
    load_rows<BK, D>(Vs + stage * BK * LD, V, p.k_row_stride, j0, k_lo, k_hi);
  };
  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();

  const int64_t ra = i0 + warp * 16 + g;
  float lse2[2], delta[2];  // lse in the exp2 domain
  int64_t vend[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = ra + 8 * r;
    const bool row = i < sq.q_len;
    const float lse = row ? p.lse[lse_index(p, sq, h, i)] : -INFINITY;
    lse2[r] = lse * kLog2e;
    delta[r] = row ? static_cast<const float*>(p.delta)[lse_index(p, sq, h, i)] : 0.f;
    vend[r] = row && lse != -INFINITY ? visible_end(sq, i, p.causal) : k_lo;  // a row without keys gets dq = 0
  }
  const int64_t warp_last = min64(i0 + warp * 16 + 15, sq.q_len - 1);
  const int64_t warp_hi = warp_last >= i0 + warp * 16 ? visible_end(sq, warp_last, p.causal) : k_lo;

  const float sl2 = float(p.scale) * kLog2e;
  float dq[NT_O][4] = {};
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    const int64_t j0 = k_lo + int64_t(tile) * BK;
    if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (j0 < warp_hi) {
      const T* Kt = Ks + stage * BK * LD;
      const T* Vt = Vs + stage * BK * LD;
      float s[NT_S][4] = {}, dp[NT_S][4] = {};
      mma_abt<T>(s, qf, Kt, LD, lane);   // S = Q K^T
      mma_abt<T>(dp, gf, Vt, LD, lane);  // dP = dO V^T
      const int lim[2] = {int(max64(0, min64(BK, vend[0] - j0))), int(max64(0, min64(BK, vend[1] - j0)))};
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, col = nt * 8 + 2 * t4 + (e & 1);
          const float pe = col < lim[r] ? exp2f(fmaf(s[nt][e], sl2, -lse2[r])) : 0.f;
          s[nt][e] = col < lim[r] ? pe * (dp[nt][e] - delta[r]) : 0.f;  // dS
        }
      mma_cb<T>(dq, s, Kt, LD, lane);  // dQ += dS K
    }
    __syncthreads();
  }

  T* dQ = static_cast<T*>(p.dq) + q_base;
  const float scale = float(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = ra + 8 * r;
    if (i >= sq.q_len) continue;
    T* row = dQ + i * p.q_row_stride;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
      *reinterpret_cast<uint32_t*>(row + nt * 8 + 2 * t4) =
          pack2<T>(dq[nt][2 * r] * scale, dq[nt][2 * r + 1] * scale);
  }
}

// ---- backward: dK, dV ----------------------------------------------------------------------

template <int D>
struct DkvCfg {
  static constexpr int kBK = 64, kBQ = D > 64 ? 32 : 64, kLD = D + kPad;
  // K, V tiles of the block, then two stages of (Q, dO) tiles; lse / delta stages (fp32) after
  static constexpr int kSmemElems = (2 * kBK + 4 * kBQ) * kLD;
  static constexpr size_t smem_bytes(size_t elem) { return kSmemElems * elem + 4 * kBQ * sizeof(float); }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_tc(const Params p, int n_kb) {
  using Cfg = DkvCfg<D>;
  constexpr int BQ = Cfg::kBQ, BK = Cfg::kBK, LD = Cfg::kLD, NT_S = BQ / 8, NT_O = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const Ks = reinterpret_cast<T*>(smem_raw);  // [BK][LD]
  T* const Vs = Ks + BK * LD;                     // [BK][LD]
  T* const Qs = Vs + BK * LD;                     // [2][BQ][LD]
  T* const Gs = Qs + 2 * BQ * LD;                 // [2][BQ][LD]  (dO)
  float* const lse_s = reinterpret_cast<float*>(Gs + 2 * BQ * LD);  // [2][BQ], exp2 domain
  float* const delta_s = lse_s + 2 * BQ;                            // [2][BQ]

  const int64_t b = blockIdx.x / n_kb;
  const int64_t j0 = int64_t(blockIdx.x % n_kb) * BK;
  const int64_t hk = blockIdx.y, group = p.H / p.Hkv;
  const Seq sq = p.seqs[b];
  const int64_t jb = max64(j0, sq.k_begin), j1 = min64(j0 + BK, sq.k_end);
  if (jb >= j1) return;  // no key of the block is in range: dk = dv = 0 (zero-filled by the caller)
  // the first query row that sees key jb
  const int64_t i_first = p.causal ? max64(0, jb - sq.causal_offset) : 0;
  if (i_first >= sq.q_len) return;
  const int n_qt = int((sq.q_len - i_first + BQ - 1) / BQ);
  const int n_iter = int(group) * n_qt;  // (query head of the group, query tile) pairs

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int64_t kv_base = sq.k_off + hk * p.k_head_stride;
  load_rows<BK, D>(Ks, static_cast<const T*>(p.k) + kv_base, p.k_row_stride, j0, sq.k_begin, sq.k_end);
  load_rows<BK, D>(Vs, static_cast<const T*>(p.v) + kv_base, p.k_row_stride, j0, sq.k_begin, sq.k_end);

  auto load_iter = [&](int it, int stage) {
    const int64_t h = hk * group + it / n_qt;
    const int64_t i0 = i_first + int64_t(it % n_qt) * BQ;
    const int64_t q_base = sq.q_off + h * p.q_head_stride;
    load_rows<BQ, D>(Qs + stage * BQ * LD, static_cast<const T*>(p.q) + q_base, p.q_row_stride, i0, 0, sq.q_len);
    load_rows<BQ, D>(Gs + stage * BQ * LD, static_cast<const T*>(p.dout) + q_base, p.q_row_stride, i0, 0,
                     sq.q_len);
    for (int c = threadIdx.x; c < BQ; c += kThreads) {
      const int64_t i = i0 + c;
      const bool row = i < sq.q_len;
      lse_s[stage * BQ + c] = row ? p.lse[lse_index(p, sq, h, i)] * kLog2e : -INFINITY;
      delta_s[stage * BQ + c] = row ? static_cast<const float*>(p.delta)[lse_index(p, sq, h, i)] : 0.f;
    }
  };
  load_iter(0, 0);
  cp_async_commit();

  // this thread's keys: ja (C rows g) and ja + 8; key j is seen by row i iff it is in range,
  // i < q_len, lse_i != -inf and (causal) i >= j - causal_offset
  const int64_t ja = j0 + warp * 16 + g;
  bool key_ok[2];
  int64_t i_min[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = ja + 8 * r;
    key_ok[r] = j >= sq.k_begin && j < sq.k_end;
    i_min[r] = p.causal ? j - sq.causal_offset : INT64_MIN;
  }

  const float sl2 = float(p.scale) * kLog2e;
  float dk[NT_O][4] = {}, dv[NT_O][4] = {};
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    const int64_t i0 = i_first + int64_t(it % n_qt) * BQ;
    if (it + 1 < n_iter) load_iter(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* Qt = Qs + stage * BQ * LD;
    const T* Gt = Gs + stage * BQ * LD;
    const float* lse_t = lse_s + stage * BQ;
    const float* delta_t = delta_s + stage * BQ;
    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys
    float s[NT_S][4] = {}, dp[NT_S][4] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t ka[4], va[4];
      load_a(ka, Ks, LD, warp * 16, ks * 16, lane);
      load_a(va, Vs, LD, warp * 16, ks * 16, lane);
#pragma unroll
      for (int np = 0; np < NT_S / 2; ++np) {
        uint32_t bq[4], bg[4];
        load_b_nk(bq, Qt, LD, np * 16, ks * 16, lane);
        load_b_nk(bg, Gt, LD, np * 16, ks * 16, lane);
        mma<T>(s[2 * np], ka, bq[0], bq[1]);
        mma<T>(s[2 * np + 1], ka, bq[2], bq[3]);
        mma<T>(dp[2 * np], va, bg[0], bg[1]);
        mma<T>(dp[2 * np + 1], va, bg[2], bg[3]);
      }
    }
    // P^T and dS^T (0 where the key is hidden from the query)
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, col = nt * 8 + 2 * t4 + (e & 1);
        const int64_t i = i0 + col;
        const float lse2 = lse_t[col];
        const bool vis = key_ok[r] && i < sq.q_len && i >= i_min[r] && lse2 != -INFINITY;
        const float pe = vis ? exp2f(fmaf(s[nt][e], sl2, -lse2)) : 0.f;
        dp[nt][e] = vis ? pe * (dp[nt][e] - delta_t[col]) : 0.f;
        s[nt][e] = pe;
      }
    mma_cb<T>(dv, s, Gt, LD, lane);   // dV += P^T dO
    mma_cb<T>(dk, dp, Qt, LD, lane);  // dK += dS^T Q
    __syncthreads();
  }

  const float scale = float(p.scale);
  T* dK = static_cast<T*>(p.dk) + kv_base;
  T* dV = static_cast<T*>(p.dv) + kv_base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = ja + 8 * r;
    if (j >= sq.k_end) continue;  // (varlen: the next sequence's keys)
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
      const int64_t off = j * p.k_row_stride + nt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(dK + off) = pack2<T>(dk[nt][2 * r] * scale, dk[nt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dV + off) = pack2<T>(dv[nt][2 * r], dv[nt][2 * r + 1]);
    }
  }
}

}  // namespace tc

// =============================================================================================
// CUDA-core kernels: one warp per row, lane l owning dims l + 32 t (t < NPL, NPL * 32 >= D).
// =============================================================================================
namespace simple {

constexpr int kWarps = 8;  // rows per block
constexpr int kThreads = kWarps * 32;

template <int NPL, typename S, typename A>
__device__ __forceinline__ void load_row(A (&x)[NPL], const S* row, int D, A mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    x[t] = d < D ? load<A>(row + d) * mul : A(0);
  }
}

template <int NPL, typename S, typename A>
__device__ __forceinline__ A dot_row(const A (&x)[NPL], const S* row, int D) {
  const int lane = threadIdx.x & 31;
  A s = 0;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) s += x[t] * load<A>(row + d);
  }
  return warp_sum(s);
}

template <int NPL, typename S, typename A>
__device__ __forceinline__ void store_row(S* row, const A (&x)[NPL], int D, A mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) store(row + d, x[t] * mul);
  }
}

// Online-softmax state of one query row (natural-log domain, scores already scaled).
template <typename A, int NPL>
struct RowState {
  A acc[NPL];  // sum_j exp(s_j - m) v_j (this lane's dims)
  A m, l;      // running max and sum of exp(s_j - m)
  __device__ void init() {
#pragma unroll
    for (int t = 0; t < NPL; ++t) acc[t] = A(0);
    m = neg_inf<A>();
    l = A(0);
  }
};

// Adds keys [j_lo, j_hi) of K / V (row stride `stride`) to the row state; q pre-scaled.
template <int NPL, typename S, typename A>
__device__ void attend(RowState<A, NPL>& st, const A (&q)[NPL], const S* K, const S* V, int64_t stride, int D,
                       int64_t j_lo, int64_t j_hi) {
  const int lane = threadIdx.x & 31;
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += 32) {
    const int n = int(min64(32, j_hi - j0));
    A s = neg_inf<A>();  // lane jj: score of key j0 + jj
    for (int jj = 0; jj < n; ++jj) {
      const A dot = dot_row(q, K + (j0 + jj) * stride, D);
      if (lane == jj) s = dot;
    }
    const A tile_max = warp_max(s);
    const A m_new = tile_max > st.m ? tile_max : st.m;
    const A corr = st.m == neg_inf<A>() ? A(0) : fast_exp(st.m - m_new);
    const A pj = lane < n ? fast_exp(s - m_new) : A(0);
    st.l = st.l * corr + warp_sum(pj);
    st.m = m_new;
#pragma unroll
    for (int t = 0; t < NPL; ++t) st.acc[t] *= corr;
    for (int jj = 0; jj < n; ++jj) {
      const A w = __shfl_sync(0xffffffffu, pj, jj);
      const S* v = V + (j0 + jj) * stride;
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) st.acc[t] += w * load<A>(v + d);
      }
    }
  }
}

// Final output row (storage dtype) and lse of a row state.
template <int NPL, typename S, typename A>
__device__ __forceinline__ void write_row(const Params& p, const Seq& sq, int64_t h, int64_t i,
                                          const RowState<A, NPL>& st) {
  const A inv = st.l > A(0) ? A(1) / st.l : A(0);
  store_row(static_cast<S*>(p.o) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, st.acc, int(p.D), inv);
  if (p.lse && (threadIdx.x & 31) == 0)
    reinterpret_cast<A*>(p.lse)[lse_index(p, sq, h, i)] = st.l > A(0) ? st.m + log_acc(st.l) : neg_inf<A>();
}

// grid (row blocks x sequences, H): warp = query row
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D);
  const int64_t hk = h / (p.H / p.Hkv);
  A q[NPL];
  load_row(q, static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, D, A(p.scale));
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
  RowState<A, NPL> st;
  st.init();
  attend(st, q, K, V, p.k_row_stride, D, sq.k_begin, visible_end(sq, i, p.causal));
  write_row<NPL, S>(p, sq, h, i, st);
}

// delta_i = sum_d dO_i O_i, one warp per row (both backward paths).
template <typename S>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
  const S* o = static_cast<const S*>(p.o) + off;
  const S* g = static_cast<const S*>(p.dout) + off;
  A s = 0;
  for (int d = threadIdx.x & 31; d < p.D; d += 32) s += load<A>(g + d) * load<A>(o + d);
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) static_cast<A*>(p.delta)[lse_index(p, sq, h, i)] = s;
}

// dQ: one warp per query row, keys one at a time.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D);
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
  const A scale = A(p.scale);
  const A lse = static_cast<const A*>(static_cast<const void*>(p.lse))[lse_index(p, sq, h, i)];
  const A delta = static_cast<const A*>(p.delta)[lse_index(p, sq, h, i)];
  A q[NPL], g[NPL], dq[NPL] = {};
  load_row(q, static_cast<const S*>(p.q) + off, D, scale);
  load_row(g, static_cast<const S*>(p.dout) + off, D, A(1));
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;
  const int64_t ke = lse == neg_inf<A>() ? sq.k_begin : visible_end(sq, i, p.causal);
  const int lane = threadIdx.x & 31;
  for (int64_t j = sq.k_begin; j < ke; ++j) {
    const S* k = K + j * p.k_row_stride;
    const A pj = fast_exp(dot_row(q, k, D) - lse);
    const A ds = pj * (dot_row(g, V + j * p.k_row_stride, D) - delta);
#pragma unroll
    for (int t = 0; t < NPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) dq[t] += ds * load<A>(k + d);
    }
  }
  store_row(static_cast<S*>(p.dq) + off, dq, D, scale);
}

// dK, dV: one warp per key row, over the query rows of every query head of the GQA group.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, hk = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (j < sq.k_begin || j >= sq.k_end) return;  // no row sees it: dk = dv = 0 (zero-filled)
  const int D = int(p.D);
  const int64_t group = p.H / p.Hkv;
  const int64_t kv_off = sq.k_off + hk * p.k_head_stride + j * p.k_row_stride;
  const A scale = A(p.scale);
  A k[NPL], v[NPL], dk[NPL] = {}, dv[NPL] = {};
  load_row(k, static_cast<const S*>(p.k) + kv_off, D, A(1));
  load_row(v, static_cast<const S*>(p.v) + kv_off, D, A(1));
  const A* lse_all = static_cast<const A*>(static_cast<const void*>(p.lse));
  const A* delta_all = static_cast<const A*>(p.delta);
  const int64_t i_first = p.causal ? max64(0, j - sq.causal_offset) : 0;  // rows that see key j
  const int lane = threadIdx.x & 31;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i = i_first; i < sq.q_len; ++i) {
      const A lse = lse_all[lse_index(p, sq, h, i)];
      if (lse == neg_inf<A>()) continue;
      const int64_t off = sq.q_off + h * p.q_head_stride + i * p.q_row_stride;
      const S* q = static_cast<const S*>(p.q) + off;
      const S* g = static_cast<const S*>(p.dout) + off;
      const A pj = fast_exp(dot_row(k, q, D) * scale - lse);
      const A ds = pj * (dot_row(v, g, D) - delta_all[lse_index(p, sq, h, i)]);
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          dv[t] += pj * load<A>(g + d);
          dk[t] += ds * (load<A>(q + d) * scale);
        }
      }
    }
  }
  store_row(static_cast<S*>(p.dk) + kv_off, dk, D, A(1));
  store_row(static_cast<S*>(p.dv) + kv_off, dv, D, A(1));
}

// ---- decode ----------------------------------------------------------------------------------

// grid (sequences x n_splits, Hkv), kWarps warps. Rows r = (query head hk * group + r / q_len,
// query i = r % q_len) of the group. With nr >= kWarps rows, warp w takes rows w, w + kWarps, ...
// over the whole chunk; with fewer, each row gets kWarps / nr warps that take consecutive slices
// of the chunk and are combined in slice order.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) decode_kernel(const Params p) {
  using A = typename cuda::AccOf<S>::type;
  __shared__ A sh_acc[kWarps][NPL * 32];
  __shared__ A sh_m[kWarps], sh_l[kWarps];
  const int64_t n_splits = p.n_splits;
  const int64_t b = blockIdx.x / n_splits, split = blockIdx.x % n_splits, hk = blockIdx.y;
  const Seq sq = p.seqs[b];
  if (sq.q_len == 0) return;
  const int D = int(p.D);
  const int64_t group = p.H / p.Hkv, nr = group * sq.q_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // this block's chunk of the keys any row sees, in multiples of 32 keys
  const int64_t k_lo = sq.k_begin, k_hi = visible_end(sq, sq.q_len - 1, p.causal);
  const int64_t span = max64(0, k_hi - k_lo);
  const int64_t chunk = ((span + n_splits - 1) / n_splits + 31) / 32 * 32;
  const int64_t c0 = k_lo + split * chunk, c1 = min64(k_hi, c0 + chunk);
  const int wpr = nr >= kWarps ? 1 : int(kWarps / nr);  // warps per row
  const int slots = kWarps / wpr;                       // rows in flight
  const int slot = warp % slots, slice = warp / slots;  // slice < wpr unless warp >= slots * wpr (idle)
  const int64_t sub = ((max64(0, c1 - c0) + wpr - 1) / wpr + 31) / 32 * 32;
  const S* K = static_cast<const S*>(p.k) + sq.k_off + hk * p.k_head_stride;
  const S* V = static_cast<const S*>(p.v) + sq.k_off + hk * p.k_head_stride;

  for (int64_t r0 = 0; r0 < nr; r0 += slots) {  // same trip count in every warp
    const int64_t r = r0 + slot;
    const bool active = r < nr && slice < wpr;
    const int64_t h = hk * group + r / sq.q_len, i = r % sq.q_len;
    RowState<A, NPL> st;
    st.init();
    if (active) {
      A q[NPL];
      load_row(q, static_cast<const S*>(p.q) + sq.q_off + h * p.q_head_stride + i * p.q_row_stride, D,
               A(p.scale));
      const int64_t lo = c0 + slice * sub;
      const int64_t hi = min64(min64(c1, lo + sub), visible_end(sq, i, p.causal));
      attend(st, q, K, V, p.k_row_stride, D, lo, hi);
    }
    if (wpr > 1) {  // combine the slices of each row (wpr > 1 only when nr < kWarps: one round)
      if (active) {
#pragma unroll
        for (int t = 0; t < NPL; ++t) sh_acc[warp][lane + 32 * t] = st.acc[t];
        if (lane == 0) sh_m[warp] = st.m, sh_l[warp] = st.l;
      }
      __syncthreads();
      if (active && slice == 0) {
        A m = neg_inf<A>();
        for (int s = 0; s < wpr; ++s) m = fmax(m, sh_m[slot + s * slots]);
        st.init();
        st.m = m;
        if (m != neg_inf<A>()) {
          for (int s = 0; s < wpr; ++s) {
            const int w = slot + s * slots;
            const A f = sh_m[w] == neg_inf<A>() ? A(0) : fast_exp(sh_m[w] - m);
            st.l += f * sh_l[w];
#pragma unroll
            for (int t = 0; t < NPL; ++t) st.acc[t] += f * sh_acc[w][lane + 32 * t];
          }
        }
      }
      __syncthreads();
    }
    if (!active || slice != 0) continue;
    if (n_splits == 1) {
      write_row<NPL, S>(p, sq, h, i, st);
    } else {  // this chunk's (normalized out, lse) for the merge
      const int64_t w = lse_index(p, sq, h, i) * n_splits + split;
      A* po = static_cast<A*>(p.partial_out) + w * D;
      const A inv = st.l > A(0) ? A(1) / st.l : A(0);
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) po[d] = st.acc[t] * inv;
      }
      if (lane == 0) static_cast<A*>(p.partial_lse)[w] = st.l > A(0) ? st.m + log_acc(st.l) : neg_inf<A>();
    }
  }
}

// Combines the n_splits chunk results of each row by log-sum-exp, chunks in order; grid as
// forward_kernel.
template <typename S, int NPL>
__global__ void __launch_bounds__(kThreads) merge_kernel(const Params p, int n_rb) {
  using A = typename cuda::AccOf<S>::type;
  const int64_t b = blockIdx.x / n_rb, h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x % n_rb) * kWarps + threadIdx.x / 32;
  const Seq sq = p.seqs[b];
  if (i >= sq.q_len) return;
  const int D = int(p.D), lane = threadIdx.x & 31;
  const int64_t n_splits = p.n_splits, w0 = lse_index(p, sq, h, i) * n_splits;
  const A* plse = static_cast<const A*>(p.partial_lse) + w0;
  const A* pout = static_cast<const A*>(p.partial_out) + w0 * D;
  A m = neg_inf<A>();
  for (int64_t s = 0; s < n_splits; ++s) m = fmax(m, plse[s]);
  RowState<A, NPL> st;
  st.init();
  st.m = m;
  if (m != neg_inf<A>()) {
    for (int64_t s = 0; s < n_splits; ++s) {
      const A f = fast_exp(plse[s] - m);  // 0 for an empty chunk (lse -inf)
      st.l += f;
#pragma unroll
      for (int t = 0; t < NPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) st.acc[t] += f * pout[s * D + d];
      }
    }
  }
  // out = sum_s f_s out_s / sum_s f_s, lse = m + log(sum_s f_s)
  write_row<NPL, S>(p, sq, h, i, st);
}

}  // namespace simple

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

// =============================================================================================
// Launchers
// =============================================================================================

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

// Grids: x up to 2^31 - 1 blocks, y up to 65535 (the CUDA limits); a batch beyond them is an error,
// never a silently truncated launch.
bool grid_fits(int64_t x, int64_t y) { return x <= 2147483647 && y <= 65535; }

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

// f(S{}, std::integral_constant<int, NPL>{}) with NPL * 32 >= D (NPL in 1, 2, 4, 8).
template <typename F>
cudaError_t dispatch_simple(DType dtype, int64_t D, F&& f) {
  return cuda::dispatch(dtype, [&](auto s) -> cudaError_t {
    if (D <= 32) return f(s, std::integral_constant<int, 1>{});
    if (D <= 64) return f(s, std::integral_constant<int, 2>{});
    if (D <= 128) return f(s, std::integral_constant<int, 4>{});
    return f(s, std::integral_constant<int, 8>{});
  });
}

bool tc_compiled() {
  static const bool ok = [] {
    cudaFuncAttributes a{};
    return cudaFuncGetAttributes(&a, tc::forward_tc<__half, 64>) == cudaSuccess && a.ptxVersion >= 80;
  }();
  return ok;
}

template <typename Kernel>
cudaError_t launch_tc_kernel(Kernel kernel, int64_t gx, int64_t gy, size_t smem, cudaStream_t stream, const Params& p,
                             int n) {
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (!grid_fits(gx, gy)) return cudaErrorInvalidConfiguration;
  const dim3 grid{unsigned(gx), unsigned(gy), 1u};
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  kernel<<<grid, tc::kThreads, smem, stream>>>(p, n);
  return cudaGetLastError();
}

unsigned row_blocks(int64_t rows) { return cuda::ceil_div(rows, simple::kWarps); }

cudaError_t forward(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n_seq == 0 || p.max_q_len == 0 || p.H == 0) return cudaSuccess;
  if (use_tensor_cores(p, dtype, {p.q, p.k, p.v, p.o})) {
    return dispatch_tc(dtype, p.D, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int D = decltype(d)::value;
      using Cfg = tc::FwdCfg<D>;
      const int n_qb = int(cuda::ceil_div(p.max_q_len, Cfg::kBQ));
      return launch_tc_kernel(tc::forward_tc<T, D>, int64_t(n_qb) * p.n_seq, p.H, Cfg::kSmemElems * sizeof(T), stream,
                              p, n_qb);
    });
  }
  return dispatch_simple(dtype, p.D, [&](auto s, auto npl) {
    const unsigned n_rb = row_blocks(p.max_q_len);
    if (!grid_fits(int64_t(n_rb) * p.n_seq, p.H)) return cudaErrorInvalidConfiguration;
    simple::forward_kernel<decltype(s), decltype(npl)::value>
        <<<dim3(unsigned(n_rb * p.n_seq), unsigned(p.H)), simple::kThreads, 0, stream>>>(p, int(n_rb));
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_cuda(const Params& p, DType dtype, cudaStream_t stream) { return forward(p, dtype, stream); }

cudaError_t launch_backward_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  // (no keys at all still needs dq = 0: the dq kernels write every row)
  if (p.n_seq == 0 || p.H == 0 || p.max_q_len == 0) return cudaSuccess;
  const unsigned n_rb = row_blocks(p.max_q_len);
  if (!grid_fits(int64_t(n_rb) * p.n_seq, p.H) || !grid_fits(int64_t(row_blocks(p.max_k_len)) * p.n_seq, p.Hkv))
    return cudaErrorInvalidConfiguration;
  const dim3 q_grid(unsigned(n_rb * p.n_seq), unsigned(p.H));
  cudaError_t e = cuda::dispatch(dtype, [&](auto s) {
    simple::delta_kernel<decltype(s)><<<q_grid, simple::kThreads, 0, stream>>>(p, int(n_rb));
    return cudaGetLastError();
  });
  if (e != cudaSuccess) return e;
  if (use_tensor_cores(p, dtype, {p.q, p.k, p.v, p.o, p.dout, p.dq, p.dk, p.dv})) {
    return dispatch_tc(dtype, p.D, [&](auto t, auto d) {
      using T = decltype(t);
      constexpr int D = decltype(d)::value;
      using DqC = tc::DqCfg<D>;
      using KvC = tc::DkvCfg<D>;
      const int n_qb = int(cuda::ceil_div(p.max_q_len, DqC::kBQ));
      cudaError_t err = launch_tc_kernel(tc::dq_tc<T, D>, int64_t(n_qb) * p.n_seq, p.H, DqC::kSmemElems * sizeof(T),
                                         stream, p, n_qb);
      if (err != cudaSuccess) return err;
      const int n_kb = int(cuda::ceil_div(p.max_k_len, KvC::kBK));
      return launch_tc_kernel(tc::dkdv_tc<T, D>, int64_t(n_kb) * p.n_seq, p.Hkv, KvC::smem_bytes(sizeof(T)), stream,
                              p, n_kb);
    });
  }
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

cudaError_t launch_decode_cuda(const Params& p, DType dtype, cudaStream_t stream) {
  if (p.n_seq == 0 || p.max_q_len == 0 || p.H == 0) return cudaSuccess;
  if (p.max_q_len > kDecodeMaxQueries) return forward(p, dtype, stream);  // a prefill chunk
  if (p.n_splits < 1 || (p.n_splits > 1 && (!p.partial_out || !p.partial_lse))) return cudaErrorInvalidValue;
  if (!grid_fits(p.n_seq * p.n_splits, p.Hkv) || !grid_fits(int64_t(row_blocks(p.max_q_len)) * p.n_seq, p.H))
    return cudaErrorInvalidConfiguration;
  return dispatch_simple(dtype, p.D, [&](auto s, auto npl) {
    using S = decltype(s);
    constexpr int NPL = decltype(npl)::value;
    simple::decode_kernel<S, NPL>
        <<<dim3(unsigned(p.n_seq * p.n_splits), unsigned(p.Hkv)), simple::kThreads, 0, stream>>>(p);
    if (p.n_splits > 1) {
      const unsigned n_rb = row_blocks(p.max_q_len);
      simple::merge_kernel<S, NPL>
          <<<dim3(unsigned(n_rb * p.n_seq), unsigned(p.H)), simple::kThreads, 0, stream>>>(p, int(n_rb));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_padded_table_cuda(const PaddedTable& t, Seq* seqs, cudaStream_t stream) {
  if (t.B == 0) return cudaSuccess;
  padded_table_kernel<<<cuda::ceil_div(t.B, 128), 128, 0, stream>>>(t, seqs);
  return cudaGetLastError();
}

}  // namespace fastrlhf::kernels::attention
