use crate::limits::{element_count, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS};
use crate::{Error, Result};
use memmap2::{MmapMut, MmapOptions};
use safetensors::tensor::{Dtype, Metadata};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Keeps a memory map alive for as long as model variables point into it.
pub type MappingOwner = Arc<dyn std::any::Any + Send + Sync>;

/// Shape and dtype of one tensor in a file, and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub shape: Vec<i64>,
    pub dtype: Dtype,
    start: usize,
    end: usize,
}

impl TensorInfo {
    /// Where the tensor's bytes start in the file.
    pub fn offset(&self) -> usize {
        self.start
    }
}

/// A `.safetensors` file mapped private and copy-on-write: tensors are either copied out one at
/// a time, so loading never holds a second copy of the whole model, or used in place
/// ([`SafetensorsFile::mapped`]), where a write changes our private copy of that page and never
/// the file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<MmapMut>,
    data_start: usize,
    tensors: std::collections::HashMap<String, TensorInfo>,
    /// The header's `__metadata__` strings.
    user_metadata: Option<std::collections::HashMap<String, String>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is private to us (copy-on-write: nothing we do reaches the file); a
        // file truncated under us by another process is outside what any reader of on-disk
        // weights can defend against (`LoadOptions::copy_weights` limits that to loading).
        let mmap = unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata): (usize, Metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::bad_model(format!(
                    "{} is not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
        let data_start = 8 + header_len;
        let user_metadata = metadata.metadata().clone();
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
        let mmap = Arc::new(mmap);
        register_map(&mmap);
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            user_metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The header's `__metadata__` strings, if it has any.
    pub fn user_metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.user_metadata.as_ref()
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
            drop_mapped_pages(
                &self.mmap,
                info.start,
                info.end - info.start,
                PageSpan::Covering,
            );
        }
    }

    /// Drops every resident page of the file: reading a small tensor maps the whole page-cache
    /// folio around it, which can cover tensors already released.
    pub fn release_all_pages(&self) {
        drop_mapped_pages(&self.mmap, 0, self.mmap.len(), PageSpan::Covering);
    }

    /// The tensor `name` as a view of the mapping, without a copy, when it is stored in `kind`
    /// at an address aligned for that dtype; the owner keeps the mapping alive and must
    /// outlive the tensor and everything that shares its storage.
    pub fn mapped(&self, name: &str, kind: Kind) -> Option<(Tensor, MappingOwner)> {
        let info = self.tensors.get(name)?;
        if kind_of(info.dtype) != Some(kind) || info.start == info.end {
            return None;
        }
        let address = self.mmap.as_ptr() as usize + info.start;
        if address % kind.elt_size_in_bytes() != 0 {
            return None;
        }
        // SAFETY: `info.start..info.end` lies inside the map (checked at open) and holds
        // exactly shape x dtype bytes (checked by the safetensors header validation); the map
        // is writable and private, so an in-place write through the tensor is allowed and
        // stays ours; the returned owner keeps it mapped.
        let tensor = unsafe {
            Tensor::f_from_blob(
                self.mmap.as_ptr().add(info.start),
                &info.shape,
                &[],
                kind,
                Device::Cpu,
            )
        }
        .ok()?;
        Some((tensor, self.mmap.clone()))
    }

    /// Maps every page of the file into this process now, in one call
    /// (`MADV_POPULATE_READ`, Linux 5.14+; elsewhere nothing), instead of one page fault per
    /// 64 KiB during the first step that reads the weights in place.
    pub fn populate(&self) {
        populate_pages(&self.mmap, 0, self.mmap.len());
    }

    /// [`SafetensorsFile::populate`] for the pages of tensor `name` alone, before it is copied
    /// out: one call instead of a page fault per 64 KiB.
    pub fn populate_tensor(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            populate_pages(&self.mmap, info.start, info.end - info.start);
        }
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
        super::tensor_from_bytes(bytes, &info.shape, kind)
    }
}

/// The weight files' maps that are alive, so that a weight used in place can be told apart
/// from one in memory of its own ([`release_if_mapped`]).
static LIVE_MAPS: std::sync::Mutex<Vec<std::sync::Weak<MmapMut>>> =
    std::sync::Mutex::new(Vec::new());

fn register_map(map: &Arc<MmapMut>) {
    let mut maps = LIVE_MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|m| m.strong_count() > 0);
    maps.push(Arc::downgrade(map));
}

/// If `address..address + len` lies inside a live weight-file map, drops its resident pages
/// (as [`drop_mapped_pages`]) and returns true; memory of any other kind is left alone. For a
/// weight used in place whose layer now works from a packed copy: no page of a weight file's
/// map is ever written by us, so the dropped pages read back unchanged if they are needed (the
/// text encoder's token table relies on this after each lookup).
pub fn release_if_mapped(address: usize, len: usize) -> bool {
    release_mapped_ranges([(address, len)]) == 1
}

/// [`release_if_mapped`] for the bytes of `t`.
pub(crate) fn release_tensor_if_mapped(t: &Tensor) -> bool {
    release_mapped_ranges([byte_range(t)]) == 1
}

/// Where `t`'s elements lie: `(address, bytes)`.
fn byte_range(t: &Tensor) -> (usize, usize) {
    let len = t.numel().saturating_mul(t.kind().elt_size_in_bytes());
    (t.data_ptr() as usize, len)
}

/// [`release_if_mapped`] for each `(address, len)` of `ranges`, under one look at the live
/// maps; returns how many lay in one.
fn release_mapped_ranges(ranges: impl IntoIterator<Item = (usize, usize)>) -> usize {
    let maps: Vec<Arc<MmapMut>> = LIVE_MAPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|m| m.upgrade())
        .collect();
    let mut released = 0;
    for (address, len) in ranges {
        let inside = |map: &&Arc<MmapMut>| {
            let base = map.as_ptr() as usize;
            address >= base
                && address
                    .checked_add(len)
                    .is_some_and(|end| end <= base + map.len())
        };
        if let Some(map) = maps.iter().find(inside) {
            // Only the pages wholly inside: a neighbouring weight that was not packed is still
            // read in place, and re-reading a dropped page it shares would map the whole
            // page-cache folio around it again (megabytes of the weight just let go, with large
            // folios). Biases and norms are never in place (`weights::load_into_mapped`).
            drop_mapped_pages(map, address - map.as_ptr() as usize, len, PageSpan::Inside);
            released += 1;
        }
    }
    released
}

/// The weights of one model part that loading may point into a weight file's map
/// ([`super::load_into_mapped`]): its matrices and convolution kernels, gathered as the part is
/// built ([`crate::models::blocks::collect_mapped`]). A part lets their pages go when its
/// work in a call is done ([`MappedWeights::release`]), so that the file's pages are not
/// resident while other parts run: they read back from the page cache (or the file) at the
/// next call. Weights that were copied or packed are left alone.
#[derive(Debug, Default)]
pub struct MappedWeights {
    tensors: Vec<Tensor>,
}

impl MappedWeights {
    pub(crate) fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors }
    }

    /// Drops the resident pages of those weights that lie in a live weight file's map;
    /// returns how many did. A weight file's map is never written by us, so nothing is lost:
    /// a later read maps the same bytes back.
    pub fn release(&self) -> usize {
        release_mapped_ranges(self.tensors.iter().filter(|t| t.defined()).map(byte_range))
    }
}

/// Drops the resident pages of `map[start..start + len]` from this process (they read back
/// from the file on the next access), so that a loaded model does not also keep the file's
/// pages in its RSS: without it a model loaded from a memory-mapped file peaks at about twice
/// its size. `map` must be a whole file mapping (page-aligned); the caller guarantees that no
/// slice of that range is alive and that no page of it was written.
pub(crate) fn drop_mapped_pages(map: &[u8], start: usize, len: usize, span: PageSpan) {
    // SAFETY: the range is rounded to whole pages inside the mapping; a page shared with a
    // neighbouring tensor is simply read again from the file if that tensor is read later.
    let page = page_size();
    let base = map.as_ptr() as usize;
    let end = start.saturating_add(len).min(map.len());
    let (from, to) = match span {
        PageSpan::Covering => (
            (base + start) / page * page,
            (base + end).div_ceil(page) * page,
        ),
        PageSpan::Inside => (
            (base + start).div_ceil(page) * page,
            (base + end) / page * page,
        ),
    };
    if from >= to {
        return;
    }
    unsafe {
        libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
    }
}

/// Maps the pages of `map[start..start + len]` into this process now (`MADV_POPULATE_READ`,
/// Linux 5.14+; elsewhere, or on an older kernel, nothing: they are then faulted in on use).
fn populate_pages(map: &[u8], start: usize, len: usize) {
    let page = page_size();
    let base = map.as_ptr() as usize;
    let end = start.saturating_add(len).min(map.len());
    let (from, to) = ((base + start) / page * page, base + end);
    if from >= to {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: only asks the kernel to map pages of the file inside the mapping.
    unsafe {
        libc::madvise(
            from as *mut libc::c_void,
            to - from,
            libc::MADV_POPULATE_READ,
        );
    }
}

/// Which pages [`drop_mapped_pages`] drops for a byte range that need not be page-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageSpan {
    /// Every page the range touches: for bytes copied out, whose neighbours are either copied
    /// too or read back from the file if needed.
    Covering,
    /// Only the pages wholly inside the range: for a weight whose neighbours are still used in
    /// place, so that none of their pages is dropped and faulted back.
    Inside,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
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

pub fn kind_of(dtype: Dtype) -> Option<Kind> {
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
