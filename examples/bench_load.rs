//! Peak resident memory while loading a full-size SD1.5-config model
//! (random weights), fp32 vs fp16, single file and diffusers folder.
//!
//!     cargo run --release --example bench_load -- [DIR]     (default target/bench-load)
//!
//! Writes, once, random SD1.5 weights (1.07B parameters) as an LDM single
//! file in fp32 and fp16 and as a diffusers folder in fp32 (about 11 GB in
//! all), then loads each case in a fresh child process and reads its
//! VmHWM (peak resident set, file-backed pages included) from
//! /proc/self/status. Prints a Markdown table for BENCHMARKS.md.
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use sdtune::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};
use sdtune::loaders::single_file::{to_ldm, Family};
use sdtune::loaders::source::LoadOptions;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use tch::{Device, Kind, Tensor};

/// A tensor written to safetensors one at a time (converted to `kind` on
/// the way), so writing never holds a second copy of the model.
struct Out {
    tensor: Tensor,
    kind: Kind,
    shape: Vec<usize>,
}

impl Out {
    fn new(tensor: Tensor, kind: Kind) -> Self {
        let kind = if tensor.is_floating_point() { kind } else { tensor.kind() };
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        Out { tensor, kind, shape }
    }
}

impl View for Out {
    fn dtype(&self) -> Dtype {
        sdtune::loaders::tensor_file::dtype_of(self.kind).expect("a safetensors dtype")
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = self.tensor.to_kind(self.kind).contiguous();
        let mut bytes = vec![0u8; t.numel() * self.kind.elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, t.numel());
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.kind.elt_size_in_bytes()
    }
}

fn write(path: &Path, tensors: Vec<(String, Tensor)>, kind: Kind) -> Result<()> {
    let start = Instant::now();
    let items: Vec<(String, Out)> = tensors.into_iter().map(|(n, t)| (n, Out::new(t, kind))).collect();
    safetensors::serialize_to_file(items, None, path).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {} in {:.1} s", path.display(), start.elapsed().as_secs_f64());
    Ok(())
}

fn vars(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    vs.variables().into_iter().collect()
}

fn tokenizer_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1/tokenizer")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Random SD1.5 weights, written as single files (fp32, fp16) and a folder.
fn prepare(dir: &Path) -> Result<()> {
    let done = dir.join("done");
    if done.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let start = Instant::now();
    tch::manual_seed(0);
    let model = StableDiffusion::random(
        vec![ClipTextConfig::sd15()],
        UNetConfig::sd15(),
        VaeConfig::sd(),
        SchedulerConfig::sd(Prediction::Epsilon),
        Placement::cpu_f32(),
    )?;
    eprintln!("built random SD1.5 weights in {:.1} s", start.elapsed().as_secs_f64());
    for kind in [Kind::Float, Kind::Half] {
        let stem = format!("sd15-{}", if kind == Kind::Float { "fp32" } else { "fp16" });
        write(&dir.join(format!("{stem}.safetensors")), to_ldm(&model, Family::Sd1)?, kind)?;
        // The tokenizer a single file lacks, beside it (configs are read from the tensors).
        copy_dir(&tokenizer_source(), &dir.join(&stem).join("tokenizer"))?;
    }
    let folder = dir.join("sd15-diffusers");
    for (component, stem, vs, config) in [
        ("unet", "diffusion_pytorch_model", &model.unet.vs, serde_json::to_string(&model.unet_config)?),
        ("vae", "diffusion_pytorch_model", &model.vae.vs, serde_json::to_string(&model.vae_config)?),
        ("text_encoder", "model", &model.text.first().model.vs, serde_json::to_string(&model.text.first().config)?),
    ] {
        std::fs::create_dir_all(folder.join(component))?;
        std::fs::write(folder.join(component).join("config.json"), config)?;
        write(&folder.join(component).join(format!("{stem}.safetensors")), vars(vs), Kind::Float)?;
    }
    std::fs::create_dir_all(folder.join("scheduler"))?;
    std::fs::write(folder.join("scheduler/scheduler_config.json"), serde_json::to_string(&model.scheduler)?)?;
    std::fs::write(folder.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline"}"#)?;
    copy_dir(&tokenizer_source(), &folder.join("tokenizer"))?;
    std::fs::write(done, "")?;
    Ok(())
}

fn status_kb(field: &str) -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

/// Child: load `model` into `kind`, print one line of figures.
fn measure(model: &str, kind: Kind) -> Result<()> {
    // libtorch initialised before the baseline.
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)) + 1;
    let baseline = status_kb("VmHWM:");
    let start = Instant::now();
    let placement = Placement { device: Device::Cpu, kind, vae_kind: kind };
    let sd = StableDiffusion::load(model, placement, &LoadOptions::default())?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM:");
    let bytes: i64 = [&sd.unet.vs, &sd.vae.vs, &sd.text.first().model.vs]
        .iter()
        .flat_map(|vs| vs.variables().into_values())
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
        .sum();
    println!("{baseline} {peak} {bytes} {seconds:.2}");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("measure") {
        let kind = match args.get(2).map(String::as_str) {
            Some("fp16") => Kind::Half,
            Some("fp32") => Kind::Float,
            other => bail!("measure MODEL fp16|fp32, got {other:?}"),
        };
        return measure(&args[1], kind);
    }
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-load"));
    prepare(&dir)?;
    let exe = std::env::current_exe()?;
    let cases = [
        ("single file, fp32", "sd15-fp32.safetensors", "fp32"),
        ("single file, fp32", "sd15-fp32.safetensors", "fp16"),
        ("single file, fp16", "sd15-fp16.safetensors", "fp16"),
        ("single file, fp16", "sd15-fp16.safetensors", "fp32"),
        ("diffusers folder, fp32", "sd15-diffusers", "fp32"),
        ("diffusers folder, fp32", "sd15-diffusers", "fp16"),
    ];
    println!("| source | loaded as | model size | peak RSS (VmHWM) | RSS before loading | peak - before | load time |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let gib = |kb: f64| kb / (1024.0 * 1024.0);
    for (label, file, kind) in cases {
        let path = dir.join(file);
        let out = Command::new(&exe).args(["measure", path.to_str().unwrap(), kind]).output()?;
        if !out.status.success() {
            bail!("measuring {file} as {kind} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let (base, peak, bytes, secs) = (f[0], f[1], f[2] / 1024.0, f[3]);
        println!(
            "| {label} | {kind} | {:.2} GiB | {:.2} GiB | {:.2} GiB | {:.2} GiB | {secs:.1} s |",
            gib(bytes),
            gib(peak),
            gib(base),
            gib(peak - base)
        );
    }
    Ok(())
}
