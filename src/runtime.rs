//! Process-wide settings the library applies once, before the first model loads.
//!
//! glibc's malloc hands every allocation above its mmap threshold (dynamic, at most 32 MiB)
//! straight to the kernel and returns freed heap tops above 128 KiB at once. A denoising step
//! allocates and frees tensors of tens to hundreds of MiB (activations, oneDNN's reordered
//! convolution weights), so each step faulted in freshly zeroed pages again: 15 % of an SD
//! 1.5 step on 2 cores went to the kernel's page-fault path. With both thresholds at 256 MiB
//! those buffers are reused within the process. Measured with `make bench --ours-only` (README):
//! at 256x256 a step took 2.9 s instead of 4.0 s, for 0.23 GiB more peak RSS; at 512x512 no
//! speed change showed, for 0.7 GiB more. Most of that was the decode's, which now runs in a
//! [`OneOffPhase`] with glibc's usual ceiling instead.
//!
//! This changes malloc for the whole process, so it can be turned off: set
//! `SD_MALLOC_TUNING=0` in the environment before the first load.
use std::sync::OnceLock;

/// Both glibc thresholds, in bytes.
pub const MALLOC_THRESHOLD_BYTES: i32 = 256 << 20;

/// Applies the allocator settings above once per process (glibc only; elsewhere nothing).
/// Returns whether they are in force.
pub fn tune_allocator() -> bool {
    static APPLIED: OnceLock<bool> = OnceLock::new();
    *APPLIED.get_or_init(|| wanted() && set_thresholds())
}

/// Whether the environment allows the settings (`SD_MALLOC_TUNING` is not `0`).
fn wanted() -> bool {
    std::env::var("SD_MALLOC_TUNING").map_or(true, |v| v.trim() != "0")
}

fn set_thresholds() -> bool {
    set_both_thresholds(MALLOC_THRESHOLD_BYTES)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_both_thresholds(bytes: i32) -> bool {
    // SAFETY: mallopt only changes malloc's parameters; both values are within glibc's limits
    // (it refuses, returning 0, values it does not accept).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_both_thresholds(_bytes: i32) -> bool {
    false
}

/// Most threads a pipeline may ask for.
pub const MAX_THREADS: usize = 1024;

/// Sets the CPU threads libtorch computes with on this thread: `threads`, or the process's
/// default (what libtorch chose at the first load, the physical cores) when `None`. libtorch's
/// OpenMP thread count is a setting of the calling thread, so pipelines running on different
/// threads keep their own; each call sets it again, so a thread never keeps another
/// pipeline's setting.
pub fn use_threads(threads: Option<usize>) -> crate::Result<()> {
    static DEFAULT: OnceLock<i32> = OnceLock::new();
    let default = *DEFAULT.get_or_init(tch::get_num_threads);
    let n = match threads {
        Some(n) if n == 0 || n > MAX_THREADS => {
            return Err(crate::Error::invalid(format!(
                "num_threads is {n}: it must be in 1..={MAX_THREADS}"
            )))
        }
        Some(n) => n as i32,
        None => default,
    };
    if tch::get_num_threads() != n {
        tch::set_num_threads(n);
    }
    Ok(())
}

/// Hands the memory malloc keeps for reuse back to the kernel. A [`OneOffPhase`] does it on
/// entering and leaving, so that the denoising loop's freed activations do not stay resident
/// beside the decode's (at 256x256 they raised the peak RSS by 0.76 GiB). Nothing to do when
/// the settings above are not in force.
pub fn release_cached_memory() {
    if tune_allocator() {
        trim();
    }
}

/// How many bytes of weights may be packed between two [`release_cached_memory_every`] trims.
const PACKED_BYTES_PER_TRIM: usize = 128 << 20;

/// [`release_cached_memory`] once per [`PACKED_BYTES_PER_TRIM`] of `bytes` reported: called
/// as each layer packs its weight during a model's first call. Packing leaves freed buffers in
/// malloc's heap between the packed weights, which the thresholds above keep: an SD 1.5
/// model's first call at 256x256 held 0.8 GiB of them until the decode (measured with
/// `/proc/self/status` during `make bench`'s child). Trimming after every layer cost 0.33 s
/// for its 305 layers; once per 128 MiB packed does it in about 27 trims.
pub fn release_cached_memory_every(bytes: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SINCE_TRIM: AtomicUsize = AtomicUsize::new(0);
    let total = SINCE_TRIM
        .fetch_add(bytes, Ordering::Relaxed)
        .saturating_add(bytes);
    if total >= PACKED_BYTES_PER_TRIM {
        SINCE_TRIM.store(0, Ordering::Relaxed);
        release_cached_memory();
    }
}

/// Both glibc thresholds while a [`OneOffPhase`] runs: the ceiling of glibc's own dynamic mmap
/// threshold, so buffers from 32 MiB up are mapped and unmapped on their own as in an untuned
/// process.
pub const ONE_OFF_THRESHOLD_BYTES: i32 = 32 << 20;

/// How many [`OneOffPhase`]s are alive, in all threads.
static ONE_OFF_PHASES: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// While alive, malloc keeps no large freed buffer for reuse (the thresholds drop to
/// [`ONE_OFF_THRESHOLD_BYTES`]); for work that runs once per image, the VAE decode and
/// encode. The denoising loop reuses its buffers step after step, which is what the high
/// thresholds buy; the decode's buffers are of other sizes, and in the loop's heap they left
/// holes: a 512x512 decode grew the RSS by 1.2 GiB with the high thresholds and by 0.8 GiB
/// without, at no cost in time (bench child, SD 1.5 size, 2 runs each). Entering and leaving
/// also trim, so the loop's cached buffers are not kept beside the decode's. Phases nest and
/// may overlap across threads: the thresholds come back when the last one ends (a loop that
/// runs meanwhile in another thread runs with the lower ones: slower, not different).
#[must_use = "the phase ends when this is dropped"]
pub struct OneOffPhase {
    tuned: bool,
}

/// Starts a [`OneOffPhase`] (nothing to do when the allocator settings are not in force).
pub fn one_off_phase() -> OneOffPhase {
    let tuned = tune_allocator();
    if tuned {
        let mut phases = ONE_OFF_PHASES.lock().unwrap_or_else(|e| e.into_inner());
        if *phases == 0 {
            set_both_thresholds(ONE_OFF_THRESHOLD_BYTES);
        }
        *phases += 1;
        trim();
    }
    OneOffPhase { tuned }
}

impl Drop for OneOffPhase {
    fn drop(&mut self) {
        if self.tuned {
            let mut phases = ONE_OFF_PHASES.lock().unwrap_or_else(|e| e.into_inner());
            *phases = phases.saturating_sub(1);
            if *phases == 0 {
                set_thresholds();
            }
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    fn allocator_tuning_is_applied_once_on_glibc() {
        let first = super::tune_allocator();
        assert_eq!(first, super::tune_allocator());
        if cfg!(all(target_os = "linux", target_env = "gnu")) && super::wanted() {
            assert!(first, "glibc refused the thresholds");
        }
    }
}
