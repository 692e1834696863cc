//! Shared by the `prepare_*` tests: running the binary in a working
//! folder, small settings for the tiny model, and image files made here.
#![allow(dead_code)]
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sd1")
}

/// `sdtune prepare DATA` flags for the tiny model: 64 px, buckets 32..128 in steps of 16.
pub fn small_flags(data: &Path) -> Vec<String> {
    let mut flags =
        vec!["prepare".to_string(), data.display().to_string(), "--model".into(), tiny_model().display().to_string()];
    for f in [
        "--resolution",
        "64",
        "--min-bucket",
        "32",
        "--max-bucket",
        "128",
        "--bucket-step",
        "16",
        "--min-side",
        "32",
        "--device",
        "cpu",
    ] {
        flags.push(f.into());
    }
    flags
}

pub fn command(work: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.current_dir(work).args(args).env_remove("SDTUNE_TEST_SHARD_DELAY_MS");
    cmd
}

pub fn run(work: &Path, args: &[String]) -> Output {
    command(work, args).output().expect("the sdtune binary runs")
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Asserts a run exited 0 without a panic; returns stdout.
pub fn run_ok(work: &Path, args: &[String]) -> String {
    let out = run(work, args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "sdtune {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_no_panic(&stderr);
    stdout
}

pub fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "sdtune panicked:\n{stderr}");
}

pub fn report(work: &Path) -> serde_json::Value {
    let bytes = std::fs::read(work.join(".sdtune/prepare-report.json")).expect("prepare wrote its report");
    serde_json::from_slice(&bytes).unwrap()
}

pub fn count(report: &serde_json::Value, name: &str) -> u64 {
    report["counts"][name].as_u64().unwrap_or_else(|| panic!("no count {name}"))
}

/// A smooth, image-like RGB test picture that differs per `seed`.
pub fn picture(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let s = seed * 37;
        Rgb([
            (x * 255 / w.max(1) + s) as u8,
            (y * 255 / h.max(1) + 2 * s) as u8,
            ((x + y) * 128 / (w + h) + 3 * s) as u8,
        ])
    })
}

pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Vec::new();
    image.write_to(&mut Cursor::new(&mut buf), format).unwrap();
    buf
}

pub fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

pub fn write_picture(path: &Path, w: u32, h: u32, seed: u32, format: ImageFormat) {
    write(path, &encode(&DynamicImage::ImageRgb8(picture(w, h, seed)), format));
}

/// A JPEG with an EXIF APP1 segment carrying `orientation` (1-8).
pub fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
    let jpeg = encode(&DynamicImage::ImageRgb8(image.clone()), ImageFormat::Jpeg);
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // big-endian TIFF, IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A valid PNG header claiming `w`×`h` RGB pixels, with a few bytes of data.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A palette PNG whose left half is fully transparent (palette entry 0)
/// and right half opaque blue.
pub fn palette_png_with_transparency(w: u32, h: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 0, 255]);
        enc.set_trns(vec![0, 255]);
        let mut writer = enc.write_header().unwrap();
        let data: Vec<u8> = (0..h).flat_map(|_| (0..w).map(move |x| u8::from(x >= w / 2))).collect();
        writer.write_image_data(&data).unwrap();
    }
    buf
}

/// A 16-bit RGB PNG.
pub fn png16(w: u32, h: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
        Rgb([(x * 65535 / w) as u16, (y * 65535 / h) as u16, 30000])
    });
    encode(&DynamicImage::ImageRgb16(img), ImageFormat::Png)
}

/// An animated GIF: `frames` solid frames of different colours.
pub fn animated_gif(w: u32, h: u32, frames: u8) -> Vec<u8> {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, Rgba, RgbaImage};
    let mut buf = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut buf);
        let frames = (0..frames).map(|i| {
            let img = RgbaImage::from_fn(w, h, |x, _| Rgba([if x < w / 2 { 200 } else { 40 }, i * 60, 90, 255]));
            Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(100, 1))
        });
        enc.encode_frames(frames).unwrap();
    }
    buf
}
