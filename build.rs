//! Compiles the gRPC contract with the protoc shipped in `protoc-bin-vendored`, so building
//! needs no system protoc.

use std::path::PathBuf;

const PROTO: &str = "proto/keyfront/v1/keyfront.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let mut builder = tonic_prost_build::configure();
    // The fuzzer builds requests with `arbitrary` (fuzz/fuzz_targets/handlers.rs): every
    // request message and the batch items they hold.
    if std::env::var_os("CARGO_FEATURE_ARBITRARY").is_some() {
        for message in request_messages(&std::fs::read_to_string(PROTO)?) {
            builder = builder.type_attribute(
                format!(".keyfront.v1.{message}"),
                "#[derive(arbitrary::Arbitrary)]",
            );
        }
    }
    builder
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
            "keyfront.v1.GenerateMacRequest",
            "keyfront.v1.VerifyMacRequest",
            "keyfront.v1.SignRequest",
            "keyfront.v1.VerifyRequest",
        ])
        .compile_with_config(
            config,
            &[PathBuf::from(PROTO)],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// The names of the messages a client sends: `*Request` and the batch items.
fn request_messages(proto: &str) -> Vec<String> {
    proto
        .lines()
        .filter_map(|line| line.strip_prefix("message "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name.ends_with("Request") || name.ends_with("Item"))
        .map(str::to_owned)
        .collect()
}
