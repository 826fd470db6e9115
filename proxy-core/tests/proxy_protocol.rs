//! The PROXY protocol in the session: the client address it carries replaces the socket's, a
//! header split across reads works, and a connection without a valid header or from an
//! untrusted source is closed without an HTTP answer.

mod sim;

use proxy_core::proxy_protocol::ProxyError;
use proxy_core::{CloseReason, Config, IpNet, Peer, ProxyProtocol, Side, UpstreamGroup};
use sim::Sim;

fn config(trusted: &str) -> Config {
    let mut c = Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)]));
    c.proxy_protocol = Some(ProxyProtocol::new(vec![
        IpNet::parse(trusted).expect("a network")
    ]));
    c
}

const GET: &str = "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";

#[test]
fn the_header_address_becomes_the_client() {
    let mut sim = Sim::new(config("192.0.2.0/24"));
    sim.client(format!(
        "PROXY TCP4 198.51.100.9 10.0.0.1 40000 443\r\n{GET}"
    ));
    sim.connected();
    let head = sim.take_upstream();
    assert!(head.contains("X-Forwarded-For: 198.51.100.9\r\n"), "{head}");
    sim.upstream("HTTP/1.1 204 No Content\r\n\r\n");
    assert_eq!(sim.events[0].client.to_string(), "198.51.100.9:40000");
}

#[test]
fn a_v2_header_split_across_reads() {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[
        0x21, 0x11, 0, 12, 203, 0, 113, 5, 10, 0, 0, 1, 0x9c, 0x40, 1, 187,
    ]);
    let mut bytes = header.clone();
    bytes.extend_from_slice(GET.as_bytes());
    let mut sim = Sim::new(config("192.0.2.0/24"));
    for piece in bytes.chunks(5) {
        sim.client(piece);
    }
    sim.connected();
    assert!(sim
        .take_upstream()
        .contains("X-Forwarded-For: 203.0.113.5\r\n"));
}

#[test]
fn no_header_is_closed_without_an_answer() {
    let mut sim = Sim::new(config("192.0.2.0/24"));
    sim.client(GET);
    assert!(sim.take_client().is_empty(), "no HTTP answer to a balancer");
    assert!(sim.closed(Side::Client));
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::ProxyProtocol(Some(ProxyError::Missing)))
    );
    assert_eq!(sim.connects(), 0);
}

#[test]
fn an_untrusted_source_is_closed_at_once() {
    let mut sim = Sim::new(config("10.0.0.0/8"));
    sim.drain();
    assert!(sim.session.is_closed());
    assert!(sim.closed(Side::Client));
    assert_eq!(sim.events[0].close, Some(CloseReason::ProxyProtocol(None)));
}

#[test]
fn a_header_that_never_completes_is_closed_at_the_head_timeout() {
    let mut sim = Sim::new(config("192.0.2.0/24"));
    sim.client("PROXY TCP4 198.51.100.9");
    assert!(!sim.session.is_closed());
    assert!(sim.fire_next_timer());
    assert!(sim.take_client().is_empty());
    assert!(sim.session.is_closed());
}

#[test]
fn listeners_that_do_not_require_it_speak_plain_http() {
    let mut c = config("192.0.2.0/24");
    if let Some(p) = c.proxy_protocol.as_mut() {
        p.listeners = vec!["0.0.0.0:8443".parse().expect("addr")];
    }
    let mut sim = Sim::new(c);
    sim.client(GET);
    assert_eq!(sim.connects(), 1, "no header needed on an unnamed listener");
}
