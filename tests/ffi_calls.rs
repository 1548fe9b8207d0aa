//! The C ABI called as a C program would: every entry point with bad arguments (status code and
//! message), the results of each mode, the step callback (preview, latents, cancel), the log
//! callback and `struct_size` versioning.
mod common;
mod ffi_util;

use ffi_util::*;
use stable_diffusion::ffi::sd_status::*;
use stable_diffusion::ffi::*;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::size_of;
use std::ptr;
use std::sync::{Arc, Mutex};

const PROMPT: &CStr = c"a red circle";

fn null_mut<T>() -> *mut T {
    ptr::null_mut()
}

#[test]
fn version_and_status_strings() {
    assert_eq!(sd_abi_version(), SD_ABI_VERSION);
    let version = unsafe { CStr::from_ptr(sd_version()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let name = |s: i32| {
        unsafe { CStr::from_ptr(sd_status_string(s)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(name(SD_OK as i32), "ok");
    assert_eq!(name(SD_ERR_INVALID_ARGUMENT as i32), "invalid argument");
    assert_eq!(name(SD_NOT_READY as i32), "not ready");
    assert_eq!(name(-3), "unknown status");
    assert_eq!(name(1000), "unknown status");
}

#[test]
fn init_functions_check_their_arguments() {
    unsafe {
        expect(
            sd_generate_params_init(null_mut(), size_of::<sd_generate_params>()),
            SD_ERR_INVALID_ARGUMENT,
            "params is NULL",
        );
        let mut p = params(PROMPT, 1, 0);
        expect(
            sd_generate_params_init(&mut p, 4),
            SD_ERR_INVALID_ARGUMENT,
            "struct_size",
        );
        expect(
            sd_load_options_init(null_mut(), size_of::<sd_load_options>()),
            SD_ERR_INVALID_ARGUMENT,
            "options is NULL",
        );
        let mut o = std::mem::zeroed::<sd_load_options>();
        expect(
            sd_load_options_init(&mut o, 1 << 20),
            SD_ERR_INVALID_ARGUMENT,
            "struct_size",
        );
        // A newer caller's bigger struct: the library fills what it knows and says so.
        let mut big = [0u8; size_of::<sd_generate_params>() + 16];
        let status = sd_generate_params_init(big.as_mut_ptr().cast(), big.len());
        assert_eq!(status, SD_OK);
        assert_eq!(last_error(), "");
        let filled = ptr::read_unaligned(big.as_ptr().cast::<sd_generate_params>());
        assert_eq!(filled.struct_size, size_of::<sd_generate_params>());
        assert_eq!(
            (filled.steps, filled.batch, filled.output_channels),
            (50, 1, 3)
        );
        assert!(filled.prompt.is_null() && filled.on_step.is_none());
        assert!(filled.strength < 0.0);
    }
}

#[test]
fn load_reports_each_kind_of_failure() {
    let model = fixture("tiny-sd1");
    let mut p = ptr::null_mut();
    unsafe {
        expect(
            sd_pipeline_load(ptr::null(), ptr::null(), &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "model_path is NULL",
        );
        expect(
            sd_pipeline_load(model.as_ptr(), ptr::null(), null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_pipeline is NULL",
        );
        let bad_utf8 = b"tests/fixtures/\xff\xfe\0";
        expect(
            sd_pipeline_load(bad_utf8.as_ptr().cast(), ptr::null(), &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "not valid UTF-8",
        );
        let missing = fixture("no-such-model");
        expect(
            sd_pipeline_load(missing.as_ptr(), ptr::null(), &mut p),
            SD_ERR_IO,
            "not found",
        );
        let not_a_model = fixture("tokenizer");
        expect(
            sd_pipeline_load(not_a_model.as_ptr(), ptr::null(), &mut p),
            SD_ERR_BAD_MODEL,
            "unet",
        );
        assert!(p.is_null());

        let mut o = std::mem::zeroed::<sd_load_options>();
        assert_eq!(
            sd_load_options_init(&mut o, size_of::<sd_load_options>()),
            SD_OK
        );
        let tpu = c"tpu";
        o.device = tpu.as_ptr();
        expect(
            sd_pipeline_load(model.as_ptr(), &o, &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "device",
        );
        let cuda = c"cuda:7";
        o.device = cuda.as_ptr();
        if !tch::Cuda::is_available() || tch::Cuda::device_count() < 8 {
            expect(
                sd_pipeline_load(model.as_ptr(), &o, &mut p),
                SD_ERR_UNSUPPORTED,
                "cuda:7",
            );
        }
        o.device = ptr::null();
        o.dtype = 42;
        expect(
            sd_pipeline_load(model.as_ptr(), &o, &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "dtype is 42",
        );
        o.dtype = SD_DTYPE_FP32;
        for weights in [3, -1, i32::MAX] {
            o.plain_weights = weights;
            expect(
                sd_pipeline_load(model.as_ptr(), &o, &mut p),
                SD_ERR_INVALID_ARGUMENT,
                &format!("plain_weights is {weights}"),
            );
        }
        o.plain_weights = SD_WEIGHTS_AUTO;
        let nope = c"NoSuchScheduler";
        o.scheduler = nope.as_ptr();
        expect(
            sd_pipeline_load(model.as_ptr(), &o, &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "NoSuchScheduler",
        );
        o.scheduler = ptr::null();
        o.struct_size = 3;
        expect(
            sd_pipeline_load(model.as_ptr(), &o, &mut p),
            SD_ERR_INVALID_ARGUMENT,
            "struct_size is 3",
        );
        assert!(p.is_null());
    }
}

#[test]
fn options_from_a_newer_header_are_refused_only_when_they_set_unknown_fields() {
    #[repr(C)]
    struct Newer {
        known: sd_load_options,
        unknown: u64,
    }
    let model = fixture("tiny-sd1");
    let mut newer = Newer {
        known: unsafe { std::mem::zeroed() },
        unknown: 0,
    };
    unsafe {
        assert_eq!(
            sd_load_options_init(&mut newer.known, size_of::<sd_load_options>()),
            SD_OK
        );
        newer.known.struct_size = size_of::<Newer>();
        let mut p = ptr::null_mut();
        assert_eq!(
            sd_pipeline_load(model.as_ptr(), &newer.known, &mut p),
            SD_OK,
            "{}",
            last_error()
        );
        sd_pipeline_free(p);
        newer.unknown = 1;
        p = ptr::null_mut();
        expect(
            sd_pipeline_load(model.as_ptr(), &newer.known, &mut p),
            SD_ERR_UNSUPPORTED,
            "does not know",
        );
        assert!(p.is_null());
    }
}

#[test]
fn generate_rejects_bad_parameters_with_a_message() {
    let p = load();
    let ok = params(PROMPT, 1, 0);
    let bad_utf8 = b"\xc3\x28 broken\0";
    let nope = c"NoSuchScheduler";
    let pixels = vec![200u8; 16 * 16 * 4];
    let image = |w, h, stride, channels, data: *const u8| sd_image {
        data,
        width: w,
        height: h,
        stride,
        channels,
    };
    let good_image = image(16, 16, 0, 3, pixels.as_ptr());
    type Change<'a> = Box<dyn Fn(&mut sd_generate_params) + 'a>;
    let cases: Vec<(&str, Change, sd_status, &str)> = vec![
        (
            "null prompt",
            Box::new(|g| g.prompt = ptr::null()),
            SD_ERR_INVALID_ARGUMENT,
            "prompt is NULL",
        ),
        (
            "bad prompt",
            Box::new(|g| g.prompt = bad_utf8.as_ptr().cast()),
            SD_ERR_INVALID_ARGUMENT,
            "prompt is not valid UTF-8",
        ),
        (
            "bad negative",
            Box::new(|g| g.negative_prompt = bad_utf8.as_ptr().cast()),
            SD_ERR_INVALID_ARGUMENT,
            "negative_prompt",
        ),
        (
            "zero steps",
            Box::new(|g| g.steps = 0),
            SD_ERR_INVALID_ARGUMENT,
            "steps is 0",
        ),
        (
            "absurd steps",
            Box::new(|g| g.steps = 4_000_000_000),
            SD_ERR_INVALID_ARGUMENT,
            "steps is 4000000000",
        ),
        (
            "zero batch",
            Box::new(|g| g.batch = 0),
            SD_ERR_INVALID_ARGUMENT,
            "batch is 0",
        ),
        (
            "huge batch",
            Box::new(|g| g.batch = 100_000),
            SD_ERR_INVALID_ARGUMENT,
            "batch",
        ),
        (
            "width 33",
            Box::new(|g| g.width = 33),
            SD_ERR_INVALID_ARGUMENT,
            "width is 33",
        ),
        (
            "height 12",
            Box::new(|g| g.height = 12),
            SD_ERR_INVALID_ARGUMENT,
            "height is 12",
        ),
        (
            "huge width",
            Box::new(|g| g.width = u32::MAX - 7),
            SD_ERR_INVALID_ARGUMENT,
            "width",
        ),
        (
            "NaN guidance",
            Box::new(|g| g.guidance = f64::NAN),
            SD_ERR_INVALID_ARGUMENT,
            "guidance",
        ),
        (
            "infinite eta",
            Box::new(|g| g.eta = f64::INFINITY),
            SD_ERR_INVALID_ARGUMENT,
            "eta",
        ),
        (
            "negative eta",
            Box::new(|g| g.eta = -1.0),
            SD_ERR_INVALID_ARGUMENT,
            "eta",
        ),
        (
            "strength 2",
            Box::new(move |g| {
                g.init_image = &good_image;
                g.strength = 2.0
            }),
            SD_ERR_INVALID_ARGUMENT,
            "strength",
        ),
        (
            "2 channels out",
            Box::new(|g| g.output_channels = 2),
            SD_ERR_INVALID_ARGUMENT,
            "output_channels",
        ),
        (
            "clip skip",
            Box::new(|g| g.clip_skip = 1000),
            SD_ERR_INVALID_ARGUMENT,
            "clip_skip",
        ),
        (
            "scheduler",
            Box::new(|g| g.scheduler = nope.as_ptr()),
            SD_ERR_INVALID_ARGUMENT,
            "NoSuchScheduler",
        ),
        (
            "mask alone",
            Box::new(move |g| g.mask = &good_image),
            SD_ERR_INVALID_ARGUMENT,
            "init_image",
        ),
        (
            "struct_size",
            Box::new(|g| g.struct_size = 8),
            SD_ERR_INVALID_ARGUMENT,
            "struct_size is 8",
        ),
        (
            "token merging 0.9",
            Box::new(|g| g.token_merging = 0.9),
            SD_ERR_INVALID_ARGUMENT,
            "token merging ratio",
        ),
        (
            "token merging NaN",
            Box::new(|g| g.token_merging = f64::NAN),
            SD_ERR_INVALID_ARGUMENT,
            "token_merging",
        ),
        (
            "cache branch",
            Box::new(|g| {
                g.cache_interval = 2;
                g.cache_branch = 1000
            }),
            SD_ERR_INVALID_ARGUMENT,
            "step cache branch",
        ),
    ];
    for (what, change, status, needle) in cases {
        let mut g = ok;
        change(&mut g);
        let (got, message) = generate(p, &g).expect_err(what);
        assert_eq!(got, status, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
    }

    let pixel_ptr = pixels.as_ptr();
    let image_cases: Vec<(sd_image, &str)> = vec![
        (image(16, 16, 0, 3, ptr::null()), "init_image->data is NULL"),
        (image(0, 16, 0, 3, pixel_ptr), "init_image is 0x16"),
        (
            image(16, 100_000, 0, 3, pixel_ptr),
            "init_image is 16x100000",
        ),
        (image(16, 16, 0, 2, pixel_ptr), "channels is 2"),
        (image(16, 16, 20, 3, pixel_ptr), "stride is 20"),
    ];
    for (img, needle) in image_cases {
        let mut g = ok;
        g.init_image = &img;
        let (got, message) = generate(p, &g).expect_err(needle);
        assert_eq!(got, SD_ERR_INVALID_ARGUMENT, "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    unsafe {
        let mut out = ptr::null_mut();
        expect(
            sd_generate(null_mut(), &ok, &mut out),
            SD_ERR_INVALID_ARGUMENT,
            "pipeline is NULL",
        );
        expect(
            sd_generate(p, ptr::null(), &mut out),
            SD_ERR_INVALID_ARGUMENT,
            "params is NULL",
        );
        expect(
            sd_generate(p, &ok, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_images is NULL",
        );
        // Not a pipeline at all (a zeroed block): refused, not dereferenced as one.
        let mut junk = [0u64; 16];
        expect(
            sd_generate(junk.as_mut_ptr().cast(), &ok, &mut out),
            SD_ERR_INVALID_ARGUMENT,
            "not a live sd_pipeline",
        );
        expect(
            sd_pipeline_set_log_callback(null_mut(), None, ptr::null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "pipeline is NULL",
        );
        sd_pipeline_free(ptr::null_mut()); // ignored
        sd_pipeline_free(p);
    }
}

#[test]
fn images_and_step_accessors_check_their_arguments() {
    unsafe {
        let mut n = 0usize;
        expect(
            sd_images_count(ptr::null(), &mut n),
            SD_ERR_INVALID_ARGUMENT,
            "images is NULL",
        );
        let mut img: *const sd_image = ptr::null();
        expect(
            sd_images_get(ptr::null(), 0, &mut img),
            SD_ERR_INVALID_ARGUMENT,
            "images is NULL",
        );
        sd_images_free(null_mut()); // ignored

        let p = load();
        let g = params(PROMPT, 1, 0);
        let mut images = ptr::null_mut();
        assert_eq!(sd_generate(p, &g, &mut images), SD_OK, "{}", last_error());
        expect(
            sd_images_count(images, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_count is NULL",
        );
        expect(
            sd_images_get(images, 1, &mut img),
            SD_ERR_INVALID_ARGUMENT,
            "index 1 is out of range",
        );
        expect(
            sd_images_get(images, 0, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_image is NULL",
        );
        sd_images_free(images);

        // Outside a callback there is no step to read.
        let info = std::mem::zeroed::<sd_step_info>();
        expect(
            sd_step_preview(&info, 0, &mut img),
            SD_ERR_INVALID_ARGUMENT,
            "inside the callback",
        );
        expect(
            sd_step_preview(ptr::null(), 0, &mut img),
            SD_ERR_INVALID_ARGUMENT,
            "info is NULL",
        );
        let mut buf = [0f32; 64];
        expect(
            sd_step_latents(&info, buf.as_mut_ptr(), 64),
            SD_ERR_INVALID_ARGUMENT,
            "inside the callback",
        );
        sd_pipeline_free(p);
    }
}

#[test]
fn job_functions_check_their_arguments() {
    unsafe {
        let p = load();
        let ok = params(PROMPT, 1, 0);
        let mut job = ptr::null_mut();
        expect(
            sd_job_submit(null_mut(), &ok, &mut job),
            SD_ERR_INVALID_ARGUMENT,
            "pipeline is NULL",
        );
        expect(
            sd_job_submit(p, ptr::null(), &mut job),
            SD_ERR_INVALID_ARGUMENT,
            "params is NULL",
        );
        expect(
            sd_job_submit(p, &ok, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_job is NULL",
        );
        let mut bad = ok;
        bad.width = 31;
        expect(
            sd_job_submit(p, &bad, &mut job),
            SD_ERR_INVALID_ARGUMENT,
            "width is 31",
        );
        assert!(job.is_null());

        let mut progress = std::mem::zeroed::<sd_job_progress>();
        progress.struct_size = size_of::<sd_job_progress>();
        expect(
            sd_job_poll(ptr::null(), &mut progress),
            SD_ERR_INVALID_ARGUMENT,
            "job is NULL",
        );
        expect(
            sd_job_cancel(null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "job is NULL",
        );
        expect(
            sd_job_wait(null_mut(), 0),
            SD_ERR_INVALID_ARGUMENT,
            "job is NULL",
        );
        let mut images = ptr::null_mut();
        expect(
            sd_job_take_images(null_mut(), &mut images),
            SD_ERR_INVALID_ARGUMENT,
            "job is NULL",
        );
        sd_job_free(null_mut()); // ignored

        assert_eq!(sd_job_submit(p, &ok, &mut job), SD_OK, "{}", last_error());
        expect(
            sd_job_poll(job, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "progress is NULL",
        );
        progress.struct_size = 2;
        expect(
            sd_job_poll(job, &mut progress),
            SD_ERR_INVALID_ARGUMENT,
            "struct_size is 2",
        );
        expect(
            sd_job_take_images(job, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_images is NULL",
        );
        assert_eq!(sd_job_wait(job, -1), SD_OK, "{}", last_error());
        assert_eq!(
            sd_job_wait(job, i64::MAX),
            SD_OK,
            "an endless timeout is fine"
        );
        assert_eq!(sd_job_take_images(job, &mut images), SD_OK);
        let taken = take(images);
        assert_eq!(taken.len(), 1);
        expect(
            sd_job_take_images(job, &mut images),
            SD_ERR_INVALID_ARGUMENT,
            "already taken",
        );
        assert!(images.is_null());
        sd_job_free(job);
        sd_pipeline_free(p);
    }
}

#[test]
fn txt2img_gives_deterministic_rgb_and_rgba() {
    let p = load();
    let g = params(PROMPT, 2, 7);
    let a = generate(p, &g).unwrap();
    assert_eq!(last_error(), "", "a successful call clears the message");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1, [32, 32, 96, 3]);
    assert_eq!(
        generate(p, &g).unwrap()[0].0,
        a[0].0,
        "same seed, same bytes"
    );

    let mut other = g;
    other.seed = 8;
    assert_ne!(generate(p, &other).unwrap()[0].0, a[0].0);

    let mut rgba = g;
    rgba.output_channels = 4;
    let b = generate(p, &rgba).unwrap();
    assert_eq!(b[0].1, [32, 32, 128, 4]);
    let rgb_of_rgba: Vec<u8> = b[0].0.chunks(4).flat_map(|px| px[..3].to_vec()).collect();
    assert_eq!(rgb_of_rgba, a[0].0);
    assert!(b[0].0.chunks(4).all(|px| px[3] == 255));

    let mut two = g;
    two.batch = 2;
    let c = generate(p, &two).unwrap();
    assert_eq!(c.len(), 2);
    assert_ne!(c[0].0, c[1].0);

    // Width and height 0 take the model's native size (32 for the fixture).
    let mut native = g;
    native.width = 0;
    native.height = 0;
    assert_eq!(generate(p, &native).unwrap()[0].1, [32, 32, 96, 3]);
    unsafe { sd_pipeline_free(p) };
}

#[test]
fn img2img_and_inpainting_take_strided_rgba_and_grey_inputs() {
    let p = load();
    // 40x24 RGBA with 8 bytes of padding per row.
    let (w, h, stride) = (40u32, 24u32, 40 * 4 + 8);
    let mut rgba = vec![0u8; (stride * h) as usize];
    for y in 0..h {
        for x in 0..w {
            let i = (y * stride + x * 4) as usize;
            rgba[i..i + 4].copy_from_slice(&[(x * 6) as u8, (y * 10) as u8, 128, 7]);
        }
    }
    let init = sd_image {
        data: rgba.as_ptr(),
        width: w,
        height: h,
        stride,
        channels: 4,
    };
    let mut g = params(PROMPT, 4, 3);
    g.width = 0;
    g.height = 0;
    g.init_image = &init;
    g.strength = 0.5;
    let out = generate(p, &g).unwrap();
    assert_eq!(out[0].1, [40, 24, 120, 3], "size taken from the init image");

    let mask_pixels: Vec<u8> = (0..w * h)
        .map(|i| if i % w < w / 2 { 255 } else { 0 })
        .collect();
    let mask = sd_image {
        data: mask_pixels.as_ptr(),
        width: w,
        height: h,
        stride: 0,
        channels: 1,
    };
    g.mask = &mask;
    g.paste_back = 1;
    g.strength = -1.0;
    let painted = generate(p, &g).unwrap();
    assert_eq!(painted[0].1, [40, 24, 120, 3]);
    // Pasted back: the kept (black) half equals the input's RGB.
    let row = |img: &[u8], y: usize, x: usize| img[y * 120 + x * 3..y * 120 + x * 3 + 3].to_vec();
    let kept = (w - 1) as usize;
    let i = (5 * stride + kept as u32 * 4) as usize;
    assert_eq!(row(&painted[0].0, 5, kept), rgba[i..i + 3].to_vec());
    unsafe { sd_pipeline_free(p) };
}

/// What the step callback saw, for the assertions after the run.
#[derive(Default)]
struct Seen {
    steps: Vec<(u32, u32, f64, f64)>,
    previews: Vec<[u32; 4]>,
    latent_sides: Vec<[u32; 3]>,
    preview_colours: usize,
    latents_ok: bool,
    struct_size_ok: bool,
    bad_index: Option<sd_status>,
    small_buffer: Option<sd_status>,
}

#[test]
fn step_callback_sees_steps_previews_and_latents_and_can_cancel() {
    let p = load();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let mut hook = StepHook::new(move |info| {
        let mut s = record.lock().unwrap();
        s.steps
            .push((info.step, info.total, info.timestep, info.elapsed_seconds));
        s.struct_size_ok = info.struct_size == size_of::<sd_step_info>();
        let mut img: *const sd_image = ptr::null();
        unsafe {
            if sd_step_preview(info, 0, &mut img) == SD_OK {
                let i = &*img;
                s.latent_sides
                    .push([info.latent_width, info.latent_height, info.latent_channels]);
                s.previews.push([i.width, i.height, i.stride, i.channels]);
                let bytes = std::slice::from_raw_parts(i.data, (i.stride * i.height) as usize);
                s.preview_colours = bytes.iter().collect::<std::collections::HashSet<_>>().len();
            }
            s.bad_index = Some(sd_step_preview(info, info.batch, &mut img));
            let n = (info.batch * info.latent_channels * info.latent_height * info.latent_width)
                as usize;
            let mut latents = vec![f32::NAN; n];
            s.small_buffer = Some(sd_step_latents(info, latents.as_mut_ptr(), n - 1));
            s.latents_ok = n == 16 * 16 * 4
                && sd_step_latents(info, latents.as_mut_ptr(), n) == SD_OK
                && latents.iter().all(|v| v.is_finite())
                && latents.iter().any(|&v| v != 0.0);
        }
        SD_STEP_CONTINUE
    });
    let mut g = params(PROMPT, 3, 1);
    hook.install(&mut g);
    generate(p, &g).unwrap();
    {
        let s = seen.lock().unwrap();
        let steps: Vec<(u32, u32)> = s.steps.iter().map(|t| (t.0, t.1)).collect();
        assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
        assert!(
            s.steps.windows(2).all(|w| w[1].2 < w[0].2),
            "timesteps go down"
        );
        assert!(
            s.steps.windows(2).all(|w| w[1].3 >= w[0].3),
            "elapsed goes up"
        );
        // The fixture's tiny VAE scales by 2: 32x32 images have 16x16 latents.
        assert_eq!(s.latent_sides, vec![[16, 16, 4]; 3]);
        assert_eq!(
            s.previews,
            vec![[16, 16, 48, 3]; 3],
            "previews at latent size"
        );
        assert!(s.preview_colours > 1);
        assert!(s.latents_ok);
        assert!(s.struct_size_ok);
        assert_eq!(s.bad_index, Some(SD_ERR_INVALID_ARGUMENT));
        assert_eq!(s.small_buffer, Some(SD_ERR_INVALID_ARGUMENT));
    }

    // Returning SD_STEP_CANCEL stops the run after that step.
    let calls = Arc::new(Mutex::new(0));
    let counter = calls.clone();
    let mut cancel = StepHook::new(move |info| {
        *counter.lock().unwrap() += 1;
        if info.step == 2 {
            SD_STEP_CANCEL
        } else {
            SD_STEP_CONTINUE
        }
    });
    let mut g = params(PROMPT, 10, 1);
    cancel.install(&mut g);
    let (status, message) = generate(p, &g).unwrap_err();
    assert_eq!(status, SD_ERR_CANCELLED);
    assert!(message.contains("cancelled"), "{message}");
    assert_eq!(*calls.lock().unwrap(), 2);
    unsafe { sd_pipeline_free(p) };
}

#[test]
fn a_callback_cannot_deadlock_its_own_pipeline() {
    let p = load();
    let pipeline = p as usize;
    let inner_status = Arc::new(Mutex::new(None));
    let record = inner_status.clone();
    let mut hook = StepHook::new(move |_| {
        let g = params(PROMPT, 1, 0);
        let mut out = ptr::null_mut();
        let status = unsafe { sd_generate(pipeline as *mut sd_pipeline, &g, &mut out) };
        *record.lock().unwrap() = Some((status, last_error()));
        SD_STEP_CONTINUE
    });
    let mut g = params(PROMPT, 1, 0);
    hook.install(&mut g);
    generate(p, &g).unwrap();
    let (status, message) = inner_status.lock().unwrap().clone().unwrap();
    assert_eq!(status, SD_ERR_INVALID_ARGUMENT);
    assert!(message.contains("already generating"), "{message}");
    unsafe { sd_pipeline_free(p) };
}

type Log = Mutex<Vec<(sd_log_level, String)>>;

unsafe extern "C" fn log_into(level: sd_log_level, message: *const c_char, user_data: *mut c_void) {
    let log = &*(user_data as *const Log);
    let text = CStr::from_ptr(message).to_string_lossy().into_owned();
    log.lock().unwrap().push((level, text));
}

#[test]
fn log_callback_is_per_pipeline() {
    let (a, b) = (load(), load());
    let log_a: Box<Log> = Box::default();
    let log_b: Box<Log> = Box::default();
    unsafe {
        let ua = &*log_a as *const Log as *mut c_void;
        let ub = &*log_b as *const Log as *mut c_void;
        assert_eq!(sd_pipeline_set_log_callback(a, Some(log_into), ua), SD_OK);
        assert_eq!(sd_pipeline_set_log_callback(b, Some(log_into), ub), SD_OK);
    }
    let long = CString::new("a red circle ".repeat(40)).unwrap();
    generate(a, &params(&long, 1, 0)).unwrap();
    {
        let got = log_a.lock().unwrap();
        assert!(
            got.iter().any(|(l, m)| *l == sd_log_level::SD_LOG_DEBUG
                && m.starts_with("txt2img: 1 steps, 32x32")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|(l, m)| *l == sd_log_level::SD_LOG_WARN && m.contains("tokens")),
            "{got:?}"
        );
        assert!(log_b.lock().unwrap().is_empty(), "b did not run");
    }
    unsafe { sd_pipeline_set_log_callback(a, None, ptr::null_mut()) };
    let before = log_a.lock().unwrap().len();
    generate(a, &params(&long, 1, 0)).unwrap();
    assert_eq!(log_a.lock().unwrap().len(), before, "logging off");
    unsafe {
        sd_pipeline_free(a);
        sd_pipeline_free(b);
    }
}

#[test]
fn generate_params_from_a_newer_header() {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Newer {
        known: sd_generate_params,
        unknown: [u64; 2],
    }
    let p = load();
    let mut newer = Newer {
        known: params(PROMPT, 1, 0),
        unknown: [0; 2],
    };
    newer.known.struct_size = size_of::<Newer>();
    assert!(
        generate(p, &newer.known).is_ok(),
        "zero unknown fields are fine"
    );
    newer.unknown[1] = 5;
    let (status, message) = generate(p, &newer.known).unwrap_err();
    assert_eq!(status, SD_ERR_UNSUPPORTED);
    assert!(message.contains("does not know"), "{message}");
    unsafe { sd_pipeline_free(p) };
}

/// `use_ema` in the load options: a single file holding both UNet copies renders the non-EMA
/// one by default (as diffusers, A1111 and ComfyUI), the EMA one when asked; a caller whose
/// struct ends before the field gets the default whatever lies past its struct.
#[test]
fn load_options_choose_the_ema_unet() {
    let dir = std::env::temp_dir().join(format!("sd-ffi-ema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/single/tiny-sd1.safetensors");
    let mut tensors = common::parse_safetensors(&std::fs::read(&base).unwrap());
    let ema: Vec<common::StTensor> = tensors
        .iter()
        .filter_map(|(name, dtype, shape, bytes)| {
            let rest = name.strip_prefix("model.diffusion_model.")?;
            let key = format!("model_ema.diffusion_model{}", rest.replace('.', ""));
            Some((key, dtype.clone(), shape.clone(), vec![0u8; bytes.len()]))
        })
        .collect();
    tensors.extend(ema);
    let both = dir.join("both.safetensors");
    std::fs::write(&both, common::write_safetensors(&tensors)).unwrap();

    // The tiny model's own vocabulary and configs, as a user of a fine-tune would pass them.
    let config = fixture("tiny-sd1");
    let render = |path: &std::path::Path, use_ema: i32, struct_size: usize| -> Vec<u8> {
        let path = CString::new(path.to_str().unwrap()).unwrap();
        render_with_options(&path, PROMPT, |o| {
            o.use_ema = use_ema;
            o.struct_size = struct_size;
            o.config_dir = config.as_ptr();
        })
    };
    let full = size_of::<sd_load_options>();
    let before_the_field = std::mem::offset_of!(sd_load_options, use_ema);
    let reference = render(&base, 0, full);
    assert_eq!(
        render(&both, 0, full),
        reference,
        "default must be the non-EMA UNet"
    );
    assert_ne!(
        render(&both, 1, full),
        reference,
        "use_ema must take the EMA copy"
    );
    assert_eq!(
        render(&both, 1, before_the_field),
        reference,
        "an older caller's struct must get the default"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fast-mode fields reach the pipeline, and a caller whose struct ends before them gets
/// the exact computation whatever lies past its struct.
#[test]
fn generate_params_carry_the_fast_modes() {
    let p = load();
    let exact = generate(p, &params(PROMPT, 4, 5)).unwrap();
    for change in [
        Box::new(|g: &mut sd_generate_params| g.cache_interval = 2) as Box<dyn Fn(&mut _)>,
        Box::new(|g: &mut sd_generate_params| g.token_merging = 0.5),
        Box::new(|g: &mut sd_generate_params| g.int8_linear = 1),
    ] {
        let mut fast = params(PROMPT, 4, 5);
        change(&mut fast);
        assert_ne!(generate(p, &fast).unwrap()[0].0, exact[0].0);
        let mut older = fast;
        older.struct_size = std::mem::offset_of!(sd_generate_params, cache_interval);
        assert_eq!(generate(p, &older).unwrap()[0].0, exact[0].0);
    }
    unsafe { sd_pipeline_free(p) };
}

/// `copy_weights` in the load options: weights used in place or copied render the same image,
/// and a caller whose struct ends before the field gets the default (in place).
#[test]
fn load_options_copy_weights_render_the_same_image() {
    let render = |copy_weights: i32, struct_size: usize| -> Vec<u8> {
        render_with_options(&fixture("tiny-sd1"), PROMPT, |o| {
            o.copy_weights = copy_weights;
            o.struct_size = struct_size;
        })
    };
    let full = size_of::<sd_load_options>();
    let reference = render(0, full);
    assert_eq!(render(1, full), reference);
    assert_eq!(
        render(1, std::mem::offset_of!(sd_load_options, copy_weights)),
        reference
    );
}

/// `plain_weights` in the load options: libtorch's plain kernels and the packed weights render
/// the same image up to rounding (a level or two); the default (`SD_WEIGHTS_AUTO`, also what a
/// caller whose struct ends before the field gets) is the packed image for SD 1.x.
#[test]
fn load_options_plain_weights_render_the_same_image() {
    let render = |model: &str, plain_weights: i32, struct_size: usize| -> Vec<u8> {
        render_with_options(&fixture(model), PROMPT, |o| {
            o.plain_weights = plain_weights;
            o.struct_size = struct_size;
        })
    };
    let full = size_of::<sd_load_options>();
    let short = std::mem::offset_of!(sd_load_options, plain_weights);
    let packed = render("tiny-sd1", SD_WEIGHTS_PACKED, full);
    assert_eq!(render("tiny-sd1", SD_WEIGHTS_AUTO, full), packed);
    assert_eq!(render("tiny-sd1", SD_WEIGHTS_PLAIN, short), packed);
    // (8-bit images of the tiny SDXL fixture do not tell the kernels apart; the library's
    // test `weight_kernels_default_by_family` compares the float images.)
    let sdxl_plain = render("tiny-sdxl", SD_WEIGHTS_PLAIN, full);
    assert!(render("tiny-sdxl", SD_WEIGHTS_AUTO, short) == sdxl_plain);
    let plain = render("tiny-sd1", SD_WEIGHTS_PLAIN, full);
    assert_eq!(plain.len(), packed.len());
    let worst = plain
        .iter()
        .zip(&packed)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 2,
        "plain and packed weights differ by {worst} levels"
    );
}

/// SDXL through the C ABI: the second prompts reach the pipeline (diffusers' image for the
/// fixture's case c), the micro-conditioning fields give the Rust pipeline's image, a half-given
/// size is refused by name, and a caller whose struct ends before these fields gets the
/// defaults.
#[test]
fn generate_params_carry_sdxl_prompts_and_micro_conditioning() {
    use stable_diffusion::pipeline::{GenerateParams, LoadOptions, MicroConditioning};
    let case = common::case_named("tiny-sdxl", "cases", "c");
    let text = |k: &str| CString::new(case[k].as_str().unwrap()).unwrap();
    let (prompt, prompt_2) = (text("prompt"), text("prompt_2"));
    let (negative, negative_2) = (text("negative_prompt"), text("negative_prompt_2"));
    let p = load_fixture("tiny-sdxl");

    let mut g = params(&prompt, case["steps"].as_u64().unwrap() as u32, 0);
    g.seed = case["seed"].as_u64().unwrap();
    g.guidance = case["guidance"].as_f64().unwrap();
    g.width = case["width"].as_u64().unwrap() as u32;
    g.height = case["height"].as_u64().unwrap() as u32;
    g.negative_prompt = negative.as_ptr();
    g.prompt_2 = prompt_2.as_ptr();
    g.negative_prompt_2 = negative_2.as_ptr();
    let got = generate(p, &g).unwrap();
    let want = common::Refs::open("tiny-sdxl").get("pipe_c");
    let worst = levels_off(&got[0].0, &want);
    assert!(worst <= 1.0, "case c through C differs by {worst} levels");

    // An older caller's struct ends before prompt_2: the second prompts fall back to the
    // first ones, as a Rust call without them does.
    let mut older = g;
    older.struct_size = std::mem::offset_of!(sd_generate_params, prompt_2);
    let sd = stable_diffusion::pipeline::StableDiffusion::load(
        &common::fixtures().join("tiny-sdxl"),
        &LoadOptions::default(),
    )
    .unwrap();
    let rust_params = GenerateParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        steps: g.steps as usize,
        guidance: g.guidance,
        seed: g.seed,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let rust_bytes = |p: &GenerateParams| sd.txt2img(p, None).unwrap().to_rgb8().unwrap().remove(0);
    let older_bytes = generate(p, &older).unwrap()[0].0.clone();
    assert_eq!(older_bytes, rust_bytes(&rust_params));

    let mut micro = older;
    micro.struct_size = size_of::<sd_generate_params>();
    (micro.prompt_2, micro.negative_prompt_2) = (ptr::null(), ptr::null());
    (micro.original_width, micro.original_height) = (2048, 1024);
    (micro.crop_left, micro.crop_top) = (100, 300);
    (micro.target_width, micro.target_height) = (256, 512);
    let with_micro = generate(p, &micro).unwrap()[0].0.clone();
    let rust_micro = rust_bytes(&GenerateParams {
        micro: MicroConditioning {
            original_size: Some((1024, 2048)),
            crops_coords_top_left: (300, 100),
            target_size: Some((512, 256)),
            ..Default::default()
        },
        ..rust_params.clone()
    });
    assert!(
        with_micro == rust_micro,
        "the micro-conditioning fields reach the pipeline"
    );
    assert!(
        with_micro != older_bytes,
        "micro-conditioning changes the image"
    );

    let mut rescaled = micro;
    rescaled.guidance_rescale = 0.7;
    let rust_rescaled = rust_bytes(&GenerateParams {
        guidance_rescale: 0.7,
        micro: MicroConditioning {
            original_size: Some((1024, 2048)),
            crops_coords_top_left: (300, 100),
            target_size: Some((512, 256)),
            ..Default::default()
        },
        ..rust_params.clone()
    });
    let with_rescale = generate(p, &rescaled).unwrap()[0].0.clone();
    assert!(
        with_rescale == rust_rescaled,
        "guidance_rescale reaches the pipeline"
    );
    assert!(with_rescale != with_micro);

    let mut half = micro;
    half.original_height = 0;
    let mut images = ptr::null_mut();
    expect(
        unsafe { sd_generate(p, &half, &mut images) },
        SD_ERR_INVALID_ARGUMENT,
        "original_width",
    );
    assert!(images.is_null());
    unsafe { sd_pipeline_free(p) };
}

/// The SDXL refiner through the C ABI: img2img with the aesthetic-score fields gives diffusers'
/// StableDiffusionXLImg2ImgPipeline image (fixture case b, batch 2) within 1 level, and an
/// older caller's struct gets diffusers' default scores (6.0 / 2.5), not zeros.
#[test]
fn refiner_img2img_takes_the_aesthetic_scores() {
    let case = common::case_named("tiny-sdxl-refiner", "cases", "b");
    let refs = common::Refs::open("tiny-sdxl-refiner");
    let pixels = refs.get(&format!("image_{}", case["image"].as_str().unwrap()));
    let (h, w) = (pixels.size()[0] as u32, pixels.size()[1] as u32);
    let rgb: Vec<u8> = Vec::try_from(pixels.flatten(0, -1)).unwrap();
    let init = sd_image {
        data: rgb.as_ptr(),
        width: w,
        height: h,
        stride: 0,
        channels: 3,
    };
    let text = |k: &str| CString::new(case[k].as_str().unwrap()).unwrap();
    let (prompt, negative) = (text("prompt"), text("negative_prompt"));
    let p = load_fixture("tiny-sdxl-refiner");
    let mut g = params(&prompt, case["steps"].as_u64().unwrap() as u32, 0);
    g.seed = case["seed"].as_u64().unwrap();
    g.guidance = case["guidance"].as_f64().unwrap();
    (g.width, g.height) = (0, 0);
    g.batch = case["batch"].as_u64().unwrap() as u32;
    g.strength = case["strength"].as_f64().unwrap();
    g.negative_prompt = negative.as_ptr();
    g.init_image = &init;
    g.aesthetic_score = case["aesthetic_score"].as_f64().unwrap();
    g.negative_aesthetic_score = case["negative_aesthetic_score"].as_f64().unwrap();
    let got = generate(p, &g).unwrap();
    let bytes: Vec<u8> = got.iter().flat_map(|img| img.0.clone()).collect();
    let worst = levels_off(&bytes, &refs.get("out_b"));
    assert!(
        worst <= 1.0,
        "refiner case b through C differs by {worst} levels"
    );

    let mut defaults = g;
    (defaults.aesthetic_score, defaults.negative_aesthetic_score) = (6.0, 2.5);
    let mut older = g;
    older.struct_size = std::mem::offset_of!(sd_generate_params, aesthetic_score);
    let from_older = generate(p, &older).unwrap()[0].0.clone();
    assert_eq!(from_older, generate(p, &defaults).unwrap()[0].0);
    assert_ne!(from_older, got[0].0);
    unsafe { sd_pipeline_free(p) };
}

/// Loads a fixture folder through the C ABI.
fn load_fixture(name: &str) -> *mut sd_pipeline {
    let mut p = ptr::null_mut();
    let path = fixture(name);
    let status = unsafe { sd_pipeline_load(path.as_ptr(), ptr::null(), &mut p) };
    assert_eq!(status, sd_status::SD_OK, "{name}: {}", last_error());
    p
}

/// The base + refiner ensemble through `sd_generate_params.refiner`: diffusers' images of the
/// fixture's text-to-image ensemble within 1 level, by `sd_generate` and by a job; the
/// refiner given as the pipeline itself, freed, or with `refiner_start` outside (0, 1) is
/// refused with the field named; an older caller's struct runs without a refiner.
#[test]
fn generate_params_carry_a_refiner() {
    let case = common::case_named("tiny-sdxl-edit", "ensemble", "ensemble_txt2img");
    let refs = common::Refs::open("tiny-sdxl-edit");
    let base = load_fixture("tiny-sdxl");
    let refiner = load_fixture("tiny-sdxl-refiner");
    let prompt = CString::new(case["prompt"].as_str().unwrap()).unwrap();
    let mut g = params(&prompt, case["steps"].as_u64().unwrap() as u32, 0);
    g.seed = case["seed"].as_u64().unwrap();
    g.guidance = case["guidance"].as_f64().unwrap();
    g.width = case["width"].as_u64().unwrap() as u32;
    g.height = case["height"].as_u64().unwrap() as u32;
    g.refiner = refiner;
    g.refiner_start = case["refiner_start"].as_f64().unwrap();
    let got = generate(base, &g).unwrap()[0].0.clone();
    let worst = levels_off(&got, &refs.get("out_ensemble_txt2img"));
    assert!(worst <= 1.0, "ensemble through C differs by {worst} levels");

    // The same through a job, with the step count of both phases.
    let mut job = ptr::null_mut();
    let status = unsafe { sd_job_submit(base, &g, &mut job) };
    assert_eq!(status, SD_OK, "{}", last_error());
    assert_eq!(unsafe { sd_job_wait(job, -1) }, SD_OK, "{}", last_error());
    let mut progress = sd_job_progress {
        struct_size: size_of::<sd_job_progress>(),
        state: sd_job_state::SD_JOB_QUEUED,
        step: 0,
        total: 0,
        elapsed_seconds: 0.0,
    };
    assert_eq!(unsafe { sd_job_poll(job, &mut progress) }, SD_OK);
    let n = common::f64s(&case["timesteps"]).len() as u32;
    assert_eq!((progress.step, progress.total), (n, n));
    let mut images = ptr::null_mut();
    assert_eq!(unsafe { sd_job_take_images(job, &mut images) }, SD_OK);
    assert_eq!(take(images)[0].0, got);
    unsafe { sd_job_free(job) };

    for bad in [0.0, 1.0, -1.0, f64::NAN] {
        let mut b = g;
        b.refiner_start = bad;
        let mut out = ptr::null_mut();
        expect(
            unsafe { sd_generate(base, &b, &mut out) },
            SD_ERR_INVALID_ARGUMENT,
            "refiner_start",
        );
        assert!(out.is_null());
    }
    let mut own = g;
    own.refiner = base;
    let mut out = ptr::null_mut();
    expect(
        unsafe { sd_generate(base, &own, &mut out) },
        SD_ERR_INVALID_ARGUMENT,
        "params->refiner is the pipeline itself",
    );
    // The refiner cannot run from text alone, but as a refiner it can.
    let mut alone = g;
    alone.refiner = ptr::null();
    expect(
        unsafe { sd_generate(refiner, &alone, &mut out) },
        SD_ERR_INVALID_ARGUMENT,
        "SDXL refiner",
    );
    let mut older = g;
    older.struct_size = std::mem::offset_of!(sd_generate_params, refiner);
    let plain = generate(base, &older).unwrap()[0].0.clone();
    assert_ne!(plain, got);
    unsafe { sd_pipeline_free(refiner) };
    let mut freed = g;
    freed.refiner = ptr::null();
    freed.refiner_start = 0.5;
    assert_eq!(generate(base, &freed).unwrap()[0].0, plain);
    unsafe { sd_pipeline_free(base) };
}

/// `sd_pipeline_get_info` tells each fixture apart: family, native size, channels, the
/// largest clip_skip, the default scheduler; it checks its arguments.
#[test]
fn pipeline_info_describes_what_was_loaded() {
    // (fixture, family, UNet input channels); the rest is read from the folder's configs.
    let expected = [
        ("tiny-sd1", SD_FAMILY_SD1, 4),
        ("tiny-sd2", SD_FAMILY_SD2, 4),
        ("tiny-sd1-inpaint", SD_FAMILY_SD1, 9),
        ("tiny-sdxl", SD_FAMILY_SDXL, 4),
        ("tiny-sdxl-inpaint", SD_FAMILY_SDXL, 9),
        ("tiny-sdxl-refiner", SD_FAMILY_SDXL_REFINER, 4),
        ("tiny-sdxl-turbo", SD_FAMILY_SDXL, 4),
    ];
    for (name, family, channels) in expected {
        let p = load_fixture(name);
        let mut info: sd_pipeline_info = unsafe { std::mem::zeroed() };
        info.struct_size = size_of::<sd_pipeline_info>();
        assert_eq!(unsafe { sd_pipeline_get_info(p, &mut info) }, SD_OK);
        assert_eq!(info.family, family, "{name}");
        assert_eq!(info.unet_in_channels, channels, "{name}");
        assert_eq!(info.latent_channels, 4, "{name}");
        let dir = common::fixtures().join(name);
        let json = |f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        let unet = json("unet/config.json");
        let vae = json("vae/config.json");
        let scale = 1u32 << (vae["block_out_channels"].as_array().unwrap().len() - 1);
        assert_eq!(info.vae_scale_factor, scale, "{name}");
        let native = unet["sample_size"].as_u64().unwrap() as u32 * scale;
        assert_eq!((info.native_width, info.native_height), (native, native));
        let encoder = if family == SD_FAMILY_SDXL_REFINER {
            "text_encoder_2/config.json"
        } else {
            "text_encoder/config.json"
        };
        let layers = json(encoder)["num_hidden_layers"].as_i64().unwrap() as i32;
        assert_eq!(info.max_clip_skip, layers - 1, "{name}");
        let scheduler = json("scheduler/scheduler_config.json");
        let got = unsafe { CStr::from_ptr(info.default_scheduler) };
        assert_eq!(
            got.to_str().unwrap(),
            scheduler["_class_name"].as_str().unwrap()
        );
        let prediction = match scheduler["prediction_type"].as_str() {
            Some("v_prediction") => SD_PREDICTION_V,
            _ => SD_PREDICTION_EPSILON,
        };
        assert_eq!(info.prediction_type, prediction, "{name}");
        assert_eq!(
            (info.dtype, info.device_type),
            (SD_DTYPE_FP32, SD_DEVICE_CPU)
        );
        // Bad arguments: NULL info, a too small struct_size (not written), NULL pipeline.
        expect(
            unsafe { sd_pipeline_get_info(p, ptr::null_mut()) },
            SD_ERR_INVALID_ARGUMENT,
            "info is NULL",
        );
        let mut small: sd_pipeline_info = unsafe { std::mem::zeroed() };
        small.struct_size = 8;
        expect(
            unsafe { sd_pipeline_get_info(p, &mut small) },
            SD_ERR_INVALID_ARGUMENT,
            "struct_size",
        );
        assert_eq!(small.family, 0);
        expect(
            unsafe { sd_pipeline_get_info(ptr::null(), &mut info) },
            SD_ERR_INVALID_ARGUMENT,
            "pipeline is NULL",
        );
        unsafe { sd_pipeline_free(p) };
    }
}

/// `prompt_syntax` in the generate params: `SD_PROMPT_A1111` gives the A1111 reference's
/// image of a two-chunk prompt and a weighted negative (diffusers given those embeddings,
/// within a level), the default and an older caller's struct read the text plainly (the
/// library's plain image, bit for bit), and an unknown value is refused by name.
#[test]
fn generate_params_read_prompts_as_a1111() {
    let case = common::case_named("a1111-prompts", "pipeline", "sd1_pair");
    let refs = common::Refs::open("a1111-prompts");
    let want = refs.get("pipeline/sd1_pair");
    let p = load_fixture(case["model"].as_str().unwrap());
    let prompt = std::ffi::CString::new(case["prompt"].as_str().unwrap()).unwrap();
    let negative = std::ffi::CString::new(case["negative_prompt"].as_str().unwrap()).unwrap();
    let mut g = params(
        &prompt,
        case["steps"].as_u64().unwrap() as u32,
        case["seed"].as_u64().unwrap(),
    );
    g.negative_prompt = negative.as_ptr();
    g.guidance = case["guidance"].as_f64().unwrap();
    g.prompt_syntax = SD_PROMPT_A1111;
    let a1111 = generate(p, &g).unwrap()[0].0.clone();
    let worst = levels_off(&a1111, &want);
    assert!(
        worst <= 1.0,
        "A1111 prompts through C differ by {worst} levels"
    );

    let sd = stable_diffusion::pipeline::StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        &stable_diffusion::pipeline::LoadOptions::default(),
    )
    .unwrap();
    let plain = sd
        .txt2img(
            &stable_diffusion::pipeline::GenerateParams {
                prompt: case["prompt"].as_str().unwrap().into(),
                negative_prompt: case["negative_prompt"].as_str().map(String::from),
                steps: g.steps as usize,
                guidance: g.guidance,
                seed: g.seed,
                width: Some(32),
                height: Some(32),
                ..Default::default()
            },
            None,
        )
        .unwrap()
        .to_rgb8()
        .unwrap()
        .remove(0);
    let mut older = g;
    older.struct_size = std::mem::offset_of!(sd_generate_params, prompt_syntax);
    assert!(
        generate(p, &older).unwrap()[0].0 == plain,
        "older struct: plain"
    );
    g.prompt_syntax = SD_PROMPT_PLAIN;
    assert!(generate(p, &g).unwrap()[0].0 == plain, "SD_PROMPT_PLAIN");
    assert!(a1111 != plain, "the two readings give one image");
    for bad in [2, -1, i32::MIN] {
        g.prompt_syntax = bad;
        let (status, message) = generate(p, &g).unwrap_err();
        assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT, "{message}");
        assert!(
            message.contains(&format!("prompt_syntax is {bad}")),
            "{message}"
        );
    }
    unsafe { sd_pipeline_free(p) };
}

/// LoRAs through the C ABI: `sd_lora_load` handles in `sd_generate_params.loras` give
/// diffusers' image for the fixture's case (within a level), a tag in an A1111 prompt finds
/// its file in `sd_load_options.lora_dir`, a call without LoRAs afterwards is the plain
/// image, and bad handles, counts, files and kinds are refused by name.
#[test]
fn loras_apply_per_call_through_handles_and_tags() {
    let case = common::case_named("lora", "cases", "sd1_both");
    let want = common::Refs::open("lora").get("out_sd1_both");
    let levels = |got: &[u8]| levels_off(got, &want);
    let dir = common::fixtures().join("lora");
    let load_lora = |file: &str| {
        let path = CString::new(dir.join(file).to_str().unwrap()).unwrap();
        let mut lora = null_mut();
        let status = unsafe { sd_lora_load(path.as_ptr(), &mut lora) };
        (status, lora)
    };
    let handles: Vec<*mut sd_lora> = case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let (status, lora) = load_lora(l["file"].as_str().unwrap());
            assert_eq!(status, sd_status::SD_OK, "{}", last_error());
            lora
        })
        .collect();
    let weights: Vec<sd_lora_weight> = case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&handles)
        .map(|(l, &h)| sd_lora_weight {
            lora: h,
            weight: l["weight"].as_f64().unwrap(),
        })
        .collect();

    let lora_dir = CString::new(dir.to_str().unwrap()).unwrap();
    let mut options = sd_load_options_with_defaults();
    options.lora_dir = lora_dir.as_ptr();
    let model = fixture("tiny-sd1");
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, sd_status::SD_OK, "{}", last_error());

    let prompt = CString::new(case["prompt"].as_str().unwrap()).unwrap();
    let mut g = params(
        &prompt,
        case["steps"].as_u64().unwrap() as u32,
        case["seed"].as_u64().unwrap(),
    );
    g.guidance = case["guidance"].as_f64().unwrap();
    let negative = case["negative_prompt"]
        .as_str()
        .map(|n| CString::new(n).unwrap());
    if let Some(n) = &negative {
        g.negative_prompt = n.as_ptr();
    }
    let plain = generate(p, &g).unwrap()[0].0.clone();
    g.loras = weights.as_ptr();
    g.lora_count = weights.len();
    let with = generate(p, &g).unwrap()[0].0.clone();
    assert!(
        levels(&with) <= 1.0,
        "LoRAs through C: {} levels",
        levels(&with)
    );
    assert!(with != plain);

    // The same two LoRAs as tags, read from the load options' folder.
    let weight = |i: usize| weights[i].weight;
    let tagged = CString::new(format!(
        "{} <lora:sd1-kohya:{}><lora:sd1-peft:{}>",
        case["prompt"].as_str().unwrap(),
        weight(0),
        weight(1)
    ))
    .unwrap();
    let mut t = g;
    t.loras = ptr::null();
    t.lora_count = 0;
    t.prompt = tagged.as_ptr();
    t.prompt_syntax = SD_PROMPT_A1111;
    let by_tag = generate(p, &t).unwrap()[0].0.clone();
    assert!(
        levels(&by_tag) <= 1.0,
        "tags through C: {} levels",
        levels(&by_tag)
    );

    // Freeing a handle after the call leaves later calls alone; no LoRA = the plain image.
    let mut none = g;
    none.loras = ptr::null();
    none.lora_count = 0;
    assert!(generate(p, &none).unwrap()[0].0 == plain);
    // An older caller's struct ends before the LoRA fields: none are read.
    let mut older = g;
    older.struct_size = std::mem::offset_of!(sd_generate_params, loras);
    assert!(generate(p, &older).unwrap()[0].0 == plain);

    let bogus = [0u64; 4];
    let mut bad = g;
    for (loras, count, needle) in [
        (ptr::null(), 1, "params->loras is NULL"),
        (weights.as_ptr(), 65, "at most 64"),
    ] {
        bad.loras = loras;
        bad.lora_count = count;
        let (status, message) = generate(p, &bad).unwrap_err();
        assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT, "{message}");
        assert!(message.contains(needle), "{message}");
    }
    let wrong = [
        sd_lora_weight {
            lora: bogus.as_ptr() as *const sd_lora,
            weight: 1.0,
        },
        sd_lora_weight {
            lora: handles[0],
            weight: f64::NAN,
        },
    ];
    for (i, needle) in [(0, "loras[0].lora is not a live"), (1, "weight NaN")] {
        bad.loras = &wrong[i];
        bad.lora_count = 1;
        let (status, message) = generate(p, &bad).unwrap_err();
        assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT, "{message}");
        assert!(message.contains(needle), "{message}");
    }
    // Files: another kind, another family, missing.
    let (status, lora) = load_lora("loha.safetensors");
    assert_eq!(status, sd_status::SD_ERR_UNSUPPORTED);
    assert!(lora.is_null() && last_error().contains("LoHa"));
    let (status, lora) = load_lora("missing.safetensors");
    assert_eq!(status, sd_status::SD_ERR_IO);
    assert!(lora.is_null());
    let (status, sdxl) = load_lora("sdxl-kohya.safetensors");
    assert_eq!(status, sd_status::SD_OK);
    let other = [sd_lora_weight {
        lora: sdxl,
        weight: 1.0,
    }];
    bad.loras = other.as_ptr();
    let (status, message) = generate(p, &bad).unwrap_err();
    assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT, "{message}");
    assert!(message.contains("tensor `lora_"), "{message}");
    let status = unsafe { sd_lora_load(ptr::null(), &mut null_mut()) };
    assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT);
    unsafe {
        sd_lora_free(sdxl);
        for h in handles {
            sd_lora_free(h);
        }
        sd_lora_free(ptr::null_mut());
        sd_pipeline_free(p);
    }
}

fn sd_load_options_with_defaults() -> sd_load_options {
    let mut o = std::mem::MaybeUninit::<sd_load_options>::zeroed();
    let status = unsafe { sd_load_options_init(o.as_mut_ptr(), size_of::<sd_load_options>()) };
    assert_eq!(status, sd_status::SD_OK);
    unsafe { o.assume_init() }
}

/// `sd_load_options.embeddings_dir`: a prompt naming an embedding gives diffusers' image for
/// it (within a level), and a folder that does not exist fails the load by name.
#[test]
fn load_options_embeddings_dir_reaches_the_prompts() {
    let case = common::case_named("embeddings", "cases", "sd1_pt");
    let want = common::Refs::open("embeddings").get("out_sd1_pt");
    let dir = CString::new(common::fixtures().join("embeddings").to_str().unwrap()).unwrap();
    let mut options = sd_load_options_with_defaults();
    options.embeddings_dir = dir.as_ptr();
    let model = fixture("tiny-sd1");
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, sd_status::SD_OK, "{}", last_error());
    let prompt = CString::new(case["prompt"].as_str().unwrap()).unwrap();
    let mut g = params(
        &prompt,
        case["steps"].as_u64().unwrap() as u32,
        case["seed"].as_u64().unwrap(),
    );
    g.guidance = case["guidance"].as_f64().unwrap();
    let got = generate(p, &g).unwrap()[0].0.clone();
    let worst = levels_off(&got, &want);
    assert!(
        worst <= 1.0,
        "embeddings through C differ by {worst} levels"
    );
    unsafe { sd_pipeline_free(p) };

    let missing = CString::new("no/such/embeddings").unwrap();
    options.embeddings_dir = missing.as_ptr();
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, sd_status::SD_ERR_INVALID_ARGUMENT);
    assert!(
        p.is_null() && last_error().contains("no/such/embeddings"),
        "{}",
        last_error()
    );
}

/// The engine fields through C: a seamless image equals diffusers' circular-padding reference,
/// the tiny autoencoder given at load decodes as diffusers' does and makes full-size previews,
/// VAE tiling with a tile size runs, and values out of range are refused by name.
#[test]
fn seamless_tiling_and_the_tiny_autoencoder_through_c() {
    let set = "engine";
    let refs = common::Refs::open(set);
    let tiny = CString::new(common::fixtures().join("tiny-taesd").to_str().unwrap()).unwrap();
    let mut options = sd_load_options_with_defaults();
    options.tiny_vae = tiny.as_ptr();
    let model = fixture("tiny-sd1");
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, SD_OK, "{}", last_error());
    let request = |case: &serde_json::Value, texts: &(CString, CString, CString)| {
        let mut g = params(
            &texts.0,
            case["steps"].as_u64().unwrap() as u32,
            case["seed"].as_u64().unwrap(),
        );
        g.negative_prompt = texts.1.as_ptr();
        g.scheduler = texts.2.as_ptr();
        g.guidance = case["guidance"].as_f64().unwrap();
        g.width = case["width"].as_u64().unwrap() as u32;
        g.height = case["height"].as_u64().unwrap() as u32;
        g
    };
    let texts_of = |case: &serde_json::Value| {
        let s = |k: &str| CString::new(case[k].as_str().unwrap()).unwrap();
        (s("prompt"), s("negative_prompt"), s("scheduler"))
    };

    let case = common::case_named(set, "seamless", "sd1_xy");
    let texts = texts_of(&case);
    let mut g = request(&case, &texts);
    g.seamless = SD_SEAMLESS_XY;
    let got = generate(p, &g).unwrap()[0].0.clone();
    let off = levels_off(&got, &refs.get("seamless_sd1_xy").get(0));
    assert!(off <= 1.0, "seamless through C: {off} levels");

    let case = common::case_named(set, "taesd_pipeline", "sd1_taesd");
    let texts = texts_of(&case);
    let mut g = request(&case, &texts);
    g.tiny_vae_decode = 1;
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seen = sizes.clone();
    let mut hook = StepHook::new(move |info| {
        let mut img: *const sd_image = ptr::null();
        let status = unsafe { sd_step_preview(info, 0, &mut img) };
        if status == SD_OK {
            let img = unsafe { &*img };
            seen.lock().unwrap().push((img.width, img.height));
        }
        SD_STEP_CONTINUE
    });
    hook.install(&mut g);
    let got = generate(p, &g).unwrap()[0].0.clone();
    let off = levels_off(&got, &refs.get("taesdpipe_sd1_taesd").get(0));
    assert!(off <= 1.0, "tiny decode through C: {off} levels");
    assert_eq!(
        *sizes.lock().unwrap(),
        vec![(64, 48); 3],
        "full-size previews"
    );

    let case = common::case_named(set, "vae_tiling_pipeline", "sd1_tiled");
    let texts = texts_of(&case);
    let mut g = request(&case, &texts);
    g.vae_tiling = SD_VAE_TILING_ON;
    g.vae_tile_size = case["tile_size"].as_u64().unwrap() as u32;
    let got = generate(p, &g).unwrap()[0].0.clone();
    let off = levels_off(&got, &refs.get("tiledpipe_sd1_tiled").get(0));
    assert!(off <= 1.0, "VAE tiles through C: {off} levels");

    let prompt = CString::new("a cat").unwrap();
    let refused = |edit: &dyn Fn(&mut sd_generate_params), needle: &str| {
        let mut g = params(&prompt, 1, 0);
        edit(&mut g);
        let (status, message) = generate(p, &g).expect_err("refused");
        assert_eq!(status, SD_ERR_INVALID_ARGUMENT, "{message}");
        assert!(message.contains(needle), "`{needle}` not in `{message}`");
    };
    refused(&|g| g.seamless = 4, "params->seamless is 4");
    refused(&|g| g.seamless = -1, "params->seamless is -1");
    refused(&|g| g.vae_tiling = 3, "params->vae_tiling is 3");
    refused(&|g| g.vae_tile_size = 20, "vae_tile_size 20");
    refused(
        &|g| {
            g.seamless = SD_SEAMLESS_X;
            g.vae_tiling = SD_VAE_TILING_ON;
        },
        "VAE tiling",
    );
    unsafe { sd_pipeline_free(p) };

    // Without a tiny autoencoder its decode is refused; a tiny autoencoder that is not one
    // fails the load, naming the file.
    let p = load();
    refused_on(p, "tiny autoencoder");
    unsafe { sd_pipeline_free(p) };
    let bogus = CString::new(common::fixtures().join("tiny-sd1/unet").to_str().unwrap()).unwrap();
    let mut options = sd_load_options_with_defaults();
    options.tiny_vae = bogus.as_ptr();
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_ne!(status, SD_OK);
    assert!(p.is_null());
    assert!(last_error().contains("tiny-sd1/unet"), "{}", last_error());
}

fn refused_on(p: *mut sd_pipeline, needle: &str) {
    let prompt = CString::new("a cat").unwrap();
    let mut g = params(&prompt, 1, 0);
    g.tiny_vae_decode = 1;
    let (status, message) = generate(p, &g).expect_err("refused");
    assert_eq!(status, SD_ERR_INVALID_ARGUMENT, "{message}");
    assert!(message.contains(needle), "`{needle}` not in `{message}`");
}

/// What the load progress callback saw, for the tests below.
#[derive(Default)]
struct LoadSeen {
    calls: usize,
    components: Vec<String>,
    bytes: Vec<(u64, u64)>,
    cancel_at: Option<usize>,
}

unsafe extern "C" fn on_load_progress(p: *const sd_load_progress, user: *mut c_void) -> i32 {
    let seen = &mut *(user as *mut LoadSeen);
    let p = &*p;
    seen.calls += 1;
    let component = CStr::from_ptr(p.component).to_str().unwrap().to_string();
    if seen.components.last() != Some(&component) {
        seen.components.push(component);
    }
    seen.bytes.push((p.bytes_done, p.bytes_total));
    match seen.cancel_at {
        Some(n) if seen.calls >= n => SD_STEP_CANCEL,
        _ => SD_STEP_CONTINUE,
    }
}

unsafe extern "C" fn on_load_log(_level: sd_log_level, message: *const c_char, user: *mut c_void) {
    let lines = &*(user as *const Mutex<Vec<String>>);
    let text = CStr::from_ptr(message).to_string_lossy().into_owned();
    lines.lock().unwrap().push(text);
}

/// Load progress through `sd_load_options.on_progress`: every part is named in order, bytes
/// only grow, come close to the weight files' size (less their headers) and end at it, and the
/// load's log line reaches `log_fn`. A callback that cancels fails the load with
/// `SD_ERR_CANCELLED` and no pipeline, and a load after it works.
#[test]
fn load_progress_reports_every_part_and_can_cancel() {
    let model = fixture("tiny-sd1");
    let mut seen = LoadSeen::default();
    let lines = Mutex::new(Vec::<String>::new());
    let mut options = sd_load_options_with_defaults();
    options.on_progress = Some(on_load_progress);
    options.progress_user_data = &mut seen as *mut LoadSeen as *mut c_void;
    options.log_fn = Some(on_load_log);
    options.log_user_data = &lines as *const _ as *mut c_void;
    let mut p = null_mut();
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, SD_OK, "{}", last_error());
    assert_eq!(
        seen.components,
        ["text encoder", "UNet", "VAE", "done"],
        "parts in order"
    );
    let total = seen.bytes[0].1;
    let files: u64 = [
        "text_encoder/model",
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
    ]
    .iter()
    .map(|f| {
        let path = common::fixtures().join(format!("tiny-sd1/{f}.safetensors"));
        std::fs::metadata(path).unwrap().len()
    })
    .sum();
    assert_eq!(total, files, "bytes_total is the weight files' size");
    assert!(
        seen.bytes.windows(2).all(|w| w[0].0 <= w[1].0),
        "bytes only grow"
    );
    let read = seen.bytes[seen.bytes.len() - 2].0;
    assert!(
        read <= total && read as f64 > 0.95 * total as f64,
        "{read} of {total} before done"
    );
    assert_eq!(
        seen.bytes.last().unwrap().0,
        total,
        "done reads as all of it"
    );
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("loaded ")),
        "{:?}",
        lines.lock().unwrap()
    );
    unsafe { sd_pipeline_free(p) };

    let mut seen = LoadSeen {
        cancel_at: Some(5),
        ..Default::default()
    };
    options.progress_user_data = &mut seen as *mut LoadSeen as *mut c_void;
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, SD_ERR_CANCELLED, "{}", last_error());
    assert!(p.is_null());
    assert_eq!(seen.calls, 5, "no progress after the cancel");
    options.on_progress = None;
    let status = unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut p) };
    assert_eq!(status, SD_OK, "{}", last_error());
    unsafe { sd_pipeline_free(p) };
}

/// `sd_pipeline_load_async`: the load runs on a worker, polls show it, the pipeline taken from
/// it generates; a cancelled load ends cancelled with nothing to take; a bad path fails on
/// the worker with the error `sd_pipeline_load` gives; a job freed untaken releases its
/// pipeline; bad arguments are refused at once.
#[test]
fn async_load_polls_takes_cancels_and_fails_by_name() {
    let model = fixture("tiny-sd1");
    let mut job = null_mut();
    let status = unsafe { sd_pipeline_load_async(model.as_ptr(), ptr::null(), &mut job) };
    assert_eq!(status, SD_OK, "{}", last_error());
    let mut states = Vec::new();
    loop {
        let mut progress = sd_load_progress {
            struct_size: size_of::<sd_load_progress>(),
            state: sd_job_state::SD_JOB_QUEUED,
            component: ptr::null(),
            tensors_done: 0,
            bytes_done: 0,
            bytes_total: 0,
            elapsed_seconds: 0.0,
        };
        assert_eq!(unsafe { sd_load_job_poll(job, &mut progress) }, SD_OK);
        states.push(progress.state);
        if !matches!(
            progress.state,
            sd_job_state::SD_JOB_QUEUED | sd_job_state::SD_JOB_RUNNING
        ) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(*states.last().unwrap(), sd_job_state::SD_JOB_SUCCEEDED);
    assert_eq!(unsafe { sd_load_job_wait(job, -1) }, SD_OK);
    let mut p = null_mut();
    assert_eq!(unsafe { sd_load_job_take_pipeline(job, &mut p) }, SD_OK);
    assert!(!p.is_null());
    let mut again = null_mut();
    expect(
        unsafe { sd_load_job_take_pipeline(job, &mut again) },
        SD_ERR_INVALID_ARGUMENT,
        "already taken",
    );
    unsafe { sd_load_job_free(job) };
    let prompt = CString::new("a red circle").unwrap();
    assert!(generate(p, &params(&prompt, 2, 1)).is_ok());
    unsafe { sd_pipeline_free(p) };

    // Cancelled from its progress callback's first report: it ends cancelled.
    let mut seen = LoadSeen {
        cancel_at: Some(1),
        ..Default::default()
    };
    let mut options = sd_load_options_with_defaults();
    options.on_progress = Some(on_load_progress);
    options.progress_user_data = &mut seen as *mut LoadSeen as *mut c_void;
    let status = unsafe { sd_pipeline_load_async(model.as_ptr(), &options, &mut job) };
    assert_eq!(status, SD_OK);
    assert_eq!(unsafe { sd_load_job_wait(job, -1) }, SD_ERR_CANCELLED);
    let mut p = null_mut();
    assert_eq!(
        unsafe { sd_load_job_take_pipeline(job, &mut p) },
        SD_ERR_CANCELLED
    );
    assert!(p.is_null());
    unsafe { sd_load_job_free(job) };

    // Cancelled by the caller at once, then freed: whichever came first, nothing is left.
    let status = unsafe { sd_pipeline_load_async(model.as_ptr(), ptr::null(), &mut job) };
    assert_eq!(status, SD_OK);
    assert_eq!(unsafe { sd_load_job_cancel(job) }, SD_OK);
    let outcome = unsafe { sd_load_job_wait(job, -1) };
    assert!(
        outcome == SD_ERR_CANCELLED || outcome == SD_OK,
        "{outcome:?}"
    );
    unsafe { sd_load_job_free(job) };

    // Freed while loading, never taken.
    let status = unsafe { sd_pipeline_load_async(model.as_ptr(), ptr::null(), &mut job) };
    assert_eq!(status, SD_OK);
    unsafe { sd_load_job_free(job) };

    let missing = CString::new("no/such/model").unwrap();
    let status = unsafe { sd_pipeline_load_async(missing.as_ptr(), ptr::null(), &mut job) };
    assert_eq!(status, SD_OK);
    expect(
        unsafe { sd_load_job_wait(job, -1) },
        SD_ERR_IO,
        "no/such/model",
    );
    unsafe { sd_load_job_free(job) };

    expect(
        unsafe { sd_pipeline_load_async(ptr::null(), ptr::null(), &mut job) },
        SD_ERR_INVALID_ARGUMENT,
        "model_path",
    );
    assert!(job.is_null());
    let mut options = sd_load_options_with_defaults();
    options.num_threads = 5000;
    expect(
        unsafe { sd_pipeline_load_async(model.as_ptr(), &options, &mut job) },
        SD_ERR_INVALID_ARGUMENT,
        "num_threads",
    );
    expect(
        unsafe { sd_load_job_cancel(null_mut()) },
        SD_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    expect(
        unsafe { sd_load_job_wait(null_mut(), 0) },
        SD_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    unsafe { sd_load_job_free(null_mut()) };
}

/// `sd_load_options.num_threads` holds for that pipeline's calls only: inside its step
/// callback libtorch computes with that many threads, while another pipeline's calls on the
/// same thread get the process default back.
#[test]
fn thread_count_is_per_pipeline() {
    let model = fixture("tiny-sd1");
    let mut options = sd_load_options_with_defaults();
    options.num_threads = 1;
    let mut one = null_mut();
    assert_eq!(
        unsafe { sd_pipeline_load(model.as_ptr(), &options, &mut one) },
        SD_OK
    );
    let default = load();
    let prompt = CString::new("a cat").unwrap();
    let threads_in = |p: *mut sd_pipeline| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let mut hook = StepHook::new(move |_| {
            record.lock().unwrap().push(tch::get_num_threads());
            SD_STEP_CONTINUE
        });
        let mut g = params(&prompt, 2, 0);
        hook.install(&mut g);
        generate(p, &g).unwrap();
        let seen = seen.lock().unwrap().clone();
        seen
    };
    let before = tch::get_num_threads();
    assert_eq!(threads_in(one), vec![1, 1]);
    let back = threads_in(default);
    assert!(
        back.iter().all(|&n| n == before),
        "{back:?} against {before}"
    );
    assert_eq!(threads_in(one), vec![1, 1]);
    unsafe {
        sd_pipeline_free(one);
        sd_pipeline_free(default);
    }
}

/// The scheduler names without a model, each accepted by a generate call; the devices this
/// libtorch has.
#[test]
fn scheduler_names_and_devices_without_a_model() {
    let count = sd_scheduler_count();
    let expected = stable_diffusion::schedulers::scheduler_names();
    assert_eq!(count, expected.len());
    let p = load();
    let name = |i: usize, class: i32| {
        let s = sd_scheduler_name(i, class);
        assert!(!s.is_null());
        unsafe { CStr::from_ptr(s) }.to_str().unwrap().to_string()
    };
    let prompt = CString::new("a cat").unwrap();
    for (i, short) in expected.iter().enumerate() {
        assert_eq!(name(i, 0), *short);
        for class in [0, 1] {
            let text = CString::new(name(i, class)).unwrap();
            // Four steps: PNDM's Runge-Kutta start needs them.
            let mut g = params(&prompt, 4, 0);
            g.scheduler = text.as_ptr();
            let mut job = null_mut();
            let status = unsafe { sd_job_submit(p, &g, &mut job) };
            assert_eq!(status, SD_OK, "{}: {}", name(i, class), last_error());
            unsafe { sd_job_free(job) };
        }
    }
    assert!(name(1, 1).ends_with("Scheduler"));
    assert!(sd_scheduler_name(count, 0).is_null());
    unsafe { sd_pipeline_free(p) };

    let check = |d: &str| {
        let c = CString::new(d).unwrap();
        unsafe { sd_device_check(c.as_ptr()) }
    };
    assert_eq!(check("cpu"), SD_OK);
    assert_eq!(unsafe { sd_device_check(ptr::null()) }, SD_OK);
    let cuda = if tch::Cuda::is_available() {
        SD_OK
    } else {
        SD_ERR_UNSUPPORTED
    };
    assert_eq!(check("cuda"), cuda);
    assert_eq!(sd_cuda_device_count(), tch::Cuda::device_count() as i32);
    expect(check("cuda:99"), SD_ERR_UNSUPPORTED, "cuda:99");
    expect(check("tpu"), SD_ERR_INVALID_ARGUMENT, "tpu");
}

/// A job submitted with `job_preview_every` keeps its latest preview for
/// `sd_job_take_preview`, each handed out once, the last one after the last step.
#[test]
fn job_previews_can_be_taken_without_a_callback() {
    let p = load();
    let prompt = CString::new("a cat").unwrap();
    let mut g = params(&prompt, 4, 0);
    g.job_preview_every = 2;
    let mut job = null_mut();
    assert_eq!(unsafe { sd_job_submit(p, &g, &mut job) }, SD_OK);
    let mut steps = Vec::new();
    loop {
        let mut step = 0;
        let mut images = null_mut();
        let status = unsafe { sd_job_take_preview(job, &mut step, &mut images) };
        if status == SD_OK {
            let pixels = take(images);
            assert_eq!(pixels[0].1[..2], [16, 16], "latent-size preview");
            steps.push(step);
        } else {
            assert_eq!(status, SD_NOT_READY);
            assert!(images.is_null());
            if unsafe { sd_job_wait(job, 0) } != SD_NOT_READY {
                let mut images = null_mut();
                if unsafe { sd_job_take_preview(job, &mut step, &mut images) } == SD_OK {
                    take(images);
                    steps.push(step);
                }
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(steps.last(), Some(&4), "{steps:?}");
    assert!(steps.iter().all(|s| s % 2 == 0), "{steps:?}");
    let mut step = 7;
    let mut images = null_mut();
    assert_eq!(
        unsafe { sd_job_take_preview(job, &mut step, &mut images) },
        SD_NOT_READY
    );
    assert_eq!(step, 0);
    unsafe {
        sd_job_free(job);
        sd_pipeline_free(p);
    }
}

/// `sd_pipeline_load_from_memory`: a checkpoint's bytes load as its file does (the buffer may
/// be freed right after), and bytes that are not a whole checkpoint are refused by name.
#[test]
fn checkpoints_load_from_memory_through_c() {
    let file = common::fixtures().join("single/tiny-sd1.safetensors");
    let config = CString::new(common::fixtures().join("tiny-sd1").to_str().unwrap()).unwrap();
    let mut options = sd_load_options_with_defaults();
    options.config_dir = config.as_ptr();
    let name = CString::new("packed/tiny-sd1").unwrap();
    let load_bytes = |data: &[u8], p: &mut *mut sd_pipeline| unsafe {
        sd_pipeline_load_from_memory(
            data.as_ptr() as *const c_void,
            data.len(),
            name.as_ptr(),
            &options,
            p,
        )
    };
    let mut from_memory = null_mut();
    let data = std::fs::read(&file).unwrap();
    assert_eq!(
        load_bytes(&data, &mut from_memory),
        SD_OK,
        "{}",
        last_error()
    );
    drop(data);
    let path = CString::new(file.to_str().unwrap()).unwrap();
    let mut from_file = null_mut();
    assert_eq!(
        unsafe { sd_pipeline_load(path.as_ptr(), &options, &mut from_file) },
        SD_OK
    );
    let prompt = CString::new("a red ball").unwrap();
    let g = params(&prompt, 2, 4);
    assert_eq!(
        generate(from_memory, &g).unwrap(),
        generate(from_file, &g).unwrap()
    );
    unsafe {
        sd_pipeline_free(from_memory);
        sd_pipeline_free(from_file);
    }

    let data = std::fs::read(&file).unwrap();
    let mut p = null_mut();
    expect(
        load_bytes(&data[..data.len() / 2], &mut p),
        SD_ERR_BAD_MODEL,
        "packed/tiny-sd1",
    );
    assert!(p.is_null());
    expect(
        load_bytes(b"not a model at all", &mut p),
        SD_ERR_BAD_MODEL,
        "packed/tiny-sd1",
    );
    expect(
        unsafe { sd_pipeline_load_from_memory(ptr::null(), 10, ptr::null(), ptr::null(), &mut p) },
        SD_ERR_INVALID_ARGUMENT,
        "data is NULL",
    );
}
