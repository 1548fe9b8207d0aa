//! Seeded Gaussian noise, bit-identical to PyTorch's CPU generator.
//!
//! libtorch exposes one global CPU generator to us; `tch::manual_seed` + `Tensor::randn` on it
//! gives exactly what `torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed))`
//! gives. Because the generator is process-wide, every seeded run draws *all* the noise it will
//! need at once under [`GLOBAL_RNG`], so that pipelines on other threads never interleave draws.
//! The lock covers the library's own draws only (seeded noise, and the random initial values of
//! a model built through `models::blocks::variable`): code in the same process that draws from
//! libtorch's global generator on another thread without taking [`GLOBAL_RNG`] can change a
//! seeded run's noise (the tests take it for their random inputs).
use crate::{Error, Result};
use parking_lot::ReentrantMutex;
use std::collections::VecDeque;
use tch::{Device, Kind, Tensor};

/// Serialises every use of libtorch's global CPU generator. Reentrant, so that a caller that
/// seeds the generator and then builds a randomly initialised model (training) can hold it
/// while each variable's initialisation takes it again.
pub static GLOBAL_RNG: ReentrantMutex<()> = ReentrantMutex::new(());

/// Where schedulers (and the pipeline) take their Gaussian noise from.
pub trait NoiseSource {
    /// The next tensor of standard normal noise of `shape`.
    fn randn(&mut self, shape: &[i64]) -> Result<Tensor>;
}

/// Noise drawn in advance, in the exact order the reference implementation draws it.
pub struct PredrawnNoise {
    queue: VecDeque<Tensor>,
}

impl PredrawnNoise {
    /// Seeds the global generator and draws one tensor per entry of `shapes`, in order,
    /// holding [`GLOBAL_RNG`] for the whole sequence.
    pub fn draw(seed: u64, shapes: &[Vec<i64>], kind: Kind, device: Device) -> Result<Self> {
        let _guard = GLOBAL_RNG.lock();
        tch::manual_seed(seed as i64);
        let mut queue = VecDeque::with_capacity(shapes.len());
        for shape in shapes {
            // Drawn on the CPU in fp32 like diffusers' randn_tensor with a CPU generator,
            // then moved: the same seed gives the same noise on every device.
            let t = Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))?;
            queue.push_back(t.f_to_device(device)?.f_to_kind(kind)?);
        }
        Ok(Self { queue })
    }
}

impl NoiseSource for PredrawnNoise {
    fn randn(&mut self, shape: &[i64]) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::Internal("more noise requested than was drawn".into()))?;
        if t.size() != shape {
            return Err(Error::Internal(format!(
                "noise of shape {:?} requested, {:?} was drawn",
                shape,
                t.size()
            )));
        }
        Ok(t)
    }
}

/// Draws straight from the global generator, which the caller has seeded and holds
/// [`GLOBAL_RNG`] for. For tests and tools that reproduce a reference draw sequence.
pub struct GlobalNoise;

impl NoiseSource for GlobalNoise {
    fn randn(&mut self, shape: &[i64]) -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, (Kind::Float, Device::Cpu))?)
    }
}
