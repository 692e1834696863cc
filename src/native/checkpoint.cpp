// Reentrant gradient checkpointing for tch, which has neither
// torch.utils.checkpoint nor custom autograd functions.
//
// A segment is a Rust closure. Forward runs it under no-grad and keeps only
// its inputs; backward runs it again with grad on detached copies of them
// and returns autograd::grad of its outputs with respect to those copies
// and to the trainable parameters, which are inputs of the node so that an
// outer autograd::grad (what the trainer calls) sees their gradients.
//
// Tensors cross as tch's C_tensor, a heap at::Tensor*. Errors cross as
// strings: the Rust side never unwinds into C++, and C++ exceptions never
// reach Rust (error_message.h).
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "error_message.h"

extern "C" {
// Runs the segment on `inputs` (borrowed), hands each output to
// sdtune_checkpoint_push_output(sink, ..) and returns 0; or sets the
// message with sdtune_checkpoint_set_error(sink, ..) and returns non-zero.
typedef int (*sdtune_segment_run)(void* closure, at::Tensor* const* inputs, size_t n_inputs, void* sink);
// Frees the closure (called once, when the autograd node goes).
typedef void (*sdtune_segment_drop)(void* closure);
// Takes ownership of one output of the forward.
typedef void (*sdtune_take_output)(void* outputs, at::Tensor* owned);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Sink {
  std::vector<at::Tensor> outputs;
  std::string error;
};

// The closure, owned by the autograd node through a capsule in saved_data.
struct Segment : torch::CustomClassHolder {
  Segment(void* closure, sdtune_segment_run run, sdtune_segment_drop drop)
      : closure(closure), run_fn(run), drop_fn(drop) {}
  ~Segment() override { drop_fn(closure); }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  std::vector<at::Tensor> run(const variable_list& inputs) const {
    std::vector<at::Tensor*> ptrs;
    ptrs.reserve(inputs.size());
    for (const auto& t : inputs) ptrs.push_back(const_cast<at::Tensor*>(&t));
    Sink sink;
    if (run_fn(closure, ptrs.data(), ptrs.size(), &sink) != 0) throw std::runtime_error(sink.error);
    return std::move(sink.outputs);
  }

  void* closure;
  sdtune_segment_run run_fn;
  sdtune_segment_drop drop_fn;
};

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  // The lists come as TensorList: apply() only sees the tensors of an
  // ArrayRef argument (a std::vector would count as one non-tensor).
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, at::TensorList params,
                               c10::intrusive_ptr<Segment> segment) {
    // Function::apply already runs this under no-grad.
    auto outputs = segment->run(inputs.vec());
    ctx->saved_data["inputs"] = static_cast<int64_t>(inputs.size());
    ctx->saved_data["segment"] = c10::IValue::make_capsule(std::move(segment));
    variable_list saved = inputs.vec();
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto n_inputs = static_cast<size_t>(ctx->saved_data["inputs"].toInt());
    auto holder = ctx->saved_data["segment"].toCapsule();
    const auto* segment = static_cast<const Segment*>(holder.get());

    // Everything differentiated against: the detached inputs, then the params.
    variable_list wrt = saved;
    for (size_t i = 0; i < n_inputs; ++i) {
      wrt[i] = saved[i].detach();
      if (saved[i].requires_grad()) wrt[i].requires_grad_(true);
    }
    variable_list outputs;
    {
      at::AutoGradMode grad(true);
      outputs = segment->run(variable_list(wrt.begin(), wrt.begin() + n_inputs));
    }
    TORCH_CHECK(outputs.size() == grad_outputs.size(), "a checkpointed segment gave ", outputs.size(),
                " outputs on recompute but ", grad_outputs.size(), " in forward");

    variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    variable_list targets;
    std::vector<size_t> where;
    for (size_t j = 0; j < wrt.size(); ++j) {
      if (wrt[j].requires_grad()) {
        targets.push_back(wrt[j]);
        where.push_back(j);
      }
    }
    // One gradient per forward argument; the last (the segment) has none.
    variable_list result(saved.size() + 1);
    if (!roots.empty() && !targets.empty()) {
      auto grads = torch::autograd::grad(roots, targets, root_grads, /*retain_graph=*/false,
                                         /*create_graph=*/false, /*allow_unused=*/true);
      for (size_t k = 0; k < grads.size(); ++k) result[where[k]] = grads[k];
    }
    return result;
  }
};

variable_list borrowed(at::Tensor* const* tensors, size_t n) {
  variable_list out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

}  // namespace

extern "C" {

void sdtune_checkpoint_push_output(void* sink, const at::Tensor* t) {
  try {
    static_cast<Sink*>(sink)->outputs.push_back(*t);
  } catch (...) {
  }
}

void sdtune_checkpoint_set_error(void* sink, const char* message, size_t len) {
  try {
    static_cast<Sink*>(sink)->error.assign(message, len);
  } catch (...) {
  }
}

int sdtune_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Runs the closure as one checkpointed node. Takes ownership of `closure`
// (freed through `drop`, now on failure or when the graph goes). Returns
// NULL and the outputs through `take`, or a malloc'ed message.
char* sdtune_checkpoint(at::Tensor* const* inputs, size_t n_inputs, at::Tensor* const* params, size_t n_params,
                        void* closure, sdtune_segment_run run, sdtune_segment_drop drop, void* outputs,
                        sdtune_take_output take) {
  c10::intrusive_ptr<Segment> segment;
  try {
    segment = c10::make_intrusive<Segment>(closure, run, drop);
  } catch (...) {
    drop(closure);
    return sdtune::copy_message("out of memory for a checkpointed segment");
  }
  return sdtune::guarded("a checkpointed segment", [&] {
    const auto input_list = borrowed(inputs, n_inputs);
    const auto param_list = borrowed(params, n_params);
    auto result =
        Checkpoint::apply(at::TensorList(input_list), at::TensorList(param_list), std::move(segment));
    for (auto& t : result) take(outputs, new at::Tensor(std::move(t)));
  });
}

}  // extern "C"
