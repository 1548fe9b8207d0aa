// Dynamic int8 linear layers through libtorch's own quantized kernels (fbgemm on x86), which
// tch does not bind: `quantized::linear_prepack` packs a per-channel int8 weight once, and
// `quantized::linear_dynamic` quantizes each input on the fly and multiplies in int8. Reached
// through the dispatcher's boxed calls, so no quantization header beyond the dispatcher is
// needed. Every entry point catches all exceptions and reports them as a message.
#include "dispatch.h"

#include <string>

namespace {

// libtorch warns once, on stderr, that quantized tensors are deprecated in Python; a library
// must not print, and the kernels are what we need.
struct SilentWarnings : c10::WarningHandler {
  void process(const c10::Warning &) override {}
};

}  // namespace

struct sd_int8_linear {
  c10::IValue packed;
};

extern "C" {

// Packs `weight` [out, in] (float32) and `bias` [out] (float32, or null) as a per-output-channel
// symmetric int8 weight. Returns null and fills `error` on failure.
sd_int8_linear *sd_int8_linear_pack(const at::Tensor *weight, const at::Tensor *bias,
                                    char *error, size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> sd_int8_linear * {
    static SilentWarnings silent;
    c10::WarningUtils::WarningHandlerGuard quiet(&silent);
    const at::Tensor w = weight->to(at::kFloat).contiguous();
    const at::Tensor scales = w.abs().amax({1}).clamp_min(1e-8).div(127.0).to(at::kDouble);
    const at::Tensor zero_points = at::zeros({w.size(0)}, at::kLong);
    const at::Tensor q = at::quantize_per_channel(w, scales, zero_points, 0, at::kQInt8);
    torch::jit::Stack stack;
    stack.emplace_back(q);
    if (bias != nullptr) {
      stack.emplace_back(bias->to(at::kFloat).contiguous());
    } else {
      stack.emplace_back(c10::IValue());
    }
    static const c10::OperatorHandle prepack = sd::op("quantized::linear_prepack");
    prepack.callBoxed(&stack);
    return new sd_int8_linear{std::move(stack.at(0))};
  });
}

// `input` [..., in] float32 times the packed weight, plus its bias: a new tensor, or null with
// `error` filled.
at::Tensor *sd_int8_linear_run(const sd_int8_linear *linear, const at::Tensor *input,
                               char *error, size_t error_len) {
  return sd::guarded(error, error_len, [&]() -> at::Tensor * {
    torch::jit::Stack stack;
    stack.emplace_back(input->contiguous());
    stack.emplace_back(linear->packed);
    // 7-bit activations, as PyTorch's dynamic quantization uses on x86: the AVX2 kernels
    // accumulate pairs in 16 bits, which full 8-bit inputs could overflow.
    stack.emplace_back(true);
    static const c10::OperatorHandle run = sd::op("quantized::linear_dynamic");
    return sd::call_for_tensor(run, std::move(stack));
  });
}

void sd_int8_linear_free(sd_int8_linear *linear) { delete linear; }

}  // extern "C"
