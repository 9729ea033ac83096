//! `KeyService`: the data plane. Handlers stay thin: authorize, convert, call the domain on the
//! blocking pool, convert back. Plaintext is wrapped in zeroizing types as soon as it leaves the
//! request message.

use tonic::{Request, Response, Status};

use super::auth::{Rpc, parse_name};
use super::convert::{self, crc, is_digest, sign_algorithm, verify_crc};
use super::{Shared, pb};
use crate::crypto::Plaintext;
use crate::ids::Name;
use crate::kms::{Decrypted, Opening, Signable};

use std::sync::Arc;

/// The `KeyService` implementation.
pub struct KeyService {
    shared: Arc<Shared>,
}

impl KeyService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// What a KeyService request names for authorization and its audit line: its tenant, the
/// grant it acts under, and the key it names (none where the key comes from the blob).
trait Scoped {
    fn scope(&self) -> (&str, &str, Option<&str>);
}

macro_rules! scoped {
    (names a key: $($request:ident),* $(,)?) => {
        $(impl Scoped for pb::$request {
            fn scope(&self) -> (&str, &str, Option<&str>) {
                (&self.tenant, &self.grant_id, Some(&self.key))
            }
        })*
    };
    (key from the blob: $($request:ident),* $(,)?) => {
        $(impl Scoped for pb::$request {
            fn scope(&self) -> (&str, &str, Option<&str>) {
                (&self.tenant, &self.grant_id, None)
            }
        })*
    };
}

scoped!(names a key:
    GenerateMacRequest,
    VerifyMacRequest,
    SignRequest,
    VerifyRequest,
    GetPublicKeyRequest,
    EncryptRequest,
    DecryptRequest,
    BatchEncryptRequest,
    BatchDecryptRequest,
    GenerateDataKeyRequest,
    SealSecretRequest,
    ReEncryptRequest,
    HashPasswordRequest,
    VerifyPasswordRequest,
);
scoped!(key from the blob:
    DecryptDataKeyRequest,
    LookupDigestRequest,
    UnsealSecretRequest,
    ReEncryptDataKeyRequest,
);

impl KeyService {
    /// Authorizes a request and opens its audit line (`Shared::begin_under`), then hands out
    /// its message.
    fn begin<T: Scoped>(&self, request: Request<T>, rpc: Rpc) -> Result<(super::Call, T), Status> {
        let (tenant, grant_id, key) = request.get_ref().scope();
        let call = self
            .shared
            .begin_under(&request, grant_id, rpc, tenant, key)?;
        Ok((call, request.into_inner()))
    }

    /// The one "open a blob" handler body: Decrypt, DecryptDataKey and UnsealSecret differ only
    /// in the blob's kind and their messages. Opens `blob` for the call's tenant (inline when
    /// its key is in memory, else on the blocking pool), within the keys the caller may use,
    /// and audits the key and version that opened it.
    async fn open(
        &self,
        call: &super::Call,
        blob: Vec<u8>,
        what: Opening,
        context: crate::crypto::EncryptionContext,
    ) -> Result<Decrypted, Status> {
        let allowed = call.allowed_keys();
        let out = call
            .run_cached(
                (blob, what, context, allowed),
                |kms, tenant, (blob, what, context, allowed)| {
                    kms.open_blob_cached(tenant, blob, what, context, allowed.as_deref())
                },
                |kms, tenant, (blob, what, context, allowed)| {
                    kms.open_blob(tenant, &blob, &what, &context, allowed.as_deref())
                },
            )
            .await?;
        call.decrypted(&out);
        Ok(out)
    }
}

fn optional_key(key: &str) -> Result<Option<Name>, Status> {
    if key.is_empty() {
        Ok(None)
    } else {
        parse_name(key, "key").map(Some)
    }
}

fn item_status(result: &Result<(), Status>) -> (Option<tonic_types::pb::Status>, &'static str) {
    let status = match result {
        Ok(()) => tonic_types::pb::Status {
            code: 0,
            message: String::new(),
            details: Vec::new(),
        },
        Err(status) => tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        },
    };
    let code = super::layer::code_name(tonic::Code::from_i32(status.code));
    (Some(status), code)
}

/// The one batch handler body: runs `each` over the items on the blocking pool, each item
/// failing alone with its own status (`set_status`), and audits every item's code.
async fn batch<I: Send + 'static, R: Default + Send + 'static>(
    call: &super::Call,
    items: Vec<I>,
    each: impl Fn(&crate::kms::Kms, crate::ids::TenantId, I, &mut R) -> Result<(), Status>
    + Send
    + 'static,
    set_status: fn(&mut R, Option<tonic_types::pb::Status>),
) -> Result<Vec<R>, Status> {
    let results = call
        .run(move |kms, tenant| {
            Ok(items
                .into_iter()
                .map(|item| {
                    let mut result = R::default();
                    let outcome = each(kms, tenant, item, &mut result);
                    let (status, code) = item_status(&outcome);
                    set_status(&mut result, status);
                    (result, code)
                })
                .collect::<Vec<_>>())
        })
        .await?;
    call.items(results.iter().map(|(_, code)| *code).collect());
    Ok(results.into_iter().map(|(result, _)| result).collect())
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyService {
    async fn generate_mac(
        &self,
        request: Request<pb::GenerateMacRequest>,
    ) -> Result<Response<pb::GenerateMacResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::GenerateMac)?;
        let key = parse_name(&r.key, "key")?;
        let verified = verify_crc(&r.data, r.data_crc32c, "data_crc32c")?;
        // The data may be as sensitive as a plaintext (a token, an account number).
        let data = Plaintext::new(r.data);
        let out = call
            .run_cached(
                (key, data),
                |kms, tenant, (key, data)| {
                    kms.generate_mac_cached(tenant, key, data.expose_secret())
                },
                |kms, tenant, (key, data)| kms.generate_mac(tenant, &key, data.expose_secret()),
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::GenerateMacResponse {
            mac: out.mac,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_data_crc32c: verified,
        }))
    }

    async fn verify_mac(
        &self,
        request: Request<pb::VerifyMacRequest>,
    ) -> Result<Response<pb::VerifyMacResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::VerifyMac)?;
        let key = parse_name(&r.key, "key")?;
        let verified = verify_crc(&r.data, r.data_crc32c, "data_crc32c")?;
        let data = Plaintext::new(r.data);
        let version = (r.key_version != 0).then_some(crate::ids::KeyVersion(r.key_version));
        let mac = r.mac;
        let out = call
            .run_cached(
                (key, data, mac),
                |kms, tenant, (key, data, mac)| {
                    kms.verify_mac_cached(tenant, key, version, data.expose_secret(), mac)
                },
                move |kms, tenant, (key, data, mac)| {
                    kms.verify_mac(tenant, &key, version, data.expose_secret(), &mac)
                },
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::VerifyMacResponse {
            valid: out.valid,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_data_crc32c: verified,
        }))
    }

    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::Sign)?;
        let key = parse_name(&r.key, "key")?;
        let digest = is_digest(r.message_type)?;
        let verified = verify_crc(&r.message, r.message_crc32c, "message_crc32c")?;
        // The message may be as private as a plaintext.
        let message = Plaintext::new(r.message);
        let out = call
            .run_cached(
                (key, message),
                |kms, tenant, (key, message)| {
                    kms.sign_cached(tenant, key, signable(digest, message.expose_secret()))
                },
                move |kms, tenant, (key, message)| {
                    kms.sign(tenant, &key, signable(digest, message.expose_secret()))
                },
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::SignResponse {
            signature: out.signature,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            algorithm: sign_algorithm(out.algorithm) as i32,
            verified_message_crc32c: verified,
        }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::Verify)?;
        let key = parse_name(&r.key, "key")?;
        let digest = is_digest(r.message_type)?;
        let verified = verify_crc(&r.message, r.message_crc32c, "message_crc32c")?;
        let message = Plaintext::new(r.message);
        let version = (r.key_version != 0).then_some(crate::ids::KeyVersion(r.key_version));
        let signature = r.signature;
        let out = call
            .run_cached(
                (key, message, signature),
                |kms, tenant, (key, message, signature)| {
                    let signable = signable(digest, message.expose_secret());
                    kms.verify_cached(tenant, key, version, signable, signature)
                },
                move |kms, tenant, (key, message, signature)| {
                    let signable = signable(digest, message.expose_secret());
                    kms.verify(tenant, &key, version, signable, &signature)
                },
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::VerifyResponse {
            valid: out.valid,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_message_crc32c: verified,
        }))
    }

    async fn get_public_key(
        &self,
        request: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::GetPublicKey)?;
        let key = parse_name(&r.key, "key")?;
        let version = (r.key_version != 0).then_some(crate::ids::KeyVersion(r.key_version));
        let out = call
            .run_cached(
                key,
                |kms, tenant, key| kms.public_key_cached(tenant, key, version),
                move |kms, tenant, key| kms.public_key(tenant, &key, version),
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::GetPublicKeyResponse {
            public_key_der: out.der,
            public_key_pem: out.pem,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            algorithm: sign_algorithm(out.algorithm) as i32,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::Encrypt)?;
        let key = parse_name(&r.key, "key")?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.plaintext, r.plaintext_crc32c, "plaintext_crc32c")?;
        let plaintext = Plaintext::new(r.plaintext);
        let out = call
            .run_cached(
                (key, plaintext, context),
                |kms, tenant, (key, plaintext, context)| {
                    kms.encrypt_cached(tenant, key, plaintext, context)
                },
                |kms, tenant, (key, plaintext, context)| {
                    kms.encrypt(tenant, &key, &plaintext, &context)
                },
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::EncryptResponse {
            ciphertext_crc32c: crc(&out.ciphertext),
            ciphertext: out.ciphertext,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_plaintext_crc32c: verified,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::Decrypt)?;
        let key = optional_key(&r.key)?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.ciphertext, r.ciphertext_crc32c, "ciphertext_crc32c")?;
        let out = self
            .open(&call, r.ciphertext, Opening::Ciphertext(key), context)
            .await?;
        let plaintext = out.plaintext.expose_secret().to_vec();
        Ok(Response::new(pb::DecryptResponse {
            plaintext_crc32c: crc(&plaintext),
            plaintext,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_ciphertext_crc32c: verified,
        }))
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::BatchEncrypt)?;
        let key = parse_name(&r.key, "key")?;
        self.shared.check_batch(r.items.len())?;
        let limits = self.shared.limits;
        let results = batch(
            &call,
            r.items,
            move |kms, tenant, item: pb::BatchEncryptItem, result: &mut pb::BatchEncryptResult| {
                let context = convert::context(item.context, &limits)?;
                result.verified_plaintext_crc32c =
                    verify_crc(&item.plaintext, item.plaintext_crc32c, "plaintext_crc32c")?;
                let plaintext = Plaintext::new(item.plaintext);
                let out = kms.encrypt(tenant, &key, &plaintext, &context)?;
                result.ciphertext_crc32c = crc(&out.ciphertext);
                result.ciphertext = out.ciphertext;
                result.key_id = out.key_id.to_string();
                result.key_version = out.version.0;
                Ok(())
            },
            |result, status| result.status = status,
        )
        .await?;
        Ok(Response::new(pb::BatchEncryptResponse { results }))
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::BatchDecrypt)?;
        let key = optional_key(&r.key)?;
        self.shared.check_batch(r.items.len())?;
        let limits = self.shared.limits;
        let allowed = call.allowed_keys();
        let results = batch(
            &call,
            r.items,
            move |kms, tenant, item: pb::BatchDecryptItem, result: &mut pb::BatchDecryptResult| {
                let context = convert::context(item.context, &limits)?;
                result.verified_ciphertext_crc32c = verify_crc(
                    &item.ciphertext,
                    item.ciphertext_crc32c,
                    "ciphertext_crc32c",
                )?;
                let out = kms.decrypt_scoped(
                    tenant,
                    &item.ciphertext,
                    &context,
                    key.as_ref(),
                    allowed.as_deref(),
                )?;
                result.plaintext = out.plaintext.expose_secret().to_vec();
                result.plaintext_crc32c = crc(&result.plaintext);
                result.key_id = out.key_id.to_string();
                result.key_version = out.version.0;
                Ok(())
            },
            |result, status| result.status = status,
        )
        .await?;
        Ok(Response::new(pb::BatchDecryptResponse { results }))
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::GenerateDataKey)?;
        let key = parse_name(&r.key, "key")?;
        let context = call.context(r.context, &self.shared.limits)?;
        let out = call
            .run_cached(
                (key, context),
                |kms, tenant, (key, context)| kms.generate_data_key_cached(tenant, key, context),
                |kms, tenant, (key, context)| kms.generate_data_key(tenant, &key, &context),
            )
            .await?;
        call.version(out.version.0);
        let plaintext_key = if r.include_plaintext {
            out.plaintext.expose_secret().to_vec()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::GenerateDataKeyResponse {
            wrapped_key_crc32c: crc(&out.wrapped),
            plaintext_key_crc32c: if r.include_plaintext {
                crc(&plaintext_key)
            } else {
                0
            },
            wrapped_key: out.wrapped,
            plaintext_key,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
        }))
    }

    async fn decrypt_data_key(
        &self,
        request: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::DecryptDataKey)?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.wrapped_key, r.wrapped_key_crc32c, "wrapped_key_crc32c")?;
        let out = self
            .open(&call, r.wrapped_key, Opening::DataKey, context)
            .await?;
        let plaintext_key = out.plaintext.expose_secret().to_vec();
        Ok(Response::new(pb::DecryptDataKeyResponse {
            plaintext_key_crc32c: crc(&plaintext_key),
            plaintext_key,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_wrapped_key_crc32c: verified,
        }))
    }

    async fn seal_secret(
        &self,
        request: Request<pb::SealSecretRequest>,
    ) -> Result<Response<pb::SealSecretResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::SealSecret)?;
        let key = parse_name(&r.key, "key")?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.secret, r.secret_crc32c, "secret_crc32c")?;
        let secret = Plaintext::new(r.secret);
        let lookup_digest = if r.include_lookup_digest {
            let copy = Plaintext::copy_from(secret.expose_secret());
            call.run(move |kms, tenant| kms.lookup_digest(tenant, &copy))
                .await?
                .to_vec()
        } else {
            Vec::new()
        };
        let out = call
            .run_cached(
                (key, secret, context),
                |kms, tenant, (key, secret, context)| {
                    kms.seal_secret_cached(tenant, key, secret, context)
                },
                |kms, tenant, (key, secret, context)| {
                    kms.seal_secret(tenant, &key, &secret, &context)
                },
            )
            .await?;
        call.version(out.version.0);
        Ok(Response::new(pb::SealSecretResponse {
            sealed_crc32c: crc(&out.sealed),
            sealed: out.sealed,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_secret_crc32c: verified,
            lookup_digest,
        }))
    }

    async fn lookup_digest(
        &self,
        request: Request<pb::LookupDigestRequest>,
    ) -> Result<Response<pb::LookupDigestResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::LookupDigest)?;
        let secret = Plaintext::new(r.secret);
        let digest = call
            .run(move |kms, tenant| kms.lookup_digest(tenant, &secret))
            .await?;
        Ok(Response::new(pb::LookupDigestResponse {
            lookup_digest: digest.to_vec(),
        }))
    }

    async fn unseal_secret(
        &self,
        request: Request<pb::UnsealSecretRequest>,
    ) -> Result<Response<pb::UnsealSecretResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::UnsealSecret)?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.sealed, r.sealed_crc32c, "sealed_crc32c")?;
        let out = self.open(&call, r.sealed, Opening::Secret, context).await?;
        let secret = out.plaintext.expose_secret().to_vec();
        Ok(Response::new(pb::UnsealSecretResponse {
            secret_crc32c: crc(&secret),
            secret,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            verified_sealed_crc32c: verified,
        }))
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::ReEncrypt)?;
        let key = optional_key(&r.key)?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.ciphertext, r.ciphertext_crc32c, "ciphertext_crc32c")?;
        let allowed = call.allowed_keys();
        let (out, source) = call
            .run(move |kms, tenant| {
                kms.re_encrypt(
                    tenant,
                    &r.ciphertext,
                    &context,
                    key.as_ref(),
                    allowed.as_deref(),
                )
            })
            .await?;
        call.key_id(&out.key_id.to_string());
        call.version(out.version.0);
        Ok(Response::new(pb::ReEncryptResponse {
            ciphertext_crc32c: crc(&out.ciphertext),
            ciphertext: out.ciphertext,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            source_key_version: source.0,
            verified_ciphertext_crc32c: verified,
        }))
    }

    async fn re_encrypt_data_key(
        &self,
        request: Request<pb::ReEncryptDataKeyRequest>,
    ) -> Result<Response<pb::ReEncryptDataKeyResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::ReEncryptDataKey)?;
        let context = call.context(r.context, &self.shared.limits)?;
        let verified = verify_crc(&r.wrapped_key, r.wrapped_key_crc32c, "wrapped_key_crc32c")?;
        let allowed = call.allowed_keys();
        let (out, source) = call
            .run(move |kms, tenant| {
                kms.re_encrypt_data_key(tenant, &r.wrapped_key, &context, allowed.as_deref())
            })
            .await?;
        call.key_id(&out.key_id.to_string());
        call.version(out.version.0);
        // The plaintext data key is dropped (zeroized) here; only the new blob leaves.
        Ok(Response::new(pb::ReEncryptDataKeyResponse {
            wrapped_key_crc32c: crc(&out.wrapped),
            wrapped_key: out.wrapped,
            key_id: out.key_id.to_string(),
            key_version: out.version.0,
            source_key_version: source.0,
            verified_wrapped_key_crc32c: verified,
        }))
    }

    async fn hash_password(
        &self,
        request: Request<pb::HashPasswordRequest>,
    ) -> Result<Response<pb::HashPasswordResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::HashPassword)?;
        let key = parse_name(&r.key, "key")?;
        let slot = self.shared.password_slot()?;
        let password = Plaintext::new(r.password);
        let hash = call
            .run(move |kms, tenant| {
                let _slot = slot;
                kms.hash_password(tenant, &key, &password)
            })
            .await?;
        Ok(Response::new(pb::HashPasswordResponse { hash }))
    }

    async fn verify_password(
        &self,
        request: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        let (call, r) = self.begin(request, Rpc::VerifyPassword)?;
        let key = parse_name(&r.key, "key")?;
        let slot = self.shared.password_slot()?;
        let password = Plaintext::new(r.password);
        let stored = r.hash;
        let verified = call
            .run(move |kms, tenant| {
                let _slot = slot;
                kms.verify_password(tenant, &key, &password, &stored)
            })
            .await?;
        Ok(Response::new(pb::VerifyPasswordResponse {
            matches: verified.matches,
            rehash_needed: verified.rehash_needed,
        }))
    }
}

/// What Sign and Verify are given, by the request's message type.
fn signable(digest: bool, message: &[u8]) -> Signable<'_> {
    match digest {
        true => Signable::Digest(message),
        false => Signable::Message(message),
    }
}
