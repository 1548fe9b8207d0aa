//! The allocator settings of `runtime`: large freed buffers stay in malloc's heap for reuse by
//! the denoising loop, and go back to the kernel while a one-off phase (the VAE decode or
//! encode) runs. The settings are process-wide, so this runs alone, on the main thread
//! (`harness = false`): no other test's allocations or phases can interfere.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use stable_diffusion::runtime::{
        one_off_phase, tune_allocator, MALLOC_THRESHOLD_BYTES, ONE_OFF_THRESHOLD_BYTES,
    };

    if !tune_allocator() {
        println!("allocator: SD_MALLOC_TUNING=0, nothing to check");
        return;
    }
    let resident = || {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf has no preconditions.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
    };
    // The resident bytes a buffer of `bytes`, written in full and freed, leaves behind.
    let kept_after_free = |bytes: usize| {
        let before = resident();
        // SAFETY: the buffer is written within its size, then freed once.
        unsafe {
            // black_box: the compiler may otherwise drop an allocation nobody reads.
            let buffer = std::hint::black_box(libc::malloc(bytes)) as *mut u8;
            assert!(!buffer.is_null(), "malloc({bytes}) failed");
            std::ptr::write_bytes(buffer, 1, bytes);
            libc::free(std::hint::black_box(buffer) as *mut libc::c_void);
        }
        resident().saturating_sub(before)
    };
    // Sizes between the two thresholds: kept by the loop's settings, returned in a phase.
    let (low, high) = (
        ONE_OFF_THRESHOLD_BYTES as usize,
        MALLOC_THRESHOLD_BYTES as usize,
    );
    let sizes = [low + 4096, (low + high) / 2, high - (1 << 20)];
    let returned = |what: &str| {
        for &b in &sizes {
            let kept = kept_after_free(b);
            assert!(
                kept < 1 << 20,
                "{what}: {kept} bytes of a freed {b}-byte buffer kept"
            );
        }
    };
    let kept = |what: &str| {
        for &b in &sizes {
            // A fresh phase-free heap first: what an earlier size left is trimmed away.
            stable_diffusion::runtime::release_cached_memory();
            let kept = kept_after_free(b);
            assert!(
                kept >= b / 2,
                "{what}: only {kept} bytes of a freed {b}-byte buffer kept"
            );
        }
    };
    kept("before any phase");
    {
        let outer = one_off_phase();
        returned("inside a phase");
        {
            let _inner = one_off_phase();
            returned("inside nested phases");
        }
        returned("the outer phase outlives the inner one");
        // A phase on another thread that outlives this one keeps the setting.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _phase = one_off_phase();
            started_tx.send(()).unwrap();
            end_rx.recv().unwrap();
        });
        started_rx.recv().unwrap();
        drop(outer);
        returned("another thread's phase is still running");
        end_tx.send(()).unwrap();
        other.join().unwrap();
    }
    kept("after the last phase");
    println!("allocator: one-off phases checked");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("allocator: the settings apply to glibc only");
}
