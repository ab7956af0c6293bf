//! Loss and jitter on a lab link, as the userspace hop applies them to each
//! frame (this kernel has no `netem`). Sans-IO: [`Impairment::admit`] takes
//! the frame's arrival time and says when to send it on, or to drop it; the
//! draws come from a seeded generator, so a lab run's losses are the same
//! sequence every time for the same frames.
//!
//! Loss is independent per frame (Bernoulli), which is what a test of "1%
//! loss" usually means; real links lose in bursts too, which this does not
//! model. Jitter adds a uniform extra delay of up to `jitter` to each frame
//! but keeps the frames in order (a frame is never sent before the one read
//! before it): reordering is rare on real paths and would confound a test of
//! loss recovery with one of reordering.

use std::time::{Duration, Instant};

use reach_proto::rng::Rng;

/// What a link does to frames besides its fixed delay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImpairConfig {
    /// Share of frames dropped, 0 to 1.
    pub loss: f64,
    /// Largest extra delay a frame gets.
    pub jitter: Duration,
    /// Seeds the draws.
    pub seed: u64,
}

/// One direction of a link's impairment.
pub struct Impairment {
    delay: Duration,
    config: ImpairConfig,
    rng: Rng,
    /// When the last frame admitted is due: later frames are not due before.
    last_due: Option<Instant>,
    /// Frames seen.
    pub frames: u64,
    /// Frames dropped.
    pub dropped: u64,
}

impl Impairment {
    /// A link direction with a fixed `delay` and `config`.
    pub fn new(delay: Duration, config: ImpairConfig) -> Self {
        Self {
            delay,
            rng: Rng::new(config.seed),
            config,
            last_due: None,
            frames: 0,
            dropped: 0,
        }
    }

    /// A frame read at `now`: when to send it on, or `None` to drop it.
    pub fn admit(&mut self, now: Instant) -> Option<Instant> {
        self.frames += 1;
        if self.config.loss > 0.0 && self.rng.unit() < self.config.loss {
            self.dropped += 1;
            return None;
        }
        let jitter = self.config.jitter.mul_f64(self.rng.unit());
        let due = now + self.delay + jitter;
        let due = self.last_due.map_or(due, |last| due.max(last));
        self.last_due = Some(due);
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(loss: f64, jitter_ms: u64, seed: u64) -> Impairment {
        Impairment::new(
            Duration::from_millis(10),
            ImpairConfig {
                loss,
                jitter: Duration::from_millis(jitter_ms),
                seed,
            },
        )
    }

    #[test]
    fn loss_is_near_its_share_and_the_same_for_the_same_seed() {
        let now = Instant::now();
        for loss in [0.001, 0.01, 0.1, 0.5] {
            let mut a = link(loss, 0, 7);
            let mut b = link(loss, 0, 7);
            let n = 200_000;
            let kept: Vec<bool> = (0..n).map(|_| a.admit(now).is_some()).collect();
            let again: Vec<bool> = (0..n).map(|_| b.admit(now).is_some()).collect();
            assert_eq!(kept, again, "seeded: the same drops");
            let share = a.dropped as f64 / n as f64;
            // Binomial standard deviation sqrt(p(1-p)/n); 5 of them.
            let tolerance = 5.0 * (loss * (1.0 - loss) / n as f64).sqrt();
            assert!(
                (share - loss).abs() < tolerance,
                "loss {loss}: dropped {share}"
            );
            assert_eq!(a.frames, n as u64);
        }
        let mut none = link(0.0, 0, 7);
        assert!((0..10_000).all(|_| none.admit(now).is_some()));
    }

    #[test]
    fn jitter_stays_within_its_bound_and_frames_keep_their_order() {
        let start = Instant::now();
        let mut l = link(0.0, 5, 3);
        let mut last = start;
        let mut spread = Duration::ZERO;
        for i in 0..10_000u64 {
            // Frames 0.1 ms apart, closer than the jitter.
            let now = start + Duration::from_micros(100 * i);
            let due = l.admit(now).expect("no loss");
            assert!(due >= last, "frame {i} overtook the one before");
            assert!(due >= now + Duration::from_millis(10));
            // Never more than the delay and the jitter after the latest
            // frame it may wait behind.
            assert!(due <= now + Duration::from_millis(15));
            spread = spread.max(due - now - Duration::from_millis(10));
            last = due;
        }
        assert!(spread > Duration::from_millis(4), "jitter used: {spread:?}");
        // No jitter: exactly the delay.
        let mut fixed = link(0.0, 0, 3);
        assert_eq!(fixed.admit(start), Some(start + Duration::from_millis(10)));
    }
}
