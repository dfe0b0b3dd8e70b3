//! Bootstrap credentials: every sidecar pod gets an xDS client certificate (CN
//! `<uuid>.sidecar.<sa>.<ns>`) and the mesh's roots, so that it can open its mTLS ADS stream.
//!
//! In a cluster the controller keeps them in a per-pod Secret, `fsm-sidecar-bootstrap-<proxy-uuid>`
//! in the pod's namespace (type `kubernetes.io/tls`, keys `ca.crt`, `tls.crt`, `tls.key`), which
//! the injector mounts into the sidecar. The Secret names its Pod (by uid) as its owner, so
//! Kubernetes' garbage collector deletes it with the pod even when no controller runs; the
//! controller deletes it too when the pod leaves the mesh, and, whenever it becomes the leader,
//! deletes the bootstrap Secrets (label `app.kubernetes.io/component=sidecar-bootstrap`) whose pod
//! is gone. Of several replicas only the holder of the leader Lease writes (see `leader.rs`); the
//! Secret's annotation `flomesh.io/bootstrap-writer` names the replica that wrote it. Without a
//! cluster (manifest mode, or sidecars outside it) the controller writes them where the sidecars
//! read them:
//!
//! ```text
//! <dir>/<namespace>/<pod>/ca.crt   the mesh trust bundle (two roots during a root rotation)
//! <dir>/<namespace>/<pod>/tls.crt  the xDS client certificate chain
//! <dir>/<namespace>/<pod>/tls.key  its private key (mode 0600)
//! ```
//!
//! The names are a Kubernetes TLS Secret's keys, and the layout is a Secret volume's: each name is a
//! link into `..data`, itself a link to a directory named after the certificate's serial number,
//! which is swapped atomically (`rename`). A reader never sees a certificate with another
//! certificate's key, and Envoy reloads when it watches `<dir>/<namespace>/<pod>`
//! (`watched_directory`). A certificate is rewritten when it rotates or the trust bundle changes,
//! and removed with its pod.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsm_catalog::SidecarProxy;
use fsm_certs::{CertKey, CertManager, IssuedCertificate, ProxyKind};
use fsm_errcode::{ErrCode, HasErrCode};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

/// File names inside a pod's bootstrap directory.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Where bootstrap credentials go.
#[derive(Clone)]
pub struct Targets {
    /// A directory tree, as described above.
    pub dir: Option<PathBuf>,
    /// Per-pod Secrets in the cluster.
    pub secrets: Option<kube::Client>,
    /// This replica's identity, recorded on the Secrets it writes.
    pub writer: String,
}

/// The Secret holding a pod's bootstrap credentials.
pub fn secret_name(proxy: &SidecarProxy) -> String {
    format!("fsm-sidecar-bootstrap-{}", proxy.uuid)
}

/// The field manager of the Secrets' server-side apply.
const FIELD_MANAGER: &str = "fsm-controller";

/// The label (with [`COMPONENT`]) that finds every bootstrap Secret.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const COMPONENT: &str = "sidecar-bootstrap";
/// The annotation naming the replica that wrote a bootstrap Secret.
pub const WRITER_ANNOTATION: &str = "flomesh.io/bootstrap-writer";

/// Keeps the targets in line with the mesh's sidecar pods while this replica leads, forever.
///
/// `synced` reports how far the written credentials have caught up, as a count of the
/// certificate manager's announcements ([`CertManager::announcements`]): a root rotation's
/// phases wait for it, so that no pod's files still hold what a phase is about to stop trusting.
/// A follower writes nothing and holds nobody back (`u64::MAX`).
pub async fn run(
    targets: Targets,
    certs: CertManager,
    mut sidecars: watch::Receiver<Vec<SidecarProxy>>,
    mut leading: watch::Receiver<bool>,
    synced: watch::Sender<u64>,
) {
    loop {
        if !*leading.borrow_and_update() {
            synced.send_replace(u64::MAX);
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
            }
        }
        synced.send_replace(0);
        if lead(&targets, &certs, &mut sidecars, &mut leading, &synced)
            .await
            .is_break()
        {
            return;
        }
    }
}

/// Writes while this replica leads; `Continue` when it stops leading, `Break` when the inputs
/// are gone.
async fn lead(
    targets: &Targets,
    certs: &CertManager,
    sidecars: &mut watch::Receiver<Vec<SidecarProxy>>,
    leading: &mut watch::Receiver<bool>,
    synced: &watch::Sender<u64>,
) -> std::ops::ControlFlow<()> {
    use std::ops::ControlFlow;
    let mut rotations = certs.subscribe();
    // What was written, by pod, with the serial and bundle it was written with. A new leader
    // starts empty: it rewrites every pod's credentials with certificates of its own.
    let mut written: BTreeMap<(String, String), Written> = BTreeMap::new();
    if let Some(client) = &targets.secrets {
        remove_orphaned_secrets(client, leading).await;
    }
    let flow = loop {
        let wanted: Vec<SidecarProxy> = sidecars.borrow_and_update().clone();
        // Read before the sync: every announcement up to here is in what it writes.
        let announced = certs.announcements();
        let complete = sync(targets, certs, &wanted, &mut written, leading).await;
        if !*leading.borrow() {
            break ControlFlow::Continue(());
        }
        if complete {
            synced.send_replace(announced);
        }
        tokio::select! {
            changed = sidecars.changed() => if changed.is_err() { break ControlFlow::Break(()) },
            changed = leading.changed() => {
                if changed.is_err() {
                    // The election is over (shutdown): nothing may be written any more.
                    break ControlFlow::Break(());
                }
                if !*leading.borrow() {
                    break ControlFlow::Continue(());
                }
            }
            event = rotations.recv() => match event {
                // Rotated xDS certificates and changed bundles are picked up by the next sync,
                // which asks the manager for each pod's current certificate.
                Ok(event) if matches!(event.key, CertKey::Xds(_)) => {}
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break ControlFlow::Break(()),
            },
        }
    };
    // A follower neither rotates nor keeps certificates: the new leader issues its own.
    for old in written.values() {
        release(certs, &old.proxy);
    }
    tracing::info!(
        pods = written.len(),
        "stopped writing sidecar bootstrap credentials"
    );
    flow
}

/// Deletes the bootstrap Secrets whose pod no longer exists: a Secret whose owner Pod (by uid)
/// is gone, or, for a Secret without an owner, when no pod in its namespace carries its proxy
/// UUID. Kubernetes' garbage collector does the same for owned Secrets; this covers clusters
/// where it has not run yet and Secrets written before they had owners.
async fn remove_orphaned_secrets(client: &kube::Client, leading: &watch::Receiver<bool>) {
    let all: Api<Secret> = Api::all(client.clone());
    let selector = format!("{COMPONENT_LABEL}={COMPONENT}");
    let secrets = match all.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list.items,
        Err(e) => {
            fsm_errcode::warn!(ErrCode::E4000, selector = %selector, error = %e, "cannot list bootstrap Secrets to remove those of deleted pods");
            return;
        }
    };
    for secret in secrets {
        if !*leading.borrow() {
            return;
        }
        let (Some(namespace), Some(name)) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
        ) else {
            continue;
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let owner = secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "Pod" && o.api_version == "v1");
        let gone = match owner {
            Some(owner) => match pods.get_opt(&owner.name).await {
                Ok(pod) => pod.is_none_or(|p| p.metadata.uid.as_deref() != Some(&owner.uid)),
                Err(e) => {
                    fsm_errcode::warn!(ErrCode::E4000, pod = %format!("{namespace}/{}", owner.name), error = %e, "cannot look up the owner of a bootstrap Secret");
                    continue;
                }
            },
            None => {
                let Some(uuid) = secret
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(fsm_catalog::PROXY_UUID_LABEL))
                else {
                    continue;
                };
                let selector = format!("{}={uuid}", fsm_catalog::PROXY_UUID_LABEL);
                match pods.list(&ListParams::default().labels(&selector)).await {
                    Ok(list) => list.items.is_empty(),
                    Err(e) => {
                        fsm_errcode::warn!(ErrCode::E4000, namespace = %namespace, selector = %selector, error = %e, "cannot look up the pod of a bootstrap Secret");
                        continue;
                    }
                }
            }
        };
        if !gone {
            continue;
        }
        // Only this version of the Secret: one rewritten meanwhile (its pod is back) stays.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: secret.metadata.uid.clone(),
                resource_version: secret.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        match secrets.delete(&name, &params).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "removed the bootstrap Secret of a deleted pod")
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(e) => {
                fsm_errcode::warn!(ErrCode::E4000, secret = %format!("{namespace}/{name}"), error = %e, "cannot delete the bootstrap Secret of a deleted pod")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    proxy: SidecarProxy,
    serial: String,
    bundle: String,
}

async fn sync(
    targets: &Targets,
    certs: &CertManager,
    wanted: &[SidecarProxy],
    written: &mut BTreeMap<(String, String), Written>,
    leading: &watch::Receiver<bool>,
) -> bool {
    // Whether every wanted pod now has its current credentials written.
    let mut complete = true;
    let keep: BTreeMap<(String, String), &SidecarProxy> = wanted
        .iter()
        .map(|p| ((p.namespace.clone(), p.pod.clone()), p))
        .collect();
    let gone: Vec<(String, String)> = written
        .keys()
        .filter(|k| !keep.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        if !*leading.borrow() {
            return false;
        }
        if let Some(old) = written.remove(&key) {
            release(certs, &old.proxy);
            if let Some(dir) = &targets.dir {
                let path = dir.join(&key.0).join(&key.1);
                if let Err(e) = remove_pod_dir(&path) {
                    fsm_errcode::warn!(ErrCode::E4000, path = %path.display(), error = %e, "cannot remove bootstrap credentials");
                }
            }
            if let Some(client) = &targets.secrets {
                let api: Api<Secret> = Api::namespaced(client.clone(), &old.proxy.namespace);
                match api
                    .delete(&secret_name(&old.proxy), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => {
                        fsm_errcode::warn!(ErrCode::E4000, secret = %secret_name(&old.proxy), error = %e, "cannot delete bootstrap Secret")
                    }
                }
            }
        }
    }
    for (key, proxy) in keep {
        if !*leading.borrow() {
            return false;
        }
        let Ok(uuid) = proxy.uuid.parse::<uuid::Uuid>() else {
            fsm_errcode::warn!(ErrCode::E5001, pod = %format!("{}/{}", proxy.namespace, proxy.pod), uuid = %proxy.uuid, "fsm-proxy-uuid label is not a UUID; no bootstrap credentials");
            continue;
        };
        let cert = match certs
            .issue_xds_certificate(
                uuid,
                ProxyKind::Sidecar,
                &proxy.service_account,
                &proxy.namespace,
            )
            .await
        {
            Ok(cert) => cert,
            Err(e) => {
                fsm_errcode::warn!(e.err_code(), pod = %format!("{}/{}", proxy.namespace, proxy.pod), error = %e, "cannot issue bootstrap certificate");
                complete = false;
                continue;
            }
        };
        let now = Written {
            proxy: proxy.clone(),
            serial: cert.serial.clone(),
            bundle: cert.trust_bundle_pem.clone(),
        };
        if let Some(old) = written.get(&key) {
            if *old == now {
                continue;
            }
            if old.proxy != *proxy {
                release(certs, &old.proxy);
            }
        }
        let mut ok = true;
        if let Some(dir) = &targets.dir {
            let path = dir.join(&key.0).join(&key.1);
            let write = {
                let (path, cert) = (path.clone(), cert.clone());
                tokio::task::spawn_blocking(move || write_pod_dir(&path, &cert))
            };
            match write.await {
                Ok(Ok(())) => {
                    tracing::info!(path = %path.display(), serial = %cert.serial, "wrote bootstrap credentials");
                }
                Ok(Err(e)) => {
                    ok = false;
                    fsm_errcode::warn!(ErrCode::E4005, path = %path.display(), error = %e, "cannot write bootstrap credentials")
                }
                Err(e) => {
                    ok = false;
                    fsm_errcode::warn!(ErrCode::E4005, error = %e, "bootstrap writer task failed")
                }
            }
        }
        if let Some(client) = &targets.secrets {
            match apply_secret(client, proxy, &cert, &targets.writer).await {
                Ok(true) => {
                    tracing::info!(secret = %format!("{}/{}", proxy.namespace, secret_name(proxy)), serial = %cert.serial, writer = %targets.writer, "wrote bootstrap Secret");
                }
                Ok(false) => {
                    // The pod is gone already; its deletion is the next change.
                    tracing::debug!(pod = %format!("{}/{}", proxy.namespace, proxy.pod), "no bootstrap Secret for a pod that no longer exists");
                }
                Err(e) => {
                    ok = false;
                    fsm_errcode::warn!(ErrCode::E4005, secret = %format!("{}/{}", proxy.namespace, secret_name(proxy)), error = %e, "cannot write bootstrap Secret");
                }
            }
        }
        // A failed write is retried at the next sync (next change or rotation).
        if ok {
            written.insert(key, now);
        } else {
            complete = false;
        }
    }
    complete
}

/// Server-side applies the pod's bootstrap Secret, owned by the pod; `false` when the pod no
/// longer exists (nothing written: the Secret would be garbage at once).
async fn apply_secret(
    client: &kube::Client,
    proxy: &SidecarProxy,
    cert: &IssuedCertificate,
    writer: &str,
) -> Result<bool, kube::Error> {
    let pod_uid = match &proxy.pod_uid {
        Some(uid) => uid.clone(),
        // Sources that drop the uid: ask the API server for the pod's.
        None => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &proxy.namespace);
            match pods.get_opt(&proxy.pod).await? {
                Some(Pod {
                    metadata: kube::api::ObjectMeta { uid: Some(uid), .. },
                    ..
                }) => uid,
                _ => return Ok(false),
            }
        }
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), &proxy.namespace);
    let name = secret_name(proxy);
    let data = |s: &str| serde_json::Value::String(base64_encode(s.as_bytes()));
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": proxy.namespace,
            "labels": {
                fsm_catalog::PROXY_UUID_LABEL: proxy.uuid,
                "app.kubernetes.io/managed-by": "fsm-controller",
                COMPONENT_LABEL: COMPONENT,
            },
            "annotations": {
                WRITER_ANNOTATION: writer,
            },
            // What metav1.NewControllerRef writes: the pod is the Secret's one managing owner,
            // and a foreground deletion of the pod waits for the Secret to go.
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": proxy.pod,
                "uid": pod_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "type": "kubernetes.io/tls",
        "data": {
            CA_FILE: data(&cert.trust_bundle_pem),
            CERT_FILE: data(&cert.cert_chain_pem),
            KEY_FILE: data(cert.private_key.expose_pem()),
        },
    });
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await
    .map(|_| true)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn release(certs: &CertManager, proxy: &SidecarProxy) {
    if let Ok(uuid) = proxy.uuid.parse::<uuid::Uuid>() {
        certs.release(&CertKey::Xds(fsm_certs::XdsCommonName {
            proxy_uuid: uuid,
            kind: ProxyKind::Sidecar,
            identity: fsm_certs::ServiceIdentity::new(&proxy.service_account, &proxy.namespace),
        }));
    }
}

/// Writes the three files into a fresh directory, then swaps `path/..data` to it.
fn write_pod_dir(path: &Path, cert: &Arc<IssuedCertificate>) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    let version = format!("..{}", cert.serial);
    let target = path.join(&version);
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::create_dir(&target)?;
    write_file(
        &target.join(CA_FILE),
        cert.trust_bundle_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &target.join(CERT_FILE),
        cert.cert_chain_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &target.join(KEY_FILE),
        cert.private_key.expose_pem().as_bytes(),
        0o600,
    )?;
    let data = path.join(DATA_LINK);
    let previous = std::fs::read_link(&data).ok();
    let data_tmp = path.join(format!("{DATA_LINK}_tmp"));
    let _ = std::fs::remove_file(&data_tmp);
    std::os::unix::fs::symlink(&version, &data_tmp)?;
    std::fs::rename(&data_tmp, &data)?;
    for name in [CA_FILE, CERT_FILE, KEY_FILE] {
        let link = path.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new(DATA_LINK).join(name), &link)?;
        }
    }
    if let Some(previous) = previous
        && previous != Path::new(&version)
    {
        let _ = std::fs::remove_dir_all(path.join(previous));
    }
    Ok(())
}

/// The link the kubelet swaps in a Secret volume, and Envoy's `watched_directory` waits for.
const DATA_LINK: &str = "..data";

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn remove_pod_dir(path: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tresor_manager() -> CertManager {
        let provider = fsm_certs::tresor::TresorProvider::generate().expect("ca");
        CertManager::new(Arc::new(provider), Default::default())
    }

    fn curl_pod(pod_uid: Option<&str>) -> SidecarProxy {
        SidecarProxy {
            namespace: "demo".into(),
            pod: "curl-1".into(),
            uuid: "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5".into(),
            service_account: "curl".into(),
            pod_uid: pod_uid.map(str::to_owned),
        }
    }

    fn dir_targets(dir: &Path, writer: &str) -> Targets {
        Targets {
            dir: Some(dir.to_path_buf()),
            secrets: None,
            writer: writer.into(),
        }
    }

    async fn wait_for_file(path: &Path, failure: &str) {
        let start = std::time::Instant::now();
        while !path.exists() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{failure}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn writes_swaps_and_removes_pod_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = tresor_manager();
        let pod = curl_pod(None);
        let mut written = BTreeMap::new();
        let targets = dir_targets(dir.path(), "test");
        let (_leader, leading) = watch::channel(true);
        sync(
            &targets,
            &certs,
            std::slice::from_ref(&pod),
            &mut written,
            &leading,
        )
        .await;
        let pod_dir = dir.path().join("demo/curl-1");
        let cert = std::fs::read_to_string(pod_dir.join(CERT_FILE)).expect("tls.crt");
        let info = fsm_certs::x509::leaf_info(&cert).expect("parses");
        assert_eq!(
            info.common_name,
            "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.curl.demo"
        );
        let key_mode = std::fs::metadata(pod_dir.join(KEY_FILE))
            .expect("tls.key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(pod_dir.join(CA_FILE))
                .expect("ca.crt")
                .contains("BEGIN CERTIFICATE")
        );

        // A new service account means a new identity: the link moves to a new certificate.
        let first_target = std::fs::read_link(pod_dir.join(DATA_LINK)).expect("link");
        let moved = SidecarProxy {
            service_account: "other".into(),
            ..pod.clone()
        };
        sync(
            &targets,
            &certs,
            std::slice::from_ref(&moved),
            &mut written,
            &leading,
        )
        .await;
        let second_target = std::fs::read_link(pod_dir.join(DATA_LINK)).expect("link");
        assert_ne!(first_target, second_target);
        assert!(!pod_dir.join(&first_target).exists());
        let cert = std::fs::read_to_string(pod_dir.join(CERT_FILE)).expect("tls.crt");
        let info = fsm_certs::x509::leaf_info(&cert).expect("parses");
        assert!(
            info.common_name.ends_with(".sidecar.other.demo"),
            "{}",
            info.common_name
        );

        sync(&targets, &certs, &[], &mut written, &leading).await;
        assert!(!pod_dir.exists());
        assert!(
            std::fs::read_dir(dir.path().join("demo"))
                .expect("ns dir")
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_replica_writes_only_while_it_leads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = tresor_manager();
        let pod = curl_pod(Some("uid-1"));
        let targets = dir_targets(dir.path(), "replica-b");
        let (_pods_tx, pods) = watch::channel(vec![pod]);
        let (lead_tx, leading) = watch::channel(false);
        let (synced, _) = watch::channel(0);
        let task = tokio::spawn(run(targets, certs, pods, leading, synced));
        let key = dir.path().join("demo/curl-1").join(KEY_FILE);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!key.exists(), "a follower wrote credentials");
        lead_tx.send_replace(true);
        wait_for_file(&key, "the leader wrote nothing").await;
        task.abort();
    }

    #[tokio::test]
    async fn the_writer_reports_catching_up_with_every_announcement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = tresor_manager();
        let pod = curl_pod(None);
        let targets = dir_targets(dir.path(), "replica-a");
        let (_pods_tx, pods) = watch::channel(vec![pod]);
        let (_lead_tx, leading) = watch::channel(true);
        let (synced_tx, mut synced) = watch::channel(0);
        let task = tokio::spawn(run(targets, certs.clone(), pods, leading, synced_tx));
        let caught_up = |synced: &mut watch::Receiver<u64>, certs: &CertManager| {
            let want = certs.announcements();
            let mut synced = synced.clone();
            async move {
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    synced.wait_for(|n| *n >= want),
                )
                .await
                .expect("the writer caught up in time")
                .expect("writer alive");
            }
        };
        let ca = dir.path().join("demo/curl-1").join(CA_FILE);
        wait_for_file(&ca, "nothing written").await;
        caught_up(&mut synced, &certs).await;
        assert_eq!(
            std::fs::read_to_string(&ca)
                .expect("ca.crt")
                .matches("BEGIN CERTIFICATE")
                .count(),
            1
        );

        // Phase 1 of a root rotation announces a bundle with both roots: once the writer says it
        // has caught up, the pod's files hold both.
        let next = fsm_certs::tresor::TresorProvider::generate().expect("next ca");
        let before = certs.announcements();
        certs
            .begin_root_rotation(Arc::new(next))
            .await
            .expect("phase 1");
        assert!(certs.announcements() > before, "phase 1 announced nothing");
        caught_up(&mut synced, &certs).await;
        assert_eq!(
            std::fs::read_to_string(&ca)
                .expect("ca.crt")
                .matches("BEGIN CERTIFICATE")
                .count(),
            2,
            "the writer reported catching up before the files held both roots"
        );
        task.abort();
    }
}
