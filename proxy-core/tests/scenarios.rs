//! Scenario tests: a whole client connection driven through the simulation harness, asserting
//! on the exact bytes each peer receives, the actions the adapter is told to take, and the
//! logged events.

mod sim;

use std::time::Duration;

use proxy_core::{CloseReason, ConnectError, Input, Side, Timer};
use sim::{config, ws_101, ws_request, Action, Sim, WS_ACCEPT};

const GET: &str = "GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n";
const OK5: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

fn status_line(s: &str) -> &str {
    s.split("\r\n").next().unwrap_or("")
}

// ---- plain HTTP ----

#[test]
fn simple_exchange_forwards_canonical_head_and_keeps_alive() {
    let mut sim = Sim::default_config();
    sim.client("GET /a HTTP/1.1\r\nhost: example.com\r\nAccept: */*\r\n\r\n");
    assert_eq!(sim.connects(), 1);
    assert!(
        sim.upstream_rx.is_empty(),
        "nothing is sent before the connection exists"
    );
    sim.connected();
    assert_eq!(
        sim.take_upstream(),
        "GET /a HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nX-Forwarded-For: 192.0.2.1\r\n\
         X-Forwarded-Proto: http\r\nX-Forwarded-Host: example.com\r\n\r\n"
    );
    sim.upstream(OK5);
    assert_eq!(
        sim.take_client(),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    );
    assert_eq!(
        sim.releases(),
        vec![true],
        "both messages complete: upstream reusable"
    );
    assert!(!sim.closed(Side::Client));
    assert_eq!(sim.events.len(), 1);
    let ev = &sim.events[0];
    assert_eq!(ev.status, Some(200));
    assert_eq!(ev.request_line, "GET /a HTTP/1.1");
    assert_eq!(ev.close, None);
    assert_eq!(ev.body_bytes_to_client, 5);
    assert_eq!(
        ev.upstream.as_ref().map(ToString::to_string).as_deref(),
        Some("127.0.0.1:9000")
    );
    assert!(sim.session.wants_read(Side::Client));
}

#[test]
fn keep_alive_sequence_of_three_requests() {
    let mut sim = Sim::default_config();
    for i in 0..3 {
        sim.client(format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n"));
        sim.connected();
        assert!(sim
            .take_upstream()
            .starts_with(&format!("GET /{i} HTTP/1.1\r\n")));
        sim.upstream(OK5);
        assert!(sim.take_client().ends_with("hello"));
    }
    assert_eq!(sim.connects(), 3);
    assert_eq!(sim.releases(), vec![true, true, true]);
    assert_eq!(sim.events.len(), 3);
    assert!(!sim.closed(Side::Client));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut sim = Sim::default_config();
    sim.client(format!("{GET}GET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\nHost: h\r\n\r\n"));
    assert_eq!(sim.connects(), 1, "one exchange at a time");
    sim.connected();
    assert!(sim.take_upstream().starts_with("GET /a "));
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA");
    assert_eq!(sim.connects(), 2);
    sim.connected();
    assert!(sim.take_upstream().starts_with("GET /b "));
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB");
    sim.connected();
    assert!(sim.take_upstream().starts_with("GET /c "));
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nC");
    let out = sim.take_client();
    let bodies: Vec<&str> = out.split("\r\n\r\n").skip(1).map(|s| &s[..1]).collect();
    assert_eq!(bodies, ["A", "B", "C"]);
    assert!(out.ends_with("Connection: close\r\n\r\nC"), "{out}");
    assert_eq!(
        sim.connects(),
        3,
        "the request after Connection: close is ignored"
    );
    assert!(sim.shut(Side::Client));
}

#[test]
fn post_with_content_length_streams_body_zero_copy_and_chunked_is_canonicalised() {
    let mut sim = Sim::default_config();
    sim.client("POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234");
    sim.connected();
    assert!(sim
        .take_upstream()
        .ends_with("Content-Length: 10\r\n\r\n01234"));
    sim.client("56789");
    assert_eq!(sim.take_upstream(), "56789");
    sim.upstream("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 201 Created\r\n"));

    sim.client(
        "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;name=val\r\nhello\r\n",
    );
    sim.connected();
    let up = sim.take_upstream();
    assert!(
        up.ends_with("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
        "{up}"
    );
    sim.client("0\r\nX-Trailer: dropped\r\n\r\n");
    assert_eq!(sim.take_upstream(), "0\r\n\r\n");
    sim.upstream(OK5);
    assert_eq!(sim.releases(), vec![true, true]);
}

#[test]
fn chunked_response_is_relayed_and_until_close_response_closes() {
    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected();
    sim.upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
    );
    assert_eq!(
        sim.take_client(),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    );
    assert_eq!(sim.releases(), vec![true]);

    sim.client(GET);
    sim.connected();
    sim.upstream("HTTP/1.1 200 OK\r\n\r\npart1");
    sim.upstream("part2");
    assert!(!sim.closed(Side::Client));
    sim.upstream_eof();
    assert_eq!(
        sim.take_client(),
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart1part2"
    );
    assert_eq!(sim.releases(), vec![true, false]);
    assert!(sim.shut(Side::Client));
}

#[test]
fn head_204_304_have_no_body() {
    for (req, resp) in [
        (
            "HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        ),
        (GET, "HTTP/1.1 204 No Content\r\n\r\n"),
        (GET, "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
    ] {
        let mut sim = Sim::default_config();
        sim.client(req);
        sim.connected();
        sim.upstream(resp);
        assert_eq!(
            sim.events.len(),
            1,
            "exchange complete without a body: {resp}"
        );
        assert_eq!(sim.releases(), vec![true]);
        // The next request is served on the same connection.
        sim.client(GET);
        assert_eq!(sim.connects(), 2);
    }
}

#[test]
fn http10_client_gets_identity_body_and_close() {
    let mut sim = Sim::default_config();
    sim.client("GET / HTTP/1.0\r\n\r\n");
    sim.connected();
    assert!(sim
        .take_upstream()
        .starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"));
    sim.upstream("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n");
    assert_eq!(
        sim.take_client(),
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhi"
    );
    assert!(sim.shut(Side::Client));
}

#[test]
fn interim_100_continue_is_relayed() {
    let mut sim = Sim::default_config();
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    sim.connected();
    sim.upstream("HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(sim.take_client(), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.client("ok");
    assert!(sim.take_upstream().ends_with("\r\n\r\nok"));
    sim.upstream(OK5);
    assert!(sim.take_client().ends_with("hello"));
    assert_eq!(sim.events[0].status, Some(200));
}

#[test]
fn max_requests_per_connection() {
    let mut c = config();
    c.limits.max_requests = 2;
    let mut sim = Sim::new(c);
    sim.client(GET);
    sim.connected();
    sim.upstream(OK5);
    assert!(!sim.take_client().contains("Connection: close"));
    sim.client(GET);
    sim.connected();
    sim.upstream(OK5);
    assert!(sim.take_client().contains("Connection: close\r\n"));
    assert!(sim.shut(Side::Client));
}

#[test]
fn early_response_closes_and_discards_unsent_body() {
    let mut sim = Sim::default_config();
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc");
    sim.connected();
    sim.take_upstream();
    sim.upstream("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n");
    let out = sim.take_client();
    assert!(
        out.starts_with("HTTP/1.1 413 ") && out.contains("Connection: close\r\n"),
        "{out}"
    );
    assert_eq!(sim.releases(), vec![false]);
    sim.client("rest of the body");
    assert!(
        sim.upstream_rx.is_empty(),
        "nothing more reaches the upstream"
    );
    sim.client_eof();
    assert!(sim.closed(Side::Client));
}

#[test]
fn stale_pooled_connection_is_retried_once_for_idempotent_request() {
    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected_with(true);
    sim.take_upstream();
    sim.upstream_eof();
    assert_eq!(sim.connects(), 2);
    assert!(matches!(
        sim.actions.last(),
        Some(Action::Connect {
            allow_pooled: false,
            ..
        })
    ));
    sim.connected();
    assert!(sim.take_upstream().starts_with("GET /a HTTP/1.1\r\n"));
    sim.upstream(OK5);
    assert!(sim.take_client().ends_with("hello"));

    // A POST is not repeated.
    let mut sim = Sim::default_config();
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
    sim.connected_with(true);
    sim.upstream_eof();
    assert_eq!(sim.connects(), 1);
    assert!(sim.take_client().starts_with("HTTP/1.1 502 "));
}

// ---- errors ----

#[test]
fn malformed_request_gets_400_and_nothing_upstream() {
    let mut sim = Sim::default_config();
    sim.client(
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    );
    let out = sim.take_client();
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("Connection: close\r\n"));
    assert_eq!(sim.connects(), 0);
    assert!(sim.upstream_total.is_empty());
    assert!(sim.shut(Side::Client), "FIN after the error, then linger");
    assert!(matches!(
        sim.events[0].close,
        Some(CloseReason::BadRequest(_))
    ));
    assert_eq!(sim.events[0].status, Some(400));
    // The proxy's own response has a body, and the log counts it (nginx's $body_bytes_sent).
    assert_eq!(
        sim.events[0].body_bytes_to_client,
        "400 Bad Request\n".len() as u64
    );
    assert_eq!(sim.events[0].bytes_to_client, out.len() as u64);
    sim.client("more junk is drained");
    sim.client_eof();
    assert!(sim.closed(Side::Client));
}

#[test]
fn oversized_head_and_uri() {
    let mut c = config();
    c.limits.max_head = 1024;
    c.limits.max_uri = 256;
    let mut sim = Sim::new(c.clone());
    sim.client(format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n",
        "a".repeat(2000)
    ));
    assert!(sim.take_client().starts_with("HTTP/1.1 431 "));
    let mut sim = Sim::new(c.clone());
    sim.client(format!(
        "GET /{} HTTP/1.1\r\nHost: h\r\n\r\n",
        "a".repeat(600)
    ));
    assert!(sim.take_client().starts_with("HTTP/1.1 414 "));
    let mut sim = Sim::new(c.clone());
    sim.client(format!("GET /{}", "a".repeat(600)));
    assert!(
        sim.take_client().starts_with("HTTP/1.1 414 "),
        "an endless request line is refused early"
    );
    assert_eq!(sim.connects(), 0);
}

#[test]
fn body_limit_413_for_declared_and_streamed_bodies() {
    let mut c = config();
    c.limits.max_body = 10;
    let mut sim = Sim::new(c.clone());
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 413 "));
    assert_eq!(sim.connects(), 0);

    let mut sim = Sim::new(c);
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    sim.connected();
    sim.take_upstream();
    sim.client("8\r\n12345678\r\n8\r\n12345678\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 413 "));
    assert_eq!(
        sim.upstream_rx.len(),
        0,
        "the chunk that crossed the limit was not forwarded"
    );
    assert_eq!(sim.releases(), vec![false]);
}

#[test]
fn bad_chunk_in_request_body_is_400() {
    let mut sim = Sim::default_config();
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    sim.connected();
    sim.client("zz\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 400 "));
}

#[test]
fn connect_refused_is_502() {
    let mut sim = Sim::default_config();
    sim.client(GET);
    let id = sim.last_connect.expect("connect");
    sim.input(Input::UpstreamFailed {
        id,
        why: ConnectError::Refused,
    });
    let out = sim.take_client();
    assert!(
        out.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && out.contains("Connection: close"),
        "{out}"
    );
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::ConnectFailed(ConnectError::Refused))
    );
}

#[test]
fn bad_upstream_response_is_502_and_truncated_body_aborts() {
    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected();
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 502 "));

    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected();
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    sim.upstream_eof();
    assert!(
        sim.closed(Side::Client),
        "a truncated body cannot be completed: abort"
    );
    assert_eq!(sim.events[0].close, Some(CloseReason::UpstreamClosed));

    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected();
    sim.upstream_eof();
    assert!(sim.take_client().starts_with("HTTP/1.1 502 "));
}

#[test]
fn stale_connect_events_are_ignored() {
    let mut c = config();
    c.timeouts.connect = Duration::from_secs(1);
    let mut sim = Sim::new(c);
    sim.client(GET);
    let id = sim.last_connect.expect("connect");
    sim.advance(Duration::from_secs(2));
    assert!(sim.take_client().starts_with("HTTP/1.1 504 "));
    let before = sim.actions.len();
    sim.input(Input::UpstreamConnected { id, reused: false });
    assert_eq!(sim.actions.len(), before);
    assert!(sim.upstream_total.is_empty());
}

// ---- the upgrade ----

#[test]
fn upgrade_accepted_becomes_tunnel() {
    let mut sim = Sim::default_config();
    sim.client(ws_request("/ws"));
    sim.connected();
    let head = sim.take_upstream();
    assert!(head.starts_with("GET /ws HTTP/1.1\r\nHost: example.com\r\n"));
    assert!(head.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
    assert!(head.ends_with("Upgrade: websocket\r\nConnection: upgrade\r\n\r\n"));
    sim.upstream(ws_101());
    assert_eq!(
        sim.take_client(),
        format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    );
    sim.client([0x81, 0x02, b'h', b'i']);
    assert_eq!(sim.upstream_rx, [0x81, 0x02, b'h', b'i']);
    sim.upstream([0x81, 0x01, b'x']);
    assert_eq!(sim.client_rx, [0x81, 0x01, b'x']);
    assert!(
        sim.releases().is_empty(),
        "an upgraded connection is never released for reuse"
    );
}

#[test]
fn upgrade_101_and_first_frame_in_one_read() {
    let mut sim = Sim::default_config();
    sim.client(ws_request("/ws"));
    sim.connected();
    let mut resp = ws_101().into_bytes();
    resp.extend_from_slice(&[0x81, 0x03, b'a', b'b', b'c']);
    sim.upstream(&resp);
    assert!(sim.client_rx.ends_with(b"\r\n\r\n\x81\x03abc"));
}

#[test]
fn client_frame_sent_before_101_is_held_then_forwarded() {
    let mut sim = Sim::default_config();
    let mut req = ws_request("/ws").into_bytes();
    req.extend_from_slice(b"\x81\x05early");
    sim.client(&req);
    sim.connected();
    let head = sim.take_upstream();
    assert!(
        head.ends_with("\r\n\r\n"),
        "the held frame is not forwarded before the 101: {head:?}"
    );
    sim.client(b"\x81\x04more");
    assert!(sim.upstream_rx.is_empty(), "might-switch: still held");
    sim.upstream(ws_101());
    assert_eq!(sim.upstream_rx, b"\x81\x05early\x81\x04more");
}

#[test]
fn upgrade_refused_stays_http_and_held_bytes_are_the_next_request() {
    for refusal in [
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno",
        "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody",
    ] {
        let mut sim = Sim::default_config();
        sim.client(format!(
            "{}GET /next HTTP/1.1\r\nHost: h\r\n\r\n",
            ws_request("/ws")
        ));
        sim.connected();
        sim.take_upstream();
        sim.upstream(refusal);
        let out = sim.take_client();
        assert_eq!(status_line(&out), status_line(refusal));
        assert!(
            !out.contains("Upgrade:") && !out.contains("upgrade\r\n"),
            "{out}"
        );
        // The held bytes were parsed as an HTTP request, on a new exchange.
        assert_eq!(sim.connects(), 2, "{refusal}");
        sim.connected();
        assert!(sim.take_upstream().starts_with("GET /next HTTP/1.1\r\n"));
        assert!(!sim.events[0].upgraded);
    }
}

#[test]
fn bogus_or_unsolicited_101_is_502() {
    let cases = [
        (ws_request("/ws"), "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: bm9wZQ==\r\n\r\n"),
        (ws_request("/ws"), "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
        (GET.to_owned(), "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
    ];
    for (req, resp) in cases {
        let mut sim = Sim::default_config();
        sim.client(&req);
        sim.connected();
        sim.take_upstream();
        sim.upstream(resp);
        sim.upstream(b"\x81\x01x");
        let out = sim.take_client();
        assert!(
            out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{resp}: {out}"
        );
        assert!(!out.contains('\u{81}'), "no tunnel bytes reach the client");
        sim.client(b"\x81\x01y");
        assert!(
            sim.upstream_rx.is_empty(),
            "no client bytes reach the upstream"
        );
        assert!(matches!(
            sim.events[0].close,
            Some(CloseReason::BadResponse(_))
        ));
    }
}

#[test]
fn accept_check_can_be_switched_off() {
    let mut c = config();
    c.check_websocket_accept = false;
    let mut sim = Sim::new(c);
    sim.client(ws_request("/ws"));
    sim.connected();
    sim.upstream("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: whatever\r\n\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 101 "));
}

// ---- the tunnel ----

#[test]
fn half_close_client_first() {
    let mut sim = Sim::default_config();
    sim.open_tunnel();
    sim.client("last from client");
    sim.client_eof();
    assert!(
        sim.shut(Side::Upstream),
        "client FIN passed on after flushing"
    );
    assert!(!sim.closed(Side::Client));
    sim.upstream("still flowing");
    assert_eq!(sim.take_client(), "still flowing");
    sim.upstream_eof();
    // The second FIN ends the tunnel: the close carries it, no separate shutdown.
    assert!(!sim.shut(Side::Client), "no shutdown right before a close");
    assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
    assert!(sim.session.is_closed());
    let ev = sim.events.last().expect("tunnel event");
    assert!(ev.upgraded);
    assert_eq!(ev.status, Some(101));
    assert_eq!(ev.close, Some(CloseReason::ClientClosed));
    assert!(ev.tunnel_duration.is_some());
}

#[test]
fn half_close_upstream_first_waits_for_flush() {
    let mut sim = Sim::default_config();
    sim.open_tunnel();
    sim.auto_ack = false;
    sim.upstream("unflushed");
    sim.upstream_eof();
    assert!(
        !sim.shut(Side::Client),
        "FIN only after the queued bytes are written"
    );
    sim.ack(Side::Client);
    assert!(sim.shut(Side::Client));
    sim.client("reply after FIN");
    assert_eq!(sim.take_upstream(), "reply after FIN");
    sim.ack(Side::Upstream);
    sim.client_eof();
    assert!(sim.session.is_closed());
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::UpstreamClosed)
    );
}

#[test]
fn tunnel_backpressure_stops_reading_the_source() {
    let mut c = config();
    c.limits.queue = 8;
    let mut sim = Sim::new(c);
    sim.open_tunnel();
    sim.auto_ack = false;
    assert!(sim.session.wants_read(Side::Client));
    sim.client("0123456789");
    assert!(
        !sim.session.wants_read(Side::Client),
        "upstream is not draining"
    );
    assert!(
        sim.session.wants_read(Side::Upstream),
        "the other direction is independent"
    );
    sim.ack(Side::Upstream);
    assert!(sim.session.wants_read(Side::Client));
}

#[test]
fn tunnel_forwards_the_same_bytes_without_copy() {
    let mut sim = Sim::default_config();
    sim.open_tunnel();
    let data = bytes::Bytes::from(vec![7u8; 4096]);
    let ptr = data.as_ptr();
    sim.session.handle_input(
        sim.now,
        Input::Data {
            from: Side::Client,
            bytes: data,
        },
    );
    match sim.session.poll_output() {
        Some(proxy_core::Output::Send {
            to: Side::Upstream,
            bytes,
        }) => assert_eq!(bytes.as_ptr(), ptr),
        other => panic!("expected a send, got {other:?}"),
    }
}

// ---- every timeout ----

fn timeout_config() -> proxy_core::Config {
    let mut c = config();
    let t = &mut c.timeouts;
    t.request_head = Duration::from_secs(10);
    t.keep_alive = Duration::from_secs(20);
    t.client_body = Duration::from_secs(30);
    t.connect = Duration::from_secs(40);
    t.read = Duration::from_secs(50);
    t.send = Duration::from_secs(60);
    t.tunnel_idle = Duration::from_secs(70);
    t.tunnel_lifetime = Some(Duration::from_secs(500));
    t.fin = Duration::from_secs(45);
    t.linger = Duration::from_secs(5);
    c
}

#[test]
fn request_head_timeout_is_a_total_deadline() {
    let mut sim = Sim::new(timeout_config());
    sim.advance(Duration::from_secs(3));
    sim.client("GET / HT");
    for _ in 0..6 {
        sim.advance(Duration::from_secs(1));
        sim.client("T"); // trickling bytes does not extend the deadline
    }
    sim.advance(Duration::from_secs(2));
    let out = sim.take_client();
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::Timeout(Timer::RequestHead))
    );
}

#[test]
fn silent_connection_is_closed_without_a_response() {
    let mut sim = Sim::new(timeout_config());
    sim.advance(Duration::from_secs(11));
    assert!(sim.closed(Side::Client));
    assert!(sim.client_total.is_empty());
    assert!(sim.events.is_empty());
}

#[test]
fn keep_alive_idle_timeout() {
    let mut sim = Sim::new(timeout_config());
    sim.client(GET);
    sim.connected();
    sim.upstream(OK5);
    sim.advance(Duration::from_secs(19));
    assert!(
        !sim.closed(Side::Client),
        "request-head timer does not apply between requests"
    );
    sim.advance(Duration::from_secs(2));
    assert!(sim.closed(Side::Client));
}

#[test]
fn client_body_timeout() {
    let mut sim = Sim::new(timeout_config());
    sim.client("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12");
    sim.connected();
    sim.advance(Duration::from_secs(29));
    sim.client("34");
    sim.advance(Duration::from_secs(29));
    assert!(
        sim.take_client().is_empty(),
        "each read restarts the body timer"
    );
    sim.advance(Duration::from_secs(2));
    assert!(sim.take_client().starts_with("HTTP/1.1 408 "));
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::Timeout(Timer::ClientBody))
    );
}

#[test]
fn connect_timeout_is_504() {
    let mut sim = Sim::new(timeout_config());
    sim.client(GET);
    sim.advance(Duration::from_secs(41));
    assert!(sim
        .take_client()
        .starts_with("HTTP/1.1 504 Gateway Timeout\r\n"));
    assert!(sim.closed(Side::Upstream));
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::Timeout(Timer::Connect))
    );
}

#[test]
fn read_timeout_before_head_is_504_and_mid_body_aborts() {
    let mut sim = Sim::new(timeout_config());
    sim.client(GET);
    sim.connected();
    sim.advance(Duration::from_secs(51));
    assert!(sim.take_client().starts_with("HTTP/1.1 504 "));

    let mut sim = Sim::new(timeout_config());
    sim.client(GET);
    sim.connected();
    sim.upstream("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab");
    sim.advance(Duration::from_secs(49));
    sim.upstream("cd");
    sim.advance(Duration::from_secs(49));
    assert!(
        !sim.closed(Side::Client),
        "each read restarts the read timer"
    );
    sim.advance(Duration::from_secs(2));
    assert!(sim.closed(Side::Client));
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::Timeout(Timer::UpstreamRead))
    );
}

#[test]
fn send_timeout_when_a_side_stops_accepting() {
    let mut sim = Sim::new(timeout_config());
    sim.open_tunnel();
    sim.auto_ack = false;
    sim.upstream("data the client never reads");
    sim.advance(Duration::from_secs(61));
    assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::Timeout(Timer::SendClient))
    );
}

#[test]
fn tunnel_idle_lifetime_and_fin_timeouts() {
    let mut sim = Sim::new(timeout_config());
    sim.open_tunnel();
    sim.advance(Duration::from_secs(69));
    sim.client("x");
    sim.advance(Duration::from_secs(69));
    assert!(!sim.session.is_closed(), "traffic restarts the idle timer");
    sim.advance(Duration::from_secs(2));
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::Timeout(Timer::TunnelIdle))
    );

    let mut sim = Sim::new(timeout_config());
    sim.open_tunnel();
    for _ in 0..10 {
        sim.advance(Duration::from_secs(60));
        sim.client("keepalive");
    }
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::Timeout(Timer::TunnelLifetime))
    );

    let mut sim = Sim::new(timeout_config());
    sim.open_tunnel();
    sim.client_eof();
    sim.advance(Duration::from_secs(44));
    assert!(!sim.session.is_closed());
    sim.advance(Duration::from_secs(2));
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::Timeout(Timer::Fin))
    );
}

#[test]
fn linger_timeout_closes_after_error() {
    let mut sim = Sim::new(timeout_config());
    sim.client("BAD\r\n\r\n");
    assert!(sim.shut(Side::Client));
    assert!(!sim.closed(Side::Client));
    assert!(
        sim.session.wants_read(Side::Client),
        "unread bytes are drained while lingering"
    );
    sim.advance(Duration::from_secs(6));
    assert!(sim.closed(Side::Client));
}

#[test]
fn drain_closes_idle_finishes_exchange_and_deadlines_tunnel() {
    let mut sim = Sim::default_config();
    let now = sim.now;
    sim.session.start_drain(now, now + Duration::from_secs(30));
    sim.drain();
    assert!(
        sim.closed(Side::Client),
        "an idle connection closes at once on drain"
    );
    assert!(!sim.shut(Side::Client), "no linger: nothing was unread");

    let mut sim = Sim::default_config();
    sim.client(GET);
    sim.connected();
    let now = sim.now;
    sim.session.start_drain(now, now + Duration::from_secs(30));
    sim.drain();
    sim.upstream(OK5);
    assert!(sim.take_client().contains("Connection: close\r\n"));

    let mut sim = Sim::default_config();
    sim.open_tunnel();
    let now = sim.now;
    sim.session.start_drain(now, now + Duration::from_secs(30));
    sim.drain();
    sim.advance(Duration::from_secs(29));
    assert!(!sim.session.is_closed());
    sim.advance(Duration::from_secs(2));
    assert!(sim.session.is_closed());
    assert_eq!(
        sim.events.last().and_then(|e| e.close.clone()),
        Some(CloseReason::Drain)
    );
}

#[test]
fn handle_timeout_before_deadline_is_a_no_op() {
    let mut sim = Sim::new(timeout_config());
    sim.client(GET);
    let deadline = sim.session.poll_timeout().expect("connect timer");
    let before = sim.actions.len();
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.actions.len(), before);
    assert_eq!(sim.session.poll_timeout(), Some(deadline));
}
