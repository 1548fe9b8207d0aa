//! What the pipeline needs from each network. The native tch modules implement these traits,
//! and so does the TorchScript backend, so one pipeline drives both.
use super::adapters::Targets;
use super::clip::TextStates;
use super::fast::FastPass;
use super::unet::AddedConditions;
use super::{AutoencoderKL, ClipTextTransformer, DiagonalGaussian, UNet2DConditionModel};
use crate::{Error, Result};
use tch::Tensor;

/// Vectors that take the place of token embeddings (textual inversion): `vectors`
/// `[n, dim]` at positions `position..position + n` of every row.
#[derive(Debug)]
pub struct EmbeddingFix {
    pub position: i64,
    pub vectors: Tensor,
}

const NEEDS_NATIVE_ENCODER: &str = "textual-inversion embeddings need the native text encoder";

/// Token ids `[batch, tokens]` to hidden states `[batch, tokens, dim]`.
pub trait TextEncoder: Send {
    /// `clip_skip` layers are skipped from the end; the final layer norm is applied either way.
    fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor>;
    /// Transformer layers, when known: `clip_skip` must stay below it. The pipeline checks it
    /// before a run starts; `None` leaves the check to `forward`.
    fn num_layers(&self) -> Option<usize> {
        None
    }
    /// SDXL's conditioning: the hidden states `clip_skip + 1` layers before the last without
    /// the final norm, and with `pooled` the (projected) pooled output. Backends without it
    /// refuse.
    fn forward_penultimate(
        &self,
        _input_ids: &Tensor,
        _clip_skip: usize,
        _pooled: bool,
    ) -> Result<TextStates> {
        Err(Error::Unsupported(
            "SDXL's text conditioning needs the native text encoder".into(),
        ))
    }
    /// [`TextEncoder::forward`] with `fixes` in place of token embeddings; the ids under a
    /// fix are placeholders (only pooling looks at them).
    fn forward_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
    ) -> Result<Tensor> {
        if fixes.is_empty() {
            self.forward(input_ids, clip_skip)
        } else {
            Err(Error::Unsupported(NEEDS_NATIVE_ENCODER.into()))
        }
    }
    /// [`TextEncoder::forward_penultimate`] with `fixes` (see [`TextEncoder::forward_fixed`]).
    fn forward_penultimate_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
        pooled: bool,
    ) -> Result<TextStates> {
        if fixes.is_empty() {
            self.forward_penultimate(input_ids, clip_skip, pooled)
        } else {
            Err(Error::Unsupported(NEEDS_NATIVE_ENCODER.into()))
        }
    }
    /// Width of the pooled output [`TextEncoder::forward_penultimate`] gives, when known.
    fn pooled_width(&self) -> Option<i64> {
        None
    }
    /// The layers a LoRA may target; `None` for a backend that cannot take one.
    fn adapter_targets(&self) -> Option<&Targets> {
        None
    }
    /// Lets the pages of weights it uses in place from a weight file go until its next call
    /// (see [`crate::weights::MappedWeights`]); the pipeline calls it once a call's text
    /// conditioning is made. Nothing to do for a model that holds its weights in memory.
    fn release_mapped_weights(&self) {}
    /// The width of a token embedding, when the backend takes embedding vectors
    /// ([`TextEncoder::forward_fixed`]).
    fn embedding_width(&self) -> Option<i64> {
        None
    }
}

/// The UNet: predicts noise (or v) for latents at a timestep, conditioned on text.
pub trait Denoiser: Send {
    fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor>;
    /// Channels of the UNet input: latent channels, or 2 * latent + 1 for inpainting models.
    fn in_channels(&self) -> i64;
    /// Native latent size, when the model states one.
    fn sample_size(&self) -> Option<i64>;
    /// One call with the opt-in fast modes; a backend without them refuses any but the exact
    /// pass.
    fn forward_fast(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        fast: &mut FastPass,
    ) -> Result<Tensor> {
        if added.is_some() {
            return Err(Error::Unsupported(
                "SDXL's added conditions need the native UNet".into(),
            ));
        }
        if fast.is_exact() {
            self.forward(sample, timestep, context)
        } else {
            Err(Error::Unsupported(super::fast::NEEDS_NATIVE_UNET.into()))
        }
    }
    /// Lets the pages of weights it uses in place from a weight file go until its next call
    /// (see [`crate::weights::MappedWeights`]); the pipeline calls it when a denoising loop
    /// is over. Nothing to do for a model that holds its weights in memory.
    fn release_mapped_weights(&self) {}
    /// SDXL UNets: `(width of the added conditions, width of one embedded time id)`.
    fn added_input_dims(&self) -> Option<(i64, i64)> {
        None
    }
    /// Skip connections available to step caching; `None` when the fast modes are not
    /// supported.
    fn skip_connections(&self) -> Option<usize> {
        None
    }
    /// The layers a LoRA may target; `None` for a backend that cannot take one.
    fn adapter_targets(&self) -> Option<&Targets> {
        None
    }
    /// Whether its convolutions follow [`super::blocks::wrap_around`] (seamless tiling).
    fn wraps_around(&self) -> bool {
        false
    }
}

/// The VAE between pixels in [-1, 1] and unscaled latents.
pub trait Autoencoder: Send {
    fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian>;
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;
    fn latent_channels(&self) -> i64;
    /// Pixels per latent cell on each side.
    fn spatial_scale(&self) -> i64;
    /// The config's `scaling_factor` (0.18215 for SD 1.x).
    fn scaling_factor(&self) -> f64;
    fn shift_factor(&self) -> Option<f64>;
    /// Whether its convolutions follow [`super::blocks::wrap_around`] (seamless tiling).
    fn wraps_around(&self) -> bool {
        false
    }
    /// The image side it was made for (the config's `sample_size`), when known.
    fn sample_size(&self) -> Option<i64> {
        None
    }
    /// Lets the pages of weights it uses in place from a weight file go until its next call
    /// (see [`crate::weights::MappedWeights`]); the pipeline calls it after each decode or
    /// encode, tiles and all. Nothing to do for a model that holds its weights in memory.
    fn release_mapped_weights(&self) {}

    /// Latents as the UNet sees them: `(z - shift) * scaling_factor`.
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shifted = match self.shift_factor() {
            Some(s) => z.f_sub_scalar(s)?,
            None => z.shallow_clone(),
        };
        Ok(shifted.f_mul_scalar(self.scaling_factor())?)
    }

    /// Inverse of [`Autoencoder::scale_latents`].
    fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let unscaled = z.f_div_scalar(self.scaling_factor())?;
        Ok(match self.shift_factor() {
            Some(s) => unscaled.f_add_scalar(s)?,
            None => unscaled,
        })
    }
}

impl TextEncoder for ClipTextTransformer {
    fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        ClipTextTransformer::forward(self, input_ids, clip_skip)
    }
    fn num_layers(&self) -> Option<usize> {
        usize::try_from(self.config().num_hidden_layers).ok()
    }
    fn forward_penultimate(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
        pooled: bool,
    ) -> Result<TextStates> {
        ClipTextTransformer::forward_penultimate(self, input_ids, clip_skip, pooled)
    }
    fn pooled_width(&self) -> Option<i64> {
        let c = self.config();
        Some(if c.has_projection() {
            c.projection_dim.unwrap_or(c.hidden_size)
        } else {
            c.hidden_size
        })
    }
    fn adapter_targets(&self) -> Option<&Targets> {
        Some(ClipTextTransformer::adapter_targets(self))
    }
    fn release_mapped_weights(&self) {
        ClipTextTransformer::release_mapped_weights(self);
    }
    fn embedding_width(&self) -> Option<i64> {
        Some(self.config().hidden_size)
    }
    fn forward_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
    ) -> Result<Tensor> {
        ClipTextTransformer::forward_fixed(self, input_ids, fixes, clip_skip)
    }
    fn forward_penultimate_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
        pooled: bool,
    ) -> Result<TextStates> {
        ClipTextTransformer::forward_penultimate_fixed(self, input_ids, fixes, clip_skip, pooled)
    }
}

impl Denoiser for UNet2DConditionModel {
    fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        UNet2DConditionModel::forward(self, sample, timestep, context)
    }
    fn release_mapped_weights(&self) {
        UNet2DConditionModel::release_mapped_weights(self);
    }
    fn in_channels(&self) -> i64 {
        self.config().in_channels
    }
    fn sample_size(&self) -> Option<i64> {
        self.config().sample_size
    }
    fn forward_fast(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        fast: &mut FastPass,
    ) -> Result<Tensor> {
        UNet2DConditionModel::forward_fast(self, sample, timestep, context, added, fast)
    }
    fn added_input_dims(&self) -> Option<(i64, i64)> {
        UNet2DConditionModel::added_input_dims(self)
    }
    fn skip_connections(&self) -> Option<usize> {
        Some(UNet2DConditionModel::skip_connections(self))
    }
    fn adapter_targets(&self) -> Option<&Targets> {
        Some(UNet2DConditionModel::adapter_targets(self))
    }
    fn wraps_around(&self) -> bool {
        true
    }
}

impl Autoencoder for AutoencoderKL {
    fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        AutoencoderKL::encode(self, images)
    }
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        AutoencoderKL::decode(self, latents)
    }
    fn latent_channels(&self) -> i64 {
        self.config().latent_channels
    }
    fn spatial_scale(&self) -> i64 {
        self.config().scale_factor()
    }
    fn scaling_factor(&self) -> f64 {
        self.config().scaling_factor
    }
    fn shift_factor(&self) -> Option<f64> {
        self.config().shift_factor
    }
    fn wraps_around(&self) -> bool {
        true
    }
    fn sample_size(&self) -> Option<i64> {
        self.config().sample_size
    }
    fn release_mapped_weights(&self) {
        AutoencoderKL::release_mapped_weights(self);
    }
}
