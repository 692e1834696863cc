//! Decoded tensors to 8-bit RGB images and PNG files.
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// VAE output in about [-1, 1], [B, 3, H, W] -> one RGB8 buffer per image,
/// rounded as diffusers' `numpy_to_pil` does: round((x / 2 + 0.5).clamp(0, 1) * 255).
pub fn to_rgb8(decoded: &Tensor) -> Result<Vec<image::RgbImage>> {
    let images = (decoded.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0);
    let images = (images * 255.0).round().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous().to_device(tch::Device::Cpu);
    let (b, h, w) = (images.size()[0], images.size()[1], images.size()[2]);
    let mut out = Vec::with_capacity(b as usize);
    for i in 0..b {
        let one = images.get(i);
        let numel = one.numel();
        let mut bytes = vec![0u8; numel];
        one.f_copy_data_u8(&mut bytes, numel).context("cannot copy the image to memory")?;
        out.push(image::RgbImage::from_raw(w as u32, h as u32, bytes).context("decoded image has an unexpected size")?);
    }
    Ok(out)
}

/// Float [B, 3, H, W] in [0, 1] as diffusers' `output_type="np"` (before rounding).
pub fn to_unit_float(decoded: &Tensor) -> Tensor {
    (decoded.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// Writes a PNG atomically.
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// Writes an RGB PNG atomically with text chunks (see [`encode_png_with_text`]).
pub fn save_png_with_text(img: &image::RgbImage, path: &Path, texts: &[(String, String)]) -> Result<()> {
    let bytes = encode_png_with_text(img, texts).with_context(|| format!("cannot encode {}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// An RGB PNG's bytes with text chunks (keyword, text) before the image
/// data. Text that Latin-1 can hold goes in a tEXt chunk, other text in an
/// uncompressed iTXt chunk, as Pillow's `PngInfo.add_text` (and so A1111)
/// does. `sdtune sample` and `sdtune serve` both write through it, so the
/// same image and recipe give the same bytes.
pub fn encode_png_with_text(img: &image::RgbImage, texts: &[(String, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, img.width(), img.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, text) in texts {
            if text.chars().all(|c| (c as u32) <= 0xFF) {
                encoder.add_text_chunk(keyword.clone(), text.clone())?;
            } else {
                encoder.add_itxt_chunk(keyword.clone(), text.clone())?;
            }
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    Ok(bytes)
}

/// The text chunks (tEXt, zTXt, iTXt) of a PNG file as (keyword, text).
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let not_png = || format!("{} is not a readable PNG file", path.display());
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().with_context(not_png)?;
    // Text chunks may follow the image data; read through to the end.
    let mut buf = vec![0; reader.output_buffer_size().with_context(not_png)?];
    reader.next_frame(&mut buf).with_context(not_png)?;
    reader.finish().with_context(not_png)?;
    let info = reader.info();
    let mut texts: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for chunk in &info.compressed_latin1_text {
        let mut chunk = chunk.clone();
        if chunk.decompress_text().is_ok() {
            if let Ok(text) = chunk.get_text() {
                texts.push((chunk.keyword.clone(), text));
            }
        }
    }
    for chunk in &info.utf8_text {
        let mut chunk = chunk.clone();
        if chunk.decompress_text().is_ok() {
            if let Ok(text) = chunk.get_text() {
                texts.push((chunk.keyword.clone(), text));
            }
        }
    }
    Ok(texts)
}
