//! `sd_job`: a generate call on a worker thread, for callers that must not block (game loops):
//! submit, poll, cancel, wait with a timeout, take the images, free.
use super::convert::Request;
use super::images::sd_images;
use super::pipeline::{inner_of, request_for, sd_pipeline, PipelineInner};
use super::status::{clear_out, guard, guard_void, sd_status, Fail};
use super::types::{sd_generate_params, sd_job_progress, sd_job_state, write_versioned};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

const JOB_MAGIC: u64 = 0x5344_4a4f_4253_2121; // "SDJOBS!!"

/// What the worker reports and the handle reads.
struct JobStatus {
    state: sd_job_state,
    step: u32,
    total: u32,
    /// `Some` once finished: success, or the failure.
    outcome: Option<Result<(), Fail>>,
    /// The images of a successful run until they are taken.
    images: Option<Box<sd_images>>,
    /// The latest preview not yet taken and its step (`job_preview_every`).
    preview: Option<(u32, Box<sd_images>)>,
}

/// Shared by the handle, the worker thread and the pipeline (which cancels it on free).
pub(crate) struct JobShared {
    cancel: AtomicBool,
    status: Mutex<JobStatus>,
    finished: Condvar,
    submitted: Instant,
    worker: Mutex<Option<ThreadId>>,
}

impl JobShared {
    fn new() -> Self {
        Self {
            cancel: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
                state: sd_job_state::SD_JOB_QUEUED,
                step: 0,
                total: 0,
                outcome: None,
                images: None,
                preview: None,
            }),
            finished: Condvar::new(),
            submitted: Instant::now(),
            worker: Mutex::new(None),
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn set_running(&self) {
        self.status.lock().state = sd_job_state::SD_JOB_RUNNING;
    }

    pub fn set_step(&self, step: usize, total: usize) {
        let mut s = self.status.lock();
        s.step = step as u32;
        s.total = total as u32;
    }

    /// Keeps `images` as the latest preview (made after `step`), replacing one not taken.
    pub fn set_preview(&self, step: usize, images: Box<sd_images>) {
        self.status.lock().preview = Some((step as u32, images));
    }

    pub fn is_worker_thread(&self) -> bool {
        *self.worker.lock() == Some(std::thread::current().id())
    }

    fn finish(&self, outcome: Result<Box<sd_images>, Fail>) {
        let mut s = self.status.lock();
        s.state = match &outcome {
            Ok(_) => sd_job_state::SD_JOB_SUCCEEDED,
            Err(f) if f.status == sd_status::SD_ERR_CANCELLED => sd_job_state::SD_JOB_CANCELLED,
            Err(_) => sd_job_state::SD_JOB_FAILED,
        };
        let done = outcome.map(|images| s.images = Some(images));
        s.outcome = Some(done);
        self.finished.notify_all();
    }

    /// Waits until the job has finished or `timeout` passed; true when it has finished.
    pub fn wait_finished(&self, timeout: Option<Duration>) -> bool {
        // A deadline past what Instant can hold is no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut s = self.status.lock();
        while s.outcome.is_none() {
            match deadline {
                None => self.finished.wait(&mut s),
                Some(d) => {
                    if self.finished.wait_until(&mut s, d).timed_out() {
                        return s.outcome.is_some();
                    }
                }
            }
        }
        true
    }
}

/// A generate call running on a worker thread. Create it with `sd_job_submit`, release it with
/// `sd_job_free`. Its functions may be called from any thread (except `sd_job_free`, which must
/// be the last call on it).
pub struct sd_job {
    magic: u64,
    shared: Arc<JobShared>,
    thread: Option<JoinHandle<()>>,
}

/// # Safety
/// `p` is NULL or a live job pointer.
unsafe fn job_of<'a>(p: *const sd_job) -> Result<&'a sd_job, Fail> {
    match p.as_ref() {
        Some(j) if j.magic == JOB_MAGIC => Ok(j),
        Some(_) => Err(Fail::invalid("job is not a live sd_job handle")),
        None => Err(Fail::invalid("job is NULL")),
    }
}

/// Starts the worker thread that runs `req` on `inner` and reports to `job`.
fn spawn(
    inner: Arc<PipelineInner>,
    job: Arc<JobShared>,
    req: Request,
) -> Result<JoinHandle<()>, Fail> {
    std::thread::Builder::new()
        .name("sd-job".into())
        .spawn(move || {
            *job.worker.lock() = Some(std::thread::current().id());
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inner.run(&req, Some(&job))
            }))
            .unwrap_or_else(|_| {
                Err(Fail::new(
                    sd_status::SD_ERR_INTERNAL,
                    "internal error (caught panic in the job's worker)",
                ))
            });
            drop(inner);
            job.finish(outcome);
        })
        .map_err(|e| {
            Fail::new(
                sd_status::SD_ERR_INTERNAL,
                format!("cannot start a worker thread: {e}"),
            )
        })
}

/// Starts generating on a worker thread and returns at once with a new job in `*out_job`
/// (NULL on failure). The parameters are checked and copied before it returns (the caller may
/// free its strings and images right after): everything `sd_generate` checks before it runs
/// (sizes against the model's, the scheduler name and step count, strength, images, prompt
/// lengths...) is refused here, at once, with the same status and message. Jobs and calls on one pipeline run one at a time
/// (a job waits in `SD_JOB_QUEUED`; the order among waiting ones is not guaranteed); jobs on
/// different pipelines run in parallel.
/// `params->on_step` and the pipeline's log callback run on the worker thread.
///
/// Ownership: the caller owns the job and releases it with `sd_job_free`.
/// Threading: thread-safe.
/// Errors (at once): `SD_ERR_INVALID_ARGUMENT` as for `sd_generate`; errors that only the
/// run finds (model, backend, cancellation) come from `sd_job_wait` / `sd_job_take_images`.
///
/// Pointers: each one NULL (an error) or valid as described above.
#[no_mangle]
pub unsafe extern "C" fn sd_job_submit(
    pipeline: *mut sd_pipeline,
    params: *const sd_generate_params,
    out_job: *mut *mut sd_job,
) -> sd_status {
    guard(|| {
        clear_out(out_job, "out_job", std::ptr::null_mut())?;
        let inner = inner_of(pipeline)?;
        let req = request_for(&inner, params)?;
        let shared = Arc::new(JobShared::new());
        let thread = spawn(inner.clone(), shared.clone(), req)?;
        inner.track(&shared);
        out_job.write(Box::into_raw(Box::new(sd_job {
            magic: JOB_MAGIC,
            shared,
            thread: Some(thread),
        })));
        Ok(())
    })
}

/// Fills `*progress` without blocking: state, steps done, total steps, seconds since submit.
/// Set `progress->struct_size = sizeof(sd_job_progress)` first.
///
/// Threading: thread-safe; cheap enough to call every frame.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when a pointer is NULL or `struct_size` is too small. When
/// `job` is the fault, the fields of `*progress` are zeroed; with a wrong `struct_size` it is
/// not written at all.
///
/// Pointers: `job` is NULL or live; `progress` is NULL or valid for `progress->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn sd_job_poll(
    job: *const sd_job,
    progress: *mut sd_job_progress,
) -> sd_status {
    guard(|| {
        if progress.is_null() {
            return Err(Fail::invalid("progress is NULL"));
        }
        let caller_size = (progress as *const usize).read_unaligned();
        // Cleared first (when its size is right), so that a failure leaves it zeroed.
        write_versioned(progress, caller_size, zeroed_progress(), "progress")?;
        let job = job_of(job)?;
        let s = job.shared.status.lock();
        let value = sd_job_progress {
            struct_size: caller_size,
            state: s.state,
            step: s.step,
            total: s.total,
            elapsed_seconds: job.shared.submitted.elapsed().as_secs_f64(),
        };
        drop(s);
        write_versioned(progress, caller_size, value, "progress")
    })
}

/// All fields zero but `struct_size`.
fn zeroed_progress() -> sd_job_progress {
    sd_job_progress {
        struct_size: 0,
        state: sd_job_state::SD_JOB_QUEUED,
        step: 0,
        total: 0,
        elapsed_seconds: 0.0,
    }
}

/// Asks the job to stop: a queued job never starts, a running one stops at its next phase
/// (preparing the images, encoding the prompts, each step, decoding each image), so within
/// about one step's time. Returns at once; the job then ends in `SD_JOB_CANCELLED` (or in its other final state if it
/// finished first). Cancelling a finished job does nothing.
///
/// Threading: thread-safe, also from the job's own step callback.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `job` is NULL.
///
/// Pointers: `job` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sd_job_cancel(job: *mut sd_job) -> sd_status {
    guard(|| {
        job_of(job)?.shared.cancel();
        Ok(())
    })
}

/// The job's final status, recorded as this thread's last error when it failed.
fn outcome_status(status: &JobStatus) -> Result<(), Fail> {
    match &status.outcome {
        None => Err(Fail::new(
            sd_status::SD_NOT_READY,
            "the job has not finished",
        )),
        Some(outcome) => outcome.clone(),
    }
}

/// Waits until the job finished or `timeout_ms` milliseconds passed (negative: no limit; 0:
/// just look). Returns the job's outcome when it finished (`SD_OK`, `SD_ERR_CANCELLED` or its
/// error, with the message in `sd_last_error()`), `SD_NOT_READY` when the time ran out.
///
/// Threading: thread-safe; several threads may wait on one job. Not from the job's own
/// callback (it would wait for itself: `SD_ERR_INVALID_ARGUMENT`).
///
/// Pointers: `job` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sd_job_wait(job: *mut sd_job, timeout_ms: i64) -> sd_status {
    guard(|| {
        let job = job_of(job)?;
        if job.shared.is_worker_thread() {
            return Err(Fail::invalid(
                "sd_job_wait called from the job's own callback",
            ));
        }
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        if !job.shared.wait_finished(timeout) {
            return Err(Fail::new(
                sd_status::SD_NOT_READY,
                format!("the job has not finished after {timeout_ms} ms"),
            ));
        }
        outcome_status(&job.shared.status.lock())
    })
}

/// Moves the finished job's images to the caller in `*out_images` (NULL otherwise). Does not
/// block: `SD_NOT_READY` while the job runs; the job's error code (with its message) when it
/// failed or was cancelled; `SD_ERR_INVALID_ARGUMENT` when the images were already taken.
///
/// Ownership: the caller owns the images and releases them with `sd_images_free`; they
/// outlive the job and the pipeline. Threading: thread-safe; the images go to one caller.
///
/// Pointers: `job` is NULL or live; `out_images` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sd_job_take_images(
    job: *mut sd_job,
    out_images: *mut *mut sd_images,
) -> sd_status {
    guard(|| {
        clear_out(out_images, "out_images", std::ptr::null_mut())?;
        let job = job_of(job)?;
        let mut s = job.shared.status.lock();
        outcome_status(&s)?;
        let images = s
            .images
            .take()
            .ok_or_else(|| Fail::invalid("the job's images were already taken"))?;
        out_images.write(Box::into_raw(images));
        Ok(())
    })
}

/// Moves the job's latest preview to the caller: its images in `*out_images` and the step it
/// was made after in `*out_step` (NULL and 0 otherwise). Previews are made only when the job
/// was submitted with `params->job_preview_every` > 0, every that many steps and after the
/// last; each is handed out once. Does not block: `SD_NOT_READY` when no preview is waiting
/// (none made yet, or the latest already taken).
///
/// Ownership: the caller owns the images and releases them with `sd_images_free`.
/// Threading: thread-safe; cheap enough to call every frame.
///
/// Pointers: `job` is NULL or live; `out_step` is NULL or writable; `out_images` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn sd_job_take_preview(
    job: *mut sd_job,
    out_step: *mut u32,
    out_images: *mut *mut sd_images,
) -> sd_status {
    guard(|| {
        clear_out(out_images, "out_images", std::ptr::null_mut())?;
        clear_out(out_step, "out_step", 0)?;
        let job = job_of(job)?;
        let (step, images) = job.shared.status.lock().preview.take().ok_or_else(|| {
            Fail::new(
                sd_status::SD_NOT_READY,
                "no new preview (see job_preview_every)",
            )
        })?;
        out_step.write(step);
        out_images.write(Box::into_raw(images));
        Ok(())
    })
}

/// Releases a job. An unfinished job is cancelled first and this call waits until its worker
/// stopped (at most about one denoising step), so that its callback never runs afterwards;
/// images not taken are released. NULL is ignored.
///
/// Threading: must be the last call on this job, and not made from its own callback.
///
/// Pointers: `job` is NULL or a live job not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sd_job_free(job: *mut sd_job) {
    guard_void(|| {
        if job_of(job).is_err() {
            return;
        }
        let mut handle = Box::from_raw(job);
        handle.magic = 0;
        handle.shared.cancel();
        if let Some(thread) = handle.thread.take() {
            if thread.thread().id() == std::thread::current().id() {
                return; // freed from its own callback: the worker ends on its own
            }
            let _ = thread.join();
        }
    })
}
