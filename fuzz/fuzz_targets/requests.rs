//! Every request message of the three services as the server receives it: protobuf decoding
//! (what tonic runs before a handler), then what the handlers do first with what a caller
//! controls: names parsed, contexts converted under the default limits, CRC32C fields checked,
//! batch items each converted. Never a panic; every refusal is INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED; a context that converts fits its limits.
#![no_main]

use std::collections::HashMap;

use keyfront::config::Limits;
use keyfront::ids::Name;
use keyfront::service::convert;
use keyfront::service::pb;
use prost::Message;

fn clear(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
}

fn context(map: HashMap<String, String>, limits: &Limits) {
    let pairs = map.len();
    match convert::context(map, limits) {
        Ok(context) => {
            assert_eq!(context.len(), pairs);
            assert!(pairs <= limits.max_context_pairs);
        }
        Err(status) => clear(&status),
    }
}

fn name(text: &str) {
    if let Ok(name) = text.parse::<Name>() {
        assert!(!name.as_str().is_empty() && name.as_str().len() <= 63);
        assert!(!name.as_str().contains(['/', '.', '\0']));
    }
}

fn crc(data: &[u8], expected: Option<u32>) {
    if let Err(status) = convert::verify_crc(data, expected, "field") {
        clear(&status);
    }
}

macro_rules! decode_all {
    ($data:expr, $($ty:ident),* $(,)?) => {
        $( let _ = pb::$ty::decode($data); )*
    };
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    // The first byte picks the message a handler would decode; the rest is the message.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 8 {
        0 => {
            if let Ok(r) = pb::EncryptRequest::decode(body) {
                name(&r.key);
                name(&r.tenant);
                crc(&r.plaintext, r.plaintext_crc32c);
                context(r.context, &limits);
            }
        }
        1 => {
            if let Ok(r) = pb::DecryptRequest::decode(body) {
                name(&r.key);
                crc(&r.ciphertext, r.ciphertext_crc32c);
                context(r.context, &limits);
            }
        }
        2 => {
            if let Ok(r) = pb::BatchEncryptRequest::decode(body) {
                for item in r.items {
                    crc(&item.plaintext, item.plaintext_crc32c);
                    context(item.context, &limits);
                }
            }
        }
        3 => {
            if let Ok(r) = pb::BatchDecryptRequest::decode(body) {
                for item in r.items {
                    crc(&item.ciphertext, item.ciphertext_crc32c);
                    context(item.context, &limits);
                }
            }
        }
        4 => {
            if let Ok(r) = pb::SealSecretRequest::decode(body) {
                name(&r.key);
                crc(&r.secret, r.secret_crc32c);
                context(r.context, &limits);
            }
        }
        5 => {
            if let Ok(r) = pb::DecryptDataKeyRequest::decode(body) {
                crc(&r.wrapped_key, r.wrapped_key_crc32c);
                context(r.context, &limits);
            }
        }
        6 => {
            if let Ok(r) = pb::CreateKeyRequest::decode(body) {
                name(&r.tenant);
                name(&r.name);
                let _ = pb::KeyPurpose::try_from(r.purpose);
            }
        }
        _ => {
            decode_all!(
                body,
                HashPasswordRequest,
                VerifyPasswordRequest,
                ReEncryptRequest,
                ReEncryptDataKeyRequest,
                GenerateDataKeyRequest,
                LookupDigestRequest,
                UnsealSecretRequest,
                CreateBackupRequest,
                GetBackupStatusRequest,
                GetImportParametersRequest,
                ImportKeyMaterialRequest,
                RotateMasterKeyRequest,
                GetMasterKeyStatusRequest,
                ApproveOperationRequest,
                ListApprovalsRequest,
                UpdateKeyPolicyRequest,
                KeyVersionRequest,
                DestroyTenantRequest,
                CancelTenantDestructionRequest,
                CreateTenantRequest,
                ListTenantsRequest,
                GetKeyRequest,
                ListKeysRequest,
                RotateKeyRequest,
                RequestSupportAccessRequest,
                DecideSupportAccessRequest,
                RevokeGrantRequest,
                ListGrantsRequest,
                ReviewAccessRequest,
            );
        }
    }
});
