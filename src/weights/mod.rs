//! Weight files: safetensors read through a memory map, copied straight into the model's
//! variables with shape checks that name the tensor at fault.
pub mod safetensors_file;

pub use safetensors_file::SafetensorsFile;

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

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

    fn describe(&self) -> String {
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
        let _no_grad = tch::no_grad_guard();
        for (name, mut var) in vs.variables() {
            let keys = keys_of(&name);
            let (key, file, info) = keys
                .iter()
                .find_map(|k| self.files.iter().find_map(|f| f.info(k).map(|i| (k, f, i))))
                .ok_or_else(|| Error::MissingTensor {
                    name: keys.join(" or "),
                    file: self.describe(),
                })?;
            let expected = var.size();
            if info.shape != expected {
                return Err(Error::ShapeMismatch {
                    name: key.clone(),
                    file: file.path().display().to_string(),
                    expected,
                    found: info.shape.clone(),
                });
            }
            let src = file.tensor(key)?;
            var.f_copy_(&src)?;
        }
        Ok(())
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
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
