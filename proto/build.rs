//! Compiles `fsm/dataplane/v1/*.proto` with protox (pure Rust, no `protoc`) and generates the
//! prost messages into `OUT_DIR`. Messages only: the ADS service comes from `envoy-types`.

use std::path::PathBuf;

use prost::Message;

const PROTO_DIR: &str = "fsm/dataplane/v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(PROTO_DIR)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    // Sorted so the descriptor set, and so the generated code, do not depend on directory order.
    files.sort();
    let fds = protox::compile(&files, ["."])?;

    // The descriptor set without comments, for reflection (JSON views of resources).
    let mut bare = fds.clone();
    for file in &mut bare.file {
        file.source_code_info = None;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fsm_dataplane_v1_descriptor.bin"),
        bare.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        // Its Debug is written by hand so that private keys never reach a log.
        .skip_debug([".fsm.dataplane.v1.TlsCertificate"])
        .compile_fds_with_config(fds, {
            let mut config = tonic_prost_build::Config::new();
            // `prost::Name` impls: `type_url()` for packing into `Any`.
            config.enable_type_names();
            config.type_name_domain(["."], "type.googleapis.com");
            config
        })?;
    Ok(())
}
