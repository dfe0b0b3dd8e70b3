//! TCP filter chains: pick a cluster and an endpoint when the connection opens, then relay bytes.
//! Meshed endpoints of a TCP cluster are reached through an HTTP/2 CONNECT tunnel to their
//! sidecar, exactly as Envoy's tcp_proxy tunnelling does, so both data planes interoperate.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Proxy;
use crate::config::{TcpTarget, UpstreamProtocol};
use crate::lb::{choose_cluster, pick_endpoint};
use crate::tls::Identity;
use crate::upstream::{Transport, connect_tcp};

/// Relays one downstream connection. Server-first protocols are served by the same path: the
/// upstream connection is opened at once and nothing is read from the client before that.
/// `peer` is the verified identity of the client's certificate (mTLS chains only), `client` the
/// address the connection comes from.
pub async fn proxy<S>(
    proxy: Arc<Proxy>,
    target: TcpTarget,
    inbound: bool,
    peer: Option<Identity>,
    client: SocketAddr,
    mut downstream: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
    let Some(endpoint) = pick_endpoint(&cluster, &proxy.upstreams.active).cloned() else {
        tracing::debug!(cluster = %cluster.name, "TCP cluster has no endpoint; closing");
        proxy.metrics.upstream(&cluster.name, 0);
        return;
    };
    let _active = proxy.upstreams.active.start(endpoint.addr);
    proxy.metrics.upstream(&cluster.name, 0);
    let tunnel = !inbound
        && endpoint.meshed
        && cluster.protocol == UpstreamProtocol::Tcp
        && !target.connect_authority.is_empty();
    let result = if tunnel {
        let transport = match Transport::for_endpoint(&cluster, &endpoint) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "CONNECT tunnel failed");
                return;
            }
        };
        match proxy
            .upstreams
            .connect_tunnel(
                endpoint.addr,
                cluster.connect_timeout,
                &transport,
                &target.connect_authority,
            )
            .await
        {
            Ok(mut upstream) => tokio::io::copy_bidirectional(&mut downstream, &mut upstream)
                .await
                .map(|_| ()),
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "CONNECT tunnel failed");
                return;
            }
        }
    } else {
        match connect_tcp(endpoint.addr, cluster.connect_timeout).await {
            Ok(mut upstream) => tokio::io::copy_bidirectional(&mut downstream, &mut upstream)
                .await
                .map(|_| ()),
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "TCP upstream unreachable");
                return;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(cluster = %cluster.name, error = %e, "TCP relay ended with an error");
    }
}
