//! `sdtune lora resize|merge`: edit LoRA files, without a model unless an
//! input holds LoHa, LoKr or DoRA modules (then `--model`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use tch::{Device, Kind};

use crate::loaders::model_files::ModelFiles;
use crate::loaders::source::LoadOptions;
use crate::lora::kohya_names::KohyaNames;
use crate::lora::{edit, merge, model_edit, resize, ModelLayers};
use crate::models::built::Built;
use crate::models::text_stack::TextStack;
use crate::models::unet::UNet2DConditionModel;

pub const EXAMPLES: &str = "\
Examples:
  sdtune lora resize brand.safetensors --rank 8 --out brand-r8.safetensors
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --out both.safetensors
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --rank 16 --out both-r16.safetensors

Both work on plain LoRA and LoCon files (kohya or diffusers layout) and write the
result in the input's layout, atomically. LoHa, LoKr and DoRA files need --model,
the base model they were trained for: each module's exact weight change against
that model is factored by SVD into a plain LoRA / LoCon pair.";

const RESIZE_EXAMPLES: &str = "\
Examples:
  sdtune lora resize brand.safetensors --rank 8 --out brand-r8.safetensors

Each module's weight change (alpha / rank * up @ down) is cut to the new rank by SVD,
the best approximation of that rank; modules already at or below it are copied as
they are. As kohya's resize_lora.py, each module keeps its scale (alpha = scale * new
rank); where modules would end up with different alphas, all get the highest rank
as alpha instead (diffusers reads only one per kohya file). Prints how much of the change was kept (sum of kept squared singular values
over all of them): the lowest and the mean over modules.

LoHa, LoKr and DoRA files need --model (the model they were trained for): each of
their modules becomes a plain LoRA / LoCon pair of --rank (at most the rank at which
it is exact) factored by SVD from its exact weight change against that model; a rank
at least the layer's size (e.g. --rank 4096) keeps it exactly. The result is a kohya
LoRA for kohya files, else a diffusers one.
  sdtune lora resize loha.safetensors --rank 16 --model ./sd15 --out loha-as-lora.safetensors";

const MERGE_EXAMPLES: &str = "\
Examples:
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --out both.safetensors
  sdtune lora merge a.safetensors b.safetensors --rank 16 --out ab.safetensors

Each module becomes the sum of strength * its weight change in every file that has
it, cut back to a low rank by SVD: --rank, or by default (and at most) the sum of the
inputs' ranks at that module, at which the sum is exact. A module only one file has is copied,
times its strength. Where modules' alphas would differ, all get the highest rank as
alpha (diffusers reads only one alpha per kohya file). The files must be for the same base model and in one layout;
the header is the first file's, with the merge recorded.

LoHa, LoKr and DoRA inputs need --model (the model they were trained for): a module
with such a change gets --rank, by default the highest rank among the inputs (at most
the rank at which its sum is exact), factored by SVD from the exact summed weight
change against that model. Then the files may also mix kohya and diffusers layouts;
the result is in the first file's.
  sdtune lora merge loha.safetensors:0.7 brand.safetensors:0.4 --model ./sd15 --out both.safetensors";

#[derive(Args, Debug)]
pub struct LoraArgs {
    #[command(subcommand)]
    pub command: LoraCommand,
}

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Cut a LoRA down to a lower rank by SVD (smaller file, nearly the same images).
    #[command(after_help = RESIZE_EXAMPLES)]
    Resize(ResizeArgs),
    /// Merge several LoRAs for one base model into one, each with a strength.
    #[command(after_help = MERGE_EXAMPLES)]
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The LoRA file to resize.
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// The new rank (modules at or below it are kept as they are).
    #[arg(long, allow_negative_numbers = true)]
    pub rank: i64,
    /// Where to write the resized LoRA (never the input itself).
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub base: BaseArgs,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// LoRA files, each with an optional strength after a colon (1 if none).
    #[arg(value_name = "FILE[:STRENGTH]", required = true, allow_negative_numbers = true)]
    pub inputs: Vec<String>,
    /// The rank of every merged module [default: the sum of the inputs' ranks there].
    #[arg(long, allow_negative_numbers = true)]
    pub rank: Option<i64>,
    /// Where to write the merged LoRA (never one of the inputs).
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub base: BaseArgs,
}

/// The base model LoHa, LoKr and DoRA inputs are turned into LoRA against.
#[derive(Args, Debug)]
pub struct BaseArgs {
    /// The model a LoHa, LoKr or DoRA input was trained for (as sample takes it:
    /// a diffusers folder, a single-file .safetensors checkpoint or a Hub id in the
    /// local cache); loaded only when an input needs it.
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<PathBuf>,
    /// Weight variant of a diffusers folder or Hub id, e.g. fp16.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
}

pub fn run(args: LoraArgs) -> Result<()> {
    match args.command {
        LoraCommand::Resize(a) => {
            let inputs = [a.input.as_path()];
            let r = match needs_model(&inputs, &a.base)? {
                None => resize::resize(&a.input, a.rank, &a.out)?,
                Some(model) => {
                    check_before_loading(a.rank, &a.out, &inputs)?;
                    let base = Base::load(model, &a.base)?;
                    model_edit::resize(&a.input, a.rank, &a.out, &base.layers())?
                }
            };
            println!(
                "wrote {}: {} modules{}, {} cut from rank {} to {}; kept energy min {:.4}, mean {:.4}",
                a.out.display(),
                r.modules,
                converted(r.converted),
                r.truncated,
                r.old_rank,
                r.new_rank,
                r.min_energy,
                r.mean_energy
            );
        }
        LoraCommand::Merge(a) => {
            let inputs = a.inputs.iter().map(|s| merge::parse_input(s)).collect::<Result<Vec<_>>>()?;
            let paths: Vec<&Path> = inputs.iter().map(|i| i.path.as_path()).collect();
            let m = match needs_model(&paths, &a.base)? {
                None => merge::merge(&inputs, a.rank, &a.out)?,
                Some(model) => {
                    check_before_loading(a.rank.unwrap_or(1), &a.out, &paths)?;
                    let base = Base::load(model, &a.base)?;
                    model_edit::merge(&inputs, a.rank, &a.out, &base.layers())?
                }
            };
            println!(
                "wrote {}: {} modules ({} in more than one file{}), rank up to {}; kept energy min {:.4}, mean {:.4}",
                a.out.display(),
                m.modules,
                m.shared,
                converted(m.converted),
                m.max_rank,
                m.min_energy,
                m.mean_energy
            );
        }
    }
    Ok(())
}

fn converted(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} LoHa/LoKr/DoRA changes made LoRA by SVD")
    }
}

/// The model to load when an input holds LoHa, LoKr or DoRA modules; one
/// sentence naming the file and the kind when `--model` is missing. Plain
/// inputs need none (`--model` is then not loaded, and the result is the same).
fn needs_model<'a>(inputs: &[&Path], base: &'a BaseArgs) -> Result<Option<&'a Path>> {
    let Some((path, kind)) = inputs.iter().find_map(|p| edit::model_kind(p).map(|k| (*p, k))) else { return Ok(None) };
    match &base.model {
        Some(model) => Ok(Some(model.as_path())),
        None => bail!("{}", edit::needs_model_sentence(path, kind)),
    }
}

/// What can be refused before the model is loaded (which takes a while for SDXL).
fn check_before_loading(rank: i64, out: &Path, inputs: &[&Path]) -> Result<()> {
    if rank < 1 {
        bail!("--rank {rank} is not a LoRA rank; give a whole number of at least 1");
    }
    for input in inputs {
        edit::check_is_file(input, "the LoRA")?;
    }
    if let Some(format) = model_edit::output_format(inputs[0]) {
        edit::check_out(out, inputs, format)?;
    }
    Ok(())
}

/// The base model's UNet and text encoders in fp32 on the CPU (for exact
/// weight changes; no VAE).
struct Base {
    unet: Built<UNet2DConditionModel>,
    text: TextStack,
    kohya: KohyaNames,
}

impl Base {
    fn load(model: &Path, args: &BaseArgs) -> Result<Self> {
        let options = LoadOptions { variant: args.variant.clone(), ..LoadOptions::default() };
        let files = ModelFiles::of(&model.to_string_lossy(), &options)?;
        let unet = files.load_unet(Device::Cpu, Kind::Float)?;
        let text = files.load_text_stack(Device::Cpu, Kind::Float)?;
        Ok(Base { unet, text, kohya: KohyaNames::of(&files.unet_config)? })
    }

    fn layers(&self) -> ModelLayers<'_> {
        ModelLayers {
            unet: &self.unet.layers,
            text_encoder: Some(&self.text.first().model.layers),
            text_encoder_2: self.text.encoders.get(1).map(|e| &e.model.layers),
            kohya: self.kohya.clone(),
        }
    }
}
