//! How far a load has come, reported to the caller's hook (`LoadOptions::progress`), which may
//! also cancel it. The hook is installed on the loading thread for the length of the load;
//! every tensor filled ([`super::load_into_mapped`]) counts its stored bytes.
use crate::{Error, Result};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

/// What the hook sees.
#[derive(Debug, Clone)]
pub struct LoadProgress {
    /// The part being loaded ("text encoder", "UNet", "VAE", "tiny autoencoder", ...), or
    /// "done" at the end.
    pub component: String,
    /// Tensors filled so far, over the whole load.
    pub tensors_done: u64,
    /// Bytes of those tensors as stored in the files.
    pub bytes_done: u64,
    /// The weight files' bytes, read before loading starts (0 when not known). `bytes_done`
    /// comes close to it (file headers and unused tensors are not counted) and is set to it
    /// at "done", so that a progress bar ends full.
    pub bytes_total: u64,
    /// Seconds since the load started.
    pub elapsed_seconds: f64,
}

/// The caller's hook: `false` cancels the load, which then fails with [`Error::Cancelled`].
#[derive(Clone)]
pub struct LoadProgressHook(pub Arc<dyn Fn(&LoadProgress) -> bool + Send + Sync>);

impl std::fmt::Debug for LoadProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgressHook")
    }
}

struct State {
    hook: LoadProgressHook,
    progress: LoadProgress,
    started: Instant,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Installs `hook` on this thread until the guard drops (`None` installs nothing).
pub fn install(hook: Option<LoadProgressHook>, bytes_total: u64) -> Guard {
    let installed = hook.is_some();
    if let Some(hook) = hook {
        STATE.with(|s| {
            *s.borrow_mut() = Some(State {
                hook,
                progress: LoadProgress {
                    component: String::new(),
                    tensors_done: 0,
                    bytes_done: 0,
                    bytes_total,
                    elapsed_seconds: 0.0,
                },
                started: Instant::now(),
            })
        });
    }
    Guard { installed }
}

pub struct Guard {
    installed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.installed {
            STATE.with(|s| *s.borrow_mut() = None);
        }
    }
}

/// Calls the hook with the progress after `update`; an error when it asks to cancel.
fn report(update: impl FnOnce(&mut LoadProgress)) -> Result<()> {
    let call = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let state = s.as_mut()?;
        update(&mut state.progress);
        state.progress.elapsed_seconds = state.started.elapsed().as_secs_f64();
        Some((state.hook.clone(), state.progress.clone()))
    });
    // The hook runs outside the borrow: it may do anything but load on this thread.
    match call {
        Some((hook, progress)) if !(hook.0)(&progress) => Err(Error::Cancelled),
        _ => Ok(()),
    }
}

/// A new part starts loading.
pub fn component(name: &str) -> Result<()> {
    report(|p| p.component = name.to_string())
}

/// One tensor of `bytes` stored bytes was filled.
pub fn tensor(bytes: u64) -> Result<()> {
    report(|p| {
        p.tensors_done += 1;
        p.bytes_done = p.bytes_done.saturating_add(bytes);
    })
}

/// The load finished.
pub fn done() -> Result<()> {
    report(|p| {
        p.component = "done".into();
        p.bytes_done = p.bytes_done.max(p.bytes_total);
    })
}
