//! PyTorch zip checkpoints (`torch.save` since torch 1.6, the `.ckpt` of CompVis / A1111):
//! a zip archive holding `<name>/data.pkl` (the pickled object) and `<name>/data/<key>` (one
//! entry per storage, stored uncompressed). The pickle goes through the restricted
//! [`super::pickle`] interpreter, which only rebuilds tensor references and plain containers;
//! the storages are never read here: each tensor is indexed as a byte range of the memory-mapped
//! file (or of a compressed entry, decompressed when the tensor is read).
use super::pickle::{self, Value};
use super::single_file::{Bytes, RawTensor};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;
use zip::CompressionMethod;

/// The tensors of a checkpoint's state dict, and its `global_step` if it records one.
pub(crate) struct CkptIndex {
    pub tensors: HashMap<String, RawTensor>,
    pub global_step: Option<i64>,
}

struct Entry {
    index: usize,
    stored: bool,
    /// Offset of the data in the file.
    data_start: usize,
    /// Uncompressed size.
    size: usize,
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

/// Decompresses (or copies) zip entry `index` of the checkpoint.
pub(crate) fn read_entry(path: &Path, data: &[u8], index: usize) -> Result<Vec<u8>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(data)).map_err(|e| zip_error(path, e))?;
    let mut f = archive.by_index(index).map_err(|e| zip_error(path, e))?;
    let mut out = Vec::with_capacity((f.size() as usize).min(1 << 30));
    f.read_to_end(&mut out)
        .map_err(|e| Error::bad_model(format!("{}: zip entry {index}: {e}", path.display())))?;
    Ok(out)
}

/// Indexes the tensors of the PyTorch zip checkpoint mapped at `data`.
pub(crate) fn index(path: &Path, data: &[u8]) -> Result<CkptIndex> {
    let mut archive = zip::ZipArchive::new(Cursor::new(data)).map_err(|e| zip_error(path, e))?;
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut pickle_name: Option<String> = None;
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).map_err(|e| zip_error(path, e))?;
        let name = f.name().to_string();
        let entry = Entry {
            index: i,
            stored: f.compression() == CompressionMethod::Stored,
            data_start: f.data_start() as usize,
            size: f.size() as usize,
        };
        if entry.stored && entry.data_start.saturating_add(entry.size) > data.len() {
            return Err(Error::bad_model(format!(
                "{}: zip entry {name} points outside the file (truncated?)",
                path.display()
            )));
        }
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

    let read = |name: &str| -> Result<Vec<u8>> {
        let e = &entries[name];
        if e.stored {
            Ok(data[e.data_start..e.data_start + e.size].to_vec())
        } else {
            read_entry(path, data, e.index)
        }
    };
    if entries.contains_key(&format!("{prefix}byteorder")) {
        let order = read(&format!("{prefix}byteorder"))?;
        if order.trim_ascii() == b"big" {
            return Err(Error::Unsupported(format!(
                "{} was saved on a big-endian machine",
                path.display()
            )));
        }
    }

    let root = pickle::unpickle(&read(&pickle_name)?, &file_name(path))?;
    let mut state = root.clone();
    while let Some(inner @ Value::Dict(_)) = state.get("state_dict") {
        state = inner;
    }
    let Value::Dict(items) = &state else {
        return Err(Error::bad_model(format!(
            "{}: the checkpoint holds no state dict (a dict of tensors)",
            path.display()
        )));
    };
    let global_step = root.get("global_step").and_then(|v| v.as_int());

    let mut tensors = HashMap::new();
    for (key, value) in items.borrow().iter() {
        let (Some(name), Value::Tensor(t)) = (key.as_str(), value) else {
            continue;
        };
        let storage_entry = format!("{prefix}data/{}", t.storage.key);
        let entry = entries.get(&storage_entry).ok_or_else(|| {
            Error::bad_model(format!(
                "{}: tensor `{name}` uses storage {storage_entry}, which the archive lacks",
                path.display()
            ))
        })?;
        let elt = t.storage.kind.elt_size_in_bytes() as i64;
        let numel: i64 = t.size.iter().product();
        let outside = || {
            Error::bad_model(format!(
                "{}: tensor `{name}` points outside its storage {storage_entry} (truncated?)",
                path.display()
            ))
        };
        let extent = if numel == 0 {
            0
        } else {
            t.size
                .iter()
                .zip(&t.stride)
                .try_fold(1i64, |acc, (&s, &st)| {
                    (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
                })
                .ok_or_else(outside)?
        };
        let start = t.offset.checked_mul(elt).ok_or_else(outside)?;
        let len = extent.checked_mul(elt).ok_or_else(outside)?;
        if start < 0 || start.checked_add(len).ok_or_else(outside)? > entry.size as i64 {
            return Err(outside());
        }
        let (start, len) = (start as usize, len as usize);
        let mut contiguous = Vec::with_capacity(t.size.len());
        let mut acc = 1i64;
        for &s in t.size.iter().rev() {
            contiguous.push(acc);
            acc *= s.max(1);
        }
        contiguous.reverse();
        let stride = (numel > 1 && t.stride != contiguous).then(|| t.stride.clone());
        let bytes = if entry.stored {
            Bytes::Mapped {
                start: entry.data_start + start,
                len,
            }
        } else {
            Bytes::Zipped {
                entry: entry.index,
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
    })
}
