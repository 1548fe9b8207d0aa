//! Layers shared by the UNet, the VAE and the text encoder. Each holds its variables in the
//! `VarStore` under diffusers' names, so weights load by name, and every forward is fallible.
use super::adapters::{self, LayerId, LayerShape};
use super::bf16_cpu;
use super::int8::{self, Int8Linear};
use super::packed;
use crate::Result;
use std::sync::OnceLock;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

thread_local! {
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, models built on this thread get uninitialised variables
/// instead of random ones: loading overwrites every variable (or points it into the weight
/// file), random initialisation of a full-size model costs seconds, and memory that is never
/// written is never resident.
pub fn skip_random_init() -> FlagGuard {
    FlagGuard::set(&SKIP_INIT, true)
}

/// Sets a thread-local switch for as long as it lives, then restores the previous value (the
/// build-time and per-call switches of the models: [`skip_random_init`], [`pack_weights`],
/// [`super::int8::enable`]).
pub struct FlagGuard {
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    previous: bool,
}

impl FlagGuard {
    pub(crate) fn set(
        flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
        value: bool,
    ) -> Self {
        Self {
            flag,
            previous: flag.with(|f| f.replace(value)),
        }
    }
}

impl Drop for FlagGuard {
    fn drop(&mut self) {
        self.flag.with(|f| f.set(self.previous));
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
        return Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu));
    }
    let var = if SKIP_INIT.with(|s| s.get()) {
        vs.add(name, Tensor::empty(dims, (vs.kind(), vs.device())), true)
    } else if let Init::Const(_) = init {
        vs.var(name, dims, init)
    } else {
        // A random initialisation draws from libtorch's global generator: under the library's
        // lock, so that building a model never lands inside another thread's seeded draws.
        let _guard = crate::rng::GLOBAL_RNG.lock();
        vs.var(name, dims, init)
    };
    if crate::weights::worth_mapping(&var) {
        MAPPED.with(|m| {
            if let Some(list) = m.borrow_mut().as_mut() {
                // The same variable: loading later points it into the file, and this sees it.
                list.push(var.shallow_clone());
            }
        });
    }
    var
}

thread_local! {
    /// The variables loading may point into a weight file, while [`collect_mapped`] runs.
    static MAPPED: std::cell::RefCell<Option<Vec<Tensor>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `build` and returns what it built with the variables it created that loading may
/// point into a weight file's map ([`crate::weights::MappedWeights`]). Calls nest: an outer
/// call also gets what an inner one collected.
pub fn collect_mapped<T>(build: impl FnOnce() -> T) -> (T, crate::weights::MappedWeights) {
    /// Puts the outer call's list back, even if `build` panics.
    struct Restore(Option<Vec<Tensor>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            MAPPED.with(|m| *m.borrow_mut() = self.0.take());
        }
    }
    let mut restore = Restore(MAPPED.with(|m| m.borrow_mut().replace(Vec::new())));
    let built = build();
    let collected = MAPPED.with(|m| m.borrow_mut().take()).unwrap_or_default();
    if let Some(outer) = restore.0.as_mut() {
        outer.extend(collected.iter().map(Tensor::shallow_clone));
    }
    drop(restore);
    (built, crate::weights::MappedWeights::new(collected))
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

thread_local! {
    static PACK_WEIGHTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, linear and convolution layers built on this thread run in
/// float32 on the CPU from weights packed once into oneDNN's layout ([`packed`]); the loader
/// turns it on unless [`crate::pipeline::LoadOptions::pack_weights`] is off. Layers built
/// otherwise (training, tests that build models in memory) keep the plain path, which
/// autograd needs.
pub fn pack_weights(enabled: bool) -> FlagGuard {
    FlagGuard::set(&PACK_WEIGHTS, enabled)
}

/// A layer's weight packed for float32 on the CPU, made the first time the layer runs there.
#[derive(Debug)]
struct PackedWeight {
    allowed: bool,
    /// The weight's element count, kept because packing may empty the dense tensor.
    numel: usize,
    /// The packed weight and whether the dense one was emptied when it was made; `None` when
    /// packing failed (a libtorch without oneDNN, say), which leaves the layer on the plain path.
    form: OnceLock<Option<(Tensor, bool)>>,
}

impl PackedWeight {
    fn new(weight: &Tensor) -> Self {
        Self {
            allowed: PACK_WEIGHTS.with(|p| p.get()),
            numel: weight.numel(),
            form: OnceLock::new(),
        }
    }

    /// The packed weight to run `xs` with (made by `pack` the first time it pays), or `None`
    /// for the plain path. Packing pays where the input is no larger than the weight (the deep,
    /// low-resolution layers, where the plain kernels' per-call weight reorder dominates); on
    /// large activations oneDNN's packed kernels were up to 1.25x slower than the plain ones
    /// (single layers timed on a 2-core AVX2 machine), so such calls stay plain. The choice
    /// depends on this input alone, never on what ran before: the two kernels round
    /// differently, and a call's image must not depend on the calls before it (a plain call
    /// after the dense weight was emptied rebuilds it, see [`PackedWeight::dense`]).
    fn get(
        &self,
        weight: &Tensor,
        xs: &Tensor,
        pack: impl FnOnce() -> std::result::Result<Tensor, String>,
    ) -> Option<&Tensor> {
        let eligible = self.allowed
            && xs.device() == Device::Cpu
            && xs.kind() == Kind::Float
            && !xs.requires_grad()
            && weight.device() == Device::Cpu
            && weight.kind() == Kind::Float;
        if !eligible {
            return None;
        }
        let pays = xs.numel() <= self.numel;
        let form = match self.form.get() {
            Some(form) => form,
            None if !pays => return None,
            None => self.form.get_or_init(|| {
                let packed = pack().ok()?;
                let emptied = packed::release_dense(weight);
                // float32: the only kind that packs.
                crate::runtime::release_cached_memory_every(self.numel.saturating_mul(4));
                Some((packed, emptied))
            }),
        };
        match form {
            Some((packed, _)) if pays => Some(packed),
            _ => None,
        }
    }

    /// The dense weight: `weight` itself, or, once packing has emptied it, rebuilt from the
    /// packed copy.
    fn dense(&self, weight: &Tensor) -> Result<Tensor> {
        match self.form.get() {
            Some(Some((packed, true))) => packed::to_dense(packed).map_err(|why| {
                crate::Error::Internal(format!(
                    "unpacking a packed {:?} weight: {why}",
                    packed.size()
                ))
            }),
            _ => Ok(weight.shallow_clone()),
        }
    }
}

fn kaiming() -> Init {
    random_init(nn::init::DEFAULT_KAIMING_UNIFORM)
}

/// `y = x W^T + b`: from the packed weight in float32 on the CPU ([`pack_weights`]), through
/// `at::linear` elsewhere, or, while the int8 fast mode is on ([`int8::enable`]), through the
/// layer's int8 form on the CPU.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    packed: PackedWeight,
    /// The int8 form, packed the first time the layer runs in that mode.
    int8: OnceLock<std::result::Result<Int8Linear, String>>,
    adapter: LayerId,
}

impl Linear {
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = variable(&vs, "weight", &[out_dim, in_dim], kaiming());
        let bias = bias.then(|| variable(&vs, "bias", &[out_dim], Init::Const(0.)));
        let packed = PackedWeight::new(&weight);
        let adapter = adapters::register(&vs, LayerShape::Linear { in_dim, out_dim });
        Self {
            weight,
            bias,
            packed,
            int8: OnceLock::new(),
            adapter,
        }
    }

    /// The layer's output plus the deltas of the LoRAs installed for this call
    /// ([`adapters::activate`]).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        adapters::add_deltas(self.adapter, xs, self.forward_own(xs)?, None)
    }

    fn forward_own(&self, xs: &Tensor) -> Result<Tensor> {
        if int8::enabled()
            && self.weight.device() == Device::Cpu
            && self.weight.kind() == Kind::Float
            && xs.kind() == Kind::Float
        {
            let packed = self.int8.get_or_init(|| {
                let weight = self.packed.dense(&self.weight).map_err(|e| e.to_string())?;
                Int8Linear::pack(&weight, self.bias.as_ref()).map_err(|e| e.to_string())
            });
            return match packed {
                Ok(layer) => layer.forward(xs),
                Err(why) => Err(crate::Error::Unsupported(why.clone())),
            };
        }
        let packed = self
            .packed
            .get(&self.weight, xs, || packed::pack_linear(&self.weight));
        if let Some(ys) = packed.and_then(|p| packed::linear(xs, p, self.bias.as_ref()).ok()) {
            return Ok(ys);
        }
        bf16_cpu::linear(xs, &self.packed.dense(&self.weight)?, self.bias.as_ref())
    }
}

/// A 2-D convolution (square kernel, no dilation, one group), from the packed weight in
/// float32 on the CPU ([`pack_weights`]).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    packed: PackedWeight,
    adapter: LayerId,
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
        Self::with_bias(vs, in_c, out_c, kernel, stride, padding, true)
    }

    /// [`Conv2d::new`], with a bias only when `bias` is set.
    pub fn with_bias(
        vs: nn::Path,
        in_c: i64,
        out_c: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        bias: bool,
    ) -> Self {
        let weight = variable(&vs, "weight", &[out_c, in_c, kernel, kernel], kaiming());
        let bias = bias.then(|| variable(&vs, "bias", &[out_c], Init::Const(0.)));
        let packed = PackedWeight::new(&weight);
        let shape = LayerShape::Conv {
            in_c,
            out_c,
            kernel,
            stride,
            padding,
        };
        let adapter = adapters::register(&vs, shape);
        Self {
            weight,
            bias,
            stride,
            padding,
            packed,
            adapter,
        }
    }

    /// The layer's output plus the deltas of the LoRAs installed for this call
    /// ([`adapters::activate`]). While [`wrap_around`] is in force, the input is padded
    /// circularly along the wrapping axes (zeros along the others) and convolved without
    /// padding, so the deltas see the same wrapped input.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let wrapped = match self.padding {
            0 => None,
            p => wrap_padding(xs, p)?,
        };
        let (xs, padding) = match &wrapped {
            Some(padded) => (padded, 0),
            None => (xs, self.padding),
        };
        let conv = Some((self.stride, padding));
        adapters::add_deltas(self.adapter, xs, self.forward_own(xs, padding)?, conv)
    }

    fn forward_own(&self, xs: &Tensor, padding: i64) -> Result<Tensor> {
        let stride = self.stride;
        let packed = self.packed.get(&self.weight, xs, || {
            packed::pack_conv(&self.weight, &xs.size(), stride, padding)
        });
        // A packed call that fails (an input the packed layout cannot take) falls back to the
        // plain convolution, which names any real problem with the input.
        let bias = self.bias.as_ref();
        if let Some(ys) = packed.and_then(|p| packed::conv(xs, p, bias, stride, padding).ok()) {
            return Ok(ys);
        }
        bf16_cpu::conv2d(
            xs,
            &self.packed.dense(&self.weight)?,
            self.bias.as_ref(),
            stride,
            padding,
        )
    }
}

/// Which axes of the image wrap around: seamless tiling, as A1111's "Tiling" (every
/// convolution padded circularly instead of with zeros) or only along one axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seamless {
    /// Left and right edges meet.
    pub x: bool,
    /// Top and bottom edges meet.
    pub y: bool,
}

impl Seamless {
    pub const OFF: Seamless = Seamless { x: false, y: false };
    pub const XY: Seamless = Seamless { x: true, y: true };

    pub fn is_off(self) -> bool {
        !self.x && !self.y
    }

    /// `x`, `y`, `xy` (or `yx`, `both`) and `none` / `off`, as the CLI spells them.
    pub fn parse(text: &str) -> Option<Self> {
        let (x, y) = match text.trim().to_ascii_lowercase().as_str() {
            "x" => (true, false),
            "y" => (false, true),
            "xy" | "yx" | "both" => (true, true),
            "none" | "off" | "" => (false, false),
            _ => return None,
        };
        Some(Self { x, y })
    }

    /// The spelling [`Seamless::parse`] reads back (`none` when off).
    pub fn name(self) -> &'static str {
        match (self.x, self.y) {
            (true, true) => "xy",
            (true, false) => "x",
            (false, true) => "y",
            (false, false) => "none",
        }
    }
}

thread_local! {
    static WRAP_X: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static WRAP_Y: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guards live, every [`Conv2d`] with padding that runs on this thread
/// wraps around the axes `seamless` names (a per-call switch: the pipeline installs it for
/// the UNet and VAE calls of a run, so nothing is rebuilt and other threads are untouched).
pub fn wrap_around(seamless: Seamless) -> [FlagGuard; 2] {
    [
        FlagGuard::set(&WRAP_X, seamless.x),
        FlagGuard::set(&WRAP_Y, seamless.y),
    ]
}

/// `xs` padded by `p` on each side for a convolution while [`wrap_around`] is in force:
/// circularly along the wrapping axes, with zeros along the others (`None` when nothing
/// wraps, so the convolution pads as usual).
fn wrap_padding(xs: &Tensor, p: i64) -> Result<Option<Tensor>> {
    let (x, y) = (WRAP_X.with(|w| w.get()), WRAP_Y.with(|w| w.get()));
    if !x && !y {
        return Ok(None);
    }
    let size = xs.size();
    if size.len() != 4 || (x && size[3] < p) || (y && size[2] < p) {
        return Err(crate::Error::invalid(format!(
            "seamless tiling needs at least {p} cells along each wrapping axis of a \
             convolution's input, got {size:?}"
        )));
    }
    let mode = |wraps: bool| if wraps { "circular" } else { "constant" };
    let value = |wraps: bool| if wraps { None } else { Some(0.0) };
    let padded = xs.f_pad([p, p, 0, 0], mode(x), value(x))?;
    Ok(Some(padded.f_pad([0, 0, p, p], mode(y), value(y))?))
}

/// `fresh + other`, written into `fresh` (a tensor no one else holds, with the result's shape)
/// when no gradient is recorded: one full-size allocation less. The same sum either way.
pub fn add_into(mut fresh: Tensor, other: &Tensor) -> Result<Tensor> {
    if fresh.requires_grad() || other.requires_grad() {
        Ok(fresh.f_add(other)?)
    } else {
        Ok(fresh.f_add_(other)?)
    }
}

/// The same `[b, c, h, w]` tensor with channels-last (NHWC) strides. Convolutions, GroupNorm
/// and nearest upsampling keep that layout, and oneDNN then runs the convolutions without
/// reordering large activations to and from its blocked layout at every call: about 10 % of a
/// 512x512 VAE decode on the CPU. Values are unchanged.
pub fn channels_last(xs: &Tensor) -> Result<Tensor> {
    Ok(xs
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
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

    /// `silu(group_norm(xs))`, activated in place on the fresh normalised tensor when no
    /// gradient is recorded: one full-size buffer less per call (at 512x512 in the VAE a 128
    /// MiB allocation whose pages would be faulted in).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        let mut normed = self.forward(xs)?;
        if normed.requires_grad() {
            Ok(normed.f_silu()?)
        } else {
            Ok(normed.f_silu_()?)
        }
    }

    /// [`GroupNorm::forward_silu`] in `xs`'s own memory, for a caller that gives `xs` up: no
    /// second buffer of its size (in the VAE decoder at 512x512, up to 256 MiB). For a float32
    /// channels-last `[n, c, h, w]` tensor, with no gradient recorded: per-channel sums and sums of
    /// squares over slices of pixels (a few MiB of scratch, accumulated in float64), then one
    /// scale and shift per channel and the SiLU, in place; the same values as `group_norm` to
    /// rounding. libtorch's `var_mean` and `vector_norm` over these strides took 4-7x the
    /// time of `group_norm` itself. Anything else goes through [`GroupNorm::forward_silu`].
    pub fn forward_silu_owned(&self, xs: Tensor) -> Result<Tensor> {
        let Some((n, c, pixels)) = channels_last_rows(&xs)? else {
            return self.forward_silu(&xs);
        };
        let g = self.groups;
        if xs.requires_grad() || xs.kind() != Kind::Float || g <= 0 || c % g != 0 {
            return self.forward_silu(&xs);
        }
        let hw = pixels.size()[1];
        let opts = (Kind::Double, xs.device());
        let (mut sum, mut squares) = (
            Tensor::f_zeros([n, c], opts)?,
            Tensor::f_zeros([n, c], opts)?,
        );
        // About 4 MiB of float32 per slice.
        let rows = (1i64 << 20).checked_div(c).unwrap_or(1).max(1);
        let mut start = 0;
        while start < hw {
            let part = pixels.f_narrow(1, start, rows.min(hw - start))?;
            let _ = sum.f_add_(&part.f_sum_dim_intlist(1, false, Kind::Double)?)?;
            let _ =
                squares.f_add_(&part.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?)?;
            start += rows;
        }
        let count = (c / g * hw) as f64;
        let per_group = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_view([n, g, c / g])?
                .f_sum_dim_intlist(2, true, Kind::Double)?
                .f_div_scalar(count)?)
        };
        let mean = per_group(&sum)?;
        let var = per_group(&squares)?
            .f_sub(&mean.f_square()?)?
            .f_clamp_min(0.0)?;
        let rstd = var.f_add_scalar(self.eps)?.f_rsqrt()?;
        let weight = self.weight.f_to_kind(Kind::Double)?.f_view([1, g, c / g])?;
        let bias = self.bias.f_to_kind(Kind::Double)?.f_view([1, g, c / g])?;
        let scale = weight.f_mul(&rstd)?;
        let shift = bias.f_sub(&mean.f_mul(&scale)?)?;
        // A gradient recorded through the affine parameters needs `xs` as it was: `xs` is
        // still untouched here.
        if scale.requires_grad() || shift.requires_grad() {
            return self.forward_silu(&xs);
        }
        let per_channel = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([n, c, 1, 1])?.f_to_kind(Kind::Float)?)
        };
        let mut out = xs;
        let _ = out
            .f_mul_(&per_channel(scale)?)?
            .f_add_(&per_channel(shift)?)?
            .f_silu_()?;
        Ok(out)
    }
}

/// For a channels-last `[n, c, h, w]` tensor, `(n, c, rows)` with `rows` its `[n, h*w, c]`
/// view (one row per pixel); `None` for any other layout.
fn channels_last_rows(xs: &Tensor) -> Result<Option<(i64, i64, Tensor)>> {
    let Ok((n, c, h, w)) = xs.size4() else {
        return Ok(None);
    };
    if xs.stride() != [h * w * c, 1, w * c, c] || n * c * h * w == 0 {
        return Ok(None);
    }
    Ok(Some((
        n,
        c,
        xs.f_permute([0, 2, 3, 1])?.f_view([n, h * w, c])?,
    )))
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
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_scaled_dot_product_attention(
            &split(q)?,
            &split(k)?,
            &split(v)?,
            None::<Tensor>,
            0.0,
            causal,
            None,
            false,
        )?)
    };
    let out = if bf16_cpu::widens(q) {
        use bf16_cpu::wide;
        attend(&wide(q)?, &wide(k)?, &wide(v)?)?.f_to_kind(Kind::BFloat16)?
    } else {
        attend(q, k, v)?
    };
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
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = self.add_time(h, temb_silu)?;
        let normed = self.norm2.forward_silu(&h)?;
        drop(h); // a shadowed binding would live to the end of the function
        let h = self.conv2.forward(&normed)?;
        drop(normed);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.shallow_clone(),
        };
        self.output(add_into(h, &shortcut)?)
    }

    /// [`ResnetBlock2D::forward`] for a caller that gives `xs` up (its memory shared with no
    /// other tensor), normalising in place ([`GroupNorm::forward_silu_owned`]): the shortcut
    /// convolution, when there is one, runs first so that `xs` is needed by nothing else, and
    /// the first convolution's output is normalised in its own memory. Fewer large buffers
    /// live at once: the VAE decoder's largest resnet at 512x512 held 0.63 GiB, now 0.5 GiB.
    /// The same values to rounding.
    pub fn forward_owned(&self, xs: Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let (shortcut, h) = match &self.conv_shortcut {
            Some(conv) => {
                let shortcut = conv.forward(&xs)?;
                let h = self.conv1.forward(&self.norm1.forward_silu_owned(xs)?)?;
                (shortcut, h)
            }
            None => {
                let h = self.conv1.forward(&self.norm1.forward_silu(&xs)?)?;
                (xs, h)
            }
        };
        let h = self.add_time(h, temb_silu)?;
        let h = self.conv2.forward(&self.norm2.forward_silu_owned(h)?)?;
        self.output(add_into(h, &shortcut)?)
    }

    /// `h` plus the projected time embedding, when the block has one.
    fn add_time(&self, h: Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        match (&self.time_emb_proj, temb_silu) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(temb)?;
                add_into(h, &t.f_unsqueeze(-1)?.f_unsqueeze(-1)?)
            }
            _ => Ok(h),
        }
    }

    fn output(&self, out: Tensor) -> Result<Tensor> {
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
        self.forward_owned(xs.shallow_clone(), size)
    }

    /// [`Upsample2D::forward`] letting go of `xs` once it is upsampled, before the convolution
    /// (its memory is freed there when the caller held no other handle to it).
    pub fn forward_owned(&self, xs: Tensor, size: Option<(i64, i64)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.size4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = xs.f_upsample_nearest2d([oh, ow], None, None)?;
        drop(xs);
        self.conv.forward(&up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: i64, dims: &[i64]) -> Tensor {
        let _lock = crate::rng::GLOBAL_RNG.lock();
        tch::manual_seed(seed);
        Tensor::randn(dims, (Kind::Float, Device::Cpu))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The in-place GroupNorm+SiLU and the resnet and upsample that give up their input equal
    /// libtorch's `group_norm` path (to rounding) for seeded shapes, groups, affine parameters
    /// and input offsets: in `xs`'s own memory for channels-last float32 inputs, through the
    /// ordinary path for any other layout.
    #[test]
    fn owned_forwards_match_the_borrowing_ones() {
        let _g = tch::no_grad_guard();
        let mut rng = crate::train::dataset::Rng::new(0x6e0);
        for case in 0..12i64 {
            let groups = [1, 2, 4, 8][rng.below(4)];
            let c = groups * (1 + rng.below(6) as i64);
            let (n, h, w) = (
                1 + rng.below(2) as i64,
                1 + rng.below(24) as i64,
                1 + rng.below(24) as i64,
            );
            let vs = nn::VarStore::new(Device::Cpu);
            let norm = GroupNorm::new(vs.root() / "n", groups, c, 1e-6);
            let _ = norm.weight.shallow_clone().copy_(&seeded(case + 50, &[c]));
            let _ = norm.bias.shallow_clone().copy_(&seeded(case + 60, &[c]));
            // An offset far from zero: the variance must not come from cancelling large sums.
            let offset = [0.0, 3.0, -40.0][rng.below(3)];
            let plain = seeded(case, &[n, c, h, w]) * (0.5 + case as f64) + offset;
            let expected = norm.forward_silu(&plain).unwrap();
            let scale = expected.abs().max().double_value(&[]).max(1.0);

            let nhwc = channels_last(&plain).unwrap();
            let address = nhwc.data_ptr();
            let out = norm.forward_silu_owned(nhwc).unwrap();
            let err = max_diff(&out, &expected);
            assert!(
                err <= 1e-5 * scale,
                "case {case}: in-place norm differs by {err}"
            );
            assert_eq!(
                out.data_ptr(),
                address,
                "case {case}: not computed in place"
            );
            assert_eq!(
                out.stride(),
                [h * w * c, 1, w * c, c],
                "case {case}: layout"
            );

            let contiguous = norm.forward_silu_owned(plain.copy()).unwrap();
            assert!(
                max_diff(&contiguous, &expected) <= 1e-6 * scale,
                "case {case}: NCHW"
            );

            let out_c = groups * (1 + rng.below(4) as i64);
            let cfg = ResnetConfig {
                groups,
                eps: 1e-6,
                temb_channels: None,
                output_scale_factor: [1.0, 2.0][rng.below(2)],
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let resnet = ResnetBlock2D::new(vs.root() / "r", c, out_c, cfg);
            let up = Upsample2D::new(vs.root() / "u", c);
            for (i, (_, var)) in vs.variables().iter().enumerate() {
                let _ = var
                    .shallow_clone()
                    .copy_(&(seeded(case * 100 + i as i64, &var.size()) * 0.3));
            }
            let expected = resnet.forward(&plain, None).unwrap();
            let scale = expected.abs().max().double_value(&[]).max(1.0);
            let out = resnet
                .forward_owned(channels_last(&plain).unwrap(), None)
                .unwrap();
            let err = max_diff(&out, &expected);
            assert!(
                err <= 1e-4 * scale,
                "case {case}: resnet {c}->{out_c} differs by {err}"
            );
            let expected = up.forward(&plain, None).unwrap();
            let out = up.forward_owned(plain.copy(), None).unwrap();
            assert!(max_diff(&out, &expected) == 0.0, "case {case}: upsample");
        }
        // With a gradient recorded through the affine parameters the input is left as it was.
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = GroupNorm::new(vs.root() / "g", 2, 4, 1e-6);
        let xs = channels_last(&seeded(7, &[1, 4, 5, 6])).unwrap();
        let kept = xs.copy();
        let out = tch::with_grad(|| norm.forward_silu_owned(xs.shallow_clone()).unwrap());
        assert!(out.requires_grad() && xs.equal(&kept));
    }

    /// Layers built to pack their weights give libtorch's plain results (to rounding) for
    /// seeded shapes, strides, paddings and batch sizes: packed by a first input no larger
    /// than the weight and then also run on larger ones, or left plain by a larger first
    /// input; the weight they started from comes back exactly.
    #[test]
    fn packed_layers_match_the_plain_kernels() {
        let _g = tch::no_grad_guard();
        let mut rng = 0x5eed_u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        for case in 0..16i64 {
            let (cin, cout) = (8 + next(40) as i64, 8 + next(40) as i64);
            let kernel = [1, 3][next(2) as usize];
            let (stride, padding) = (1 + next(2) as i64, next(2) as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let (conv, linear) = {
                let _pack = pack_weights(true);
                (
                    Conv2d::new(vs.root() / "c", cin, cout, kernel, stride, padding),
                    Linear::new(vs.root() / "l", cin, cout, case % 2 == 0),
                )
            };
            conv.weight
                .shallow_clone()
                .copy_(&seeded(case, &[cout, cin, kernel, kernel]));
            linear
                .weight
                .shallow_clone()
                .copy_(&seeded(case + 100, &[cout, cin]));
            let (conv_weight, linear_weight) = (conv.weight.copy(), linear.weight.copy());
            // Odd cases start with inputs larger than the weights: those stay plain.
            let small_first = case % 4 != 3;
            for round in 0..3 {
                let small = small_first && round == 0;
                let (batch, side) = if small {
                    // cin * side^2 <= cout * cin * kernel^2.
                    let most = ((cout * kernel * kernel) as f64).sqrt() as u64;
                    (1, kernel.max(1 + next(most) as i64))
                } else {
                    (1 + next(3) as i64, cout.max(kernel * 4) + next(13) as i64)
                };
                let xs = seeded(
                    case * 10 + round,
                    &[batch, cin, side, side + i64::from(!small)],
                );
                let want = xs.conv2d(
                    &conv_weight,
                    conv.bias.as_ref(),
                    [stride, stride],
                    [padding, padding],
                    [1, 1],
                    1,
                );
                let got = conv.forward(&xs).unwrap();
                assert_eq!(got.size(), want.size(), "case {case}");
                let err = max_diff(&got, &want);
                assert!(err <= 1e-4, "case {case} round {round}: conv off by {err}");

                let tokens = if small { 1 } else { cout + 1 + next(9) as i64 };
                let tokens = seeded(case * 10 + round + 5, &[1, tokens, cin]);
                let want = tokens.linear(&linear_weight, linear.bias.as_ref());
                let got = linear.forward(&tokens).unwrap();
                assert_eq!(got.size(), want.size(), "case {case}");
                let err = max_diff(&got, &want);
                assert!(
                    err <= 1e-4,
                    "case {case} round {round}: linear off by {err}"
                );
                if round == 0 {
                    for (what, form) in
                        [("conv", &conv.packed.form), ("linear", &linear.packed.form)]
                    {
                        assert_eq!(
                            form.get().is_some_and(|f| f.is_some()),
                            small_first,
                            "case {case}: {what} packed by a first input {}",
                            if small_first {
                                "smaller than its weight"
                            } else {
                                "larger than its weight"
                            }
                        );
                    }
                }
            }
            assert!(conv.packed.dense(&conv.weight).unwrap().equal(&conv_weight));
            assert!(linear
                .packed
                .dense(&linear.weight)
                .unwrap()
                .equal(&linear_weight));
        }
    }

    /// Without the build-time switch, or for inputs that need gradients, layers stay on the
    /// plain path and never touch their weights.
    #[test]
    fn layers_pack_only_when_asked_and_without_autograd() {
        let vs = nn::VarStore::new(Device::Cpu);
        let plain = Linear::new(vs.root() / "plain", 4, 3, true);
        let packing = {
            let _pack = pack_weights(true);
            Linear::new(vs.root() / "packing", 4, 3, true)
        };
        let xs = seeded(1, &[2, 4]).set_requires_grad(true);
        let _ = plain.forward(&xs).unwrap();
        let _ = packing.forward(&xs).unwrap();
        assert!(plain.packed.form.get().is_none() && packing.packed.form.get().is_none());
        assert_eq!(packing.weight.size(), [3, 4]);
    }

    #[test]
    fn channels_last_keeps_values_and_reorders_strides() {
        for (seed, dims) in [(1, [2, 3, 5, 7]), (2, [1, 8, 4, 4]), (3, [3, 4, 2, 9])] {
            let x = seeded(seed, &dims);
            let cl = channels_last(&x).unwrap();
            assert_eq!(cl.size(), x.size());
            let (c, w) = (dims[1], dims[3]);
            assert_eq!(cl.stride(), vec![dims[2] * w * c, 1, w * c, c]);
            assert_eq!(max_diff(&cl, &x), 0.0);
        }
    }

    #[test]
    fn in_place_shortcuts_give_the_plain_results_and_keep_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = GroupNorm::new(vs.root() / "norm", 2, 6, 1e-5);
        for seed in 0..8 {
            let x = seeded(seed, &[2, 6, 3, 4]);
            let other = seeded(seed + 100, &[2, 6, 3, 4]);
            let broadcast = seeded(seed + 200, &[2, 6, 1, 1]);
            let expected = norm.forward(&x).unwrap().silu();
            {
                let _g = tch::no_grad_guard();
                assert_eq!(max_diff(&norm.forward_silu(&x).unwrap(), &expected), 0.0);
                let other_before = other.copy();
                let sum = add_into(x.copy(), &other).unwrap();
                assert_eq!(max_diff(&sum, &(&other + &x)), 0.0);
                assert_eq!(max_diff(&other, &other_before), 0.0, "the addend changed");
                let sum = add_into(x.copy(), &broadcast).unwrap();
                assert_eq!(max_diff(&sum, &(&x + &broadcast)), 0.0);
            }
            // Under autograd the parameters' gradients must still flow through both.
            let out = add_into(norm.forward_silu(&x).unwrap(), &other).unwrap();
            out.sum(Kind::Float).backward();
            let grad = norm.weight.grad();
            assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
            let _ = norm.weight.grad().zero_();
        }
    }
}
