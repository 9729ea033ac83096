//! Where keyfront's time comes from: the system clock, or (only in builds with the
//! `test-hooks` feature) a clock that tests move forward to cross pending windows and expiries.
//!
//! A clock has two readings: wall time (what dates are written in) and monotonic time (how much
//! time really passed). The scheduler compares them to notice a wall clock that jumped.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + 'static {
    /// Wall time now.
    fn now(&self) -> SystemTime;

    /// Time elapsed since some fixed point, never going backwards and not moved by changes to
    /// the wall clock.
    fn monotonic(&self) -> Duration;

    /// Wall time now, in whole seconds since the Unix epoch.
    fn now_secs(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// The system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    started: Instant,
}

impl SystemClock {
    /// The system clock, monotonic time counted from now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn monotonic(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The system clock plus offsets that tests move: [`TestClock::advance`] lets time pass (wall
/// and monotonic alike), [`TestClock::jump`] moves only the wall clock, as a wrong NTP step or
/// an operator's mistake would.
#[cfg(feature = "test-hooks")]
#[derive(Debug, Default)]
pub struct TestClock {
    system: SystemClock,
    wall_offset_secs: std::sync::atomic::AtomicU64,
    monotonic_offset_secs: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "test-hooks")]
impl TestClock {
    /// Lets `by` pass.
    pub fn advance(&self, by: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        self.wall_offset_secs.fetch_add(by.as_secs(), SeqCst);
        self.monotonic_offset_secs.fetch_add(by.as_secs(), SeqCst);
    }

    /// Moves the wall clock forward by `by` without time passing.
    pub fn jump(&self, by: Duration) {
        self.wall_offset_secs
            .fetch_add(by.as_secs(), std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(feature = "test-hooks")]
impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        let offset = self
            .wall_offset_secs
            .load(std::sync::atomic::Ordering::SeqCst);
        self.system.now() + Duration::from_secs(offset)
    }

    fn monotonic(&self) -> Duration {
        let offset = self
            .monotonic_offset_secs
            .load(std::sync::atomic::Ordering::SeqCst);
        self.system.monotonic() + Duration::from_secs(offset)
    }
}
