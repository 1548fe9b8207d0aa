//! Hostile and unlucky `.ckpt` files (issue #10), through the public API a game uses: each class
//! of bad file costs an error that names the tensor or the limit at fault, never a panic, never
//! more than a bounded amount of memory (peak RSS growth, reset through /proc/self/clear_refs) or
//! time. And a legitimate but rare layout, every tensor a view of one compressed storage, loads
//! in about the time of the usual one.
//!
//! The tests of this file run one at a time (a lock), so that each measures its own peak RSS.
mod common;

use common::{fixtures, Rng};
use stable_diffusion::limits::{MAX_PICKLE_MEMO, MAX_PICKLE_STACK};
use stable_diffusion::pipeline::{LoadOptions, StableDiffusion};
use stable_diffusion::weights::pickle::ALLOC_PER_BYTE;
use stable_diffusion::weights::single_file::{detect_format, Checkpoint};
use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::Kind;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-ckpt-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ------------------------------------------------------------------------------------------
// Measuring
// ------------------------------------------------------------------------------------------

fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `f`, returning its result, its peak RSS growth in KiB (None where /proc does not let us
/// reset the peak) and its time.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Option<u64>, Duration) {
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status_kb("VmRSS:");
    let t = Instant::now();
    let out = f();
    let took = t.elapsed();
    let peak = status_kb("VmHWM:");
    let growth = match (reset, before, peak) {
        (true, Some(b), Some(p)) => Some(p.saturating_sub(b)),
        _ => None,
    };
    (out, growth, took)
}

/// Opens `path` and reads every tensor, as a loader would: the first error, if any.
fn open_and_read(path: &Path) -> Result<usize, String> {
    let c = Checkpoint::open(path).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = c.names().map(str::to_string).collect();
    names.sort();
    for name in &names {
        let _ = c.tensor(name).map_err(|e| e.to_string())?;
        c.release(name);
    }
    Ok(names.len())
}

/// `open_and_read` of `path` must fail within `time` and `rss_kb` of peak RSS growth, with a
/// message holding every one of `parts`.
fn refused_within(path: &Path, parts: &[&str], time: Duration, rss_kb: u64) -> String {
    let (r, rss, took) = measure(|| open_and_read(path));
    let msg = match r {
        Ok(n) => panic!("{}: {n} tensors read", path.display()),
        Err(msg) => msg,
    };
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not say {p:?}");
    }
    assert!(took < time, "{}: took {took:?}", path.display());
    if let Some(kb) = rss {
        assert!(kb < rss_kb, "{}: peak RSS grew {kb} KiB", path.display());
    }
    println!(
        "{}: refused in {took:?}, peak RSS +{} KiB: {msg}",
        path.file_name().unwrap().to_string_lossy(),
        rss.map_or("?".into(), |k| k.to_string())
    );
    msg
}

// ------------------------------------------------------------------------------------------
// Writing checkpoints
// ------------------------------------------------------------------------------------------

/// A pickle writer for the few opcodes `torch.save` uses, numbering memo entries as it goes.
struct Pickle {
    b: Vec<u8>,
    memo: u32,
    globals: HashMap<String, u32>,
}

impl Pickle {
    fn new() -> Self {
        Self {
            b: vec![0x80, 2],
            memo: 0,
            globals: HashMap::new(),
        }
    }
    fn op(&mut self, ops: &[u8]) -> &mut Self {
        self.b.extend_from_slice(ops);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.b.push(b'X');
        self.b.extend((s.len() as u32).to_le_bytes());
        self.b.extend(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.b.extend([0x8a, 8]);
        self.b.extend(v.to_le_bytes());
        self
    }
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.b.push(b'(');
        for &i in v {
            self.int(i);
        }
        self.op(b"t")
    }
    fn put(&mut self) -> u32 {
        let i = self.memo;
        self.memo += 1;
        self.b.push(b'r');
        self.b.extend(i.to_le_bytes());
        i
    }
    fn get(&mut self, i: u32) -> &mut Self {
        self.b.push(b'j');
        self.b.extend(i.to_le_bytes());
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        let key = format!("{module}\n{name}\n");
        match self.globals.get(&key) {
            Some(&i) => self.get(i),
            None => {
                self.b.push(b'c');
                self.b.extend(key.as_bytes());
                let i = self.put();
                self.globals.insert(key, i);
                self
            }
        }
    }
    /// `_rebuild_tensor_v2(('storage', <kind>Storage, key, 'cpu', n), offset, size, stride,
    /// False, OrderedDict())`.
    fn tensor(
        &mut self,
        storage: &str,
        kind: &str,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b"((").str("storage").global("torch", kind);
        self.str(storage).str("cpu").int(0).op(b"tQ");
        self.int(offset).ints(size).ints(stride).op(&[0x89]);
        self.global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R")
    }
    /// A state dict of `tensors` (name, storage, offset, size, stride), all float.
    fn state_dict(tensors: &[(&str, &str, i64, Vec<i64>, Vec<i64>)]) -> Vec<u8> {
        let mut p = Pickle::new();
        p.op(b"}(");
        for (name, storage, offset, size, stride) in tensors {
            p.str(name)
                .tensor(storage, "FloatStorage", *offset, size, stride);
        }
        p.op(b"u.");
        p.b
    }
}

/// A `torch.save`-like zip: `archive/data.pkl`, `archive/byteorder`, one entry per storage
/// (key, bytes, deflated?).
fn archive(pickle: &[u8], storages: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = |deflate: bool| {
        zip::write::FileOptions::default().compression_method(if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
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

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

/// The shapes of the report, each in a small file: refused by name before anything the size of
/// the shape is allocated.
#[test]
fn impossible_tensors_cost_an_error() {
    let _one = serial();
    let dir = tmp_dir("tensors");
    let storage = floats(768 << 10); // 3 MiB
    let cases: [(&str, Vec<i64>, Vec<i64>, &[&str]); 4] = [
        (
            "overflow",
            vec![4, 1 << 62, 2, 2],
            vec![1 << 62, 4, 2, 1],
            &["tensor `w`", "MAX_TENSOR_ELEMENTS"],
        ),
        (
            "broadcast",
            vec![1 << 24, 64],
            vec![0, 1],
            &["tensor `w`", "MAX_TENSOR_ELEMENTS"],
        ),
        (
            "broadcast-at-the-limit",
            vec![1 << 22, 64],
            vec![0, 1],
            &["tensor `w`", "repeats stored elements"],
        ),
        (
            "overlapping",
            vec![1 << 14, 1 << 14],
            vec![1, 1],
            &["tensor `w`", "repeats stored elements"],
        ),
    ];
    for (name, size, stride, parts) in cases {
        let path = dir.join(format!("{name}.ckpt"));
        let p = Pickle::state_dict(&[("w", "0", 0, size, stride)]);
        std::fs::write(&path, archive(&p, &[("0", &storage, false)])).unwrap();
        refused_within(&path, parts, Duration::from_secs(5), 32 << 10);
        // The loader says the same.
        let err = match StableDiffusion::load(&path, &LoadOptions::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("tensor `w`"), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Pickles that make a naive unpickler allocate gigabytes or work for hours from a few hundred
/// KB: each refused, within a small multiple of its size in memory and in bounded time.
#[test]
fn pickle_bombs_cost_an_error() {
    let _one = serial();
    let dir = tmp_dir("bombs");
    let mut bombs: Vec<(&str, Vec<u8>, &str)> = Vec::new();

    // DUP of a 128 KiB string, 64 Ki times (8 GiB of copies before).
    let mut p = Pickle::new();
    p.str(&"x".repeat(128 << 10))
        .op(&vec![b'2'; 64 << 10])
        .op(b"0");
    p.op(&vec![b'0'; (64 << 10) - 1]).op(b"].");
    bombs.push(("dup", p.b, "holds no state dict"));

    // A memoised 128 KiB string fetched 40 Ki times, each appended to a list.
    let mut p = Pickle::new();
    p.op(b"]").str(&"x".repeat(128 << 10));
    let s = p.put();
    p.op(b"0");
    for _ in 0..40 << 10 {
        p.get(s).op(b"a");
    }
    p.op(b".");
    bombs.push(("memo-get", p.b, "holds no state dict"));

    // OrderedDict(pairs) over a memoised list of 16 Ki pairs, 16 Ki times (quadratic before).
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict").op(b"(");
    for i in 0..16 << 10 {
        p.op(&[b'K', i as u8, b'K', 1, 0x86]);
    }
    p.op(b"l");
    let pairs = p.put();
    p.op(b"0");
    for _ in 0..16 << 10 {
        p.global("collections", "OrderedDict")
            .get(pairs)
            .op(&[0x85, b'R', b'0']);
    }
    p.op(b"}.");
    bombs.push(("ordered-dict", p.b, "memory bomb"));

    // Nesting a million deep.
    let mut p = Pickle::new();
    p.op(&vec![b'('; 1 << 20][..MAX_PICKLE_STACK - 1]);
    p.op(&vec![b'l'; MAX_PICKLE_STACK - 1]).op(b".");
    bombs.push(("nesting", p.b, "MAX_PICKLE_DEPTH"));

    // The stack, and the memo (five bytes an entry), past their limits.
    let mut p = Pickle::new();
    p.op(&vec![b'N'; MAX_PICKLE_STACK + 1]).op(b".");
    bombs.push(("stack", p.b, "MAX_PICKLE_STACK"));
    let mut p = Pickle::new();
    p.op(b"N");
    for _ in 0..=MAX_PICKLE_MEMO {
        p.put();
    }
    p.op(b".");
    bombs.push(("memo", p.b, "MAX_PICKLE_MEMO"));

    // Strings and integers whose lengths run past the data.
    let mut p = Pickle::new();
    p.op(&[0x8d]).op(&u64::MAX.to_le_bytes()).op(b"x");
    bombs.push(("length", p.b, "truncated"));

    // A storage key as long as a zip name may be, used by 40 Ki tensors (a 64 KiB string
    // formatted per tensor before).
    let key = "k".repeat(60_000);
    let mut p = Pickle::new();
    p.op(b"}(");
    p.global("torch._utils", "_rebuild_tensor_v2");
    let rebuild = p.put();
    p.op(b"0");
    p.op(b"((").str("storage").global("torch", "FloatStorage");
    p.str(&key)
        .str("cpu")
        .int(4)
        .op(b"tQ")
        .int(0)
        .ints(&[4])
        .ints(&[1]);
    p.op(b"t");
    let args = p.put();
    p.op(b"0");
    for i in 0..40 << 10 {
        p.str(&format!("w{i}")).get(rebuild).get(args).op(b"R");
    }
    p.op(b"u.");
    let pickled = p.b;
    let path = dir.join("long-key.ckpt");
    std::fs::write(&path, archive(&pickled, &[(&key, &floats(4), false)])).unwrap();
    let (r, rss, took) = measure(|| open_and_read(&path));
    assert_eq!(r, Ok(40 << 10));
    println!(
        "long-key.ckpt: {} tensors read in {took:?}, peak RSS +{rss:?} KiB",
        40 << 10
    );
    assert!(took < Duration::from_secs(20), "{took:?}");

    for (name, pickle, says) in bombs {
        let path = dir.join(format!("{name}.ckpt"));
        std::fs::write(&path, archive(&pickle, &[])).unwrap();
        // The unpickler's budget, the stack's own memory and what the zip and the test
        // around it need.
        let bound_kb = ((pickle.len() as u64 * ALLOC_PER_BYTE) >> 10)
            + ((MAX_PICKLE_STACK as u64 * 32) >> 10)
            + (64 << 10);
        refused_within(&path, &[says], Duration::from_secs(20), bound_kb);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Files that are not checkpoints, however large, are told apart from a few bytes.
#[test]
fn large_files_that_are_not_checkpoints() {
    let _one = serial();
    let dir = tmp_dir("large");
    let heads: [(&str, &[u8], &str); 4] = [
        (
            "model.gguf",
            b"GGUF\x03\x00\x00\x00",
            "a GGUF file (llama.cpp / stable-diffusion.cpp format), not supported",
        ),
        (
            "legacy.ckpt",
            b"\x80\x02\x8a\x0al\xfc\x9c",
            "legacy (pre-1.6, non-zip) format",
        ),
        (
            "junk.ckpt",
            b"\x00\x00junk",
            "neither a .safetensors file nor a PyTorch zip checkpoint",
        ),
        (
            "zip-without-directory.ckpt",
            b"PK\x03\x04",
            "not a readable",
        ),
    ];
    for (name, head, says) in heads {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(4 << 30).unwrap(); // sparse: 4 GiB that take no disk
        (&f).write_all(head).unwrap();
        drop(f);
        let ((format, open), rss, took) = measure(|| {
            (
                detect_format(&path).map_err(|e| e.to_string()),
                open_and_read(&path),
            )
        });
        let msg = open.unwrap_err();
        assert!(msg.contains(says), "{msg}");
        if !name.starts_with("zip") {
            assert!(format.unwrap_err().contains(says));
        }
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
        if let Some(kb) = rss {
            assert!(kb < 16 << 10, "{name}: peak RSS grew {kb} KiB");
        }
        println!("{name} (4 GiB): {took:?}, peak RSS +{rss:?} KiB: {msg}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A seeded mix of hostile archives: hostile views, damaged and truncated pickles, lying zip
/// sizes, deflated or stored storages. Each is an error or a checkpoint whose tensors all read,
/// in bounded time and memory.
#[test]
fn seeded_hostile_archives() {
    let _one = serial();
    let dir = tmp_dir("mix");
    let path = dir.join("case.ckpt");
    let ints = [
        0i64,
        1,
        2,
        3,
        16,
        -1,
        1 << 20,
        1 << 31,
        1 << 40,
        1 << 62,
        i64::MAX,
        i64::MIN,
    ];
    let mut rng = Rng::new(0x0155_0010);
    let cases = 400;
    let (mut ok, mut refused) = (0, 0);
    let mut worst_rss = 0;
    let mut worst_time = Duration::ZERO;
    for case in 0..cases {
        let n = 1 + rng.below(4);
        let mut tensors = Vec::new();
        for i in 0..n {
            let dims = rng.below(5);
            let mut pick = || {
                if rng.below(3) == 0 {
                    ints[rng.below(ints.len())]
                } else {
                    rng.below(20) as i64
                }
            };
            let size: Vec<i64> = (0..dims).map(|_| pick()).collect();
            let mut stride: Vec<i64> = (0..dims).map(|_| pick()).collect();
            let offset = pick();
            if rng.below(2) == 0 {
                // Contiguous, as most tensors are.
                let mut acc = 1i64;
                for d in (0..dims).rev() {
                    stride[d] = acc;
                    acc = acc.wrapping_mul(size[d].max(1));
                }
            }
            tensors.push((format!("t{i}"), format!("{}", i % 2), offset, size, stride));
        }
        let refs: Vec<(&str, &str, i64, Vec<i64>, Vec<i64>)> = tensors
            .iter()
            .map(|(a, b, o, s, st)| (a.as_str(), b.as_str(), *o, s.clone(), st.clone()))
            .collect();
        let mut pickle = Pickle::state_dict(&refs);
        match rng.below(4) {
            0 => pickle.truncate(rng.below(pickle.len())),
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(pickle.len());
                    pickle[at] = rng.next_u64() as u8;
                }
            }
            _ => {}
        }
        let s0 = floats(rng.below(1 << 16));
        let s1 = floats(rng.below(1 << 10));
        let mut zip = archive(
            &pickle,
            &[("0", &s0, rng.below(2) == 0), ("1", &s1, rng.below(2) == 0)],
        );
        if rng.below(4) == 0 {
            // Lie about a size or checksum in the central directory.
            let records: Vec<usize> = (0..zip.len() - 4)
                .filter(|&p| zip[p..p + 4] == 0x0201_4b50u32.to_le_bytes())
                .collect();
            let rec = records[rng.below(records.len())];
            let field = [16, 20, 24][rng.below(3)];
            let v = [0u32, 1, 100, u32::MAX, rng.next_u64() as u32][rng.below(5)];
            if rec + field + 4 <= zip.len() {
                zip[rec + field..rec + field + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        std::fs::write(&path, &zip).unwrap();
        let (r, rss, took) = measure(|| open_and_read(&path));
        match r {
            Ok(_) => ok += 1,
            Err(msg) => {
                assert!(msg.contains("case.ckpt"), "case {case}: {msg}");
                refused += 1;
            }
        }
        worst_time = worst_time.max(took);
        if let Some(kb) = rss {
            worst_rss = worst_rss.max(kb);
            assert!(kb < 64 << 10, "case {case}: peak RSS grew {kb} KiB");
        }
        assert!(took < Duration::from_secs(5), "case {case}: {took:?}");
    }
    println!(
        "{cases} hostile archives: {ok} read, {refused} refused; worst {worst_time:?}, \
         peak RSS +{worst_rss} KiB"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Truncations of the fixture's real `data.pkl` (a few thousand points across it), inside
/// the real archive: every one an error, none a panic.
#[test]
fn truncated_real_pickles() {
    let _one = serial();
    use std::io::Read;
    let src = std::fs::File::open(fixtures().join("single").join("tiny-sd1.ckpt")).unwrap();
    let mut z = zip::ZipArchive::new(src).unwrap();
    let mut entries = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        entries.push((f.name().to_string(), data));
    }
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let full = entries[pkl].1.clone();
    let dir = tmp_dir("truncated");
    let path = dir.join("cut.ckpt");
    let cuts: Vec<usize> = (0..full.len()).step_by(full.len() / 200).collect();
    for &cut in &cuts {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (i, (name, data)) in entries.iter().enumerate() {
            let opts = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            w.start_file(name.as_str(), opts).unwrap();
            w.write_all(if i == pkl { &full[..cut] } else { data })
                .unwrap();
        }
        std::fs::write(&path, w.finish().unwrap().into_inner()).unwrap();
        let msg = match Checkpoint::open(&path) {
            Ok(_) => panic!("cut at {cut} opened"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("pickle data at byte"), "{msg}");
    }
    println!(
        "{} truncations of a {}-byte data.pkl",
        cuts.len(),
        full.len()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Rewrites `src` with every tensor a view of one deflated storage per dtype (the layout of
/// some converters' output), returning the tensors' names.
fn views_of_one_storage(src: &Path, dst: &Path) -> Vec<String> {
    let c = Checkpoint::open(src).unwrap();
    let mut names: Vec<String> = c.names().map(str::to_string).collect();
    names.sort();
    let mut storages: Vec<(Kind, Vec<u8>)> = Vec::new();
    let mut p = Pickle::new();
    p.op(b"}(");
    for name in &names {
        let t = c.tensor(name).unwrap().contiguous();
        let kind = t.kind();
        let elt = kind.elt_size_in_bytes();
        let at = match storages.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                storages.push((kind, Vec::new()));
                storages.len() - 1
            }
        };
        let storage = &mut storages[at].1;
        let offset = (storage.len() / elt) as i64;
        let mut bytes = vec![0u8; t.numel() * elt];
        t.copy_data_u8(&mut bytes, t.numel());
        storage.extend(bytes);
        let size = t.size();
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        let kind_name = match kind {
            Kind::Half => "HalfStorage",
            Kind::Float => "FloatStorage",
            Kind::Int64 => "LongStorage",
            other => panic!("{other:?}"),
        };
        p.str(name)
            .tensor(&at.to_string(), kind_name, offset, &size, &stride);
    }
    p.op(b"u.");
    let keys: Vec<String> = (0..storages.len()).map(|i| i.to_string()).collect();
    let entries: Vec<(&str, &[u8], bool)> = storages
        .iter()
        .zip(&keys)
        .map(|((_, b), k)| (k.as_str(), b.as_slice(), true))
        .collect();
    std::fs::write(dst, archive(&p.b, &entries)).unwrap();
    names
}

/// A legitimate but rare layout: every tensor a view of one large deflated storage. Each
/// storage is decompressed once, not once per tensor: reading every tensor takes about as long
/// as the usual layout, and gives the same tensors.
#[test]
fn views_of_one_deflated_storage_load_fast() {
    let _one = serial();
    let dir = tmp_dir("views");
    // The fixture model, rewritten so, loaded by the pipeline and compared tensor by tensor.
    let src = fixtures().join("single").join("tiny-sd1.ckpt");
    let path = dir.join("one-storage.ckpt");
    let names = views_of_one_storage(&src, &path);
    let (a, b) = (
        Checkpoint::open(&src).unwrap(),
        Checkpoint::open(&path).unwrap(),
    );
    let t = Instant::now();
    for name in &names {
        assert!(
            a.tensor(name).unwrap().equal(&b.tensor(name).unwrap()),
            "{name}"
        );
    }
    println!(
        "tiny-sd1 as views of one deflated storage: {} tensors compared in {:?}",
        names.len(),
        t.elapsed()
    );
    drop((a, b));
    let t = Instant::now();
    StableDiffusion::load(&path, &LoadOptions::default()).unwrap();
    let load = t.elapsed();
    let t = Instant::now();
    StableDiffusion::load(&src, &LoadOptions::default()).unwrap();
    println!(
        "pipeline load: views of one storage {load:?}, the fixture as saved {:?}",
        t.elapsed()
    );

    // A bigger one: 1,000 tensors of 64 x 64 floats in one 16 MiB deflated storage.
    let n = 1000;
    let storage = floats(n * 4096);
    let tensors: Vec<(String, i64)> = (0..n)
        .map(|i| (format!("w.{i:04}"), (i * 4096) as i64))
        .collect();
    let refs: Vec<(&str, &str, i64, Vec<i64>, Vec<i64>)> = tensors
        .iter()
        .map(|(name, off)| (name.as_str(), "0", *off, vec![64, 64], vec![64, 1]))
        .collect();
    let path = dir.join("big-one-storage.ckpt");
    std::fs::write(
        &path,
        archive(&Pickle::state_dict(&refs), &[("0", &storage, true)]),
    )
    .unwrap();
    let ((), rss, took) = measure(|| {
        let c = Checkpoint::open(&path).unwrap();
        for (i, (name, _)) in tensors.iter().enumerate() {
            let t = c.tensor(name).unwrap();
            let first = t.double_value(&[0, 0]);
            let last = t.double_value(&[63, 63]);
            assert_eq!((first, last), ((i * 4096) as f64, (i * 4096 + 4095) as f64));
            c.release(name);
        }
    });
    println!("{n} views of one 16 MiB deflated storage read in {took:?}, peak RSS +{rss:?} KiB");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let _ = std::fs::remove_dir_all(dir);
}
