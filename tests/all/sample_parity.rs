//! `sdtune sample` on the tiny SD1 (epsilon) and SD2 (v-prediction) fixtures
//! gives diffusers' StableDiffusionPipeline image within 1/255 mean abs.
use crate::common;

use std::process::Command;

use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance: f64,
    width: i64,
    height: i64,
    scheduler: String,
    png: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(common::reference("ddim_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_reference_case_matches_diffusers() {
    let cases = cases();
    assert!(cases.len() >= 6, "expected at least 6 reference cases");
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for case in cases {
        let out = dir.path().join(format!("{}.png", case.name));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.args(["sample", "--device", "cpu", "--model"])
            .arg(common::fixtures().join(&case.model))
            .args(["--prompt", &case.prompt])
            .args(["--seed", &case.seed.to_string()])
            .args(["--steps", &case.steps.to_string()])
            .args(["--guidance", &case.guidance.to_string()])
            .args(["--width", &case.width.to_string()])
            .args(["--height", &case.height.to_string()])
            .args(["--scheduler", &case.scheduler])
            .arg("--out")
            .arg(&out);
        if let Some(neg) = &case.negative_prompt {
            cmd.args(["--negative-prompt", neg]);
        }
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{}: {}", case.name, String::from_utf8_lossy(&run.stderr));
        let ours = common::read_rgb(&out);
        let theirs = common::read_rgb(&common::reference(&case.png));
        let diff = common::mean_abs_pixel_diff(&ours, &theirs);
        eprintln!("{}: mean abs pixel diff {diff:.4} (of 255)", case.name);
        assert!(diff <= 1.0, "{}: mean abs pixel difference {diff} > 1/255", case.name);
    }
}
