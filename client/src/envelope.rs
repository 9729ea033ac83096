//! Envelope encryption: data keys from keyfront (GenerateDataKey, role backup), objects
//! encrypted here with AES-256-GCM-SIV, and the wrapped data key stored in each envelope.
//!
//! One data key encrypts many objects (up to [`EnvelopeOptions::max_objects_per_data_key`]
//! or for [`EnvelopeOptions::data_key_lifetime`]), so keyfront is called once per data key,
//! not once per object. Nonces are random; AES-GCM-SIV keeps a repeated nonce from revealing
//! more than that two objects were equal. Opening unwraps the data key once (DecryptDataKey)
//! and keeps it in a cache bounded in entries and in time; cached keys are zeroized when they
//! leave it.
//!
//! An envelope is `"kfe1" ‖ wrapped key length (u16, big-endian) ‖ wrapped key ‖ nonce (12)
//! ‖ ciphertext ‖ tag (16)`; everything before the nonce is the AEAD's associated data, so an
//! envelope cannot be given another wrapped key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::Zeroizing;

use crate::{Client, Error};

const MAGIC: &[u8; 4] = b"kfe1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How an [`Envelope`] uses and caches data keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeOptions {
    /// Objects sealed under one data key before a new one is fetched. Default 1,000,000
    /// (random 96-bit nonces under AES-GCM-SIV stay far inside their bounds).
    pub max_objects_per_data_key: u64,
    /// How long one data key seals before a new one is fetched. Default 5 minutes.
    pub data_key_lifetime: Duration,
    /// Most unwrapped data keys kept for opening. Default 1,000.
    pub cache_capacity: usize,
    /// How long an unwrapped data key stays in the cache. Default 5 minutes.
    pub cache_ttl: Duration,
}

impl Default for EnvelopeOptions {
    fn default() -> Self {
        Self {
            max_objects_per_data_key: 1_000_000,
            data_key_lifetime: Duration::from_secs(300),
            cache_capacity: 1_000,
            cache_ttl: Duration::from_secs(300),
        }
    }
}

/// What an [`Envelope`] asked of keyfront, and what its cache saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvelopeStats {
    /// GenerateDataKey calls.
    pub data_keys_generated: u64,
    /// DecryptDataKey calls.
    pub data_keys_unwrapped: u64,
    /// Opens whose data key was in the cache.
    pub cache_hits: u64,
}

/// Seals and opens envelopes under one DATA key and one encryption context. Cheap to clone;
/// clones share the current data key and the cache.
///
/// ```no_run
/// # async fn example() -> Result<(), keyfront_client::Error> {
/// use keyfront_client::{Client, Config, Envelope, EnvelopeOptions};
///
/// // A principal with role backup (GenerateDataKey, DecryptDataKey).
/// let client = Client::connect(Config::from_file("/etc/keyfront/client.toml")?)?;
/// let invoices = Envelope::new(
///     client,
///     "default",
///     &[("bucket", "invoices")],
///     EnvelopeOptions::default(),
/// );
/// let sealed = invoices.seal(b"invoice 42: 100 EUR").await?;
/// // Store `sealed` anywhere; it carries its wrapped data key.
/// assert_eq!(&invoices.open(&sealed).await?[..], b"invoice 42: 100 EUR");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Envelope {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    key: String,
    context: Vec<(String, String)>,
    options: EnvelopeOptions,
    current: Mutex<Option<Current>>,
    cache: quick_cache::sync::Cache<Vec<u8>, Arc<Cached>>,
    generated: AtomicU64,
    unwrapped: AtomicU64,
    hits: AtomicU64,
}

/// The data key that seals now.
struct Current {
    header: Arc<Vec<u8>>,
    cipher: Arc<Aes256GcmSiv>,
    since: Instant,
    uses: u64,
}

/// An unwrapped data key (the cipher zeroizes its key schedule when dropped).
struct Cached {
    cipher: Arc<Aes256GcmSiv>,
    since: Instant,
}

impl Envelope {
    /// Envelopes under the DATA key `key`, with `context` bound to every data key.
    pub fn new(
        client: Client,
        key: impl Into<String>,
        context: &[(&str, &str)],
        options: EnvelopeOptions,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                key: key.into(),
                context: context
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                options,
                current: Mutex::new(None),
                cache: quick_cache::sync::Cache::new(options.cache_capacity.max(1)),
                generated: AtomicU64::new(0),
                unwrapped: AtomicU64::new(0),
                hits: AtomicU64::new(0),
            }),
        }
    }

    /// What it asked of keyfront so far.
    pub fn stats(&self) -> EnvelopeStats {
        EnvelopeStats {
            data_keys_generated: self.inner.generated.load(Ordering::Relaxed),
            data_keys_unwrapped: self.inner.unwrapped.load(Ordering::Relaxed),
            cache_hits: self.inner.hits.load(Ordering::Relaxed),
        }
    }

    /// Seals `plaintext` into an envelope.
    ///
    /// # Errors
    /// What [`Client::generate_data_key`] returns when a new data key is due.
    pub async fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let (header, cipher) = self.sealing_key().await?;
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(header.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        // Encrypted in place: no second copy of the plaintext.
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &header, out[start..].as_mut().into())
            .map_err(|_| Error::Envelope("the plaintext is too large"))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens an envelope made by [`Envelope::seal`] under the same key and context.
    ///
    /// # Errors
    /// [`Error::Envelope`] for something that is not an envelope, [`Error::Integrity`] for
    /// one that was changed, what [`Client::decrypt_data_key`] returns (INVALID_ARGUMENT for
    /// a wrapped key that is not keyfront's, or under another context).
    pub async fn open(&self, envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let (header, rest) = split(envelope)?;
        let wrapped = &header[MAGIC.len() + 2..];
        let cipher = self.opening_key(wrapped).await?;
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Error::Integrity)?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| Error::Integrity)?;
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                header,
                plaintext.as_mut_slice().into(),
                &Tag::from(tag),
            )
            .map_err(|_| Error::Integrity)?;
        Ok(plaintext)
    }

    fn context(&self) -> Vec<(&str, &str)> {
        self.inner
            .context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// The data key that seals now, and the header that names it; a new one when the current
    /// one is used up or too old.
    async fn sealing_key(&self) -> Result<(Arc<Vec<u8>>, Arc<Aes256GcmSiv>), Error> {
        let options = self.inner.options;
        {
            let mut current = self.inner.current.lock().expect("envelope lock");
            if let Some(key) = current.as_mut()
                && key.uses < options.max_objects_per_data_key
                && key.since.elapsed() < options.data_key_lifetime
            {
                key.uses += 1;
                return Ok((Arc::clone(&key.header), Arc::clone(&key.cipher)));
            }
        }
        // Fetched without the lock held: two callers racing here each get a key, which is
        // harmless; nobody waits behind a network call.
        let data_key = self
            .inner
            .client
            .generate_data_key(&self.inner.key, &self.context())
            .await?;
        self.inner.generated.fetch_add(1, Ordering::Relaxed);
        let cipher = Arc::new(
            Aes256GcmSiv::new_from_slice(&data_key.plaintext)
                .map_err(|_| Error::Envelope("keyfront returned a data key of the wrong length"))?,
        );
        let length = u16::try_from(data_key.wrapped.len())
            .map_err(|_| Error::Envelope("the wrapped data key is too long"))?;
        let mut header = Vec::with_capacity(MAGIC.len() + 2 + data_key.wrapped.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(&data_key.wrapped);
        let header = Arc::new(header);
        // What this process seals, it can open without asking keyfront.
        self.inner.cache.insert(
            data_key.wrapped,
            Arc::new(Cached {
                cipher: Arc::clone(&cipher),
                since: Instant::now(),
            }),
        );
        *self.inner.current.lock().expect("envelope lock") = Some(Current {
            header: Arc::clone(&header),
            cipher: Arc::clone(&cipher),
            since: Instant::now(),
            uses: 1,
        });
        Ok((header, cipher))
    }

    /// The data key of a wrapped key: from the cache if fresh, else from keyfront.
    async fn opening_key(&self, wrapped: &[u8]) -> Result<Arc<Aes256GcmSiv>, Error> {
        if let Some(cached) = self.inner.cache.get(wrapped) {
            if cached.since.elapsed() < self.inner.options.cache_ttl {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Arc::clone(&cached.cipher));
            }
            // Expired: it leaves the cache (and is zeroized once the last user drops it).
            self.inner.cache.remove(wrapped);
        }
        let plaintext = self
            .inner
            .client
            .decrypt_data_key(wrapped, &self.context())
            .await?;
        self.inner.unwrapped.fetch_add(1, Ordering::Relaxed);
        let cipher =
            Arc::new(Aes256GcmSiv::new_from_slice(&plaintext).map_err(|_| {
                Error::Envelope("keyfront returned a data key of the wrong length")
            })?);
        self.inner.cache.insert(
            wrapped.to_vec(),
            Arc::new(Cached {
                cipher: Arc::clone(&cipher),
                since: Instant::now(),
            }),
        );
        Ok(cipher)
    }
}

/// The header (associated data) and the rest (nonce ‖ ciphertext ‖ tag) of an envelope.
fn split(envelope: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let Some(rest) = envelope.strip_prefix(MAGIC.as_slice()) else {
        return Err(Error::Envelope("it does not start with kfe1"));
    };
    let (length, rest) = rest
        .split_at_checked(2)
        .ok_or(Error::Envelope("it is cut short"))?;
    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
    if length == 0 || rest.len() < length + NONCE_LEN + TAG_LEN {
        return Err(Error::Envelope("it is cut short"));
    }
    Ok(envelope.split_at(MAGIC.len() + 2 + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_refuses_what_is_not_an_envelope() {
        for bad in [
            &b""[..],
            b"kfe",
            b"kfe1",
            b"kfe1\x00",
            b"kfe1\x00\x00",
            b"kfe2\x00\x01xnnnnnnnnnnnntttttttttttttttt",
            b"kfe1\x00\x05xnnnnnnnnnnnntttttttttttttttt",
        ] {
            assert!(matches!(split(bad), Err(Error::Envelope(_))), "{bad:?}");
        }
        let good = b"kfe1\x00\x01xnnnnnnnnnnnntttttttttttttttt";
        let (header, rest) = split(good).expect("envelope");
        assert_eq!(header, b"kfe1\x00\x01x");
        assert_eq!(rest.len(), NONCE_LEN + TAG_LEN);
    }
}
