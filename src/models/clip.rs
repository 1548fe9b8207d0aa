//! The CLIP text transformer (transformers' `CLIPTextModel`) that conditions the UNet.
use super::adapters::{self, Targets};
use super::blocks::{collect_mapped, multi_head_attention, variable, LayerNorm, Linear};
use super::config::read_json;
use super::traits::EmbeddingFix;
use crate::limits::{
    check_finite, check_positive, MAX_CONFIG_CHANNELS, MAX_CONFIG_LAYERS, MAX_CONFIG_POSITIONS,
    MAX_CONFIG_VOCAB,
};
use crate::weights::MappedWeights;
use crate::{Error, Result};
use std::path::Path;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// The end-of-text id the pooled output is taken at. transformers' rule: with the legacy
    /// value 2 the position of the largest id (the end token has the largest id in CLIP's
    /// vocabulary), otherwise the first position holding this id.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<i64>,
    /// transformers' class names; `CLIPTextModelWithProjection` carries `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn d_vocab() -> i64 {
    49408
}
fn d_hidden() -> i64 {
    512
}
fn d_intermediate() -> i64 {
    2048
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    8
}
fn d_positions() -> i64 {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// Reads `text_encoder/config.json`; a full `CLIPModel` config's `text_config` is accepted too.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let text = value.get("text_config").cloned().unwrap_or(value);
        let cfg: Self = super::config::from_json_value(text, "text encoder config")
            .map_err(|msg| Error::BadModel(format!("{}: {msg}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let field = |name: &str| format!("text encoder config {name}");
        check_positive(&field("vocab_size"), self.vocab_size, MAX_CONFIG_VOCAB)?;
        check_positive(&field("hidden_size"), self.hidden_size, MAX_CONFIG_CHANNELS)?;
        check_positive(
            &field("intermediate_size"),
            self.intermediate_size,
            4 * MAX_CONFIG_CHANNELS,
        )?;
        check_positive(
            &field("num_hidden_layers"),
            self.num_hidden_layers,
            MAX_CONFIG_LAYERS,
        )?;
        check_positive(
            &field("num_attention_heads"),
            self.num_attention_heads,
            self.hidden_size,
        )?;
        check_positive(
            &field("max_position_embeddings"),
            self.max_position_embeddings,
            MAX_CONFIG_POSITIONS,
        )?;
        check_finite(&field("layer_norm_eps"), self.layer_norm_eps, false)?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::bad_model(format!(
                "text encoder hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Activation::parse(&self.hidden_act)?;
        if let Some(p) = self.projection_dim {
            check_positive(&field("projection_dim"), p, MAX_CONFIG_CHANNELS)?;
        }
        Ok(())
    }

    /// Whether the model is a `CLIPTextModelWithProjection` (a `text_projection` after the
    /// pooled output).
    pub fn has_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
    }

    fn projection_width(&self) -> i64 {
        self.projection_dim.unwrap_or(self.hidden_size)
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => Err(Error::Unsupported(format!(
                "text encoder hidden_act `{other}` (supported: quick_gelu, gelu)"
            ))),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => xs.f_mul(&xs.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            Self::Gelu => xs.f_gelu("none")?,
        })
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    act: Activation,
    /// Its weights that may be used in place, let go as soon as it has run while
    /// [`release_layers_as_they_run`] is in force.
    mapped: MappedWeights,
}

thread_local! {
    static RELEASE_LAYERS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, text encoders running on this thread let the pages of each
/// layer's in-place weights go as soon as that layer has run, so that an encoder is never
/// resident whole: a pipeline encodes this way when the encoder's pages would be let go after
/// the encode anyway, and a bf16 pipeline's UNet, a heap copy, stays resident beside it.
pub fn release_layers_as_they_run() -> super::blocks::FlagGuard {
    super::blocks::FlagGuard::set(&RELEASE_LAYERS, true)
}

impl EncoderLayer {
    fn new(vs: nn::Path, c: &ClipTextConfig, act: Activation) -> Self {
        let (mut layer, mapped) = collect_mapped(|| Self::build(vs, c, act));
        layer.mapped = mapped;
        layer
    }

    fn build(vs: nn::Path, c: &ClipTextConfig, act: Activation) -> Self {
        let d = c.hidden_size;
        let attn = &vs / "self_attn";
        Self {
            layer_norm1: LayerNorm::new(&vs / "layer_norm1", d, c.layer_norm_eps),
            q_proj: Linear::new(&attn / "q_proj", d, d, true),
            k_proj: Linear::new(&attn / "k_proj", d, d, true),
            v_proj: Linear::new(&attn / "v_proj", d, d, true),
            out_proj: Linear::new(&attn / "out_proj", d, d, true),
            layer_norm2: LayerNorm::new(&vs / "layer_norm2", d, c.layer_norm_eps),
            fc1: Linear::new(&vs / "mlp" / "fc1", d, c.intermediate_size, true),
            fc2: Linear::new(&vs / "mlp" / "fc2", c.intermediate_size, d, true),
            heads: c.num_attention_heads,
            act,
            mapped: MappedWeights::default(),
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let attn = multi_head_attention(
            &self.q_proj.forward(&h)?,
            &self.k_proj.forward(&h)?,
            &self.v_proj.forward(&h)?,
            self.heads,
            true,
        )?;
        let xs = xs.f_add(&self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        let out = xs.f_add(&h)?;
        if RELEASE_LAYERS.with(std::cell::Cell::get) {
            self.mapped.release();
        }
        Ok(out)
    }
}

/// `text_model.*` of a `CLIPTextModel`: token + position embeddings, causal transformer
/// layers, final layer norm.
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
    adapter_targets: Targets,
    /// Its weights that may be used in place ([`ClipTextTransformer::release_mapped_weights`]).
    mapped: MappedWeights,
    /// The dtype its outputs are handed on in, when not its own ([`ClipTextTransformer::with_output_kind`]).
    output_kind: Option<Kind>,
}

/// SDXL's view of a text encoder's output (see [`ClipTextTransformer::forward_penultimate`]).
#[derive(Debug)]
pub struct TextStates {
    /// Hidden states `[batch, tokens, hidden]` of an inner layer, without the final norm.
    pub hidden: Tensor,
    /// The final-normed state at each sequence's end token, through `text_projection` when
    /// the model has one: `[batch, projection_dim]`.
    pub pooled: Option<Tensor>,
}

impl ClipTextTransformer {
    /// `vs` is the model's root; variables live under `text_model.`.
    pub fn new(vs: nn::Path, config: &ClipTextConfig) -> Result<Self> {
        let (built, mapped) = collect_mapped(|| adapters::collect(|| Self::build(vs, config)));
        let (mut encoder, targets) = built?;
        encoder.adapter_targets = targets;
        encoder.mapped = mapped;
        Ok(encoder)
    }

    /// The layers a LoRA may target, by module path (`text_model.encoder.layers.0.mlp.fc1`).
    pub fn adapter_targets(&self) -> &Targets {
        &self.adapter_targets
    }

    fn build(vs: nn::Path, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let act = Activation::parse(&config.hidden_act)?;
        let tm = &vs / "text_model";
        let emb = &tm / "embeddings";
        let d = config.hidden_size;
        let normal = super::blocks::random_init(Init::Randn {
            mean: 0.,
            stdev: 0.02,
        });
        let token_embedding = variable(
            &(&emb / "token_embedding"),
            "weight",
            &[config.vocab_size, d],
            normal,
        );
        let position_embedding = variable(
            &(&emb / "position_embedding"),
            "weight",
            &[config.max_position_embeddings, d],
            normal,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(&tm / "encoder" / "layers" / i, config, act))
            .collect();
        let final_layer_norm = LayerNorm::new(&tm / "final_layer_norm", d, config.layer_norm_eps);
        let text_projection = config
            .has_projection()
            .then(|| Linear::new(&vs / "text_projection", d, config.projection_width(), false));
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
            adapter_targets: Targets::new(),
            mapped: MappedWeights::default(),
            output_kind: None,
        })
    }

    /// The encoder, handing its hidden states and pooled outputs on in `kind` (a float32
    /// encoder used in place inside a bf16 pipeline on the CPU, see the loader).
    pub fn with_output_kind(mut self, kind: Kind) -> Self {
        self.output_kind = (kind != self.kind()).then_some(kind);
        self
    }

    fn output(&self, xs: Tensor) -> Result<Tensor> {
        Ok(match self.output_kind {
            Some(kind) => xs.f_to_kind(kind)?,
            None => xs,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Hidden states `[batch, tokens, hidden]` for token ids `[batch, tokens]`. `clip_skip`
    /// stops that many layers before the last (diffusers' `clip_skip`); the final layer norm
    /// is applied either way, as the SD pipelines do.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.forward_fixed(input_ids, &[], clip_skip)
    }

    /// [`ClipTextTransformer::forward`] with `fixes` in place of token embeddings.
    pub fn forward_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
    ) -> Result<Tensor> {
        if clip_skip >= self.layers.len() {
            return Err(Error::invalid(format!(
                "clip_skip {clip_skip} must be below the text encoder's {} layers",
                self.layers.len()
            )));
        }
        let mut xs = self.embed(input_ids, fixes)?;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            xs = layer.forward(&xs)?;
        }
        self.output(self.final_layer_norm.forward(&xs)?)
    }

    /// SDXL's conditioning (diffusers' `hidden_states[-(clip_skip + 2)]`): the hidden states
    /// `clip_skip + 1` layers before the last, without the final layer norm, and with
    /// `pooled` the pooled output of the full model (see [`TextStates::pooled`]).
    pub fn forward_penultimate(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
        pooled: bool,
    ) -> Result<TextStates> {
        self.forward_penultimate_fixed(input_ids, &[], clip_skip, pooled)
    }

    /// [`ClipTextTransformer::forward_penultimate`] with `fixes` in place of token
    /// embeddings; pooling reads the ids as given (diffusers' placeholder ids lie past the
    /// vocabulary, and the legacy rule pools at the largest id).
    pub fn forward_penultimate_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[EmbeddingFix],
        clip_skip: usize,
        pooled: bool,
    ) -> Result<TextStates> {
        let n = self.layers.len();
        if clip_skip + 1 > n {
            return Err(Error::invalid(format!(
                "clip_skip {clip_skip} must be below the text encoder's {n} layers"
            )));
        }
        let keep = n - 1 - clip_skip;
        let mut xs = self.embed(input_ids, fixes)?;
        let mut hidden = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == keep {
                hidden = Some(xs.shallow_clone());
                if !pooled {
                    break;
                }
            }
            xs = layer.forward(&xs)?;
        }
        let hidden = self.output(hidden.unwrap_or_else(|| xs.shallow_clone()))?;
        if !pooled {
            return Ok(TextStates {
                hidden,
                pooled: None,
            });
        }
        let last = self.final_layer_norm.forward(&xs)?;
        let ends = if self.config.eos_token_id == 2 {
            input_ids.f_argmax(-1, false)?
        } else {
            input_ids
                .f_eq(self.config.eos_token_id)?
                .f_to_kind(Kind::Int)?
                .f_argmax(-1, false)?
        };
        let batch = input_ids.size2()?.0;
        let rows = Tensor::f_arange(batch, (Kind::Int64, input_ids.device()))?;
        let at_end = last.f_index(&[Some(rows), Some(ends)])?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&at_end)?,
            None => at_end,
        };
        Ok(TextStates {
            hidden,
            pooled: Some(self.output(pooled)?),
        })
    }

    /// Token plus position embeddings, after checking the ids; `fixes` replace the token
    /// embeddings they cover (their placeholder ids are not looked up).
    fn embed(&self, input_ids: &Tensor, fixes: &[EmbeddingFix]) -> Result<Tensor> {
        let (_, len) = input_ids.size2()?;
        let d = self.config.hidden_size;
        for f in fixes {
            let (n, width) = f.vectors.size2()?;
            if f.position < 0 || f.position + n > len || width != d {
                return Err(Error::invalid(format!(
                    "embedding vectors {:?} at token {} do not fit {len} tokens of width {d}",
                    f.vectors.size(),
                    f.position
                )));
            }
        }
        let lookup = if fixes.is_empty() {
            input_ids.shallow_clone()
        } else {
            let mut lookup = input_ids.f_zeros_like()?;
            lookup.f_copy_(input_ids)?;
            for f in fixes {
                let n = f.vectors.size()[0];
                let _ = lookup.f_narrow(1, f.position, n)?.f_fill_(0)?;
            }
            lookup
        };
        let input_ids = &lookup;
        if len > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let (min, max) = (
            input_ids.f_min()?.int64_value(&[]),
            input_ids.f_max()?.int64_value(&[]),
        );
        if min < 0 || max >= self.config.vocab_size {
            return Err(Error::invalid(format!(
                "token id out of range [0, {}): found {min}..{max}",
                self.config.vocab_size
            )));
        }
        let tokens = Tensor::f_embedding(&self.token_embedding, input_ids, -1, false, false)?;
        self.release_token_table();
        for f in fixes {
            let n = f.vectors.size()[0];
            let vectors = f.vectors.f_to_kind(tokens.kind())?;
            tokens.f_narrow(1, f.position, n)?.f_copy_(&vectors)?;
        }
        let positions = self.position_embedding.f_narrow(0, 0, len)?;
        Ok(tokens.f_add(&positions)?)
    }

    /// Drops the resident pages of the token table when it is used in place from a weight
    /// file's map. A prompt reads a few dozen of its rows, yet the whole table (145 MiB for SD
    /// 1.5, 241 MiB for SDXL's second encoder) stayed resident through the denoising loop and
    /// the decode: it was mapped in at load, and with large page-cache folios a row's fault maps
    /// megabytes around it. The rows come back from the page cache at the next lookup; the table
    /// is never written, so nothing is lost. Cheap enough for every lookup, unlike
    /// [`ClipTextTransformer::release_mapped_weights`].
    fn release_token_table(&self) {
        crate::weights::release_tensor_if_mapped(&self.token_embedding);
    }

    /// Drops the resident pages of all its weights used in place from a weight file's map
    /// (see [`MappedWeights`]): a pipeline does it once its text conditioning is made, so
    /// that the encoder's weights are not resident beside the denoising loop and the decode
    /// (325 MiB for SD 1.5's linear layers, 3.3 GiB for SDXL's two encoders in float32).
    /// Paging them back in costs the next call about 20 ms per 470 MiB (from the page cache),
    /// which is why a forward does not do it itself: a generation encodes twice.
    pub fn release_mapped_weights(&self) {
        self.mapped.release();
    }

    /// The dtype the weights are held in.
    pub fn kind(&self) -> Kind {
        self.token_embedding.kind()
    }
}
