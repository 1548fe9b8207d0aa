//! The TorchScript backend: the text encoder, UNet and VAE of a folder written by
//! `tools/export_torchscript.py`, run through libtorch's `CModule` behind the same model traits
//! as the native modules, so the one pipeline drives either.
//!
//! The folder holds `manifest.json` (format [`FORMAT`], version [`VERSION`]), `text_encoder.pt`,
//! `unet.pt`, `vae_encoder.pt`, `vae_decoder.pt`, `tokenizer/` and
//! `scheduler/scheduler_config.json`. Traced graphs keep the dtype and device they were traced
//! with as constants, so each module runs in its exported dtype (inputs and outputs are
//! converted from and to the dtype the pipeline asked for) and only on the device it was traced
//! for.
use super::traits::{Autoencoder, Denoiser, TextEncoder};
use super::DiagonalGaussian;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{CModule, Device, Kind, Tensor};

/// The `format` field of the manifest.
pub const FORMAT: &str = "stable-diffusion-torchscript";
/// The manifest version this library reads.
pub const VERSION: u32 = 1;
/// The manifest's file name inside an export folder.
pub const MANIFEST: &str = "manifest.json";

/// `manifest.json` of an export folder (the fields the library uses; others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// `fp32`, `fp16` or `bf16`: what the modules were traced in.
    pub dtype: String,
    /// The device the modules were traced on (`cpu`, `cuda:0`, ...); `cpu` when absent.
    #[serde(default)]
    pub device: Option<String>,
    pub unet: UNetInfo,
    pub vae: VaeInfo,
    pub text: TextInfo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetInfo {
    pub in_channels: i64,
    pub out_channels: i64,
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default)]
    pub cross_attention_dim: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeInfo {
    pub latent_channels: i64,
    pub spatial_scale: i64,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextInfo {
    pub max_position_embeddings: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    #[serde(default)]
    pub vocab_size: Option<i64>,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`; errors name the file.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let manifest: Manifest = super::config::read_json(&path)?;
        manifest.check(&path)?;
        Ok(manifest)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::bad_model(format!("{}: {what}", path.display()));
        if self.format != FORMAT {
            return Err(bad(format!(
                "format is \"{}\", expected \"{FORMAT}\"",
                self.format
            )));
        }
        if self.version != VERSION {
            return Err(Error::Unsupported(format!(
                "{}: TorchScript export version {} (this library reads version {VERSION})",
                path.display(),
                self.version
            )));
        }
        self.kind().map_err(|e| bad(e.to_string()))?;
        self.device_spec().map_err(|e| bad(e.to_string()))?;
        for (name, v) in [
            ("unet.in_channels", self.unet.in_channels),
            ("unet.out_channels", self.unet.out_channels),
            ("vae.latent_channels", self.vae.latent_channels),
            ("vae.spatial_scale", self.vae.spatial_scale),
            (
                "text.max_position_embeddings",
                self.text.max_position_embeddings,
            ),
            ("text.hidden_size", self.text.hidden_size),
            ("text.num_layers", self.text.num_layers),
        ] {
            if v <= 0 {
                return Err(bad(format!("{name} must be positive, got {v}")));
            }
        }
        if !(self.vae.scaling_factor.is_finite() && self.vae.scaling_factor > 0.0) {
            return Err(bad(format!(
                "vae.scaling_factor must be a positive number, got {}",
                self.vae.scaling_factor
            )));
        }
        if let Some(s) = self.vae.shift_factor {
            if !s.is_finite() {
                return Err(bad(format!("vae.shift_factor must be finite, got {s}")));
            }
        }
        if let Some(v) = self.text.vocab_size {
            if v <= 0 {
                return Err(bad(format!("text.vocab_size must be positive, got {v}")));
            }
        }
        if let Some(c) = self.unet.cross_attention_dim {
            if c != self.text.hidden_size {
                return Err(bad(format!(
                    "UNet cross_attention_dim {c} does not match the text encoder's hidden_size {}",
                    self.text.hidden_size
                )));
            }
        }
        if self.unet.out_channels != self.vae.latent_channels {
            return Err(bad(format!(
                "UNet out_channels {} differs from the VAE's latent_channels {}",
                self.unet.out_channels, self.vae.latent_channels
            )));
        }
        Ok(())
    }

    /// The dtype the modules were traced in.
    pub fn kind(&self) -> Result<Kind> {
        match self.dtype.as_str() {
            "fp32" | "float32" => Ok(Kind::Float),
            "fp16" | "float16" => Ok(Kind::Half),
            "bf16" | "bfloat16" => Ok(Kind::BFloat16),
            other => Err(Error::bad_model(format!(
                "dtype \"{other}\" (expected fp32, fp16 or bf16)"
            ))),
        }
    }

    /// The device the modules were traced on.
    pub fn device_spec(&self) -> Result<Device> {
        let spec = self.device.as_deref().unwrap_or("cpu");
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::bad_model(format!(
                    "device \"{s}\" (expected cpu or cuda:N)"
                ))),
            },
        }
    }
}

/// Whether `path` is a TorchScript export folder: a folder with a `manifest.json` that either
/// declares `format` [`FORMAT`] or sits in a folder that is not a diffusers folder (no
/// `model_index.json`, no `unet/`), so that a damaged manifest reaches [`Manifest::read`] and
/// its error instead of a "not a diffusers folder" one.
pub fn is_export_folder(path: &Path) -> bool {
    let manifest = path.join(MANIFEST);
    if !path.is_dir() || !manifest.is_file() {
        return false;
    }
    let declared = super::config::read_text(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(String::from));
    declared.as_deref() == Some(FORMAT)
        || (!path.join("model_index.json").is_file() && !path.join("unet").is_dir())
}

/// A loaded TorchScript module and the file it came from.
struct Module {
    module: CModule,
    path: PathBuf,
    /// The dtype the module computes in.
    kind: Kind,
    device: Device,
}

impl Module {
    fn load(dir: &Path, file: &str, kind: Kind, device: Device) -> Result<Self> {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "missing TorchScript module of the export folder",
                ),
            ));
        }
        let mut module = CModule::load_on_device(&path, device).map_err(|e| {
            Error::bad_model(format!(
                "{} is not a loadable TorchScript module: {}",
                path.display(),
                gist(e)
            ))
        })?;
        module.f_set_eval().map_err(|e| at(&path, e))?;
        // The manifest's dtype must be the parameters' dtype: the graph's constants follow it.
        let params = module.named_parameters().map_err(|e| at(&path, e))?;
        if let Some((name, p)) = params
            .iter()
            .find(|(_, p)| p.is_floating_point() && p.kind() != kind)
        {
            return Err(Error::bad_model(format!(
                "{}: parameter `{name}` is {:?}, the manifest says {kind:?}",
                path.display(),
                p.kind()
            )));
        }
        Ok(Self {
            module,
            path,
            kind,
            device,
        })
    }

    /// Runs `forward` under no_grad on inputs already converted to the module's dtype/device.
    fn forward(&self, inputs: &[Tensor]) -> Result<Tensor> {
        tch::no_grad(|| self.module.forward_ts(inputs)).map_err(|e| at(&self.path, e))
    }

    /// A floating-point input on the module's device, in its dtype.
    fn input(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A libtorch error raised while running `path`'s module, naming the file.
fn at(path: &Path, e: tch::TchError) -> Error {
    Error::Torch(tch::TchError::Torch(format!(
        "{}: {}",
        path.display(),
        gist(e)
    )))
}

/// What went wrong, without the C++ stack trace libtorch appends, and (for a failure inside the
/// TorchScript interpreter) without the serialized call stacks that precede the message.
fn gist(e: tch::TchError) -> String {
    let msg = match e {
        tch::TchError::Torch(m) => m,
        other => other.to_string(),
    };
    let msg = match msg.rfind("RuntimeError: ") {
        Some(i) => &msg[i + "RuntimeError: ".len()..],
        None => &msg[..],
    };
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .filter(|l| !l.is_empty())
        .take(4)
        .collect();
    if lines.is_empty() {
        msg.lines().next().unwrap_or("").to_string()
    } else {
        lines.join(" | ")
    }
}

/// The text encoder: `text_encoder.pt` returns every hidden state with the final layer norm
/// applied, stacked `[layers + 1, b, tokens, dim]`; `clip_skip` k takes index `layers - k`.
pub struct TorchScriptTextEncoder {
    module: Module,
    info: TextInfo,
    out_kind: Kind,
}

impl TextEncoder for TorchScriptTextEncoder {
    fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let (b, len) = input_ids.size2()?;
        let layers = self.info.num_layers;
        if len > self.info.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.info.max_position_embeddings
            )));
        }
        if clip_skip as i64 >= layers {
            return Err(Error::invalid(format!(
                "clip_skip {clip_skip} must be below the text encoder's {layers} layers"
            )));
        }
        if let Some(vocab) = self.info.vocab_size {
            let (min, max) = (
                input_ids.f_min()?.int64_value(&[]),
                input_ids.f_max()?.int64_value(&[]),
            );
            if min < 0 || max >= vocab {
                return Err(Error::invalid(format!(
                    "token id out of range [0, {vocab}): found {min}..{max}"
                )));
            }
        }
        let ids = input_ids
            .f_to_kind(Kind::Int64)?
            .f_to_device(self.module.device)?;
        let all = self.module.forward(&[ids])?;
        let want = [layers + 1, b, len, self.info.hidden_size];
        if all.size() != want {
            return Err(Error::bad_model(format!(
                "{} returned shape {:?}, expected {want:?} (all hidden states, stacked)",
                self.module.path.display(),
                all.size()
            )));
        }
        Ok(all
            .f_select(0, layers - clip_skip as i64)?
            .f_to_kind(self.out_kind)?)
    }
}

/// The UNet: `unet.pt` takes `(sample, timestep [b] float, encoder_hidden_states)`.
pub struct TorchScriptUNet {
    module: Module,
    info: UNetInfo,
    /// Features of `encoder_hidden_states`: the text encoder's hidden size.
    context_dim: i64,
}

impl Denoiser for TorchScriptUNet {
    fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = sample.size4()?;
        if c != self.info.in_channels {
            return Err(Error::invalid(format!(
                "UNet input has {c} channels, the model takes {}",
                self.info.in_channels
            )));
        }
        let (cb, _, dim) = context.size3()?;
        if cb != b {
            return Err(Error::invalid(format!(
                "UNet context batch {cb} differs from sample batch {b}"
            )));
        }
        if dim != self.context_dim {
            return Err(Error::invalid(format!(
                "UNet context has {dim} features, the model takes {}",
                self.context_dim
            )));
        }
        let t = Tensor::f_full([b], timestep, (Kind::Float, self.module.device))?;
        let out =
            self.module
                .forward(&[self.module.input(sample)?, t, self.module.input(context)?])?;
        let want = [b, self.info.out_channels, h, w];
        if out.size() != want {
            return Err(Error::bad_model(format!(
                "{} returned shape {:?}, expected {want:?}",
                self.module.path.display(),
                out.size()
            )));
        }
        Ok(out.f_to_kind(sample.kind())?)
    }

    fn in_channels(&self) -> i64 {
        self.info.in_channels
    }

    fn sample_size(&self) -> Option<i64> {
        self.info.sample_size
    }
}

/// The VAE: `vae_encoder.pt` gives the posterior's moments (after `quant_conv`),
/// `vae_decoder.pt` decodes unscaled latents (with `post_quant_conv`).
pub struct TorchScriptVae {
    encoder: Module,
    decoder: Module,
    info: VaeInfo,
}

impl Autoencoder for TorchScriptVae {
    fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (b, c, h, w) = images.size4()?;
        if c != 3 {
            return Err(Error::invalid(format!(
                "VAE encoder input has {c} channels, expected 3"
            )));
        }
        let s = self.info.spatial_scale;
        let moments = self.encoder.forward(&[self.encoder.input(images)?])?;
        let want = [b, 2 * self.info.latent_channels, h / s, w / s];
        if moments.size() != want {
            return Err(Error::bad_model(format!(
                "{} returned shape {:?}, expected {want:?}",
                self.encoder.path.display(),
                moments.size()
            )));
        }
        DiagonalGaussian::from_moments(&moments.f_to_kind(images.kind())?)
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.size4()?;
        if c != self.info.latent_channels {
            return Err(Error::invalid(format!(
                "VAE decoder input has {c} channels, the model takes {}",
                self.info.latent_channels
            )));
        }
        let s = self.info.spatial_scale;
        let images = self.decoder.forward(&[self.decoder.input(latents)?])?;
        let want = [b, 3, h * s, w * s];
        if images.size() != want {
            return Err(Error::bad_model(format!(
                "{} returned shape {:?}, expected {want:?}",
                self.decoder.path.display(),
                images.size()
            )));
        }
        Ok(images.f_to_kind(latents.kind())?)
    }

    fn latent_channels(&self) -> i64 {
        self.info.latent_channels
    }

    fn spatial_scale(&self) -> i64 {
        self.info.spatial_scale
    }

    fn scaling_factor(&self) -> f64 {
        self.info.scaling_factor
    }

    fn shift_factor(&self) -> Option<f64> {
        self.info.shift_factor
    }
}

/// The three networks of an export folder.
pub struct TorchScriptParts {
    pub manifest: Manifest,
    pub text_encoder: TorchScriptTextEncoder,
    pub unet: TorchScriptUNet,
    pub vae: TorchScriptVae,
}

impl TorchScriptParts {
    /// Loads the modules of export folder `dir` onto `device`. `kind` is the dtype the pipeline
    /// runs in; the modules compute in the manifest's dtype and convert at their boundaries.
    /// `device` must be the one the export was traced on (its graphs hold that device).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let traced_kind = manifest.kind()?;
        let traced_on = manifest.device_spec()?;
        if traced_on != device {
            return Err(Error::Unsupported(format!(
                "{} was traced on {} and cannot run on {} (TorchScript traces keep their \
                 device); export it again with tools/export_torchscript.py --device {}",
                dir.display(),
                device_name(traced_on),
                device_name(device),
                match device {
                    Device::Cuda(_) => "cuda",
                    _ => "cpu",
                },
            )));
        }
        let load = |file: &str| Module::load(dir, file, traced_kind, device);
        let text_encoder = TorchScriptTextEncoder {
            module: load("text_encoder.pt")?,
            info: manifest.text.clone(),
            out_kind: kind,
        };
        let unet = TorchScriptUNet {
            module: load("unet.pt")?,
            info: manifest.unet.clone(),
            context_dim: manifest.text.hidden_size,
        };
        let vae = TorchScriptVae {
            encoder: load("vae_encoder.pt")?,
            decoder: load("vae_decoder.pt")?,
            info: manifest.vae.clone(),
        };
        Ok(Self {
            manifest,
            text_encoder,
            unet,
            vae,
        })
    }
}
