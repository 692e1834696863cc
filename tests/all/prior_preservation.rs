//! DreamBooth's prior preservation on the tiny SD1 fixture through the
//! CLI: class images rendered by prepare (reproducible byte for byte, only
//! the missing ones), their loss in training (weight 0 is the run without
//! them, bit for bit; above 0 it changes the LoRA; a resume is
//! bit-identical), the drift figures `sdtune pick` ranks by, and bad
//! inputs refused in one sentence.
use crate::train_support;

use std::path::Path;
use std::process::Output;

use train_support::{fixtures, lora_tensors, prepared, run_dir, sdtune, train};

use sdtune::data::cache::CacheReader;
use sdtune::train::data::TrainingData;

const CLASS: &[&str] = &["--class-prompt", "a shape", "--class-images"];

/// `prepare` of the poster set in `dir` with `extra` flags (the fixture model last).
fn prepare(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "prepare", "brand", "--device", "cpu", "--resolution", "64", "--min-bucket", "32", "--max-bucket", "128", "--bucket-step", "32",
        "--min-side", "64",
    ];
    args.extend(extra);
    args.push("--model");
    sdtune(dir, &args, Some(&fixtures().join("tiny-sd1")))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The poster set prepared again in the same folder with `count` class images.
fn with_class_images(count: &str) -> sdtune::scratch::ScratchDir {
    let dir = prepared();
    let out = prepare(dir.path(), &[CLASS, &[count]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    dir
}

#[test]
fn class_images_are_rendered_once_and_come_back_byte_for_byte() {
    let dir = with_class_images("5");
    let class_dir = dir.path().join(".sdtune/class");
    let file = |i: usize| class_dir.join(format!("class-{i:05}.png"));
    let first: Vec<Vec<u8>> = (0..5).map(|i| std::fs::read(file(i)).unwrap()).collect();
    assert_ne!(first[0], first[1], "two seeds gave the same image");
    // Each PNG carries its recipe as `sdtune sample` writes it.
    let texts = sdtune::sample::image_out::read_png_text(&file(1)).unwrap();
    let recipe = &texts.iter().find(|(k, _)| k == "sdtune").expect("no recipe chunk").1;
    assert!(recipe.contains("\"prompt\":\"a shape\"") && recipe.contains("\"seed\":1"), "{recipe}");
    assert!(recipe.contains("\"guidance\":7.5"), "class images render at diffusers' default guidance: {recipe}");
    // The cache holds them as class items beside the 6 brand images.
    let cache = CacheReader::open(dir.path()).unwrap();
    assert_eq!(cache.class_items().len(), 5);
    assert_eq!(cache.buckets().iter().map(Vec::len).sum::<usize>(), 6, "class images went into the brand buckets");
    drop(cache); // a reader's lock would keep the next prepare out

    std::fs::remove_file(file(1)).unwrap();
    std::fs::remove_file(file(4)).unwrap();
    // Flags apply to the run they are given to, so each prepare names the class images.
    let again = prepare(dir.path(), &[CLASS, &["5"]].concat());
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("class images: 5 of \"a shape\" in .sdtune/class/ (2 rendered now"), "{}", stdout(&again));
    for i in 0..5 {
        assert_eq!(std::fs::read(file(i)).unwrap(), first[i], "class image {i} came back with other bytes");
    }
    let third = prepare(dir.path(), &[CLASS, &["5"]].concat());
    assert!(stdout(&third).contains("(0 rendered now"), "a second prepare rendered again: {}", stdout(&third));

    // Another guidance scale renders them all anew, and its images differ.
    let guided = prepare(dir.path(), &[CLASS, &["5", "--class-guidance", "1"]].concat());
    assert!(stdout(&guided).contains("(5 rendered now"), "{}", stdout(&guided));
    assert_ne!(std::fs::read(file(0)).unwrap(), first[0], "guidance 1 drew the same image as 7.5");
    let texts = sdtune::sample::image_out::read_png_text(&file(0)).unwrap();
    assert!(texts.iter().any(|(k, v)| k == "sdtune" && v.contains("\"guidance\":1")), "{texts:?}");

    // Another prompt renders them all anew.
    let other = prepare(dir.path(), &["--class-prompt", "a blob", "--class-images", "5"]);
    assert!(stdout(&other).contains("(5 rendered now"), "{}", stdout(&other));
}

/// `(prior_loss, instance_loss, loss)` of each step line of a run.
fn losses(run: &Path) -> Vec<(Option<f64>, Option<f64>, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["prior_loss"].as_f64(), v["instance_loss"].as_f64(), v["loss"].as_f64()?)))
        .collect()
}

#[test]
fn the_prior_loss_trains_and_weight_zero_is_the_run_without_it() {
    let plain = prepared();
    let classed = with_class_images("3");
    let args = ["--steps", "3", "--batch-size", "2"];
    let run = |dir: &Path, extra: &[&str]| {
        let out = train(dir, &[&args[..], extra].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    run(plain.path(), &["--name", "p"]);
    let off = run(classed.path(), &["--name", "off", "--prior-loss-weight", "0"]);
    assert!(!stderr(&off).contains("prior preservation on"), "{}", stderr(&off));
    let on = run(classed.path(), &["--name", "on"]);
    assert!(stderr(&on).contains("prior preservation on: one of 3 class images beside each brand image, prior loss weight 1"), "{}", stderr(&on));

    let lora = |dir: &Path, name: &str| lora_tensors(&run_dir(dir, name).join(format!("{name}.safetensors")));
    assert_eq!(lora(plain.path(), "p"), lora(classed.path(), "off"), "weight 0 is not the run without class images");
    assert_ne!(lora(classed.path(), "off"), lora(classed.path(), "on"), "the prior loss changed nothing");

    // Both losses are logged, and the total is the brand loss plus the weighted prior loss.
    let logged = losses(&run_dir(classed.path(), "on"));
    assert_eq!(logged.len(), 3);
    for (prior, instance, loss) in &logged {
        let (prior, instance) = (prior.expect("no prior_loss"), instance.expect("no instance_loss"));
        assert!(prior > 0.0 && (instance + prior - loss).abs() < 1e-9, "{prior} + {instance} != {loss}");
    }
    assert!(losses(&run_dir(classed.path(), "off")).iter().all(|l| l.0.is_none()), "a run without the prior logged one");
    // Step 1 starts from the same weights and sees the same brand samples with the same
    // draws: its brand loss is the plain run's (up to the bits a larger UNet batch changes).
    let plain_losses = losses(&run_dir(plain.path(), "p"));
    let (want, got) = (plain_losses[0].2, logged[0].1.unwrap());
    assert!((want - got).abs() < 1e-5 * want.abs().max(1e-3), "step 1's brand loss {got} is not the plain run's {want}");
}

#[test]
fn a_resumed_run_with_class_images_ends_bit_identical() {
    let args = ["--save-every", "2", "--batch-size", "2", "--prior-loss-weight", "0.5", "--name", "r"];
    let straight = with_class_images("3");
    let out = train(straight.path(), &[&["--steps", "4"][..], &args].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let resumed = with_class_images("3");
    let first = train(resumed.path(), &[&["--steps", "2"][..], &args].concat());
    assert!(first.status.success(), "{}", stderr(&first));
    let second = train(resumed.path(), &[&["--steps", "4", "--resume"][..], &args].concat());
    assert!(second.status.success(), "{}", stderr(&second));
    for file in ["r.safetensors", "state/state-000004.safetensors"] {
        let want = lora_tensors(&run_dir(straight.path(), "r").join(file));
        assert_eq!(want, lora_tensors(&run_dir(resumed.path(), "r").join(file)), "{file} differs after a resume");
    }
    // Resuming without the prior loss is another run: refused, naming the setting.
    let without = train(resumed.path(), &["--steps", "6", "--resume", "--save-every", "2", "--batch-size", "2", "--prior-loss-weight", "0", "--name", "r"]);
    assert!(!without.status.success());
    assert!(stderr(&without).contains("prior_loss_weight"), "{}", stderr(&without));
}

#[test]
fn grids_measure_the_drift_that_pick_ranks_by() {
    let dir = with_class_images("2");
    // Two sampler steps per grid image are enough to tell images apart.
    let yaml = std::fs::read_to_string(dir.path().join("sdtune.yaml")).unwrap();
    assert!(yaml.contains("sample_steps: 20"), "{yaml}");
    std::fs::write(dir.path().join("sdtune.yaml"), yaml.replace("sample_steps: 20", "sample_steps: 2")).unwrap();
    let out = train(dir.path(), &["--steps", "4", "--save-every", "2", "--sample-every", "2", "--name", "d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = run_dir(dir.path(), "d");
    let drift = |step: u64| {
        let text = std::fs::read_to_string(run.join(format!("samples/step-{step:06}.drift.json"))).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    assert_eq!(drift(0)["mean"].as_f64(), Some(0.0), "step 0 is the base model");
    assert_eq!(drift(0)["prompts"][0]["prompt"].as_str(), Some("a shape"), "the class prompt is a control prompt");
    assert_eq!(drift(0)["pixels"].as_f64(), Some(0.0), "step 0 is the base model, in pixels too");
    let last = drift(4)["mean"].as_f64().unwrap();
    assert!(last > 0.0, "training moved nothing");
    let pixels = drift(4)["pixels"].as_f64().unwrap();
    assert!(pixels > 0.0 && pixels <= 255.0, "pixel drift {pixels}");
    let per_seed = drift(4)["prompts"][0]["pixels_per_seed"].as_array().unwrap().len();
    assert_eq!(per_seed, drift(4)["prompts"][0]["per_seed"].as_array().unwrap().len());
    let pick = sdtune(dir.path(), &["pick", "output/d"], None);
    let table = stdout(&pick);
    assert!(pick.status.success(), "{}", stderr(&pick));
    assert!(table.starts_with("step     palette  seed-spread  drift  pixel-drift"), "{table}");
    let row4 = table.lines().find(|l| l.starts_with("4 ")).unwrap();
    assert_eq!(row4.split_whitespace().nth(3), Some(format!("{last:.2}").as_str()), "{table}");
    assert_eq!(row4.split_whitespace().nth(4), Some(format!("{pixels:.2}").as_str()), "{table}");
}

/// The run failed with exit 1 and its last line is one `error:` sentence holding `expect`.
fn refused(out: &Output, expect: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    for word in expect {
        assert!(last.contains(word), "{word:?} missing from {last:?}");
    }
}

#[test]
fn bad_class_settings_are_refused_in_one_sentence() {
    let dir = prepared();
    let d = dir.path();
    refused(&prepare(d, &["--class-prompt", "a shape"]), &["class_prompt", "num_class_images", "--class-images"]);
    refused(&prepare(d, &["--class-images", "3"]), &["num_class_images", "class_prompt"]);
    refused(&prepare(d, &[CLASS, &["0"]].concat()), &["--class-images", "is 0"]);
    refused(&prepare(d, &[CLASS, &["-2"]].concat()), &["--class-images -2", "negative"]);
    refused(&prepare(d, &["--class-prompt", "  ", "--class-images", "2"]), &["class_prompt", "empty"]);
    refused(&prepare(d, &[CLASS, &["2", "--class-guidance", "0.5"]].concat()), &["--class-guidance", "0.5", "from 1"]);
    refused(&prepare(d, &[CLASS, &["2", "--class-guidance", "NaN"]].concat()), &["--class-guidance", "NaN"]);
    // The class folder's place is taken by a file.
    std::fs::write(d.join(".sdtune/class"), b"not a folder").unwrap();
    refused(&prepare(d, &[CLASS, &["2"]].concat()), &[".sdtune/class", "is a file"]);
    std::fs::remove_file(d.join(".sdtune/class")).unwrap();
    // A configured class concept whose folder is missing.
    std::fs::write(d.join("sdtune.yaml"), "data:\n  concepts:\n  - path: brand\n  - path: reg-missing\n    is_class: true\n").unwrap();
    let tiny = fixtures().join("tiny-sd1");
    refused(&sdtune(d, &["prepare", "--device", "cpu", "--model"], Some(&tiny)), &["reg-missing", "does not exist"]);
    std::fs::remove_file(d.join("sdtune.yaml")).unwrap();
    // Training: a prior weight with no class images, and a negative weight.
    refused(&train(d, &["--steps", "1", "--prior-loss-weight", "1"]), &["--prior-loss-weight", "no class images", "--class-prompt"]);
    refused(&train(d, &["--steps", "1", "--prior-loss-weight", "-1"]), &["--prior-loss-weight", "0 or more"]);
    std::fs::write(d.join("sdtune.yaml"), "data:\n  num_class_images: -3\n").unwrap();
    refused(&train(d, &["--steps", "1"]), &["data.num_class_images", "whole number"]);
}
