//! A stored record of arbitrary bytes, as every read from sled or PostgreSQL checks it: the
//! MAC check refuses it (nothing random opens under the storage key) and never panics. The
//! first bytes choose the database id and record key it is read as.
#![no_main]

use keyfront::crypto::SecretKey;
use keyfront::keystore::RecordMac;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mac = RecordMac::new(SecretKey::from_bytes(&mut [5u8; 32]));
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) % 32)
        .min(data.len());
    let (key, value) = data.split_at(split);
    for db_id in [&b"system"[..], &[3u8; 16][..]] {
        assert!(mac.open(db_id, key, value).is_none());
    }
    // A record sealed here opens only where it was sealed.
    let sealed = mac.seal(b"system", key, 7, value);
    let opened = mac.open(b"system", key, &sealed).expect("opens");
    assert_eq!(opened.payload, value);
    assert!(mac.open(b"other", key, &sealed).is_none());
});
