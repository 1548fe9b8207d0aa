//! Textual-inversion embeddings: vectors that stand for a word in the prompt, used as A1111
//! uses them, by their file's name, from an embeddings folder.
//!
//! Layouts read: A1111's `.pt` (`string_to_param: {"*": [n, dim]}`, through the restricted
//! unpickler) and `.safetensors` (`emb_params`), diffusers' `learned_embeds` (one tensor named
//! by its token, `[dim]` or `[n, dim]`, `.safetensors` or `.bin`), and SDXL's (`clip_l` and
//! `clip_g`, one set per text encoder). A prompt names an embedding by the file's stem; where
//! the stem's tokens appear in the prompt they make way for the `n` vectors
//! ([`crate::prompt::chunk_tokens`], [`plain_tokens`]), which the text encoder reads in place of
//! token embeddings.
use crate::limits::{
    MAX_CONFIG_CHANNELS, MAX_EMBEDDING_DEPTH, MAX_EMBEDDING_FILES, MAX_EMBEDDING_FILE_BYTES,
    MAX_EMBEDDING_VECTORS,
};
use crate::models::traits::EmbeddingFix;
use crate::tokenizer::ClipTokenizer;
use crate::weights::finite_float32;
use crate::weights::single_file::Checkpoint;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One embedding file's vectors.
#[derive(Debug)]
pub enum Vectors {
    /// One set `[n, dim]`, for SD 1.x / 2.x.
    Single(Tensor),
    /// SDXL's two sets: `clip_l` for the first encoder, `clip_g` for the second.
    Sdxl { clip_l: Tensor, clip_g: Tensor },
}

/// A textual-inversion embedding read from a file.
#[derive(Debug)]
pub struct Embedding {
    name: String,
    path: PathBuf,
    vectors: Vectors,
}

// SAFETY: the tensors are written only while `Embedding::load` builds it and are only read
// afterwards (converted copies are made from them), which libtorch allows from any thread.
unsafe impl Sync for Embedding {}

/// A float tensor of `ckpt` as `[n, dim]`, checked.
fn vectors_of(ckpt: &Checkpoint, key: &str) -> Result<Tensor> {
    let path = ckpt.path().display();
    let t = finite_float32(ckpt.tensor(key)?, key, ckpt.path())?;
    let t = match t.size().as_slice() {
        [d] => t.f_reshape([1, *d])?,
        [_, _] => t,
        other => {
            return Err(Error::bad_model(format!(
                "embedding {path}: tensor `{key}` has shape {other:?}, not [vectors, width]"
            )))
        }
    };
    let (n, d) = t.size2()?;
    if !(1..=MAX_EMBEDDING_VECTORS).contains(&n) || !(1..=MAX_CONFIG_CHANNELS).contains(&d) {
        return Err(Error::bad_model(format!(
            "embedding {path}: tensor `{key}` has {n} vectors of width {d}: at most \
             {MAX_EMBEDDING_VECTORS} vectors (one chunk) of width at most {MAX_CONFIG_CHANNELS}"
        )));
    }
    Ok(t)
}

impl Embedding {
    /// Reads an embedding file (`.pt`, `.bin` or `.safetensors`); its name is the file's stem.
    pub fn load(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len > MAX_EMBEDDING_FILE_BYTES {
            return Err(Error::bad_model(format!(
                "embedding {} is {len} bytes: an embedding is a few vectors, at most \
                 {MAX_EMBEDDING_FILE_BYTES} bytes",
                path.display()
            )));
        }
        let ckpt = Checkpoint::open(path)?;
        let mut names: Vec<&str> = ckpt.names().collect();
        names.sort_unstable();
        let vectors = if ckpt.contains("clip_l") || ckpt.contains("clip_g") {
            Vectors::Sdxl {
                clip_l: vectors_of(&ckpt, "clip_l")?,
                clip_g: vectors_of(&ckpt, "clip_g")?,
            }
        } else if ckpt.contains("emb_params") {
            Vectors::Single(vectors_of(&ckpt, "emb_params")?)
        } else if let [only] = names.as_slice() {
            // A1111's `string_to_param["*"]` or diffusers' one token.
            Vectors::Single(vectors_of(&ckpt, only)?)
        } else {
            let shown: Vec<&str> = names.iter().take(4).copied().collect();
            return Err(Error::bad_model(format!(
                "{} is not an embedding: it holds {} tensors ({}{}), where A1111's hold one \
                 (string_to_param's `*` or `emb_params`), diffusers' one (its token) and \
                 SDXL's `clip_l` and `clip_g`",
                path.display(),
                names.len(),
                shown.join(", "),
                if names.len() > 4 { ", ..." } else { "" }
            )));
        };
        Ok(Self {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            vectors,
        })
    }

    /// The word a prompt uses it by: the file's stem.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vectors(&self) -> &Vectors {
        &self.vectors
    }
}

/// The embeddings of a folder, in file-name order, and why the other files were skipped.
#[derive(Debug, Default)]
pub struct Embeddings {
    list: Vec<Arc<Embedding>>,
    skipped: Vec<String>,
}

impl Embeddings {
    /// Reads every `.pt`, `.bin` and `.safetensors` file under `dir` (subfolders too, as
    /// A1111 does). A file that is not an embedding, or whose name another file took first,
    /// is skipped with the reason, as A1111 skips it: one bad file does not cost the others.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "the embeddings folder {} does not exist",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        collect_files(dir, 0, &mut files)?;
        files.sort();
        let mut out = Self::default();
        for path in files {
            match Embedding::load(&path) {
                Ok(e) => {
                    if out.list.iter().any(|o| o.name == e.name) {
                        out.skipped.push(format!(
                            "{}: another embedding is already named `{}`",
                            path.display(),
                            e.name
                        ));
                    } else {
                        out.list.push(Arc::new(e));
                    }
                }
                Err(e) => out.skipped.push(e.to_string()),
            }
        }
        Ok(out)
    }

    /// Embeddings given directly.
    pub fn from_list(list: Vec<Arc<Embedding>>) -> Self {
        Self {
            list,
            skipped: Vec::new(),
        }
    }

    pub fn list(&self) -> &[Arc<Embedding>] {
        &self.list
    }

    /// Why each skipped file was skipped.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

fn collect_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() && depth + 1 < MAX_EMBEDDING_DEPTH {
            collect_files(&path, depth + 1, out)?;
        } else if kind.is_file() || kind.is_symlink() {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if matches!(ext.as_deref(), Some("pt" | "bin" | "safetensors")) {
                if out.len() >= MAX_EMBEDDING_FILES {
                    return Err(Error::invalid(format!(
                        "the embeddings folder holds more than {MAX_EMBEDDING_FILES} files"
                    )));
                }
                out.push(path);
            }
        }
    }
    Ok(())
}

/// An embedding as one tokenizer and text encoder see it: the token ids of its name, its
/// vectors in the encoder's dtype and device, and the ids diffusers would give its tokens.
#[derive(Debug)]
pub struct TokenEmbedding {
    pub name: String,
    pub ids: Vec<i64>,
    pub vectors: Tensor,
    /// The first of the ids diffusers' `load_textual_inversion` adds for its vectors (past the
    /// vocabulary, in load order): diffusers' pooling at the largest id sees them.
    pub placeholder: i64,
}

impl TokenEmbedding {
    pub fn len(&self) -> usize {
        self.vectors.size().first().copied().unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: as for `Embedding`: built once, read only afterwards.
unsafe impl Sync for TokenEmbedding {}

/// Where the ids diffusers adds for embeddings start: past any vocabulary.
const PLACEHOLDER_BASE: i64 = 1 << 40;

/// For each text encoder of a model (`widths`, in order; SDXL: CLIP-L then bigG; the refiner:
/// bigG alone, `refiner`), the embeddings that fit every one of them, as that encoder's
/// tokenizer sees them; and why the others do not fit.
pub fn for_encoders(
    embeddings: &Embeddings,
    tokenizers: &[&ClipTokenizer],
    widths: &[i64],
    refiner: bool,
    kind: Kind,
    device: Device,
) -> Result<(Vec<Vec<TokenEmbedding>>, Vec<String>)> {
    let mut per_encoder: Vec<Vec<TokenEmbedding>> = widths.iter().map(|_| Vec::new()).collect();
    let mut unfit = Vec::new();
    let mut next = vec![PLACEHOLDER_BASE; widths.len()];
    for e in embeddings.list() {
        let sets: Vec<&Tensor> = match (&e.vectors, widths.len(), refiner) {
            (Vectors::Single(v), 1, false) => vec![v],
            (Vectors::Sdxl { clip_g, .. }, 1, true) => vec![clip_g],
            (Vectors::Sdxl { clip_l, clip_g }, 2, _) => vec![clip_l, clip_g],
            _ => {
                unfit.push(format!(
                    "embedding `{}` ({}) is made for another model family",
                    e.name,
                    e.path.display()
                ));
                continue;
            }
        };
        let fits = sets
            .iter()
            .zip(widths)
            .all(|(v, &w)| v.size().get(1) == Some(&w))
            && sets
                .iter()
                .map(|v| v.size()[0])
                .all(|n| n == sets[0].size()[0]);
        if !fits {
            let shapes: Vec<Vec<i64>> = sets.iter().map(|v| v.size()).collect();
            unfit.push(format!(
                "embedding `{}` ({}) has vectors {shapes:?}, which do not fit text encoders of \
                 width {widths:?}",
                e.name,
                e.path.display()
            ));
            continue;
        }
        for (i, (v, tokenizer)) in sets.iter().zip(tokenizers).enumerate() {
            let ids = tokenizer.encode(&e.name);
            let ids = ids[1..ids.len().saturating_sub(1)].to_vec();
            if ids.is_empty() {
                continue;
            }
            let n = v.size()[0];
            per_encoder[i].push(TokenEmbedding {
                name: e.name.clone(),
                ids,
                vectors: v.f_to_kind(kind)?.f_to_device(device)?,
                placeholder: next[i],
            });
            next[i] += n;
        }
    }
    Ok((per_encoder, unfit))
}

/// The embedding whose name's tokens start `ids`, the longest first (A1111's
/// `find_embedding_at_position`).
pub fn embedding_at(ids: &[i64], embeddings: &[TokenEmbedding]) -> Option<usize> {
    embeddings
        .iter()
        .enumerate()
        .filter(|(_, e)| ids.starts_with(&e.ids))
        .max_by_key(|(i, e)| (e.ids.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// A prompt's token ids as diffusers encodes it with embeddings loaded: start token, the
/// prompt's tokens with each embedding's name replaced by its vectors' placeholders, cut at
/// `max_length - 2` (an embedding cut there keeps its first vectors), end token, padding; the
/// vectors to put in place of the placeholders; and whether the prompt was cut.
pub fn plain_tokens(
    tokenizer: &ClipTokenizer,
    text: &str,
    embeddings: &[TokenEmbedding],
) -> Result<(Vec<i64>, Vec<EmbeddingFix>, bool)> {
    let room = tokenizer.max_length().saturating_sub(2);
    let all = tokenizer.encode(text);
    let inner = &all[1..all.len().saturating_sub(1)];
    let mut ids = vec![tokenizer.bos_id()];
    let mut fixes = Vec::new();
    let mut i = 0;
    let mut truncated = false;
    while i < inner.len() {
        if ids.len() - 1 == room {
            truncated = true;
            break;
        }
        match embedding_at(&inner[i..], embeddings) {
            Some(k) => {
                let e = &embeddings[k];
                let n = e.len().min(room - (ids.len() - 1));
                truncated |= n < e.len();
                fixes.push(EmbeddingFix {
                    position: ids.len() as i64,
                    vectors: e.vectors.f_narrow(0, 0, n as i64)?,
                });
                ids.extend((0..n as i64).map(|j| e.placeholder + j));
                i += e.ids.len();
            }
            None => {
                ids.push(inner[i]);
                i += 1;
            }
        }
    }
    ids.push(tokenizer.eos_id());
    ids.resize(tokenizer.max_length().max(ids.len()), tokenizer.pad_id());
    Ok((ids, fixes, truncated))
}
