//! The C ABI's documented promises, each tested for its whole class rather than one example:
//!
//! 1. Out-pointers are cleared on failure: every function with one, each of its failure kinds,
//!    with the pointer preset to a sentinel.
//! 2. `sd_job_submit` checks the parameters first: a seeded table of bad (and some good)
//!    parameters where `sd_job_submit` refuses at once exactly what `sd_generate` refuses, with
//!    the same status and message, and a job accepted ends as `sd_generate` does.
//! 3. Cancellation takes effect within about one step: long prompts (one 60 KB word, many
//!    words) no longer hold `sd_job_cancel`, `sd_job_free` and `sd_pipeline_free` for a
//!    minute, prompts over the byte limit are refused at once, and a cancel between phases
//!    (during the prompt's encoding) stops the run before its first step.
mod common;
use common::Rng;
mod ffi_util;

use ffi_util::*;
use stable_diffusion::ffi::sd_job_state::*;
use stable_diffusion::ffi::sd_status::*;
use stable_diffusion::ffi::*;
use stable_diffusion::limits::MAX_PROMPT_BYTES;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &CStr = c"a red circle";

/// What an out-pointer holds before the call: not NULL, never dereferenced.
fn sentinel<T>() -> *mut T {
    0x1 as *mut T
}

fn null_mut<T>() -> *mut T {
    ptr::null_mut()
}

/// A failed call: a failure status and a non-empty message.
#[track_caller]
fn failed(status: sd_status, what: &str) {
    assert_ne!(status, SD_OK, "{what}: expected a failure");
    assert!(
        !last_error().is_empty(),
        "{what}: failure without a message"
    );
}

/// A block of zeroes that is not a live handle of any kind.
fn junk<T>() -> (Box<[u64; 16]>, *mut T) {
    let mut b = Box::new([0u64; 16]);
    let p = b.as_mut_ptr().cast();
    (b, p)
}

/// Blocks a job's worker inside its step callback until released.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    entered: Mutex<bool>,
    entered_cv: Condvar,
}

impl Gate {
    fn hook(self: &Arc<Self>) -> Box<StepHook> {
        let gate = self.clone();
        StepHook::new(move |_| {
            *gate.entered.lock().unwrap() = true;
            gate.entered_cv.notify_all();
            let mut open = gate.open.lock().unwrap();
            while !*open {
                open = gate.cv.wait(open).unwrap();
            }
            SD_STEP_CONTINUE
        })
    }

    fn wait_entered(&self) {
        let mut e = self.entered.lock().unwrap();
        while !*e {
            e = self.entered_cv.wait(e).unwrap();
        }
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

// ------------------------------------------------------------------------------------------
// 1. out-pointers

#[test]
fn every_out_pointer_is_cleared_when_its_call_fails() {
    let mut checks = 0;
    let p = load();
    let ok = params(PROMPT, 1, 0);
    let pixels = vec![100u8; 16 * 16 * 3];
    let image = sd_image {
        data: pixels.as_ptr(),
        width: 16,
        height: 16,
        stride: 0,
        channels: 3,
    };
    let (_keep_p, junk_pipeline) = junk::<sd_pipeline>();
    let (_keep_j, junk_job) = junk::<sd_job>();
    let (_keep_i, junk_images) = junk::<sd_images>();
    unsafe {
        // sd_pipeline_load
        let model = fixture("tiny-sd1");
        let missing = fixture("no-such-model");
        let not_a_model = fixture("tokenizer");
        let mut opts = std::mem::zeroed::<sd_load_options>();
        assert_eq!(
            sd_load_options_init(&mut opts, size_of::<sd_load_options>()),
            SD_OK
        );
        let mut bad_dtype = opts;
        bad_dtype.dtype = 42;
        let mut bad_device = opts;
        bad_device.device = c"tpu".as_ptr();
        let mut bad_scheduler = opts;
        bad_scheduler.scheduler = c"NoSuchScheduler".as_ptr();
        let mut bad_size = opts;
        bad_size.struct_size = 3;
        let loads: [(&str, *const c_char, *const sd_load_options); 7] = [
            ("NULL path", ptr::null(), ptr::null()),
            ("missing folder", missing.as_ptr(), ptr::null()),
            ("not a model", not_a_model.as_ptr(), ptr::null()),
            ("bad dtype", model.as_ptr(), &bad_dtype),
            ("bad device", model.as_ptr(), &bad_device),
            ("bad scheduler", model.as_ptr(), &bad_scheduler),
            ("bad struct_size", model.as_ptr(), &bad_size),
        ];
        for (what, path, o) in loads {
            let mut out: *mut sd_pipeline = sentinel();
            failed(sd_pipeline_load(path, o, &mut out), what);
            assert!(
                out.is_null(),
                "sd_pipeline_load, {what}: out_pipeline not cleared"
            );
            checks += 1;
        }

        // sd_generate and sd_job_submit: bad handles, bad parameters.
        let mut bad_width = ok;
        bad_width.width = 33;
        let mut bad_strength = ok;
        bad_strength.init_image = &image;
        bad_strength.strength = 1.5;
        let mut bad_scheduler = ok;
        bad_scheduler.scheduler = c"NoSuchScheduler".as_ptr();
        let mut bad_size = ok;
        bad_size.struct_size = 8;
        let runs: [(&str, *mut sd_pipeline, *const sd_generate_params); 7] = [
            ("NULL pipeline", null_mut(), &ok),
            ("junk pipeline", junk_pipeline, &ok),
            ("NULL params", p, ptr::null()),
            ("width 33", p, &bad_width),
            ("strength 1.5", p, &bad_strength),
            ("unknown scheduler", p, &bad_scheduler),
            ("struct_size 8", p, &bad_size),
        ];
        for (what, pipeline, g) in runs {
            let mut images: *mut sd_images = sentinel();
            failed(sd_generate(pipeline, g, &mut images), what);
            assert!(
                images.is_null(),
                "sd_generate, {what}: out_images not cleared"
            );
            let mut job: *mut sd_job = sentinel();
            failed(sd_job_submit(pipeline, g, &mut job), what);
            assert!(job.is_null(), "sd_job_submit, {what}: out_job not cleared");
            checks += 2;
        }
        // A run that fails while running (cancelled by its callback).
        let mut cancel = StepHook::new(|_| SD_STEP_CANCEL);
        let mut g = ok;
        cancel.install(&mut g);
        let mut images: *mut sd_images = sentinel();
        assert_eq!(sd_generate(p, &g, &mut images), SD_ERR_CANCELLED);
        assert!(
            images.is_null(),
            "sd_generate, cancelled: out_images not cleared"
        );
        checks += 1;

        // sd_images_count and sd_images_get.
        let mut good = ptr::null_mut();
        assert_eq!(sd_generate(p, &ok, &mut good), SD_OK, "{}", last_error());
        for (what, images) in [
            ("NULL images", ptr::null()),
            ("junk images", junk_images as *const sd_images),
        ] {
            let mut n = 12345usize;
            failed(sd_images_count(images, &mut n), what);
            assert_eq!(n, 0, "sd_images_count, {what}: out_count not zeroed");
            let mut img: *const sd_image = sentinel();
            failed(sd_images_get(images, 0, &mut img), what);
            assert!(
                img.is_null(),
                "sd_images_get, {what}: out_image not cleared"
            );
            checks += 2;
        }
        for index in [1, 2, 1000, usize::MAX] {
            let mut img: *const sd_image = sentinel();
            failed(sd_images_get(good, index, &mut img), "index out of range");
            assert!(img.is_null(), "sd_images_get, index {index}: not cleared");
            checks += 1;
        }
        sd_images_free(good);

        // sd_step_preview outside a callback.
        let info = std::mem::zeroed::<sd_step_info>();
        for (what, i) in [
            ("NULL info", ptr::null()),
            ("stale info", &info as *const _),
        ] {
            let mut img: *const sd_image = sentinel();
            failed(sd_step_preview(i, 0, &mut img), what);
            assert!(
                img.is_null(),
                "sd_step_preview, {what}: out_image not cleared"
            );
            checks += 1;
        }
        // ... and inside one, with an index past the batch.
        let inside = Arc::new(Mutex::new(Vec::new()));
        let record = inside.clone();
        let mut hook = StepHook::new(move |info| {
            for index in [info.batch, info.batch + 1, u32::MAX] {
                let mut img: *const sd_image = sentinel();
                let status = sd_step_preview(info, index, &mut img);
                record
                    .lock()
                    .unwrap()
                    .push((index, status, img.is_null(), last_error()));
            }
            SD_STEP_CONTINUE
        });
        let mut g = ok;
        g.batch = 2;
        hook.install(&mut g);
        generate(p, &g).unwrap();
        for (index, status, cleared, message) in inside.lock().unwrap().iter() {
            assert_eq!(*status, SD_ERR_INVALID_ARGUMENT, "{message}");
            assert!(!message.is_empty());
            assert!(
                *cleared,
                "sd_step_preview, index {index}: out_image not cleared"
            );
            checks += 1;
        }

        // sd_job_take_images: NULL and junk jobs, a running job, a cancelled one, taken twice.
        for (what, job) in [("NULL job", null_mut()), ("junk job", junk_job)] {
            let mut images: *mut sd_images = sentinel();
            failed(sd_job_take_images(job, &mut images), what);
            assert!(images.is_null(), "sd_job_take_images, {what}: not cleared");
            checks += 1;
        }
        let gate = Arc::new(Gate::default());
        let mut hook = gate.hook();
        let mut g = params(PROMPT, 3, 0);
        hook.install(&mut g);
        let mut job = ptr::null_mut();
        assert_eq!(sd_job_submit(p, &g, &mut job), SD_OK, "{}", last_error());
        gate.wait_entered();
        let mut images: *mut sd_images = sentinel();
        assert_eq!(sd_job_take_images(job, &mut images), SD_NOT_READY);
        assert!(images.is_null(), "sd_job_take_images, running: not cleared");
        assert_eq!(sd_job_cancel(job), SD_OK);
        gate.release();
        assert_eq!(sd_job_wait(job, -1), SD_ERR_CANCELLED);
        let mut images: *mut sd_images = sentinel();
        assert_eq!(sd_job_take_images(job, &mut images), SD_ERR_CANCELLED);
        assert!(
            images.is_null(),
            "sd_job_take_images, cancelled: not cleared"
        );
        sd_job_free(job);
        let mut job = ptr::null_mut();
        assert_eq!(sd_job_submit(p, &ok, &mut job), SD_OK, "{}", last_error());
        assert_eq!(sd_job_wait(job, -1), SD_OK, "{}", last_error());
        let mut images = ptr::null_mut();
        assert_eq!(sd_job_take_images(job, &mut images), SD_OK);
        sd_images_free(images);
        let mut images: *mut sd_images = sentinel();
        failed(sd_job_take_images(job, &mut images), "taken twice");
        assert!(
            images.is_null(),
            "sd_job_take_images, taken twice: not cleared"
        );
        checks += 3;

        // sd_job_poll: a bad job zeroes the progress; a bad struct_size leaves it alone.
        for (what, j) in [
            ("NULL job", ptr::null()),
            ("junk job", junk_job as *const _),
        ] {
            let mut progress = sd_job_progress {
                struct_size: size_of::<sd_job_progress>(),
                state: SD_JOB_SUCCEEDED,
                step: 77,
                total: 88,
                elapsed_seconds: 9.5,
            };
            failed(sd_job_poll(j, &mut progress), what);
            assert_eq!(
                (progress.state, progress.step, progress.total),
                (SD_JOB_QUEUED, 0, 0),
                "sd_job_poll, {what}: progress not zeroed"
            );
            assert_eq!(progress.elapsed_seconds, 0.0);
            checks += 1;
        }
        let mut progress = sd_job_progress {
            struct_size: 2,
            state: SD_JOB_SUCCEEDED,
            step: 77,
            total: 88,
            elapsed_seconds: 9.5,
        };
        failed(sd_job_poll(job, &mut progress), "struct_size 2");
        assert_eq!(
            (progress.struct_size, progress.step),
            (2, 77),
            "not written"
        );
        sd_job_free(job);
        sd_pipeline_free(p);
    }
    eprintln!("{checks} failing calls left their out-pointers cleared");
}

// ------------------------------------------------------------------------------------------
// 2. submit-time validation

/// Everything the cases point into; it outlives every call.
struct Inputs {
    images: Vec<sd_image>,
    strings: Vec<CString>,
    _buffers: Vec<Vec<u8>>,
}

/// One change to the parameters: its name and what it does (it may pick among values).
type Change = (&'static str, fn(&mut sd_generate_params, &Inputs, &mut Rng));

fn inputs() -> Inputs {
    let rgb = vec![90u8; 48 * 40 * 4 + 64];
    let wide = vec![7u8; 5000 * 8 * 3];
    let d = rgb.as_ptr();
    let img = |data: *const u8, width, height, stride, channels| sd_image {
        data,
        width,
        height,
        stride,
        channels,
    };
    let images = vec![
        img(d, 48, 40, 0, 3),              // 0: good RGB
        img(d, 40, 24, 40 * 4 + 8, 4),     // 1: good strided RGBA
        img(d, 48, 40, 0, 1),              // 2: good grey
        img(ptr::null(), 16, 16, 0, 3),    // 3: NULL data
        img(d, 0, 16, 0, 3),               // 4: zero width
        img(d, 16, 0, 0, 3),               // 5: zero height
        img(d, 16, 16, 20, 3),             // 6: stride < width * channels
        img(d, 16, 16, 0, 2),              // 7: two channels
        img(d, 16, 16, 0, 0),              // 8: no channels
        img(d, 16, 16, 0, 5),              // 9: five channels
        img(d, 100_000, 16, 0, 3),         // 10: too wide
        img(d, 7, 7, 0, 3),                // 11: rounds to 0x0
        img(wide.as_ptr(), 5000, 8, 0, 3), // 12: rounds past 4096
        img(d, 16, u32::MAX, 0, 4),        // 13: absurd height
        img(d, 4, 1, u32::MAX, 3),         // 14: absurd stride on one row: rounds to 0
        img(d, 16, 16, 0, u32::MAX),       // 15: absurd channels
    ];
    let mut long_name = "x".repeat(10_000);
    long_name.push_str("ddim");
    let strings = [
        "NoSuchScheduler",
        "eulerx",
        "DDIM Scheduler",
        "k_euler_z",
        "ddim",
        "DDIMScheduler",
        "euler_a",
        "Euler a",
        "dpm++ 2m karras",
        "lcm",
        &long_name,
        "a lighthouse at dusk",
    ]
    .iter()
    .map(|s| CString::new(*s).unwrap())
    .chain([
        CString::new("x".repeat(MAX_PROMPT_BYTES + 1)).unwrap(),
        CString::new("y".repeat(100_000)).unwrap(),
        CString::new("word ".repeat(MAX_PROMPT_BYTES / 5)).unwrap(),
    ])
    .collect();
    Inputs {
        images,
        strings,
        _buffers: vec![rgb, wide],
    }
}

const BAD_UTF8: &[u8] = b"\xc3\x28 broken\0";

fn pick<T: Copy>(rng: &mut Rng, values: &[T]) -> T {
    values[rng.below(values.len())]
}

const CHANGES: &[Change] = &[
    ("scheduler", |g, i, r| {
        g.scheduler = i.strings[r.below(11)].as_ptr();
    }),
    ("scheduler bad UTF-8", |g, _, _| {
        g.scheduler = BAD_UTF8.as_ptr().cast();
    }),
    ("strength", |g, i, r| {
        g.init_image = &i.images[0];
        g.strength = pick(
            r,
            &[
                1.5,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                1.0000001,
                2.0,
                f64::MAX,
                1e-300,
                0.0,
                0.3,
                1.0,
                -0.5,
            ],
        );
    }),
    ("strength, no image", |g, _, r| {
        g.strength = pick(r, &[1.5, f64::NAN, 7.0, 0.5]);
    }),
    ("guidance", |g, _, r| {
        g.guidance = pick(
            r,
            &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -3.0, 0.0, 1e6],
        );
    }),
    ("eta", |g, _, r| {
        g.eta = pick(r, &[f64::NAN, f64::INFINITY, -1.0, -1e-9, 0.5]);
    }),
    ("width", |g, _, r| {
        g.width = pick(
            r,
            &[7, 12, 33, 4100, 4104, 8192, u32::MAX, u32::MAX - 7, 24],
        );
    }),
    ("height", |g, _, r| {
        g.height = pick(r, &[1, 9, 100, 4097, 65536, u32::MAX, 40]);
    }),
    ("steps", |g, _, r| {
        g.steps = pick(r, &[0, 1001, 5000, u32::MAX, 2]);
    }),
    ("batch", |g, _, r| {
        g.batch = pick(r, &[0, 65, 1000, u32::MAX, 2]);
    }),
    ("clip_skip", |g, _, r| {
        g.clip_skip = pick(r, &[5, 6, 1000, u32::MAX, 1]);
    }),
    ("output_channels", |g, _, r| {
        g.output_channels = pick(r, &[0, 1, 2, 5, u32::MAX, 4]);
    }),
    ("prompt NULL", |g, _, _| g.prompt = ptr::null()),
    ("prompt bad UTF-8", |g, _, _| {
        g.prompt = BAD_UTF8.as_ptr().cast();
    }),
    ("prompt too long", |g, i, r| {
        g.prompt = i.strings[12 + r.below(3)].as_ptr();
    }),
    ("negative bad UTF-8", |g, _, _| {
        g.negative_prompt = BAD_UTF8.as_ptr().cast();
    }),
    ("negative too long", |g, i, _| {
        g.negative_prompt = i.strings[12].as_ptr();
    }),
    ("struct_size", |g, _, r| {
        g.struct_size = pick(r, &[0, 8, 100, 1 << 20, usize::MAX]);
    }),
    ("init_image", |g, i, r| {
        g.init_image = &i.images[r.below(i.images.len())];
    }),
    ("init_image, native size", |g, i, r| {
        g.init_image = &i.images[r.below(i.images.len())];
        g.width = 0;
        g.height = 0;
    }),
    ("mask", |g, i, r| {
        g.mask = &i.images[r.below(i.images.len())];
    }),
    ("inpainting", |g, i, r| {
        g.init_image = &i.images[pick(r, &[0, 1, 2, 11, 12])];
        g.mask = &i.images[r.below(i.images.len())];
    }),
];

/// A job's outcome when it finished: status and message.
unsafe fn outcome(job: *mut sd_job) -> (sd_status, String) {
    let status = sd_job_wait(job, -1);
    (status, last_error())
}

#[test]
fn submit_refuses_at_once_what_generate_refuses_with_the_same_status_and_message() {
    let p = load();
    let inputs = inputs();
    let mut rng = Rng::new(0x0ab1_fa22_5eed_0010);
    let (mut refused, mut accepted, mut slowest) = (0, 0, Duration::ZERO);
    // Valid cases stop at their first step (both calls alike): the point is the checks.
    let mut stop = StepHook::new(|_| SD_STEP_CANCEL);
    let cases = 400;
    for case in 0..cases {
        let mut g = params(PROMPT, 1, case as u64);
        stop.install(&mut g);
        let n = 1 + rng.below(3);
        let mut names = Vec::new();
        for _ in 0..n {
            let (name, change) = CHANGES[rng.below(CHANGES.len())];
            change(&mut g, &inputs, &mut rng);
            names.push(name);
        }
        let what = format!("case {case} ({})", names.join(", "));
        let expected = generate(p, &g).err();
        let mut job: *mut sd_job = sentinel();
        let start = Instant::now();
        let status = unsafe { sd_job_submit(p, &g, &mut job) };
        let took = start.elapsed();
        match expected {
            Some((want, message)) if status != SD_OK => {
                assert_eq!(status, want, "{what}: {message} / {}", last_error());
                assert_eq!(last_error(), message, "{what}");
                assert!(!message.is_empty(), "{what}");
                assert!(job.is_null(), "{what}");
                slowest = slowest.max(took);
                refused += 1;
            }
            expected => {
                // Accepted by submit: the job must end as sd_generate did.
                assert_eq!(status, SD_OK, "{what}: {}", last_error());
                let (got, message) = unsafe { outcome(job) };
                match expected {
                    // Succeeded: an image to image run with no step to do.
                    None => assert_eq!(got, SD_OK, "{what}: generate succeeded, job: {message}"),
                    Some((want, want_message)) => {
                        // Only failures found while running may reach the job.
                        assert!(
                            !matches!(want, SD_ERR_INVALID_ARGUMENT | SD_ERR_UNSUPPORTED),
                            "{what}: submit accepted what generate refused: {want_message}"
                        );
                        assert_eq!((got, message), (want, want_message), "{what}");
                    }
                }
                unsafe { sd_job_free(job) };
                accepted += 1;
            }
        }
    }
    // NULL and junk in the other pointers, for both calls.
    let (_keep, junk_pipeline) = junk::<sd_pipeline>();
    let ok = params(PROMPT, 1, 0);
    for (what, pipeline, g) in [
        ("NULL pipeline", null_mut(), &ok as *const _),
        ("junk pipeline", junk_pipeline, &ok),
        ("NULL params", p, ptr::null()),
    ] {
        let mut images = ptr::null_mut();
        let want = unsafe { sd_generate(pipeline, g, &mut images) };
        let message = last_error();
        let mut job = ptr::null_mut();
        assert_eq!(
            unsafe { sd_job_submit(pipeline, g, &mut job) },
            want,
            "{what}"
        );
        assert_eq!(last_error(), message, "{what}");
        refused += 1;
    }
    unsafe {
        expect(
            sd_generate(p, &ok, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_images is NULL",
        );
        expect(
            sd_job_submit(p, &ok, null_mut()),
            SD_ERR_INVALID_ARGUMENT,
            "out_job is NULL",
        );
        sd_pipeline_free(p);
    }
    eprintln!(
        "{} cases: {refused} refused by both with the same status and message (slowest \
         submit refusal {slowest:?}), {accepted} accepted by both",
        cases + 3
    );
    assert!(
        refused > 300,
        "the table should be mostly invalid: {refused}"
    );
    assert!(accepted > 5, "and some valid combinations: {accepted}");
    assert!(
        slowest < Duration::from_secs(2),
        "submit refused at once: {slowest:?}"
    );
}

#[test]
fn submit_refuses_what_the_model_cannot_take_while_another_call_holds_it() {
    // The check needs no access to the model: with a job blocking the pipeline, a bad
    // request is still refused at once.
    let p = load();
    let gate = Arc::new(Gate::default());
    let mut hook = gate.hook();
    let mut g = params(PROMPT, 2, 0);
    hook.install(&mut g);
    let mut busy = ptr::null_mut();
    unsafe {
        assert_eq!(sd_job_submit(p, &g, &mut busy), SD_OK);
        gate.wait_entered();
        let pixels = [1u8; 7 * 7 * 3];
        let small = sd_image {
            data: pixels.as_ptr(),
            width: 7,
            height: 7,
            stride: 0,
            channels: 3,
        };
        let mut bad = params(PROMPT, 1, 0);
        bad.init_image = &small;
        bad.width = 0;
        bad.height = 0;
        let mut job: *mut sd_job = sentinel();
        let start = Instant::now();
        expect(
            sd_job_submit(p, &bad, &mut job),
            SD_ERR_INVALID_ARGUMENT,
            "width must be a positive multiple of 8",
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(job.is_null());
        let mut bad = params(PROMPT, 1, 0);
        bad.scheduler = c"NoSuchScheduler".as_ptr();
        expect(
            sd_job_submit(p, &bad, &mut job),
            SD_ERR_INVALID_ARGUMENT,
            "NoSuchScheduler",
        );
        gate.release();
        assert_eq!(sd_job_wait(busy, -1), SD_OK, "{}", last_error());
        sd_job_free(busy);
        sd_pipeline_free(p);
    }
}

// ------------------------------------------------------------------------------------------
// 3. cancellation latency

fn seeded_word(bytes: usize) -> String {
    let mut rng = Rng::new(42);
    (0..bytes)
        .map(|_| (b'a' + rng.below(26) as u8) as char)
        .collect()
}

fn state(job: *mut sd_job) -> sd_job_progress {
    let mut p = unsafe { std::mem::zeroed::<sd_job_progress>() };
    p.struct_size = size_of::<sd_job_progress>();
    assert_eq!(unsafe { sd_job_poll(job, &mut p) }, SD_OK);
    p
}

/// Waits until the job left the queue (it then holds the model and starts its run).
fn wait_running(job: *mut sd_job) {
    let start = Instant::now();
    while state(job).state == SD_JOB_QUEUED {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job never started"
        );
        std::thread::yield_now();
    }
}

/// Seconds one denoising step of the quick parameters takes here (median of a short run).
fn step_seconds(p: *mut sd_pipeline) -> f64 {
    let times = Arc::new(Mutex::new(Vec::new()));
    let record = times.clone();
    let mut hook = StepHook::new(move |info| {
        record.lock().unwrap().push(info.elapsed_seconds);
        SD_STEP_CONTINUE
    });
    let mut g = params(PROMPT, 6, 0);
    hook.install(&mut g);
    generate(p, &g).unwrap();
    let t = times.lock().unwrap();
    let mut d: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    d.sort_by(f64::total_cmp);
    d[d.len() / 2]
}

#[test]
fn long_prompts_are_cancelled_and_freed_within_about_a_step() {
    let p = load();
    let step = step_seconds(p);
    // About one step, plus slack for a loaded two-core machine; before the fix these took
    // as long as tokenising the prompt (about half a minute for the 60 KB word).
    let bound = Duration::from_secs_f64(3.0 + 5.0 * step);
    let word = CString::new(seeded_word(60_000)).unwrap();
    let words = CString::new("a lighthouse at dusk, ".repeat(2_900)).unwrap();
    assert!(word.as_bytes().len() <= MAX_PROMPT_BYTES);
    assert!(words.as_bytes().len() <= MAX_PROMPT_BYTES);
    for (what, prompt) in [("one 60 KB word", &word), ("2,900 short words", &words)] {
        let mut g = params(prompt, 500, 0);
        g.negative_prompt = prompt.as_ptr();
        unsafe {
            // Cancel as soon as it runs: during the prompt's encoding or just after.
            let mut job = ptr::null_mut();
            assert_eq!(sd_job_submit(p, &g, &mut job), SD_OK, "{}", last_error());
            wait_running(job);
            let start = Instant::now();
            assert_eq!(sd_job_cancel(job), SD_OK);
            assert_eq!(sd_job_wait(job, -1), SD_ERR_CANCELLED, "{}", last_error());
            let cancel = start.elapsed();
            sd_job_free(job);

            // The first step comes quickly; then free the running job.
            let mut job = ptr::null_mut();
            let start = Instant::now();
            assert_eq!(sd_job_submit(p, &g, &mut job), SD_OK, "{}", last_error());
            while state(job).step == 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{what}: no step after a minute"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let first_step = start.elapsed();
            let start = Instant::now();
            sd_job_free(job);
            let free = start.elapsed();

            // A job freed as soon as it runs (while it encodes its prompt).
            let mut job = ptr::null_mut();
            assert_eq!(sd_job_submit(p, &g, &mut job), SD_OK);
            wait_running(job);
            let start = Instant::now();
            sd_job_free(job);
            let free_early = start.elapsed();

            eprintln!(
                "{what}: cancel -> finished {cancel:?}, submit -> first step {first_step:?}, \
                 free running {free:?}, free at once {free_early:?} (one step: {:.1} ms)",
                step * 1000.0
            );
            for (name, took) in [
                ("cancel", cancel),
                ("first step", first_step),
                ("free", free),
                ("free at once", free_early),
            ] {
                assert!(
                    took < bound,
                    "{what}: {name} took {took:?} (bound {bound:?})"
                );
            }
        }
    }

    // sd_pipeline_free with such a job running returns as promptly.
    let q = load();
    let mut g = params(&word, 500, 0);
    g.negative_prompt = word.as_ptr();
    unsafe {
        let mut job = ptr::null_mut();
        assert_eq!(sd_job_submit(q, &g, &mut job), SD_OK);
        wait_running(job);
        let start = Instant::now();
        sd_pipeline_free(q);
        let took = start.elapsed();
        assert_eq!(state(job).state, SD_JOB_CANCELLED);
        sd_job_free(job);
        eprintln!("sd_pipeline_free with a 60 KB-word job: {took:?}");
        assert!(took < bound, "sd_pipeline_free took {took:?}");
    }

    // Over the byte limit: refused at once, by both calls.
    let huge = CString::new(seeded_word(100_000)).unwrap();
    let g = params(&huge, 1, 0);
    unsafe {
        let mut job: *mut sd_job = sentinel();
        let start = Instant::now();
        expect(
            sd_job_submit(p, &g, &mut job),
            SD_ERR_INVALID_ARGUMENT,
            &format!("params->prompt is 100000 bytes: the limit is {MAX_PROMPT_BYTES}"),
        );
        assert!(job.is_null());
        assert!(start.elapsed() < Duration::from_secs(1));
        let mut images: *mut sd_images = sentinel();
        expect(
            sd_generate(p, &g, &mut images),
            SD_ERR_INVALID_ARGUMENT,
            "100000 bytes",
        );
        assert!(images.is_null());
        sd_pipeline_free(p);
    }
}

/// The job a log callback cancels once it sees the prompt-truncation warning.
#[derive(Default)]
struct CancelOnWarning {
    job: AtomicUsize,
    warnings: Mutex<Vec<String>>,
}

unsafe extern "C" fn cancel_on_warning(
    level: sd_log_level,
    message: *const c_char,
    user_data: *mut c_void,
) {
    let me = &*(user_data as *const CancelOnWarning);
    if level == sd_log_level::SD_LOG_WARN {
        let text = CStr::from_ptr(message).to_string_lossy().into_owned();
        me.warnings.lock().unwrap().push(text);
        // The submitting thread stores the handle right after sd_job_submit returns.
        let mut job = me.job.load(Ordering::SeqCst);
        while job == 0 {
            std::thread::yield_now();
            job = me.job.load(Ordering::SeqCst);
        }
        sd_job_cancel(job as *mut sd_job);
    }
}

#[test]
fn a_cancel_during_the_prompt_encoding_stops_the_run_before_its_first_step() {
    let p = load();
    let hook_state: Box<CancelOnWarning> = Box::default();
    let steps = Arc::new(AtomicUsize::new(0));
    let counter = steps.clone();
    let mut hook = StepHook::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        SD_STEP_CONTINUE
    });
    let long = CString::new("a red circle ".repeat(40)).unwrap();
    let mut g = params(&long, 5, 0);
    hook.install(&mut g);
    unsafe {
        let user = &*hook_state as *const CancelOnWarning as *mut c_void;
        assert_eq!(
            sd_pipeline_set_log_callback(p, Some(cancel_on_warning), user),
            SD_OK
        );
        let mut job = ptr::null_mut();
        assert_eq!(sd_job_submit(p, &g, &mut job), SD_OK, "{}", last_error());
        hook_state.job.store(job as usize, Ordering::SeqCst);
        expect(sd_job_wait(job, -1), SD_ERR_CANCELLED, "cancelled");
        let progress = state(job);
        assert_eq!(progress.state, SD_JOB_CANCELLED);
        assert_eq!(progress.step, 0, "no step ran");
        assert_eq!(steps.load(Ordering::SeqCst), 0, "no step callback ran");
        let warnings = hook_state.warnings.lock().unwrap().clone();
        assert!(
            warnings.iter().any(|w| w.contains("longer than 77 tokens")),
            "{warnings:?}"
        );
        sd_job_free(job);
        sd_pipeline_set_log_callback(p, None, ptr::null_mut());
        sd_pipeline_free(p);
    }
}
