//! The Stable Diffusion pipeline: loads a model folder and runs the one denoising loop that
//! every caller (CLI, C ABI, examples) goes through.
mod loader;
pub mod preview;

pub use crate::weights::progress::{LoadProgress, LoadProgressHook};
pub use loader::{load_tiny_vae, load_vae, LoadOptions, ModelFiles, WeightKernels};

use crate::embeddings::{self, Embeddings, TokenEmbedding};
use crate::image_io::Image;
use crate::limits::MAX_PROMPT_BYTES;
use crate::lora::{AdapterTargets, LoraCache, LoraWeight};
use crate::models::adapters::{self, ActiveAdapters};
use crate::models::blocks;
pub use crate::models::blocks::Seamless;
use crate::models::fast::{DeepCache, FastPass, TokenMerging, NEEDS_NATIVE_UNET};
use crate::models::tiling::{Tiles, LATENT_TILE_MULTIPLE, MIN_LATENT_TILE};
use crate::models::traits::{Autoencoder, Denoiser, EmbeddingFix, TextEncoder};
use crate::models::{AddedConditions, AutoencoderTiny, DiagonalGaussian};
use crate::prompt;
pub use crate::prompt::PromptSyntax;
use crate::rng::{NoiseSource, PredrawnNoise};
use crate::schedulers::{self, PredictionType, Scheduler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};

/// The text a positive prompt read with A1111's syntax encodes: without its extra-network
/// tags (`<lora:...>`, applied as LoRAs). Negative prompts are encoded as they are (A1111 reads
/// tags in the positive prompt only).
fn without_tags(text: &str) -> String {
    prompt::extra_networks(text).0
}

/// A pipeline's embeddings as each of its text encoders sees them, and why the others are
/// not used.
#[derive(Debug, Default)]
pub struct EncoderEmbeddings {
    per_encoder: Vec<Vec<TokenEmbedding>>,
    unused: Vec<String>,
}

impl EncoderEmbeddings {
    /// Encoder `i`'s embeddings (none past the encoders).
    fn of(&self, i: usize) -> &[TokenEmbedding] {
        self.per_encoder.get(i).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The vectors of `chunk`'s embeddings, from the list its fixes index.
fn chunk_fixes(chunk: &prompt::PromptChunk, embeddings: &[TokenEmbedding]) -> Vec<EmbeddingFix> {
    chunk
        .fixes
        .iter()
        .filter_map(|f| {
            Some(EmbeddingFix {
                position: f.position as i64,
                vectors: embeddings.get(f.embedding)?.vectors.shallow_clone(),
            })
        })
        .collect()
}

/// Largest number of images one call may generate.
pub const MAX_BATCH: usize = 64;
/// Largest number of denoising steps one call may run.
pub const MAX_STEPS: usize = 1000;
/// Largest side, in pixels, of a generated image.
pub const MAX_SIDE: i64 = 4096;

/// What to generate. `Default` gives diffusers' defaults where they exist.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// The unconditional text for classifier-free guidance; `None` means the empty prompt.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    /// Classifier-free guidance scale `w` in `uncond + w * (cond - uncond)`; `<= 1` runs the
    /// conditional pass alone.
    pub guidance: f64,
    /// Rescales the guided prediction toward the conditional one's standard deviation (Lin et
    /// al. 2023, diffusers' `guidance_rescale`, A1111's "CFG rescale"), in [0, 1]; 0 is off.
    /// Only with guidance on.
    pub guidance_rescale: f64,
    pub seed: u64,
    /// Image size in pixels; `None` takes the UNet's native size.
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// Number of images generated for the prompt.
    pub batch: usize,
    /// Scheduler name (diffusers class or short name); `None` takes the model's own.
    pub scheduler: Option<String>,
    /// Text-encoder layers to skip from the end (diffusers' `clip_skip`), 0 = none.
    pub clip_skip: usize,
    /// DDIM's eta (0 = deterministic DDIM); ignored by schedulers without one.
    pub eta: f64,
    /// img2img / inpainting: the image to start from (resized to width x height with Lanczos
    /// when its size differs; width and height default to its size rounded down to 8).
    pub init_image: Option<Image>,
    /// Inpainting: white = repaint, black = keep (binarised at 0.5 after grey conversion).
    pub mask: Option<Image>,
    /// How much noise is added to the init image, in [0, 1]: the first `int(steps * (1 - strength))`
    /// steps are skipped. `None`: diffusers' defaults, 0.8 for img2img and 1.0 for inpainting,
    /// with SDXL models 0.3 and 0.9999.
    pub strength: Option<f64>,
    /// Inpainting: copy the original pixels back outside the mask after decoding.
    pub paste_back: bool,
    /// The opt-in fast modes; the default is the exact computation.
    pub fast: FastModes,
    /// SDXL: the text for the second encoder; `None` repeats `prompt`.
    pub prompt_2: Option<String>,
    /// SDXL: the negative text for the second encoder; `None` repeats the negative prompt.
    pub negative_prompt_2: Option<String>,
    /// SDXL's size and crop conditioning (ignored by other models).
    pub micro: MicroConditioning,
    /// How the prompts' text is read: as it is (diffusers, the default) or with A1111's
    /// attention weights, `BREAK` and long prompts.
    pub prompt_syntax: PromptSyntax,
    /// LoRAs applied to this call only, each with its weights, after those of the prompt's
    /// `<lora:NAME:W>` tags. The model's weights are never changed: the next call without
    /// them runs exactly as if they had never been applied. An SDXL refiner phase runs
    /// without them.
    pub loras: Vec<LoraWeight>,
    /// The folder a prompt's `<lora:NAME:W>` tags name files in (`NAME.safetensors`), for
    /// this call; `None` takes [`LoadOptions::lora_dir`]. Tags are read only with
    /// [`PromptSyntax::A1111`].
    pub lora_dir: Option<PathBuf>,
    /// Seamless tiling: the axes along which the image wraps around, so that copies of it
    /// placed side by side (or one above the other) show no seam. Every convolution of the
    /// UNet and the VAE pads circularly along them for this call only; off gives the same
    /// image as before, bit for bit.
    pub seamless: Seamless,
    /// Whether the VAE decodes (and encodes an init image) in overlapping tiles, which bounds
    /// its memory by the tile instead of the image (diffusers' `enable_vae_tiling`).
    pub vae_tiling: VaeTiling,
    /// The VAE tile's side in pixels; `None` takes the VAE's `sample_size`, as diffusers does.
    /// A multiple of 4 latent cells (32 pixels for SD), at least 8 cells.
    pub vae_tile_size: Option<i64>,
    /// Decode the final images with the tiny autoencoder ([`LoadOptions::tiny_vae`]) instead
    /// of the VAE: much faster, a little less detailed.
    pub tiny_vae_decode: bool,
}

/// When the VAE works in tiles (see [`GenerateParams::vae_tiling`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VaeTiling {
    /// Tiles when the image has more than [`AUTO_VAE_TILING_PIXELS`] pixels (and no seamless
    /// axis, whose wrap-around a tile cannot see).
    #[default]
    Auto,
    /// Never tiles.
    Off,
    /// Tiles whenever the image is larger than one tile.
    On,
}

impl VaeTiling {
    /// `auto`, `off` / `no`, `on` / `yes`, as the CLI spells them.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "off" | "no" | "false" => Some(Self::Off),
            "on" | "yes" | "true" => Some(Self::On),
            _ => None,
        }
    }
}

/// Above this many pixels (1536 x 1536) [`VaeTiling::Auto`] decodes in tiles: an SD VAE's
/// untiled decode holds several 128-channel float32 activations at full resolution, about
/// 1.2 GiB each at 2048 x 2048, while every size SDXL was trained at stays below it.
pub const AUTO_VAE_TILING_PIXELS: i64 = 1536 * 1536;

/// SDXL's micro-conditioning, as `(height, width)` and `(top, left)` pairs in pixels
/// (diffusers' `original_size`, `crops_coords_top_left`, `target_size` and their `negative_`
/// counterparts). `None` sizes take the output size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    pub original_size: Option<(i64, i64)>,
    pub crops_coords_top_left: (i64, i64),
    pub target_size: Option<(i64, i64)>,
    /// Used for the unconditional pass only when both negative sizes are given (diffusers);
    /// otherwise the unconditional pass gets the positive values.
    pub negative_original_size: Option<(i64, i64)>,
    pub negative_crops_coords_top_left: (i64, i64),
    pub negative_target_size: Option<(i64, i64)>,
    /// The SDXL refiner's aesthetic score for the conditional pass (diffusers' default 6.0)
    /// and the unconditional one (2.5); other models ignore them.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// Largest value of a micro-conditioning size or offset: far beyond any image, small enough
/// that its sinusoidal embedding stays exact in float32.
pub const MAX_MICRO_CONDITIONING: i64 = 1 << 20;

impl MicroConditioning {
    /// The positive and negative time ids, `[orig_h, orig_w, top, left, target_h, target_w]`,
    /// or with `aesthetics` (the refiner) `[orig_h, orig_w, top, left, score]`.
    ///
    /// `editing` (img2img, inpainting, a refiner phase) takes diffusers' editing pipelines'
    /// rule for the negative ids: each negative size defaults to its positive one on its own,
    /// and the negative pass takes the positive crop; text-to-image uses the negative values
    /// only when both negative sizes are given, with the negative crop.
    fn time_ids(
        &self,
        height: i64,
        width: i64,
        aesthetics: bool,
        editing: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let output = (height, width);
        if aesthetics {
            // diffusers' img2img rule: the negative sizes default one by one, and the
            // negative pass takes the negative crop.
            let ids = |orig: (i64, i64), crop: (i64, i64), score: f64| {
                vec![
                    orig.0 as f64,
                    orig.1 as f64,
                    crop.0 as f64,
                    crop.1 as f64,
                    score,
                ]
            };
            let original = self.original_size.unwrap_or(output);
            return (
                ids(original, self.crops_coords_top_left, self.aesthetic_score),
                ids(
                    self.negative_original_size.unwrap_or(original),
                    self.negative_crops_coords_top_left,
                    self.negative_aesthetic_score,
                ),
            );
        }
        let ids = |orig: (i64, i64), crop: (i64, i64), target: (i64, i64)| {
            [orig.0, orig.1, crop.0, crop.1, target.0, target.1]
                .map(|v| v as f64)
                .to_vec()
        };
        let positive = ids(
            self.original_size.unwrap_or(output),
            self.crops_coords_top_left,
            self.target_size.unwrap_or(output),
        );
        let negative = if editing {
            ids(
                self.negative_original_size
                    .or(self.original_size)
                    .unwrap_or(output),
                self.crops_coords_top_left,
                self.negative_target_size
                    .or(self.target_size)
                    .unwrap_or(output),
            )
        } else {
            match (self.negative_original_size, self.negative_target_size) {
                (Some(orig), Some(target)) => {
                    ids(orig, self.negative_crops_coords_top_left, target)
                }
                _ => positive.clone(),
            }
        };
        (positive, negative)
    }

    fn validate(&self) -> Result<()> {
        let pairs = [
            ("original_size", self.original_size),
            ("crops_coords_top_left", Some(self.crops_coords_top_left)),
            ("target_size", self.target_size),
            ("negative_original_size", self.negative_original_size),
            (
                "negative_crops_coords_top_left",
                Some(self.negative_crops_coords_top_left),
            ),
            ("negative_target_size", self.negative_target_size),
        ];
        for (name, score) in [
            ("aesthetic_score", self.aesthetic_score),
            ("negative_aesthetic_score", self.negative_aesthetic_score),
        ] {
            if !score.is_finite() || score.abs() > MAX_MICRO_CONDITIONING as f64 {
                return Err(Error::invalid(format!(
                    "{name} {score} must be a finite number of at most \
                     {MAX_MICRO_CONDITIONING} in size"
                )));
            }
        }
        for (name, pair) in pairs {
            if let Some((a, b)) = pair {
                if !(0..=MAX_MICRO_CONDITIONING).contains(&a)
                    || !(0..=MAX_MICRO_CONDITIONING).contains(&b)
                {
                    return Err(Error::invalid(format!(
                        "{name} ({a}, {b}) must lie in 0..={MAX_MICRO_CONDITIONING}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Largest token merging ratio: ToMe keeps one token of each 2x2 cell.
pub const MAX_TOKEN_MERGING: f64 = 0.75;

/// Opt-in modes that trade fidelity for speed, all off by default (see
/// [`crate::models::fast`]). Their cost in quality is measured by `make bench-fast`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FastModes {
    /// Step caching (DeepCache): every `cache_interval`-th UNet call is a full pass, the
    /// others reuse its deep features. 0 and 1 are off.
    pub cache_interval: usize,
    /// The skip connection where the cached features enter (0 = after `conv_in`, the
    /// fastest; larger recomputes more and stays closer to the exact run).
    pub cache_branch: usize,
    /// Token merging (ToMe): the fraction of self-attention tokens merged away at the finest
    /// resolution with attention (the full latent resolution in SD 1.x / 2.x), in
    /// `[0, 0.75]`; 0 is off. 0.5 is ToMe's usual setting.
    pub token_merging: f64,
    /// The UNet's linear layers in dynamic int8 (per-channel weights, inputs quantized on the
    /// fly; float32 pipelines on the CPU only). The int8 copies are packed at the first call
    /// that asks for them and kept.
    pub int8_linear: bool,
}

impl FastModes {
    pub fn is_exact(&self) -> bool {
        self.cache_interval <= 1 && self.token_merging == 0.0 && !self.int8_linear
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            guidance_rescale: 0.0,
            seed: 0,
            width: None,
            height: None,
            batch: 1,
            scheduler: None,
            clip_skip: 0,
            eta: 0.0,
            init_image: None,
            mask: None,
            strength: None,
            paste_back: false,
            fast: FastModes::default(),
            prompt_2: None,
            negative_prompt_2: None,
            micro: MicroConditioning::default(),
            prompt_syntax: PromptSyntax::Plain,
            loras: Vec::new(),
            lora_dir: None,
            seamless: Seamless::OFF,
            vae_tiling: VaeTiling::Auto,
            vae_tile_size: None,
            tiny_vae_decode: false,
        }
    }
}

/// What the per-step callback sees after each denoising step.
pub struct StepInfo<'a> {
    /// Steps completed so far, 1..=total.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    /// The current latents `[batch, channels, h/8, w/8]` (scaled as the UNet sees them).
    pub latents: &'a Tensor,
    /// The pipeline's tiny autoencoder, which makes the previews when there is one.
    pub tiny_vae: Option<&'a AutoencoderTiny>,
}

impl StepInfo<'_> {
    /// One preview image per batch item: the latents decoded by the tiny autoencoder at full
    /// size when the pipeline has one, else the cheap latent-to-RGB map at latent size.
    pub fn previews(&self) -> Result<Vec<Image>> {
        match self.tiny_vae.filter(|t| t.has_decoder()) {
            Some(tiny) => {
                let _no_grad = tch::no_grad_guard();
                let images = Images {
                    pixels: to_unit_pixels(&tiny_decode(tiny, self.latents)?)?,
                };
                let (w, h) = (images.width(), images.height());
                images
                    .to_rgb8()?
                    .into_iter()
                    .map(|rgb| Image::new(w, h, rgb))
                    .collect()
            }
            None => preview::latents_to_preview_rgb(self.latents),
        }
    }
}

/// The callback's answer: go on, or stop the run with [`Error::Cancelled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Generated images: a float tensor `[batch, height, width, 3]` with values in [0, 1],
/// on the CPU (diffusers' `output_type="np"`).
pub struct Images {
    pub pixels: Tensor,
}

impl Images {
    pub fn len(&self) -> usize {
        self.pixels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn width(&self) -> u32 {
        self.pixels.size()[2] as u32
    }

    pub fn height(&self) -> u32 {
        self.pixels.size()[1] as u32
    }

    /// 8-bit RGB, row-major, one `Vec` per image, rounded as diffusers' `numpy_to_pil`
    /// (`(x * 255).round()`).
    pub fn to_rgb8(&self) -> Result<Vec<Vec<u8>>> {
        let bytes = self
            .pixels
            .f_mul_scalar(255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_contiguous()?;
        let per_image = (self.width() * self.height() * 3) as usize;
        let mut flat = vec![0u8; per_image * self.len()];
        let len = flat.len();
        bytes.f_copy_data_u8(&mut flat, len)?;
        Ok(flat.chunks(per_image).map(|c| c.to_vec()).collect())
    }
}

/// A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and scheduler config.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Box<dyn TextEncoder>,
    pub unet: Box<dyn Denoiser>,
    pub vae: Box<dyn Autoencoder>,
    pub scheduler_config: SchedulerConfig,
    /// SDXL's conditioning; `None` for SD 1.x / 2.x.
    pub sdxl: Option<SdxlText>,
    device: Device,
    kind: Kind,
    logger: Option<Logger>,
    /// What a LoRA may target in this pipeline, gathered from the parts at the first call.
    adapter_targets: OnceLock<Arc<AdapterTargets>>,
    /// Where a prompt's `<lora:NAME:W>` tags find their files, unless a call says.
    lora_dir: Option<PathBuf>,
    /// LoRAs read for tags, kept while their files are unchanged.
    lora_cache: Arc<LoraCache>,
    /// Textual-inversion embeddings ([`LoadOptions::embeddings_dir`]).
    embeddings: Arc<Embeddings>,
    /// The embeddings as each text encoder sees them, made at the first call.
    token_embeddings: OnceLock<Arc<EncoderEmbeddings>>,
    /// Whether the embeddings that could not be used were reported (once, at the first run).
    embeddings_reported: std::sync::atomic::AtomicBool,
    /// The tiny autoencoder for previews and fast decodes ([`LoadOptions::tiny_vae`]).
    tiny_vae: Option<AutoencoderTiny>,
    /// The CPU threads its calls compute with ([`LoadOptions::num_threads`]).
    pub(crate) num_threads: Option<usize>,
    /// The file maps that weights point into (see [`LoadOptions::copy_weights`]): declared
    /// after the models, so that they are dropped after them.
    mapped_weights: Vec<crate::weights::MappingOwner>,
}

/// What an SDXL model conditions on besides the first text encoder.
pub struct SdxlText {
    /// The second text encoder (OpenCLIP ViT-bigG with projection) and its tokenizer. `None`
    /// for the refiner, whose only encoder, that one, is the pipeline's `text_encoder`.
    pub second: Option<(ClipTokenizer, Box<dyn TextEncoder>)>,
    /// An absent negative prompt conditions the unconditional pass on zeros instead of the
    /// empty text (`model_index.json`'s `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
    /// The refiner's time ids: original size, crop and an aesthetic score (five), instead of
    /// original size, crop and target size (six) (`requires_aesthetics_score`).
    pub requires_aesthetics_score: bool,
}

/// Which kind of model a pipeline holds, as an engine's UI needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x: one CLIP text encoder whose tokenizer pads with its end token.
    Sd1,
    /// SD 2.x: one OpenCLIP text encoder whose tokenizer pads with `!`.
    Sd2,
    /// SDXL base (also its inpainting and Turbo variants): two text encoders.
    Sdxl,
    /// The SDXL refiner: one text encoder with projection, aesthetic-score conditioning; it
    /// refines images and latents, it does not start from text alone.
    SdxlRefiner,
}

impl ModelFamily {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "sd1",
            Self::Sd2 => "sd2",
            Self::Sdxl => "sdxl",
            Self::SdxlRefiner => "sdxl-refiner",
        }
    }
}

/// What a loaded pipeline is, for a caller that adapts to it (see [`StableDiffusion::info`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineInfo {
    pub family: ModelFamily,
    /// The size generated when the caller gives none, in pixels (square).
    pub native_size: i64,
    pub prediction_type: PredictionType,
    /// UNet input channels: the latent channels, or 2 x latent + 1 for an inpainting model.
    pub unet_in_channels: i64,
    pub latent_channels: i64,
    /// Pixels per latent cell on each side.
    pub vae_scale_factor: i64,
    /// The largest `clip_skip` accepted (`None`: the text encoder does not say, e.g.
    /// TorchScript).
    pub max_clip_skip: Option<usize>,
    /// The scheduler a request without one runs (a diffusers class name).
    pub default_scheduler: Option<String>,
    pub kind: Kind,
    pub device: Device,
}

/// How much a log message matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

/// Receives the pipeline's log messages (e.g. a prompt cut at 77 tokens, a scheduler fallback).
pub type Logger = std::sync::Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// Where one denoising run starts and stops within its schedule: the whole of it, or a phase
/// of SDXL's base + refiner ensemble.
struct Phase<'a> {
    /// Latents handed over by an earlier phase, and the fraction of the schedule that phase
    /// covered (diffusers' `denoising_start`).
    start: Option<(&'a Tensor, f64)>,
    /// Stop once this fraction of the schedule is done (diffusers' `denoising_end`).
    end: Option<f64>,
    /// Steps reported to `on_step` are numbered after `offset`, out of `total` (0: this
    /// phase's own count).
    offset: usize,
    total: usize,
}

impl Phase<'_> {
    const WHOLE: Phase<'static> = Phase {
        start: None,
        end: None,
        offset: 0,
        total: 0,
    };
}

/// What a denoising run leaves for the decode.
struct Denoised {
    latents: Tensor,
    mask: Option<Tensor>,
    init: Option<Tensor>,
}

/// A hand-over point of the base + refiner ensemble must lie strictly inside the schedule.
pub fn check_denoising_fraction(name: &str, fraction: f64) -> Result<()> {
    if fraction.is_finite() && fraction > 0.0 && fraction < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name} must be a fraction of the schedule strictly between 0 and 1, got {fraction}"
        )))
    }
}

impl StableDiffusion {
    /// A pipeline from its parts: native modules, TorchScript modules or a mix.
    pub fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: Box<dyn TextEncoder>,
        unet: Box<dyn Denoiser>,
        vae: Box<dyn Autoencoder>,
        scheduler_config: SchedulerConfig,
        options: &LoadOptions,
    ) -> Self {
        Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            sdxl: None,
            device: options.device,
            kind: options.kind,
            logger: None,
            adapter_targets: OnceLock::new(),
            lora_dir: options.lora_dir.clone(),
            lora_cache: Arc::default(),
            embeddings: Arc::default(),
            token_embeddings: OnceLock::new(),
            embeddings_reported: Default::default(),
            tiny_vae: None,
            num_threads: options.num_threads,
            mapped_weights: Vec::new(),
        }
    }

    /// Uses `tiny` for previews and, when a call asks, the final decode (`None` removes it).
    /// Its latents must be this model's: the same channels and scale.
    pub fn set_tiny_vae(&mut self, tiny: Option<AutoencoderTiny>) -> Result<()> {
        if let Some(t) = &tiny {
            let c = t.config();
            let (channels, scale) = (self.vae.latent_channels(), self.vae_scale_factor());
            if c.latent_channels != channels || (t.has_decoder() && c.decoder_scale() != scale) {
                return Err(Error::invalid(format!(
                    "the tiny autoencoder takes {}-channel latents at 1/{} of the image, this \
                     model makes {channels}-channel latents at 1/{scale}",
                    c.latent_channels,
                    c.decoder_scale()
                )));
            }
        }
        self.tiny_vae = tiny;
        Ok(())
    }

    /// Logs, as warnings, why each embedding is not used, unless that was done already (it is
    /// done at the first run otherwise).
    pub fn report_unused_embeddings(&self) {
        if !self
            .embeddings_reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            for why in &self.token_embeddings().unused {
                self.log(LogLevel::Warn, || format!("embedding not used: {why}"));
            }
        }
    }

    /// The tiny autoencoder, if one was given ([`StableDiffusion::set_tiny_vae`]).
    pub fn tiny_vae(&self) -> Option<&AutoencoderTiny> {
        self.tiny_vae.as_ref()
    }

    /// Uses `embeddings` in this pipeline's prompts from now on.
    pub fn set_embeddings(&mut self, embeddings: Embeddings) {
        self.embeddings = Arc::new(embeddings);
        self.token_embeddings = OnceLock::new();
        self.embeddings_reported = Default::default();
    }

    /// The textual-inversion embeddings this pipeline reads prompts with.
    pub fn embeddings(&self) -> &Embeddings {
        &self.embeddings
    }

    /// Why each embedding that this pipeline does not use is not used (a file that is not an
    /// embedding, one made for another model family, a name taken twice); also logged once,
    /// as warnings, at the first run.
    pub fn unused_embeddings(&self) -> Vec<String> {
        self.token_embeddings().unused.clone()
    }

    /// The text encoders with their tokenizers, in order (SDXL: CLIP-L, then bigG).
    fn encoders(&self) -> Vec<(&ClipTokenizer, &dyn TextEncoder)> {
        let first = (&self.tokenizer, self.text_encoder.as_ref());
        match self.sdxl.as_ref().and_then(|x| x.second.as_ref()) {
            Some((t, e)) => vec![first, (t, e.as_ref())],
            None => vec![first],
        }
    }

    /// The embeddings as each text encoder sees them.
    fn token_embeddings(&self) -> Arc<EncoderEmbeddings> {
        self.token_embeddings
            .get_or_init(|| {
                let encoders = self.encoders();
                let mut out = EncoderEmbeddings {
                    per_encoder: encoders.iter().map(|_| Vec::new()).collect(),
                    unused: self.embeddings.skipped().to_vec(),
                };
                if self.embeddings.is_empty() {
                    return Arc::new(out);
                }
                let tokenizers: Vec<&ClipTokenizer> = encoders.iter().map(|(t, _)| *t).collect();
                let widths: Option<Vec<i64>> =
                    encoders.iter().map(|(_, e)| e.embedding_width()).collect();
                let refiner = self.sdxl.as_ref().is_some_and(|x| x.second.is_none());
                let found = match widths {
                    Some(widths) => embeddings::for_encoders(
                        &self.embeddings,
                        &tokenizers,
                        &widths,
                        refiner,
                        self.kind,
                        self.device,
                    ),
                    None => Err(Error::Unsupported(
                        "textual-inversion embeddings need the native text encoders".into(),
                    )),
                };
                match found {
                    Ok((per_encoder, unfit)) => {
                        out.per_encoder = per_encoder;
                        out.unused.extend(unfit);
                    }
                    Err(e) => out.unused.push(format!("no embedding is used: {e}")),
                }
                Arc::new(out)
            })
            .clone()
    }

    /// The layers of this pipeline a LoRA may target.
    fn adapter_targets(&self) -> Arc<AdapterTargets> {
        self.adapter_targets
            .get_or_init(|| {
                let refiner = self.sdxl.as_ref().is_some_and(|x| x.second.is_none());
                let second = self
                    .sdxl
                    .as_ref()
                    .and_then(|x| x.second.as_ref())
                    .map(|(_, e)| e.adapter_targets());
                let first = self.text_encoder.adapter_targets();
                let (first, second) = if refiner {
                    (None, Some(first))
                } else {
                    (Some(first), second)
                };
                let unet = self.unet.adapter_targets();
                let native = unet.is_some() && first.flatten().is_some() == first.is_some();
                Arc::new(AdapterTargets::new(
                    self.family().name(),
                    unet,
                    first.flatten(),
                    second.flatten(),
                    (!native).then(|| {
                        "this pipeline's modules (TorchScript) cannot take one; load the \
                         model's diffusers folder or single file"
                            .to_string()
                    }),
                ))
            })
            .clone()
    }

    /// Routes this pipeline's log messages to `logger` (none: dropped).
    pub fn set_logger(&mut self, logger: Option<Logger>) {
        self.logger = logger;
    }

    fn log(&self, level: LogLevel, message: impl FnOnce() -> String) {
        if let Some(logger) = &self.logger {
            logger(level, &message());
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Pixels per latent cell on each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.spatial_scale()
    }

    /// The model family (from the parts loaded: the encoders, the tokenizer's padding).
    pub fn family(&self) -> ModelFamily {
        match &self.sdxl {
            Some(sdxl) if sdxl.second.is_none() => ModelFamily::SdxlRefiner,
            Some(_) => ModelFamily::Sdxl,
            None if self.tokenizer.pad_id() != self.tokenizer.eos_id() => ModelFamily::Sd2,
            None => ModelFamily::Sd1,
        }
    }

    /// What this pipeline is: family, native size, prediction type, channels, valid
    /// `clip_skip`, default scheduler, dtype and device.
    pub fn info(&self) -> PipelineInfo {
        let validator = self.validator();
        PipelineInfo {
            family: self.family(),
            native_size: self.default_size(),
            prediction_type: self
                .scheduler_config
                .prediction_type
                .unwrap_or(PredictionType::Epsilon),
            unet_in_channels: self.unet.in_channels(),
            latent_channels: self.vae.latent_channels(),
            vae_scale_factor: self.vae_scale_factor(),
            max_clip_skip: validator.text_layers.map(|n| n.saturating_sub(1)),
            // The class a request without a scheduler runs: DDIM when the config's is unknown.
            default_scheduler: match validator.scheduler(None) {
                Ok((_, Some(_))) => Some("DDIMScheduler".into()),
                Ok((_, None)) => self.scheduler_config.class_name.clone(),
                Err(_) => None,
            },
            kind: self.kind,
            device: self.device,
        }
    }

    /// The image size used when the caller gives none: the UNet's sample size in pixels.
    pub fn default_size(&self) -> i64 {
        self.unet.sample_size().unwrap_or(64) * self.vae_scale_factor()
    }

    /// A fresh scheduler: the named one, else the one the model's config names, else (a class
    /// this library lacks) DDIM with the config's values.
    pub fn scheduler(&self, name: Option<&str>) -> Result<Box<dyn Scheduler>> {
        let (scheduler, fallback) = self.validator().scheduler(name)?;
        if let Some(why) = fallback {
            self.log(LogLevel::Warn, || why);
        }
        Ok(scheduler)
    }

    /// A prompt read with A1111's syntax (attention weights, `BREAK`, chunks of 75 tokens):
    /// `[1, 77 * chunks, dim]`, the chunks' hidden states weighted with A1111's emphasis and
    /// joined. SD 1.x / 2.x models.
    pub fn encode_prompt_a1111(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        check_prompt("prompt", prompt)?;
        let embeddings = self.token_embeddings();
        let text = without_tags(prompt);
        let chunks = prompt::prompt_chunks(&self.tokenizer, &text, "prompt", embeddings.of(0))?;
        let encoder = (self.text_encoder.as_ref(), embeddings.of(0));
        Ok(self.encode_weighted(encoder, &chunks, clip_skip, false)?.0)
    }

    /// Text embeddings `[batch, tokens, dim]` for one prompt repeated `batch` times. A prompt
    /// longer than the tokenizer's `max_length` is cut (with a warning to the logger); the
    /// tokenizer stops as soon as it has enough tokens, so a long prompt costs no more.
    pub fn encode_prompt(&self, prompt: &str, batch: usize, clip_skip: usize) -> Result<Tensor> {
        let (ids, fixes) = self.token_ids(0, prompt)?;
        let hidden = self.text_encoder.forward_fixed(&ids, &fixes, clip_skip)?;
        Ok(hidden.f_repeat([batch as i64, 1, 1])?)
    }

    /// What a guided generation conditions on: the embeddings of `negative`, then those of
    /// `prompt`, each repeated `batch` times (`[2 * batch, tokens, dim]`). `clip_skip` applies
    /// to the prompt only, as in diffusers. The two go through the text encoder as one batch
    /// when they can (no embedding vectors, no `clip_skip`): one pass over the weights instead
    /// of two, 15-25 % less time on the CPU.
    pub fn encode_prompt_pair(
        &self,
        prompt: &str,
        negative: &str,
        batch: usize,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let (ids, fixes) = self.token_ids(0, prompt)?;
        let (negative_ids, negative_fixes) = self.token_ids(0, negative)?;
        let encoder = self.text_encoder.as_ref();
        let (uncond, cond) = if clip_skip == 0 && fixes.is_empty() && negative_fixes.is_empty() {
            let both = encoder.forward(&Tensor::f_cat(&[negative_ids, ids], 0)?, 0)?;
            (both.f_narrow(0, 0, 1)?, both.f_narrow(0, 1, 1)?)
        } else {
            (
                encoder.forward_fixed(&negative_ids, &negative_fixes, 0)?,
                encoder.forward_fixed(&ids, &fixes, clip_skip)?,
            )
        };
        let b = batch as i64;
        Ok(Tensor::f_cat(
            &[uncond.f_repeat([b, 1, 1])?, cond.f_repeat([b, 1, 1])?],
            0,
        )?)
    }

    /// Token ids `[1, max_length]` of `prompt` for text encoder `encoder`, cut (with a warning
    /// to the logger) when longer, and the vectors of the embeddings it names.
    fn token_ids(&self, encoder: usize, prompt: &str) -> Result<(Tensor, Vec<EmbeddingFix>)> {
        check_prompt("prompt", prompt)?;
        let tokenizer = self.encoders()[encoder].0;
        let embeddings = self.token_embeddings();
        let (ids, fixes, truncated) = match embeddings.of(encoder) {
            [] => {
                let (ids, truncated) = tokenizer.encode_padded_checked(prompt);
                (ids, Vec::new(), truncated)
            }
            some => embeddings::plain_tokens(tokenizer, prompt, some)?,
        };
        if truncated {
            self.log(LogLevel::Warn, || {
                format!(
                    "prompt is longer than {} tokens; only the first {} are used",
                    ids.len(),
                    ids.len()
                )
            });
        }
        Ok((
            Tensor::from_slice(&ids)
                .f_unsqueeze(0)?
                .f_to_device(self.device)?,
            fixes,
        ))
    }

    /// SDXL's text conditioning for one prompt pair, repeated `batch` times: both encoders'
    /// hidden states `clip_skip + 1` layers before the last, joined along the features, and
    /// the second encoder's pooled output `[batch, dim]`.
    pub fn encode_prompt_sdxl(
        &self,
        prompt: &str,
        prompt_2: &str,
        batch: usize,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let b = batch as i64;
        let Some(sdxl) = &self.sdxl else {
            return Err(Error::invalid("SDXL prompts need an SDXL model"));
        };
        let Some((_, encoder_2)) = &sdxl.second else {
            // The refiner: the one encoder's states and pooled projection, of `prompt` (as
            // diffusers pairs the prompts with the encoders it has).
            let (ids, fixes) = self.token_ids(0, prompt)?;
            let states = self
                .text_encoder
                .forward_penultimate_fixed(&ids, &fixes, clip_skip, true)?;
            let pooled = states
                .pooled
                .ok_or_else(|| Error::Internal("the text encoder gave no pooled output".into()))?;
            return Ok((states.hidden.f_repeat([b, 1, 1])?, pooled.f_repeat([b, 1])?));
        };
        let (ids, fixes) = self.token_ids(0, prompt)?;
        let first = self
            .text_encoder
            .forward_penultimate_fixed(&ids, &fixes, clip_skip, false)?;
        let (ids_2, fixes_2) = self.token_ids(1, prompt_2)?;
        let second = encoder_2.forward_penultimate_fixed(&ids_2, &fixes_2, clip_skip, true)?;
        let pooled = second.pooled.ok_or_else(|| {
            Error::Internal("the second text encoder gave no pooled output".into())
        })?;
        Ok((
            Tensor::f_cat(&[first.hidden, second.hidden], -1)?.f_repeat([b, 1, 1])?,
            pooled.f_repeat([b, 1])?,
        ))
    }

    /// What [`StableDiffusion::generate`] checks before it runs, detached from the model: the
    /// C ABI checks a job's request with it when the job is submitted, while another call may
    /// hold the model.
    pub fn validator(&self) -> Validator {
        Validator {
            default_size: self.default_size(),
            vae_scale: self.vae_scale_factor(),
            unet_in: self.unet.in_channels(),
            latent_channels: self.vae.latent_channels(),
            text_layers: match (
                self.sdxl.as_ref().and_then(|x| x.second.as_ref()),
                self.text_encoder.num_layers(),
            ) {
                (Some((_, second)), Some(first)) => second.num_layers().map(|n| n.min(first)),
                (_, first) => first,
            },
            skip_connections: self.unet.skip_connections(),
            device: self.device,
            kind: self.kind,
            scheduler_config: self.scheduler_config.clone(),
            refiner: self
                .sdxl
                .as_ref()
                .is_some_and(|x| x.requires_aesthetics_score),
            tokenizers: std::iter::once(self.tokenizer.clone())
                .chain(
                    self.sdxl
                        .as_ref()
                        .and_then(|x| x.second.as_ref())
                        .map(|(t, _)| t.clone()),
                )
                .collect(),
            adapter_targets: self.adapter_targets(),
            wraps_around: self.unet.wraps_around() && self.vae.wraps_around(),
            vae_sample_size: self.vae.sample_size(),
            tiny_decoder: self.tiny_vae.as_ref().is_some_and(|t| t.has_decoder()),
            lora_dir: self.lora_dir.clone(),
            lora_cache: self.lora_cache.clone(),
            token_embeddings: self.token_embeddings(),
        }
    }

    /// The LoRAs `params` applies (see [`Validator::requested_loras`]), e.g. to describe a run.
    pub fn requested_loras(&self, params: &GenerateParams) -> Result<Vec<(String, LoraWeight)>> {
        self.validator().requested_loras(params)
    }

    /// Checks a complete request as [`StableDiffusion::generate`] does first thing, and
    /// resolves its size and scheduler: whatever this accepts, `generate` only refuses for
    /// reasons found while running (memory, the backend, cancellation).
    pub fn validate(&self, params: &GenerateParams) -> Result<Validated> {
        self.validator().validate(params)
    }

    /// Text to image. `on_step` runs after every denoising step and may cancel the run.
    /// Same as [`StableDiffusion::generate`] without an init image.
    pub fn txt2img(
        &self,
        params: &GenerateParams,
        on_step: Option<&mut dyn FnMut(&StepInfo) -> Control>,
    ) -> Result<Images> {
        if params.init_image.is_some() {
            return Err(Error::invalid("txt2img takes no init image; use generate"));
        }
        self.generate(params, on_step)
    }

    /// Runs text-to-image, image-to-image (with `init_image`) or inpainting (with `init_image`
    /// and `mask`), as diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline. `on_step` runs
    /// after every denoising step and may cancel the run.
    pub fn generate(
        &self,
        params: &GenerateParams,
        on_step: Option<&mut dyn FnMut(&StepInfo) -> Control>,
    ) -> Result<Images> {
        self.generate_cancellable(params, on_step, &|| false)
    }

    /// [`StableDiffusion::generate`], which also stops with [`Error::Cancelled`] as soon as
    /// `cancelled` returns true. It is asked between every two phases of the run (image
    /// preparation, each VAE encode, each prompt's encoding, before and after each denoising
    /// step, each image's VAE decode), so a cancel takes effect within about one step.
    pub fn generate_cancellable(
        &self,
        params: &GenerateParams,
        mut on_step: Option<&mut dyn FnMut(&StepInfo) -> Control>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        let validated = self.validate(params)?;
        let run = self.denoise(params, validated, &Phase::WHOLE, &mut on_step, cancelled)?;
        self.decode_run(run, params, cancelled)
    }

    /// SDXL's "ensemble of expert denoisers": this (base) model denoises the first
    /// `refiner_start` of the schedule (diffusers' `denoising_end`), then `refiner` takes its
    /// latents, without a decode, through the rest (`denoising_start`) and decodes them.
    /// Both phases run `params` (text-to-image, image-to-image or inpainting on this model;
    /// the refiner continues in the same mode) with their own scheduler of the same name; the
    /// refiner's noise comes from a generator seeded again with `params.seed`. `on_step`
    /// counts the steps of both phases.
    pub fn generate_with_refiner(
        &self,
        refiner: &StableDiffusion,
        params: &GenerateParams,
        refiner_start: f64,
        mut on_step: Option<&mut dyn FnMut(&StepInfo) -> Control>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        check_denoising_fraction("refiner_start", refiner_start)?;
        let base = self.validate(params)?;
        let second = refiner.validator().validate_phase(params, true)?;
        if (second.width, second.height) != (base.width, base.height)
            || refiner.vae.latent_channels() != self.vae.latent_channels()
            || refiner.vae_scale_factor() != self.vae_scale_factor()
        {
            return Err(Error::invalid(
                "the refiner's latents do not match the base model's (latent channels or \
                 VAE scale factor differ)",
            ));
        }
        if refiner.unet.in_channels() != refiner.vae.latent_channels() {
            return Err(Error::Unsupported(
                "an inpainting UNet as the refiner of an ensemble".into(),
            ));
        }
        let first_steps = self
            .plan(params, &*base.scheduler, None, Some(refiner_start))
            .1
            .len();
        let last_steps = refiner
            .plan(params, &*second.scheduler, Some(refiner_start), None)
            .1
            .len();
        let total = first_steps + last_steps;
        let first = Phase {
            start: None,
            end: Some(refiner_start),
            offset: 0,
            total,
        };
        let handed = self.denoise(params, base, &first, &mut on_step, cancelled)?;
        // The base's part is done: its UNet need not stay resident beside the refiner's.
        self.unet.release_mapped_weights();
        let second_phase = Phase {
            start: Some((&handed.latents, refiner_start)),
            end: None,
            offset: first_steps,
            total,
        };
        let run = refiner.denoise(params, second, &second_phase, &mut on_step, cancelled)?;
        drop(handed);
        refiner.decode_run(run, params, cancelled)
    }

    /// Which of the scheduler's timesteps a run takes, and the index of the first: editing
    /// skips the first ones by strength (diffusers' `get_timesteps`), a handed-over phase
    /// begins where `denoising_start` puts it, and `denoising_end` stops early (diffusers'
    /// cut-offs, `round(T - fraction * T)`, with its second-order adjustment).
    fn plan(
        &self,
        params: &GenerateParams,
        scheduler: &dyn Scheduler,
        start: Option<f64>,
        end: Option<f64>,
    ) -> (usize, Vec<f64>) {
        let all = scheduler.timesteps();
        let order = scheduler.order();
        let train = self.scheduler_config.num_train_timesteps.unwrap_or(1000) as f64;
        let cutoff = |fraction: f64| (train - fraction * train).round_ties_even();
        let begin = match (start, params.init_image.is_some()) {
            (Some(fraction), _) => {
                let cutoff = cutoff(fraction);
                let mut n = all.iter().filter(|&&t| t < cutoff).count();
                if order == 2 && n % 2 == 0 {
                    n += 1;
                }
                all.len().saturating_sub(n)
            }
            (None, true) => {
                let strength = self.strength(params);
                let init_steps = ((params.steps as f64 * strength) as usize).min(params.steps);
                ((params.steps - init_steps) * order).min(all.len())
            }
            (None, false) => 0,
        };
        let mut timesteps = all[begin..].to_vec();
        if let Some(fraction) = end {
            let cutoff = cutoff(fraction);
            let n = timesteps.iter().filter(|&&t| t >= cutoff).count();
            timesteps.truncate(n);
        }
        (begin, timesteps)
    }

    /// The strength of an editing request: the caller's, else diffusers' default for the mode
    /// and the model family.
    pub fn strength(&self, params: &GenerateParams) -> f64 {
        params
            .strength
            .unwrap_or(match (params.mask.is_some(), self.sdxl.is_some()) {
                // diffusers' defaults: SD's Inpaint / Img2Img, then SDXL's.
                (true, false) => 1.0,
                (false, false) => 0.8,
                (true, true) => 0.9999,
                (false, true) => 0.3,
            })
    }

    /// The denoising loop of one phase (see [`Phase`]), up to the final latents.
    fn denoise(
        &self,
        params: &GenerateParams,
        validated: Validated,
        phase: &Phase,
        on_step: &mut Option<&mut dyn FnMut(&StepInfo) -> Control>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Denoised> {
        let Validated {
            width,
            height,
            mut scheduler,
            fallback,
            adapters,
        } = validated;
        self.report_unused_embeddings();
        // The call's LoRAs, on this thread, for every layer that runs until the latents are
        // done (the text encoders and the UNet).
        let _adapters = adapters::activate(adapters);
        let _wrap = blocks::wrap_around(params.seamless);
        crate::runtime::use_threads(self.num_threads)?;
        if let Some(why) = fallback {
            self.log(LogLevel::Warn, || why);
        }
        let stop = || -> Result<()> {
            if cancelled() {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        };
        stop()?;
        let _no_grad = tch::no_grad_guard();

        let batch = params.batch as i64;
        let vsf = self.vae_scale_factor();
        let latent_c = self.vae.latent_channels();
        let shape = vec![batch, latent_c, height / vsf, width / vsf];
        let single = vec![1, latent_c, height / vsf, width / vsf];
        let handed = phase.start.map(|(latents, _)| latents);
        if let Some(latents) = handed {
            if latents.size() != shape {
                return Err(Error::invalid(format!(
                    "handed-over latents of shape {:?}, expected {shape:?}",
                    latents.size()
                )));
            }
        }

        // The editing inputs, at the output size.
        let init = match &params.init_image {
            Some(img) => Some(self.image_to_tensor(&img.resized(width as u32, height as u32)?)?),
            None => None,
        };
        stop()?;
        let mask = match &params.mask {
            Some(m) => Some(mask_to_tensor(
                &m.resized(width as u32, height as u32)?,
                self.device,
                self.kind,
            )?),
            None => None,
        };
        stop()?;
        let inpaint_unet = self.unet.in_channels() != latent_c;

        let (begin, timesteps) =
            self.plan(params, &*scheduler, phase.start.map(|(_, f)| f), phase.end);
        if begin > 0 || handed.is_some() {
            scheduler.set_begin_index(begin);
        }
        // The noise level an edit starts from: the first timestep after the strength cut,
        // whatever `denoising_end` keeps (as diffusers takes it before that cut).
        let first_timestep = scheduler.timesteps().get(begin).copied();
        if let (Some(init), None) = (&init, handed) {
            if first_timestep.is_none() {
                // Nothing to denoise: the encoded-decoded input (posterior mean).
                let z = self
                    .vae
                    .scale_latents(&self.encode_image(init, params, &stop)?.mean)?;
                stop()?;
                return Ok(Denoised {
                    latents: z.f_repeat([batch, 1, 1, 1])?,
                    mask,
                    init: Some(init.shallow_clone()),
                });
            }
        }
        let strength_max = init.is_none() || (mask.is_some() && self.strength(params) >= 1.0);

        // All noise of the run, drawn up front in diffusers' order. A handed-over phase draws
        // nothing to start from (its latents are already noisy), but inpainting draws the
        // noise that re-noises the known region.
        let mut shapes = Vec::new();
        let needs_image_latents = handed.is_none()
            && init.is_some()
            && (mask.is_none() || !inpaint_unet || !strength_max);
        if needs_image_latents {
            shapes.push(single.clone());
        }
        if handed.is_none() || mask.is_some() {
            shapes.push(shape.clone());
        }
        if mask.is_some() && handed.is_none() {
            shapes.push(single.clone());
        }
        shapes.extend(std::iter::repeat(shape.clone()).take(scheduler.noise_draws()));
        stop()?;
        let mut noise_source = PredrawnNoise::draw(params.seed, &shapes, self.kind, self.device)?;

        let image_latents = match (&init, needs_image_latents) {
            (Some(init), true) => {
                let z = self
                    .encode_image(init, params, &stop)?
                    .sample(&mut noise_source)?;
                Some(self.vae.scale_latents(&z)?.f_repeat([batch, 1, 1, 1])?)
            }
            // diffusers' inpainting takes handed-over latents as its image latents.
            _ => handed.filter(|_| mask.is_some()).map(|l| l.shallow_clone()),
        };
        stop()?;
        let noise = match (handed, &mask) {
            (Some(_), None) => None,
            _ => Some(noise_source.randn(&shape)?),
        };
        let mut latents = match (handed, &image_latents, &noise, strength_max) {
            (Some(latents), _, _, _) => latents.shallow_clone(),
            (None, Some(z0), Some(noise), false) => {
                let t = first_timestep
                    .ok_or_else(|| Error::Internal("an edit without timesteps".into()))?;
                scheduler.add_noise(z0, noise, t)?
            }
            (None, _, Some(noise), _) => noise.f_mul_scalar(scheduler.init_noise_sigma())?,
            (None, _, None, _) => return Err(Error::Internal("no initial noise".into())),
        };

        // Inpainting conditions: the mask at latent size and the masked image's latents.
        let mut inpaint = None;
        if let (Some(init), Some(mask)) = (&init, &mask) {
            let small = mask
                .f_upsample_nearest2d([height / vsf, width / vsf], None, None)?
                .f_repeat([batch, 1, 1, 1])?;
            let masked_latents = if handed.is_none() {
                let keep = mask.f_lt(0.5)?.f_to_kind(self.kind)?;
                let masked = init.f_mul(&keep)?;
                let z = self.vae.scale_latents(
                    &self
                        .encode_image(&masked, params, &stop)?
                        .sample(&mut noise_source)?,
                )?;
                stop()?;
                Some(z.f_repeat([batch, 1, 1, 1])?)
            } else {
                None
            };
            inpaint = Some((small, masked_latents));
        }

        let cfg = params.guidance > 1.0;
        let editing = init.is_some() || handed.is_some();
        let context = {
            // Their pages go after the encode anyway; layer by layer, the encoders are never
            // resident whole beside a UNet held in memory.
            let _layers = crate::models::clip::release_layers_as_they_run();
            self.text_context(params, cfg, width, height, editing, &stop)
        };
        // The text encoders are done whatever the outcome (see `release_idle_weights`).
        self.release_text_encoders();
        let (context, added) = context?;
        stop()?;
        let double = |t: &Tensor| -> Result<Tensor> {
            Ok(if cfg {
                Tensor::f_cat(&[t, t], 0)?
            } else {
                t.shallow_clone()
            })
        };
        let unet_extra = match (&inpaint, inpaint_unet) {
            (Some((m, Some(z))), true) => Some((double(m)?, double(z)?)),
            (Some((_, None)), true) => {
                return Err(Error::Unsupported(
                    "an inpainting UNet continuing handed-over latents".into(),
                ))
            }
            _ => None,
        };

        let fast = params.fast;
        let mut cache = (fast.cache_interval > 1).then(|| DeepCache::new(fast.cache_branch));
        let mut unet_calls = 0usize;
        for (i, &t) in timesteps.iter().enumerate() {
            stop()?;
            let mut model_input = scheduler.scale_model_input(&double(&latents)?, t)?;
            if let Some((m, z)) = &unet_extra {
                model_input = Tensor::f_cat(&[&model_input, m, z], 1)?;
            }
            let mut pass = FastPass {
                cache: cache
                    .as_mut()
                    .map(|c| (c, unet_calls % fast.cache_interval.max(1) != 0)),
                token_merging: (fast.token_merging > 0.0).then_some(TokenMerging {
                    ratio: fast.token_merging,
                    seed: params.seed.wrapping_add(unet_calls as u64),
                }),
                int8_linear: fast.int8_linear,
            };
            unet_calls += 1;
            let mut pred =
                self.unet
                    .forward_fast(&model_input, t, &context, added.as_ref(), &mut pass)?;
            if cfg {
                let parts = pred.f_chunk(2, 0)?;
                let (uncond, cond) = (&parts[0], &parts[1]);
                pred = uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(params.guidance)?)?;
                if params.guidance_rescale > 0.0 {
                    pred = rescale_guidance(&pred, cond, params.guidance_rescale)?;
                }
            }
            latents = scheduler.step(&pred, t, &latents, &mut noise_source)?;
            // An ordinary UNet inpaints by putting back the known region, noised to the level
            // of the next step.
            if let (Some((m, _)), false, Some(z0), Some(noise)) =
                (&inpaint, inpaint_unet, &image_latents, &noise)
            {
                let known = match timesteps.get(i + 1) {
                    Some(&next) => scheduler.add_noise(z0, noise, next)?,
                    None => z0.shallow_clone(),
                };
                latents = known
                    .f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?
                    .f_add(&m.f_mul(&latents)?)?;
            }
            if let Some(cb) = on_step.as_mut() {
                let info = StepInfo {
                    step: phase.offset + i + 1,
                    total: if phase.total == 0 {
                        timesteps.len()
                    } else {
                        phase.total
                    },
                    timestep: t,
                    latents: &latents,
                    tiny_vae: self.tiny_vae.as_ref(),
                };
                if cb(&info) == Control::Cancel {
                    return Err(Error::Cancelled);
                }
            }
        }
        stop()?;
        drop((cache, context, added, unet_extra));
        Ok(Denoised {
            latents,
            mask,
            init,
        })
    }

    /// Decodes a finished run (see [`StableDiffusion::finish`]).
    fn decode_run(
        &self,
        run: Denoised,
        params: &GenerateParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        // The loop is over: the decode need not run beside the UNet's weights.
        self.unet.release_mapped_weights();
        let _phase = crate::runtime::one_off_phase();
        let _wrap = blocks::wrap_around(params.seamless);
        self.finish(
            &run.latents,
            params,
            run.mask.as_ref(),
            run.init.as_ref(),
            cancelled,
        )
    }

    /// Drops the resident pages of the weights that its parts use in place from their weight
    /// files (see [`crate::weights::MappedWeights`]; weights copied or packed in memory stay).
    /// A call does it part by part as each part's work is done: the text encoders once the
    /// conditioning is made, the UNet when the loop is over, the VAE after each decode or
    /// encode. So only the UNet's weights are resident through the loop (an SD 1.5 folder in
    /// float32 holds 0.6 GiB less; SDXL's text encoders are 3.3 GiB), and the decode does not
    /// run beside a UNet used in place (SDXL's, 9.6 GiB). The pages read back from the page
    /// cache at the next call (about 20 ms per 470 MiB). For callers that run the parts
    /// themselves ([`StableDiffusion::encode_prompt`]), or that go idle.
    pub fn release_idle_weights(&self) {
        self.release_text_encoders();
        self.unet.release_mapped_weights();
        self.vae.release_mapped_weights();
    }

    fn release_text_encoders(&self) {
        for (_, encoder) in self.encoders() {
            encoder.release_mapped_weights();
        }
    }

    /// Prompt embeddings, preceded by the negative prompt's when guidance is on, and SDXL's
    /// added conditions in the same order.
    fn text_context(
        &self,
        params: &GenerateParams,
        cfg: bool,
        width: i64,
        height: i64,
        editing: bool,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<(Tensor, Option<AddedConditions>)> {
        if let Some(sdxl) = &self.sdxl {
            return self.sdxl_context(sdxl, params, cfg, width, height, editing, stop);
        }
        if params.prompt_syntax == PromptSyntax::A1111 {
            return self.a1111_context(params, cfg, stop);
        }
        if !cfg {
            let cond = self.encode_prompt(&params.prompt, params.batch, params.clip_skip)?;
            return Ok((cond, None));
        }
        stop()?;
        let negative = params.negative_prompt.as_deref().unwrap_or("");
        let both =
            self.encode_prompt_pair(&params.prompt, negative, params.batch, params.clip_skip)?;
        Ok((both, None))
    }

    /// [`StableDiffusion::text_context`] for SD 1.x/2.x with A1111's prompt syntax: the prompt
    /// and the negative prompt in chunks, padded to the same count, weighted and joined.
    fn a1111_context(
        &self,
        params: &GenerateParams,
        cfg: bool,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<(Tensor, Option<AddedConditions>)> {
        let tokenizer = &self.tokenizer;
        let all = self.token_embeddings();
        let embeddings = all.of(0);
        let positive = without_tags(&params.prompt);
        let mut cond = prompt::prompt_chunks(tokenizer, &positive, "prompt", embeddings)?;
        let negative = params.negative_prompt.as_deref().unwrap_or("");
        let mut uncond = prompt::prompt_chunks(tokenizer, negative, "negative prompt", embeddings)?;
        if cfg {
            let count = cond.len().max(uncond.len());
            prompt::pad_chunks(tokenizer, &mut cond, count);
            prompt::pad_chunks(tokenizer, &mut uncond, count);
        }
        let b = params.batch as i64;
        let encoder = (self.text_encoder.as_ref(), embeddings);
        let cond = self
            .encode_weighted(encoder, &cond, params.clip_skip, false)?
            .0;
        let cond = cond.f_repeat([b, 1, 1])?;
        if !cfg {
            return Ok((cond, None));
        }
        stop()?;
        // As with plain prompts, clip_skip applies to the prompt only.
        let uncond = self.encode_weighted(encoder, &uncond, 0, false)?.0;
        Ok((
            Tensor::f_cat(&[uncond.f_repeat([b, 1, 1])?, cond], 0)?,
            None,
        ))
    }

    /// SDXL's conditioning `(states, pooled)` of a prompt pair `(prompt, prompt_2, clip_skip)`
    /// read with A1111's syntax, and of the negative pair when given, each repeated `batch`
    /// times: every list of chunks padded to the longest, each encoder's chunks weighted and
    /// joined, the two encoders' states side by side, the pooled output of the second
    /// encoder's first chunk. The refiner's one encoder reads the first text of each pair.
    fn sdxl_a1111(
        &self,
        sdxl: &SdxlText,
        positive: (&str, &str, usize),
        negative: Option<(&str, &str, usize)>,
        batch: usize,
    ) -> Result<((Tensor, Tensor), Option<(Tensor, Tensor)>)> {
        let first = (&self.tokenizer, self.text_encoder.as_ref());
        let encoders: Vec<(&ClipTokenizer, &dyn TextEncoder)> = match &sdxl.second {
            Some((tokenizer_2, encoder_2)) => vec![first, (tokenizer_2, encoder_2.as_ref())],
            None => vec![first],
        };
        let pairs: Vec<(&str, &str, usize)> = std::iter::once(positive).chain(negative).collect();
        let all = self.token_embeddings();
        let mut chunks = Vec::new();
        for (i, (text, text_2, _)) in pairs.iter().enumerate() {
            let what = if i == 0 { "prompt" } else { "negative prompt" };
            let mut per_encoder = Vec::new();
            for (e, (tokenizer, _)) in encoders.iter().enumerate() {
                let text = if e == 0 { text } else { text_2 };
                let what = if e == 0 {
                    what.to_string()
                } else {
                    format!("{what} 2")
                };
                let embeddings = all.of(e);
                per_encoder.push(prompt::prompt_chunks(tokenizer, text, &what, embeddings)?);
            }
            chunks.push(per_encoder);
        }
        let count = chunks.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let b = batch as i64;
        let mut encoded = Vec::new();
        for (per_encoder, &(_, _, clip_skip)) in chunks.iter_mut().zip(&pairs) {
            let mut states = Vec::new();
            let mut pooled = None;
            for (e, (list, (tokenizer, encoder))) in
                per_encoder.iter_mut().zip(&encoders).enumerate()
            {
                prompt::pad_chunks(tokenizer, list, count);
                let encoder = (*encoder, all.of(e));
                let (hidden, p) = self.encode_weighted(encoder, list, clip_skip, true)?;
                states.push(hidden);
                pooled = p;
            }
            let pooled = pooled
                .ok_or_else(|| Error::Internal("the text encoder gave no pooled output".into()))?;
            encoded.push((
                Tensor::f_cat(&states, -1)?.f_repeat([b, 1, 1])?,
                pooled.f_repeat([b, 1])?,
            ));
        }
        let negative = (encoded.len() > 1).then(|| encoded.pop()).flatten();
        let positive = encoded
            .pop()
            .ok_or_else(|| Error::Internal("no prompt was encoded".into()))?;
        Ok((positive, negative))
    }

    /// Chunks of a prompt read with A1111's syntax through `encoder`: each chunk's hidden
    /// states (the last layer's after `clip_skip`, or SDXL's penultimate ones when `sdxl`) with
    /// its tokens' weights applied, joined along the tokens into `[1, 77 * chunks, dim]`; for
    /// SDXL also the first chunk's pooled output, as A1111 takes it.
    fn encode_weighted(
        &self,
        (encoder, embeddings): (&dyn TextEncoder, &[TokenEmbedding]),
        chunks: &[prompt::PromptChunk],
        clip_skip: usize,
        sdxl: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut states = Vec::with_capacity(chunks.len());
        let mut pooled = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let ids = Tensor::f_from_slice(&chunk.tokens)?
                .f_unsqueeze(0)?
                .f_to_device(self.device)?;
            let fixes = chunk_fixes(chunk, embeddings);
            let hidden = if sdxl {
                let out = encoder.forward_penultimate_fixed(&ids, &fixes, clip_skip, i == 0)?;
                if i == 0 {
                    pooled = out.pooled;
                }
                out.hidden
            } else {
                encoder.forward_fixed(&ids, &fixes, clip_skip)?
            };
            states.push(prompt::apply_emphasis(&hidden, &chunk.weights)?);
        }
        Ok((Tensor::f_cat(&states, 1)?, pooled))
    }

    /// SDXL's conditioning, as diffusers' StableDiffusionXLPipeline: both prompts' embeddings,
    /// the pooled embedding and the micro-conditioning time ids, unconditional first.
    fn sdxl_context(
        &self,
        sdxl: &SdxlText,
        params: &GenerateParams,
        cfg: bool,
        width: i64,
        height: i64,
        editing: bool,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<(Tensor, Option<AddedConditions>)> {
        let batch = params.batch;
        let prompt_2 = params.prompt_2.as_deref().unwrap_or(&params.prompt);
        let zero_negative = params.negative_prompt.is_none() && sdxl.force_zeros_for_empty_prompt;
        let negative = params.negative_prompt.as_deref().unwrap_or("");
        let negative_2 = params.negative_prompt_2.as_deref().unwrap_or(negative);
        let mut a1111_negative = None;
        let (context, pooled) = if params.prompt_syntax == PromptSyntax::A1111 {
            let (prompt, prompt_2) = (without_tags(&params.prompt), without_tags(prompt_2));
            let texts = (&prompt[..], &prompt_2[..], params.clip_skip);
            // As with plain prompts, clip_skip applies to the prompt only.
            let negatives = (cfg && !zero_negative).then_some((negative, negative_2, 0));
            let (positive, negative) = self.sdxl_a1111(sdxl, texts, negatives, batch)?;
            a1111_negative = negative;
            positive
        } else {
            self.encode_prompt_sdxl(&params.prompt, prompt_2, batch, params.clip_skip)?
        };
        let (positive_ids, negative_ids) =
            params
                .micro
                .time_ids(height, width, sdxl.requires_aesthetics_score, editing);
        let time_ids = |ids: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&ids)?
                .f_to_kind(self.kind)?
                .f_to_device(self.device)?
                .f_unsqueeze(0)?
                .f_repeat([batch as i64, 1])?)
        };
        let positive = AddedConditions {
            text_embeds: pooled,
            time_ids: time_ids(positive_ids)?,
        };
        if !cfg {
            return Ok((context, Some(positive)));
        }
        stop()?;
        let (negative_context, negative_pooled) = if zero_negative {
            (
                context.f_zeros_like()?,
                positive.text_embeds.f_zeros_like()?,
            )
        } else if let Some(encoded) = a1111_negative {
            encoded
        } else {
            // As for SD 1.x, clip_skip applies to the prompt only.
            self.encode_prompt_sdxl(negative, negative_2, batch, 0)?
        };
        let negative = AddedConditions {
            text_embeds: negative_pooled,
            time_ids: time_ids(negative_ids)?,
        };
        Ok((
            Tensor::f_cat(&[negative_context, context], 0)?,
            Some(AddedConditions::cat(&[&negative, &positive])?),
        ))
    }

    /// Decodes, then (inpainting with `paste_back`) restores the original pixels outside the mask.
    fn finish(
        &self,
        latents: &Tensor,
        params: &GenerateParams,
        mask: Option<&Tensor>,
        init: Option<&Tensor>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        let images = self.decode_each(latents, params, cancelled)?;
        match (params.paste_back, mask, init) {
            (true, Some(mask), Some(init)) => {
                let to_hwc = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.f_permute([0, 2, 3, 1])?
                        .f_to_kind(Kind::Float)?
                        .f_to_device(Device::Cpu)?)
                };
                let m = to_hwc(&mask.f_ge(0.5)?.f_to_kind(Kind::Float)?)?;
                let original = to_hwc(
                    &init
                        .f_div_scalar(2.0)?
                        .f_add_scalar(0.5)?
                        .f_clamp(0.0, 1.0)?,
                )?;
                let pixels = original
                    .f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?
                    .f_add(&images.pixels.f_mul(&m)?)?;
                Ok(Images {
                    pixels: pixels.f_contiguous()?,
                })
            }
            _ => Ok(images),
        }
    }

    /// RGB bytes to `[1, 3, h, w]` in [-1, 1] (diffusers' `x / 255 * 2 - 1`).
    fn image_to_tensor(&self, img: &Image) -> Result<Tensor> {
        let t = Tensor::f_from_slice(&img.rgb)?
            .f_view([img.height as i64, img.width as i64, 3])?
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255.0)?
            .f_mul_scalar(2.0)?
            .f_sub_scalar(1.0)?;
        Ok(t.f_to_device(self.device)?
            .f_to_kind(self.kind)?
            .f_contiguous()?)
    }

    /// [`StableDiffusion::decode_latents_for`] one image at a time, asking `cancelled` before
    /// each (and before each tile).
    fn decode_each(
        &self,
        latents: &Tensor,
        params: &GenerateParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        let batch = latents.size().first().copied().unwrap_or(0);
        let mut parts = Vec::with_capacity(batch.max(0) as usize);
        for i in 0..batch {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let one = latents.f_narrow(0, i, 1)?;
            parts.push(self.decode_latents_for(&one, params, cancelled)?.pixels);
        }
        Ok(Images {
            pixels: Tensor::f_cat(&parts, 0)?,
        })
    }

    /// Latents (as the UNet sees them) to images in [0, 1], `[batch, h, w, 3]` on the CPU, with
    /// the VAE, untiled unless the image is large ([`VaeTiling::Auto`]).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Images> {
        self.decode_latents_for(latents, &GenerateParams::default(), &|| false)
    }

    /// [`StableDiffusion::decode_latents`] as `params` asks: with the tiny autoencoder, or the
    /// VAE in tiles or whole.
    pub fn decode_latents_for(
        &self,
        latents: &Tensor,
        params: &GenerateParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Images> {
        let _no_grad = tch::no_grad_guard();
        let images = if params.tiny_vae_decode {
            let tiny = self.tiny_vae.as_ref().ok_or_else(no_tiny_vae)?;
            tiny_decode(tiny, latents)?
        } else {
            let stop = || {
                if cancelled() {
                    Err(Error::Cancelled)
                } else {
                    Ok(())
                }
            };
            self.vae_decode(&self.vae.unscale_latents(latents)?, params, &stop)?
        };
        Ok(Images {
            pixels: to_unit_pixels(&images)?,
        })
    }

    /// The VAE's decode of unscaled latents `z` to images in about [-1, 1], in tiles when
    /// `params` asks ([`GenerateParams::vae_tiling`]); `stop` is asked before each tile.
    pub fn vae_decode(
        &self,
        z: &Tensor,
        params: &GenerateParams,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<Tensor> {
        vae_decode_with(self.vae.as_ref(), z, params, stop)
    }

    /// The VAE's distribution over the latents of `images` (`[b, 3, h, w]` in [-1, 1]), in
    /// tiles when `params` asks (see [`vae_encode_with`]).
    pub fn encode_image(
        &self,
        images: &Tensor,
        params: &GenerateParams,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<DiagonalGaussian> {
        vae_encode_with(self.vae.as_ref(), images, params, stop)
    }
}

/// `vae`'s decode of unscaled latents `z` to images in about [-1, 1], in tiles when `params`
/// asks; `stop` is asked before each tile. What a pipeline's decode runs, for a VAE loaded
/// alone ([`load_vae`]). Of `params` only [`GenerateParams::vae_tiling`],
/// [`GenerateParams::vae_tile_size`] and `seamless` (auto never tiles a seamless image) are
/// read; the convolutions wrap around only where the caller installed
/// [`crate::models::blocks::wrap_around`].
pub fn vae_decode_with(
    vae: &dyn Autoencoder,
    z: &Tensor,
    params: &GenerateParams,
    stop: &dyn Fn() -> Result<()>,
) -> Result<Tensor> {
    let size = z.size();
    if size.len() != 4 {
        return Err(Error::invalid(format!(
            "latents must be [batch, channels, height, width], got {size:?}"
        )));
    }
    let _phase = crate::runtime::one_off_phase();
    let scale = vae.spatial_scale();
    let decoded = match vae_tile(vae, params, size[2] * scale, size[3] * scale)? {
        Some(tile) => {
            let tiles = Tiles {
                tile_in: tile / scale,
                tile_out: tile,
            };
            tiles.run(z, |t| vae.decode(t), stop)
        }
        None => vae.decode(z),
    };
    vae.release_mapped_weights();
    decoded
}

/// `vae`'s distribution over the latents of `images` (`[b, 3, h, w]` in [-1, 1]), in tiles
/// when `params` asks (the moments of overlapping tiles blended as diffusers'
/// `_tiled_encode` blends them).
pub fn vae_encode_with(
    vae: &dyn Autoencoder,
    images: &Tensor,
    params: &GenerateParams,
    stop: &dyn Fn() -> Result<()>,
) -> Result<DiagonalGaussian> {
    let size = images.size();
    if size.len() != 4 {
        return Err(Error::invalid(format!(
            "images must be [batch, 3, height, width], got {size:?}"
        )));
    }
    let _phase = crate::runtime::one_off_phase();
    let encoded = match vae_tile(vae, params, size[2], size[3])? {
        None => vae.encode(images),
        Some(tile) => {
            let tiles = Tiles {
                tile_in: tile,
                tile_out: tile / vae.spatial_scale(),
            };
            tiles
                .run(
                    images,
                    |t| {
                        let d = vae.encode(t)?;
                        Ok(Tensor::f_cat(&[d.mean, d.logvar], 1)?)
                    },
                    stop,
                )
                .and_then(|moments| DiagonalGaussian::from_moments(&moments))
        }
    };
    vae.release_mapped_weights();
    encoded
}

/// The tile side in pixels when an `h` x `w` image goes through `vae` in tiles for this
/// call, `None` when it goes whole. A tile only pays where the image is larger than it
/// (diffusers' rule).
fn vae_tile(vae: &dyn Autoencoder, params: &GenerateParams, h: i64, w: i64) -> Result<Option<i64>> {
    let tiled = match params.vae_tiling {
        VaeTiling::Off => false,
        VaeTiling::On => true,
        VaeTiling::Auto => params.seamless.is_off() && h * w > AUTO_VAE_TILING_PIXELS,
    };
    if !tiled {
        return Ok(None);
    }
    let tile = vae_tile_size(params.vae_tile_size, vae.spatial_scale(), vae.sample_size())?;
    Ok((h > tile || w > tile).then_some(tile))
}

/// Decoder output in about [-1, 1] `[b, 3, h, w]` to pixels in [0, 1], `[b, h, w, 3]` float32
/// on the CPU.
fn to_unit_pixels(images: &Tensor) -> Result<Tensor> {
    Ok(images
        .f_div_scalar(2.0)?
        .f_add_scalar(0.5)?
        .f_clamp(0.0, 1.0)?
        .f_permute([0, 2, 3, 1])?
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?)
}

/// The tiny autoencoder's decode of latents as the UNet sees them (diffusers divides by its
/// `scaling_factor`, 1.0 for TAESD).
fn tiny_decode(tiny: &AutoencoderTiny, latents: &Tensor) -> Result<Tensor> {
    let z = latents
        .f_to_kind(Kind::Float)?
        .f_div_scalar(tiny.config().scaling_factor)?;
    tiny.decode(&z.f_to_kind(tiny.kind())?)
}

fn no_tiny_vae() -> Error {
    Error::invalid(
        "tiny_vae_decode asks for the tiny autoencoder, but none was loaded (LoadOptions::tiny_vae, \
         --tiny-vae, sd_load_options.tiny_vae)",
    )
}

/// A prompt (or negative prompt) must fit in [`MAX_PROMPT_BYTES`]; `what` names it.
pub fn check_prompt(what: &str, text: &str) -> Result<()> {
    if text.len() > MAX_PROMPT_BYTES {
        return Err(Error::invalid(format!(
            "{what} is {} bytes: the limit is {MAX_PROMPT_BYTES} (CLIP reads {} tokens; the \
             rest of a long prompt is ignored anyway)",
            text.len(),
            crate::tokenizer::CLIP_MAX_LENGTH
        )));
    }
    Ok(())
}

/// `r * guided * std(cond) / std(guided) + (1 - r) * guided`, each standard deviation (with
/// Bessel's correction, as torch's `std`) taken per batch item over all its other dimensions:
/// diffusers' `rescale_noise_cfg`.
pub fn rescale_guidance(guided: &Tensor, cond: &Tensor, rescale: f64) -> Result<Tensor> {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std = |t: &Tensor| t.f_std_dim(dims.as_slice(), true, true);
    let rescaled = guided.f_mul(&std(cond)?.f_div(&std(guided)?)?)?;
    Ok(rescaled
        .f_mul_scalar(rescale)?
        .f_add(&guided.f_mul_scalar(1.0 - rescale)?)?)
}

/// What a pipeline checks before it runs a request, without the model itself (see
/// [`StableDiffusion::validator`]). Cheap to clone; `Send` and `Sync`.
#[derive(Debug, Clone)]
pub struct Validator {
    default_size: i64,
    vae_scale: i64,
    unet_in: i64,
    latent_channels: i64,
    text_layers: Option<usize>,
    /// The UNet's skip connections, `None` when it has no fast modes.
    skip_connections: Option<usize>,
    device: Device,
    kind: Kind,
    scheduler_config: SchedulerConfig,
    /// An SDXL refiner: it refines latents or an image, it does not start from text alone.
    refiner: bool,
    adapter_targets: Arc<AdapterTargets>,
    lora_dir: Option<PathBuf>,
    lora_cache: Arc<LoraCache>,
    token_embeddings: Arc<EncoderEmbeddings>,
    /// The tokenizers the prompts go through (SDXL's second one after the first), to check
    /// prompts read with A1111's syntax as encoding will.
    tokenizers: Vec<ClipTokenizer>,
    /// Whether the UNet's and the VAE's convolutions can wrap around (seamless tiling).
    wraps_around: bool,
    /// The VAE's `sample_size`, its tile side by default, when known.
    vae_sample_size: Option<i64>,
    /// Whether a tiny autoencoder with a decoder is loaded.
    tiny_decoder: bool,
}

/// A request [`Validator::validate`] accepted: its output size and its scheduler, ready to
/// run (eta and timesteps set).
pub struct Validated {
    pub width: i64,
    pub height: i64,
    pub scheduler: Box<dyn Scheduler>,
    /// Why the model's own scheduler could not be used (DDIM with its settings runs instead).
    pub fallback: Option<String>,
    /// The call's LoRAs, bound to the model's layers.
    pub adapters: Option<Arc<ActiveAdapters>>,
}

impl Validator {
    /// Every check of a complete request that needs no model run: prompt lengths, the size
    /// (resolved against the init image and the model's native size), steps, batch, the
    /// numbers, strength, the images, the model kind, clip_skip, and the scheduler (its name,
    /// eta and step count). The errors name the parameter at fault.
    pub fn validate(&self, p: &GenerateParams) -> Result<Validated> {
        self.validate_phase(p, false)
    }

    /// [`Validator::validate`] for a run that may continue latents handed over by another
    /// model (`handed_over`), which a refiner accepts without an init image.
    /// The LoRAs a request applies, each with the name it goes by (a tag's name, or a file's
    /// stem): its `<lora:NAME:W>` tags' (read with A1111's syntax), then its `loras`.
    pub fn requested_loras(&self, p: &GenerateParams) -> Result<Vec<(String, LoraWeight)>> {
        let mut loras = Vec::new();
        if p.prompt_syntax == PromptSyntax::A1111 {
            let mut texts = vec![(&p.prompt[..], "prompt")];
            if let Some(prompt_2) = &p.prompt_2 {
                texts.push((prompt_2, "prompt 2"));
            }
            for (text, what) in texts {
                for tag in prompt::lora_tags(text, what)? {
                    let dir = p
                        .lora_dir
                        .as_ref()
                        .or(self.lora_dir.as_ref())
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "{what} names the LoRA `{}` (<lora:...>) but no LoRA folder was \
                             given (lora_dir)",
                                tag.name
                            ))
                        })?;
                    let lora = self.lora_cache.by_name(dir, &tag.name)?;
                    let weight = LoraWeight {
                        lora,
                        unet: tag.unet,
                        text: tag.text,
                    };
                    loras.push((tag.name, weight));
                }
            }
        }
        loras.extend(
            p.loras
                .iter()
                .map(|w| (w.lora.name().to_string(), w.clone())),
        );
        Ok(loras)
    }

    /// The request's LoRAs bound to this model's layers.
    fn bind_loras(&self, p: &GenerateParams) -> Result<Option<Arc<ActiveAdapters>>> {
        let loras: Vec<LoraWeight> = self
            .requested_loras(p)?
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        self.adapter_targets.bind(&loras, self.kind, self.device)
    }

    /// Prompts read with A1111's syntax, each through the tokenizer that will read it: weights
    /// that overflow and prompts over the chunk limit are refused here, before a run, with the
    /// names encoding uses.
    fn check_a1111_prompts(&self, p: &GenerateParams) -> Result<()> {
        let negative = p.negative_prompt.as_deref().unwrap_or("");
        // (encoder, text as encoded, name in errors)
        let mut texts = Vec::new();
        if !self.tokenizers.is_empty() {
            texts.push((0, without_tags(&p.prompt), "prompt"));
            texts.push((0, negative.to_string(), "negative prompt"));
        }
        if self.tokenizers.len() > 1 {
            let prompt_2 = p.prompt_2.as_deref().unwrap_or(&p.prompt);
            texts.push((1, without_tags(prompt_2), "prompt 2"));
            let negative_2 = p.negative_prompt_2.as_deref().unwrap_or(negative);
            texts.push((1, negative_2.to_string(), "negative prompt 2"));
        }
        for (e, text, what) in texts {
            let embeddings = self.token_embeddings.of(e);
            prompt::prompt_chunks(&self.tokenizers[e], &text, what, embeddings)?;
        }
        Ok(())
    }

    pub fn validate_phase(&self, p: &GenerateParams, handed_over: bool) -> Result<Validated> {
        if self.refiner && p.init_image.is_none() && !handed_over {
            return Err(Error::invalid(
                "this model is an SDXL refiner: it refines an image (img2img, inpainting) or a \
                 base model's latents (a refiner with refiner_start), it does not generate \
                 from text alone",
            ));
        }
        check_prompt("prompt", &p.prompt)?;
        if let Some(negative) = &p.negative_prompt {
            check_prompt("negative prompt", negative)?;
        }
        if let Some(prompt_2) = &p.prompt_2 {
            check_prompt("prompt_2", prompt_2)?;
        }
        if let Some(negative_2) = &p.negative_prompt_2 {
            check_prompt("negative prompt_2", negative_2)?;
        }
        if p.prompt_syntax == PromptSyntax::A1111 {
            self.check_a1111_prompts(p)?;
        }
        p.micro.validate()?;
        // Editing modes take their default size from the init image, rounded down to 8.
        let from_image = |side: u32| (side as i64) / 8 * 8;
        let width = p
            .width
            .or(p.init_image.as_ref().map(|i| from_image(i.width)))
            .unwrap_or(self.default_size);
        let height = p
            .height
            .or(p.init_image.as_ref().map(|i| from_image(i.height)))
            .unwrap_or(self.default_size);
        for (name, v) in [("width", width), ("height", height)] {
            if v <= 0 || v % 8 != 0 || v > MAX_SIDE {
                return Err(Error::invalid(format!(
                    "{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}{}",
                    if p.init_image.is_some() && (p.width.is_none() || p.height.is_none()) {
                        " (from the init image's size, rounded down to 8)"
                    } else {
                        ""
                    }
                )));
            }
            if v % self.vae_scale != 0 {
                return Err(Error::invalid(format!(
                    "{name} {v} is not a multiple of the VAE's scale factor {}",
                    self.vae_scale
                )));
            }
        }
        if p.steps == 0 || p.steps > MAX_STEPS {
            return Err(Error::invalid(format!(
                "steps must be in 1..={MAX_STEPS}, got {}",
                p.steps
            )));
        }
        if p.batch == 0 || p.batch > MAX_BATCH {
            return Err(Error::invalid(format!(
                "batch must be in 1..={MAX_BATCH}, got {}",
                p.batch
            )));
        }
        if !p.guidance.is_finite() {
            return Err(Error::invalid(format!(
                "guidance must be a finite number, got {}",
                p.guidance
            )));
        }
        if !(0.0..=1.0).contains(&p.guidance_rescale) {
            return Err(Error::invalid(format!(
                "guidance_rescale must be in [0, 1], got {}",
                p.guidance_rescale
            )));
        }
        if !p.eta.is_finite() || p.eta < 0.0 {
            return Err(Error::invalid(format!("eta must be >= 0, got {}", p.eta)));
        }
        if let Some(s) = p.strength {
            if !(0.0..=1.0).contains(&s) {
                return Err(Error::invalid(format!(
                    "strength must be in [0, 1], got {s}"
                )));
            }
        }
        for (what, image) in [("init image", &p.init_image), ("mask", &p.mask)] {
            if let Some(img) = image {
                let expected = img.width as usize * img.height as usize * 3;
                if img.width == 0 || img.height == 0 || img.rgb.len() != expected {
                    return Err(Error::invalid(format!(
                        "the {what} is {}x{} with {} bytes: expected {expected} bytes of RGB",
                        img.width,
                        img.height,
                        img.rgb.len()
                    )));
                }
            }
        }
        if p.mask.is_some() && p.init_image.is_none() {
            return Err(Error::invalid("a mask needs an init image to inpaint"));
        }
        let (unet_in, latent_c) = (self.unet_in, self.latent_channels);
        if unet_in == 2 * latent_c + 1 && p.mask.is_none() {
            return Err(Error::invalid(format!(
                "this is an inpainting model ({unet_in}-channel UNet): give an init image and a mask"
            )));
        }
        if unet_in != latent_c && unet_in != 2 * latent_c + 1 {
            return Err(Error::Unsupported(format!(
                "a UNet with {unet_in} input channels"
            )));
        }
        if let Some(layers) = self.text_layers {
            if p.clip_skip >= layers {
                return Err(Error::invalid(format!(
                    "clip_skip {} must be below the text encoder's {layers} layers",
                    p.clip_skip
                )));
            }
        }
        self.validate_fast(&p.fast)?;
        self.validate_decode(p)?;
        let (mut scheduler, fallback) = self.scheduler(p.scheduler.as_deref())?;
        scheduler.set_eta(p.eta)?;
        scheduler.set_timesteps(p.steps)?;
        // A refiner phase continues the base model's latents with the refiner as it is.
        let adapters = if handed_over {
            None
        } else {
            self.bind_loras(p)?
        };
        Ok(Validated {
            width,
            height,
            scheduler,
            fallback,
            adapters,
        })
    }

    /// Seamless tiling, VAE tiling and the tiny decoder: what the model can do, and the
    /// combinations that make sense.
    fn validate_decode(&self, p: &GenerateParams) -> Result<()> {
        if !p.seamless.is_off() && !self.wraps_around {
            return Err(Error::Unsupported(
                "seamless tiling needs the native UNet and VAE (a TorchScript module's \
                 convolutions cannot be told to wrap around)"
                    .into(),
            ));
        }
        if !p.seamless.is_off() && p.vae_tiling == VaeTiling::On {
            return Err(Error::invalid(format!(
                "seamless tiling ({}) with VAE tiling on: a VAE tile cannot see across the \
                 image's wrap-around edge, so the seam would come back; leave VAE tiling on \
                 auto (it stays off for seamless images) or off",
                p.seamless.name()
            )));
        }
        if p.vae_tile_size.is_some() {
            self.vae_tile_size(p.vae_tile_size)?;
        }
        if p.tiny_vae_decode && !self.tiny_decoder {
            return Err(no_tiny_vae());
        }
        Ok(())
    }

    /// [`vae_tile_size`] for this model's VAE.
    pub fn vae_tile_size(&self, asked: Option<i64>) -> Result<i64> {
        vae_tile_size(asked, self.vae_scale, self.vae_sample_size)
    }

    fn validate_fast(&self, f: &FastModes) -> Result<()> {
        if !(0.0..=MAX_TOKEN_MERGING).contains(&f.token_merging) {
            return Err(Error::invalid(format!(
                "token merging ratio must be in [0, {MAX_TOKEN_MERGING}], got {}",
                f.token_merging
            )));
        }
        if f.cache_interval > MAX_STEPS {
            return Err(Error::invalid(format!(
                "step cache interval must be in 0..={MAX_STEPS}, got {}",
                f.cache_interval
            )));
        }
        if f.is_exact() {
            return Ok(());
        }
        let Some(skips) = self.skip_connections else {
            return Err(Error::Unsupported(NEEDS_NATIVE_UNET.into()));
        };
        if f.int8_linear && (self.device != Device::Cpu || self.kind != Kind::Float) {
            return Err(Error::Unsupported(format!(
                "int8 linear layers need a float32 pipeline on the CPU, this one is {:?} on {:?}",
                self.kind, self.device
            )));
        }
        if f.cache_interval > 1 && f.cache_branch >= skips {
            return Err(Error::invalid(format!(
                "step cache branch must be below the UNet's {skips} skip connections, got {}",
                f.cache_branch
            )));
        }
        Ok(())
    }

    /// A fresh scheduler, as [`StableDiffusion::scheduler`], and the reason for a fallback.
    fn scheduler(&self, name: Option<&str>) -> Result<(Box<dyn Scheduler>, Option<String>)> {
        match name {
            Some(n) => Ok((
                schedulers::scheduler_from_name(n, &self.scheduler_config)?,
                None,
            )),
            None => match schedulers::scheduler_from_config(&self.scheduler_config) {
                Err(Error::Unsupported(why)) => Ok((
                    schedulers::scheduler_from_name("ddim", &self.scheduler_config)?,
                    Some(format!("{why}; using DDIM with its settings")),
                )),
                other => Ok((other?, None)),
            },
        }
    }
}

/// The VAE tile side in pixels for `asked` (`None`: the VAE's `sample_size`, rounded down
/// to a valid tile), for a VAE of `scale` pixels per latent cell, checked: a multiple of
/// [`LATENT_TILE_MULTIPLE`] latent cells, at least [`MIN_LATENT_TILE`], at most [`MAX_SIDE`].
pub fn vae_tile_size(asked: Option<i64>, scale: i64, sample_size: Option<i64>) -> Result<i64> {
    let multiple = LATENT_TILE_MULTIPLE * scale;
    let least = MIN_LATENT_TILE * scale;
    match asked {
        Some(t) if t < least || t % multiple != 0 || t > MAX_SIDE => Err(Error::invalid(format!(
            "vae_tile_size {t}: a VAE tile must be a multiple of {multiple} pixels \
             ({LATENT_TILE_MULTIPLE} latent cells), from {least} ({MIN_LATENT_TILE} \
             cells, the least this VAE decodes well) to {MAX_SIDE}"
        ))),
        Some(t) => Ok(t),
        None => {
            let native = sample_size.unwrap_or(64 * scale);
            Ok((native / multiple * multiple).clamp(least, MAX_SIDE / multiple * multiple))
        }
    }
}

/// A mask image to `[1, 1, h, w]` in {0, 1}: grey as PIL's `convert("L")`, then binarised at
/// 0.5 (diffusers' mask processor). White (1) marks what is repainted.
fn mask_to_tensor(img: &Image, device: Device, kind: Kind) -> Result<Tensor> {
    let grey: Vec<f32> = img
        .rgb
        .chunks_exact(3)
        .map(|p| {
            let l = (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
            if l as f32 / 255.0 < 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let t = Tensor::f_from_slice(&grey)?.f_view([1, 1, img.height as i64, img.width as i64])?;
    Ok(t.f_to_device(device)?.f_to_kind(kind)?)
}
