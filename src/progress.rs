//! Progress bars (drawn only when stderr is a terminal).
use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` steps labelled `what`, with rate and ETA.
pub fn steps_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}
