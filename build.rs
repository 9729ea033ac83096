//! Compiles the gRPC contract with the protoc shipped in `protoc-bin-vendored`, so building
//! needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keyfront_descriptor.bin"))
        .extern_path(".google.rpc", "::tonic_types::pb")
        // Messages that carry plaintext, keys or secrets get a hand-written, redacting Debug
        // (src/service/convert.rs).
        .skip_debug([
            "keyfront.v1.EncryptRequest",
            "keyfront.v1.DecryptResponse",
            "keyfront.v1.BatchEncryptItem",
            "keyfront.v1.BatchDecryptResult",
            "keyfront.v1.GenerateDataKeyResponse",
            "keyfront.v1.DecryptDataKeyResponse",
            "keyfront.v1.SealSecretRequest",
            "keyfront.v1.UnsealSecretResponse",
            "keyfront.v1.HashPasswordRequest",
            "keyfront.v1.VerifyPasswordRequest",
            "keyfront.v1.LookupDigestRequest",
        ])
        .compile_with_config(
            config,
            &[PathBuf::from("proto/keyfront/v1/keyfront.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
