//! The stored KEK blob (MWK generation and the HSM's wrapped key): parsed from a version record
//! before the HSM sees it. Round trip: what parses writes back to the same bytes.
#![no_main]

use keyfront::hsm::WrappedKek;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(kek) = WrappedKek::from_bytes(data) {
        assert_eq!(kek.to_bytes(), data);
    }
});
