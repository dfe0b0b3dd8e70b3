//! The server name (SNI) of a TLS ClientHello, read from the first bytes of a connection without
//! terminating anything, as Envoy's `tls_inspector` does. Pure: the listener peeks the bytes
//! (`listeners::peek_hello`) and asks [`parse`] whether it has seen enough.

/// What the first bytes of a connection say about its ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// The bytes are a prefix of a ClientHello (or of nothing yet): more are needed.
    NeedMore,
    /// Not a TLS ClientHello: another protocol, or a malformed hello.
    NotClientHello,
    /// A whole ClientHello, with the host name its `server_name` extension carries (`None`
    /// without one: a client connecting to an IP address sends none).
    Complete(Option<String>),
}

/// `ContentType.handshake` (RFC 8446 §5.1).
const HANDSHAKE_RECORD: u8 = 22;
/// `HandshakeType.client_hello` (RFC 8446 §4).
const CLIENT_HELLO: u8 = 1;
/// `ExtensionType.server_name` (RFC 6066 §3).
const SERVER_NAME: u16 = 0;
/// `NameType.host_name` (RFC 6066 §3).
const HOST_NAME: u8 = 0;
/// The largest record fragment a peer may send (`TLSPlaintext.length`, RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// Reads the ClientHello at the start of `bytes`: the handshake message is put together from as
/// many handshake records as it spans (RFC 8446 §5.1 allows several); bytes after it are not
/// looked at. Never panics, whatever the input.
pub fn parse(bytes: &[u8]) -> ClientHello {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = bytes;
    loop {
        // Record header: type, legacy_record_version (3, x), length.
        match rest {
            [] => return ClientHello::NeedMore,
            [kind, ..] if *kind != HANDSHAKE_RECORD => return ClientHello::NotClientHello,
            [_, major, ..] if *major != 3 => return ClientHello::NotClientHello,
            [_, _, _, hi, lo, fragment @ ..] => {
                let length = usize::from(u16::from_be_bytes([*hi, *lo]));
                if length == 0 || length > MAX_FRAGMENT {
                    return ClientHello::NotClientHello;
                }
                let (got, after) = fragment.split_at(length.min(fragment.len()));
                message.extend_from_slice(got);
                rest = after;
                if let Some(done) = whole_message(&message) {
                    return done;
                }
                if got.len() < length {
                    return ClientHello::NeedMore;
                }
            }
            _ => return ClientHello::NeedMore,
        }
    }
}

/// The answer once `message` (handshake bytes so far) holds a whole ClientHello, or shows it is
/// none; `None` while it is a prefix of one.
fn whole_message(message: &[u8]) -> Option<ClientHello> {
    match message {
        [kind, ..] if *kind != CLIENT_HELLO => Some(ClientHello::NotClientHello),
        [_, a, b, c, body @ ..] => {
            let length = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            let body = body.get(..length)?;
            Some(hello_body(body).map_or(ClientHello::NotClientHello, ClientHello::Complete))
        }
        _ => None,
    }
}

/// A cursor over bytes; every read is checked, so malformed input ends in `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The server name of a ClientHello body (RFC 8446 §4.1.2, and TLS 1.2's, which has the same
/// layout): `Some(None)` without one, `None` when the body is malformed.
fn hello_body(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    let [major, _] = r.u16()?.to_be_bytes();
    if major != 3 {
        return None;
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return None; // legacy_session_id
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // legacy_compression_methods
    }
    if r.is_empty() {
        return Some(None); // a TLS 1.2 hello may end here, without extensions
    }
    let mut extensions = Reader(r.vec16()?);
    if !r.is_empty() {
        return None;
    }
    let mut name = None;
    let mut seen_server_name = false;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == SERVER_NAME {
            // An extension appears once at most (RFC 8446 §4.2).
            if seen_server_name {
                return None;
            }
            seen_server_name = true;
            name = server_name(data)?;
        }
    }
    Some(name)
}

/// The host name of a `server_name` extension (RFC 6066 §3): `Some(None)` when it lists none,
/// `None` when the extension is malformed.
fn server_name(data: &[u8]) -> Option<Option<String>> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16()?);
    if !outer.is_empty() || list.is_empty() {
        return None;
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == HOST_NAME && host.is_none() {
            // A DNS name in ASCII (no trailing dot, RFC 6066); anything else is not a name.
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            host = Some(String::from_utf8(name.to_vec()).ok()?);
        }
    }
    Some(host)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, LazyLock};

    use proptest::prelude::*;
    use rustls::pki_types::ServerName;

    use super::*;

    static CLIENT: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(config)
    });

    /// The first flight of a rustls client connecting to `server`: its ClientHello, as it
    /// would be sent on the wire.
    fn rustls_hello(server: &str) -> Vec<u8> {
        let name = ServerName::try_from(server.to_string()).expect("server name");
        let mut client = rustls::ClientConnection::new(CLIENT.clone(), name).expect("client");
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write ClientHello");
        }
        wire
    }

    /// The handshake message of `wire` (one record) cut into records of at most `size` bytes.
    fn refragment(wire: &[u8], size: usize) -> Vec<u8> {
        let (header, message) = wire.split_at(5);
        let mut out = Vec::new();
        for chunk in message.chunks(size.max(1)) {
            out.extend_from_slice(&header[..3]);
            out.extend_from_slice(&u16::try_from(chunk.len()).expect("len").to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn finds_the_name_of_a_real_client_hello() {
        let wire = rustls_hello("api.example.com");
        assert_eq!(
            parse(&wire),
            ClientHello::Complete(Some("api.example.com".into()))
        );
        // Whatever follows the hello is not read.
        let mut more = wire.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(
            parse(&more),
            ClientHello::Complete(Some("api.example.com".into()))
        );
    }

    #[test]
    fn every_prefix_needs_more() {
        let wire = rustls_hello("localhost");
        for n in 0..wire.len() {
            assert_eq!(parse(&wire[..n]), ClientHello::NeedMore, "{n} bytes");
        }
    }

    #[test]
    fn a_hello_spread_over_records_is_put_together() {
        let wire = rustls_hello("db.internal.example");
        let split = refragment(&wire, 7);
        assert!(split.len() > wire.len());
        assert_eq!(
            parse(&split),
            ClientHello::Complete(Some("db.internal.example".into()))
        );
        assert_eq!(parse(&split[..split.len() - 1]), ClientHello::NeedMore);
    }

    #[test]
    fn a_client_connecting_to_an_address_names_no_server() {
        // rustls sends no SNI for an IP address.
        assert_eq!(
            parse(&rustls_hello("10.0.0.7")),
            ClientHello::Complete(None)
        );
    }

    #[test]
    fn other_protocols_are_not_client_hellos() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ClientHello::NotClientHello
        );
        assert_eq!(parse(b"PRI * HTTP/2.0"), ClientHello::NotClientHello);
        // A handshake record, not version 3.
        assert_eq!(parse(b"\x16\x02\x00"), ClientHello::NotClientHello);
        // A handshake record whose message is a ServerHello.
        assert_eq!(
            parse(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"),
            ClientHello::NotClientHello
        );
        // An empty record, and one longer than TLS allows.
        assert_eq!(parse(b"\x16\x03\x01\x00\x00"), ClientHello::NotClientHello);
        assert_eq!(parse(b"\x16\x03\x01\x40\x01"), ClientHello::NotClientHello);
        // An alert after the first record of an unfinished hello.
        let wire = rustls_hello("localhost");
        let mut split = refragment(&wire, 16);
        split.truncate(21);
        assert_eq!(parse(&split), ClientHello::NeedMore);
        split.extend_from_slice(b"\x15\x03\x03\x00\x02\x02\x28");
        assert_eq!(parse(&split), ClientHello::NotClientHello);
    }

    /// A ClientHello put together by hand, with `extensions` (already encoded) after the
    /// compression methods, or none at all.
    fn hello(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        if let Some(e) = extensions {
            body.extend_from_slice(&u16::try_from(e.len()).expect("len").to_be_bytes());
            body.extend_from_slice(e);
        }
        let mut message = vec![CLIENT_HELLO, 0];
        message.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        message.extend_from_slice(&body);
        let mut record = vec![HANDSHAKE_RECORD, 3, 1];
        record.extend_from_slice(&u16::try_from(message.len()).expect("len").to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    /// A `server_name` extension listing (type, name) entries.
    fn sni_extension(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn hand_built_hellos() {
        // A TLS 1.2 hello may have no extensions at all.
        assert_eq!(parse(&hello(None)), ClientHello::Complete(None));
        assert_eq!(parse(&hello(Some(&[]))), ClientHello::Complete(None));
        let one = sni_extension(&[(0, b"Mixed.Example.COM")]);
        assert_eq!(
            parse(&hello(Some(&one))),
            ClientHello::Complete(Some("Mixed.Example.COM".into()))
        );
        // Another name type first: the host_name entry still counts.
        let two = sni_extension(&[(7, b"\x00\x01"), (0, b"a.example")]);
        assert_eq!(
            parse(&hello(Some(&two))),
            ClientHello::Complete(Some("a.example".into()))
        );
        // An unknown extension before it is skipped.
        let mut with_other = vec![0xfa, 0xfa, 0, 1, 0];
        with_other.extend_from_slice(&one);
        assert_eq!(
            parse(&hello(Some(&with_other))),
            ClientHello::Complete(Some("Mixed.Example.COM".into()))
        );
        // Malformed: two server_name extensions, an empty or non-ASCII name, an empty list,
        // an extension running past the block.
        let mut twice = one.clone();
        twice.extend_from_slice(&one);
        for bad in [
            twice,
            sni_extension(&[(0, b"")]),
            sni_extension(&[(0, "bücher.example".as_bytes())]),
            sni_extension(&[]),
            vec![0, 0, 0, 9, 0, 1],
        ] {
            assert_eq!(
                parse(&hello(Some(&bad))),
                ClientHello::NotClientHello,
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_handshake_records(
            length in 0u16..600,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            // Past the first byte, so that the parser goes beyond the record header.
            let mut bytes = vec![HANDSHAKE_RECORD, 3, 1];
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes.push(CLIENT_HELLO);
            bytes.extend_from_slice(&body);
            let _ = parse(&bytes);
        }

        #[test]
        fn finds_the_name_rustls_sends(
            name in "[a-zA-Z][a-zA-Z0-9]{0,11}(\\.[a-zA-Z][a-zA-Z0-9-]{0,10}[a-zA-Z0-9]){0,3}",
            fragment in 1usize..400,
            cut in any::<prop::sample::Index>(),
        ) {
            let wire = rustls_hello(&name);
            let got = parse(&wire);
            let ClientHello::Complete(Some(sni)) = got else {
                return Err(TestCaseError::fail(format!("{name}: {got:?}")));
            };
            prop_assert!(sni.eq_ignore_ascii_case(&name), "{sni} for {name}");
            let split = refragment(&wire, fragment);
            prop_assert_eq!(parse(&split), ClientHello::Complete(Some(sni)));
            let n = cut.index(split.len());
            prop_assert_eq!(parse(&split[..n]), ClientHello::NeedMore);
        }
    }
}
