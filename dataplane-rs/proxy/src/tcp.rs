//! TCP filter chains: pick a cluster and an endpoint when the connection opens, then relay bytes.
//! Meshed endpoints of a TCP cluster are reached through an HTTP/2 CONNECT tunnel to their
//! sidecar, exactly as Envoy's tcp_proxy tunnelling does, so both data planes interoperate.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Proxy;
use crate::config::{Cluster, Discovery, Endpoint, TcpTarget, UpstreamProtocol};
use crate::lb::{ActiveRequests, choose_cluster, pick_endpoint};
use crate::tls::Peer;
use crate::upstream::{Dest, Transport, UpstreamError, connect_to};

/// Who a TCP connection comes from and where it was going.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// Accepted by an inbound listener.
    pub inbound: bool,
    /// The client as its verified certificate names it (mTLS chains only).
    pub peer: Option<Peer>,
    /// The address the connection comes from.
    pub client: SocketAddr,
    /// Where the client meant to go, when iptables redirected it (transparent mode) and it was
    /// not going to the sidecar itself; see `listeners::original_destination`.
    pub original: Option<SocketAddr>,
}

/// The endpoint a connection to `cluster` goes to: its original destination for an
/// original-destination cluster (`None` without one), else the load balancer's pick (`None`
/// for a DNS cluster, which has no endpoints: its connections go to its name).
pub fn endpoint_for(
    cluster: &Cluster,
    original: Option<SocketAddr>,
    active: &ActiveRequests,
) -> Option<Endpoint> {
    match cluster.discovery {
        Discovery::OriginalDestination => original.map(Endpoint::original_destination),
        Discovery::Listed | Discovery::Dns(_) => pick_endpoint(cluster, active).cloned(),
    }
}

/// Relays one downstream connection. Server-first protocols are served by the same path: the
/// upstream connection is opened at once and nothing is read from the client before that.
pub async fn proxy<S>(proxy: Arc<Proxy>, target: TcpTarget, from: Downstream, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Downstream {
        inbound,
        peer,
        client,
        original,
    } = from;
    if inbound && !target.allowed.admits(peer.as_ref(), client.ip()) {
        tracing::debug!(
            peer = %peer.as_ref().map_or_else(|| "none".to_string(), ToString::to_string),
            %client,
            "inbound TCP connection refused by allowed_sources"
        );
        return;
    }
    let config = proxy.store.config();
    let name = choose_cluster(&target.clusters);
    let Some(cluster) = config.clusters.get(name).cloned() else {
        tracing::debug!(cluster = name, "TCP cluster not known (yet); closing");
        return;
    };
    drop(config);
    // `max_connections` of a TCP cluster counts client connections relayed, tunnelled or not;
    // one over it is closed before anything is opened upstream.
    let Ok(_connection) = proxy.hold_connection(&cluster) else {
        tracing::debug!(cluster = %cluster.name, "TCP cluster at max_connections; closing");
        return;
    };
    if let Discovery::Dns(name) = &cluster.discovery {
        // Plain bytes to the first address of the name that accepts: no tunnel, no TLS.
        proxy.metrics.upstream(&cluster.name, 0);
        relay(&proxy, &cluster, Dest::Name(name.clone()), downstream).await;
        return;
    }
    let Some(endpoint) = endpoint_for(&cluster, original, &proxy.upstreams.active) else {
        if cluster.discovery == Discovery::OriginalDestination {
            tracing::debug!(cluster = %cluster.name, %client, "connection has no original destination (explicit mode, or made to the sidecar itself); closing");
        } else {
            tracing::debug!(cluster = %cluster.name, "TCP cluster has no endpoint; closing");
        }
        proxy.metrics.upstream(&cluster.name, 0);
        return;
    };
    let _active = proxy.upstreams.active.start(endpoint.addr);
    proxy.metrics.upstream(&cluster.name, 0);
    let tunnel = !inbound
        && endpoint.meshed
        && cluster.protocol == UpstreamProtocol::Tcp
        && !target.connect_authority.is_empty();
    if !tunnel {
        relay(&proxy, &cluster, Dest::Addr(endpoint.addr), downstream).await;
        return;
    }
    let transport = match Transport::for_endpoint(&cluster, &endpoint) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "CONNECT tunnel failed");
            return;
        }
    };
    let mut upstream = match proxy
        .upstreams
        .connect_tunnel(
            endpoint.addr,
            cluster.connect_timeout,
            &transport,
            &target.connect_authority,
        )
        .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "CONNECT tunnel failed");
            if let UpstreamError::Connect(_) = e {
                proxy.metrics.connect_fail(&cluster.name);
            }
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(cluster = %cluster.name, error = %e, "TCP relay ended with an error");
    }
}

/// Connects to `dest` in plaintext and copies bytes both ways until either side closes. A
/// connection that cannot be made (name unresolved, refused, timed out) counts as a connect
/// failure of the cluster, and the client is closed.
async fn relay<S>(proxy: &Proxy, cluster: &Cluster, dest: Dest, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match connect_to(&dest, cluster.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, %dest, error = %e, "TCP upstream unreachable; closing");
            proxy.metrics.connect_fail(&cluster.name);
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(cluster = %cluster.name, error = %e, "TCP relay ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CircuitBreakers, LbPolicy};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn cluster(discovery: Discovery, endpoints: &[&str]) -> Cluster {
        Cluster {
            name: Arc::from("c"),
            lb: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            protocol: UpstreamProtocol::Tcp,
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    meshed: true,
                    ..Endpoint::original_destination(a.parse().expect("addr"))
                })
                .collect(),
            discovery,
            breakers: CircuitBreakers::default(),
            tls: None,
            cursor: AtomicUsize::new(0),
        }
    }

    #[test]
    fn original_destination_cluster_goes_where_the_connection_was_going() {
        let active = ActiveRequests::default();
        let c = cluster(Discovery::OriginalDestination, &[]);
        let dst: SocketAddr = "203.0.113.7:443".parse().expect("addr");
        let e = endpoint_for(&c, Some(dst), &active).expect("endpoint");
        // Plaintext relay: not meshed, so neither tunnelled nor TLS.
        assert_eq!(e, Endpoint::original_destination(dst));
        assert!(!e.meshed && e.identity.is_none());
        // No original destination (explicit mode, or made to the sidecar): closed.
        assert_eq!(endpoint_for(&c, None, &active), None);
    }

    #[test]
    fn listed_cluster_ignores_the_original_destination() {
        let active = ActiveRequests::default();
        let c = cluster(Discovery::Listed, &["10.0.0.9:15003"]);
        let dst: SocketAddr = "203.0.113.7:443".parse().expect("addr");
        let e = endpoint_for(&c, Some(dst), &active).expect("endpoint");
        assert_eq!(e.addr.to_string(), "10.0.0.9:15003");
        assert_eq!(
            endpoint_for(&cluster(Discovery::Listed, &[]), Some(dst), &active),
            None
        );
    }
}
