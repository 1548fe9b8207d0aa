//! `sd_pipeline`: a loaded model behind a mutex (calls on one pipeline run one at a time,
//! separate pipelines in parallel), its log callback, and the one generate path that both
//! `sd_generate` and the job worker go through.
use super::convert::{optional_str, request, required_str, Request};
use super::images::sd_images;
use super::job::JobShared;
use super::status::{clear_out, guard, guard_void, sd_status, Fail};
use super::step;
use super::types::{
    read_versioned, sd_generate_params, sd_job_state, sd_load_options, sd_load_progress, sd_log_fn,
    sd_log_level, sd_pipeline_info, write_versioned, Versioned, SD_DEVICE_CPU, SD_DEVICE_CUDA,
    SD_DEVICE_MPS, SD_DTYPE_BF16, SD_DTYPE_FP16, SD_DTYPE_FP32, SD_FAMILY_SD1, SD_FAMILY_SD2,
    SD_FAMILY_SDXL, SD_FAMILY_SDXL_REFINER, SD_PREDICTION_EPSILON, SD_PREDICTION_SAMPLE,
    SD_PREDICTION_V, SD_WEIGHTS_AUTO, SD_WEIGHTS_PACKED, SD_WEIGHTS_PLAIN,
};
use crate::pipeline::{
    Control, LoadOptions, LoadProgress, LoadProgressHook, LogLevel, ModelFamily, PipelineInfo,
    StableDiffusion, StepInfo, Validator, WeightKernels,
};
use crate::schedulers::PredictionType;
use crate::weights::single_file::ModelOverrides;
use parking_lot::{Mutex, MutexGuard};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tch::{Device, Kind};

const PIPELINE_MAGIC: u64 = 0x5344_5049_5045_4c4e; // "SDPIPELN"

/// A loaded model. Create it with `sd_pipeline_load`, release it with `sd_pipeline_free`.
/// Every function taking a pipeline may be called from any thread; calls on the same pipeline
/// run one at a time (the others wait), calls on different pipelines run in parallel.
pub struct sd_pipeline {
    magic: u64,
    inner: Arc<PipelineInner>,
}

/// The C log callback with its user data.
#[derive(Clone, Copy)]
struct LogSink {
    func: unsafe extern "C" fn(sd_log_level, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: the documented contract of `sd_log_fn`: it may run on worker threads.
unsafe impl Send for LogSink {}

/// What a pipeline handle, its calls in flight and its jobs share.
pub(crate) struct PipelineInner {
    model: Mutex<StableDiffusion>,
    log: Arc<Mutex<Option<LogSink>>>,
    default_scheduler: Option<String>,
    /// The model's checks of a request, usable while a call holds the model.
    validator: Validator,
    /// What `sd_pipeline_get_info` reports, taken at load (the model never changes after).
    info: PipelineInfo,
    /// The default scheduler's name as `sd_pipeline_get_info` hands it out.
    default_scheduler_text: CString,
    jobs: Mutex<Vec<Weak<JobShared>>>,
}

thread_local! {
    /// The pipelines whose model this thread holds (to refuse re-entry from a callback).
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The locked model; dropping it unlocks and forgets the re-entry mark.
pub(crate) struct ModelGuard<'a> {
    model: MutexGuard<'a, StableDiffusion>,
    key: usize,
}

impl Drop for ModelGuard<'_> {
    fn drop(&mut self) {
        HELD.with(|h| h.borrow_mut().retain(|&k| k != self.key));
    }
}

impl PipelineInner {
    fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// True inside a callback of a call or job running on this pipeline, on this thread.
    pub fn held_by_this_thread(&self) -> bool {
        HELD.with(|h| h.borrow().contains(&self.key()))
    }

    /// Waits for the model. `cancel`, checked every few milliseconds, gives up the wait.
    pub fn lock(&self, cancel: Option<&dyn Fn() -> bool>) -> Result<ModelGuard<'_>, Fail> {
        if self.held_by_this_thread() {
            return Err(Fail::invalid(
                "this pipeline is already generating on this thread: a callback must not \
                 call sd_generate on its own pipeline",
            ));
        }
        let model = match cancel {
            None => self.model.lock(),
            Some(cancelled) => loop {
                if cancelled() {
                    return Err(Fail::cancelled());
                }
                if let Some(m) = self.model.try_lock_for(Duration::from_millis(5)) {
                    break m;
                }
            },
        };
        HELD.with(|h| h.borrow_mut().push(self.key()));
        Ok(ModelGuard {
            model,
            key: self.key(),
        })
    }

    /// Sends a message of the FFI layer to the log callback, if any.
    pub fn log(&self, level: LogLevel, message: &str) {
        forward(&self.log, level, message);
    }

    pub fn track(&self, job: &Arc<JobShared>) {
        let mut jobs = self.jobs.lock();
        jobs.retain(|j| j.strong_count() > 0);
        jobs.push(Arc::downgrade(job));
    }

    /// Runs one generate call under the lock; `job` (when this is a job) gets the progress and
    /// its cancel flag is honoured while waiting and between every two phases of the run
    /// (image preparation, VAE encodes, prompt encodings, steps, each image's decode).
    pub fn run(&self, req: &Request, job: Option<&JobShared>) -> Result<Box<sd_images>, Fail> {
        let cancelled = || job.is_some_and(|j| j.is_cancelled());
        let wait = job.map(|_| &cancelled as &dyn Fn() -> bool);
        // With a refiner both models are held, always locked in the same (address) order so
        // that two calls refining each other's pipelines cannot deadlock.
        let (model, refiner) = match &req.refiner {
            None => (self.lock(wait)?, None),
            Some((r, start)) if self.key() < r.key() => {
                let model = self.lock(wait)?;
                (model, Some((r.lock(wait)?, *start)))
            }
            Some((r, start)) => {
                let refiner = r.lock(wait)?;
                (self.lock(wait)?, Some((refiner, *start)))
            }
        };
        if cancelled() {
            return Err(Fail::cancelled());
        }
        if let Some(job) = job {
            job.set_running();
        }
        self.log(LogLevel::Debug, &describe(req));
        let start = Instant::now();
        let mut on_step = |s: &StepInfo| -> Control {
            if let Some(job) = job {
                job.set_step(s.step, s.total);
                let every = req.preview_every as usize;
                if every > 0 && (s.step % every == 0 || s.step == s.total) {
                    // A preview that cannot be made (latents it cannot map) is skipped: the
                    // run itself is not at fault.
                    if let Ok(images) = s.previews() {
                        job.set_preview(s.step, sd_images::from_rgb_images(&images, req.channels));
                    }
                }
            }
            let stop_asked = req
                .on_step
                .is_some_and(|cb| step::call(cb, s, start.elapsed()));
            if stop_asked || cancelled() {
                Control::Cancel
            } else {
                Control::Continue
            }
        };
        let images = match &refiner {
            Some((r, start)) => model.model.generate_with_refiner(
                &r.model,
                &req.params,
                *start,
                Some(&mut on_step),
                &cancelled,
            )?,
            None => {
                model
                    .model
                    .generate_cancellable(&req.params, Some(&mut on_step), &cancelled)?
            }
        };
        drop(refiner);
        drop(model);
        sd_images::from_images(&images, req.channels)
    }

    /// Cancels this pipeline's unfinished jobs and waits until they stopped (except a job
    /// whose callback is the caller: it stops after its callback returns).
    fn stop_jobs(&self) {
        let jobs: Vec<_> = self.jobs.lock().drain(..).collect();
        for job in jobs.iter().filter_map(Weak::upgrade) {
            job.cancel();
            if !job.is_worker_thread() {
                job.wait_finished(None);
            }
        }
    }
}

fn describe(req: &Request) -> String {
    let p = &req.params;
    let mode = match (&p.init_image, &p.mask) {
        (None, _) => "txt2img",
        (Some(_), None) => "img2img",
        (Some(_), Some(_)) => "inpaint",
    };
    let side = |v: Option<i64>| v.map_or("default".to_string(), |v| v.to_string());
    format!(
        "{mode}: {} steps, {}x{}, batch {}, seed {}, guidance {}",
        p.steps,
        side(p.width),
        side(p.height),
        p.batch,
        p.seed,
        p.guidance
    )
}

fn forward(slot: &Mutex<Option<LogSink>>, level: LogLevel, message: &str) {
    // Copy the sink out so that the callback may itself replace it without deadlock.
    let Some(sink) = *slot.lock() else { return };
    let level = match level {
        LogLevel::Debug => sd_log_level::SD_LOG_DEBUG,
        LogLevel::Info => sd_log_level::SD_LOG_INFO,
        LogLevel::Warn => sd_log_level::SD_LOG_WARN,
    };
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: the documented contract of `sd_log_fn`.
    unsafe { (sink.func)(level, text.as_ptr(), sink.user_data) };
}

/// # Safety
/// `p` is NULL or a live pipeline pointer.
pub(crate) unsafe fn inner_of(p: *const sd_pipeline) -> Result<Arc<PipelineInner>, Fail> {
    inner_named(p, "pipeline")
}

/// [`inner_of`] for a pipeline argument called `what` in the errors.
///
/// # Safety
/// `p` is NULL or a live pipeline pointer.
pub(crate) unsafe fn inner_named(
    p: *const sd_pipeline,
    what: &str,
) -> Result<Arc<PipelineInner>, Fail> {
    match p.as_ref() {
        Some(h) if h.magic == PIPELINE_MAGIC => Ok(h.inner.clone()),
        Some(_) => Err(Fail::invalid(format!(
            "{what} is not a live sd_pipeline handle"
        ))),
        None => Err(Fail::invalid(format!("{what} is NULL"))),
    }
}

pub(crate) fn parse_device(name: Option<&str>) -> Result<Device, Fail> {
    let name = name.unwrap_or("cpu");
    let bad = || {
        Fail::invalid(format!(
            "options->device is \"{name}\": use \"cpu\", \"cuda\", \"cuda:N\" or \"mps\""
        ))
    };
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "mps" => Device::Mps,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => return Err(bad()),
        },
    };
    match device {
        Device::Cuda(n) if !tch::Cuda::is_available() => Err(Fail::unsupported(format!(
            "device cuda:{n}: this libtorch has no CUDA or sees no GPU"
        ))),
        Device::Cuda(n) if n >= tch::Cuda::device_count() as usize => {
            Err(Fail::unsupported(format!(
                "device cuda:{n}: only {} CUDA devices are visible",
                tch::Cuda::device_count()
            )))
        }
        Device::Mps if !tch::utils::has_mps() => Err(Fail::unsupported(
            "device mps: this libtorch was built without MPS",
        )),
        d => Ok(d),
    }
}

fn parse_dtype(dtype: i32) -> Result<Kind, Fail> {
    match dtype {
        SD_DTYPE_FP32 => Ok(Kind::Float),
        SD_DTYPE_FP16 => Ok(Kind::Half),
        SD_DTYPE_BF16 => Ok(Kind::BFloat16),
        other => Err(Fail::invalid(format!(
            "options->dtype is {other}: use SD_DTYPE_FP32, SD_DTYPE_FP16 or SD_DTYPE_BF16"
        ))),
    }
}

fn parse_weights(weights: i32) -> Result<WeightKernels, Fail> {
    match weights {
        SD_WEIGHTS_AUTO => Ok(WeightKernels::Auto),
        SD_WEIGHTS_PLAIN => Ok(WeightKernels::Plain),
        SD_WEIGHTS_PACKED => Ok(WeightKernels::Packed),
        other => Err(Fail::invalid(format!(
            "options->plain_weights is {other}: use SD_WEIGHTS_AUTO, SD_WEIGHTS_PLAIN or \
             SD_WEIGHTS_PACKED"
        ))),
    }
}

/// A load as the caller asked for it, everything copied out of its arguments, so that it may
/// run after they are gone (`sd_pipeline_load_async`).
pub(crate) struct LoadRequest {
    path: String,
    options: LoadOptions,
    overrides: ModelOverrides,
    scheduler: Option<String>,
    log: Option<LogSink>,
    progress: Option<ProgressSink>,
}

/// The caller's progress callback.
#[derive(Clone, Copy)]
struct ProgressSink {
    func: unsafe extern "C" fn(*const sd_load_progress, *mut c_void) -> i32,
    user_data: *mut c_void,
}

// SAFETY: the documented contract of `sd_load_progress_fn`: it may run on a worker thread.
unsafe impl Send for ProgressSink {}
unsafe impl Sync for ProgressSink {}

/// A load progress component name as a static C string (`sd_load_progress.component`).
pub(crate) fn component_name(name: &str) -> &'static CStr {
    match name {
        "text encoder" => c"text encoder",
        "second text encoder" => c"second text encoder",
        "UNet" => c"UNet",
        "VAE" => c"VAE",
        "tiny autoencoder" => c"tiny autoencoder",
        "done" => c"done",
        "" => c"",
        _ => c"model",
    }
}

/// `progress` as the C struct, in `state`.
pub(crate) fn c_progress(progress: &LoadProgress, state: sd_job_state) -> sd_load_progress {
    sd_load_progress {
        struct_size: std::mem::size_of::<sd_load_progress>(),
        state,
        component: component_name(&progress.component).as_ptr(),
        tensors_done: progress.tensors_done,
        bytes_done: progress.bytes_done,
        bytes_total: progress.bytes_total,
        elapsed_seconds: progress.elapsed_seconds,
    }
}

/// # Safety
/// As `sd_pipeline_load`.
pub(crate) unsafe fn read_load_request(
    model_path: *const c_char,
    options: *const sd_load_options,
) -> Result<LoadRequest, Fail> {
    let path = required_str(model_path, "model_path")?;
    read_load_options(path, options)
}

/// # Safety
/// `options` as in `sd_pipeline_load`.
unsafe fn read_load_options(
    path: &str,
    options: *const sd_load_options,
) -> Result<LoadRequest, Fail> {
    let opts = if options.is_null() {
        sd_load_options::defaults()
    } else {
        read_versioned(options, "options")?
    };
    if opts.num_threads as usize > crate::runtime::MAX_THREADS {
        return Err(Fail::invalid(format!(
            "options->num_threads is {}: at most {}",
            opts.num_threads,
            crate::runtime::MAX_THREADS
        )));
    }
    let load_options = LoadOptions {
        device: parse_device(optional_str(opts.device, "options->device")?)?,
        kind: parse_dtype(opts.dtype)?,
        copy_weights: opts.copy_weights != 0,
        weight_kernels: parse_weights(opts.plain_weights)?,
        lora_dir: optional_str(opts.lora_dir, "options->lora_dir")?.map(PathBuf::from),
        embeddings_dir: optional_str(opts.embeddings_dir, "options->embeddings_dir")?
            .map(PathBuf::from),
        tiny_vae: optional_str(opts.tiny_vae, "options->tiny_vae")?.map(PathBuf::from),
        progress: None,
        num_threads: (opts.num_threads > 0).then_some(opts.num_threads as usize),
    };
    let scheduler = optional_str(opts.scheduler, "options->scheduler")?.map(str::to_owned);
    let overrides = ModelOverrides {
        use_ema: opts.use_ema != 0,
        config_dir: optional_str(opts.config_dir, "options->config_dir")?.map(PathBuf::from),
        ..Default::default()
    };
    Ok(LoadRequest {
        path: path.to_owned(),
        options: load_options,
        overrides,
        scheduler,
        log: opts.log_fn.map(|func| LogSink {
            func,
            user_data: opts.log_user_data,
        }),
        progress: opts.on_progress.map(|func| ProgressSink {
            func,
            user_data: opts.progress_user_data,
        }),
    })
}

/// An async load's view of the progress: it records it and says whether to go on.
pub(crate) type LoadTracker = Arc<dyn Fn(&LoadProgress) -> bool + Send + Sync>;

/// Runs a load; `tracker` (an async load's) sees every progress report and may cancel.
pub(crate) fn load_request(
    req: LoadRequest,
    tracker: Option<LoadTracker>,
) -> Result<sd_pipeline, Fail> {
    if !Path::new(&req.path).exists() {
        return Err(Fail::new(
            sd_status::SD_ERR_IO,
            format!("model folder {} not found", req.path),
        ));
    }
    load_from(req, tracker, None)
}

/// [`load_request`] from the file or folder at `req.path`, or from `memory` (a single-file
/// checkpoint held by the caller, which `req.path` then names).
fn load_from(
    mut req: LoadRequest,
    tracker: Option<LoadTracker>,
    memory: Option<&[u8]>,
) -> Result<sd_pipeline, Fail> {
    if req.progress.is_some() || tracker.is_some() {
        let sink = req.progress;
        req.options.progress = Some(LoadProgressHook(Arc::new(move |p: &LoadProgress| {
            let go_on = tracker.as_ref().map_or(true, |t| t(p));
            let c = c_progress(p, sd_job_state::SD_JOB_RUNNING);
            // SAFETY: the documented contract of `sd_load_progress_fn`.
            let asked_stop = sink.is_some_and(|s| unsafe { (s.func)(&c, s.user_data) } != 0);
            go_on && !asked_stop
        })));
    }
    let log = Arc::new(Mutex::new(req.log));
    let started = Instant::now();
    let mut model = match memory {
        Some(data) => {
            StableDiffusion::load_from_memory(&req.path, data, &req.options, &req.overrides)?
        }
        None => StableDiffusion::load_with(Path::new(&req.path), &req.options, &req.overrides)?,
    };
    if let Some(name) = &req.scheduler {
        model.scheduler(Some(name))?; // an unknown name fails here, not at the first call
    }
    let slot = log.clone();
    model.set_logger(Some(Arc::new(move |level, message: &str| {
        forward(&slot, level, message)
    })));
    let info = model.info();
    forward(
        &log,
        LogLevel::Info,
        &format!(
            "loaded {} ({:?}, {:?} on {:?}) in {:.2} s",
            req.path,
            info.family,
            req.options.kind,
            req.options.device,
            started.elapsed().as_secs_f64()
        ),
    );
    model.report_unused_embeddings();
    let validator = model.validator();
    let default_scheduler_text = req
        .scheduler
        .clone()
        .or(info.default_scheduler.clone())
        .and_then(|name| CString::new(name).ok())
        .unwrap_or_default();
    Ok(sd_pipeline {
        magic: PIPELINE_MAGIC,
        inner: Arc::new(PipelineInner {
            model: Mutex::new(model),
            info,
            default_scheduler_text,
            log,
            default_scheduler: req.scheduler,
            validator,
            jobs: Mutex::new(Vec::new()),
        }),
    })
}

/// Loads a Stable Diffusion 1.x / 2.x model from a diffusers folder (`model_index.json`,
/// `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; fp32 or fp16 safetensors), a
/// single original-layout `.safetensors` or `.ckpt` file, or a TorchScript export folder, and
/// stores a new pipeline in `*out_pipeline` (NULL on failure). `options` may be NULL for the
/// defaults (see `sd_load_options_init`). `model_path` is UTF-8, borrowed for the call.
///
/// Ownership: the caller owns the pipeline and releases it with `sd_pipeline_free`.
/// Threading: thread-safe; loads on the calling thread (seconds for a full-size model).
/// Errors: `SD_ERR_INVALID_ARGUMENT` (NULL, bad UTF-8, a bad device or dtype, an unknown
/// scheduler name), `SD_ERR_IO` (folder or file missing), `SD_ERR_BAD_MODEL` (bad config or
/// weights), `SD_ERR_UNSUPPORTED` (device not available, model family not supported),
/// `SD_ERR_OUT_OF_MEMORY`, `SD_ERR_BACKEND`.
///
/// Pointers: each one NULL (an error) or valid as described above.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_load(
    model_path: *const c_char,
    options: *const sd_load_options,
    out_pipeline: *mut *mut sd_pipeline,
) -> sd_status {
    guard(|| {
        clear_out(out_pipeline, "out_pipeline", std::ptr::null_mut())?;
        let pipeline = load_request(read_load_request(model_path, options)?, None)?;
        out_pipeline.write(Box::into_raw(Box::new(pipeline)));
        Ok(())
    })
}

/// Loads a pipeline from a single-file checkpoint held in memory (a `.safetensors` or a
/// PyTorch zip `.ckpt`, e.g. unpacked from an engine's own asset archive) and stores it in
/// `*out_pipeline` (NULL on failure), as `sd_pipeline_load` would from the same bytes in a
/// file, with the same checks. `data` is borrowed for the call only: every tensor is copied
/// out, so the caller may free it when this returns. `name` (UTF-8, may be NULL: "memory")
/// stands for the buffer in messages. Diffusers folders cannot come from memory.
///
/// Ownership: the caller owns the pipeline and releases it with `sd_pipeline_free`.
/// Threading: thread-safe; loads on the calling thread.
/// Errors: as `sd_pipeline_load`; `SD_ERR_BAD_MODEL` for bytes that are not a checkpoint or
/// are truncated or malformed (naming what is wrong).
///
/// Pointers: `data` is NULL (an error) or valid for `size` bytes of reads; the others as in
/// `sd_pipeline_load`.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_load_from_memory(
    data: *const c_void,
    size: usize,
    name: *const c_char,
    options: *const sd_load_options,
    out_pipeline: *mut *mut sd_pipeline,
) -> sd_status {
    guard(|| {
        clear_out(out_pipeline, "out_pipeline", std::ptr::null_mut())?;
        if data.is_null() {
            return Err(Fail::invalid("data is NULL"));
        }
        if size > isize::MAX as usize {
            return Err(Fail::invalid(format!(
                "size {size} is larger than memory can be"
            )));
        }
        let name = optional_str(name, "name")?.unwrap_or("memory");
        let req = read_load_options(name, options)?;
        let bytes = std::slice::from_raw_parts(data as *const u8, size);
        let pipeline = load_from(req, None, Some(bytes))?;
        out_pipeline.write(Box::into_raw(Box::new(pipeline)));
        Ok(())
    })
}

/// Releases a pipeline. Its jobs that have not finished are cancelled, and this call waits
/// until they stopped (at most about one denoising step each), so that no callback of this
/// pipeline runs after it returns; their `sd_job` handles stay valid (state
/// `SD_JOB_CANCELLED`) until `sd_job_free`. NULL is ignored.
///
/// Threading: must not race with other calls on this pipeline (other than its jobs running).
/// Called from inside one of its own callbacks, the pipeline is released when that call ends.
///
/// Pointers: `pipeline` is NULL or a live pipeline not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_free(pipeline: *mut sd_pipeline) {
    guard_void(|| {
        if inner_of(pipeline).is_err() {
            return;
        }
        let mut handle = Box::from_raw(pipeline);
        handle.magic = 0;
        handle.inner.stop_jobs();
    })
}

/// Routes this pipeline's log messages (warnings such as a prompt cut at 77 tokens or a
/// scheduler fallback; one debug line per run) to `callback` with `user_data`, replacing any
/// earlier one; a NULL `callback` turns logging off. There is no process-global logger.
///
/// Threading: thread-safe, does not wait for a running call; the callback runs on the thread
/// doing the work (see `sd_log_fn`), possibly while this function returns on another.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `pipeline` is NULL.
///
/// Pointers: `pipeline` is NULL or live; `callback` and `user_data` are usable from any thread.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_set_log_callback(
    pipeline: *mut sd_pipeline,
    callback: sd_log_fn,
    user_data: *mut c_void,
) -> sd_status {
    guard(|| {
        let inner = inner_of(pipeline)?;
        *inner.log.lock() = callback.map(|func| LogSink { func, user_data });
        Ok(())
    })
}

/// Generates images and stores them in `*out_images` (NULL on failure): text to image, image
/// to image (`params->init_image`) or inpainting (`params->init_image` and `params->mask`).
/// Blocks until done; `params->on_step` runs after every step on this thread and may cancel.
///
/// Ownership: `params` and everything it points to are borrowed for the call; the caller owns
/// the images and releases them with `sd_images_free`.
/// Threading: any thread; calls on one pipeline run one at a time (this one waits for the
/// others and for running jobs), different pipelines in parallel. Must not be called from a
/// callback of the same pipeline (`SD_ERR_INVALID_ARGUMENT`).
/// Errors: `SD_ERR_INVALID_ARGUMENT` (NULL, bad UTF-8, `struct_size`, sizes, steps, batch,
/// strength, images, clip_skip, a prompt over 65536 bytes, an unknown scheduler name; all
/// checked before the call waits for the pipeline), `SD_ERR_CANCELLED` (the callback asked),
/// `SD_ERR_OUT_OF_MEMORY`, `SD_ERR_BACKEND`.
///
/// Pointers: each one NULL (an error) or valid as described above.
#[no_mangle]
pub unsafe extern "C" fn sd_generate(
    pipeline: *mut sd_pipeline,
    params: *const sd_generate_params,
    out_images: *mut *mut sd_images,
) -> sd_status {
    guard(|| {
        clear_out(out_images, "out_images", std::ptr::null_mut())?;
        let inner = inner_of(pipeline)?;
        let req = request_for(&inner, params)?;
        let images = inner.run(&req, None)?;
        out_images.write(Box::into_raw(images));
        Ok(())
    })
}

/// Reads and checks a generate request completely, before anything waits or runs: the C
/// arguments ([`request`]), then everything the pipeline checks before a run
/// ([`Validator::validate`]: sizes against the model, scheduler name, strength, images,
/// prompt length...). `sd_generate` and `sd_job_submit` both call it first, so they refuse
/// the same requests with the same status and message, at once.
///
/// # Safety
/// As `sd_job_submit`.
pub(crate) unsafe fn request_for(
    inner: &PipelineInner,
    params: *const sd_generate_params,
) -> Result<Request, Fail> {
    let req = request(params, inner.default_scheduler.as_deref())?;
    inner.validator.validate(&req.params)?;
    if let Some((refiner, _)) = &req.refiner {
        if refiner.key() == inner.key() {
            return Err(Fail::invalid(
                "params->refiner is the pipeline itself: give another pipeline",
            ));
        }
        refiner.validator.validate_phase(&req.params, true)?;
    }
    Ok(req)
}

/// The C view of a pipeline's [`PipelineInfo`]; `default_scheduler` points into `text`.
fn info_of(info: &PipelineInfo, text: &CString) -> sd_pipeline_info {
    let to_u32 = |v: i64| u32::try_from(v).unwrap_or(0);
    let (device_type, device_index) = match info.device {
        Device::Cuda(i) => (SD_DEVICE_CUDA, i32::try_from(i).unwrap_or(0)),
        Device::Mps => (SD_DEVICE_MPS, 0),
        _ => (SD_DEVICE_CPU, 0),
    };
    sd_pipeline_info {
        struct_size: std::mem::size_of::<sd_pipeline_info>(),
        family: match info.family {
            ModelFamily::Sd1 => SD_FAMILY_SD1,
            ModelFamily::Sd2 => SD_FAMILY_SD2,
            ModelFamily::Sdxl => SD_FAMILY_SDXL,
            ModelFamily::SdxlRefiner => SD_FAMILY_SDXL_REFINER,
        },
        native_width: to_u32(info.native_size),
        native_height: to_u32(info.native_size),
        prediction_type: match info.prediction_type {
            PredictionType::Epsilon => SD_PREDICTION_EPSILON,
            PredictionType::VPrediction => SD_PREDICTION_V,
            PredictionType::Sample => SD_PREDICTION_SAMPLE,
        },
        unet_in_channels: to_u32(info.unet_in_channels),
        latent_channels: to_u32(info.latent_channels),
        vae_scale_factor: to_u32(info.vae_scale_factor),
        max_clip_skip: info
            .max_clip_skip
            .map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX)),
        default_scheduler: text.as_ptr(),
        dtype: match info.kind {
            Kind::Half => SD_DTYPE_FP16,
            Kind::BFloat16 => SD_DTYPE_BF16,
            _ => SD_DTYPE_FP32,
        },
        device_type,
        device_index,
    }
}

/// Fills `*info` with what `pipeline` loaded: family, native size, prediction type, UNet
/// input and latent channels, VAE scale factor, the largest `clip_skip`, default scheduler,
/// dtype and device. Set `info->struct_size = sizeof(sd_pipeline_info)` first.
///
/// Threading: thread-safe and never waits, even while the pipeline is generating.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when a pointer is NULL or `struct_size` is too small
/// (then `*info` is not written).
///
/// Pointers: `pipeline` is NULL or live; `info` is NULL or valid for `info->struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_get_info(
    pipeline: *const sd_pipeline,
    info: *mut sd_pipeline_info,
) -> sd_status {
    guard(|| {
        if info.is_null() {
            return Err(Fail::invalid("info is NULL"));
        }
        let caller_size = (info as *const usize).read_unaligned();
        let inner = inner_of(pipeline)?;
        let value = info_of(&inner.info, &inner.default_scheduler_text);
        write_versioned(info, caller_size, value, "info")
    })
}
