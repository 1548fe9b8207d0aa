//! Weight files: safetensors read through a memory map, copied straight into the model's
//! variables with shape checks that name the tensor at fault. A diffusers folder
//! ([`WeightSet`]) and a single-file checkpoint ([`single_file::ComponentSource`], `.safetensors`
//! or `.ckpt` in the original CompVis layout) both implement [`TensorSource`] and fill a model
//! through the same [`load_into_from`].
mod ckpt;
pub mod pickle;
pub mod progress;
pub mod safetensors_file;
pub mod single_file;

pub(crate) use safetensors_file::release_tensor_if_mapped;
pub use safetensors_file::{release_if_mapped, MappedWeights, MappingOwner, SafetensorsFile};

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Tensor `key` of `file` as float32, refused when its dtype is not a floating-point one or a
/// value is not finite: what the small add-on files (LoRAs, embeddings) may hold, whose values
/// go straight into a run.
pub(crate) fn finite_float32(t: Tensor, key: &str, file: &Path) -> Result<Tensor> {
    if !matches!(
        t.kind(),
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
    ) {
        return Err(Error::bad_model(format!(
            "tensor `{key}` in {} has dtype {:?}, not floating point",
            file.display(),
            t.kind()
        )));
    }
    let t = t.f_to_kind(Kind::Float)?;
    if t.numel() > 0 && !bool::try_from(t.f_isfinite()?.f_all()?)? {
        return Err(Error::bad_model(format!(
            "tensor `{key}` in {} holds values that are not finite",
            file.display()
        )));
    }
    Ok(t)
}

/// A new CPU tensor of `shape` and `kind` holding `bytes`, which must be exactly its size.
/// tch's `Tensor::from_data_size` zero-fills the new tensor before copying into it: a second
/// pass over every byte of every weight loaded (12 % of a bfloat16 load's time in a profile).
pub(crate) fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor> {
    let needed = crate::limits::element_count(shape)
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
    if needed != Some(bytes.len()) {
        return Err(Error::Internal(format!(
            "{} bytes for a {kind:?} tensor of shape {shape:?}",
            bytes.len()
        )));
    }
    let t = Tensor::f_empty(shape, (kind, Device::Cpu))?;
    if !bytes.is_empty() {
        // SAFETY: `t` is a new contiguous CPU tensor of exactly `bytes.len()` bytes (checked
        // above), which nothing else references yet.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr() as *mut u8, bytes.len());
        }
    }
    Ok(t)
}

/// Where a model's tensors come from, under the model's own (diffusers) variable names.
pub trait TensorSource {
    /// The shape of the tensor stored for `key`, if the source has it.
    fn shape(&self, key: &str) -> Option<Vec<i64>>;
    /// The tensor for `key` on the CPU, in its stored dtype.
    fn tensor(&self, key: &str) -> Result<Tensor>;
    /// How error messages name `key`: the key as stored in the file, which may differ.
    fn stored_name(&self, key: &str) -> String {
        key.to_string()
    }
    /// The file or files, for error messages.
    fn describe(&self) -> String;
    /// The file that holds `key`, for error messages.
    fn file_of(&self, _key: &str) -> String {
        self.describe()
    }
    /// The tensor for `key` as a view of a memory map, without a copy, when the source can
    /// give one in `kind`; the owner keeps the map alive (see [`load_into_mapped`]).
    fn mapped(&self, _key: &str, _kind: Kind) -> Option<(Tensor, MappingOwner)> {
        None
    }
    /// The tensor for `key` in its stored dtype as a view of a memory map, to be copied from at
    /// once (and then released by [`TensorSource::done`]); `None` where the source has no
    /// aligned view to give, and [`TensorSource::tensor`] makes a copy instead.
    fn view(&self, _key: &str) -> Option<(Tensor, MappingOwner)> {
        None
    }
    /// Called once `key` has been copied into the model: a memory-mapped source may drop the
    /// pages it read, so that a loaded model does not also keep the file resident.
    fn done(&self, _key: &str) {}
    /// Called once every variable is filled: a memory-mapped source drops what is still
    /// resident (pages mapped around later reads, headers).
    fn finished(&self) {}
    /// Called once every variable is filled, when some point into the source's map: the
    /// source may map their pages now rather than on first use.
    fn populate(&self) {}
}

/// Fills every variable of `vs` from `source`, converting the dtype (and device), one tensor at
/// a time. `keys_of` gives the keys a variable may be stored under, in order of preference. A
/// missing tensor or a shape that differs is an error naming the tensor as the file stores it.
pub fn load_into_from(
    source: &dyn TensorSource,
    vs: &VarStore,
    keys_of: impl Fn(&str) -> Vec<String>,
) -> Result<()> {
    load_into_mapped(source, vs, keys_of, false).map(drop)
}

/// Whether a tensor is worth using in place: a matrix or a convolution kernel, which a layer
/// may pack ([`crate::models::packed`]) and then let go of. Everything else (biases, norms) is
/// copied: those are read at every step, and the kernel maps a file's pages in large folios (2
/// MiB on Linux 6.x with ext4), so reading a bias in place maps back the whole folio around
/// it, undoing the page drop of the packed weight beside it. Copying them let an SD 1.5
/// pipeline hold about 400 MiB less after its first step.
pub(crate) fn worth_mapping(var: &Tensor) -> bool {
    matches!(var.dim(), 2 | 4)
}

/// As [`load_into_from`]; with `map` set, a CPU variable whose tensor the source stores in the
/// variable's dtype points into the source's memory map instead of holding a copy (loading
/// then reads only the headers, and the weights are paged in as the model first uses them).
/// The returned owners keep those maps alive: hold them for as long as the model.
pub fn load_into_mapped(
    source: &dyn TensorSource,
    vs: &VarStore,
    keys_of: impl Fn(&str) -> Vec<String>,
    map: bool,
) -> Result<Vec<MappingOwner>> {
    let _no_grad = tch::no_grad_guard();
    let mut owners: Vec<MappingOwner> = Vec::new();
    for (name, mut var) in vs.variables() {
        let keys = keys_of(&name);
        let (key, shape) = keys
            .iter()
            .find_map(|k| source.shape(k).map(|s| (k, s)))
            .ok_or_else(|| Error::MissingTensor {
                name: keys
                    .iter()
                    .map(|k| source.stored_name(k))
                    .collect::<Vec<_>>()
                    .join(" or "),
                file: source.describe(),
            })?;
        let expected = var.size();
        if shape != expected {
            return Err(Error::ShapeMismatch {
                name: source.stored_name(key),
                file: source.file_of(key),
                expected,
                found: shape,
            });
        }
        let in_place = match map && var.device() == Device::Cpu && worth_mapping(&var) {
            true => source.mapped(key, var.kind()),
            false => None,
        };
        if let Some((view, owner)) = in_place {
            let _ = var.f_set_source_tensor_(&view)?;
            if !owners.iter().any(|o| Arc::ptr_eq(o, &owner)) {
                owners.push(owner);
            }
            progress::tensor(stored_bytes(&view))?;
            continue;
        }
        // Straight from the map where it can be viewed: one pass that also converts the dtype,
        // instead of a copy of the stored bytes first.
        let (src, owner) = match source.view(key) {
            Some((view, owner)) => (view, Some(owner)),
            None => (source.tensor(key)?, None),
        };
        var.f_copy_(&src)?;
        let bytes = stored_bytes(&src);
        drop((src, owner));
        source.done(key);
        progress::tensor(bytes)?;
    }
    source.finished();
    if !owners.is_empty() {
        source.populate();
    }
    Ok(owners)
}

/// A tensor's bytes in its own dtype (as a file stores it).
fn stored_bytes(t: &Tensor) -> u64 {
    (t.numel() as u64).saturating_mul(t.kind().elt_size_in_bytes() as u64)
}

/// A set of weight files that together hold one model's tensors (one file, or the shards of
/// a `*.safetensors.index.json`).
pub struct WeightSet {
    files: Vec<SafetensorsFile>,
}

impl WeightSet {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { files })
    }

    /// Finds the weights of a diffusers component folder: `{stem}.safetensors`, then the fp16
    /// variant `{stem}.fp16.safetensors`, then sharded `.index.json` forms of both.
    pub fn find_in_dir(dir: &Path, stem: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::bad_model(format!(
                "folder {} does not exist",
                dir.display()
            )));
        }
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Self::open(&[single]);
            }
            let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                return Self::open(&shards_of_index(&index)?);
            }
        }
        let pickle = dir.join(format!("{stem}.bin"));
        if pickle.is_file() {
            return Err(Error::Unsupported(format!(
                "{} is a pickled PyTorch file; convert it to .safetensors",
                pickle.display()
            )));
        }
        Err(Error::bad_model(format!(
            "no {stem}.safetensors (or .fp16.safetensors) in {}",
            dir.display()
        )))
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Bytes of all the files together.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |a, f| a.saturating_add(f.file_len()))
    }

    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect();
        names.join(", ")
    }

    /// Fills every variable of `vs` from the tensor of the same name, converting the dtype.
    /// A missing tensor or a shape that differs is an error naming the tensor.
    pub fn load_into(&self, vs: &VarStore) -> Result<()> {
        self.load_into_with(vs, |name| vec![name.to_string()])
    }

    /// As [`WeightSet::load_into`], with `keys_of` giving the keys a variable may be stored
    /// under, in order of preference (layouts differ between library versions).
    pub fn load_into_with(
        &self,
        vs: &VarStore,
        keys_of: impl Fn(&str) -> Vec<String>,
    ) -> Result<()> {
        load_into_from(self, vs, keys_of)
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> std::collections::HashMap<String, Vec<i64>> {
        self.files
            .iter()
            .flat_map(|f| {
                f.names()
                    .filter_map(|n| f.info(n).map(|i| (n.to_string(), i.shape.clone())))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn file_with(&self, key: &str) -> Option<&SafetensorsFile> {
        self.files.iter().find(|f| f.info(key).is_some())
    }
}

impl TensorSource for WeightSet {
    fn shape(&self, key: &str) -> Option<Vec<i64>> {
        self.file_with(key)
            .and_then(|f| f.info(key))
            .map(|i| i.shape.clone())
    }

    fn tensor(&self, key: &str) -> Result<Tensor> {
        match self.file_with(key) {
            Some(f) => f.tensor(key),
            None => Err(Error::MissingTensor {
                name: key.to_string(),
                file: self.describe(),
            }),
        }
    }

    fn describe(&self) -> String {
        WeightSet::describe(self)
    }

    fn mapped(&self, key: &str, kind: Kind) -> Option<(Tensor, MappingOwner)> {
        self.file_with(key)?.mapped(key, kind)
    }

    fn view(&self, key: &str) -> Option<(Tensor, MappingOwner)> {
        let file = self.file_with(key)?;
        let kind = safetensors_file::kind_of(file.info(key)?.dtype)?;
        let view = file.mapped(key, kind)?;
        file.populate_tensor(key);
        Some(view)
    }

    fn populate(&self) {
        self.files.iter().for_each(SafetensorsFile::populate);
    }

    fn file_of(&self, key: &str) -> String {
        match self.file_with(key) {
            Some(f) => f.path().display().to_string(),
            None => self.describe(),
        }
    }

    fn done(&self, key: &str) {
        if let Some(f) = self.file_with(key) {
            f.release(key);
        }
    }

    fn finished(&self) {
        self.files
            .iter()
            .for_each(SafetensorsFile::release_all_pages);
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::models::config::read_text(index)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.into(),
        source: e,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_model(format!("{} has no weight_map", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for file in map.values().filter_map(|v| v.as_str()) {
        let p = dir.join(file);
        if !shards.contains(&p) {
            shards.push(p);
        }
    }
    Ok(shards)
}
