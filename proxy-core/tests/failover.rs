//! Upstream groups inside one session: failover to the next server on a refused or timed-out
//! connect, the limits on trying, the log of what was tried, and the balancer's connection
//! count following the session's connections (tunnels included).

mod sim;

use std::time::Duration;

use proxy_core::{
    CloseReason, Config, ConnectError, Event, Peer, Side, Timer, UpstreamGroup, UpstreamServer,
};
use sim::{Sim, WS_ACCEPT};

const GET: &str = "GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n";
const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn group(n: u16) -> UpstreamGroup {
    UpstreamGroup::new((1..=n).map(|p| Peer::new("10.0.0.1", 9000 + p)).collect())
}

fn sim(group: UpstreamGroup) -> Sim {
    Sim::new(Config::new(group))
}

#[test]
fn a_refused_server_is_skipped_for_the_next_one() {
    let mut sim = sim(group(3));
    sim.client(GET);
    sim.connect_failed(ConnectError::Refused);
    assert!(
        sim.take_client().is_empty(),
        "the client sees nothing of it"
    );
    assert_eq!(sim.chosen(), ["10.0.0.1:9001", "10.0.0.1:9002"]);
    sim.connected();
    assert!(sim.take_upstream().starts_with("GET /x HTTP/1.1\r\n"));
    sim.upstream(OK);
    assert!(sim.take_client().starts_with("HTTP/1.1 200 OK\r\n"));
    let log = &sim.events[0];
    assert_eq!(log.status, Some(200));
    assert_eq!(
        log.upstream.as_ref().map(ToString::to_string).as_deref(),
        Some("10.0.0.1:9002")
    );
    assert_eq!(
        log.upstream_failures,
        [(Peer::new("10.0.0.1", 9001), ConnectError::Refused)]
    );
    assert!(sim.notes.contains(&Event::UpstreamFailed {
        peer: Peer::new("10.0.0.1", 9001),
        cause: ConnectError::Refused
    }));
}

#[test]
fn every_server_down_is_502_naming_each_one() {
    let mut sim = sim(group(3));
    sim.client(GET);
    for _ in 0..3 {
        sim.connect_failed(ConnectError::Refused);
    }
    assert_eq!(sim.chosen().len(), 3, "each server once, no more");
    let out = sim.take_client();
    assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
    let log = &sim.events[0];
    assert_eq!(
        log.close,
        Some(CloseReason::ConnectFailed(ConnectError::Refused))
    );
    let tried: Vec<String> = log
        .upstream_failures
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(tried, ["10.0.0.1:9001", "10.0.0.1:9002", "10.0.0.1:9003"]);
}

#[test]
fn a_connect_timeout_moves_on_and_the_last_one_is_504() {
    let mut sim = sim(group(2));
    sim.client(GET);
    sim.advance(Duration::from_secs(61));
    assert_eq!(sim.chosen().len(), 2, "the timeout moved the request on");
    assert!(sim.take_client().is_empty());
    sim.advance(Duration::from_secs(61));
    assert!(sim
        .take_client()
        .starts_with("HTTP/1.1 504 Gateway Timeout\r\n"));
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::Timeout(Timer::Connect))
    );
    assert_eq!(
        sim.events[0]
            .upstream_failures
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        [ConnectError::TimedOut, ConnectError::TimedOut]
    );
}

#[test]
fn tries_and_the_time_budget_limit_failover() {
    let mut g = group(4);
    g.tries = 2;
    let mut s = sim(g);
    s.client(GET);
    s.connect_failed(ConnectError::Refused);
    s.connect_failed(ConnectError::Refused);
    assert_eq!(s.chosen().len(), 2);
    assert!(s.take_client().starts_with("HTTP/1.1 502 "));

    let mut g = group(4);
    g.try_timeout = Duration::from_secs(5);
    let mut s = sim(g);
    s.client(GET);
    s.connect_failed(ConnectError::Refused);
    s.now += Duration::from_secs(6);
    s.connect_failed(ConnectError::Refused);
    assert_eq!(
        s.chosen().len(),
        2,
        "the budget ran out before the third server"
    );
    assert!(s.take_client().starts_with("HTTP/1.1 502 "));
}

#[test]
fn a_failed_server_is_avoided_by_the_next_request() {
    let mut sim = sim(group(2));
    sim.client(GET);
    sim.connect_failed(ConnectError::Refused);
    sim.connected();
    sim.take_upstream();
    sim.upstream(OK);
    sim.take_client();
    // Round-robin would come back to 9001 now, but it failed within fail_timeout.
    sim.client(GET);
    assert_eq!(sim.chosen()[2], "10.0.0.1:9002");
}

#[test]
fn backup_only_when_the_primaries_fail() {
    let g = UpstreamGroup::with_servers(vec![
        UpstreamServer::new(Peer::new("10.0.0.1", 9001)),
        UpstreamServer::new(Peer::new("10.0.0.9", 9009)).backup(),
    ]);
    let mut sim = sim(g);
    sim.client(GET);
    assert_eq!(sim.chosen(), ["10.0.0.1:9001"]);
    sim.connect_failed(ConnectError::Refused);
    assert_eq!(sim.chosen()[1], "10.0.0.9:9009");
}

#[test]
fn the_balancer_counts_a_tunnel_until_it_closes() {
    let mut sim = sim(group(1));
    sim.client(sim::ws_request("/ws"));
    assert_eq!(sim.balancer.active(0, 0), 1, "counted from the choice");
    sim.connected();
    sim.take_upstream();
    sim.upstream(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    ));
    assert!(sim
        .notes
        .iter()
        .any(|e| matches!(e, Event::TunnelOpened { .. })));
    assert_eq!(sim.balancer.active(0, 0), 1, "an open tunnel counts");
    sim.client_eof();
    sim.upstream_eof();
    assert!(sim.session.is_closed());
    assert_eq!(sim.balancer.active(0, 0), 0, "a closed tunnel does not");
    assert!(sim
        .notes
        .iter()
        .any(|e| matches!(e, Event::TunnelClosed { .. })));
    assert!(sim.closed(Side::Upstream));
}

#[test]
fn a_keep_alive_exchange_gives_its_slot_back() {
    let mut sim = sim(group(2));
    for _ in 0..3 {
        sim.client(GET);
        sim.connected();
        sim.take_upstream();
        sim.upstream(OK);
        sim.take_client();
    }
    assert_eq!(sim.balancer.active(0, 0) + sim.balancer.active(0, 1), 0);
}

#[test]
fn a_dropped_session_gives_its_slot_back() {
    let mut sim = sim(group(1));
    sim.client(GET);
    sim.connected();
    let balancer = std::sync::Arc::clone(&sim.balancer);
    assert_eq!(balancer.active(0, 0), 1);
    drop(sim);
    assert_eq!(balancer.active(0, 0), 0);
}

/// A connect the proxy itself could not make (no descriptors left) is a 503, tries no other
/// server (it would fail the same way), and does not mark the server failed: round robin still
/// hands it out. A refused connect, for contrast, does mark it.
#[test]
fn a_local_failure_is_503_and_marks_no_server() {
    let picks = |sim: &Sim| -> Vec<u16> {
        let config = Config::new(group(2));
        (0..4)
            .filter_map(|_| {
                sim.balancer.pick(
                    &config,
                    0,
                    &proxy_core::Choice {
                        client: "127.0.0.1".parse().expect("ip"),
                        key: None,
                        tried: &[],
                        now: sim.now,
                    },
                )
            })
            .collect()
    };
    let mut s = sim(group(2));
    s.client(GET);
    s.connect_failed(ConnectError::Local);
    assert_eq!(s.chosen().len(), 1, "no other server tried");
    let out = s.take_client();
    assert!(
        out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{out}"
    );
    assert_eq!(
        s.events[0].close,
        Some(CloseReason::ConnectFailed(ConnectError::Local))
    );
    assert!(picks(&s).contains(&0), "the server is still handed out");

    let mut s = sim(group(2));
    s.client(GET);
    s.connect_failed(ConnectError::Refused);
    assert!(!picks(&s).contains(&0), "a refused server is marked failed");
}
