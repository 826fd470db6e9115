//! A simulation harness for `Session`: a scripted client, a scripted upstream, and a virtual
//! clock. Each call feeds one input and drains every output, recording what each peer received.
//! Shared by the scenario tests and the property tests (`mod sim;` in each test crate).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_core::{
    Balancer, Config, ConnectError, Event, ExchangeLog, Input, Output, Peer, PeerInfo, Session,
    Side, UpstreamGroup, UpstreamId,
};

/// The key used by [`Sim::ws_request`], and the accept value a genuine upstream answers with.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub fn ws_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    )
}

pub fn ws_101() -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    )
}

pub fn config() -> Config {
    Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)]))
}

/// What the adapter would have done, other than writing bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect { id: UpstreamId, allow_pooled: bool },
    ShutdownWrite(Side),
    Close(Side),
    Release { id: UpstreamId, reusable: bool },
}

pub struct Sim {
    pub session: Session,
    /// The balancer the session shares (as every session of a server would).
    pub balancer: Arc<Balancer>,
    pub start: Instant,
    pub now: Instant,
    /// Bytes written to the client / upstream and not yet taken by the test.
    pub client_rx: Vec<u8>,
    pub upstream_rx: Vec<u8>,
    /// Everything ever written, per side.
    pub client_total: Vec<u8>,
    pub upstream_total: Vec<u8>,
    /// Non-data actions, in order.
    pub actions: Vec<Action>,
    pub events: Vec<ExchangeLog>,
    /// Every other event (upstream chosen or failed, tunnel opened or closed), in order.
    pub notes: Vec<Event>,
    /// When true, every `Send` is acknowledged with `Sent` at once (a fast peer).
    pub auto_ack: bool,
    /// Bytes sent but not acknowledged, per side, when `auto_ack` is off.
    pub unacked: [usize; 2],
    /// The most recent `Connect` id.
    pub last_connect: Option<UpstreamId>,
    /// Count of Send outputs, per side.
    pub sends: [usize; 2],
}

impl Sim {
    pub fn new(config: Config) -> Self {
        config.validate().expect("test config is valid");
        let config = Arc::new(config);
        let start = Instant::now();
        let balancer = Arc::new(Balancer::new(&config, start));
        let session = Session::new(
            config,
            Arc::clone(&balancer),
            PeerInfo::new("192.0.2.1:40000".parse().expect("addr")),
            start,
        );
        Sim {
            session,
            balancer,
            start,
            now: start,
            client_rx: Vec::new(),
            upstream_rx: Vec::new(),
            client_total: Vec::new(),
            upstream_total: Vec::new(),
            actions: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
            auto_ack: true,
            unacked: [0; 2],
            last_connect: None,
            sends: [0; 2],
        }
    }

    pub fn default_config() -> Self {
        Sim::new(config())
    }

    pub fn input(&mut self, input: Input) {
        self.session.handle_input(self.now, input);
        self.drain();
    }

    pub fn drain(&mut self) {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Send { to, bytes } => {
                    self.sends[idx(to)] += 1;
                    match to {
                        Side::Client => {
                            self.client_rx.extend_from_slice(&bytes);
                            self.client_total.extend_from_slice(&bytes);
                        }
                        Side::Upstream => {
                            self.upstream_rx.extend_from_slice(&bytes);
                            self.upstream_total.extend_from_slice(&bytes);
                        }
                    }
                    if self.auto_ack {
                        self.session.handle_input(
                            self.now,
                            Input::Sent {
                                to,
                                len: bytes.len(),
                            },
                        );
                    } else {
                        self.unacked[idx(to)] += bytes.len();
                    }
                }
                Output::Connect {
                    id, allow_pooled, ..
                } => {
                    self.last_connect = Some(id);
                    self.actions.push(Action::Connect { id, allow_pooled });
                }
                Output::ShutdownWrite { side } => self.actions.push(Action::ShutdownWrite(side)),
                Output::Close { side, .. } => self.actions.push(Action::Close(side)),
                Output::ReleaseUpstream { id, reusable } => {
                    self.actions.push(Action::Release { id, reusable })
                }
                Output::Event(Event::Exchange(log)) => self.events.push(*log),
                Output::Event(e) => self.notes.push(e),
                other => panic!("unknown output {other:?}"),
            }
        }
    }

    pub fn client(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = Bytes::copy_from_slice(bytes.as_ref());
        self.input(Input::Data {
            from: Side::Client,
            bytes,
        });
    }

    pub fn upstream(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = Bytes::copy_from_slice(bytes.as_ref());
        self.input(Input::Data {
            from: Side::Upstream,
            bytes,
        });
    }

    pub fn client_eof(&mut self) {
        self.input(Input::Eof { from: Side::Client });
    }

    pub fn upstream_eof(&mut self) {
        self.input(Input::Eof {
            from: Side::Upstream,
        });
    }

    /// Completes the pending connect.
    pub fn connected(&mut self) {
        self.connected_with(false);
    }

    pub fn connected_with(&mut self, reused: bool) {
        let id = self.last_connect.expect("a Connect was requested");
        self.input(Input::UpstreamConnected { id, reused });
    }

    /// Fails the pending connect with `why`.
    pub fn connect_failed(&mut self, why: ConnectError) {
        let id = self.last_connect.expect("a Connect was requested");
        self.input(Input::UpstreamFailed { id, why });
    }

    /// The servers the session chose, in order (from its `UpstreamChosen` events).
    pub fn chosen(&self) -> Vec<String> {
        self.notes
            .iter()
            .filter_map(|e| match e {
                Event::UpstreamChosen { peer } => Some(peer.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Acknowledges everything written to `side` so far.
    pub fn ack(&mut self, side: Side) {
        let len = std::mem::take(&mut self.unacked[idx(side)]);
        self.input(Input::Sent { to: side, len });
    }

    /// Moves the clock forward by `d` and fires whatever is due.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.session.handle_timeout(self.now);
        self.drain();
    }

    /// Jumps to the session's next deadline and fires it; returns false if none was armed.
    pub fn fire_next_timer(&mut self) -> bool {
        let Some(deadline) = self.session.poll_timeout() else {
            return false;
        };
        self.now = self.now.max(deadline);
        self.session.handle_timeout(self.now);
        self.drain();
        true
    }

    pub fn take_client(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.client_rx)).into_owned()
    }

    pub fn take_upstream(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.upstream_rx)).into_owned()
    }

    pub fn closed(&self, side: Side) -> bool {
        self.actions.contains(&Action::Close(side))
    }

    pub fn shut(&self, side: Side) -> bool {
        self.actions.contains(&Action::ShutdownWrite(side))
    }

    pub fn connects(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Connect { .. }))
            .count()
    }

    pub fn releases(&self) -> Vec<bool> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Release { reusable, .. } => Some(*reusable),
                _ => None,
            })
            .collect()
    }

    /// Sends the websocket upgrade request, connects, and answers with a genuine 101.
    pub fn open_tunnel(&mut self) {
        self.client(ws_request("/ws"));
        self.connected();
        let head = self.take_upstream();
        assert!(
            head.contains("Upgrade: websocket\r\nConnection: upgrade\r\n"),
            "{head}"
        );
        self.upstream(ws_101());
        let resp = self.take_client();
        assert!(
            resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{resp}"
        );
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}
