//! MAC'd record encoding: every value in every database carries an HMAC under the storage key.
//!
//! Stored value: `schema (u16 BE) ‖ sequence (u64 BE) ‖ payload ‖ mac (32)`, where
//! `mac = HMAC-SHA256(storage key, "keyfront/v1/record" ‖ lp(database id) ‖ lp(record key) ‖
//! schema ‖ sequence ‖ lp(payload))`. Binding the database id and record key means a record
//! moved to another key or another tenant's database fails; binding the sequence of the commit
//! that wrote it lets the database head (see `tenant.rs`) detect a rolled-back copy.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::crypto::SecretKey;

/// Schema version of the record payloads this build writes.
pub const SCHEMA_VERSION: u16 = 2;
/// Length of a record MAC.
pub const MAC_LEN: usize = 32;
const PREFIX_LEN: usize = 2 + 8;

/// The storage MAC key, derived inside the HSM and held in memory.
pub struct RecordMac {
    key: SecretKey,
}

/// A record whose MAC verified.
#[derive(Debug)]
pub struct VerifiedRecord<'a> {
    /// The sequence of the commit that wrote it.
    pub seq: u64,
    /// The payload.
    pub payload: &'a [u8],
    /// Its MAC (input to the database digest).
    pub mac: [u8; MAC_LEN],
}

impl RecordMac {
    /// Wraps the derived storage key.
    pub fn new(key: SecretKey) -> Self {
        Self { key }
    }

    /// Encodes and MACs a record.
    pub fn seal(&self, db_id: &[u8], key: &[u8], seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX_LEN + payload.len() + MAC_LEN);
        out.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(payload);
        let mac = self.mac(db_id, key, SCHEMA_VERSION, seq, payload);
        out.extend_from_slice(&mac);
        out
    }

    /// Verifies a stored value; `None` if it is malformed or its MAC does not match.
    pub fn open<'a>(
        &self,
        db_id: &[u8],
        key: &[u8],
        stored: &'a [u8],
    ) -> Option<VerifiedRecord<'a>> {
        if stored.len() < PREFIX_LEN + MAC_LEN {
            return None;
        }
        let (prefix, rest) = stored.split_at(PREFIX_LEN);
        let (payload, mac) = rest.split_at(rest.len() - MAC_LEN);
        let schema = u16::from_be_bytes(prefix[..2].try_into().ok()?);
        let seq = u64::from_be_bytes(prefix[2..].try_into().ok()?);
        if schema != SCHEMA_VERSION {
            return None;
        }
        let expected = self.mac(db_id, key, schema, seq, payload);
        if !bool::from(expected.ct_eq(mac)) {
            return None;
        }
        Some(VerifiedRecord {
            seq,
            payload,
            mac: expected,
        })
    }

    /// HMAC over the (key, MAC) pairs of a database's records, in key order.
    pub fn digest<'a>(
        &self,
        records: impl Iterator<Item = (&'a [u8], &'a [u8; MAC_LEN])>,
    ) -> [u8; 32] {
        let mut mac = self.hmac();
        mac.update(b"keyfront/v1/digest");
        for (key, record_mac) in records {
            update_lp(&mut mac, key);
            mac.update(record_mac);
        }
        mac.finalize().into_bytes().into()
    }

    fn mac(
        &self,
        db_id: &[u8],
        key: &[u8],
        schema: u16,
        seq: u64,
        payload: &[u8],
    ) -> [u8; MAC_LEN] {
        let mut mac = self.hmac();
        mac.update(b"keyfront/v1/record");
        update_lp(&mut mac, db_id);
        update_lp(&mut mac, key);
        mac.update(&schema.to_be_bytes());
        mac.update(&seq.to_be_bytes());
        update_lp(&mut mac, payload);
        mac.finalize().into_bytes().into()
    }

    fn hmac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .expect("HMAC accepts any key length")
    }
}

fn update_lp(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    // Record keys and payloads are far below 4 GiB; saturating keeps this total anyway.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_only_where_it_was_written() {
        let mac = RecordMac::new(SecretKey::random());
        let stored = mac.seal(b"db-a", b"k/1", 5, b"payload");
        let record = mac.open(b"db-a", b"k/1", &stored).expect("verifies");
        assert_eq!((record.seq, record.payload), (5, &b"payload"[..]));
        assert!(mac.open(b"db-b", b"k/1", &stored).is_none());
        assert!(mac.open(b"db-a", b"k/2", &stored).is_none());
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x80;
            assert!(mac.open(b"db-a", b"k/1", &bad).is_none(), "byte {i}");
        }
        assert!(mac.open(b"db-a", b"k/1", &stored[..20]).is_none());
        let other = RecordMac::new(SecretKey::random());
        assert!(other.open(b"db-a", b"k/1", &stored).is_none());
    }
}

#[cfg(test)]
mod random_input {
    use super::*;

    #[test]
    fn open_never_panics_and_never_accepts_random_input() {
        let mac = RecordMac::new(SecretKey::random());
        for round in 0..50_000usize {
            let input: Vec<u8> = (0..round % 120).map(|_| rand::random()).collect();
            assert!(mac.open(b"db", b"key", &input).is_none());
            let _ = crate::hsm::WrappedKek::from_bytes(&input);
        }
    }
}
