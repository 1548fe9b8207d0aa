//! The plain structs and callback types of the C ABI, their `*_init` functions, and the
//! `struct_size` versioning that lets fields be appended without breaking older binaries.
use super::pipeline::sd_pipeline;
use super::status::{guard, sd_status, Fail};
use crate::pipeline::GenerateParams;
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// An 8-bit image: `height` rows of `width` pixels, `channels` bytes per pixel (3 = RGB,
/// 4 = RGBA; inputs may also be 1 = grey), rows `stride` bytes apart, top row first.
///
/// Images the library returns (results, previews) are owned by the library: read them, never
/// free or write them. Images the caller passes in are borrowed for the call only (a job copies
/// them before `sd_job_submit` returns). This struct never changes between versions.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_image {
    /// The first byte of the top row.
    pub data: *const u8,
    pub width: u32,
    pub height: u32,
    /// Bytes from the start of one row to the start of the next, at least
    /// `width * channels`; on input 0 means exactly `width * channels`.
    pub stride: u32,
    /// 3 (RGB) or 4 (RGBA; inputs ignore alpha); inputs may also be 1 (grey).
    pub channels: u32,
}

/// Number type the weights are held and computed in (`sd_load_options.dtype`).
pub type sd_dtype = i32;
/// 32-bit float: the default, and the fastest on CPUs without AVX-512.
pub const SD_DTYPE_FP32: sd_dtype = 0;
/// 16-bit float: halves memory; for CUDA and MPS.
pub const SD_DTYPE_FP16: sd_dtype = 1;
/// bfloat16: halves memory; fastest on CPUs with AVX-512 and on recent GPUs. Other CPUs
/// widen each product to float32: the memory is halved, the step is somewhat slower.
pub const SD_DTYPE_BF16: sd_dtype = 2;

/// The step callback's answer: go on with the run.
pub const SD_STEP_CONTINUE: i32 = 0;
/// The step callback's answer: stop the run; the call then returns `SD_ERR_CANCELLED`. Any
/// non-zero value does the same.
pub const SD_STEP_CANCEL: i32 = 1;

/// How much a log message matters.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum sd_log_level {
    SD_LOG_DEBUG = 0,
    SD_LOG_INFO = 1,
    SD_LOG_WARN = 2,
    SD_LOG_ERROR = 3,
}

/// Receives a pipeline's log messages (see `sd_pipeline_set_log_callback`). `message` is UTF-8,
/// NUL-terminated and valid only during the call. It runs on the thread doing the work: the
/// caller's thread for `sd_generate`, a worker thread for jobs. It must not unwind (no C++
/// exception, no longjmp) and must not call `sd_generate` on the same pipeline.
pub type sd_log_fn = Option<
    unsafe extern "C" fn(level: sd_log_level, message: *const c_char, user_data: *mut c_void),
>;

/// Called after every denoising step (see `sd_generate_params.on_step`). Return
/// `SD_STEP_CONTINUE` (0) to go on, anything else to cancel the run. `info` is valid only
/// during the call; inside it `sd_step_preview` and `sd_step_latents` may be called with that
/// same pointer. It runs on the thread doing the work (a worker thread for jobs), must not
/// unwind (no C++ exception, no longjmp) and must not call `sd_generate` on the same pipeline.
pub type sd_step_fn =
    Option<unsafe extern "C" fn(info: *const sd_step_info, user_data: *mut c_void) -> i32>;

/// How to load a pipeline. Fill it with `sd_load_options_init`, then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_load_options {
    /// `sizeof(sd_load_options)` as the caller was compiled; set by `sd_load_options_init`.
    pub struct_size: usize,
    /// "cpu" (default when NULL or ""), "cuda" (= "cuda:0"), "cuda:N" or "mps". UTF-8,
    /// borrowed for the call.
    pub device: *const c_char,
    /// One of the `SD_DTYPE_*` values; default `SD_DTYPE_FP32`.
    pub dtype: sd_dtype,
    /// The scheduler used when a generate call names none: a short name ("ddim", "euler_a",
    /// ...), a diffusers class name or an A1111 sampler name; unknown names are refused with
    /// the list of known ones. NULL or "" (default): the one in the model's `scheduler/` config.
    pub scheduler: *const c_char,
    /// Single-file checkpoints: a diffusers folder whose `unet/`, `vae/` and `text_encoder/`
    /// configs, `tokenizer/` and `scheduler/` replace the ones detected from the file (as the
    /// CLI's `--config` and diffusers' `from_single_file(config=...)`). UTF-8, borrowed for the
    /// call; NULL or "" (default): detect them.
    pub config_dir: *const c_char,
    /// Single-file checkpoints holding both UNet copies: non-zero renders the EMA copy
    /// (`model_ema.*`); 0 (default) the non-EMA weights, as diffusers, A1111 and ComfyUI do.
    /// A file with only the EMA copy uses it either way.
    pub use_ema: i32,
    /// Non-zero copies every weight into memory of the library's own. 0 (default): on the CPU,
    /// a diffusers folder's weights stored in the requested dtype are used in place from a
    /// private copy-on-write map of their files (loading reads only the headers; nothing is
    /// ever written to the files). The files must then stay as they are while the pipeline
    /// lives: truncating one under a running pipeline faults the process, and rewriting one
    /// changes the weights it reads, as with any memory-mapped weights (the pages of a part
    /// that is idle are let go between calls and read back from the file).
    pub copy_weights: i32,
    /// Which kernels float32 models run with on the CPU, one of `SD_WEIGHTS_*`.
    /// `SD_WEIGHTS_AUTO` (0, the default) picks the faster for the family: weights packed
    /// once into oneDNN's blocked layout for SD 1.x/2.x, libtorch's plain kernels for SDXL
    /// (packing its weights costs more than it saves); a text encoder used in place from its
    /// file stays plain, so that its weights leave memory between prompts. `SD_WEIGHTS_PLAIN`
    /// (1) and `SD_WEIGHTS_PACKED` (2) force one. The two differ by rounding only (within 1e-5); a
    /// pipeline always uses the same, so its images depend on each call's parameters only.
    pub plain_weights: i32,
    /// The folder where the `<lora:NAME:WEIGHT>` tags of prompts read with
    /// `SD_PROMPT_A1111` find `NAME.safetensors`. UTF-8, copied; NULL or "" (default): none
    /// (a tag is then an error).
    pub lora_dir: *const c_char,
    /// A folder of textual-inversion embeddings (A1111 `.pt` / `.safetensors`, diffusers
    /// `learned_embeds`, SDXL `clip_l` / `clip_g`), each used in prompts by its file's name.
    /// Files that are not embeddings, or are made for another model, are skipped and named in
    /// a warning at the first generate call. UTF-8, copied; NULL or "" (default): none. A
    /// missing folder fails the load (`SD_ERR_INVALID_ARGUMENT`).
    pub embeddings_dir: *const c_char,
    /// A tiny autoencoder (TAESD / TAESDXL: a diffusers `AutoencoderTiny` folder, or one
    /// `.safetensors` file in diffusers' or the original layout): `sd_step_preview` then
    /// decodes full-size previews with it, and `sd_generate_params.tiny_vae_decode` may use it
    /// as the final decoder. Its latents must match the model's. UTF-8, copied; NULL or ""
    /// (default): none.
    pub tiny_vae: *const c_char,
    /// Called on the loading thread after every tensor read (and as each part starts), with
    /// how far the load has come; return `SD_STEP_CONTINUE` (0) to go on, anything else to
    /// cancel the load, which then fails with `SD_ERR_CANCELLED` having released everything it
    /// had built. NULL (default): no progress.
    pub on_progress: sd_load_progress_fn,
    /// Handed to `on_progress` (and kept by an async load until it ends).
    pub progress_user_data: *mut c_void,
    /// Receives the load's own messages (what was loaded and how long it took, embeddings
    /// skipped) and then the pipeline's, as if `sd_pipeline_set_log_callback` had been called
    /// right at the start. NULL (default): none.
    pub log_fn: sd_log_fn,
    pub log_user_data: *mut c_void,
    /// CPU threads the pipeline's calls compute with (libtorch's intra-op threads, set on the
    /// thread running each call, so pipelines on different threads keep their own). 0
    /// (default): the process default, the physical cores. On a machine shared with a game,
    /// fewer threads can run much faster. At most 1024.
    pub num_threads: u32,
}

/// How far a load has come (`sd_load_options.on_progress`, `sd_load_job_poll`). Set
/// `struct_size` to `sizeof(sd_load_progress)` before polling; a callback gets a filled one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_load_progress {
    pub struct_size: usize,
    /// `SD_JOB_RUNNING` during a load; an async load's final state once it ended.
    pub state: sd_job_state,
    /// The part being loaded ("text encoder", "second text encoder", "UNet", "VAE", "tiny
    /// autoencoder", "done"; "" before the first), a static string.
    pub component: *const c_char,
    /// Tensors read so far.
    pub tensors_done: u64,
    /// Bytes of those tensors as the files store them.
    pub bytes_done: u64,
    /// The weight files' bytes, known before loading starts (0 when not known, e.g. for
    /// TorchScript): `bytes_done / bytes_total` is the fraction done, exactly 1 once the
    /// component is "done".
    pub bytes_total: u64,
    /// Seconds since the load started.
    pub elapsed_seconds: f64,
}

/// Receives load progress (see `sd_load_options.on_progress`). `progress` is valid only during
/// the call. It runs on the loading thread (a worker thread for `sd_pipeline_load_async`), must
/// not unwind (no C++ exception, no longjmp) and must not load on that thread.
pub type sd_load_progress_fn =
    Option<unsafe extern "C" fn(progress: *const sd_load_progress, user_data: *mut c_void) -> i32>;

/// One LoRA of a call and its weight (`sd_generate_params.loras`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_lora_weight {
    /// A live `sd_lora`, borrowed for the call.
    pub lora: *const super::lora::sd_lora,
    /// How strongly it applies to the UNet and the text encoders: 1 as trained, 0 not at all,
    /// negative to push away from it; finite, at most 1000 in size.
    pub weight: f64,
}

/// What to generate. Fill it with `sd_generate_params_init`, then set at least `prompt`.
///
/// The mode follows from the images given: no `init_image` = text to image; `init_image` =
/// image to image; `init_image` and `mask` = inpainting.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_generate_params {
    /// `sizeof(sd_generate_params)` as the caller was compiled; set by `sd_generate_params_init`.
    pub struct_size: usize,
    /// The prompt, UTF-8 (required; "" is allowed; at most 65536 bytes, of which the text
    /// encoder reads the first 77 tokens). Borrowed for the call.
    pub prompt: *const c_char,
    /// What to steer away from, UTF-8, at most 65536 bytes; NULL = "". Borrowed for the call.
    pub negative_prompt: *const c_char,
    /// Denoising steps, 1..=1000 (default 50; a scheduler may allow fewer, e.g. DDIM's
    /// "leading" spacing at most 999). Image to image runs `steps * strength` of them.
    pub steps: u32,
    /// Images generated for the prompt, 1..=64 (default 1).
    pub batch: u32,
    /// Output width and height in pixels: multiples of 8 up to 4096, or 0 (default) for the
    /// model's native size (image to image: the init image's size rounded down to 8).
    pub width: u32,
    pub height: u32,
    /// Classifier-free guidance scale (default 7.5); <= 1 turns guidance off.
    pub guidance: f64,
    /// The seed of all the noise; the same seed, model and parameters give the same images.
    pub seed: u64,
    /// Image to image / inpainting: how much noise covers the init image, 0..=1; negative
    /// (default -1) = 0.8 for image to image, 1.0 for inpainting.
    pub strength: f64,
    /// DDIM's eta (default 0, deterministic); ignored by schedulers without one.
    pub eta: f64,
    /// Text-encoder layers to skip from the end (default 0).
    pub clip_skip: u32,
    /// Channels of the returned images: 3 = RGB (default) or 4 = RGBA with opaque alpha.
    pub output_channels: u32,
    /// Scheduler for this call, named as in `sd_load_options.scheduler`; NULL or "" (default)
    /// = the pipeline's. Borrowed for the call.
    pub scheduler: *const c_char,
    /// Image to image and inpainting: the image to start from (NULL = text to image). Resized
    /// to width x height when it differs. Borrowed for the call.
    pub init_image: *const sd_image,
    /// Inpainting: white = repaint, black = keep (needs `init_image`). Borrowed for the call.
    pub mask: *const sd_image,
    /// Inpainting: non-zero copies the original pixels back outside the mask (default 0).
    pub paste_back: i32,
    /// Called after every step (NULL = none). See `sd_step_fn`.
    pub on_step: sd_step_fn,
    /// Passed to `on_step` unchanged.
    pub step_user_data: *mut c_void,
    /// Step caching (DeepCache), an opt-in fast mode: every `cache_interval`-th UNet call is
    /// a full pass and the others reuse its deep features. 0 (default) and 1 = off; 3 is
    /// about twice as fast at some cost in fidelity (see the README).
    pub cache_interval: u32,
    /// The skip connection the cached features enter at: 0 (default) is the fastest, larger
    /// values recompute more layers and stay closer to the exact image.
    pub cache_branch: u32,
    /// Token merging (ToMe), an opt-in fast mode: the fraction of the self-attention tokens
    /// merged at the finest resolution with attention (the full latent resolution in SD 1.x /
    /// 2.x), 0..=0.75; 0 (default) = off, 0.5 is the usual setting.
    pub token_merging: f64,
    /// Non-zero runs the UNet's linear layers in dynamic int8, an opt-in fast mode for float32
    /// pipelines on the CPU (refused elsewhere); 0 (default) = off.
    pub int8_linear: i32,
    /// SDXL: the prompt of the second text encoder, UTF-8; NULL (default) = `prompt`.
    /// Ignored by models with one text encoder. Borrowed for the call.
    pub prompt_2: *const c_char,
    /// SDXL: the negative prompt of the second text encoder; NULL (default) =
    /// `negative_prompt`. Borrowed for the call.
    pub negative_prompt_2: *const c_char,
    /// SDXL micro-conditioning, in pixels: the size the image is said to come from; 0 and 0
    /// (default) = the output size.
    pub original_width: u32,
    pub original_height: u32,
    /// SDXL micro-conditioning: the top-left corner of the crop (default 0, 0).
    pub crop_left: u32,
    pub crop_top: u32,
    /// SDXL micro-conditioning: the target size; 0 and 0 (default) = the output size.
    pub target_width: u32,
    pub target_height: u32,
    /// Pulls the guided prediction's spread back toward the conditional one's (diffusers'
    /// `guidance_rescale`, A1111's CFG rescale), 0..=1; 0 (default) = off.
    pub guidance_rescale: f64,
    /// The SDXL refiner's aesthetic score for the conditional pass (default 6.0) and the
    /// unconditional one (default 2.5); other models ignore them.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    /// SDXL: a refiner pipeline (another `sd_pipeline`, e.g. stable-diffusion-xl-refiner)
    /// that takes over this pipeline's latents, without a decode, for the last part of the
    /// schedule (diffusers' ensemble of experts: `denoising_end` here, `denoising_start`
    /// there) and decodes them. NULL (default) = none. Borrowed for the call; a job keeps it
    /// alive until it finishes. The two pipelines are both held while the call runs.
    pub refiner: *const sd_pipeline,
    /// With `refiner`: the fraction of the schedule after which the refiner takes over,
    /// strictly between 0 and 1 (default 0.8).
    pub refiner_start: f64,
    /// How the prompts are read, one of `SD_PROMPT_*`: `SD_PROMPT_PLAIN` (0, default) as
    /// diffusers (the text as it is, cut at 77 tokens); `SD_PROMPT_A1111` (1) as the A1111 web
    /// UI (`(word:1.2)`, `[word]`, `BREAK`, prompts longer than 75 tokens in chunks, and
    /// `<lora:NAME:WEIGHT>` tags in the prompt, which apply `NAME.safetensors` from
    /// `sd_load_options.lora_dir`).
    pub prompt_syntax: i32,
    /// LoRAs applied to this call only (after those of the prompt's tags): `lora_count`
    /// entries, borrowed for the call (a job keeps what it needs). NULL / 0 (default): none.
    /// The model is never changed: a call without them runs as if they had never been
    /// applied. A LoRA that does not fit the model is refused (`SD_ERR_INVALID_ARGUMENT`,
    /// naming its first tensor at fault); another kind of network was refused by
    /// `sd_lora_load`. At most 64. An SDXL refiner phase runs without them.
    pub loras: *const sd_lora_weight,
    pub lora_count: usize,
    /// Seamless tiling, one of `SD_SEAMLESS_*`: the axes along which the image wraps around,
    /// so that it tiles without a seam (every convolution of the UNet and the VAE pads
    /// circularly along them, for this call only). `SD_SEAMLESS_NONE` (0, default): off, the
    /// image exactly as without this field.
    pub seamless: i32,
    /// VAE tiling, one of `SD_VAE_TILING_*`: `SD_VAE_TILING_AUTO` (0, default) decodes (and
    /// encodes an init image) in overlapping tiles above 1536 x 1536 pixels, which bounds the
    /// VAE's memory by the tile; `SD_VAE_TILING_ON` whenever the image is larger than a tile;
    /// `SD_VAE_TILING_OFF` never. Tiling on with a seamless axis is refused.
    pub vae_tiling: i32,
    /// The VAE tile's side in pixels: a multiple of 4 latent cells (32 pixels for SD), at
    /// least 8 cells. 0 (default): the VAE's `sample_size` (512 for SD 1.x, 1024 for SDXL).
    pub vae_tile_size: u32,
    /// Non-zero decodes the final images with the tiny autoencoder given in
    /// `sd_load_options.tiny_vae` (much faster, slightly less detailed); refused when none was
    /// loaded. 0 (default): the VAE.
    pub tiny_vae_decode: i32,
    /// Jobs only: every this many steps the job makes a preview of its images (as
    /// `sd_step_preview` would) and keeps the latest for `sd_job_take_preview`, so that a
    /// game loop can show progress without a callback. 0 (default): none. The cheap preview
    /// costs well under a millisecond per step; a tiny autoencoder's costs one small decode.
    pub job_preview_every: u32,
}

/// What the step callback sees. Owned by the library, valid during the callback only.
/// Fields may be appended in later versions: `struct_size` says how many this library fills.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_step_info {
    /// `sizeof(sd_step_info)` as this library was built.
    pub struct_size: usize,
    /// Steps done so far, 1..=total.
    pub step: u32,
    /// Steps this run takes.
    pub total: u32,
    /// The scheduler's timestep of the step just done.
    pub timestep: f64,
    /// Seconds since the run started (text encoding included).
    pub elapsed_seconds: f64,
    /// Images in the run; `sd_step_preview` takes an index below it.
    pub batch: u32,
    /// Shape of the latents `[batch, latent_channels, latent_height, latent_width]` that
    /// `sd_step_latents` copies out (`latent_height` = height / 8 for SD 1.x / 2.x).
    pub latent_channels: u32,
    pub latent_height: u32,
    pub latent_width: u32,
}

/// Where a job is.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum sd_job_state {
    /// Waiting for the pipeline (another call or job is using it).
    SD_JOB_QUEUED = 0,
    /// Generating.
    SD_JOB_RUNNING = 1,
    /// Finished with images: `sd_job_take_images` gives them.
    SD_JOB_SUCCEEDED = 2,
    /// Finished with an error: `sd_job_wait` returns its code and sets its message.
    SD_JOB_FAILED = 3,
    /// Stopped by `sd_job_cancel`, the step callback or `sd_pipeline_free`.
    SD_JOB_CANCELLED = 4,
}

/// A job's progress, as `sd_job_poll` reports it. Set `struct_size` to `sizeof(sd_job_progress)` before
/// the call; the library fills the fields it knows that fit.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_job_progress {
    pub struct_size: usize,
    pub state: sd_job_state,
    /// Steps done so far.
    pub step: u32,
    /// Steps the run takes; 0 until the first step is done.
    pub total: u32,
    /// Seconds since `sd_job_submit`.
    pub elapsed_seconds: f64,
}

/// A struct whose first field is `struct_size: usize` and whose every bit pattern is valid
/// (integers, floats, raw and function pointers only), so that a prefix of it can be copied.
///
/// # Safety
/// Implement it only for `#[repr(C)]` structs that satisfy the above.
pub(crate) unsafe trait Versioned: Copy {
    const NAME: &'static str;
    /// Bytes of the first released version of the struct: the least a caller may give.
    const MIN_SIZE: usize;
    fn defaults() -> Self;
}

/// More than this in `struct_size` is a garbage value, not a newer header.
const MAX_STRUCT_SIZE: usize = 1 << 16;

fn check_size<T: Versioned>(size: usize, what: &str) -> Result<(), Fail> {
    if size < T::MIN_SIZE || size > MAX_STRUCT_SIZE {
        return Err(Fail::invalid(format!(
            "{what}->struct_size is {size}: set it to sizeof({}) (this library knows {} bytes)",
            T::NAME,
            size_of::<T>()
        )));
    }
    Ok(())
}

/// Reads a caller's struct: fields past its `struct_size` (an older caller) take their
/// defaults; bytes past ours (a newer caller) must be zero, or `SD_ERR_UNSUPPORTED`.
///
/// # Safety
/// `p` is NULL or points to at least `p->struct_size` readable bytes.
pub(crate) unsafe fn read_versioned<T: Versioned>(p: *const T, what: &str) -> Result<T, Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    let raw = p as *const u8;
    let size = (raw as *const usize).read_unaligned();
    check_size::<T>(size, what)?;
    let ours = size_of::<T>();
    if size > ours {
        let extra = std::slice::from_raw_parts(raw.add(ours), size - ours);
        if extra.iter().any(|&b| b != 0) {
            return Err(Fail::unsupported(format!(
                "{what} sets fields that this library ({} bytes of {}) does not know; \
                 update libstable_diffusion",
                ours,
                T::NAME
            )));
        }
    }
    let mut value = T::defaults();
    std::ptr::copy_nonoverlapping(raw, &mut value as *mut T as *mut u8, size.min(ours));
    value_set_size(&mut value, ours);
    Ok(value)
}

/// Writes `value` into a caller's struct of `size` bytes (the fields that fit) and sets its
/// `struct_size` to the bytes written.
///
/// # Safety
/// `dst` is NULL or valid for `size` bytes of writes.
pub(crate) unsafe fn write_versioned<T: Versioned>(
    dst: *mut T,
    size: usize,
    mut value: T,
    what: &str,
) -> Result<(), Fail> {
    if dst.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    check_size::<T>(size, what)?;
    let n = size.min(size_of::<T>());
    value_set_size(&mut value, n);
    std::ptr::copy_nonoverlapping(&value as *const T as *const u8, dst as *mut u8, n);
    Ok(())
}

fn value_set_size<T: Versioned>(value: &mut T, size: usize) {
    // SAFETY: every Versioned struct starts with `struct_size: usize`.
    unsafe { (value as *mut T as *mut usize).write(size) }
}

unsafe impl Versioned for sd_load_options {
    const NAME: &'static str = "sd_load_options";
    const MIN_SIZE: usize = offset_of!(sd_load_options, scheduler) + size_of::<*const c_char>();
    fn defaults() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            device: std::ptr::null(),
            dtype: SD_DTYPE_FP32,
            scheduler: std::ptr::null(),
            config_dir: std::ptr::null(),
            use_ema: 0,
            copy_weights: 0,
            plain_weights: 0,
            lora_dir: std::ptr::null(),
            embeddings_dir: std::ptr::null(),
            tiny_vae: std::ptr::null(),
            on_progress: None,
            progress_user_data: std::ptr::null_mut(),
            log_fn: None,
            log_user_data: std::ptr::null_mut(),
            num_threads: 0,
        }
    }
}

/// How prompts are read (`sd_generate_params.prompt_syntax`).
pub type sd_prompt_syntax = i32;
/// As diffusers: the text as it is, cut at 77 tokens.
pub const SD_PROMPT_PLAIN: sd_prompt_syntax = 0;
/// As the A1111 web UI: attention weights, `BREAK`, long prompts in chunks of 75 tokens.
pub const SD_PROMPT_A1111: sd_prompt_syntax = 1;

/// Seamless tiling (`sd_generate_params.seamless`): which axes wrap around.
pub type sd_seamless = i32;
/// Off: no axis wraps.
pub const SD_SEAMLESS_NONE: sd_seamless = 0;
/// Left and right edges meet (the image tiles horizontally).
pub const SD_SEAMLESS_X: sd_seamless = 1;
/// Top and bottom edges meet (the image tiles vertically).
pub const SD_SEAMLESS_Y: sd_seamless = 2;
/// Both: the image tiles in both directions.
pub const SD_SEAMLESS_XY: sd_seamless = 3;

/// VAE tiling (`sd_generate_params.vae_tiling`).
pub type sd_vae_tiling = i32;
/// Tiles above 1536 x 1536 pixels, unless a seamless axis is on.
pub const SD_VAE_TILING_AUTO: sd_vae_tiling = 0;
/// Tiles whenever the image is larger than one tile.
pub const SD_VAE_TILING_ON: sd_vae_tiling = 1;
/// Never tiles.
pub const SD_VAE_TILING_OFF: sd_vae_tiling = 2;

/// Kernels for float32 weights on the CPU (`sd_load_options.plain_weights`).
pub type sd_weights = i32;
/// The faster for the model's family: packed for SD 1.x/2.x, plain for SDXL.
pub const SD_WEIGHTS_AUTO: sd_weights = 0;
/// libtorch's plain kernels.
pub const SD_WEIGHTS_PLAIN: sd_weights = 1;
/// Weights packed once into oneDNN's blocked layout at each layer's first run.
pub const SD_WEIGHTS_PACKED: sd_weights = 2;

/// Model families (`sd_pipeline_info.family`).
pub type sd_family = i32;
/// Stable Diffusion 1.x (CLIP ViT-L text encoder; native 512x512).
pub const SD_FAMILY_SD1: sd_family = 1;
/// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder; native 512 or 768).
pub const SD_FAMILY_SD2: sd_family = 2;
/// SDXL base and its fine-tunes, inpainting and Turbo variants (two text encoders; native
/// 1024x1024).
pub const SD_FAMILY_SDXL: sd_family = 3;
/// The SDXL refiner: refines images, or a base pipeline's latents as `sd_generate_params.refiner`;
/// it does not generate from text alone.
pub const SD_FAMILY_SDXL_REFINER: sd_family = 4;

/// What the UNet predicts (`sd_pipeline_info.prediction_type`).
pub type sd_prediction = i32;
/// The added noise (epsilon).
pub const SD_PREDICTION_EPSILON: sd_prediction = 0;
/// The velocity (v-prediction, e.g. SD 2.x 768 models).
pub const SD_PREDICTION_V: sd_prediction = 1;
/// The clean sample.
pub const SD_PREDICTION_SAMPLE: sd_prediction = 2;

/// Kinds of device (`sd_pipeline_info.device_type`).
pub type sd_device_type = i32;
pub const SD_DEVICE_CPU: sd_device_type = 0;
pub const SD_DEVICE_CUDA: sd_device_type = 1;
pub const SD_DEVICE_MPS: sd_device_type = 2;

/// What a pipeline loaded, so that an engine can adapt its UI (sizes, modes, sliders). Set
/// `struct_size = sizeof(sd_pipeline_info)` and call `sd_pipeline_get_info`; fields may be appended
/// in later versions.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sd_pipeline_info {
    pub struct_size: usize,
    /// One of the `SD_FAMILY_*` values.
    pub family: sd_family,
    /// The size generated when `width` / `height` are 0, in pixels.
    pub native_width: u32,
    pub native_height: u32,
    /// One of the `SD_PREDICTION_*` values.
    pub prediction_type: sd_prediction,
    /// UNet input channels: `latent_channels` (4) for ordinary models, 2 x latent + 1 (9)
    /// for inpainting models, which need an init image and a mask.
    pub unet_in_channels: u32,
    pub latent_channels: u32,
    /// Pixels per latent cell on each side (8): `width` and `height` must be multiples of it.
    pub vae_scale_factor: u32,
    /// The largest `clip_skip` accepted; -1 when the text encoder does not say (TorchScript).
    pub max_clip_skip: i32,
    /// The scheduler a request without one runs (a diffusers class name, UTF-8). Owned by the
    /// pipeline, valid until `sd_pipeline_free`; "" when unknown.
    pub default_scheduler: *const c_char,
    /// The `SD_DTYPE_*` the weights are held in.
    pub dtype: sd_dtype,
    /// One of the `SD_DEVICE_*` values, and the device's index (CUDA; else 0).
    pub device_type: sd_device_type,
    pub device_index: i32,
}

unsafe impl Versioned for sd_pipeline_info {
    const NAME: &'static str = "sd_pipeline_info";
    const MIN_SIZE: usize = size_of::<Self>();
    fn defaults() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            family: 0,
            native_width: 0,
            native_height: 0,
            prediction_type: 0,
            unet_in_channels: 0,
            latent_channels: 0,
            vae_scale_factor: 0,
            max_clip_skip: -1,
            default_scheduler: std::ptr::null(),
            dtype: 0,
            device_type: 0,
            device_index: 0,
        }
    }
}

/// Where the base hands over to the refiner unless told (diffusers' documented 0.8).
pub const SD_DEFAULT_REFINER_START: f64 = 0.8;

unsafe impl Versioned for sd_generate_params {
    const NAME: &'static str = "sd_generate_params";
    const MIN_SIZE: usize =
        offset_of!(sd_generate_params, step_user_data) + size_of::<*mut c_void>();
    fn defaults() -> Self {
        let d = GenerateParams::default();
        Self {
            struct_size: size_of::<Self>(),
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            steps: d.steps as u32,
            batch: d.batch as u32,
            width: 0,
            height: 0,
            guidance: d.guidance,
            seed: d.seed,
            strength: -1.0,
            eta: d.eta,
            clip_skip: d.clip_skip as u32,
            output_channels: 3,
            scheduler: std::ptr::null(),
            init_image: std::ptr::null(),
            mask: std::ptr::null(),
            paste_back: d.paste_back as i32,
            on_step: None,
            step_user_data: std::ptr::null_mut(),
            cache_interval: d.fast.cache_interval as u32,
            cache_branch: d.fast.cache_branch as u32,
            token_merging: d.fast.token_merging,
            int8_linear: d.fast.int8_linear as i32,
            prompt_2: std::ptr::null(),
            negative_prompt_2: std::ptr::null(),
            original_width: 0,
            original_height: 0,
            crop_left: 0,
            crop_top: 0,
            target_width: 0,
            target_height: 0,
            guidance_rescale: d.guidance_rescale,
            aesthetic_score: d.micro.aesthetic_score,
            negative_aesthetic_score: d.micro.negative_aesthetic_score,
            refiner: std::ptr::null(),
            refiner_start: SD_DEFAULT_REFINER_START,
            prompt_syntax: SD_PROMPT_PLAIN,
            loras: std::ptr::null(),
            lora_count: 0,
            seamless: SD_SEAMLESS_NONE,
            vae_tiling: SD_VAE_TILING_AUTO,
            vae_tile_size: 0,
            tiny_vae_decode: d.tiny_vae_decode as i32,
            job_preview_every: 0,
        }
    }
}

unsafe impl Versioned for sd_load_progress {
    const NAME: &'static str = "sd_load_progress";
    const MIN_SIZE: usize = size_of::<sd_load_progress>();
    fn defaults() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            state: sd_job_state::SD_JOB_QUEUED,
            component: c"".as_ptr(),
            tensors_done: 0,
            bytes_done: 0,
            bytes_total: 0,
            elapsed_seconds: 0.0,
        }
    }
}

unsafe impl Versioned for sd_job_progress {
    const NAME: &'static str = "sd_job_progress";
    const MIN_SIZE: usize = offset_of!(sd_job_progress, elapsed_seconds) + size_of::<f64>();
    fn defaults() -> Self {
        Self {
            struct_size: size_of::<Self>(),
            state: sd_job_state::SD_JOB_QUEUED,
            step: 0,
            total: 0,
            elapsed_seconds: 0.0,
        }
    }
}

/// Fills `options` with the defaults (CPU, fp32, the model's scheduler). Pass
/// `sizeof(sd_load_options)` as `struct_size`: the library writes no more than that.
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `options` is NULL or `struct_size` is too small.
/// Thread-safe.
///
/// Pointers: `options` is NULL or valid for `struct_size` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn sd_load_options_init(
    options: *mut sd_load_options,
    struct_size: usize,
) -> sd_status {
    guard(|| write_versioned(options, struct_size, sd_load_options::defaults(), "options"))
}

/// Fills `params` with the defaults (50 steps, guidance 7.5, seed 0, the model's size, batch 1,
/// RGB output, no callback) and a NULL prompt, which must be set before use. Pass
/// `sizeof(sd_generate_params)` as `struct_size`: the library writes no more than that.
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `params` is NULL or `struct_size` is too small.
/// Thread-safe.
///
/// Pointers: `params` is NULL or valid for `struct_size` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn sd_generate_params_init(
    params: *mut sd_generate_params,
    struct_size: usize,
) -> sd_status {
    guard(|| {
        write_versioned(
            params,
            struct_size,
            sd_generate_params::defaults(),
            "params",
        )
    })
}
