// BGMV on CPU: y[t] += ((x[t] @ A[s]^T) @ B[s]^T) * scale[s] for s = slots[t] >= 0.
//
// Why a kernel: in torch, a batch of decode tokens that each use another adapter costs a
// gather of every token's A and B (a copy) and two batched matmuls per projection; here
// each token reads its adapter's rows in place, in fp32, with no copy. Layouts are the
// adapter pool's (shoal.runtime.lora.layers.LoRAStack): A [slots, R, in] and
// B [slots, R, out] (rows of B^T, so the output loop runs over contiguous memory), both
// contiguous, float32 (kept in fp32 on CPU: converting bf16
// weights element by element made the kernel 4x slower); x [T, in] with unit column
// stride; y [T, out] may be a column slice of a fused output (any row stride, unit
// column stride); x and y fp32, bf16 or fp16. Tokens with slot -1 are skipped.
// Computes in fp32, rounds into y's dtype once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename T>
void bgmv_rows(const T* x, int64_t x_stride, const float* a, const float* b,
               const int64_t* slots,
               const float* scales, T* y, int64_t y_stride, int64_t num_tokens, int64_t in,
               int64_t out, int64_t rank) {
  at::parallel_for(0, num_tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in);
    std::vector<float> h(rank);
    std::vector<float> acc_out(out);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      const T* xr = x + t * x_stride;
      for (int64_t k = 0; k < in; ++k) xf[k] = static_cast<float>(xr[k]);
      const float* as = a + s * rank * in;
      const float scale = scales[s];
      for (int64_t r = 0; r < rank; ++r) {
        const float* ar = as + r * in;
        float acc = 0.f;
        for (int64_t k = 0; k < in; ++k) acc += ar[k] * xf[k];
        h[r] = acc;
      }
      const float* bs = b + s * rank * out;
      std::fill(acc_out.begin(), acc_out.end(), 0.f);
      for (int64_t r = 0; r < rank; ++r) {
        const float hr = h[r];
        const float* br = bs + r * out;
        for (int64_t n = 0; n < out; ++n) acc_out[n] += hr * br[n];
      }
      T* yr = y + t * y_stride;
      for (int64_t n = 0; n < out; ++n) {
        yr[n] = static_cast<T>(static_cast<float>(yr[n]) + acc_out[n] * scale);
      }
    }
  });
}

void bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b,
          torch::Tensor slots, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && b.dim() == 3, "bad ranks");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y need unit column stride");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "A and B must be contiguous");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous(), "slots int64");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous(), "scales fp32");
  const int64_t num_tokens = x.size(0), in = x.size(1), rank = a.size(1), out = b.size(2);
  TORCH_CHECK(y.size(0) == num_tokens && slots.size(0) == num_tokens, "token counts differ");
  TORCH_CHECK(a.size(2) == in && b.size(1) == rank && y.size(1) == out, "shapes differ");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y dtypes differ");
  TORCH_CHECK(a.scalar_type() == torch::kFloat && b.scalar_type() == torch::kFloat,
              "A and B must be float32");
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float* cp = scales.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat) {
    bgmv_rows<float>(x.data_ptr<float>(), x.stride(0), ap, bp, sp, cp, y.data_ptr<float>(),
                     y.stride(0), num_tokens, in, out, rank);
  } else if (x.scalar_type() == torch::kBFloat16) {
    using bf16 = c10::BFloat16;
    bgmv_rows<bf16>(x.data_ptr<bf16>(), x.stride(0), ap, bp, sp, cp, y.data_ptr<bf16>(),
                    y.stride(0), num_tokens, in, out, rank);
  } else if (x.scalar_type() == torch::kHalf) {
    using f16 = c10::Half;
    bgmv_rows<f16>(x.data_ptr<f16>(), x.stride(0), ap, bp, sp, cp, y.data_ptr<f16>(),
                   y.stride(0), num_tokens, in, out, rank);
  } else {
    TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bgmv", &bgmv, "gathered multi-LoRA update on CPU (in place on y)");
}
