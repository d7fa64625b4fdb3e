// Paged decode attention for the CPU: one query token per sequence attends to its context where it
// lies in the paged KV cache, block by block, without gathering K/V into a contiguous copy.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; position p of sequence b
// is in block block_tables[b][p / block_size] at offset p % block_size (tandem/kernels/paged_attention.py).
// Work is split over (sequence, kv head); the query heads of one GQA group share every K/V row read.
// Scores and sums are fp32 whatever the cache dtype; the output is written in the query's dtype.
// An FP8 cache (float8_e4m3fn / float8_e5m2, tandem/kernels/kv_quant.py) holds x / scale: its rows
// are dequantized to fp32 (times k_scale or v_scale) as they are read; other caches ignore the scales.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();  // floats per vector register on this build's instruction set

// Rows of one kv head inside a block: row r starts at base + r * stride (stride = kv_heads * head_dim
// in the cache itself; head_dim in a converted copy).
struct Rows {
  const float* base;
  int64_t stride;
  const float* row(int64_t r) const { return base + r * stride; }
};

// out[i] = the sum of ai's lanes: one horizontal-add tree for the four, where reducing each alone
// would take a full shuffle ladder per vector.
inline void reduce4(const Vec& a0, const Vec& a1, const Vec& a2, const Vec& a3, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto halve = [](const Vec& v) {
    const __m512 x = v;
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  };
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(halve(a0), halve(a1)), _mm256_hadd_ps(halve(a2), halve(a3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
  const Vec* a[4] = {&a0, &a1, &a2, &a3};
  for (int i = 0; i < 4; ++i) out[i] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), *a[i]);
#endif
}

// scores[r] = q . row(r) for r < n, four rows at a time so four accumulator chains overlap.
void dot_rows(const float* q, Rows rows, int64_t n, int64_t d, float* scores) {
  const int64_t dv = d - d % kW;
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const float *k0 = rows.row(r), *k1 = rows.row(r + 1), *k2 = rows.row(r + 2), *k3 = rows.row(r + 3);
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (int64_t i = 0; i < dv; i += kW) {
      const Vec qi = Vec::loadu(q + i);
      a0 = at::vec::fmadd(qi, Vec::loadu(k0 + i), a0);
      a1 = at::vec::fmadd(qi, Vec::loadu(k1 + i), a1);
      a2 = at::vec::fmadd(qi, Vec::loadu(k2 + i), a2);
      a3 = at::vec::fmadd(qi, Vec::loadu(k3 + i), a3);
    }
    float sums[4];
    reduce4(a0, a1, a2, a3, sums);
    float s0 = sums[0], s1 = sums[1], s2 = sums[2], s3 = sums[3];
    for (int64_t i = dv; i < d; ++i) {
      s0 += q[i] * k0[i];
      s1 += q[i] * k1[i];
      s2 += q[i] * k2[i];
      s3 += q[i] * k3[i];
    }
    scores[r] = s0;
    scores[r + 1] = s1;
    scores[r + 2] = s2;
    scores[r + 3] = s3;
  }
  for (; r < n; ++r) {
    const float* k = rows.row(r);
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc += q[i] * k[i];
    scores[r] = acc;
  }
}

// acc[0, d) += sum_r p[r] * row(r), four vectors of the output at a time held in registers.
void weighted_rows(const float* p, Rows rows, int64_t n, int64_t d, float* acc) {
  int64_t i = 0;
  for (; i + 4 * kW <= d; i += 4 * kW) {
    Vec a0 = Vec::loadu(acc + i), a1 = Vec::loadu(acc + i + kW), a2 = Vec::loadu(acc + i + 2 * kW),
        a3 = Vec::loadu(acc + i + 3 * kW);
    for (int64_t r = 0; r < n; ++r) {
      const float* v = rows.row(r) + i;
      const Vec pr(p[r]);
      a0 = at::vec::fmadd(pr, Vec::loadu(v), a0);
      a1 = at::vec::fmadd(pr, Vec::loadu(v + kW), a1);
      a2 = at::vec::fmadd(pr, Vec::loadu(v + 2 * kW), a2);
      a3 = at::vec::fmadd(pr, Vec::loadu(v + 3 * kW), a3);
    }
    a0.store(acc + i);
    a1.store(acc + i + kW);
    a2.store(acc + i + 2 * kW);
    a3.store(acc + i + 3 * kW);
  }
  // NOTE: a head_dim under 4 vectors (32 on AVX-512) lands here, not in the scalar tail below
  for (; i + kW <= d; i += kW) {
    Vec a = Vec::loadu(acc + i);
    for (int64_t r = 0; r < n; ++r) a = at::vec::fmadd(Vec(p[r]), Vec::loadu(rows.row(r) + i), a);
    a.store(acc + i);
  }
  for (; i < d; ++i)
    for (int64_t r = 0; r < n; ++r) acc[i] += p[r] * rows.row(r)[i];
}

// In place: x <- exp(x - m), m the max over x and `sink`; returns the sum, exp(sink - m) included.
// sink: one more logit with no value (gpt-oss's attention sinks), -inf for none.
float exp_normalise(float* x, int64_t n, float sink) {
  float mx = sink;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
  const Vec vmx(mx);
  Vec vsum(0.f);
  int64_t t = 0;
  for (; t + kW <= n; t += kW) {
    const Vec e = (Vec::loadu(x + t) - vmx).exp();
    e.store(x + t);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), vsum);
  for (; t < n; ++t) {
    x[t] = std::exp(x[t] - mx);
    sum += x[t];
  }
  return sum + std::exp(sink - mx);
}

struct Shape {
  int64_t heads, kv_heads, head_dim, block_size, table_width;
  int64_t q_stride_b, q_stride_h;  // query/out strides in elements
  int64_t o_stride_b, o_stride_h;
};

template <typename C>
constexpr bool is_fp8 = std::is_same_v<C, c10::Float8_e4m3fn> || std::is_same_v<C, c10::Float8_e5m2>;

// Every FP8 byte's value as a float: a table lookup instead of c10's bit-by-bit conversion (~6x
// faster decode over an FP8 cache here). Exact: each entry is c10's own conversion of that byte.
template <typename C>
const float* fp8_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(C(static_cast<uint8_t>(i), C::from_bits()));
    return t;
  }();
  return table.data();
}

// The rows of positions [p, p + n) of one kv head, all inside one block: in place for an fp32 cache,
// else converted into `buf` (FP8 rows dequantized: value * scale).
template <typename C>
Rows block_rows(const C* cache, int64_t block, int64_t off, int64_t n, const Shape& s, int64_t kv_head,
                float scale, std::vector<float>& buf) {
  const C* first = cache + ((block * s.block_size + off) * s.kv_heads + kv_head) * s.head_dim;
  if constexpr (std::is_same_v<C, float>) {
    return Rows{first, s.kv_heads * s.head_dim};
  } else {
    buf.resize(n * s.head_dim);
    for (int64_t r = 0; r < n; ++r) {
      float* dst = buf.data() + r * s.head_dim;
      if constexpr (is_fp8<C>) {
        const float* values = fp8_values<C>();
        const uint8_t* src = reinterpret_cast<const uint8_t*>(first + r * s.kv_heads * s.head_dim);
        for (int64_t i = 0; i < s.head_dim; ++i) dst[i] = values[src[i]] * scale;
      } else {
        for (int64_t i = 0; i < s.head_dim; ++i) dst[i] = static_cast<float>(first[r * s.kv_heads * s.head_dim + i]);
      }
    }
    return Rows{buf.data(), s.head_dim};
  }
}

// A batch of at least this many sequences per thread takes whole sequences as work items.
constexpr int64_t kItemsPerThread = 4;

// Kv heads [first, last) of one sequence: the unit of work. With every head in it, a block's K (or V)
// rows are one contiguous piece of the cache, read front to back.
struct HeadSpan {
  int64_t first, last;
};

// Asks for the span's rows of a block ahead of their use (into L2): blocks lie anywhere in the
// cache, which the hardware prefetchers cannot follow.
template <typename C>
void prefetch_block(const C* cache, int64_t block, const Shape& s, HeadSpan heads) {
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = s.kv_heads * s.head_dim * static_cast<int64_t>(sizeof(C));
  const int64_t begin = heads.first * s.head_dim * static_cast<int64_t>(sizeof(C));
  const int64_t end = heads.last * s.head_dim * static_cast<int64_t>(sizeof(C));
  const char* first = reinterpret_cast<const char*>(cache + block * s.block_size * s.kv_heads * s.head_dim);
  for (int64_t r = 0; r < s.block_size; ++r)
    for (int64_t b = begin; b < end; b += kLine) __builtin_prefetch(first + r * row_bytes + b, 0, 1);
}

// Calls fn(block, offset in the block, n, offset from begin) for the consecutive runs of positions
// [begin, end) that share a block, asking for the next block's rows (into L2) before each call.
template <typename C, typename Fn>
void for_each_block(const C* cache, const int64_t* table, int64_t begin, int64_t end, const Shape& s,
                    HeadSpan heads, Fn fn) {
  const int64_t last_block = end > begin ? (end - 1) / s.block_size : -1;
  for (int64_t p = begin; p < end;) {
    const int64_t off = p % s.block_size, n = std::min(s.block_size - off, end - p), index = p / s.block_size;
    if (index < last_block) prefetch_block(cache, table[index + 1], s, heads);
    fn(table[index], off, n, p - begin);
    p += n;
  }
}

struct Scratch {
  std::vector<float> q, acc, scores, inv_sum, rows;
};

struct CacheScales {
  float k, v;  // FP8 caches only
};

// One sequence's query heads of the kv heads in `heads`, over positions [begin, end). T: the query's
// and output's type; C: the cache's (T, or FP8). Row sets per (kv head, group member) q-head j: the
// query at w.q[j * d], the scores at w.scores[j * len], the output sum at w.acc[j * d].
// sinks: one logit per query head (nullptr: none).
template <typename T, typename C>
void attend_span(const T* query, const C* k_cache, const C* v_cache, const int64_t* table, int64_t begin,
                 int64_t end, float scale, CacheScales cs, const float* sinks, const Shape& s, HeadSpan heads, T* out,
                 Scratch& w) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim, len = end - begin;
  const int64_t rows_q = (heads.last - heads.first) * group;  // query heads in the span
  const int64_t q0 = heads.first * group;
  w.q.resize(rows_q * d);
  w.acc.assign(rows_q * d, 0.f);
  w.scores.resize(rows_q * std::max<int64_t>(len, 1));
  w.inv_sum.assign(rows_q, 0.f);
  for (int64_t j = 0; j < rows_q; ++j) {
    const T* src = query + (q0 + j) * s.q_stride_h;
    for (int64_t i = 0; i < d; ++i) w.q[j * d + i] = static_cast<float>(src[i]) * scale;
  }
  // pass 1: every query head's scores, block by block (each kv head's rows are read once for its group)
  for_each_block(k_cache, table, begin, end, s, heads, [&](int64_t block, int64_t off, int64_t n, int64_t at) {
    for (int64_t h = heads.first; h < heads.last; ++h) {
      const Rows rows = block_rows(k_cache, block, off, n, s, h, cs.k, w.rows);
      for (int64_t j = (h - heads.first) * group; j < (h - heads.first + 1) * group; ++j)
        dot_rows(w.q.data() + j * d, rows, n, d, w.scores.data() + j * len + at);
    }
  });
  if (len > 0)
    for (int64_t j = 0; j < rows_q; ++j) {
      const float sink = sinks ? sinks[q0 + j] : -std::numeric_limits<float>::infinity();
      w.inv_sum[j] = 1.f / exp_normalise(w.scores.data() + j * len, len, sink);
    }
  // pass 2: probabilities times V; the normaliser is applied once at the end
  for_each_block(v_cache, table, begin, end, s, heads, [&](int64_t block, int64_t off, int64_t n, int64_t at) {
    for (int64_t h = heads.first; h < heads.last; ++h) {
      const Rows rows = block_rows(v_cache, block, off, n, s, h, cs.v, w.rows);
      for (int64_t j = (h - heads.first) * group; j < (h - heads.first + 1) * group; ++j)
        weighted_rows(w.scores.data() + j * len + at, rows, n, d, w.acc.data() + j * d);
    }
  });
  for (int64_t j = 0; j < rows_q; ++j) {
    T* dst = out + (q0 + j) * s.o_stride_h;
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(w.acc[j * d + i] * w.inv_sum[j]);
  }
}

// Calls fn(C{}) with C the cache's element type: the query's own, or an FP8 type.
template <typename T, typename Fn>
void dispatch_cache(at::ScalarType cache_type, Fn fn) {
  if (cache_type == at::kFloat8_e4m3fn) {
    fn(c10::Float8_e4m3fn{});
  } else if (cache_type == at::kFloat8_e5m2) {
    fn(c10::Float8_e5m2{});
  } else {
    fn(T{});
  }
}

bool is_fp8_type(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// query [B, heads, head_dim]; k/v_cache [num_blocks, block_size, kv_heads, head_dim] in the query's
// dtype or FP8 (read as value * k_scale / v_scale); block_tables [B, width] int64; seq_lens [B]
// int64 (context incl. the query); sliding_window <= 0: none; sinks: fp32 [heads] attention-sink
// logits (gpt-oss), or none.
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, double k_scale, double v_scale,
                                  const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(query.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK((query.scalar_type() == k_cache.scalar_type() || is_fp8_type(k_cache.scalar_type())) &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "the cache must be in the query's dtype or FP8 (K and V alike)");
  TORCH_CHECK(!is_fp8_type(k_cache.scalar_type()) || (k_scale > 0 && v_scale > 0), "FP8 scales must be positive");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16 ||
                  query.scalar_type() == at::kHalf, "float32, bfloat16 or float16 only (fp32 accumulation)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "query's last dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "int64 metadata");
  const int64_t batch = query.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && seq_lens.numel() == batch,
              "one block table row and one length per query");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous(), "block table rows and lengths must be dense");
  const int64_t table_stride = block_tables.stride(0);
  Shape s{query.size(1), k_cache.size(2), k_cache.size(3), k_cache.size(1), block_tables.size(1),
          query.stride(0), query.stride(1), 0, 0};
  TORCH_CHECK(s.kv_heads > 0 && s.block_size > 0, "empty cache layout");
  TORCH_CHECK(query.size(2) == s.head_dim && s.heads % s.kv_heads == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(!sinks || (sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == s.heads),
              "sinks: fp32, contiguous, one per query head");
  const float* sink_logits = sinks ? sinks->data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({batch, s.heads, s.head_dim}, query.options());
  s.o_stride_b = out.stride(0);
  s.o_stride_h = out.stride(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= s.table_width * s.block_size, "context longer than its block table");
    for (int64_t i = 0; i < (lens[b] + s.block_size - 1) / s.block_size; ++i) {
      const int64_t block = tables[b * table_stride + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " outside the cache");
    }
  }
  const CacheScales cs{static_cast<float>(k_scale), static_cast<float>(v_scale)};
  // a sequence's kv heads in one item when the batch alone gives every thread several items; else
  // one kv head per item, so a small batch still spreads over the threads
  const int64_t span = batch >= kItemsPerThread * at::get_num_threads() ? s.kv_heads : 1;
  const int64_t spans = (s.kv_heads + span - 1) / span;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    dispatch_cache<scalar_t>(k_cache.scalar_type(), [&](auto cache_tag) {
      using C = decltype(cache_tag);
      const scalar_t* q = query.data_ptr<scalar_t>();
      const C* kc = static_cast<const C*>(k_cache.data_ptr());
      const C* vc = static_cast<const C*>(v_cache.data_ptr());
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, batch * spans, 1, [&](int64_t first, int64_t last) {
        Scratch scratch;
        for (int64_t item = first; item < last; ++item) {
          const int64_t b = item / spans, h = item % spans * span, end = lens[b];
          const int64_t begin = sliding_window > 0 ? std::max<int64_t>(0, end - sliding_window) : 0;
          attend_span(q + b * s.q_stride_b, kc, vc, tables + b * table_stride, begin, end, static_cast<float>(scale),
                      cs, sink_logits, s, HeadSpan{h, std::min(h + span, s.kv_heads)}, o + b * s.o_stride_b, scratch);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window, float k_scale, float v_scale, Tensor? sinks) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
