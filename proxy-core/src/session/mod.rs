//! The [`Session`]: one client connection, from accept to close, and the upstream connection it
//! currently uses.
//!
//! # How a session lives
//!
//! ```text
//!            request head                 upstream answers
//!  Idle ───────────────────▶ Exchange ─────────────────────▶ Idle (keep-alive)
//!   ▲ │                        │  │ 101 (genuine)             │
//!   │ │ timeout/EOF            │  └──────────▶ Tunnel ──▶ Done (both directions finished,
//!   │ ▼                        │ error/close                 or a tunnel timeout)
//!   │ Done ◀── Lingering ◀── Closing  (flush the last response, FIN, drain unread bytes)
//! ```
//!
//! * **Idle** — waiting for a request head (the first one since accept, or the next one on a
//!   kept-alive connection).
//! * **Exchange** — a request is being proxied: connect, forward the head and body, relay the
//!   response. Client bytes that are not the current request's body (a pipelined request, or
//!   frames sent after an upgrade request — the *might-switch* window) wait in a bounded queue.
//! * **Tunnel** — after a genuine `101`: two opaque byte streams with their own half-close.
//! * **Closing / Lingering** — the last response is flushed, the client's write half is shut,
//!   and any unread client bytes are drained briefly so the kernel does not reset the
//!   connection under the response.
//! * **Done** — both sockets closed; the adapter drops the session.
//!
//! Errors are sticky: once a session decides to close, no input revives it.

mod exchange;
mod tunnel;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::balance::Balancer;
use crate::body::{chunk_size_line, Piece, CHUNK_END, LAST_CHUNK};
use crate::config::{Config, Peer, Timeouts};
use crate::event::{CloseReason, Event, ExchangeLog};
use crate::head::HeadReader;
use crate::io::{Input, Output, PeerInfo, Side, UpstreamId};
use crate::proxy_protocol::{self, ProxyError, ProxyHeader};
use crate::route::{Route, RouteRef};
use crate::timer::{Timer, TimerTable};
use crate::upgrade::UpgradeRequest;

use self::exchange::Exchange;
use self::tunnel::Tunnel;

/// Output slots a tunnel keeps: a relayed chunk produces one `Send` at a time.
const TUNNEL_OUTPUTS: usize = 4;

/// The proxy state machine for one client connection.
///
/// Methods come in four groups, in the style of `quinn-proto`:
/// * **handle** — [`handle_input`](Self::handle_input) and [`handle_timeout`](Self::handle_timeout)
///   feed in what happened;
/// * **poll** — [`poll_output`](Self::poll_output) drains what to do, [`poll_timeout`](Self::poll_timeout)
///   says when to call `handle_timeout` next;
/// * **query** — [`wants_read`](Self::wants_read) (backpressure) and [`is_closed`](Self::is_closed);
/// * **mutate** — [`start_drain`](Self::start_drain) for graceful shutdown.
///
/// **After every `handle_*` or mutating call, drain `poll_output` until it returns `None`, then
/// re-read `poll_timeout` and `wants_read`.**
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    client: PeerInfo,
    /// The latest time seen; time never goes backwards inside a session.
    now: Instant,
    timers: TimerTable,
    outputs: VecDeque<Output>,
    state: State,
    /// Client bytes received and not yet consumed by the current state.
    client_rx: VecDeque<Bytes>,
    client_rx_len: usize,
    client_eof: bool,
    /// Bytes handed out in `Send`s and not yet reported `Sent`, per side.
    in_flight: [usize; 2],
    /// All bytes ever sent to each side.
    sent_total: [u64; 2],
    /// What only HTTP needs (head readers, body decoding scratch, the PROXY header): boxed,
    /// and dropped when the connection becomes a tunnel, which may idle for hours.
    http: Option<Box<HttpParts>>,
    upstream: Option<Upstream>,
    next_upstream: u64,
    /// The route of the current (or last) request: its settings and upstream group.
    route: RouteRef,
    /// Requests started on this connection.
    requests: u32,
    exchange: Option<Exchange>,
    draining: bool,
}

#[derive(Debug)]
enum State {
    Idle,
    Exchange,
    Tunnel(Tunnel),
    Closing,
    Lingering,
    Done,
}

/// The parts of a session only HTTP uses.
#[derive(Debug, Default)]
struct HttpParts {
    request_head: HeadReader,
    response_head: HeadReader,
    /// `Some` while the PROXY protocol header is awaited: the bytes of it seen so far.
    proxy_header: Option<Vec<u8>>,
    /// Small allocations (chunk-size lines) are carved out of this buffer.
    scratch: BytesMut,
    /// Reused between calls so that decoding a body allocates nothing.
    pieces: Vec<Piece>,
    /// The current request's upgrade offer, until its answer is judged.
    upgrade: Option<UpgradeRequest>,
    /// The current request's failover bookkeeping.
    failover: Failover,
}

/// What trying the servers of a group for one request remembers.
#[derive(Debug, Default)]
struct Failover {
    /// Servers whose connect failed for this request, in order.
    tried: Vec<u16>,
    /// The request's consistent-hash key, for picking again.
    key: Option<u64>,
    /// When the first connect attempt started (the failover time budget runs from here).
    first_connect: Option<Instant>,
}

/// The upstream connection currently owned by the session.
#[derive(Debug)]
struct Upstream {
    id: UpstreamId,
    /// Its group (see `Config::group`).
    group: usize,
    /// Its index in the group: the balancer counts a connection on it until it is dropped.
    server: u16,
    connected: bool,
    reused: bool,
    eof: bool,
}

impl Session {
    /// A session for a client connection accepted at `now`.
    ///
    /// `config` should have passed [`Config::validate`]; `balancer` is shared by every session
    /// using the same configuration.
    pub fn new(
        config: Arc<Config>,
        balancer: Arc<Balancer>,
        client: PeerInfo,
        now: Instant,
    ) -> Self {
        let mut timers = TimerTable::new(now);
        timers.arm(Timer::RequestHead, now, config.timeouts.request_head);
        let proxied = config
            .proxy_protocol
            .as_ref()
            .filter(|p| p.applies_to(client.local));
        let trusted = proxied.map(|p| {
            let ip = client.addr.ip();
            p.trusted.iter().any(|n| n.contains(ip))
        });
        let awaits_header = proxied.is_some();
        let mut session = Session {
            config,
            balancer,
            client,
            now,
            timers,
            outputs: VecDeque::new(),
            state: State::Idle,
            client_rx: VecDeque::new(),
            client_rx_len: 0,
            client_eof: false,
            in_flight: [0; 2],
            sent_total: [0; 2],
            http: Some(Box::new(HttpParts {
                proxy_header: awaits_header.then(Vec::new),
                ..HttpParts::default()
            })),
            upstream: None,
            next_upstream: 0,
            route: RouteRef { at: None, group: 0 },
            requests: 0,
            exchange: None,
            draining: false,
        };
        if trusted == Some(false) {
            session.close_without_answer(CloseReason::ProxyProtocol(None));
        }
        session
    }

    // ---- handle ----

    /// Feeds one input. Errors caused by the peers become outputs (an error response, closes and
    /// an event); this never fails and never panics.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.advance(now);
        if matches!(self.state, State::Done) {
            return;
        }
        match input {
            Input::Data {
                from: Side::Client,
                bytes,
            } => self.on_client_data(bytes),
            Input::Data {
                from: Side::Upstream,
                bytes,
            } => self.on_upstream_data(bytes),
            Input::Eof { from: Side::Client } => self.on_client_eof(),
            Input::Eof {
                from: Side::Upstream,
            } => self.on_upstream_eof(false),
            Input::Sent { to, len } => self.on_sent(to, len),
            Input::UpstreamConnected { id, reused } => self.on_connected(id, reused),
            Input::UpstreamFailed { id, why } => self.on_connect_failed(id, why),
            Input::Reset { from: Side::Client } => self.abort(CloseReason::ClientReset),
            Input::Reset {
                from: Side::Upstream,
            } => self.on_upstream_eof(true),
        }
        self.drive();
    }

    /// Handles every timer due at `now`. Calling it early, or twice, does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        while !matches!(self.state, State::Done) {
            let Some(timer) = self.timers.take_expired(self.now) else {
                break;
            };
            self.on_timer(timer);
        }
        self.drive();
    }

    // ---- mutate ----

    /// Begins a graceful drain: idle connections close now, an exchange in progress finishes
    /// and then closes (its response carries `Connection: close` if not yet sent), and a tunnel
    /// is closed at `tunnel_deadline` unless it ends by itself first.
    pub fn start_drain(&mut self, now: Instant, tunnel_deadline: Instant) {
        self.advance(now);
        self.draining = true;
        match self.state {
            State::Idle if self.request_head_empty() && self.client_rx_len == 0 => {
                // Between requests with nothing unread or unsent: close now, as the keep-alive
                // timeout does, rather than linger and delay the shutdown.
                if self.in_flight[Side::Client.index()] == 0 {
                    self.close_all();
                } else {
                    self.begin_closing();
                }
            }
            State::Tunnel(_) => self
                .timers
                .arm_at(Timer::Drain, tunnel_deadline.max(self.now)),
            _ => {}
        }
        self.drive();
    }

    // ---- poll ----

    /// The next thing the adapter must do, in order. Drain until `None` after every call.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.outputs.pop_front();
        if out.is_none()
            && self.outputs.capacity() > TUNNEL_OUTPUTS
            && matches!(self.state, State::Tunnel(_))
        {
            // The handshake's burst of outputs grew the queue; a tunnel queues one or two at a
            // time and may idle for hours, so it gives the rest back (once).
            self.outputs.shrink_to(TUNNEL_OUTPUTS);
        }
        out
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.state, State::Done) {
            return None;
        }
        self.timers.next()
    }

    // ---- query ----

    /// Whether the adapter should read from `side` now. False means the bytes would only pile
    /// up (the other side is not draining, or the session is waiting for something else);
    /// reading resumes when a later call says true.
    pub fn wants_read(&self, side: Side) -> bool {
        let queue = self.config.limits.queue;
        let other_flowing = self.in_flight[side.other().index()] < queue;
        match (&self.state, side) {
            (State::Idle, Side::Client) => !self.client_eof,
            (State::Exchange, Side::Client) => {
                let Some(ex) = &self.exchange else {
                    return false;
                };
                if self.client_eof {
                    return false;
                }
                if ex.request_body_pending() {
                    self.client_rx_len < queue && other_flowing
                } else {
                    self.client_rx_len < self.config.limits.max_held
                }
            }
            (State::Exchange, Side::Upstream) => {
                self.upstream
                    .as_ref()
                    .is_some_and(|u| u.connected && !u.eof)
                    && self.exchange.as_ref().is_some_and(|ex| !ex.response_done())
                    && other_flowing
            }
            (State::Tunnel(t), _) => t.wants_read(side) && other_flowing,
            (State::Lingering, Side::Client) => true,
            _ => false,
        }
    }

    /// True once the session has closed both connections; the adapter can drop it.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The client this session serves.
    pub fn client(&self) -> &PeerInfo {
        &self.client
    }

    /// The configuration this session runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    // ---- internals shared by the HTTP and tunnel halves ----

    /// The peer of an upstream connection (the configuration holds it; the connection does not
    /// keep a copy).
    fn peer_of(&self, up: &Upstream) -> Peer {
        self.config
            .group(up.group)
            .and_then(|g| g.servers.get(usize::from(up.server)))
            .map(|s| s.peer.clone())
            .unwrap_or_else(|| Peer::new("unknown", 0))
    }

    /// The HTTP parts (recreated if a tunnel had dropped them; no HTTP path runs after one).
    fn http(&mut self) -> &mut HttpParts {
        self.http.get_or_insert_with(Box::default)
    }

    /// Whether no byte of a request head is buffered.
    fn request_head_empty(&self) -> bool {
        self.http.as_ref().is_none_or(|h| h.request_head.is_empty())
    }

    /// Whether a PROXY protocol header is still awaited.
    fn awaits_proxy_header(&self) -> bool {
        self.http.as_ref().is_some_and(|h| h.proxy_header.is_some())
    }

    /// The route of the current request, if it came from a virtual host.
    fn route(&self) -> Option<&Route> {
        let (v, r) = self.route.at?;
        self.config.virtual_hosts.get(v)?.routes.get(r)
    }

    /// The timeouts of the current exchange or tunnel: its route's, else the global ones.
    /// Connection-level timeouts (request head, keep-alive, linger) are always global.
    fn timeouts(&self) -> &Timeouts {
        self.route()
            .and_then(|r| r.settings.timeouts.as_ref())
            .unwrap_or(&self.config.timeouts)
    }

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Makes as much progress as the current state allows with the bytes already received.
    fn drive(&mut self) {
        loop {
            let progressed = match self.state {
                State::Idle => self.step_idle(),
                State::Exchange => self.step_request_body(),
                _ => false,
            };
            if !progressed {
                break;
            }
        }
    }

    fn send(&mut self, to: Side, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let i = to.index();
        if self.in_flight[i] == 0 {
            self.timers
                .arm(send_timer(to), self.now, self.timeouts().send);
        }
        self.in_flight[i] += bytes.len();
        self.sent_total[i] += bytes.len() as u64;
        self.outputs.push_back(Output::Send { to, bytes });
    }

    /// Writes a decoded body piece to `to`, re-chunking canonically when `chunked`.
    fn forward_piece(&mut self, to: Side, piece: Piece, chunked: bool) {
        match piece {
            Piece::Data(b) => self.send(to, b),
            Piece::ChunkStart(size) if chunked => {
                let line = chunk_size_line(size, &mut self.http().scratch);
                self.send(to, line);
            }
            Piece::ChunkEnd if chunked => self.send(to, Bytes::from_static(CHUNK_END)),
            Piece::End if chunked => self.send(to, Bytes::from_static(LAST_CHUNK)),
            Piece::ChunkStart(_) | Piece::ChunkEnd | Piece::End => {}
        }
    }

    fn on_sent(&mut self, to: Side, len: usize) {
        let i = to.index();
        self.in_flight[i] = self.in_flight[i].saturating_sub(len);
        if self.in_flight[i] == 0 {
            self.timers.stop(send_timer(to));
        } else if len > 0 {
            self.timers
                .arm(send_timer(to), self.now, self.timeouts().send);
        }
        match self.state {
            State::Closing if to == Side::Client => self.progress_closing(),
            State::Tunnel(_) => self.tunnel_progress(),
            State::Exchange if to == Side::Upstream => self.on_upstream_drained(),
            _ => {}
        }
    }

    fn on_client_data(&mut self, bytes: Bytes) {
        match self.state {
            State::Tunnel(_) => self.tunnel_data(Side::Client, bytes),
            State::Idle | State::Exchange => {
                self.client_rx_len += bytes.len();
                self.client_rx.push_back(bytes);
                let l = &self.config.limits;
                if self.client_rx_len > 2 * (l.max_held + l.queue + l.max_head) {
                    self.abort(CloseReason::Overflow);
                }
            }
            // Unread bytes after a final response are drained and dropped.
            State::Closing | State::Lingering | State::Done => {}
        }
    }

    fn on_client_eof(&mut self) {
        self.client_eof = true;
        match self.state {
            State::Tunnel(_) => self.tunnel_eof(Side::Client),
            State::Lingering => self.close_all(),
            State::Closing => self.progress_closing(),
            // Idle and Exchange notice the EOF once the queued bytes are consumed.
            _ => {}
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::RequestHead | Timer::KeepAlive => self.on_idle_timeout(timer),
            Timer::ClientBody => self.fail(408, CloseReason::Timeout(timer)),
            Timer::Connect => self.on_connect_timeout(),
            Timer::UpstreamRead => {
                if self
                    .exchange
                    .as_ref()
                    .is_some_and(|ex| !ex.response_head_done())
                {
                    self.fail(504, CloseReason::Timeout(timer));
                } else {
                    self.abort(CloseReason::Timeout(timer));
                }
            }
            Timer::SendClient | Timer::SendUpstream => self.abort(CloseReason::Timeout(timer)),
            Timer::TunnelIdle | Timer::TunnelLifetime | Timer::Fin => {
                self.abort(CloseReason::Timeout(timer))
            }
            Timer::Drain => self.abort(CloseReason::Drain),
            Timer::Linger => self.close_all(),
        }
    }

    /// Closes after the last response is flushed: FIN to the client, then drain its unread
    /// bytes until it closes or the linger timer fires.
    fn begin_closing(&mut self) {
        self.release_upstream(false);
        self.stop_http_timers();
        self.client_rx.clear();
        self.client_rx_len = 0;
        self.http().request_head.clear();
        self.state = State::Closing;
        self.progress_closing();
    }

    fn progress_closing(&mut self) {
        if !matches!(self.state, State::Closing) || self.in_flight[Side::Client.index()] > 0 {
            return;
        }
        if self.client_eof {
            self.close_all();
        } else {
            self.outputs
                .push_back(Output::ShutdownWrite { side: Side::Client });
            self.state = State::Lingering;
            self.timers
                .arm(Timer::Linger, self.now, self.config.timeouts.linger);
            if self.timers.get(Timer::Linger).is_none() {
                self.close_all();
            }
        }
    }

    /// Closes a connection that is not an HTTP client to answer (a PROXY protocol failure),
    /// logging it with `reason`.
    fn close_without_answer(&mut self, reason: CloseReason) {
        let sent = self.sent_total[Side::Client.index()];
        self.exchange = Some(exchange::refused_exchange(
            self.client_rx_len as u64,
            self.now,
            sent,
            &self.client,
        ));
        self.log_exchange(Some(reason));
        self.close_all();
    }

    /// Feeds the awaited PROXY protocol header; true once the session can go on with HTTP
    /// (the header is complete and applied), false while waiting or after closing.
    fn take_proxy_header(&mut self) -> bool {
        let Some(buf) = self.http.as_mut().and_then(|h| h.proxy_header.as_mut()) else {
            return true;
        };
        while let Some(chunk) = self.client_rx.pop_front() {
            self.client_rx_len -= chunk.len();
            let before = buf.len();
            buf.extend_from_slice(&chunk[..chunk.len().min(proxy_protocol::V2_MAX)]);
            match proxy_protocol::parse(buf) {
                Ok(None) => {
                    if chunk.len() > proxy_protocol::V2_MAX {
                        return self.proxy_failed(ProxyError::TooLong);
                    }
                }
                Ok(Some((header, len))) => {
                    // The client's own bytes start after the header, in this chunk.
                    let rest = chunk.slice((len - before).min(chunk.len())..);
                    if !rest.is_empty() {
                        self.client_rx_len += rest.len();
                        self.client_rx.push_front(rest);
                    }
                    if let ProxyHeader::Proxied { source, .. } = header {
                        self.client.addr = source;
                    }
                    self.http().proxy_header = None;
                    return true;
                }
                Err(e) => return self.proxy_failed(e),
            }
        }
        if self.client_eof {
            return self.proxy_failed(ProxyError::Missing);
        }
        false
    }

    fn proxy_failed(&mut self, e: ProxyError) -> bool {
        self.http().proxy_header = None;
        self.close_without_answer(CloseReason::ProxyProtocol(Some(e)));
        false
    }

    fn abort(&mut self, reason: CloseReason) {
        if matches!(self.state, State::Done) {
            return;
        }
        self.log_exchange(Some(reason));
        self.close_all();
    }

    /// Gives up the current upstream connection's slot in the balancer; the caller closes or
    /// releases the connection itself.
    fn take_upstream(&mut self) -> Option<Upstream> {
        let up = self.upstream.take()?;
        self.balancer.release(up.group, up.server);
        if let State::Tunnel(_) = self.state {
            let duration = self
                .exchange
                .as_ref()
                .and_then(|ex| ex.tunnel_started)
                .map(|t| self.now.saturating_duration_since(t))
                .unwrap_or_default();
            self.outputs.push_back(Output::Event(Event::TunnelClosed {
                peer: self.peer_of(&up),
                duration,
            }));
        }
        Some(up)
    }

    fn close_all(&mut self) {
        if self.take_upstream().is_some() {
            self.outputs.push_back(Output::Close {
                side: Side::Upstream,
            });
        }
        self.outputs.push_back(Output::Close { side: Side::Client });
        self.timers.stop_all();
        self.client_rx.clear();
        self.client_rx_len = 0;
        self.exchange = None;
        self.state = State::Done;
    }

    /// Gives the upstream connection back: to the pool if `reusable`, else to be closed.
    fn release_upstream(&mut self, reusable: bool) {
        if let Some(up) = self.take_upstream() {
            let reusable =
                reusable && up.connected && !up.eof && self.in_flight[Side::Upstream.index()] == 0;
            if up.connected {
                self.outputs.push_back(Output::ReleaseUpstream {
                    id: up.id,
                    reusable,
                });
            } else {
                self.outputs.push_back(Output::Close {
                    side: Side::Upstream,
                });
            }
        }
        self.in_flight[Side::Upstream.index()] = 0;
        self.timers.stop(Timer::SendUpstream);
        self.timers.stop(Timer::Connect);
        self.timers.stop(Timer::UpstreamRead);
    }

    fn stop_http_timers(&mut self) {
        for t in [
            Timer::RequestHead,
            Timer::KeepAlive,
            Timer::ClientBody,
            Timer::Connect,
            Timer::UpstreamRead,
        ] {
            self.timers.stop(t);
        }
    }

    /// Emits the current exchange's event, once.
    fn log_exchange(&mut self, close: Option<CloseReason>) {
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        if ex.logged {
            return;
        }
        ex.logged = true;
        let log = ex.finish_log(
            self.now,
            self.sent_total[Side::Client.index()],
            close,
            &self.state,
        );
        self.outputs
            .push_back(Output::Event(Event::Exchange(Box::new(log))));
    }
}

impl Drop for Session {
    /// A session dropped before it closed (an adapter forcing a shutdown) still gives its
    /// upstream slot back, so least-connections and `max_conns` never count a ghost.
    fn drop(&mut self) {
        if let Some(up) = self.upstream.take() {
            self.balancer.release(up.group, up.server);
        }
    }
}

fn send_timer(side: Side) -> Timer {
    match side {
        Side::Client => Timer::SendClient,
        Side::Upstream => Timer::SendUpstream,
    }
}

/// Keeps `ExchangeLog` construction in one place for both halves.
pub(crate) fn new_log(client: &PeerInfo) -> ExchangeLog {
    empty_log(client.addr)
}

/// A log with nothing in it; allocation-free, so it can stand in for a moved-out one.
pub(crate) fn empty_log(client: std::net::SocketAddr) -> ExchangeLog {
    ExchangeLog {
        client,
        request_line: String::new(),
        host: None,
        referer: None,
        user_agent: None,
        status: None,
        bytes_from_client: 0,
        bytes_to_client: 0,
        body_bytes_to_client: 0,
        upstream: None,
        request_time: Duration::ZERO,
        upstream_connect_time: None,
        upstream_header_time: None,
        upstream_response_time: None,
        upstream_failures: Vec::new(),
        upgraded: false,
        tunnel_duration: None,
        close: None,
    }
}
