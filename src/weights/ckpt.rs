//! PyTorch zip checkpoints (`torch.save` since torch 1.6, the `.ckpt` of CompVis / A1111):
//! a zip archive holding `<name>/data.pkl` (the pickled object) and `<name>/data/<key>` (one
//! entry per storage, normally stored uncompressed). The pickle goes through the restricted
//! [`super::pickle`] interpreter, which only rebuilds tensor references and plain containers;
//! the storages are not read here: each tensor is indexed as a byte range of the memory-mapped
//! file, or of a compressed entry that [`ZippedStorages`] decompresses when it is read.
//!
//! The file may be hostile or damaged. Every size that comes from it is checked before it is
//! used: the zip directory's entry count against the file's length (the zip crate reserves
//! memory for the count it reads), each tensor's shape against [`MAX_TENSOR_DIMS`] and
//! [`MAX_TENSOR_ELEMENTS`], its strides and offset against its storage (a tensor must not
//! repeat stored elements, so it never materialises more than the file holds), and each
//! decompression against the entry's declared size and a limit ([`MAX_PICKLE_BYTES`],
//! [`MAX_STORAGE_BYTES`]), while it decompresses.
use super::pickle::{self, Value};
use super::single_file::{Bytes, RawTensor};
use crate::limits::{
    element_count, MAX_PICKLE_BYTES, MAX_STORAGE_BYTES, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS,
};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use zip::CompressionMethod;

/// The tensors of a checkpoint's state dict, and its `global_step` if it records one.
pub(crate) struct CkptIndex {
    pub tensors: HashMap<String, RawTensor>,
    pub global_step: Option<i64>,
    /// The compressed entries that [`Bytes::Zipped`] tensors read from.
    pub zipped: ZippedStorages,
}

/// A zip entry, as its central directory record and local header place it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    method: CompressionMethod,
    /// Offset of the (possibly compressed) data in the file.
    data_start: usize,
    /// Bytes of data in the file; checked to lie inside it.
    compressed: usize,
    /// Uncompressed size, as the directory declares it.
    size: u64,
    crc32: u32,
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> Error {
    Error::bad_model(format!(
        "{} is not a readable PyTorch zip checkpoint (truncated or damaged?): {e}",
        path.display()
    ))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The bytes of `entry`: a slice of the file when stored, else decompressed, reading at most
/// `limit` + 1 bytes whatever the entry declares, and checking that it decompresses to exactly
/// its declared size and checksum. `limit_name` names the limit in messages.
fn entry_bytes<'a>(
    path: &Path,
    file: &'a [u8],
    entry: &Entry,
    limit: u64,
    limit_name: &str,
) -> Result<Cow<'a, [u8]>> {
    let where_ = || format!("{}: zip entry {}", path.display(), entry.name);
    if entry.size > limit {
        return Err(Error::bad_model(format!(
            "{} is {} bytes uncompressed, above {limit_name} ({limit} bytes)",
            where_(),
            entry.size
        )));
    }
    let raw = &file[entry.data_start..entry.data_start + entry.compressed];
    if entry.method == CompressionMethod::Stored {
        let size = entry.size as usize;
        if size > raw.len() {
            return Err(Error::bad_model(format!(
                "{} declares {size} bytes but holds {} (truncated?)",
                where_(),
                raw.len()
            )));
        }
        return Ok(Cow::Borrowed(&raw[..size]));
    }
    if entry.method != CompressionMethod::Deflated {
        return Err(Error::Unsupported(format!(
            "{} is compressed with {:?}; only stored and deflated entries are supported",
            where_(),
            entry.method
        )));
    }
    // Deflate expands at most 1032:1, so the data in the file bounds the output whatever the
    // directory declares; memory is only touched as bytes actually arrive.
    let most = (entry.compressed as u64)
        .saturating_mul(1032)
        .saturating_add(1024);
    let mut out = Vec::new();
    out.try_reserve_exact(entry.size.min(most) as usize)
        .map_err(|_| {
            Error::bad_model(format!(
                "{}: cannot allocate {} bytes to decompress it",
                where_(),
                entry.size
            ))
        })?;
    flate2::read::DeflateDecoder::new(raw)
        .take(entry.size + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::bad_model(format!("{} does not decompress: {e}", where_())))?;
    if out.len() as u64 != entry.size {
        let got = if out.len() as u64 > entry.size {
            "more".to_string()
        } else {
            out.len().to_string()
        };
        return Err(Error::bad_model(format!(
            "{} decompresses to {got} bytes, but its header says {} (damaged?)",
            where_(),
            entry.size
        )));
    }
    let mut crc = flate2::Crc::new();
    crc.update(&out);
    if crc.sum() != entry.crc32 {
        return Err(Error::bad_model(format!(
            "{} fails its CRC-32 check (damaged?)",
            where_()
        )));
    }
    Ok(Cow::Owned(out))
}

/// The compressed storages of a checkpoint, decompressed on demand.
///
/// A storage that several tensors are views of (a rare layout, but a legitimate one) is kept
/// decompressed until each of its tensors has been released (see [`Self::release`]) or the
/// checkpoint is dropped, so it is decompressed once, not once per tensor. The trade-off is
/// memory: such a storage is held next to the tensors already made from it, up to
/// [`MAX_STORAGE_BYTES`] of held storages in all (the oldest are let go past that, and are
/// decompressed again if read again). A storage with a single tensor, the usual layout, is
/// never held: it costs one decompression per read of its tensor, as before.
#[derive(Default)]
pub(crate) struct ZippedStorages {
    entries: Vec<Entry>,
    /// For each entry, the tensors that read from it.
    tensors: Vec<usize>,
    cache: Mutex<StorageCache>,
    decompressions: AtomicUsize,
}

#[derive(Default)]
struct StorageCache {
    /// Held storages by entry, oldest first.
    held: Vec<(usize, Arc<Vec<u8>>)>,
    held_bytes: u64,
    /// The tensors of each shared entry released so far.
    released: HashMap<usize, HashSet<String>>,
}

impl ZippedStorages {
    /// Registers one more tensor reading from compressed `entry`; returns the entry's index.
    fn add(&mut self, entry: &Entry, by_name: &mut HashMap<String, usize>) -> usize {
        let i = *by_name.entry(entry.name.clone()).or_insert_with(|| {
            self.entries.push(entry.clone());
            self.tensors.push(0);
            self.entries.len() - 1
        });
        self.tensors[i] += 1;
        i
    }

    /// How many times an entry was decompressed.
    #[cfg(test)]
    pub(crate) fn decompressions(&self) -> usize {
        self.decompressions.load(Ordering::Relaxed)
    }

    /// Bytes of storages held decompressed.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> u64 {
        self.lock().held_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StorageCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self, i: usize) -> bool {
        self.tensors.get(i).is_some_and(|&n| n > 1)
    }

    fn all_released(&self, cache: &StorageCache, i: usize) -> bool {
        cache.released.get(&i).map_or(0, |s| s.len()) >= self.tensors[i]
    }

    /// The decompressed bytes of entry `i`.
    pub(crate) fn read(&self, path: &Path, file: &[u8], i: usize) -> Result<Arc<Vec<u8>>> {
        let entry = self.entries.get(i).ok_or_else(|| {
            Error::bad_model(format!("{}: no compressed entry {i}", path.display()))
        })?;
        let mut cache = self.lock();
        if let Some((_, data)) = cache.held.iter().find(|(e, _)| *e == i) {
            return Ok(Arc::clone(data));
        }
        self.decompressions.fetch_add(1, Ordering::Relaxed);
        let bytes = entry_bytes(path, file, entry, MAX_STORAGE_BYTES, "MAX_STORAGE_BYTES")?;
        let data = Arc::new(bytes.into_owned());
        if self.shared(i) && !self.all_released(&cache, i) {
            let size = data.len() as u64;
            while cache.held_bytes + size > MAX_STORAGE_BYTES && !cache.held.is_empty() {
                let (_, old) = cache.held.remove(0);
                cache.held_bytes -= old.len() as u64;
            }
            cache.held.push((i, Arc::clone(&data)));
            cache.held_bytes += size;
        }
        Ok(data)
    }

    /// Says the caller is done with tensor `key` of entry `i`: once every tensor of a held
    /// storage has been released, the storage is let go.
    pub(crate) fn release(&self, i: usize, key: &str) {
        if !self.shared(i) {
            return;
        }
        let mut cache = self.lock();
        cache.released.entry(i).or_default().insert(key.to_string());
        if self.all_released(&cache, i) {
            if let Some(at) = cache.held.iter().position(|(e, _)| *e == i) {
                let (_, old) = cache.held.remove(at);
                cache.held_bytes -= old.len() as u64;
            }
        }
    }
}

/// Entry `i` of `archive`, checked to lie inside the file.
fn entry_at(
    path: &Path,
    data: &[u8],
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    i: usize,
) -> Result<Entry> {
    let f = archive.by_index_raw(i).map_err(|e| zip_error(path, e))?;
    let name = f.name().to_string();
    let placed = usize::try_from(f.data_start())
        .ok()
        .zip(usize::try_from(f.compressed_size()).ok())
        .filter(|&(start, len)| start.checked_add(len).is_some_and(|end| end <= data.len()));
    let Some((data_start, compressed)) = placed else {
        return Err(Error::bad_model(format!(
            "{}: zip entry {name} points outside the file (truncated?)",
            path.display()
        )));
    };
    let entry = Entry {
        name,
        method: f.compression(),
        data_start,
        compressed,
        size: f.size(),
        crc32: f.crc32(),
    };
    if entry.method == CompressionMethod::Stored && entry.size > compressed as u64 {
        return Err(Error::bad_model(format!(
            "{}: zip entry {} declares {} bytes but holds {compressed} (truncated?)",
            path.display(),
            entry.name,
            entry.size
        )));
    }
    Ok(entry)
}

fn u16_at(data: &[u8], p: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(p..p.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], p: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(p..p.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], p: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(p..p.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The zip crate (0.6) reserves memory for as many directory records as the end-of-directory
/// record claims (up to one per byte of the file, ~200 bytes each) before it reads any of them,
/// so a few bytes could make it reserve gigabytes. Every record takes at least 46 bytes of the
/// file: a count the file cannot hold is refused here, found the way zip 0.6 finds it. Whatever
/// zip would refuse by itself is left to it.
fn check_entry_count(path: &Path, data: &[u8]) -> Result<()> {
    const END: u32 = 0x0605_4b50;
    const END64_LOCATOR: u32 = 0x0706_4b50;
    const END64: u32 = 0x0606_4b50;
    const RECORD: usize = 46;
    if data.len() < 22 {
        return Ok(());
    }
    let lowest = data.len().saturating_sub(22 + u16::MAX as usize);
    let Some(end) = (lowest..=data.len() - 22)
        .rev()
        .find(|&p| u32_at(data, p) == Some(END))
    else {
        return Ok(());
    };
    let comment = u16_at(data, end + 20).unwrap_or(0) as usize;
    let mut count = u16_at(data, end + 8).unwrap_or(0) as u64;
    let locator = data
        .len()
        .checked_sub(42 + comment)
        .filter(|&p| u32_at(data, p) == Some(END64_LOCATOR));
    if let Some(locator) = locator {
        let (Some(nominal), Some(upper)) = (u64_at(data, locator + 8), end.checked_sub(60)) else {
            return Ok(());
        };
        let Ok(nominal) = usize::try_from(nominal) else {
            return Ok(());
        };
        if nominal > upper {
            return Ok(());
        }
        let found = data[nominal..upper + 4]
            .windows(4)
            .position(|w| w == END64.to_le_bytes());
        match found.and_then(|at| u64_at(data, nominal + at + 32)) {
            Some(n) => count = n,
            None => return Ok(()),
        }
    }
    if count > (end / RECORD) as u64 {
        return Err(Error::bad_model(format!(
            "{}: its zip directory claims {count} entries, more than its {} bytes can hold \
             (damaged?)",
            path.display(),
            data.len()
        )));
    }
    Ok(())
}

/// Where tensor `t` (called `name`) lies in a storage of `storage_size` bytes: its byte range,
/// and its strides if it is not contiguous. Refuses negative or overflowing numbers, tensors
/// above the limits, views that repeat stored elements and views past the storage's end.
fn place_tensor(
    path: &Path,
    name: &str,
    t: &pickle::TensorRef,
    storage: &str,
    storage_size: u64,
) -> Result<(u64, u64, Option<Vec<i64>>)> {
    let bad =
        |what: String| Error::bad_model(format!("{}: tensor `{name}` {what}", path.display()));
    let (size, stride) = (&t.size, &t.stride);
    if size.len() > MAX_TENSOR_DIMS || size.len() != stride.len() {
        return Err(bad(format!(
            "has {} dimensions ({} strides); at most MAX_TENSOR_DIMS ({MAX_TENSOR_DIMS}) are allowed",
            size.len(),
            stride.len()
        )));
    }
    if size.iter().any(|&s| s < 0) {
        return Err(bad(format!("has a negative size in its shape {size:?}")));
    }
    if stride.iter().any(|&s| s < 0) {
        return Err(bad(format!("has a negative stride in {stride:?}")));
    }
    if t.offset < 0 {
        return Err(bad(format!("has a negative storage offset {}", t.offset)));
    }
    // Zero sizes count as one here, so that an empty tensor cannot carry dimensions whose
    // product overflows either.
    let extent: Vec<i64> = size.iter().map(|&s| s.max(1)).collect();
    if !element_count(&extent).is_some_and(|n| n <= MAX_TENSOR_ELEMENTS) {
        return Err(bad(format!(
            "has shape {size:?}, more than MAX_TENSOR_ELEMENTS ({MAX_TENSOR_ELEMENTS}) elements"
        )));
    }
    let numel = element_count(size).unwrap_or(0);
    // Stored elements the view spans, from its first element to its last.
    let span = if numel == 0 {
        Some(0)
    } else {
        size.iter().zip(stride).try_fold(1i64, |acc, (&s, &st)| {
            (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
        })
    };
    let outside = || {
        bad(format!(
            "points outside its storage {storage} of {storage_size} bytes (offset {}, shape \
             {size:?}, strides {stride:?}; truncated?)",
            t.offset
        ))
    };
    let span = span.ok_or_else(outside)?;
    if numel > span {
        return Err(bad(format!(
            "repeats stored elements: its {numel} elements (shape {size:?}, strides {stride:?}) \
             span only {span} stored elements (zero or overlapping strides); model weights are \
             never broadcast views"
        )));
    }
    let elt = t.storage.kind.elt_size_in_bytes() as u64;
    let start = (t.offset as u64).checked_mul(elt).ok_or_else(outside)?;
    let len = (span as u64).checked_mul(elt).ok_or_else(outside)?;
    if start.checked_add(len).ok_or_else(outside)? > storage_size {
        return Err(outside());
    }
    // All sizes are at least 1 when there is more than one element, and their product is
    // bounded above, so these products cannot overflow.
    let strided = numel > 1 && {
        let mut acc = 1i64;
        let mut contiguous = vec![0; size.len()];
        for d in (0..size.len()).rev() {
            contiguous[d] = acc;
            acc *= size[d];
        }
        *stride != contiguous
    };
    Ok((start, len, strided.then(|| stride.clone())))
}

/// Indexes the tensors of the PyTorch zip checkpoint mapped at `data`.
pub(crate) fn index(path: &Path, data: &[u8]) -> Result<CkptIndex> {
    check_entry_count(path, data)?;
    let mut archive = zip::ZipArchive::new(Cursor::new(data)).map_err(|e| zip_error(path, e))?;
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut pickle_name: Option<String> = None;
    for i in 0..archive.len() {
        let entry = entry_at(path, data, &mut archive, i)?;
        let name = entry.name.clone();
        if (name == "data.pkl" || name.ends_with("/data.pkl"))
            && name.matches('/').count() <= 1
            && pickle_name.is_none()
        {
            pickle_name = Some(name.clone());
        }
        entries.insert(name, entry);
    }
    let pickle_name = pickle_name.ok_or_else(|| {
        Error::bad_model(format!(
            "{} is a zip archive without a data.pkl: not a PyTorch checkpoint",
            path.display()
        ))
    })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();

    if let Some(e) = entries.get(&format!("{prefix}byteorder")) {
        let order = entry_bytes(path, data, e, 64, "the size of a byteorder record")?;
        if order.trim_ascii() == b"big" {
            return Err(Error::Unsupported(format!(
                "{} was saved on a big-endian machine",
                path.display()
            )));
        }
    }

    let pickled = entry_bytes(
        path,
        data,
        &entries[&pickle_name],
        MAX_PICKLE_BYTES,
        "MAX_PICKLE_BYTES",
    )?;
    let root = pickle::unpickle(&pickled, &file_name(path))?;
    drop(pickled);
    let mut state = root.root().clone();
    // An A1111 textual-inversion `.pt` keeps its vectors in `string_to_param` (`{"*": tensor}`).
    if let Some(inner @ Value::Dict(_)) = state.get("string_to_param") {
        state = inner;
    }
    for level in 0.. {
        match state.get("state_dict") {
            Some(inner @ Value::Dict(_)) if level < 8 => state = inner,
            Some(Value::Dict(_)) => {
                return Err(Error::bad_model(format!(
                    "{}: `state_dict` nests more than 8 deep (a cycle?)",
                    path.display()
                )))
            }
            _ => break,
        }
    }
    let Value::Dict(dict) = &state else {
        return Err(Error::bad_model(format!(
            "{}: the checkpoint holds no state dict (a dict of tensors)",
            path.display()
        )));
    };
    let global_step = root.get("global_step").and_then(|v| v.as_int());

    let mut tensors = HashMap::new();
    let mut zipped = ZippedStorages::default();
    let mut zipped_by_name = HashMap::new();
    // Work per entry must not grow with the length of a string the memo can hand out again
    // and again: a key or storage name is looked at once per string object, and the last
    // entry of a key wins, as in a Python dict.
    let mut seen_keys: HashSet<*const u8> = HashSet::new();
    let mut decided: HashSet<&str> = HashSet::new();
    let mut storages: HashMap<*const u8, (String, &Entry)> = HashMap::new();
    let items = dict.items();
    for (key, value) in items.iter().rev() {
        let Value::Str(name) = key else {
            continue;
        };
        if !seen_keys.insert(Rc::as_ptr(name) as *const u8) || !decided.insert(name) {
            continue;
        }
        let Value::Tensor(t) = value else {
            continue;
        };
        let storage_key = Rc::as_ptr(&t.storage.key) as *const u8;
        let (storage_entry, entry) = match storages.entry(storage_key) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => {
                let storage_entry = format!("{prefix}data/{}", t.storage.key);
                let entry = entries.get(&storage_entry).ok_or_else(|| {
                    Error::bad_model(format!(
                        "{}: tensor `{name}` uses storage {storage_entry}, which the archive \
                         lacks",
                        path.display()
                    ))
                })?;
                v.insert((storage_entry, entry))
            }
        };
        let stored = entry.method == CompressionMethod::Stored;
        if !stored && entry.size > MAX_STORAGE_BYTES {
            return Err(Error::bad_model(format!(
                "{}: tensor `{name}` uses storage {storage_entry} of {} bytes uncompressed, \
                 above MAX_STORAGE_BYTES ({MAX_STORAGE_BYTES} bytes)",
                path.display(),
                entry.size
            )));
        }
        let (start, len, stride) = place_tensor(path, name, t, storage_entry, entry.size)?;
        // Both fit in the storage, whose size is at most the file's (stored) or the limit's.
        let (start, len) = (start as usize, len as usize);
        let bytes = if stored {
            Bytes::Mapped {
                start: entry.data_start + start,
                len,
            }
        } else {
            Bytes::Zipped {
                entry: zipped.add(entry, &mut zipped_by_name),
                start,
                len,
            }
        };
        tensors.insert(
            name.to_string(),
            RawTensor {
                kind: t.storage.kind,
                shape: t.size.clone(),
                stride,
                bytes,
            },
        );
    }
    Ok(CkptIndex {
        tensors,
        global_step,
        zipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::pickle::tests::{Builder, Rng};
    use crate::weights::single_file::Checkpoint;
    use std::io::Write;
    use std::path::PathBuf;
    use tch::Tensor;

    /// A tensor of a test state dict, in a `FloatStorage`.
    struct T<'a> {
        name: &'a str,
        storage: &'a str,
        offset: i64,
        size: &'a [i64],
        stride: &'a [i64],
    }

    fn t<'a>(
        name: &'a str,
        storage: &'a str,
        offset: i64,
        size: &'a [i64],
        stride: &'a [i64],
    ) -> T<'a> {
        T {
            name,
            storage,
            offset,
            size,
            stride,
        }
    }

    fn pickle_of(tensors: &[T]) -> Vec<u8> {
        let mut b = Builder::new();
        let mut memo = HashMap::new();
        b.op(b'}');
        b.put();
        b.op(b'(');
        for t in tensors {
            b.str(t.name);
            b.put();
            b.tensor(
                &mut memo,
                t.storage,
                "FloatStorage",
                t.offset,
                t.size,
                t.stride,
            );
        }
        b.op(b'u');
        b.finish()
    }

    /// A `torch.save`-like archive: `archive/data.pkl`, `archive/byteorder` and one entry per
    /// storage (key, bytes, deflated?).
    fn archive(pickle: &[u8], storages: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = |deflate: bool| {
            zip::write::FileOptions::default().compression_method(if deflate {
                CompressionMethod::Deflated
            } else {
                CompressionMethod::Stored
            })
        };
        w.start_file("archive/data.pkl", opts(false)).unwrap();
        w.write_all(pickle).unwrap();
        w.start_file("archive/byteorder", opts(false)).unwrap();
        w.write_all(b"little").unwrap();
        for (key, bytes, deflate) in storages {
            w.start_file(format!("archive/data/{key}"), opts(*deflate))
                .unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn floats(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn index_err(data: &[u8]) -> String {
        match index(Path::new("mem.ckpt"), data) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_has(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "{msg:?} does not say {p:?}");
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sd-ckpt-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// The central directory record of entry `name` in `zip`, to patch.
    fn central_record(zip: &[u8], name: &str) -> usize {
        (0..zip.len() - 46)
            .find(|&p| {
                zip[p..p + 4] == 0x0201_4b50u32.to_le_bytes()
                    && zip[p + 46..].starts_with(name.as_bytes())
            })
            .unwrap()
    }

    fn patch_u32(zip: &mut [u8], at: usize, v: u32) {
        zip[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn the_reported_shapes_are_refused_by_name() {
        let storage = floats(64);
        let refused = |t: T| {
            let name = format!("tensor `{}`", t.name);
            let msg = index_err(&archive(&pickle_of(&[t]), &[("0", &storage, false)]));
            assert!(msg.contains(&name), "{msg}");
            msg
        };
        // An element count that wraps i64 to 0.
        let msg = refused(t("w", "0", 0, &[4, 1 << 62, 2, 2], &[1 << 62, 4, 2, 1]));
        assert_has(&msg, &["MAX_TENSOR_ELEMENTS"]);
        // A token embedding broadcast from 64 stored floats: [2^24, 64] is past the element
        // limit anyway; under it, the zero stride is what is refused.
        let msg = refused(t("emb", "0", 0, &[1 << 24, 64], &[0, 1]));
        assert_has(&msg, &["MAX_TENSOR_ELEMENTS"]);
        let msg = refused(t("emb", "0", 0, &[1 << 20, 64], &[0, 1]));
        assert_has(
            &msg,
            &["repeats stored elements", "zero or overlapping strides"],
        );
        let msg = refused(t("w", "0", 0, &[2, 2], &[1, 1]));
        assert_has(&msg, &["repeats stored elements"]);
        // Negative numbers.
        assert_has(
            &refused(t("w", "0", 0, &[-1, 4], &[4, 1])),
            &["negative size"],
        );
        assert_has(
            &refused(t("w", "0", 0, &[4, 4], &[-4, 1])),
            &["negative stride"],
        );
        assert_has(
            &refused(t("w", "0", -8, &[4], &[1])),
            &["negative storage offset"],
        );
        // Past the end of the storage.
        assert_has(
            &refused(t("w", "0", 60, &[8], &[1])),
            &["points outside", "archive/data/0"],
        );
        assert_has(
            &refused(t("w", "0", 0, &[2, 2], &[1 << 40, 1])),
            &["points outside"],
        );
        assert_has(
            &refused(t("w", "0", i64::MAX, &[1], &[1])),
            &["points outside"],
        );
        // An empty tensor may not carry absurd dimensions either.
        assert_has(
            &refused(t("w", "0", 0, &[0, 1 << 40], &[1, 1])),
            &["MAX_TENSOR_ELEMENTS"],
        );
        // Too many dimensions: the unpickler refuses them before anything is read.
        let p = pickle_of(&[t("w", "0", 0, &[1; 9], &[1; 9])]);
        let msg = index_err(&archive(&p, &[("0", &storage, false)]));
        assert_has(&msg, &["MAX_TENSOR_DIMS (8)"]);

        // What real checkpoints hold is accepted: contiguous, transposed and sliced views,
        // empty tensors and scalars.
        let p = pickle_of(&[
            t("c", "0", 0, &[4, 16], &[16, 1]),
            t("tr", "0", 0, &[8, 8], &[1, 8]),
            t("slice", "0", 10, &[3, 2], &[4, 1]),
            t("empty", "0", 64, &[0, 5], &[5, 1]),
            t("scalar", "0", 63, &[], &[]),
        ]);
        let ix = index(
            Path::new("mem.ckpt"),
            &archive(&p, &[("0", &storage, false)]),
        )
        .unwrap();
        assert_eq!(ix.tensors.len(), 5);
        assert!(ix.tensors["c"].stride.is_none());
        assert_eq!(ix.tensors["tr"].stride, Some(vec![1, 8]));
        assert!(matches!(
            ix.tensors["empty"].bytes,
            Bytes::Mapped { len: 0, .. }
        ));
    }

    /// Seeded shapes, strides and offsets from numbers that break careless arithmetic: each
    /// tensor is refused by name or indexed within its storage, and materialises correctly.
    #[test]
    fn random_views_stay_inside_their_storage() {
        let mut rng = Rng::new(0x7e45_0125);
        let ints = [
            0i64,
            1,
            2,
            3,
            4,
            7,
            16,
            -1,
            i64::MIN,
            i64::MAX,
            1 << 31,
            1 << 32,
            1 << 62,
            (1 << 62) + 1,
            1 << 24,
            1 << 28,
        ];
        let path = tmp("views.ckpt");
        let (mut ok, mut err, mut materialised) = (0, 0, 0);
        let cases = 20_000;
        for case in 0..cases {
            let dims = rng.below(10);
            let pick = |rng: &mut Rng| {
                if rng.below(3) == 0 {
                    ints[rng.below(ints.len())]
                } else {
                    rng.below(6) as i64
                }
            };
            let size: Vec<i64> = (0..dims).map(|_| pick(&mut rng)).collect();
            let stride: Vec<i64> = (0..dims).map(|_| pick(&mut rng)).collect();
            let offset = pick(&mut rng);
            let n = rng.below(200);
            let storage = floats(n);
            let deflate = rng.below(4) == 0;
            let zip = archive(
                &pickle_of(&[t("w", "0", offset, &size, &stride)]),
                &[("0", &storage, deflate)],
            );
            let what =
                format!("case {case}: offset {offset} size {size:?} stride {stride:?} over {n}");
            match index(Path::new("mem.ckpt"), &zip) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("tensor `w`") || msg.contains("MAX_TENSOR_DIMS"),
                        "{what}: {msg}"
                    );
                    err += 1;
                }
                Ok(ix) => {
                    ok += 1;
                    let raw = &ix.tensors["w"];
                    let numel = element_count(&raw.shape).expect(&what) as usize;
                    let len = match raw.bytes {
                        Bytes::Mapped { start, len } => {
                            assert!(start + len <= zip.len(), "{what}");
                            len
                        }
                        Bytes::Zipped { start, len, .. } => {
                            assert!(start + len <= storage.len(), "{what}");
                            len
                        }
                    };
                    assert!(numel * 4 <= len, "{what}");
                    if raw.stride.is_none() {
                        assert_eq!(numel * 4, len, "{what}");
                    }
                    if case % 10 == 0 {
                        std::fs::write(&path, &zip).unwrap();
                        let c = Checkpoint::open(&path).expect(&what);
                        let got = c.tensor("w").expect(&what);
                        assert_eq!(got.size(), raw.shape, "{what}");
                        // Element i of the view is stored float offset + sum(index * stride).
                        let flat = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
                        for (i, v) in flat.iter().enumerate() {
                            let mut rest = i as i64;
                            let mut at = offset;
                            for d in (0..dims).rev() {
                                at += rest % size[d] * stride[d];
                                rest /= size[d];
                            }
                            assert_eq!(*v, at as f32, "{what}: element {i}");
                        }
                        materialised += 1;
                    }
                }
            }
        }
        println!("{cases} random views: {ok} indexed ({materialised} materialised and checked), {err} refused");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn decompression_is_bounded_and_checked() {
        let storage = floats(1024);
        let p = pickle_of(&[t("w", "0", 0, &[1024], &[1])]);
        let good = archive(&p, &[("0", &storage, true)]);
        let data_record = central_record(&good, "archive/data/0");

        let path = tmp("lie.ckpt");
        let open = |z: &[u8]| {
            std::fs::write(&path, z).unwrap();
            Checkpoint::open(&path)
        };
        let open_err = |z: &[u8]| match open(z) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        // Declared above MAX_STORAGE_BYTES (through ZIP64 sizes): refused by name at index
        // time. Declared 4 GiB but holding 4 KiB: refused when read, without a 4 GiB buffer.
        let mut z = good.clone();
        patch_u32(&mut z, data_record + 24, u32::MAX);
        let msg = open(&z).unwrap().tensor("w").unwrap_err().to_string();
        assert_has(
            &msg,
            &[
                "archive/data/0",
                "decompresses to 4096 bytes",
                "says 4294967295",
            ],
        );
        // Declared smaller than its tensor: the tensor is outside it.
        let mut z = good.clone();
        patch_u32(&mut z, data_record + 24, 4096 - 4);
        assert_has(&open_err(&z), &["tensor `w`", "points outside"]);
        // Declared smaller than it decompresses to: at most declared + 1 bytes are read.
        let p2 = pickle_of(&[t("w", "0", 0, &[10], &[1])]);
        let z2 = archive(&p2, &[("0", &storage, true)]);
        let mut z = z2.clone();
        let rec = central_record(&z, "archive/data/0");
        patch_u32(&mut z, rec + 24, 100);
        assert_has(
            &open(&z).unwrap().tensor("w").unwrap_err().to_string(),
            &["archive/data/0", "decompresses to more bytes", "says 100"],
        );
        // A damaged checksum.
        let mut z = z2.clone();
        let rec = central_record(&z, "archive/data/0");
        z[rec + 16] ^= 1;
        assert_has(
            &open(&z).unwrap().tensor("w").unwrap_err().to_string(),
            &["CRC-32"],
        );

        // data.pkl: deflated, declared above MAX_PICKLE_BYTES, or declared smaller than it is.
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let deflated =
            zip::write::FileOptions::default().compression_method(CompressionMethod::Deflated);
        w.start_file("archive/data.pkl", deflated).unwrap();
        w.write_all(&p).unwrap();
        w.start_file("archive/data/0", deflated).unwrap();
        w.write_all(&storage).unwrap();
        let z = w.finish().unwrap().into_inner();
        assert!(index(Path::new("mem.ckpt"), &z).is_ok());
        let rec = central_record(&z, "archive/data.pkl");
        let mut big = z.clone();
        patch_u32(&mut big, rec + 24, (MAX_PICKLE_BYTES + 1) as u32);
        assert_has(
            &index_err(&big),
            &["archive/data.pkl", "MAX_PICKLE_BYTES (268435456 bytes)"],
        );
        let mut small = z.clone();
        patch_u32(&mut small, rec + 24, 10);
        assert_has(
            &index_err(&small),
            &["archive/data.pkl", "decompresses to more bytes"],
        );
        // A stored entry that declares more than the file holds.
        let mut z = archive(&p, &[("0", &storage, false)]);
        let rec = central_record(&z, "archive/data/0");
        patch_u32(&mut z, rec + 24, 5000);
        assert_has(&index_err(&z), &["archive/data/0", "declares 5000 bytes"]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn zip_directory_claims_are_checked() {
        let storage = floats(16);
        let p = pickle_of(&[t("w", "0", 0, &[16], &[1])]);
        let good = archive(&p, &[("0", &storage, false)]);
        let end = good.len() - 22;
        // 65535 entries in a file of a few hundred bytes.
        let mut z = good.clone();
        z[end + 8..end + 12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_has(&index_err(&z), &["claims 65535 entries"]);
        // The same with a ZIP64 end record claiming a billion.
        let cd_size = u32::from_le_bytes(good[end + 12..end + 16].try_into().unwrap()) as u64;
        let cd_offset = u32::from_le_bytes(good[end + 16..end + 20].try_into().unwrap()) as u64;
        let mut z = good[..end].to_vec();
        let end64 = z.len() as u64;
        z.extend(0x0606_4b50u32.to_le_bytes());
        z.extend(44u64.to_le_bytes());
        z.extend([45, 0, 45, 0]);
        z.extend([0; 8]);
        z.extend((1u64 << 30).to_le_bytes());
        z.extend((1u64 << 30).to_le_bytes());
        z.extend(cd_size.to_le_bytes());
        z.extend(cd_offset.to_le_bytes());
        z.extend(0x0706_4b50u32.to_le_bytes());
        z.extend(0u32.to_le_bytes());
        z.extend(end64.to_le_bytes());
        z.extend(1u32.to_le_bytes());
        z.extend(0x0605_4b50u32.to_le_bytes());
        z.extend([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        z.extend(u32::MAX.to_le_bytes());
        z.extend(u32::MAX.to_le_bytes());
        z.extend([0, 0]);
        assert_has(&index_err(&z), &["claims 1073741824 entries"]);
        // And an honest ZIP64 end record is read as before.
        let n = 3u64;
        let at = z.len() - 22 - 20 - 56 + 24;
        z[at..at + 8].copy_from_slice(&n.to_le_bytes());
        z[at + 8..at + 16].copy_from_slice(&n.to_le_bytes());
        assert!(index(Path::new("mem.ckpt"), &z).is_ok());
    }

    #[test]
    fn odd_state_dicts() {
        let storage = floats(16);
        let zip = |p: &[u8]| archive(p, &[("0", &storage, false)]);
        // {"state_dict": <itself>}
        let mut b = Builder::new();
        b.op(b'}');
        b.put();
        b.str("state_dict").get(0).op(b's');
        assert_has(&index_err(&zip(&b.finish())), &["nests more than 8 deep"]);
        // A key set twice: the last value wins, as in Python.
        for (tensor_last, expected) in [(true, true), (false, false)] {
            let mut b = Builder::new();
            let mut memo = HashMap::new();
            b.op(b'}').op(b'(');
            if !tensor_last {
                b.str("w")
                    .tensor(&mut memo, "0", "FloatStorage", 0, &[4], &[1]);
            }
            b.str("w").int(5);
            if tensor_last {
                b.str("w")
                    .tensor(&mut memo, "0", "FloatStorage", 0, &[4], &[1]);
            }
            b.op(b'u');
            let ix = index(Path::new("mem.ckpt"), &zip(&b.finish())).unwrap();
            assert_eq!(ix.tensors.contains_key("w"), expected);
        }
        // A big-endian checkpoint.
        let mut z = zip(&pickle_of(&[t("w", "0", 0, &[4], &[1])]));
        let at = z.windows(6).position(|w| w == b"little").unwrap();
        z[at..at + 6].copy_from_slice(b"big\n\n\n");
        assert_has(&index_err(&z), &["big-endian"]);
    }

    /// Truncation at every byte and seeded byte flips of a small archive holding stored and
    /// deflated storages: an error or a checkpoint whose every tensor reads or errs, never a
    /// panic, never a read outside the file.
    #[test]
    fn damaged_archives() {
        let a = floats(32);
        let b = floats(48);
        let p = pickle_of(&[
            t("a", "0", 0, &[4, 8], &[8, 1]),
            t("a.t", "0", 0, &[8, 4], &[1, 8]),
            t("b", "1", 4, &[4, 4], &[4, 1]),
            t("b2", "1", 20, &[7], &[2]),
        ]);
        let good = archive(&p, &[("0", &a, false), ("1", &b, true)]);
        assert_eq!(
            index(Path::new("mem.ckpt"), &good).unwrap().tensors.len(),
            4
        );
        for n in 0..good.len() {
            assert!(
                index(Path::new("mem.ckpt"), &good[..n]).is_err(),
                "cut at {n}"
            );
        }
        let path = tmp("flips.ckpt");
        let mut rng = Rng::new(0xf11b_a7c4);
        let cases = 10_000;
        let (mut opened, mut read, mut refused) = (0, 0, 0);
        for case in 0..cases {
            let mut z = good.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(z.len());
                z[at] = match rng.below(3) {
                    0 => rng.next_u64() as u8,
                    1 => z[at] ^ (1 << rng.below(8)),
                    _ => [0, 0xff, 0x7f, 0x80][rng.below(4)],
                };
            }
            match index(Path::new("mem.ckpt"), &z) {
                Err(_) => refused += 1,
                Ok(ix) => {
                    opened += 1;
                    for raw in ix.tensors.values() {
                        if let Bytes::Mapped { start, len } = raw.bytes {
                            assert!(start + len <= z.len(), "case {case}");
                        }
                    }
                    std::fs::write(&path, &z).unwrap();
                    let c = Checkpoint::open(&path).unwrap();
                    for name in ["a", "a.t", "b", "b2"] {
                        if c.contains(name) && c.tensor(name).is_ok() {
                            read += 1;
                        }
                    }
                }
            }
        }
        println!(
            "{} truncations; {cases} flip cases: {opened} opened ({read} tensors read), {refused} refused",
            good.len()
        );
        let _ = std::fs::remove_file(path);
    }

    /// Many tensors as views of one deflated storage: every one reads correctly, the storage
    /// is decompressed once, and it is let go once every tensor has been released.
    #[test]
    fn views_of_one_deflated_storage_decompress_once() {
        let n = 300;
        let storage = floats(n * 64);
        let names: Vec<String> = (0..n).map(|i| format!("layer.{i:03}.weight")).collect();
        let mut tensors: Vec<T> = Vec::new();
        let (row, square, tr): (&[i64], &[i64], &[i64]) = (&[64], &[8, 8], &[1, 8]);
        for (i, name) in names.iter().enumerate() {
            let offset = (i * 64) as i64;
            tensors.push(if i % 3 == 2 {
                t(name, "0", offset, square, tr)
            } else {
                t(name, "0", offset, row, &[1])
            });
        }
        tensors.push(t("alone", "1", 0, &[16], &[1]));
        let zip = archive(
            &pickle_of(&tensors),
            &[("0", &storage, true), ("1", &floats(16), true)],
        );
        let path = tmp("views-of-one.ckpt");
        std::fs::write(&path, &zip).unwrap();
        let c = Checkpoint::open(&path).unwrap();
        let check = |i: usize, got: &Tensor| {
            let base = (i * 64) as f32;
            let expected: Vec<f32> = if i % 3 == 2 {
                (0..64)
                    .map(|k| base + ((k % 8) * 8 + k / 8) as f32)
                    .collect()
            } else {
                (0..64).map(|k| base + k as f32).collect()
            };
            assert_eq!(
                Vec::<f32>::try_from(got.flatten(0, -1)).unwrap(),
                expected,
                "{i}"
            );
        };
        // In a scrambled order, then in key order.
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(7);
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &i in &order {
            check(i, &c.tensor(&names[i]).unwrap());
        }
        assert_eq!(c.zipped.decompressions(), 1);
        assert_eq!(c.zipped.held_bytes(), storage.len() as u64);
        // A storage with one tensor is not held.
        let _ = c.tensor("alone").unwrap();
        assert_eq!(c.zipped.decompressions(), 2);
        assert_eq!(c.zipped.held_bytes(), storage.len() as u64);
        // Releasing every tensor of the shared storage lets it go.
        for (i, name) in names.iter().enumerate() {
            check(i, &c.tensor(name).unwrap());
            c.release(name);
        }
        assert_eq!(c.zipped.decompressions(), 2);
        assert_eq!(c.zipped.held_bytes(), 0);
        let _ = std::fs::remove_file(path);
    }
}
