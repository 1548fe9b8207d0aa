//! The networks of Stable Diffusion.
pub mod adapters;
pub mod bf16_cpu;
pub mod blocks;
pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod fast;
pub mod int8;
pub mod packed;
pub mod tiling;
pub mod tiny_vae;
pub mod torchscript;
pub mod traits;
pub mod unet;
pub mod vae;

pub use clip::{ClipTextConfig, ClipTextTransformer, TextStates};
pub use fast::{DeepCache, FastPass, TokenMerging};
pub use tiny_vae::{AutoencoderTiny, TinyVaeConfig};
pub use traits::{Autoencoder, Denoiser, TextEncoder};
pub use unet::{AddedConditions, UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
