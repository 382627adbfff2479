//! Progress bars on standard error, only when it is a terminal and only once the
//! work has taken more than a second.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const DELAY: Duration = Duration::from_secs(1);

/// What the bar counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Bytes (shown with binary units and a rate).
    Bytes,
    /// Items (blocks, mappings).
    Items,
}

/// A progress bar that stays hidden unless standard error is a terminal and the
/// work lasts more than a second.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    delay: Duration,
    shown: bool,
}

impl Progress {
    /// A bar of `len` units; `len` 0 makes a spinner.
    pub fn new(what: &str, len: u64, unit: Unit) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = if len == 0 {
                ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
            } else {
                ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
            };
            let template = match (len, unit) {
                (0, _) => "{spinner} {msg} {elapsed}",
                (_, Unit::Bytes) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                (_, Unit::Items) => "{msg} [{bar:30}] {human_pos}/{human_len} eta {eta}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            bar
        });
        // A spinner turns by itself (nobody reports progress to it): show it at once.
        let delay = if len == 0 { Duration::ZERO } else { DELAY };
        let mut p = Progress { bar, started: Instant::now(), delay, shown: false };
        p.show_if_slow();
        p
    }

    fn show_if_slow(&mut self) {
        if let Some(bar) = &self.bar {
            if !self.shown && self.started.elapsed() >= self.delay {
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(Duration::from_millis(200));
                self.shown = true;
            }
        }
    }

    /// Set the position.
    pub fn set(&mut self, pos: u64) {
        self.show_if_slow();
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
