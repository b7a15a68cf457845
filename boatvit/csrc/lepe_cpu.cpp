// FSLA's LePE term added to its attention output in one pass, for CPU inference: out + dwconv3x3(V) + bias, V read
// straight from the packed qkv projection. The route it replaces (boatvit/fsla.py, FeatureSpaceAttention.forward:
// V copied out of qkv, the depthwise conv, an add into the output; its oracle and the route wherever autograd
// records) makes three passes over memory and writes two intermediate images; here V is read once, the output read
// once and the sum written once, rounded once to the output's dtype.
//
// A thread takes consecutive rows of the token grid and keeps the three rows of V its row's taps read as float
// rows padded with a zero column at each end (so no tap tests the image's left and right edges); moving to the next
// row converts one new row of V. The sum runs over the channels in vectors, the nine taps of a channel vector in
// registers.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using at::vec::Vectorized;

// A row of n values of `from` into float (or double) values of `to`.
template <typename from_t, typename to_t>
inline void convert_row(const from_t* from, to_t* to, int64_t n) {
  if constexpr (std::is_same_v<from_t, to_t>) {
    std::copy(from, from + n, to);
  } else {
    at::vec::convert(from, to, n);
  }
}

template <typename io_t>
void add_lepe_rows(const io_t* out, const io_t* qkv, const at::opmath_type<io_t>* taps,
                   const at::opmath_type<io_t>* bias, io_t* result, int64_t B, int64_t H, int64_t W, int64_t C) {
  using acc_t = at::opmath_type<io_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t token_stride = 3 * C, row_width = (W + 2) * C;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // rows[i] holds V's grid row y - 1 + i of the current output row y, zero where that row is outside the image
    std::vector<acc_t> buffer(3 * row_width + Vec::size(), acc_t(0));
    acc_t* rows[3] = {buffer.data(), buffer.data() + row_width, buffer.data() + 2 * row_width};
    std::vector<acc_t> sums(row_width);  // a grid row's outputs in the accumulation's dtype (half precision only)
    int64_t loaded = -2;  // the (image * H + y) that rows[1] holds, or none
    auto load = [&](acc_t* to, int64_t b, int64_t y) {
      if (y < 0 || y >= H) {
        std::fill(to, to + row_width, acc_t(0));
        return;
      }
      // V of token (b, y, x) starts at ((b * H + y) * W + x) * 3C + 2C; columns 0 and W + 1 stay zero
      const io_t* v = qkv + ((b * H + y) * W) * token_stride + 2 * C;
      for (int64_t x = 0; x < W; ++x) convert_row(v + x * token_stride, to + (x + 1) * C, C);
    };
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      if (loaded + 1 == row && row % H != 0) {
        std::swap(rows[0], rows[1]);
        std::swap(rows[1], rows[2]);
        load(rows[2], b, y + 1);
      } else {
        for (int64_t i = 0; i < 3; ++i) load(rows[i], b, y - 1 + i);
      }
      loaded = row;
      // the grid row's W output rows lie together: read (converted) at once, the term added, rounded once
      const int64_t first = (b * H + y) * W * C;
      const acc_t* o;
      acc_t* r;
      if constexpr (std::is_same_v<io_t, acc_t>) {
        o = out + first;
        r = result + first;
      } else {
        at::vec::convert(out + first, sums.data(), W * C);
        o = r = sums.data();
      }
      // a vector of channels at a time along the row, its nine taps and bias held in registers
      for (int64_t c = 0; c < C; c += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - c);
        Vec tap[9];
        for (int64_t k = 0; k < 9; ++k) tap[k] = Vec::loadu(taps + k * C + c, n);
        const Vec shift = Vec::loadu(bias + c, n);
        for (int64_t x = 0; x < W; ++x) {
          Vec acc = Vec::loadu(o + x * C + c, n) + shift;
          for (int64_t dy = 0; dy < 3; ++dy) {
            const acc_t* v = rows[dy] + x * C + c;  // column x - 1 of the grid is column x of the padded row
            for (int64_t dx = 0; dx < 3; ++dx) acc = at::vec::fmadd(tap[dy * 3 + dx], Vec::loadu(v + dx * C, n), acc);
          }
          acc.store(r + x * C + c, n);
        }
      }
      if constexpr (!std::is_same_v<io_t, acc_t>) at::vec::convert(sums.data(), result + first, W * C);
    }
  });
}

// out (B, N, C) + the LePE of V: out[b, t, c] + bias[c] + sum over the 3 x 3 taps of weight[c, 0, dy, dx] *
// V[b, t + (dy - 1) W + (dx - 1), c] on the H x W grid with zero padding, V = qkv[:, :, 2] of qkv (B, N, 3, heads, d),
// C = heads * d. float64, float32, bf16 or fp16 out and qkv (the same dtype); the weight (C, 1, 3, 3) and bias (C)
// of any floating dtype, taken in the accumulation's (float64 for float64, else float32).
at::Tensor add_lepe(const at::Tensor& out, const at::Tensor& qkv, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, int64_t H, int64_t W) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.is_contiguous() && qkv.device().is_cpu(),
              "boatvit add_lepe: qkv must be a contiguous CPU tensor (B, N, 3, heads, head_dim)");
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(3) * qkv.size(4);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == N && out.size(2) == C && out.is_contiguous() &&
                  out.scalar_type() == qkv.scalar_type() && out.device().is_cpu(),
              "boatvit add_lepe: out must be a contiguous CPU tensor (B, N, heads * head_dim) of qkv's dtype");
  TORCH_CHECK(H >= 1 && W >= 1 && H * W == N, "boatvit add_lepe: the H x W grid must hold the N tokens");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3 && weight.device().is_cpu(),
              "boatvit add_lepe: weight must be the depthwise 3x3 kernel (C, 1, 3, 3) of a CPU conv");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == C && bias->device().is_cpu()),
              "boatvit add_lepe: bias must be (C,) on the CPU, or None");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "boatvit add_lepe: qkv must be float64, float32, bfloat16 or float16, got ", dtype);
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // the taps as (9, C): tap k of every channel in a row, read by channel vectors
  const at::Tensor taps = weight.to(acc_dtype).reshape({C, 9}).t().contiguous();
  const at::Tensor shift = bias ? bias->to(acc_dtype).contiguous() : at::zeros({C}, weight.options().dtype(acc_dtype));
  at::Tensor result = at::empty_like(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "boatvit_add_lepe", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    add_lepe_rows<scalar_t>(out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), taps.data_ptr<acc_t>(),
                            shift.data_ptr<acc_t>(), result.data_ptr<scalar_t>(), B, H, W, C);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(boatvit, m) {
  m.def("add_lepe(Tensor out, Tensor qkv, Tensor weight, Tensor? bias, int H, int W) -> Tensor");
  m.impl("add_lepe", c10::DispatchKey::CPU, &add_lepe);
}
