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
