//! `sdtune lora resize|merge`: edit LoRA files without a model.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::lora::{merge, resize};

pub const EXAMPLES: &str = "\
Examples:
  sdtune lora resize brand.safetensors --rank 8 --out brand-r8.safetensors
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --out both.safetensors
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --rank 16 --out both-r16.safetensors

Both work on plain LoRA and LoCon files (kohya or diffusers layout) and write the
result in the input's layout, atomically. LoHa and LoKr files are refused.";

const RESIZE_EXAMPLES: &str = "\
Examples:
  sdtune lora resize brand.safetensors --rank 8 --out brand-r8.safetensors

Each module's weight change (alpha / rank * up @ down) is cut to the new rank by SVD,
the best approximation of that rank; modules already at or below it are copied as
they are. As kohya's resize_lora.py, each module keeps its scale (alpha = scale * new
rank); where modules would end up with different alphas, all get the highest rank
as alpha instead (diffusers reads only one per kohya file). Prints how much of the change was kept (sum of kept squared singular values
over all of them): the lowest and the mean over modules.";

const MERGE_EXAMPLES: &str = "\
Examples:
  sdtune lora merge brand.safetensors:0.7 style.safetensors:0.4 --out both.safetensors
  sdtune lora merge a.safetensors b.safetensors --rank 16 --out ab.safetensors

Each module becomes the sum of strength * its weight change in every file that has
it, cut back to a low rank by SVD: --rank, or by default (and at most) the sum of the
inputs' ranks at that module, at which the sum is exact. A module only one file has is copied,
times its strength. Where modules' alphas would differ, all get the highest rank as
alpha (diffusers reads only one alpha per kohya file). The files must be for the same base model and in one layout;
the header is the first file's, with the merge recorded.";

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
}

pub fn run(args: LoraArgs) -> Result<()> {
    match args.command {
        LoraCommand::Resize(a) => {
            let r = resize::resize(&a.input, a.rank, &a.out)?;
            println!(
                "wrote {}: {} modules, {} cut from rank {} to {}; kept energy min {:.4}, mean {:.4}",
                a.out.display(),
                r.modules,
                r.truncated,
                r.old_rank,
                a.rank,
                r.min_energy,
                r.mean_energy
            );
        }
        LoraCommand::Merge(a) => {
            let inputs = a.inputs.iter().map(|s| merge::parse_input(s)).collect::<Result<Vec<_>>>()?;
            let m = merge::merge(&inputs, a.rank, &a.out)?;
            println!(
                "wrote {}: {} modules ({} in more than one file), rank up to {}; kept energy min {:.4}, mean {:.4}",
                a.out.display(),
                m.modules,
                m.shared,
                m.max_rank,
                m.min_energy,
                m.mean_energy
            );
        }
    }
    Ok(())
}
