//! The C ABI (`include/stable_diffusion.h`, generated from this module by cbindgen in
//! build.rs). No model logic lives here: it checks and converts C arguments, calls
//! [`crate::pipeline`], and turns every outcome into an `sd_status` plus a thread-local message.
//!
//! Every entry point runs inside [`status::guard`] (`catch_unwind`), so no panic reaches the
//! caller; libtorch's C++ exceptions are already turned into errors by tch's `f_*` methods.
#![allow(non_camel_case_types)]
// The C-facing docs state the pointer contracts under "Pointers:" instead of "# Safety".
#![allow(clippy::missing_safety_doc)]

// The header follows the order of these declarations (one per group, so rustfmt keeps it).

/// Status codes, last error, the catch_unwind guard.
mod status;

/// Structs, callback types, `*_init`, `struct_size` versioning.
mod types;

/// Loading, logging and the blocking generate call.
mod pipeline;

/// LoRA handles.
mod lora;

/// Preview and latents inside the step callback.
mod step;

/// The returned images.
mod images;

/// The asynchronous job API.
mod job;

/// Loading on a worker thread.
mod load_job;

/// Scheduler names and devices, without a model.
mod system;

/// C arguments to Rust values (no exports).
mod convert;

pub use images::{sd_images, sd_images_count, sd_images_free, sd_images_get};
pub use job::{
    sd_job, sd_job_cancel, sd_job_free, sd_job_poll, sd_job_submit, sd_job_take_images,
    sd_job_take_preview, sd_job_wait,
};
pub use load_job::{
    sd_load_job, sd_load_job_cancel, sd_load_job_free, sd_load_job_poll, sd_load_job_take_pipeline,
    sd_load_job_wait, sd_pipeline_load_async,
};
pub use lora::{sd_lora, sd_lora_free, sd_lora_load};
pub use pipeline::{
    sd_generate, sd_pipeline, sd_pipeline_free, sd_pipeline_get_info, sd_pipeline_load,
    sd_pipeline_load_from_memory, sd_pipeline_set_log_callback,
};
pub use status::sd_status;
pub use step::{sd_step_latents, sd_step_preview};
pub use system::{sd_cuda_device_count, sd_device_check, sd_scheduler_count, sd_scheduler_name};
pub use types::{
    sd_device_type, sd_dtype, sd_family, sd_generate_params, sd_generate_params_init, sd_image,
    sd_job_progress, sd_job_state, sd_load_options, sd_load_options_init, sd_load_progress,
    sd_load_progress_fn, sd_log_fn, sd_log_level, sd_lora_weight, sd_pipeline_info, sd_prediction,
    sd_prompt_syntax, sd_step_fn, sd_step_info, sd_weights, SD_DEVICE_CPU, SD_DEVICE_CUDA,
    SD_DEVICE_MPS, SD_DTYPE_BF16, SD_DTYPE_FP16, SD_DTYPE_FP32, SD_FAMILY_SD1, SD_FAMILY_SD2,
    SD_FAMILY_SDXL, SD_FAMILY_SDXL_REFINER, SD_PREDICTION_EPSILON, SD_PREDICTION_SAMPLE,
    SD_PREDICTION_V, SD_PROMPT_A1111, SD_PROMPT_PLAIN, SD_SEAMLESS_NONE, SD_SEAMLESS_X,
    SD_SEAMLESS_XY, SD_SEAMLESS_Y, SD_STEP_CANCEL, SD_STEP_CONTINUE, SD_VAE_TILING_AUTO,
    SD_VAE_TILING_OFF, SD_VAE_TILING_ON, SD_WEIGHTS_AUTO, SD_WEIGHTS_PACKED, SD_WEIGHTS_PLAIN,
};

use std::ffi::c_char;

/// The version of the ABI this header describes. It changes only when an existing function or
/// struct field changes incompatibly (fields are only ever appended, guarded by
/// `struct_size`). Compare it with `sd_abi_version()` at start-up.
pub const SD_ABI_VERSION: u32 = 1;

/// The ABI version of the loaded library; equal to `SD_ABI_VERSION` of the header the caller
/// was compiled with, or the two are incompatible. Thread-safe, never fails.
#[no_mangle]
pub extern "C" fn sd_abi_version() -> u32 {
    SD_ABI_VERSION
}

/// The library's version, e.g. "0.1.0": a static UTF-8 string, never freed. Thread-safe.
#[no_mangle]
pub extern "C" fn sd_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last call on this thread that returned an error (UTF-8), or "" when
/// that call succeeded. The library owns the string; it stays valid until the next call into
/// the library on this thread. Never NULL. Thread-safe (each thread has its own).
#[no_mangle]
pub extern "C" fn sd_last_error() -> *const c_char {
    status::last_error_ptr()
}

/// A short static English name of a status code ("ok", "invalid argument", ...), never NULL.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn sd_status_string(status: i32) -> *const c_char {
    let text: &'static str = match status {
        0 => "ok\0",
        1 => "invalid argument\0",
        2 => "not found or unreadable\0",
        3 => "bad model\0",
        4 => "unsupported\0",
        5 => "cancelled\0",
        6 => "out of memory\0",
        7 => "backend error\0",
        8 => "internal error\0",
        9 => "not ready\0",
        _ => "unknown status\0",
    };
    text.as_ptr().cast()
}
