//! Ended support grants and dual-control approvals leave the store 30 days after they end
//! (the scheduler's `prune_access_history`); live ones and recently ended ones stay.
#![cfg(feature = "test-hooks")]

use std::sync::Arc;
use std::time::Duration;

use keyfront::clock::TestClock;
use keyfront::hsm::memory::MemoryHsm;
use keyfront::ids::Name;
use keyfront::keystore::{PendingOperation, Purpose};
use keyfront::kms::{ACCESS_HISTORY, GrantRequest, Kms, KmsOptions};

const DAY: Duration = Duration::from_secs(86_400);

fn name(text: &str) -> Name {
    text.parse().expect("name")
}

/// A domain over the in-memory HSM whose clock the test moves.
fn domain() -> (tempfile::TempDir, Arc<TestClock>, Kms) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(TestClock::default());
    let kms = Kms::open_with_clock(
        Arc::new(MemoryHsm::new()),
        dir.path(),
        KmsOptions::default(),
        Arc::clone(&clock) as Arc<dyn keyfront::clock::Clock>,
    )
    .expect("open");
    (dir, clock, kms)
}

#[test]
fn grants_and_approvals_that_ended_over_thirty_days_ago_are_removed_and_no_others() {
    let (_dir, clock, kms) = domain();
    let tenant = kms.create_tenant(&name("acme")).expect("tenant").id;
    kms.create_key(tenant, &name("default"), Purpose::Data)
        .expect("key");
    let request = || GrantRequest {
        tenant: name("acme"),
        reason: "ticket 42".into(),
        operations: vec!["Decrypt".into()],
        keys: vec![name("default")],
        duration: Duration::from_secs(3600),
    };
    let ask = |ttl| kms.request_grant(request(), "support", ttl).expect("grant");
    let denied = ask(DAY);
    kms.decide_grant(&denied.id, "admin", false, |_| true)
        .expect("deny");
    let approved = ask(DAY);
    kms.decide_grant(&approved.id, "admin", true, |_| true)
        .expect("approve");
    let unanswered = ask(DAY);
    let approval = kms
        .request_approval(PendingOperation::RotateMasterKey, "officer-1", DAY)
        .expect("approval");

    // Nothing has ended long enough ago yet.
    assert_eq!(kms.prune_access_history().expect("prune"), (0, 0));
    clock.advance(ACCESS_HISTORY);
    // The grant asked for now is live, and one that ends later stays too.
    let live = ask(60 * DAY);
    assert_eq!(kms.prune_access_history().expect("prune"), (0, 0));
    clock.advance(2 * DAY);
    assert_eq!(
        kms.prune_access_history().expect("prune"),
        (3, 1),
        "the denied, the expired and the unanswered grant, and the expired approval"
    );
    let left: Vec<String> = kms
        .grants()
        .expect("grants")
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(left, vec![live.id]);
    assert!(kms.approvals().expect("approvals").is_empty());
    for gone in [&denied.id, &approved.id, &unanswered.id] {
        assert!(!left.contains(gone));
    }
    let _ = approval;
    // Idempotent.
    assert_eq!(kms.prune_access_history().expect("prune"), (0, 0));
}

#[test]
fn remembered_request_ids_expire_and_each_tenant_keeps_only_its_newest() {
    use keyfront::keystore::DoneRequest;
    use keyfront::kms::REQUEST_ID_TTL;
    let (_dir, clock, kms) = domain();
    let store = kms.store();
    let now = kms.clock().now_secs();
    let done = |at| DoneRequest {
        rpc: "RotateKey".into(),
        response: vec![1, 2, 3],
        at,
    };
    for (i, scope) in ["acme", "acme", "acme", "globex", "*"].iter().enumerate() {
        store
            .put_done_request(scope, "officer", &format!("id-{i}"), &done(now + i as u64))
            .expect("keep");
    }
    let read = |scope: &str, id: &str| store.done_request(scope, "officer", id).expect("read");
    assert_eq!(read("acme", "id-0"), Some(done(now)));
    assert_eq!(read("globex", "id-0"), None, "scopes do not share ids");
    assert_eq!(
        read("acme", "id-0").map(|d| d.rpc),
        Some("RotateKey".into())
    );
    // A bound of two per scope drops acme's oldest only.
    assert_eq!(store.prune_done_requests(0, 2).expect("prune"), 1);
    assert_eq!(read("acme", "id-0"), None);
    assert!(read("acme", "id-1").is_some() && read("acme", "id-2").is_some());
    assert!(read("globex", "id-3").is_some() && read("*", "id-4").is_some());
    // After a day everything has expired.
    assert_eq!(kms.prune_request_ids().expect("prune"), 0);
    clock.advance(REQUEST_ID_TTL + Duration::from_secs(60));
    assert_eq!(kms.prune_request_ids().expect("prune"), 4);
    assert_eq!(read("*", "id-4"), None);
}
