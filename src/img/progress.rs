//! The progress bar of long verbs (`convert -p`, `commit -p`): drawn on stderr only when
//! it is a terminal, so scripts and logs never receive control characters.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Progress over a number of guest bytes; does nothing when not shown.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes, shown when `requested` (-p) and stderr is a terminal.
    pub fn new(requested: bool, total: u64, label: &str) -> Progress {
        if !requested || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(total);
        let template = "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        Progress { bar: Some(bar) }
    }

    /// A progress that is never drawn (library callers such as the demo).
    pub fn hidden() -> Progress {
        Progress { bar: None }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
