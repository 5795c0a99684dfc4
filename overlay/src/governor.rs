//! Chooses between the two worker layouts from how busy the workers are.
//!
//! - **Steered** (light load): worker `i` is pinned to CPU `i`, and the kernel hands it the
//!   packets that CPU sends into a TAP or receives from the underlay (see `steer`). Every
//!   wake-up on a packet's path is then a context switch on the CPU already running, instead
//!   of waking a halted vCPU, which on a VM costs tens of microseconds per hop.
//! - **Spread** (heavy load): workers run anywhere and the kernel hashes flows to them, so
//!   the scheduler can put a busy worker on an idle CPU. Pinned, a bulk TCP stream has its
//!   sender, both nodes' workers and their softirq work on one CPU.
//!
//! Measured on a 2-vCPU test machine, two nodes with one container each, 3 runs of each
//! (ping -i 0.002 x500, iperf3 5 s): always spread, ping RTT 0.08-0.13 ms and one TCP stream
//! 7.1-9.6 Gbit/s; always steered, 0.06-0.07 ms and 6.2-8.3 Gbit/s. The governor takes both
//! (0.075-0.079 ms, 6.5-9.5 Gbit/s): steered while the busiest worker wants less than half a
//! CPU, spread as soon as one wants more, back to steered after half a second of quiet.
//! "Wants" is time run plus time spent runnable but waiting: a pinned worker that shares its
//! CPU with a busy sender never gets more than part of it. Switching costs a few syscalls,
//! so the hysteresis only keeps a bursty load from flapping.
//!
//! This module is the decision only, fed with samples; `dataplane` takes them and tells the
//! workers, and each worker applies it to itself (`steer`).

use std::time::Duration;

/// How often the workers' demand for CPU (time run plus time waiting to run) is sampled.
pub const SAMPLE: Duration = Duration::from_millis(100);
/// Spread when a worker wanted more than this fraction of a CPU during one sample.
const SPREAD_ABOVE: f64 = 0.5;
/// Steer again once every worker wanted less than this during [`QUIET_SAMPLES`] samples in a
/// row.
const STEER_BELOW: f64 = 0.2;
const QUIET_SAMPLES: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Steered,
    Spread,
}

#[derive(Debug)]
pub struct Governor {
    layout: Layout,
    quiet: u32,
}

impl Default for Governor {
    /// Starts steered: a data plane starts idle.
    fn default() -> Self {
        Governor {
            layout: Layout::Steered,
            quiet: 0,
        }
    }
}

impl Governor {
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Takes one sample: the largest fraction of a CPU any worker wanted since the last one.
    /// Returns the new layout if it changes.
    pub fn observe(&mut self, busiest: f64) -> Option<Layout> {
        let next = match self.layout {
            Layout::Steered if busiest > SPREAD_ABOVE => Layout::Spread,
            Layout::Steered => Layout::Steered,
            Layout::Spread => {
                self.quiet = if busiest < STEER_BELOW {
                    self.quiet + 1
                } else {
                    0
                };
                if self.quiet >= QUIET_SAMPLES {
                    Layout::Steered
                } else {
                    Layout::Spread
                }
            }
        };
        if next == self.layout {
            return None;
        }
        self.layout = next;
        self.quiet = 0;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_at_once_and_steers_after_quiet() {
        let mut g = Governor::default();
        assert_eq!(g.layout(), Layout::Steered);
        assert_eq!(g.observe(0.3), None, "moderate load stays steered");
        assert_eq!(g.observe(0.6), Some(Layout::Spread));
        for _ in 0..QUIET_SAMPLES - 1 {
            assert_eq!(g.observe(0.05), None);
        }
        assert_eq!(g.observe(0.05), Some(Layout::Steered));
        assert_eq!(g.layout(), Layout::Steered);
    }

    #[test]
    fn a_busy_sample_restarts_the_quiet_count() {
        let mut g = Governor::default();
        g.observe(0.9);
        for _ in 0..QUIET_SAMPLES - 1 {
            assert_eq!(g.observe(0.0), None);
        }
        assert_eq!(g.observe(0.3), None, "between the thresholds: not quiet");
        for _ in 0..QUIET_SAMPLES - 1 {
            assert_eq!(g.observe(0.0), None);
        }
        assert_eq!(g.observe(0.0), Some(Layout::Steered));
    }

    #[test]
    fn load_between_the_thresholds_keeps_either_layout() {
        let mut g = Governor::default();
        for _ in 0..20 {
            assert_eq!(g.observe(0.35), None);
        }
        g.observe(1.0);
        for _ in 0..20 {
            assert_eq!(g.observe(0.35), None);
        }
        assert_eq!(g.layout(), Layout::Spread);
    }
}
