//! The listener manager: binds a socket for each listener of the running config, rebinds when its
//! address changes, and closes it when the listener goes away. Connections already accepted
//! keep going (HTTP ones are told to finish their in-flight requests and close).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Proxy;
use crate::config::{Chain, ChainKind, Direction};
use crate::tls::{DownstreamTls, identity_of_chain};

/// Time a client has to complete the TLS handshake on an mTLS chain.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

/// Where to bind a listener: as given in explicit mode; on the unspecified address in
/// transparent mode, where iptables delivers redirected connections to the namespace's loopback.
fn bind_addr(addr: SocketAddr, transparent: bool) -> SocketAddr {
    if !transparent {
        return addr;
    }
    let ip = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, addr.port())
}

/// Keeps the bound sockets in line with the config, forever.
pub async fn run(proxy: Arc<Proxy>) {
    let mut changes = proxy.store.subscribe();
    let mut running: HashMap<Arc<str>, Running> = HashMap::new();
    loop {
        let config = proxy.store.config();
        let desired: HashMap<Arc<str>, SocketAddr> = config
            .listeners
            .values()
            .map(|l| (l.name.clone(), bind_addr(l.addr, proxy.transparent)))
            .collect();
        running.retain(|name, r| {
            let keep = desired.get(name) == Some(&r.addr);
            if !keep {
                tracing::info!(listener = %name, addr = %r.addr, "closing listener");
                let _ = r.stop.send(true);
            }
            keep
        });
        for (name, addr) in desired {
            if running.contains_key(&name) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            tokio::spawn(serve(proxy.clone(), name.clone(), addr, stop_rx));
            running.insert(name, Running { addr, stop });
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(
    proxy: Arc<Proxy>,
    name: Arc<str>,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    // A port freed by a listener closed in the same update may take a moment to be released.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(listener = %name, %addr, error = %e, "cannot bind; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = stopped(&mut stop) => return,
                }
            }
        }
    };
    tracing::info!(listener = %name, %addr, "listening");
    let for_connections = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    proxy.metrics.connection(&name);
                    tokio::spawn(connection(proxy.clone(), name.clone(), stream, for_connections.clone()));
                }
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the listener is told to stop (or its manager is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // `wait_for`'s output holds a lock guard, which must not live across later awaits.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// The destination a connection's filter chain is matched on.
fn destination(proxy: &Proxy, stream: &TcpStream) -> Option<SocketAddr> {
    if proxy.transparent
        && let Some(dst) = crate::original_dst::original_dst(stream)
    {
        return Some(dst);
    }
    stream.local_addr().ok()
}

pub fn pick_chain(chains: &[Chain], dest: SocketAddr) -> Option<&Chain> {
    chains.iter().find(|c| {
        (c.port == 0 || c.port == dest.port())
            && (c.ranges.is_empty() || c.ranges.iter().any(|r| r.contains(dest.ip())))
    })
}

async fn connection(
    proxy: Arc<Proxy>,
    name: Arc<str>,
    stream: TcpStream,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let config = proxy.store.config();
    let Some(listener) = config.listeners.get(&name).cloned() else {
        return;
    };
    drop(config);
    let Some(dest) = destination(&proxy, &stream) else {
        return;
    };
    tracing::debug!(listener = %name, %dest, "connection accepted");
    let Some(chain) = pick_chain(&listener.chains, dest) else {
        tracing::debug!(listener = %name, %dest, "no filter chain matches; closing");
        return;
    };
    let inbound = listener.direction == Direction::Inbound;
    let tls = match &chain.tls {
        None => None,
        Some(DownstreamTls::Ready(config)) => Some(config.clone()),
        Some(DownstreamTls::Missing(secret)) => {
            // Fail closed: without its certificate the chain cannot authenticate anyone.
            tracing::debug!(listener = %name, chain = %chain.name, %secret, "TLS secret not received yet; closing");
            return;
        }
    };
    let Some(config) = tls else {
        serve_chain(proxy, &name, chain, inbound, None, stream, stop).await;
        return;
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(listener = %name, chain = %chain.name, error = %e, "TLS handshake failed; closing");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = %name, chain = %chain.name, "TLS handshake timed out; closing");
            return;
        }
    };
    let peer = identity_of_chain(stream.get_ref().1.peer_certificates());
    tracing::debug!(listener = %name, chain = %chain.name, peer = ?peer, "TLS connection accepted");
    serve_chain(proxy, &name, chain, inbound, peer, stream, stop).await;
}

async fn serve_chain<S>(
    proxy: Arc<Proxy>,
    listener: &Arc<str>,
    chain: &Chain,
    inbound: bool,
    peer: Option<crate::tls::Identity>,
    stream: S,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match &chain.kind {
        ChainKind::Http { route_config } => {
            let chain = crate::http::HttpChain {
                listener: listener.clone(),
                route_config: route_config.clone(),
                inbound,
                peer,
            };
            crate::http::serve(proxy, chain, stream, stop).await;
        }
        ChainKind::Tcp(target) => {
            crate::tcp::proxy(proxy, target.clone(), inbound, peer, stream).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidr;

    fn chain(name: &str, port: u16, ranges: &[&str]) -> Chain {
        Chain {
            name: Arc::from(name),
            port,
            ranges: ranges
                .iter()
                .map(|r| parse_cidr(r).expect("cidr"))
                .collect(),
            kind: ChainKind::Http {
                route_config: Arc::from("outbound"),
            },
            tls: None,
        }
    }

    #[test]
    fn chains_match_port_and_range_in_order() {
        let chains = vec![
            chain("demo/tcp-echo|9000", 9000, &["10.96.0.20/32"]),
            chain("demo/httpbin|14001", 14001, &["10.96.0.10/32"]),
            chain("explicit-http", 15001, &[]),
        ];
        let pick =
            |d: &str| pick_chain(&chains, d.parse().expect("addr")).map(|c| c.name.to_string());
        assert_eq!(pick("127.0.10.10:15001").as_deref(), Some("explicit-http"));
        assert_eq!(
            pick("10.96.0.10:14001").as_deref(),
            Some("demo/httpbin|14001")
        );
        assert_eq!(
            pick("10.96.0.20:9000").as_deref(),
            Some("demo/tcp-echo|9000")
        );
        assert_eq!(pick("10.96.0.99:9000"), None);
    }

    #[test]
    fn transparent_mode_binds_the_unspecified_address() {
        let a: SocketAddr = "127.0.10.10:15001".parse().expect("addr");
        assert_eq!(bind_addr(a, false), a);
        assert_eq!(bind_addr(a, true).to_string(), "0.0.0.0:15001");
    }
}
