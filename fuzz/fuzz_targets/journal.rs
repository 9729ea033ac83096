//! A key journal segment of arbitrary bytes, as `keyfront backup restore` and the server's
//! start read it: `read_all` and `Journal::open` report an error or entries, never panic, and
//! an open that succeeds (cutting a torn tail) leaves a journal that reads back whole.
#![no_main]

use keyfront::crypto::SecretKey;
use keyfront::keystore::journal::read_all;
use keyfront::keystore::{Journal, RecordMac};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mac = std::sync::Arc::new(RecordMac::new(SecretKey::from_bytes(&mut [9u8; 32])));
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("journal-2026-12-06.kfj"), data).expect("write");
    let _ = read_all(dir.path(), &mac);
    if Journal::open(dir.path(), std::sync::Arc::clone(&mac)).is_ok() {
        read_all(dir.path(), &mac).expect("an opened journal reads back");
    }
});
