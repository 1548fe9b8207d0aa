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

    pub fn save_png(&self, path: &Path, text: &[(&str, &str)]) -> Result<()> {
        save_png(path, &self.rgb, self.width, self.height, text)
    }
}

/// Writes 8-bit RGB pixels as a PNG with `tEXt` chunks (e.g. A1111's `parameters`).
pub fn save_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(&str, &str)],
) -> Result<()> {
    if rgb.len() != (width as usize) * (height as usize) * 3 {
        return Err(Error::invalid(format!(
            "{} bytes are not a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let file = std::fs::File::create(path)
        .map_err(|e| Error::Image(format!("cannot write {}: {e}", path.display())))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| Error::Image(format!("{}: {e}", path.display()));
    for (key, value) in text {
        encoder
            .add_text_chunk(key.to_string(), value.to_string())
            .map_err(png_err)?;
    }
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(())
}

/// The text chunks of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    Ok(reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect())
}
