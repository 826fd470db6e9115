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
//! Each state owns its data: [`State::Exchange`] holds the request being proxied and its
//! upstream connection, [`State::Tunnel`] the two directions and the upstream; what every state
//! shares (clock, timers, queued outputs, unread client bytes) is the [`Conn`]. A state's methods
//! take the `Conn` and answer with what happens next, and the session makes the transition, so
//! no code path has to ask whether the data of its own state exists.
//!
//! Errors are sticky: once a session decides to close, no input revives it.

mod exchange;
mod idle;
mod tunnel;
mod websocket;

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
use crate::response::error_response;
use crate::route::{Route, RouteRef};
use crate::timer::{Timer, TimerTable};
use crate::upgrade::UpgradeRequest;

use self::exchange::{Exchange, Next};
use self::tunnel::Tunnel;
use self::websocket::Frames;

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
    cx: Conn,
    state: State,
}

/// Where the connection is, with the data only that state has.
#[derive(Debug)]
enum State {
    /// Waiting for a request head, with the HTTP parts kept between requests.
    Idle(Box<HttpParts>),
    Exchange(Exchange),
    Tunnel(Tunnel),
    Closing,
    Lingering,
    Done,
}

/// What every state shares: the connection's identity, clock, timers, queued outputs and
/// unread client bytes. Each state's methods borrow it to produce their effects.
#[derive(Debug)]
struct Conn {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    client: PeerInfo,
    /// The latest time seen; time never goes backwards inside a session.
    now: Instant,
    timers: TimerTable,
    outputs: VecDeque<Output>,
    /// Client bytes received and not yet consumed by the current state.
    rx: VecDeque<Bytes>,
    rx_len: usize,
    client_eof: bool,
    /// Bytes handed out in `Send`s and not yet reported `Sent`, per side.
    in_flight: [usize; 2],
    /// All bytes ever sent to each side.
    sent_total: [u64; 2],
    next_upstream: u64,
    /// The route of the current (or last) request: its settings and upstream group.
    route: RouteRef,
    /// Requests started on this connection.
    requests: u32,
    draining: bool,
}

/// The parts of a session only HTTP uses: boxed, moved from the idle state into each exchange
/// and back, and dropped when the connection becomes a tunnel, which may idle for hours.
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

/// An upstream connection owned by an exchange or a tunnel. The balancer counts it against its
/// server until it is given back with [`Conn::release`] or [`Conn::drop_upstream`].
#[derive(Debug)]
struct Upstream {
    id: UpstreamId,
    /// Its group (see `Config::group`).
    group: usize,
    /// Its index in the group.
    server: u16,
    connected: bool,
    reused: bool,
    eof: bool,
}

/// What the access log needs about one exchange, carried from its request into its tunnel and
/// consumed by [`Conn::log`], so each exchange is logged exactly once.
#[derive(Debug)]
struct Record {
    /// Boxed from the start, so that moving the record between states copies a pointer and
    /// the finished log is handed to its event as it is.
    log: Box<ExchangeLog>,
    started: Instant,
    /// `sent_total[Client]` when the exchange began.
    sent_at_start: u64,
    head_bytes_to_client: u64,
    connect_started: Option<Instant>,
}

impl Record {
    /// A record for an exchange starting now, `from_client` bytes into it.
    fn new(cx: &Conn, request_line: String, from_client: u64) -> Self {
        Record {
            log: Box::new(ExchangeLog {
                request_line,
                bytes_from_client: from_client,
                ..empty_log(cx.client.addr)
            }),
            started: cx.now,
            sent_at_start: cx.sent_total[Side::Client.index()],
            head_bytes_to_client: 0,
            connect_started: None,
        }
    }

    fn response_started(&self, cx: &Conn) -> bool {
        cx.sent_total[Side::Client.index()] > self.sent_at_start
    }

    /// The finished log line; `tunnel` is when the exchange became a tunnel, if it did.
    fn finish(
        self,
        cx: &Conn,
        close: Option<CloseReason>,
        tunnel: Option<Instant>,
    ) -> Box<ExchangeLog> {
        let mut log = self.log;
        let now = cx.now;
        log.bytes_to_client =
            cx.sent_total[Side::Client.index()].saturating_sub(self.sent_at_start);
        log.body_bytes_to_client = log
            .bytes_to_client
            .saturating_sub(self.head_bytes_to_client);
        log.request_time = now.saturating_duration_since(self.started);
        if let (Some(start), None) = (self.connect_started, log.upstream_response_time) {
            if log.upstream_header_time.is_some() || tunnel.is_some() {
                log.upstream_response_time = Some(now.saturating_duration_since(start));
            }
        }
        if let Some(t) = tunnel {
            log.upgraded = true;
            log.tunnel_duration = Some(now.saturating_duration_since(t));
        }
        log.close = close;
        log
    }
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
        let http = Box::new(HttpParts {
            proxy_header: proxied.is_some().then(Vec::new),
            ..HttpParts::default()
        });
        let mut session = Session {
            cx: Conn {
                config,
                balancer,
                client,
                now,
                timers,
                outputs: VecDeque::new(),
                rx: VecDeque::new(),
                rx_len: 0,
                client_eof: false,
                in_flight: [0; 2],
                sent_total: [0; 2],
                next_upstream: 0,
                route: RouteRef { at: None, group: 0 },
                requests: 0,
                draining: false,
            },
            state: State::Idle(http),
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
        self.cx.advance(now);
        if matches!(self.state, State::Done) {
            return;
        }
        match input {
            Input::Data { from, bytes } => self.on_data(from, bytes),
            Input::Eof { from: Side::Client } => self.on_client_eof(),
            Input::Eof {
                from: Side::Upstream,
            } => self.on_upstream_eof(false),
            Input::Sent { to, len } => self.on_sent(to, len),
            Input::UpstreamConnected { id, reused } => {
                if let State::Exchange(ex) = &mut self.state {
                    ex.on_connected(&mut self.cx, id, reused);
                }
            }
            Input::UpstreamFailed { id, why } => {
                if let State::Exchange(ex) = &mut self.state {
                    let next = ex.on_connect_failed(&mut self.cx, id, why);
                    self.settle(next);
                }
            }
            Input::Reset { from: Side::Client } => self.close(CloseReason::ClientReset),
            Input::Reset {
                from: Side::Upstream,
            } => self.on_upstream_eof(true),
        }
        self.drive();
    }

    /// Handles every timer due at `now`. Calling it early, or twice, does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.cx.advance(now);
        while !matches!(self.state, State::Done) {
            let Some(timer) = self.cx.timers.take_expired(self.cx.now) else {
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
        let cx = &mut self.cx;
        cx.advance(now);
        cx.draining = true;
        match &mut self.state {
            State::Idle(http) if http.request_head.is_empty() && cx.rx_len == 0 => {
                // Between requests with nothing unread or unsent: close now, as the keep-alive
                // timeout does, rather than linger and delay the shutdown.
                if cx.in_flight[Side::Client.index()] == 0 {
                    self.close(CloseReason::Drain);
                } else {
                    self.begin_closing();
                }
            }
            State::Tunnel(t) => t.start_drain(cx, tunnel_deadline),
            _ => {}
        }
        self.drive();
    }

    /// Closes both connections now (a hard stop). An exchange or tunnel under way is logged
    /// with [`CloseReason::Drain`]; a frame-aware tunnel should get
    /// [`start_drain`](Self::start_drain) first, and its output written, to say goodbye.
    pub fn close_now(&mut self, now: Instant) {
        self.cx.advance(now);
        self.close(CloseReason::Drain);
    }

    // ---- poll ----

    /// The next thing the adapter must do, in order. Drain until `None` after every call.
    pub fn poll_output(&mut self) -> Option<Output> {
        let outputs = &mut self.cx.outputs;
        let out = outputs.pop_front();
        if out.is_none()
            && outputs.capacity() > TUNNEL_OUTPUTS
            && matches!(self.state, State::Tunnel(_))
        {
            // The handshake's burst of outputs grew the queue; a tunnel queues one or two at a
            // time and may idle for hours, so it gives the rest back (once).
            outputs.shrink_to(TUNNEL_OUTPUTS);
        }
        out
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.state, State::Done) {
            return None;
        }
        self.cx.timers.next()
    }

    // ---- query ----

    /// Whether the adapter should read from `side` now. False means the bytes would only pile
    /// up (the other side is not draining, or the session is waiting for something else);
    /// reading resumes when a later call says true.
    pub fn wants_read(&self, side: Side) -> bool {
        let cx = &self.cx;
        let queue = cx.config.limits.queue;
        let other_flowing = cx.in_flight[side.other().index()] < queue;
        match (&self.state, side) {
            (State::Idle(_), Side::Client) => !cx.client_eof,
            (State::Exchange(ex), Side::Client) => {
                if cx.client_eof {
                    false
                } else if ex.request_body_pending() {
                    cx.rx_len < queue && other_flowing
                } else {
                    cx.rx_len < cx.config.limits.max_held
                }
            }
            (State::Exchange(ex), Side::Upstream) => ex.wants_upstream_read() && other_flowing,
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
        &self.cx.client
    }

    /// The configuration this session runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.cx.config
    }

    // ---- transitions ----

    /// Makes as much progress as the current state allows with the bytes already received.
    fn drive(&mut self) {
        loop {
            let progressed = match &mut self.state {
                State::Idle(http) => {
                    let step = idle::step(http, &mut self.cx);
                    self.on_idle_step(step)
                }
                State::Exchange(ex) => {
                    let (progressed, next) = ex.step_request_body(&mut self.cx);
                    self.settle(next);
                    progressed
                }
                _ => false,
            };
            if !progressed {
                break;
            }
        }
    }

    /// Takes the state out to move its data into the next one; the caller puts a state back.
    fn take_state(&mut self) -> State {
        std::mem::replace(&mut self.state, State::Done)
    }

    /// Carries out an exchange's verdict.
    fn settle(&mut self, next: Next) {
        if let Next::Stay = next {
            return;
        }
        // Verdicts come from the exchange in place, so this is the exchange being moved out.
        let ex = match self.take_state() {
            State::Exchange(ex) => ex,
            other => return self.state = other,
        };
        match next {
            Next::Stay => self.state = State::Exchange(ex),
            Next::Done => self.finish_exchange(ex),
            Next::Tunnel(up, rest) => self.open_tunnel(ex, up, rest),
            Next::Fail(status, reason) => {
                if ex.record.response_started(&self.cx) {
                    self.state = State::Exchange(ex);
                    self.close(reason);
                } else {
                    let (record, upstream, is_head) = ex.into_answer();
                    self.answer(record, upstream, is_head, status, reason);
                }
            }
            Next::Abort(reason) => {
                self.state = State::Exchange(ex);
                self.close(reason);
            }
        }
    }

    /// The response is complete: release the upstream, log, and keep the client or close it.
    /// With the request body unfinished (an early response) neither connection is kept.
    fn finish_exchange(&mut self, ex: Exchange) {
        let cx = &mut self.cx;
        let (keep, reusable) = ex.keep_alive(cx.draining);
        let (record, upstream, mut http) = ex.into_parts();
        cx.release(upstream, reusable);
        cx.log(record, (!keep).then_some(CloseReason::Completed), None);
        if keep {
            http.response_head.clear();
            http.upgrade = None;
            self.state = State::Idle(http);
            cx.timers.stop(Timer::ClientBody);
            if cx.rx_len > 0 {
                cx.timers
                    .arm(Timer::RequestHead, cx.now, cx.config.timeouts.request_head);
            } else {
                cx.timers
                    .arm(Timer::KeepAlive, cx.now, cx.config.timeouts.keep_alive);
            }
        } else {
            self.begin_closing();
        }
    }

    /// Enters the tunnel after a genuine `101` head has been queued for the client. `rest` holds
    /// whatever the upstream sent after the head; it goes to the client at once, and held client
    /// bytes go to the upstream at once.
    fn open_tunnel(&mut self, ex: Exchange, up: Upstream, rest: Bytes) {
        let cx = &mut self.cx;
        cx.stop_http_timers();
        let timeouts = cx.timeouts();
        let (idle, life) = (timeouts.tunnel_idle, timeouts.tunnel_lifetime);
        cx.timers.arm(Timer::TunnelIdle, cx.now, idle);
        if let Some(life) = life {
            cx.timers.arm(Timer::TunnelLifetime, cx.now, life);
        }
        cx.emit(Event::TunnelOpened {
            peer: cx.peer_of(&up),
        });
        // HTTP is over for this connection: its parsing state goes with the exchange.
        let (record, _, http) = ex.into_parts();
        let websocket = http.upgrade.as_ref().is_some_and(|u| u.is_websocket);
        let frames = cx
            .websocket()
            .filter(|_| websocket)
            .map(|settings| Frames::new(settings, cx));
        let mut tunnel = Tunnel::new(record, up, cx.now, frames);
        let mut end = tunnel.relay(cx, Side::Upstream, rest);
        // Held bytes go upstream, and the queue that held them is freed: the tunnel never
        // uses it again.
        for held in std::mem::take(&mut cx.rx) {
            end = end.or(tunnel.relay(cx, Side::Client, held));
        }
        cx.rx_len = 0;
        if cx.client_eof {
            end = end.or(tunnel.eof(cx, Side::Client));
        }
        self.state = State::Tunnel(tunnel);
        if let Some(reason) = end {
            self.close(reason);
        }
    }

    /// Answers the client with `status` (no response has started) and closes after it.
    fn answer(
        &mut self,
        mut record: Record,
        upstream: Option<Upstream>,
        is_head: bool,
        status: u16,
        reason: CloseReason,
    ) {
        let cx = &mut self.cx;
        cx.release(upstream, false);
        let (resp, body) = error_response(status, is_head);
        record.log.status = Some(status);
        record.head_bytes_to_client += (resp.len() - body) as u64;
        cx.send(Side::Client, resp);
        cx.log(record, Some(reason), None);
        self.begin_closing();
    }

    /// Answers a request refused before it became an exchange.
    fn refuse(&mut self, request_line: String, bytes: u64, status: u16, reason: CloseReason) {
        let record = Record::new(&self.cx, request_line, bytes);
        self.answer(record, None, false, status, reason);
    }

    /// Closes after the last response is flushed: FIN to the client, then drain its unread
    /// bytes until it closes or the linger timer fires. The caller has given back any upstream.
    fn begin_closing(&mut self) {
        let cx = &mut self.cx;
        cx.forget_upstream();
        cx.stop_http_timers();
        cx.rx.clear();
        cx.rx_len = 0;
        self.state = State::Closing;
        self.progress_closing();
    }

    fn progress_closing(&mut self) {
        let cx = &mut self.cx;
        if !matches!(self.state, State::Closing) || cx.in_flight[Side::Client.index()] > 0 {
            return;
        }
        if cx.client_eof {
            self.close(CloseReason::ClientClosed);
        } else {
            cx.outputs
                .push_back(Output::ShutdownWrite { side: Side::Client });
            self.state = State::Lingering;
            cx.timers
                .arm(Timer::Linger, cx.now, cx.config.timeouts.linger);
            if cx.timers.get(Timer::Linger).is_none() {
                self.close(CloseReason::ClientClosed);
            }
        }
    }

    /// Closes a connection that is not an HTTP client to answer (a PROXY protocol failure),
    /// logging it with `reason`.
    fn close_without_answer(&mut self, reason: CloseReason) {
        let record = Record::new(&self.cx, String::new(), self.cx.rx_len as u64);
        self.cx.log(record, Some(reason.clone()), None);
        self.close(reason);
    }

    /// Closes both connections now. An exchange or tunnel still open is logged with `reason`
    /// first; other states have nothing left to log.
    fn close(&mut self, reason: CloseReason) {
        let state = self.take_state();
        // A response still in progress is cut short; anything else ends where it should.
        let abort = matches!(state, State::Exchange(_));
        let cx = &mut self.cx;
        match state {
            State::Done => return,
            State::Exchange(ex) => {
                let (record, upstream, _) = ex.into_parts();
                cx.log(record, Some(reason), None);
                if let Some(up) = upstream {
                    cx.drop_upstream(up);
                }
            }
            State::Tunnel(t) => t.close(cx, reason),
            State::Idle(_) | State::Closing | State::Lingering => {}
        }
        cx.outputs.push_back(Output::Close {
            side: Side::Client,
            abort,
        });
        cx.timers.stop_all();
        cx.rx.clear();
        cx.rx_len = 0;
    }

    // ---- inputs common to several states ----

    fn on_data(&mut self, from: Side, bytes: Bytes) {
        let cx = &mut self.cx;
        match (&mut self.state, from) {
            (State::Tunnel(t), _) => {
                if let Some(reason) = t.relay(cx, from, bytes) {
                    self.close(reason);
                }
            }
            (State::Exchange(ex), Side::Upstream) => {
                let next = ex.on_upstream_data(cx, bytes);
                self.settle(next);
            }
            (State::Idle(_) | State::Exchange(_), Side::Client) => {
                cx.rx_len += bytes.len();
                cx.rx.push_back(bytes);
                let l = &cx.config.limits;
                if cx.rx_len > 2 * (l.max_held + l.queue + l.max_head) {
                    self.close(CloseReason::Overflow);
                }
            }
            // Unread bytes after a final response are drained and dropped.
            _ => {}
        }
    }

    fn on_client_eof(&mut self) {
        let cx = &mut self.cx;
        cx.client_eof = true;
        match &mut self.state {
            State::Tunnel(t) => {
                if let Some(reason) = t.eof(cx, Side::Client) {
                    self.close(reason);
                }
            }
            State::Lingering => self.close(CloseReason::ClientClosed),
            State::Closing => self.progress_closing(),
            // Idle and Exchange notice the EOF once the queued bytes are consumed.
            _ => {}
        }
    }

    /// The upstream closed (`reset`: failed).
    fn on_upstream_eof(&mut self, reset: bool) {
        match &mut self.state {
            State::Tunnel(_) if reset => self.close(CloseReason::UpstreamReset),
            State::Tunnel(t) => {
                if let Some(reason) = t.eof(&mut self.cx, Side::Upstream) {
                    self.close(reason);
                }
            }
            State::Exchange(ex) => {
                let next = ex.on_upstream_eof(&mut self.cx, reset);
                self.settle(next);
            }
            _ => {}
        }
    }

    fn on_sent(&mut self, to: Side, len: usize) {
        let cx = &mut self.cx;
        let i = to.index();
        cx.in_flight[i] = cx.in_flight[i].saturating_sub(len);
        if cx.in_flight[i] == 0 {
            cx.timers.stop(send_timer(to));
        } else if len > 0 {
            cx.timers.arm(send_timer(to), cx.now, cx.timeouts().send);
        }
        match &mut self.state {
            State::Closing if to == Side::Client => self.progress_closing(),
            State::Tunnel(t) => {
                if let Some(reason) = t.progress(cx) {
                    self.close(reason);
                }
            }
            State::Exchange(ex) if to == Side::Upstream => ex.on_upstream_drained(cx),
            _ => {}
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        let reason = CloseReason::Timeout(timer);
        match (&mut self.state, timer) {
            (State::Idle(_), Timer::RequestHead | Timer::KeepAlive) => self.on_idle_timeout(timer),
            (State::Exchange(_), Timer::ClientBody) => self.settle(Next::Fail(408, reason)),
            (State::Exchange(ex), Timer::Connect) => {
                let next = ex.on_connect_timeout(&mut self.cx);
                self.settle(next);
            }
            (State::Exchange(ex), Timer::UpstreamRead) if !ex.response_head_done() => {
                self.settle(Next::Fail(504, reason))
            }
            // Connection-level timers left over from a state that has ended mean nothing now.
            (_, Timer::RequestHead | Timer::KeepAlive | Timer::Connect) => {}
            (State::Lingering, Timer::Linger) => self.close(CloseReason::ClientClosed),
            (State::Tunnel(t), Timer::TunnelIdle) if !t.idle_expired(&mut self.cx) => {}
            (State::Tunnel(t), Timer::Keepalive) => {
                if let Some(reason) = t.on_keepalive(&mut self.cx) {
                    self.close(reason);
                }
            }
            (State::Tunnel(t), Timer::WebSocketClose) => {
                if let Some(reason) = t.on_close_timer(&mut self.cx) {
                    self.close(reason);
                }
            }
            (_, Timer::Keepalive | Timer::WebSocketClose) => {}
            (_, Timer::Drain) => self.close(CloseReason::Drain),
            // Every other timer that fires means a peer stalled: the send timers, the rest of
            // the response, the tunnel's idle, lifetime and half-close limits.
            _ => self.close(reason),
        }
    }
}

impl Drop for Session {
    /// A session dropped before it closed (an adapter forcing a shutdown) still gives its
    /// upstream slot back, so least-connections and `max_conns` never count a ghost.
    fn drop(&mut self) {
        let up = match &self.state {
            State::Exchange(ex) => ex.upstream(),
            State::Tunnel(t) => Some(t.upstream()),
            _ => None,
        };
        if let Some(up) = up {
            self.cx.balancer.release(up.group, up.server);
        }
    }
}

impl Conn {
    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Emits the access-log event of a finished exchange (`tunnel`: when it became a tunnel).
    fn log(&mut self, record: Record, close: Option<CloseReason>, tunnel: Option<Instant>) {
        let log = record.finish(self, close, tunnel);
        self.emit(Event::Exchange(log));
    }

    /// The peer of an upstream connection (the configuration holds it; the connection does not
    /// keep a copy).
    fn peer_of(&self, up: &Upstream) -> Peer {
        self.config
            .group(up.group)
            .and_then(|g| g.servers.get(usize::from(up.server)))
            .map(|s| s.peer.clone())
            .unwrap_or_else(|| Peer::new("unknown", 0))
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

    /// The frame-aware tunnel settings on the current route, if any.
    fn websocket(&self) -> Option<crate::config::WebSocket> {
        self.route()
            .and_then(|r| r.settings.websocket)
            .or(self.config.websocket)
    }

    /// The request body limit on the current route.
    fn route_max_body(&self) -> u64 {
        self.route()
            .and_then(|r| r.settings.max_body)
            .unwrap_or(self.config.limits.max_body)
    }

    fn pop_rx(&mut self) -> Option<Bytes> {
        let chunk = self.rx.pop_front()?;
        self.rx_len -= chunk.len();
        Some(chunk)
    }

    /// Puts back the unconsumed rest of a chunk taken with [`pop_rx`](Self::pop_rx).
    fn unpop_rx(&mut self, rest: Bytes) {
        if !rest.is_empty() {
            self.rx_len += rest.len();
            self.rx.push_front(rest);
        }
    }

    fn send(&mut self, to: Side, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let i = to.index();
        if self.in_flight[i] == 0 {
            let after = self.timeouts().send;
            self.timers.arm(send_timer(to), self.now, after);
        }
        self.in_flight[i] += bytes.len();
        self.sent_total[i] += bytes.len() as u64;
        self.outputs.push_back(Output::Send { to, bytes });
    }

    /// Writes a decoded body piece to `to`, re-chunking canonically when `chunked`.
    fn forward_piece(&mut self, to: Side, piece: Piece, chunked: bool, scratch: &mut BytesMut) {
        match piece {
            Piece::Data(b) => self.send(to, b),
            Piece::ChunkStart(size) if chunked => {
                let line = chunk_size_line(size, scratch);
                self.send(to, line);
            }
            Piece::ChunkEnd if chunked => self.send(to, Bytes::from_static(CHUNK_END)),
            Piece::End if chunked => self.send(to, Bytes::from_static(LAST_CHUNK)),
            Piece::ChunkStart(_) | Piece::ChunkEnd | Piece::End => {}
        }
    }

    /// Gives an upstream connection back: to the pool if `reusable` and clean, else to be
    /// closed. Either way the balancer stops counting it.
    fn release(&mut self, upstream: Option<Upstream>, reusable: bool) {
        if let Some(up) = upstream {
            self.balancer.release(up.group, up.server);
            let reusable =
                reusable && up.connected && !up.eof && self.in_flight[Side::Upstream.index()] == 0;
            self.outputs.push_back(if up.connected {
                Output::ReleaseUpstream {
                    id: up.id,
                    reusable,
                }
            } else {
                Output::Close {
                    side: Side::Upstream,
                    abort: false,
                }
            });
        }
        self.forget_upstream();
    }

    /// Closes an upstream connection without ceremony (the session is closing).
    fn drop_upstream(&mut self, up: Upstream) {
        self.balancer.release(up.group, up.server);
        self.outputs.push_back(Output::Close {
            side: Side::Upstream,
            abort: false,
        });
    }

    /// Forgets what was in flight to the upstream and its timers: no upstream is in use.
    fn forget_upstream(&mut self) {
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
}

fn send_timer(side: Side) -> Timer {
    match side {
        Side::Client => Timer::SendClient,
        Side::Upstream => Timer::SendUpstream,
    }
}

/// A log with nothing in it yet.
fn empty_log(client: std::net::SocketAddr) -> ExchangeLog {
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
        upgrade_offered: false,
        upgraded: false,
        tunnel_duration: None,
        websocket: None,
        close: None,
    }
}
