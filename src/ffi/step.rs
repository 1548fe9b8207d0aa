//! The step callback's context: `sd_step_info` plus what `sd_step_preview` and
//! `sd_step_latents` read, valid on the callback's thread while the callback runs.
use super::convert::StepCallback;
use super::images::OwnedImage;
use super::status::{clear_out, guard, sd_status, Fail};
use super::types::{sd_image, sd_step_info};
use crate::pipeline::StepInfo;
use std::cell::{OnceCell, RefCell};
use std::time::Duration;
use tch::{Device, Kind};

/// `info` comes first so that the `*const sd_step_info` handed to C is also a pointer to the
/// whole context.
#[repr(C)]
struct StepContext<'a> {
    info: sd_step_info,
    step: &'a StepInfo<'a>,
    previews: OnceCell<Vec<OwnedImage>>,
}

thread_local! {
    /// The contexts of the step callbacks running on this thread, innermost last.
    static ACTIVE: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Calls the C callback for one step; true when it asks to cancel.
pub(crate) fn call(cb: StepCallback, step: &StepInfo, elapsed: Duration) -> bool {
    let dims = step.latents.size();
    let dim = |i: usize| dims.get(i).copied().unwrap_or(0) as u32;
    let ctx = StepContext {
        info: sd_step_info {
            struct_size: std::mem::size_of::<sd_step_info>(),
            step: step.step as u32,
            total: step.total as u32,
            timestep: step.timestep,
            elapsed_seconds: elapsed.as_secs_f64(),
            batch: dim(0),
            latent_channels: dim(1),
            latent_height: dim(2),
            latent_width: dim(3),
        },
        step,
        previews: OnceCell::new(),
    };
    let key = &ctx as *const StepContext as usize;
    ACTIVE.with(|a| a.borrow_mut().push(key));
    // SAFETY: the callback's contract (see `sd_step_fn`).
    let answer = unsafe { (cb.func)(&ctx.info, cb.user_data) };
    ACTIVE.with(|a| a.borrow_mut().retain(|&k| k != key));
    answer != 0
}

/// The context behind `info`, if `info` is the pointer a running callback on this thread got.
fn context<'a>(info: *const sd_step_info) -> Result<&'a StepContext<'a>, Fail> {
    if info.is_null() {
        return Err(Fail::invalid("info is NULL"));
    }
    let key = info as usize;
    if !ACTIVE.with(|a| a.borrow().contains(&key)) {
        return Err(Fail::invalid(
            "info is not the sd_step_info of a step callback running on this thread: \
             previews and latents are only readable inside the callback",
        ));
    }
    // SAFETY: registered in ACTIVE, so it is a live StepContext on this thread's stack.
    Ok(unsafe { &*(info as *const StepContext) })
}

/// Inside the step callback: stores in `*out_image` (NULL on failure) an RGB preview of image
/// `index` of the batch, made from the current latents: decoded at full size by the tiny
/// autoencoder when the pipeline was loaded with one (`sd_load_options.tiny_vae`), else by a
/// cheap fixed linear map (no VAE) at latent resolution (width / 8 x height / 8, well under a
/// millisecond at 512 x 512). It is computed on the first request of a step and is valid
/// until the callback returns.
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `info` is not the pointer the running callback got,
/// `index` >= `info->batch` or `out_image` is NULL; `SD_ERR_UNSUPPORTED` for latents that are
/// not 4-channel without a tiny autoencoder. Call it only from the callback's thread.
///
/// Pointers: `out_image` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sd_step_preview(
    info: *const sd_step_info,
    index: u32,
    out_image: *mut *const sd_image,
) -> sd_status {
    guard(|| {
        clear_out(out_image, "out_image", std::ptr::null())?;
        let ctx = context(info)?;
        if index >= ctx.info.batch {
            return Err(Fail::invalid(format!(
                "index {index} is out of range: the batch has {} images",
                ctx.info.batch
            )));
        }
        if ctx.previews.get().is_none() {
            let made = ctx
                .step
                .previews()?
                .iter()
                .map(|img| OwnedImage::from_rgb(img.width, img.height, &img.rgb, 3))
                .collect();
            let _ = ctx.previews.set(made);
        }
        let previews = ctx.previews.get().expect("set just above");
        let image = previews
            .get(index as usize)
            .ok_or_else(|| Fail::invalid(format!("no preview for image {index}")))?;
        out_image.write(image.view());
        Ok(())
    })
}

/// Inside the step callback: copies the current latents, as 32-bit floats in the layout
/// `[batch][latent_channels][latent_height][latent_width]` (as the UNet sees them), into `dst`,
/// which holds `count` floats, at least the product of those four fields of `info`.
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `info` is not the pointer the running callback got,
/// `dst` is NULL or `count` is too small; `dst` is written only on success. Call it only from
/// the callback's thread.
///
/// Pointers: `dst` is NULL or valid for `count` floats of writes.
#[no_mangle]
pub unsafe extern "C" fn sd_step_latents(
    info: *const sd_step_info,
    dst: *mut f32,
    count: usize,
) -> sd_status {
    guard(|| {
        let ctx = context(info)?;
        let latents = ctx.step.latents;
        let need = latents.numel();
        if dst.is_null() {
            return Err(Fail::invalid("dst is NULL"));
        }
        if count < need {
            return Err(Fail::invalid(format!(
                "count is {count}: the latents need {need} floats"
            )));
        }
        let host = latents
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let out = std::slice::from_raw_parts_mut(dst, need);
        host.f_copy_data(out, need)?;
        Ok(())
    })
}
