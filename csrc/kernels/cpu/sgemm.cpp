// fp32 GEMM building blocks for AVX-512 (see sgemm.h).
#include "sgemm.h"

#include <cassert>

#if defined(FASTRLHF_SGEMM_AVX512)

namespace fastrlhf::kernels::cpu::sgemm {

void tile_rows(int rows, int64_t K, const float* a, int64_t a_k, const float* b, int64_t b_k, float* c, int64_t ldc,
               bool accumulate, __mmask16 m0, __mmask16 m1) {
  switch (rows) {
    // clang-format off
#define FRL_TILE_CASE(R) \
  case R:                \
    return tile<R>(K, a, a_k, b, b_k, c, ldc, accumulate, m0, m1);
    FRL_TILE_CASE(1) FRL_TILE_CASE(2) FRL_TILE_CASE(3) FRL_TILE_CASE(4) FRL_TILE_CASE(5) FRL_TILE_CASE(6)
    FRL_TILE_CASE(7) FRL_TILE_CASE(8) FRL_TILE_CASE(9) FRL_TILE_CASE(10) FRL_TILE_CASE(11) FRL_TILE_CASE(12)
    FRL_TILE_CASE(13) FRL_TILE_CASE(14)
#undef FRL_TILE_CASE
    // clang-format on
    default:  // 0 rows; more than kMr is a caller bug
      assert(rows == 0);
      return;
  }
}

namespace {

// The 16 x 16 block r[0..15] (rows) transposed in registers: r[c] becomes column c.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3: u[i + c] holds column 4L + c of lane L
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  __m512 v[16];
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm512_shuffle_f32x4(u[c], u[c + 4], 0x88);       // columns c, c + 8 of rows 0-7
    v[c + 4] = _mm512_shuffle_f32x4(u[c], u[c + 4], 0xdd);   // columns c + 4, c + 12
    v[c + 8] = _mm512_shuffle_f32x4(u[c + 8], u[c + 12], 0x88);  // the same for rows 8-15
    v[c + 12] = _mm512_shuffle_f32x4(u[c + 8], u[c + 12], 0xdd);
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(v[c], v[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v[c], v[c + 8], 0xdd);
  }
}

}  // namespace

void pack_a_rows(const float* src, int64_t ld, int rows, int64_t K, float* dst) {
  static_assert(kMr <= 16);
  const __mmask16 row_mask = __mmask16((1u << kMr) - 1u);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // 16 k at a time: a [rows x 16] block, transposed, is [16][kMr]
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(src + i * ld + k) : _mm512_setzero_ps();
    transpose16(r);
    for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(dst + (k + c) * kMr, row_mask, r[c]);
  }
  for (int i = 0; i < rows; ++i) {
    const float* s = src + i * ld;
    for (int64_t kk = k; kk < K; ++kk) dst[kk * kMr + i] = s[kk];
  }
}

void pack_b_rows(const float* src, int64_t ld, int64_t cols, int64_t K, float* dst) {
  const __mmask16 m0 = lo_mask(cols), m1 = hi_mask(cols);
  for (int64_t k = 0; k < K; ++k) {
    const float* s = src + k * ld;
    _mm512_storeu_ps(dst + k * kNr, _mm512_maskz_loadu_ps(m0, s));
    _mm512_storeu_ps(dst + k * kNr + 16, _mm512_maskz_loadu_ps(m1, s + 16));
  }
}

void pack_b_transposed(const float* src, int64_t ld, int64_t cols, int64_t K, float* dst) {
  for (int64_t j = 0; j < kNr; ++j) {
    float* d = dst + j;
    if (j < cols) {
      const float* s = src + j * ld;
      for (int64_t k = 0; k < K; ++k) d[k * kNr] = s[k];
    } else {
      for (int64_t k = 0; k < K; ++k) d[k * kNr] = 0.0f;
    }
  }
}

}  // namespace fastrlhf::kernels::cpu::sgemm

#endif
