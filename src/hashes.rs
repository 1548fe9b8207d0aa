//! The hashes A1111 writes into PNG info, so that its readers (and civitai) recognise the model
//! and the LoRAs an image was made with:
//! - `Model hash`: the first 10 hex digits of the SHA-256 of the checkpoint file;
//! - `Lora hashes`: for each LoRA, the first 12 hex digits of its "addnet" hash, the SHA-256
//!   of a `.safetensors` file's bytes after its header (or the `sshs_model_hash` its trainer
//!   stored in the header's metadata).
//!
//! Hashing a checkpoint of several GB takes seconds, so its hash is kept in a cache file
//! (`$XDG_CACHE_HOME/stable-diffusion/model-hashes.json`, else `~/.cache/...`), by path, size
//! and modification time, as A1111 keeps its own; a cache that cannot be read or written is
//! simply not used.
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest cache file read; beyond it the cache starts over.
const MAX_CACHE_BYTES: u64 = 4 << 20;
/// Most entries the cache keeps.
const MAX_CACHE_ENTRIES: usize = 2000;

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of everything `reader` gives, in hex.
fn sha256_of(mut reader: impl Read, what: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::io(what, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    sha256_of(std::io::BufReader::new(file), path)
}

/// The SHA-256 of a `.safetensors` file's bytes after its header (A1111's "addnet" hash of a
/// LoRA), in hex.
pub fn safetensors_data_sha256(path: &Path) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 8];
    file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    let start = u64::from_le_bytes(head)
        .checked_add(8)
        .filter(|&start| start <= len)
        .ok_or_else(|| {
            Error::bad_model(format!(
                "{}: the safetensors header runs past the end of the file",
                path.display()
            ))
        })?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    sha256_of(std::io::BufReader::new(file), path)
}

/// The SHA-256 of `bytes`, in hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A1111's `Model hash` of a single-file checkpoint (10 hex digits); `None` for a folder,
/// which A1111 has no hash for.
pub fn model_hash(path: &Path) -> Result<Option<String>> {
    model_hash_cached_in(path, cache_path())
}

/// [`model_hash`] with its cache file at `cache` (none: no cache).
fn model_hash_cached_in(path: &Path, cache: Option<PathBuf>) -> Result<Option<String>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let key = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned();
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().to_string());
    let stamp = serde_json::json!({ "size": meta.len(), "modified": modified });
    let mut entries = cache.as_deref().map(read_cache).unwrap_or_default();
    if let Some(entry) = entries.get(&key) {
        if modified.is_some() && entry.get("stamp") == Some(&stamp) {
            if let Some(sha) = entry.get("sha256").and_then(|v| v.as_str()) {
                if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(Some(sha[..10].to_string()));
                }
            }
        }
    }
    let sha = sha256_file(path)?;
    if let Some(cache) = cache {
        if entries.len() >= MAX_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(key, serde_json::json!({ "stamp": stamp, "sha256": sha }));
        write_cache(&cache, &entries);
    }
    Ok(Some(sha[..10].to_string()))
}

fn cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("stable-diffusion").join("model-hashes.json"))
}

fn read_cache(path: &Path) -> BTreeMap<String, serde_json::Value> {
    let Ok(file) = std::fs::File::open(path) else {
        return BTreeMap::new();
    };
    let mut text = Vec::new();
    if file
        .take(MAX_CACHE_BYTES + 1)
        .read_to_end(&mut text)
        .is_err()
        || text.len() as u64 > MAX_CACHE_BYTES
    {
        return BTreeMap::new();
    }
    serde_json::from_slice(&text).unwrap_or_default()
}

/// Writes the cache through a temporary file and a rename, so that a reader never sees half
/// of it; failures are ignored (the hash is only recomputed next time).
fn write_cache(path: &Path, entries: &BTreeMap<String, serde_json::Value>) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let Ok(text) = serde_json::to_vec_pretty(entries) else {
        return;
    };
    let temp = dir.join(format!("model-hashes.{}.tmp", std::process::id()));
    if std::fs::write(&temp, text).is_ok() && std::fs::rename(&temp, path).is_err() {
        let _ = std::fs::remove_file(&temp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache gives the hash of the file as it is: a changed file is hashed again, a
    /// corrupt or absurd cache is ignored, a folder has none.
    #[test]
    fn model_hashes_follow_the_file() {
        let dir = std::env::temp_dir().join(format!("sd-hash-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        let cache = dir.join("cache").join("model-hashes.json");
        std::fs::write(&file, b"abc").unwrap();
        let abc = Some("ba7816bf8f".to_string());
        for _ in 0..2 {
            assert_eq!(
                model_hash_cached_in(&file, Some(cache.clone())).unwrap(),
                abc
            );
        }
        assert!(std::fs::read_to_string(&cache)
            .unwrap()
            .contains("ba7816bf8f01"));
        std::fs::write(&file, b"abcd").unwrap();
        let abcd = sha256_bytes(b"abcd")[..10].to_string();
        assert_eq!(
            model_hash_cached_in(&file, Some(cache.clone())).unwrap(),
            Some(abcd.clone())
        );
        for junk in [&b"{not json"[..], br#"{"x": 1}"#, &[b' '; 5 << 20][..]] {
            std::fs::write(&cache, junk).unwrap();
            assert_eq!(
                model_hash_cached_in(&file, Some(cache.clone())).unwrap(),
                Some(abcd.clone())
            );
        }
        assert_eq!(model_hash_cached_in(&dir, Some(cache)).unwrap(), None);
        assert!(model_hash_cached_in(&dir.join("missing"), None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The hash after a safetensors header: the bytes past `8 + header length`; a header
    /// length past the end of the file (or overflowing) is refused.
    #[test]
    fn safetensors_data_hash_skips_the_header() {
        let dir = std::env::temp_dir().join(format!("sd-addnet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.safetensors");
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{} abc");
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(
            safetensors_data_sha256(&file).unwrap(),
            sha256_bytes(b"abc")
        );
        for bad in [7u64, u64::MAX] {
            let mut bytes = bad.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            std::fs::write(&file, &bytes).unwrap();
            let e = safetensors_data_sha256(&file).unwrap_err().to_string();
            assert!(e.contains("past the end"), "{e}");
        }
        std::fs::write(&file, b"abc").unwrap();
        assert!(safetensors_data_sha256(&file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sha256_of_known_inputs() {
        // FIPS 180-2's examples.
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_bytes(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
