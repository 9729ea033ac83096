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

/// The system clock plus an offset that another process sets (tests that restart the server
/// with `kill -9` and go on in simulated time: `tests/simulation.rs`). The file holds the
/// offset in whole seconds, added to wall and monotonic time alike (time passing, not a
/// jump); it is read when the clock is made and then every 5 ms by a thread of its own, so a
/// test that writes it waits a little before it counts on every process seeing it.
#[cfg(feature = "test-hooks")]
#[derive(Debug)]
pub struct FileClock {
    system: SystemClock,
    offset_secs: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[cfg(feature = "test-hooks")]
impl FileClock {
    /// The environment variable that names the file (`keyfront serve` and `keyfront dev` in
    /// builds with `test-hooks` take their clock from it when it is set).
    pub const ENV: &'static str = "KEYFRONT_TEST_CLOCK_FILE";

    /// A clock following the offset in `path` (0 while the file is missing or unreadable).
    pub fn watch(path: std::path::PathBuf) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
        };
        let offset_secs = std::sync::Arc::new(AtomicU64::new(read(&path).unwrap_or(0)));
        let shared = std::sync::Arc::clone(&offset_secs);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(5));
                if let Some(offset) = read(&path) {
                    // Time never goes back, whatever the file says.
                    shared.fetch_max(offset, Ordering::SeqCst);
                }
            }
        });
        Self {
            system: SystemClock::new(),
            offset_secs,
        }
    }

    /// The clock of `KEYFRONT_TEST_CLOCK_FILE`, if that variable is set.
    pub fn from_env() -> Option<Self> {
        std::env::var_os(Self::ENV).map(|path| Self::watch(path.into()))
    }
}

#[cfg(feature = "test-hooks")]
impl Clock for FileClock {
    fn now(&self) -> SystemTime {
        let offset = self.offset_secs.load(std::sync::atomic::Ordering::SeqCst);
        self.system.now() + Duration::from_secs(offset)
    }

    fn monotonic(&self) -> Duration {
        let offset = self.offset_secs.load(std::sync::atomic::Ordering::SeqCst);
        self.system.monotonic() + Duration::from_secs(offset)
    }
}
