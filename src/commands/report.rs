//! `sdtune report [RUN_DIR]`: writes a run's report.html again.
use std::path::Path;

use anyhow::Result;

use crate::cli::ReportArgs;
use crate::config::Config;

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
