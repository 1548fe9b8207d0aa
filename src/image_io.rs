//! PNG output with generation parameters, and image input for the editing modes.
use crate::{Error, Result};
use std::path::Path;

/// An 8-bit RGB image, rows top to bottom, no padding between rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Checks that `rgb` holds exactly `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || rgb.len() != (width as usize) * (height as usize) * 3 {
            return Err(Error::invalid(format!(
                "{} bytes are not a {width}x{height} RGB image",
                rgb.len()
            )));
        }
        Ok(Self { width, height, rgb })
    }

    /// Reads any PNG or JPEG file as RGB (alpha dropped).
    pub fn load(path: &Path) -> Result<Self> {
        let img =
            image::open(path).map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
        let rgb = img.to_rgb8();
        Self::new(rgb.width(), rgb.height(), rgb.into_raw())
    }

    /// Lanczos resampling to `width` x `height` (a copy when the size already matches).
    pub fn resized(&self, width: u32, height: u32) -> Result<Self> {
        if (width, height) == (self.width, self.height) {
            return Ok(self.clone());
        }
        let buf = image::RgbImage::from_raw(self.width, self.height, self.rgb.clone())
            .ok_or_else(|| Error::invalid("image buffer size does not match its dimensions"))?;
        let out =
            image::imageops::resize(&buf, width, height, image::imageops::FilterType::Lanczos3);
        Self::new(width, height, out.into_raw())
    }

    /// Writes the image as a PNG with `text` entries; see [`write_png`].
    pub fn save_png(&self, path: &Path, text: &[(&str, &str)]) -> Result<Vec<TextWarning>> {
        write_png(path, &self.rgb, self.width, self.height, text)
    }
}

/// The most bytes (UTF-8) of one text value we store: longer values are cut, with a warning.
/// 4 MiB is far above any prompt or parameters line, and small enough that readers with the
/// png crate's default 64 MiB decoding limit still open the file.
pub const MAX_PNG_TEXT_BYTES: usize = 4 << 20;

/// A text entry that was not stored exactly as given. The image is written regardless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextWarning {
    /// The key as the caller gave it.
    pub key: String,
    /// What was wrong and what was done about it, for a person to read.
    pub message: String,
    /// The value as stored, or `None` when the entry was skipped.
    pub written: Option<String>,
}

impl std::fmt::Display for TextWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "text entry {:?}: {}", self.key, self.message)
    }
}

/// Writes 8-bit RGB pixels as a PNG with text entries (e.g. A1111's `parameters`), dropping
/// any [`TextWarning`]s. Callers that show text problems to a user use [`write_png`].
pub fn save_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(&str, &str)],
) -> Result<()> {
    write_png(path, rgb, width, height, text).map(|_| ())
}

/// Writes 8-bit RGB pixels as a PNG with text entries and returns what could not be stored
/// as given. Metadata never costs the image: an entry with a bad keyword is skipped and a
/// value is cleaned (NULs dropped, cut at [`MAX_PNG_TEXT_BYTES`]), each with a warning.
/// Latin-1 values go in `tEXt` (what A1111 writes and its readers expect), others in `iTXt`.
///
/// The file is encoded next to `path` under a temporary name and renamed over it, so `path`
/// is either the complete new image or untouched, never truncated.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(&str, &str)],
) -> Result<Vec<TextWarning>> {
    let expected = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3));
    if expected != Some(rgb.len()) {
        return Err(Error::invalid(format!(
            "{} bytes are not a {width}x{height} RGB image (writing {})",
            rgb.len(),
            path.display()
        )));
    }
    let mut warnings = Vec::new();
    let chunks: Vec<TextChunk> = text
        .iter()
        .filter_map(|(key, value)| text_chunk(key, value, &mut warnings))
        .collect();
    let cannot =
        |e: &dyn std::fmt::Display| Error::Image(format!("cannot write {}: {e}", path.display()));

    let (mut temp, file) = TempFile::create(path).map_err(|e| cannot(&e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(&file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| cannot(&e))?;
    // After IHDR and before IDAT, in the caller's order: readers that stop at the pixels
    // (PIL's `Image.info` before `load()`) still see every entry.
    for chunk in &chunks {
        match chunk {
            TextChunk::Latin1(c) => writer.write_text_chunk(c),
            TextChunk::Utf8(c) => writer.write_text_chunk(c),
        }
        .map_err(|e| cannot(&e))?;
    }
    writer.write_image_data(rgb).map_err(|e| cannot(&e))?;
    // `finish` writes IEND and flushes the buffer into `file`.
    writer.finish().map_err(|e| cannot(&e))?;
    file.sync_all().map_err(|e| cannot(&e))?;
    drop(file);
    std::fs::rename(&temp.path, path).map_err(|e| cannot(&e))?;
    temp.renamed = true;
    Ok(warnings)
}

enum TextChunk {
    Latin1(png::text_metadata::TEXtChunk),
    Utf8(png::text_metadata::ITXtChunk),
}

/// The chunk for one entry, or `None` (with a warning) when its keyword cannot be stored.
/// Every chunk returned has been encoded once here, so that a rule of the format we
/// missed turns into a skipped entry rather than a failed image.
fn text_chunk(key: &str, value: &str, warnings: &mut Vec<TextWarning>) -> Option<TextChunk> {
    use png::text_metadata::{EncodableTextChunk, ITXtChunk, TEXtChunk};
    let mut warn = |message: String, written: Option<&str>| {
        warnings.push(TextWarning {
            key: key.to_string(),
            message,
            written: written.map(str::to_string),
        })
    };
    if let Err(why) = check_keyword(key) {
        warn(format!("skipped: {why}"), None);
        return None;
    }
    let mut notes = Vec::new();
    let mut value = std::borrow::Cow::Borrowed(value);
    if value.contains('\0') {
        let n = value.matches('\0').count();
        value = value.replace('\0', "").into();
        notes.push(format!(
            "{n} NUL character(s) removed (PNG text cannot hold them)"
        ));
    }
    if value.len() > MAX_PNG_TEXT_BYTES {
        let mut end = MAX_PNG_TEXT_BYTES;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        notes.push(format!(
            "cut from {} to {end} bytes (the limit is {MAX_PNG_TEXT_BYTES})",
            value.len()
        ));
        value = value[..end].to_string().into();
    }
    let chunk = if value.chars().all(|c| (c as u32) <= 0xFF) {
        TextChunk::Latin1(TEXtChunk::new(key, value.as_ref()))
    } else {
        TextChunk::Utf8(ITXtChunk::new(key, value.as_ref()))
    };
    let encoded = match &chunk {
        TextChunk::Latin1(c) => c.encode(&mut std::io::sink()),
        TextChunk::Utf8(c) => c.encode(&mut std::io::sink()),
    };
    if let Err(e) = encoded {
        warn(format!("skipped: {e}"), None);
        return None;
    }
    if !notes.is_empty() {
        warn(notes.join("; "), Some(&value));
    }
    Some(chunk)
}

/// PNG keywords: 1-79 printable Latin-1 characters (32-126, 161-255), no leading, trailing
/// or consecutive spaces (PNG spec, 11.3.4.2).
fn check_keyword(key: &str) -> std::result::Result<(), String> {
    let n = key.chars().count();
    if n == 0 || n > 79 {
        return Err(format!(
            "a PNG keyword has 1 to 79 characters, this one {n}"
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|&c| !matches!(c as u32, 32..=126 | 161..=255))
    {
        return Err(format!(
            "a PNG keyword holds printable Latin-1 only, not {:?}",
            c
        ));
    }
    if key.starts_with(' ') || key.ends_with(' ') || key.contains("  ") {
        return Err("a PNG keyword has no leading, trailing or double spaces".into());
    }
    Ok(())
}

/// The temporary file an image is encoded into, next to its destination (a rename is only
/// atomic within one file system). Removed on drop unless it was renamed into place.
struct TempFile {
    path: std::path::PathBuf,
    renamed: bool,
}

impl TempFile {
    fn create(dest: &Path) -> std::io::Result<(Self, std::fs::File)> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = dest.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name")
        })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut temp_name = std::ffi::OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(".tmp-{}-{n}", std::process::id()));
            let path = dir.join(temp_name);
            // `create_new`: never write through a file (or link) someone else left there.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let guard = Self {
                        path,
                        renamed: false,
                    };
                    return Ok((guard, file));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 100 => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The text chunks of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    // All three text chunk kinds: our own PNGs put non-Latin-1 text in iTXt, other tools
    // compress theirs. Compressed text is inflated up to MAX_PNG_TEXT_BYTES; a chunk that
    // cannot be read is skipped, not an error (the image is what matters).
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.compressed_latin1_text {
        let mut c = chunk.clone();
        if c.decompress_text_with_limit(MAX_PNG_TEXT_BYTES).is_ok() {
            if let Ok(t) = c.get_text() {
                text.push((c.keyword, t));
            }
        }
    }
    for chunk in &info.utf8_text {
        let mut c = chunk.clone();
        if c.decompress_text_with_limit(MAX_PNG_TEXT_BYTES).is_ok() {
            if let Ok(t) = c.get_text() {
                text.push((c.keyword, t));
            }
        }
    }
    Ok(text)
}
