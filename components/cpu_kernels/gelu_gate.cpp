// Fused GELU gate of the SE feed-forward blocks, CPU: out = gelu(u) * gate, with the gate broadcast
// over F consecutive rows of u. One pass forward and one pass backward instead of eager PyTorch's
// five (gelu, mul; mul, mul + sum, gelu_backward) over 64-170-channel full-resolution maps.
//
// Shapes: u and grad are N x F x M, gate is N x 1 x M (contiguous; the Python side passes views).
// SNR-Net's dual-gated FFN: N = batch * prior rows, F = the upsampling factor, M = width * channels of a
// channels-last map, the gate being the semantic branch widened along columns. GDFN: F = 1, gate = u2.
//
// The GELU formulas are ATen's CPU kernels' (exact: erf; tanh: the 0.044715 cubic), evaluated with the
// same at::vec::Vectorized functions, so results match F.gelu to rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

using at::vec::Vectorized;

template <typename T, bool kTanh>
struct Gelu {
  using V = Vectorized<T>;

  // gelu(x)
  static V value(const V& x) {
    const V half(T(0.5)), one(T(1));
    if constexpr (kTanh) {
      const V beta(T(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(T(0.044715));
      const V inner = beta * (x + kappa * (x * x * x));
      return half * x * (one + inner.tanh());
    } else {
      const V alpha(T(M_SQRT1_2));
      return x * half * (one + (x * alpha).erf());
    }
  }

  // gelu(x) and gelu'(x) together (they share the erf / tanh)
  static void value_and_slope(const V& x, V& value, V& slope) {
    const V half(T(0.5)), one(T(1));
    if constexpr (kTanh) {
      const V beta(T(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(T(0.044715)), three_kappa(T(3 * 0.044715));
      const V x_sq = x * x;
      const V t = (beta * (x + kappa * (x_sq * x))).tanh();
      const V left = half * x, right = one + t;
      value = left * right;
      slope = half * right + left * ((one - t * t) * beta * (one + three_kappa * x_sq));
    } else {
      const V alpha(T(M_SQRT1_2)), beta(T(M_2_SQRTPI * M_SQRT1_2 * 0.5)), minus_half(T(-0.5));
      const V cdf = half * (one + (x * alpha).erf());
      value = x * cdf;
      slope = cdf + x * (beta * (x * x * minus_half).exp());
    }
  }
};

void check(const at::Tensor& u, const at::Tensor& gate, const char* op) {
  TORCH_CHECK(u.device().is_cpu() && gate.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(u.dim() == 3 && gate.dim() == 3, op, ": u must be N x F x M and gate N x 1 x M");
  TORCH_CHECK(gate.size(0) == u.size(0) && gate.size(1) == 1 && gate.size(2) == u.size(2), op,
              ": gate must be N x 1 x M for u of shape N x F x M, got ", gate.sizes(), " and ", u.sizes());
  TORCH_CHECK(u.scalar_type() == gate.scalar_type(), op, ": u and gate must have the same dtype");
}

template <typename T, bool kTanh>
void forward_rows(const T* u, const T* gate, T* out, int64_t n_rows, int64_t f, int64_t m) {
  using V = Vectorized<T>;
  at::parallel_for(0, n_rows * f, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* ur = u + r * m;
      const T* gr = gate + (r / f) * m;
      T* outr = out + r * m;
      for (int64_t j = 0; j < m; j += V::size()) {
        const int64_t k = std::min<int64_t>(V::size(), m - j);
        (Gelu<T, kTanh>::value(V::loadu(ur + j, k)) * V::loadu(gr + j, k)).store(outr + j, k);
      }
    }
  });
}

// Row by row (each row one stream, which the prefetchers keep up with; walking the F rows of a column
// block together was twice as slow), the gate's gradient accumulating in its N-th row, which stays in L2.
template <typename T, bool kTanh>
void backward_rows(const T* grad, const T* u, const T* gate, T* grad_u, T* grad_gate, int64_t n_rows,
                   int64_t f, int64_t m) {
  using V = Vectorized<T>;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* gr = gate + n * m;
      T* dgr = grad_gate + n * m;
      for (int64_t a = 0; a < f; ++a) {
        const int64_t base = (n * f + a) * m;
        for (int64_t j = 0; j < m; j += V::size()) {
          const int64_t k = std::min<int64_t>(V::size(), m - j);
          const V x = V::loadu(u + base + j, k), dy = V::loadu(grad + base + j, k);
          V value, slope;
          Gelu<T, kTanh>::value_and_slope(x, value, slope);
          (dy * V::loadu(gr + j, k) * slope).store(grad_u + base + j, k);
          const V part = dy * value;
          (a == 0 ? part : V::loadu(dgr + j, k) + part).store(dgr + j, k);
        }
      }
    }
  });
}

at::Tensor gelu_gate(const at::Tensor& u_in, const at::Tensor& gate_in, bool tanh) {
  check(u_in, gate_in, "skf::gelu_gate");
  const at::Tensor u = u_in.contiguous(), gate = gate_in.contiguous();
  at::Tensor out = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "skf::gelu_gate", [&] {
    auto run = tanh ? forward_rows<scalar_t, true> : forward_rows<scalar_t, false>;
    run(u.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        u.size(0), u.size(1), u.size(2));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gelu_gate_backward(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                      const at::Tensor& gate_in, bool tanh) {
  check(u_in, gate_in, "skf::gelu_gate_backward");
  TORCH_CHECK(grad_in.sizes() == u_in.sizes() && grad_in.scalar_type() == u_in.scalar_type(),
              "skf::gelu_gate_backward: grad must match u");
  const at::Tensor grad = grad_in.contiguous(), u = u_in.contiguous(), gate = gate_in.contiguous();
  at::Tensor grad_u = at::empty_like(u), grad_gate = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "skf::gelu_gate_backward", [&] {
    auto run = tanh ? backward_rows<scalar_t, true> : backward_rows<scalar_t, false>;
    run(grad.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
        grad_u.mutable_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>(), u.size(0), u.size(1),
        u.size(2));
  });
  return {grad_u, grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(skf, m) {
  m.def("gelu_gate(Tensor u, Tensor gate, bool tanh) -> Tensor");
  m.def("gelu_gate_backward(Tensor grad, Tensor u, Tensor gate, bool tanh) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(skf, CPU, m) {
  m.impl("gelu_gate", gelu_gate);
  m.impl("gelu_gate_backward", gelu_gate_backward);
}
