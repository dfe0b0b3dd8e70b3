//! The original destination of a connection iptables REDIRECTed to the sidecar
//! (`SO_ORIGINAL_DST`), read through nix's safe wrapper so this crate stays free of `unsafe`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// `None` when the kernel has no original destination for this connection (it was not
/// redirected, or conntrack does not know it): the caller then uses the local address.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        let raw = getsockopt(stream, sockopt::OriginalDst).ok()?;
        // Both fields are in network byte order.
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        ))
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
            raw.sin6_flowinfo,
            raw.sin6_scope_id,
        ))
    };
    Some(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without iptables there is no original destination: explicit connections fall back to
    /// the listener's own address.
    #[tokio::test]
    async fn unredirected_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let got = original_dst(&server);
        // Kernels without conntrack say ENOENT; with it, an unredirected connection reports
        // its own destination. Either way nothing else may come back.
        assert!(got.is_none() || got == Some(addr), "{got:?}");
        drop(client);
    }
}
