// fp32 CPU matrix products through oneDNN (mkldnn::_linear_pointwise, the op
// torch.compile's CPU backend uses for frozen linears) instead of
// at::linear's MKL sgemm: MKL takes its slower code path on non-Intel CPUs
// (on this project's AMD EPYC VM, AVX-512, about half oneDNN's rate).
//
// libtorch registers the op without autograd, so a Function node gives it
// one: backward is two more oneDNN products. The op is called boxed through
// the dispatcher: its C++ signature is not in the wheel's headers.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::OperatorHandle& linear_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return op;
}

// x [..., K] times w [N, K] (any strides) transposed, plus b [N] if defined.
at::Tensor product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(b.defined() ? c10::IValue(b) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  linear_op().callBoxed(stack);
  return stack.back().toTensor();
}

// y = x w^T + b with gradients for whichever of the three need one. x is kept
// for backward only when w needs a gradient: a frozen weight's layer keeps no
// activation, as at::linear's own node does not. No bias comes as an empty
// tensor: Function::apply cannot take an undefined one.
struct Linear : torch::autograd::Function<Linear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    ctx->save_for_backward({w.requires_grad() ? x : at::Tensor(), w});
    const bool has_bias = b.numel() > 0;
    ctx->saved_data["bias"] = has_bias;
    return product(x, w, has_bias ? b : at::Tensor());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& gy = grads[0];
    const int64_t n = w.size(0), k = w.size(1);
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) gx = product(gy, w.t(), at::Tensor());
    if (ctx->needs_input_grad(1)) {
      const auto gy2 = gy.reshape({-1, n});
      gw = product(gy2.t(), x.reshape({-1, k}).t(), at::Tensor());
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["bias"].toBool()) gb = gy.reshape({-1, n}).sum(0);
    return {gx, gw, gb};
  }
};

char* copy_message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out) std::strcpy(out, what);
  return out;
}

}  // namespace

extern "C" {

// 1 when libtorch has the oneDNN op (a build with mkldnn).
int sdtune_onednn_available() {
  try {
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}).has_value() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// *out = x w^T + b (bias may be NULL), differentiable. Returns NULL, or a
// malloc'ed message and leaves *out alone.
char* sdtune_onednn_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* bias, at::Tensor** out) {
  try {
    const at::Tensor b = bias ? *bias : at::Tensor();
    const bool grad = at::GradMode::is_enabled() &&
                      (x->requires_grad() || w->requires_grad() || (b.defined() && b.requires_grad()));
    at::Tensor y = grad ? Linear::apply(*x, *w, b.defined() ? b : at::empty({0}, w->options()))
                        : product(*x, *w, b);
    *out = new at::Tensor(std::move(y));
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in a oneDNN linear");
  }
}

}  // extern "C"
