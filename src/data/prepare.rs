//! `sdtune prepare` end to end: scan, check every file, caption, bucket,
//! then encode only what the cache lacks, one shard at a time.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use tch::Device;

use super::buckets::{crop_and_resize, crop_for, kept_fraction, resize_bytes, Bucket, Buckets, Crop, CROP_WARNING_KEPT};
use super::cache::{CacheWriter, Dataset, Item, LatentEntry, NewLatent, CACHE_DIR};
use super::captions::{Caption, Captions, Issue, Source};
use super::class_set;
use super::concepts::{self, Defaults, Layout};
use super::decode::{self, content_hash, format_name, Header, Rejection};
use super::encode::Encoders;
use crate::loaders::model_files::ModelFiles;
use crate::loaders::source::LoadOptions;
use super::keys::{latent_key, text_key, FileHashes, LatentSettings, TextSettings};
use super::report::{self, Report};
use super::scan::{Found, SAME_SHOWN_NAME, SAME_SHOWN_NAME_FIX};
use crate::data::config::DataConfig;
use crate::models::tokenizer::MAX_TOKENS;
use crate::runtime::{available_memory, bytes, Precision};

/// The report's file inside the working folder.
pub const REPORT_FILE: &str = ".sdtune/prepare-report.json";

/// Test hook: milliseconds to sleep after each latent shard is recorded, so
/// a test can kill a run mid-encode without racing it. Not for users.
const SHARD_DELAY_ENV: &str = "SDTUNE_TEST_SHARD_DELAY_MS";

/// Caption embeddings per text-encoder batch.
const TEXT_BATCH: usize = 16;

pub struct Options {
    /// The image folder.
    pub data_dir: PathBuf,
    /// The working folder (holds `.sdtune/`).
    pub work_dir: PathBuf,
    /// The run's own config file, never taken for an image when the working
    /// folder is prepared itself.
    pub config_file: PathBuf,
    /// The `--model` value: a diffusers folder, a single-file checkpoint or a Hub id.
    pub model_dir: PathBuf,
    /// The `--vae` value: a VAE to encode with instead of the model's.
    pub vae: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
    /// Settings after command-line flags were applied.
    pub data: DataConfig,
    pub clip_skip: usize,
}

pub struct Prepared {
    pub report: Report,
    /// Distinct captions of usable images, for sample prompts.
    pub captions: Vec<String>,
    /// The first caption of each training concept that has images (empty
    /// for a flat folder): a sample prompt per concept.
    pub concept_prompts: Vec<String>,
}

/// A file that passed the header checks.
struct Candidate {
    found: Found,
    concept: Option<usize>,
    hash: String,
    header: Header,
}

/// A usable image and everything its cache entries depend on.
struct Planned {
    found: Found,
    /// Index into the layout's concepts (`None`: a flat folder).
    concept: Option<usize>,
    hash: String,
    header: Header,
    bucket: Bucket,
    crop: Crop,
    /// Bytes decoding and resizing it peaks at.
    decode_need: u64,
    caption: String,
    source: Source,
    /// Warnings about this image, reported only if it ends up used.
    notes: Vec<Note>,
    latent: String,
    flipped: Option<String>,
    text: String,
    alive: bool,
}

/// A warning held back until the image is known to be used.
struct Note {
    path: String,
    kind: &'static str,
    message: String,
}

impl Note {
    fn on(path: &str, kind: &'static str, message: String) -> Self {
        Note { path: path.to_string(), kind, message }
    }
}

/// Runs prepare; errs only when nothing can be done at all (no folder, no
/// files, no model). A set with no usable image still gets its report.
pub fn run(opts: &Options) -> Result<Prepared> {
    let started = Instant::now();
    let cfg = &opts.data;
    cfg.validate()?;
    let mut report = Report {
        data_dir: opts.data_dir.display().to_string(),
        model: opts.model_dir.display().to_string(),
        resolution: cfg.resolution,
        device: match opts.device {
            Device::Cuda(n) => format!("cuda:{n}"),
            other => format!("{other:?}").to_lowercase(),
        },
        precision: opts.precision.name().into(),
        ..Default::default()
    };

    // 1. Scan: a flat folder, a kohya tree or the configured concepts.
    let scanning = spinner("scanning");
    let mut scanned = scan_layout(opts, &mut |n| scanning.set_message(format!("{n} files")))?;
    scanning.finish_and_clear();
    if !cfg.concepts.is_empty() {
        report.data_dir = scanned.concepts.iter().map(|c| c.path.as_str()).collect::<Vec<_>>().join(", ");
    }
    // Preparing the working folder itself: its own config is not a candidate.
    let own_config = std::fs::canonicalize(&opts.config_file).ok();
    scanned.candidates.retain(|s| {
        let ours = own_config.is_some() && std::fs::canonicalize(&s.found.path).ok() == own_config;
        if ours {
            scanned
                .ignored
                .push(super::scan::Ignored { rel: s.found.rel.clone(), reason: "sdtune's own config file".into() });
        }
        !ours
    });
    for i in &scanned.ignored {
        if i.reason == SAME_SHOWN_NAME {
            report.skip(&i.rel, SAME_SHOWN_NAME, SAME_SHOWN_NAME_FIX);
        } else {
            report.ignored.push(report::Ignored { path: i.rel.clone(), reason: i.reason.clone() });
        }
    }
    for o in &scanned.outside {
        report.skip(&o.rel, o.reason.clone(), o.fix.clone());
    }
    // A kohya folder's name is its images' default caption: bad bytes would train as U+FFFD.
    for c in scanned.concepts.iter().filter(|c| c.caption_template.as_deref().is_some_and(|t| t.contains(char::REPLACEMENT_CHARACTER))) {
        report.warn(
            None,
            "name_not_utf8",
            format!(
                "the concept folder {} has a name that is not valid UTF-8, so its images without a caption train with the caption {:?} (\u{fffd} for the bad bytes); rename the folder to UTF-8",
                c.path,
                c.caption_template.as_deref().unwrap_or_default()
            ),
        );
    }
    if scanned.candidates.is_empty() {
        if !scanned.outside.is_empty() {
            bail!(
                "{} holds no image files inside its concept folders (kohya-style N_name sub-folders); move the images into them",
                opts.data_dir.display()
            );
        }
        bail!(
            "{} holds no image files{}; put JPEG, PNG, WebP, BMP, TIFF or GIF images in it",
            if cfg.concepts.is_empty() { opts.data_dir.display().to_string() } else { format!("data.concepts ({})", report.data_dir) },
            if scanned.sidecars.is_empty() && scanned.ignored.is_empty() { " (it is empty)" } else { "" }
        );
    }
    report.counts.files = scanned.candidates.len() + scanned.outside.len();

    // 2. The model's files (the models themselves load only if there is work).
    // A model is named by a string (a path or a Hub id); a lossy copy of a
    // path that is not UTF-8 would name a file that does not exist.
    let Some(model_spec) = opts.model_dir.to_str() else {
        bail!(
            "the model path {} is not valid UTF-8, so sdtune cannot open it; rename the folder or file (and the folders above it) to UTF-8",
            opts.model_dir.display()
        );
    };
    let model = ModelFiles::of(model_spec, &LoadOptions { vae: opts.vae.clone(), ..LoadOptions::default() })?;
    let factor = model.vae_config.scale_factor() as u32;
    if !cfg.bucket_step.is_multiple_of(factor) || !cfg.resolution.is_multiple_of(factor) {
        bail!(
            "the resolution ({}) and bucket step ({}) must be multiples of {factor}, the VAE's downscale factor",
            cfg.resolution,
            cfg.bucket_step
        );
    }
    let tokenizer = model.tokenizer()?;

    // 3. Check every file's content and header, in parallel.
    let free_cpu = available_memory(Device::Cpu);
    let bar = progress_bar(scanned.candidates.len() as u64, "checking");
    let checked: Vec<Result<Candidate, (Found, Rejection)>> = scanned
        .candidates
        .par_iter()
        .map(|source| {
            let result = check_file(&source.found, cfg.max_pixels, free_cpu)
                .map(|c| Candidate { concept: source.concept, ..c });
            bar.inc(1);
            result
        })
        .collect();
    bar.finish_and_clear();

    // 4. Sort out rejects, small images and duplicates; caption and bucket the rest.
    let buckets = Buckets::new(cfg);
    let captions =
        Captions::new(&scanned.sidecars, &scanned.metadata, cfg.caption_template.as_deref(), cfg.trigger.as_deref());
    for p in &captions.problems {
        report.warn(Some(&p.rel), "metadata", p.message.clone());
    }
    // Each concept captions its images with its own template and trigger.
    let concept_captions: Vec<Captions> = scanned
        .concepts
        .iter()
        .map(|c| captions.with_rules(c.caption_template.as_deref(), c.trigger.as_deref()))
        .collect();
    let captions_of = |concept: Option<usize>| concept.map_or(&captions, |i| &concept_captions[i]);
    // Model identities hash the weights once (a whole single file), then are remembered.
    let hashing = spinner("reading model");
    let mut cache_hashes = FileHashes::open(&opts.work_dir.join(CACHE_DIR).join("model-ids.json"));
    let latent_settings = LatentSettings {
        vae_id: cache_hashes.identity(&model.vae_files)?,
        precision: opts.precision.name().into(),
        background: cfg.background,
    };
    let text_settings = TextSettings {
        encoder_id: cache_hashes.identity(&model.text_files)?,
        precision: opts.precision.name().into(),
        clip_skip: opts.clip_skip,
    };
    hashing.finish_and_clear();
    // Of identical files in one concept, keep one with a caption, else the
    // shortest path; copies in different concepts are all kept (and share latents).
    let mut candidates = Vec::new();
    for result in checked {
        match result {
            Ok(c) => candidates.push(c),
            Err((found, rejection)) => report.skip(&found.rel, rejection.reason, rejection.fix),
        }
    }
    let mut keeper: HashMap<(Option<usize>, String), (bool, usize, String)> = HashMap::new();
    for c in &candidates {
        let caption = captions_of(c.concept).caption_for(&c.found.path);
        let rank = (caption.issue.is_some(), c.found.rel.len(), c.found.rel.clone());
        let best = keeper.entry((c.concept, c.hash.clone())).or_insert_with(|| rank.clone());
        if rank < *best {
            *best = rank;
        }
    }
    let mut planned = Vec::new();
    for c in candidates {
        let kept = &keeper[&(c.concept, c.hash.clone())].2;
        if *kept != c.found.rel {
            report.counts.duplicates += 1;
            report.skip(
                &c.found.rel,
                format!("is an exact duplicate of {kept} (same content)"),
                "delete one of the copies",
            );
            continue;
        }
        let (w, h) = (c.header.width, c.header.height);
        let mut notes = Vec::new();
        if w.min(h) < cfg.min_side {
            if !cfg.allow_upscale {
                report.skip(
                    &c.found.rel,
                    format!("is {w}×{h} pixels; its short side is under the {}-pixel minimum", cfg.min_side),
                    "use a larger version of the image, or pass --allow-upscale to scale it up",
                );
                continue;
            }
            notes.push(Note::on(
                &c.found.rel,
                "upscaled",
                format!("is only {w}×{h} pixels and is scaled up (--allow-upscale); expect a softer result"),
            ));
        }
        header_notes(&c, &mut notes);
        if c.found.rel_is_lossy() {
            notes.push(Note::on(
                &c.found.rel,
                "name_not_utf8",
                "its path holds a name that is not valid UTF-8 (shown here with \u{fffd} for the bad bytes); it is used as it is, but rename it to UTF-8 so other tools show and find it".into(),
            ));
        }
        let caption = captions_of(c.concept).caption_for(&c.found.path);
        // In a kohya tree the folder's name is the caption by convention, not a gap.
        let folder_caption = (cfg.concepts.is_empty() || scanned.concept(c.concept).is_some_and(class_set::is_rendered))
            && c.concept.is_some()
            && caption.issue == Some(Issue::Missing);
        if !folder_caption {
            caption_notes(&caption, &c.found, &mut notes);
        }
        let Caption { text: caption, source, .. } = caption;
        let tokens = tokenizer.token_count(&caption);
        if tokens > MAX_TOKENS - 2 {
            notes.push(Note::on(
                &c.found.rel,
                "long_caption",
                format!(
                    "its caption has {tokens} tokens; CLIP reads only the first {} ({MAX_TOKENS} with its start and end tokens), the rest is cut off; shorten it",
                    MAX_TOKENS - 2
                ),
            ));
        }
        let bucket = buckets.assign(w, h);
        let crop = crop_for(w, h, bucket);
        // Refused here, in words, rather than aborting on the allocation later.
        let decode_need = c.header.decode_bytes().saturating_add(resize_bytes(crop, bucket));
        if let Some(free) = free_cpu.filter(|&free| decode_need > free) {
            report.skip(
                &c.found.rel,
                format!(
                    "is {w}×{h} pixels, and decoding it needs about {} of memory but {} are free",
                    bytes(decode_need),
                    bytes(free)
                ),
                "shrink the image, or free memory and run sdtune prepare again",
            );
            continue;
        }
        let kept = kept_fraction(w, h, crop);
        if kept < CROP_WARNING_KEPT {
            let shape = if w > h { "wider" } else { "taller" };
            let percent = if kept < 0.1 { format!("{:.1}", 100.0 * kept) } else { format!("{:.0}", 100.0 * kept) };
            notes.push(Note::on(
                &c.found.rel,
                "cropped",
                format!(
                    "is {w}×{h} pixels, {shape} than any bucket: its {bucket} bucket keeps only the centre {percent}% of it ({}×{}) and the rest never trains; crop it to the part that matters, or widen --min-bucket/--max-bucket",
                    crop.width, crop.height
                ),
            ));
        }
        let latent = latent_key(&latent_settings, &c.hash, bucket, crop, false);
        let flip = scanned.concept(c.concept).map_or(cfg.flip, |k| k.flip);
        let flipped = flip.then(|| latent_key(&latent_settings, &c.hash, bucket, crop, true));
        let text = text_key(&text_settings, &caption);
        planned.push(Planned {
            found: c.found,
            concept: c.concept,
            hash: c.hash,
            header: c.header,
            bucket,
            crop,
            decode_need,
            caption,
            source,
            notes,
            latent,
            flipped,
            text,
            alive: true,
        });
    }
    let image_paths: Vec<&Path> = scanned
        .candidates
        .iter()
        .map(|s| s.found.path.as_path())
        .chain(scanned.outside.iter().map(|o| o.path.as_path()))
        .collect();
    for orphan in captions.orphan_sidecars(&image_paths) {
        report.warn(
            Some(&orphan.rel),
            "orphan_caption",
            "is a caption file with no image of the same name beside it; it was not used",
        );
    }
    for line in captions.orphan_metadata_lines(&image_paths) {
        report.warn(
            Some(&line.file),
            "orphan_caption",
            format!(
                "line {} gives a caption to {:?}, which is not in the folder, so it was not used; fix the file_name",
                line.line, line.file_name
            ),
        );
    }

    if planned.is_empty() {
        // Nothing usable (a wrong folder?): leave the cache as it is.
        report.finish(&BTreeMap::new());
        report.add_concepts(&scanned.concepts, &vec![Vec::new(); scanned.concepts.len()]);
        return finish_report(report, opts, started, Vec::new(), Vec::new());
    }

    // 5. Open the cache and check the encode fits in memory before anything
    // is allocated; what the folder no longer needs goes when this run finishes.
    let mut cache = CacheWriter::open(&opts.work_dir.join(CACHE_DIR))?;
    let encode_batch = encode_batch_size(&planned, &cache, &model.vae_config, opts, &mut report)?;
    for shard in cache.damaged_shards() {
        report.warn(
            None,
            "damaged_cache",
            format!("the cached shard {shard} was damaged (its checksum no longer matches); its images are encoded again"),
        );
    }
    cache_hashes.save()?;
    let empty_text = text_key(&text_settings, "");
    let wanted_latents: BTreeSet<String> =
        planned.iter().flat_map(|p| std::iter::once(p.latent.clone()).chain(p.flipped.clone())).collect();
    let wanted_texts: BTreeSet<String> =
        planned.iter().map(|p| p.text.clone()).chain(std::iter::once(empty_text.clone())).collect();
    report.counts.removed = cache.retain(&wanted_latents, &wanted_texts)?;

    // 6. Encode the latents the cache lacks, bucket by bucket.
    let mut encoders = Encoders::new(&model, opts.device, opts.precision.kind())?;
    // An image in several concepts is decoded and encoded once, by the first
    // of them (its owner), with a flipped copy if any of them flips.
    let mut sharers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, p) in planned.iter().enumerate() {
        sharers.entry(p.latent.clone()).or_default().push(i);
    }
    let flip_key: Vec<Option<String>> = planned
        .iter()
        .map(|p| sharers[&p.latent].iter().find_map(|&j| planned[j].flipped.clone()))
        .collect();
    let mut by_bucket: BTreeMap<Bucket, Vec<usize>> = BTreeMap::new();
    let mut pending_latents = 0;
    for (i, p) in planned.iter().enumerate() {
        if sharers[&p.latent][0] != i {
            continue;
        }
        let keys = std::iter::once(&p.latent).chain(flip_key[i].as_ref());
        let missing = keys.clone().filter(|k| !cache.has_latent(k)).count();
        report.counts.reused += keys.count() - missing;
        if missing > 0 {
            pending_latents += missing;
            by_bucket.entry(p.bucket).or_default().push(i);
        }
    }
    let kill = |planned: &mut Vec<Planned>, report: &mut Report, owner: usize, reason: String, fix: String| {
        let mut named = BTreeSet::new();
        for &j in &sharers[&planned[owner].latent] {
            if planned[j].alive && named.insert(planned[j].found.rel.clone()) {
                report.skip(&planned[j].found.rel, reason.clone(), fix.clone());
            }
            planned[j].alive = false;
        }
    };
    let delay = std::env::var(SHARD_DELAY_ENV).ok().and_then(|v| v.parse::<u64>().ok());
    let bar = progress_bar(pending_latents as u64, "encoding");
    for (bucket, indices) in &by_bucket {
        for chunk in indices.chunks(encode_batch) {
            let decode = |&i: &usize| (i, load_pixels(&planned[i], cfg, *bucket));
            // Images that fit in memory one by one may not all at once.
            let together = chunk.iter().fold(0u64, |sum, &i| sum.saturating_add(planned[i].decode_need));
            let decoded: Vec<(usize, Result<RgbImage, Rejection>)> = if free_cpu.is_some_and(|free| together > free) {
                chunk.iter().map(decode).collect()
            } else {
                chunk.par_iter().map(decode).collect()
            };
            let mut jobs: Vec<(usize, bool, String, RgbImage)> = Vec::new();
            for (i, result) in decoded {
                let p = &planned[i];
                match result {
                    Err(rejection) => kill(&mut planned, &mut report, i, rejection.reason, rejection.fix),
                    Ok(pixels) => {
                        if let Some(key) = &flip_key[i] {
                            if !cache.has_latent(key) {
                                jobs.push((i, true, key.clone(), image::imageops::flip_horizontal(&pixels)));
                            }
                        }
                        if !cache.has_latent(&p.latent) {
                            jobs.push((i, false, p.latent.clone(), pixels));
                        }
                    }
                }
            }
            let mut new = Vec::with_capacity(jobs.len());
            for batch in jobs.chunks(encode_batch) {
                let images: Vec<&RgbImage> = batch.iter().map(|j| &j.3).collect();
                let latents = encoders.encode_images(&images)?;
                for ((i, flipped, key, _), latent) in batch.iter().zip(latents) {
                    if !latent.finite {
                        kill(
                            &mut planned,
                            &mut report,
                            *i,
                            "gives NaN or infinite latents even in fp32".into(),
                            "check the image opens correctly, or remove it".into(),
                        );
                        continue;
                    }
                    let p = &planned[*i];
                    report.counts.fp32_fallbacks += latent.fp32_fallback as usize;
                    new.push(NewLatent {
                        key: key.clone(),
                        entry: LatentEntry {
                            shard: String::new(),
                            source: p.found.rel.clone(),
                            content_hash: p.hash.clone(),
                            bucket: *bucket,
                            flipped: *flipped,
                            fp32_fallback: latent.fp32_fallback,
                        },
                        mean: latent.mean,
                        std: latent.std,
                    });
                }
                bar.inc(batch.len() as u64);
            }
            report.counts.encoded += new.len();
            cache.add_latents(new)?;
            if let Some(ms) = delay {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
    bar.finish_and_clear();
    let live: Vec<&Planned> = planned.iter().filter(|p| p.alive).collect();
    report.counts.usable = live.len();
    for p in &live {
        count_caption(&mut report, p);
        for note in &p.notes {
            report.warn(Some(&note.path), note.kind, note.message.clone());
        }
    }

    // 7. Caption embeddings, and the empty caption's for caption dropout.
    let mut texts: Vec<(String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, caption) in
        live.iter().map(|p| (&p.text, &p.caption)).chain(std::iter::once((&empty_text, &String::new())))
    {
        if seen.insert(key.clone()) {
            if cache.has_text(key) {
                report.counts.texts_reused += 1;
            } else {
                texts.push((key.clone(), caption.clone()));
            }
        }
    }
    if !live.is_empty() && !texts.is_empty() {
        let bar = progress_bar(texts.len() as u64, "captions");
        for batch in texts.chunks(TEXT_BATCH) {
            let captions: Vec<String> = batch.iter().map(|t| t.1.clone()).collect();
            let embeddings = encoders.encode_texts(&captions, opts.clip_skip)?;
            let entries = batch.iter().cloned().zip(embeddings).map(|((k, c), e)| (k, c, e)).collect();
            cache.add_texts(entries)?;
            report.counts.texts_encoded += batch.len();
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
    }

    // 8. Record the dataset and the report.
    let mut histogram: BTreeMap<Bucket, usize> = BTreeMap::new();
    for p in &live {
        *histogram.entry(p.bucket).or_default() += 1;
    }
    if !live.is_empty() {
        let dataset = Dataset {
            data_dir: opts.data_dir.display().to_string(),
            model: opts.model_dir.display().to_string(),
            vae: opts.vae.as_ref().map(|v| v.display().to_string()),
            resolution: cfg.resolution,
            scaling_factor: model.vae_config.scaling_factor,
            shift_factor: model.vae_config.shift_factor,
            empty_text,
            concepts: scanned.concepts.clone(),
            items: live
                .iter()
                .map(|p| Item {
                    path: p.found.rel.clone(),
                    content_hash: p.hash.clone(),
                    width: p.header.width,
                    height: p.header.height,
                    bucket: p.bucket,
                    crop: p.crop,
                    caption: p.caption.clone(),
                    text: p.text.clone(),
                    latent: p.latent.clone(),
                    flipped_latent: p.flipped.clone(),
                    concept: p.concept,
                })
                .collect(),
        };
        cache.finish(dataset)?;
    }
    report.finish(&histogram);
    let per_concept: Vec<Vec<Bucket>> = (0..scanned.concepts.len())
        .map(|i| live.iter().filter(|p| p.concept == Some(i)).map(|p| p.bucket).collect())
        .collect();
    report.add_concepts(&scanned.concepts, &per_concept);
    let mut captions: Vec<String> = Vec::new();
    // The class prompt is no sample prompt of the brand.
    for p in live.iter().filter(|p| !scanned.concept(p.concept).is_some_and(|c| c.is_class)) {
        if !p.caption.is_empty() && !captions.contains(&p.caption) {
            captions.push(p.caption.clone());
        }
    }
    let concept_prompts = (0..scanned.concepts.len())
        .filter(|&i| !scanned.concepts[i].is_class)
        .filter_map(|i| live.iter().find(|p| p.concept == Some(i) && !p.caption.is_empty()).map(|p| p.caption.clone()))
        .collect();
    finish_report(report, opts, started, captions, concept_prompts)
}

/// The images and their concepts: the configured concepts, else the data
/// folder (flat or kohya-style).
fn scan_layout(opts: &Options, on_file: &mut dyn FnMut(usize)) -> Result<Layout> {
    let cfg = &opts.data;
    let defaults =
        Defaults { trigger: cfg.trigger.as_deref(), caption_template: cfg.caption_template.as_deref(), flip: cfg.flip };
    let mut layout = if cfg.concepts.is_empty() {
        concepts::from_folder(&opts.data_dir, &defaults, on_file)?
    } else {
        concepts::from_config(&cfg.concepts, &opts.work_dir, &defaults, on_file)?
    };
    if let Some((prompt, count)) = cfg.class_images() {
        class_set::add_to_layout(&mut layout, &opts.work_dir, prompt, count);
    }
    Ok(layout)
}

/// Images per VAE encode: `data.encode_batch_size`, lowered until the
/// largest bucket still to encode fits in the free memory (with a warning);
/// an error in one sentence when not even one image fits. Where free
/// memory is unknown, only the bucket-side bound of `data:` applies.
fn encode_batch_size(
    planned: &[Planned],
    cache: &CacheWriter,
    vae: &crate::models::config::VaeConfig,
    opts: &Options,
    report: &mut Report,
) -> Result<usize> {
    let asked = opts.data.encode_batch_size;
    let pending: Vec<Bucket> = planned
        .iter()
        .filter(|p| !cache.has_latent(&p.latent) || p.flipped.as_ref().is_some_and(|k| !cache.has_latent(k)))
        .map(|p| p.bucket)
        .collect();
    let Some(&bucket) = pending.iter().max_by_key(|b| b.width as u64 * b.height as u64) else {
        return Ok(asked);
    };
    let in_bucket = pending.iter().filter(|&&b| b == bucket).count();
    let Some(free) = available_memory(opts.device) else { return Ok(asked) };
    let elt = opts.precision.kind().elt_size_in_bytes() as u64;
    let (w, h) = (bucket.width as u64, bucket.height as u64);
    let need = |batch: usize| crate::models::vae::encode_peak_bytes(vae, elt, w, h, batch as u64);
    // A half-precision image that comes out non-finite is encoded again in fp32.
    let one = need(1).max(crate::models::vae::encode_peak_bytes(vae, 4, w, h, 1));
    if one > free {
        bail!(
            "encoding one image of the {bucket} bucket needs about {} of memory for the VAE but {} are free; lower --resolution (or data.max_bucket), or free memory",
            bytes(one),
            bytes(free)
        );
    }
    // The estimate grows with the batch in proportion.
    let fits = usize::try_from(free / need(1).max(1)).unwrap_or(usize::MAX).clamp(1, asked);
    if fits < asked.min(in_bucket) {
        report.warn(
            None,
            "encode_batch",
            format!(
                "encoding {asked} images of the {bucket} bucket at once would need about {} but {} are free, so {fits} at a time are encoded (the same latents, more slowly)",
                bytes(need(asked)),
                bytes(free)
            ),
        );
    }
    Ok(fits)
}

/// Stamps the time, writes the JSON report and returns the outcome.
fn finish_report(
    mut report: Report,
    opts: &Options,
    started: Instant,
    captions: Vec<String>,
    concept_prompts: Vec<String>,
) -> Result<Prepared> {
    report.seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&report)?;
    crate::fsutil::write_atomic(&opts.work_dir.join(REPORT_FILE), &json)?;
    Ok(Prepared { report, captions, concept_prompts })
}

/// Reads, hashes and header-checks one file (refused unread when it is
/// larger than the free memory it would be read into).
fn check_file(found: &Found, max_pixels: u64, free: Option<u64>) -> Result<Candidate, (Found, Rejection)> {
    let size = std::fs::metadata(&found.path).map(|m| m.len()).unwrap_or(0);
    if let Some(free) = free.filter(|&free| size > free) {
        return Err((
            found.clone(),
            Rejection::new(
                format!("is a {} file, more than the {} of free memory it would be read into", bytes(size), bytes(free)),
                "shrink or re-export the image, or free memory and run sdtune prepare again",
            ),
        ));
    }
    let bytes = std::fs::read(&found.path).map_err(|e| {
        (found.clone(), Rejection::new(format!("cannot be read ({e})"), "check the file's permissions"))
    })?;
    let header = decode::inspect(&bytes, max_pixels).map_err(|r| (found.clone(), r))?;
    Ok(Candidate { found: found.clone(), concept: None, hash: content_hash(&bytes), header })
}

/// Decodes and crops/resizes one planned image to its bucket.
fn load_pixels(p: &Planned, cfg: &DataConfig, bucket: Bucket) -> Result<RgbImage, Rejection> {
    let bytes = std::fs::read(&p.found.path)
        .map_err(|e| Rejection::new(format!("cannot be read ({e})"), "check the file's permissions"))?;
    if content_hash(&bytes) != p.hash {
        return Err(Rejection::new("changed while sdtune was reading it", "run sdtune prepare again"));
    }
    let image = decode::decode(&bytes, &p.header, cfg.background, cfg.max_pixels)?;
    Ok(crop_and_resize(&image, p.crop, bucket))
}

/// Notes the header gives: content that does not match the extension, animation.
fn header_notes(c: &Candidate, notes: &mut Vec<Note>) {
    let name = format_name(c.header.format);
    let ext = Path::new(&c.found.rel).extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if !decode::extensions(c.header.format).contains(&ext.as_str()) {
        let named = if ext.is_empty() { "has no extension".to_string() } else { format!("has a .{ext} name") };
        notes.push(Note::on(
            &c.found.rel,
            "extension",
            format!("{named} but holds {name} data; it was read as {name}"),
        ));
    }
    if c.header.animated {
        notes.push(Note::on(&c.found.rel, "animated", format!("is an animated {name}; only its first frame is used")));
    }
}

/// Notes about the image's caption (missing, empty, not UTF-8).
fn caption_notes(caption: &Caption, found: &Found, notes: &mut Vec<Note>) {
    let uses = if caption.text.is_empty() {
        "it trains with an empty caption; add a caption, a trigger word (--trigger) or a caption template".to_string()
    } else {
        format!("it trains with the caption {:?}", caption.text)
    };
    match &caption.issue {
        None => {}
        Some(Issue::Missing) => notes.push(Note::on(
            &found.rel,
            "no_caption",
            format!("has no caption (no .txt beside it, no metadata.jsonl line); {uses}"),
        )),
        Some(Issue::Empty { file }) => {
            notes.push(Note::on(file, "empty_caption", format!("is an empty caption for {}; {uses}", found.rel)))
        }
        Some(Issue::Unreadable { file, error }) => notes.push(Note::on(
            file,
            "caption_unreadable",
            format!("cannot be read ({error}), so it was not used as the caption of {}; check its permissions ({uses})", found.rel),
        )),
        Some(Issue::NotUtf8 { file }) => notes.push(Note::on(
            file,
            "caption_not_utf8",
            format!("is not UTF-8 text, so it was not used as the caption of {}; save it as UTF-8 ({uses})", found.rel),
        )),
    }
}

/// Caption statistics of a used image.
fn count_caption(report: &mut Report, p: &Planned) {
    let k = &mut report.captions;
    match p.source {
        Source::Sidecar => k.sidecar += 1,
        Source::Metadata => k.metadata += 1,
        Source::Template => k.template += 1,
        Source::Trigger => k.trigger_only += 1,
        Source::None => k.none += 1,
    }
    for note in &p.notes {
        match note.kind {
            "no_caption" => k.missing += 1,
            "empty_caption" => k.empty += 1,
            "caption_not_utf8" => k.not_utf8 += 1,
            "long_caption" => k.too_long += 1,
            _ => {}
        }
    }
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    crate::progress::steps_bar(total, what)
}

fn spinner(what: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix} {msg}") {
        s.set_style(style);
    }
    s.set_prefix(what.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

/// Up to `n` distinct captions spread over the set, for `sample.prompts`.
pub fn sample_prompts(captions: &[String], trigger: Option<&str>, n: usize) -> Vec<String> {
    if captions.is_empty() {
        return vec![match trigger {
            Some(t) if !t.trim().is_empty() => format!("a photo of {}", t.trim()),
            _ => "a photo".to_string(),
        }];
    }
    let n = n.min(captions.len());
    (0..n).map(|i| captions[i * captions.len() / n].clone()).collect()
}
