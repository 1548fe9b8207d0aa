// Weights packed once into oneDNN's blocked layout for the CPU. libtorch's ordinary float32
// convolution reorders its weight into that layout on every call (about 1 s of each SD 1.5
// UNet call on a 2-core AVX2 machine, whatever the image size) and its linear layers repack
// theirs inside the GEMM; the `mkldnn::` operators that torch.compile's CPU backend uses take
// a weight reordered ahead of time instead. tch binds none of them, so they are reached
// through the dispatcher. Every entry point returns a new tensor, or null with `error` filled.
#include "dispatch.h"

#include <vector>

namespace {

std::vector<int64_t> pair(int64_t value) { return {value, value}; }

// The trailing arguments of the `*_pointwise` operators: no fused post-operation.
void push_no_post_op(torch::jit::Stack &stack) {
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
}

}  // namespace

extern "C" {

// `weight` [out, in, k, k] (float32) reordered for a convolution of `input_size`
// ([n, c, h, w]; the layout oneDNN picks depends on it) with the given stride and padding.
at::Tensor *sd_packed_conv_pack(const at::Tensor *weight, const int64_t *input_size,
                                size_t input_dims, int64_t stride, int64_t padding, char *error,
                                size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> at::Tensor * {
    torch::jit::Stack stack;
    stack.emplace_back(weight->contiguous());
    stack.emplace_back(pair(padding));
    stack.emplace_back(pair(stride));
    stack.emplace_back(pair(1));
    stack.emplace_back(int64_t{1});
    stack.emplace_back(std::vector<int64_t>(input_size, input_size + input_dims));
    static const c10::OperatorHandle pack = sd::op("mkldnn::_reorder_convolution_weight");
    return sd::call_for_tensor(pack, std::move(stack));
  });
}

// The convolution of `input` (float32, NCHW) with a weight packed by `sd_packed_conv_pack`,
// plus `bias` (or null).
at::Tensor *sd_packed_conv_run(const at::Tensor *input, const at::Tensor *packed,
                               const at::Tensor *bias, int64_t stride, int64_t padding,
                               char *error, size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> at::Tensor * {
    torch::jit::Stack stack;
    stack.emplace_back(input->contiguous());
    stack.emplace_back(*packed);
    stack.emplace_back(bias != nullptr ? c10::IValue(*bias) : c10::IValue());
    stack.emplace_back(pair(padding));
    stack.emplace_back(pair(stride));
    stack.emplace_back(pair(1));
    stack.emplace_back(int64_t{1});
    push_no_post_op(stack);
    static const c10::OperatorHandle run = sd::op("mkldnn::_convolution_pointwise");
    return sd::call_for_tensor(run, std::move(stack));
  });
}

// `weight` [out, in] (float32) reordered for `mkldnn::_linear_pointwise`.
at::Tensor *sd_packed_linear_pack(const at::Tensor *weight, char *error, size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> at::Tensor * {
    torch::jit::Stack stack;
    stack.emplace_back(weight->contiguous());
    stack.emplace_back(c10::IValue());
    static const c10::OperatorHandle pack = sd::op("mkldnn::_reorder_linear_weight");
    return sd::call_for_tensor(pack, std::move(stack));
  });
}

// `input` [..., in] (float32) times a weight packed by `sd_packed_linear_pack`, plus `bias`.
at::Tensor *sd_packed_linear_run(const at::Tensor *input, const at::Tensor *packed,
                                 const at::Tensor *bias, char *error, size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> at::Tensor * {
    torch::jit::Stack stack;
    stack.emplace_back(input->contiguous());
    stack.emplace_back(*packed);
    stack.emplace_back(bias != nullptr ? c10::IValue(*bias) : c10::IValue());
    push_no_post_op(stack);
    static const c10::OperatorHandle run = sd::op("mkldnn::_linear_pointwise");
    return sd::call_for_tensor(run, std::move(stack));
  });
}

// A packed weight back in its ordinary dense layout.
at::Tensor *sd_packed_to_dense(const at::Tensor *packed, char *error, size_t error_len) {
  return sd::guarded(error, error_len,
                     [&]() -> at::Tensor * { return new at::Tensor(packed->to_dense()); });
}

}  // extern "C"
