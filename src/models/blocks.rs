//! Layers shared by the UNet, the VAE and the text encoder. Each holds its variables in the
//! `VarStore` under diffusers' names, so weights load by name, and every forward is fallible.
use super::int8::{self, Int8Linear};
use crate::Result;
use tch::nn::{self, Init};
use tch::Tensor;

thread_local! {
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, models built on this thread get uninitialised variables
/// instead of random ones: loading overwrites every variable (or points it into the weight
/// file), random initialisation of a full-size model costs seconds, and memory that is never
/// written is never resident.
pub fn skip_random_init() -> SkipInitGuard {
    let previous = SKIP_INIT.with(|s| s.replace(true));
    SkipInitGuard { previous }
}

pub struct SkipInitGuard {
    previous: bool,
}

impl Drop for SkipInitGuard {
    fn drop(&mut self) {
        SKIP_INIT.with(|s| s.set(self.previous));
    }
}

/// `init`, or a cheap constant while [`skip_random_init`] is in force.
pub fn random_init(init: Init) -> Init {
    if SKIP_INIT.with(|s| s.get()) {
        Init::Const(0.)
    } else {
        init
    }
}

thread_local! {
    /// `Some(count)` while [`count_parameters`] runs on this thread.
    static COUNTING: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Creates variable `name` of `vs` with `dims`; while [`count_parameters`] runs, only adds its
/// element count (saturating) and returns an empty placeholder, so that a model of absurd size
/// costs nothing to measure. Every variable of our models is created through here.
pub fn variable(vs: &nn::Path, name: &str, dims: &[i64], init: Init) -> Tensor {
    let counted = COUNTING.with(|c| match c.get() {
        Some(total) => {
            let n = crate::limits::element_count(dims)
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(u64::MAX);
            c.set(Some(total.saturating_add(n)));
            true
        }
        None => false,
    });
    if counted {
        Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu))
    } else if SKIP_INIT.with(|s| s.get()) {
        vs.add(name, Tensor::empty(dims, (vs.kind(), vs.device())), true)
    } else if let Init::Const(_) = init {
        vs.var(name, dims, init)
    } else {
        // A random initialisation draws from libtorch's global generator: under the library's
        // lock, so that building a model never lands inside another thread's seeded draws.
        let _guard = crate::rng::GLOBAL_RNG.lock();
        vs.var(name, dims, init)
    }
}

/// The number of parameters the model that `build` makes would have, without allocating them:
/// the sizes of a config are checked with this before the model is built for real.
pub fn count_parameters<T>(build: impl FnOnce(nn::Path) -> crate::Result<T>) -> crate::Result<u64> {
    struct Reset(Option<u64>);
    impl Drop for Reset {
        fn drop(&mut self) {
            COUNTING.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(COUNTING.with(|c| c.replace(Some(0))));
    let vs = nn::VarStore::new(tch::Device::Cpu);
    drop(build(vs.root())?);
    Ok(COUNTING.with(|c| c.get()).unwrap_or(0))
}

fn kaiming() -> Init {
    random_init(nn::init::DEFAULT_KAIMING_UNIFORM)
}

/// `y = x W^T + b` through `at::linear` (one fused addmm on 2-D inputs), or, while the int8
/// fast mode is on ([`int8::enable`]), through the layer's int8 form on the CPU.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The int8 form, packed the first time the layer runs in that mode.
    int8: std::sync::OnceLock<std::result::Result<Int8Linear, String>>,
}

impl Linear {
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = variable(&vs, "weight", &[out_dim, in_dim], kaiming());
        let bias = bias.then(|| variable(&vs, "bias", &[out_dim], Init::Const(0.)));
        Self {
            weight,
            bias,
            int8: std::sync::OnceLock::new(),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if int8::enabled()
            && self.weight.device() == tch::Device::Cpu
            && self.weight.kind() == tch::Kind::Float
            && xs.kind() == tch::Kind::Float
        {
            let packed = self.int8.get_or_init(|| {
                Int8Linear::pack(&self.weight, self.bias.as_ref()).map_err(|e| e.to_string())
            });
            return match packed {
                Ok(layer) => layer.forward(xs),
                Err(why) => Err(crate::Error::Unsupported(why.clone())),
            };
        }
        Ok(xs.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(
        vs: nn::Path,
        in_c: i64,
        out_c: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        let weight = variable(&vs, "weight", &[out_c, in_c, kernel, kernel], kaiming());
        let bias = Some(variable(&vs, "bias", &[out_c], Init::Const(0.)));
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?)
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        let weight = variable(&vs, "weight", &[channels], Init::Const(1.));
        let bias = variable(&vs, "bias", &[channels], Init::Const(0.));
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        let weight = variable(&vs, "weight", &[dim], Init::Const(1.));
        let bias = variable(&vs, "bias", &[dim], Init::Const(0.));
        Self {
            weight,
            bias,
            dim,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}

/// Multi-head attention over `[batch, tokens, channels]`, with libtorch's fused
/// scaled-dot-product attention. Keys and values come from `context` (cross-attention)
/// or from the input itself.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
}

impl Attention {
    /// `qkv_bias`: the VAE's attention has biases on q/k/v, the UNet's does not.
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * head_dim;
        Self {
            to_q: Linear::new(&vs / "to_q", query_dim, inner, qkv_bias),
            to_k: Linear::new(&vs / "to_k", context_dim, inner, qkv_bias),
            to_v: Linear::new(&vs / "to_v", context_dim, inner, qkv_bias),
            to_out: Linear::new(&vs / "to_out" / 0, inner, query_dim, true),
            heads,
        }
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = multi_head_attention(&q, &k, &v, self.heads, false)?;
        self.to_out.forward(&out)
    }
}

/// Splits `[b, n, heads*d]` projections into heads, attends, and merges the heads back.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
) -> Result<Tensor> {
    let (b, n, inner) = q.size3()?;
    let head_dim = inner / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        let len = t.size()[1];
        Ok(t.f_view([b, len, heads, head_dim])?.f_transpose(1, 2)?)
    };
    let out = Tensor::f_scaled_dot_product_attention(
        &split(q)?,
        &split(k)?,
        &split(v)?,
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    )?;
    Ok(out.f_transpose(1, 2)?.f_reshape([b, n, inner])?)
}

/// ResnetBlock2D: two 3x3 convolutions with group norm and SiLU, the time embedding added
/// between them (UNet) or absent (VAE), and a 1x1 shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: i64,
    pub eps: f64,
    pub temb_channels: Option<i64>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, in_c: i64, out_c: i64, cfg: ResnetConfig) -> Self {
        Self {
            norm1: GroupNorm::new(&vs / "norm1", cfg.groups, in_c, cfg.eps),
            conv1: Conv2d::new(&vs / "conv1", in_c, out_c, 3, 1, 1),
            time_emb_proj: cfg
                .temb_channels
                .map(|t| Linear::new(&vs / "time_emb_proj", t, out_c, true)),
            norm2: GroupNorm::new(&vs / "norm2", cfg.groups, out_c, cfg.eps),
            conv2: Conv2d::new(&vs / "conv2", out_c, out_c, 3, 1, 1),
            conv_shortcut: (in_c != out_c)
                .then(|| Conv2d::new(&vs / "conv_shortcut", in_c, out_c, 1, 1, 0)),
            output_scale_factor: cfg.output_scale_factor,
        }
    }

    /// `temb` is the already SiLU-activated time embedding (shared by all blocks of a step).
    pub fn forward(&self, xs: &Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(xs)?.f_silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_silu) {
            let t = proj.forward(temb)?;
            h = h.f_add(&t.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.f_silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.shallow_clone(),
        };
        let out = shortcut.f_add(&h)?;
        if self.output_scale_factor != 1.0 {
            Ok(out.f_div_scalar(self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }
}

/// Stride-2 3x3 convolution. The VAE encoder pads right/bottom by one instead of all sides.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Self {
            conv: Conv2d::new(&vs / "conv", channels, channels, 3, 2, padding),
            asymmetric_pad: padding == 0,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let padded = xs.f_constant_pad_nd([0, 1, 0, 1])?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling then a 3x3 convolution. `size` gives the exact output size
/// (the skip connection's), which differs from 2x when the input had odd sides.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Self {
            conv: Conv2d::new(&vs / "conv", channels, channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(i64, i64)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.size4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = xs.f_upsample_nearest2d([oh, ow], None, None)?;
        self.conv.forward(&up)
    }
}
