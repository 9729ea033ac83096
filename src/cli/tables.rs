//! How `keyfront admin` prints what AdminService and AccessService answer: a table for people,
//! or with `--json` one JSON document for machines.

use std::time::Duration;

use serde_json::{Value, json};

use crate::service::pb;

pub(super) struct Output {
    pub(super) json: Value,
    pub(super) table: String,
}

/// A period the way officers set it: "90d", "12h", "30m" or seconds.
pub(super) fn period(seconds: i64) -> String {
    match seconds {
        s if s <= 0 => "-".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub(super) fn time(seconds: i64) -> String {
    match u64::try_from(seconds) {
        Ok(s) if s > 0 => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        }
        _ => "-".to_owned(),
    }
}

pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut text = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

pub(super) fn tenants(list: Vec<pb::Tenant>) -> Output {
    let rows = list
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.id.clone(),
                time(t.create_time),
                time(t.destroy_time),
            ]
        })
        .collect::<Vec<_>>();
    Output {
        json: Value::Array(
            list.iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "id": t.id,
                        "create_time": t.create_time,
                        "destroy_time": (t.destroy_time > 0).then_some(t.destroy_time),
                    })
                })
                .collect(),
        ),
        table: table(&["TENANT", "ID", "CREATED", "DESTROY AT"], &rows),
    }
}

pub(super) fn purpose(value: i32) -> &'static str {
    match pb::KeyPurpose::try_from(value) {
        Ok(pb::KeyPurpose::Data) => "DATA",
        Ok(pb::KeyPurpose::Secrets) => "SECRETS",
        Ok(pb::KeyPurpose::Mac) => "MAC",
        Ok(pb::KeyPurpose::Sign) => "SIGN",
        _ => "UNSPECIFIED",
    }
}

pub(super) fn state(value: i32) -> &'static str {
    pb::KeyVersionState::try_from(value).map_or("UNSPECIFIED", |s| s.as_str_name())
}

pub(super) fn import_parameters(parameters: &pb::ImportParameters) -> Output {
    let wrapping = pb::WrappingAlgorithm::try_from(parameters.wrapping_algorithm)
        .map_or("UNKNOWN", |w| w.as_str_name());
    Output {
        json: json!({
            "tenant": parameters.tenant,
            "name": parameters.name,
            "import_token": parameters.import_token,
            "wrapping_algorithm": wrapping,
            "expire_time": parameters.expire_time,
            "public_key_pem": parameters.public_key_pem,
        }),
        table: format!(
            "{}\n{}",
            table(
                &["KEY", "IMPORT TOKEN", "WRAPPING", "EXPIRES"],
                &[vec![
                    format!("{}/{}", parameters.tenant, parameters.name),
                    parameters.import_token.clone(),
                    wrapping.to_owned(),
                    time(parameters.expire_time),
                ]],
            ),
            parameters.public_key_pem
        ),
    }
}

pub(super) fn origin(value: i32) -> &'static str {
    match pb::KeyOrigin::try_from(value) {
        Ok(pb::KeyOrigin::Generated) => "GENERATED",
        Ok(pb::KeyOrigin::External) => "EXTERNAL",
        _ => "-",
    }
}

pub(super) fn key_json(key: &pb::Key) -> Value {
    let policy = key.policy.unwrap_or_default();
    json!({
        "tenant": key.tenant,
        "name": key.name,
        "id": key.id,
        "purpose": purpose(key.purpose),
        "origin": origin(key.origin),
        "allow_generated_rotation": key.allow_generated_rotation,
        "primary_version": key.primary_version,
        "latest_version": key.latest_version,
        "create_time": key.create_time,
        "policy": {
            "min_decryption_version": policy.min_decryption_version,
            "rotation_period_seconds": policy.rotation_period_seconds,
            "destruction_window_seconds": policy.destruction_window_seconds,
            "max_kek_uses": policy.max_kek_uses,
            "max_bulk_uses": policy.max_bulk_uses,
        },
        "versions": key.versions.iter().map(version_json).collect::<Vec<_>>(),
    })
}

pub(super) fn version_json(v: &pb::KeyVersion) -> Value {
    json!({
        "version": v.version,
        "state": state(v.state),
        "create_time": v.create_time,
        "destroy_time": (v.destroy_time > 0).then_some(v.destroy_time),
        "origin": origin(v.origin),
        "expire_time": (v.expire_time > 0).then_some(v.expire_time),
    })
}

pub(super) fn key(key: pb::Key) -> Output {
    let policy = key.policy.unwrap_or_default();
    let seconds = period;
    let mut text = table(
        &[
            "KEY",
            "PURPOSE",
            "ORIGIN",
            "PRIMARY",
            "LATEST",
            "MIN DECRYPT",
            "ROTATE EVERY",
            "DESTRUCTION WINDOW",
        ],
        &[vec![
            format!("{}/{}", key.tenant, key.name),
            purpose(key.purpose).to_owned(),
            origin(key.origin).to_owned(),
            key.primary_version.to_string(),
            key.latest_version.to_string(),
            policy.min_decryption_version.to_string(),
            seconds(policy.rotation_period_seconds),
            seconds(policy.destruction_window_seconds),
        ]],
    );
    if !key.versions.is_empty() {
        text.push('\n');
        text.push_str(&versions_table(&key.versions, key.primary_version));
    }
    Output {
        json: key_json(&key),
        table: text,
    }
}

pub(super) fn versions_table(versions: &[pb::KeyVersion], primary: u32) -> String {
    let rows = versions
        .iter()
        .map(|v| {
            vec![
                format!(
                    "{}{}",
                    v.version,
                    if v.version == primary {
                        " (primary)"
                    } else {
                        ""
                    }
                ),
                state(v.state).to_owned(),
                origin(v.origin).to_owned(),
                time(v.create_time),
                time(v.destroy_time),
                time(v.expire_time),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "VERSION",
            "STATE",
            "ORIGIN",
            "CREATED",
            "DESTROY AT",
            "MATERIAL EXPIRES",
        ],
        &rows,
    )
}

pub(super) fn keys(list: Vec<pb::Key>) -> Output {
    let rows = list
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                purpose(k.purpose).to_owned(),
                k.primary_version.to_string(),
                k.latest_version.to_string(),
                k.id.clone(),
            ]
        })
        .collect::<Vec<_>>();
    Output {
        json: Value::Array(list.iter().map(key_json).collect()),
        table: table(&["KEY", "PURPOSE", "PRIMARY", "LATEST", "ID"], &rows),
    }
}

pub(super) fn approvals(list: Vec<pb::Approval>) -> Output {
    let rows = list
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.state.clone(),
                a.operation.clone(),
                a.requested_by.clone(),
                time(a.expire_time),
                if a.approved_by.is_empty() {
                    "-".to_owned()
                } else {
                    a.approved_by.clone()
                },
            ]
        })
        .collect::<Vec<_>>();
    Output {
        json: Value::Array(
            list.iter()
                .map(|a| {
                    json!({
                        "id": a.id,
                        "state": a.state,
                        "operation": a.operation,
                        "requested_by": a.requested_by,
                        "request_time": a.request_time,
                        "expire_time": a.expire_time,
                        "approved_by": (!a.approved_by.is_empty()).then_some(&a.approved_by),
                    })
                })
                .collect(),
        ),
        table: table(
            &[
                "APPROVAL",
                "STATE",
                "OPERATION",
                "REQUESTED BY",
                "EXPIRES",
                "APPROVED BY",
            ],
            &rows,
        ),
    }
}

pub(super) fn backup_archive(archive: pb::BackupArchive) -> Output {
    let row = vec![
        archive.path.clone(),
        time(archive.create_time),
        archive.size_bytes.to_string(),
        archive.tenants.to_string(),
        if archive.verified { "yes" } else { "NO" }.to_owned(),
    ];
    Output {
        json: json!({
            "path": archive.path,
            "create_time": archive.create_time,
            "size_bytes": archive.size_bytes,
            "tenants": archive.tenants,
            "verified": archive.verified,
        }),
        table: table(
            &["ARCHIVE", "TAKEN", "BYTES", "TENANTS", "VERIFIED"],
            &[row],
        ),
    }
}

pub(super) fn backup_status(status: pb::BackupStatus) -> Output {
    let verified = status.verification_error.is_empty() && status.newest.is_some();
    let mut text = match &status.newest {
        Some(newest) => table(
            &["NEWEST SNAPSHOT", "TAKEN", "AGE", "BYTES", "VERIFIED"],
            &[vec![
                newest.path.clone(),
                time(newest.create_time),
                humantime::format_duration(Duration::from_secs(
                    u64::try_from(status.age_seconds).unwrap_or(0),
                ))
                .to_string(),
                newest.size_bytes.to_string(),
                if verified {
                    "yes".to_owned()
                } else {
                    format!("NO: {}", status.verification_error)
                },
            ]],
        ),
        None => format!("no snapshot in {} yet\n", status.dir),
    };
    text.push_str(&format!(
        "{} snapshot(s) in {}, kept {} days; next nightly snapshot: {}\n",
        status.archives,
        status.dir,
        status.retention_days,
        if status.next_due_time > 0 {
            time(status.next_due_time)
        } else {
            "off".to_owned()
        }
    ));
    if !status.last_failure.is_empty() {
        text.push_str(&format!("LAST ATTEMPT FAILED: {}\n", status.last_failure));
    }
    Output {
        json: json!({
            "dir": status.dir,
            "newest": status.newest.as_ref().map(|n| json!({
                "path": n.path,
                "create_time": n.create_time,
                "size_bytes": n.size_bytes,
            })),
            "age_seconds": status.newest.as_ref().map(|_| status.age_seconds),
            "verified": verified,
            "verification_error": (!status.verification_error.is_empty()).then_some(&status.verification_error),
            "archives": status.archives,
            "retention_days": status.retention_days,
            "next_due_time": (status.next_due_time > 0).then_some(status.next_due_time),
            "last_failure": (!status.last_failure.is_empty()).then_some(&status.last_failure),
        }),
        table: text,
    }
}

pub(super) fn master_key(status: pb::MasterKeyStatus) -> Output {
    let rows = status
        .generations
        .iter()
        .map(|g| {
            vec![
                g.generation.to_string(),
                g.state.clone(),
                time(g.destroy_time),
            ]
        })
        .collect::<Vec<_>>();
    let mut text = table(&["MWK GENERATION", "STATE", "DESTROY AT"], &rows);
    if status.rotating_to > 0 {
        text.push_str(&format!(
            "rotation to generation {} in progress (last tenant done: {})\n",
            status.rotating_to,
            if status.rotation_cursor.is_empty() {
                "none"
            } else {
                &status.rotation_cursor
            }
        ));
    }
    Output {
        json: json!({
            "current_generation": status.current_generation,
            "rotating_to": (status.rotating_to > 0).then_some(status.rotating_to),
            "rotation_cursor": (!status.rotation_cursor.is_empty()).then_some(&status.rotation_cursor),
            "generations": status.generations.iter().map(|g| json!({
                "generation": g.generation,
                "state": g.state,
                "destroy_time": (g.destroy_time > 0).then_some(g.destroy_time),
            })).collect::<Vec<_>>(),
        }),
        table: text,
    }
}

pub(super) fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

pub(super) fn review(list: Vec<pb::PrincipalReview>) -> Output {
    let rows = list
        .iter()
        .map(|p| {
            vec![
                p.identity.clone(),
                p.roles.join(","),
                p.tenants.join(","),
                if p.keys.is_empty() {
                    "*".to_owned()
                } else {
                    p.keys.join(",")
                },
                if p.last_use_time > 0 {
                    time(p.last_use_time)
                } else {
                    "never".to_owned()
                },
                time(p.certificate_expire_time),
                dash(&p.active_grants.join(",")),
            ]
        })
        .collect::<Vec<_>>();
    let never = |t: i64| (t > 0).then_some(t);
    Output {
        json: Value::Array(
            list.iter()
                .map(|p| {
                    json!({
                        "identity": p.identity,
                        "roles": p.roles,
                        "tenants": p.tenants,
                        "keys": p.keys,
                        "last_use_time": never(p.last_use_time),
                        "certificate_expire_time": never(p.certificate_expire_time),
                        "active_grants": p.active_grants,
                    })
                })
                .collect(),
        ),
        table: table(
            &[
                "PRINCIPAL",
                "ROLES",
                "TENANTS",
                "KEYS",
                "LAST USED",
                "CERT EXPIRES",
                "ACTIVE GRANTS",
            ],
            &rows,
        ),
    }
}

pub(super) fn grants(list: Vec<pb::Grant>) -> Output {
    let rows = list
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.state.clone(),
                g.tenant.clone(),
                g.requested_by.clone(),
                g.operations.join(","),
                g.keys.join(","),
                dash(&g.decided_by),
                time(g.expire_time),
            ]
        })
        .collect::<Vec<_>>();
    Output {
        json: Value::Array(
            list.iter()
                .map(|g| {
                    json!({
                        "id": g.id,
                        "state": g.state,
                        "tenant": g.tenant,
                        "requested_by": g.requested_by,
                        "reason": g.reason,
                        "operations": g.operations,
                        "keys": g.keys,
                        "duration_secs": g.duration_secs,
                        "request_time": g.request_time,
                        "decided_by": (!g.decided_by.is_empty()).then_some(&g.decided_by),
                        "decide_time": (g.decide_time > 0).then_some(g.decide_time),
                        "expire_time": (g.expire_time > 0).then_some(g.expire_time),
                        "revoked_by": (!g.revoked_by.is_empty()).then_some(&g.revoked_by),
                        "revoke_time": (g.revoke_time > 0).then_some(g.revoke_time),
                    })
                })
                .collect(),
        ),
        table: table(
            &[
                "GRANT",
                "STATE",
                "TENANT",
                "REQUESTED BY",
                "OPERATIONS",
                "KEYS",
                "DECIDED BY",
                "EXPIRES",
            ],
            &rows,
        ),
    }
}

pub(super) fn version(v: pb::KeyVersion) -> Output {
    Output {
        json: version_json(&v),
        table: versions_table(std::slice::from_ref(&v), 0),
    }
}
