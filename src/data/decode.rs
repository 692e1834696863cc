//! One image file's bytes to upright 8-bit RGB: the format decided by
//! content, the header checked against a pixel limit before any pixel is
//! decoded, truncation caught, EXIF orientation applied, CMYK / 16-bit /
//! grayscale / palette converted and alpha composited on a background.
//! Every failure is a [`Rejection`]: what is wrong and what to do.
use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use sha2::{Digest, Sha256};

use crate::data::config::Background;

/// Why a file was not used, and what the user can do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Completes "FILE ...", e.g. "is empty (0 bytes)".
    pub reason: String,
    pub fix: String,
}

impl Rejection {
    pub fn new(reason: impl Into<String>, fix: impl Into<String>) -> Self {
        Rejection { reason: reason.into(), fix: fix.into() }
    }
}

/// What the header says, before decoding pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub format: ImageFormat,
    /// Upright size (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    /// A GIF or WebP with more than one frame (the first is used).
    pub animated: bool,
    /// The decoder's own buffer for the stored pixels, in bytes.
    pub stored_bytes: u64,
    pub has_alpha: bool,
}

impl Header {
    /// The bytes decoding this image to upright 8-bit RGB peaks at, known
    /// before any pixel is decoded: the decoder's buffer, a turned copy when
    /// EXIF orientation applies, and the RGB result (through a float RGBA
    /// copy when alpha is composited).
    pub fn decode_bytes(&self) -> u64 {
        let pixels = self.width as u64 * self.height as u64;
        let turned = if self.orientation == Orientation::NoTransforms { 0 } else { self.stored_bytes };
        let rgb = pixels.saturating_mul(if self.has_alpha { 16 + 3 } else { 3 });
        self.stored_bytes.saturating_add(turned).saturating_add(rgb)
    }
}

/// The formats sdtune reads.
pub const FORMATS: &[ImageFormat] =
    &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::Gif];

pub fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Gif => "GIF",
        _ => "image",
    }
}

/// The file-name extensions usual for `format` (lower case).
pub fn extensions(format: ImageFormat) -> &'static [&'static str] {
    match format {
        ImageFormat::Jpeg => &["jpg", "jpeg", "jpe", "jfif"],
        ImageFormat::Png => &["png"],
        ImageFormat::WebP => &["webp"],
        ImageFormat::Bmp => &["bmp", "dib"],
        ImageFormat::Tiff => &["tif", "tiff"],
        ImageFormat::Gif => &["gif"],
        _ => &[],
    }
}

/// Whether a lower-case extension names an image format (any sdtune reads or not).
pub fn is_image_extension(ext: &str) -> bool {
    FORMATS.iter().any(|f| extensions(*f).contains(&ext))
        || ["heic", "heif", "avif", "jxl", "ico", "tga", "psd", "raw", "cr2", "nef", "arw", "dng"].contains(&ext)
}

/// Hex SHA-256 of the file's bytes: its identity in the cache.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The format by magic bytes, when it is one sdtune reads.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    image::guess_format(bytes).ok().filter(|f| FORMATS.contains(f))
}

/// Reads the header: format by content, size, orientation, the pixel limit.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<Header, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new("is empty (0 bytes)", "copy the file again, or delete it"));
    }
    let Some(format) = sniff(bytes) else {
        let what = if looks_like_text(bytes) {
            "it holds text"
        } else {
            "its content is none of JPEG, PNG, WebP, BMP, TIFF or GIF"
        };
        return Err(Rejection::new(
            format!("is not an image ({what})"),
            "remove it from the image folder, or convert it to PNG or JPEG",
        ));
    };
    let name = format_name(format);
    let mut decoder = reader(bytes, format, max_pixels).into_decoder().map_err(|e| {
        Rejection::new(format!("is a {name} whose header cannot be read ({e})"), "export or copy the image again")
    })?;
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, max_pixels)?;
    let stored_bytes = decoder.total_bytes();
    let has_alpha = decoder.color_type().has_alpha();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (width, height) = if swaps_sides(orientation) { (h, w) } else { (w, h) };
    if width == 0 || height == 0 {
        return Err(Rejection::new(format!("is a {name} of {w}×{h} pixels, which holds no image"), "export it again"));
    }
    let animated = match format {
        ImageFormat::Gif => gif_frame_count(bytes) > 1,
        ImageFormat::WebP => image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).is_ok_and(|d| d.has_animation()),
        _ => false,
    };
    Ok(Header { format, width, height, orientation, animated, stored_bytes, has_alpha })
}

/// Decodes to upright 8-bit RGB, alpha composited on `background`.
pub fn decode(bytes: &[u8], header: &Header, background: Background, max_pixels: u64) -> Result<RgbImage, Rejection> {
    let name = format_name(header.format);
    let corrupt = |detail: String| {
        Rejection::new(format!("is a corrupt or truncated {name} ({detail})"), "export or copy the image again")
    };
    if header.format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(Rejection::new(
            "is a truncated JPEG (its data ends before the end-of-image marker)",
            "export or copy the image again",
        ));
    }
    let decoder = reader(bytes, header.format, max_pixels).into_decoder().map_err(|e| corrupt(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(e.to_string()))?;
    image.apply_orientation(header.orientation);
    Ok(to_rgb8(image, background))
}

/// 8-bit RGB from any colour type; alpha is composited on `background`
/// (straight alpha, in the encoded sRGB values, as Pillow's `alpha_composite`).
pub fn to_rgb8(image: DynamicImage, background: Background) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba32f();
    let bg = background.0.map(|c| c as f32 / 255.0);
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = src.0[3].clamp(0.0, 1.0);
        for ((d, s), b) in dst.0.iter_mut().zip(src.0).zip(bg) {
            *d = ((s.clamp(0.0, 1.0) * a + b * (1.0 - a)) * 255.0).round() as u8;
        }
    }
    out
}

fn reader(bytes: &[u8], format: ImageFormat, max_pixels: u64) -> ImageReader<Cursor<&[u8]>> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // Room for the largest allowed image at 16-bit RGBA, plus decoder state.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(256 << 20));
    reader.limits(limits);
    reader
}

fn check_pixels(w: u32, h: u32, max_pixels: u64) -> Result<(), Rejection> {
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Rejection::new(
            format!(
                "claims {w}×{h} pixels ({:.0} megapixels), over the {:.0}-megapixel limit, so it was not decoded (a decompression bomb, or a huge scan)",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ),
            "shrink the image, or raise data.max_pixels in sdtune.yaml if it is genuine",
        ));
    }
    Ok(())
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(512)];
    std::str::from_utf8(head).is_ok_and(|s| s.chars().all(|c| !c.is_control() || c.is_whitespace()))
}

/// Whether a JPEG's marker structure reaches its end-of-image marker.
/// zune-jpeg fills a truncated scan with grey instead of failing, so the
/// structure is walked here: segments by their lengths, entropy-coded data
/// up to the next marker that is neither stuffing (FF00) nor a restart.
pub fn jpeg_is_complete(b: &[u8]) -> bool {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    loop {
        // Tolerate junk and fill bytes before a marker.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else { return false };
        i += 1;
        match marker {
            0xD9 => return true,
            0xD0..=0xD7 | 0x01 | 0x00 => {}
            _ => {
                let Some(len) = b.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize) else {
                    return false;
                };
                if len < 2 || i + len > b.len() {
                    return false;
                }
                i += len;
                if marker == 0xDA {
                    // Entropy-coded data runs to the next real marker.
                    loop {
                        let Some(off) = b[i..].iter().position(|&x| x == 0xFF) else { return false };
                        let j = i + off;
                        match b.get(j + 1) {
                            None => return false,
                            Some(0x00) | Some(0xD0..=0xD7) => i = j + 2,
                            Some(0xFF) => i = j + 1,
                            Some(_) => {
                                i = j;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Image descriptors in a GIF, counted up to 2 by walking its blocks.
pub fn gif_frame_count(b: &[u8]) -> usize {
    let table = |flags: u8| if flags & 0x80 != 0 { 3 << ((flags & 7) + 1) } else { 0 };
    let Some(&flags) = b.get(10) else { return 0 };
    let mut i = 13 + table(flags);
    let mut frames = 0;
    // Skips data sub-blocks starting at `i`; returns the index after the terminator.
    let skip_blocks = |mut i: usize| -> Option<usize> {
        loop {
            let n = *b.get(i)? as usize;
            i += 1 + n;
            if n == 0 {
                return Some(i);
            }
        }
    };
    while frames < 2 {
        match b.get(i) {
            Some(0x21) => match skip_blocks(i + 2) {
                Some(next) => i = next,
                None => break,
            },
            Some(0x2C) => {
                frames += 1;
                let Some(&flags) = b.get(i + 9) else { break };
                // Descriptor, local colour table, LZW minimum code size, data.
                match skip_blocks(i + 10 + table(flags) + 1) {
                    Some(next) => i = next,
                    None => break,
                }
            }
            _ => break,
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, Rgba, RgbaImage};

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Vec::new();
        image.write_to(&mut Cursor::new(&mut buf), format).unwrap();
        buf
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
    }

    #[test]
    fn truncated_jpeg_is_caught() {
        let bytes = encode(DynamicImage::ImageRgb8(gradient(80, 60)), ImageFormat::Jpeg);
        assert!(jpeg_is_complete(&bytes));
        for cut in [bytes.len() / 2, bytes.len() - 2, 200] {
            assert!(!jpeg_is_complete(&bytes[..cut]), "cut at {cut}");
        }
        let header = inspect(&bytes[..bytes.len() / 2], u64::MAX).unwrap();
        let err = decode(&bytes[..bytes.len() / 2], &header, Background::WHITE, u64::MAX).unwrap_err();
        assert!(err.reason.contains("truncated JPEG"), "{err:?}");
    }

    #[test]
    fn alpha_is_composited_on_the_background() {
        let img = RgbaImage::from_fn(4, 4, |x, _| if x < 2 { Rgba([255, 0, 0, 0]) } else { Rgba([0, 0, 255, 128]) });
        let out = to_rgb8(DynamicImage::ImageRgba8(img), Background::WHITE);
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(3, 0).0, [127, 127, 255]);
        let img = RgbaImage::from_fn(1, 1, |_, _| Rgba([0, 0, 0, 0]));
        assert_eq!(to_rgb8(DynamicImage::ImageRgba8(img), Background([10, 20, 30])).get_pixel(0, 0).0, [10, 20, 30]);
    }

    #[test]
    fn not_images_and_empty_files_are_rejected() {
        assert!(inspect(b"", 100).unwrap_err().reason.contains("empty"));
        assert!(inspect(b"hello, this is text\n", 100).unwrap_err().reason.contains("holds text"));
    }

    #[test]
    fn pixel_limit_applies_before_decoding() {
        let bytes = encode(DynamicImage::ImageRgb8(gradient(40, 30)), ImageFormat::Png);
        let err = inspect(&bytes, 1000).unwrap_err();
        assert!(err.reason.contains("40×30"), "{err:?}");
        assert!(inspect(&bytes, 1200).is_ok());
    }

    #[test]
    fn gif_frames_are_counted() {
        use image::codecs::gif::GifEncoder;
        use image::{Delay, Frame};
        let mut one = Vec::new();
        let frame = |c| {
            Frame::from_parts(
                RgbaImage::from_pixel(8, 8, Rgba([c, 0, 0, 255])),
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            )
        };
        GifEncoder::new(&mut one).encode_frames([frame(255)]).unwrap();
        let mut two = Vec::new();
        GifEncoder::new(&mut two).encode_frames([frame(255), frame(0)]).unwrap();
        assert_eq!(gif_frame_count(&one), 1);
        assert_eq!(gif_frame_count(&two), 2);
    }
}
