//! LoRA files, read once into a [`Lora`] handle and applied per call ([`LoraWeight`]) without
//! touching the model's weights (see [`crate::models::adapters`]).
//!
//! Two layouts are read, for SD 1.x, 2.x and SDXL:
//! - kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`),
//!   each with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`; the module is
//!   diffusers' module path or the original (LDM / SGM) one with `_` for `.`. Linear layers,
//!   1x1 and 3x3 convolutions (LoCon). Scale: `alpha / rank`, 1 without an alpha.
//! - diffusers / PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>`,
//!   each with `.lora_A.weight` / `.lora_B.weight` (or the older `.lora.down.weight` /
//!   `.lora.up.weight`) and an optional `.alpha` (diffusers' `network_alphas`). Scale:
//!   `lora_alpha / r` from the file's `lora_adapter_metadata` (or the `.alpha`), 1 without.
//!
//! Other kinds (LyCORIS LoHa, LoKr, IA3, GLoRA, OFT, full diffs, DoRA, Tucker-decomposed
//! LoCon) are recognised and refused by name.
use crate::limits::MAX_LORA_TENSORS;
use crate::models::adapters::{ActiveAdapters, Delta, LayerShape, Target, Targets};
use crate::weights::finite_float32;
use crate::weights::safetensors_file::SafetensorsFile;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// The part of a model a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    /// The first (SD 1.x / 2.x: the only) text encoder.
    TextEncoder,
    /// SDXL's second text encoder (the refiner's only one).
    TextEncoder2,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
        }
    }
}

/// How a module is named in the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ModuleName {
    /// A module path with dots (diffusers / PEFT).
    Dotted(String),
    /// A module path with `_` for `.` (kohya).
    Flat(String),
}

impl ModuleName {
    fn as_str(&self) -> &str {
        match self {
            ModuleName::Dotted(s) | ModuleName::Flat(s) => s,
        }
    }
}

/// One adapted layer: `up @ down`, scaled by `alpha / rank` (or `alpha / sqrt(rank)`).
#[derive(Debug)]
struct Module {
    /// The tensor name of `down`, to name the module in errors.
    down_key: String,
    component: Component,
    name: ModuleName,
    /// `[rank, in]` or `[rank, in, k, k]`, float32 on the CPU.
    down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    up: Tensor,
    /// Scale at weight 1.
    scale: f64,
}

/// A LoRA file read into memory, ready to be applied to any pipeline it fits.
#[derive(Debug)]
pub struct Lora {
    name: String,
    path: PathBuf,
    modules: Vec<Module>,
    /// The trainer's `sshs_model_hash`, A1111's hash when the file has one.
    stored_hash: Option<String>,
    /// A1111's hash computed from the file, the first time it is asked for (only PNG info
    /// needs it: hashing a large LoRA at every load would cost more than reading it).
    computed_hash: std::sync::OnceLock<String>,
}

// SAFETY: a `Lora`'s tensors are written only while `Lora::load` builds it; afterwards they
// are only read (reshaped views and converted copies are made from them), and libtorch allows
// concurrent reads of a tensor from several threads.
unsafe impl Sync for Lora {}

/// A LoRA applied in one call with its weights for the UNet and the text encoders (A1111's
/// `<lora:name:text:unet>`; usually both the same).
#[derive(Debug, Clone)]
pub struct LoraWeight {
    pub lora: Arc<Lora>,
    pub unet: f64,
    pub text: f64,
}

impl LoraWeight {
    /// `lora` at `weight` for both the UNet and the text encoders.
    pub fn new(lora: Arc<Lora>, weight: f64) -> Self {
        Self {
            lora,
            unet: weight,
            text: weight,
        }
    }
}

/// Most LoRAs one call may apply (A1111 users stack a handful).
pub const MAX_LORAS_PER_CALL: usize = 64;

/// Largest weight a LoRA may be applied with (A1111 has none; far beyond any useful one).
pub const MAX_LORA_WEIGHT: f64 = 1000.0;

/// Tensor suffixes of LoRA kinds we do not apply, with their names.
const UNSUPPORTED: &[(&str, &str)] = &[
    (".hada_w1_a", "LyCORIS LoHa"),
    (".hada_w1_b", "LyCORIS LoHa"),
    (".lokr_w1", "LyCORIS LoKr"),
    (".lokr_w1_a", "LyCORIS LoKr"),
    (".lokr_w2", "LyCORIS LoKr"),
    (".lokr_w2_a", "LyCORIS LoKr"),
    (".on_input", "LyCORIS IA3"),
    (".a1.weight", "LyCORIS GLoRA"),
    (".oft_blocks", "LyCORIS OFT"),
    (".oft_diag", "LyCORIS OFT"),
    (".diff", "a full weight difference (LyCORIS diff)"),
    (".diff_b", "a full weight difference (LyCORIS diff)"),
    (".dora_scale", "DoRA"),
    (".lora_magnitude_vector", "DoRA"),
    (
        ".lora_mid.weight",
        "LoCon with a Tucker-decomposed kernel (lora_mid)",
    ),
    (".lora_embedding_A", "a LoRA on embeddings"),
];

/// What a tensor of a LoRA file is.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a tensor name into its component, module and part, or says why it is not one.
fn classify(key: &str) -> Result<(Component, ModuleName, Part)> {
    for (suffix, kind) in UNSUPPORTED {
        if key.ends_with(suffix) || key.contains(&format!("{suffix}.")) {
            return Err(Error::Unsupported(format!(
                "{kind} (tensor `{key}`): only LoRA (down/up pairs, LoCon) is applied"
            )));
        }
    }
    let kohya = [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ];
    for (prefix, component) in kohya {
        if let Some(rest) = key.strip_prefix(prefix) {
            let parts = [
                (".lora_down.weight", Part::Down),
                (".lora_up.weight", Part::Up),
                (".alpha", Part::Alpha),
            ];
            for (suffix, part) in parts {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Ok((component, ModuleName::Flat(module.to_string()), part));
                }
            }
            return Err(Error::bad_model(format!(
                "tensor `{key}` is not a LoRA tensor (expected `.lora_down.weight`, \
                 `.lora_up.weight` or `.alpha` after the module)"
            )));
        }
    }
    let (head, rest) = key.split_once('.').unwrap_or((key, ""));
    let component = match head {
        "unet" => Component::Unet,
        "text_encoder" => Component::TextEncoder,
        "text_encoder_2" => Component::TextEncoder2,
        _ => {
            return Err(Error::bad_model(format!(
                "tensor `{key}` is neither kohya's (`lora_unet_`, `lora_te_`, `lora_te1_`, \
                 `lora_te2_`) nor diffusers' (`unet.`, `text_encoder.`, `text_encoder_2.`)"
            )))
        }
    };
    let parts = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in parts {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((
                component,
                ModuleName::Dotted(old_processor_name(module)),
                part,
            ));
        }
    }
    // diffusers' oldest layout: `<attention>.processor.to_q_lora.down.weight`.
    for (suffix, part) in [(".down.weight", Part::Down), (".up.weight", Part::Up)] {
        if let Some(module) = rest.strip_suffix(suffix) {
            if module.contains(".processor.") && module.ends_with("_lora") {
                return Ok((
                    component,
                    ModuleName::Dotted(old_processor_name(module)),
                    part,
                ));
            }
        }
    }
    Err(Error::bad_model(format!(
        "tensor `{key}` is not a LoRA tensor (expected `.lora_A.weight`, `.lora_B.weight` or \
         `.alpha` after the module)"
    )))
}

/// `attn1.processor.to_out_lora` -> `attn1.to_out.0`; other names unchanged.
fn old_processor_name(module: &str) -> String {
    match module.split_once(".processor.") {
        Some((attention, projection)) => {
            let projection = projection.strip_suffix("_lora").unwrap_or(projection);
            let projection = if projection == "to_out" {
                "to_out.0"
            } else {
                projection
            };
            format!("{attention}.{projection}")
        }
        None => module.to_string(),
    }
}

/// diffusers' `lora_adapter_metadata`: `{"unet.lora_alpha": 8, "unet.r": 4, ...}` per
/// component prefix, with optional `alpha_pattern` / `rank_pattern` and `use_rslora`.
#[derive(Debug, Default)]
struct AdapterMetadata {
    by_prefix: HashMap<String, serde_json::Value>,
}

impl AdapterMetadata {
    fn parse(file: &SafetensorsFile) -> Result<Self> {
        let Some(text) = file
            .user_metadata()
            .and_then(|m| m.get("lora_adapter_metadata"))
        else {
            return Ok(Self::default());
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::bad_model(format!(
                "{}: lora_adapter_metadata is not JSON: {e}",
                file.path().display()
            ))
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::bad_model(format!(
                "{}: lora_adapter_metadata is not a JSON object",
                file.path().display()
            )));
        };
        Ok(Self {
            by_prefix: map.into_iter().collect(),
        })
    }

    fn get(&self, component: Component, field: &str) -> Option<&serde_json::Value> {
        let prefix = match component {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        };
        self.by_prefix.get(&format!("{prefix}.{field}"))
    }

    /// The alpha PEFT gives `module` (its `alpha_pattern` entry, else `lora_alpha`), and
    /// whether the scale divides by the square root of the rank (`use_rslora`).
    fn alpha(&self, component: Component, module: &str) -> (Option<f64>, bool) {
        let rslora = self
            .get(component, "use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let pattern = self
            .get(component, "alpha_pattern")
            .and_then(|v| v.as_object())
            .and_then(|patterns| {
                patterns
                    .iter()
                    .filter(|(p, _)| module == p.as_str() || module.ends_with(&format!(".{p}")))
                    .max_by_key(|(p, _)| p.len())
                    .and_then(|(_, v)| v.as_f64())
            });
        let alpha = pattern.or_else(|| self.get(component, "lora_alpha").and_then(|v| v.as_f64()));
        (alpha, rslora)
    }
}

#[derive(Default)]
struct Pieces {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
}

impl Lora {
    /// Reads a LoRA `.safetensors` file; the file is read once and never written.
    pub fn load(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let at = |e: Error| -> Error {
            match e {
                Error::Unsupported(m) => {
                    Error::Unsupported(format!("LoRA {}: {m}", path.display()))
                }
                Error::BadModel(m) if !m.contains(&path.display().to_string()) => {
                    Error::bad_model(format!("LoRA {}: {m}", path.display()))
                }
                other => other,
            }
        };
        let count = file.names().count();
        if count > MAX_LORA_TENSORS {
            return Err(Error::bad_model(format!(
                "LoRA {} has {count} tensors: the limit is {MAX_LORA_TENSORS}",
                path.display()
            )));
        }
        if count == 0 {
            return Err(Error::bad_model(format!(
                "LoRA {} holds no tensors",
                path.display()
            )));
        }
        let metadata = AdapterMetadata::parse(&file)?;
        let mut names: Vec<&str> = file.names().collect();
        names.sort_unstable();
        let mut grouped: BTreeMap<(Component, ModuleName), Pieces> = BTreeMap::new();
        for key in names {
            let (component, module, part) = classify(key).map_err(at)?;
            let tensor = finite_float32(file.tensor(key)?, key, path)?;
            let pieces = grouped.entry((component, module)).or_default();
            let slot = match part {
                Part::Down => &mut pieces.down,
                Part::Up => &mut pieces.up,
                Part::Alpha => &mut pieces.alpha,
            };
            if slot.is_some() {
                return Err(at(Error::bad_model(format!(
                    "tensor `{key}` repeats a part of its module (two layouts for one layer)"
                ))));
            }
            *slot = Some((key.to_string(), tensor));
        }
        let mut modules = Vec::with_capacity(grouped.len());
        for ((component, name), pieces) in grouped {
            modules.push(Self::module(component, name, pieces, &metadata).map_err(at)?);
        }
        let stored_hash = file
            .user_metadata()
            .and_then(|m| m.get("sshs_model_hash"))
            .filter(|h| h.len() >= 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|h| h.to_ascii_lowercase());
        Ok(Self {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            modules,
            stored_hash,
            computed_hash: Default::default(),
        })
    }

    fn module(
        component: Component,
        name: ModuleName,
        pieces: Pieces,
        metadata: &AdapterMetadata,
    ) -> Result<Module> {
        let missing = |what: &str, have: &str| {
            Error::bad_model(format!(
                "module `{}` has `{have}` but no {what}",
                name.as_str()
            ))
        };
        let (down_key, down, up_key, up) = match (pieces.down, pieces.up) {
            (Some((dk, d)), Some((uk, u))) => (dk, d, uk, u),
            (Some((dk, _)), None) => return Err(missing("up weight", &dk)),
            (None, Some((uk, _))) => return Err(missing("down weight", &uk)),
            (None, None) => {
                let key = pieces.alpha.map(|(k, _)| k).unwrap_or_default();
                return Err(missing("down or up weight", &key));
            }
        };
        let (ds, us) = (down.size(), up.size());
        let rank = ds.first().copied().unwrap_or(0);
        let down_ok = matches!(ds.len(), 2 | 4) && ds.iter().all(|&d| d > 0);
        let up_ok = matches!(us.len(), 2 | 4)
            && us.iter().all(|&d| d > 0)
            && us[1] == rank
            && (us.len() == 2 || us[2..] == [1, 1]);
        if !down_ok {
            return Err(Error::bad_model(format!(
                "tensor `{down_key}` has shape {ds:?}: a LoRA down weight is [rank, in] or \
                 [rank, in, k, k]"
            )));
        }
        if !up_ok {
            return Err(Error::bad_model(format!(
                "tensor `{up_key}` has shape {us:?}: for `{down_key}` {ds:?} it must be \
                 [out, {rank}] or [out, {rank}, 1, 1]"
            )));
        }
        let (alpha, rslora) = match (pieces.alpha, &name) {
            (Some((key, t)), _) => {
                if t.numel() != 1 {
                    return Err(Error::bad_model(format!(
                        "tensor `{key}` has shape {:?}: an alpha is one number",
                        t.size()
                    )));
                }
                let alpha = t.f_reshape([1])?.f_double_value(&[0])?;
                if !alpha.is_finite() {
                    return Err(Error::bad_model(format!(
                        "tensor `{key}` holds alpha {alpha}"
                    )));
                }
                (Some(alpha), false)
            }
            (None, ModuleName::Dotted(module)) => metadata.alpha(component, module),
            (None, ModuleName::Flat(_)) => (None, false),
        };
        let rank_f = rank as f64;
        let scale = match (alpha, rslora) {
            (Some(a), false) => a / rank_f,
            (Some(a), true) => a / rank_f.sqrt(),
            (None, _) => 1.0,
        };
        if !scale.is_finite() {
            return Err(Error::bad_model(format!(
                "module `{}`: alpha {alpha:?} over rank {rank} is not a finite scale",
                name.as_str()
            )));
        }
        Ok(Module {
            down_key,
            component,
            name,
            down,
            up,
            scale,
        })
    }

    /// The file's stem: the name a prompt's `<lora:NAME:W>` uses.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first 12 hex digits of A1111's hash of the file (its `Lora hashes` in PNG info):
    /// the trainer's `sshs_model_hash`, else the SHA-256 of the file after its header, read
    /// from the file the first time it is asked for.
    pub fn short_hash(&self) -> Result<String> {
        let hash = match (&self.stored_hash, self.computed_hash.get()) {
            (Some(h), _) | (None, Some(h)) => h,
            (None, None) => {
                let h = crate::hashes::safetensors_data_sha256(&self.path)?;
                self.computed_hash.get_or_init(|| h)
            }
        };
        Ok(hash[..12].to_string())
    }

    /// Number of adapted layers.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// The layers of one pipeline that LoRAs may target, by component: by module path, and by
/// the module path with `_` for `.` as kohya names them.
#[derive(Debug, Default)]
pub struct AdapterTargets {
    components: HashMap<Component, ComponentTargets>,
    /// Says what the pipeline is, in errors ("SD 1.x", "SDXL").
    family: String,
    /// Why this pipeline takes no LoRA at all (TorchScript modules), if so.
    unsupported: Option<String>,
}

#[derive(Debug, Default)]
struct ComponentTargets {
    by_path: Targets,
    /// kohya's flattened names (`down_blocks_0_attentions_0_proj_in`) to module paths.
    by_flat: HashMap<String, String>,
}

impl ComponentTargets {
    fn new(targets: &Targets) -> Self {
        let mut by_path = targets.clone();
        // transformers 5 saves a CLIPTextModel without its `text_model.` level; LoRAs made
        // from it name the layers without it.
        let bare: Vec<(String, Target)> = targets
            .iter()
            .filter_map(|(name, t)| Some((name.strip_prefix("text_model.")?.to_string(), *t)))
            .collect();
        for (name, t) in bare {
            by_path.entry(name).or_insert(t);
        }
        let mut names: Vec<&String> = by_path.keys().collect();
        names.sort();
        let mut by_flat = HashMap::new();
        for name in names {
            by_flat
                .entry(name.replace('.', "_"))
                .or_insert_with(|| name.clone());
        }
        Self { by_path, by_flat }
    }

    fn find(&self, name: &ModuleName) -> Option<(&str, &Target)> {
        let path = match name {
            ModuleName::Dotted(p) => p.as_str(),
            ModuleName::Flat(f) => self.by_flat.get(f)?.as_str(),
        };
        self.by_path
            .get_key_value(path)
            .map(|(k, t)| (k.as_str(), t))
    }
}

impl AdapterTargets {
    /// The targets of a pipeline's parts; `None` parts are absent (or cannot take a LoRA, as
    /// `unsupported` says).
    pub fn new(
        family: &str,
        unet: Option<&Targets>,
        text_encoder: Option<&Targets>,
        text_encoder_2: Option<&Targets>,
        unsupported: Option<String>,
    ) -> Self {
        let mut components = HashMap::new();
        for (component, targets) in [
            (Component::Unet, unet),
            (Component::TextEncoder, text_encoder),
            (Component::TextEncoder2, text_encoder_2),
        ] {
            if let Some(t) = targets {
                components.insert(component, ComponentTargets::new(t));
            }
        }
        Self {
            components,
            family: family.to_string(),
            unsupported,
        }
    }

    /// Checks that every module of `loras` fits a layer of this pipeline and returns the
    /// deltas to install for a call, in `kind` on `device`; `None` when there is nothing to
    /// apply. The first module at fault is named, and nothing changes either way.
    pub fn bind(
        &self,
        loras: &[LoraWeight],
        kind: Kind,
        device: Device,
    ) -> Result<Option<Arc<ActiveAdapters>>> {
        if loras.is_empty() {
            return Ok(None);
        }
        if let Some(why) = &self.unsupported {
            return Err(Error::Unsupported(format!("LoRA: {why}")));
        }
        if loras.len() > MAX_LORAS_PER_CALL {
            return Err(Error::invalid(format!(
                "{} LoRAs in one call: the limit is {MAX_LORAS_PER_CALL}",
                loras.len()
            )));
        }
        let mut active = ActiveAdapters::default();
        for lw in loras {
            let lora = &lw.lora;
            for (what, w) in [("weight", lw.unet), ("text weight", lw.text)] {
                if !w.is_finite() || w.abs() > MAX_LORA_WEIGHT {
                    return Err(Error::invalid(format!(
                        "LoRA `{}` {what} {w} must be a finite number of at most \
                         {MAX_LORA_WEIGHT} in size",
                        lora.name
                    )));
                }
            }
            for m in &lora.modules {
                let fault = |why: String| {
                    Error::invalid(format!(
                        "LoRA {}: tensor `{}` {why}",
                        lora.path.display(),
                        m.down_key
                    ))
                };
                let component = self.components.get(&m.component).ok_or_else(|| {
                    fault(format!(
                        "adapts a {}, which this {} model does not have \
                         (a LoRA for another model family?)",
                        m.component.name(),
                        self.family
                    ))
                })?;
                let (path, target) = component.find(&m.name).ok_or_else(|| {
                    fault(format!(
                        "targets `{}`, which this {} model's {} does not have \
                         (a LoRA for another model family?)",
                        m.name.as_str(),
                        self.family,
                        m.component.name()
                    ))
                })?;
                let (down, up) = fitted(m, &target.shape).ok_or_else(|| {
                    fault(format!(
                        "has shape {:?} (up {:?}), which does not fit layer `{path}` ({})",
                        m.down.size(),
                        m.up.size(),
                        describe(&target.shape)
                    ))
                })?;
                let weight = match m.component {
                    Component::Unet => lw.unet,
                    _ => lw.text,
                };
                if weight == 0.0 {
                    continue;
                }
                let delta = Delta {
                    down: down.f_to_device(device)?.f_to_kind(kind)?.f_contiguous()?,
                    up: up.f_to_device(device)?.f_to_kind(kind)?.f_contiguous()?,
                    scale: weight * m.scale,
                };
                active.by_layer.entry(target.id).or_default().push(delta);
            }
        }
        Ok((!active.by_layer.is_empty()).then(|| Arc::new(active)))
    }
}

fn describe(shape: &LayerShape) -> String {
    match *shape {
        LayerShape::Linear { in_dim, out_dim } => format!("linear {in_dim} -> {out_dim}"),
        LayerShape::Conv {
            in_c,
            out_c,
            kernel,
            ..
        } => format!("{kernel}x{kernel} convolution {in_c} -> {out_c}"),
    }
}

/// `down` and `up` in the form `shape`'s layer runs them (2-D for a linear layer, 4-D for a
/// convolution), or `None` when they do not fit it.
fn fitted(m: &Module, shape: &LayerShape) -> Option<(Tensor, Tensor)> {
    let (ds, us) = (m.down.size(), m.up.size());
    let rank = ds[0];
    match *shape {
        LayerShape::Linear { in_dim, out_dim } => {
            let down_fits = ds[1] == in_dim && (ds.len() == 2 || ds[2..] == [1, 1]);
            (down_fits && us[0] == out_dim).then(|| {
                (
                    m.down.reshape([rank, in_dim]),
                    m.up.reshape([out_dim, rank]),
                )
            })
        }
        LayerShape::Conv {
            in_c,
            out_c,
            kernel,
            ..
        } => {
            let down_fits = ds[1] == in_c
                && match ds.len() {
                    2 => kernel == 1,
                    _ => ds[2..] == [kernel, kernel],
                };
            (down_fits && us[0] == out_c).then(|| {
                (
                    m.down.reshape([rank, in_c, kernel, kernel]),
                    m.up.reshape([out_c, rank, 1, 1]),
                )
            })
        }
    }
}

/// LoRAs read from a folder by name, kept while their file is unchanged, so that a prompt's
/// `<lora:NAME:W>` reads its file once.
#[derive(Debug, Default)]
pub struct LoraCache {
    loaded: Mutex<HashMap<PathBuf, (FileStamp, Arc<Lora>)>>,
}

/// A file's size and modification time: when either changes, it is read again.
type FileStamp = (u64, Option<std::time::SystemTime>);

/// Most LoRAs a cache keeps; beyond it, it starts over.
const CACHED_LORAS: usize = 32;

impl LoraCache {
    /// The LoRA `NAME.safetensors` in `dir`; `name` must be a plain file name.
    pub fn by_name(&self, dir: &Path, name: &str) -> Result<Arc<Lora>> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\'])
            && Path::new(name).components().count() == 1;
        if !plain {
            return Err(Error::invalid(format!(
                "LoRA name `{name}` must be a file name in the LoRA folder, without a path"
            )));
        }
        let path = dir.join(format!("{name}.safetensors"));
        if !path.is_file() {
            return Err(Error::invalid(format!(
                "no LoRA named `{name}`: {} does not exist",
                path.display()
            )));
        }
        self.load(&path)
    }

    /// A LoRA given as a path to its file or as a name in `dir` (a name is what has no `/`,
    /// no `\\` and no `.safetensors` ending, and is not an existing file).
    pub fn path_or_name(&self, what: &str, dir: Option<&Path>) -> Result<Arc<Lora>> {
        let path = Path::new(what);
        let looks_like_path = path.is_file()
            || what.contains(['/', '\\'])
            || what.to_ascii_lowercase().ends_with(".safetensors");
        match (looks_like_path, dir) {
            (true, _) => self.load(path),
            (false, Some(dir)) => self.by_name(dir, what),
            (false, None) => Err(Error::invalid(format!(
                "`{what}` is neither a LoRA file nor a name in a LoRA folder (none was given)"
            ))),
        }
    }

    /// The LoRA at `path`, read again only when the file changed.
    pub fn load(&self, path: &Path) -> Result<Arc<Lora>> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let stamp = (meta.len(), meta.modified().ok());
        {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((seen, lora)) = loaded.get(path) {
                if *seen == stamp && stamp.1.is_some() {
                    return Ok(lora.clone());
                }
            }
        }
        let lora = Arc::new(Lora::load(path)?);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.len() >= CACHED_LORAS {
            loaded.clear();
        }
        loaded.insert(path.to_path_buf(), (stamp, lora.clone()));
        Ok(lora)
    }
}
