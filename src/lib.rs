//! Stable Diffusion on libtorch: CLIP text encoder, UNet, VAE, schedulers and one pipeline,
//! loadable from the checkpoints users download, with a stable C ABI on top.
pub mod embeddings;
pub mod error;
pub mod ffi;
pub mod hashes;
pub mod image_io;
pub mod limits;
pub mod lora;
pub mod models;
pub mod pipeline;
pub mod prompt;
pub mod rng;
pub mod runtime;
pub mod schedulers;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
