//! Single-file checkpoints in the original CompVis / A1111 layout (`.safetensors` or `.ckpt`):
//! the UNet under `model.diffusion_model.*` (`input_blocks` / `middle_block` / `output_blocks`,
//! `time_embed`, `out`), the VAE under `first_stage_model.*` (mid-block attention stored as 1x1
//! convolutions), and the text encoder under `cond_stage_model.transformer.*` (SD 1.x: a
//! transformers `CLIPTextModel`) or `cond_stage_model.model.*` (SD 2.x: OpenCLIP ViT-H with
//! fused `in_proj` q/k/v and one more block than SD 2 uses). SDXL files (Stability's `sgm`
//! layout) keep the UNet and VAE there (the UNet's added-condition MLP as `label_emb.0`) and
//! their text encoders under `conditioner.embedders.N.`: the base has CLIP-L
//! (`0.transformer.text_model.*`, transformers layout) and OpenCLIP bigG (`1.model.*`, with
//! every block and `text_projection` stored `[width, proj]`), the refiner only bigG (`0.model.*`).
//!
//! [`Checkpoint`] maps the file and indexes its tensors without reading them; [`Layout`] detects
//! the family (SD 1.x, SD 2.x, SDXL base, SDXL refiner; 9-channel inpainting) from keys and
//! shapes and gives the default configs; [`ComponentSource`] translates each of our (diffusers) variable names into the
//! original key and transform (row slice of `in_proj`, 1x1 conv to linear, transpose), so the single file
//! fills the models through the same [`super::load_into_from`] as a diffusers folder, with errors
//! that name the original key. Tensors are materialised one at a time from the memory map and
//! the pages of each are released once it is copied, so loading never holds a second copy of
//! the model.
use super::ckpt;
use super::safetensors_file::{checked_shape, drop_mapped_pages, kind_of, PageSpan};
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
    /// (as diffusers' `from_single_file(config=...)`); for SDXL also `text_encoder_2/`,
    /// `tokenizer_2/` (the refiner's only ones) and `model_index.json`'s
    /// `force_zeros_for_empty_prompt` and `requires_aesthetics_score`.
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
    mmap: Backing,
    tensors: HashMap<String, RawTensor>,
    metadata: BTreeMap<String, String>,
    global_step: Option<i64>,
    /// The compressed storages of a `.ckpt` (none for most files), decompressed once each.
    pub(super) zipped: ckpt::ZippedStorages,
}

/// A checkpoint's bytes: its file's map, or a caller's buffer (see [`Checkpoint::from_bytes`]).
enum Backing {
    Map(Mmap),
    Borrowed { ptr: *const u8, len: usize },
}

// SAFETY: the bytes are only read, and a borrowed buffer outlives the checkpoint
// (`Checkpoint::from_bytes`' contract).
unsafe impl Send for Backing {}
unsafe impl Sync for Backing {}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Map(m) => m,
            // SAFETY: `Checkpoint::from_bytes`' contract keeps the buffer valid.
            Self::Borrowed { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl Backing {
    /// Lets the kernel drop the resident pages of `start..start + len` of a file's map; a
    /// caller's buffer is never touched.
    fn release(&self, start: usize, len: usize) {
        if let Self::Map(m) = self {
            drop_mapped_pages(m, start, len, PageSpan::Covering);
        }
    }
}

/// What the first bytes of a checkpoint say it is.
fn sniff_bytes(head: &[u8]) -> Option<FileFormat> {
    if head.len() >= 4 && &head[..4] == b"PK\x03\x04" {
        return Some(FileFormat::Ckpt);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Some(FileFormat::Safetensors);
    }
    None
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
    Ok(sniff_bytes(&head[..n]))
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
        Self::index(path, format, Backing::Map(mmap))
    }

    /// A checkpoint held in memory (a `.safetensors` or PyTorch zip `.ckpt` packed into an
    /// engine's own archive), named `name` in messages, with the same checks as a file.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged for as long as the checkpoint lives (tensors read
    /// from it are copies, so a model built from it does not keep it).
    pub unsafe fn from_bytes(name: &str, data: &[u8]) -> Result<Self> {
        let path = Path::new(name);
        let format = sniff_bytes(&data[..data.len().min(9)]).ok_or_else(|| {
            Error::bad_model(format!(
                "{name}: not a checkpoint (neither a safetensors header nor a PyTorch zip)"
            ))
        })?;
        let backing = Backing::Borrowed {
            ptr: data.as_ptr(),
            len: data.len(),
        };
        Self::index(path, format, backing)
    }

    fn index(path: &Path, format: FileFormat, mmap: Backing) -> Result<Self> {
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
                    super::tensor_from_bytes(bytes, &raw.shape, raw.kind)?
                }
                Some(stride) => {
                    let n = (bytes.len() / elt) as i64;
                    super::tensor_from_bytes(&bytes[..n as usize * elt], &[n], raw.kind)?
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
        self.mmap.release(0, self.mmap.len());
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
            self.mmap.release(*start, *len);
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

fn index_safetensors(path: &Path, mmap: &[u8]) -> Result<Index> {
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
    /// SDXL base (CLIP ViT-L and OpenCLIP ViT-bigG with projection, `text_time` UNet); also
    /// SDXL inpainting (9 input channels) and Turbo / Lightning style distillations, which
    /// have the base's keys and shapes (diffusers' `xl_base` / `xl_inpaint`).
    Sdxl,
    /// SDXL refiner (OpenCLIP ViT-bigG with projection only, aesthetic-score time ids).
    SdxlRefiner,
}

impl Family {
    pub fn is_sdxl(self) -> bool {
        matches!(self, Family::Sdxl | Family::SdxlRefiner)
    }
}

/// What a single file holds and where: detected from keys and shapes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub family: Family,
    /// UNet input channels: 4, or 9 for inpainting models.
    pub in_channels: i64,
    pub text: TextLayout,
    /// SDXL base: the second text encoder (OpenCLIP bigG, `conditioner.embedders.1.model.`).
    /// The refiner's only encoder, bigG too, is `text`.
    pub text_2: Option<TextLayout>,
    /// Prefix of the VAE keys (`first_stage_model.`).
    pub vae_prefix: String,
    /// The UNet weights come from the EMA copy (`model_ema.*`).
    pub ema: bool,
    /// The file also has EMA weights (whether or not they are used).
    pub has_ema: bool,
    /// The prediction type detected from the file (metadata, a `v_pred` key, `global_step`,
    /// family).
    pub prediction_type: PredictionType,
    /// The file has a `ztsnr` key (ComfyUI's mark of a zero-terminal-SNR model): the default
    /// scheduler gets `rescale_betas_zero_snr`.
    pub zero_terminal_snr: bool,
}

const UNET: &str = "model.diffusion_model.";
/// SD 2.x's OpenCLIP ViT-H (`FrozenOpenCLIPEmbedder`).
const OPEN_CLIP_SD2: &str = "cond_stage_model.model.";
/// `sgm`'s first embedder when it is OpenCLIP: the SDXL refiner's bigG (or SD 2.x saved by sgm).
const OPEN_CLIP_SGM: &str = "conditioner.embedders.0.model.";
/// The SDXL base's second embedder, OpenCLIP bigG (`FrozenOpenCLIPEmbedder2`).
const BIGG_BASE: &str = "conditioner.embedders.1.model.";

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

        if any_prefix(&format!("{UNET}joint_blocks."))
            || any_prefix("joint_blocks.")
            || any_prefix(&format!("{UNET}double_blocks."))
            || any_prefix("double_blocks.")
        {
            return Err(Error::Unsupported(format!(
                "{file} is a transformer (SD3 / Flux style) checkpoint; only SD 1.x / 2.x and \
                 SDXL single files are supported"
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
                 / XL text-to-image UNet)"
            )));
        }

        let vae_prefix = ["first_stage_model.", "vae."]
            .into_iter()
            .find(|p| has(&format!("{p}encoder.conv_in.weight")))
            .ok_or_else(|| unknown_layout(ckpt, "no VAE (first_stage_model.*)"))?
            .to_string();

        let clip = [
            "cond_stage_model.transformer.text_model.",
            "cond_stage_model.transformer.",
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.0.transformer.",
        ]
        .into_iter()
        .find(|p| has(&format!("{p}embeddings.token_embedding.weight")))
        .map(|p| TextLayout::Clip {
            prefix: p.to_string(),
        });
        let open_clip = [OPEN_CLIP_SD2, OPEN_CLIP_SGM]
            .into_iter()
            .find(|p| has(&format!("{p}token_embedding.weight")))
            .map(|p| TextLayout::OpenClip {
                prefix: p.to_string(),
            });
        // SDXL's UNet takes added conditions (`label_emb.0`, diffusers' `add_embedding`); SD 1.x
        // / 2.x text-to-image UNets take none.
        let label_emb = format!("{UNET}label_emb.0.0.weight");
        let added = has(&label_emb) || has(&ema_key(&label_emb));
        let (family, text, text_2) = if any_prefix(BIGG_BASE) {
            // The base: CLIP-L first, bigG second (missing bigG tensors are named when its
            // config is read).
            let Some(clip) = clip.filter(
                |c| matches!(c, TextLayout::Clip { prefix } if prefix.starts_with("conditioner.")),
            ) else {
                return Err(unknown_layout(
                    ckpt,
                    "an SDXL checkpoint (conditioner.embedders.1.*) without its first text \
                     encoder (conditioner.embedders.0.transformer.text_model.*)",
                ));
            };
            let bigg = TextLayout::OpenClip {
                prefix: BIGG_BASE.to_string(),
            };
            (Family::Sdxl, clip, Some(bigg))
        } else if let Some(open) = open_clip.clone().filter(|_| added) {
            // bigG alone over a UNet with added conditions: the refiner. (SD 2.x saved by
            // `sgm` also has `conditioner.embedders.0.model.*`, over a plain UNet.)
            if !matches!(&open, TextLayout::OpenClip { prefix } if prefix == OPEN_CLIP_SGM) {
                return Err(Error::Unsupported(format!(
                    "{file}: an SD 2.x text encoder over a UNet with class or added embeddings \
                     (`{label_emb}`: unCLIP / upscaler style), not supported"
                )));
            }
            (Family::SdxlRefiner, open, None)
        } else if let Some(text) = clip.or(open_clip) {
            if added {
                return Err(Error::Unsupported(format!(
                    "{file}: a UNet with class or added embeddings (`{label_emb}`) under an SD \
                     1.x / 2.x text encoder (unCLIP / upscaler style), not supported"
                )));
            }
            let family = match text {
                TextLayout::Clip { .. } => Family::Sd1,
                TextLayout::OpenClip { .. } => Family::Sd2,
            };
            (family, text, None)
        } else {
            return Err(unknown_layout(
                ckpt,
                "no text encoder (cond_stage_model.transformer.*, cond_stage_model.model.* or \
                 conditioner.embedders.*)",
            ));
        };
        let mut layout = Self {
            family,
            in_channels,
            text,
            text_2,
            vae_prefix,
            ema,
            has_ema,
            prediction_type: PredictionType::Epsilon,
            zero_terminal_snr: has("ztsnr"),
        };
        layout.prediction_type = layout.detect_prediction(ckpt);
        Ok(layout)
    }

    /// safetensors metadata (ModelSpec `modelspec.prediction_type`, kohya's
    /// `ss_v_parameterization`) when present; else a `v_pred` key in the state dict (ComfyUI's
    /// mark, found in v-prediction SDXL fine-tunes); else diffusers' rule: SD 2.x text-to-image
    /// checkpoints are v-prediction unless their `global_step` is 875000 (SD 2 base), everything
    /// else (SDXL included: diffusers has no other sign for it) predicts epsilon.
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
        if ckpt.contains("v_pred") {
            return PredictionType::VPrediction;
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
        "{} is not an SD 1.x / 2.x / XL single-file checkpoint in the original layout: {missing}; \
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

/// diffusers' UNet config of stable-diffusion-xl-base-1.0 (the SDXL default; the refiner's
/// differs only in sizes the shapes tell: channels, block types, depths, widths).
const SDXL_UNET: &str = r#"{
  "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "center_input_sample": false, "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true,
  "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
  "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "use_linear_projection": true
}"#;

/// SDXL's second text encoder (the refiner's only one): OpenCLIP ViT-bigG/14 with its
/// projection, every block kept (stable-diffusion-xl-base-1.0's `text_encoder_2`). The first
/// one is CLIP ViT-L, [`SD1_TEXT`].
const SDXL_TEXT_2: &str = r#"{
  "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
  "layer_norm_eps": 1e-05, "eos_token_id": 2, "projection_dim": 1280,
  "architectures": ["CLIPTextModelWithProjection"]
}"#;

/// The SDXL VAE's latent scaling (stable-diffusion-xl-base-1.0's `vae/config.json`).
const SDXL_VAE_SCALING: f64 = 0.13025;

/// stable-diffusion-xl-base-1.0's (and the refiner's) scheduler, which is also what diffusers'
/// `from_single_file` builds for SDXL without a config.
const SDXL_SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear",
  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
  "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false
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
    /// The first text encoder (the SDXL refiner's only one, bigG).
    pub text: ClipTextConfig,
    /// The SDXL base's second text encoder (bigG with projection).
    pub text_2: Option<ClipTextConfig>,
    pub scheduler: SchedulerConfig,
    /// SDXL: the pipeline's flags (a diffusers folder's `model_index.json`).
    pub sdxl: Option<SdxlPipelineFlags>,
}

/// What an SDXL pipeline needs besides its models, as a diffusers folder's `model_index.json`
/// says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdxlPipelineFlags {
    /// One text encoder (bigG) only.
    pub refiner: bool,
    pub force_zeros_for_empty_prompt: bool,
    pub requires_aesthetics_score: bool,
}

impl SdxlPipelineFlags {
    /// diffusers' defaults for the family: stable-diffusion-xl-base-1.0 (and the SDXL
    /// inpainting model) zero the absent negative prompt and take six time ids;
    /// stable-diffusion-xl-refiner-1.0 encodes it and takes the aesthetic score.
    pub fn defaults(family: Family) -> Option<Self> {
        match family {
            Family::Sdxl => Some(Self {
                refiner: false,
                force_zeros_for_empty_prompt: true,
                requires_aesthetics_score: false,
            }),
            Family::SdxlRefiner => Some(Self {
                refiner: true,
                force_zeros_for_empty_prompt: false,
                requires_aesthetics_score: true,
            }),
            Family::Sd1 | Family::Sd2 => None,
        }
    }
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
    /// v-prediction ones; SDXL's (Euler) for SDXL with the detected prediction type. A `ztsnr`
    /// key adds `rescale_betas_zero_snr`.
    pub fn default_scheduler(layout: &Layout) -> Result<SchedulerConfig> {
        let v = layout.prediction_type == PredictionType::VPrediction;
        let json = if layout.family.is_sdxl() {
            SDXL_SCHEDULER
        } else if v {
            V_SCHEDULER
        } else {
            EPSILON_SCHEDULER
        };
        let mut scheduler: SchedulerConfig = embedded(json, "scheduler")?;
        scheduler.prediction_type = Some(layout.prediction_type);
        if layout.zero_terminal_snr {
            scheduler.rescale_betas_zero_snr = Some(true);
        }
        Ok(scheduler)
    }

    /// SDXL: heads of 64 channels in the UNet and both encoders, as SD 2.x; the added
    /// conditions' widths from `label_emb.0.0` and the pooled text's (`text_projection`) width.
    pub fn defaults(ckpt: &Checkpoint, layout: &Layout) -> Result<Self> {
        let configs = Self::infer(ckpt, layout)?;
        configs.unet.validate()?;
        configs.vae.validate()?;
        configs.text.validate()?;
        if let Some(t) = &configs.text_2 {
            t.validate()?;
        }
        Ok(configs)
    }

    /// [`SingleFileConfigs::defaults`] before the configs are validated: what the shapes say
    /// over the family's defaults, which need not make a model (group norms and head counts are
    /// not in the shapes, and a small model may not take the family's).
    pub fn infer(ckpt: &Checkpoint, layout: &Layout) -> Result<Self> {
        let (unet_json, text_json) = match layout.family {
            Family::Sd1 => (SD1_UNET, SD1_TEXT),
            Family::Sd2 => (SD2_UNET, SD2_TEXT),
            Family::Sdxl => (SDXL_UNET, SD1_TEXT),
            Family::SdxlRefiner => (SDXL_UNET, SDXL_TEXT_2),
        };
        let mut unet: UNetConfig = embedded(unet_json, "UNet")?;
        let mut vae: VaeConfig = embedded(SD_VAE, "VAE")?;
        let mut text: ClipTextConfig = embedded(text_json, "text encoder")?;
        let v = layout.prediction_type == PredictionType::VPrediction;
        let scheduler = Self::default_scheduler(layout)?;
        if layout.family == Family::Sd2 && !v {
            unet.sample_size = Some(64);
        }
        if layout.family.is_sdxl() {
            vae.scaling_factor = SDXL_VAE_SCALING;
            vae.sample_size = Some(1024);
        }
        infer_text(ckpt, &layout.text, layout.family, &mut text)?;
        let text_2 = match &layout.text_2 {
            Some(l) => {
                let mut t: ClipTextConfig = embedded(SDXL_TEXT_2, "second text encoder")?;
                infer_text(ckpt, l, layout.family, &mut t)?;
                Some(t)
            }
            None => None,
        };
        // The pooled text SDXL's UNet is conditioned on: the encoder with the projection.
        let pooled = layout.family.is_sdxl().then(|| {
            let (cfg, l) = match (&text_2, &layout.text_2) {
                (Some(c), Some(l)) => (c, l),
                _ => (&text, &layout.text),
            };
            (cfg.projection_dim.unwrap_or(cfg.hidden_size), l.clone())
        });
        infer_unet(ckpt, layout, &mut unet, pooled.as_ref())?;
        infer_vae(ckpt, layout, &mut vae)?;
        Ok(Self {
            unet,
            vae,
            text,
            text_2,
            scheduler,
            sdxl: SdxlPipelineFlags::defaults(layout.family),
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

/// Counts `{block}.transformer_blocks.N` in the file.
fn transformer_depth(has: impl Fn(&str) -> bool, block: &str) -> i64 {
    let mut depth = 0;
    while has(&format!(
        "{block}.transformer_blocks.{depth}.attn1.to_q.weight"
    )) {
        depth += 1;
    }
    depth
}

/// `pooled`: SDXL's pooled text width and the layout of the encoder it comes from.
fn infer_unet(
    ckpt: &Checkpoint,
    layout: &Layout,
    cfg: &mut UNetConfig,
    pooled: Option<&(i64, TextLayout)>,
) -> Result<()> {
    let key = |rest: &str| layout.unet_key(rest);
    let has = |rest: &str| ckpt.contains(&key(rest));
    let file = ckpt.path().display();
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
                cur.depth = transformer_depth(has, &format!("input_blocks.{i}.1"));
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
    // diffusers builds each up block with its level's depth and the middle block with the
    // last level's: the file must have that shape (SDXL base: 2 and 10, the refiner: 4).
    let mid_depth = transformer_depth(has, "middle_block.1");
    let last = &levels[n - 1];
    if last.attention && last.depth != mid_depth {
        return Err(Error::Unsupported(format!(
            "{file}: the UNet's middle block has {mid_depth} transformer layers and its deepest \
             level {}: diffusers' UNet2DConditionModel cannot hold that",
            last.depth
        )));
    }
    let depths: Vec<i64> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| match (l.attention, i + 1 == n) {
            (true, _) => l.depth,
            (false, true) => mid_depth,
            (false, false) => 1,
        })
        .collect();
    cfg.transformer_layers_per_block = per_block(depths.clone());
    // Up blocks: layers+1 output blocks per level, deepest level first.
    let mut up_types = Vec::with_capacity(n);
    let mut start = 0i64;
    for u in 0..n {
        let level = &levels[n - 1 - u];
        let attention = has(&format!("output_blocks.{start}.1.proj_in.weight"));
        if attention {
            let found = transformer_depth(has, &format!("output_blocks.{start}.1"));
            if found != depths[n - 1 - u] {
                return Err(Error::Unsupported(format!(
                    "{file}: `{}` is followed by {found} transformer layers, but its level has \
                     {} in the input blocks: diffusers' UNet2DConditionModel cannot hold that",
                    key(&format!("output_blocks.{start}.1.proj_in.weight")),
                    depths[n - 1 - u]
                )));
            }
        }
        up_types.push(
            if attention {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
            .to_string(),
        );
        start = start.checked_add(level.resnets + 1).ok_or_else(|| {
            Error::bad_model(format!(
                "{file}: the UNet's output_blocks cannot be counted"
            ))
        })?;
    }
    cfg.up_block_types = up_types;
    cfg.attention_head_dim = match layout.family {
        Family::Sd1 => crate::models::config::PerBlock::One(8),
        Family::Sd2 | Family::Sdxl | Family::SdxlRefiner => per_block(
            cfg.block_out_channels
                .iter()
                .map(|&c| (c / 64).max(1))
                .collect(),
        ),
    };
    if let Some((pooled, text)) = pooled {
        // `label_emb.0.0`: [time embedding, pooled text + time ids x their embedding width].
        let label = key("label_emb.0.0.weight");
        let input = need(ckpt, &label, 2)?[1];
        let ids = if layout.family == Family::SdxlRefiner {
            5
        } else {
            6
        };
        let projection = match text {
            TextLayout::OpenClip { prefix } | TextLayout::Clip { prefix } => {
                format!("{prefix}text_projection")
            }
        };
        let time_dim = input
            .checked_sub(*pooled)
            .filter(|rest| *rest > 0 && rest % ids == 0)
            .map(|rest| rest / ids)
            .ok_or_else(|| {
                Error::bad_model(format!(
                    "{file}: `{label}` takes {input} values, which is not the pooled text \
                     ({pooled}, the width of `{projection}`) and {ids} time ids of one width"
                ))
            })?;
        cfg.addition_embed_type = Some("text_time".into());
        cfg.addition_time_embed_dim = Some(time_dim);
        cfg.projection_class_embeddings_input_dim = Some(input);
    } else {
        cfg.addition_embed_type = None;
        cfg.addition_time_embed_dim = None;
        cfg.projection_class_embeddings_input_dim = None;
    }
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

/// The sizes of the text encoder at `text` in the file; `family` says whether an OpenCLIP tower
/// loses its last block (SD 2.x) or keeps it and its projection (SDXL).
fn infer_text(
    ckpt: &Checkpoint,
    text: &TextLayout,
    family: Family,
    cfg: &mut ClipTextConfig,
) -> Result<()> {
    match text {
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
            if family.is_sdxl() {
                // SDXL takes the penultimate block's states and the last one's pooled output
                // through the projection, stored as OpenCLIP multiplies by it: [width, proj].
                cfg.num_hidden_layers = blocks;
                let key = format!("{prefix}text_projection");
                let proj = need(ckpt, &key, 2)?;
                if proj.len() != 2 || proj[0] != cfg.hidden_size {
                    return Err(Error::bad_model(format!(
                        "tensor `{key}` in {} has shape {proj:?}, expected [{}, projection width]",
                        ckpt.path().display(),
                        cfg.hidden_size
                    )));
                }
                cfg.projection_dim = Some(proj[1]);
                cfg.architectures = vec!["CLIPTextModelWithProjection".into()];
            } else {
                // SD 2 conditions on the penultimate block: the last one is never used.
                cfg.num_hidden_layers = blocks - 1;
            }
            if cfg.num_hidden_layers < 1 {
                return Err(Error::bad_model(format!(
                    "{}: the OpenCLIP text encoder at `{prefix}` has {blocks} blocks, too few",
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
    /// A matrix stored `[in, out]` (OpenCLIP's `text_projection`, used as `x @ P`) used as a
    /// linear weight `[out, in]`.
    Transpose,
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
            ("add_embedding.linear_1.", "label_emb.0.0."),
            ("add_embedding.linear_2.", "label_emb.0.2."),
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

/// The original key of text-encoder variable `name` (ours: `text_model.*`, and
/// `text_projection.weight` for an encoder with projection).
pub fn text_original(name: &str, layout: &TextLayout) -> Option<Mapped> {
    if name == "text_projection.weight" {
        return match layout {
            TextLayout::OpenClip { prefix } => Some(Mapped {
                key: format!("{prefix}text_projection"),
                transform: Transform::Transpose,
            }),
            TextLayout::Clip { .. } => None,
        };
    }
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
    /// SDXL base's second text encoder.
    TextEncoder2,
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

    /// The SDXL base's second text encoder (nothing maps for other layouts).
    pub fn text_encoder_2(ckpt: &'a Checkpoint, layout: &'a Layout) -> Self {
        Self {
            ckpt,
            layout,
            component: Component::TextEncoder2,
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
            Component::TextEncoder2 => text_original(name, self.layout.text_2.as_ref()?),
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
        Transform::Transpose => match shape {
            [a, b] => vec![*b, *a],
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
            Transform::Transpose => t.f_transpose(0, 1)?.f_contiguous()?,
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
            Some(Mapped {
                key,
                transform: Transform::Transpose,
            }) => format!("{key} (transposed, for {name})"),
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
    fn sdxl_keys() {
        let cfg: UNetConfig = serde_json::from_str(SDXL_UNET).unwrap();
        let m = UNetMap::new(&cfg).unwrap();
        for (ours, orig) in [
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            // Level 0 has no attention: its downsampler follows two resnets.
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv2.bias",
                "output_blocks.8.0.out_layers.3.bias",
            ),
        ] {
            assert_eq!(m.original(ours).as_deref(), Some(orig), "{ours}");
        }
        let bigg = TextLayout::OpenClip {
            prefix: BIGG_BASE.into(),
        };
        let t = text_original("text_projection.weight", &bigg).unwrap();
        assert_eq!(t.key, "conditioner.embedders.1.model.text_projection");
        assert_eq!(t.transform, Transform::Transpose);
        assert_eq!(transformed_shape(&[1280, 1024], t.transform), [1024, 1280]);
        let clip = TextLayout::Clip {
            prefix: "conditioner.embedders.0.transformer.text_model.".into(),
        };
        assert_eq!(text_original("text_projection.weight", &clip), None);
    }

    #[test]
    fn embedded_configs_parse() {
        for json in [SD1_UNET, SD2_UNET, SDXL_UNET] {
            let c: UNetConfig = embedded(json, "UNet").unwrap();
            c.validate().unwrap();
        }
        let v: VaeConfig = embedded(SD_VAE, "VAE").unwrap();
        v.validate().unwrap();
        for json in [SD1_TEXT, SD2_TEXT, SDXL_TEXT_2] {
            let t: ClipTextConfig = embedded(json, "text").unwrap();
            t.validate().unwrap();
        }
        let t: ClipTextConfig = embedded(SDXL_TEXT_2, "text").unwrap();
        assert!(t.has_projection());
        for json in [EPSILON_SCHEDULER, V_SCHEDULER, SDXL_SCHEDULER] {
            let _: SchedulerConfig = embedded(json, "scheduler").unwrap();
        }
        // SDXL base's add_embedding: the pooled bigG text and six time ids of 256.
        let c: UNetConfig = embedded(SDXL_UNET, "UNet").unwrap();
        assert_eq!(
            c.projection_class_embeddings_input_dim,
            Some(1280 + 6 * 256)
        );
    }
}
