// Decode attention straight from the paged KV cache, for CPUs.
//
// One query token per sequence. Work is split over sequences; each reads its keys and
// values block by block through the block table (no gathered copy of the context),
// computes every query head's scores in float32 (GQA: a KV head serves its group), a
// softmax, and the weighted sum of values. The torch path in
// attention.py is the reference this is tested against.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Widen a row of cache values to float32. The bfloat16 case is written as the bit
// shift it is, so the compiler vectorizes it (the generic conversion does not).
inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}
inline void load_row(const at::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// HEAD_DIM > 0 fixes the head size at compile time so the inner loops unroll and
// vectorize; 0 is the generic fallback for other sizes.
template <typename T, int HEAD_DIM>
void decode_kernel(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                   torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                   double scale) {
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : query.size(2);
  const int64_t block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);

  const T* q = query.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t token_stride = num_kv_heads * head_dim;  // between positions in a block
  const int64_t block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);
  int64_t longest = 0;
  for (int64_t s = 0; s < num_seqs; ++s) longest = std::max<int64_t>(longest, lens[s]);

  // One work item per sequence: a block's rows hold every KV head side by side, so
  // walking whole rows reads each block front to back (the hardware prefetcher's best
  // case) instead of a head-sized stripe at a stride.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf_buf(num_heads * head_dim), acc_buf(num_heads * head_dim);
    std::vector<float> row_buf(token_stride), scores_buf(num_heads * longest);
    float* __restrict__ qf = qf_buf.data();
    float* __restrict__ acc = acc_buf.data();
    float* __restrict__ row = row_buf.data();
    float* __restrict__ scores = scores_buf.data();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lens[s];
      const int32_t* table = tables + s * max_blocks;
      load_row(q + s * num_heads * head_dim, qf, num_heads * head_dim);
      for (int64_t i = 0; i < num_heads * head_dim; ++i) qf[i] *= fscale;
      for (int64_t start = 0; start < len; start += block_size) {
        const T* kb = kc + table[start / block_size] * block_stride;
        const int64_t n = std::min(block_size, len - start);
        for (int64_t j = 0; j < n; ++j) {
          load_row(kb + j * token_stride, row, token_stride);
          for (int64_t hq = 0; hq < num_heads; ++hq) {
            const float* __restrict__ qh = qf + hq * head_dim;
            const float* __restrict__ kh = row + (hq / group) * head_dim;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];
            scores[hq * len + start + j] = dot;
          }
        }
      }
      for (int64_t hq = 0; hq < num_heads; ++hq) {
        float* __restrict__ sg = scores + hq * len;
        float m = sg[0];
        for (int64_t l = 1; l < len; ++l) m = std::max(m, sg[l]);
        float sum = 0.f;
        for (int64_t l = 0; l < len; ++l) {
          sg[l] = std::exp(sg[l] - m);
          sum += sg[l];
        }
        const float inv = 1.f / sum;
        for (int64_t l = 0; l < len; ++l) sg[l] *= inv;
      }
      std::fill(acc, acc + num_heads * head_dim, 0.f);
      for (int64_t start = 0; start < len; start += block_size) {
        const T* vb = vc + table[start / block_size] * block_stride;
        const int64_t n = std::min(block_size, len - start);
        for (int64_t j = 0; j < n; ++j) {
          load_row(vb + j * token_stride, row, token_stride);
          for (int64_t hq = 0; hq < num_heads; ++hq) {
            const float p = scores[hq * len + start + j];
            const float* __restrict__ vh = row + (hq / group) * head_dim;
            float* __restrict__ ah = acc + hq * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * vh[d];
          }
        }
      }
      T* op = o + s * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) op[i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T>
void dispatch_head_dim(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                       torch::Tensor v_cache, torch::Tensor tables, torch::Tensor lens,
                       double scale) {
  switch (query.size(2)) {
    case 64:
      return decode_kernel<T, 64>(out, query, k_cache, v_cache, tables, lens, scale);
    case 128:
      return decode_kernel<T, 128>(out, query, k_cache, v_cache, tables, lens, scale);
    case 32:
      return decode_kernel<T, 32>(out, query, k_cache, v_cache, tables, lens, scale);
    default:
      return decode_kernel<T, 0>(out, query, k_cache, v_cache, tables, lens, scale);
  }
}

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention needs contiguous tensors");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "block tables and lengths must be int32");
  auto out = torch::empty_like(query);
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  switch (query.scalar_type()) {
    case torch::kFloat32:
      dispatch_head_dim<float>(out, query, k_cache, v_cache, tables, lens, scale);
      break;
    case torch::kBFloat16:
      dispatch_head_dim<at::BFloat16>(out, query, k_cache, v_cache, tables, lens, scale);
      break;
    case torch::kFloat16:
      dispatch_head_dim<at::Half>(out, query, k_cache, v_cache, tables, lens, scale);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype for paged_decode_attention");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
}
