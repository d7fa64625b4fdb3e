// One token per row from processed logits, in one pass over each row: temperature, min-p and the
// exponential race of tandem/kernels/sampling.py (sample_ref), for rows without top-k or top-p
// (the Python wrapper sends those rows to the reference). The reference's ~15 whole-batch tensor
// ops become one parallel loop; the ids are the reference's: the same fp32 operations, exp and log
// from the vector library torch's own kernels use, and ties going to the first index as argmax.
// NOTE: torch's loops send a tensor's last elements (past its last full vector pair) through the C
// library's exp/log instead, which can differ in the last bit: where a score ties to the last bit
// with such an element, the two may pick different tokens.
//
// Row r: temperature[r] == 0 -> the first index of the largest logit. Else z = logits / t,
// survivors z >= max z + log(min_p) (min_p > 0) and z > -inf, or z == max z; the id is the first
// index of the largest exp(z - max z) / -log(max(u, FLT_MIN)) among survivors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// The first index of the largest value (NaN never wins; an all-NaN or empty row gives 0).
int64_t first_argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  float top = -kInf;
  bool any = false;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] > top || (!any && x[i] == top)) {
      top = x[i];
      best = i;
      any = true;
    }
  return best;
}

float max_of(const float* x, int64_t n) {
  Vec vtop(-kInf);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vtop = at::vec::maximum(vtop, Vec::loadu(x + i));
  float top = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vtop);
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// As first_argmax_scalar: the largest value by vector max, then its first index.
int64_t first_argmax(const float* x, int64_t n) {
  const float top = max_of(x, n);
  if (std::isnan(top)) return first_argmax_scalar(x, n);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == top) return i;
  return 0;
}

// The race's winner for one row; `score` is scratch of n floats. Every element, the row's tail
// included, goes through the vector exp and log (torch's own), so no score differs in its last bit.
int64_t race(const float* logits, const float* noise, int64_t n, float temperature, float min_p, float* score) {
  const Vec vt(temperature);
  // max(l / t) == max(l) / t: rounding the quotient is monotone in l for t > 0
  const float z_max = max_of(logits, n) / temperature;
  float log_min_p[kW];
  Vec(min_p).log().store(log_min_p);
  const float cut = min_p > 0 ? z_max + log_min_p[0] : -kInf;
  const Vec vmax(z_max), vcut(cut), vinf(-kInf), vtiny(std::numeric_limits<float>::min()), vdrop(-1.f);
  for (int64_t i = 0; i < n; i += kW) {
    const int count = static_cast<int>(std::min<int64_t>(kW, n - i));
    const Vec z = Vec::loadu(logits + i, count) / vt;
    const Vec q = at::vec::maximum(Vec::loadu(noise + i, count), vtiny).log().neg();
    const Vec s = (z - vmax).exp() / q;
    const Vec keep = ((z >= vcut) & (z > vinf)) | (z == vmax);
    Vec::blendv(vdrop, s, keep).store(score + i, count);
  }
  return first_argmax(score, n);
}

at::Tensor sample_race(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& min_p,
                       const at::Tensor& noise) {
  TORCH_CHECK(logits.dim() == 2 && noise.sizes() == logits.sizes(), "logits and noise [R, V] alike");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && noise.scalar_type() == at::kFloat &&
                  temperature.scalar_type() == at::kFloat && min_p.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(logits.stride(1) == 1 && noise.is_contiguous(), "rows must be dense");
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(temperature.numel() == rows && min_p.numel() == rows && temperature.is_contiguous() &&
                  min_p.is_contiguous(), "one temperature and one min_p per row");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float *l = logits.data_ptr<float>(), *u = noise.data_ptr<float>();
  const float *t = temperature.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  int64_t* ids = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> score(n);
    for (int64_t r = first; r < last; ++r)
      ids[r] = t[r] > 0 ? race(l + r * stride, u + r * n, n, t[r], mp[r], score.data())
                        : first_argmax(l + r * stride, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("sample_race(Tensor logits, Tensor temperature, Tensor min_p, Tensor noise) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("sample_race", &sample_race); }
