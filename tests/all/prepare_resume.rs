//! Incremental and crash-safe prepare: a run killed with SIGKILL mid-encode
//! leaves a consistent cache, the next run encodes only what is missing,
//! an edited image is re-encoded alone and removed images are dropped.
use crate::prepare_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use image::ImageFormat;
use prepare_support::*;
use sdtune::data::cache::CacheReader;

const IMAGES: u32 = 24;

fn make_images(data: &Path) {
    for i in 0..IMAGES {
        // Three shapes so several buckets are in play.
        let (w, h) = [(64, 64), (96, 64), (64, 96)][(i % 3) as usize];
        write_picture(&data.join(format!("img_{i:02}.png")), w, h, i + 1, ImageFormat::Png);
    }
}

fn flags() -> Vec<String> {
    let mut f = small_flags(Path::new("data"));
    f.extend(["--batch-size".into(), "2".into()]);
    f
}

fn journal(work: &Path) -> PathBuf {
    work.join(".sdtune/cache/journal.jsonl")
}

/// Latent key -> shard, from the journal's whole lines (what a killed run recorded).
fn journaled(work: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(journal(work)).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let record: serde_json::Value = serde_json::from_str(line).expect("a whole journal line is valid JSON");
        if record["op"] == "latents" {
            let shard = record["shard"].as_str().unwrap().to_string();
            for key in record["entries"].as_object().unwrap().keys() {
                out.insert(key.clone(), shard.clone());
            }
        }
    }
    out
}

/// Latent key -> shard, from the manifest.
fn manifest_latents(work: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(work.join(".sdtune/cache/manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    manifest["latents"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["shard"].as_str().unwrap().to_string()))
        .collect()
}

/// Starts prepare slowed down after each shard and SIGKILLs it once its
/// journal records at least `at_least` latents not in `before`; returns
/// the latents it recorded. (A journal left by an earlier killed run holds
/// only keys in `before` until the new run folds it into the manifest.)
fn run_and_kill(work: &Path, before: &BTreeMap<String, String>, at_least: usize) -> BTreeMap<String, String> {
    let mut child = command(work, &flags())
        .env("SDTUNE_TEST_SHARD_DELAY_MS", "250")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let new = |work: &Path| -> BTreeMap<String, String> {
        journaled(work).into_iter().filter(|(k, _)| !before.contains_key(k)).collect()
    };
    loop {
        if new(work).len() >= at_least {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("prepare ended ({status}) before it could be killed mid-encode");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "prepare never recorded {at_least} latents");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    new(work)
}

/// What a killed run left must be consistent: every recorded entry's shard
/// exists and holds its tensors; training refuses the unfinished cache.
fn assert_consistent_after_kill(work: &Path, recorded: &BTreeMap<String, String>) {
    let shards = work.join(".sdtune/cache/shards");
    for (key, shard) in recorded {
        let file = sdtune::loaders::tensor_file::TensorFile::open(&shards.join(shard))
            .unwrap_or_else(|e| panic!("shard of {key} is unreadable: {e:#}"));
        assert!(file.info(&format!("{key}.mean")).is_some() && file.info(&format!("{key}.std")).is_some());
    }
    let err = CacheReader::open(work).err().expect("a killed run's cache is not complete");
    assert!(format!("{err:#}").contains("incomplete"), "{err:#}");
}

#[test]
fn killed_runs_resume_and_edits_re_encode_only_what_changed() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    make_images(&work.join("data"));

    // First run killed after a few shards.
    let first = run_and_kill(work, &BTreeMap::new(), 4);
    assert!(first.len() >= 4 && first.len() < IMAGES as usize, "recorded {} latents", first.len());
    assert_consistent_after_kill(work, &first);

    // Second run killed later: it must not redo the first run's latents.
    let second = run_and_kill(work, &first, 4);
    let after_second = journaled(work);
    for (key, shard) in &first {
        assert_eq!(after_second.get(key), None, "the second run encoded {key} again");
        assert_eq!(manifest_latents(work).get(key), Some(shard), "{key} lost its shard");
    }
    assert_consistent_after_kill(work, &second);
    let done_before = first.len() + second.len();
    assert!(done_before < IMAGES as usize, "the second run finished before it was killed");

    // The third run completes, encoding only the rest.
    run_ok(work, &flags());
    let r = report(work);
    assert_eq!(count(&r, "encoded") as usize, IMAGES as usize - done_before, "{:#}", r["counts"]);
    assert_eq!(count(&r, "reused") as usize, done_before);
    assert_eq!(count(&r, "usable"), IMAGES as u64);
    let cache = CacheReader::open(work).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(cache.dataset().items.len(), IMAGES as usize);
    for (i, item) in cache.dataset().items.iter().enumerate() {
        let (mean, _, text) = cache.item(i, false).unwrap();
        assert_eq!(mean.size()[0], 4, "{}", item.path);
        assert_eq!(text.size(), [77, 32]);
    }
    let final_latents = manifest_latents(work);
    for (key, shard) in first.iter().chain(&second) {
        assert_eq!(final_latents.get(key), Some(shard), "{key} was re-encoded or lost");
    }
    drop(cache);

    // Nothing changed: nothing is encoded.
    run_ok(work, &flags());
    let r = report(work);
    assert_eq!((count(&r, "encoded"), count(&r, "reused"), count(&r, "removed")), (0, IMAGES as u64, 0));
    assert_eq!(count(&r, "texts_encoded"), 0);

    // Editing one image re-encodes exactly that one and drops its old latent.
    write_picture(&work.join("data/img_05.png"), 64, 96, 500, ImageFormat::Png);
    run_ok(work, &flags());
    let r = report(work);
    assert_eq!((count(&r, "encoded"), count(&r, "reused"), count(&r, "removed")), (1, IMAGES as u64 - 1, 1));

    // Removing one drops it.
    std::fs::remove_file(work.join("data/img_07.png")).unwrap();
    run_ok(work, &flags());
    let r = report(work);
    assert_eq!((count(&r, "encoded"), count(&r, "removed"), count(&r, "usable")), (0, 1, IMAGES as u64 - 1));
    let cache = CacheReader::open(work).unwrap();
    assert!(cache.dataset().items.iter().all(|i| i.path != "img_07.png"));
    // No shard file is left that the manifest does not list.
    let listed: std::collections::BTreeSet<String> = manifest_latents(work).into_values().collect();
    let texts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join(".sdtune/cache/manifest.json")).unwrap()).unwrap();
    let text_shards: std::collections::BTreeSet<String> =
        texts["texts"].as_object().unwrap().values().map(|v| v["shard"].as_str().unwrap().to_string()).collect();
    for entry in std::fs::read_dir(work.join(".sdtune/cache/shards")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(listed.contains(&name) || text_shards.contains(&name), "stray shard {name}");
    }
}

#[test]
fn flip_caches_flipped_latents_and_settings_are_part_of_the_key() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    for i in 0..3 {
        write_picture(&work.join(format!("data/f{i}.png")), 64, 64, 40 + i, ImageFormat::Png);
    }
    let mut with_flip = small_flags(Path::new("data"));
    with_flip.push("--flip".into());
    run_ok(work, &with_flip);
    let r = report(work);
    assert_eq!(count(&r, "encoded"), 6);
    let cache = CacheReader::open(work).unwrap();
    assert!(cache.has_flips());
    let (plain, _, _) = cache.item(0, false).unwrap();
    let (flipped, _, _) = cache.item(0, true).unwrap();
    assert!((plain - flipped).abs().max().double_value(&[]) > 0.0, "the flipped latent equals the plain one");
    drop(cache);

    // The first run wrote sdtune.yaml with `flip: true`; a run without the
    // flag follows it and reuses everything.
    let yaml = std::fs::read_to_string(work.join("sdtune.yaml")).unwrap();
    assert!(yaml.contains("flip: true"), "{yaml}");
    run_ok(work, &small_flags(Path::new("data")));
    assert_eq!((count(&report(work), "encoded"), count(&report(work), "reused")), (0, 6));

    // With flip off the plain latents are reused and the flipped dropped.
    write(&work.join("sdtune.yaml"), yaml.replace("flip: true", "flip: false").as_bytes());
    run_ok(work, &small_flags(Path::new("data")));
    let r = report(work);
    assert_eq!((count(&r, "encoded"), count(&r, "reused"), count(&r, "removed")), (0, 3, 3));

    // A different background is a different key only where it matters:
    // these images are opaque, but the key still changes (settings are keyed, not guessed).
    let mut black = small_flags(Path::new("data"));
    black.extend(["--background".into(), "black".into()]);
    run_ok(work, &black);
    assert_eq!(count(&report(work), "encoded"), 3);
}
