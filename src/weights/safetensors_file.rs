use crate::limits::{element_count, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS};
use crate::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, Metadata};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Shape and dtype of one tensor in a file, and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub shape: Vec<i64>,
    pub dtype: Dtype,
    start: usize,
    end: usize,
}

/// A `.safetensors` file mapped read-only; tensors are materialised one at a time, so
/// loading never holds a second copy of the whole model.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: std::collections::HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to us; a file truncated under us by
        // another process is outside what any reader of on-disk weights can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata): (usize, Metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::bad_model(format!(
                    "{} is not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
        let data_start = 8 + header_len;
        let mut tensors = std::collections::HashMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            if start > end || data_start.checked_add(end).map_or(true, |e| e > mmap.len()) {
                return Err(Error::bad_model(format!(
                    "tensor `{name}` in {} points outside the file",
                    path.display()
                )));
            }
            let shape = checked_shape(path, &name, &info.shape)?;
            tensors.insert(
                name,
                TensorInfo {
                    shape,
                    dtype: info.dtype,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Size in bytes of the header plus data, as on disk.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Drops the resident pages of `name`'s bytes once it has been copied into a model.
    pub fn release(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            // `tensor` copies out of the map before returning: no slice of it is alive.
            drop_mapped_pages(&self.mmap, info.start, info.end - info.start);
        }
    }

    /// Drops every resident page of the file: reading a small tensor maps the whole page-cache
    /// folio around it, which can cover tensors already released.
    pub fn release_all_pages(&self) {
        drop_mapped_pages(&self.mmap, 0, self.mmap.len());
    }

    /// The tensor `name` on the CPU, in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.path.display().to_string(),
        })?;
        let kind = kind_of(info.dtype).ok_or_else(|| {
            Error::Unsupported(format!(
                "tensor `{name}` in {} has dtype {:?}",
                self.path.display(),
                info.dtype
            ))
        })?;
        let bytes = &self.mmap[info.start..info.end];
        Ok(Tensor::f_from_data_size(bytes, &info.shape, kind)?)
    }
}

/// Drops the resident pages of `mmap[start..start + len]` from this process (they read back
/// from the file on the next access), so that a loaded model does not also keep the file's
/// pages in its RSS: without it a model loaded from a memory-mapped file peaks at about twice
/// its size. The caller guarantees that no slice of that range is alive.
pub(crate) fn drop_mapped_pages(mmap: &Mmap, start: usize, len: usize) {
    // SAFETY: the map is read-only and the caller holds no slice of the range; memmap2 widens
    // it to whole pages, and a page shared with a neighbouring tensor is simply read again from
    // the file if that tensor is read later.
    let _ = unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) };
}

/// A tensor's shape as stored in a safetensors header, within [`MAX_TENSOR_DIMS`] dimensions
/// and [`MAX_TENSOR_ELEMENTS`] elements (a zero-sized tensor may not hide an absurd dimension
/// either: shapes become configs).
pub(crate) fn checked_shape(path: &Path, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
    let bad = |why: String| {
        Error::bad_model(format!(
            "tensor `{name}` in {} has shape {shape:?}: {why}",
            path.display()
        ))
    };
    if shape.len() > MAX_TENSOR_DIMS {
        return Err(bad(format!("more than {MAX_TENSOR_DIMS} dimensions")));
    }
    let dims: Vec<i64> = shape
        .iter()
        .map(|&d| i64::try_from(d).ok().filter(|&d| d <= MAX_TENSOR_ELEMENTS))
        .collect::<Option<_>>()
        .ok_or_else(|| bad(format!("a dimension above {MAX_TENSOR_ELEMENTS}")))?;
    match element_count(&dims) {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(dims),
        _ => Err(bad(format!(
            "more than {MAX_TENSOR_ELEMENTS} elements, the limit for one tensor"
        ))),
    }
}

pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}
