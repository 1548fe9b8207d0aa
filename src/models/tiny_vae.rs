//! The tiny autoencoder (diffusers' `AutoencoderTiny`; TAESD for SD 1.x/2.x latents, TAESDXL
//! for SDXL's, which share the layout): plain 3x3 convolutions with residual blocks and no
//! attention or normalisation, so decoding costs a small fraction of the full VAE. Used for
//! previews during denoising and, when asked, as the final decoder.
//!
//! It reads a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) or one
//! `.safetensors` file: diffusers' keys (`encoder.layers.N.…`, `decoder.layers.N.…`) or the
//! original sequential layout of a separate encoder or decoder file (`N.…`, the decoder's
//! indices one higher because its first module, the input clamp, holds no weights). A single
//! file's widths and block counts are read from its tensors.
use super::blocks::Conv2d;
use super::config::read_json;
use crate::limits::{
    check_finite, check_positive, MAX_CONFIG_BLOCKS, MAX_CONFIG_CHANNELS, MAX_CONFIG_LAYERS,
};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Tensor};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct TinyVaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_widths")]
    pub encoder_block_out_channels: Vec<i64>,
    #[serde(default = "d_widths")]
    pub decoder_block_out_channels: Vec<i64>,
    #[serde(default = "d_relu")]
    pub act_fn: String,
    #[serde(default = "d_nearest")]
    pub upsample_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: i64,
    #[serde(default = "d_two")]
    pub upsampling_scaling_factor: i64,
    #[serde(default = "d_encoder_blocks")]
    pub num_encoder_blocks: Vec<i64>,
    #[serde(default = "d_decoder_blocks")]
    pub num_decoder_blocks: Vec<i64>,
    #[serde(default = "d_one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

fn d_three() -> i64 {
    3
}
fn d_four() -> i64 {
    4
}
fn d_two() -> i64 {
    2
}
fn d_one() -> f64 {
    1.0
}
fn d_widths() -> Vec<i64> {
    vec![64; 4]
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}
fn d_encoder_blocks() -> Vec<i64> {
    vec![1, 3, 3, 3]
}
fn d_decoder_blocks() -> Vec<i64> {
    vec![3, 3, 3, 1]
}

impl Default for TinyVaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: d_widths(),
            decoder_block_out_channels: d_widths(),
            act_fn: d_relu(),
            upsample_fn: d_nearest(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: d_encoder_blocks(),
            num_decoder_blocks: d_decoder_blocks(),
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

impl TinyVaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let field = |name: &str| format!("AutoencoderTiny config {name}");
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            check_positive(&field(name), v, MAX_CONFIG_CHANNELS)?;
        }
        check_positive(
            &field("upsampling_scaling_factor"),
            self.upsampling_scaling_factor,
            8,
        )?;
        check_finite(&field("scaling_factor"), self.scaling_factor, true)?;
        check_finite(&field("shift_factor"), self.shift_factor, false)?;
        for (widths, blocks, side) in [
            (
                &self.encoder_block_out_channels,
                &self.num_encoder_blocks,
                "encoder",
            ),
            (
                &self.decoder_block_out_channels,
                &self.num_decoder_blocks,
                "decoder",
            ),
        ] {
            let (wname, bname) = (
                field(&format!("{side}_block_out_channels")),
                field(&format!("num_{side}_blocks")),
            );
            if widths.is_empty() || widths.len() > MAX_CONFIG_BLOCKS || widths.len() != blocks.len()
            {
                return Err(Error::bad_model(format!(
                    "{wname} ({} entries) and {bname} ({} entries) must have the same number of \
                     levels, 1..={MAX_CONFIG_BLOCKS}",
                    widths.len(),
                    blocks.len()
                )));
            }
            for (i, (&w, &b)) in widths.iter().zip(blocks.iter()).enumerate() {
                check_positive(&format!("{wname}[{i}]"), w, MAX_CONFIG_CHANNELS)?;
                if !(0..=MAX_CONFIG_LAYERS).contains(&b) {
                    return Err(Error::bad_model(format!(
                        "{bname}[{i}] is {b}: it must be in 0..={MAX_CONFIG_LAYERS}"
                    )));
                }
                // Each level's convolution keeps the width of the level before it.
                if w != widths[0] {
                    return Err(Error::Unsupported(format!(
                        "{wname} {widths:?}: levels of different widths"
                    )));
                }
            }
        }
        if !matches!(self.act_fn.as_str(), "relu" | "silu") {
            return Err(Error::Unsupported(format!(
                "AutoencoderTiny act_fn `{}`",
                self.act_fn
            )));
        }
        if self.upsample_fn != "nearest" {
            return Err(Error::Unsupported(format!(
                "AutoencoderTiny upsample_fn `{}`",
                self.upsample_fn
            )));
        }
        Ok(())
    }

    /// Pixels per latent cell on each side, as the decoder upsamples (the encoder halves
    /// the size at every level after the first).
    pub fn decoder_scale(&self) -> i64 {
        (self.upsampling_scaling_factor).pow(self.num_decoder_blocks.len() as u32 - 1)
    }

    pub fn encoder_scale(&self) -> i64 {
        1 << (self.num_encoder_blocks.len() - 1)
    }
}

fn activate(xs: &Tensor, act: &str) -> Result<Tensor> {
    Ok(match act {
        "silu" => xs.f_silu()?,
        _ => xs.f_relu()?,
    })
}

/// Three 3x3 convolutions with the activation between them, plus the input, then ReLU
/// (diffusers' `AutoencoderTinyBlock` with equal widths: the skip is the identity).
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
}

impl TinyBlock {
    fn new(vs: nn::Path, channels: i64) -> Self {
        let conv = |i: usize| Conv2d::new(&vs / "conv" / i, channels, channels, 3, 1, 1);
        Self {
            convs: [conv(0), conv(2), conv(4)],
        }
    }

    fn forward(&self, xs: &Tensor, act: &str) -> Result<Tensor> {
        let h = activate(&self.convs[0].forward(xs)?, act)?;
        let h = activate(&self.convs[1].forward(&h)?, act)?;
        let h = self.convs[2].forward(&h)?;
        Ok(h.f_add(xs)?.f_relu()?)
    }
}

#[derive(Debug)]
enum Layer {
    Conv(Conv2d),
    Block(TinyBlock),
    Act,
    Upsample(i64),
}

/// One side of the autoencoder: its layers in diffusers' order (`layers.N`).
#[derive(Debug)]
struct Stack {
    layers: Vec<Layer>,
    act: String,
}

impl Stack {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.shallow_clone();
        for layer in &self.layers {
            h = match layer {
                Layer::Conv(c) => c.forward(&h)?,
                Layer::Block(b) => b.forward(&h, &self.act)?,
                Layer::Act => activate(&h, &self.act)?,
                Layer::Upsample(f) => {
                    let s = h.size();
                    h.f_upsample_nearest2d([s[2] * f, s[3] * f], None, None)?
                }
            };
        }
        Ok(h)
    }

    fn encoder(vs: nn::Path, c: &TinyVaeConfig) -> Self {
        let vs = &vs / "layers";
        let mut layers = Vec::new();
        let width = c.encoder_block_out_channels[0];
        for (level, &blocks) in c.num_encoder_blocks.iter().enumerate() {
            let at = &vs / layers.len();
            layers.push(Layer::Conv(if level == 0 {
                Conv2d::new(at, c.in_channels, width, 3, 1, 1)
            } else {
                Conv2d::with_bias(at, width, width, 3, 2, 1, false)
            }));
            for _ in 0..blocks {
                let at = &vs / layers.len();
                layers.push(Layer::Block(TinyBlock::new(at, width)));
            }
        }
        let at = &vs / layers.len();
        layers.push(Layer::Conv(Conv2d::new(
            at,
            width,
            c.latent_channels,
            3,
            1,
            1,
        )));
        Self {
            layers,
            act: c.act_fn.clone(),
        }
    }

    fn decoder(vs: nn::Path, c: &TinyVaeConfig) -> Self {
        let vs = &vs / "layers";
        let width = c.decoder_block_out_channels[0];
        let mut layers = vec![
            Layer::Conv(Conv2d::new(&vs / 0, c.latent_channels, width, 3, 1, 1)),
            Layer::Act,
        ];
        let levels = c.num_decoder_blocks.len();
        for (level, &blocks) in c.num_decoder_blocks.iter().enumerate() {
            let last = level + 1 == levels;
            for _ in 0..blocks {
                let at = &vs / layers.len();
                layers.push(Layer::Block(TinyBlock::new(at, width)));
            }
            if !last {
                layers.push(Layer::Upsample(c.upsampling_scaling_factor));
            }
            let at = &vs / layers.len();
            let out = if last { c.out_channels } else { width };
            layers.push(Layer::Conv(Conv2d::with_bias(
                at, width, out, 3, 1, 1, last,
            )));
        }
        Self {
            layers,
            act: c.act_fn.clone(),
        }
    }
}

/// Which halves a tiny autoencoder holds (an original-layout file holds one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyVaeParts {
    pub encoder: bool,
    pub decoder: bool,
}

#[derive(Debug)]
pub struct AutoencoderTiny {
    encoder: Option<Stack>,
    decoder: Option<Stack>,
    config: TinyVaeConfig,
    /// The type its weights are held in.
    kind: tch::Kind,
}

impl AutoencoderTiny {
    pub fn new(vs: nn::Path, config: &TinyVaeConfig, parts: TinyVaeParts) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            encoder: parts
                .encoder
                .then(|| Stack::encoder(&vs / "encoder", config)),
            decoder: parts
                .decoder
                .then(|| Stack::decoder(&vs / "decoder", config)),
            config: config.clone(),
            kind: vs.kind(),
        })
    }

    pub fn config(&self) -> &TinyVaeConfig {
        &self.config
    }

    /// The type its weights are held in.
    pub fn kind(&self) -> tch::Kind {
        self.kind
    }

    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    /// Images `[b, 3, h, w]` in [-1, 1] to latents (diffusers' `encode(x).latents`).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this tiny autoencoder holds no encoder".into()))?;
        encoder.forward(&images.f_add_scalar(1.0)?.f_div_scalar(2.0)?)
    }

    /// Latents to images in [-1, 1] (diffusers' `decode(z).sample`): the latents are clamped
    /// softly to [-3, 3] first, as the decoder was trained.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let decoder = self
            .decoder
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this tiny autoencoder holds no decoder".into()))?;
        let z = latents.f_div_scalar(3.0)?.f_tanh()?.f_mul_scalar(3.0)?;
        Ok(decoder.forward(&z)?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?)
    }
}

/// How a single file lays out its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVaeLayout {
    /// diffusers' keys, `encoder.layers.N.…` and `decoder.layers.N.…`.
    Diffusers,
    /// An original encoder file: `N.…` for `encoder.layers.N.…`.
    OriginalEncoder,
    /// An original decoder file: `N.…` for `decoder.layers.(N-1).…`.
    OriginalDecoder,
}

impl TinyVaeLayout {
    /// The key a variable (diffusers' name) is stored under in a file of this layout.
    pub fn key_of(self, name: &str) -> String {
        let strip = |prefix: &str| name.strip_prefix(prefix).map(str::to_string);
        match self {
            Self::Diffusers => name.to_string(),
            Self::OriginalEncoder => strip("encoder.layers.").unwrap_or_else(|| name.into()),
            Self::OriginalDecoder => match strip("decoder.layers.") {
                Some(rest) => match rest.split_once('.') {
                    Some((i, tail)) => match i.parse::<u64>() {
                        Ok(i) => format!("{}.{tail}", i + 1),
                        Err(_) => rest,
                    },
                    None => rest,
                },
                None => name.into(),
            },
        }
    }
}

/// One side's structure as a file's shapes give it: the width, the blocks of each level, and
/// the channels it starts from and ends with (image or latents).
struct Inferred {
    width: i64,
    blocks: Vec<i64>,
    first_in: i64,
    last_out: i64,
}

/// Reads one side's structure from `shape(i, suffix)` (the shape of `layers.i.suffix`):
/// convolutions (`i.weight`), blocks (`i.conv.0.weight`) and weightless layers in between.
fn infer_side(
    what: &str,
    shape: &dyn Fn(usize, &str) -> Option<Vec<i64>>,
    decoder: bool,
    max_index: usize,
) -> Result<Inferred> {
    let bad = |why: String| Error::bad_model(format!("tiny autoencoder {what}: {why}"));
    let first = shape(0, "weight").ok_or_else(|| bad("no first convolution".into()))?;
    let [width, first_in, _, _] = first[..] else {
        return Err(bad(format!("first convolution of shape {first:?}")));
    };
    let mut blocks = vec![0i64];
    let mut k = if decoder { 2 } else { 1 };
    let last_out = loop {
        if k > max_index {
            return Err(bad("it ends without a final convolution".into()));
        }
        if shape(k, "conv.0.weight").is_some() {
            *blocks.last_mut().expect("one level at least") += 1;
        } else if let Some(s) = shape(k, "weight") {
            let has_bias = shape(k, "bias").is_some();
            let out = s.first().copied().unwrap_or(0);
            // A bias-free convolution opens the next level (the encoder's strided ones, and
            // the decoder's after each level's blocks); the final one has a bias.
            if has_bias {
                break out;
            }
            blocks.push(0);
        }
        if blocks.len() > MAX_CONFIG_BLOCKS {
            return Err(bad(format!("more than {MAX_CONFIG_BLOCKS} levels")));
        }
        k += 1;
    };
    Ok(Inferred {
        width,
        blocks,
        first_in,
        last_out,
    })
}

/// A single file's layout and the config its shapes describe.
pub fn infer_single_file(
    shapes: &HashMap<String, Vec<i64>>,
) -> Result<(TinyVaeLayout, TinyVaeConfig, TinyVaeParts)> {
    let has_prefix = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    let (layout, parts) = if has_prefix("encoder.layers.") || has_prefix("decoder.layers.") {
        let parts = TinyVaeParts {
            encoder: has_prefix("encoder.layers."),
            decoder: has_prefix("decoder.layers."),
        };
        (TinyVaeLayout::Diffusers, parts)
    } else if shapes.contains_key("0.weight") {
        let parts = TinyVaeParts {
            encoder: true,
            decoder: false,
        };
        (TinyVaeLayout::OriginalEncoder, parts)
    } else if shapes.contains_key("1.weight") {
        let parts = TinyVaeParts {
            encoder: false,
            decoder: true,
        };
        (TinyVaeLayout::OriginalDecoder, parts)
    } else {
        return Err(Error::bad_model(
            "not a tiny autoencoder: no `encoder.layers.` / `decoder.layers.` tensors and no \
             original-layout first convolution (`0.weight` or `1.weight`)"
                .to_string(),
        ));
    };
    let max_index = shapes.len() + 2;
    let mut config = TinyVaeConfig::default();
    for (side, present) in [("encoder", parts.encoder), ("decoder", parts.decoder)] {
        if !present {
            continue;
        }
        let shape = |i: usize, suffix: &str| {
            let name = format!("{side}.layers.{i}.{suffix}");
            shapes.get(&layout.key_of(&name)).cloned()
        };
        let inferred = infer_side(side, &shape, side == "decoder", max_index)?;
        let levels = inferred.blocks.len();
        let widths = vec![inferred.width; levels];
        if side == "encoder" {
            config.in_channels = inferred.first_in;
            config.latent_channels = inferred.last_out;
            config.encoder_block_out_channels = widths;
            config.num_encoder_blocks = inferred.blocks;
        } else {
            config.latent_channels = inferred.first_in;
            config.out_channels = inferred.last_out;
            config.decoder_block_out_channels = widths;
            config.num_decoder_blocks = inferred.blocks;
        }
    }
    config.validate()?;
    Ok((layout, config, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes_of(c: &TinyVaeConfig, parts: TinyVaeParts) -> HashMap<String, Vec<i64>> {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _model = AutoencoderTiny::new(vs.root(), c, parts).unwrap();
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect()
    }

    /// Every layout's keys, written from a config, read back as that config.
    #[test]
    fn single_file_shapes_give_back_their_config() {
        for (enc, dec) in [
            (vec![1, 3, 3, 3], vec![3, 3, 3, 1]),
            (vec![1, 2], vec![2, 1]),
            (vec![0, 1, 2], vec![2, 0, 1]),
        ] {
            let config = TinyVaeConfig {
                encoder_block_out_channels: vec![8; enc.len()],
                decoder_block_out_channels: vec![8; dec.len()],
                num_encoder_blocks: enc.clone(),
                num_decoder_blocks: dec.clone(),
                latent_channels: 16,
                ..TinyVaeConfig::default()
            };
            let both = TinyVaeParts {
                encoder: true,
                decoder: true,
            };
            let diffusers = shapes_of(&config, both);
            let (layout, got, parts) = infer_single_file(&diffusers).unwrap();
            assert_eq!((layout, parts), (TinyVaeLayout::Diffusers, both));
            assert_eq!(got.num_encoder_blocks, enc);
            assert_eq!(got.num_decoder_blocks, dec);
            assert_eq!(got.latent_channels, 16);
            for (layout, parts) in [
                (
                    TinyVaeLayout::OriginalDecoder,
                    TinyVaeParts {
                        encoder: false,
                        decoder: true,
                    },
                ),
                (
                    TinyVaeLayout::OriginalEncoder,
                    TinyVaeParts {
                        encoder: true,
                        decoder: false,
                    },
                ),
            ] {
                let original: HashMap<_, _> = shapes_of(&config, parts)
                    .into_iter()
                    .map(|(k, v)| (layout.key_of(&k), v))
                    .collect();
                let (l, got, p) = infer_single_file(&original).unwrap();
                assert_eq!((l, p), (layout, parts));
                if parts.decoder {
                    assert_eq!(got.num_decoder_blocks, dec);
                } else {
                    assert_eq!(got.num_encoder_blocks, enc);
                }
            }
        }
    }

    #[test]
    fn original_decoder_keys_are_one_higher() {
        let l = TinyVaeLayout::OriginalDecoder;
        assert_eq!(l.key_of("decoder.layers.0.weight"), "1.weight");
        assert_eq!(l.key_of("decoder.layers.12.conv.4.bias"), "13.conv.4.bias");
        assert_eq!(
            TinyVaeLayout::OriginalEncoder.key_of("encoder.layers.3.conv.0.weight"),
            "3.conv.0.weight"
        );
    }
}
