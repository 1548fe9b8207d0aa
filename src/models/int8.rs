//! Dynamic int8 linear layers, an opt-in fast mode on the CPU: each weight is quantized once
//! per output channel (symmetric, 8 bits) and packed for libtorch's fbgemm kernels; each input
//! is quantized on the fly (7 bits, as PyTorch's dynamic quantization does on x86) and the
//! product accumulates in int32. tch does not bind these operators, so `csrc/int8_linear.cpp`
//! reaches them through libtorch's dispatcher. The packed copy is made the first time a layer
//! runs in this mode and kept beside the float weight, which the exact mode still uses.
use super::blocks::FlagGuard;
use super::packed::{c_call, c_tensor_call};
use crate::{Error, Result};
use std::cell::Cell;
use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

#[repr(C)]
struct RawInt8Linear {
    _opaque: [u8; 0],
}

extern "C" {
    fn sd_int8_linear_pack(
        weight: *const C_tensor,
        bias: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut RawInt8Linear;
    fn sd_int8_linear_run(
        linear: *const RawInt8Linear,
        input: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
    fn sd_int8_linear_free(linear: *mut RawInt8Linear);
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// While the returned guard lives, linear layers run on this thread use their int8 form when
/// `enabled` (the UNet sets it for the calls that ask for it).
pub fn enable(enabled: bool) -> FlagGuard {
    FlagGuard::set(&ENABLED, enabled)
}

pub(crate) fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// A linear layer's weight and bias packed as int8 for the CPU.
pub struct Int8Linear {
    raw: *mut RawInt8Linear,
}

// SAFETY: the packed parameters are immutable once made, and fbgemm's dynamic linear only
// reads them, from any thread.
unsafe impl Send for Int8Linear {}
unsafe impl Sync for Int8Linear {}

impl std::fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Int8Linear")
    }
}

impl Int8Linear {
    /// Packs a float `weight` `[out, in]` and `bias` `[out]`.
    pub fn pack(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        // SAFETY: the tensors outlive the call; the C side copies what it keeps.
        let raw = c_call(|error, len| unsafe {
            sd_int8_linear_pack(
                weight.as_ptr(),
                bias.map_or(std::ptr::null(), |b| b.as_ptr()),
                error,
                len,
            )
        })
        .map_err(|why| {
            Error::Unsupported(format!(
                "int8 linear layers: packing a {:?} weight failed: {why}",
                weight.size()
            ))
        })?;
        Ok(Self { raw })
    }

    /// `xs` `[..., in]` (float32) through the packed layer.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // SAFETY: `self.raw` is a live packed layer and `xs` outlives the call.
        c_tensor_call(|error, len| unsafe { sd_int8_linear_run(self.raw, xs.as_ptr(), error, len) })
            .map_err(|why| Error::Internal(format!("int8 linear layer on {:?}: {why}", xs.size())))
    }
}

impl Drop for Int8Linear {
    fn drop(&mut self) {
        // SAFETY: made by `sd_int8_linear_pack`, freed once.
        unsafe { sd_int8_linear_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Against a direct computation of the same scheme: weights rounded per output channel to
    /// 127 levels, inputs per tensor to 7 bits with a zero point (PyTorch's dynamic
    /// quantization), the product exact in integers.
    #[test]
    fn int8_linear_matches_the_quantized_product() {
        let _g = tch::no_grad_guard();
        for (seed, (rows, inp, out)) in [(3, 16, 8), (5, 40, 24), (2, 77, 320), (1, 3, 1)]
            .into_iter()
            .enumerate()
        {
            let _lock = crate::rng::GLOBAL_RNG.lock();
            tch::manual_seed(seed as i64);
            let opts = (Kind::Float, Device::Cpu);
            let x = Tensor::randn([2, rows, inp], opts);
            let w = Tensor::randn([out, inp], opts).f_mul_scalar(0.2).unwrap();
            let b = Tensor::randn([out], opts);
            drop(_lock);
            let packed = Int8Linear::pack(&w, Some(&b)).unwrap();
            let got = packed.forward(&x).unwrap();
            assert_eq!(got.size(), [2, rows, out]);
            let exact = x.linear(&w, Some(&b));
            // The reference of the scheme: fake-quantized operands in double precision.
            let scale_w = w.abs().amax([1i64].as_slice(), true).clamp_min(1e-8) / 127.0;
            let wq = (&w / &scale_w).round().clamp(-127.0, 127.0) * &scale_w;
            let (lo, hi) = (
                f64::try_from(x.min()).unwrap().min(0.0),
                f64::try_from(x.max()).unwrap().max(0.0),
            );
            let scale_x = (hi - lo) / 127.0;
            let zero = (-lo / scale_x).round();
            let xq = ((&x / scale_x).round() + zero)
                .clamp(0.0, 127.0)
                .f_sub_scalar(zero)
                .unwrap()
                * scale_x;
            let reference = xq
                .to_kind(Kind::Double)
                .linear(&wq.to_kind(Kind::Double), Some(&b.to_kind(Kind::Double)));
            let diff = f64::try_from((got.to_kind(Kind::Double) - &reference).abs().max()).unwrap();
            let scale = f64::try_from(exact.abs().max()).unwrap();
            assert!(
                diff <= 1e-3 * scale,
                "case {seed}: {diff} against outputs up to {scale}"
            );
            let err = f64::try_from((got - exact).abs().max()).unwrap();
            assert!(
                err <= 0.1 * scale,
                "case {seed}: int8 error {err} of {scale}"
            );
        }
    }

    #[test]
    fn the_mode_is_scoped_to_its_guard() {
        assert!(!enabled());
        {
            let _on = enable(true);
            assert!(enabled());
            {
                let _off = enable(false);
                assert!(!enabled());
            }
            assert!(enabled());
        }
        assert!(!enabled());
    }
}
