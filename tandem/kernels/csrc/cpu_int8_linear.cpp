// Weight-only int8 linear for the CPU: y[M, N] = x[M, K] @ (q[N, K] * scale[N]).T (+ bias), with
// fp32 activations and fp32 accumulation (the reference is tandem.kernels.quant.int8_linear_ref).
//
// Work is split over blocks of kRows output channels. A block's int8 weights are widened to fp32 a
// K-chunk at a time into a small buffer that stays in L1, and every row of x is multiplied against
// it there: the widening costs once per weight element whatever M is, and the weights stream from
// memory at a quarter of fp32's bytes, which is what a decode step (a few rows) is bound by.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kRows = 8;     // output channels per block: 8 accumulators, the weights read from L1
constexpr int64_t kChunk = 512;  // K per widened chunk: kRows x 512 x 4 B = 16 KiB, within L1

// out[j] += x[0:n] . w[j][0:n] for R rows of the block; n is a multiple of the vector width. R is a
// compile-time constant so that the R accumulators live in registers.
template <int64_t R>
inline void dot_rows(const float* x, const float* w, int64_t ld, int64_t n, float* out) {
  Vec acc[R];
  for (int64_t j = 0; j < R; ++j) acc[j] = Vec(0.f);
  for (int64_t k = 0; k < n; k += kW) {
    const Vec xv = Vec::loadu(x + k);
    for (int64_t j = 0; j < R; ++j) acc[j] = at::vec::fmadd(xv, Vec::loadu(w + j * ld + k), acc[j]);
  }
  for (int64_t j = 0; j < R; ++j) out[j] += at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc[j]);
}

inline void dot_block(const float* x, const float* w, int64_t ld, int64_t rows, int64_t n, float* out) {
  if (rows == kRows) {
    dot_rows<kRows>(x, w, ld, n, out);
    return;
  }
  for (int64_t j = 0; j < rows; ++j) dot_rows<1>(x, w + j * ld, ld, n, out + j);  // the last, partial block
}

void linear_block(const float* x, const int8_t* q, int64_t m_rows, int64_t k_dim, int64_t n0, int64_t rows,
                  float* y, int64_t n_dim, std::vector<float>& wbuf) {
  for (int64_t k0 = 0; k0 < k_dim; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, k_dim - k0);
    const int64_t kv = kc / kW * kW;  // the vectorized part; the tail is summed below
    for (int64_t j = 0; j < rows; ++j) {
      const int8_t* src = q + (n0 + j) * k_dim + k0;
      float* dst = wbuf.data() + j * kChunk;
      for (int64_t k = 0; k < kc; ++k) dst[k] = static_cast<float>(src[k]);
    }
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xr = x + m * k_dim + k0;
      float* yr = y + m * n_dim + n0;
      if (kv) dot_block(xr, wbuf.data(), kChunk, rows, kv, yr);
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = kv; k < kc; ++k) yr[j] += xr[k] * wbuf[j * kChunk + k];
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x: a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous() && q.size(1) == x.size(1),
              "q: a contiguous int8 [N, K] tensor with x's K");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == q.size(0) &&
              scale.is_contiguous(), "scale: float32 [N]");
  const int64_t m_rows = x.size(0), k_dim = x.size(1), n_dim = q.size(0);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_dim && bias->is_contiguous(),
                "bias: float32 [N]");
  at::Tensor y = at::zeros({m_rows, n_dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n_dim + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> wbuf(kRows * kChunk);
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kRows, rows = std::min(kRows, n_dim - n0);
      linear_block(xp, qp, m_rows, k_dim, n0, rows, yp, n_dim, wbuf);
      for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t j = 0; j < rows; ++j) {
          float& out = yp[m * n_dim + n0 + j];
          out = out * sp[n0 + j] + (bp ? bp[n0 + j] : 0.f);
        }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }
