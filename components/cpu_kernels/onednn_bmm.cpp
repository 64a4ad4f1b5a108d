// Batched fp32 matmuls of the SE attention through oneDNN, the library behind PyTorch's CPU convolutions.
//
// torch.bmm runs fp32 on MKL; on the AMD EPYC CPUs of this project's machines MKL takes its AVX2 path, and
// the SE's skinny per-image products (16384 x 64 by 64 x 64) ran 2-3x slower than oneDNN's AVX-512 ones.
// at::native::mkldnn_matmul is what PyTorch itself calls for reduced-precision matmuls; for fp32 it honours
// torch.get_float32_matmul_precision() (the default "highest" keeps strict fp32, so bmm's products are the
// same up to summation order). It is exported by libtorch_cpu but not declared in the installed headers.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                             float alpha);
}  // namespace at::native

namespace {

void check(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op, ": float32 only");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1), op,
              ": expects B x M x K and B x K x N, got ", a.sizes(), " and ", b.sizes());
}

// a @ b, batched
at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  check(a, b, "skf::bmm");
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  at::native::mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
  return out;
}

// self += a @ b, batched, in place (self contiguous)
at::Tensor& baddbmm_(at::Tensor& self, const at::Tensor& a, const at::Tensor& b) {
  check(a, b, "skf::baddbmm_");
  TORCH_CHECK(self.scalar_type() == at::kFloat && self.is_contiguous() &&
                  self.sizes() == at::IntArrayRef({a.size(0), a.size(1), b.size(2)}),
              "skf::baddbmm_: self must be a contiguous float32 B x M x N tensor");
  at::native::mkldnn_matmul(a, b, self, /*beta=*/1.0f, /*alpha=*/1.0f);
  return self;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(skf, m) {
  m.def("bmm(Tensor a, Tensor b) -> Tensor");
  m.def("baddbmm_(Tensor(s!) self, Tensor a, Tensor b) -> Tensor(s!)");
}

TORCH_LIBRARY_IMPL(skf, CPU, m) {
  m.impl("bmm", bmm);
  m.impl("baddbmm_", baddbmm_);
}
