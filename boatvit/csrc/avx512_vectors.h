// AVX512 helpers of both kernels, compiled for those vectors alone (a target attribute) while the rest of the
// kernels keep the build's AVX2 vectors: callers check at run time that the CPU has them (cpu_has_avx512). Built on
// x86-64 with GCC or Clang only (BOATVIT_X86_VECTORS); elsewhere, or built with -DBOATVIT_PORTABLE_ONLY (how the
// portable build is checked on x86), the callers keep their portable routes.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(BOATVIT_PORTABLE_ONLY)
#define BOATVIT_X86_VECTORS 1
#include <immintrin.h>
#define BOATVIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define BOATVIT_X86_VECTORS 0
#endif

namespace boatvit_avx512 {

// Whether this CPU has AVX512 F, BW, VL and DQ (every CPU with AMX has them) and the process may use them: an
// ONEDNN_MAX_CPU_ISA below AVX512 (oneDNN's cap on its own instruction set, which boatvit's matrix products run
// through) turns them off too, so a capped process runs as an older CPU would, vectors and matrix units alike.
inline bool cpu_has_avx512() {
#if BOATVIT_X86_VECTORS
  static const bool has = [] {
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (cap && *cap && !std::strstr(cap, "512") && !std::strstr(cap, "AVX10") && std::strcmp(cap, "DEFAULT") != 0 &&
        std::strcmp(cap, "ALL") != 0) {
      return false;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

#if BOATVIT_X86_VECTORS

// the mask of the first min(count, 16) lanes of a vector
inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << (count < 16 ? count : 16)) - 1);
}

// How lanes_combined combines: sums or maxima.
enum class Combine { sum, max };

template <Combine op>
BOATVIT_AVX512 inline __m512 combine(__m512 a, __m512 b) {
  if constexpr (op == Combine::sum) {
    return _mm512_add_ps(a, b);
  } else {
    return _mm512_max_ps(a, b);
  }
}

// lane j: the sum (or maximum) of the 16 lanes of v[j], by a tree of lane shuffles (45 instructions for all 16,
// where one vector's own reduction is a chain of 8 dependent ones)
template <Combine op>
BOATVIT_AVX512 inline __m512 lanes_combined(__m512 v[16]) {
  __m512 pairs[8];  // in 128-bit lane l: partial results of rows 2i, 2i + 1 interleaved
  for (int i = 0; i < 8; ++i) {
    pairs[i] = combine<op>(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 quads[4];  // in 128-bit lane l: partial results of rows 4i..4i + 3, one each
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = combine<op>(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // the four 128-bit lanes of each quad combined: lanes (0 + 1, 2 + 3) of two quads, then once more
  const __m512 halves01 = combine<op>(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                      _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
  const __m512 halves23 = combine<op>(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                      _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
  return combine<op>(_mm512_shuffle_f32x4(halves01, halves23, 0x88), _mm512_shuffle_f32x4(halves01, halves23, 0xdd));
}

// exp(x) for x <= 0, within 2 ulp of float: 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its
// Taylor polynomial to degree 6 (the next term is under 1.3e-7). Below -87.3, where exp leaves float's normal
// numbers, and at -inf it is exactly 0: a subnormal reaching the row's sum would cost a microcode assist per vector
// (every row's last, partial vector has such lanes), and no probability here can tell it from 0.
BOATVIT_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.3f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: n * hi exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

#endif  // BOATVIT_X86_VECTORS

}  // namespace boatvit_avx512
