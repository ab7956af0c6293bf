//! Progress bars for long runs (a splice table, a matrix, a benchmark
//! suite, `reach doctor`): shown on stderr with a count and an ETA
//! when both stdout and stderr are terminals, and nothing at all otherwise,
//! so logs, pipes and CI output stay as they were.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a bar looks: what, the bar, the count, time so far and left, and
/// what runs now.
const TEMPLATE: &str =
    "{prefix} [{bar:32}] {pos}/{len}  {elapsed_precise} elapsed, ETA {eta}  {msg}";

/// A count of steps done out of a known total.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` steps of `what` ("splicing pairs", ...), drawn
    /// only on a terminal.
    pub fn new(total: u64, what: &str) -> Self {
        let shown = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Self::with_target(total, what, shown)
    }

    fn with_target(total: u64, what: &str, shown: bool) -> Self {
        let target = if shown {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let style = ProgressStyle::with_template(TEMPLATE)
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        if shown {
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        Self { bar }
    }

    /// Says what runs now (the pair, the benchmark).
    pub fn doing(&self, what: impl Into<String>) {
        self.bar.set_message(what.into());
    }

    /// One step done.
    pub fn step(&self) {
        self.bar.inc(1);
    }

    /// Whether the bar is drawn.
    pub fn shown(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Steps done so far.
    pub fn done(&self) -> u64 {
        self.bar.position()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // The bar leaves the screen; what the run prints stays.
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_a_terminal_nothing_is_drawn_and_steps_still_count() {
        // As `new` makes it off a terminal (a test may itself run on one).
        let p = Progress::with_target(3, "steps", false);
        assert!(!p.shown());
        p.doing("first");
        p.step();
        p.step();
        assert_eq!(p.done(), 2);
        assert!(
            ProgressStyle::with_template(TEMPLATE).is_ok(),
            "the bar's template parses"
        );
    }
}
