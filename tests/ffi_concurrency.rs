//! The C ABI under threads: calls on one pipeline are serialised, separate pipelines run in
//! parallel, and the job API (poll, wait, take, cancel from the callback or another thread,
//! free while running) behaves as the header says.
mod ffi_util;

use ffi_util::*;
use stable_diffusion::ffi::sd_job_state::*;
use stable_diffusion::ffi::sd_status::*;
use stable_diffusion::ffi::*;
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &CStr = c"a blue square";

/// A raw handle moved into another thread (the ABI says handles may be used from any thread).
struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

fn progress(job: *mut sd_job) -> sd_job_progress {
    let mut p = unsafe { std::mem::zeroed::<sd_job_progress>() };
    p.struct_size = size_of::<sd_job_progress>();
    assert_eq!(
        unsafe { sd_job_poll(job, &mut p) },
        SD_OK,
        "{}",
        last_error()
    );
    p
}

fn submit(pipeline: *mut sd_pipeline, params: &sd_generate_params) -> *mut sd_job {
    let mut job = ptr::null_mut();
    assert_eq!(
        unsafe { sd_job_submit(pipeline, params, &mut job) },
        SD_OK,
        "{}",
        last_error()
    );
    job
}

/// Waits until `cond` holds, polling; panics after a minute.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn four_threads_on_one_pipeline_are_serialised_and_deterministic() {
    let p = Shared(load());
    let seeds = [11u64, 12, 13, 14];
    let expected: Vec<Vec<u8>> = seeds
        .iter()
        .map(|&s| generate(p.0, &params(PROMPT, 3, s)).unwrap()[0].0.clone())
        .collect();

    // Every step of every run, in the global order the callbacks ran.
    let order = Arc::new(Mutex::new(Vec::<(u64, u32)>::new()));
    let threads: Vec<_> = seeds
        .iter()
        .map(|&seed| {
            let order = order.clone();
            std::thread::spawn(move || {
                let mut hook = StepHook::new(move |info| {
                    order.lock().unwrap().push((seed, info.step));
                    std::thread::sleep(Duration::from_millis(2)); // widen any overlap
                    SD_STEP_CONTINUE
                });
                let mut g = params(PROMPT, 3, seed);
                hook.install(&mut g);
                let p = p;
                generate(p.0, &g).unwrap()[0].0.clone()
            })
        })
        .collect();
    let got: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, expected, "same images as one after the other");

    // Serialised: each run's steps 1, 2, 3 are consecutive in the global order.
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 12);
    for run in order.chunks(3) {
        assert!(
            run.iter().all(|s| s.0 == run[0].0),
            "runs interleaved: {order:?}"
        );
        assert_eq!(run.iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
    unsafe { sd_pipeline_free(p.0) };
}

/// A meeting point with a timeout: each side arrives and waits for the other.
#[derive(Default)]
struct Rendezvous {
    arrived: Mutex<u32>,
    cv: Condvar,
}

impl Rendezvous {
    fn meet(&self, parties: u32) -> bool {
        let mut n = self.arrived.lock().unwrap();
        *n += 1;
        self.cv.notify_all();
        let (n, timeout) = self
            .cv
            .wait_timeout_while(n, Duration::from_secs(60), |n| *n < parties)
            .unwrap();
        drop(n);
        !timeout.timed_out()
    }
}

#[test]
fn two_pipelines_run_in_parallel() {
    let pipelines = [Shared(load()), Shared(load())];
    let expected: Vec<Vec<u8>> = [21u64, 22]
        .iter()
        .zip(pipelines)
        .map(|(&s, p)| generate(p.0, &params(PROMPT, 3, s)).unwrap()[0].0.clone())
        .collect();
    // Both runs must be inside their step-1 callback at the same time: impossible if the two
    // pipelines were serialised (the first would time out waiting for the second).
    let meeting = Arc::new(Rendezvous::default());
    let threads: Vec<_> = [21u64, 22]
        .into_iter()
        .zip(pipelines)
        .map(|(seed, p)| {
            let meeting = meeting.clone();
            std::thread::spawn(move || {
                let met = Arc::new(Mutex::new(None));
                let record = met.clone();
                let mut hook = StepHook::new(move |info| {
                    if info.step == 1 {
                        *record.lock().unwrap() = Some(meeting.meet(2));
                    }
                    SD_STEP_CONTINUE
                });
                let mut g = params(PROMPT, 3, seed);
                hook.install(&mut g);
                let p = p;
                let image = generate(p.0, &g).unwrap()[0].0.clone();
                let met = met.lock().unwrap().unwrap();
                (image, met)
            })
        })
        .collect();
    for (t, want) in threads.into_iter().zip(expected) {
        let (image, met) = t.join().unwrap();
        assert!(met, "the two pipelines did not run at the same time");
        assert_eq!(
            image, want,
            "parallel runs give the same images as serial ones"
        );
    }
    for p in pipelines {
        unsafe { sd_pipeline_free(p.0) };
    }
}

#[test]
fn job_polls_without_blocking_and_gives_the_same_images() {
    let p = load();
    let g = params(PROMPT, 4, 5);
    let expected = generate(p, &g).unwrap();
    let job = submit(p, &g);
    let mut polls = 0;
    loop {
        let pr = progress(job);
        polls += 1;
        assert!(pr.step <= 4 && (pr.total == 0 || pr.total == 4), "{pr:?}");
        if pr.state == SD_JOB_SUCCEEDED {
            assert_eq!((pr.step, pr.total), (4, 4));
            break;
        }
        assert!(matches!(pr.state, SD_JOB_QUEUED | SD_JOB_RUNNING), "{pr:?}");
        assert!(pr.elapsed_seconds < 60.0);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(polls >= 1);
    assert_eq!(unsafe { sd_job_wait(job, 0) }, SD_OK);
    let mut images = ptr::null_mut();
    assert_eq!(unsafe { sd_job_take_images(job, &mut images) }, SD_OK);
    assert_eq!(take(images), expected);
    unsafe {
        sd_job_free(job);
        sd_pipeline_free(p);
    }
}

#[test]
fn job_cancelled_from_another_thread_stops_before_the_next_step() {
    let p = load();
    let (reached, at_step_3) = mpsc::channel();
    let (go_on, resume) = mpsc::channel::<()>();
    let resume = Mutex::new(resume);
    let last_step = Arc::new(AtomicU32::new(0));
    let seen = last_step.clone();
    let mut hook = StepHook::new(move |info| {
        seen.store(info.step, Ordering::SeqCst);
        if info.step == 3 {
            let _ = reached.send(());
            let _ = resume.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
        SD_STEP_CONTINUE
    });
    let mut g = params(PROMPT, 50, 1);
    hook.install(&mut g);
    let job = submit(p, &g);
    at_step_3.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(progress(job).state, SD_JOB_RUNNING);
    assert_eq!(unsafe { sd_job_wait(job, 0) }, SD_NOT_READY);
    let mut images = ptr::null_mut();
    assert_eq!(
        unsafe { sd_job_take_images(job, &mut images) },
        SD_NOT_READY
    );

    // Cancel from this thread while the job sits in its step-3 callback, then let it go on:
    // step 4 must never run.
    std::thread::spawn({
        let job = Shared(job);
        move || {
            let job = job;
            assert_eq!(unsafe { sd_job_cancel(job.0) }, SD_OK)
        }
    })
    .join()
    .unwrap();
    go_on.send(()).unwrap();
    expect(
        unsafe { sd_job_wait(job, 60_000) },
        SD_ERR_CANCELLED,
        "cancelled",
    );
    assert_eq!(last_step.load(Ordering::SeqCst), 3);
    let pr = progress(job);
    assert_eq!((pr.state, pr.step, pr.total), (SD_JOB_CANCELLED, 3, 50));
    expect(
        unsafe { sd_job_take_images(job, &mut images) },
        SD_ERR_CANCELLED,
        "cancelled",
    );
    assert!(images.is_null());
    unsafe {
        assert_eq!(
            sd_job_cancel(job),
            SD_OK,
            "cancelling a finished job is harmless"
        );
        sd_job_free(job);
        sd_pipeline_free(p);
    }
}

#[test]
fn job_cancelled_by_its_callback() {
    let p = load();
    let mut hook = StepHook::new(|info| {
        if info.step == 2 {
            SD_STEP_CANCEL
        } else {
            SD_STEP_CONTINUE
        }
    });
    let mut g = params(PROMPT, 20, 1);
    hook.install(&mut g);
    let job = submit(p, &g);
    expect(
        unsafe { sd_job_wait(job, -1) },
        SD_ERR_CANCELLED,
        "cancelled",
    );
    let pr = progress(job);
    assert_eq!((pr.state, pr.step), (SD_JOB_CANCELLED, 2));
    unsafe {
        sd_job_free(job);
        sd_pipeline_free(p);
    }
}

#[test]
fn queued_job_cancelled_before_it_starts_and_jobs_freed_while_running() {
    let p = load();
    let (reached, started) = mpsc::channel();
    let (release, blocked) = mpsc::channel::<()>();
    let blocked = Mutex::new(blocked);
    let mut first_hook = StepHook::new(move |info| {
        if info.step == 1 {
            let _ = reached.send(());
            let _ = blocked
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60));
        }
        SD_STEP_CONTINUE
    });
    let mut g = params(PROMPT, 30, 1);
    first_hook.install(&mut g);
    let first = submit(p, &g);
    started.recv_timeout(Duration::from_secs(60)).unwrap();

    // The pipeline is busy: a second job queues, and is cancelled without ever running.
    let second_steps = Arc::new(AtomicU32::new(0));
    let counter = second_steps.clone();
    let mut second_hook = StepHook::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        SD_STEP_CONTINUE
    });
    let mut g2 = params(PROMPT, 2, 2);
    second_hook.install(&mut g2);
    let second = submit(p, &g2);
    assert_eq!(progress(second).state, SD_JOB_QUEUED);
    assert_eq!(unsafe { sd_job_cancel(second) }, SD_OK);
    expect(
        unsafe { sd_job_wait(second, 60_000) },
        SD_ERR_CANCELLED,
        "cancelled",
    );
    assert_eq!(progress(second).state, SD_JOB_CANCELLED);
    assert_eq!(second_steps.load(Ordering::SeqCst), 0);
    assert_eq!(
        progress(first).state,
        SD_JOB_RUNNING,
        "the first job is still blocked"
    );

    // Freeing a running job cancels it and waits for its worker: afterwards its callback
    // never runs again, so the hook may be dropped.
    release.send(()).unwrap();
    unsafe { sd_job_free(first) };
    drop(first_hook);
    unsafe { sd_job_free(second) };

    // Freeing the pipeline cancels a job still running; its handle stays valid.
    let mut slow = StepHook::new(|_| {
        std::thread::sleep(Duration::from_millis(5));
        SD_STEP_CONTINUE
    });
    let mut g3 = params(PROMPT, 200, 3);
    slow.install(&mut g3);
    let third = submit(p, &g3);
    eventually("the third job to run", || progress(third).step >= 1);
    unsafe { sd_pipeline_free(p) };
    let pr = progress(third);
    assert_eq!(pr.state, SD_JOB_CANCELLED, "{pr:?}");
    assert!(pr.step < 200);
    expect(
        unsafe { sd_job_wait(third, 0) },
        SD_ERR_CANCELLED,
        "cancelled",
    );
    unsafe { sd_job_free(third) };
}

#[test]
fn jobs_on_two_pipelines_finish_independently() {
    let (a, b) = (load(), load());
    let ga = params(PROMPT, 3, 31);
    let gb = params(PROMPT, 3, 32);
    let want_a = generate(a, &ga).unwrap();
    let want_b = generate(b, &gb).unwrap();
    let (ja, jb) = (submit(a, &ga), submit(b, &gb));
    for (job, want) in [(ja, want_a), (jb, want_b)] {
        assert_eq!(
            unsafe { sd_job_wait(job, 120_000) },
            SD_OK,
            "{}",
            last_error()
        );
        let mut images = ptr::null_mut();
        assert_eq!(unsafe { sd_job_take_images(job, &mut images) }, SD_OK);
        unsafe { sd_job_free(job) };
        // The images outlive their job.
        assert_eq!(take(images), want);
    }
    unsafe {
        sd_pipeline_free(a);
        sd_pipeline_free(b);
    }
}
