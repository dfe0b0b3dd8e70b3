//! The source the controller was started with, as the HTTP endpoints see it.

use std::path::PathBuf;

use fsm_errcode::HasErrCode;
use fsm_sources::{KubeSource, ManifestSource};
use serde_json::{Value, json};

pub enum Source {
    Manifests {
        dir: PathBuf,
        source: ManifestSource,
    },
    Kube {
        origin: String,
        source: KubeSource,
        client: kube::Client,
    },
}

impl Source {
    /// The cluster's client, for what lives in the cluster besides mesh objects (the CA Secret,
    /// CertificateRequests); `None` without a cluster.
    pub fn client(&self) -> Option<kube::Client> {
        match self {
            Source::Manifests { .. } => None,
            Source::Kube { client, .. } => Some(client.clone()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Manifests { dir, .. } => format!("manifests in {}", dir.display()),
            Source::Kube { origin, .. } => format!("cluster {origin}"),
        }
    }

    /// Objects the source skipped, each naming the object and field with its FSM error code.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Source::Manifests { source, .. } => source
                .problems()
                .iter()
                .map(|problem| format!("{}: {problem}", problem.err_code()))
                .collect(),
            // The API server validates objects against their schemas before the watch sees
            // them; what FSM checks beyond the schema is refused by the catalog.
            Source::Kube { .. } => Vec::new(),
        }
    }

    /// How far the first sync has got, for `/health/ready` while it is not applied.
    pub fn sync_progress(&self) -> String {
        match self {
            Source::Manifests { .. } => "manifests read, not applied yet".to_owned(),
            Source::Kube { source, .. } => {
                let total = fsm_catalog::Kind::ALL.len();
                let listed = source.status().values().filter(|s| s.synced).count();
                if listed == total {
                    format!("{listed} of {total} kinds, applying")
                } else {
                    format!("{listed} of {total} kinds")
                }
            }
        }
    }

    pub fn status(&self) -> Value {
        match self {
            Source::Manifests { dir, .. } => json!({"manifestDir": dir}),
            Source::Kube { origin, source, .. } => {
                json!({"cluster": origin, "watches": source.status()})
            }
        }
    }
}
