//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and generates prost types
//! and tonic clients/servers into OUT_DIR, plus the encoded descriptor set for reflection.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "loyalty/common/v1/common.proto",
    "loyalty/identity/v1/identity.proto",
    "loyalty/balance/v1/balance.proto",
    "loyalty/promotion/v1/promotion.proto",
    "loyalty/segmentation/v1/segmentation.proto",
    "loyalty/reporting/v1/reporting.proto",
    "loyalty/events/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("loyalty_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
