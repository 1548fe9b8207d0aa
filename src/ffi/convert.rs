//! C inputs to Rust values: strings, images and the generate parameters, each checked with a
//! message that names the argument at fault.
use super::pipeline::{inner_named, PipelineInner};
use super::status::Fail;
use super::types::{
    read_versioned, sd_generate_params, sd_image, sd_step_fn, sd_step_info, SD_PROMPT_A1111,
    SD_PROMPT_PLAIN, SD_SEAMLESS_NONE, SD_SEAMLESS_X, SD_SEAMLESS_XY, SD_SEAMLESS_Y,
    SD_VAE_TILING_AUTO, SD_VAE_TILING_OFF, SD_VAE_TILING_ON,
};
use crate::image_io::Image;
use crate::pipeline::{
    check_denoising_fraction, check_prompt, FastModes, GenerateParams, MicroConditioning,
    PromptSyntax, Seamless, VaeTiling, MAX_BATCH, MAX_SIDE, MAX_STEPS,
};
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// The largest side of an input image (it is resized to the output size anyway).
const MAX_INPUT_SIDE: u32 = 16384;

/// A required UTF-8 string argument, borrowed.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the returned lifetime.
pub(crate) unsafe fn required_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    CStr::from_ptr(p).to_str().map_err(|e| {
        Fail::invalid(format!(
            "{what} is not valid UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// An optional UTF-8 string argument: NULL and "" both mean "not given".
///
/// # Safety
/// As [`required_str`].
pub(crate) unsafe fn optional_str<'a>(
    p: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    let s = required_str(p, what)?;
    Ok((!s.is_empty()).then_some(s))
}

/// An optional input image, copied into packed RGB (alpha dropped, grey replicated).
///
/// # Safety
/// `p` is NULL or points to an `sd_image` whose `data` covers `stride * (height - 1) +
/// width * channels` readable bytes.
pub(crate) unsafe fn optional_image(p: *const sd_image, what: &str) -> Result<Option<Image>, Fail> {
    let Some(img) = p.as_ref() else {
        return Ok(None);
    };
    let (w, h, c) = (img.width, img.height, img.channels);
    if w == 0 || h == 0 || w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
        return Err(Fail::invalid(format!(
            "{what} is {w}x{h}: each side must be in 1..={MAX_INPUT_SIDE}"
        )));
    }
    if !matches!(c, 1 | 3 | 4) {
        return Err(Fail::invalid(format!(
            "{what}->channels is {c}: use 3 (RGB), 4 (RGBA) or 1 (grey)"
        )));
    }
    let row = w as usize * c as usize;
    let stride = if img.stride == 0 {
        row
    } else {
        img.stride as usize
    };
    if stride < row {
        return Err(Fail::invalid(format!(
            "{what}->stride is {stride}, less than width * channels = {row}"
        )));
    }
    if img.data.is_null() {
        return Err(Fail::invalid(format!("{what}->data is NULL")));
    }
    let bytes = std::slice::from_raw_parts(img.data, stride * (h as usize - 1) + row);
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as usize {
        for px in bytes[y * stride..y * stride + row].chunks_exact(c as usize) {
            match px {
                [g] => rgb.extend_from_slice(&[*g, *g, *g]),
                _ => rgb.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok(Some(Image::new(w, h, rgb)?))
}

/// The C step callback with its user data. The caller of `sd_generate` / `sd_job_submit`
/// promised that both may be used from the thread that runs the work.
#[derive(Clone, Copy)]
pub(crate) struct StepCallback {
    pub func: unsafe extern "C" fn(*const sd_step_info, *mut c_void) -> i32,
    pub user_data: *mut c_void,
}

// SAFETY: documented contract of `sd_step_fn`: it runs on the thread doing the work.
unsafe impl Send for StepCallback {}

/// A generate request, owning all its data (so that a job can outlive the caller's buffers).
pub(crate) struct Request {
    pub params: GenerateParams,
    /// The refiner pipeline and where it takes over (`params->refiner`, `refiner_start`).
    pub refiner: Option<(Arc<PipelineInner>, f64)>,
    /// 3 (RGB) or 4 (RGBA) channels in the returned images.
    pub channels: u32,
    pub on_step: Option<StepCallback>,
    /// Jobs: a preview kept every this many steps (0: none).
    pub preview_every: u32,
}

fn check_range(what: &str, value: u32, max: usize) -> Result<(), Fail> {
    if value == 0 || value as usize > max {
        return Err(Fail::invalid(format!(
            "params->{what} is {value}: it must be in 1..={max}"
        )));
    }
    Ok(())
}

/// An SDXL micro-conditioning size as `(height, width)`: 0 and 0 = the output size (`None`).
fn size_pair(what: &str, width: u32, height: u32) -> Result<Option<(i64, i64)>, Fail> {
    match (width, height) {
        (0, 0) => Ok(None),
        (w, h) if w > 0 && h > 0 => Ok(Some((i64::from(h), i64::from(w)))),
        (w, h) => Err(Fail::invalid(format!(
            "params->{what}_width and {what}_height are {w} and {h}: give both, or 0 and 0 \
             for the output size"
        ))),
    }
}

fn check_side(what: &str, value: u32) -> Result<Option<i64>, Fail> {
    match value {
        0 => Ok(None),
        v if v % 8 != 0 || v as i64 > MAX_SIDE => Err(Fail::invalid(format!(
            "params->{what} is {v}: it must be a multiple of 8 up to {MAX_SIDE} (or 0 for the \
             model's size)"
        ))),
        v => Ok(Some(v as i64)),
    }
}

fn check_number(what: &str, value: f64) -> Result<f64, Fail> {
    if !value.is_finite() {
        return Err(Fail::invalid(format!(
            "params->{what} is {value}: it must be a finite number"
        )));
    }
    Ok(value)
}

/// Reads and checks `sd_generate_params`, copying everything it points to. What needs the
/// model (sizes against its native size, the scheduler name, ...) is checked after this, by
/// `request_for`.
///
/// # Safety
/// `p` is NULL or a valid `sd_generate_params` whose pointers are NULL or valid.
pub(crate) unsafe fn request(
    p: *const sd_generate_params,
    default_scheduler: Option<&str>,
) -> Result<Request, Fail> {
    let c = read_versioned(p, "params")?;
    check_range("steps", c.steps, MAX_STEPS)?;
    check_range("batch", c.batch, MAX_BATCH)?;
    if !matches!(c.output_channels, 3 | 4) {
        return Err(Fail::invalid(format!(
            "params->output_channels is {}: use 3 (RGB) or 4 (RGBA)",
            c.output_channels
        )));
    }
    let strength = check_number("strength", c.strength)?;
    let prompt = required_str(c.prompt, "params->prompt")?;
    check_prompt("params->prompt", prompt)?;
    let negative_prompt = optional_str(c.negative_prompt, "params->negative_prompt")?;
    if let Some(negative) = negative_prompt {
        check_prompt("params->negative_prompt", negative)?;
    }
    let prompt_2 = optional_str(c.prompt_2, "params->prompt_2")?;
    if let Some(p2) = prompt_2 {
        check_prompt("params->prompt_2", p2)?;
    }
    let negative_prompt_2 = optional_str(c.negative_prompt_2, "params->negative_prompt_2")?;
    if let Some(n2) = negative_prompt_2 {
        check_prompt("params->negative_prompt_2", n2)?;
    }
    let micro = MicroConditioning {
        original_size: size_pair("original", c.original_width, c.original_height)?,
        crops_coords_top_left: (i64::from(c.crop_top), i64::from(c.crop_left)),
        target_size: size_pair("target", c.target_width, c.target_height)?,
        aesthetic_score: check_number("aesthetic_score", c.aesthetic_score)?,
        negative_aesthetic_score: check_number(
            "negative_aesthetic_score",
            c.negative_aesthetic_score,
        )?,
        ..Default::default()
    };
    let params = GenerateParams {
        prompt: prompt.to_owned(),
        negative_prompt: negative_prompt.map(str::to_owned),
        steps: c.steps as usize,
        guidance: check_number("guidance", c.guidance)?,
        guidance_rescale: check_number("guidance_rescale", c.guidance_rescale)?,
        seed: c.seed,
        width: check_side("width", c.width)?,
        height: check_side("height", c.height)?,
        batch: c.batch as usize,
        scheduler: optional_str(c.scheduler, "params->scheduler")?
            .or(default_scheduler)
            .map(str::to_owned),
        clip_skip: c.clip_skip as usize,
        eta: check_number("eta", c.eta)?,
        init_image: optional_image(c.init_image, "params->init_image")?,
        mask: optional_image(c.mask, "params->mask")?,
        strength: (strength >= 0.0).then_some(strength),
        paste_back: c.paste_back != 0,
        fast: FastModes {
            cache_interval: c.cache_interval as usize,
            cache_branch: c.cache_branch as usize,
            token_merging: check_number("token_merging", c.token_merging)?,
            int8_linear: c.int8_linear != 0,
        },
        prompt_2: prompt_2.map(str::to_owned),
        negative_prompt_2: negative_prompt_2.map(str::to_owned),
        micro,
        prompt_syntax: match c.prompt_syntax {
            SD_PROMPT_PLAIN => PromptSyntax::Plain,
            SD_PROMPT_A1111 => PromptSyntax::A1111,
            other => {
                return Err(Fail::invalid(format!(
                    "params->prompt_syntax is {other}: use SD_PROMPT_PLAIN or SD_PROMPT_A1111"
                )))
            }
        },
        loras: super::lora::lora_weights(c.loras, c.lora_count)?,
        lora_dir: None,
        seamless: match c.seamless {
            SD_SEAMLESS_NONE => Seamless::OFF,
            SD_SEAMLESS_X => Seamless { x: true, y: false },
            SD_SEAMLESS_Y => Seamless { x: false, y: true },
            SD_SEAMLESS_XY => Seamless::XY,
            other => {
                return Err(Fail::invalid(format!(
                    "params->seamless is {other}: use SD_SEAMLESS_NONE, SD_SEAMLESS_X, \
                     SD_SEAMLESS_Y or SD_SEAMLESS_XY"
                )))
            }
        },
        vae_tiling: match c.vae_tiling {
            SD_VAE_TILING_AUTO => VaeTiling::Auto,
            SD_VAE_TILING_ON => VaeTiling::On,
            SD_VAE_TILING_OFF => VaeTiling::Off,
            other => {
                return Err(Fail::invalid(format!(
                    "params->vae_tiling is {other}: use SD_VAE_TILING_AUTO, SD_VAE_TILING_ON \
                     or SD_VAE_TILING_OFF"
                )))
            }
        },
        vae_tile_size: (c.vae_tile_size != 0).then_some(i64::from(c.vae_tile_size)),
        tiny_vae_decode: c.tiny_vae_decode != 0,
    };
    if params.mask.is_some() && params.init_image.is_none() {
        return Err(Fail::invalid(
            "params->mask is set but params->init_image is NULL: inpainting needs both",
        ));
    }
    let refiner = if c.refiner.is_null() {
        None
    } else {
        let start = check_number("refiner_start", c.refiner_start)?;
        check_denoising_fraction("params->refiner_start", start)?;
        Some((inner_named(c.refiner, "params->refiner")?, start))
    };
    Ok(Request {
        params,
        refiner,
        channels: c.output_channels,
        on_step: step_callback(c.on_step, c.step_user_data),
        preview_every: c.job_preview_every,
    })
}

fn step_callback(f: sd_step_fn, user_data: *mut c_void) -> Option<StepCallback> {
    f.map(|func| StepCallback { func, user_data })
}
