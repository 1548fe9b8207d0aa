//! A small convolutional image encoder and CLIP's contrastive head, used only to train our own
//! text encoder (`sd train`); nothing here is shipped or loaded for inference.
//!
//! The image tower: a 3x3 convolution, then per level a stride-2 3x3 convolution and a
//! residual 3x3 convolution (group norm + SiLU before each), global average pooling and a
//! linear projection. The head: CLIP's `text_projection` / `visual_projection` (no bias) and
//! the learnt temperature `logit_scale`, with the symmetric cross-entropy loss.
use super::blocks::{Conv2d, GroupNorm, Linear};
use crate::{Error, Result};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClipVisionConfig {
    /// Channels of each level (each level halves the resolution).
    pub channels: Vec<i64>,
    pub norm_num_groups: i64,
    /// Width of the shared embedding space.
    pub projection_dim: i64,
}

#[derive(Debug)]
struct Level {
    norm_down: GroupNorm,
    down: Conv2d,
    norm: GroupNorm,
    conv: Conv2d,
}

/// The image tower.
#[derive(Debug)]
pub struct ClipImageEncoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    width: i64,
}

impl ClipImageEncoder {
    /// Variables live under `vs` (`vision_model.` in the training checkpoint).
    pub fn new(vs: nn::Path, c: &ClipVisionConfig) -> Result<Self> {
        if c.channels.is_empty() || c.channels.iter().any(|&ch| ch % c.norm_num_groups != 0) {
            return Err(Error::bad_model(format!(
                "image encoder channels {:?} must be non-empty multiples of {} groups",
                c.channels, c.norm_num_groups
            )));
        }
        let g = c.norm_num_groups;
        let mut prev = c.channels[0];
        let mut levels = Vec::new();
        for (i, &ch) in c.channels.iter().enumerate() {
            let lvs = &vs / "levels" / i;
            levels.push(Level {
                norm_down: GroupNorm::new(&lvs / "norm_down", g, prev, 1e-5),
                down: Conv2d::new(&lvs / "down", prev, ch, 3, 2, 1),
                norm: GroupNorm::new(&lvs / "norm", g, ch, 1e-5),
                conv: Conv2d::new(&lvs / "conv", ch, ch, 3, 1, 1),
            });
            prev = ch;
        }
        Ok(Self {
            conv_in: Conv2d::new(&vs / "conv_in", 3, c.channels[0], 3, 1, 1),
            levels,
            norm_out: GroupNorm::new(&vs / "norm_out", g, prev, 1e-5),
            width: prev,
        })
    }

    /// Pooled features `[b, width]` of images `[b, 3, h, w]` in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(images)?;
        for l in &self.levels {
            h = l.down.forward(&l.norm_down.forward(&h)?.f_silu()?)?;
            let r = l.conv.forward(&l.norm.forward(&h)?.f_silu()?)?;
            h = h.f_add(&r)?;
        }
        let h = self.norm_out.forward(&h)?.f_silu()?;
        Ok(h.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?)
    }

    pub fn width(&self) -> i64 {
        self.width
    }
}

/// CLIP's projections into the shared space and its temperature.
#[derive(Debug)]
pub struct ContrastiveHead {
    text_projection: Linear,
    visual_projection: Linear,
    pub logit_scale: Tensor,
}

impl ContrastiveHead {
    pub fn new(vs: nn::Path, text_width: i64, image_width: i64, dim: i64) -> Self {
        Self {
            text_projection: Linear::new(&vs / "text_projection", text_width, dim, false),
            visual_projection: Linear::new(&vs / "visual_projection", image_width, dim, false),
            // CLIP's initial temperature, 1 / 0.07.
            logit_scale: vs.var("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln())),
        }
    }

    /// Unit-length text embeddings from the pooled text features `[b, text_width]`.
    pub fn embed_text(&self, pooled: &Tensor) -> Result<Tensor> {
        normalize(&self.text_projection.forward(pooled)?)
    }

    /// Unit-length image embeddings from the pooled image features `[b, image_width]`.
    pub fn embed_image(&self, pooled: &Tensor) -> Result<Tensor> {
        normalize(&self.visual_projection.forward(pooled)?)
    }

    /// `logits[i][j] = exp(logit_scale) * <image_i, text_j>` (the scale capped at 100).
    pub fn logits(&self, image_emb: &Tensor, text_emb: &Tensor) -> Result<Tensor> {
        let scale = self.logit_scale.f_clamp_max(100f64.ln())?.f_exp()?;
        Ok(image_emb.f_matmul(&text_emb.f_tr()?)?.f_mul(&scale)?)
    }

    /// The symmetric contrastive loss: cross-entropy of each image over the texts and of each
    /// text over the images, the matching pairs being the diagonal.
    pub fn loss(&self, image_emb: &Tensor, text_emb: &Tensor) -> Result<Tensor> {
        let logits = self.logits(image_emb, text_emb)?;
        let n = logits.size()[0];
        let labels = Tensor::f_arange(n, (Kind::Int64, logits.device()))?;
        let ce = |l: &Tensor| -> Result<Tensor> {
            Ok(l.f_log_softmax(-1, Kind::Float)?.f_nll_loss::<Tensor>(
                &labels,
                None,
                tch::Reduction::Mean,
                -100,
            )?)
        };
        let a = ce(&logits)?;
        let b = ce(&logits.f_tr()?)?;
        Ok(a.f_add(&b)?.f_mul_scalar(0.5)?)
    }
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .f_square()?
        .f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Float)?
        .f_add_scalar(1e-12)?
        .f_sqrt()?;
    Ok(x.f_div(&norm)?)
}
