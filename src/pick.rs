//! `sdtune pick`: which saved step of a run to use, by the numbers the run
//! wrote. Each saved LoRA (`lora/step-NNNNNN.safetensors`) is scored on
//! what its folder holds for that step: the grid's palette distance to the
//! brand set and its spread across seeds (`samples/step-N.consistency.json`),
//! the prompt drift of the control prompts (the class prompt and
//! `sample.control_prompts`: how far their images at the grid's seeds moved
//! from the base model's, `samples/step-N.drift.json`, as a palette
//! distance and as a pixel distance) and the validation loss
//! (`metrics.jsonl`). Lower is better for each; each figure is scaled to
//! 0..1 over the steps that have it. A step's score is the mean of four
//! parts: palette, seed spread, drift (the mean of its two scaled
//! distances, so that the drift counts once) and validation. The lowest
//! score is the choice; a tie goes to the earlier step.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// One saved step and its figures (`None` where the run has none).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub step: u64,
    pub lora: PathBuf,
    pub palette: Option<f64>,
    pub seed_spread: Option<f64>,
    /// Mean palette distance of the control prompts' images to the base model's.
    pub drift: Option<f64>,
    /// Mean pixel distance (absolute RGB difference, 0..255) of the same images.
    pub pixel_drift: Option<f64>,
    pub validation: Option<f64>,
    pub score: f64,
}

/// Every saved step of the run in `run_dir` with its figures and score, in step order.
pub fn candidates(run_dir: &Path) -> Result<Vec<Candidate>> {
    let lora_dir = run_dir.join("lora");
    let mut steps: Vec<(u64, PathBuf)> = match std::fs::read_dir(&lora_dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_name()?.to_str()?.to_string();
                let step: u64 = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
                // Step 0 is the untrained LoRA (the base model, written for the first grid): no candidate.
                (step > 0).then_some((step, path))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    steps.sort();
    if steps.is_empty() {
        bail!("{} holds no saved LoRA steps after step 0 (lora/step-NNNNNN.safetensors); train with --save-every to save some", run_dir.display());
    }
    let validation = validation_losses(&run_dir.join("metrics.jsonl"));
    let mut out: Vec<Candidate> = steps
        .into_iter()
        .map(|(step, lora)| {
            let grid = run_dir.join("samples").join(format!("step-{step:06}.png"));
            let (palette, seed_spread) = grid_figures(&crate::sample::render::consistency_path(&grid));
            let drift = crate::sample::drift::Drift::load(&crate::sample::drift::drift_path(&grid));
            let pixel_drift = drift.as_ref().and_then(|d| d.pixels);
            let drift = drift.map(|d| d.mean);
            let validation = validation.iter().rev().find(|(s, _)| *s == step).map(|p| p.1);
            Candidate { step, lora, palette, seed_spread, drift, pixel_drift, validation, score: 0.0 }
        })
        .collect();
    score(&mut out);
    Ok(out)
}

/// The recommended candidate: the lowest score, the earlier step on a tie.
pub fn choice(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().min_by(|a, b| a.score.total_cmp(&b.score).then(a.step.cmp(&b.step)))
}

type Figure = fn(&Candidate) -> Option<f64>;

/// The score's parts, each the mean of its scaled figures: the drift's two
/// distances measure one thing, so together they count as one part.
const PARTS: [&[Figure]; 4] = [&[|c| c.palette], &[|c| c.seed_spread], &[|c| c.drift, |c| c.pixel_drift], &[|c| c.validation]];

/// Each candidate's score: the mean of its parts, each figure scaled to
/// 0..1 over the candidates (a figure equal for all scales to 0).
fn score(candidates: &mut [Candidate]) {
    let range = |f: &Figure| {
        let values: Vec<f64> = candidates.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| (values.iter().copied().fold(f64::MAX, f64::min), values.iter().copied().fold(f64::MIN, f64::max)))
    };
    let ranges: Vec<Vec<Option<(f64, f64)>>> = PARTS.iter().map(|part| part.iter().map(range).collect()).collect();
    for c in candidates.iter_mut() {
        let parts: Vec<f64> = PARTS
            .iter()
            .zip(&ranges)
            .filter_map(|(part, ranges)| {
                let scaled: Vec<f64> = part
                    .iter()
                    .zip(ranges)
                    .filter_map(|(f, range)| {
                        let (lo, hi) = (*range)?;
                        let v = f(c)?;
                        Some(if hi > lo { (v - lo) / (hi - lo) } else { 0.0 })
                    })
                    .collect();
                (!scaled.is_empty()).then(|| scaled.iter().sum::<f64>() / scaled.len() as f64)
            })
            .collect();
        // A step with no figure at all ranks last.
        c.score = if parts.is_empty() { 1.0 } else { parts.iter().sum::<f64>() / parts.len() as f64 };
    }
}

/// The table `sdtune pick` prints, and its recommendation line.
pub fn table(candidates: &[Candidate]) -> String {
    let cell = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let mut t = String::from("step     palette  seed-spread  drift  pixel-drift  validation  score\n");
    for c in candidates {
        let _ = writeln!(
            t,
            "{:<8} {:>7}  {:>11}  {:>5}  {:>11}  {:>10}  {:.3}",
            c.step,
            cell(c.palette, 2),
            cell(c.seed_spread, 2),
            cell(c.drift, 2),
            cell(c.pixel_drift, 2),
            cell(c.validation, 5),
            c.score
        );
    }
    if let Some(best) = choice(candidates) {
        let figures: Vec<String> = [
            ("palette", best.palette, 2),
            ("seed spread", best.seed_spread, 2),
            ("drift", best.drift, 2),
            ("pixel drift", best.pixel_drift, 2),
            ("validation", best.validation, 5),
        ]
            .iter()
            .filter_map(|&(name, v, digits)| v.map(|v| format!("{name} {v:.digits$}")))
            .collect();
        let shown = if figures.is_empty() { String::new() } else { format!(": {}", figures.join(", ")) };
        let _ = writeln!(t, "recommended: step {} ({}){shown}", best.step, best.lora.display());
    }
    t
}

/// `(palette distance, seed spread)` of the LoRA variant of a grid's figures.
fn grid_figures(path: &Path) -> (Option<f64>, Option<f64>) {
    let Some(v) = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
        return (None, None);
    };
    let variants = v["variants"].as_array().cloned().unwrap_or_default();
    let lora = variants.iter().find(|v| v["variant"].as_str() != Some("base")).or(variants.first());
    match lora {
        Some(v) => (v["mean"].as_f64(), v["seed_std"].as_f64()),
        None => (None, None),
    }
}

/// `(step, validation loss)` of each validation line of metrics.jsonl.
fn validation_losses(path: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["validation_loss"].as_f64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder with a save, a grid's figures, a drift and a validation
    /// loss per `(step, palette, seed spread, validation, drift, pixel drift)`.
    fn run_with(figures: &[(u64, f64, f64, f64, f64, Option<f64>)]) -> crate::scratch::ScratchDir {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("lora")).unwrap();
        std::fs::create_dir_all(run.join("samples")).unwrap();
        let mut metrics = String::new();
        for &(step, mean, spread, val, drift, pixels) in figures {
            std::fs::write(run.join(format!("lora/step-{step:06}.safetensors")), b"").unwrap();
            let json = format!("{{\"variants\":[{{\"variant\":\"lora\",\"mean\":{mean},\"seed_std\":{spread},\"seed_pairwise\":1.0}}]}}");
            std::fs::write(run.join(format!("samples/step-{step:06}.consistency.json")), json).unwrap();
            let prompt = crate::sample::drift::PromptDrift {
                prompt: "a shape".into(),
                mean: drift,
                per_seed: vec![drift],
                pixels,
                pixels_per_seed: pixels.into_iter().collect(),
            };
            let drift = crate::sample::drift::Drift {
                metric: "m".into(),
                base: "b".into(),
                mean: drift,
                pixel_metric: pixels.map(|_| "p".into()),
                pixels,
                prompts: vec![prompt],
            };
            drift.save(&run.join(format!("samples/step-{step:06}.drift.json"))).unwrap();
            writeln!(metrics, "{{\"step\":{step},\"loss\":0.1}}\n{{\"step\":{step},\"validation_loss\":{val}}}").unwrap();
        }
        std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        dir
    }

    /// `(step, score)` of each row of a printed table, read as a user would.
    fn printed_scores(printed: &str) -> Vec<(u64, f64)> {
        printed
            .lines()
            .skip(1)
            .filter(|l| !l.starts_with("recommended"))
            .map(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                (cells[0].parse().unwrap(), cells[6].parse().unwrap())
            })
            .collect()
    }

    /// Three saves: the figures in the files decide, and the printed
    /// table's recommendation is its lowest printed score.
    #[test]
    fn the_choice_is_the_lowest_score_of_the_printed_figures() {
        let dir = run_with(&[(10, 30.0, 2.0, 0.20, 1.0, None), (20, 18.0, 1.0, 0.15, 6.0, None), (30, 17.0, 4.0, 0.19, 3.0, None)]);
        let all = candidates(dir.path()).unwrap();
        let printed = table(&all);
        let rows = printed_scores(&printed);
        assert_eq!(rows.len(), 3, "{printed}");
        let best = rows.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
        assert!(printed.contains(&format!("recommended: step {best} ")), "{printed}");
        // Scores: step 10 (1 + 1/3 + 0 + 1) / 4 = 0.583; step 20 (1/13 + 0 + 1 + 0) / 4 = 0.269;
        // step 30 (0 + 1 + 2/5 + 0.8) / 4 = 0.55. The drift alone would pick step 10; with the rest, 20.
        assert_eq!(best, 20, "{printed}");
        assert!(printed.contains("0.15000"), "{printed}");
        assert!(printed.contains("drift 6.00"), "the recommendation names its figures: {printed}");
        assert!(!printed.contains("pixel drift"), "no pixel drift in these files, none named: {printed}");
        let drift_of = |step: u64| all.iter().find(|c| c.step == step).unwrap().drift;
        assert_eq!((drift_of(10), drift_of(30)), (Some(1.0), Some(3.0)));
        assert!((all[0].score - (1.0 + 1.0 / 3.0 + 0.0 + 1.0) / 4.0).abs() < 1e-12, "{printed}");
    }

    /// The pixel drift shares the drift's part of the score with the
    /// palette drift, and changes the choice where it disagrees.
    #[test]
    fn the_pixel_drift_shares_the_drifts_part() {
        let figures = |pixels: [Option<f64>; 3]| {
            run_with(&[(10, 20.0, 1.0, 0.10, 2.0, pixels[0]), (20, 10.0, 1.0, 0.10, 2.0, pixels[1]), (30, 12.0, 1.0, 0.10, 2.0, pixels[2])])
        };
        // By palette alone step 20 wins.
        let without = candidates(figures([None; 3]).path()).unwrap();
        assert_eq!(choice(&without).map(|c| c.step), Some(20));
        // Its control images moved most in pixels, and step 30's least.
        let dir = figures([Some(30.0), Some(50.0), Some(10.0)]);
        let all = candidates(dir.path()).unwrap();
        let printed = table(&all);
        assert!(printed.starts_with("step     palette  seed-spread  drift  pixel-drift  validation  score"), "{printed}");
        // Parts: palette 1, 0, 1/5; seed spread, palette drift and validation 0 for all;
        // pixel drift 1/2, 1, 0, so the drift part is 1/4, 1/2, 0.
        let expect = [(1.0 + 0.25) / 4.0, (0.0 + 0.5) / 4.0, (0.2 + 0.0) / 4.0];
        for (c, want) in all.iter().zip(expect) {
            assert!((c.score - want).abs() < 1e-12, "step {}: {} against {want}: {printed}", c.step, c.score);
        }
        let rows = printed_scores(&printed);
        let best = rows.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
        assert_eq!(best, 30, "{printed}");
        assert!(printed.contains("recommended: step 30 ") && printed.contains("pixel drift 10.00"), "{printed}");
        let row = printed.lines().find(|l| l.starts_with("30 ")).unwrap();
        assert_eq!(row.split_whitespace().nth(4), Some("10.00"), "{printed}");
    }

    #[test]
    fn a_run_without_saves_is_refused_in_words() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let err = candidates(dir.path()).unwrap_err().to_string();
        assert!(err.contains("--save-every"), "{err}");
    }
}
