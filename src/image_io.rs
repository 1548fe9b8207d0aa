//! PNG output with generation parameters, and image input for the editing modes.
use crate::{Error, Result};
use std::path::Path;

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
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
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
