//! Shared fixtures and driving helpers for switchyard's criterion benchmarks.
//!
//! The benchmarks in `benches/core.rs` drive [`proxy_core::Session`] directly, the way an
//! adapter would but without sockets: feed an [`Input`], drain every [`Output`], acknowledge
//! what was "written" with [`Input::Sent`]. The helpers here keep that driving code in one place
//! and check, cheaply, that the session did what the benchmark assumes (a benchmark that
//! silently measured an error path would be worse than none): each helper panics with a message
//! when the session strays from the expected path.
//!
//! Time is frozen: every call uses the harness's one `Instant`, so no timer ever fires and the
//! measurements contain no clock reads.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use proxy_core::{
    Balancer, Config, Event, Input, Output, Peer, PeerInfo, Session, Side, UpstreamGroup,
    UpstreamId,
};

/// Request and response heads used by the benchmarks.
pub mod fixtures {
    /// The `Sec-WebSocket-Key` sent by [`WS_UPGRADE`] (the RFC 6455 sample nonce).
    pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    /// The `Sec-WebSocket-Accept` a genuine upstream answers [`WS_KEY`] with.
    pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// A browser-like `GET` for a page: 12 header fields, 578 bytes, no body.
    pub const BROWSER_GET: &[u8] = b"GET /account/orders?page=2&sort=desc HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://shop.example.com/account\r\n\
Connection: keep-alive\r\n\
Cookie: session=3f9a1c2e7b4d4e8f9a0b1c2d3e4f5a6b; theme=dark; consent=1\r\n\
Upgrade-Insecure-Requests: 1\r\n\
Sec-Fetch-Dest: document\r\n\
Sec-Fetch-Mode: navigate\r\n\
Sec-Fetch-Site: same-origin\r\n\
\r\n";

    /// A browser-like websocket upgrade request (Firefox's field set), 533 bytes.
    pub const WS_UPGRADE: &[u8] = b"GET /live/feed HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Sec-WebSocket-Version: 13\r\n\
Origin: https://shop.example.com\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Connection: keep-alive, Upgrade\r\n\
Cookie: session=3f9a1c2e7b4d4e8f9a0b1c2d3e4f5a6b; theme=dark\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
Upgrade: websocket\r\n\
\r\n";

    /// A typical small final response: 9 fields, 343 bytes, `Content-Length: 0`, so the
    /// exchange completes on the head and the connection stays alive.
    pub const RESPONSE_200_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Tue, 15 Oct 2024 12:00:00 GMT\r\n\
Server: nginx/1.27.2\r\n\
Content-Type: application/json; charset=utf-8\r\n\
Content-Length: 0\r\n\
Connection: keep-alive\r\n\
Cache-Control: no-store, max-age=0\r\n\
X-Request-Id: 5f2b8c1e-9d3a-4b7e-8f6a-1c2d3e4f5a6b\r\n\
Vary: Accept-Encoding\r\n\
Strict-Transport-Security: max-age=63072000; includeSubDomains\r\n\
\r\n";

    /// A genuine `101` answering [`WS_UPGRADE`].
    pub const WS_101: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
\r\n";
}

/// The shared, per-listener state sessions are made from: one `Arc<Config>`, one
/// `Arc<Balancer>`, a client address and a frozen clock.
#[derive(Debug, Clone)]
pub struct Harness {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    client: PeerInfo,
    now: Instant,
}

impl Harness {
    /// A harness for `config`, which must pass [`Config::validate`].
    pub fn new(config: Config) -> Self {
        config.validate().expect("benchmark config is valid");
        let config = Arc::new(config);
        let now = Instant::now();
        let balancer = Arc::new(Balancer::new(&config, now));
        let client = PeerInfo::new("192.0.2.1:40000".parse().expect("a socket address literal"));
        Harness {
            config,
            balancer,
            client,
            now,
        }
    }

    /// The default configuration with one peer at `127.0.0.1:9000`.
    pub fn default_config() -> Config {
        Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)]))
    }

    /// A fresh session for one accepted client connection (two `Arc` clones and a few empty
    /// collections; nothing is allocated until bytes arrive).
    pub fn session(&self) -> Session {
        Session::new(
            Arc::clone(&self.config),
            Arc::clone(&self.balancer),
            self.client.clone(),
            self.now,
        )
    }

    /// The frozen time every input is fed at.
    pub fn now(&self) -> Instant {
        self.now
    }
}

/// A summary of one drain of [`Session::poll_output`]. Recording it allocates nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drained {
    /// The id of the last `Connect`, if any.
    pub connect: Option<UpstreamId>,
    /// Number of `Send`s per side (index 0 = client, 1 = upstream).
    pub sends: [usize; 2],
    /// Bytes in those `Send`s per side.
    pub sent: [usize; 2],
    /// `ReleaseUpstream` outputs.
    pub releases: usize,
    /// Whether the last `ReleaseUpstream` allowed pooling.
    pub reusable: bool,
    /// `Event::Exchange` outputs.
    pub events: usize,
    /// Other events (upstream chosen, tunnel opened, ...).
    pub notes: usize,
    /// `ShutdownWrite` or `Close` outputs (never expected on the benchmarked paths).
    pub closes: usize,
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

/// Drains every output of `session`, summarising instead of performing them. The outputs (and
/// the `Bytes` and boxed events inside them) are dropped here, as an adapter would after writing.
pub fn drain(session: &mut Session) -> Drained {
    let mut d = Drained::default();
    while let Some(out) = session.poll_output() {
        match out {
            Output::Connect { id, .. } => d.connect = Some(id),
            Output::Send { to, bytes } => {
                d.sends[index(to)] += 1;
                d.sent[index(to)] += bytes.len();
            }
            Output::ReleaseUpstream { reusable, .. } => {
                d.releases += 1;
                d.reusable = reusable;
            }
            Output::Event(Event::Exchange(_)) => d.events += 1,
            Output::Event(_) => d.notes += 1,
            Output::ShutdownWrite { .. } | Output::Close { .. } => d.closes += 1,
            other => panic!("an output the benchmarks do not know: {other:?}"),
        }
    }
    d
}

/// Feeds a complete request head on an idle session, completes the upstream connect it asks
/// for, and drains the rewritten head. Returns the length of that head. The head is *not*
/// acknowledged with `Sent`; see [`ack`].
///
/// Panics unless the session asks for exactly one connect and then sends exactly one head
/// upstream and nothing to the client.
pub fn forward_request(session: &mut Session, now: Instant, head: Bytes, reused: bool) -> usize {
    session.handle_input(
        now,
        Input::Data {
            from: Side::Client,
            bytes: head,
        },
    );
    let d = drain(session);
    let id = d
        .connect
        .expect("a complete request head asks for a connect");
    assert!(
        d.sends == [0, 0] && d.closes == 0,
        "request head refused: {d:?}"
    );
    session.handle_input(now, Input::UpstreamConnected { id, reused });
    let d = drain(session);
    assert!(
        d.sends == [0, 1] && d.closes == 0,
        "connect did not send the head: {d:?}"
    );
    d.sent[1]
}

/// Reports `len` bytes written to `to`, and checks the session has nothing to say about it.
pub fn ack(session: &mut Session, now: Instant, to: Side, len: usize) {
    session.handle_input(now, Input::Sent { to, len });
    let d = drain(session);
    assert!(d == Drained::default(), "unexpected outputs on Sent: {d:?}");
}

/// Feeds a complete final response head (no body) on a session whose request was forwarded and
/// acknowledged, drains it, and acknowledges the head written to the client. Returns the length
/// of that head.
///
/// Panics unless the response goes to the client in one `Send`, the upstream is released as
/// reusable, one event is logged, and the session stays open (back to idle keep-alive).
pub fn finish_response(session: &mut Session, now: Instant, head: Bytes) -> usize {
    session.handle_input(
        now,
        Input::Data {
            from: Side::Upstream,
            bytes: head,
        },
    );
    let d = drain(session);
    assert!(
        d.sends == [1, 0] && d.releases == 1 && d.reusable && d.events == 1 && d.closes == 0,
        "response did not complete a keep-alive exchange: {d:?}"
    );
    ack(session, now, Side::Client, d.sent[0]);
    d.sent[0]
}

/// One whole keep-alive exchange on an idle session: request head, connect (a pooled
/// connection), acknowledge the head, response head, acknowledge it. Returns the bytes written
/// upstream and to the client.
pub fn exchange(
    session: &mut Session,
    now: Instant,
    request: Bytes,
    response: Bytes,
) -> [usize; 2] {
    let up = forward_request(session, now, request, true);
    ack(session, now, Side::Upstream, up);
    let down = finish_response(session, now, response);
    [down, up]
}

/// A new session with an open websocket tunnel: [`fixtures::WS_UPGRADE`], connect, the genuine
/// [`fixtures::WS_101`], everything acknowledged.
///
/// Panics if the `101` is not passed to the client or the session closes.
pub fn open_tunnel(harness: &Harness) -> Session {
    let now = harness.now();
    let mut session = harness.session();
    let up = forward_request(
        &mut session,
        now,
        Bytes::from_static(fixtures::WS_UPGRADE),
        false,
    );
    ack(&mut session, now, Side::Upstream, up);
    session.handle_input(
        now,
        Input::Data {
            from: Side::Upstream,
            bytes: Bytes::from_static(fixtures::WS_101),
        },
    );
    let d = drain(&mut session);
    assert!(
        d.sends == [1, 0] && d.closes == 0 && d.releases == 0,
        "the 101 did not open a tunnel: {d:?}"
    );
    ack(&mut session, now, Side::Client, d.sent[0]);
    assert!(
        session.wants_read(Side::Client) && session.wants_read(Side::Upstream),
        "an open, idle tunnel reads both sides"
    );
    session
}

/// Moves one chunk through an open tunnel: `Data` from `from`, expect exactly one `Send` to the
/// other side, acknowledge it. Returns the `Bytes` that were sent, so a caller can check they
/// are the very bytes that came in.
///
/// Panics if the session emits anything but that one `Send`.
pub fn tunnel_forward(session: &mut Session, now: Instant, from: Side, bytes: Bytes) -> Bytes {
    session.handle_input(now, Input::Data { from, bytes });
    let sent = match session.poll_output() {
        Some(Output::Send { to, bytes }) if to == from.other() => bytes,
        other => panic!("tunnel data did not come out as one Send: {other:?}"),
    };
    if let Some(other) = session.poll_output() {
        panic!("tunnel data produced more than one output: {other:?}");
    }
    session.handle_input(
        now,
        Input::Sent {
            to: from.other(),
            len: sent.len(),
        },
    );
    if let Some(other) = session.poll_output() {
        panic!("acknowledging tunnel data produced an output: {other:?}");
    }
    sent
}
