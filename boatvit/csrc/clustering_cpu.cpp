// Balanced hierarchical clustering on the CPU, one fused pass per split: the algorithm of
// boatvit/clustering.py (_clustered_order), which stays its fallback and its test oracle.
//
// The eager version issues about 20 small memory-bound ops and a full sort per level over all groups at once. Here
// every (image, head) row is clustered by one thread from start to end, on a private copy of its queries kept in
// the row's current order; the soft k-means steps read each token once per step, and a split needs only which
// tokens fall in each half and each quarter (the next level's initial centroids are the means of the quarters), so
// levels before the last select instead of sorting. Only the last level sorts, because the clusters' order is
// part of the result (the sibling overlap takes the tokens next to the cut).
//
// Equal split keys (equal queries) are ordered by token index, as in the eager version: the same clustering, ties
// included. Sums run in another order than the eager matmuls', so in float32 a token within rounding of a cut may
// fall on the other side of it.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx512_vectors.h"

namespace {

constexpr int64_t kBlock = 16;

// The split key's order as a signed integer: the bits of a negative float are flipped except for the sign bit, so
// integer order is float order (-0.0 before +0.0, as in the eager sort keys); NaN sorts with +inf.
template <typename scalar_t>
int64_t order_code(scalar_t key) {
  using bits_t = std::conditional_t<std::is_same_v<scalar_t, float>, int32_t, int64_t>;
  if (std::isnan(key)) key = std::numeric_limits<scalar_t>::infinity();
  bits_t bits;
  std::memcpy(&bits, &key, sizeof(bits));
  return static_cast<int64_t>(bits ^ ((bits >> (8 * sizeof(bits_t) - 1)) & std::numeric_limits<bits_t>::max()));
}

// What a real token of a group being split is ordered by: its key's code, then its index in the input.
// A float32 code fits above the token in one int64 (one comparison); a float64 code needs a pair.
struct CodeAndToken {
  int64_t code;
  int64_t token;
  bool operator<(const CodeAndToken& other) const {
    return code < other.code || (code == other.code && token < other.token);
  }
};

template <typename scalar_t>
using split_key_t = std::conditional_t<std::is_same_v<scalar_t, float>, int64_t, CodeAndToken>;

template <typename scalar_t>
split_key_t<scalar_t> split_key(int64_t code, int64_t token) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return static_cast<int64_t>(static_cast<uint64_t>(code) << 32) | token;
  } else {
    return CodeAndToken{code, token};
  }
}

template <typename scalar_t>
int64_t token_of(const split_key_t<scalar_t>& key) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return key & 0xffffffff;
  } else {
    return key.token;
  }
}

// Rearranges keys[0, n) so that its first k are the k smallest, in any order: std::nth_element's result, by a radix
// select. Each round buckets the keys by the leading bits of their offset from the smallest (256 buckets over their
// range), moves those below the k-th's bucket to the front and those above it to the back in one pass, and goes on
// in the k-th's bucket; a few dozen keys are left to nth_element. Its branches are predictable, where
// nth_element's compare-and-swap ones are not: it took a third of the clustering. The keys are distinct.
inline void select_smallest(int64_t* keys, int64_t n, int64_t k, std::vector<int64_t>& scratch) {
  constexpr int64_t kBuckets = 256, kSmall = 64;
  auto unsigned_order = [](int64_t key) { return static_cast<uint64_t>(key) ^ (uint64_t(1) << 63); };
  scratch.resize(std::max<size_t>(scratch.size(), static_cast<size_t>(n)));
  while (n > kSmall && k > 0 && k < n) {
    uint64_t low = std::numeric_limits<uint64_t>::max(), high = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t u = unsigned_order(keys[i]);
      low = std::min(low, u);
      high = std::max(high, u);
    }
    const int bits = 64 - __builtin_clzll(high - low);  // high > low: the keys are distinct
    const int shift = std::max(bits - 8, 0);
    int64_t counts[kBuckets] = {};
    for (int64_t i = 0; i < n; ++i) ++counts[(unsigned_order(keys[i]) - low) >> shift];
    int64_t bucket = 0, below = 0;
    while (below + counts[bucket] <= k) below += counts[bucket++];
    // branch-free: which way a key goes is a coin toss
    int64_t front = 0, middle = below, back = below + counts[bucket];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = static_cast<int64_t>((unsigned_order(keys[i]) - low) >> shift);
      const int64_t before = b < bucket, after = b > bucket, inside = 1 - before - after;
      scratch[before * front + inside * middle + after * back] = keys[i];
      front += before;
      middle += inside;
      back += after;
    }
    std::copy(scratch.begin(), scratch.begin() + n, keys);
    keys += below;
    n = counts[bucket];
    k -= below;
  }
  if (k > 0 && k < n) std::nth_element(keys, keys + k, keys + n);
}

inline void select_smallest(CodeAndToken* keys, int64_t n, int64_t k, std::vector<int64_t>&) {
  std::nth_element(keys, keys + k, keys + n);
}

// Dot products and updates over the head dimension: `Dim` is the head size when known at compile time (32 in every
// BOAT model: fully unrolled), 0 for any other, read from `d`.
template <typename scalar_t, int64_t Dim>
struct Rows {
  int64_t d;
  int64_t size() const { return Dim ? Dim : d; }

  // lane-wise partial sums, then a halving tree: a vector reduction, where a simd reduction clause leaves a chain of
  // scalar additions
  scalar_t dot(const scalar_t* a, const scalar_t* b) const {
    constexpr int64_t lanes = 32 / sizeof(scalar_t);
    scalar_t partial[lanes] = {};
    const int64_t body = size() / lanes * lanes;
    for (int64_t k = 0; k < body; k += lanes) {
      for (int64_t l = 0; l < lanes; ++l) partial[l] += a[k + l] * b[k + l];
    }
    for (int64_t width = lanes / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) partial[l] += partial[l + width];
    }
    scalar_t s = partial[0];
    for (int64_t k = body; k < size(); ++k) s += a[k] * b[k];
    return s;
  }

  // a fixed-size copy where the size is known: a call to memmove per row took a tenth of the clustering's profile
  void copy(const scalar_t* from, scalar_t* to) const { std::memcpy(to, from, size() * sizeof(scalar_t)); }

  void add(scalar_t* acc, scalar_t weight, const scalar_t* x) const {
#pragma omp simd
    for (int64_t k = 0; k < size(); ++k) acc[k] += weight * x[k];
  }

  // sum0 += w0[j] * x_j and sum1 += w1[j] * x_j over the `count` consecutive rows x_j
  void accumulate(scalar_t* __restrict__ sum0, scalar_t* __restrict__ sum1, const scalar_t* w0, const scalar_t* w1,
                  const scalar_t* __restrict__ x, int64_t count) const {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* xj = x + j * size();
#pragma omp simd
      for (int64_t k = 0; k < size(); ++k) {
        sum0[k] += w0[j] * xj[k];
        sum1[k] += w1[j] * xj[k];
      }
    }
  }

  // v / max(|v|, 1e-12), F.normalize's convention
  void normalize(scalar_t* v) const {
    const scalar_t norm = std::max(std::sqrt(dot(v, v)), scalar_t(1e-12));
#pragma omp simd
    for (int64_t k = 0; k < size(); ++k) v[k] /= norm;
  }
};

// The softmax of the logits (w, 0) for `count` (<= kBlock) differences w, in place: w0 = 1 / (1 + e) and
// w1 = e / (1 + e) where w >= 0, the other way round where not, e = exp(-|w|). A vector exp over the block: a scalar
// call per token cost as much as all the dot products of a soft k-means step.
template <typename scalar_t>
inline void two_way_softmax(scalar_t* w0, scalar_t* w1, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t j = 0; j < count; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), count - j);
    const Vec w = Vec::loadu(w0 + j, n), one(scalar_t(1));
    const Vec e = (Vec(scalar_t(0)) - w.abs()).exp(), total = one + e;
    const Vec larger = one / total, smaller = e / total, first_larger = w >= Vec(scalar_t(0));
    Vec::blendv(smaller, larger, first_larger).store(w0 + j, n);
    Vec::blendv(larger, smaller, first_larger).store(w1 + j, n);
  }
}

// The per-token passes of a split for float32 head rows of 32 (every BOAT model's, and bf16/fp16 queries, which are
// clustered in float32) in AVX512 vectors: 16 tokens at a time, a row being two vectors. The AVX2 route reduces each
// token's dot product on its own; here the 16 tokens' partial sums are reduced together (lanes_combined), and the
// centroid sums stay in registers over the whole group: about a tenth off the clustering of a bf16 BOAT-Swin-T.
#if BOATVIT_X86_VECTORS
namespace wide {

using namespace boatvit_avx512;

// lane j: a . x_j for the 16 rows x_j = x + 32 j
BOATVIT_AVX512 inline __m512 dots(const float* a, const float* x) {
  const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
  __m512 products[16];
  for (int j = 0; j < 16; ++j) {
    products[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + 32 * j + 16), a1, _mm512_mul_ps(_mm512_loadu_ps(x + 32 * j), a0));
  }
  return lanes_combined<Combine::sum>(products);
}

// sum of the `count` rows x_j added to sum (32 floats)
BOATVIT_AVX512 inline void add_rows(float* sum, const float* x, int64_t count) {
  __m512 s0 = _mm512_loadu_ps(sum), s1 = _mm512_loadu_ps(sum + 16);
  for (int64_t j = 0; j < count; ++j) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + 32 * j));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + 32 * j + 16));
  }
  _mm512_storeu_ps(sum, s0);
  _mm512_storeu_ps(sum + 16, s1);
}

// One soft k-means step over the group's `real` rows (x; inv_norm their inverse norms; the buffer reads up to 15
// rows past them): sums (2 x 32) = the rows weighted by the softmax over the two centroids of temperature * cosine,
// from the difference of the centroids (see cluster_row).
BOATVIT_AVX512 inline void soft_step(const float* difference, const float* x, const float* inv_norm, int64_t real,
                                     float temperature, float* sums) {
  __m512 s00 = _mm512_setzero_ps(), s01 = s00, s10 = s00, s11 = s00;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t start = 0; start < real; start += 16) {
    const int64_t count = std::min<int64_t>(16, real - start);
    const float* bx = x + start * 32;
    const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(first_lanes(count), inv_norm + start),
                                        _mm512_set1_ps(temperature));
    const __m512 w = _mm512_mul_ps(dots(difference, bx), scaled);
    // the softmax of (w, 0): 1 / (1 + e) for the larger logit, e / (1 + e) for the other, e = exp(-|w|)
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(w)));
    const __m512 larger = _mm512_div_ps(one, _mm512_add_ps(one, e)), smaller = _mm512_mul_ps(e, larger);
    const __mmask16 first_larger = _mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_GE_OQ);
    alignas(64) float w0[16], w1[16];
    _mm512_store_ps(w0, _mm512_mask_blend_ps(first_larger, smaller, larger));
    _mm512_store_ps(w1, _mm512_mask_blend_ps(first_larger, larger, smaller));
    for (int64_t j = 0; j < count; ++j) {
      const __m512 x0 = _mm512_loadu_ps(bx + 32 * j), x1 = _mm512_loadu_ps(bx + 32 * j + 16);
      const __m512 a = _mm512_set1_ps(w0[j]), b = _mm512_set1_ps(w1[j]);
      s00 = _mm512_fmadd_ps(a, x0, s00);
      s01 = _mm512_fmadd_ps(a, x1, s01);
      s10 = _mm512_fmadd_ps(b, x0, s10);
      s11 = _mm512_fmadd_ps(b, x1, s11);
    }
  }
  _mm512_storeu_ps(sums, s00);
  _mm512_storeu_ps(sums + 16, s01);
  _mm512_storeu_ps(sums + 32, s10);
  _mm512_storeu_ps(sums + 48, s11);
}

// keys[i] = (cos0 + 1) / (cos1 + 1) of the group's `real` rows, cos the cosine with the centroid c0 or c1 (unit)
BOATVIT_AVX512 inline void split_keys(const float* c0, const float* c1, const float* x, const float* inv_norm,
                                      int64_t real, float* keys) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t start = 0; start < real; start += 16) {
    const __mmask16 lanes = first_lanes(real - start);
    const float* bx = x + start * 32;
    const __m512 inv = _mm512_maskz_loadu_ps(lanes, inv_norm + start);
    const __m512 key = _mm512_div_ps(_mm512_fmadd_ps(dots(c0, bx), inv, one), _mm512_fmadd_ps(dots(c1, bx), inv, one));
    _mm512_mask_storeu_ps(keys + start, lanes, key);
  }
}

// keys[0, n) (distinct) sorted ascending by rank: each key goes to the place that counts the keys below it, 8 keys
// against all n at a time. n^2 / 8 vector comparisons and no branch on the data, where std::sort's compare-and-swap
// branches on a group of 98 keys are a coin toss each: the last level's sorts took a sixth of the clustering.
BOATVIT_AVX512 inline void rank_sort(int64_t* keys, int64_t n, int64_t* sorted) {
  const __m512i one = _mm512_set1_epi64(1);
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t count = std::min<int64_t>(8, n - i0);
    const __m512i mine = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(first_lanes(count)), keys + i0);
    __m512i rank = _mm512_setzero_si512();
    for (int64_t j = 0; j < n; ++j) {
      rank = _mm512_mask_add_epi64(rank, _mm512_cmplt_epi64_mask(_mm512_set1_epi64(keys[j]), mine), rank, one);
    }
    alignas(64) int64_t place[8];
    _mm512_store_si512(place, rank);
    for (int64_t l = 0; l < count; ++l) sorted[place[l]] = keys[i0 + l];
  }
  std::copy(sorted, sorted + n, keys);
}

}  // namespace wide
#endif  // BOATVIT_X86_VECTORS

// A query row into the row's copy: bf16 and fp16 queries are clustered in float32, as the PyTorch route clusters
// them (q.float()); converted by vectors, since a scalar conversion per value cost a tenth of the clustering
template <typename input_t, typename scalar_t>
inline void load_query(const input_t* from, scalar_t* to, int64_t d) {
  if constexpr (std::is_same_v<input_t, scalar_t>) {
    std::copy(from, from + d, to);
  } else {
    using Vec = at::vec::Vectorized<input_t>;
    int64_t i = 0;
    for (; i + Vec::size() <= d; i += Vec::size()) {
      const auto halves = at::vec::convert_to_float<input_t>(Vec::loadu(from + i));
      std::get<0>(halves).store(to + i);
      std::get<1>(halves).store(to + i + Vec::size() / 2);
    }
    for (; i < d; ++i) to[i] = static_cast<scalar_t>(from[i]);
  }
}

// The buffers of cluster_row, made once for all the rows a thread clusters in one call, where every row allocated
// and zeroed two fresh copies of its queries (with Rows::copy: 4 % off the clustering).
template <typename scalar_t>
struct Workspace {
  std::vector<scalar_t> x, moved, inv_norm, moved_inv, centroids, difference, sums, key_values;
  std::vector<split_key_t<scalar_t>> keys;
  std::vector<int64_t> scratch, source, moved_order;
  std::vector<int32_t> slot_of;  // a token's slot in its group's current order

  Workspace(int64_t n_pad, int64_t d)
      // 16 rows past the end: the wide passes read whole blocks of 16 rows
      : x((n_pad + 16) * d),
        moved((n_pad + 16) * d, scalar_t(0)),
        inv_norm(n_pad),
        moved_inv(n_pad),
        centroids(2 * d),
        difference(d),
        sums(2 * d),
        key_values(n_pad),
        keys(n_pad),
        source(n_pad),
        moved_order(n_pad),
        slot_of(n_pad) {}
};

// One row: queries q(t, :) = q + t * token_stride for the real tokens t < N; the slots t >= N are ghosts (zero
// queries). `order` (n_pad) receives the clustered order.
//
// The row's queries are copied into `x`, kept in the row's current order (every group contiguous) by one gather per
// level, so that every pass over a group reads memory in sequence.
template <typename scalar_t, int64_t Dim, typename input_t>
void cluster_row(const input_t* q, int64_t token_stride, int64_t N, int64_t d, int64_t levels,
                 const int64_t* ghosts, int64_t iterations, scalar_t temperature, int64_t* order, int64_t n_pad,
                 Workspace<scalar_t>& work) {
  const Rows<scalar_t, Dim> rows{d};
  d = rows.size();
  constexpr bool float_rows_of_32 = std::is_same_v<scalar_t, float> && Dim == 32;
  const bool wide_rows = float_rows_of_32 && boatvit_avx512::cpu_has_avx512();
  auto& [x, moved, inv_norm, moved_inv, centroids, difference, sums, key_values, keys, scratch, source, moved_order,
         slot_of] = work;
  // ghosts are zero queries; the rows past them are read by whole blocks (see Workspace)
  std::fill(x.begin() + N * d, x.end(), scalar_t(0));
  std::fill(inv_norm.begin() + N, inv_norm.end(), scalar_t(0));
  for (int64_t t = 0; t < N; ++t) {
    // the queries of a row lie a token's whole q, k and v apart: each is a wait on memory unless asked for early
    if (t + 16 < N) __builtin_prefetch(q + (t + 16) * token_stride);
    load_query(q + t * token_stride, x.data() + t * d, d);
    inv_norm[t] = scalar_t(1) / std::max(std::sqrt(rows.dot(x.data() + t * d, x.data() + t * d)), scalar_t(1e-12));
  }
  for (int64_t i = 0; i < n_pad; ++i) order[i] = i;

  for (int64_t level = 0; level < levels; ++level) {
    const int64_t n = n_pad >> level, half = n / 2, groups = int64_t(1) << level;
    const bool last = level + 1 == levels;
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t offset = group * n;
      const scalar_t* gx = x.data() + offset * d;
      const scalar_t* ginv = inv_norm.data() + offset;
      const int64_t g = ghosts[groups - 1 + group], real = n - g;  // the ghosts are the group's last g slots
      scalar_t* c0 = centroids.data();
      scalar_t* c1 = c0 + d;

      // initial centroids: the means of the group's two halves in its current order (ghosts are zeros)
      std::fill(centroids.begin(), centroids.end(), scalar_t(0));
#if BOATVIT_X86_VECTORS
      if constexpr (float_rows_of_32) {
        if (wide_rows) {
          wide::add_rows(c0, gx, std::min(half, real));
          if (real > half) wide::add_rows(c1, gx + half * d, real - half);
        }
      }
#endif
      for (int64_t i = 0; i < real && !wide_rows; ++i) rows.add(i < half ? c0 : c1, scalar_t(1), gx + i * d);
      for (int64_t k = 0; k < 2 * d; ++k) centroids[k] /= scalar_t(half);
      rows.normalize(c0);
      rows.normalize(c1);

      // soft k-means: softmax over the two centroids of temperature * cosine, then the weighted sums. The softmax
      // of two logits depends on their difference only: 1 / (1 + e) for the larger and e / (1 + e) for the other,
      // e = exp(-|difference|), with the difference taken as one dot product with c0 - c1.
      // Tokens go in blocks: the weights of a block first, then its sums, so no call to exp sits among the sums
      // and the sums stay in vector registers.
      for (int64_t step = 0; step < iterations; ++step) {
        for (int64_t k = 0; k < d; ++k) difference[k] = c0[k] - c1[k];
        std::fill(sums.begin(), sums.end(), scalar_t(0));
#if BOATVIT_X86_VECTORS
        if constexpr (float_rows_of_32) {
          if (wide_rows) wide::soft_step(difference.data(), gx, ginv, real, temperature, sums.data());
        }
#endif
        for (int64_t start = 0; start < real && !wide_rows; start += kBlock) {
          const int64_t count = std::min(kBlock, real - start);
          const scalar_t* bx = gx + start * d;
          scalar_t w0[kBlock], w1[kBlock];
          for (int64_t j = 0; j < count; ++j) {
            w0[j] = rows.dot(difference.data(), bx + j * d) * (ginv[start + j] * temperature);
          }
          two_way_softmax(w0, w1, count);
          rows.accumulate(sums.data(), sums.data() + d, w0, w1, bx, count);
        }
        std::copy(sums.begin(), sums.end(), centroids.begin());
        rows.normalize(c0);
        rows.normalize(c1);
      }

      // the split key (cos0 + 1) / (cos1 + 1), ascending
#if BOATVIT_X86_VECTORS
      if constexpr (float_rows_of_32) {
        if (wide_rows) wide::split_keys(c0, c1, gx, ginv, real, key_values.data());
      }
#endif
      for (int64_t i = 0; i < real; ++i) {
        const scalar_t* xi = gx + i * d;
        const scalar_t key =
            wide_rows ? key_values[i] : (rows.dot(c0, xi) * ginv[i] + 1) / (rows.dot(c1, xi) * ginv[i] + 1);
        const int64_t token = order[offset + i];
        keys[i] = split_key<scalar_t>(order_code(key), token);
        slot_of[token] = static_cast<int32_t>(i);
      }

      // the first child takes g // 2 of the ghosts, the second the rest; the real halves differ by at most one
      const int64_t g0 = g / 2, real0 = half - g0;
      auto* first = keys.data();
      if (last) {
        // a last level's group holds two clusters (about 100 keys): rank_sort's n^2 / 8 comparisons beat std::sort
        const bool rank_sorted = wide_rows && real <= 256;
#if BOATVIT_X86_VECTORS
        if constexpr (float_rows_of_32) {
          if (rank_sorted) {
            scratch.resize(std::max<size_t>(scratch.size(), static_cast<size_t>(real)));
            wide::rank_sort(first, real, scratch.data());
          }
        }
#endif
        if (!rank_sorted) std::sort(first, first + real);
      } else {
        select_smallest(first, real, real0, scratch);
        // the next level starts from the means of each child's halves: its smallest half / 2 reals, then the rest
        select_smallest(first, real0, half / 2, scratch);
        select_smallest(first + real0, real - real0, half / 2, scratch);
      }
      int64_t* from = source.data() + offset;  // the current slot each new slot of the group takes its token from
      for (int64_t i = 0; i < real0; ++i) *from++ = offset + slot_of[token_of<scalar_t>(keys[i])];
      for (int64_t i = 0; i < g0; ++i) *from++ = offset + real + i;
      for (int64_t i = real0; i < real; ++i) *from++ = offset + slot_of[token_of<scalar_t>(keys[i])];
      for (int64_t i = g0; i < g; ++i) *from++ = offset + real + i;
    }
    for (int64_t i = 0; i < n_pad; ++i) moved_order[i] = order[source[i]];
    std::copy(moved_order.begin(), moved_order.end(), order);
    if (!last) {
      for (int64_t i = 0; i < n_pad; ++i) {
        rows.copy(x.data() + source[i] * d, moved.data() + i * d);
        moved_inv[i] = inv_norm[source[i]];
      }
      x.swap(moved);
      inv_norm.swap(moved_inv);
    }
  }
}

// The ghost count of every group of every level, level by level in tree order (2^levels - 1 entries): the
// n_pad - N ghosts of the whole row, then each group's g split as g / 2 to its first child and the rest to its second
// (ClusterLayout.ghosts_per_level in boatvit/clustering.py).
std::vector<int64_t> ghosts_per_group(int64_t ghosts, int64_t levels) {
  std::vector<int64_t> counts{ghosts};
  for (int64_t parent = 0; static_cast<int64_t>(counts.size()) < (int64_t(1) << levels) - 1; ++parent) {
    counts.push_back(counts[parent] / 2);
    counts.push_back(counts[parent] - counts[parent] / 2);
  }
  return counts;
}

// q: (B, heads, N, d) with unit stride over d. Returns the padded clustered order (B, heads, n_pad), int64.
at::Tensor clustered_order(const at::Tensor& q, int64_t n_pad, int64_t levels, int64_t iterations,
                           double temperature) {
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu() && q.stride(3) == 1 && q.size(2) >= 1 && q.size(3) >= 1,
              "boatvit clustering kernel: q must be a CPU tensor (B, heads, N >= 1, d >= 1) with unit stride over d");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "boatvit clustering kernel: q must be float64, float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(iterations >= 0, "boatvit clustering kernel: iterations must be >= 0");
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  // the layout of boatvit.clustering.cluster_layout: clusters of c = n_pad / 2^levels slots and fewer than 2^levels
  // ghosts, at most one per cluster; with ghosts, c >= 2 (so every child keeps at least half its slots real)
  TORCH_CHECK(levels >= 1 && levels < 31 && n_pad <= std::numeric_limits<int32_t>::max() &&
                  (n_pad >> levels) << levels == n_pad && N <= n_pad && n_pad - N < (int64_t(1) << levels) &&
                  (n_pad == N || (n_pad >> levels) >= 2),
              "boatvit clustering kernel: n_pad and levels must be a cluster layout of the N tokens: n_pad = c * "
              "2^levels < 2^31 with N <= n_pad < N + 2^levels (see boatvit.clustering.cluster_layout)");
  const std::vector<int64_t> ghosts = ghosts_per_group(n_pad - N, levels);
  auto order = at::empty({B, heads, n_pad}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "boatvit_clustered_order", [&] {
    // half-precision queries are clustered in float32
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = q.data_ptr<scalar_t>();
    int64_t* out = order.data_ptr<int64_t>();
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      Workspace<acc_t> work(n_pad, d);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* rq = base + (row / heads) * q.stride(0) + (row % heads) * q.stride(1);
        if (d == 32) {
          cluster_row<acc_t, 32>(rq, q.stride(2), N, d, levels, ghosts.data(), iterations,
                                 static_cast<acc_t>(temperature), out + row * n_pad, n_pad, work);
        } else {
          cluster_row<acc_t, 0>(rq, q.stride(2), N, d, levels, ghosts.data(), iterations,
                                static_cast<acc_t>(temperature), out + row * n_pad, n_pad, work);
        }
      }
    });
  });
  return order;
}

}  // namespace

TORCH_LIBRARY(boatvit, m) {
  m.def("clustered_order(Tensor q, int n_pad, int levels, int iterations, float temperature) -> Tensor");
  m.impl("clustered_order", c10::DispatchKey::CPU, &clustered_order);
}
