//! Root rotation end to end for 50 identities: the real controller (Tresor CA in manifest mode)
//! serving 50 meshed pods, each with its own service account, and one xDS client per pod that
//! connects over mTLS with the pod's bootstrap credentials, subscribes to every Envoy type and
//! ACKs every response, as Envoy does. The operator replaces the root file; after every SDS
//! response a client receives, the test checks that every client's service certificate chains
//! to a root in every other client's trust bundle (signatures checked), and at the end that
//! only the new root is left, in the secrets and in the bootstrap credentials. One client never
//! ACKs its listeners (as an Envoy refusing a listener would): the rotation waits for secrets
//! only, so it must not wait out its grace period for that client.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use fsm_integration_tests::{
    Controller, ControllerOptions, SDS, connect_ads, decode_secrets, demo_manifests, eventually,
    inline_text, start_controller, xds_node,
};
use parking_lot::Mutex;

const SUBNET: u8 = 71;
const IDENTITIES: usize = 50;
const NAMESPACE: &str = "rotation";
const TYPES: [&str; 5] = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    LDS,
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    SDS,
];
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// This pod's client never ACKs a listener response.
const NO_LISTENER_ACKS: usize = 7;

/// 50 pods in their own meshed namespace, each with its own service account and proxy UUID.
fn write_pods(manifests: &Path) -> Result<()> {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    flomesh.io/monitored-by: fsm\n"
    );
    for i in 0..IDENTITIES {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa{i}\n  namespace: {NAMESPACE}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{i}\n  namespace: {NAMESPACE}\n  labels:\n    app: app{i}\n    fsm-proxy-uuid: {uuid}\n\
             spec:\n  serviceAccountName: sa{i}\n  containers:\n  - name: app\n    image: app\nstatus:\n  podIP: 127.0.{SUBNET}.{ip}\n",
            uuid = uuid(i),
            ip = 100 + i,
        ));
    }
    std::fs::write(manifests.join("50-rotation.yaml"), yaml)?;
    Ok(())
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{:012x}", i + 1)
}

// === what the clients hold ===

#[derive(Clone, Debug, Default)]
struct Held {
    /// Serial of the root the service certificate chains to (by signature).
    leaf_root: Option<String>,
    /// Serials of the roots in the inbound validation context.
    bundle: BTreeSet<String>,
}

#[derive(Default)]
struct Mesh {
    held: Mutex<BTreeMap<usize, Held>>,
    /// Root PEMs by serial, as seen in any bundle.
    roots: Mutex<BTreeMap<String, String>>,
    violations: Mutex<Vec<String>>,
    sds_responses: std::sync::atomic::AtomicUsize,
}

impl Mesh {
    fn apply(&self, client: usize, secrets: &[Secret]) -> Result<()> {
        let mut chain = None;
        let mut bundle_pem = None;
        for s in secrets {
            match &s.r#type {
                Some(secret::Type::TlsCertificate(c)) => {
                    chain = c.certificate_chain.as_ref().and_then(text);
                }
                Some(secret::Type::ValidationContext(v))
                    if s.name.starts_with("root-cert-for-mtls-inbound") =>
                {
                    bundle_pem = v.trusted_ca.as_ref().and_then(text);
                }
                _ => {}
            }
        }
        let (chain, bundle_pem) = (
            chain.context("no service certificate in SDS")?,
            bundle_pem.context("no inbound validation context in SDS")?,
        );
        let mut bundle = BTreeSet::new();
        {
            let mut roots = self.roots.lock();
            for der in fsm_certs::x509::certificates_der(&bundle_pem)? {
                let pem = fsm_certs::x509::der_to_pem(&der);
                let serial = fsm_certs::x509::leaf_info(&pem)?.serial;
                roots.insert(serial.clone(), pem);
                bundle.insert(serial);
            }
        }
        let leaf_root = self
            .roots
            .lock()
            .iter()
            .find(|(_, pem)| fsm_certs::x509::verify_chain(&chain, pem).is_ok())
            .map(|(serial, _)| serial.clone());
        let mut held = self.held.lock();
        held.insert(client, Held { leaf_root, bundle });
        self.sds_responses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Every client's leaf chains to a root in every other client's bundle.
        for (p, hp) in held.iter() {
            for (q, hq) in held.iter().filter(|(q, _)| *q != p) {
                let ok = hp.leaf_root.as_ref().is_some_and(|r| hq.bundle.contains(r));
                if !ok {
                    let mut v = self.violations.lock();
                    if v.len() < 10 {
                        v.push(format!(
                            "after an SDS response to pod{client}: pod{p}'s leaf (root {:?}) is not trusted by pod{q} ({:?})",
                            hp.leaf_root, hq.bundle
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn text(source: &envoy_types::pb::envoy::config::core::v3::DataSource) -> Option<String> {
    inline_text(source).ok()
}

/// One pod's xDS client: every Envoy type on one SotW stream, every response ACKed (but
/// listeners of pod [`NO_LISTENER_ACKS`]).
async fn client(
    controller_ads: std::net::SocketAddr,
    dir: PathBuf,
    i: usize,
    mesh: Arc<Mesh>,
) -> Result<()> {
    let mut ads = connect_ads(controller_ads, &dir).await?;
    let node = xds_node(
        &format!("{}.sidecar.sa{i}.{NAMESPACE}", uuid(i)),
        &format!("sa{i}.{NAMESPACE}"),
        "envoy",
    );
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for type_url in TYPES {
        tx.send(DiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        let DiscoveryResponse {
            version_info,
            nonce,
            type_url,
            resources,
            ..
        } = response;
        if type_url == SDS {
            mesh.apply(i, &decode_secrets(&resources)?)?;
        }
        if i == NO_LISTENER_ACKS && type_url == LDS {
            continue;
        }
        tx.send(DiscoveryRequest {
            version_info,
            response_nonce: nonce,
            type_url,
            ..Default::default()
        })
        .await?;
    }
    bail!("pod{i}'s stream ended")
}

/// Serials of the roots in a PEM bundle.
fn serials(pem: &str) -> Result<BTreeSet<String>> {
    Ok(fsm_certs::x509::all_info(pem)?
        .into_iter()
        .map(|i| i.serial)
        .collect())
}

fn replace_root_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The controller's own account of the rotation (phase durations), from its log.
fn rotation_log(controller: &Controller) -> Option<String> {
    let log = std::fs::read_to_string(controller.process.log_path()).ok()?;
    log.lines()
        .find(|l| l.contains("root rotation finished: the old root is no longer trusted"))
        .map(|l| {
            // Drop ANSI colours.
            let mut out = String::new();
            let mut escape = false;
            for c in l.chars() {
                match (escape, c) {
                    (false, '\u{1b}') => escape = true,
                    (true, 'm') => escape = false,
                    (false, c) => out.push(c),
                    _ => {}
                }
            }
            out
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identities_rotate_the_root_with_every_peer_verifiable() {
    if let Err(err) = rotate_fifty().await {
        panic!("{err:#}");
    }
}

async fn rotate_fifty() -> Result<()> {
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let manifests = demo_manifests(&work.path().join("manifests"), SUBNET)?;
    write_pods(&manifests)?;
    let controller = start_controller(
        &manifests,
        &logs,
        &ControllerOptions {
            extra_args: vec!["--root-rotation-grace".into(), "30s".into()],
            ..ControllerOptions::default()
        },
    )
    .await?;
    let ads = controller.ads();
    let mesh = Arc::new(Mesh::default());
    let mut clients = Vec::new();
    for i in 0..IDENTITIES {
        let dir = ads.pod_dir(NAMESPACE, &format!("pod{i}"));
        fsm_integration_tests::controller::wait_for_bootstrap(&dir, Duration::from_secs(30))
            .await?;
        clients.push(tokio::spawn(client(ads.addr, dir, i, mesh.clone())));
    }
    // Every client holds a service certificate of the first root.
    let first_root = eventually(Duration::from_secs(60), || async {
        if let Some(i) = clients.iter().position(|c| c.is_finished()) {
            bail!("pod{i}'s client stopped");
        }
        let held = mesh.held.lock();
        ensure!(
            held.len() == IDENTITIES,
            "{} of {IDENTITIES} clients have secrets",
            held.len()
        );
        let roots: BTreeSet<&BTreeSet<String>> = held.values().map(|h| &h.bundle).collect();
        ensure!(roots.len() == 1, "bundles differ: {roots:?}");
        let bundle = roots.into_iter().next().cloned().unwrap_or_default();
        ensure!(bundle.len() == 1, "{bundle:?}");
        Ok(bundle.into_iter().next().unwrap_or_default())
    })
    .await?;
    let before = mesh
        .sds_responses
        .load(std::sync::atomic::Ordering::Relaxed);

    let new_root = fsm_certs::tresor::CertificateAuthority::generate_root(
        "fsm-rotated-root",
        Duration::from_secs(24 * 3600),
    )?;
    let new_serial = fsm_certs::x509::leaf_info(new_root.cert_pem())?.serial;
    let started = Instant::now();
    replace_root_file(
        &controller.state_dir.join("fsm-ca-bundle.pem"),
        &format!("{}{}", new_root.cert_pem(), new_root.key_pem().expose_pem()),
    )?;
    let only_new = BTreeSet::from([new_serial.clone()]);
    eventually(Duration::from_secs(120), || async {
        let held = mesh.held.lock();
        let behind: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.bundle != only_new || h.leaf_root.as_ref() != Some(&new_serial))
            .map(|(i, h)| format!("pod{i}: {h:?}"))
            .collect();
        ensure!(
            behind.is_empty(),
            "{} clients not on the new root only, e.g. {:?}",
            behind.len(),
            behind.first()
        );
        Ok(())
    })
    .await?;
    let all_new = started.elapsed();
    let log = eventually(Duration::from_secs(10), || async {
        rotation_log(&controller).context("the controller has not logged the end of the rotation")
    })
    .await?;
    let responses = mesh
        .sds_responses
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    println!(
        "ROOT_ROTATION_E2E: {IDENTITIES} identities, every client on the new root only {:.2} s after the root file was replaced (file polled every 1 s); {responses} SDS responses checked; controller: {log}",
        all_new.as_secs_f64()
    );
    let violations = mesh.violations.lock().clone();
    ensure!(
        violations.is_empty(),
        "peers could not verify each other: {violations:#?}"
    );
    let full_log = std::fs::read_to_string(controller.process.log_path())?;
    ensure!(
        !full_log.contains("acknowledged within the grace period"),
        "a phase waited for the grace period instead of the clients' ACKs: {log}"
    );
    ensure!(first_root != new_serial);

    // The bootstrap credentials moved to the new root too: a fresh client connects with them.
    for i in 0..IDENTITIES {
        let dir = ads.pod_dir(NAMESPACE, &format!("pod{i}"));
        let ca = serials(&std::fs::read_to_string(dir.join("ca.crt"))?)?;
        ensure!(ca == only_new, "pod{i}'s bootstrap ca.crt holds {ca:?}");
        let cert = std::fs::read_to_string(dir.join("tls.crt"))?;
        fsm_certs::x509::verify_chain(&cert, new_root.cert_pem())
            .with_context(|| format!("pod{i}'s bootstrap tls.crt is not of the new root"))?;
    }
    let again = Arc::new(Mesh::default());
    let fresh = tokio::spawn(client(
        ads.addr,
        ads.pod_dir(NAMESPACE, "pod0"),
        0,
        again.clone(),
    ));
    eventually(Duration::from_secs(20), || async {
        ensure!(
            !fresh.is_finished(),
            "the reconnecting client stopped: {fresh:?}"
        );
        let held = again.held.lock();
        ensure!(
            held.get(&0).is_some_and(|h| h.bundle == only_new),
            "{held:?}"
        );
        Ok(())
    })
    .await?;
    fresh.abort();
    for c in clients {
        c.abort();
    }
    Ok(())
}
