//! Weights packed once into oneDNN's blocked layout, the default for float32 layers on the CPU.
//! libtorch's plain float32 convolution reorders its weight into that layout on every call:
//! about 1 s of each SD 1.5 UNet call on a 2-core AVX2 machine, at any image size. The
//! operators torch.compile's CPU backend uses (`mkldnn::_convolution_pointwise`,
//! `mkldnn::_linear_pointwise`) take a weight reordered ahead of time instead; tch does not
//! bind them, so `csrc/packed_weights.cpp` reaches them through libtorch's dispatcher.
//!
//! A layer packs its weight the first time it runs (a convolution's layout depends on the
//! shape of its input) and from then on the packed copy is the weight: the dense one is let go
//! (see [`release_dense`]), so packing costs no memory once a model has run.
use std::ffi::{c_char, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn sd_packed_conv_pack(
        weight: *const C_tensor,
        input_size: *const i64,
        input_dims: usize,
        stride: i64,
        padding: i64,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
    fn sd_packed_conv_run(
        input: *const C_tensor,
        packed: *const C_tensor,
        bias: *const C_tensor,
        stride: i64,
        padding: i64,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
    fn sd_packed_linear_pack(
        weight: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
    fn sd_packed_linear_run(
        input: *const C_tensor,
        packed: *const C_tensor,
        bias: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
    fn sd_packed_to_dense(
        packed: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
}

const ERROR_LEN: usize = 512;

/// Calls a `csrc/` entry point that returns a new object, or null with a message written into
/// the buffer it is given.
pub(crate) fn c_call<T>(
    call: impl FnOnce(*mut c_char, usize) -> *mut T,
) -> std::result::Result<*mut T, String> {
    let mut error = [0 as c_char; ERROR_LEN];
    let out = call(error.as_mut_ptr(), ERROR_LEN);
    if out.is_null() {
        // SAFETY: the C side always NUL-terminates within the buffer (zeroed beforehand).
        let message = unsafe { CStr::from_ptr(error.as_ptr()) };
        return Err(message.to_string_lossy().into_owned());
    }
    Ok(out)
}

/// [`c_call`] for an entry point that returns a new tensor.
pub(crate) fn c_tensor_call(
    call: impl FnOnce(*mut c_char, usize) -> *mut C_tensor,
) -> std::result::Result<Tensor, String> {
    let out = c_call(call)?;
    // SAFETY: a `new at::Tensor` handed over to us, as tch's own bindings do.
    Ok(unsafe { Tensor::from_ptr(out) })
}

fn optional(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr())
}

/// `weight` `[out, in, k, k]` packed for a convolution whose input has shape `input_size`.
pub fn pack_conv(
    weight: &Tensor,
    input_size: &[i64],
    stride: i64,
    padding: i64,
) -> std::result::Result<Tensor, String> {
    // SAFETY: the tensors and the slice outlive the call.
    c_tensor_call(|error, len| unsafe {
        sd_packed_conv_pack(
            weight.as_ptr(),
            input_size.as_ptr(),
            input_size.len(),
            stride,
            padding,
            error,
            len,
        )
    })
}

/// The convolution of `xs` (NCHW) with a weight made by [`pack_conv`].
pub fn conv(
    xs: &Tensor,
    packed: &Tensor,
    bias: Option<&Tensor>,
    stride: i64,
    padding: i64,
) -> std::result::Result<Tensor, String> {
    // SAFETY: the tensors outlive the call.
    c_tensor_call(|error, len| unsafe {
        sd_packed_conv_run(
            xs.as_ptr(),
            packed.as_ptr(),
            optional(bias),
            stride,
            padding,
            error,
            len,
        )
    })
}

/// `weight` `[out, in]` packed for [`linear`].
pub fn pack_linear(weight: &Tensor) -> std::result::Result<Tensor, String> {
    // SAFETY: the tensor outlives the call.
    c_tensor_call(|error, len| unsafe { sd_packed_linear_pack(weight.as_ptr(), error, len) })
}

/// `xs` `[..., in]` times a weight made by [`pack_linear`], plus `bias`.
pub fn linear(
    xs: &Tensor,
    packed: &Tensor,
    bias: Option<&Tensor>,
) -> std::result::Result<Tensor, String> {
    // SAFETY: the tensors outlive the call.
    c_tensor_call(|error, len| unsafe {
        sd_packed_linear_run(xs.as_ptr(), packed.as_ptr(), optional(bias), error, len)
    })
}

/// A packed weight back in its ordinary dense layout.
pub fn to_dense(packed: &Tensor) -> std::result::Result<Tensor, String> {
    // SAFETY: the tensor outlives the call.
    c_tensor_call(|error, len| unsafe { sd_packed_to_dense(packed.as_ptr(), error, len) })
}

/// Lets go of the dense copy of a weight that has been packed: if its bytes are a view of a
/// weight file's map, their pages are dropped (they read back from the file if the dense
/// weight is ever used again) and `false` is returned; otherwise the tensor is emptied, its
/// memory freed, and `true` says so (the dense weight must then come from the packed one).
pub fn release_dense(weight: &Tensor) -> bool {
    if crate::weights::release_tensor_if_mapped(weight) {
        return false;
    }
    // The same TensorImpl as the variable store's variable: emptying it frees the storage.
    let mut shared = weight.shallow_clone();
    shared.f_set_().is_ok()
}
