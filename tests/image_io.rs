//! PNG writing under hostile and unlucky text and file-system conditions: whatever the text
//! entries hold, the image is written and decodes to the same pixels, every entry not reported
//! reads back exactly, and a failed write leaves neither a truncated PNG nor a temporary file.
mod common;

use common::{Pick, Rng};
use stable_diffusion::image_io::{self, Image, TextWarning, MAX_PNG_TEXT_BYTES};
use std::path::{Path, PathBuf};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-image-io-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Which chunk type a text entry was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Text,
    Ztxt,
    Itxt,
}

/// The pixels (through the `image` crate, as users read them) and the text entries (through
/// the png crate's decoder, with its default limits).
fn read_back(path: &Path) -> (Vec<u8>, Vec<(Kind, String, String)>) {
    let pixels = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .into_raw();
    let file = std::fs::File::open(path).unwrap();
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let info = reader.info();
    let mut text = Vec::new();
    for c in &info.uncompressed_latin1_text {
        text.push((Kind::Text, c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        text.push((Kind::Ztxt, c.keyword.clone(), c.get_text().unwrap()));
    }
    for c in &info.utf8_text {
        let mut c = c.clone();
        c.decompress_text_with_limit(usize::MAX).unwrap();
        text.push((Kind::Itxt, c.keyword.clone(), c.get_text().unwrap()));
    }
    (pixels, text)
}

/// The PNG rule for keywords, written out independently of the library's own check.
fn keyword_ok(key: &str) -> bool {
    let n = key.chars().count();
    (1..=79).contains(&n)
        && key
            .chars()
            .all(|c| (32..=126).contains(&(c as u32)) || (161..=255).contains(&(c as u32)))
        && !key.starts_with(' ')
        && !key.ends_with(' ')
        && !key.contains("  ")
}

fn latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) <= 0xFF)
}

const GOOD_KEYS: &[&str] = &[
    "parameters",
    "Comment",
    "Description",
    "prompt",
    "Software",
    "a b c",
    "café",
    "Größe ÿ",
    "x",
    "key-with_punct.{1}",
];

const BAD_KEYS: &[&str] = &[
    "",
    " leading",
    "trailing ",
    "double  space",
    "ключ",
    "プロンプト",
    "nul\0key",
    "tab\tkey",
    "del\x7fkey",
    "nbsp\u{a0}key",
    "c1\u{85}key",
    "emoji🎨",
    "e\u{301}",
    " ",
];

const PIECES: &[&str] = &[
    "a red circle",
    "masterpiece, best quality",
    "Steps: 20, Sampler: Euler a, CFG scale: 7",
    "café crème, naïve, ñ, ß, ÿ, ©, ½",
    "\u{85}\u{9f}\u{a0}",
    " — ",
    "赤い円",
    "猫と犬",
    "🎨",
    "👩\u{200d}👩\u{200d}👧",
    "🇯🇵",
    "e\u{301}\u{302}",
    "\u{fe0f}",
    "\t",
    "\n",
    "\r\n",
    "\x01\x1b[31m",
    "\0",
    "",
    " ",
    "\u{feff}",
    "\u{10ffff}",
    "\u{ffff}",
];

/// A value of 0 to 12 random pieces, now and then a long repetition.
fn random_value(rng: &mut Rng) -> String {
    let mut v = String::new();
    for _ in 0..rng.below(13) {
        v.push_str(*rng.pick(PIECES));
    }
    if rng.below(25) == 0 {
        let piece = *rng.pick(PIECES);
        v.push_str(&piece.repeat(1 + rng.below(20_000)));
    }
    v
}

fn random_key(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => (*rng.pick(BAD_KEYS)).to_string(),
        1 => "k".repeat(75 + rng.below(10)),
        2 => {
            // A random keyword from printable Latin-1 and the odd non-Latin-1 character.
            let alphabet = ['a', 'Z', '0', ' ', '-', 'é', 'ÿ', '¡', '~', '\u{a0}', '字'];
            (0..rng.below(8))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect()
        }
        _ => (*rng.pick(GOOD_KEYS)).to_string(),
    }
}

#[test]
fn random_text_entries_never_cost_the_image_and_read_back() {
    let dir = scratch("random");
    let mut rng = Rng::new(0x5EED_1234_ABCD_0001);
    let (mut entries_total, mut skipped, mut cleaned) = (0, 0, 0);
    let cases = 400;
    for case in 0..cases {
        let (w, h) = (1 + rng.below(9) as u32, 1 + rng.below(9) as u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|_| rng.next_u64() as u8).collect();
        let owned: Vec<(String, String)> = (0..rng.below(5))
            .map(|_| (random_key(&mut rng), random_value(&mut rng)))
            .collect();
        let text: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // A few names in turn, so that most cases replace an earlier image.
        let path = dir.join(format!("out-{}.png", case % 4));
        let warnings = image_io::write_png(&path, &rgb, w, h, &text)
            .unwrap_or_else(|e| panic!("case {case} {text:?}: {e}"));

        // What the PNG format allows, decided here and not by the library: a bad keyword
        // skips the entry, NULs are dropped from the value, anything else is stored as is.
        let mut expected_warnings = Vec::new();
        let mut expected = Vec::new();
        for (k, v) in &owned {
            entries_total += 1;
            if !keyword_ok(k) {
                expected_warnings.push((k.clone(), None));
                skipped += 1;
                continue;
            }
            let stored = v.replace('\0', "");
            assert!(stored.len() <= MAX_PNG_TEXT_BYTES);
            if stored != *v {
                expected_warnings.push((k.clone(), Some(stored.clone())));
                cleaned += 1;
            }
            let kind = if latin1(&stored) {
                Kind::Text
            } else {
                Kind::Itxt
            };
            expected.push((kind, k.clone(), stored));
        }
        let got_warnings: Vec<(String, Option<String>)> = warnings
            .iter()
            .map(|w: &TextWarning| (w.key.clone(), w.written.clone()))
            .collect();
        assert_eq!(got_warnings, expected_warnings, "case {case}: {warnings:?}");
        for w in &warnings {
            assert!(!w.message.is_empty() && w.to_string().contains(&format!("{:?}", w.key)));
        }

        let (pixels, mut read) = read_back(&path);
        assert_eq!(pixels, rgb, "case {case}: pixels");
        read.sort();
        expected.sort();
        assert_eq!(read, expected, "case {case}: text read back");
        assert_eq!(
            listing(&dir).iter().filter(|n| n.starts_with('.')).count(),
            0,
            "case {case}: a temporary file was left behind"
        );
    }
    eprintln!(
        "{cases} cases, {entries_total} entries: {skipped} skipped for their keyword, \
         {cleaned} with NULs dropped"
    );
    // The generator must actually reach every branch.
    assert!(skipped > 20 && cleaned > 20 && entries_total > 500);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_prompt_outside_latin1_goes_to_itxt_and_latin1_stays_in_text() {
    let dir = scratch("itxt");
    let path = dir.join("x.png");
    let prompt = "a red circle — 赤い円 🎨\nSteps: 2, Sampler: Euler";
    let img = Image::new(2, 1, vec![255, 0, 0, 0, 0, 255]).unwrap();
    let warnings = img
        .save_png(&path, &[("parameters", prompt), ("Software", "sd café")])
        .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let (pixels, mut text) = read_back(&path);
    assert_eq!(pixels, img.rgb);
    text.sort();
    assert_eq!(
        text,
        vec![
            (Kind::Text, "Software".into(), "sd café".into()),
            (Kind::Itxt, "parameters".into(), prompt.into()),
        ]
    );
    // The library's own reader sees both kinds.
    let mut ours = stable_diffusion::image_io::read_png_text(&path).unwrap();
    ours.sort();
    assert_eq!(
        ours,
        vec![
            ("Software".to_string(), "sd café".to_string()),
            ("parameters".to_string(), prompt.to_string()),
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn megabyte_values_are_stored_and_longer_ones_cut_at_a_character() {
    let dir = scratch("long");
    let path = dir.join("long.png");
    let ascii = "a".repeat(3 << 20);
    let cjk = "赤".repeat(1 << 20); // 3 MiB of UTF-8
                                    // 4 MiB is not a multiple of 3: the cut falls inside a character.
    let too_long = "赤".repeat((MAX_PNG_TEXT_BYTES / 3) + 10);
    let warnings = image_io::write_png(
        &path,
        &[1, 2, 3],
        1,
        1,
        &[("ascii", &ascii), ("cjk", &cjk), ("huge", &too_long)],
    )
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let cut = warnings[0].written.clone().unwrap();
    assert_eq!(warnings[0].key, "huge");
    assert!(cut.len() <= MAX_PNG_TEXT_BYTES && cut.len() > MAX_PNG_TEXT_BYTES - 4);
    assert!(too_long.starts_with(&cut));
    let (pixels, mut text) = read_back(&path);
    assert_eq!(pixels, vec![1, 2, 3]);
    text.sort();
    assert_eq!(
        text,
        vec![
            (Kind::Text, "ascii".into(), ascii),
            (Kind::Itxt, "cjk".into(), cjk),
            (Kind::Itxt, "huge".into(), cut),
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Asserts that `r` failed with a message naming `path`.
fn assert_fails_naming(r: stable_diffusion::Result<Vec<TextWarning>>, path: &Path) {
    match r {
        Ok(w) => panic!("writing {} succeeded: {w:?}", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "`{msg}` does not name {}",
                path.display()
            );
        }
    }
}

#[test]
fn a_destination_that_cannot_be_created_fails_naming_it_and_leaves_nothing() {
    let dir = scratch("unwritable");
    // Tests may run as root, which ignores permissions: a regular file as the parent fails
    // for everyone.
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, b"just a file").unwrap();
    let path = not_a_dir.join("x.png");
    assert_fails_naming(
        image_io::write_png(&path, &[0; 3], 1, 1, &[("k", "v")]),
        &path,
    );
    let missing = dir.join("no-such-dir").join("x.png");
    assert_fails_naming(
        image_io::write_png(&missing, &[0; 3], 1, 1, &[("k", "v")]),
        &missing,
    );
    assert_eq!(listing(&dir), vec!["file"]);
    assert_eq!(std::fs::read(&not_a_dir).unwrap(), b"just a file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_existing_destination_is_replaced_only_on_success() {
    let dir = scratch("replace");
    let path = dir.join("out.png");
    std::fs::write(&path, b"the old image").unwrap();

    // Fails inside the encoder (a zero width), after the temporary file exists.
    assert_fails_naming(image_io::write_png(&path, &[], 0, 1, &[]), &path);
    assert_eq!(std::fs::read(&path).unwrap(), b"the old image");
    assert_eq!(listing(&dir), vec!["out.png"]);

    // Fails before anything is written (wrong buffer size).
    assert_fails_naming(image_io::write_png(&path, &[0; 4], 1, 1, &[]), &path);
    assert_eq!(std::fs::read(&path).unwrap(), b"the old image");

    // Fails at the rename: the destination is a non-empty directory.
    let busy = dir.join("busy.png");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("inside"), b"kept").unwrap();
    assert_fails_naming(image_io::write_png(&busy, &[0; 3], 1, 1, &[]), &busy);
    assert_eq!(std::fs::read(busy.join("inside")).unwrap(), b"kept");
    assert_eq!(listing(&dir), vec!["busy.png", "out.png"]);

    // Succeeds: the old bytes are gone, the new image is complete.
    image_io::save_png(&path, &[9, 8, 7, 6, 5, 4], 2, 1, &[("parameters", "p")]).unwrap();
    let (pixels, text) = read_back(&path);
    assert_eq!(pixels, vec![9, 8, 7, 6, 5, 4]);
    assert_eq!(text, vec![(Kind::Text, "parameters".into(), "p".into())]);
    assert_eq!(listing(&dir), vec!["busy.png", "out.png"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
