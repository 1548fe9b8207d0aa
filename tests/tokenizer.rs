//! The CLIP tokenizer against transformers' `CLIPTokenizer`.
//!
//! References come from `tests/fixtures/tokenizer/cases.json`, written by
//! `tools/fixtures/tokenizer.py` (see its docstring). Each configuration there is rebuilt as a
//! tokenizer folder in a temporary directory: the files it lists, plus, for the "standard"
//! vocabulary, a vocab.json + merges.txt that this test derives from the committed merges file
//! on its own (so `ClipTokenizer::standard()` and `ClipTokenizer::from_dir` are both checked).

mod common;

use common::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use stable_diffusion::tokenizer::ClipTokenizer;

const FIXTURE: &str = "tests/fixtures/tokenizer/cases.json";
const ASSET: &str = "assets/bpe_simple_vocab_16e6.txt.gz";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> Value {
    let path = root().join(FIXTURE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

fn configs(fx: &Value) -> &Vec<Value> {
    fx["configs"].as_array().expect("configs list")
}

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "sd-tokenizer-test-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, content: &str) {
        std::fs::write(self.0.join(name), content).expect("write temp file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// vocab.json and merges.txt of the standard CLIP vocabulary, derived here from the merges
/// file independently of the library.
fn standard_files() -> (String, String) {
    let mut gz = Vec::new();
    std::fs::File::open(root().join(ASSET))
        .and_then(|mut f| f.read_to_end(&mut gz))
        .expect("read the merges asset");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .expect("gunzip the merges asset");
    let merges: Vec<&str> = text.split('\n').skip(1).take(49152 - 256 - 2).collect();

    // GPT-2 byte -> character table, in CLIP's vocabulary order.
    let mut symbols: Vec<char> = Vec::new();
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    for b in 0..256u32 {
        if keep(b) {
            symbols.push(char::from_u32(b).unwrap());
        }
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !keep(b) {
            symbols.push(char::from_u32(256 + n).unwrap());
            n += 1;
        }
    }
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    assert_eq!(tokens.len(), 49408);
    let vocab: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i)))
        .collect();
    assert_eq!(vocab.len(), 49408, "derived vocabulary has duplicates");
    let mut merges_txt = String::from("#version: 0.2\n");
    for m in &merges {
        merges_txt.push_str(m);
        merges_txt.push('\n');
    }
    (Value::Object(vocab).to_string(), merges_txt)
}

/// Writes one configuration's tokenizer folder.
fn config_dir(cfg: &Value, standard: &(String, String)) -> TempDir {
    let name = cfg["name"].as_str().expect("config name");
    let dir = TempDir::new(name);
    if cfg["vocab"] == "standard" {
        dir.write("vocab.json", &standard.0);
        dir.write("merges.txt", &standard.1);
    }
    for (file, content) in cfg["files"].as_object().expect("files object") {
        match content {
            Value::String(s) => dir.write(file, s),
            other => dir.write(file, &other.to_string()),
        }
    }
    dir
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

fn first_difference(a: &[i64], b: &[i64]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Compares every case of `cfg`; returns the failure messages and the number of checks.
fn check_config(tok: &ClipTokenizer, cfg: &Value, label: &str) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut checks = 0;
    let want = |key: &str| {
        cfg[key]
            .as_i64()
            .unwrap_or_else(|| panic!("{key} in fixture"))
    };
    for (what, got, expected) in [
        ("bos_id", tok.bos_id(), want("bos_id")),
        ("eos_id", tok.eos_id(), want("eos_id")),
        ("pad_id", tok.pad_id(), want("pad_id")),
        ("max_length", tok.max_length() as i64, want("max_length")),
    ] {
        checks += 1;
        if got != expected {
            failures.push(format!("[{label}] {what}: got {got}, expected {expected}"));
        }
    }
    for case in cfg["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        for (kind, got, expected) in [
            ("ids", tok.encode(text), ids(&case["ids"])),
            ("padded", tok.encode_padded(text), ids(&case["padded"])),
        ] {
            checks += 1;
            if got != expected {
                let at = first_difference(&got, &expected);
                failures.push(format!(
                    "[{label}] {kind} of {text:?}: first difference at position {at} \
                     (got {:?}, expected {:?}; lengths {} / {})\n    got      {got:?}\n    expected {expected:?}",
                    got.get(at),
                    expected.get(at),
                    got.len(),
                    expected.len()
                ));
            }
        }
    }
    (failures, checks)
}

fn report(failures: Vec<String>, checks: usize) {
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(25).collect();
        panic!(
            "{} of {checks} checks differ from transformers:\n{}",
            failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!("{checks} checks equal to transformers");
}

#[test]
fn fixture_is_complete() {
    let fx = fixture();
    assert_eq!(fx["vocab_size"], 49408);
    let cfgs = configs(&fx);
    let standard: Vec<&Value> = cfgs.iter().filter(|c| c["standard"] == true).collect();
    assert_eq!(standard.len(), 1, "exactly one standard configuration");
    assert!(standard[0]["cases"].as_array().unwrap().len() >= 220);
    let sd2 = cfgs
        .iter()
        .find(|c| c["name"] == "sd2")
        .expect("sd2 config");
    assert_eq!(sd2["pad_id"], 0);
    let texts: Vec<&str> = standard[0]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert!(texts.contains(&""));
    assert!(texts.contains(&"<|endoftext|>"));
    let empty = standard[0]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"] == "")
        .unwrap();
    assert_eq!(ids(&empty["ids"]), vec![49406, 49407]);
}

#[test]
fn standard_matches_transformers() {
    let fx = fixture();
    let cfg = configs(&fx)
        .iter()
        .find(|c| c["standard"] == true)
        .expect("standard config");
    let tok = ClipTokenizer::standard().expect("standard tokenizer");
    let (failures, checks) = check_config(&tok, cfg, "standard()");
    report(failures, checks);
}

#[test]
fn standard_sd2_matches_transformers() {
    let fx = fixture();
    let cfg = configs(&fx)
        .iter()
        .find(|c| c["name"] == "sd2")
        .expect("sd2 config");
    let tok = ClipTokenizer::standard_sd2().expect("standard SD 2.x tokenizer");
    let (failures, checks) = check_config(&tok, cfg, "standard_sd2()");
    report(failures, checks);
}

#[test]
fn from_dir_matches_transformers_for_every_config() {
    let fx = fixture();
    let standard = standard_files();
    let mut failures = Vec::new();
    let mut checks = 0;
    for cfg in configs(&fx) {
        let name = cfg["name"].as_str().unwrap();
        let dir = config_dir(cfg, &standard);
        let tok = match ClipTokenizer::from_dir(dir.path()) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("[{name}] from_dir failed: {e}"));
                continue;
            }
        };
        let (f, c) = check_config(&tok, cfg, name);
        failures.extend(f);
        checks += c;
    }
    report(failures, checks);
}

#[test]
fn padded_is_always_max_length_and_ends_with_eos() {
    let tok = ClipTokenizer::standard().unwrap();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    for text in ["", "a cat", &"word ".repeat(200), &"🐱".repeat(100)] {
        let p = tok.encode_padded(text);
        assert_eq!(p.len(), 77, "{text:?}");
        assert_eq!(p[0], 49406);
        let full = tok.encode(text);
        if full.len() >= 77 {
            assert_eq!(p[76], 49407, "end token kept last when truncating {text:?}");
            assert_eq!(&p[..76], &full[..76]);
        } else {
            assert_eq!(&p[..full.len()], &full[..]);
            assert!(p[full.len()..].iter().all(|&x| x == 49407));
        }
    }
}

#[test]
fn standard_is_shared_and_thread_safe() {
    fn send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    send_sync::<ClipTokenizer>();
    let tok = ClipTokenizer::standard().unwrap();
    let prompts: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "prompt number {i}, a (red:1.{i}) fox, {}",
                "detailed ".repeat(i % 5)
            )
        })
        .collect();
    let expected: Vec<Vec<i64>> = prompts.iter().map(|p| tok.encode(p)).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let tok = ClipTokenizer::standard().unwrap();
            let prompts = &prompts;
            let expected = &expected;
            s.spawn(move || {
                for (i, p) in prompts.iter().enumerate().skip(t) {
                    assert_eq!(&tok.encode(p), &expected[i]);
                }
            });
        }
    });
    // Cached words give the same answer as fresh ones.
    assert_eq!(tok.encode(&prompts[3]), expected[3]);
}

// ------------------------------------------------------------------------------------------
// errors

fn err_of(dir: &Path) -> String {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("from_dir({}) should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn good_config_dir(standard: &(String, String)) -> TempDir {
    let dir = TempDir::new("errors");
    dir.write("vocab.json", &standard.0);
    dir.write("merges.txt", &standard.1);
    dir.write(
        "tokenizer_config.json",
        r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#,
    );
    dir
}

#[test]
fn from_dir_errors_name_the_file() {
    let standard = standard_files();

    // The folder itself is missing.
    let missing = std::env::temp_dir().join("sd-tokenizer-test-no-such-folder");
    let msg = err_of(&missing);
    assert!(msg.contains("sd-tokenizer-test-no-such-folder"), "{msg}");

    // An empty folder: no vocabulary at all.
    let empty = TempDir::new("empty");
    let msg = err_of(empty.path());
    assert!(msg.contains("vocab.json"), "{msg}");

    // vocab.json without merges.txt (and no tokenizer.json).
    let dir = TempDir::new("no-merges");
    dir.write("vocab.json", &standard.0);
    let msg = err_of(dir.path());
    assert!(msg.contains("merges.txt"), "{msg}");

    // Malformed vocab.json.
    let dir = good_config_dir(&standard);
    dir.write("vocab.json", "{\"a\": 1,");
    let msg = err_of(dir.path());
    assert!(msg.contains("vocab.json"), "{msg}");

    // vocab.json that is not a token -> id map.
    let dir = good_config_dir(&standard);
    dir.write("vocab.json", "{\"a\": \"one\"}");
    let msg = err_of(dir.path());
    assert!(msg.contains("vocab.json"), "{msg}");

    // A merges.txt line that is not a pair.
    let dir = good_config_dir(&standard);
    dir.write("merges.txt", "#version: 0.2\ni n\nthis is three\n");
    let msg = err_of(dir.path());
    assert!(
        msg.contains("merges.txt") && msg.contains("line 3"),
        "{msg}"
    );

    // A merge whose token is not in the vocabulary.
    let dir = good_config_dir(&standard);
    dir.write("merges.txt", "#version: 0.2\ni n\n\u{4e00} x\n");
    let msg = err_of(dir.path());
    assert!(msg.contains("merges.txt"), "{msg}");

    // Malformed tokenizer_config.json / special_tokens_map.json / added_tokens.json.
    for file in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ] {
        let dir = good_config_dir(&standard);
        dir.write(file, "{ not json");
        let msg = err_of(dir.path());
        assert!(msg.contains(file), "{file}: {msg}");
    }

    // A config value of the wrong type.
    let dir = good_config_dir(&standard);
    dir.write("tokenizer_config.json", r#"{"pad_token": 5}"#);
    let msg = err_of(dir.path());
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("pad_token"),
        "{msg}"
    );
    let dir = good_config_dir(&standard);
    dir.write("tokenizer_config.json", r#"{"model_max_length": "long"}"#);
    let msg = err_of(dir.path());
    assert!(msg.contains("tokenizer_config.json"), "{msg}");

    // A pad token that is in no vocabulary is added (as transformers does), not an error.
    let dir = good_config_dir(&standard);
    dir.write("tokenizer_config.json", r#"{"pad_token": "<pad>"}"#);
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.pad_id(), 49408);

    // Malformed tokenizer.json (used when there is no vocab.json / merges.txt).
    let dir = TempDir::new("bad-tokenizer-json");
    dir.write("tokenizer.json", "[1, 2");
    let msg = err_of(dir.path());
    assert!(msg.contains("tokenizer.json"), "{msg}");
    let dir = TempDir::new("tokenizer-json-no-model");
    dir.write("tokenizer.json", r#"{"version": "1.0"}"#);
    let msg = err_of(dir.path());
    assert!(
        msg.contains("tokenizer.json") && msg.contains("model"),
        "{msg}"
    );
    let dir = TempDir::new("tokenizer-json-bad-merge");
    dir.write(
        "tokenizer.json",
        r#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"], 7]}}"#,
    );
    let msg = err_of(dir.path());
    assert!(
        msg.contains("tokenizer.json") && msg.contains("merges[1]"),
        "{msg}"
    );
}

#[test]
fn from_dir_reads_a_real_layout_with_tokenizer_json_only() {
    // A tokenizer.json with "a b" string merges, as older `tokenizers` versions write.
    let dir = TempDir::new("tiny-json");
    dir.write(
        "tokenizer.json",
        r#"{"added_tokens": [], "model": {"type": "BPE",
            "vocab": {"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab</w>": 4, "<|startoftext|>": 5, "<|endoftext|>": 6},
            "merges": ["a b</w>"]}}"#,
    );
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("AB ab a"), vec![5, 4, 4, 2, 6]);
    assert_eq!(tok.encode("ba"), vec![5, 1, 2, 6]);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (5, 6, 6));
    assert_eq!(tok.max_length(), 77);
    let padded = tok.encode_padded("ab");
    assert_eq!(padded.len(), 77);
    assert_eq!(&padded[..4], &[5, 4, 6, 6]);
}

// ------------------------------------------------------------------------------------------
// bounded work: the BPE merges against a naive reference, and long words and prompts

/// The standard vocabulary as the naive reference needs it: byte -> symbol, merge ranks, ids.
struct Reference {
    symbols: Vec<char>,
    ranks: std::collections::HashMap<(String, String), usize>,
    ids: std::collections::HashMap<String, i64>,
}

fn reference() -> Reference {
    let (vocab, merges) = standard_files();
    let vocab: serde_json::Map<String, Value> = serde_json::from_str(&vocab).unwrap();
    let ids = vocab
        .into_iter()
        .map(|(k, v)| (k, v.as_i64().unwrap()))
        .collect();
    let ranks = merges
        .lines()
        .skip(1)
        .enumerate()
        .map(|(rank, line)| {
            let (a, b) = line.split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), rank)
        })
        .collect();
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut symbols = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        symbols[b as usize] = if keep(b) {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(256 + n - 1).unwrap()
        };
    }
    Reference {
        symbols,
        ranks,
        ids,
    }
}

impl Reference {
    /// BPE as its definition says, in O(n^2): the lowest-ranked merge at its leftmost
    /// occurrence, until none applies.
    fn word(&self, word: &str) -> Vec<i64> {
        let bytes = word.as_bytes();
        let mut parts: Vec<String> = bytes
            .iter()
            .map(|&b| self.symbols[b as usize].to_string())
            .collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    self.ranks
                        .get(&(parts[i].clone(), parts[i + 1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].push_str(&right);
        }
        parts.iter().map(|p| self.ids[p]).collect()
    }
}

/// A word of `len` letters drawn from `alphabet`.
fn random_word(rng: &mut Rng, alphabet: &[char], len: usize) -> String {
    (0..len)
        .map(|_| alphabet[rng.below(alphabet.len())])
        .collect()
}

#[test]
fn bpe_merges_equal_the_naive_definition_on_seeded_words() {
    let tok = ClipTokenizer::standard().unwrap();
    let reference = reference();
    let latin: Vec<char> = ('a'..='z').collect();
    // Few letters: many equal-ranked pairs, so the leftmost-first order is exercised.
    let narrow = ['a', 'b'];
    let repeated = ['e'];
    // Letters of several UTF-8 lengths (all lower case and NFC-stable).
    let wide = ['é', 'ß', 'ж', 'λ', 'の', '猫', 'ü', 'ø', 'ñ', 'k'];
    let mut rng = Rng::new(0x5eed_cafe_f00d_0001);
    let mut cases = 0;
    for (alphabet, max_len) in [
        (&latin[..], 60),
        (&narrow[..], 200),
        (&repeated[..], 300),
        (&wide[..], 40),
    ] {
        for _ in 0..60 {
            let len = 1 + rng.below(max_len);
            let word = random_word(&mut rng, alphabet, len);
            let ids = tok.encode(&word);
            let body = &ids[1..ids.len() - 1];
            assert_eq!(body, &reference.word(&word)[..], "word {word:?}");
            cases += 1;
        }
    }
    eprintln!("{cases} words merged as the naive definition does");
}

#[test]
fn a_100_kb_word_is_tokenised_in_well_under_a_second() {
    let tok = ClipTokenizer::standard().unwrap();
    let latin: Vec<char> = ('a'..='z').collect();
    let mut rng = Rng::new(7);
    for word in [random_word(&mut rng, &latin, 100_000), "a".repeat(100_000)] {
        let start = std::time::Instant::now();
        let (padded, truncated) = tok.encode_padded_checked(&word);
        let bounded = start.elapsed();
        assert!(truncated);
        assert_eq!(padded.len(), 77);
        assert_eq!(padded[76], tok.eos_id());
        assert!(
            bounded.as_secs_f64() < 0.5,
            "encode_padded of a 100 KB word took {bounded:?}"
        );
        // The whole word, merged in O(n log n): the same first tokens.
        let start = std::time::Instant::now();
        let full = tok.encode(&word);
        let whole = start.elapsed();
        assert!(
            whole.as_secs_f64() < 2.0,
            "encode of a 100 KB word took {whole:?}"
        );
        assert_eq!(&padded[..76], &full[..76]);
        eprintln!(
            "100 KB word ({}...): padded in {bounded:?}, all {} tokens in {whole:?}",
            &word[..8],
            full.len()
        );
    }
}

#[test]
fn long_prompts_stop_early_with_the_same_ids() {
    let tok = ClipTokenizer::standard().unwrap();
    let mut rng = Rng::new(11);
    let latin: Vec<char> = ('a'..='z').collect();
    // Around the limit: every prompt that fits gets exactly encode's ids; longer ones its
    // first 76, and the truncation is reported.
    for words in 60..90 {
        let text: Vec<String> = (0..words)
            .map(|_| {
                let len = 1 + rng.below(9);
                random_word(&mut rng, &latin, len)
            })
            .collect();
        let text = text.join(" ");
        let full = tok.encode(&text);
        let (padded, truncated) = tok.encode_padded_checked(&text);
        assert_eq!(padded, tok.encode_padded(&text));
        assert_eq!(truncated, full.len() > 77, "{text:?}");
        let n = full.len().min(76);
        assert_eq!(&padded[..n], &full[..n], "{text:?}");
    }
    // Many words, many digits, much punctuation: 100 KB each, bounded work.
    for text in [
        "a lighthouse at dusk, ".repeat(4_600),
        "7".repeat(100_000),
        "!?".repeat(50_000),
    ] {
        let start = std::time::Instant::now();
        let (padded, truncated) = tok.encode_padded_checked(&text);
        let took = start.elapsed();
        assert!(truncated && padded.len() == 77);
        assert!(took.as_secs_f64() < 0.5, "{:?}...: {took:?}", &text[..10]);
        let full = tok.encode(&text);
        assert_eq!(&padded[..76], &full[..76]);
    }
}
