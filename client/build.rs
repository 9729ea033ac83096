//! Compiles the client side of keyfront's gRPC contract (the repository's
//! `proto/keyfront/v1/keyfront.proto`) with the protoc from `protoc-bin-vendored`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = PathBuf::from("../proto/keyfront/v1/keyfront.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_with_config(
            config,
            &[proto],
            &[
                PathBuf::from("../proto"),
                protoc_bin_vendored::include_path()?,
            ],
        )?;
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}
