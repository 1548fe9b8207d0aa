//! UNet2DConditionModel: predicts the noise (or v) in a latent from the timestep and the text.
use super::adapters::{self, Target, Targets};
use super::blocks::{
    add_into, collect_mapped, Attention, Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear,
    ResnetBlock2D, ResnetConfig, Upsample2D,
};
use super::config::{read_json, PerBlock};
use super::fast::{FastPass, TokenMerge, TokenMerging};
use crate::limits::{
    check_each_positive, check_finite, check_level_sizes, check_positive, MAX_CONFIG_CHANNELS,
    MAX_CONFIG_LAYERS, MAX_CONFIG_POSITIONS,
};
use crate::weights::single_file::UNetMap;
use crate::weights::MappedWeights;
use crate::{Error, Result};
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default = "d_four")]
    pub in_channels: i64,
    #[serde(default = "d_four")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_one_i")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<i64>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL (`addition_embed_type = "text_time"`): width of each micro-conditioning value's
    /// sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// SDXL: width of the pooled text embedding plus all embedded time ids.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_time_type")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
}

impl Default for PerBlock<bool> {
    fn default() -> Self {
        PerBlock::One(false)
    }
}

fn d_four() -> i64 {
    4
}
fn d_true() -> bool {
    true
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_one_i() -> i64 {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> i64 {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_tlayers() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_shift() -> String {
    "default".into()
}
fn d_time_type() -> String {
    "positional".into()
}

/// Per-block settings, resolved from the config's one-or-per-block fields.
struct Resolved {
    layers: Vec<i64>,
    heads: Vec<i64>,
    cross_dims: Vec<i64>,
    transformer_layers: Vec<i64>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve(&self) -> Result<Resolved> {
        let n = self.block_out_channels.len();
        // diffusers' historical naming: `attention_head_dim` holds the number of heads
        // unless `num_attention_heads` is given.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        Ok(Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            heads,
            cross_dims: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
        })
    }

    /// Every size of the config in a range a real UNet uses, before anything is built from it.
    fn check_ranges(&self) -> Result<()> {
        let field = |name: &str| format!("UNet config {name}");
        check_level_sizes(
            "UNet",
            &self.block_out_channels,
            self.in_channels,
            self.out_channels,
            self.norm_num_groups,
        )?;
        if let Some(s) = self.sample_size {
            check_positive(&field("sample_size"), s, MAX_CONFIG_POSITIONS)?;
        }
        if !(0..=2).contains(&self.downsample_padding) {
            return Err(Error::bad_model(format!(
                "{} is {}: it must be 0, 1 or 2",
                field("downsample_padding"),
                self.downsample_padding
            )));
        }
        check_finite(&field("norm_eps"), self.norm_eps, false)?;
        check_finite(&field("freq_shift"), self.freq_shift, false)?;
        check_finite(
            &field("mid_block_scale_factor"),
            self.mid_block_scale_factor,
            true,
        )?;
        let r = self.resolve()?;
        check_each_positive(&field("layers_per_block"), &r.layers, MAX_CONFIG_LAYERS)?;
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        check_each_positive(&field(heads_field), &r.heads, MAX_CONFIG_CHANNELS)?;
        check_each_positive(
            &field("cross_attention_dim"),
            &r.cross_dims,
            MAX_CONFIG_CHANNELS,
        )?;
        check_each_positive(
            &field("transformer_layers_per_block"),
            &r.transformer_layers,
            MAX_CONFIG_LAYERS,
        )?;
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::bad_model(format!(
                "UNet config: {} block_out_channels, {} down_block_types, {} up_block_types must agree",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let unsupported = |what: String| Err(Error::Unsupported(format!("UNet {what}")));
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(format!("down block type `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(format!("up block type `{t}`"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return unsupported(format!("mid block type {:?}", self.mid_block_type));
        }
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn `{}`", self.act_fn));
        }
        if let Some(t) = &self.class_embed_type {
            return unsupported(format!("class_embed_type `{t}`"));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let field = |name: &str| format!("UNet config {name}");
                let (Some(time_dim), Some(input_dim)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return Err(Error::bad_model(
                        "UNet config: addition_embed_type `text_time` needs \
                         addition_time_embed_dim and projection_class_embeddings_input_dim",
                    ));
                };
                check_positive(
                    &field("addition_time_embed_dim"),
                    time_dim,
                    MAX_CONFIG_CHANNELS,
                )?;
                check_positive(
                    &field("projection_class_embeddings_input_dim"),
                    input_dim,
                    16 * MAX_CONFIG_CHANNELS,
                )?;
            }
            Some(t) => return unsupported(format!("addition_embed_type `{t}`")),
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim (guidance-embedded LCM UNets)".into());
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim".into());
        }
        if self.dual_cross_attention || self.only_cross_attention != PerBlock::One(false) {
            return unsupported("dual or only cross-attention".into());
        }
        if self.resnet_time_scale_shift != "default" || self.time_embedding_type != "positional" {
            return unsupported(format!(
                "resnet_time_scale_shift `{}` / time_embedding_type `{}`",
                self.resnet_time_scale_shift, self.time_embedding_type
            ));
        }
        self.check_ranges()?;
        let r = self.resolve()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&r.heads).enumerate() {
            if h <= 0 || c % h != 0 || c % self.norm_num_groups != 0 {
                return Err(Error::bad_model(format!(
                    "UNet block {i}: {c} channels must divide into {h} heads and {} groups",
                    self.norm_num_groups
                )));
            }
        }
        Ok(())
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps`.
fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let exponent = Tensor::f_arange(half, (Kind::Float, timesteps.device()))?
        .f_mul_scalar(-(10000f64).ln())?
        .f_div_scalar(half as f64 - freq_shift)?;
    let freqs = exponent.f_exp()?;
    let args = timesteps
        .f_to_kind(Kind::Float)?
        .f_unsqueeze(1)?
        .f_mul(&freqs.f_unsqueeze(0)?)?;
    let (sin, cos) = (args.f_sin()?, args.f_cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::f_cat(&[cos, sin], -1)?
    } else {
        Tensor::f_cat(&[sin, cos], -1)?
    };
    if dim % 2 == 1 {
        Ok(emb.f_constant_pad_nd([0, 1])?)
    } else {
        Ok(emb)
    }
}

#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vs: nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj_in: Linear::new(&vs / "net" / 0 / "proj", dim, 2 * inner, true),
            proj_out: Linear::new(&vs / "net" / 2, inner, dim, true),
        }
    }

    /// GEGLU: half of the projection gated by the GELU of the other half.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let parts = self.proj_in.forward(xs)?.f_chunk(2, -1)?;
        let gated = parts[0].f_mul(&parts[1].f_gelu("none")?)?;
        self.proj_out.forward(&gated)
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vs: nn::Path, dim: i64, heads: i64, cross_dim: i64) -> Self {
        let head_dim = dim / heads;
        Self {
            norm1: LayerNorm::new(&vs / "norm1", dim, 1e-5),
            attn1: Attention::new(&vs / "attn1", dim, dim, heads, head_dim, false),
            norm2: LayerNorm::new(&vs / "norm2", dim, 1e-5),
            attn2: Attention::new(&vs / "attn2", dim, cross_dim, heads, head_dim, false),
            norm3: LayerNorm::new(&vs / "norm3", dim, 1e-5),
            ff: FeedForward::new(&vs / "ff", dim),
        }
    }

    /// `merging`: token merging for the self-attention, with the token grid's `(h, w)`.
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        merging: Option<(TokenMerging, i64, i64)>,
    ) -> Result<Tensor> {
        let merge = match merging {
            Some((m, h, w)) => TokenMerge::new(xs, h, w, m.ratio, m.seed)?,
            None => None,
        };
        let normed = self.norm1.forward(xs)?;
        let attended = match &merge {
            Some(m) => m.unmerge(&self.attn1.forward(&m.merge(&normed)?, None)?)?,
            None => self.attn1.forward(&normed, None)?,
        };
        let xs = attended.f_add(xs)?;
        let xs = self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            .f_add(&xs)?;
        Ok(self.ff.forward(&self.norm3.forward(&xs)?)?.f_add(&xs)?)
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Transformer2DModel: group norm, projection to tokens, transformer blocks, projection back,
/// residual.
#[derive(Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    fn new(
        vs: nn::Path,
        channels: i64,
        heads: i64,
        layers: i64,
        cross_dim: i64,
        groups: i64,
        linear: bool,
    ) -> Self {
        let proj = |name: &str| {
            if linear {
                Projection::Linear(Linear::new(&vs / name, channels, channels, true))
            } else {
                Projection::Conv(Conv2d::new(&vs / name, channels, channels, 1, 1, 0))
            }
        };
        Self {
            norm: GroupNorm::new(&vs / "norm", groups, channels, 1e-6),
            proj_in: proj("proj_in"),
            blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &vs / "transformer_blocks" / i,
                        channels,
                        heads,
                        cross_dim,
                    )
                })
                .collect(),
            proj_out: proj("proj_out"),
        }
    }

    /// `merging`: token merging for the self-attention of every block (a seed each).
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        merging: Option<TokenMerging>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.size4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_permute([0, 2, 3, 1])?.f_reshape([b, h * w, c])?)
        };
        let to_image = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([b, h, w, c])?.f_permute([0, 3, 1, 2])?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for (j, block) in self.blocks.iter().enumerate() {
            let merging = merging.map(|m| {
                let seed = m
                    .seed
                    .wrapping_add((j as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
                (TokenMerging { seed, ..m }, h, w)
            });
            tokens = block.forward(&tokens, context, merging)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?.f_contiguous()?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        add_into(out, xs)
    }
}

/// SDXL's extra conditioning of the time embedding (diffusers' `added_cond_kwargs`).
#[derive(Debug)]
pub struct AddedConditions {
    /// The pooled text embedding `[b, dim]` (the second text encoder's projected output).
    pub text_embeds: Tensor,
    /// Micro-conditioning values `[b, n]`: original size, crop top-left and target size
    /// (or aesthetic score for the refiner), each embedded sinusoidally.
    pub time_ids: Tensor,
}

impl AddedConditions {
    /// Both tensors repeated along the batch (`[a; a]`) or joined (`[a; b]`).
    pub fn cat(parts: &[&AddedConditions]) -> Result<Self> {
        let text: Vec<&Tensor> = parts.iter().map(|p| &p.text_embeds).collect();
        let time: Vec<&Tensor> = parts.iter().map(|p| &p.time_ids).collect();
        Ok(Self {
            text_embeds: Tensor::f_cat(&text, 0)?,
            time_ids: Tensor::f_cat(&time, 0)?,
        })
    }
}

/// `add_embedding` of a `text_time` UNet: the pooled text and the embedded time ids, through
/// two linear layers, added to the timestep embedding.
#[derive(Debug)]
struct AddedEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    time_dim: i64,
    input_dim: i64,
}

impl AddedEmbedding {
    fn forward(
        &self,
        added: &AddedConditions,
        batch: i64,
        kind: Kind,
        config: &UNetConfig,
    ) -> Result<Tensor> {
        let (text_b, text_w) = added.text_embeds.size2().map_err(|_| {
            Error::invalid(format!(
                "added condition text_embeds has shape {:?}, expected [batch, width]",
                added.text_embeds.size()
            ))
        })?;
        let (ids_b, ids) = added.time_ids.size2().map_err(|_| {
            Error::invalid(format!(
                "added condition time_ids has shape {:?}, expected [batch, count]",
                added.time_ids.size()
            ))
        })?;
        if text_b != batch || ids_b != batch {
            return Err(Error::invalid(format!(
                "added conditions have batch {text_b} (text_embeds) and {ids_b} (time_ids); \
                 the sample has {batch}"
            )));
        }
        let width = ids
            .checked_mul(self.time_dim)
            .and_then(|w| w.checked_add(text_w));
        if width != Some(self.input_dim) {
            return Err(Error::invalid(format!(
                "the UNet's add_embedding takes {} values: text_embeds width {text_w} plus \
                 {ids} time ids x {} does not match",
                self.input_dim, self.time_dim
            )));
        }
        let time = timestep_embedding(
            &added.time_ids.f_flatten(0, -1)?,
            self.time_dim,
            config.flip_sin_to_cos,
            config.freq_shift,
        )?
        .f_reshape([batch, ids * self.time_dim])?;
        let joined = Tensor::f_cat(
            &[added.text_embeds.f_to_kind(kind)?, time.f_to_kind(kind)?],
            -1,
        )?;
        self.linear_2
            .forward(&self.linear_1.forward(&joined)?.f_silu()?)
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddedEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
    adapter_targets: Targets,
    /// Its weights that may be used in place ([`UNet2DConditionModel::release_mapped_weights`]).
    mapped: MappedWeights,
}

impl UNet2DConditionModel {
    pub fn new(vs: nn::Path, config: &UNetConfig) -> Result<Self> {
        let (built, mapped) = collect_mapped(|| adapters::collect(|| Self::build(vs, config)));
        let (mut unet, mut targets) = built?;
        unet.mapped = mapped;
        // LoRAs made for the original (LDM / SGM) layout name the layers that way
        // (`input_blocks.4.1.proj_in`): both names lead to the same layer.
        let map = UNetMap::new(config)?;
        let aliases: Vec<(String, Target)> = targets
            .iter()
            .filter_map(|(name, target)| {
                let original = map.original(&format!("{name}.weight"))?;
                Some((original.strip_suffix(".weight")?.to_string(), *target))
            })
            .collect();
        targets.extend(aliases);
        unet.adapter_targets = targets;
        Ok(unet)
    }

    /// The layers a LoRA may target, by diffusers' module path and by the original layout's.
    pub fn adapter_targets(&self) -> &Targets {
        &self.adapter_targets
    }

    /// Drops the resident pages of its weights used in place from a weight file's map (see
    /// [`MappedWeights`]): a pipeline does it when its denoising loop is over, so that the
    /// decode does not run beside them (SDXL's UNet, used in place on the plain kernels, is 9.6
    /// GiB in float32). The next loop pages them back in from the page cache (about 20 ms per
    /// 470 MiB). Packed layers hold copies of their own, which stay.
    pub fn release_mapped_weights(&self) {
        self.mapped.release();
    }

    fn build(vs: nn::Path, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let r = c.resolve()?;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet_cfg = ResnetConfig {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            temb_channels: Some(temb_dim),
            output_scale_factor: 1.0,
        };
        let transformer = |vs: nn::Path, channels: i64, i: usize| {
            Transformer2D::new(
                vs,
                channels,
                r.heads[i],
                r.transformer_layers[i],
                r.cross_dims[i],
                c.norm_num_groups,
                c.use_linear_projection,
            )
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = ch[i];
            let bvs = &vs / "down_blocks" / i;
            let with_attn = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..r.layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bvs / "resnets" / j,
                    rin,
                    out_c,
                    resnet_cfg,
                ));
                if with_attn {
                    attentions.push(transformer(&bvs / "attentions" / j, out_c, i));
                }
            }
            let downsampler = (i + 1 < n)
                .then(|| Downsample2D::new(&bvs / "downsamplers" / 0, out_c, c.downsample_padding));
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_c = ch[n - 1];
        let mvs = &vs / "mid_block";
        let mid_cfg = ResnetConfig {
            output_scale_factor: c.mid_block_scale_factor,
            ..resnet_cfg
        };
        let mid_block = MidBlock {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::new(&mvs / "resnets" / j, mid_c, mid_c, mid_cfg))
                .collect(),
            attentions: vec![transformer(&mvs / "attentions" / 0, mid_c, n - 1)],
        };

        let reversed: Vec<i64> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = reversed[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let rev_i = n - 1 - i;
            let prev_c = out_c;
            out_c = reversed[i];
            let in_c = reversed[(i + 1).min(n - 1)];
            let bvs = &vs / "up_blocks" / i;
            let with_attn = kind == "CrossAttnUpBlock2D";
            let layers = r.layers[rev_i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip_c = if j == layers - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bvs / "resnets" / j,
                    rin + skip_c,
                    out_c,
                    resnet_cfg,
                ));
                if with_attn {
                    attentions.push(transformer(&bvs / "attentions" / j, out_c, rev_i));
                }
            }
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(&bvs / "upsamplers" / 0, out_c));
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            conv_in: Conv2d::new(&vs / "conv_in", c.in_channels, ch[0], 3, 1, 1),
            time_linear_1: Linear::new(&vs / "time_embedding" / "linear_1", ch[0], temb_dim, true),
            time_linear_2: Linear::new(
                &vs / "time_embedding" / "linear_2",
                temb_dim,
                temb_dim,
                true,
            ),
            add_embedding: match (
                c.addition_time_embed_dim,
                c.projection_class_embeddings_input_dim,
            ) {
                (Some(time_dim), Some(input_dim)) if c.addition_embed_type.is_some() => {
                    let avs = &vs / "add_embedding";
                    Some(AddedEmbedding {
                        linear_1: Linear::new(&avs / "linear_1", input_dim, temb_dim, true),
                        linear_2: Linear::new(&avs / "linear_2", temb_dim, temb_dim, true),
                        time_dim,
                        input_dim,
                    })
                }
                _ => None,
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vs / "conv_norm_out",
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            ),
            conv_out: Conv2d::new(&vs / "conv_out", ch[0], c.out_channels, 3, 1, 1),
            config: config.clone(),
            adapter_targets: Targets::new(),
            mapped: MappedWeights::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts noise (or v) for `sample` `[b, in_channels, h, w]` at `timestep`, conditioned on
    /// `context` `[b, tokens, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_fast(sample, timestep, context, None, &mut FastPass::default())
    }

    /// As [`UNet2DConditionModel::forward`] for an SDXL UNet, with its added conditions.
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: &AddedConditions,
    ) -> Result<Tensor> {
        self.forward_fast(
            sample,
            timestep,
            context,
            Some(added),
            &mut FastPass::default(),
        )
    }

    /// `(pooled text width + all time ids' embedding width, one time id's embedding width)`
    /// of an SDXL (`text_time`) UNet.
    pub fn added_input_dims(&self) -> Option<(i64, i64)> {
        self.add_embedding
            .as_ref()
            .map(|a| (a.input_dim, a.time_dim))
    }

    /// As [`UNet2DConditionModel::forward`], with the opt-in fast modes of `fast`.
    pub fn forward_fast(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        fast: &mut FastPass,
    ) -> Result<Tensor> {
        let b = sample.size4()?.0;
        let t = Tensor::f_full([b], timestep, (Kind::Float, sample.device()))?;
        self.run(sample, &t, context, added, fast)
    }

    /// The finest resolution level (0 = the latent's) with attention; the mid block, at the
    /// coarsest, always has it.
    fn finest_attention_level(&self) -> usize {
        let down = self
            .down_blocks
            .iter()
            .position(|b| !b.attentions.is_empty());
        let up = self
            .up_blocks
            .iter()
            .rposition(|b| !b.attentions.is_empty());
        let up = up.map(|i| self.up_blocks.len() - 1 - i);
        [down, up]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.down_blocks.len() - 1)
    }

    /// Skip connections from the down path to the up path: `conv_in`'s output, each down
    /// resnet's and each downsampler's. Step caching's branch is below this.
    pub fn skip_connections(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(|b| b.resnets.len() + b.downsampler.is_some() as usize)
            .sum::<usize>()
    }

    /// As [`UNet2DConditionModel::forward`] with one timestep per sample (`timesteps` of
    /// shape `[b]`), as training needs.
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        self.run(sample, timesteps, context, None, &mut FastPass::default())
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
        fast: &mut FastPass,
    ) -> Result<Tensor> {
        let _int8 = super::int8::enable(fast.int8_linear);
        let (b, c, _, _) = sample.size4()?;
        if c != self.config.in_channels {
            return Err(Error::invalid(format!(
                "UNet input has {c} channels, the model takes {}",
                self.config.in_channels
            )));
        }
        let (cb, _, _) = context.size3()?;
        if cb != b {
            return Err(Error::invalid(format!(
                "UNet context batch {cb} differs from sample batch {b}"
            )));
        }
        if timesteps.size() != [b] {
            return Err(Error::invalid(format!(
                "UNet timesteps have shape {:?}, expected [{b}]",
                timesteps.size()
            )));
        }
        let kind = sample.kind();
        let t_emb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .f_to_kind(kind)?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.f_silu()?)?;
        let emb = match (&self.add_embedding, added) {
            (None, None) => emb,
            (Some(a), Some(added)) => emb.f_add(&a.forward(added, b, kind, &self.config)?)?,
            (Some(_), None) => {
                return Err(Error::invalid(
                    "this UNet (addition_embed_type `text_time`, SDXL) needs its added \
                     conditions: the pooled text embedding and the time ids",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "this UNet takes no added conditions (pooled text embedding, time ids)",
                ))
            }
        };
        // Every resnet applies SiLU to the time embedding first: do it once.
        let emb = emb.f_silu()?;
        let emb = Some(&emb);

        let sample = if self.config.center_input_sample {
            sample.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?
        } else {
            sample.shallow_clone()
        };
        // Token merging applies to the finest level with attention (the full latent resolution
        // in SD 1.x / 2.x, as ToMe's default), with a fresh seed for each transformer.
        let token_merging = fast.token_merging.filter(|m| m.ratio > 0.0);
        let merge_level = self.finest_attention_level();
        let mut merges = 0u64;
        let mut merging = |level: usize| -> Option<TokenMerging> {
            let m = token_merging.filter(|_| level == merge_level)?;
            merges += 1;
            Some(TokenMerging {
                seed: m
                    .seed
                    .wrapping_add(merges.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ..m
            })
        };
        // Step caching: a reusing pass stops the down path once the skips up to the branch
        // exist, and enters the up path where that skip is consumed, with the features the
        // last full pass stored there.
        let branch = fast.cache.as_ref().map(|(cache, _)| cache.branch());
        let reuse = matches!(fast.cache, Some((_, true)));
        let skip_count = self.skip_connections();
        if branch.is_some_and(|k| k >= skip_count) {
            return Err(Error::invalid(format!(
                "step cache branch {} must be below the UNet's {skip_count} skip connections",
                branch.unwrap_or_default()
            )));
        }
        let down_done = |skips: &Vec<Tensor>| reuse && branch.is_some_and(|k| skips.len() > k);

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.shallow_clone()];
        'down: for (level, block) in self.down_blocks.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                if down_done(&skips) {
                    break 'down;
                }
                h = resnet.forward(&h, emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, merging(level))?;
                }
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                if down_done(&skips) {
                    break 'down;
                }
                h = down.forward(&h)?;
                skips.push(h.shallow_clone());
            }
        }

        if reuse {
            let (cache, _) = fast.cache.as_ref().expect("reuse implies a cache");
            h = cache.features(b)?;
        } else {
            h = self.mid_block.resnets[0].forward(&h, emb)?;
            for (attn, resnet) in self
                .mid_block
                .attentions
                .iter()
                .zip(&self.mid_block.resnets[1..])
            {
                h = attn.forward(&h, context, merging(self.down_blocks.len() - 1))?;
                h = resnet.forward(&h, emb)?;
            }
        }

        // `next` is the index of the skip the next up resnet consumes.
        let mut next = skip_count;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let level = self.up_blocks.len() - 1 - i;
            for (j, resnet) in block.resnets.iter().enumerate() {
                next -= 1;
                if let Some(k) = branch {
                    if reuse && next > k {
                        continue;
                    }
                    if !reuse && next == k {
                        if let Some((cache, _)) = fast.cache.as_mut() {
                            cache.store(&h);
                        }
                    }
                }
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Internal("UNet skip connections exhausted".into()))?;
                h = resnet.forward(&Tensor::f_cat(&[&h, &skip], 1)?, emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, merging(level))?;
                }
            }
            if let Some(up) = &block.upsampler {
                // A reusing pass enters after the upsampler that feeds the branch's resnet.
                if reuse && branch.is_some_and(|k| next > k) {
                    continue;
                }
                // Upsample to the size of the skip that comes next, which is 2x except after
                // a stride-2 convolution of an odd side.
                let size = skips.last().map(|s| (s.size()[2], s.size()[3]));
                h = up.forward(&h, size)?;
            }
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }

    pub fn device(&self) -> Device {
        self.conv_in.weight.device()
    }
}
