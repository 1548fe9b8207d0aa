//! `sd_load_job`: a pipeline load on a worker thread, so that an engine's main thread never
//! blocks on a multi-gigabyte load: start, poll progress, cancel, wait with a timeout, take
//! the pipeline, free.
use super::pipeline::{c_progress, load_request, read_load_request, sd_pipeline};
use super::status::{clear_out, guard, guard_void, sd_status, Fail};
use super::types::{sd_job_state, sd_load_options, sd_load_progress, write_versioned, Versioned};
use crate::pipeline::LoadProgress;
use parking_lot::{Condvar, Mutex};
use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LOAD_JOB_MAGIC: u64 = 0x5344_4c4f_4144_2121; // "SDLOAD!!"

struct LoadStatus {
    state: sd_job_state,
    progress: LoadProgress,
    /// `Some` once finished: success, or the failure.
    outcome: Option<Result<(), Fail>>,
    /// The loaded pipeline until it is taken.
    pipeline: Option<Box<sd_pipeline>>,
}

struct LoadShared {
    cancel: AtomicBool,
    status: Mutex<LoadStatus>,
    finished: Condvar,
    started: Instant,
}

/// A load running on a worker thread. Create it with `sd_pipeline_load_async`, release it with
/// `sd_load_job_free`. Its functions may be called from any thread (except `sd_load_job_free`,
/// which must be the last call on it).
pub struct sd_load_job {
    magic: u64,
    shared: Arc<LoadShared>,
    thread: Option<JoinHandle<()>>,
}

/// # Safety
/// `p` is NULL or a live load job pointer.
unsafe fn job_of<'a>(p: *const sd_load_job) -> Result<&'a sd_load_job, Fail> {
    match p.as_ref() {
        Some(j) if j.magic == LOAD_JOB_MAGIC => Ok(j),
        Some(_) => Err(Fail::invalid("job is not a live sd_load_job handle")),
        None => Err(Fail::invalid("job is NULL")),
    }
}

/// Starts loading a pipeline on a worker thread, as `sd_pipeline_load` would, and returns at
/// once with a new load job in `*out_job` (NULL on failure). `model_path` and `options` (its
/// strings included) are copied before it returns; `options->on_progress`,
/// `options->progress_user_data`, `options->log_fn` and `options->log_user_data` must stay
/// usable until the job ends, and those callbacks run on the worker thread.
///
/// Ownership: the caller owns the job and releases it with `sd_load_job_free`; the pipeline it
/// makes goes to the caller with `sd_load_job_take_pipeline`.
/// Threading: thread-safe.
/// Errors (at once): `SD_ERR_INVALID_ARGUMENT` for what can be checked without loading (NULL,
/// bad UTF-8, `struct_size`, a bad device, dtype or thread count); everything else comes from
/// `sd_load_job_wait` / `sd_load_job_take_pipeline`, as `sd_pipeline_load` would return it.
///
/// Pointers: each one NULL (an error) or valid as described above.
#[no_mangle]
pub unsafe extern "C" fn sd_pipeline_load_async(
    model_path: *const c_char,
    options: *const sd_load_options,
    out_job: *mut *mut sd_load_job,
) -> sd_status {
    guard(|| {
        clear_out(out_job, "out_job", std::ptr::null_mut())?;
        let req = read_load_request(model_path, options)?;
        let shared = Arc::new(LoadShared {
            cancel: AtomicBool::new(false),
            status: Mutex::new(LoadStatus {
                state: sd_job_state::SD_JOB_QUEUED,
                progress: LoadProgress {
                    component: String::new(),
                    tensors_done: 0,
                    bytes_done: 0,
                    bytes_total: 0,
                    elapsed_seconds: 0.0,
                },
                outcome: None,
                pipeline: None,
            }),
            finished: Condvar::new(),
            started: Instant::now(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sd-load".into())
            .spawn(move || {
                worker.status.lock().state = sd_job_state::SD_JOB_RUNNING;
                let tracked = worker.clone();
                let tracker = Arc::new(move |p: &LoadProgress| {
                    tracked.status.lock().progress = p.clone();
                    !tracked.cancel.load(Ordering::SeqCst)
                });
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if worker.cancel.load(Ordering::SeqCst) {
                        return Err(Fail::cancelled());
                    }
                    load_request(req, Some(tracker))
                }))
                .unwrap_or_else(|_| {
                    Err(Fail::new(
                        sd_status::SD_ERR_INTERNAL,
                        "internal error (caught panic in the load's worker)",
                    ))
                });
                let mut s = worker.status.lock();
                s.state = match &outcome {
                    Ok(_) => sd_job_state::SD_JOB_SUCCEEDED,
                    Err(f) if f.status == sd_status::SD_ERR_CANCELLED => {
                        sd_job_state::SD_JOB_CANCELLED
                    }
                    Err(_) => sd_job_state::SD_JOB_FAILED,
                };
                s.outcome = Some(outcome.map(|p| s.pipeline = Some(Box::new(p))));
                worker.finished.notify_all();
            })
            .map_err(|e| {
                Fail::new(
                    sd_status::SD_ERR_INTERNAL,
                    format!("cannot start a worker thread: {e}"),
                )
            })?;
        out_job.write(Box::into_raw(Box::new(sd_load_job {
            magic: LOAD_JOB_MAGIC,
            shared,
            thread: Some(thread),
        })));
        Ok(())
    })
}

/// Fills `*progress` without blocking: the state (`SD_JOB_RUNNING` until the load ends), the
/// part being loaded, tensors and bytes read, the bytes to read, seconds since the start. Set
/// `progress->struct_size = sizeof(sd_load_progress)` first.
///
/// Threading: thread-safe; cheap enough to call every frame.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when a pointer is NULL or `struct_size` is wrong (then
/// `*progress` is not written); when `job` is the fault, `*progress` holds the defaults.
///
/// Pointers: `job` is NULL or live; `progress` is NULL or valid for `progress->struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn sd_load_job_poll(
    job: *const sd_load_job,
    progress: *mut sd_load_progress,
) -> sd_status {
    guard(|| {
        if progress.is_null() {
            return Err(Fail::invalid("progress is NULL"));
        }
        let caller_size = (progress as *const usize).read_unaligned();
        write_versioned(
            progress,
            caller_size,
            sd_load_progress::defaults(),
            "progress",
        )?;
        let job = job_of(job)?;
        let s = job.shared.status.lock();
        let mut value = c_progress(&s.progress, s.state);
        value.struct_size = caller_size;
        value.elapsed_seconds = job.shared.started.elapsed().as_secs_f64();
        drop(s);
        write_versioned(progress, caller_size, value, "progress")
    })
}

/// Asks the load to stop at its next tensor; it then ends in `SD_JOB_CANCELLED`, having
/// released everything it built (or in its other final state if it finished first).
///
/// Threading: thread-safe, also from the load's own progress callback.
/// Errors: `SD_ERR_INVALID_ARGUMENT` when `job` is NULL.
///
/// Pointers: `job` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sd_load_job_cancel(job: *mut sd_load_job) -> sd_status {
    guard(|| {
        job_of(job)?.shared.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}

fn outcome_of(s: &LoadStatus) -> Result<(), Fail> {
    match &s.outcome {
        None => Err(Fail::new(
            sd_status::SD_NOT_READY,
            "the load has not finished",
        )),
        Some(outcome) => outcome.clone(),
    }
}

/// Waits until the load finished or `timeout_ms` milliseconds passed (negative: no limit; 0:
/// just look). Returns the load's outcome when it finished (`SD_OK`, `SD_ERR_CANCELLED` or the
/// error `sd_pipeline_load` would have returned, with its message in `sd_last_error()`),
/// `SD_NOT_READY` when the time ran out.
///
/// Threading: thread-safe; not from the load's own progress callback.
///
/// Pointers: `job` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sd_load_job_wait(job: *mut sd_load_job, timeout_ms: i64) -> sd_status {
    guard(|| {
        let job = job_of(job)?;
        if job
            .thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == std::thread::current().id())
        {
            return Err(Fail::invalid(
                "sd_load_job_wait called from the load's own callback",
            ));
        }
        let deadline = u64::try_from(timeout_ms)
            .ok()
            .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
        let mut s = job.shared.status.lock();
        while s.outcome.is_none() {
            match deadline {
                None => job.shared.finished.wait(&mut s),
                Some(d) => {
                    if job.shared.finished.wait_until(&mut s, d).timed_out() && s.outcome.is_none()
                    {
                        return Err(Fail::new(
                            sd_status::SD_NOT_READY,
                            format!("the load has not finished after {timeout_ms} ms"),
                        ));
                    }
                }
            }
        }
        outcome_of(&s)
    })
}

/// Moves the loaded pipeline to the caller in `*out_pipeline` (NULL otherwise). Does not
/// block: `SD_NOT_READY` while loading; the load's error when it failed or was cancelled;
/// `SD_ERR_INVALID_ARGUMENT` when the pipeline was already taken.
///
/// Ownership: the caller owns the pipeline (release it with `sd_pipeline_free`); it outlives
/// the job. Threading: thread-safe; the pipeline goes to one caller.
///
/// Pointers: `job` is NULL or live; `out_pipeline` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sd_load_job_take_pipeline(
    job: *mut sd_load_job,
    out_pipeline: *mut *mut sd_pipeline,
) -> sd_status {
    guard(|| {
        clear_out(out_pipeline, "out_pipeline", std::ptr::null_mut())?;
        let job = job_of(job)?;
        let mut s = job.shared.status.lock();
        outcome_of(&s)?;
        let pipeline = s
            .pipeline
            .take()
            .ok_or_else(|| Fail::invalid("the job's pipeline was already taken"))?;
        out_pipeline.write(Box::into_raw(pipeline));
        Ok(())
    })
}

/// Releases a load job. An unfinished load is cancelled first and this call waits until its
/// worker stopped (at most about one tensor's read), so that its callbacks never run
/// afterwards; a pipeline not taken is released. NULL is ignored.
///
/// Threading: must be the last call on this job, and not made from its own callback.
///
/// Pointers: `job` is NULL or a live load job not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sd_load_job_free(job: *mut sd_load_job) {
    guard_void(|| {
        if job_of(job).is_err() {
            return;
        }
        let mut handle = Box::from_raw(job);
        handle.magic = 0;
        handle.shared.cancel.store(true, Ordering::SeqCst);
        if let Some(thread) = handle.thread.take() {
            if thread.thread().id() == std::thread::current().id() {
                return;
            }
            let _ = thread.join();
        }
        // A pipeline not taken goes with the shared state (its Drop releases the model).
    })
}
