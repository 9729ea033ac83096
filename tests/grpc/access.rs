//! Support access with the customer's consent, and the access review.

use keyfront::service::pb;
use keyfront::service::pb::access_service_client::AccessServiceClient;
#[cfg(feature = "test-hooks")]
use std::time::Duration;
use tonic::Code;

use crate::harness::*;

/// The consent story (issue 6): support is refused without a grant; it asks; the wrong
/// tenant's admin and the requester cannot approve; acme's admin approves; support decrypts
/// under the grant, exactly what it names; expiry and revocation end it; each step is audited
/// with the grant id.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_reaches_a_tenant_only_with_its_admins_consent() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    let customer = encrypt(&mut app, b"customer row").await;
    let mut globex_app = h.keys("globex-app").await;
    let other = encrypt(&mut globex_app, b"globex row").await;
    let decrypt = |ciphertext: &[u8], grant: &str| pb::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        context: ctx(&[("row", CONTEXT_MARKER)]),
        grant_id: grant.into(),
        ..Default::default()
    };
    let mut support_data = h.keys("support").await;
    let mut support = h.access("support").await;
    let mut acme_admin = h.access("acme-admin").await;
    let mut globex_admin = h.access("globex-admin").await;

    // Without a grant: nothing, whatever tenant it names.
    for tenant in ["", "acme"] {
        let refused = expect_refused(
            support_data
                .decrypt(pb::DecryptRequest {
                    tenant: tenant.into(),
                    ..decrypt(&customer.ciphertext, "")
                })
                .await,
            Code::PermissionDenied,
            "no grant",
        );
        assert!(refused.message().contains("grant"), "{}", refused.message());
    }

    // Bad requests are refused with what to fix.
    for bad in [
        pb::RequestSupportAccessRequest {
            duration_secs: 8 * 3600 + 1,
            ..Default::default()
        },
        pb::RequestSupportAccessRequest {
            operations: vec!["CreateKey".into()],
            ..Default::default()
        },
        pb::RequestSupportAccessRequest {
            reason: "   ".into(),
            ..Default::default()
        },
    ] {
        let request = pb::RequestSupportAccessRequest {
            tenant: "acme".into(),
            reason: if bad.reason.is_empty() {
                "ticket 4711".into()
            } else {
                bad.reason.clone()
            },
            operations: if bad.operations.is_empty() {
                vec!["Decrypt".into()]
            } else {
                bad.operations.clone()
            },
            keys: vec!["default".into()],
            duration_secs: if bad.duration_secs == 0 {
                3600
            } else {
                bad.duration_secs
            },
        };
        let refused = support
            .request_support_access(request)
            .await
            .expect_err("bad request");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{}",
            refused.message()
        );
    }
    let ask = || pb::RequestSupportAccessRequest {
        tenant: "acme".into(),
        reason: "ticket 4711: customer cannot read its export".into(),
        operations: vec!["Decrypt".into()],
        keys: vec!["default".into()],
        duration_secs: 3600,
    };
    let grant = support
        .request_support_access(ask())
        .await
        .expect("request access")
        .into_inner();
    assert_eq!(grant.state, "PENDING");
    assert_eq!(grant.tenant, "acme");
    expect_refused(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &grant.id))
            .await,
        Code::PermissionDenied,
        "pending",
    );

    let decide = |id: &str| pb::DecideSupportAccessRequest {
        grant_id: id.into(),
    };
    expect_refused(
        globex_admin.approve_support_access(decide(&grant.id)).await,
        Code::PermissionDenied,
        "globex's admin",
    );
    expect_refused(
        support.approve_support_access(decide(&grant.id)).await,
        Code::PermissionDenied,
        "the requester",
    );
    expect_refused(
        AccessServiceClient::new(h.channel("officer").await)
            .approve_support_access(decide(&grant.id))
            .await,
        Code::PermissionDenied,
        "an officer is not the customer",
    );
    expect_refused(
        acme_admin
            .approve_support_access(decide("not-a-grant"))
            .await,
        Code::InvalidArgument,
        "not hex",
    );
    expect_refused(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &"a".repeat(65)))
            .await,
        Code::InvalidArgument,
        "too long",
    );
    expect_refused(
        acme_admin
            .approve_support_access(decide("00112233445566778899aabb"))
            .await,
        Code::NotFound,
        "unknown",
    );

    let approved = acme_admin
        .approve_support_access(decide(&grant.id))
        .await
        .expect("acme's admin approves")
        .into_inner();
    assert_eq!(approved.state, "APPROVED");
    assert!(approved.decided_by.ends_with("/tenant/acme/admin"));
    assert_eq!(approved.expire_time, approved.decide_time + 3600);
    expect_refused(
        acme_admin.approve_support_access(decide(&grant.id)).await,
        Code::FailedPrecondition,
        "decided already",
    );

    let plain = support_data
        .decrypt(decrypt(&customer.ciphertext, &grant.id))
        .await
        .expect("decrypt under the grant")
        .into_inner();
    assert_eq!(plain.plaintext, b"customer row");
    // Exactly what it names: not another RPC, key or tenant.
    expect_refused(
        support_data
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                grant_id: grant.id.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "Encrypt is not granted",
    );
    expect_refused(
        support_data
            .decrypt(pb::DecryptRequest {
                key: "secrets".into(),
                ..decrypt(&customer.ciphertext, &grant.id)
            })
            .await,
        Code::PermissionDenied,
        "key not granted",
    );
    expect_refused(
        support_data
            .decrypt(pb::DecryptRequest {
                tenant: "globex".into(),
                ..decrypt(&other.ciphertext, &grant.id)
            })
            .await,
        Code::PermissionDenied,
        "tenant not granted",
    );
    let globex_under_acme = support_data
        .decrypt(decrypt(&other.ciphertext, &grant.id))
        .await
        .expect_err("globex's ciphertext is not acme's");
    assert_ne!(globex_under_acme.code(), Code::Ok);
    // A grant is its requester's alone.
    expect_refused(
        h.keys("acme-app")
            .await
            .decrypt(decrypt(&customer.ciphertext, &grant.id))
            .await,
        Code::PermissionDenied,
        "not a support principal",
    );

    // Expiry (test clock): refused again.
    h.clock.advance(Duration::from_secs(3601));
    expect_refused(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &grant.id))
            .await,
        Code::PermissionDenied,
        "expired",
    );
    let listed = acme_admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.grants.len(), 1);
    assert_eq!(listed.grants[0].state, "EXPIRED");
    let globex_list = globex_admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        globex_list.grants.is_empty(),
        "globex sees none of acme's grants"
    );

    // Revocation ends a live grant at once.
    let second = support
        .request_support_access(ask())
        .await
        .expect("ask again")
        .into_inner();
    acme_admin
        .approve_support_access(decide(&second.id))
        .await
        .expect("approve");
    support_data
        .decrypt(decrypt(&customer.ciphertext, &second.id))
        .await
        .expect("live grant");
    let revoked = acme_admin
        .revoke_grant(pb::RevokeGrantRequest {
            grant_id: second.id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(revoked.state, "REVOKED");
    expect_refused(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &second.id))
            .await,
        Code::PermissionDenied,
        "revoked",
    );

    // Denied stays denied.
    let third = support
        .request_support_access(ask())
        .await
        .expect("ask a third time")
        .into_inner();
    let denied = acme_admin
        .deny_support_access(decide(&third.id))
        .await
        .expect("deny")
        .into_inner();
    assert_eq!(denied.state, "DENIED");
    assert_eq!(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &third.id))
            .await
            .expect_err("denied")
            .code(),
        Code::PermissionDenied
    );

    // Every step, with its grant id.
    let first = grant_lines(&h, &grant.id);
    let expected = [
        ("request", "RequestSupportAccess", "OK"),
        ("request", "Decrypt", "PERMISSION_DENIED"),
        ("request", "ApproveSupportAccess", "PERMISSION_DENIED"),
        ("intent", "ApproveSupportAccess", ""),
        ("request", "ApproveSupportAccess", "OK"),
        ("request", "Decrypt", "OK"),
    ];
    for (kind, rpc, outcome) in expected {
        assert!(
            first
                .iter()
                .any(|(k, r, o)| k == kind && r == rpc && (outcome.is_empty() || o == outcome)),
            "audit has {kind} {rpc} {outcome} for the grant: {first:?}"
        );
    }
    let approvals_refused = first
        .iter()
        .filter(|(k, r, o)| {
            k == "request" && r == "ApproveSupportAccess" && o == "PERMISSION_DENIED"
        })
        .count();
    assert_eq!(
        approvals_refused, 3,
        "globex's admin, the requester, the officer"
    );
    assert!(
        first
            .iter()
            .filter(|(k, r, o)| k == "request" && r == "Decrypt" && o == "PERMISSION_DENIED")
            .count()
            >= 2,
        "pending and expired refusals: {first:?}"
    );
    let second_lines = grant_lines(&h, &second.id);
    assert!(second_lines.contains(&("request".into(), "RevokeGrant".into(), "OK".into())));
    assert!(second_lines.contains(&("intent".into(), "RevokeGrant".into(), String::new())));
    let third_lines = grant_lines(&h, &third.id);
    assert!(third_lines.contains(&("request".into(), "DenySupportAccess".into(), "OK".into())));
    h.stop().await;
}

/// The access review (issue 6): every configured principal with its scope, last use and
/// certificate expiry, for officers and auditors only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_review_lists_every_principal_with_its_last_use() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    encrypt(&mut app, b"used").await;
    expect_refused(
        AccessServiceClient::new(h.channel("acme-app").await)
            .review_access(pb::ReviewAccessRequest::default())
            .await,
        Code::PermissionDenied,
        "apps do not review",
    );
    let mut auditor = h.access("auditor").await;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auditor
            .review_access(pb::ReviewAccessRequest {
                page_size: 4,
                page_token,
            })
            .await
            .expect("review")
            .into_inner();
        all.extend(page.principals);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let find = |suffix: &str| {
        all.iter()
            .find(|p| p.identity.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} is in the review"))
    };
    assert_eq!(all.len(), 14, "every configured principal once: {all:?}");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs(),
    )
    .expect("time");
    let used = find("/tenant/acme/app");
    assert_eq!(used.roles, ["app"]);
    assert_eq!(used.tenants, ["acme"]);
    assert!(
        (now - 300..=now + 300).contains(&used.last_use_time),
        "{used:?}"
    );
    assert!(used.certificate_expire_time > now, "{used:?}");
    let never = find("/tenant/globex/app");
    assert_eq!(never.last_use_time, 0, "never used: {never:?}");
    let officer = find("/officer");
    assert_eq!(officer.tenants, ["*"]);
    assert!(officer.last_use_time > 0);
    let auditor_entry = find("/auditor");
    assert!(auditor_entry.last_use_time > 0, "the review itself counts");
    assert_eq!(find("/tenant/acme/limited").keys, ["other"]);
    h.stop().await;
}
