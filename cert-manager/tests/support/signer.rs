//! A test stand-in for cert-manager: watches `CertificateRequest`s in a namespace and, for each
//! one without a status, either signs its CSR with a test CA (Ready=True, `status.certificate`,
//! `status.ca`) or, when the CSR's CN starts with `deny-`, marks it Denied (as an approver
//! would), or when it starts with `fail-`, Failed. Records every request it saw.

// Shared by several test crates; each uses a subset.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use fsm_certs::CertPurpose;
use fsm_certs::cert_manager_io::CmCertificateRequest;
use fsm_certs::tresor::CertificateAuthority;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use parking_lot::Mutex;
use serde_json::json;

pub struct Signer {
    pub ca: Arc<CertificateAuthority>,
    pub seen: Arc<Mutex<Vec<CmCertificateRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

async fn handle(
    api: &Api<CmCertificateRequest>,
    ca: &CertificateAuthority,
    cr: &CmCertificateRequest,
) {
    let Some(name) = cr.metadata.name.clone() else {
        return;
    };
    let csr = b64()
        .decode(&cr.spec.request)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    let cn = rcgen::CertificateSigningRequestParams::from_pem(&csr)
        .ok()
        .and_then(|p| {
            p.params
                .distinguished_name
                .get(&rcgen::DnType::CommonName)
                .and_then(|v| match v {
                    rcgen::DnValue::Utf8String(s) => Some(s.clone()),
                    rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
        })
        .unwrap_or_default();
    let status = if cn.starts_with("deny-") {
        json!({"conditions": [
            {"type": "Denied", "status": "True", "reason": "PolicyDenied", "message": "denied by test approver"},
            {"type": "Ready", "status": "False", "reason": "Denied", "message": "The CertificateRequest was denied by an approval controller"}
        ]})
    } else if cn.starts_with("fail-") {
        json!({"conditions": [
            {"type": "Ready", "status": "False", "reason": "Failed", "message": "issuer exploded"}
        ], "failureTime": "2026-01-01T00:00:00Z"})
    } else {
        let secs = cr
            .spec
            .duration
            .as_deref()
            .and_then(|d| d.strip_suffix('s'))
            .and_then(|d| d.parse().ok())
            .unwrap_or(3600);
        // As cert-manager, honour `spec.usages` (server auth / client auth).
        let usage = |u: &str| cr.spec.usages.iter().any(|x| x == u);
        let purpose = match (usage("server auth"), usage("client auth")) {
            (false, true) => CertPurpose::XdsClient,
            (true, false) => CertPurpose::Server,
            _ => CertPurpose::Mesh,
        };
        match ca.sign_csr_pem_for(&csr, Duration::from_secs(secs), purpose) {
            Ok(cert) => json!({
                "conditions": [
                    {"type": "Approved", "status": "True", "reason": "test"},
                    {"type": "Ready", "status": "True", "reason": "Issued", "message": "Certificate fetched from issuer successfully"}
                ],
                "certificate": b64().encode(cert),
                "ca": b64().encode(ca.cert_pem()),
            }),
            Err(e) => json!({"conditions": [
                {"type": "Ready", "status": "False", "reason": "Failed", "message": e.to_string()}
            ]}),
        }
    };
    let _ = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await;
}

pub fn start(client: Client, namespace: &str) -> anyhow::Result<Signer> {
    let ca = Arc::new(CertificateAuthority::generate_root(
        "test-cert-manager-ca",
        Duration::from_secs(3600 * 24 * 30),
    )?);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api: Api<CmCertificateRequest> = Api::namespaced(client, namespace);
    let (ca2, seen2) = (ca.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(ev) = events.next().await {
            let obj = match ev {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => o,
                _ => continue,
            };
            if obj.status.is_some() {
                continue;
            }
            seen2.lock().push(obj.clone());
            handle(&api, &ca2, &obj).await;
        }
    });
    Ok(Signer { ca, seen, task })
}
