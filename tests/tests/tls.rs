//! TLS end to end, on every runtime: `wss://` and `https://` clients through a TLS listener to
//! plain backends, certificates chosen by SNI and rotated while tunnels stay open, the
//! handshake timeout and in-flight limit, and TLS to upstreams with verification on.
//!
//! Every certificate is made here, at test time, by rcgen: a throwaway CA and leaf certificates
//! for `*.test` names. No key is committed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proxy_core::{Config, Peer, TlsTarget, UpstreamGroup};
use proxy_tokio::{ClientTls, ServerTls, TlsCertificate, TlsOutcome, Verify};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use switchyard_tests::origin::{http_origin, SeenRequest};
use switchyard_tests::{config_for, runtime_tests, start_proxy_with, ProxyOptions, Runtime, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

runtime_tests!(
    wss_echo_large_messages_and_close_codes,
    https_get_and_post_with_forwarded_proto,
    sni_picks_the_certificate,
    rotated_certificate_serves_new_connections_while_a_tunnel_stays,
    silent_client_is_closed_at_the_handshake_timeout,
    handshakes_over_the_limit_are_refused,
    upstream_tls_verifies_and_reuses_connections,
    upstream_tls_with_the_wrong_ca_is_a_502,
    health_checks_speak_tls_and_mark_a_bad_certificate_down,
    large_bodies_both_ways_and_a_close_after_the_last_byte,
    a_cut_response_ends_without_close_notify,
    an_upstream_tls_close_without_close_notify_is_a_cut,
);

/// A throwaway certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A leaf certificate for `names`, as PEM (certificate, key).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A client configuration that trusts only this CA.
    fn client(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("trust the test CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

fn certificate((cert, key): &(String, String)) -> TlsCertificate {
    TlsCertificate::from_pem(
        cert.as_bytes(),
        key.as_bytes(),
        "test.crt".as_ref(),
        "test.key".as_ref(),
    )
    .expect("test certificate loads")
}

fn server_tls(leaves: &[(String, String)]) -> ServerTls {
    ServerTls::new(leaves.iter().map(certificate).collect()).expect("server TLS settings")
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to the proxy asking for `name`.
async fn tls_connect(connector: &TlsConnector, addr: SocketAddr, name: &str) -> Tls {
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake within WAIT")
        .expect("TLS handshake")
}

/// The subject names of the certificate the server presented.
fn presented_leaf(stream: &Tls) -> CertificateDer<'static> {
    let (_, conn) = stream.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// A plain WebSocket echo backend (answers every text or binary message with itself, and a
/// Close with the same code).
async fn ws_echo() -> SocketAddr {
    switchyard_tests::origin::ws_echo().await
}

async fn wss_echo_large_messages_and_close_codes(rt: Runtime) {
    let ca = Ca::new("wss CA");
    let leaf = ca.leaf(&["ws.test"]);
    let backend = ws_echo().await;
    let proxy = start_proxy_with(
        rt,
        config_for(&[backend]),
        ProxyOptions {
            tls_listener: Some(server_tls(&[leaf])),
            ..ProxyOptions::default()
        },
    );
    let tls = tls_connect(&ca.client(), proxy.addr, "ws.test").await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1"
    );
    let url = format!("wss://ws.test:{}/echo", proxy.addr.port());
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("handshake within WAIT")
        .expect("WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    let sizes = [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20, 16 << 20];
    for (i, size) in sizes.into_iter().enumerate() {
        let msg = if i % 2 == 0 {
            Message::Binary((0..size).map(|j| (j * 31 + i) as u8).collect())
        } else {
            Message::Text(
                (0..size)
                    .map(|j| char::from(b'a' + ((j + i) % 26) as u8))
                    .collect(),
            )
        };
        tokio::time::timeout(WAIT, ws.send(msg.clone()))
            .await
            .expect("send within WAIT")
            .unwrap_or_else(|e| panic!("send {size} bytes: {e}"));
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo within WAIT")
            .expect("stream open")
            .expect("echo");
        assert_eq!(echoed, msg, "message of {size} bytes echoed exactly");
    }
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "done here".into(),
    })))
    .await
    .expect("send close");
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("close reply within WAIT");
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Library(4001), "close code echoed")
        }
        other => panic!("expected the echoed close, got {other:?}"),
    }
    // The backend closes first; the proxy passes its close_notify and FIN on.
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("end within WAIT");
    assert!(
        end.is_none(),
        "the stream ends after the closing handshake: {end:?}"
    );
    drop(ws);
    let logs = proxy.events.wait_for(1);
    assert!(logs[0].upgraded, "logged as a tunnel: {:?}", logs[0]);
    proxy.stop();
}

async fn https_get_and_post_with_forwarded_proto(rt: Runtime) {
    let ca = Ca::new("https CA");
    let origin = http_origin(Arc::new(|req: &SeenRequest| {
        let body = format!(
            "{} proto={} host={} body={}",
            req.request_line(),
            req.header("x-forwarded-proto").unwrap_or("-"),
            req.header("host").unwrap_or("-"),
            String::from_utf8_lossy(&req.body)
        );
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }))
    .await;
    let proxy = start_proxy_with(
        rt,
        config_for(&[origin.addr]),
        ProxyOptions {
            tls_listener: Some(server_tls(&[ca.leaf(&["api.test"])])),
            ..ProxyOptions::default()
        },
    );
    let mut tls = tls_connect(&ca.client(), proxy.addr, "api.test").await;
    // Two exchanges on one TLS connection: keep-alive works through the TLS layer.
    let get = b"GET /items?x=1 HTTP/1.1\r\nHost: api.test\r\n\r\n";
    tls.write_all(get).await.expect("write GET");
    let first = read_response(&mut tls).await;
    let expected = "GET /items?x=1 HTTP/1.1 proto=https host=api.test body=";
    assert_eq!(
        first,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{expected}",
            expected.len()
        )
    );
    let post = b"POST /submit HTTP/1.1\r\nHost: api.test\r\nContent-Length: 11\r\n\r\nhello world";
    tls.write_all(post).await.expect("write POST");
    let second = read_response(&mut tls).await;
    assert!(
        second.ends_with("POST /submit HTTP/1.1 proto=https host=api.test body=hello world"),
        "{second}"
    );
    let logs = proxy.events.wait_for(2);
    assert_eq!(logs[0].status, Some(200));
    assert_eq!(logs[1].status, Some(200));
    // The proxy's own answers go over TLS too (a 400 with Connection: close, then close_notify).
    tls.write_all(b"GET /bad#frag HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .expect("write bad request");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest))
        .await
        .expect("close within WAIT");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(
        end.is_ok(),
        "the connection ended with close_notify: {end:?}"
    );
    proxy.stop();
}

/// Reads one response with a Content-Length body.
async fn read_response(tls: &mut Tls) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !switchyard_tests::origin::complete_response(&out) {
            let n = tls.read(&mut buf).await.expect("read response");
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("response within WAIT");
    String::from_utf8(out).expect("utf-8 response")
}

async fn sni_picks_the_certificate(rt: Runtime) {
    let ca = Ca::new("sni CA");
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test", "*.b.test"]);
    let backend = ws_echo().await;
    let proxy = start_proxy_with(
        rt,
        config_for(&[backend]),
        ProxyOptions {
            tls_listener: Some(server_tls(&[a.clone(), b.clone()])),
            ..ProxyOptions::default()
        },
    );
    let client = ca.client();
    let der = |pem: &(String, String)| {
        CertificateDer::from_pem_slice(pem.0.as_bytes()).expect("leaf DER")
    };
    for (name, want) in [
        ("a.test", der(&a)),
        ("b.test", der(&b)),
        ("x.b.test", der(&b)),
    ] {
        let tls = tls_connect(&client, proxy.addr, name).await;
        assert_eq!(presented_leaf(&tls), want, "certificate for {name}");
    }
    // An unknown name gets the first (default) certificate, which the client then refuses.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let refused = tokio::time::timeout(
        WAIT,
        client.connect(ServerName::try_from("c.test").expect("name"), tcp),
    )
    .await
    .expect("handshake ends within WAIT");
    assert!(refused.is_err(), "no certificate for c.test");
    // The client's refusal reaches the proxy as an alert: a failed handshake, counted.
    let deadline = Instant::now() + WAIT;
    while proxy.stats.tls_handshakes(TlsOutcome::Failed) == 0 {
        assert!(Instant::now() < deadline, "the failed handshake is counted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(proxy.stats.tls_handshakes(TlsOutcome::Done), 3);
    proxy.stop();
}

async fn rotated_certificate_serves_new_connections_while_a_tunnel_stays(rt: Runtime) {
    let ca = Ca::new("rotation CA");
    let old = ca.leaf(&["rot.test"]);
    let new = ca.leaf(&["rot.test"]);
    let backend = ws_echo().await;
    let proxy = start_proxy_with(
        rt,
        config_for(&[backend]),
        ProxyOptions {
            tls_listener: Some(server_tls(std::slice::from_ref(&old))),
            ..ProxyOptions::default()
        },
    );
    let client = ca.client();
    let tls = tls_connect(&client, proxy.addr, "rot.test").await;
    let old_der = CertificateDer::from_pem_slice(old.0.as_bytes()).expect("old DER");
    let new_der = CertificateDer::from_pem_slice(new.0.as_bytes()).expect("new DER");
    assert_eq!(presented_leaf(&tls), old_der);
    let url = format!("wss://rot.test:{}/", proxy.addr.port());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("handshake within WAIT")
        .expect("handshake");
    proxy.tls.set_listener(proxy.addr, server_tls(&[new]));
    let fresh = tls_connect(&client, proxy.addr, "rot.test").await;
    assert_eq!(
        presented_leaf(&fresh),
        new_der,
        "new connections get the new certificate"
    );
    drop(fresh);
    for i in 0..3 {
        let msg = Message::Text(format!("still here {i}"));
        ws.send(msg.clone()).await.expect("send on the old tunnel");
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo within WAIT")
            .expect("open")
            .expect("echo");
        assert_eq!(
            echoed, msg,
            "the tunnel opened before the rotation keeps working"
        );
    }
    ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    proxy.stop();
}

async fn silent_client_is_closed_at_the_handshake_timeout(rt: Runtime) {
    let ca = Ca::new("timeout CA");
    let timeout = Duration::from_millis(300);
    let proxy = start_proxy_with(
        rt,
        config_for(&[ws_echo().await]),
        ProxyOptions {
            tls_listener: Some(server_tls(&[ca.leaf(&["t.test"])])),
            tls_handshake_timeout: timeout,
            ..ProxyOptions::default()
        },
    );
    let start = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed within WAIT")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    // The proxy's timer starts at accept, after our connect began.
    assert!(
        start.elapsed() >= timeout,
        "closed after the timeout, not before"
    );
    assert_eq!(proxy.stats.tls_handshakes(TlsOutcome::TimedOut), 1);
    // The task ends just after the socket closes.
    let deadline = Instant::now() + WAIT;
    while proxy.stats.connections() > 0 || proxy.stats.tls_in_flight() > 0 {
        assert!(Instant::now() < deadline, "nothing left open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile and after, real clients are served.
    let tls = tls_connect(&ca.client(), proxy.addr, "t.test").await;
    drop(tls);
    proxy.stop();
}

async fn handshakes_over_the_limit_are_refused(rt: Runtime) {
    let ca = Ca::new("limit CA");
    let proxy = start_proxy_with(
        rt,
        config_for(&[ws_echo().await]),
        ProxyOptions {
            tls_listener: Some(server_tls(&[ca.leaf(&["l.test"])])),
            max_tls_handshakes: 2,
            ..ProxyOptions::default()
        },
    );
    // Two silent clients hold both handshake slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    let deadline = Instant::now() + WAIT;
    while proxy.stats.tls_in_flight() < 2 {
        assert!(Instant::now() < deadline, "two handshakes in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut third = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, third.read(&mut buf))
        .await
        .expect("refused within WAIT")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third is closed at once");
    assert_eq!(proxy.stats.tls_handshakes(TlsOutcome::Refused), 1);
    // Once a slot is free, a real client gets through.
    drop(held);
    let deadline = Instant::now() + WAIT;
    while proxy.stats.tls_in_flight() > 0 {
        assert!(Instant::now() < deadline, "slots given back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tls = tls_connect(&ca.client(), proxy.addr, "l.test").await;
    drop(tls);
    proxy.stop();
}

/// The TLS side of a test origin presenting `leaf` (PEM certificate and key).
fn origin_acceptor(leaf: &(String, String)) -> TlsAcceptor {
    let chain = vec![CertificateDer::from_pem_slice(leaf.0.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(leaf.1.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("origin certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS HTTP/1.1 origin presenting `leaf`: answers `200 secure` to every request, keeping the
/// connection alive; counts TLS connections accepted.
async fn tls_origin(leaf: &(String, String)) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, accepted, _) = tls_origin_logged(leaf).await;
    (addr, accepted)
}

/// [`tls_origin`], also recording each request head it answered.
async fn tls_origin_logged(
    leaf: &(String, String),
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    let acceptor = origin_acceptor(leaf);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::clone(&accepted);
    let log = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = Arc::clone(&count);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = pending.drain(..end + 4).collect();
                        if let Ok(mut log) = log.lock() {
                            log.push(String::from_utf8_lossy(&head).into_owned());
                        }
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure";
                        if tls.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted, heads)
}

/// A proxy whose one upstream is the TLS `origin`, reached as `name` and verified against
/// `ca` (TLS profile `secure`).
fn proxy_to_tls_origin(
    rt: Runtime,
    origin: SocketAddr,
    name: &str,
    ca: &Ca,
) -> switchyard_tests::ProxyHandle {
    let client =
        ClientTls::with_ca(Verify::Roots, vec![("ca.pem".into(), ca.der())]).expect("client TLS");
    start_proxy_with(
        rt,
        tls_upstream_config(origin, name),
        ProxyOptions {
            tls_clients: vec![("secure".into(), client)],
            ..ProxyOptions::default()
        },
    )
}

fn tls_upstream_config(origin: SocketAddr, name: &str) -> Config {
    let peer = Peer::new(&origin.ip().to_string(), origin.port()).with_tls(TlsTarget {
        server_name: Arc::from(name),
        profile: Arc::from("secure"),
    });
    Config::new(UpstreamGroup::new(vec![peer]))
}

async fn plain_get(addr: SocketAddr) -> String {
    let response = switchyard_tests::origin::raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
        switchyard_tests::origin::complete_response,
    )
    .await;
    String::from_utf8_lossy(&response).into_owned()
}

async fn upstream_tls_verifies_and_reuses_connections(rt: Runtime) {
    let ca = Ca::new("upstream CA");
    let (origin, accepted) = tls_origin(&ca.leaf(&["backend.test"])).await;
    let proxy = proxy_to_tls_origin(rt, origin, "backend.test", &ca);
    for _ in 0..3 {
        let response = plain_get(proxy.addr).await;
        assert_eq!(
            response,
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one TLS connection to the upstream, reused from the pool"
    );
    let logs = proxy.events.wait_for(3);
    assert!(logs.iter().all(|l| l.status == Some(200)));
    assert!(proxy.stats.pool_hits() >= 2);
    // New client settings (a reload's): the pooled connection, verified under the old ones,
    // is not reused; the next request makes and verifies a new one.
    let client =
        ClientTls::with_ca(Verify::Roots, vec![("ca.pem".into(), ca.der())]).expect("client TLS");
    proxy.tls.set_client("secure", client);
    let response = plain_get(proxy.addr).await;
    assert_eq!(
        response,
        "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a connection made under the earlier settings is not handed out"
    );
    proxy.stop();
}

async fn upstream_tls_with_the_wrong_ca_is_a_502(rt: Runtime) {
    let real = Ca::new("real CA");
    let other = Ca::new("another CA");
    let (origin, accepted) = tls_origin(&real.leaf(&["backend.test"])).await;
    let proxy = proxy_to_tls_origin(rt, origin, "backend.test", &other);
    let response = plain_get(proxy.addr).await;
    assert!(response.starts_with("HTTP/1.1 502 "), "{response}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the origin never saw a request"
    );
    let logs = proxy.events.wait_for(1);
    assert_eq!(logs[0].status, Some(502));
    assert!(
        format!("{:?}", logs[0].upstream_failures).contains("Tls"),
        "logged as a TLS failure: {:?}",
        logs[0].upstream_failures
    );
    // A wrong name fails the same way, with the right CA.
    let proxy2 = proxy_to_tls_origin(rt, origin, "elsewhere.test", &real);
    let response = plain_get(proxy2.addr).await;
    assert!(response.starts_with("HTTP/1.1 502 "), "{response}");
    proxy.stop();
    proxy2.stop();
}

async fn health_checks_speak_tls_and_mark_a_bad_certificate_down(rt: Runtime) {
    let real = Ca::new("health CA");
    let other = Ca::new("not trusted");
    let (good, _, good_heads) = tls_origin_logged(&real.leaf(&["backend.test"])).await;
    let (bad, bad_accepted) = tls_origin(&other.leaf(&["backend.test"])).await;
    let target = || TlsTarget {
        server_name: Arc::from("backend.test"),
        profile: Arc::from("secure"),
    };
    let peer = |a: SocketAddr| Peer::new(&a.ip().to_string(), a.port()).with_tls(target());
    let mut group = UpstreamGroup::new(vec![peer(bad), peer(good)]);
    let mut check = proxy_core::health::HealthCheck::new(proxy_core::health::HealthKind::Http {
        path: "/hz".to_owned(),
        expect: 200..=299,
    });
    check.interval = Duration::from_millis(100);
    check.fails = 1;
    group.health = Some(check);
    let client =
        ClientTls::with_ca(Verify::Roots, vec![("ca.pem".into(), real.der())]).expect("client TLS");
    let proxy = start_proxy_with(
        rt,
        Config::new(group),
        ProxyOptions {
            tls_clients: vec![("secure".into(), client)],
            ..ProxyOptions::default()
        },
    );
    // Two rounds of checks: the good server answered both over TLS, and by then the bad one
    // failed its first handshake.
    let deadline = Instant::now() + WAIT;
    loop {
        let checks = good_heads
            .lock()
            .map(|h| {
                h.iter()
                    .filter(|h| h.starts_with("GET /hz ") && h.contains("switchyard-health-check"))
                    .count()
            })
            .unwrap_or(0);
        if checks >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health checks reach the TLS server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(
            plain_get(proxy.addr).await,
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"
        );
    }
    let logs = proxy.events.wait_for(4);
    for log in &logs {
        assert!(
            log.upstream_failures.is_empty(),
            "the server with the untrusted certificate is down, never tried: {:?}",
            log.upstream_failures
        );
    }
    assert_eq!(
        bad_accepted.load(Ordering::SeqCst),
        0,
        "no handshake with it ever completed"
    );
    proxy.stop();
}

/// 4 MiB up and 16 MiB down through the TLS layer, by a client that half-closes after its
/// request (so no linger follows the response) and pauses reading: every byte arrives intact,
/// then a clean end (close_notify). Whether a send reported before its records were written
/// would be caught depends on the kernel's buffer sizes: with that mutation this test failed on
/// one runtime of four when tried — the flush's own unit of truth is `TlsStream::flush`.
async fn large_bodies_both_ways_and_a_close_after_the_last_byte(rt: Runtime) {
    const SIZE: usize = 4 << 20;
    // More than a loopback socket buffers, so the response's tail is still in the proxy.
    const DOWN: usize = 16 << 20;
    let ca = Ca::new("bodies CA");
    let origin = http_origin(Arc::new(|req: &SeenRequest| {
        let sum: u64 = req.body.iter().map(|b| u64::from(*b)).sum();
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Sum: {sum}\r\nConnection: close\r\n\r\n",
            DOWN
        )
        .into_bytes();
        response.extend((0..DOWN).map(|i| (i % 251) as u8));
        Some(response)
    }))
    .await;
    let mut config = config_for(&[origin.addr]);
    config.limits.max_body = 2 * SIZE as u64;
    let proxy = start_proxy_with(
        rt,
        config,
        ProxyOptions {
            tls_listener: Some(server_tls(&[ca.leaf(&["big.test"])])),
            ..ProxyOptions::default()
        },
    );
    // A small receive buffer keeps the proxy's socket full, so records are still waiting in
    // its TLS layer when the response's last byte has been handed to it.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let tcp = socket.connect(proxy.addr).await.expect("connect");
    let name = ServerName::try_from("big.test").expect("name");
    let mut tls = tokio::time::timeout(WAIT, ca.client().connect(name, tcp))
        .await
        .expect("handshake within WAIT")
        .expect("handshake");
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: big.test\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    );
    let mut received = Vec::new();
    let (wrote, read) = tokio::time::timeout(WAIT, async {
        let (mut rd, mut wr) = tokio::io::split(&mut tls);
        let write = async {
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(&body).await?;
            // Half-close (close_notify, FIN): the proxy then closes as soon as the response is
            // out, with no linger to hide records it had not yet written.
            wr.shutdown().await
        };
        let read = async {
            // Read nothing for a while: the proxy's socket fills, and the end of the response
            // waits in its TLS layer. (A pause that creates the condition, not a wait for a
            // result: the outcome must be the same however long it is.)
            let mut first = [0u8; 1];
            rd.read_exact(&mut first).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            received.push(first[0]);
            rd.read_to_end(&mut received).await
        };
        tokio::join!(write, read)
    })
    .await
    .expect("exchange within WAIT");
    wrote.expect("request written");
    assert!(
        read.is_ok(),
        "the response ended cleanly (close_notify): {read:?}"
    );
    let end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&received[..end]);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains(&format!("X-Sum: {sum}")),
        "the origin got every byte: {head}"
    );
    assert_eq!(
        received.len() - end,
        DOWN,
        "every byte of the body, then the end"
    );
    assert!(
        received[end..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8),
        "the body arrived unchanged"
    );
    proxy.stop();
}

/// An origin that answers one request with `head` and `body`, then, once told (or once the
/// sender is dropped), ends the connection: with a FIN (`reset: false`) or a reset.
async fn ending_origin(
    head: &'static str,
    body: usize,
    reset: bool,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (end, ended) = tokio::sync::oneshot::channel::<()>();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let mut reply = head.as_bytes().to_vec();
        reply.extend(std::iter::repeat_n(b'b', body));
        let _ = tcp.write_all(&reply).await;
        let _ = ended.await;
        if reset {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        }
        drop(tcp);
    });
    (addr, end)
}

/// Reads to the end: the bytes, and whether the end was clean (close_notify).
async fn read_all(tls: &mut Tls) -> (Vec<u8>, std::io::Result<usize>) {
    let mut out = Vec::new();
    let end = tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
        .await
        .expect("the end within WAIT");
    (out, end)
}

/// A response the upstream breaks off reaches the client without close_notify, so its TLS
/// reports the truncation; one that ends where it should (a body delimited by the close) ends
/// with close_notify.
async fn a_cut_response_ends_without_close_notify(rt: Runtime) {
    let ca = Ca::new("cut CA");
    let leaf = ca.leaf(&["cut.test"]);
    let get = b"GET / HTTP/1.1\r\nHost: cut.test\r\n\r\n";
    let tls_on = |leaf: &(String, String)| ProxyOptions {
        tls_listener: Some(server_tls(std::slice::from_ref(leaf))),
        ..ProxyOptions::default()
    };
    // Content-Length promises more than comes; the upstream resets once the start of the
    // response has reached the client.
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
    let (origin, end) = ending_origin(head, 1000, true).await;
    let proxy = start_proxy_with(rt, config_for(&[origin]), tls_on(&leaf));
    let mut tls = tls_connect(&ca.client(), proxy.addr, "cut.test").await;
    tls.write_all(get).await.expect("request");
    let mut first = [0u8; 17];
    tokio::time::timeout(WAIT, tls.read_exact(&mut first))
        .await
        .expect("the head within WAIT")
        .expect("the head");
    assert_eq!(&first, b"HTTP/1.1 200 OK\r\n");
    let _ = end.send(());
    let (got, end) = read_all(&mut tls).await;
    assert!(got.len() < 100_000, "the body was cut");
    assert_eq!(
        end.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::UnexpectedEof),
        "no close_notify after a cut response"
    );
    proxy.stop();
    // A body delimited by the close, ended by a FIN: complete, and said to be.
    let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
    let (origin, end) = ending_origin(head, 5000, false).await;
    drop(end);
    let proxy = start_proxy_with(rt, config_for(&[origin]), tls_on(&leaf));
    let mut tls = tls_connect(&ca.client(), proxy.addr, "cut.test").await;
    tls.write_all(get).await.expect("request");
    let (got, end) = read_all(&mut tls).await;
    assert!(got.ends_with(&[b'b'; 5000]), "the whole body");
    assert!(end.is_ok(), "a clean end says so: {end:?}");
    proxy.stop();
}

/// A TLS upstream whose body ends at its close: with close_notify the body is complete; a TCP
/// close without one (what an attacker on the path can forge) is a cut, passed on as one.
async fn an_upstream_tls_close_without_close_notify_is_a_cut(rt: Runtime) {
    let ca = Ca::new("upstream cut CA");
    let leaf = ca.leaf(&["backend.test"]);
    for clean in [true, false] {
        let acceptor = origin_acceptor(&leaf);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let origin = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let mut reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            reply.extend([b'u'; 3000]);
            let _ = tls.write_all(&reply).await;
            let _ = tls.flush().await;
            if clean {
                let _ = tls.shutdown().await;
            } else {
                // The TCP connection ends under the TLS session: no close_notify.
                let (mut tcp, _) = tls.into_inner();
                let _ = tcp.shutdown().await;
            }
        });
        let proxy = proxy_to_tls_origin(rt, origin, "backend.test", &ca);
        let response = switchyard_tests::origin::raw_exchange(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
            |_| false,
        )
        .await;
        let text = String::from_utf8_lossy(&response);
        let logs = proxy.events.wait_for(1);
        if clean {
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.ends_with(&"u".repeat(3000)), "{text}");
            assert_eq!(
                logs[0].close,
                Some(proxy_core::CloseReason::Completed),
                "a complete exchange"
            );
        } else {
            assert_eq!(
                logs[0].close,
                Some(proxy_core::CloseReason::UpstreamReset),
                "logged as cut"
            );
            // The client's connection is closed as cut (how much it saw depends on whether the
            // cut came in the same read as the response; a TLS client gets no close_notify,
            // see `a_cut_response_ends_without_close_notify`).
        }
        proxy.stop();
    }
}
