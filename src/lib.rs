//! keyfront: a key management service in front of a PKCS#11 HSM.
//!
//! Layers, bottom up: [`hsm`] (the HSM behind a narrow trait), [`crypto`] (secret types, local
//! AEAD, blob formats), [`keystore`] (MAC'd sled databases), [`kms`] (the domain API), and
//! [`cli`] (the `keyfront` command). See `docs/DESIGN.md` for why it is shaped this way.

pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;

pub mod failpoint;
pub mod hsm;
pub mod ids;
pub mod keystore;
pub mod kms;
pub mod metrics;

pub use kms::Error;
pub mod audit;
pub mod service;
