//! Helpers shared by the C ABI tests (tests/ffi_*.rs), which call the exported `sd_*`
//! functions directly, as a C caller would.
#![allow(dead_code)]
use stable_diffusion::ffi::*;
use std::ffi::{c_void, CStr, CString};
use std::mem::size_of;
use std::ptr;

pub fn fixture(name: &str) -> CString {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name);
    CString::new(path.to_str().unwrap()).unwrap()
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(sd_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// Asserts `status`, and that the thread's last error mentions `needle` (case-insensitive).
#[track_caller]
pub fn expect(status: sd_status, want: sd_status, needle: &str) {
    let message = last_error();
    assert_eq!(status, want, "message: {message}");
    assert!(
        message.to_lowercase().contains(&needle.to_lowercase()),
        "message {message:?} does not mention {needle:?}"
    );
}

/// The tiny SD 1.x fixture model, loaded with default options.
pub fn load() -> *mut sd_pipeline {
    let mut p = ptr::null_mut();
    let path = fixture("tiny-sd1");
    let status = unsafe { sd_pipeline_load(path.as_ptr(), ptr::null(), &mut p) };
    assert_eq!(status, sd_status::SD_OK, "{}", last_error());
    assert!(!p.is_null());
    p
}

/// Loads `path` with `sd_load_options_init`'s defaults changed by `edit` (which may also set a
/// smaller `struct_size`, as an older caller would), renders `params(PROMPT, 2, 3)` and frees
/// the pipeline: the first image's bytes.
pub fn render_with_options(
    path: &CStr,
    prompt: &CStr,
    edit: impl FnOnce(&mut sd_load_options),
) -> Vec<u8> {
    let mut o = std::mem::MaybeUninit::<sd_load_options>::zeroed();
    let status = unsafe { sd_load_options_init(o.as_mut_ptr(), size_of::<sd_load_options>()) };
    assert_eq!(status, sd_status::SD_OK);
    let mut o = unsafe { o.assume_init() };
    edit(&mut o);
    let mut pipe = ptr::null_mut();
    let status = unsafe { sd_pipeline_load(path.as_ptr(), &o, &mut pipe) };
    assert_eq!(status, sd_status::SD_OK, "{}", last_error());
    let out = generate(pipe, &params(prompt, 2, 3)).unwrap();
    unsafe { sd_pipeline_free(pipe) };
    out[0].0.clone()
}

/// Defaults from `sd_generate_params_init`, then a quick 32x32 run of `steps` steps.
pub fn params(prompt: &CStr, steps: u32, seed: u64) -> sd_generate_params {
    let mut p = std::mem::MaybeUninit::<sd_generate_params>::zeroed();
    let status =
        unsafe { sd_generate_params_init(p.as_mut_ptr(), size_of::<sd_generate_params>()) };
    assert_eq!(status, sd_status::SD_OK);
    let mut p = unsafe { p.assume_init() };
    p.prompt = prompt.as_ptr();
    p.steps = steps;
    p.seed = seed;
    p.width = 32;
    p.height = 32;
    p
}

/// An image's bytes and its `[width, height, stride, channels]`.
pub type Pixels = (Vec<u8>, [u32; 4]);

/// Pixels of every image, then frees them.
pub fn take(images: *mut sd_images) -> Vec<Pixels> {
    let mut n = 0usize;
    assert_eq!(unsafe { sd_images_count(images, &mut n) }, sd_status::SD_OK);
    let out = (0..n)
        .map(|i| {
            let mut img: *const sd_image = ptr::null();
            assert_eq!(
                unsafe { sd_images_get(images, i, &mut img) },
                sd_status::SD_OK
            );
            let img = unsafe { &*img };
            let len = (img.stride * (img.height - 1) + img.width * img.channels) as usize;
            let bytes = unsafe { std::slice::from_raw_parts(img.data, len) }.to_vec();
            (bytes, [img.width, img.height, img.stride, img.channels])
        })
        .collect();
    unsafe { sd_images_free(images) };
    out
}

/// Runs `sd_generate`, returning the images or the status and message.
pub fn generate(
    pipeline: *mut sd_pipeline,
    params: &sd_generate_params,
) -> Result<Vec<Pixels>, (sd_status, String)> {
    let mut images = ptr::null_mut();
    let status = unsafe { sd_generate(pipeline, params, &mut images) };
    if status != sd_status::SD_OK {
        assert!(images.is_null(), "out_images must be NULL on failure");
        return Err((status, last_error()));
    }
    Ok(take(images))
}

/// A Rust closure as a C step callback: `hook.install(&mut params)` makes `params.on_step`
/// call it. It must not panic (it runs inside an `extern "C"` call): record, assert later.
pub struct StepHook(Box<dyn FnMut(&sd_step_info) -> i32 + Send>);

impl StepHook {
    pub fn new(f: impl FnMut(&sd_step_info) -> i32 + Send + 'static) -> Box<Self> {
        Box::new(Self(Box::new(f)))
    }

    /// `self` lives in its Box, so the pointer stays valid while the Box does.
    pub fn install(&mut self, params: &mut sd_generate_params) {
        params.on_step = Some(trampoline);
        params.step_user_data = self as *mut StepHook as *mut c_void;
    }
}

unsafe extern "C" fn trampoline(info: *const sd_step_info, user_data: *mut c_void) -> i32 {
    let hook = &mut *(user_data as *mut StepHook);
    (hook.0)(&*info)
}

/// The largest difference, in 8-bit levels, between `got` and a float reference image in
/// [0, 1] (diffusers' `output_type="np"`) rounded to levels.
pub fn levels_off(got: &[u8], want: &tch::Tensor) -> f32 {
    let want: Vec<f32> = Vec::try_from(want.flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len(), "image sizes differ");
    got.iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .fold(0.0f32, f32::max)
}
