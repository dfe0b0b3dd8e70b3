//! One proxy's resources as a static Envoy bootstrap: what `fsm translate -o bootstrap` prints
//! and what tests hand to `envoy --mode validate`. Envoy gets everything it would be sent over
//! ADS at start-up instead: each HTTP connection manager's route configuration inline (instead of
//! RDS), each EDS cluster's endpoints inline (a STATIC cluster), and the secrets as static
//! secrets named by the TLS contexts (instead of SDS over ADS).

use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    self as tls, common_tls_context,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::EnvoyResources;

/// Why a proxy's resources cannot form a static bootstrap (a listener naming routes, or a
/// cluster naming endpoints, the adapter did not produce: an adapter bug).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "listener {listener} names route configuration {routes:?}, which the adapter did not produce"
    )]
    MissingRoutes { listener: String, routes: String },
    #[error("cluster {0} has no ClusterLoadAssignment")]
    MissingEndpoints(String),
    #[error("cannot decode {0}: {1}")]
    Undecodable(String, String),
}

/// The static bootstrap of the proxy `node_id` holding `resources`.
pub fn static_bootstrap(
    node_id: &str,
    node_cluster: &str,
    resources: &EnvoyResources,
) -> Result<Bootstrap, BootstrapError> {
    let mut listeners = resources.listeners.clone();
    for listener in &mut listeners {
        for chain in &mut listener.filter_chains {
            static_secrets_in(&mut chain.transport_socket)?;
            for f in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).map_err(|e| {
                    BootstrapError::Undecodable(any.type_url.clone(), e.to_string())
                })?;
                if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) =
                    &hcm.route_specifier
                {
                    let routes = resources
                        .routes
                        .iter()
                        .find(|r| r.name == rds.route_config_name)
                        .ok_or_else(|| BootstrapError::MissingRoutes {
                            listener: listener.name.clone(),
                            routes: rds.route_config_name.clone(),
                        })?
                        .clone();
                    hcm.route_specifier =
                        Some(http_connection_manager::RouteSpecifier::RouteConfig(routes));
                }
                *any = Any {
                    type_url: HttpConnectionManager::type_url(),
                    value: hcm.encode_to_vec(),
                };
            }
        }
    }
    let mut clusters = resources.clusters.clone();
    for c in &mut clusters {
        static_secrets_in(&mut c.transport_socket)?;
        for m in &mut c.transport_socket_matches {
            static_secrets_in(&mut m.transport_socket)?;
        }
        let eds = cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32);
        if c.cluster_discovery_type == Some(eds) {
            let assignment = resources
                .endpoints
                .iter()
                .find(|e| e.cluster_name == c.name)
                .cloned()
                .ok_or_else(|| BootstrapError::MissingEndpoints(c.name.clone()))?;
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            ));
            c.eds_cluster_config = None;
            c.load_assignment = Some(assignment);
        }
    }
    Ok(Bootstrap {
        node: Some(core::Node {
            id: node_id.to_owned(),
            cluster: node_cluster.to_owned(),
            ..Default::default()
        }),
        static_resources: Some(bootstrap::StaticResources {
            listeners,
            clusters,
            secrets: resources.secrets.clone(),
        }),
        ..Default::default()
    })
}

/// The secrets a TLS context names through SDS, named instead from the bootstrap's static
/// secrets (`sds_config` unset).
fn static_secrets(common: &mut Option<tls::CommonTlsContext>) {
    let Some(common) = common else { return };
    for c in &mut common.tls_certificate_sds_secret_configs {
        c.sds_config = None;
    }
    match &mut common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(c)) => {
            c.sds_config = None;
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            if let Some(sds) = &mut c.validation_context_sds_secret_config {
                sds.sds_config = None;
            }
        }
        _ => {}
    }
}

fn static_secrets_in(socket: &mut Option<core::TransportSocket>) -> Result<(), BootstrapError> {
    let Some(core::TransportSocket {
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any)),
        ..
    }) = socket
    else {
        return Ok(());
    };
    let undecodable =
        |e: prost::DecodeError| BootstrapError::Undecodable(any.type_url.clone(), e.to_string());
    if any.type_url == tls::UpstreamTlsContext::type_url() {
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).map_err(undecodable)?;
        static_secrets(&mut ctx.common_tls_context);
        any.value = ctx.encode_to_vec();
    } else if any.type_url == tls::DownstreamTlsContext::type_url() {
        let mut ctx =
            tls::DownstreamTlsContext::decode(any.value.as_slice()).map_err(undecodable)?;
        static_secrets(&mut ctx.common_tls_context);
        any.value = ctx.encode_to_vec();
    }
    Ok(())
}
