//! What the session targets share: a scripted adapter that feeds arbitrary steps to a
//! `Session` and checks the invariants every output must keep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use proxy_core::{
    Balancer, Config, ConnectError, Input, Output, Peer, PeerInfo, Session, Side, UpstreamGroup,
    UpstreamId,
};

#[derive(Arbitrary, Debug)]
pub enum Step {
    Client(Vec<u8>),
    Upstream(Vec<u8>),
    ClientEof,
    UpstreamEof,
    Connected {
        reused: bool,
    },
    ConnectFailed,
    AckClient,
    AckUpstream,
    /// Milliseconds to move the clock.
    Advance(u16),
    Reset {
        client: bool,
    },
    Drain,
}

pub fn config(websocket: bool) -> Config {
    let mut c = Config::new(UpstreamGroup::new(vec![
        Peer::new("127.0.0.1", 9000),
        Peer::new("127.0.0.1", 9001),
    ]));
    // Small limits, so that the fuzzer reaches them.
    c.limits.max_head = 2048;
    c.limits.max_uri = 512;
    c.limits.max_body = 4096;
    c.limits.max_held = 4096;
    c.limits.queue = 4096;
    if websocket {
        let mut w = proxy_core::WebSocket::default();
        w.ping_interval = Some(Duration::from_millis(300));
        w.ping_timeout = Duration::from_millis(200);
        w.max_message = 1024;
        w.max_frame = 512;
        c.websocket = Some(w);
    }
    c
}

/// Drives one session through `steps`, checking the invariants after every one.
pub struct Harness {
    pub session: Session,
    now: Instant,
    unacked: [usize; 2],
    connect: Option<UpstreamId>,
    connected: bool,
    closed: [bool; 2],
    /// The first bytes written upstream since the last connect: must be a complete head.
    head_pending: bool,
    upstream_head: Vec<u8>,
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        _ => 1,
    }
}

impl Harness {
    pub fn new(config: Config) -> Self {
        let now = Instant::now();
        let config = Arc::new(config);
        let balancer = Arc::new(Balancer::new(&config, now));
        let client = PeerInfo::new("192.0.2.7:40000".parse().expect("an address"));
        Harness {
            session: Session::new(config, balancer, client, now),
            now,
            unacked: [0; 2],
            connect: None,
            connected: false,
            closed: [false; 2],
            head_pending: false,
            upstream_head: Vec::new(),
        }
    }

    pub fn step(&mut self, step: Step) {
        let now = self.now;
        let s = &mut self.session;
        match step {
            Step::Client(b) => s.handle_input(
                now,
                Input::Data {
                    from: Side::Client,
                    bytes: Bytes::from(b),
                },
            ),
            Step::Upstream(b) if self.connected => s.handle_input(
                now,
                Input::Data {
                    from: Side::Upstream,
                    bytes: Bytes::from(b),
                },
            ),
            Step::Upstream(_) => {}
            Step::ClientEof => s.handle_input(now, Input::Eof { from: Side::Client }),
            Step::UpstreamEof if self.connected => s.handle_input(
                now,
                Input::Eof {
                    from: Side::Upstream,
                },
            ),
            Step::UpstreamEof => {}
            Step::Connected { reused } => {
                if let Some(id) = self.connect.take() {
                    self.connected = true;
                    s.handle_input(now, Input::UpstreamConnected { id, reused });
                }
            }
            Step::ConnectFailed => {
                if let Some(id) = self.connect.take() {
                    s.handle_input(
                        now,
                        Input::UpstreamFailed {
                            id,
                            why: ConnectError::Refused,
                        },
                    );
                }
            }
            Step::AckClient => {
                let len = std::mem::take(&mut self.unacked[0]);
                s.handle_input(
                    now,
                    Input::Sent {
                        to: Side::Client,
                        len,
                    },
                );
            }
            Step::AckUpstream => {
                let len = std::mem::take(&mut self.unacked[1]);
                s.handle_input(
                    now,
                    Input::Sent {
                        to: Side::Upstream,
                        len,
                    },
                );
            }
            Step::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                s.handle_timeout(self.now);
            }
            Step::Reset { client } => {
                let from = if client { Side::Client } else { Side::Upstream };
                if client || self.connected {
                    s.handle_input(now, Input::Reset { from });
                }
            }
            Step::Drain => s.start_drain(now, now + Duration::from_secs(1)),
        }
        self.drain();
    }

    pub fn drain(&mut self) {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Send { to, bytes } => {
                    assert!(!self.closed[index(to)], "a Send after the Close of {to:?}");
                    assert!(!bytes.is_empty(), "an empty Send");
                    self.unacked[index(to)] += bytes.len();
                    if to == Side::Upstream && self.head_pending {
                        self.upstream_head.extend_from_slice(&bytes);
                        self.check_upstream_head();
                    }
                }
                Output::Connect { id, .. } => {
                    self.connect = Some(id);
                    self.connected = false;
                    self.head_pending = true;
                    self.upstream_head.clear();
                    self.unacked[1] = 0;
                }
                Output::Close { side, .. } => {
                    self.closed[index(side)] = true;
                    if side == Side::Upstream {
                        self.connected = false;
                        self.connect = None;
                        self.unacked[1] = 0;
                        self.closed[1] = false;
                    }
                }
                Output::ReleaseUpstream { .. } => {
                    self.connected = false;
                    self.unacked[1] = 0;
                }
                _ => {}
            }
        }
        if self.session.is_closed() {
            assert!(
                self.session.poll_timeout().is_none(),
                "a closed session keeps a timer"
            );
        }
    }

    /// The first bytes a connection upstream carries are a complete, canonical request head:
    /// nothing the client sent is passed on before its head was validated and rewritten.
    fn check_upstream_head(&mut self) {
        let Some(end) = self.upstream_head.windows(4).position(|w| w == b"\r\n\r\n") else {
            return;
        };
        let head = &self.upstream_head[..end + 4];
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(n)) => assert_eq!(n, head.len()),
            other => panic!("the head sent upstream does not parse: {other:?}"),
        }
        for (i, b) in head.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && head[i - 1] == b'\r', "a bare LF went upstream");
            }
        }
        self.head_pending = false;
    }
}
