//! What an engine asks before it loads anything: the scheduler names the library knows and
//! the devices this libtorch can run on.
use super::convert::optional_str;
use super::pipeline::parse_device;
use super::status::{guard, sd_status, Fail};
use crate::schedulers::scheduler_names;
use std::ffi::{c_char, CString};
use std::sync::OnceLock;

/// The scheduler names as C strings: (short name, diffusers class), in the library's order.
fn names() -> &'static [(CString, CString)] {
    static NAMES: OnceLock<Vec<(CString, CString)>> = OnceLock::new();
    NAMES.get_or_init(|| {
        scheduler_names()
            .iter()
            .map(|short| {
                let class = crate::schedulers::class_of(short).unwrap_or(short);
                (
                    CString::new(*short).unwrap_or_default(),
                    CString::new(class).unwrap_or_default(),
                )
            })
            .collect()
    })
}

/// How many schedulers the library knows (`sd_scheduler_name` takes an index below it).
///
/// Threading: thread-safe.
#[no_mangle]
pub extern "C" fn sd_scheduler_count() -> usize {
    names().len()
}

/// The short name of scheduler `index` ("ddim", "euler_a", "dpmpp_2m", ...: what
/// `sd_generate_params.scheduler` and `sd_load_options.scheduler` take), or with a non-zero
/// `diffusers_class` its diffusers class name ("EulerAncestralDiscreteScheduler"). A static
/// string; NULL when `index` is out of range.
///
/// Threading: thread-safe.
#[no_mangle]
pub extern "C" fn sd_scheduler_name(index: usize, diffusers_class: i32) -> *const c_char {
    match names().get(index) {
        Some((short, class)) => {
            if diffusers_class != 0 {
                class.as_ptr()
            } else {
                short.as_ptr()
            }
        }
        None => std::ptr::null(),
    }
}

/// Whether `device` ("cpu", "cuda", "cuda:N", "mps"; NULL or "" = "cpu") can run a pipeline
/// with this libtorch on this machine, without loading anything: `SD_OK` when it can,
/// `SD_ERR_UNSUPPORTED` (with the reason in `sd_last_error()`) when this libtorch lacks it or
/// sees no such device, `SD_ERR_INVALID_ARGUMENT` for a name it does not know.
///
/// Threading: thread-safe.
///
/// Pointers: `device` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn sd_device_check(device: *const c_char) -> sd_status {
    guard(|| {
        let name = optional_str(device, "device")?;
        parse_device(name).map(drop).map_err(|f: Fail| Fail {
            message: f.message.replace("options->device is", "device"),
            ..f
        })
    })
}

/// The number of CUDA devices this libtorch sees (0 without CUDA).
///
/// Threading: thread-safe.
#[no_mangle]
pub extern "C" fn sd_cuda_device_count() -> i32 {
    std::panic::catch_unwind(|| i32::try_from(tch::Cuda::device_count()).unwrap_or(0)).unwrap_or(0)
}
