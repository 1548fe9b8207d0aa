//! Low-rank adapters (LoRA) run beside a layer's own weight, per call.
//!
//! A LoRA is never merged into the weights: merging and unmerging again drifts by rounding,
//! packed layers no longer hold a dense weight to merge into, and a merged copy of every
//! targeted weight per LoRA would cost memory. Instead every [`super::blocks::Linear`] and
//! [`super::blocks::Conv2d`] gets a process-unique [`LayerId`] when it is built, the models
//! record the names of theirs ([`collect`]), and while a call's [`ActiveAdapters`] are
//! installed on the running thread ([`activate`]) each targeted layer adds
//! `scale * up(down(x))` to its output, as diffusers' unfused PEFT layers do. With nothing
//! installed a layer computes exactly what it computed before, bit for bit.
use super::bf16_cpu;
use crate::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::{nn, Tensor};

/// Identifies one layer for the life of the process (ids are never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerId(u64);

/// What a layer computes, as far as an adapter must fit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    Linear {
        in_dim: i64,
        out_dim: i64,
    },
    /// A square-kernel convolution with one group.
    Conv {
        in_c: i64,
        out_c: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    },
}

/// One layer a LoRA may target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub id: LayerId,
    pub shape: LayerShape,
}

/// A model's layers by their name under the model's root (diffusers' module path, such as
/// `down_blocks.1.attentions.0.proj_in`).
pub type Targets = HashMap<String, Target>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static COLLECTING: RefCell<Option<Targets>> = const { RefCell::new(None) };
    static ACTIVE: RefCell<Option<Arc<ActiveAdapters>>> = const { RefCell::new(None) };
}

/// A new id for the layer being built at `vs` (its module path), recorded while [`collect`]
/// runs on this thread.
pub(crate) fn register(vs: &nn::Path, shape: LayerShape) -> LayerId {
    let id = LayerId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    COLLECTING.with(|c| {
        if let Some(targets) = c.borrow_mut().as_mut() {
            let name = vs.components().collect::<Vec<_>>().join(".");
            targets.insert(name, Target { id, shape });
        }
    });
    id
}

/// Runs `build` and returns what it built with the layers it registered.
pub fn collect<T>(build: impl FnOnce() -> Result<T>) -> Result<(T, Targets)> {
    struct Restore(Option<Targets>);
    impl Drop for Restore {
        fn drop(&mut self) {
            COLLECTING.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let restore = Restore(COLLECTING.with(|c| c.borrow_mut().replace(Targets::new())));
    let built = build()?;
    let targets = COLLECTING
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    drop(restore);
    Ok((built, targets))
}

/// One adapter on one layer: `scale * up(down(x))`, `down` and `up` already in the layer's
/// dtype, on its device and in its form (2-D for a linear layer, 4-D for a convolution).
#[derive(Debug)]
pub struct Delta {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// The adapters of one call, by layer, each layer's in the order they were given.
#[derive(Debug, Default)]
pub struct ActiveAdapters {
    pub by_layer: HashMap<LayerId, Vec<Delta>>,
}

// SAFETY: the deltas are built once by the binding and only read afterwards (as inputs of
// the layers' matrix products), which libtorch allows from several threads at once.
unsafe impl Sync for ActiveAdapters {}

/// Installs `adapters` on this thread until the guard drops (then whatever was installed
/// before is back).
pub fn activate(adapters: Option<Arc<ActiveAdapters>>) -> ActiveGuard {
    ActiveGuard {
        previous: ACTIVE.with(|a| a.replace(adapters)),
    }
}

pub struct ActiveGuard {
    previous: Option<Arc<ActiveAdapters>>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = self.previous.take());
    }
}

/// `ys`, the output of layer `id` for `xs`, plus the installed adapters' deltas for it;
/// `conv` holds a convolution's stride and padding.
pub(crate) fn add_deltas(
    id: LayerId,
    xs: &Tensor,
    ys: Tensor,
    conv: Option<(i64, i64)>,
) -> Result<Tensor> {
    let Some(active) = ACTIVE.with(|a| a.borrow().clone()) else {
        return Ok(ys);
    };
    let Some(deltas) = active.by_layer.get(&id) else {
        return Ok(ys);
    };
    let mut ys = ys;
    // Deltas are bound in the pipeline's dtype; a layer held in another (a float32 text
    // encoder in a bf16 pipeline) gets them in its own.
    let in_kind = |t: &Tensor| -> Result<Tensor> {
        Ok(match t.kind() == xs.kind() {
            true => t.shallow_clone(),
            false => t.f_to_kind(xs.kind())?,
        })
    };
    for d in deltas {
        let (down, up) = (in_kind(&d.down)?, in_kind(&d.up)?);
        let low = match conv {
            None => bf16_cpu::linear(&bf16_cpu::linear(xs, &down, None)?, &up, None)?,
            Some((stride, padding)) => bf16_cpu::conv2d(
                &bf16_cpu::conv2d(xs, &down, None, stride, padding)?,
                &up,
                None,
                1,
                0,
            )?,
        };
        ys = ys.f_add(&low.f_mul_scalar(d.scale)?)?;
    }
    Ok(ys)
}
