//! Envoy's message descriptors, for the proto3 JSON view of the adapter's resources (`json.rs`).
//!
//! They come from the descriptor set `envoy-types` generated its Rust types from
//! (`src/generated/types.bin` in its package), so the view and the types the adapter builds can
//! never be of two Envoy API versions. The crate does not export that file, so its package
//! directory is asked of `cargo metadata`: it is wherever this build took `envoy-types` from (any
//! `CARGO_HOME`, a vendor directory, a git or path override). The set holds all of Envoy (3.3 MB);
//! only the files of the types in `ROOTS` and the files they import are kept, without comments
//! (about 220 kB).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use prost_types::FileDescriptorProto;

/// The messages the view must know: the five resource types, the static bootstrap, and every
/// type the adapter packs into an `Any`. A type missing here fails `json.rs`'s tests (the golden
/// cases are rendered through these descriptors) with the name of the unknown type.
const ROOTS: &[&str] = &[
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.extensions.transport_sockets.tls.v3.Secret",
    "envoy.config.bootstrap.v3.Bootstrap",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "envoy.extensions.filters.http.router.v3.Router",
    "envoy.extensions.filters.http.rbac.v3.RBAC",
    "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "envoy.config.trace.v3.ZipkinConfig",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let package = envoy_types_dir();
    let set_path = package.join("src/generated/types.bin");
    println!("cargo:rerun-if-changed={}", set_path.display());
    let bytes = std::fs::read(&set_path).unwrap_or_else(|e| {
        panic!(
            "cannot read envoy-types' descriptor set {}: {e} (a newer envoy-types moved it? \
             its proto/ directory can be compiled with protox instead)",
            set_path.display()
        )
    });
    let pruned = prune(&bytes)
        .unwrap_or_else(|e| panic!("{} is not a FileDescriptorSet: {e}", set_path.display()));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("envoy_descriptors.bin"), pruned).expect("write the descriptor set");
}

/// The set of the files defining `ROOTS` and every file they import, in the set's order
/// (imports first), without source info (comments). Files are copied as bytes: decoding them
/// with `prost_types` would drop their options' extensions, among them
/// `udpa.annotations.sensitive`, by which private keys are redacted.
fn prune(set: &[u8]) -> Result<Vec<u8>, String> {
    /// `FileDescriptorSet.file` and `FileDescriptorProto.source_code_info`.
    const FILE: u32 = 1;
    const SOURCE_CODE_INFO: u32 = 9;
    let files: Vec<(FileDescriptorProto, &[u8])> = fields(set)?
        .into_iter()
        .filter(|f| f.tag == FILE)
        .map(|f| {
            let file = FileDescriptorProto::decode(f.value).map_err(|e| e.to_string())?;
            Ok((file, f.value))
        })
        .collect::<Result<_, String>>()?;
    let mut wanted: Vec<String> = ROOTS
        .iter()
        .map(|root| {
            files
                .iter()
                .find(|(f, _)| defines(f, root))
                .unwrap_or_else(|| panic!("envoy-types' descriptor set has no message {root}"))
                .0
                .name()
                .to_owned()
        })
        .collect();
    let mut keep = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if !keep.insert(name.clone()) {
            continue;
        }
        let (file, _) = files
            .iter()
            .find(|(f, _)| f.name() == name)
            .unwrap_or_else(|| panic!("envoy-types' descriptor set lacks {name}, an import"));
        wanted.extend(file.dependency.iter().cloned());
    }
    let mut out = Vec::new();
    for (file, bytes) in &files {
        if !keep.contains(file.name()) {
            continue;
        }
        let mut kept = Vec::with_capacity(bytes.len());
        for field in fields(bytes)? {
            if field.tag != SOURCE_CODE_INFO {
                kept.extend_from_slice(field.raw);
            }
        }
        prost::encoding::bytes::encode(FILE, &kept, &mut out);
    }
    Ok(out)
}

/// A field of an encoded message.
struct Field<'a> {
    tag: u32,
    /// Key and value, as on the wire.
    raw: &'a [u8],
    /// The value of a length-delimited field (empty for the other wire types).
    value: &'a [u8],
}

/// A message's fields, in their order on the wire.
fn fields(message: &[u8]) -> Result<Vec<Field<'_>>, String> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut out = Vec::new();
    let mut rest = message;
    while !rest.is_empty() {
        let start = message.len() - rest.len();
        let (tag, wire_type) = decode_key(&mut rest).map_err(|e| e.to_string())?;
        let len = match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|e| e.to_string())?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => decode_varint(&mut rest)
                .map_err(|e| e.to_string())
                .and_then(|len| usize::try_from(len).map_err(|e| e.to_string()))?,
            WireType::StartGroup | WireType::EndGroup => {
                return Err("a group, which descriptor sets do not hold".into());
            }
        };
        if len > rest.len() {
            return Err("a truncated field".into());
        }
        let (value, after) = rest.split_at(len);
        rest = after;
        out.push(Field {
            tag,
            raw: &message[start..message.len() - rest.len()],
            value,
        });
    }
    Ok(out)
}

fn defines(file: &FileDescriptorProto, message: &str) -> bool {
    let Some(rest) = message
        .strip_prefix(file.package())
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    file.message_type.iter().any(|m| m.name() == rest)
}

/// The package directory of the `envoy-types` this build uses. `cargo metadata` reads every
/// package of the workspace's resolve (`--filter-platform`: for this target only): offline first,
/// which succeeds wherever the workspace was built or fetched (CI, a developer's tree); online
/// when one crate is built on a clean machine and the other members' packages are not there yet.
fn envoy_types_dir() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("Cargo.toml");
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let run = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--locked"])
            .args(["--filter-platform", &target])
            .arg("--manifest-path")
            .arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
    };
    let output = match run(true) {
        Ok(o) if o.status.success() => o,
        _ => run(false).expect("run cargo metadata"),
    };
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    if let Some(root) = metadata["workspace_root"].as_str() {
        // An envoy-types upgrade changes the lock file, not this script's inputs.
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(root).join("Cargo.lock").display()
        );
    }
    // The version this crate depends on: the one among its dependencies in the resolve.
    let ours = std::env::var("CARGO_PKG_NAME").expect("cargo sets it");
    let packages = metadata["packages"].as_array().expect("packages");
    let resolve = metadata["resolve"]["nodes"].as_array().expect("resolve");
    // By name among the workspace's members (a path could be spelled differently, a symlink).
    let members = metadata["workspace_members"]
        .as_array()
        .expect("workspace_members");
    let our_id = packages
        .iter()
        .find(|p| p["name"] == ours.as_str() && members.contains(&p["id"]))
        .and_then(|p| p["id"].as_str())
        .expect("this package in cargo metadata");
    let node = resolve
        .iter()
        .find(|n| n["id"] == our_id)
        .expect("this package in the resolve");
    let envoy_types = node["deps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["pkg"].as_str())
        .find_map(|id| {
            packages
                .iter()
                .find(|p| p["id"] == id && p["name"] == "envoy-types")
        })
        .expect("envoy-types among this package's dependencies");
    Path::new(
        envoy_types["manifest_path"]
            .as_str()
            .expect("manifest_path"),
    )
    .parent()
    .expect("a manifest has a directory")
    .to_path_buf()
}
