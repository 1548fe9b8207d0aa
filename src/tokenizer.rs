//! CLIP byte-level BPE tokenizer, equal to transformers 5's `CLIPTokenizer`.
//!
//! The pipeline, step by step, as the tokenizers-backed `CLIPTokenizer` runs it:
//!
//! 1. **Added tokens on the raw text.** Special and added tokens whose `normalized` flag is
//!    false (for the SD tokenizers: `<|endoftext|>` and the SD 2.x pad token `!`) are cut out
//!    of the raw text first, leftmost-longest, and become their ids directly.
//! 2. **Normalisation** of every remaining piece: NFC, every run of Unicode whitespace replaced
//!    by one space, then per-character lower-casing (`char::to_lowercase`, so a final capital
//!    sigma becomes `σ`, not `ς`).
//! 3. **Added tokens on the normalised text**: those whose `normalized` flag is true (SD 1.x:
//!    `<|startoftext|>`), matched against their normalised content, so `<|STARTOFTEXT|>` is
//!    found too.
//! 4. **Pre-tokenisation**: the CLIP split regex keeps its matches and drops the rest (the
//!    spaces); each match is split again by the byte-level GPT-2 regex (which only splits
//!    `<|startoftext|>` / `<|endoftext|>` typed as text, into `<|`, the word, `|>`).
//! 5. **BPE** on each word: its UTF-8 bytes mapped to GPT-2's printable byte symbols, `</w>`
//!    appended to the last one, then the lowest-ranked merge is applied at its leftmost
//!    occurrence until none applies.
//! 6. `<|startoftext|>` before and `<|endoftext|>` after; for [`ClipTokenizer::encode_padded`]
//!    the tokens are first cut to `max_length - 2` and the result is padded with the pad token.
//!
//! Which tokens are added, and with which flags, follows what transformers 5.24 does with a
//! tokenizer folder (`tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`,
//! the `added_tokens` of `tokenizer.json`); see `resolve_added_tokens` below.

// Tokenizer files are read through the size-capped readers of model folders.
use crate::models::config::{read_json, read_text};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use once_cell::sync::{Lazy, OnceCell};
use regex::Regex;
use serde_json::{json, Map, Value};
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// The context length of every CLIP text encoder used by Stable Diffusion.
pub const CLIP_MAX_LENGTH: usize = 77;
pub(crate) const BOS: &str = "<|startoftext|>";
pub(crate) const EOS: &str = "<|endoftext|>";
pub(crate) const END_OF_WORD: &str = "</w>";
/// CLIP uses merges lines [1, 1 + STANDARD_MERGES) of its merges file.
const STANDARD_MERGES: usize = 49152 - 256 - 2;
/// Words kept in the BPE cache; past this, new words are not cached any more.
const CACHE_CAPACITY: usize = 50_000;
/// Longest word (bytes) kept in the BPE cache: longer ones are rare and would only fill it.
const CACHE_MAX_WORD_BYTES: usize = 256;

static STANDARD_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");

fn constant_regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant regex must compile")
}

static WHITESPACE_RUN: Lazy<Regex> = Lazy::new(|| constant_regex(r"\s+"));
/// The pattern of CLIP's `Split` pre-tokenizer (behaviour "removed", inverted: matches are kept).
static CLIP_SPLIT: Lazy<Regex> = Lazy::new(|| {
    constant_regex(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    )
});
/// The GPT-2 pattern of the `ByteLevel` pre-tokenizer. Its whitespace alternatives
/// (`\s+(?!\S)|\s+`) are left out: the pieces it sees never contain whitespace.
static BYTE_LEVEL_SPLIT: Lazy<Regex> = Lazy::new(|| {
    constant_regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
});
/// `\w` as the tokenizers crate's single-word check sees it.
static WORD_CHAR: Lazy<Regex> = Lazy::new(|| constant_regex(r"^\w$"));

static STANDARD: OnceCell<Arc<Inner>> = OnceCell::new();
static STANDARD_SD2: OnceCell<Arc<Inner>> = OnceCell::new();

/// The CLIP tokenizer. Cheap to clone (the vocabulary and the word cache are shared); `Send`
/// and `Sync`.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    bpe: Bpe,
    /// Added tokens matched on the raw text.
    raw_tokens: Vec<AddedPattern>,
    /// Added tokens matched on the normalised text (patterns are normalised contents).
    normalized_tokens: Vec<AddedPattern>,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
    /// Where it came from, for `Debug`.
    source: String,
    cache: RwLock<HashMap<String, Vec<u32>>>,
}

struct AddedPattern {
    pattern: String,
    id: u32,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("ClipTokenizer")
            .field("source", &i.source)
            .field("vocab_size", &i.bpe.vocab.len())
            .field("merges", &i.bpe.merges.len())
            .field(
                "added_tokens",
                &(i.raw_tokens.len() + i.normalized_tokens.len()),
            )
            .field("bos", &i.bos)
            .field("eos", &i.eos)
            .field("pad", &i.pad)
            .field("max_length", &i.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads a diffusers `tokenizer/` folder: vocab.json + merges.txt (preferred), else
    /// tokenizer.json (the `tokenizers` format: model.vocab / model.merges, merges as "a b"
    /// strings or [a, b] pairs), plus tokenizer_config.json / special_tokens_map.json /
    /// added_tokens.json for the special and added tokens and model_max_length (default 77;
    /// values above 77 such as 1e30 mean 77).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer folder not found (or not a folder)",
                ),
            ));
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let tokenizer_json_path = dir.join("tokenizer.json");
        let mut tokenizer_json: Option<Value> = None;

        let bpe = if vocab_path.is_file() && merges_path.is_file() {
            let vocab = parse_vocab(&read_json(&vocab_path)?, &vocab_path)?;
            let text = read_text(&merges_path)?;
            let merges = parse_merges_txt(&text, &merges_path)?;
            Bpe::new(vocab, &merges, &merges_path)?
        } else if tokenizer_json_path.is_file() {
            let tj = read_json(&tokenizer_json_path)?;
            let bpe = bpe_from_tokenizer_json(&tj, &tokenizer_json_path)?;
            tokenizer_json = Some(tj);
            bpe
        } else {
            let missing = if vocab_path.is_file() {
                &merges_path
            } else {
                &vocab_path
            };
            return Err(Error::io(
                missing,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "missing tokenizer file (need vocab.json + merges.txt, or tokenizer.json)",
                ),
            ));
        };

        let optional = |name: &str| -> Result<Option<(PathBuf, Value)>> {
            let path = dir.join(name);
            if path.is_file() {
                let value: Value = read_json(&path)?;
                if !value.is_object() {
                    return Err(Error::bad_model(format!(
                        "{}: expected a JSON object",
                        path.display()
                    )));
                }
                Ok(Some((path, value)))
            } else {
                Ok(None)
            }
        };
        let config = optional("tokenizer_config.json")?;
        let special_map = optional("special_tokens_map.json")?;
        let added_json = optional("added_tokens.json")?;

        // transformers reads the `added_tokens` of tokenizer.json only when tokenizer_config.json
        // has no `added_tokens_decoder`.
        let has_decoder = config
            .as_ref()
            .is_some_and(|(_, c)| c.get("added_tokens_decoder").is_some());
        let mut json_added = Vec::new();
        if !has_decoder && tokenizer_json_path.is_file() {
            let tj = match tokenizer_json.take() {
                Some(tj) => tj,
                None => read_json(&tokenizer_json_path)?,
            };
            json_added = parse_tokenizer_json_added(&tj, &tokenizer_json_path)?;
        }

        let sources = ConfigSources {
            config,
            special_map,
            added_json,
            json_added,
        };
        Inner::build(bpe, &sources, dir.display().to_string()).map(|inner| ClipTokenizer {
            inner: Arc::new(inner),
        })
    }

    /// The standard CLIP vocabulary embedded in the library, configured like the SD 1.x
    /// `tokenizer/` folder: pad = `<|endoftext|>`, max length 77.
    pub fn standard() -> Result<Self> {
        Self::embedded(&STANDARD, EOS, "SD 1.x")
    }

    /// The standard vocabulary configured like the SD 2.x `tokenizer/` folder: pad = `!`
    /// (id 0, which transformers then treats as a special token), max length 77.
    pub fn standard_sd2() -> Result<Self> {
        Self::embedded(&STANDARD_SD2, "!", "SD 2.x")
    }

    fn embedded(cell: &'static OnceCell<Arc<Inner>>, pad: &str, family: &str) -> Result<Self> {
        let inner = cell.get_or_try_init(|| -> Result<Arc<Inner>> {
            let (vocab, merges) = standard_vocab()?;
            let origin = Path::new("<embedded bpe_simple_vocab_16e6.txt.gz>");
            let bpe = Bpe::new(vocab, &merges, origin)?;
            let (config, special_map) = embedded_config(pad);
            let sources = ConfigSources {
                config: Some((
                    PathBuf::from(format!("<embedded {family} tokenizer_config.json>")),
                    config,
                )),
                special_map: Some((
                    PathBuf::from(format!("<embedded {family} special_tokens_map.json>")),
                    special_map,
                )),
                added_json: None,
                json_added: Vec::new(),
            };
            Ok(Arc::new(Inner::build(bpe, &sources, "standard".into())?))
        })?;
        Ok(ClipTokenizer {
            inner: Arc::clone(inner),
        })
    }

    /// Token ids with start and end tokens, not truncated, not padded. The work grows as
    /// `n log n` in the length of the text (of its longest word, for the BPE merges).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let body = self.inner.encode_body(text, usize::MAX);
        let mut out = Vec::with_capacity(body.len() + 2);
        out.push(self.inner.bos as i64);
        out.extend(body.iter().map(|&id| id as i64));
        out.push(self.inner.eos as i64);
        out
    }

    /// What the SD pipelines feed the text encoder: truncated to max_length (keeping the end
    /// token last) and padded with the pad token to exactly max_length.
    pub fn encode_padded(&self, text: &str) -> Vec<i64> {
        self.encode_padded_checked(text).0
    }

    /// [`ClipTokenizer::encode_padded`], and whether tokens were cut to fit. Tokenising stops
    /// as soon as more tokens exist than fit, so the work is bounded by `max_length` rather
    /// than by the length of the text (beyond the linear normalisation and splitting): a word
    /// longer than the fitting tokens could span is merged only as far as they reach. The
    /// ids are those of [`ClipTokenizer::encode`], cut, for every text whose tokens fit.
    pub fn encode_padded_checked(&self, text: &str) -> (Vec<i64>, bool) {
        let max = self.inner.max_length;
        let room = max.saturating_sub(2);
        let mut body = self.inner.encode_body(text, room);
        let truncated = body.len() > room;
        body.truncate(room);
        let mut out = Vec::with_capacity(max);
        out.push(self.inner.bos as i64);
        out.extend(body.iter().map(|&id| id as i64));
        out.push(self.inner.eos as i64);
        out.resize(max.max(out.len()), self.inner.pad as i64);
        (out, truncated)
    }

    pub fn max_length(&self) -> usize {
        self.inner.max_length
    }

    pub fn pad_id(&self) -> i64 {
        self.inner.pad as i64
    }

    pub fn bos_id(&self) -> i64 {
        self.inner.bos as i64
    }

    pub fn eos_id(&self) -> i64 {
        self.inner.eos as i64
    }

    /// The id of a vocabulary entry (a BPE symbol such as `,</w>`), if the vocabulary has it.
    pub fn vocab_id(&self, symbol: &str) -> Option<i64> {
        self.inner.bpe.vocab.get(symbol).map(|&id| id as i64)
    }
}

// ------------------------------------------------------------------------------------------
// encoding

impl Inner {
    /// The ids between the start and end tokens. Once more than `limit` ids exist the rest of
    /// the text is skipped (the ids past `limit` are then incomplete: callers cut them).
    fn encode_body(&self, text: &str, limit: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for raw in split_added(text, &self.raw_tokens) {
            if out.len() > limit {
                break;
            }
            match raw {
                Piece::Token(id) => out.push(id),
                Piece::Text(t) => {
                    if t.is_empty() {
                        continue;
                    }
                    let normalized = normalize(t);
                    for piece in split_added(&normalized, &self.normalized_tokens) {
                        if out.len() > limit {
                            break;
                        }
                        match piece {
                            Piece::Token(id) => out.push(id),
                            Piece::Text(t) => self.encode_normalized(t, limit, &mut out),
                        }
                    }
                }
            }
        }
        out
    }

    fn encode_normalized(&self, text: &str, limit: usize, out: &mut Vec<u32>) {
        for piece in CLIP_SPLIT.find_iter(text) {
            let piece = piece.as_str();
            // The byte-level regex covers every character, but keep any gap as its own word,
            // as the tokenizers crate's "isolated" split would.
            let mut last = 0;
            for word in BYTE_LEVEL_SPLIT.find_iter(piece) {
                if out.len() > limit {
                    return;
                }
                if word.start() > last {
                    self.encode_word(&piece[last..word.start()], limit, out);
                }
                self.encode_word(word.as_str(), limit, out);
                last = word.end();
            }
            if out.len() > limit {
                return;
            }
            if last < piece.len() {
                self.encode_word(&piece[last..], limit, out);
            }
        }
    }

    /// Appends the ids of one word; with a `limit`, a word longer than the ids still wanted
    /// could span is merged only over its first bytes (enough for more ids than wanted).
    fn encode_word(&self, word: &str, limit: usize, out: &mut Vec<u32>) {
        if word.is_empty() || out.len() > limit {
            return;
        }
        let wanted = (limit - out.len()).saturating_add(1);
        let span = wanted.saturating_mul(self.bpe.max_token_bytes);
        if word.len() > span {
            // Every id covers at most `max_token_bytes` bytes, so `span` bytes give at least
            // `wanted` ids (unless the vocabulary drops bytes: then merge the whole word).
            let mut cut = span;
            while !word.is_char_boundary(cut) {
                cut += 1;
            }
            let ids = self.bpe.tokenize(&word.as_bytes()[..cut]);
            if ids.len() >= wanted {
                out.extend_from_slice(&ids);
                return;
            }
        }
        {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let ids = self.bpe.tokenize(word.as_bytes());
        out.extend_from_slice(&ids);
        if word.len() <= CACHE_MAX_WORD_BYTES {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            if cache.len() < CACHE_CAPACITY {
                cache.insert(word.to_owned(), ids);
            }
        }
    }
}

/// NFC, whitespace runs to one space, per-character lower-casing.
fn normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    let collapsed = WHITESPACE_RUN.replace_all(&nfc, " ");
    let mut out = String::with_capacity(collapsed.len());
    for c in collapsed.chars() {
        out.extend(c.to_lowercase());
    }
    out
}

enum Piece<'a> {
    Text(&'a str),
    Token(u32),
}

fn is_word_char(c: char) -> bool {
    let mut buf = [0u8; 4];
    WORD_CHAR.is_match(c.encode_utf8(&mut buf))
}

/// Cuts the added tokens out of `sentence`: leftmost-longest, non-overlapping matches (as an
/// Aho-Corasick `LeftmostLongest` search), honouring single_word / lstrip / rstrip like the
/// tokenizers crate. The text pieces cover the rest of the sentence.
fn split_added<'a>(sentence: &'a str, patterns: &[AddedPattern]) -> Vec<Piece<'a>> {
    if patterns.is_empty() || sentence.is_empty() {
        return vec![Piece::Text(sentence)];
    }
    let mut pieces = Vec::new();
    let mut start_offset = 0;
    let mut search_from = 0;
    while search_from < sentence.len() {
        let mut found: Option<(usize, &AddedPattern)> = None;
        for (i, _) in sentence[search_from..].char_indices() {
            let at = search_from + i;
            let rest = &sentence[at..];
            let mut best: Option<&AddedPattern> = None;
            for p in patterns {
                if rest.starts_with(p.pattern.as_str())
                    && !matches!(best, Some(b) if b.pattern.len() >= p.pattern.len())
                {
                    best = Some(p);
                }
            }
            if let Some(p) = best {
                found = Some((at, p));
                break;
            }
        }
        let Some((mut start, token)) = found else {
            break;
        };
        let mut stop = start + token.pattern.len();
        search_from = stop;
        if token.single_word {
            let start_ok = start == 0
                || !sentence[..start]
                    .chars()
                    .next_back()
                    .is_some_and(is_word_char);
            let stop_ok = stop == sentence.len()
                || !sentence[stop..].chars().next().is_some_and(is_word_char);
            if !start_ok || !stop_ok {
                continue;
            }
        }
        if token.lstrip {
            let trimmed = sentence[..start]
                .trim_end_matches(char::is_whitespace)
                .len();
            start = trimmed.max(start_offset);
        }
        if token.rstrip {
            let rest = &sentence[stop..];
            stop += rest.len() - rest.trim_start_matches(char::is_whitespace).len();
        }
        if start_offset < start {
            pieces.push(Piece::Text(&sentence[start_offset..start]));
        }
        pieces.push(Piece::Token(token.id));
        start_offset = stop;
    }
    if start_offset < sentence.len() {
        pieces.push(Piece::Text(&sentence[start_offset..]));
    }
    pieces
}

// ------------------------------------------------------------------------------------------
// BPE model

/// GPT-2's reversible map from bytes to printable characters, and the order of the bytes in
/// CLIP's vocabulary (the printable ones first).
pub(crate) fn byte_symbols() -> ([char; 256], Vec<u8>) {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| printable(b)).collect();
    for &b in &order {
        chars[b as usize] = char::from(b);
    }
    let mut extra = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            chars[b as usize] = char::from_u32(256 + extra).unwrap_or('\0');
            order.push(b);
            extra += 1;
        }
    }
    (chars, order)
}

type Vocab = HashMap<String, u32>;
type Merge = (String, String);

struct Bpe {
    vocab: HashMap<String, u32>,
    /// Id of each byte's symbol, and of the symbol followed by `</w>`.
    byte_ids: [Option<u32>; 256],
    byte_end_ids: [Option<u32>; 256],
    /// (left, right) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Set once the unknown token is known (it must be in the model vocabulary).
    unk: Option<u32>,
    /// Bytes of the longest vocabulary entry (without `</w>`), at least 1: no id the merges
    /// make covers more bytes of a word.
    max_token_bytes: usize,
}

impl Bpe {
    fn new(
        vocab: HashMap<String, u32>,
        merges: &[(String, String)],
        origin: &Path,
    ) -> Result<Self> {
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::bad_model(format!(
                        "{}: merge {} (`{a} {b}`) uses `{t}`, which is not in the vocabulary",
                        origin.display(),
                        rank + 1
                    ))
                })
            };
            let left = id(a)?;
            let right = id(b)?;
            let merged = id(&format!("{a}{b}"))?;
            table.insert((left, right), (rank as u32, merged));
        }
        let (chars, _) = byte_symbols();
        let mut byte_ids = [None; 256];
        let mut byte_end_ids = [None; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = vocab.get(c.to_string().as_str()).copied();
            byte_end_ids[b] = vocab.get(format!("{c}{END_OF_WORD}").as_str()).copied();
        }
        // Each byte symbol is one character, so characters count bytes.
        let max_token_bytes = vocab
            .keys()
            .map(|t| t.strip_suffix(END_OF_WORD).unwrap_or(t).chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Bpe {
            vocab,
            byte_ids,
            byte_end_ids,
            merges: table,
            unk: None,
            max_token_bytes,
        })
    }

    fn tokenize(&self, bytes: &[u8]) -> Vec<u32> {
        let n = bytes.len();
        let mut symbols: Vec<u32> = Vec::with_capacity(n);
        for (i, &b) in bytes.iter().enumerate() {
            let id = if i + 1 == n {
                self.byte_end_ids[b as usize]
            } else {
                self.byte_ids[b as usize]
            };
            // A symbol missing from the vocabulary becomes the unknown token (not fused). If
            // that is missing too, the tokenizers crate fails; here the symbol is dropped.
            if let Some(id) = id.or(self.unk) {
                symbols.push(id);
            }
        }
        // Apply the best-ranked merge at its leftmost occurrence until none applies: the
        // same order as the tokenizers crate's priority queue of (rank, position). The
        // symbols form a linked list over their first positions (a merge keeps the left
        // one's), and a heap holds (rank, left position) for every adjacent pair that has a
        // merge; an entry whose pair has changed since is skipped when it comes out. Every
        // step is O(log n), so a word of n bytes costs O(n log n), not O(n^2).
        const NONE: usize = usize::MAX;
        let n = symbols.len();
        if n < 2 {
            return symbols;
        }
        let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.checked_sub(1).unwrap_or(NONE)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let rank_of = |symbols: &[u32], i: usize, j: usize| {
            self.merges.get(&(symbols[i], symbols[j])).copied()
        };
        for i in 0..n - 1 {
            if let Some((rank, _)) = rank_of(&symbols, i, i + 1) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE {
                continue;
            }
            let merged = match rank_of(&symbols, i, j) {
                Some((r, merged)) if r == rank => merged,
                _ => continue, // stale: the pair at i changed after this entry was pushed
            };
            symbols[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                if let Some((r, _)) = rank_of(&symbols, prev[i], i) {
                    heap.push(Reverse((r, prev[i])));
                }
            }
            if next[i] != NONE {
                if let Some((r, _)) = rank_of(&symbols, i, next[i]) {
                    heap.push(Reverse((r, i)));
                }
            }
        }
        let mut out = Vec::new();
        let mut i = 0; // the first symbol is never merged away
        while i != NONE {
            out.push(symbols[i]);
            i = next[i];
        }
        out
    }
}

/// The vocabulary and merges CLIP builds from its merges file.
fn standard_vocab() -> Result<(Vocab, Vec<Merge>)> {
    let (tokens, merges) = standard_tokens()?;
    let vocab: HashMap<String, u32> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    if vocab.len() != 49408 {
        return Err(Error::bad_model(format!(
            "<embedded bpe_simple_vocab_16e6.txt.gz>: built {} distinct tokens, expected 49408",
            vocab.len()
        )));
    }
    Ok((vocab, merges))
}

/// CLIP's standard vocabulary as tokens in id order, and its merges in rank order.
pub(crate) fn standard_tokens() -> Result<(Vec<String>, Vec<Merge>)> {
    let origin = "<embedded bpe_simple_vocab_16e6.txt.gz>";
    let mut text = String::new();
    flate2::read::GzDecoder::new(STANDARD_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(origin, e))?;
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < 1 + STANDARD_MERGES {
        return Err(Error::bad_model(format!(
            "{origin}: {} lines, expected at least {}",
            lines.len(),
            1 + STANDARD_MERGES
        )));
    }
    let mut merges = Vec::with_capacity(STANDARD_MERGES);
    for (i, line) in lines[1..1 + STANDARD_MERGES].iter().enumerate() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(Error::bad_model(format!(
                    "{origin}: line {} is not a merge: {line:?}",
                    i + 2
                )))
            }
        }
    }
    let (chars, order) = byte_symbols();
    let mut tokens: Vec<String> = order
        .iter()
        .map(|&b| chars[b as usize].to_string())
        .collect();
    let with_end: Vec<String> = tokens.iter().map(|t| format!("{t}{END_OF_WORD}")).collect();
    tokens.extend(with_end);
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.to_owned());
    tokens.push(EOS.to_owned());
    Ok((tokens, merges))
}

/// tokenizer_config.json and special_tokens_map.json of the SD 1.x `tokenizer/` folder.
/// The `tokenizer_config.json` and `special_tokens_map.json` of the SD 1.x / 2.x tokenizer
/// folders, which differ only in the pad token.
fn embedded_config(pad: &str) -> (Value, Value) {
    let token = |content: &str, typed: bool| {
        let mut v = json!({
            "content": content, "lstrip": false, "normalized": true, "rstrip": false,
            "single_word": false
        });
        if typed {
            v["__type"] = json!("AddedToken");
        }
        v
    };
    let config = json!({
        "bos_token": token(BOS, true),
        "eos_token": token(EOS, true),
        "unk_token": token(EOS, true),
        "pad_token": pad,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    });
    let special_map = json!({
        "bos_token": token(BOS, false),
        "eos_token": token(EOS, false),
        "unk_token": token(EOS, false),
        "pad_token": pad,
    });
    (config, special_map)
}

// ------------------------------------------------------------------------------------------
// reading files

fn json_id(v: &Value, what: &str, path: &Path) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            Error::bad_model(format!(
                "{}: id of {what} is not a non-negative integer: {v}",
                path.display()
            ))
        })
}

fn parse_vocab(value: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    match value {
        Value::Object(map) => {
            let mut vocab = HashMap::with_capacity(map.len());
            for (token, id) in map {
                vocab.insert(token.clone(), json_id(id, &format!("`{token}`"), path)?);
            }
            Ok(vocab)
        }
        // A list of tokens (or of [token, score] pairs): ids are the positions.
        Value::Array(items) => {
            let mut vocab = HashMap::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let token = match item {
                    Value::String(s) => s.as_str(),
                    Value::Array(pair) => pair.first().and_then(Value::as_str).unwrap_or_default(),
                    _ => "",
                };
                if token.is_empty() {
                    return Err(Error::bad_model(format!(
                        "{}: vocabulary entry {i} is not a token: {item}",
                        path.display()
                    )));
                }
                vocab.insert(token.to_owned(), i as u32);
            }
            Ok(vocab)
        }
        _ => Err(Error::bad_model(format!(
            "{}: the vocabulary is not a JSON object of token -> id",
            path.display()
        ))),
    }
}

fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_owned(), b.to_owned()))
            }
            _ => {
                return Err(Error::bad_model(format!(
                    "{}: line {} is not a merge (`left right`): {line:?}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

fn bpe_from_tokenizer_json(tj: &Value, path: &Path) -> Result<Bpe> {
    let model = tj
        .get("model")
        .ok_or_else(|| Error::bad_model(format!("{}: no `model` section", path.display())))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            return Err(Error::bad_model(format!(
                "{}: model type {kind}, expected BPE",
                path.display()
            )));
        }
    }
    let vocab = parse_vocab(
        model
            .get("vocab")
            .ok_or_else(|| Error::bad_model(format!("{}: no `model.vocab`", path.display())))?,
        path,
    )?;
    let list = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::bad_model(format!("{}: no `model.merges` list", path.display())))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let pair = match m {
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                    _ => None,
                }
            }
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Some((a.to_owned(), b.to_owned())),
                _ => None,
            },
            _ => None,
        };
        match pair {
            Some(pair) => merges.push(pair),
            None => {
                return Err(Error::bad_model(format!(
                    "{}: model.merges[{i}] is not a merge (\"a b\" or [a, b]): {m}",
                    path.display()
                )))
            }
        }
    }
    Bpe::new(vocab, &merges, path)
}

fn parse_tokenizer_json_added(tj: &Value, path: &Path) -> Result<Vec<(u32, TokenSpec)>> {
    let Some(list) = tj.get("added_tokens") else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or_else(|| {
        Error::bad_model(format!("{}: `added_tokens` is not a list", path.display()))
    })?;
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let what = format!("added_tokens[{i}]");
        let id = json_id(entry.get("id").unwrap_or(&Value::Null), &what, path)?;
        out.push((id, TokenSpec::from_object(entry, false, &what, path)?));
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// special and added tokens

/// A token description as transformers holds it: a plain string, or an `AddedToken`.
#[derive(Clone, Debug)]
enum Special {
    Str(String),
    Token(TokenSpec),
}

impl Special {
    fn content(&self) -> &str {
        match self {
            Special::Str(s) => s,
            Special::Token(t) => &t.content,
        }
    }

    /// special_tokens_map.json's objects are special whatever their "special" says.
    fn forced_special(self) -> Self {
        match self {
            Special::Token(mut t) => {
                t.special = true;
                Special::Token(t)
            }
            s => s,
        }
    }

    /// Python's `==` between these values (strings by content; AddedTokens by every field;
    /// a string never equals an AddedToken).
    fn same(&self, other: &Special) -> bool {
        match (self, other) {
            (Special::Str(a), Special::Str(b)) => a == b,
            (Special::Token(a), Special::Token(b)) => a.same(b),
            _ => false,
        }
    }

    /// `value` from a config file: a string, an object with "content", or null.
    fn parse(value: &Value, special_default: bool, key: &str, path: &Path) -> Result<Option<Self>> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(Special::Str(s.clone()))),
            Value::Object(_) => Ok(Some(Special::Token(TokenSpec::from_object(
                value,
                special_default,
                key,
                path,
            )?))),
            _ => Err(Error::bad_model(format!(
                "{}: `{key}` is neither a string nor a token object: {value}",
                path.display()
            ))),
        }
    }
}

/// An `AddedToken`; `normalized: None` means "not given", which resolves to `!special`.
#[derive(Clone, Debug)]
struct TokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: Option<bool>,
    special: bool,
}

impl TokenSpec {
    fn normalized(&self) -> bool {
        self.normalized.unwrap_or(!self.special)
    }

    fn same(&self, o: &TokenSpec) -> bool {
        self.content == o.content
            && self.single_word == o.single_word
            && self.lstrip == o.lstrip
            && self.rstrip == o.rstrip
            && self.normalized() == o.normalized()
            && self.special == o.special
    }

    fn from_object(value: &Value, special_default: bool, key: &str, path: &Path) -> Result<Self> {
        let bad =
            |what: &str| Error::bad_model(format!("{}: `{key}` {what}: {value}", path.display()));
        let obj = value.as_object().ok_or_else(|| bad("is not an object"))?;
        let content = obj
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("has no string \"content\""))?;
        let flag = |name: &str| -> Result<Option<bool>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(bad(&format!("has a non-boolean \"{name}\""))),
            }
        };
        Ok(TokenSpec {
            content: content.to_owned(),
            single_word: flag("single_word")?.unwrap_or(false),
            lstrip: flag("lstrip")?.unwrap_or(false),
            rstrip: flag("rstrip")?.unwrap_or(false),
            normalized: flag("normalized")?,
            special: flag("special")?.unwrap_or(special_default),
        })
    }
}

/// The configuration files of a tokenizer folder (each with its path, for error messages).
struct ConfigSources {
    config: Option<(PathBuf, Value)>,
    special_map: Option<(PathBuf, Value)>,
    added_json: Option<(PathBuf, Value)>,
    /// `added_tokens` of tokenizer.json (only read when the config has no
    /// `added_tokens_decoder`).
    json_added: Vec<(u32, TokenSpec)>,
}

const SPECIAL_ATTRIBUTES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The special tokens and added tokens, resolved like transformers 5.24's
/// `CLIPTokenizer.from_pretrained`.
struct Resolved {
    /// Named special tokens (bos, eos, unk, pad, ...), after defaults.
    named: HashMap<&'static str, Special>,
    /// Tokens in the order they are added to the backend; for a content added several times
    /// the last one's flags count.
    to_add: Vec<TokenSpec>,
    model_max_length: Option<(f64, PathBuf)>,
}

/// Follows transformers 5.24:
///
/// * values of tokenizer_config.json; when it has no `added_tokens_decoder`, the entries of
///   special_tokens_map.json override them (their objects count as special), and
///   added_tokens.json and tokenizer.json's `added_tokens` make up the added-token list;
/// * `CLIPTokenizer`'s defaults fill in bos / eos / unk / pad;
/// * the tokens added to the backend are the added-token list (by id), then every named
///   special token (bos, eos, unk, sep, pad, cls, mask, then the extra ones) whose content is
///   not in that list and which does not equal one already queued; strings become special
///   tokens that are matched on the raw text.
fn resolve_added_tokens(src: &ConfigSources) -> Result<Resolved> {
    let mut named: HashMap<&'static str, Special> = HashMap::new();
    let mut extras: Vec<Special> = Vec::new();
    let mut decoder: BTreeMap<u32, TokenSpec> = BTreeMap::new();
    let mut model_max_length = None;

    let empty = Map::new();
    let (config_path, config) = match &src.config {
        Some((p, v)) => (p.clone(), v.as_object().unwrap_or(&empty)),
        None => (PathBuf::from("tokenizer_config.json"), &empty),
    };
    let mut present: HashSet<&'static str> = HashSet::new();
    for key in SPECIAL_ATTRIBUTES {
        if let Some(v) = config.get(key) {
            present.insert(key);
            if let Some(s) = Special::parse(v, false, key, &config_path)? {
                named.insert(key, s);
            }
        }
    }
    let parse_list = |v: &Value, special_default: bool, key: &str, path: &Path| {
        let mut out = Vec::new();
        if let Some(items) = v.as_array() {
            for (i, item) in items.iter().enumerate() {
                if let Some(s) =
                    Special::parse(item, special_default, &format!("{key}[{i}]"), path)?
                {
                    out.push(s);
                }
            }
        } else if !v.is_null() && !v.is_object() {
            return Err(Error::bad_model(format!(
                "{}: `{key}` is not a list",
                path.display()
            )));
        }
        Ok::<_, Error>(out)
    };
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(v) = config.get(key) {
            let list = parse_list(v, false, key, &config_path)?;
            if !list.is_empty() {
                extras = list;
            }
        }
    }
    if let Some(v) = config.get("model_max_length") {
        if !v.is_null() {
            let m = v.as_f64().ok_or_else(|| {
                Error::bad_model(format!(
                    "{}: model_max_length is not a number: {v}",
                    config_path.display()
                ))
            })?;
            model_max_length = Some((m, config_path.clone()));
        }
    }

    if let Some(dec) = config.get("added_tokens_decoder") {
        let dec = dec.as_object().ok_or_else(|| {
            Error::bad_model(format!(
                "{}: added_tokens_decoder is not an object",
                config_path.display()
            ))
        })?;
        for (id, entry) in dec {
            let what = format!("added_tokens_decoder[{id}]");
            let id: u32 = id.parse().map_err(|_| {
                Error::bad_model(format!(
                    "{}: {what}: the key is not a token id",
                    config_path.display()
                ))
            })?;
            decoder.insert(
                id,
                TokenSpec::from_object(entry, false, &what, &config_path)?,
            );
        }
    } else {
        if let Some((path, stm)) = &src.special_map {
            let stm = stm.as_object().unwrap_or(&empty);
            for (key, v) in stm {
                if let Some(attr) = SPECIAL_ATTRIBUTES.iter().find(|a| **a == key.as_str()) {
                    present.insert(attr);
                    match Special::parse(v, true, key, path)? {
                        Some(s) => {
                            named.insert(attr, s.forced_special());
                        }
                        None => {
                            named.remove(attr);
                        }
                    }
                } else if key == "additional_special_tokens" || key == "extra_special_tokens" {
                    for s in parse_list(v, true, key, path)? {
                        let s = s.forced_special();
                        if !extras.iter().any(|e| e.same(&s)) {
                            extras.push(s);
                        }
                    }
                }
            }
        }
        if let Some((path, added)) = &src.added_json {
            let specials: HashSet<String> = named
                .values()
                .chain(extras.iter())
                .map(|s| s.content().to_owned())
                .collect();
            for (content, id) in added.as_object().unwrap_or(&empty) {
                let id = json_id(id, &format!("`{content}`"), path)?;
                let special = specials.contains(content);
                decoder.insert(
                    id,
                    TokenSpec {
                        content: content.clone(),
                        single_word: false,
                        lstrip: false,
                        rstrip: false,
                        normalized: Some(!special),
                        special,
                    },
                );
            }
        }
        for (id, spec) in &src.json_added {
            decoder.insert(*id, spec.clone());
        }
    }

    // CLIPTokenizer's own defaults, for the keys no file mentions (a null keeps it unset).
    for (key, default) in [
        ("bos_token", BOS),
        ("eos_token", EOS),
        ("unk_token", EOS),
        ("pad_token", EOS),
    ] {
        if !present.contains(key) {
            named.insert(key, Special::Str(default.to_owned()));
        }
    }

    // The queue of tokens added to the backend.
    let decoder_tokens: Vec<TokenSpec> = decoder.into_values().collect();
    let in_decoder: HashSet<&str> = decoder_tokens.iter().map(|t| t.content.as_str()).collect();
    let mut queue: Vec<Special> = decoder_tokens.iter().cloned().map(Special::Token).collect();
    let named_in_order: Vec<&Special> = SPECIAL_ATTRIBUTES
        .iter()
        .filter_map(|k| named.get(k))
        .chain(extras.iter())
        .collect();
    for s in &named_in_order {
        if !in_decoder.contains(s.content()) && !queue.iter().any(|q| q.same(s)) {
            queue.push((*s).clone());
        }
    }
    let named_contents: HashSet<&str> = named_in_order.iter().map(|s| s.content()).collect();
    let to_add = queue
        .into_iter()
        .map(|s| match s {
            Special::Str(content) => TokenSpec {
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: None,
                special: true,
            },
            Special::Token(mut t) => {
                if !t.special && named_contents.contains(t.content.as_str()) {
                    t.special = true;
                }
                t
            }
        })
        .collect();
    Ok(Resolved {
        named,
        to_add,
        model_max_length,
    })
}

impl Inner {
    fn build(mut bpe: Bpe, src: &ConfigSources, source: String) -> Result<Inner> {
        let resolved = resolve_added_tokens(src)?;
        let model_size = bpe.vocab.len() as u32;

        // Ids: the model's id when the content is in its vocabulary, else the next free one
        // past the model (the tokenizers crate's rule). The last flags given for a content win.
        let mut added: Vec<(TokenSpec, u32)> = Vec::new();
        for token in resolved.to_add {
            if token.content.is_empty() {
                continue;
            }
            if let Some(slot) = added.iter_mut().find(|(t, _)| t.content == token.content) {
                slot.0 = token;
                continue;
            }
            let id = match bpe.vocab.get(&token.content) {
                Some(&id) => id,
                None => {
                    let max_added = added.iter().map(|(_, id)| *id).max();
                    match max_added {
                        Some(max) if max >= model_size || model_size == 0 => max + 1,
                        _ => model_size,
                    }
                }
            };
            added.push((token, id));
        }

        let id_of = |content: &str| -> Option<u32> {
            added
                .iter()
                .find(|(t, _)| t.content == content)
                .map(|(_, id)| *id)
                .or_else(|| bpe.vocab.get(content).copied())
        };
        let named_id = |key: &str| -> Result<Option<u32>> {
            match resolved.named.get(key) {
                None => Ok(None),
                Some(s) => id_of(s.content()).map(Some).ok_or_else(|| {
                    Error::bad_model(format!(
                        "{source}: {key} `{}` is not in the vocabulary",
                        s.content()
                    ))
                }),
            }
        };
        let bos = named_id("bos_token")?
            .ok_or_else(|| Error::bad_model(format!("{source}: no bos_token")))?;
        let eos = named_id("eos_token")?
            .ok_or_else(|| Error::bad_model(format!("{source}: no eos_token")))?;
        // Without a pad token the SD pipelines pad with the end token.
        let pad = named_id("pad_token")?.unwrap_or(eos);
        bpe.unk = resolved
            .named
            .get("unk_token")
            .and_then(|s| bpe.vocab.get(s.content()).copied());

        let max_length = match resolved.model_max_length {
            None => CLIP_MAX_LENGTH,
            Some((m, _)) if m > CLIP_MAX_LENGTH as f64 => CLIP_MAX_LENGTH,
            Some((m, path)) => {
                if m.is_nan() || m < 2.0 {
                    return Err(Error::bad_model(format!(
                        "{}: model_max_length {m} leaves no room for the start and end tokens",
                        path.display()
                    )));
                }
                m as usize
            }
        };

        let mut raw_tokens = Vec::new();
        let mut normalized_tokens = Vec::new();
        for (t, id) in &added {
            let (list, pattern) = if t.normalized() {
                (&mut normalized_tokens, normalize(&t.content))
            } else {
                (&mut raw_tokens, t.content.clone())
            };
            if pattern.is_empty() {
                continue;
            }
            list.push(AddedPattern {
                pattern,
                id: *id,
                single_word: t.single_word,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            });
        }

        Ok(Inner {
            bpe,
            raw_tokens,
            normalized_tokens,
            bos,
            eos,
            pad,
            max_length,
            source,
            cache: RwLock::new(HashMap::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let (chars, order) = byte_symbols();
        let set: HashSet<char> = chars.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(order.len(), 256);
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[0], '\u{100}');
        assert_eq!(chars[b' ' as usize], '\u{120}');
    }

    #[test]
    fn normalizes_like_the_reference() {
        assert_eq!(normalize("  A\u{301}\t\nB  "), " \u{e1} b ");
        assert_eq!(normalize("ΟΔΟΣ"), "οδοσ");
    }
}
