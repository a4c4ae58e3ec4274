// Tensor-core attention kernels (templates; see attention_common.cuh for the folder's layout).
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
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_common.cuh"

namespace fastrlhf::kernels::attention::detail {

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
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
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
__device__ __forceinline__ void mma_cb(float (&acc)[NT][4], const float (&c)[NC][4], const T* bs, int ld, int lane) {
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
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
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
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int64_t r0, int64_t lo, int64_t hi) {
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
    const float inv = inv_row_sum(lr);  // NaN scores -> a NaN row, never a silent 0 (attention.h)
    T* orow = O + i * p.q_row_stride;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t4) = pack2<T>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    if (p.lse && t4 == 0)
      p.lse[lse_index(p, sq, h, i)] = lr > 0.f ? (m[r] + log2f(lr)) * kLn2 : (lr == 0.f ? -INFINITY : lr);
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
      *reinterpret_cast<uint32_t*>(row + nt * 8 + 2 * t4) = pack2<T>(dq[nt][2 * r] * scale, dq[nt][2 * r + 1] * scale);
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
    load_rows<BQ, D>(Gs + stage * BQ * LD, static_cast<const T*>(p.dout) + q_base, p.q_row_stride, i0, 0, sq.q_len);
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

// ---- launch ------------------------------------------------------------------------------------

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

// Explicitly instantiated per (T, D) in tc_fwd_hdim<D>_<dtype>.cu.
template <typename T, int D>
cudaError_t run_tc_forward(const Params& p, cudaStream_t stream) {
  using Cfg = tc::FwdCfg<D>;
  const int n_qb = int(cuda::ceil_div(p.max_q_len, Cfg::kBQ));
  return launch_tc_kernel(tc::forward_tc<T, D>, int64_t(n_qb) * p.n_seq, p.H, Cfg::kSmemElems * sizeof(T), stream, p,
                          n_qb);
}

template <typename T, int D>
cudaError_t tc_forward_attributes(cudaFuncAttributes* attr) {
  return cudaFuncGetAttributes(attr, tc::forward_tc<T, D>);
}

// Explicitly instantiated per (T, D) in tc_bwd_hdim<D>_<dtype>.cu.
template <typename T, int D>
cudaError_t run_tc_backward(const Params& p, cudaStream_t stream) {
  using DqC = tc::DqCfg<D>;
  using KvC = tc::DkvCfg<D>;
  const int n_qb = int(cuda::ceil_div(p.max_q_len, DqC::kBQ));
  cudaError_t err = launch_tc_kernel(tc::dq_tc<T, D>, int64_t(n_qb) * p.n_seq, p.H, DqC::kSmemElems * sizeof(T), stream,
                                     p, n_qb);
  if (err != cudaSuccess) return err;
  const int n_kb = int(cuda::ceil_div(p.max_k_len, KvC::kBK));
  return launch_tc_kernel(tc::dkdv_tc<T, D>, int64_t(n_kb) * p.n_seq, p.Hkv, KvC::smem_bytes(sizeof(T)), stream, p,
                          n_kb);
}

}  // namespace fastrlhf::kernels::attention::detail
