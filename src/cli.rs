//! Commands and flags only: each command parses its flags and calls the
//! library. Errors reach the user as one sentence, never a backtrace.
use clap::{Parser, Subcommand};

use crate::commands;

const ABOUT: &str = "Fine-tune Stable Diffusion on your own image set, so it renders your brand consistently.";

const AFTER_HELP: &str = "\
The job in three commands:
  sdtune prepare ./brand_photos     check images and captions, bucket, cache VAE latents
  sdtune train                      train a LoRA on the UNet attention layers
  sdtune sample --prompt \"...\"      render fixed-seed images to judge consistency

Check the set-up with `sdtune doctor`.

Exit codes:
  0    done
  1    error: one sentence on stderr says what is wrong and what to do
  2    the command line itself is wrong (unknown flag, missing value)
  130  interrupted (Ctrl-C or SIGTERM); `train` saved its state first, and
       `sdtune train --resume` continues from it";

#[derive(Parser, Debug)]
#[command(name = "sdtune", version, about = ABOUT, after_help = AFTER_HELP, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check an image folder, caption and bucket it, and cache its VAE latents.
    #[command(after_help = commands::prepare::EXAMPLES)]
    Prepare(commands::prepare::PrepareArgs),
    /// Train a LoRA on the prepared images (reads ./sdtune.yaml; every key has a flag).
    #[command(after_help = commands::train::EXAMPLES)]
    Train(commands::train::TrainArgs),
    /// Render fixed-seed images and labelled grids; judge them against the brand set.
    #[command(after_help = commands::sample::EXAMPLES)]
    Sample(commands::sample::SampleArgs),
    /// Print libtorch's version, CUDA availability and bf16 support.
    Doctor,
    /// Describe a model or LoRA: format, architecture, dtypes, parameters, prediction type.
    #[command(after_help = commands::info::EXAMPLES)]
    Info(commands::info::InfoArgs),
    /// Write a run's report.html again: grids over steps, loss curve, consistency, settings.
    #[command(after_help = commands::report::EXAMPLES)]
    Report(commands::report::ReportArgs),
    /// Rank a run's saved steps by palette distance, seed spread and validation loss; name the one to use.
    #[command(after_help = commands::pick::EXAMPLES)]
    Pick(commands::pick::PickArgs),
    /// Measure training steps/s, sampling s/image or encoding images/s and peak memory, no weights needed.
    #[command(after_help = commands::bench::EXAMPLES)]
    Bench(commands::bench::BenchArgs),
    /// Edit LoRA files: resize to a lower rank, or merge several into one.
    #[command(after_help = commands::lora::EXAMPLES)]
    Lora(commands::lora::LoraArgs),
    /// Serve the model over HTTP (API, A1111 route, web page), switching LoRA adapters per request.
    #[command(after_help = commands::serve::EXAMPLES)]
    Serve(commands::serve::ServeArgs),
}

/// Runs the command line; returns the process exit code.
pub fn run() -> i32 {
    install_panic_message();
    crate::runtime::keep_freed_memory();
    crate::interrupt::report_file_size_limits_as_errors();
    let cli = Cli::parse();
    let mode = match cli.command {
        Command::Train(_) => crate::interrupt::Mode::SaveThenStop,
        Command::Serve(_) => crate::interrupt::Mode::FinishThenStop,
        _ => crate::interrupt::Mode::Now,
    };
    if let Err(err) = crate::interrupt::install(mode) {
        eprintln!("warning: {}; Ctrl-C will stop sdtune without cleaning up", crate::errors::one_sentence(&err));
    }
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Sample(args) => commands::sample::run(args),
        Command::Doctor => commands::doctor::run(),
        Command::Info(args) => commands::info::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Pick(args) => commands::pick::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Lora(args) => commands::lora::run(args),
        Command::Serve(args) => commands::serve::run(args),
    };
    match result {
        Ok(()) => 0,
        // The command already said where it stopped and what was kept.
        Err(err) if err.is::<crate::interrupt::Interrupted>() => crate::interrupt::EXIT_INTERRUPTED,
        Err(err) => {
            eprintln!("error: {}", crate::errors::one_sentence(&err));
            1
        }
    }
}

/// A bug should still read as one plain message, not a Rust backtrace.
fn install_panic_message() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown cause");
        let first_line = msg.lines().next().unwrap_or(msg);
        eprintln!("error: sdtune hit an internal error ({first_line}); please report it with the command you ran");
    }));
}
