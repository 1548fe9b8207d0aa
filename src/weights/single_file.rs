//! Single-file checkpoints in the original CompVis / A1111 layout (`.safetensors` or `.ckpt`):
//! the UNet under `model.diffusion_model.*` (`input_blocks` / `middle_block` / `output_blocks`,
//! `time_embed`, `out`), the VAE under `first_stage_model.*` (mid-block attention stored as 1x1
//! convolutions), and the text encoder under `cond_stage_model.transformer.*` (SD 1.x: a
//! transformers `CLIPTextModel`) or `cond_stage_model.model.*` (SD 2.x: OpenCLIP ViT-H with
//! fused `in_proj` q/k/v and one more block than SD 2 uses).
//!
//! [`Checkpoint`] maps the file and indexes its tensors without reading them; [`Layout`] detects
//! the family (SD 1.x, SD 2.x, 9-channel inpainting) from keys and shapes and gives the default
//! configs; [`ComponentSource`] translates each of our (diffusers) variable names into the
//! original key and transform (row slice of `in_proj`, 1x1 conv to linear), so the single file
//! fills the models through the same [`super::load_into_from`] as a diffusers folder, with errors
//! that name the original key. Tensors are materialised one at a time from the memory map and
//! the pages of each are released once it is copied, so loading never holds a second copy of
//! the model.
use super::ckpt;
use super::safetensors_file::{checked_shape, drop_mapped_pages, kind_of};
use super::TensorSource;
use crate::models::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::schedulers::{PredictionType, SchedulerConfig};
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

// ------------------------------------------------------------------------------------------
// Formats and options
// ------------------------------------------------------------------------------------------

/// What a model path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...).
    DiffusersFolder,
    /// One `.safetensors` file in the original CompVis / A1111 layout.
    Safetensors,
    /// One PyTorch zip checkpoint (`.ckpt`, `.pt`, `.pth`) in the original layout.
    Ckpt,
}

/// Tells a folder from a single `.safetensors` or `.ckpt` file, by content, not by name.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    if path.is_dir() {
        return Ok(ModelFormat::DiffusersFolder);
    }
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model folder or checkpoint file",
            ),
        ));
    }
    match sniff(path)? {
        Some(FileFormat::Safetensors) => Ok(ModelFormat::Safetensors),
        Some(FileFormat::Ckpt) => Ok(ModelFormat::Ckpt),
        None => Err(not_a_checkpoint(path)),
    }
}

/// Choices beyond device and dtype when loading a model.
#[derive(Debug, Clone)]
pub struct ModelOverrides {
    /// Replaces the scheduler config's `prediction_type` (any format). A single file's is
    /// otherwise detected: safetensors metadata, else v-prediction for SD 2.x text-to-image
    /// checkpoints (epsilon when a `.ckpt` says `global_step` 875000, SD 2 base), else epsilon.
    pub prediction_type: Option<PredictionType>,
    /// Single files only: a diffusers folder whose `unet/`, `vae/` and `text_encoder/`
    /// `config.json`, `tokenizer/` and `scheduler/` replace the configs detected from the file
    /// (as diffusers' `from_single_file(config=...)`).
    pub config_dir: Option<PathBuf>,
    /// Single files only: take the UNet from the EMA copy (`model_ema.*`) when the file has
    /// one. Default false: diffusers' `from_single_file`, A1111 and ComfyUI render the
    /// non-EMA weights, and users compare our images with theirs. A file that holds only the
    /// EMA copy uses it either way.
    pub use_ema: bool,
}

impl Default for ModelOverrides {
    fn default() -> Self {
        Self {
            prediction_type: None,
            config_dir: None,
            use_ema: false,
        }
    }
}

// ------------------------------------------------------------------------------------------
// The file
// ------------------------------------------------------------------------------------------

/// What a single-file checkpoint is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Safetensors,
    /// A PyTorch zip archive (`torch.save`): `data.pkl` plus one entry per storage.
    Ckpt,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum Bytes {
    /// A range of the memory map.
    Mapped { start: usize, len: usize },
    /// A range of a compressed zip entry, decompressed on demand: `entry` indexes the
    /// checkpoint's [`ckpt::ZippedStorages`].
    Zipped {
        entry: usize,
        start: usize,
        len: usize,
    },
}

/// One tensor of the file: dtype, shape, and where its bytes are. `stride` is `None` for a
/// contiguous tensor, else the element strides over the bytes (which start at the tensor's first
/// element).
#[derive(Debug, Clone)]
pub(crate) struct RawTensor {
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub stride: Option<Vec<i64>>,
    pub bytes: Bytes,
}

/// A single-file checkpoint, memory-mapped, with its tensors indexed but not read.
pub struct Checkpoint {
    path: PathBuf,
    format: FileFormat,
    mmap: Mmap,
    tensors: HashMap<String, RawTensor>,
    metadata: BTreeMap<String, String>,
    global_step: Option<i64>,
    /// The compressed storages of a `.ckpt` (none for most files), decompressed once each.
    pub(super) zipped: ckpt::ZippedStorages,
}

/// The first bytes of a file say what it is (only those are read).
pub fn sniff(path: &Path) -> Result<Option<FileFormat>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 9];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(|e| Error::io(path, e))? {
            0 => break,
            k => n += k,
        }
    }
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return Ok(Some(FileFormat::Ckpt));
    }
    if n == 9 && head[8] == b'{' {
        return Ok(Some(FileFormat::Safetensors));
    }
    Ok(None)
}

impl Checkpoint {
    /// Opens a `.safetensors` or PyTorch zip `.ckpt`/`.pt`/`.pth`, whatever its extension says.
    pub fn open(path: &Path) -> Result<Self> {
        let format = match sniff(path)? {
            Some(f) => f,
            None => return Err(not_a_checkpoint(path)),
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private map; a file truncated under us by another process is
        // outside what any reader of on-disk weights can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (tensors, metadata, global_step, zipped) = match format {
            FileFormat::Safetensors => {
                let (t, m) = index_safetensors(path, &mmap)?;
                (t, m, None, ckpt::ZippedStorages::default())
            }
            FileFormat::Ckpt => {
                let index = ckpt::index(path, &mmap)?;
                (
                    index.tensors,
                    BTreeMap::new(),
                    index.global_step,
                    index.zipped,
                )
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            format,
            mmap,
            tensors,
            metadata,
            global_step,
            zipped,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> FileFormat {
        self.format
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Number of tensors in the file.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn shape(&self, key: &str) -> Option<&[i64]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    pub fn kind(&self, key: &str) -> Option<Kind> {
        self.tensors.get(key).map(|t| t.kind)
    }

    /// The safetensors `__metadata__` (empty for `.ckpt`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The `global_step` a `.ckpt` records next to its state dict.
    pub fn global_step(&self) -> Option<i64> {
        self.global_step
    }

    /// The tensor `key` on the CPU in its stored dtype (a copy: the map is not borrowed).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        let raw = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            name: key.to_string(),
            file: self.path.display().to_string(),
        })?;
        let elt = raw.kind.elt_size_in_bytes();
        let from_bytes = |bytes: &[u8]| -> Result<Tensor> {
            Ok(match &raw.stride {
                None => {
                    // libtorch reads as many bytes as the shape says: never more than we have.
                    let needed = crate::limits::element_count(&raw.shape)
                        .and_then(|n| usize::try_from(n).ok())
                        .and_then(|n| n.checked_mul(elt));
                    if needed != Some(bytes.len()) {
                        return Err(Error::bad_model(format!(
                            "tensor `{key}` in {}: shape {:?} does not match its {} bytes",
                            self.path.display(),
                            raw.shape,
                            bytes.len()
                        )));
                    }
                    Tensor::f_from_data_size(bytes, &raw.shape, raw.kind)?
                }
                Some(stride) => {
                    let n = (bytes.len() / elt) as i64;
                    Tensor::f_from_data_size(bytes, &[n], raw.kind)?
                        .f_as_strided(&raw.shape, stride, 0)?
                        .f_contiguous()?
                }
            })
        };
        match &raw.bytes {
            Bytes::Mapped { start, len } => from_bytes(&self.mmap[*start..*start + *len]),
            Bytes::Zipped { entry, start, len } => {
                let data = self.zipped.read(&self.path, &self.mmap, *entry)?;
                let slice = data.get(*start..*start + *len).ok_or_else(|| {
                    Error::bad_model(format!(
                        "tensor `{key}` in {} points outside its storage",
                        self.path.display()
                    ))
                })?;
                from_bytes(slice)
            }
        }
    }

    /// Drops every resident page of the file's map (the other components read theirs back).
    pub fn release_all_pages(&self) {
        // Every reader copies out of the map before returning: no slice of it is alive.
        drop_mapped_pages(&self.mmap, 0, self.mmap.len());
    }

    /// Drops the resident pages of `key`'s bytes (they are read again from the file if needed),
    /// so that a loaded model does not also keep the file's pages in its RSS; for a tensor of a
    /// compressed storage that other tensors share, counts it as done, and lets the storage go
    /// once all of them are.
    pub fn release(&self, key: &str) {
        if let Some(RawTensor {
            bytes: Bytes::Zipped { entry, .. },
            ..
        }) = self.tensors.get(key)
        {
            self.zipped.release(*entry, key);
        }
        if let Some(RawTensor {
            bytes: Bytes::Mapped { start, len },
            ..
        }) = self.tensors.get(key)
        {
            // Every reader copies out of the map (`tensor` above) before returning.
            drop_mapped_pages(&self.mmap, *start, *len);
        }
    }
}

/// Says what a file that is not a checkpoint is, when it is recognisable (from its first
/// bytes only: the file may be huge).
fn not_a_checkpoint(path: &Path) -> Error {
    use std::io::Read;
    let mut head = Vec::with_capacity(8);
    let _ = std::fs::File::open(path).and_then(|f| f.take(8).read_to_end(&mut head));
    if head.starts_with(b"GGUF") {
        Error::Unsupported(format!(
            "{} is a GGUF file (llama.cpp / stable-diffusion.cpp format), not supported: use a \
             .safetensors or .ckpt checkpoint or a diffusers folder",
            path.display()
        ))
    } else if head.len() >= 2 && head[0] == 0x80 && head[1] <= 5 {
        Error::Unsupported(format!(
            "{} is a PyTorch file in the legacy (pre-1.6, non-zip) format; re-save it with a \
             recent torch or convert it to .safetensors",
            path.display()
        ))
    } else {
        Error::bad_model(format!(
            "{} is neither a .safetensors file nor a PyTorch zip checkpoint (.ckpt)",
            path.display()
        ))
    }
}

type Index = (HashMap<String, RawTensor>, BTreeMap<String, String>);

fn index_safetensors(path: &Path, mmap: &Mmap) -> Result<Index> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(mmap).map_err(|e| {
        Error::bad_model(format!(
            "{} is not a valid safetensors file (truncated or damaged?): {e}",
            path.display()
        ))
    })?;
    let data_start = 8 + header_len;
    let mut tensors = HashMap::new();
    for (name, info) in meta.tensors() {
        let (start, end) = info.data_offsets;
        if start > end || data_start.checked_add(end).map_or(true, |e| e > mmap.len()) {
            return Err(Error::bad_model(format!(
                "tensor `{name}` in {} points outside the file (truncated?)",
                path.display()
            )));
        }
        // Tensors of a dtype we cannot hold are kept out of the index; if a model needs one,
        // the loader reports it missing by name.
        let Some(kind) = kind_of(info.dtype) else {
            continue;
        };
        let shape = checked_shape(path, &name, &info.shape)?;
        tensors.insert(
            name,
            RawTensor {
                kind,
                shape,
                stride: None,
                bytes: Bytes::Mapped {
                    start: data_start + start,
                    len: end - start,
                },
            },
        );
    }
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok((tensors, metadata))
}

// ------------------------------------------------------------------------------------------
// Layout and family detection
// ------------------------------------------------------------------------------------------

/// Which text encoder the file carries, and under which prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextLayout {
    /// SD 1.x: a transformers `CLIPTextModel` (ViT-L/14). `prefix` ends before `embeddings.`.
    Clip { prefix: String },
    /// SD 2.x: OpenCLIP's text tower (ViT-H/14), `prefix` ends before `token_embedding`.
    OpenClip { prefix: String },
}

/// The model family, as diffusers' single-file loader tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x (CLIP ViT-L text encoder).
    Sd1,
    /// SD 2.x (OpenCLIP ViT-H text encoder).
    Sd2,
}

/// What a single file holds and where: detected from keys and shapes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub family: Family,
    /// UNet input channels: 4, or 9 for inpainting models.
    pub in_channels: i64,
    pub text: TextLayout,
    /// Prefix of the VAE keys (`first_stage_model.`).
    pub vae_prefix: String,
    /// The UNet weights come from the EMA copy (`model_ema.*`).
    pub ema: bool,
    /// The file also has EMA weights (whether or not they are used).
    pub has_ema: bool,
    /// The prediction type detected from the file (metadata, `global_step`, family).
    pub prediction_type: PredictionType,
}

const UNET: &str = "model.diffusion_model.";

/// `model.diffusion_model.a.b.c` -> `model_ema.diffusion_modelabc` (the EMA copy's names).
fn ema_key(key: &str) -> String {
    let rest = key.strip_prefix("model.").unwrap_or(key);
    format!("model_ema.{}", rest.replace('.', ""))
}

impl Layout {
    pub fn is_inpainting(&self) -> bool {
        self.in_channels == 9
    }

    /// Detects the layout of `ckpt`; `use_ema` takes the UNet from the EMA copy when present.
    pub fn detect(ckpt: &Checkpoint, use_ema: bool) -> Result<Self> {
        let has = |k: &str| ckpt.contains(k);
        let file = ckpt.path().display();
        let any_prefix = |p: &str| ckpt.names().any(|n| n.starts_with(p));

        if any_prefix("conditioner.embedders.1.") || has(&format!("{UNET}label_emb.0.0.weight")) {
            return Err(Error::Unsupported(format!(
                "{file} is an SDXL checkpoint (two text encoders); only SD 1.x / 2.x single files \
                 are supported"
            )));
        }
        if any_prefix(&format!("{UNET}joint_blocks."))
            || any_prefix("joint_blocks.")
            || any_prefix(&format!("{UNET}double_blocks."))
            || any_prefix("double_blocks.")
        {
            return Err(Error::Unsupported(format!(
                "{file} is a transformer (SD3 / Flux style) checkpoint; only SD 1.x / 2.x single \
                 files are supported"
            )));
        }

        let conv_in = format!("{UNET}input_blocks.0.0.weight");
        let has_ema = has(&ema_key(&conv_in));
        let ema = has_ema && (use_ema || !has(&conv_in));
        let unet_shape = if has(&conv_in) {
            ckpt.shape(&conv_in)
        } else if has_ema {
            ckpt.shape(&ema_key(&conv_in))
        } else {
            None
        };
        let Some(unet_shape) = unet_shape else {
            return Err(unknown_layout(ckpt, "no UNet (model.diffusion_model.*)"));
        };
        if unet_shape.len() != 4 {
            return Err(Error::bad_model(format!(
                "{file}: `{conv_in}` has shape {unet_shape:?}, expected a 4-D convolution"
            )));
        }
        let in_channels = unet_shape[1];
        if has(&format!("{UNET}input_blocks.0.0.weight"))
            && !has(&format!("{UNET}middle_block.1.proj_in.weight"))
        {
            return Err(Error::Unsupported(format!(
                "{file}: the UNet has no cross-attention in its middle block (not an SD 1.x / 2.x \
                 text-to-image UNet)"
            )));
        }

        let vae_prefix = ["first_stage_model.", "vae."]
            .into_iter()
            .find(|p| has(&format!("{p}encoder.conv_in.weight")))
            .ok_or_else(|| unknown_layout(ckpt, "no VAE (first_stage_model.*)"))?
            .to_string();

        let text = [
            "cond_stage_model.transformer.text_model.",
            "cond_stage_model.transformer.",
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.0.transformer.",
        ]
        .into_iter()
        .find(|p| has(&format!("{p}embeddings.token_embedding.weight")))
        .map(|p| TextLayout::Clip {
            prefix: p.to_string(),
        })
        .or_else(|| {
            ["cond_stage_model.model.", "conditioner.embedders.0.model."]
                .into_iter()
                .find(|p| has(&format!("{p}token_embedding.weight")))
                .map(|p| TextLayout::OpenClip {
                    prefix: p.to_string(),
                })
        })
        .ok_or_else(|| {
            unknown_layout(
                ckpt,
                "no text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)",
            )
        })?;
        let family = match text {
            TextLayout::Clip { .. } => Family::Sd1,
            TextLayout::OpenClip { .. } => Family::Sd2,
        };
        let mut layout = Self {
            family,
            in_channels,
            text,
            vae_prefix,
            ema,
            has_ema,
            prediction_type: PredictionType::Epsilon,
        };
        layout.prediction_type = layout.detect_prediction(ckpt);
        Ok(layout)
    }

    /// safetensors metadata (ModelSpec `modelspec.prediction_type`, kohya's
    /// `ss_v_parameterization`) when present; else diffusers' rule: SD 2.x text-to-image
    /// checkpoints are v-prediction unless their `global_step` is 875000 (SD 2 base), everything
    /// else predicts epsilon.
    fn detect_prediction(&self, ckpt: &Checkpoint) -> PredictionType {
        let meta = ckpt.metadata();
        if let Some(p) = meta.get("modelspec.prediction_type") {
            match p.trim().to_ascii_lowercase().as_str() {
                "v" | "v_prediction" | "v-prediction" => return PredictionType::VPrediction,
                "epsilon" | "eps" => return PredictionType::Epsilon,
                _ => {}
            }
        }
        if let Some(v) = meta.get("ss_v_parameterization") {
            if v.eq_ignore_ascii_case("true") {
                return PredictionType::VPrediction;
            }
        }
        if self.family == Family::Sd2 && !self.is_inpainting() && ckpt.global_step() != Some(875000)
        {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        }
    }

    /// The original key of a UNet tensor (its EMA copy when the layout uses EMA weights).
    fn unet_key(&self, rest: &str) -> String {
        let key = format!("{UNET}{rest}");
        if self.ema {
            ema_key(&key)
        } else {
            key
        }
    }
}

/// The error for a file whose layout is not one we know, saying what was found.
fn unknown_layout(ckpt: &Checkpoint, missing: &str) -> Error {
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for name in ckpt.names() {
        let parts: Vec<&str> = name.split('.').collect();
        let group = if parts.len() > 2 {
            format!("{}.{}.*", parts[0], parts[1])
        } else if parts.len() == 2 {
            format!("{}.*", parts[0])
        } else {
            name.to_string()
        };
        *groups.entry(group).or_default() += 1;
    }
    let mut found: Vec<(String, usize)> = groups.into_iter().collect();
    found.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = found
        .iter()
        .take(8)
        .map(|(g, n)| format!("{g} ({n})"))
        .collect();
    let more = if found.len() > 8 {
        format!(", and {} more groups", found.len() - 8)
    } else {
        String::new()
    };
    let diffusers_like = ckpt.names().any(|n| {
        n.starts_with("down_blocks.")
            || n.starts_with("unet.")
            || n.starts_with("text_model.")
            || n.starts_with("encoder.down_blocks.")
    });
    let hint = if diffusers_like {
        "; its keys look like one diffusers component: pass the whole diffusers folder instead"
    } else {
        ""
    };
    Error::bad_model(format!(
        "{} is not an SD 1.x / 2.x single-file checkpoint in the original layout: {missing}; \
         found {} tensors: {}{more}{hint}",
        ckpt.path().display(),
        ckpt.len(),
        if shown.is_empty() {
            "none".to_string()
        } else {
            shown.join(", ")
        }
    ))
}

// ------------------------------------------------------------------------------------------
// Default configs
// ------------------------------------------------------------------------------------------

/// diffusers' UNet config of stable-diffusion-v1-5 (the SD 1.x default).
const SD1_UNET: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                       "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                     "CrossAttnUpBlock2D"]
}"#;

/// diffusers' UNet config of stable-diffusion-2-1 (the SD 2.x default).
const SD2_UNET: &str = r#"{
  "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                       "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true,
  "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
  "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                     "CrossAttnUpBlock2D"],
  "use_linear_projection": true
}"#;

/// diffusers' VAE config of SD 1.x / 2.x.
const SD_VAE: &str = r#"{
  "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                       "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                     "UpDecoderBlock2D"]
}"#;

/// openai/clip-vit-large-patch14's text config (SD 1.x).
const SD1_TEXT: &str = r#"{
  "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
  "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05
}"#;

/// stable-diffusion-2-1's text encoder: OpenCLIP ViT-H/14 less its last block.
const SD2_TEXT: &str = r#"{
  "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
  "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
  "layer_norm_eps": 1e-05
}"#;

/// stable-diffusion-v1-5's scheduler (epsilon models).
const EPSILON_SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null
}"#;

/// stable-diffusion-2-1's scheduler (v-prediction models).
const V_SCHEDULER: &str = r#"{
  "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
  "prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null
}"#;

fn embedded<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("embedded {what} config does not parse: {e}")))
}

/// The configs a single file is loaded with.
#[derive(Debug, Clone)]
pub struct SingleFileConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    pub scheduler: SchedulerConfig,
}

fn per_block(v: Vec<i64>) -> crate::models::config::PerBlock<i64> {
    use crate::models::config::PerBlock;
    if !v.is_empty() && v.iter().all(|&x| x == v[0]) {
        PerBlock::One(v[0])
    } else {
        PerBlock::Each(v)
    }
}

impl SingleFileConfigs {
    /// The family's diffusers defaults, with every size the tensors tell (channels, depths,
    /// in/out channels, cross-attention width, projections, text encoder width and depth) taken
    /// from the file, so that fine-tunes and pruned variants of other sizes load too. Head counts
    /// are not in the shapes: SD 1.x uses 8 heads per block, SD 2.x 64 channels per head.
    /// The scheduler of the family's diffusers default: stable-diffusion-v1-5's (PNDM,
    /// scaled_linear) for epsilon models, stable-diffusion-2-1's (DDIM, v_prediction) for
    /// v-prediction ones.
    pub fn default_scheduler(layout: &Layout) -> Result<SchedulerConfig> {
        let v = layout.prediction_type == PredictionType::VPrediction;
        let mut scheduler: SchedulerConfig =
            embedded(if v { V_SCHEDULER } else { EPSILON_SCHEDULER }, "scheduler")?;
        scheduler.prediction_type = Some(layout.prediction_type);
        Ok(scheduler)
    }

    pub fn defaults(ckpt: &Checkpoint, layout: &Layout) -> Result<Self> {
        let (unet_json, text_json) = match layout.family {
            Family::Sd1 => (SD1_UNET, SD1_TEXT),
            Family::Sd2 => (SD2_UNET, SD2_TEXT),
        };
        let mut unet: UNetConfig = embedded(unet_json, "UNet")?;
        let mut vae: VaeConfig = embedded(SD_VAE, "VAE")?;
        let mut text: ClipTextConfig = embedded(text_json, "text encoder")?;
        let v = layout.prediction_type == PredictionType::VPrediction;
        let scheduler = Self::default_scheduler(layout)?;
        if layout.family == Family::Sd2 && !v {
            unet.sample_size = Some(64);
        }
        infer_unet(ckpt, layout, &mut unet)?;
        infer_vae(ckpt, layout, &mut vae)?;
        infer_text(ckpt, layout, &mut text)?;
        unet.validate()?;
        vae.validate()?;
        text.validate()?;
        Ok(Self {
            unet,
            vae,
            text,
            scheduler,
        })
    }
}

fn need<'a>(ckpt: &'a Checkpoint, key: &str, dims: usize) -> Result<&'a [i64]> {
    match ckpt.shape(key) {
        Some(s) if s.len() >= dims => Ok(s),
        Some(s) => Err(Error::bad_model(format!(
            "tensor `{key}` in {} has shape {s:?}, expected at least {dims} dimensions",
            ckpt.path().display()
        ))),
        None => Err(Error::MissingTensor {
            name: key.to_string(),
            file: ckpt.path().display().to_string(),
        }),
    }
}

/// One resolution level of the original UNet's `input_blocks`.
#[derive(Default)]
struct Level {
    channels: i64,
    resnets: i64,
    attention: bool,
    depth: i64,
}

fn infer_unet(ckpt: &Checkpoint, layout: &Layout, cfg: &mut UNetConfig) -> Result<()> {
    let key = |rest: &str| layout.unet_key(rest);
    let has = |rest: &str| ckpt.contains(&key(rest));
    let conv_in = need(ckpt, &key("input_blocks.0.0.weight"), 4)?;
    cfg.in_channels = conv_in[1];
    cfg.out_channels = need(ckpt, &key("out.2.weight"), 4)?[0];

    let mut levels = Vec::new();
    let mut cur = Level::default();
    let mut i = 1;
    loop {
        if has(&format!("input_blocks.{i}.0.op.weight")) {
            levels.push(std::mem::take(&mut cur));
        } else if has(&format!("input_blocks.{i}.0.out_layers.3.weight")) {
            cur.channels = need(
                ckpt,
                &key(&format!("input_blocks.{i}.0.out_layers.3.weight")),
                1,
            )?[0];
            cur.resnets += 1;
            if has(&format!("input_blocks.{i}.1.proj_in.weight")) {
                cur.attention = true;
                let mut depth = 0;
                while has(&format!(
                    "input_blocks.{i}.1.transformer_blocks.{depth}.attn1.to_q.weight"
                )) {
                    depth += 1;
                }
                cur.depth = depth;
                let proj = need(ckpt, &key(&format!("input_blocks.{i}.1.proj_in.weight")), 2)?;
                cfg.use_linear_projection = proj.len() == 2;
                let to_k = need(
                    ckpt,
                    &key(&format!(
                        "input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"
                    )),
                    2,
                )?;
                cfg.cross_attention_dim = crate::models::config::PerBlock::One(to_k[1]);
            }
        } else {
            break;
        }
        i += 1;
    }
    levels.push(cur);
    if levels.iter().any(|l| l.resnets == 0) {
        return Err(Error::bad_model(format!(
            "{}: the UNet's input_blocks do not form resolution levels of resnets",
            ckpt.path().display()
        )));
    }
    let n = levels.len();
    cfg.block_out_channels = levels.iter().map(|l| l.channels).collect();
    cfg.layers_per_block = per_block(levels.iter().map(|l| l.resnets).collect());
    cfg.down_block_types = levels
        .iter()
        .map(|l| {
            if l.attention {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string()
        })
        .collect();
    let depths: Vec<i64> = levels
        .iter()
        .filter(|l| l.attention)
        .map(|l| l.depth)
        .collect();
    if !depths.is_empty() && depths.iter().all(|&d| d == depths[0]) {
        cfg.transformer_layers_per_block = crate::models::config::PerBlock::One(depths[0]);
    } else if !depths.is_empty() {
        cfg.transformer_layers_per_block =
            per_block(levels.iter().map(|l| l.depth.max(1)).collect());
    }
    // Up blocks: layers+1 output blocks per level, deepest level first.
    let mut up_types = Vec::with_capacity(n);
    let mut start = 0;
    for u in 0..n {
        let level = &levels[n - 1 - u];
        let attention = has(&format!("output_blocks.{start}.1.proj_in.weight"));
        up_types.push(
            if attention {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
            .to_string(),
        );
        start += level.resnets + 1;
    }
    cfg.up_block_types = up_types;
    cfg.attention_head_dim = match layout.family {
        Family::Sd1 => crate::models::config::PerBlock::One(8),
        Family::Sd2 => per_block(
            cfg.block_out_channels
                .iter()
                .map(|&c| (c / 64).max(1))
                .collect(),
        ),
    };
    cfg.num_attention_heads = None;
    Ok(())
}

fn infer_vae(ckpt: &Checkpoint, layout: &Layout, cfg: &mut VaeConfig) -> Result<()> {
    let p = &layout.vae_prefix;
    let has = |rest: &str| ckpt.contains(&format!("{p}{rest}"));
    let conv_in = need(ckpt, &format!("{p}encoder.conv_in.weight"), 4)?;
    cfg.in_channels = conv_in[1];
    let mut channels = Vec::new();
    while has(&format!(
        "encoder.down.{}.block.0.conv2.weight",
        channels.len()
    )) {
        let i = channels.len();
        channels.push(
            need(
                ckpt,
                &format!("{p}encoder.down.{i}.block.0.conv2.weight"),
                1,
            )?[0],
        );
    }
    if channels.is_empty() {
        return Err(Error::bad_model(format!(
            "{}: the VAE has no encoder.down.0 block",
            ckpt.path().display()
        )));
    }
    let mut layers = 0;
    while has(&format!("encoder.down.0.block.{layers}.conv1.weight")) {
        layers += 1;
    }
    let n = channels.len();
    cfg.block_out_channels = channels;
    cfg.layers_per_block = layers;
    cfg.down_block_types = vec!["DownEncoderBlock2D".into(); n];
    cfg.up_block_types = vec!["UpDecoderBlock2D".into(); n];
    cfg.latent_channels = need(ckpt, &format!("{p}decoder.conv_in.weight"), 4)?[1];
    cfg.out_channels = need(ckpt, &format!("{p}decoder.conv_out.weight"), 4)?[0];
    cfg.mid_block_add_attention = has("encoder.mid.attn_1.q.weight");
    cfg.use_quant_conv = has("quant_conv.weight");
    cfg.use_post_quant_conv = has("post_quant_conv.weight");
    Ok(())
}

fn infer_text(ckpt: &Checkpoint, layout: &Layout, cfg: &mut ClipTextConfig) -> Result<()> {
    match &layout.text {
        TextLayout::Clip { prefix } => {
            let tok = need(
                ckpt,
                &format!("{prefix}embeddings.token_embedding.weight"),
                2,
            )?;
            (cfg.vocab_size, cfg.hidden_size) = (tok[0], tok[1]);
            cfg.max_position_embeddings = need(
                ckpt,
                &format!("{prefix}embeddings.position_embedding.weight"),
                2,
            )?[0];
            let mut layers = 0;
            while ckpt.contains(&format!(
                "{prefix}encoder.layers.{layers}.self_attn.q_proj.weight"
            )) {
                layers += 1;
            }
            cfg.num_hidden_layers = layers;
            cfg.intermediate_size =
                need(ckpt, &format!("{prefix}encoder.layers.0.mlp.fc1.weight"), 2)?[0];
            cfg.hidden_act = "quick_gelu".into();
        }
        TextLayout::OpenClip { prefix } => {
            let tok = need(ckpt, &format!("{prefix}token_embedding.weight"), 2)?;
            (cfg.vocab_size, cfg.hidden_size) = (tok[0], tok[1]);
            cfg.max_position_embeddings =
                need(ckpt, &format!("{prefix}positional_embedding"), 2)?[0];
            let mut blocks = 0;
            while ckpt.contains(&format!(
                "{prefix}transformer.resblocks.{blocks}.attn.in_proj_weight"
            )) {
                blocks += 1;
            }
            // SD 2 conditions on the penultimate block: the last one is never used.
            cfg.num_hidden_layers = blocks - 1;
            if cfg.num_hidden_layers < 1 {
                return Err(Error::bad_model(format!(
                    "{}: the OpenCLIP text encoder has {blocks} blocks, SD 2 needs at least 2",
                    ckpt.path().display()
                )));
            }
            cfg.intermediate_size = need(
                ckpt,
                &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
                2,
            )?[0];
            cfg.hidden_act = "gelu".into();
        }
    }
    cfg.num_attention_heads = (cfg.hidden_size / 64).max(1);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Key maps: our (diffusers) variable names -> original keys
// ------------------------------------------------------------------------------------------

/// How a stored tensor becomes the variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Identity,
    /// A 1x1 convolution weight `[out, in, 1, 1]` (or `[out, in, 1]`) used as a linear `[out, in]`.
    ConvToLinear,
    /// Part `i` of 3 equal slices along dim 0 (q, k, v of a fused `in_proj`).
    Third(i64),
}

/// The original key of a variable and the transform that turns its tensor into the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub key: String,
    pub transform: Transform,
}

fn plain(key: String) -> Option<Mapped> {
    Some(Mapped {
        key,
        transform: Transform::Identity,
    })
}

/// Splits `a.b.c...` into its first two segments and the rest.
fn split2(name: &str) -> Option<(&str, &str, &str)> {
    let mut it = name.splitn(3, '.');
    Some((it.next()?, it.next()?, it.next()?))
}

fn resnet_part(rest: &str) -> Option<String> {
    let (module, leaf) = rest.split_once('.')?;
    let orig = match module {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{orig}.{leaf}"))
}

/// The UNet map, for a config with `layers[b]` resnets per down block and `up_attention[u]`
/// telling which up blocks have attention.
pub struct UNetMap {
    layers: Vec<i64>,
    up_attention: Vec<bool>,
}

impl UNetMap {
    pub fn new(cfg: &UNetConfig) -> Result<Self> {
        let n = cfg.block_out_channels.len();
        Ok(Self {
            layers: cfg.layers_per_block.expand(n, "layers_per_block")?,
            up_attention: cfg
                .up_block_types
                .iter()
                .map(|t| t == "CrossAttnUpBlock2D")
                .collect(),
        })
    }

    /// The original name (after `model.diffusion_model.`) of UNet variable `name`.
    pub fn original(&self, name: &str) -> Option<String> {
        for (ours, orig) in [
            ("conv_in.", "input_blocks.0.0."),
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
        ] {
            if let Some(leaf) = name.strip_prefix(ours) {
                return Some(format!("{orig}{leaf}"));
            }
        }
        let n = self.layers.len();
        let parts: Vec<&str> = name.splitn(5, '.').collect();
        match parts.as_slice() {
            ["down_blocks", b, kind, j, rest] => {
                let b: usize = b.parse().ok()?;
                let j: i64 = j.parse().ok()?;
                let first = 1 + self.layers[..b.min(n)].iter().map(|l| l + 1).sum::<i64>();
                match *kind {
                    "resnets" => Some(format!(
                        "input_blocks.{}.0.{}",
                        first + j,
                        resnet_part(rest)?
                    )),
                    "attentions" => Some(format!("input_blocks.{}.1.{rest}", first + j)),
                    "downsamplers" => {
                        let leaf = rest.strip_prefix("conv.")?;
                        Some(format!(
                            "input_blocks.{}.0.op.{leaf}",
                            first + self.layers[b]
                        ))
                    }
                    _ => None,
                }
            }
            ["up_blocks", u, kind, j, rest] => {
                let u: usize = u.parse().ok()?;
                let j: i64 = j.parse().ok()?;
                let per_level = |k: usize| self.layers[n - 1 - k] + 1;
                let first: i64 = (0..u.min(n)).map(per_level).sum();
                match *kind {
                    "resnets" => Some(format!(
                        "output_blocks.{}.0.{}",
                        first + j,
                        resnet_part(rest)?
                    )),
                    "attentions" => Some(format!("output_blocks.{}.1.{rest}", first + j)),
                    "upsamplers" => {
                        let slot = if *self.up_attention.get(u)? { 2 } else { 1 };
                        Some(format!(
                            "output_blocks.{}.{slot}.{rest}",
                            first + per_level(u) - 1
                        ))
                    }
                    _ => None,
                }
            }
            _ => {
                let (head, kind, rest) = split2(name)?;
                if head != "mid_block" {
                    return None;
                }
                let (j, rest) = rest.split_once('.')?;
                match (kind, j) {
                    ("resnets", "0") => Some(format!("middle_block.0.{}", resnet_part(rest)?)),
                    ("resnets", "1") => Some(format!("middle_block.2.{}", resnet_part(rest)?)),
                    ("attentions", "0") => Some(format!("middle_block.1.{rest}")),
                    _ => None,
                }
            }
        }
    }
}

/// The original name (after the VAE prefix) of VAE variable `name`, for `levels` blocks.
pub fn vae_original(name: &str, levels: usize) -> Option<Mapped> {
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return plain(name.to_string());
    }
    let (side, module, rest) = split2(name)?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let shortcut = |s: &str| s.replace("conv_shortcut", "nin_shortcut");
    match module {
        "conv_in" | "conv_out" => plain(name.to_string()),
        "conv_norm_out" => plain(format!("{side}.norm_out.{rest}")),
        "down_blocks" | "up_blocks" => {
            let (i, rest) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            let (level, group) = if side == "encoder" {
                (i, "down")
            } else {
                (levels.checked_sub(1 + i)?, "up")
            };
            let (kind, rest) = rest.split_once('.')?;
            match kind {
                "resnets" => plain(format!("{side}.{group}.{level}.block.{}", shortcut(rest))),
                "downsamplers" | "upsamplers" => {
                    let leaf = rest.strip_prefix("0.")?;
                    let what = if kind == "downsamplers" {
                        "downsample"
                    } else {
                        "upsample"
                    };
                    plain(format!("{side}.{group}.{level}.{what}.{leaf}"))
                }
                _ => None,
            }
        }
        "mid_block" => {
            let (kind, rest) = rest.split_once('.')?;
            let (j, rest) = rest.split_once('.')?;
            match (kind, j) {
                ("resnets", "0" | "1") => {
                    let n: u8 = j.parse().ok()?;
                    plain(format!("{side}.mid.block_{}.{}", n + 1, shortcut(rest)))
                }
                ("attentions", "0") => {
                    let (module, leaf) = rest.rsplit_once('.')?;
                    let orig = match module {
                        "group_norm" => "norm",
                        "to_q" => "q",
                        "to_k" => "k",
                        "to_v" => "v",
                        "to_out.0" => "proj_out",
                        _ => return None,
                    };
                    let transform = if leaf == "weight" && module != "group_norm" {
                        Transform::ConvToLinear
                    } else {
                        Transform::Identity
                    };
                    Some(Mapped {
                        key: format!("{side}.mid.attn_1.{orig}.{leaf}"),
                        transform,
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The original key of text-encoder variable `name` (ours: `text_model.*`).
pub fn text_original(name: &str, layout: &TextLayout) -> Option<Mapped> {
    let rest = name.strip_prefix("text_model.")?;
    match layout {
        TextLayout::Clip { prefix } => plain(format!("{prefix}{rest}")),
        TextLayout::OpenClip { prefix } => {
            let simple = match rest {
                "embeddings.token_embedding.weight" => Some("token_embedding.weight".to_string()),
                "embeddings.position_embedding.weight" => Some("positional_embedding".to_string()),
                "final_layer_norm.weight" => Some("ln_final.weight".to_string()),
                "final_layer_norm.bias" => Some("ln_final.bias".to_string()),
                _ => None,
            };
            if let Some(s) = simple {
                return plain(format!("{prefix}{s}"));
            }
            let layer = rest.strip_prefix("encoder.layers.")?;
            let (i, sub) = layer.split_once('.')?;
            let block = format!("{prefix}transformer.resblocks.{i}.");
            let (module, leaf) = sub.rsplit_once('.')?;
            let third = match module {
                "self_attn.q_proj" => Some(0),
                "self_attn.k_proj" => Some(1),
                "self_attn.v_proj" => Some(2),
                _ => None,
            };
            if let Some(part) = third {
                return Some(Mapped {
                    key: format!("{block}attn.in_proj_{leaf}"),
                    transform: Transform::Third(part),
                });
            }
            let orig = match module {
                "self_attn.out_proj" => "attn.out_proj",
                "layer_norm1" => "ln_1",
                "layer_norm2" => "ln_2",
                "mlp.fc1" => "mlp.c_fc",
                "mlp.fc2" => "mlp.c_proj",
                _ => return None,
            };
            plain(format!("{block}{orig}.{leaf}"))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Component sources
// ------------------------------------------------------------------------------------------

/// Which model a [`ComponentSource`] feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    Unet,
    Vae,
}

/// One model's tensors out of a single file, under our variable names.
pub struct ComponentSource<'a> {
    ckpt: &'a Checkpoint,
    layout: &'a Layout,
    component: Component,
    unet: Option<UNetMap>,
    vae_levels: usize,
}

impl<'a> ComponentSource<'a> {
    pub fn text_encoder(ckpt: &'a Checkpoint, layout: &'a Layout) -> Self {
        Self {
            ckpt,
            layout,
            component: Component::TextEncoder,
            unet: None,
            vae_levels: 0,
        }
    }

    pub fn unet(ckpt: &'a Checkpoint, layout: &'a Layout, cfg: &UNetConfig) -> Result<Self> {
        Ok(Self {
            ckpt,
            layout,
            component: Component::Unet,
            unet: Some(UNetMap::new(cfg)?),
            vae_levels: 0,
        })
    }

    pub fn vae(ckpt: &'a Checkpoint, layout: &'a Layout, cfg: &VaeConfig) -> Self {
        Self {
            ckpt,
            layout,
            component: Component::Vae,
            unet: None,
            vae_levels: cfg.block_out_channels.len(),
        }
    }

    /// The original key and transform of variable `name`.
    pub fn map(&self, name: &str) -> Option<Mapped> {
        match self.component {
            Component::TextEncoder => text_original(name, &self.layout.text),
            Component::Unet => {
                let rest = self.unet.as_ref()?.original(name)?;
                plain(self.layout.unet_key(&rest))
            }
            Component::Vae => vae_original(name, self.vae_levels).map(|m| Mapped {
                key: format!("{}{}", self.layout.vae_prefix, m.key),
                transform: m.transform,
            }),
        }
    }
}

fn transformed_shape(shape: &[i64], t: Transform) -> Vec<i64> {
    match t {
        Transform::Identity => shape.to_vec(),
        Transform::ConvToLinear => match shape {
            [o, i, 1, 1] | [o, i, 1] => vec![*o, *i],
            other => other.to_vec(),
        },
        Transform::Third(_) => match shape {
            [rows, rest @ ..] if rows % 3 == 0 => {
                let mut s = vec![rows / 3];
                s.extend_from_slice(rest);
                s
            }
            other => other.to_vec(),
        },
    }
}

impl TensorSource for ComponentSource<'_> {
    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let m = self.map(name)?;
        let shape = self.ckpt.shape(&m.key)?;
        Some(transformed_shape(shape, m.transform))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let m = self.map(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.describe(),
        })?;
        let t = self.ckpt.tensor(&m.key)?;
        Ok(match m.transform {
            Transform::Identity => t,
            Transform::ConvToLinear => {
                let s = t.size();
                t.f_reshape([s[0], s[1]])?
            }
            Transform::Third(part) => {
                let rows = t.size()[0] / 3;
                t.f_narrow(0, part * rows, rows)?
            }
        })
    }

    fn stored_name(&self, name: &str) -> String {
        match self.map(name) {
            Some(Mapped {
                key,
                transform: Transform::Third(part),
            }) => format!(
                "{key} (its {} rows, for {name})",
                ["q", "k", "v"][part.clamp(0, 2) as usize]
            ),
            Some(Mapped { key, .. }) => key,
            None => format!("{name} (no original key)"),
        }
    }

    fn describe(&self) -> String {
        self.ckpt.path().display().to_string()
    }

    fn done(&self, name: &str) {
        if let Some(m) = self.map(name) {
            if !matches!(m.transform, Transform::Third(0) | Transform::Third(1)) {
                self.ckpt.release(&m.key);
            }
        }
    }

    fn finished(&self) {
        self.ckpt.release_all_pages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_map() -> UNetMap {
        let cfg: UNetConfig = serde_json::from_str(SD1_UNET).unwrap();
        UNetMap::new(&cfg).unwrap()
    }

    #[test]
    fn unet_keys_of_sd15() {
        let m = sd15_map();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.3.resnets.1.conv2.bias",
                "input_blocks.11.0.out_layers.3.bias",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.proj_out.bias",
                "middle_block.1.proj_out.bias",
            ),
            (
                "up_blocks.0.resnets.2.conv1.weight",
                "output_blocks.2.0.in_layers.2.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.attentions.0.norm.weight",
                "output_blocks.3.1.norm.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.3.resnets.2.norm2.weight",
                "output_blocks.11.0.out_layers.0.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (ours, orig) in cases {
            assert_eq!(m.original(ours).as_deref(), Some(orig), "{ours}");
        }
        assert_eq!(m.original("nonsense.weight"), None);
    }

    #[test]
    fn vae_and_text_keys() {
        let v = vae_original("decoder.up_blocks.0.upsamplers.0.conv.weight", 4).unwrap();
        assert_eq!(v.key, "decoder.up.3.upsample.conv.weight");
        let v = vae_original("encoder.mid_block.attentions.0.to_out.0.weight", 4).unwrap();
        assert_eq!(v.key, "encoder.mid.attn_1.proj_out.weight");
        assert_eq!(v.transform, Transform::ConvToLinear);
        let v = vae_original("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", 4).unwrap();
        assert_eq!(v.key, "encoder.down.1.block.0.nin_shortcut.bias");
        let v = vae_original("decoder.mid_block.resnets.1.norm1.weight", 4).unwrap();
        assert_eq!(v.key, "decoder.mid.block_2.norm1.weight");

        let open = TextLayout::OpenClip {
            prefix: "cond_stage_model.model.".into(),
        };
        let t = text_original("text_model.encoder.layers.4.self_attn.k_proj.bias", &open).unwrap();
        assert_eq!(
            t.key,
            "cond_stage_model.model.transformer.resblocks.4.attn.in_proj_bias"
        );
        assert_eq!(t.transform, Transform::Third(1));
        let t = text_original("text_model.embeddings.position_embedding.weight", &open).unwrap();
        assert_eq!(t.key, "cond_stage_model.model.positional_embedding");
        assert_eq!(
            ema_key("model.diffusion_model.input_blocks.0.0.weight"),
            "model_ema.diffusion_modelinput_blocks00weight"
        );
    }

    #[test]
    fn embedded_configs_parse() {
        for json in [SD1_UNET, SD2_UNET] {
            let c: UNetConfig = embedded(json, "UNet").unwrap();
            c.validate().unwrap();
        }
        let v: VaeConfig = embedded(SD_VAE, "VAE").unwrap();
        v.validate().unwrap();
        for json in [SD1_TEXT, SD2_TEXT] {
            let t: ClipTextConfig = embedded(json, "text").unwrap();
            t.validate().unwrap();
        }
        for json in [EPSILON_SCHEDULER, V_SCHEDULER] {
            let _: SchedulerConfig = embedded(json, "scheduler").unwrap();
        }
    }
}
