//! Compiles `berth/v1/*.proto` into Rust and a descriptor set for gRPC server
//! reflection. Uses the vendored `protoc` unless `PROTOC` names another, so a
//! plain `cargo build` needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let include = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "berth/v1/common.proto",
        "berth/v1/lease.proto",
        "berth/v1/agent.proto",
        "berth/v1/admin.proto",
    ]
    .map(PathBuf::from);
    tonic_prost_build::configure()
        // The agent stream rpc is called `Connect`; the transport helper would
        // generate a clashing `connect` constructor. Clients build channels.
        .build_transport(false)
        // Small per-call buffers: see `codec` in lib.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .file_descriptor_set_path(out.join("berth_v1_descriptor.bin"))
        .compile_with_config(config, &files, &[PathBuf::from("."), include])?;
    Ok(())
}
