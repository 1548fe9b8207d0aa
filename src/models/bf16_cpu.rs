//! bfloat16 on CPUs that have no fast bf16 kernels.
//!
//! libtorch runs bf16 matrix products and convolutions on the CPU through oneDNN only where
//! PyTorch's check for it passes (AVX-512 BW, VL and DQ on x86). Elsewhere (an AVX2 CPU, say)
//! they fall to a scalar reference path: on a 2-core AVX2 machine a 2048x1280 by 1280x1280
//! product took 13.5 s in bf16 against 0.09 s in float32, and a 320-channel 3x3 convolution at
//! 32x32 5.5 s against 0.08 s. A bf16 pipeline there is still wanted, for its memory (weights
//! held at half the bytes), so on such CPUs the layers keep their weights and activations in
//! bf16 and widen them to float32 for the product only. Float32 holds every bf16 value
//! exactly, so the result is the float32 product of the same values, rounded back to bf16.
use crate::Result;
use std::cell::Cell;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

thread_local! {
    static FORCE_WIDEN: Cell<bool> = const { Cell::new(false) };
}

/// Whether libtorch's fast bf16 kernels serve this CPU: the condition under which PyTorch
/// sends bf16 products and convolutions to oneDNN.
pub fn native_kernels() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("bf16")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// While the returned guard lives, bf16 layers on this thread widen to float32 as on a CPU
/// without fast bf16 kernels, whatever this CPU has: lets the tests check that path anywhere.
#[doc(hidden)]
pub fn force_widening() -> super::blocks::FlagGuard {
    super::blocks::FlagGuard::set(&FORCE_WIDEN, true)
}

/// Whether a product or convolution on `xs` should run widened to float32.
pub(crate) fn widens(xs: &Tensor) -> bool {
    xs.kind() == Kind::BFloat16
        && xs.device() == Device::Cpu
        && (FORCE_WIDEN.with(Cell::get) || !native_kernels())
}

/// `t` in float32, which holds every bf16 value exactly.
pub(crate) fn wide(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_kind(Kind::Float)?)
}

/// `y = x W^T + b` ([`Tensor::f_linear`]), widened where [`widens`] says so.
pub(crate) fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !widens(xs) {
        return Ok(xs.f_linear(weight, bias)?);
    }
    let bias = bias.map(wide).transpose()?;
    Ok(wide(xs)?
        .f_linear(&wide(weight)?, bias.as_ref())?
        .f_to_kind(Kind::BFloat16)?)
}

/// A 2-D convolution (one group, no dilation), widened where [`widens`] says so.
pub(crate) fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: i64,
    padding: i64,
) -> Result<Tensor> {
    let conv = |xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>| {
        xs.f_conv2d(
            weight,
            bias,
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        )
    };
    if !widens(xs) {
        return Ok(conv(xs, weight, bias)?);
    }
    let bias = bias.map(wide).transpose()?;
    Ok(conv(&wide(xs)?, &wide(weight)?, bias.as_ref())?.f_to_kind(Kind::BFloat16)?)
}
