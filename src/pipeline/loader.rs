//! Loading a diffusers model folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`).
use super::StableDiffusion;
use crate::models::{
    AutoencoderKL, ClipTextConfig, ClipTextTransformer, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightSet;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype the weights are held and run in (fp32 by default; fp16 on CUDA; bf16 on CPU).
    pub kind: Kind,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
        }
    }
}

/// Where each part of a diffusers model folder is.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
}

impl ModelFiles {
    pub fn new(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::invalid(format!(
                "model folder {} does not exist",
                root.display()
            )));
        }
        let index = root.join("model_index.json");
        if index.is_file() {
            let json: serde_json::Value = crate::models::config::read_json(&index)?;
            let class = json
                .get("_class_name")
                .and_then(|c| c.as_str())
                .unwrap_or("");
            if class.contains("XL") || class.contains("Flux") || class.contains("StableDiffusion3")
            {
                return Err(Error::Unsupported(format!(
                    "{class} models (only SD 1.x / 2.x pipelines)"
                )));
            }
        }
        for part in ["unet", "vae", "text_encoder"] {
            if !root.join(part).is_dir() {
                return Err(Error::bad_model(format!(
                    "{} has no {part}/ folder: not a diffusers Stable Diffusion folder",
                    root.display()
                )));
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn part(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn load_weights(
    vs: &mut VarStore,
    dir: &Path,
    stem: &str,
    kind: Kind,
    keys_of: impl Fn(&str) -> Vec<String>,
) -> Result<()> {
    let weights = WeightSet::find_in_dir(dir, stem)?;
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    weights.load_into_with(vs, keys_of)?;
    vs.freeze();
    Ok(())
}

/// diffusers before 0.14 named the VAE's attention `query/key/value/proj_attn`.
fn vae_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_string()];
    for (new, old) in [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ] {
        if name.contains(new) {
            keys.push(name.replace(new, old));
        }
    }
    keys
}

fn same_key(name: &str) -> Vec<String> {
    vec![name.to_string()]
}

/// transformers 4 saves `CLIPTextModel` under `text_model.`, transformers 5 without it.
fn text_encoder_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_string()];
    if let Some(bare) = name.strip_prefix("text_model.") {
        keys.push(bare.to_string());
    }
    keys
}

impl StableDiffusion {
    /// Loads a diffusers-layout Stable Diffusion folder.
    pub fn load(root: &Path, options: &LoadOptions) -> Result<Self> {
        let files = ModelFiles::new(root)?;
        let device = options.device;
        let kind = options.kind;
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::invalid(format!(
                "dtype {kind:?}: use fp32, fp16 or bf16"
            )));
        }

        let tokenizer_dir = files.part("tokenizer");
        let tokenizer = if tokenizer_dir.is_dir() {
            ClipTokenizer::from_dir(&tokenizer_dir)?
        } else {
            ClipTokenizer::standard()?
        };

        let text_dir = files.part("text_encoder");
        let text_config = ClipTextConfig::from_file(&text_dir.join("config.json"))?;
        let mut vs = VarStore::new(device);
        let text_encoder = ClipTextTransformer::new(vs.root(), &text_config)?;
        load_weights(&mut vs, &text_dir, "model", kind, text_encoder_keys)?;

        let unet_dir = files.part("unet");
        let unet_config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let mut vs = VarStore::new(device);
        let unet = UNet2DConditionModel::new(vs.root(), &unet_config)?;
        load_weights(
            &mut vs,
            &unet_dir,
            "diffusion_pytorch_model",
            kind,
            same_key,
        )?;

        let vae_dir = files.part("vae");
        let vae_config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let mut vs = VarStore::new(device);
        let vae = AutoencoderKL::new(vs.root(), &vae_config)?;
        load_weights(&mut vs, &vae_dir, "diffusion_pytorch_model", kind, vae_keys)?;

        let sched_path = files.part("scheduler").join("scheduler_config.json");
        let scheduler_config = if sched_path.is_file() {
            SchedulerConfig::from_file(&sched_path)?
        } else {
            return Err(Error::bad_model(format!(
                "missing {}",
                sched_path.display()
            )));
        };

        let cross = unet_config
            .cross_attention_dim
            .expand(unet_config.block_out_channels.len(), "cross_attention_dim")?;
        if cross.iter().any(|&c| c != text_config.hidden_size) {
            return Err(Error::bad_model(format!(
                "UNet cross_attention_dim {cross:?} does not match the text encoder's hidden_size {}",
                text_config.hidden_size
            )));
        }
        if unet_config.out_channels != vae_config.latent_channels {
            return Err(Error::bad_model(format!(
                "UNet out_channels {} differs from the VAE's latent_channels {}",
                unet_config.out_channels, vae_config.latent_channels
            )));
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device,
            kind,
            logger: None,
        })
    }
}
