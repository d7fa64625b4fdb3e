// The per-token ops of a decoder layer for the CPU, each one pass over its rows: RMSNorm (alone and
// fused with the residual add before it), SiLU-and-mul, and neox rotary on q and k fused with the
// KV-cache write. Numerics follow the torch references in tandem/kernels (reductions in fp32; for
// bf16/fp16 every elementwise step rounds to the tensor's dtype as the references do).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <functional>
#include <tuple>
#include <type_traits>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Rows per parallel task: about 16k elements, so a decode batch's few rows stay on one thread.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

// y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)) for one row of n (x already in fp32 at xf).
template <typename T>
void norm_row(const float* xf, const T* w, int64_t n, double eps, T* y) {
  float ss;
  if constexpr (std::is_same_v<T, float>) {
    ss = at::vec::map_reduce_all<float>([](Vec v) { return v * v; }, std::plus<Vec>(), xf, n);
  } else {
    ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += xf[i] * xf[i];
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
  if constexpr (std::is_same_v<T, float>) {
    at::vec::map2<float>([r](Vec x, Vec wv) { return wv * (x * Vec(r)); }, y, xf, w, n);
  } else {
    for (int64_t i = 0; i < n; ++i)
      y[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(round_to<T>(xf[i] * r)));
  }
}

// The kernels compute in fp32: float, bfloat16 and half only (a double would lose precision silently).
void check_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "float32, bfloat16 or float16 only, got ", x.scalar_type());
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_dtype(x);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "a contiguous CPU tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type(),
              "weight [hidden] in the input's dtype");
}

template <typename T>
void rms_norm_rows(const T* xp, const T* wp, T* yp, int64_t rows, int64_t n, double eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = first; r < last; ++r) {
      if constexpr (std::is_same_v<T, float>) {
        norm_row(xp + r * n, wp, n, eps, yp + r * n);
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(xp[r * n + i]);
        norm_row(buf.data(), wp, n, eps, yp + r * n);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, n, eps);
  });
  return y;
}

template <typename T>
void add_rms_norm_rows(const T* xp, const T* rp, const T* wp, T* yp, T* hp, int64_t rows, int64_t n, double eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = first; r < last; ++r) {
      T* hr = hp + r * n;
      if constexpr (std::is_same_v<T, float>) {
        at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, hr, rp + r * n, xp + r * n, n);
        norm_row(hr, wp, n, eps, yp + r * n);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          hr[i] = round_to<T>(static_cast<float>(rp[r * n + i]) + static_cast<float>(xp[r * n + i]));
          buf[i] = static_cast<float>(hr[i]);
        }
        norm_row(buf.data(), wp, n, eps, yp + r * n);
      }
    }
  });
}

// -> (rms_norm(residual + x), residual + x); the sum is taken in the input dtype.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() && residual.is_contiguous(),
              "residual like x");
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x), h = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                      y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), rows, n, eps);
  });
  return {y, h};
}

template <typename T>
void silu_and_mul_rows(const T* xp, T* yp, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T *g = xp + r * 2 * n, *u = g + n;
      T* out = yp + r * n;
      if constexpr (std::is_same_v<T, float>) {
        at::vec::map2<float>([](Vec gv, Vec uv) { return gv / (Vec(1.f) + gv.neg().exp()) * uv; }, out, g, u, n);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const float gf = static_cast<float>(g[i]);
          const T s = round_to<T>(gf / (1.f + std::exp(-gf)));
          out[i] = round_to<T>(static_cast<float>(s) * static_cast<float>(u[i]));
        }
      }
    }
  });
}

// [T, 2N] (gate, up) -> silu(gate) * up [T, N].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_dtype(x);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous() && x.size(-1) % 2 == 0,
              "a contiguous CPU [.., 2N] tensor");
  const int64_t two_n = x.size(-1), n = two_n / 2, rows = two_n ? x.numel() / two_n : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, n);
  });
  return y;
}

// Rotates heads [T, H, D] (any row and head strides, D contiguous) into out [T, H, D] contiguous.
template <typename T>
void rotate_heads(const T* x, int64_t st, int64_t sh, int64_t heads, int64_t d, const float* c, const float* s,
                  T* out, int64_t t) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* xr = x + t * st + h * sh;
    T* o = out + (t * heads + h) * d;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(xr[i]), x2 = static_cast<float>(xr[i + half]);
      if constexpr (std::is_same_v<T, float>) {
        o[i] = x1 * c[i] - x2 * s[i];
        o[i + half] = x2 * c[i] + x1 * s[i];
      } else {  // every product and sum rounds to T, as the reference computes in T
        const float ci = static_cast<float>(round_to<T>(c[i])), si = static_cast<float>(round_to<T>(s[i]));
        const float a = static_cast<float>(round_to<T>(x1 * ci)), b = static_cast<float>(round_to<T>(x2 * si));
        const float e = static_cast<float>(round_to<T>(x2 * ci)), f = static_cast<float>(round_to<T>(x1 * si));
        o[i] = round_to<T>(a - b);
        o[i + half] = round_to<T>(e + f);
      }
    }
  }
}

// dst[i] = src[i] for a cache in the source's type; an FP8 cache gets clamp(src[i] / scale, +-max)
// rounded to nearest (tandem/kernels/kv_quant.py quantize: the same fp32 division and rounding).
template <typename T, typename C>
void store_row(const T* src, int64_t n, float scale, C* dst) {
  if constexpr (std::is_same_v<T, C>) {
    std::copy(src, src + n, dst);
  } else {
    const float mx = static_cast<float>(std::numeric_limits<C>::max());
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(std::clamp(static_cast<float>(src[i]) / scale, -mx, mx));
  }
}

// Calls fn(C{}) with C the cache's element type: T itself, or an FP8 type.
template <typename T, typename Fn>
void dispatch_cache(at::ScalarType cache_type, Fn fn) {
  if (cache_type == at::kFloat8_e4m3fn) {
    fn(c10::Float8_e4m3fn{});
  } else if (cache_type == at::kFloat8_e5m2) {
    fn(c10::Float8_e5m2{});
  } else {
    TORCH_CHECK(cache_type == c10::CppTypeToScalarType<T>::value, "the cache must be in q's dtype or FP8");
    fn(T{});
  }
}

// q [T, heads, D], k/v [T, kv_heads, D] (views into the QKV projection) -> (rotated q, rotated k),
// contiguous; the cache [blocks, block_size, kv_heads, D] gets rotated k and v at slot_mapping[t]
// (an FP8 cache: quantized with k_scale / v_scale).
std::tuple<at::Tensor, at::Tensor> rope_and_write_kv(const at::Tensor& positions, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                                     const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                                     const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0), "bad shapes");
  check_dtype(q);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(), "cache");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "KV scales must be positive");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin fp32 [max_positions, D/2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong, "int64 indices");
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), d = q.size(2);
  TORCH_CHECK(k.size(2) == d && cos.dim() == 2 && sin.sizes() == cos.sizes() && k_cache.dim() == 4,
              "q/k head_dim, cos/sin or cache rank mismatch");
  TORCH_CHECK(d % 2 == 0 && cos.size(1) == d / 2 && k_cache.size(2) == kv_heads && k_cache.size(3) == d,
              "head_dim / cache layout mismatch");
  TORCH_CHECK(positions.numel() == tokens && slot_mapping.numel() == tokens, "one position and slot per token");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), max_pos = cos.size(0);
  const at::Tensor pos_t = positions.contiguous(), slots_t = slot_mapping.contiguous();  // alive while read
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " outside the rotary table");
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " outside the cache");
  }
  at::Tensor q_out = at::empty({tokens, heads, d}, q.options()), k_out = at::empty({tokens, kv_heads, d}, k.options());
  const int64_t half = d / 2, row = kv_heads * d;
  const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_and_write_kv", [&] {
    dispatch_cache<scalar_t>(k_cache.scalar_type(), [&](auto cache_tag) {
      using C = decltype(cache_tag);
      const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
      scalar_t *qo = q_out.data_ptr<scalar_t>(), *ko = k_out.data_ptr<scalar_t>();
      C *kc = static_cast<C*>(k_cache.data_ptr()), *vc = static_cast<C*>(v_cache.data_ptr());
      const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
      at::parallel_for(0, tokens, grain((heads + 2 * kv_heads) * d), [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const float *c = cp + pos[t] * half, *s = sp + pos[t] * half;
          rotate_heads(qp, q.stride(0), q.stride(1), heads, d, c, s, qo, t);
          rotate_heads(kp, k.stride(0), k.stride(1), kv_heads, d, c, s, ko, t);
          store_row(ko + t * row, row, ks, kc + slots[t] * row);
          for (int64_t h = 0; h < kv_heads; ++h)
            store_row(vp + t * v.stride(0) + h * v.stride(1), d, vs, vc + slots[t] * row + h * d);
        }
      });
    });
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope_and_write_kv(Tensor positions, Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, float k_scale, float v_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_and_write_kv", &rope_and_write_kv);
}
