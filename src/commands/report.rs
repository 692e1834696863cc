//! `sdtune report [RUN_DIR]`: writes a run's report.html again.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::config::Config;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune report                     the run named in ./sdtune.yaml (output/<name>/report.html)
  sdtune report output/acme         any run folder

`sdtune train` writes the report when it finishes; run this after adding grids to the
run's samples/ folder (e.g. sdtune sample --compare --out output/acme/samples/before-after.png).
One self-contained HTML file: images inlined, charts as SVG, nothing fetched.";


#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run folder [default: <output>/<name> from ./sdtune.yaml].
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let dir = match args.run_dir {
        Some(dir) => dir,
        None => {
            let config = Config::load_from_dir(Path::new("."))?.unwrap_or_default();
            Path::new(&config.train.output).join(&config.train.name)
        }
    };
    let path = crate::report::write(&dir)?;
    println!("wrote {}", path.display());
    Ok(())
}
