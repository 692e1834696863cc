//! `sdtune pick [RUN_DIR]`: ranks a run's saved steps and names the one to use.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::config::Config;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune pick                       the run named in ./sdtune.yaml (output/<name>)
  sdtune pick output/acme           any run folder

Scores every saved LoRA (lora/step-NNNNNN.safetensors) on the figures the run wrote for
its step: palette distance of its grid to the brand set, spread across seeds, prompt
drift (how far the images of the class prompt and sample.control_prompts moved from the
base model's at the same seeds, 0 being the base model: `drift` in palette distance, which
sees colour, `pixel-drift` as the mean absolute RGB difference 0..255, which sees layout
and shape too) and the validation loss (train with --validation-split). Each is scaled to
0..1 over the steps; the score is the mean of four parts (palette, seed spread, drift with
its two distances averaged, validation), lower is better.";

#[derive(Args, Debug)]
pub struct PickArgs {
    /// The run folder [default: <output>/<name> from ./sdtune.yaml].
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: Option<PathBuf>,
}

pub fn run(args: PickArgs) -> Result<()> {
    let dir = match args.run_dir {
        Some(dir) => dir,
        None => {
            let config = Config::load_from_dir(Path::new("."))?.unwrap_or_default();
            Path::new(&config.train.output).join(&config.train.name)
        }
    };
    let candidates = crate::pick::candidates(&dir)?;
    print!("{}", crate::pick::table(&candidates));
    Ok(())
}
