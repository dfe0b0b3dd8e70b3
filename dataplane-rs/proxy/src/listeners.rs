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
use crate::config::{Chain, ChainKind, Direction, Listener, TransportProtocol};
use crate::tls::{DownstreamTls, identity_of_chain};

/// Time a client has to complete the TLS handshake on an mTLS chain.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send its first bytes on a listener whose chains match the transport.
const TRANSPORT_PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// The first byte of a TLS handshake record (a ClientHello's record type).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

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

/// The listener a connection to `dest` would reach, when it is one of this proxy's own (sending
/// traffic there would loop back into the sidecar). A listener bound to the unspecified address
/// (transparent mode) is also reached on loopback and on its configured address.
pub fn own_listener<'a>(
    listeners: impl IntoIterator<Item = &'a Arc<Listener>>,
    dest: SocketAddr,
    transparent: bool,
) -> Option<&'a Arc<Listener>> {
    let ip = dest.ip().to_canonical();
    listeners.into_iter().find(|l| {
        let bound = bind_addr(l.addr, transparent);
        bound.port() == dest.port()
            && (ip == l.addr.ip()
                || ip.is_unspecified()
                || (bound.ip().is_unspecified() && ip.is_loopback()))
    })
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
                Ok((stream, client)) => {
                    proxy.metrics.connection(&name);
                    tokio::spawn(connection(proxy.clone(), name.clone(), stream, client, for_connections.clone()));
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

/// The destination a connection's filter chain is matched on: its original destination in
/// transparent mode, else the address it reached.
fn destination(proxy: &Proxy, stream: &TcpStream) -> Option<SocketAddr> {
    if proxy.transparent
        && let Some(dst) = crate::original_dst::original_dst(stream)
    {
        return Some(dst);
    }
    stream.local_addr().ok()
}

/// Where a connection was going before iptables redirected it to the sidecar: `None` in explicit
/// mode, or when `dest` (see [`destination`]) is the address the connection reached or one of
/// this proxy's own listeners (a connection made to the sidecar itself).
pub fn original_destination<'a>(
    listeners: impl IntoIterator<Item = &'a Arc<Listener>>,
    transparent: bool,
    dest: SocketAddr,
    local: Option<SocketAddr>,
) -> Option<SocketAddr> {
    if !transparent || Some(dest) == local {
        return None;
    }
    own_listener(listeners, dest, transparent)
        .is_none()
        .then_some(dest)
}

/// Whether any chain matches on the transport, so that the first bytes must be read first.
pub fn needs_transport(chains: &[Chain]) -> bool {
    chains.iter().any(|c| c.transport != TransportProtocol::Any)
}

/// What a connection whose first byte is `first` carries.
pub fn transport_of(first: u8) -> TransportProtocol {
    if first == TLS_HANDSHAKE_RECORD {
        TransportProtocol::Tls
    } else {
        TransportProtocol::Plaintext
    }
}

/// The first chain, in order, whose whole match accepts a connection to `dest` from `client`;
/// `transport` is what its first bytes tell, `None` when they were not read.
pub fn pick_chain(
    chains: &[Chain],
    dest: SocketAddr,
    client: IpAddr,
    transport: Option<TransportProtocol>,
) -> Option<&Chain> {
    chains.iter().find(|c| {
        (c.port == 0 || c.port == dest.port())
            && (c.ranges.is_empty() || c.ranges.iter().any(|r| r.contains(dest.ip())))
            && (c.sources.is_empty() || c.sources.iter().any(|r| r.contains(client)))
            && c.transport.accepts(transport)
    })
}

/// Reads (without consuming) the first byte of the connection to tell TLS from plaintext;
/// `None` when the client closes or sends nothing within [`TRANSPORT_PEEK_TIMEOUT`].
async fn peek_transport(stream: &TcpStream) -> Option<TransportProtocol> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(TRANSPORT_PEEK_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => Some(transport_of(first[0])),
        _ => None,
    }
}

async fn connection(
    proxy: Arc<Proxy>,
    name: Arc<str>,
    stream: TcpStream,
    client: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let config = proxy.store.config();
    let Some(listener) = config.listeners.get(&name).cloned() else {
        return;
    };
    let Some(dest) = destination(&proxy, &stream) else {
        return;
    };
    let original = original_destination(
        config.listeners.values(),
        proxy.transparent,
        dest,
        stream.local_addr().ok(),
    );
    drop(config);
    // Normalise an IPv4-mapped client (a dual-stack socket) so IPv4 ranges match it.
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    tracing::debug!(listener = %name, %dest, %client, "connection accepted");
    // Server-first protocols must not wait: the bytes are read only when a chain needs them.
    let transport = if needs_transport(&listener.chains) {
        let Some(t) = peek_transport(&stream).await else {
            tracing::debug!(listener = %name, %client, "no bytes to tell the transport from; closing");
            return;
        };
        Some(t)
    } else {
        None
    };
    let Some(chain) = pick_chain(&listener.chains, dest, client.ip(), transport) else {
        tracing::debug!(listener = %name, %dest, %client, ?transport, "no filter chain matches; closing");
        return;
    };
    let addrs = Addresses { client, original };
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
        serve_chain(proxy, &listener, chain, None, addrs, stream, stop).await;
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
    serve_chain(proxy, &listener, chain, peer, addrs, stream, stop).await;
}

/// Where an accepted connection comes from, and where it was going (see
/// [`original_destination`]).
#[derive(Clone, Copy, Debug)]
struct Addresses {
    client: SocketAddr,
    original: Option<SocketAddr>,
}

async fn serve_chain<S>(
    proxy: Arc<Proxy>,
    listener: &Listener,
    chain: &Chain,
    peer: Option<crate::tls::Identity>,
    addrs: Addresses,
    stream: S,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let inbound = listener.direction == Direction::Inbound;
    let Addresses { client, original } = addrs;
    match &chain.kind {
        ChainKind::Http { route_config } => {
            let chain = crate::http::HttpChain {
                listener: listener.name.clone(),
                route_config: route_config.clone(),
                inbound,
                peer,
                client,
            };
            crate::http::serve(proxy, chain, stream, stop).await;
        }
        ChainKind::Tcp(target) => {
            let to = crate::tcp::Downstream {
                inbound,
                peer,
                client,
                original,
            };
            crate::tcp::proxy(proxy, target.clone(), to, stream).await;
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
            sources: vec![],
            transport: TransportProtocol::Any,
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
        let client: IpAddr = "10.0.0.1".parse().expect("ip");
        let pick = |d: &str| {
            pick_chain(&chains, d.parse().expect("addr"), client, None).map(|c| c.name.to_string())
        };
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

    fn ingress_chain(name: &str, sources: &[&str], transport: TransportProtocol) -> Chain {
        Chain {
            sources: sources
                .iter()
                .map(|r| parse_cidr(r).expect("cidr"))
                .collect(),
            transport,
            ..chain(name, 15003, &[])
        }
    }

    #[test]
    fn chains_match_client_range_and_transport_in_order() {
        let chains = vec![
            ingress_chain("mtls", &[], TransportProtocol::Tls),
            ingress_chain(
                "ingress",
                &["10.1.0.0/16", "fd00::/8"],
                TransportProtocol::Plaintext,
            ),
            ingress_chain("from-10.2", &["10.2.0.0/16"], TransportProtocol::Any),
        ];
        assert!(needs_transport(&chains));
        assert!(!needs_transport(&[chain("plain", 0, &[])]));
        let dest: SocketAddr = "10.0.0.9:15003".parse().expect("addr");
        let pick = |client: &str, t: Option<TransportProtocol>| {
            pick_chain(&chains, dest, client.parse().expect("ip"), t).map(|c| c.name.to_string())
        };
        use TransportProtocol::{Plaintext, Tls};
        assert_eq!(pick("10.1.2.3", Some(Tls)).as_deref(), Some("mtls"));
        assert_eq!(
            pick("10.1.2.3", Some(Plaintext)).as_deref(),
            Some("ingress")
        );
        assert_eq!(pick("fd00::7", Some(Plaintext)).as_deref(), Some("ingress"));
        // Outside the ingress ranges a plaintext client falls through to the next chain, or none.
        assert_eq!(
            pick("10.2.0.1", Some(Plaintext)).as_deref(),
            Some("from-10.2")
        );
        assert_eq!(pick("10.3.0.1", Some(Plaintext)), None);
        // Bytes not read: only chains accepting any transport match.
        assert_eq!(pick("10.1.2.3", None), None);
        assert_eq!(pick("10.2.0.1", None).as_deref(), Some("from-10.2"));
    }

    #[test]
    fn a_handshake_record_is_tls_anything_else_plaintext() {
        assert_eq!(transport_of(0x16), TransportProtocol::Tls);
        assert_eq!(transport_of(b'G'), TransportProtocol::Plaintext);
        assert_eq!(transport_of(0x00), TransportProtocol::Plaintext);
        assert!(TransportProtocol::Any.accepts(None));
        assert!(TransportProtocol::Any.accepts(Some(TransportProtocol::Tls)));
        assert!(!TransportProtocol::Tls.accepts(Some(TransportProtocol::Plaintext)));
        assert!(!TransportProtocol::Plaintext.accepts(None));
    }

    fn listeners(addrs: &[&str]) -> Vec<Arc<Listener>> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Arc::new(Listener {
                    name: Arc::from(format!("l{i}").as_str()),
                    addr: a.parse().expect("addr"),
                    direction: Direction::Outbound,
                    chains: vec![],
                })
            })
            .collect()
    }

    #[test]
    fn own_listeners_are_recognised() {
        let ls = listeners(&["10.0.0.5:15001", "10.0.0.5:15003"]);
        let own = |d: &str, transparent: bool| {
            own_listener(&ls, d.parse().expect("addr"), transparent).map(|l| l.name.to_string())
        };
        assert_eq!(own("10.0.0.5:15001", false).as_deref(), Some("l0"));
        assert_eq!(own("10.0.0.5:15003", true).as_deref(), Some("l1"));
        assert_eq!(own("0.0.0.0:15003", false).as_deref(), Some("l1"));
        assert_eq!(own("[::ffff:10.0.0.5]:15001", false).as_deref(), Some("l0"));
        // Bound to the unspecified address (transparent), loopback reaches it too.
        assert_eq!(own("127.0.0.1:15001", true).as_deref(), Some("l0"));
        assert_eq!(own("127.0.0.1:15001", false), None);
        // Other ports of the pod, and the same port elsewhere, are not the sidecar.
        assert_eq!(own("10.0.0.5:8080", true), None);
        assert_eq!(own("10.0.0.6:15001", true), None);
    }

    #[test]
    fn only_redirected_connections_have_an_original_destination() {
        let ls = listeners(&["10.0.0.5:15001"]);
        let a = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let local = Some(a("10.0.0.5:15001"));
        let egress = a("203.0.113.7:443");
        assert_eq!(original_destination(&ls, true, egress, local), Some(egress));
        // Explicit mode: none.
        assert_eq!(original_destination(&ls, false, egress, local), None);
        // Not redirected (the kernel reports the address reached), or made to the sidecar.
        assert_eq!(
            original_destination(&ls, true, a("10.0.0.5:15001"), local),
            None
        );
        assert_eq!(
            original_destination(&ls, true, a("127.0.0.1:15001"), Some(a("127.0.0.1:15001"))),
            None
        );
        assert_eq!(
            original_destination(&ls, true, a("10.0.0.5:15001"), Some(a("127.0.0.1:15001"))),
            None
        );
    }

    #[test]
    fn transparent_mode_binds_the_unspecified_address() {
        let a: SocketAddr = "127.0.10.10:15001".parse().expect("addr");
        assert_eq!(bind_addr(a, false), a);
        assert_eq!(bind_addr(a, true).to_string(), "0.0.0.0:15001");
    }
}
