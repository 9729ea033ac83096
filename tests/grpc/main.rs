//! The gRPC API over real TLS sockets against a real token (SoftHSM and Kryoptic in the test
//! command): every RPC, the role × RPC matrix, tenant isolation, refused clients, bad input,
//! HSM outage, the audit log, the lifecycle over time, support access, backups, and keys of
//! every purpose.
//!
//! One test binary (`--test grpc`), one file per concern; the server harness and shared
//! helpers are in `harness.rs`.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod access;
mod audit;
#[cfg(feature = "test-hooks")]
mod backups;
mod bad_input;
#[cfg(feature = "test-hooks")]
mod lifecycle;
mod outage;
mod purposes;
mod roles;
