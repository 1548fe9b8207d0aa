// Shared by the C++ entry points in csrc/: libtorch operators that tch does not bind, reached
// through the dispatcher's boxed calls, with every exception turned into a message.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>
#include <utility>

namespace sd {

inline void set_error(char *error, size_t error_len, const char *message) {
  if (error == nullptr || error_len == 0) return;
  std::strncpy(error, message, error_len - 1);
  error[error_len - 1] = '\0';
}

inline c10::OperatorHandle op(const char *name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// Runs `body`, which returns a pointer; any exception becomes null and a message in `error`.
template <typename F>
auto guarded(char *error, size_t error_len, F &&body) -> decltype(body()) {
  try {
    return body();
  } catch (const std::exception &e) {
    set_error(error, error_len, e.what());
  } catch (...) {
    set_error(error, error_len, "unknown C++ exception");
  }
  return nullptr;
}

// Calls operator `name` with `stack` and returns its first output as a new tensor.
inline at::Tensor *call_for_tensor(const c10::OperatorHandle &handle, torch::jit::Stack stack) {
  handle.callBoxed(&stack);
  return new at::Tensor(stack.at(0).toTensor());
}

}  // namespace sd
