//! `sdtune prepare` on a corpus of bad and awkward inputs: no panic, every
//! bad file reported with its reason, every good file cached, the
//! EXIF-rotated image cached upright.
use crate::prepare_support;

use std::collections::BTreeMap;
use std::path::Path;

use image::{DynamicImage, ImageFormat};
use prepare_support::*;
use sdtune::data::config::Background;
use sdtune::data::cache::CacheReader;
use sdtune::data::decode;

/// Builds the corpus under `d`; returns the files that must be cached.
fn build_corpus(d: &Path) -> Vec<&'static str> {
    // Good images, in every format and awkward naming.
    write_picture(&d.join("plain.png"), 96, 80, 1, ImageFormat::Png);
    write(&d.join("plain.txt"), b"a red product shot on a table");
    write(&d.join("copy of plain.png"), &std::fs::read(d.join("plain.png")).unwrap());
    write(&d.join("cmyk.jpg"), &std::fs::read(fixtures().join("images/cmyk.jpg")).unwrap());
    write(&d.join("cmyk.txt"), &[0xC3, 0x28, 0xFF, 0xFE, b'b', b'a', b'd']); // not UTF-8
    write(&d.join("deep.png"), &png16(80, 64));
    write(&d.join("palette alpha.png"), &palette_png_with_transparency(64, 64));
    // Stored landscape 96x64, EXIF orientation 6: upright it is portrait 64x96.
    let stored = picture(96, 64, 7);
    let rotated = jpeg_with_orientation(&stored, 6);
    write(&d.join("rotated.jpg"), &rotated);
    // The same decoded pixels turned upright by hand, as a PNG.
    let upright = image::load_from_memory_with_format(&rotated, ImageFormat::Jpeg).unwrap().rotate90();
    write(&d.join("reference/upright.png"), &encode(&upright, ImageFormat::Png));
    write_picture(&d.join("photo.webp"), 72, 72, 3, ImageFormat::WebP);
    write(&d.join("photo.txt"), b"   \n");
    write(&d.join("animated.gif"), &animated_gif(64, 64, 3));
    write_picture(&d.join("png inside.jpg"), 64, 96, 4, ImageFormat::Png);
    write_picture(&d.join("UPPER.JPG"), 100, 70, 5, ImageFormat::Jpeg);
    write(&d.join("UPPER.txt"), "word ".repeat(90).as_bytes());
    write_picture(&d.join("nested/deeper/ünïcödé naïve photo (1).PNG"), 64, 64, 6, ImageFormat::Png);
    write(
        &d.join("nested/metadata.jsonl"),
        "{\"file_name\": \"deeper/ünïcödé naïve photo (1).PNG\", \"text\": \"a café table, unicode ✓\"}\n".as_bytes(),
    );
    write_picture(&d.join("scan.tiff"), 64, 80, 8, ImageFormat::Tiff);
    write(&d.join("grey.bmp"), &encode(&DynamicImage::ImageRgb8(picture(70, 64, 9)), ImageFormat::Bmp));
    write(
        &d.join("gray.png"),
        &encode(&DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(picture(64, 64, 10)).to_luma8()), ImageFormat::Png),
    );

    // Bad files.
    write(&d.join("empty.jpg"), b"");
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(96, 96, 11)), ImageFormat::Jpeg);
    write(&d.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]);
    write(&d.join("notes.png"), b"these are my notes, not a picture\n");
    write(&d.join("bomb.png"), &png_claiming(100_000, 100_000));
    write_picture(&d.join("tiny.png"), 20, 20, 12, ImageFormat::Png);
    write(&d.join("orphan.txt"), b"no image has this name");

    // Hidden files and a symlink loop.
    write(&d.join(".hidden.jpg"), &jpeg);
    write(&d.join(".DS_Store"), b"\0\0\0\x01Bud1");
    #[cfg(unix)]
    std::os::unix::fs::symlink("..", d.join("nested/deeper/loop")).unwrap();

    vec![
        "plain.png",
        "cmyk.jpg",
        "deep.png",
        "palette alpha.png",
        "rotated.jpg",
        "reference/upright.png",
        "photo.webp",
        "animated.gif",
        "png inside.jpg",
        "UPPER.JPG",
        "nested/deeper/ünïcödé naïve photo (1).PNG",
        "scan.tiff",
        "grey.bmp",
        "gray.png",
    ]
}

fn find<'a>(list: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    list.as_array().unwrap().iter().find(|e| e["path"] == path)
}

#[test]
fn bad_inputs_are_reported_and_good_ones_cached() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    let data = work.join("brand photos");
    let good = build_corpus(&data);
    let mut flags = small_flags(Path::new("brand photos"));
    flags.extend(["--trigger".into(), "brandx".into(), "--batch-size".into(), "3".into()]);
    let stdout = run_ok(work, &flags);
    let report = report(work);
    eprintln!("{stdout}");

    // Every bad file is skipped with its reason.
    let skipped = &report["skipped"];
    let expect_skip = [
        ("empty.jpg", "is empty"),
        ("truncated.jpg", "truncated JPEG"),
        ("notes.png", "is not an image"),
        ("bomb.png", "100000×100000"),
        ("tiny.png", "under the 32-pixel minimum"),
        ("copy of plain.png", "exact duplicate of plain.png"),
    ];
    for (path, reason) in expect_skip {
        let entry = find(skipped, path).unwrap_or_else(|| panic!("{path} not reported as skipped: {skipped:#}"));
        let text = entry["reason"].as_str().unwrap();
        assert!(text.contains(reason), "{path}: reason {text:?} lacks {reason:?}");
        assert!(!entry["fix"].as_str().unwrap().is_empty(), "{path} has no fix");
        assert!(stdout.contains(path), "the table does not name {path}");
    }
    assert_eq!(skipped.as_array().unwrap().len(), expect_skip.len(), "unexpected skips: {skipped:#}");
    assert_eq!(count(&report, "duplicates"), 1);

    // Caption problems and notes are reported against the right file.
    let warnings = &report["warnings"];
    let expect_warn = [
        ("cmyk.txt", "caption_not_utf8"),
        ("photo.txt", "empty_caption"),
        ("UPPER.JPG", "long_caption"),
        ("animated.gif", "animated"),
        ("png inside.jpg", "extension"),
        ("orphan.txt", "orphan_caption"),
        ("deep.png", "no_caption"),
    ];
    for (path, kind) in expect_warn {
        let found = warnings.as_array().unwrap().iter().any(|w| w["path"] == path && w["kind"] == kind);
        assert!(found, "no {kind} warning for {path}: {warnings:#}");
    }
    // Hidden files and the symlink loop are left out, and say so.
    let ignored = &report["ignored"];
    assert!(find(ignored, ".hidden.jpg").is_some(), "{ignored:#}");
    #[cfg(unix)]
    assert!(find(ignored, "nested/deeper/loop").unwrap()["reason"].as_str().unwrap().contains("loop"));

    // Every good file is cached, with its caption.
    let cache = CacheReader::open(work).unwrap_or_else(|e| panic!("{e:#}"));
    let items: BTreeMap<&str, &sdtune::data::cache::Item> =
        cache.dataset().items.iter().map(|i| (i.path.as_str(), i)).collect();
    for path in &good {
        let item = items.get(path).unwrap_or_else(|| panic!("{path} is not in the cache: {:?}", items.keys()));
        let (mean, std) = cache.latent(&item.latent).unwrap();
        let (bw, bh) = (item.bucket.width as i64, item.bucket.height as i64);
        assert_eq!(mean.size(), [4, bh / 8, bw / 8], "{path}");
        assert_eq!(std.size(), mean.size());
        assert!(mean.isfinite().all().int64_value(&[]) == 1, "{path} latent is not finite");
        assert_eq!(cache.text(&item.text).unwrap().size(), [77, 32]);
    }
    assert_eq!(items.len(), good.len(), "cached: {:?}", items.keys());
    assert_eq!(count(&report, "usable") as usize, good.len());
    assert_eq!(items["plain.png"].caption, "brandx, a red product shot on a table");
    assert_eq!(items["nested/deeper/ünïcödé naïve photo (1).PNG"].caption, "brandx, a café table, unicode ✓");
    assert_eq!(items["cmyk.jpg"].caption, "brandx");
    assert_eq!(cache.empty_caption().unwrap().size(), [77, 32]);

    // The EXIF-rotated JPEG is cached upright: portrait, and the same latent
    // as the hand-rotated copy of its pixels.
    let rotated = items["rotated.jpg"];
    assert_eq!((rotated.width, rotated.height), (64, 96));
    assert!(rotated.bucket.height > rotated.bucket.width, "{:?}", rotated.bucket);
    let upright = items["reference/upright.png"];
    assert_eq!(rotated.bucket, upright.bucket);
    let (a, _) = cache.latent(&rotated.latent).unwrap();
    let (b, _) = cache.latent(&upright.latent).unwrap();
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "rotated and upright latents differ by {diff}");

    // A sdtune.yaml was written with the model, folder, trigger and prompts.
    let yaml = std::fs::read_to_string(work.join("sdtune.yaml")).unwrap();
    let config = sdtune::config::Config::parse(&yaml, Path::new("sdtune.yaml")).unwrap();
    assert_eq!(config.data.path.as_deref(), Some(Path::new("brand photos")));
    assert_eq!(config.data.trigger.as_deref(), Some("brandx"));
    assert_eq!(config.data.resolution, 64);
    assert!(!config.sample.prompts.is_empty());
    assert!(config.model.is_some());
}

#[test]
fn colour_types_become_upright_8_bit_rgb() {
    let bytes = std::fs::read(fixtures().join("images/cmyk.jpg")).unwrap();
    let rgb = decode_all(&bytes);
    assert_eq!(rgb.dimensions(), (64, 48));
    let near = |p: [u8; 3], q: [u8; 3]| p.iter().zip(q).all(|(a, b)| (*a as i32 - b as i32).abs() <= 8);
    assert!(near(rgb.get_pixel(4, 24).0, [255, 0, 0]), "CMYK red came out {:?}", rgb.get_pixel(4, 24));
    assert!(near(rgb.get_pixel(60, 24).0, [0, 0, 255]), "CMYK blue came out {:?}", rgb.get_pixel(60, 24));

    let rgb = decode_all(&palette_png_with_transparency(8, 4));
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255], "transparent pixels sit on white");
    assert_eq!(rgb.get_pixel(7, 0).0, [0, 0, 255]);

    let rgb = decode_all(&png16(64, 64));
    assert_eq!(rgb.get_pixel(63, 0).0[0], 251, "16-bit scaled to 8-bit"); // 63*65535/64 -> 64511 -> 251
    assert_eq!(rgb.get_pixel(0, 0).0[2], 117); // 30000 / 257 rounded

    let stored = picture(6, 4, 2);
    let rgb = decode_all(&jpeg_with_orientation(&stored, 6));
    assert_eq!(rgb.dimensions(), (4, 6), "orientation 6 turns 6x4 into 4x6");
}

fn decode_all(bytes: &[u8]) -> image::RgbImage {
    let header = decode::inspect(bytes, u64::MAX).unwrap();
    decode::decode(bytes, &header, Background::WHITE, u64::MAX).unwrap()
}

#[test]
fn missing_or_empty_folders_fail_in_one_sentence() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    for (dir, expected) in [("nowhere", "does not exist"), ("empty", "holds no image files")] {
        if dir == "empty" {
            std::fs::create_dir(work.join(dir)).unwrap();
        }
        let out = run(work, &small_flags(Path::new(dir)));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{dir}: exited 0");
        assert_no_panic(&stderr);
        assert!(stderr.contains(expected), "{dir}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{dir}: not one sentence: {stderr}");
    }
}

#[test]
fn a_folder_of_only_bad_files_exits_non_zero_with_the_reasons() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write(&work.join("bad/empty.png"), b"");
    write(&work.join("bad/readme.jpg"), b"hello");
    let out = run(work, &small_flags(Path::new("bad")));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    assert_no_panic(&stderr);
    assert!(stderr.contains("none of the 2 image files"), "{stderr}");
    assert!(stdout.contains("empty.png") && stdout.contains("readme.jpg"), "{stdout}");
    assert!(!work.join("sdtune.yaml").exists(), "no config is written for an unusable set");
}

#[test]
fn a_bad_config_names_the_file_and_line() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("imgs/a.png"), 64, 64, 1, ImageFormat::Png);
    write(&work.join("sdtune.yaml"), b"data:\n  resolution: 64\n  flipp: true\n");
    let out = run(work, &small_flags(Path::new("imgs")));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("sdtune.yaml line 3") && stderr.contains("flipp"), "{stderr}");
}

#[test]
fn no_model_anywhere_uses_the_built_in_one_and_says_so() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("imgs/a.png"), 64, 64, 1, ImageFormat::Png);
    let args = ["prepare".to_string(), "imgs".to_string(), "--device".to_string(), "cpu".to_string()];
    let out = command(work, &args).env("SDTUNE_CACHE_DIR", work.join("cache")).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("built-in tiny model")).count(), 1, "{stderr}");
    assert_eq!(count(&report(work), "usable"), 1, "the 64-px image fits the built-in model's 64-px buckets");
    let yaml = std::fs::read_to_string(work.join("sdtune.yaml")).unwrap();
    assert!(!yaml.contains("model:"), "the built-in model is not written into sdtune.yaml: {yaml}");

    // A cache folder that cannot be made: one sentence with the fixes.
    let blocker = work.join("a-file");
    write(&blocker, b"not a folder");
    let out = command(work, &args).env("SDTUNE_CACHE_DIR", blocker.join("cache")).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_no_panic(&stderr);
    assert!(stderr.contains("SDTUNE_CACHE_DIR") && stderr.contains("--model"), "{stderr}");
}

#[test]
fn the_model_comes_from_sdtune_yaml_and_the_config_is_not_an_image() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("a.png"), 64, 64, 1, ImageFormat::Png);
    write_picture(&work.join("b.jpg"), 64, 48, 2, ImageFormat::Jpeg);
    let yaml = format!(
        "model: {}\ndata:\n  resolution: 64\n  min_bucket: 32\n  max_bucket: 128\n  bucket_step: 16\n  min_side: 32\n",
        tiny_model().display()
    );
    write(&work.join("sdtune.yaml"), yaml.as_bytes());
    let stdout = run_ok(work, &["prepare".to_string(), ".".to_string(), "--device".to_string(), "cpu".to_string()]);
    let report = report(work);
    assert_eq!(count(&report, "usable"), 2, "{stdout}");
    assert_eq!(report["skipped"].as_array().unwrap().len(), 0, "{:#}", report["skipped"]);
    assert!(find(&report["ignored"], "sdtune.yaml").is_some(), "{:#}", report["ignored"]);
    assert_eq!(std::fs::read_to_string(work.join("sdtune.yaml")).unwrap(), yaml, "an existing config is left alone");
}
