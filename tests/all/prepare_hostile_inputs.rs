//! `sdtune prepare` on inputs that used to lose data silently or abort:
//! names that are not UTF-8, a metadata.jsonl with bad lines, an image its
//! bucket crops to a sliver, and sizes whose allocation would fail. Each
//! costs only itself and is named in one line; nothing panics.
use crate::prepare_support;

use std::path::Path;

use image::ImageFormat;
use prepare_support::*;
use sdtune::data::cache::CacheReader;

fn warnings_of<'a>(report: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    report["warnings"].as_array().unwrap().iter().filter(|w| w["kind"] == kind).collect()
}

/// Flags for the tiny model with another resolution and bucket range.
fn flags_at(data: &str, extra: &[&str]) -> Vec<String> {
    let mut flags = vec!["prepare".to_string(), data.into(), "--model".into(), tiny_model().display().to_string()];
    flags.extend(["--min-side", "32", "--device", "cpu"].map(String::from));
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// An image, a caption and a folder whose names are not valid UTF-8 (as
/// a Latin-1 system writes "café"), under a data folder named so too: all
/// are read by their real names, the caption pairs with its image, and the
/// cached paths lead back to the files.
#[cfg(unix)]
#[test]
fn names_that_are_not_utf8_are_read_and_paired() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    let data = work.join(OsStr::from_bytes(b"fotos caf\xe9"));
    write_picture(&data.join(OsStr::from_bytes(b"caf\xe9 table.png")), 64, 64, 1, ImageFormat::Png);
    write(&data.join(OsStr::from_bytes(b"caf\xe9 table.txt")), b"a red chair at a cafe table");
    write_picture(&data.join(OsStr::from_bytes(b"r\xe9sum\xe9/shoe.jpg")), 64, 48, 2, ImageFormat::Jpeg);
    write_picture(&data.join("plain.png"), 64, 64, 3, ImageFormat::Png);
    write(&data.join(OsStr::from_bytes(b"stray \xff.txt")), b"no image has this name");
    // Two names that read alike once shown: the second is skipped with the fix, not lost silently.
    write_picture(&data.join(OsStr::from_bytes(b"twin \xfe.png")), 64, 64, 4, ImageFormat::Png);
    write_picture(&data.join(OsStr::from_bytes(b"twin \xff.png")), 64, 64, 5, ImageFormat::Png);

    let mut cmd = command(work, &[]);
    cmd.arg("prepare").arg(&data).args(&small_flags(Path::new("x"))[2..]);
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "prepare failed\n{stdout}\n{stderr}");
    assert_no_panic(&stderr);
    let report = report(work);
    let messages = format!("{:#}{:#}", report["skipped"], report["warnings"]);
    for said in [&stdout, &stderr, &messages] {
        for word in ["missing", "does not exist", "gone", "cannot be read"] {
            assert!(!said.contains(word), "a file that exists was called {word:?}:\n{said}");
        }
    }
    assert_eq!(count(&report, "usable"), 4, "{stdout}");
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert_eq!(skipped[0]["path"], "twin \u{fffd}.png");
    assert!(skipped[0]["fix"].as_str().unwrap().contains("rename"), "{:#}", skipped[0]);
    let lossy: Vec<_> = warnings_of(&report, "name_not_utf8").iter().map(|w| w["path"].as_str().unwrap()).collect();
    assert_eq!(lossy, ["caf\u{fffd} table.png", "r\u{fffd}sum\u{fffd}/shoe.jpg", "twin \u{fffd}.png"], "{:#}", report["warnings"]);
    assert!(stdout.contains("rename it"), "{stdout}");
    let orphans = warnings_of(&report, "orphan_caption");
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0]["path"], "stray \u{fffd}.txt");

    let cache = CacheReader::open(work).unwrap_or_else(|e| panic!("{e:#}"));
    let dataset = cache.dataset();
    let cafe = dataset.items.iter().find(|i| i.path == "caf\u{fffd} table.png").expect("the image is cached");
    assert_eq!(cafe.caption, "a red chair at a cafe table", "its sidecar pairs with it");
    // What reads the prepared images after training (the brand metric) finds them.
    let brand = sdtune::sample::metrics::Brand::from_prepared(work).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(brand.expect("prepared").images, 4);
    // YAML holds only UTF-8: the folder is left out of sdtune.yaml, in words.
    assert!(stdout.contains("does not record the image folder"), "{stdout}");
    let yaml = std::fs::read_to_string(work.join("sdtune.yaml")).unwrap();
    assert!(!yaml.contains("path:"), "{yaml}");

    // A kohya concept folder named so: its name, the default caption, is said to hold U+FFFD.
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("kohya").join(OsStr::from_bytes(b"3_caf\xe9")).join("a.png"), 64, 64, 1, ImageFormat::Png);
    let stdout = run_ok(work, &small_flags(Path::new("kohya")));
    let kohya = prepare_support::report(work);
    assert_eq!(count(&kohya, "usable"), 1, "{stdout}");
    let said: Vec<_> = warnings_of(&kohya, "name_not_utf8").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect();
    assert!(said.iter().any(|m| m.contains("concept folder 3_caf\u{fffd}/") && m.contains("rename the folder")), "{said:?}");
}

/// A metadata.jsonl opened by a byte-order mark, with a line that is not
/// UTF-8, one that is not JSON and one with no text: three warnings naming
/// the file and line, every other caption kept.
#[test]
fn a_bad_metadata_line_costs_only_that_line() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    let data = work.join("imgs");
    for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        write_picture(&data.join(format!("{name}.png")), 64, 64, i as u32 + 1, ImageFormat::Png);
    }
    let mut jsonl = "\u{feff}{\"file_name\": \"a.png\", \"text\": \"a red chair\"}\r\n".as_bytes().to_vec();
    jsonl.extend_from_slice(b"{\"file_name\": \"b.png\", \"text\": \"caf\xe9 table\"}\n");
    jsonl.extend_from_slice(b"{\"file_name\": \"c.png\", \"text\": \"unterminated}\n");
    jsonl.extend_from_slice(b"{\"file_name\": \"d.png\"}\n");
    jsonl.extend_from_slice(b"\n{\"file_name\": \"e.png\", \"text\": \"a blue lamp\"}\n");
    jsonl.extend_from_slice(b"{\"file_name\": \"f.png\", \"text\": \"no such image\"}\n");
    write(&data.join("metadata.jsonl"), &jsonl);
    let stdout = run_ok(work, &small_flags(Path::new("imgs")));
    let report = report(work);
    assert_eq!(count(&report, "usable"), 5);
    let lines: Vec<_> = warnings_of(&report, "metadata")
        .iter()
        .map(|w| {
            assert_eq!(w["path"], "metadata.jsonl", "{w:#}");
            w["message"].as_str().unwrap().split([' ', ':']).nth(1).unwrap().to_string()
        })
        .collect();
    assert_eq!(lines, ["2", "3", "4"], "{:#}", report["warnings"]);
    assert!(stdout.contains("metadata.jsonl: line 2 is not UTF-8"), "{stdout}");
    let cache = CacheReader::open(work).unwrap();
    let caption = |path: &str| cache.dataset().items.iter().find(|i| i.path == path).unwrap().caption.clone();
    assert_eq!(caption("a.png"), "a red chair", "the byte-order mark is not part of the first line");
    assert_eq!(caption("e.png"), "a blue lamp");
    assert_eq!(report["captions"]["metadata"], 2);
    // A line naming no image is not silently unused either.
    let orphans = warnings_of(&report, "orphan_caption");
    assert_eq!(orphans.len(), 1, "{:#}", report["warnings"]);
    assert!(orphans[0]["message"].as_str().unwrap().starts_with("line 7 gives a caption to \"f.png\""), "{:#}", orphans[0]);
}

/// A 6000×40 banner at 64 px (buckets up to 4:1) keeps 160×40 of itself:
/// one warning with its size, bucket and the share kept; it still trains.
/// An image whose bucket keeps most of it is not warned about.
#[test]
fn an_image_cropped_to_a_sliver_is_named() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("imgs/banner.png"), 6000, 40, 1, ImageFormat::Png);
    write_picture(&work.join("imgs/photo.png"), 96, 64, 2, ImageFormat::Png);
    let stdout = run_ok(work, &small_flags(Path::new("imgs")));
    let report = report(work);
    assert_eq!(count(&report, "usable"), 2);
    let cropped = warnings_of(&report, "cropped");
    assert_eq!(cropped.len(), 1, "{:#}", report["warnings"]);
    assert_eq!(cropped[0]["path"], "banner.png");
    let message = cropped[0]["message"].as_str().unwrap();
    for part in ["6000×40", "128×32", "2.7%", "160×40"] {
        assert!(message.contains(part), "{message:?} lacks {part}");
    }
    assert!(stdout.contains("banner.png: is 6000×40 pixels"), "the table shows it: {stdout}");
}

/// Sizes whose allocation would abort are refused or shrunk in words
/// first: a header claiming 2,000,000² pixels under a raised pixel limit,
/// a 4096-px bucket the free memory cannot encode, an encode batch that
/// does not fit, a resolution far past the limit.
#[test]
fn sizes_past_memory_are_refused_in_one_sentence() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write(&work.join("imgs/huge.png"), &png_claiming(2_000_000, 2_000_000));
    write_picture(&work.join("imgs/fine.png"), 64, 64, 1, ImageFormat::Png);
    let mut flags = small_flags(Path::new("imgs"));
    flags.extend(["--max-pixels".into(), "10000000000000".into()]);
    let stdout = run_ok(work, &flags);
    let first = report(work);
    assert_eq!(count(&first, "usable"), 1, "{stdout}");
    let skipped = &first["skipped"][0];
    assert_eq!(skipped["path"], "huge.png");
    let reason = skipped["reason"].as_str().unwrap();
    assert!(reason.contains("2000000×2000000") && reason.contains("GiB are free"), "{reason}");

    // One image of a 4096×4096 bucket needs ~6 GiB for the tiny VAE's encode in fp32.
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("imgs/a.png"), 64, 64, 1, ImageFormat::Png);
    let out = command(work, &flags_at("imgs", &["--resolution", "4096"]))
        .env("SDTUNE_TEST_AVAILABLE_MEMORY", (1u64 << 30).to_string())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_no_panic(&stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "not one sentence: {stderr}");
    assert!(stderr.contains("4096×4096 bucket") && stderr.contains("--resolution"), "{stderr}");

    // Three 64×64 images, batch 4: 1.5 MiB each, 3 MiB free -> 2 at a time.
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    for i in 0..3 {
        write_picture(&work.join(format!("imgs/{i}.png")), 64, 64, i + 1, ImageFormat::Png);
    }
    let mut flags = small_flags(Path::new("imgs"));
    flags.extend(["--batch-size".into(), "4".into()]);
    let out = command(work, &flags).env("SDTUNE_TEST_AVAILABLE_MEMORY", (3u64 << 20).to_string()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lowered_run = report(work);
    assert_eq!(count(&lowered_run, "usable"), 3);
    let lowered = warnings_of(&lowered_run, "encode_batch");
    assert_eq!(lowered.len(), 1, "{:#}", lowered_run["warnings"]);
    assert!(lowered[0]["message"].as_str().unwrap().contains("so 2 at a time"), "{:#}", lowered[0]);

    // A file larger than the free memory is not read: 6.4 MiB of BMP, 6 MiB free.
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("imgs/a.png"), 64, 64, 1, ImageFormat::Png);
    write_picture(&work.join("imgs/big.bmp"), 1500, 1500, 2, ImageFormat::Bmp);
    let mut flags = small_flags(Path::new("imgs"));
    flags.extend(["--max-pixels".into(), "10000000".into()]);
    let out = command(work, &flags).env("SDTUNE_TEST_AVAILABLE_MEMORY", (6u64 << 20).to_string()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unread = report(work);
    assert_eq!(count(&unread, "usable"), 1);
    assert_eq!(unread["skipped"][0]["path"], "big.bmp");
    let reason = unread["skipped"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("6.4 MiB file") && reason.contains("6.0 MiB of free memory"), "{reason}");
    assert!(warnings_of(&unread, "encode_batch").is_empty(), "one image needs no smaller batch");

    for resolution in ["100000", "4294967295"] {
        let out = run(work, &flags_at("imgs", &["--resolution", resolution]));
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert_no_panic(&stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "not one sentence: {stderr}");
        assert!(stderr.contains(&format!("resolution is {resolution} pixels")), "{stderr}");
    }
}
