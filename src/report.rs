//! `report.html`: one self-contained page per training run — the sample
//! grids over the steps, the loss curve, the consistency figures over the
//! steps and the run's settings. Images are inlined as base64 data URIs and
//! the charts are inline SVG, so the file can be mailed or attached alone.
//!
//! It reads only what the run wrote into its folder: `settings.json`,
//! `metrics.jsonl`, `samples/step-NNNNNN.png` with their
//! `.consistency.json` (palette distances to the brand set, computed by
//! [`crate::sample::metrics`]), and any other PNG under `samples/` (e.g. a
//! before/after grid `sdtune sample --compare` wrote there).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The report's file name inside the run folder.
pub const REPORT_FILE: &str = "report.html";

/// One grid rendered while training, with its figures when there are any.
struct Grid {
    step: u64,
    png: PathBuf,
    figures: Option<StepFigures>,
    /// Per concept: its prompts against its own images.
    concepts: Vec<(String, StepFigures)>,
}

/// The palette distances of one grid (all its images, one variant).
#[derive(Clone, Copy)]
struct StepFigures {
    mean: f64,
    seed_std: f64,
    seed_pairwise: f64,
}

#[derive(Deserialize)]
struct ConsistencyFile {
    variants: Vec<VariantFigure>,
    #[serde(default)]
    concepts: Vec<ConceptFigure>,
}

#[derive(Deserialize)]
struct ConceptFigure {
    concept: String,
    variants: Vec<VariantFigure>,
}

#[derive(Deserialize)]
struct VariantFigure {
    variant: String,
    mean: f64,
    seed_std: f64,
    seed_pairwise: f64,
}

#[derive(Deserialize, Default)]
struct SettingsFile {
    #[serde(default)]
    name: String,
    #[serde(default)]
    settings: Vec<(String, String)>,
    #[serde(default)]
    device: String,
    #[serde(default)]
    prompts: Vec<String>,
    #[serde(default)]
    seeds: Vec<u64>,
}

/// Writes `<run_dir>/report.html`; returns its path.
pub fn write(run_dir: &Path) -> Result<PathBuf> {
    if run_dir.is_file() {
        bail!("{} is a file, not a folder; pass the folder of a training run (output/<name>)", run_dir.display());
    }
    if !run_dir.is_dir() {
        bail!("{} does not exist; pass the folder of a training run (output/<name>)", run_dir.display());
    }
    let settings: SettingsFile = match std::fs::read_to_string(run_dir.join("settings.json")) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{} is damaged", run_dir.join("settings.json").display()))?,
        Err(_) => SettingsFile::default(),
    };
    let losses = read_losses(&run_dir.join("metrics.jsonl"))?;
    let validation = read_validation(&run_dir.join("metrics.jsonl"));
    let (grids, others) = read_samples(&run_dir.join("samples"))?;
    if losses.is_empty() && grids.is_empty() {
        bail!("{} holds no metrics.jsonl and no sample grids; is it a training run folder?", run_dir.display());
    }
    let name = if settings.name.is_empty() {
        run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned())
    } else {
        settings.name.clone()
    };
    let mut html = render(&name, &settings, &losses, &grids, &others)?;
    if let Ok(candidates) = crate::pick::candidates(run_dir) {
        let at = html.find("<h2>Settings</h2>").or_else(|| html.rfind("</body>")).unwrap_or(html.len());
        let section = format!(
            "<h2>Which step to use</h2>\n<pre>{}</pre>\n<p class=\"note\">As <code>sdtune pick</code> ranks the saved steps: palette distance, seed spread, prompt drift of the control prompts from the base model (<code>drift</code> in palette distance, <code>pixel-drift</code> as the mean absolute RGB difference, 0..255, which sees layout and shape as well) and validation loss, each scaled to 0..1 over the steps, the drift's two averaged into one part; lower is better.</p>\n",
            escape(&crate::pick::table(&candidates))
        );
        html.insert_str(at, &section);
    }
    if !validation.is_empty() {
        // Beside the training loss: right after its section's note.
        let at = html.find("<h2>Consistency over steps</h2>").unwrap_or(html.len());
        html.insert_str(at, &validation_section(&losses, &validation));
    }
    let path = run_dir.join(REPORT_FILE);
    crate::fsutil::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// `(step, loss)` of every recorded step with a finite loss.
fn read_losses(path: &Path) -> Result<Vec<(u64, f64)>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            if loss.is_finite() {
                out.push((step, loss));
            }
        }
    }
    Ok(out)
}

/// `(step, validation loss)` of every validation line of metrics.jsonl.
fn read_validation(path: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["validation_loss"].as_f64()?)))
        .filter(|(_, l)| l.is_finite())
        .collect()
}

/// The validation loss over the steps, drawn on the training loss's
/// axes (its smoothed curve beside it), and its table.
fn validation_section(losses: &[(u64, f64)], validation: &[(u64, f64)]) -> String {
    let mut smoothed = Vec::with_capacity(losses.len());
    let mut m = f64::NAN;
    for &(s, l) in losses {
        m = if m.is_nan() { l } else { 0.9 * m + 0.1 * l };
        smoothed.push((s as f64, m));
    }
    let points: Vec<(f64, f64)> = validation.iter().map(|&(s, l)| (s as f64, l)).collect();
    let top = points.iter().chain(&smoothed).map(|p| p.1).fold(0.0, f64::max);
    let last = points.iter().chain(&smoothed).map(|p| p.0).fold(1.0, f64::max);
    let axes = Axes { x: (0.0, last), y: (0.0, top * 1.05) };
    let mut body = format!("{}{}{}", axes.frame("step"), polyline(&smoothed, &axes, "#1d6f66", 2.0), polyline(&points, &axes, "#e76f51", 2.0));
    for &(x, y) in &points {
        let _ = write!(body, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#e76f51\"/>", axes.px(x), axes.py(y));
    }
    let mut h = String::from("<h2>Validation loss</h2>\n");
    h.push_str(&svg(&body, "validation loss and smoothed training loss by step"));
    h.push_str("<table><tr><th>step</th><th>validation loss</th></tr>\n");
    for (step, loss) in validation {
        let _ = writeln!(h, "<tr><td>{step}</td><td>{loss:.5}</td></tr>");
    }
    h.push_str("</table>\n<p class=\"note\">Validation loss (orange): plain MSE on the held-out images at fixed timesteps and noise, so it moves only when the weights do; the smoothed training loss (dark) for comparison.</p>\n");
    h
}

/// The training grids in step order, and the other PNGs of `samples/`.
fn read_samples(dir: &Path) -> Result<(Vec<Grid>, Vec<PathBuf>)> {
    let (mut grids, mut others) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok((grids, others)) };
    for entry in entries.flatten() {
        let path = entry.path();
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !file.ends_with(".png") {
            continue;
        }
        match file.strip_prefix("step-").and_then(|r| r.strip_suffix(".png")).and_then(|s| s.parse().ok()) {
            Some(step) => {
                let file = read_consistency(&path.with_extension("consistency.json"));
                let figures = file.as_ref().and_then(|f| trained_variant(&f.variants));
                let concepts = file.map_or(Vec::new(), |f| {
                    f.concepts.iter().filter_map(|c| trained_variant(&c.variants).map(|v| (c.concept.clone(), v))).collect()
                });
                grids.push(Grid { step, png: path, figures, concepts });
            }
            // Images of a grid sit beside it as <grid>-p<row>-s<seed>.png; only grids are shown.
            None if !is_grid_member(&file) => others.push(path),
            None => {}
        }
    }
    grids.sort_by_key(|g| g.step);
    others.sort();
    Ok((grids, others))
}

/// `name-p1-s42.png` or `name-p1-s42-lora.png`: one image of a grid, written beside it.
fn is_grid_member(file: &str) -> bool {
    let stem = file.trim_end_matches(".png");
    stem.split('-').collect::<Vec<_>>().windows(2).any(|w| {
        w[0].strip_prefix('p').is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
            && w[1].strip_prefix('s').is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
    })
}

fn read_consistency(path: &Path) -> Option<ConsistencyFile> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The figures of the trained model (not the base beside it).
fn trained_variant(variants: &[VariantFigure]) -> Option<StepFigures> {
    let v = variants.iter().find(|v| v.variant != "base").or(variants.first())?;
    Some(StepFigures { mean: v.mean, seed_std: v.seed_std, seed_pairwise: v.seed_pairwise })
}

fn render(name: &str, settings: &SettingsFile, losses: &[(u64, f64)], grids: &[Grid], others: &[PathBuf]) -> Result<String> {
    let mut h = String::new();
    let title = format!("sdtune report: {}", escape(name));
    write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
    )?;
    h.push_str(&summary(losses, grids));

    if !others.is_empty() {
        h.push_str("<h2>Before / after</h2>\n");
        for path in others {
            let caption = path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
            write!(h, "<figure>{}<figcaption>{}</figcaption></figure>\n", img_tag(path)?, escape(&caption))?;
        }
    }

    h.push_str("<h2>Loss</h2>\n");
    if losses.is_empty() {
        h.push_str("<p>No steps were recorded.</p>\n");
    } else {
        h.push_str(&loss_chart(losses));
        h.push_str("<p class=\"note\">Training loss per step (light) and its exponential moving average (dark, 0.9). Single-step losses are noisy by design: each draws its own timesteps.</p>\n");
    }

    let measured: Vec<(u64, StepFigures)> = grids.iter().filter_map(|g| g.figures.map(|f| (g.step, f))).collect();
    h.push_str("<h2>Consistency over steps</h2>\n");
    if measured.is_empty() {
        h.push_str("<p>No consistency figures: the grids were rendered without a prepared brand set.</p>\n");
    } else {
        h.push_str(&consistency_chart(&measured));
        h.push_str("<table><tr><th>step</th><th>palette distance to the brand set</th><th>spread across seeds (std)</th><th>distance between seeds</th></tr>\n");
        for (step, f) in &measured {
            writeln!(h, "<tr><td>{step}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>", f.mean, f.seed_std, f.seed_pairwise)?;
        }
        h.push_str("</table>\n<p class=\"note\">Palette distance: sliced Earth mover's distance between CIE Lab colour histograms of each grid image and of the brand set, in ΔE-like units (lower is closer to the brand), averaged over the grid. Step 0 is the base model.</p>\n");
    }

    h.push_str(&concept_section(grids)?);

    h.push_str("<h2>Samples over training</h2>\n");
    if grids.is_empty() {
        h.push_str("<p>No grids were rendered (sample_every was 0).</p>\n");
    }
    for g in grids {
        let figure = g.figures.map_or(String::new(), |f| format!(" — palette distance {:.2}", f.mean));
        let label = if g.step == 0 { "step 0 (base model)".to_string() } else { format!("step {}", g.step) };
        write!(h, "<figure>{}<figcaption>{label}{figure}</figcaption></figure>\n", img_tag(&g.png)?)?;
    }

    h.push_str("<h2>Settings</h2>\n<table>\n");
    for (k, v) in &settings.settings {
        writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v))?;
    }
    if !settings.device.is_empty() {
        writeln!(h, "<tr><th>device</th><td>{}</td></tr>", escape(&settings.device))?;
    }
    if !settings.prompts.is_empty() {
        let prompts: Vec<String> = settings.prompts.iter().map(|p| escape(p)).collect();
        writeln!(h, "<tr><th>grid prompts</th><td>{}</td></tr>", prompts.join("<br>"))?;
    }
    if !settings.seeds.is_empty() {
        let seeds: Vec<String> = settings.seeds.iter().map(u64::to_string).collect();
        writeln!(h, "<tr><th>grid seeds</th><td>{}</td></tr>", seeds.join(", "))?;
    }
    h.push_str("</table>\n<p class=\"note\">Written by sdtune ");
    h.push_str(env!("CARGO_PKG_VERSION"));
    h.push_str(".</p>\n</body></html>\n");
    Ok(h)
}

/// The concepts learned and not: each concept's prompts against its own
/// images, per grid; nothing for a set without concepts.
fn concept_section(grids: &[Grid]) -> Result<String> {
    let mut names: Vec<&str> = Vec::new();
    for g in grids {
        for (name, _) in &g.concepts {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        return Ok(String::new());
    }
    let mut h = String::from("<h2>Consistency per concept</h2>\n<ul class=\"concepts\">\n");
    for name in &names {
        let series: Vec<(u64, f64)> =
            grids.iter().filter_map(|g| g.concepts.iter().find(|(n, _)| n == name).map(|(_, f)| (g.step, f.mean))).collect();
        let (Some(first), Some(last)) = (series.first(), series.last()) else { continue };
        let change = if first.0 < last.0 && first.1 > 0.0 {
            format!("{:.1} at step {} → {:.1} at step {} ({:+.0}%)", first.1, first.0, last.1, last.0, 100.0 * (last.1 - first.1) / first.1)
        } else {
            format!("{:.1} at step {}", last.1, last.0)
        };
        writeln!(h, "<li><b>{}</b>: palette distance to its own images {change}</li>", escape(name))?;
    }
    h.push_str("</ul>\n<table><tr><th>step</th>");
    for name in &names {
        write!(h, "<th>{}</th>", escape(name))?;
    }
    h.push_str("</tr>\n");
    for g in grids.iter().filter(|g| !g.concepts.is_empty()) {
        write!(h, "<tr><td>{}</td>", g.step)?;
        for name in &names {
            match g.concepts.iter().find(|(n, _)| n == name) {
                Some((_, f)) => write!(h, "<td>{:.2} ± {:.2}</td>", f.mean, f.seed_std)?,
                None => h.push_str("<td>–</td>"),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<p class=\"note\">Each concept's grid prompts (the rows whose caption, trigger word or name is the concept's) measured against that concept's own prepared images: mean palette distance ± its spread across seeds. A concept whose distance does not fall has not been learned yet; raise its repeats.</p>\n");
    Ok(h)
}

/// The headline: steps, final loss, palette distance before and after.
fn summary(losses: &[(u64, f64)], grids: &[Grid]) -> String {
    let mut parts = Vec::new();
    if let Some((step, _)) = losses.last() {
        parts.push(format!("{step} steps"));
        let tail = &losses[losses.len().saturating_sub(20)..];
        let mean = tail.iter().map(|(_, l)| l).sum::<f64>() / tail.len() as f64;
        parts.push(format!("loss {mean:.4} over the last {} steps", tail.len()));
    }
    let measured: Vec<(u64, f64)> = grids.iter().filter_map(|g| g.figures.map(|f| (g.step, f.mean))).collect();
    if let (Some(first), Some(last)) = (measured.first(), measured.last()) {
        if first.0 == 0 && last.0 > 0 && first.1 > 0.0 {
            parts.push(format!(
                "palette distance to the brand set {:.1} → {:.1} ({:+.0}%)",
                first.1,
                last.1,
                100.0 * (last.1 - first.1) / first.1
            ));
        }
    }
    if parts.is_empty() {
        return String::new();
    }
    format!("<p class=\"summary\">{}</p>\n", parts.join(" · "))
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}\
figure{margin:1em 0}figure img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}\
figcaption{color:#555;font-size:.9em}table{border-collapse:collapse;margin:1em 0}\
td,th{border:1px solid #ddd;padding:.3em .7em;text-align:left;font-size:.9em}th{background:#f6f6f6}\
.note{color:#666;font-size:.85em}.summary{font-size:1.05em;background:#f3f7f7;padding:.6em 1em;border-left:4px solid #2a9d8f}";

fn img_tag(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let alt = path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Ok(format!("<img alt=\"{}\" src=\"data:image/png;base64,{}\">", escape(&alt), base64(&bytes)))
}

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const CHART_W: f64 = 720.0;
const CHART_H: f64 = 240.0;
const MARGIN: (f64, f64, f64, f64) = (56.0, 16.0, 12.0, 28.0); // left, right, top, bottom

/// Maps data to the plot area of a chart.
struct Axes {
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64) -> f64 {
        let span = (self.x.1 - self.x.0).max(1e-12);
        MARGIN.0 + (x - self.x.0) / span * (CHART_W - MARGIN.0 - MARGIN.1)
    }

    fn py(&self, y: f64) -> f64 {
        let span = (self.y.1 - self.y.0).max(1e-12);
        CHART_H - MARGIN.3 - (y - self.y.0) / span * (CHART_H - MARGIN.2 - MARGIN.3)
    }

    /// The frame, four horizontal grid lines with values, and x ticks.
    fn frame(&self, x_label: &str) -> String {
        let mut s = String::new();
        for i in 0..=4 {
            let y = self.y.0 + (self.y.1 - self.y.0) * i as f64 / 4.0;
            let py = self.py(y);
            let _ = write!(
                s,
                "<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#666\">{}</text>",
                MARGIN.0,
                CHART_W - MARGIN.1,
                MARGIN.0 - 6.0,
                py + 4.0,
                short(y)
            );
        }
        for i in 0..=4 {
            let x = self.x.0 + (self.x.1 - self.x.0) * i as f64 / 4.0;
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#666\">{}</text>",
                self.px(x),
                CHART_H - MARGIN.3 + 16.0,
                x.round()
            );
        }
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#bbb\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#666\">{x_label}</text>",
            MARGIN.0,
            MARGIN.2,
            CHART_W - MARGIN.0 - MARGIN.1,
            CHART_H - MARGIN.2 - MARGIN.3,
            CHART_W - MARGIN.1,
            CHART_H - 2.0
        );
        s
    }
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn polyline(points: &[(f64, f64)], axes: &Axes, colour: &str, width: f64) -> String {
    let coords: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", axes.px(x), axes.py(y))).collect();
    format!("<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width}\" points=\"{}\"/>", coords.join(" "))
}

fn svg(body: &str, label: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {CHART_W} {CHART_H}\" width=\"{CHART_W}\" height=\"{CHART_H}\" role=\"img\" aria-label=\"{label}\">{body}</svg>\n"
    )
}

fn loss_chart(losses: &[(u64, f64)]) -> String {
    let raw: Vec<(f64, f64)> = losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    let mut ema = Vec::with_capacity(raw.len());
    let mut m = f64::NAN;
    for &(x, y) in &raw {
        m = if m.is_nan() { y } else { 0.9 * m + 0.1 * y };
        ema.push((x, m));
    }
    // The top of the axis follows the smoothed curve, so one outlier does not flatten it.
    let top = ema.iter().map(|p| p.1).fold(0.0, f64::max).max(raw.iter().map(|p| p.1).fold(0.0, f64::max).min(ema[0].1 * 1.5));
    let axes = Axes { x: (raw[0].0.min(1.0), raw.last().map_or(1.0, |p| p.0)), y: (0.0, top * 1.05) };
    let clipped: Vec<(f64, f64)> = raw.iter().map(|&(x, y)| (x, y.min(top * 1.05))).collect();
    let body = format!("{}{}{}", axes.frame("step"), polyline(&clipped, &axes, "#b9d8d3", 1.0), polyline(&ema, &axes, "#1d6f66", 2.0));
    svg(&body, "training loss by step")
}

fn consistency_chart(points: &[(u64, StepFigures)]) -> String {
    let xy: Vec<(f64, f64)> = points.iter().map(|(s, f)| (*s as f64, f.mean)).collect();
    let top = points.iter().map(|(_, f)| f.mean + f.seed_std).fold(0.0, f64::max);
    let axes = Axes { x: (0.0, xy.last().map_or(1.0, |p| p.0).max(1.0)), y: (0.0, top * 1.1) };
    let mut body = axes.frame("step");
    for (s, f) in points {
        let x = axes.px(*s as f64);
        let _ = write!(
            body,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#e9a48f\" stroke-width=\"2\"/><circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#e76f51\"/>",
            axes.py((f.mean - f.seed_std).max(0.0)),
            axes.py(f.mean + f.seed_std),
            axes.py(f.mean)
        );
    }
    body.push_str(&polyline(&xy, &axes, "#e76f51", 2.0));
    svg(&body, "palette distance to the brand set by step")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concepts_get_their_own_figures() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("samples")).unwrap();
        for (step, circle, star) in [(0, 80.0, 60.0), (10, 20.0, 59.0)] {
            image::RgbImage::new(4, 4).save(run.join(format!("samples/step-{step:06}.png"))).unwrap();
            let v = |m: f64| format!("[{{\"variant\":\"lora\",\"mean\":{m},\"seed_std\":0.5,\"seed_pairwise\":1.0}}]");
            let json = format!(
                "{{\"variants\":{},\"concepts\":[{{\"concept\":\"circle\",\"variants\":{}}},{{\"concept\":\"star <x>\",\"variants\":{}}}]}}",
                v(70.0),
                v(circle),
                v(star)
            );
            std::fs::write(run.join(format!("samples/step-{step:06}.consistency.json")), json).unwrap();
        }
        let page = std::fs::read_to_string(write(run).unwrap()).unwrap();
        assert!(page.contains("Consistency per concept"), "{page}");
        assert!(page.contains("<b>circle</b>: palette distance to its own images 80.0 at step 0 → 20.0 at step 10 (-75%)"), "{page}");
        assert!(page.contains("<b>star &lt;x&gt;</b>: palette distance to its own images 60.0 at step 0 → 59.0 at step 10 (-2%)"), "{page}");
        assert!(page.contains("<td>20.00 ± 0.50</td>"), "{page}");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn grid_members_are_told_from_grids() {
        assert!(is_grid_member("before-after-p1-s42.png"));
        assert!(is_grid_member("grid-p2-s3-lora.png"));
        assert!(!is_grid_member("before-after.png"));
        assert!(!is_grid_member("final.png"));
    }

    #[test]
    fn writes_a_self_contained_page() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("samples")).unwrap();
        let metrics: String = (1..=30).map(|s| format!("{{\"step\":{s},\"loss\":{}}}\n", 1.0 / s as f64)).collect();
        std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        image::RgbImage::new(4, 4).save(run.join("samples/step-000000.png")).unwrap();
        image::RgbImage::new(4, 4).save(run.join("samples/step-000030.png")).unwrap();
        for (step, mean) in [(0, 40.0), (30, 10.0)] {
            let json = format!("{{\"variants\":[{{\"variant\":\"lora\",\"mean\":{mean},\"seed_std\":1.0,\"seed_pairwise\":2.0}}]}}");
            std::fs::write(run.join(format!("samples/step-{step:06}.consistency.json")), json).unwrap();
        }
        std::fs::write(run.join("settings.json"), r#"{"name":"demo","settings":[["rank / alpha","4 / 4"]],"prompts":["a <b>"],"seeds":[1]}"#).unwrap();
        let page = std::fs::read_to_string(write(run).unwrap()).unwrap();
        assert!(page.contains("data:image/png;base64,"), "images are inlined");
        assert_eq!(page.matches("<svg").count(), 2, "loss and consistency charts");
        assert!(page.contains("40.0 → 10.0 (-75%)"), "{page}");
        assert!(!page.contains("Consistency per concept"), "a set without concepts has no such section");
        assert!(page.contains("a &lt;b&gt;") && page.contains("rank / alpha"));
        assert!(!page.contains("src=\"http"), "nothing is fetched");
    }
}
