//! The listener manager: binds a socket for each listener of the running config, rebinds when its
//! address changes, and closes it when the listener goes away. Connections already accepted
//! keep going (HTTP ones are told to finish their in-flight requests and close).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Proxy;
use crate::config::{Chain, ChainKind, Direction, Listener, TransportProtocol};
use crate::sni::ClientHello;
use crate::tls::{DownstreamTls, Peer};

/// Time a client has to complete the TLS handshake on an mTLS chain.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send its first bytes on a listener whose chains match the transport.
const TRANSPORT_PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// The first byte of a TLS handshake record (a ClientHello's record type).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Bytes peeked at most to find a ClientHello's server name; a longer hello names none.
const MAX_HELLO_PEEK: usize = 16 * 1024;

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

/// Whether any chain matches on server names, so that the ClientHello must be read first.
pub fn needs_server_name(chains: &[Chain]) -> bool {
    chains.iter().any(|c| !c.server_names.is_empty())
}

/// What a connection whose first byte is `first` carries.
pub fn transport_of(first: u8) -> TransportProtocol {
    if first == TLS_HANDSHAKE_RECORD {
        TransportProtocol::Tls
    } else {
        TransportProtocol::Plaintext
    }
}

/// What a connection's first bytes told, when they were read (see [`peek_hello`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirstBytes {
    /// `None`: not read.
    pub transport: Option<TransportProtocol>,
    /// The server name of the TLS ClientHello; `None` when not read, not TLS, or not named.
    pub server_name: Option<String>,
}

/// The chain for a connection to `dest` from `client` that first sent `first`: the first, in
/// order, whose whole match accepts it, unless a chain whose `server_names` match is more
/// specific. As in Envoy, server names are compared after the destination and before the
/// transport and the client's address: among the chains accepting the connection with the same
/// destination port and ranges as the first one, the best server-name match wins (an exact name
/// over any suffix, a longer suffix over a shorter one, then order), and one that names no
/// server only when no such chain accepts it.
pub fn pick_chain<'a>(
    chains: &'a [Chain],
    dest: SocketAddr,
    client: IpAddr,
    first: &FirstBytes,
) -> Option<&'a Chain> {
    let sni_rank = |c: &Chain| {
        let name = first.server_name.as_deref()?;
        c.server_names.iter().filter_map(|s| s.rank(name)).max()
    };
    let accepts = |c: &Chain| {
        (c.port == 0 || c.port == dest.port())
            && (c.ranges.is_empty() || c.ranges.iter().any(|r| r.contains(dest.ip())))
            && (c.sources.is_empty() || c.sources.iter().any(|r| r.contains(client)))
            && c.transport.accepts(first.transport)
            && (c.server_names.is_empty() || sni_rank(c).is_some())
    };
    let found = chains.iter().find(|c| accepts(c))?;
    let named = chains
        .iter()
        .filter(|c| c.port == found.port && c.ranges == found.ranges && accepts(c))
        .filter_map(|c| Some((sni_rank(c)?, c)))
        // The first of the best.
        .min_by_key(|(rank, _)| Reverse(*rank));
    Some(named.map_or(found, |(_, c)| c))
}

/// Reads (without consuming) the first bytes of the connection: the first byte tells TLS from
/// plaintext, and with `server_name` the ClientHello is read whole (peeking again as more bytes
/// arrive, up to [`MAX_HELLO_PEEK`]) for its server name. `None` when the client closes or
/// sends nothing within [`TRANSPORT_PEEK_TIMEOUT`]; a hello not whole by then (or longer than the
/// bound, or malformed) names no server.
pub async fn peek_hello(stream: &TcpStream, server_name: bool) -> Option<FirstBytes> {
    let mut buf = vec![0u8; if server_name { MAX_HELLO_PEEK } else { 1 }];
    let mut seen = 0;
    let name = tokio::time::timeout(TRANSPORT_PEEK_TIMEOUT, async {
        loop {
            let n = peek_more(stream, &mut buf, seen).await.ok()?;
            let progress = n > seen;
            seen = n;
            if !server_name {
                return None;
            }
            match crate::sni::parse(buf.get(..n)?) {
                ClientHello::NeedMore if progress && n < buf.len() => {}
                ClientHello::Complete(name) => return name,
                // Not a hello, closed half-way, or too long.
                ClientHello::NeedMore | ClientHello::NotClientHello => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    let first = *buf.first().filter(|_| seen > 0)?;
    Some(FirstBytes {
        transport: Some(transport_of(first)),
        server_name: name,
    })
}

/// Peeks at the bytes the connection has received (nothing consumed) into `buf` once there are
/// more than `seen`, the buffer is full, or the client has closed its side; returns how many
/// there are (0: closed without sending anything).
///
/// `TcpStream::peek` cannot wait for *more* bytes: the socket stays readable while any are
/// there, so peeking again would spin. Here a peek that finds nothing new reports
/// `WouldBlock` to tokio, which clears the readiness and wakes this task only when new bytes
/// (or the close) arrive; nothing is lost in between, as tokio keeps readiness that arrived
/// after it was read.
async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        // A closed side stays ready for ever: take what is there.
        let closed = ready.is_read_closed();
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(fd, buf, MsgFlags::MSG_PEEK).map_err(io::Error::from)?;
            if n > seen || n == buf.len() || n == 0 || closed {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        match peeked {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
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
    let server_name = needs_server_name(&listener.chains);
    let first = if server_name || needs_transport(&listener.chains) {
        let Some(first) = peek_hello(&stream, server_name).await else {
            tracing::debug!(listener = %name, %client, "no bytes to tell the transport from; closing");
            return;
        };
        first
    } else {
        FirstBytes::default()
    };
    let Some(chain) = pick_chain(&listener.chains, dest, client.ip(), &first) else {
        tracing::debug!(
            listener = %name, %dest, %client, transport = ?first.transport,
            server_name = ?first.server_name, "no filter chain matches; closing"
        );
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
    // The client's workload identity, and on chains requiring client certificates the names
    // its certificate carries, for `AllowedSources`.
    let peer = Peer::of_chain(
        stream.get_ref().1.peer_certificates(),
        chain.require_client_certificate,
    );
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
    peer: Option<Peer>,
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
    use crate::config::{ServerName, parse_cidr};

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
            server_names: vec![],
            kind: ChainKind::Http {
                route_config: Arc::from("outbound"),
            },
            tls: None,
            require_client_certificate: false,
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
            pick_chain(
                &chains,
                d.parse().expect("addr"),
                client,
                &FirstBytes::default(),
            )
            .map(|c| c.name.to_string())
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
            let first = FirstBytes {
                transport: t,
                server_name: None,
            };
            pick_chain(&chains, dest, client.parse().expect("ip"), &first)
                .map(|c| c.name.to_string())
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

    fn sni_chain(name: &str, port: u16, names: &[&str]) -> Chain {
        Chain {
            server_names: names
                .iter()
                .map(|n| ServerName::parse(n).expect("server name"))
                .collect(),
            ..chain(name, port, &[])
        }
    }

    /// The chain picked for a TLS connection to port 443 naming `sni` (`None`: no SNI, or not
    /// TLS when `tls` is false).
    fn pick_sni(chains: &[Chain], sni: Option<&str>, tls: bool) -> Option<String> {
        let first = FirstBytes {
            transport: Some(if tls {
                TransportProtocol::Tls
            } else {
                TransportProtocol::Plaintext
            }),
            server_name: sni.map(str::to_string),
        };
        let dest: SocketAddr = "10.0.0.9:443".parse().expect("addr");
        let client: IpAddr = "10.0.0.1".parse().expect("ip");
        pick_chain(chains, dest, client, &first).map(|c| c.name.to_string())
    }

    #[test]
    fn server_names_match_exactly_or_by_suffix_in_any_case() {
        let chains = vec![
            sni_chain("api", 443, &["api.example.com", "API.other.org"]),
            sni_chain("wild", 443, &["*.example.com"]),
        ];
        assert!(needs_server_name(&chains));
        assert!(!needs_server_name(&[chain("plain", 443, &[])]));
        let pick = |sni| pick_sni(&chains, Some(sni), true);
        assert_eq!(pick("api.example.com").as_deref(), Some("api"));
        assert_eq!(pick("Api.Example.COM").as_deref(), Some("api"));
        assert_eq!(pick("api.other.org").as_deref(), Some("api"));
        assert_eq!(pick("www.example.com").as_deref(), Some("wild"));
        assert_eq!(pick("a.b.EXAMPLE.com").as_deref(), Some("wild"));
        // The bare domain is not matched by its wildcard, nor a longer lookalike.
        assert_eq!(pick("example.com"), None);
        assert_eq!(pick("notexample.com"), None);
        assert_eq!(pick("api.example.com.evil.org"), None);
        // No SNI, or not TLS: no chain naming servers matches.
        assert_eq!(pick_sni(&chains, None, true), None);
        assert_eq!(pick_sni(&chains, None, false), None);
    }

    #[test]
    fn a_matching_server_name_is_more_specific_than_none() {
        let chains = vec![
            chain("any-443", 443, &[]),
            sni_chain("wild", 443, &["*.example.com"]),
            sni_chain("exact", 443, &["api.example.com"]),
            sni_chain("longer-wild", 443, &["*.api.example.com"]),
            sni_chain("exact-again", 443, &["api.example.com"]),
        ];
        // Later in order, yet more specific: a named chain beats the catch-all...
        assert_eq!(
            pick_sni(&chains, Some("www.example.com"), true).as_deref(),
            Some("wild")
        );
        // ...an exact name beats a suffix, and the first of equals wins...
        assert_eq!(
            pick_sni(&chains, Some("api.example.com"), true).as_deref(),
            Some("exact")
        );
        // ...a longer suffix beats a shorter one.
        assert_eq!(
            pick_sni(&chains, Some("v1.api.example.com"), true).as_deref(),
            Some("longer-wild")
        );
        // Nothing named matches: the chain naming no server.
        assert_eq!(
            pick_sni(&chains, Some("other.org"), true).as_deref(),
            Some("any-443")
        );
        assert_eq!(pick_sni(&chains, None, false).as_deref(), Some("any-443"));
    }

    #[test]
    fn server_names_rank_after_the_destination_and_before_transport_and_source() {
        // The destination decides first: the first chain's port is kept, so a named chain for
        // any port does not take over a chain for this port (the control plane orders chains
        // most specific first).
        let chains = vec![
            chain("port-443", 443, &[]),
            sni_chain("named-any-port", 0, &["api.example.com"]),
        ];
        assert_eq!(
            pick_sni(&chains, Some("api.example.com"), true).as_deref(),
            Some("port-443")
        );
        // Transport and source come after server names: a chain for TLS from this client
        // listed first still gives way to the named one.
        let tls_from_client = Chain {
            transport: TransportProtocol::Tls,
            sources: vec![parse_cidr("10.0.0.0/8").expect("cidr")],
            ..chain("tls-from-10", 443, &[])
        };
        let chains = vec![
            tls_from_client,
            sni_chain("named", 443, &["api.example.com"]),
        ];
        assert_eq!(
            pick_sni(&chains, Some("api.example.com"), true).as_deref(),
            Some("named")
        );
        assert_eq!(
            pick_sni(&chains, Some("www.example.com"), true).as_deref(),
            Some("tls-from-10")
        );
        // A named chain still needs the rest of its match to hold.
        let plaintext_named = Chain {
            transport: TransportProtocol::Plaintext,
            ..sni_chain("named-plaintext", 443, &["api.example.com"])
        };
        assert_eq!(
            pick_sni(&[plaintext_named], Some("api.example.com"), true),
            None
        );
    }

    /// A loopback connection whose client writes `chunks` (pausing between them), then
    /// `close`s its side or keeps it open; returns what the listener side peeks, and how long
    /// that took. Checks that the peek consumed nothing: every byte sent is read afterwards.
    async fn peek_over_loopback(
        chunks: Vec<Vec<u8>>,
        close: bool,
        server_name: bool,
    ) -> (Option<FirstBytes>, Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sent = chunks.concat();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            for chunk in chunks {
                stream.write_all(&chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if close {
                let _ = stream.shutdown().await;
            }
            // Held open until the peek is over.
            tokio::time::sleep(Duration::from_secs(7)).await;
        });
        let (mut stream, _) = listener.accept().await.expect("accept");
        let started = std::time::Instant::now();
        let first = peek_hello(&stream, server_name).await;
        let took = started.elapsed();
        let mut read = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut read))
            .await
            .expect("read in time")
            .expect("read");
        assert_eq!(read, sent, "the peek consumed bytes");
        client.abort();
        (first, took)
    }

    fn hello_for(server: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server.to_string()).expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write");
        }
        wire
    }

    #[tokio::test]
    async fn a_client_hello_sent_in_pieces_is_peeked_whole() {
        let wire = hello_for("api.example.com");
        let (a, rest) = wire.split_at(3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let (first, took) =
            peek_over_loopback(vec![a.to_vec(), b.to_vec(), c.to_vec()], false, true).await;
        assert_eq!(
            first,
            Some(FirstBytes {
                transport: Some(TransportProtocol::Tls),
                server_name: Some("api.example.com".into()),
            })
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Transport alone: one byte is enough.
        let (first, _) = peek_over_loopback(vec![wire.clone()], false, false).await;
        assert_eq!(
            first,
            Some(FirstBytes {
                transport: Some(TransportProtocol::Tls),
                server_name: None,
            })
        );
    }

    #[tokio::test]
    async fn a_hello_cut_short_by_a_close_names_no_server_at_once() {
        let wire = hello_for("api.example.com");
        let (first, took) = peek_over_loopback(vec![wire[..40].to_vec()], true, true).await;
        assert_eq!(
            first,
            Some(FirstBytes {
                transport: Some(TransportProtocol::Tls),
                server_name: None,
            })
        );
        assert!(
            took < Duration::from_secs(2),
            "waited {took:?} after the close"
        );
        // Plaintext: told at once, no name.
        let (first, took) =
            peek_over_loopback(vec![b"GET / HTTP/1.1\r\n".to_vec()], false, true).await;
        assert_eq!(
            first,
            Some(FirstBytes {
                transport: Some(TransportProtocol::Plaintext),
                server_name: None,
            })
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Closed without a byte: nothing to tell.
        let (first, _) = peek_over_loopback(vec![], true, true).await;
        assert_eq!(first, None);
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
                    tracing: None,
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
