//! Property: any sequence of key lifecycle operations (rotate, disable, enable, schedule and
//! cancel destruction, raise the minimum decryption version, let destruction windows pass)
//! keeps the invariants, whatever each operation answered:
//!
//! - the key has exactly one primary, which exists and is neither scheduled for destruction
//!   nor destroyed, and the minimum decryption version is never above it;
//! - every version from 1 to the latest exists;
//! - a ciphertext decrypts if and only if its version is enabled and at or above the minimum,
//!   and then to what was encrypted: a destroyed version never decrypts;
//! - destroyed is final;
//! - Encrypt succeeds exactly when the primary is enabled, and uses the primary.
//!
//! The domain runs over the in-memory HSM and real sled files; `PROPTEST_CASES` sets how many
//! sequences (default 64).
#![cfg(feature = "test-hooks")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keyfront::clock::TestClock;
use keyfront::crypto::{EncryptionContext, Plaintext};
use keyfront::hsm::memory::MemoryHsm;
use keyfront::ids::{KeyVersion, Name, TenantId};
use keyfront::keystore::{Purpose, VersionState};
use keyfront::kms::{Kms, KmsOptions, PolicyUpdate};
use proptest::prelude::*;

const WINDOW: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone)]
enum Op {
    Rotate,
    Disable(u32),
    Enable(u32),
    Schedule(u32),
    Cancel(u32),
    SetMin(u32),
    PassWindow,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Rotate),
        2 => (1u32..7).prop_map(Op::Disable),
        2 => (1u32..7).prop_map(Op::Enable),
        2 => (1u32..7).prop_map(Op::Schedule),
        2 => (1u32..7).prop_map(Op::Cancel),
        1 => (0u32..7).prop_map(Op::SetMin),
        1 => Just(Op::PassWindow),
    ]
}

struct World {
    _dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    kms: Kms,
    tenant: TenantId,
    key: Name,
    // version -> (ciphertext, plaintext), one made while the version was the primary.
    sealed: BTreeMap<u32, (Vec<u8>, Vec<u8>)>,
    destroyed: BTreeSet<u32>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(TestClock::default());
        let options = KmsOptions {
            destruction_window: WINDOW,
            min_destruction_window: WINDOW,
            ..KmsOptions::default()
        };
        let kms = Kms::open_with_clock(
            Arc::new(MemoryHsm::new()),
            dir.path(),
            options,
            Arc::clone(&clock) as Arc<dyn keyfront::clock::Clock>,
        )
        .expect("open");
        let tenant_name: Name = "t".parse().expect("name");
        let tenant = kms.create_tenant(&tenant_name).expect("tenant").id;
        let key: Name = "k".parse().expect("name");
        kms.create_key(tenant, &key, Purpose::Data).expect("key");
        let mut world = Self {
            _dir: dir,
            clock,
            kms,
            tenant,
            key,
            sealed: BTreeMap::new(),
            destroyed: BTreeSet::new(),
        };
        world.seal_under_primary();
        world
    }

    fn seal_under_primary(&mut self) {
        let plaintext = format!("under the primary, #{}", self.sealed.len()).into_bytes();
        if let Ok(encrypted) = self.kms.encrypt(
            self.tenant,
            &self.key,
            &Plaintext::new(plaintext.clone()),
            &EncryptionContext::new(),
        ) {
            self.sealed
                .entry(encrypted.version.0)
                .or_insert((encrypted.ciphertext, plaintext));
        }
    }

    fn apply(&mut self, op: &Op) {
        let (t, k) = (self.tenant, &self.key);
        // Every answer is allowed here: refusals are part of the rules. What matters is
        // the state afterwards (`check`).
        let _ = match op {
            Op::Rotate => self.kms.rotate_key(t, k).map(drop),
            Op::Disable(v) => self.kms.disable_version(t, k, KeyVersion(*v)).map(drop),
            Op::Enable(v) => self.kms.enable_version(t, k, KeyVersion(*v)).map(drop),
            Op::Schedule(v) => self
                .kms
                .schedule_destruction(t, k, KeyVersion(*v))
                .map(drop),
            Op::Cancel(v) => self.kms.cancel_destruction(t, k, KeyVersion(*v)).map(drop),
            Op::SetMin(v) => self
                .kms
                .update_policy(
                    t,
                    k,
                    &PolicyUpdate {
                        min_decryption_version: Some(*v),
                        ..PolicyUpdate::default()
                    },
                )
                .map(drop),
            Op::PassWindow => {
                self.clock.advance(WINDOW + Duration::from_secs(60));
                self.kms.run_due_destructions().map(drop)
            }
        };
        if matches!(op, Op::Rotate) {
            self.seal_under_primary();
        }
    }

    fn check(&mut self, history: &[Op]) -> Result<(), TestCaseError> {
        let details = self
            .kms
            .key_details(self.tenant, &self.key)
            .map_err(|e| TestCaseError::fail(format!("key_details: {e}")))?;
        let record = &details.record;
        let states: BTreeMap<u32, VersionState> = details
            .versions
            .iter()
            .map(|v| (v.version.0, v.state))
            .collect();
        let expected: Vec<u32> = (1..=record.latest.0).collect();
        prop_assert_eq!(
            states.keys().copied().collect::<Vec<_>>(),
            expected,
            "every version exists after {:?}",
            history
        );
        let primary = record.primary.0;
        prop_assert!(primary >= 1 && primary <= record.latest.0);
        prop_assert!(
            matches!(
                states[&primary],
                VersionState::Enabled | VersionState::Disabled
            ),
            "the primary v{} is {:?} after {:?}",
            primary,
            states[&primary],
            history
        );
        let min = record.policy.min_decryption_version;
        prop_assert!(min <= primary, "min {} above primary {}", min, primary);
        for (version, state) in &states {
            if self.destroyed.contains(version) {
                prop_assert!(
                    matches!(state, VersionState::Destroyed { .. }),
                    "v{} came back from destruction as {:?} after {:?}",
                    version,
                    state,
                    history
                );
            }
            if matches!(state, VersionState::Destroyed { .. }) {
                self.destroyed.insert(*version);
            }
        }
        for (version, (ciphertext, plaintext)) in &self.sealed {
            let result = self
                .kms
                .decrypt(self.tenant, ciphertext, &EncryptionContext::new(), None);
            let may = matches!(states[version], VersionState::Enabled) && *version >= min;
            match result {
                Ok(decrypted) => {
                    prop_assert!(
                        may,
                        "v{} ({:?}, min {}) decrypted after {:?}",
                        version,
                        states[version],
                        min,
                        history
                    );
                    prop_assert_eq!(decrypted.plaintext.expose_secret(), plaintext.as_slice());
                }
                Err(error) => prop_assert!(
                    !may,
                    "v{} ({:?}, min {}) refused: {} after {:?}",
                    version,
                    states[version],
                    min,
                    error,
                    history
                ),
            }
        }
        let encrypted = self.kms.encrypt(
            self.tenant,
            &self.key,
            &Plaintext::new(b"probe".to_vec()),
            &EncryptionContext::new(),
        );
        let primary_enabled = matches!(states[&primary], VersionState::Enabled);
        match encrypted {
            Ok(e) => {
                prop_assert!(primary_enabled, "Encrypt under a disabled primary");
                prop_assert_eq!(e.version.0, primary);
            }
            Err(error) => prop_assert!(
                !primary_enabled,
                "Encrypt refused under an enabled primary: {} after {:?}",
                error,
                history
            ),
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_lifecycle_sequence_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..28)) {
        let mut world = World::new();
        world.check(&[])?;
        for (i, op) in ops.iter().enumerate() {
            world.apply(op);
            world.check(&ops[..=i])?;
        }
    }
}
