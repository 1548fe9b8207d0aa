//! Status codes, the thread-local last-error message, and the guard that every entry point runs
//! its body in (no panic crosses the boundary; every failure becomes a code plus a message).
use crate::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call did. `SD_OK` (0) is success; any other value is a failure whose message
/// `sd_last_error()` returns on the same thread. New codes may be added at the end: treat an
/// unknown non-zero code as a failure.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum sd_status {
    /// Success.
    SD_OK = 0,
    /// An argument is wrong: a NULL pointer, a string that is not UTF-8, a `struct_size` that
    /// is too small, a size that is zero, too big or not a multiple of 8, a step count out of
    /// range, a call made where it is not allowed. The message names the argument.
    SD_ERR_INVALID_ARGUMENT = 1,
    /// A file or folder is missing or cannot be read (not found, permissions, I/O error).
    SD_ERR_IO = 2,
    /// The model folder is not a usable Stable Diffusion model: a bad config, a missing or
    /// mis-shaped tensor.
    SD_ERR_BAD_MODEL = 3,
    /// A well-formed request this build or this model cannot serve: a device libtorch lacks,
    /// an SDXL model, a UNet layout, newer struct fields this library does not know.
    SD_ERR_UNSUPPORTED = 4,
    /// The run was stopped: the step callback asked for it, or `sd_job_cancel` /
    /// `sd_job_free` / `sd_pipeline_free` did.
    SD_ERR_CANCELLED = 5,
    /// The device or the host ran out of memory.
    SD_ERR_OUT_OF_MEMORY = 6,
    /// libtorch failed (for instance a device error); the message carries libtorch's text.
    SD_ERR_BACKEND = 7,
    /// A bug in this library (it was caught and did not harm the host). Please report it with
    /// the message.
    SD_ERR_INTERNAL = 8,
    /// Not a failure of the job: `sd_job_wait` timed out, or `sd_job_take_images` was called
    /// before the job finished.
    SD_NOT_READY = 9,
}

/// A failure on its way to the caller: the code and the message `sd_last_error()` will give.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub status: sd_status,
    pub message: String,
}

impl Fail {
    pub fn new(status: sd_status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(sd_status::SD_ERR_INVALID_ARGUMENT, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(sd_status::SD_ERR_UNSUPPORTED, message)
    }

    pub fn cancelled() -> Self {
        Self::new(sd_status::SD_ERR_CANCELLED, "cancelled")
    }

    fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Self::new(
            sd_status::SD_ERR_INTERNAL,
            format!("internal error (caught panic): {}", first_part(&what)),
        )
    }
}

/// libtorch's messages carry a C++ backtrace after the first lines: keep what a user can read.
fn first_part(message: &str) -> String {
    let cut = message
        .find("\nException raised from")
        .unwrap_or(message.len());
    message[..cut].trim().to_string()
}

fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("can't allocate memory")
        || m.contains("not enough memory")
        || m.contains("failed to allocate")
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        use sd_status::*;
        let status = match &e {
            Error::InvalidArgument(_) | Error::Image(_) => SD_ERR_INVALID_ARGUMENT,
            Error::Io { .. } => SD_ERR_IO,
            Error::Json { .. }
            | Error::BadModel(_)
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. } => SD_ERR_BAD_MODEL,
            Error::Unsupported(_) => SD_ERR_UNSUPPORTED,
            Error::Cancelled => SD_ERR_CANCELLED,
            Error::Torch(t) if is_out_of_memory(&t.to_string()) => SD_ERR_OUT_OF_MEMORY,
            Error::Torch(_) => SD_ERR_BACKEND,
            Error::Internal(_) => SD_ERR_INTERNAL,
        };
        Self::new(status, first_part(&e.to_string()))
    }
}

impl From<tch::TchError> for Fail {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e).into()
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Makes `message` what `sd_last_error()` returns on this thread (NUL bytes become spaces).
pub(crate) fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // try_with: during thread teardown there is nowhere to keep it, and no one to read it.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = text);
}

/// The message of the last failed call on this thread ("" after a successful one).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Turns an outcome into the status returned to C, recording the message on this thread.
pub(crate) fn report(outcome: Result<(), Fail>) -> sd_status {
    match outcome {
        Ok(()) => {
            set_last_error("");
            sd_status::SD_OK
        }
        Err(fail) => {
            set_last_error(&fail.message);
            fail.status
        }
    }
}

/// Runs the body of an entry point: a panic becomes `SD_ERR_INTERNAL`, an error its code, and
/// the message is recorded for `sd_last_error()`.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Fail>) -> sd_status {
    report(catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| Err(Fail::from_panic(p))))
}

/// Same as [`guard`] for the entry points that return nothing (the `*_free` functions): a
/// panic is recorded as the last error and goes no further.
pub(crate) fn guard_void(body: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(body)) {
        set_last_error(&Fail::from_panic(p).message);
    }
}

/// The first thing of every entry point with an out-pointer: fails, naming it, when it is NULL,
/// else stores `empty` (NULL, 0) in it, so that every later failure leaves it cleared as the
/// header promises.
///
/// # Safety
/// `out` is NULL or valid for writes.
pub(crate) unsafe fn clear_out<T>(out: *mut T, name: &str, empty: T) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::invalid(format!("{name} is NULL")));
    }
    out.write(empty);
    Ok(())
}
