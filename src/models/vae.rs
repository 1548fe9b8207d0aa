//! AutoencoderKL: the VAE that maps images to the latent space the UNet works in and back.
use super::blocks::{
    add_into, channels_last, collect_mapped, Attention, Conv2d, Downsample2D, GroupNorm,
    ResnetBlock2D, ResnetConfig, Upsample2D,
};
use super::config::read_json;
use crate::limits::{
    check_finite, check_level_sizes, check_positive, MAX_CONFIG_CHANNELS, MAX_CONFIG_LAYERS,
};
use crate::rng::NoiseSource;
use crate::weights::MappedWeights;
use crate::{Error, Result};
use std::path::Path;
use tch::nn;
use tch::Tensor;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one")]
    pub layers_per_block: i64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: i64,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    /// Run this VAE in float32 inside a float16 SDXL pipeline (diffusers' default true:
    /// SDXL's VAE overflows in float16).
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    /// The image side it was trained at (512 for SD 1.x, 1024 for SDXL): the default VAE tile.
    #[serde(default, deserialize_with = "int_or_first")]
    pub sample_size: Option<i64>,
}

/// An integer, or a list of them whose first is taken (diffusers reads `sample_size` either
/// way); anything else is left unknown rather than refused, since only VAE tiling's default
/// tile reads it.
fn int_or_first<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<i64>, D::Error> {
    let v: serde_json::Value = serde::Deserialize::deserialize(d)?;
    Ok(match &v {
        serde_json::Value::Array(items) => items.first().and_then(|x| x.as_i64()),
        other => other.as_i64(),
    })
}

fn d_three() -> i64 {
    3
}
fn d_four() -> i64 {
    4
}
fn d_one() -> i64 {
    1
}
fn d_down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_channels() -> Vec<i64> {
    vec![64]
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> i64 {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let field = |name: &str| format!("VAE config {name}");
        check_level_sizes(
            "VAE",
            &self.block_out_channels,
            self.in_channels,
            self.out_channels,
            self.norm_num_groups,
        )?;
        check_positive(
            &field("latent_channels"),
            self.latent_channels,
            MAX_CONFIG_CHANNELS,
        )?;
        check_positive(
            &field("layers_per_block"),
            self.layers_per_block,
            MAX_CONFIG_LAYERS,
        )?;
        check_finite(&field("scaling_factor"), self.scaling_factor, true)?;
        if let Some(size) = self.sample_size {
            check_positive(&field("sample_size"), size, 1 << 16)?;
        }
        if let Some(shift) = self.shift_factor {
            check_finite(&field("shift_factor"), shift, false)?;
        }
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::bad_model(format!(
                "VAE config: {} block_out_channels, {} down_block_types, {} up_block_types must agree",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::Unsupported(format!("VAE down block type `{t}`")));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::Unsupported(format!("VAE up block type `{t}`")));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::Unsupported(format!("VAE act_fn `{}`", self.act_fn)));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return Err(Error::bad_model(format!(
                "VAE block channels {c} not divisible by norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        Ok(())
    }

    /// How much smaller than the image the latents are on each side.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

const VAE_EPS: f64 = 1e-6;

/// The VAE's mid-block self-attention over all pixels: one head, biases on q/k/v.
#[derive(Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn new(vs: nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: GroupNorm::new(&vs / "group_norm", groups, channels, VAE_EPS),
            attn: Attention::new(vs, channels, channels, 1, channels, true),
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.size4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .f_view([b, c, h * w])?
            .f_transpose(1, 2)?;
        let out = self.attn.forward(&tokens, None)?;
        // `[b, h*w, c]` is already the channels-last layout: viewed as `[b, c, h, w]` without a
        // copy, so the layers after the attention stay in channels-last (`blocks::channels_last`);
        // a reshape to NCHW made every later convolution reorder its activations.
        let out = out.f_view([b, h, w, c])?.f_permute([0, 3, 1, 2])?;
        add_into(out, xs)
    }
}

#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vs: nn::Path, channels: i64, groups: i64, with_attention: bool) -> Self {
        let cfg = ResnetConfig {
            groups,
            eps: VAE_EPS,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        Self {
            resnet0: ResnetBlock2D::new(&vs / "resnets" / 0, channels, channels, cfg),
            attention: with_attention
                .then(|| SpatialAttention::new(&vs / "attentions" / 0, channels, groups)),
            resnet1: ResnetBlock2D::new(&vs / "resnets" / 1, channels, channels, cfg),
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vs: nn::Path, c: &VaeConfig) -> Self {
        let ch = &c.block_out_channels;
        let cfg = ResnetConfig {
            groups: c.norm_num_groups,
            eps: VAE_EPS,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let mut blocks = Vec::new();
        let mut out_c = ch[0];
        for (i, &block_c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = block_c;
            let bvs = &vs / "down_blocks" / i;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bvs / "resnets" / j,
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        cfg,
                    )
                })
                .collect();
            let down =
                (i + 1 < ch.len()).then(|| Downsample2D::new(&bvs / "downsamplers" / 0, out_c, 0));
            blocks.push((resnets, down));
        }
        let last = *ch.last().unwrap_or(&ch[0]);
        Self {
            conv_in: Conv2d::new(&vs / "conv_in", c.in_channels, ch[0], 3, 1, 1),
            blocks,
            mid: MidBlock::new(
                &vs / "mid_block",
                last,
                c.norm_num_groups,
                c.mid_block_add_attention,
            ),
            norm_out: GroupNorm::new(&vs / "conv_norm_out", c.norm_num_groups, last, VAE_EPS),
            conv_out: Conv2d::new(&vs / "conv_out", last, 2 * c.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = channels_last(&self.conv_in.forward(xs)?)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let out = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
        Ok(out.f_contiguous()?)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vs: nn::Path, c: &VaeConfig) -> Self {
        let reversed: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let cfg = ResnetConfig {
            groups: c.norm_num_groups,
            eps: VAE_EPS,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let mut blocks = Vec::new();
        let mut out_c = reversed[0];
        for (i, &block_c) in reversed.iter().enumerate() {
            let prev = out_c;
            out_c = block_c;
            let bvs = &vs / "up_blocks" / i;
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bvs / "resnets" / j,
                        if j == 0 { prev } else { out_c },
                        out_c,
                        cfg,
                    )
                })
                .collect();
            let up =
                (i + 1 < reversed.len()).then(|| Upsample2D::new(&bvs / "upsamplers" / 0, out_c));
            blocks.push((resnets, up));
        }
        let first = c.block_out_channels[0];
        Self {
            conv_in: Conv2d::new(&vs / "conv_in", c.latent_channels, reversed[0], 3, 1, 1),
            mid: MidBlock::new(
                &vs / "mid_block",
                reversed[0],
                c.norm_num_groups,
                c.mid_block_add_attention,
            ),
            blocks,
            norm_out: GroupNorm::new(&vs / "conv_norm_out", c.norm_num_groups, first, VAE_EPS),
            conv_out: Conv2d::new(&vs / "conv_out", first, c.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self
            .mid
            .forward(&channels_last(&self.conv_in.forward(z)?)?)?;
        // Each activation is given up to the layer that reads it last, so that it is freed
        // (or normalised in place) as early as possible: the decoder's large activations
        // bound the peak memory of a decode.
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward_owned(h, None)?;
            }
            if let Some(u) = up {
                h = u.forward_owned(h, None)?;
            }
        }
        let out = self
            .conv_out
            .forward(&self.norm_out.forward_silu_owned(h)?)?;
        Ok(out.f_contiguous()?)
    }
}

/// The encoder's output distribution N(mean, exp(logvar)) over latents.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments `[b, 2c, h, w]` into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let parts = moments.f_chunk(2, 1)?;
        let logvar = parts[1].f_clamp(-30.0, 20.0)?;
        Ok(Self {
            mean: parts[0].shallow_clone(),
            logvar,
        })
    }

    pub fn std(&self) -> Result<Tensor> {
        Ok(self.logvar.f_mul_scalar(0.5)?.f_exp()?)
    }

    /// `mean + std * eps`, eps drawn from `noise` (diffusers' `latent_dist.sample(generator)`).
    pub fn sample(&self, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise
            .randn(&self.mean.size())?
            .f_to_kind(self.mean.kind())?;
        Ok(self.mean.f_add(&self.std()?.f_mul(&eps)?)?)
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    /// The type its weights are held in.
    kind: tch::Kind,
    /// Its weights that may be used in place ([`AutoencoderKL::release_mapped_weights`]).
    mapped: MappedWeights,
}

impl AutoencoderKL {
    pub fn new(vs: nn::Path, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let l = config.latent_channels;
        let (vae, mapped) = collect_mapped(|| Self {
            encoder: Encoder::new(&vs / "encoder", config),
            decoder: Decoder::new(&vs / "decoder", config),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::new(&vs / "quant_conv", 2 * l, 2 * l, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::new(&vs / "post_quant_conv", l, l, 1, 1, 0)),
            config: config.clone(),
            kind: vs.kind(),
            mapped: MappedWeights::default(),
        });
        Ok(Self { mapped, ..vae })
    }

    /// Drops the resident pages of its weights used in place from a weight file's map: the
    /// VAE runs once per image, and its 320 MiB (SD 1.5, float32) stayed resident through
    /// every denoising loop. A pipeline calls this after each decode or encode and once
    /// loaded; the pages read back from the page cache at the next call.
    pub fn release_mapped_weights(&self) {
        self.mapped.release();
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The type its weights are held in.
    pub fn kind(&self) -> tch::Kind {
        self.kind
    }

    /// Images `[b, 3, h, w]` in [-1, 1] to the latent distribution (unscaled latents).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents to images in (about) [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}

/// A VAE held in a wider type than the pipeline around it (diffusers' `force_upcast`: SDXL's VAE
/// overflows in float16, so a float16 pipeline runs it in float32): its inputs are cast to the
/// VAE's type, the latent distribution back to the pipeline's; decoded images stay in the VAE's
/// type (the pipeline converts them to float32 anyway).
pub struct UpcastVae {
    inner: AutoencoderKL,
    pipeline_kind: tch::Kind,
}

impl UpcastVae {
    pub fn new(inner: AutoencoderKL, pipeline_kind: tch::Kind) -> Self {
        Self {
            inner,
            pipeline_kind,
        }
    }
}

impl super::traits::Autoencoder for UpcastVae {
    fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let d = self.inner.encode(&images.f_to_kind(self.inner.kind())?)?;
        Ok(DiagonalGaussian {
            mean: d.mean.f_to_kind(self.pipeline_kind)?,
            logvar: d.logvar.f_to_kind(self.pipeline_kind)?,
        })
    }
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.inner.decode(&latents.f_to_kind(self.inner.kind())?)
    }
    fn latent_channels(&self) -> i64 {
        self.inner.config().latent_channels
    }
    fn spatial_scale(&self) -> i64 {
        self.inner.config().scale_factor()
    }
    fn scaling_factor(&self) -> f64 {
        self.inner.config().scaling_factor
    }
    fn shift_factor(&self) -> Option<f64> {
        self.inner.config().shift_factor
    }
    fn wraps_around(&self) -> bool {
        true
    }
    fn sample_size(&self) -> Option<i64> {
        self.inner.config().sample_size
    }
    fn release_mapped_weights(&self) {
        self.inner.release_mapped_weights();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The mid block's attention hands on its output in channels-last strides whatever the
    /// layout of its input, so that the decoder's later layers stay in channels-last; its
    /// values do not depend on the input's layout.
    #[test]
    fn spatial_attention_output_is_channels_last() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = SpatialAttention::new(vs.root(), 32, 8);
        for (b, h, w) in [(1, 4, 4), (2, 3, 5), (1, 7, 2)] {
            let x = Tensor::randn([b, 32, h, w], (Kind::Float, Device::Cpu));
            let from_nchw = attn.forward(&x).unwrap();
            let from_nhwc = attn.forward(&channels_last(&x).unwrap()).unwrap();
            for out in [&from_nchw, &from_nhwc] {
                assert_eq!(out.size(), vec![b, 32, h, w]);
                assert_eq!(out.stride(), vec![h * w * 32, 1, w * 32, 32]);
            }
            let diff = (&from_nchw - &from_nhwc).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{b}x{h}x{w}: the layouts differ by {diff}");
        }
    }
}
