// FSLA's attention inside clusters on the CPU, fused, forward and backward: the route of boatvit/fsla.py
// (_attend_in_clusters: a row gather into clustered order, attention on every cluster, a row gather back to token
// order; autograd through it), which stays its fallback and its test oracle.
//
// That route writes q, k and v in clustered order, the logits and the probabilities of every cluster and the
// clustered output to memory, and reads each back: several passes over tens of MB per layer at BOAT's first stage,
// on top of the two gathers' random reads. Here every sibling pair of clusters of one (image, head) is handled by
// one thread from start to end: its q, k and v rows are gathered straight from the packed qkv projection into
// buffers that stay in the core's cache, both clusters attend there (two small matrix products and a softmax), and
// each query's output row is written straight to its token's place in the output. Only the compulsory traffic
// reaches memory: q, k and v read once, the output written once (in backward: q, k, v and the output's gradient
// read once, the gradients of q, k and v written once).
//
// Layout (boatvit.clustering.ClusterLayout): the padded clustered order holds num_clusters clusters of cluster_size
// slots; a ghost slot holds an index >= N (it reads the last real token, is masked as a key and its output is
// dropped). With one cluster it attends to itself; otherwise cluster 2j attends to the cluster_size + overlap slots
// from its start, cluster 2j + 1 to those ending at its end: both windows lie in the pair's 2 * cluster_size slots.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "avx512_vectors.h"

namespace {


using at::vec::Vectorized;

// C (M x N, ldc) = A (M x K, lda) @ B (K x N, ldb), all row-major, in blocks of Rows rows by Cols
// vectors of columns held in registers. B's rows are read up to Cols vectors past column N (the caller pads its
// buffer); C is written only within its N columns.
template <typename scalar_t, int64_t Rows, int64_t Cols>
inline void block_product(const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc,
                          int64_t N, int64_t K) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  for (int64_t j0 = 0; j0 < N; j0 += Cols * L) {
    Vec acc[Rows][Cols];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < Cols; ++v) acc[r][v] = Vec(scalar_t(0));
    for (int64_t k = 0; k < K; ++k) {
      Vec b[Cols];
      for (int64_t v = 0; v < Cols; ++v) b[v] = Vec::loadu(B + k * ldb + j0 + v * L);
      for (int64_t r = 0; r < Rows; ++r) {
        const Vec a(A[r * lda + k]);
        for (int64_t v = 0; v < Cols; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
      }
    }
    const int64_t cols = std::min<int64_t>(Cols * L, N - j0);
    for (int64_t r = 0; r < Rows; ++r) {
      scalar_t* c = C + r * ldc + j0;
      for (int64_t v = 0; v < Cols && v * L < cols; ++v) {
        if (cols >= (v + 1) * L) {
          acc[r][v].store(c + v * L);
        } else {
          acc[r][v].store(c + v * L, static_cast<int>(cols - v * L));
        }
      }
    }
  }
}

template <typename scalar_t, int64_t Rows, int64_t Cols>
void product(const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc, int64_t M,
             int64_t N, int64_t K) {
  int64_t i = 0;
  for (; i + Rows <= M; i += Rows) {
    block_product<scalar_t, Rows, Cols>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, N, K);
  }
  for (; i < M; ++i) block_product<scalar_t, 1, Cols>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, N, K);
}

template <typename scalar_t>
inline scalar_t lanes_reduce(const Vectorized<scalar_t>& x, bool maximum) {
  scalar_t lanes[Vectorized<scalar_t>::size()];
  x.store(lanes);
  scalar_t result = lanes[0];
  for (int64_t i = 1; i < Vectorized<scalar_t>::size(); ++i) {
    result = maximum ? std::max(result, lanes[i]) : result + lanes[i];
  }
  return result;
}

// float32: the polynomial exp of ATen's CPU flash attention (no call per vector); float64: SLEEF's, within 1 ulp
template <typename scalar_t>
inline Vectorized<scalar_t> vector_exp(const Vectorized<scalar_t>& x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Each row i of S (M x N, lds) becomes exp(scale * s - max) in place, masked columns exp(-inf) = 0; inv[i] is one
// over the row's sum (applied to the output row, which is shorter). A real query always has a real key (itself).
// A row's last N % L columns go as one partial vector: a scalar exp per column there cost as much as the rest.
template <typename scalar_t>
void unnormalised_softmax(scalar_t* S, int64_t lds, int64_t M, int64_t N, scalar_t scale,
                          const std::vector<int64_t>& masked, scalar_t* inv) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t body = N / L * L, tail = N - body;
  for (int64_t i = 0; i < M; ++i) {
    scalar_t* s = S + i * lds;
    for (int64_t j = 0; j < body; j += L) (Vec::loadu(s + j) * Vec(scale)).store(s + j);
    if (tail) (Vec::loadu(s + body, tail) * Vec(scale)).store(s + body, tail);
    for (const int64_t column : masked) s[column] = minus_inf;
    Vec vmax(minus_inf);
    for (int64_t j = 0; j < body; j += L) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
    if (tail) vmax = at::vec::maximum(vmax, Vec::set(Vec(minus_inf), Vec::loadu(s + body, tail), tail));
    const Vec row_max(lanes_reduce<scalar_t>(vmax, true));
    Vec vsum(scalar_t(0));
    for (int64_t j = 0; j < body; j += L) {
      const Vec e = vector_exp<scalar_t>(Vec::loadu(s + j) - row_max);
      e.store(s + j);
      vsum = vsum + e;
    }
    if (tail) {
      const Vec e = vector_exp<scalar_t>(Vec::loadu(s + body, tail) - row_max);
      e.store(s + body, tail);
      vsum = vsum + Vec::set(Vec(scalar_t(0)), e, tail);
    }
    inv[i] = scalar_t(1) / lanes_reduce<scalar_t>(vsum, false);
  }
}

// Where every (image, head, group) finds its rows: a group is one sibling pair of clusters (or the single cluster)
// of one (image, head), the unit of work of one thread.
struct Layout {
  int64_t B, N, heads, d, n_pad, cluster_size, overlap;
  bool one_cluster;
  int64_t groups, group_slots, keys, token_stride;

  Layout(const at::Tensor& qkv, const at::Tensor& order, int64_t cluster_size_, int64_t num_clusters, int64_t overlap_)
      : B(qkv.size(0)),
        N(qkv.size(1)),
        heads(qkv.size(3)),
        d(qkv.size(4)),
        n_pad(order.size(2)),
        cluster_size(cluster_size_),
        overlap(overlap_),
        one_cluster(num_clusters == 1),
        groups(num_clusters == 1 ? 1 : num_clusters / 2),
        group_slots(num_clusters == 1 ? order.size(2) : 2 * cluster_size_),
        keys(num_clusters == 1 ? order.size(2) : cluster_size_ + overlap_),
        token_stride(3 * qkv.size(3) * qkv.size(4)) {}

  int64_t clusters_per_group() const { return one_cluster ? 1 : 2; }
  // cluster 2j attends to the keys from its own start, cluster 2j + 1 to those ending at its end
  int64_t first_key(int64_t cluster) const { return cluster == 0 ? 0 : cluster_size - overlap; }
};

// Runs body(b, h, slots) for every group, spread over threads; slots are the group's group_slots entries of the
// order. An entry outside [0, n_pad) stops the work and raises once the threads are done.
template <typename Body>
void for_each_group(const Layout& layout, const at::Tensor& order, const Body& body) {
  const int64_t* order_data = order.data_ptr<int64_t>();
  std::atomic<bool> bad_order{false};
  at::parallel_for(0, layout.B * layout.heads * layout.groups, 1, [&](int64_t begin, int64_t end) {
    auto state = body.make_state();
    for (int64_t task = begin; task < end && !bad_order; ++task) {
      const int64_t bh = task / layout.groups, group = task % layout.groups;
      const int64_t* slots = order_data + bh * layout.n_pad + group * layout.group_slots;
      for (int64_t p = 0; p < layout.group_slots; ++p) {
        if (slots[p] < 0 || slots[p] >= layout.n_pad) bad_order = true;
      }
      if (!bad_order) body(state, bh / layout.heads, bh % layout.heads, slots);
    }
    body.finish();
  });
  TORCH_CHECK(!bad_order, "cluster_attention: order holds a slot index outside [0, n_pad)");
}

// The q, k or v row (part 0, 1, 2) of the token in a slot; a ghost slot (index >= N) reads the last real token.
template <typename io_t>
inline const io_t* qkv_row(const io_t* qkv, const Layout& layout, int64_t b, int64_t h, int64_t slot, int64_t part) {
  return qkv + (b * layout.N + std::min(slot, layout.N - 1)) * layout.token_stride + (part * layout.heads + h) * layout.d;
}

// Starts loading the rows of the slot kSlotsAhead places on, while the gather reads slot p: a group's rows lie
// scattered over the image, so the hardware prefetchers cannot guess them and each would be a wait on memory. 16
// ahead made the bf16 forward 10 % faster (4 ahead: 5 %; 32: the same as 16). grad_out: the output's gradient in
// backward, whose rows are gathered too; null in forward. The matrix units' route only: the float32 route spends
// long enough on each row's products for the loads to arrive anyway (its forward measured the same with it, its
// backward 1 % slower).
constexpr int64_t kSlotsAhead = 16;

template <typename io_t>
inline void prefetch_slot(const io_t* qkv, const io_t* grad_out, const Layout& layout, int64_t b, int64_t h,
                          const int64_t* slots, int64_t p) {
  if (p + kSlotsAhead >= layout.group_slots) return;
  const int64_t slot = slots[p + kSlotsAhead];
  for (int64_t part = 0; part < 3; ++part) __builtin_prefetch(qkv_row(qkv, layout, b, h, slot, part));
  if (grad_out && slot < layout.N) __builtin_prefetch(grad_out + ((b * layout.N + slot) * layout.heads + h) * layout.d);
}

template <typename scalar_t>
inline void copy_row(const scalar_t* from, scalar_t* to, int64_t d, scalar_t factor = scalar_t(1)) {
  using Vec = Vectorized<scalar_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) (Vec::loadu(from + i) * Vec(factor)).store(to + i);
  for (; i < d; ++i) to[i] = from[i] * factor;
}

// A row of the input's dtype into a buffer of the products' (bf16 and fp16 are computed in float32)
template <typename from_t, typename to_t>
inline void load_row(const from_t* from, to_t* to, int64_t d) {
  if constexpr (std::is_same_v<from_t, to_t>) {
    // vector copies: a call to memmove per row of 64 bytes cost a fifth of the kernel
    using Vec = Vectorized<to_t>;
    int64_t i = 0;
    for (; i + Vec::size() <= d; i += Vec::size()) Vec::loadu(from + i).store(to + i);
    if (i < d) Vec::loadu(from + i, d - i).store(to + i, d - i);
  } else {
    at::vec::convert(from, to, d);
  }
}

// factor * a row of the products' buffer, stored in the output's dtype (the buffer's row is scaled in place)
template <typename acc_t, typename io_t>
inline void store_row(acc_t* from, io_t* to, int64_t d, acc_t factor) {
  if constexpr (std::is_same_v<acc_t, io_t>) {
    copy_row(from, to, d, factor);
  } else {
    if (factor != acc_t(1)) copy_row(from, from, d, factor);
    at::vec::convert(from, to, d);
  }
}

// rows x cols (leading dimension ld_from) into cols x rows (leading dimension ld_to)
template <typename from_t, typename to_t>
inline void transpose(const from_t* from, int64_t ld_from, to_t* to, int64_t ld_to, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) to[j * ld_to + i] = static_cast<to_t>(from[i * ld_from + j]);
}

// The columns of the ghost keys among a cluster's keys.
inline void masked_keys(const Layout& layout, const int64_t* slots, int64_t first_key, std::vector<int64_t>& masked) {
  masked.clear();
  for (int64_t j = 0; j < layout.keys; ++j) {
    if (slots[first_key + j] >= layout.N) masked.push_back(j);
  }
}

// The c rows of a cluster's query outputs (rows, each times factors[r], or 1 without factors) to the places of
// their tokens in `to`, where token t of image b and head h starts at (b * N + t) * token_stride + h * d; ghost
// queries are dropped. Rows are scaled in place.
template <typename acc_t, typename io_t>
inline void write_query_rows(const Layout& layout, const int64_t* query_slots, acc_t* rows, const acc_t* factors,
                             io_t* to, int64_t token_stride, int64_t b, int64_t h) {
  const int64_t d = layout.d;
  for (int64_t r = 0; r < layout.cluster_size; ++r) {
    const int64_t token = query_slots[r];
    if (token >= layout.N) continue;  // a ghost query: dropped
    store_row(rows + r * d, to + (b * layout.N + token) * token_stride + h * d, d, factors ? factors[r] : acc_t(1));
  }
}

// The group's key and value gradients (group_slots rows of d each) to the k and v rows of their tokens in
// grad_qkv; ghost slots write nothing.
template <typename acc_t, typename io_t>
inline void write_key_value_gradients(const Layout& layout, const int64_t* slots, acc_t* grad_k, acc_t* grad_v,
                                      io_t* grad_qkv, int64_t b, int64_t h) {
  const int64_t d = layout.d;
  for (int64_t p = 0; p < layout.group_slots; ++p) {
    if (slots[p] >= layout.N) continue;
    io_t* row = grad_qkv + (b * layout.N + slots[p]) * layout.token_stride + h * d;
    store_row(grad_k + p * d, row + layout.heads * d, d, acc_t(1));
    store_row(grad_v + p * d, row + 2 * layout.heads * d, d, acc_t(1));
  }
}

// dS = P * (dP - rowsum(P * dP)) * scale, row by row in place of dP (c x m, both leading dimension m)
template <typename acc_t>
inline void softmax_gradient(const acc_t* probs, acc_t* grad_s, int64_t c, int64_t m, acc_t scale) {
  using Vec = Vectorized<acc_t>;
  for (int64_t r = 0; r < c; ++r) {
    const acc_t* p_row = probs + r * m;
    acc_t* s_row = grad_s + r * m;
    const acc_t rowsum = at::vec::map2_reduce_all<acc_t>([](Vec p, Vec s) { return p * s; },
                                                         [](Vec a, Vec b) { return a + b; }, p_row, s_row, m);
    at::vec::map2<acc_t>([rowsum, scale](Vec p, Vec s) { return p * (s - Vec(rowsum)) * Vec(scale); }, s_row, p_row,
                         s_row, m);
  }
}

// the products' register blocks: 4 query rows by 3 vectors of keys, 3 rows by 4 vectors of the head dimension
constexpr int64_t kKeyRows = 4, kKeyVectors = 3, kHeadRows = 3, kHeadVectors = 4;

// The attention of every group in vector registers (at::vec), in float32 for float32, bf16 and fp16 inputs (the
// half-precision rows are converted as they are gathered) and in float64 for float64.
template <typename io_t>
struct Forward {
  using acc_t = at::opmath_type<io_t>;
  const Layout& layout;
  const io_t* qkv;
  io_t* out;
  acc_t scale;

  // q and v rows of the group's slots, its keys transposed (d x slots: the logits' product reads key columns as
  // vectors), one cluster's logits and output; padded for the products' reads past a row's end
  struct State {
    std::vector<acc_t> q, k_t, v, logits, o, inv;
    std::vector<int64_t> masked;
  };

  State make_state() const {
    const int64_t pad = kHeadVectors * Vectorized<acc_t>::size(), G = layout.group_slots, d = layout.d;
    const int64_t c = layout.cluster_size;
    return State{std::vector<acc_t>(G * d + pad), std::vector<acc_t>(d * G + pad),
                 std::vector<acc_t>(G * d + pad), std::vector<acc_t>(c * layout.keys + pad),
                 std::vector<acc_t>(c * d + pad), std::vector<acc_t>(c), {}};
  }

  void finish() const {}

  void operator()(State& st, int64_t b, int64_t h, const int64_t* slots) const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys;
    for (int64_t p = 0; p < G; ++p) {
      load_row(qkv_row(qkv, layout, b, h, slots[p], 0), st.q.data() + p * d, d);
      const io_t* k_row = qkv_row(qkv, layout, b, h, slots[p], 1);
      for (int64_t i = 0; i < d; ++i) st.k_t[i * G + p] = static_cast<acc_t>(k_row[i]);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 2), st.v.data() + p * d, d);
    }
    for (int64_t cluster = 0; cluster < layout.clusters_per_group(); ++cluster) {
      const int64_t first_query = cluster * c, first_key = layout.first_key(cluster);
      masked_keys(layout, slots, first_key, st.masked);
      product<acc_t, kKeyRows, kKeyVectors>(st.q.data() + first_query * d, d, st.k_t.data() + first_key, G,
                                            st.logits.data(), m, c, m, d);
      unnormalised_softmax<acc_t>(st.logits.data(), m, c, m, scale, st.masked, st.inv.data());
      product<acc_t, kHeadRows, kHeadVectors>(st.logits.data(), m, st.v.data() + first_key * d, d, st.o.data(), d, c,
                                              d, m);
      write_query_rows(layout, slots + first_query, st.o.data(), st.inv.data(), out, layout.heads * d, b, h);
    }
  }
};

// The gradient of the attention with respect to q, k and v, recomputing each cluster's probabilities P (nothing is
// kept from the forward but its inputs): with dO the output's gradient, dP = dO V^T, dS = P * (dP - rowsum(P * dP))
// * scale (rowsum(P * dP) is rowsum(dO * O)), dQ = dS K, dK = dS^T Q and dV = P^T dO. A key row gets gradient from
// both clusters of its pair (the sibling's window overlaps it), all within the group: every real token's q, k and v
// gradient rows are written once, by the thread of its group, and ghost slots write nothing.
template <typename io_t>
struct Backward {
  using acc_t = at::opmath_type<io_t>;
  const Layout& layout;
  const io_t* qkv;
  const io_t* grad_out;
  io_t* grad_qkv;
  acc_t scale;

  struct State {
    std::vector<acc_t> q, k, k_t, v_t, grad_o, grad_k, grad_v, probs, grad_s, transposed, block, inv;
    std::vector<int64_t> masked;
  };

  State make_state() const {
    const int64_t pad = kHeadVectors * Vectorized<acc_t>::size(), G = layout.group_slots, d = layout.d;
    const int64_t c = layout.cluster_size, m = layout.keys;
    auto buffer = [](int64_t size) { return std::vector<acc_t>(size); };
    return State{buffer(G * d + pad), buffer(G * d + pad), buffer(d * G + pad), buffer(d * G + pad),
                 buffer(G * d + pad), buffer(G * d),       buffer(G * d),       buffer(c * m + pad),
                 buffer(c * m + pad), buffer(m * c),       buffer(m * d + pad), buffer(c),
                 {}};
  }

  void finish() const {}

  void operator()(State& st, int64_t b, int64_t h, const int64_t* slots) const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys, N = layout.N;
    for (int64_t p = 0; p < G; ++p) {
      load_row(qkv_row(qkv, layout, b, h, slots[p], 0), st.q.data() + p * d, d);
      const io_t* k_row = qkv_row(qkv, layout, b, h, slots[p], 1);
      const io_t* v_row = qkv_row(qkv, layout, b, h, slots[p], 2);
      load_row(k_row, st.k.data() + p * d, d);
      for (int64_t i = 0; i < d; ++i) {
        st.k_t[i * G + p] = static_cast<acc_t>(k_row[i]);
        st.v_t[i * G + p] = static_cast<acc_t>(v_row[i]);
      }
      // a ghost query's output was dropped: its gradient is zero
      acc_t* grad_o_row = st.grad_o.data() + p * d;
      if (slots[p] < N) {
        load_row(grad_out + ((b * N + slots[p]) * layout.heads + h) * d, grad_o_row, d);
      } else {
        std::fill(grad_o_row, grad_o_row + d, acc_t(0));
      }
    }
    std::fill(st.grad_k.begin(), st.grad_k.end(), acc_t(0));
    std::fill(st.grad_v.begin(), st.grad_v.end(), acc_t(0));
    for (int64_t cluster = 0; cluster < layout.clusters_per_group(); ++cluster) {
      const int64_t first_query = cluster * c, first_key = layout.first_key(cluster);
      masked_keys(layout, slots, first_key, st.masked);
      acc_t* probs = st.probs.data();
      acc_t* grad_s = st.grad_s.data();
      product<acc_t, kKeyRows, kKeyVectors>(st.q.data() + first_query * d, d, st.k_t.data() + first_key, G, probs, m,
                                            c, m, d);
      unnormalised_softmax<acc_t>(probs, m, c, m, scale, st.masked, st.inv.data());
      for (int64_t r = 0; r < c; ++r) copy_row(probs + r * m, probs + r * m, m, st.inv[r]);
      product<acc_t, kKeyRows, kKeyVectors>(st.grad_o.data() + first_query * d, d, st.v_t.data() + first_key, G,
                                            grad_s, m, c, m, d);
      softmax_gradient(probs, grad_s, c, m, scale);
      // dQ of the cluster's real queries, straight to their rows
      product<acc_t, kHeadRows, kHeadVectors>(grad_s, m, st.k.data() + first_key * d, d, st.block.data(), d, c, d, m);
      write_query_rows<acc_t>(layout, slots + first_query, st.block.data(), nullptr, grad_qkv, layout.token_stride, b,
                              h);
      // dV and dK of the window, added to the group's
      const std::pair<acc_t*, const acc_t*> to_window[2] = {{probs, st.grad_o.data()}, {grad_s, st.q.data()}};
      acc_t* window_grads[2] = {st.grad_v.data(), st.grad_k.data()};
      for (int64_t which = 0; which < 2; ++which) {
        transpose(to_window[which].first, m, st.transposed.data(), c, c, m);
        product<acc_t, kHeadRows, kHeadVectors>(st.transposed.data(), c, to_window[which].second + first_query * d, d,
                                                st.block.data(), d, m, d, c);
        acc_t* grads = window_grads[which] + first_key * d;
        for (int64_t i = 0; i < m * d; ++i) grads[i] += st.block[i];
      }
    }
    write_key_value_gradients(layout, slots, st.grad_k.data(), st.grad_v.data(), grad_qkv, b, h);
  }
};

#if BOATVIT_X86_VECTORS
// bf16 and fp16 on the CPU's matrix units (Intel AMX, through oneDNN's brgemm ukernel, as ATen's CPU flash attention
// uses them): the products read half-precision tiles and accumulate in float32; the softmax and its gradient run in
// float32 between them. The units read the right-hand matrix B (K x N) in the VNNI layout: rows paired, element
// (k, n) at (k / 2) * 2 * ldb + 2 * n + k % 2, with K even (an odd K gets a zero row).
//
// Whether this CPU has them for `dtype` (oneDNN's own test) and the AVX512 the softmax between them runs in; a head
// size must be even for the pairs.
inline bool matrix_units(at::ScalarType dtype, int64_t d) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && d % 2 == 0 && at::native::cpublas::could_pack(dtype) &&
         boatvit_avx512::cpu_has_avx512();
}

inline int64_t even(int64_t n) { return n + n % 2; }

// C (M x N, float32, ldc) = A (M x K, lda) @ B (VNNI, ldb), or C += A @ B when `add`
template <typename io_t>
inline void matrix_product(const io_t* A, int64_t lda, const io_t* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
                           int64_t N, int64_t K, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/true);
}

// rows x d rows (leading dimension ld) as B (K = rows, N = d) in the VNNI layout, ldb = d; an odd count gets a
// zero row
//
// A pair of rows at a time, as their 16-bit patterns: one interleaving loop the compiler turns into vector unpacks,
// where a row at a time left two passes of scattered scalar stores.
template <typename io_t>
inline void pack_rows(const io_t* rows_data, int64_t ld, int64_t rows, int64_t d, io_t* to) {
  static_assert(sizeof(io_t) == sizeof(uint16_t), "half-precision values only");
  const auto* from = reinterpret_cast<const uint16_t*>(rows_data);
  auto* out = reinterpret_cast<uint16_t*>(to);
  for (int64_t r = 0; r < rows; r += 2) {
    const uint16_t* __restrict__ even_row = from + r * ld;
    const uint16_t* __restrict__ odd_row = r + 1 < rows ? even_row + ld : nullptr;
    uint16_t* __restrict__ pair = out + r * d;
    if (odd_row) {
      for (int64_t i = 0; i < d; ++i) {
        pair[2 * i] = even_row[i];
        pair[2 * i + 1] = odd_row[i];
      }
    } else {
      for (int64_t i = 0; i < d; ++i) {
        pair[2 * i] = even_row[i];
        pair[2 * i + 1] = 0;  // io_t(0): +0.0 in bf16 and fp16
      }
    }
  }
}

// rows x cols float32 (leading dimension cols) into half-precision rows of leading dimension ld >= cols, zero padded
template <typename io_t>
inline void round_rows(const float* from, int64_t rows, int64_t cols, io_t* to, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::convert(from + r * cols, to + r * ld, cols);
    std::fill(to + r * ld + cols, to + (r + 1) * ld, io_t(0));
  }
}

using boatvit_avx512::exp_nonpositive;
using boatvit_avx512::first_lanes;
using boatvit_avx512::Combine;
using boatvit_avx512::lanes_combined;

// The softmax of the matrix units' route in 16-lane AVX512 vectors (avx512_vectors.h): every CPU with AMX has them,
// while the rest of the kernels keep the AVX2 vectors that fit the float32 route better. A row of 69 logits took
// four passes at 8 lanes with a horizontal reduction and a partial vector each (scale, max, exp, rounding): over a
// third of the bf16 forward. Here a row is two passes of 5 vectors, the scale folded into the exp's argument and the
// probabilities rounded to half precision as they are made.
// 16 floats rounded to nearest even in bf16 or fp16 (no NaN reaches here), as at::vec::convert rounds them
template <typename io_t>
BOATVIT_AVX512 inline __m256i round_half(__m512 x) {
  if constexpr (std::is_same_v<io_t, at::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  } else {
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// lanes of a row's logits s[j..j + 16) plus their key_bias (if any); -inf outside the lanes
BOATVIT_AVX512 inline __m512 biased_logits(const float* s, const float* key_bias, int64_t j, __mmask16 lanes) {
  const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lanes, s + j);
  return key_bias ? _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, key_bias + j)) : x;
}

// Row i of S (M x N float32, lds) becomes exp(scale * (s - max s)), with key_bias (N floats, 0 or -inf for a masked
// key; null when none is) added to s first; inv[i] is one over the row's sum. The exps go to P (M x ldp, ldp >= N,
// zero padded) rounded to half precision when P is given, else back to S in float32.
//
// Rows go 16 at a time: their maxima, then their sums, reduced across lanes together (lanes_combined) and the 16
// inverses taken by one division, where a row at a time spent a fifth of its time waiting on its own reductions and
// a scalar division.
template <typename io_t>
BOATVIT_AVX512 void exp_rows(float* S, int64_t lds, int64_t M, int64_t N, float scale, const float* key_bias, io_t* P,
                             int64_t ldp, float* inv) {
  const int64_t full = N / 16 * 16;
  const __mmask16 tail = first_lanes(N - full);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < M; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, M - i0);
    __m512 row[16];  // each row's lane maxima, then its lane sums; rows past M stay -inf, then 0
    for (int64_t r = 0; r < 16; ++r) {
      row[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      if (r >= rows) continue;
      const float* s = S + (i0 + r) * lds;
      for (int64_t j = 0; j < full; j += 16) row[r] = _mm512_max_ps(row[r], biased_logits(s, key_bias, j, 0xffff));
      if (tail) row[r] = _mm512_max_ps(row[r], biased_logits(s, key_bias, full, tail));
    }
    alignas(64) float shift[16];
    _mm512_store_ps(shift, _mm512_mul_ps(lanes_combined<Combine::max>(row), _mm512_set1_ps(-scale)));
    for (int64_t r = 0; r < 16; ++r) {
      row[r] = _mm512_setzero_ps();
      if (r >= rows) continue;
      const int64_t i = i0 + r;
      float* s = S + i * lds;
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 lanes = j < full ? static_cast<__mmask16>(0xffff) : tail;
        const __m512 e =
            exp_nonpositive(_mm512_fmadd_ps(biased_logits(s, key_bias, j, lanes), vscale, _mm512_set1_ps(shift[r])));
        row[r] = _mm512_add_ps(row[r], e);  // lanes past N hold exp(-inf) = 0
        if (P) {
          _mm256_mask_storeu_epi16(P + i * ldp + j, lanes, round_half<io_t>(e));
        } else {
          _mm512_mask_storeu_ps(s + j, lanes, e);
        }
      }
      for (int64_t j = N; P && j < ldp; ++j) P[i * ldp + j] = io_t(0);
    }
    const __m512 inverses = _mm512_div_ps(_mm512_set1_ps(1.f), lanes_combined<Combine::sum>(row));
    _mm512_mask_storeu_ps(inv + i0, first_lanes(rows), inverses);
  }
}

// 16 x 16 floats transposed in registers: x[k] holds row k on the way in and column k on the way out (32-bit then
// 64-bit unpacks within 128-bit lanes, then two rounds of 128-bit lane shuffles)
BOATVIT_AVX512 inline void transpose_16x16(__m512 x[16]) {
  __m512 t[16];
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(x[k], x[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(x[k], x[k + 1]);
  }
  // u[4g + x] holds, in 128-bit lane l, column 4l + x of rows 4g..4g + 3
  __m512 u[16];
  for (int g = 0; g < 16; g += 4) {
    const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 even_low = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
    const __m512 odd_low = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
    const __m512 even_high = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
    const __m512 odd_high = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    x[k] = _mm512_shuffle_f32x4(even_low, even_high, 0x88);
    x[4 + k] = _mm512_shuffle_f32x4(odd_low, odd_high, 0x88);
    x[8 + k] = _mm512_shuffle_f32x4(even_low, even_high, 0xdd);
    x[12 + k] = _mm512_shuffle_f32x4(odd_low, odd_high, 0xdd);
  }
}

// rows x cols float32 (leading dimension cols) transposed into half precision, cols x ld with ld >= rows, zero
// padded: in 16 x 16 blocks, where a scalar loop (a rounding and a scattered store per value) took a third of the
// bf16 backward
template <typename io_t>
BOATVIT_AVX512 void round_transposed(const float* from, int64_t rows, int64_t cols, io_t* to, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += 16) {
    // block rows past `rows` are zeros, which fill the padding
    const int64_t block_rows = std::max<int64_t>(0, std::min<int64_t>(16, rows - i0));
    const __mmask16 stored = first_lanes(ld - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int64_t block_cols = std::min<int64_t>(16, cols - j0);
      const __mmask16 loaded = first_lanes(block_cols);
      __m512 x[16];
      for (int64_t k = 0; k < 16; ++k) {
        x[k] = k < block_rows ? _mm512_maskz_loadu_ps(loaded, from + (i0 + k) * cols + j0) : _mm512_setzero_ps();
      }
      transpose_16x16(x);
      for (int64_t k = 0; k < block_cols; ++k) {
        _mm256_mask_storeu_epi16(to + (j0 + k) * ld + i0, stored, round_half<io_t>(x[k]));
      }
    }
  }
}

// write_query_rows of the matrix units' route: each row scaled and rounded in 16-lane vectors on its way to the
// token's row, where the AVX2 route scaled it in place, then converted it in a second pass
template <typename io_t>
BOATVIT_AVX512 void write_rounded_rows(const Layout& layout, const int64_t* query_slots, const float* rows,
                                       const float* factors, io_t* to, int64_t token_stride, int64_t b, int64_t h) {
  const int64_t d = layout.d;
  for (int64_t r = 0; r < layout.cluster_size; ++r) {
    const int64_t token = query_slots[r];
    if (token >= layout.N) continue;  // a ghost query: dropped
    const __m512 factor = _mm512_set1_ps(factors ? factors[r] : 1.f);
    io_t* row = to + (b * layout.N + token) * token_stride + h * d;
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 lanes = first_lanes(d - j);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, rows + r * d + j), factor);
      _mm256_mask_storeu_epi16(row + j, lanes, round_half<io_t>(x));
    }
  }
}

// The rows (G x d, d even) as the VNNI columns of B (K = d, N = G, ldb = G): row p's pairs (row[2j], row[2j + 1])
// land whole at (j * G + p) * 2, so this is a transpose of the rows seen as G x d / 2 32-bit pairs, 16 x 16 pairs
// in registers at a time (bit patterns only move). A pair at a time (pack_column) was a scattered 4-byte store each.
// Its block loop is round_transposed's with another store: one loop taking the store as a functor measured the bf16
// backward 2-3 % slower, so each keeps its own.
template <typename io_t>
BOATVIT_AVX512 void pack_columns(const io_t* rows, int64_t G, int64_t d, io_t* to) {
  const int64_t pairs = d / 2;
  const auto* from = reinterpret_cast<const float*>(rows);  // a pair of half-precision values as one 32-bit lane
  auto* out = reinterpret_cast<float*>(to);
  for (int64_t p0 = 0; p0 < G; p0 += 16) {
    const int64_t block_rows = std::min<int64_t>(16, G - p0);
    const __mmask16 stored = first_lanes(block_rows);
    for (int64_t j0 = 0; j0 < pairs; j0 += 16) {
      const int64_t block_pairs = std::min<int64_t>(16, pairs - j0);
      const __mmask16 loaded = first_lanes(block_pairs);
      __m512 x[16];
      for (int64_t k = 0; k < 16; ++k) {
        x[k] = k < block_rows ? _mm512_maskz_loadu_ps(loaded, from + (p0 + k) * pairs + j0) : _mm512_setzero_ps();
      }
      transpose_16x16(x);
      for (int64_t k = 0; k < block_pairs; ++k) _mm512_mask_storeu_ps(out + (j0 + k) * G + p0, stored, x[k]);
    }
  }
}

// key_bias of exp_rows for a cluster's masked key columns, or null when it has none
inline const float* key_bias(const std::vector<int64_t>& masked, int64_t m, std::vector<float>& bias) {
  if (masked.empty()) return nullptr;
  bias.assign(m, 0.f);
  for (const int64_t column : masked) bias[column] = -std::numeric_limits<float>::infinity();
  return bias.data();
}

template <typename io_t>
struct MatrixForward {
  const Layout& layout;
  const io_t* qkv;
  io_t* out;
  float scale;

  // the group's q and v rows and its keys as the VNNI columns of QK^T's B (ldb = group slots), one cluster's values
  // as P V's B, its logits, its probabilities rounded, its output
  struct State {
    std::vector<io_t> q, k, k_packed, v, v_packed, probs;
    std::vector<float> logits, o, inv, bias;
    std::vector<int64_t> masked;
  };

  State make_state() const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys;
    return State{std::vector<io_t>(G * d),
                 std::vector<io_t>(G * d),
                 std::vector<io_t>(d * G),
                 std::vector<io_t>(G * d),
                 std::vector<io_t>(even(m) * d), std::vector<io_t>(c * even(m)),
                 std::vector<float>(c * m + kHeadVectors * Vectorized<float>::size()), std::vector<float>(c * d),
                 std::vector<float>(c), {}, {}};
  }

  void finish() const { at::native::cpublas::brgemm_release(); }

  void operator()(State& st, int64_t b, int64_t h, const int64_t* slots) const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys;
    for (int64_t p = 0; p < G; ++p) {
      prefetch_slot<io_t>(qkv, nullptr, layout, b, h, slots, p);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 0), st.q.data() + p * d, d);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 1), st.k.data() + p * d, d);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 2), st.v.data() + p * d, d);
    }
    pack_columns(st.k.data(), G, d, st.k_packed.data());
    for (int64_t cluster = 0; cluster < layout.clusters_per_group(); ++cluster) {
      const int64_t first_query = cluster * c, first_key = layout.first_key(cluster);
      masked_keys(layout, slots, first_key, st.masked);
      matrix_product(st.q.data() + first_query * d, d, st.k_packed.data() + 2 * first_key, G, st.logits.data(), m, c,
                     m, d, false);
      exp_rows<io_t>(st.logits.data(), m, c, m, scale, key_bias(st.masked, m, st.bias), st.probs.data(), even(m),
                     st.inv.data());
      pack_rows(st.v.data() + first_key * d, d, m, d, st.v_packed.data());
      matrix_product(st.probs.data(), even(m), st.v_packed.data(), d, st.o.data(), d, c, d, even(m), false);
      write_rounded_rows(layout, slots + first_query, st.o.data(), st.inv.data(), out, layout.heads * d, b, h);
    }
  }
};

// Backward's products on the matrix units: S = Q K^T and dP = dO V^T read K and V as VNNI columns; dQ = dS K reads
// the window's keys as VNNI rows; dK += dS^T Q and dV += P^T dO read the cluster's q and dO rows as VNNI rows and
// accumulate in float32.
template <typename io_t>
struct MatrixBackward {
  const Layout& layout;
  const io_t* qkv;
  const io_t* grad_out;
  io_t* grad_qkv;
  float scale;

  struct State {
    std::vector<io_t> q, k, k_packed, v, v_packed, grad_o, rounded, rhs;
    std::vector<float> probs, grad_s, block, grad_k, grad_v, inv, bias;
    std::vector<int64_t> masked;
  };

  State make_state() const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys;
    const int64_t pad = kHeadVectors * Vectorized<float>::size();
    auto half = [](int64_t size) { return std::vector<io_t>(size); };
    auto single = [](int64_t size) { return std::vector<float>(size); };
    return State{half(G * d),
                 half(G * d),
                 half(d * G),
                 half(G * d),
                 half(d * G),
                 half(G * d),
                 half(std::max(c * even(m), m * even(c))),
                 half(std::max(even(m), even(c)) * d),
                 single(c * m + pad),
                 single(c * m + pad),
                 single(c * d),
                 single(G * d),
                 single(G * d),
                 single(c),
                 {},
                 {}};
  }

  void finish() const { at::native::cpublas::brgemm_release(); }

  void operator()(State& st, int64_t b, int64_t h, const int64_t* slots) const {
    const int64_t G = layout.group_slots, d = layout.d, c = layout.cluster_size, m = layout.keys, N = layout.N;
    for (int64_t p = 0; p < G; ++p) {
      prefetch_slot(qkv, grad_out, layout, b, h, slots, p);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 0), st.q.data() + p * d, d);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 1), st.k.data() + p * d, d);
      load_row(qkv_row(qkv, layout, b, h, slots[p], 2), st.v.data() + p * d, d);
      // a ghost query's output was dropped: its gradient is zero
      io_t* grad_o_row = st.grad_o.data() + p * d;
      if (slots[p] < N) {
        load_row(grad_out + ((b * N + slots[p]) * layout.heads + h) * d, grad_o_row, d);
      } else {
        std::fill(grad_o_row, grad_o_row + d, io_t(0));
      }
    }
    pack_columns(st.k.data(), G, d, st.k_packed.data());
    pack_columns(st.v.data(), G, d, st.v_packed.data());
    std::fill(st.grad_k.begin(), st.grad_k.end(), 0.f);
    std::fill(st.grad_v.begin(), st.grad_v.end(), 0.f);
    for (int64_t cluster = 0; cluster < layout.clusters_per_group(); ++cluster) {
      const int64_t first_query = cluster * c, first_key = layout.first_key(cluster);
      masked_keys(layout, slots, first_key, st.masked);
      float* probs = st.probs.data();
      float* grad_s = st.grad_s.data();
      matrix_product(st.q.data() + first_query * d, d, st.k_packed.data() + 2 * first_key, G, probs, m, c, m, d, false);
      exp_rows<io_t>(probs, m, c, m, scale, key_bias(st.masked, m, st.bias), nullptr, 0, st.inv.data());
      for (int64_t r = 0; r < c; ++r) copy_row(probs + r * m, probs + r * m, m, st.inv[r]);
      matrix_product(st.grad_o.data() + first_query * d, d, st.v_packed.data() + 2 * first_key, G, grad_s, m, c, m, d,
                     false);
      softmax_gradient(probs, grad_s, c, m, scale);
      // dQ of the cluster's real queries, straight to their rows
      round_rows(grad_s, c, m, st.rounded.data(), even(m));
      pack_rows(st.k.data() + first_key * d, d, m, d, st.rhs.data());
      matrix_product(st.rounded.data(), even(m), st.rhs.data(), d, st.block.data(), d, c, d, even(m), false);
      write_rounded_rows(layout, slots + first_query, st.block.data(), nullptr, grad_qkv, layout.token_stride, b, h);
      // dV and dK of the window, added to the group's
      const std::pair<const float*, const io_t*> to_window[2] = {{probs, st.grad_o.data()}, {grad_s, st.q.data()}};
      float* window_grads[2] = {st.grad_v.data(), st.grad_k.data()};
      for (int64_t which = 0; which < 2; ++which) {
        round_transposed(to_window[which].first, c, m, st.rounded.data(), even(c));
        pack_rows(to_window[which].second + first_query * d, d, c, d, st.rhs.data());
        matrix_product(st.rounded.data(), even(c), st.rhs.data(), d, window_grads[which] + first_key * d, d, m, d,
                       even(c), true);
      }
    }
    write_key_value_gradients(layout, slots, st.grad_k.data(), st.grad_v.data(), grad_qkv, b, h);
  }
};

#endif  // BOATVIT_X86_VECTORS

void check_arguments(const at::Tensor& qkv, const at::Tensor& order, int64_t cluster_size, int64_t num_clusters,
                     int64_t overlap) {
  TORCH_CHECK(qkv.device().is_cpu() && order.device().is_cpu(), "cluster_attention: CPU tensors only");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "cluster_attention: qkv must be float64, float32, bfloat16 or float16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.is_contiguous(),
              "cluster_attention: qkv must be a contiguous (B, N, 3, heads, head_dim) tensor, got sizes ",
              qkv.sizes());
  TORCH_CHECK(order.dim() == 3 && order.scalar_type() == at::kLong && order.is_contiguous() &&
                  order.size(0) == qkv.size(0) && order.size(1) == qkv.size(3),
              "cluster_attention: order must be a contiguous int64 (B, heads, n_pad) tensor of qkv's B and heads");
  const int64_t n_pad = order.size(2);
  TORCH_CHECK(cluster_size >= 1 && num_clusters >= 1 && (num_clusters == 1 || num_clusters % 2 == 0) &&
                  num_clusters * cluster_size == n_pad && n_pad >= qkv.size(1) &&
                  (num_clusters == 1 || (overlap >= 0 && overlap < cluster_size)),
              "cluster_attention: (cluster_size, num_clusters, overlap) = (", cluster_size, ", ", num_clusters, ", ",
              overlap, ") is not a cluster layout of the N tokens and the order's n_pad");
}

at::Tensor cluster_attention(const at::Tensor& qkv, const at::Tensor& order, int64_t cluster_size,
                             int64_t num_clusters, int64_t overlap, double scale) {
  check_arguments(qkv, order, cluster_size, num_clusters, overlap);
  auto out = at::empty({qkv.size(0), qkv.size(1), qkv.size(3) * qkv.size(4)}, qkv.options());
  if (qkv.size(1) == 0) return out;
  const Layout layout(qkv, order, cluster_size, num_clusters, overlap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "cluster_attention", [&] {
#if BOATVIT_X86_VECTORS
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      if (matrix_units(qkv.scalar_type(), layout.d)) {
        const MatrixForward<scalar_t> forward{layout, qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                              static_cast<float>(scale)};
        for_each_group(layout, order, forward);
        return;
      }
    }
#endif
    const Forward<scalar_t> forward{layout, qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                    static_cast<at::opmath_type<scalar_t>>(scale)};
    for_each_group(layout, order, forward);
  });
  return out;
}

at::Tensor cluster_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& order,
                                      int64_t cluster_size, int64_t num_clusters, int64_t overlap, double scale) {
  check_arguments(qkv, order, cluster_size, num_clusters, overlap);
  TORCH_CHECK(grad_out.scalar_type() == qkv.scalar_type() && grad_out.is_contiguous() &&
                  grad_out.sizes() == at::IntArrayRef({qkv.size(0), qkv.size(1), qkv.size(3) * qkv.size(4)}),
              "cluster_attention_backward: grad_out must be a contiguous (B, N, heads * head_dim) tensor of qkv's "
              "dtype");
  auto grad_qkv = at::empty_like(qkv);
  if (qkv.size(1) == 0) return grad_qkv;
  const Layout layout(qkv, order, cluster_size, num_clusters, overlap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "cluster_attention_backward", [&] {
#if BOATVIT_X86_VECTORS
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      if (matrix_units(qkv.scalar_type(), layout.d)) {
        const MatrixBackward<scalar_t> backward{layout, qkv.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                                grad_qkv.data_ptr<scalar_t>(), static_cast<float>(scale)};
        for_each_group(layout, order, backward);
        return;
      }
    }
#endif
    const Backward<scalar_t> backward{layout, qkv.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                      grad_qkv.data_ptr<scalar_t>(), static_cast<at::opmath_type<scalar_t>>(scale)};
    for_each_group(layout, order, backward);
  });
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(boatvit, m) {
  m.def(
      "cluster_attention(Tensor qkv, Tensor order, int cluster_size, int num_clusters, int overlap, float scale) -> "
      "Tensor");
  m.impl("cluster_attention", c10::DispatchKey::CPU, &cluster_attention);
  m.def(
      "cluster_attention_backward(Tensor grad_out, Tensor qkv, Tensor order, int cluster_size, int num_clusters, "
      "int overlap, float scale) -> Tensor");
  m.impl("cluster_attention_backward", c10::DispatchKey::CPU, &cluster_attention_backward);
  // whether bf16 or fp16 (B, N, 3, heads, head_dim) inputs run on the CPU's matrix units: for the benchmarks' records
  m.def("cluster_attention_matrix_units(ScalarType dtype, int head_dim) -> bool",
        []([[maybe_unused]] at::ScalarType dtype, [[maybe_unused]] int64_t head_dim) {
#if BOATVIT_X86_VECTORS
          return matrix_units(dtype, head_dim);
#else
          return false;
#endif
        });
}
