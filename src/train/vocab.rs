//! A pruned copy of the real CLIP BPE vocabulary for the shipped model.
//!
//! The full vocabulary has 49408 tokens; a text encoder embedding that size would dwarf the
//! rest of our tiny model. The pruned vocabulary keeps
//! - the 256 byte symbols and the 256 byte symbols with `</w>` (so any text still encodes),
//! - every merge that the BPE applies to a word of the dataset's captions, in the original
//!   rank order (so BPE applies exactly the same merges to those words), and the tokens they
//!   produce,
//! - `<|startoftext|>` and `<|endoftext|>`,
//!
//! renumbered in the original order. Why the merges give the same tokens: at every step the
//! BPE applies the lowest-ranked merge among the adjacent pairs of a word; the merge the full
//! table applies is kept, and every kept merge had the same relative rank, so the pruned table
//! picks the same merge at every step. [`verify`] checks it, token string by token string,
//! against the library's tokenizer with the full vocabulary.
use crate::tokenizer::{byte_symbols, standard_tokens, ClipTokenizer, BOS, END_OF_WORD, EOS};
use crate::{Error, Result};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The full CLIP vocabulary: tokens in id order, and the merges in rank order.
pub struct FullVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl FullVocab {
    pub fn load() -> Result<Self> {
        let (tokens, merges) = standard_tokens()?;
        Ok(Self { tokens, merges })
    }

    /// The ranks of the merges BPE applies to one pre-tokenised, lower-case word.
    pub fn merges_applied(&self, word: &str, ranks: &HashMap<(&str, &str), usize>) -> Vec<usize> {
        let (chars, _) = byte_symbols();
        let bytes = word.as_bytes();
        let mut symbols: Vec<String> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let c = chars[b as usize].to_string();
                if i + 1 == bytes.len() {
                    format!("{c}{END_OF_WORD}")
                } else {
                    c
                }
            })
            .collect();
        let mut applied = Vec::new();
        while symbols.len() > 1 {
            let best = (0..symbols.len() - 1)
                .filter_map(|i| {
                    ranks
                        .get(&(symbols[i].as_str(), symbols[i + 1].as_str()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((rank, i)) = best else { break };
            applied.push(rank);
            let merged = format!("{}{}", symbols[i], symbols[i + 1]);
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        applied
    }
}

/// The pruned vocabulary: tokens in id order and the kept merges in rank order.
pub struct PrunedVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

/// Prunes the full vocabulary to what `words` need.
pub fn prune(full: &FullVocab, words: &[String]) -> PrunedVocab {
    let ranks: HashMap<(&str, &str), usize> = full
        .merges
        .iter()
        .enumerate()
        .map(|(i, (a, b))| ((a.as_str(), b.as_str()), i))
        .collect();
    let mut kept = BTreeSet::new();
    for w in words {
        kept.extend(full.merges_applied(w, &ranks));
    }
    let merges: Vec<(String, String)> = kept.iter().map(|&r| full.merges[r].clone()).collect();
    let mut tokens: Vec<String> = full.tokens[..512].to_vec();
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    PrunedVocab { tokens, merges }
}

impl PrunedVocab {
    /// Writes a diffusers `tokenizer/` folder: vocab.json, merges.txt and the SD 1.x special
    /// token settings (pad = `<|endoftext|>`, 77 tokens).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let vocab: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        write_json(&dir.join("vocab.json"), &serde_json::Value::Object(vocab))?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(&format!("{a} {b}\n"));
        }
        let path = dir.join("merges.txt");
        std::fs::write(&path, merges).map_err(|e| Error::io(&path, e))?;
        let token = |content: &str| {
            json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false,
                   "single_word": false})
        };
        write_json(
            &dir.join("special_tokens_map.json"),
            &json!({"bos_token": token(BOS), "eos_token": token(EOS), "pad_token": EOS,
                    "unk_token": token(EOS)}),
        )?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &json!({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
                    "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                    "do_lower_case": true, "clean_up_tokenization_spaces": true}),
        )?;
        Ok(())
    }
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.into(),
        source: e,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Checks that the tokenizer in `dir` (pruned vocabulary) gives the same tokens, as strings,
/// as the library's standard tokenizer (full vocabulary) for every text. Returns how many
/// texts were checked.
pub fn verify(dir: &Path, full: &FullVocab, texts: &[String]) -> Result<usize> {
    let pruned = ClipTokenizer::from_dir(dir)?;
    let standard = ClipTokenizer::standard()?;
    let vocab_path = dir.join("vocab.json");
    let vocab: HashMap<String, usize> = serde_json::from_str(
        &std::fs::read_to_string(&vocab_path).map_err(|e| Error::io(&vocab_path, e))?,
    )
    .map_err(|e| Error::Json {
        path: vocab_path.clone(),
        source: e,
    })?;
    let mut pruned_tokens = vec![String::new(); vocab.len()];
    for (t, &i) in &vocab {
        pruned_tokens[i] = t.clone();
    }
    let as_strings = |ids: &[i64], table: &[String]| -> Result<Vec<String>> {
        ids.iter()
            .map(|&i| {
                table
                    .get(i as usize)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("token id {i} outside the vocabulary")))
            })
            .collect()
    };
    for text in texts {
        let a = as_strings(&standard.encode_padded(text), &full.tokens)?;
        let b = as_strings(&pruned.encode_padded(text), &pruned_tokens)?;
        if a != b {
            return Err(Error::Internal(format!(
                "pruned tokenizer differs on {text:?}: {b:?} vs {a:?}"
            )));
        }
    }
    Ok(texts.len())
}
