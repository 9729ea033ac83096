//! Deterministic crash points for tests of crash safety (compiled in only with the
//! `test-hooks` feature; elsewhere `hit` does nothing).
//!
//! `KEYFRONT_FAILPOINT=NAME` makes the process abort at that point, as `kill -9` would: no
//! destructor runs, nothing is flushed. `KEYFRONT_FAILPOINT=pause:NAME` makes it stop there for
//! good, so a test can kill it with a real SIGKILL.

/// Marks a point where a crash must be survivable.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "test-hooks")]
    {
        let Ok(wanted) = std::env::var("KEYFRONT_FAILPOINT") else {
            return;
        };
        if wanted == name {
            eprintln!("keyfront: failpoint {name}: aborting");
            std::process::abort();
        }
        if wanted.strip_prefix("pause:") == Some(name) {
            eprintln!("keyfront: failpoint {name}: paused");
            loop {
                std::thread::park();
            }
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = name;
}
