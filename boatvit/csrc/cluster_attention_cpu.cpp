// FSLA's attention inside clusters for CPU inference, fused: the route of boatvit/fsla.py
// (_attend_in_clusters: a row gather into clustered order, attention on every cluster, a row gather back to token
// order), which stays its fallback and its test oracle.
//
// That route writes q, k and v in clustered order, the logits and the probabilities of every cluster and the
// clustered output to memory, and reads each back: several passes over tens of MB per layer at BOAT's first stage,
// on top of the two gathers' random reads. Here every sibling pair of clusters of one (image, head) is handled by
// one thread from start to end: its q, k and v rows are gathered straight from the packed qkv projection into
// buffers that stay in the core's cache, both clusters attend there (two small matrix products and a softmax), and
// each query's output row is written straight to its token's place in the output. Only the compulsory traffic
// reaches memory: q, k and v read once, the output written once.
//
// Layout (boatvit.clustering.ClusterLayout): the padded clustered order holds num_clusters clusters of cluster_size
// slots; a ghost slot holds an index >= N (it reads the last real token, is masked as a key and its output is
// dropped). With one cluster it attends to itself; otherwise cluster 2j attends to the cluster_size + overlap slots
// from its start, cluster 2j + 1 to those ending at its end: both windows lie in the pair's 2 * cluster_size slots.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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
template <typename scalar_t>
void unnormalised_softmax(scalar_t* S, int64_t lds, int64_t M, int64_t N, scalar_t scale,
                          const std::vector<int64_t>& masked, scalar_t* inv) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < M; ++i) {
    scalar_t* s = S + i * lds;
    int64_t j = 0;
    for (; j + L <= N; j += L) (Vec::loadu(s + j) * Vec(scale)).store(s + j);
    for (; j < N; ++j) s[j] *= scale;
    for (const int64_t column : masked) s[column] = minus_inf;
    Vec vmax(minus_inf);
    for (j = 0; j + L <= N; j += L) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
    scalar_t row_max = lanes_reduce<scalar_t>(vmax, true);
    for (; j < N; ++j) row_max = std::max(row_max, s[j]);
    Vec vsum(scalar_t(0));
    for (j = 0; j + L <= N; j += L) {
      const Vec e = vector_exp<scalar_t>(Vec::loadu(s + j) - Vec(row_max));
      e.store(s + j);
      vsum = vsum + e;
    }
    scalar_t sum = lanes_reduce<scalar_t>(vsum, false);
    for (; j < N; ++j) {
      s[j] = std::exp(s[j] - row_max);
      sum += s[j];
    }
    inv[i] = scalar_t(1) / sum;
  }
}

template <typename scalar_t>
void attend(const at::Tensor& qkv, const at::Tensor& order, at::Tensor& out, int64_t cluster_size,
            int64_t num_clusters, int64_t overlap, double scale_value) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  // the products' register blocks: 4 query rows by 3 vectors of keys, 3 rows by 4 vectors of the head dimension
  constexpr int64_t kKeyVectors = 3, kValueVectors = 4, kPad = 4 * L;
  const int64_t B = qkv.size(0), N = qkv.size(1), heads = qkv.size(3), d = qkv.size(4), n_pad = order.size(2);
  const bool one_cluster = num_clusters == 1;
  const int64_t groups = one_cluster ? 1 : num_clusters / 2;  // a group: one sibling pair, or the single cluster
  const int64_t group_slots = one_cluster ? n_pad : 2 * cluster_size;
  const int64_t keys = one_cluster ? n_pad : cluster_size + overlap;
  const int64_t token_stride = 3 * heads * d;
  const scalar_t scale = static_cast<scalar_t>(scale_value);
  const scalar_t* qkv_data = qkv.data_ptr<scalar_t>();
  const int64_t* order_data = order.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  std::atomic<bool> bad_order{false};

  at::parallel_for(0, B * heads * groups, 1, [&](int64_t begin, int64_t end) {
    // q and v rows of the group's slots, its keys transposed (d x slots: the logits' product reads key columns
    // as vectors), one cluster's logits and output; padded for the products' reads past a row's end
    std::vector<scalar_t> q(group_slots * d), k_t(d * group_slots + kPad), v(group_slots * d + kPad);
    std::vector<scalar_t> logits(cluster_size * keys + kPad), o(cluster_size * d + kPad), inv(cluster_size);
    std::vector<int64_t> masked;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / groups, group = task % groups, b = bh / heads, h = bh % heads;
      const int64_t* slots = order_data + bh * n_pad + group * group_slots;
      for (int64_t p = 0; p < group_slots; ++p) {
        if (slots[p] < 0 || slots[p] >= n_pad) {
          bad_order = true;
          return;
        }
        const scalar_t* q_row = qkv_data + (b * N + std::min(slots[p], N - 1)) * token_stride + h * d;
        const scalar_t* k_row = q_row + heads * d;
        const scalar_t* v_row = k_row + heads * d;
        std::copy(q_row, q_row + d, q.data() + p * d);
        for (int64_t i = 0; i < d; ++i) k_t[i * group_slots + p] = k_row[i];
        std::copy(v_row, v_row + d, v.data() + p * d);
      }
      for (int64_t cluster = 0; cluster < (one_cluster ? 1 : 2); ++cluster) {
        const int64_t first_query = cluster * cluster_size, first_key = cluster == 0 ? 0 : cluster_size - overlap;
        masked.clear();
        for (int64_t j = 0; j < keys; ++j) {
          if (slots[first_key + j] >= N) masked.push_back(j);
        }
        product<scalar_t, 4, kKeyVectors>(q.data() + first_query * d, d, k_t.data() + first_key, group_slots,
                                          logits.data(), keys, cluster_size, keys, d);
        unnormalised_softmax<scalar_t>(logits.data(), keys, cluster_size, keys, scale, masked, inv.data());
        product<scalar_t, 3, kValueVectors>(logits.data(), keys, v.data() + first_key * d, d, o.data(), d,
                                            cluster_size, d, keys);
        for (int64_t r = 0; r < cluster_size; ++r) {
          const int64_t token = slots[first_query + r];
          if (token >= N) continue;  // a ghost query: dropped
          scalar_t* out_row = out_data + ((b * N + token) * heads + h) * d;
          const scalar_t* o_row = o.data() + r * d;
          int64_t i = 0;
          for (; i + L <= d; i += L) (Vec::loadu(o_row + i) * Vec(inv[r])).store(out_row + i);
          for (; i < d; ++i) out_row[i] = o_row[i] * inv[r];
        }
      }
    }
  });
  TORCH_CHECK(!bad_order, "cluster_attention: order holds a slot index outside [0, n_pad)");
}

at::Tensor cluster_attention(const at::Tensor& qkv, const at::Tensor& order, int64_t cluster_size,
                             int64_t num_clusters, int64_t overlap, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && order.device().is_cpu(), "cluster_attention: CPU tensors only");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble,
              "cluster_attention: qkv must be float32 or float64, got ", qkv.scalar_type());
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
  auto out = at::empty({qkv.size(0), qkv.size(1), qkv.size(3) * qkv.size(4)}, qkv.options());
  if (qkv.size(1) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "cluster_attention", [&] {
    attend<scalar_t>(qkv, order, out, cluster_size, num_clusters, overlap, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(boatvit, m) {
  m.def(
      "cluster_attention(Tensor qkv, Tensor order, int cluster_size, int num_clusters, int overlap, float scale) -> "
      "Tensor");
  m.impl("cluster_attention", c10::DispatchKey::CPU, &cluster_attention);
}
