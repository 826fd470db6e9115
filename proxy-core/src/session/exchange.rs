//! The HTTP half of a session: reading request heads, connecting, streaming bodies both ways,
//! relaying the response, and deciding whether either connection lives on.
//!
//! What must never happen here: a byte of an unvalidated head reaching the upstream, an upgrade
//! request's follow-up bytes reaching the upstream before a genuine `101`, or a connection being
//! reused when either message was incomplete.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{empty_log, new_log, Failover, Session, State, Upstream};
use crate::balance::Choice;
use crate::body::{BodyDecoder, Framing};
use crate::config::{BalanceMethod, Config};
use crate::error::{RequestError, ResponseError};
use crate::event::{CloseReason, Event, ExchangeLog};
use crate::fields::{header_slots, STACK_HEADERS};
use crate::head::HeadLimit;
use crate::io::{ConnectError, Output, Side, UpstreamId};
use crate::proxy_protocol::ProxyError;
use crate::request::{
    check_body_limit, hash_key, parse_request, serialise, ParsedRequest, Request, RequestContext,
};
use crate::response::{
    error_response, parse_response, ClientFraming, ResponseContext, ResponseKind,
};
use crate::route::{route_for, upstream_path, virtual_host, Route, RouteRef};
use crate::timer::Timer;
use crate::upgrade;

/// Room on the request line beyond the request-target: method, spaces and version.
const REQUEST_LINE_SLACK: usize = 32;

/// More interim responses than this before a final one is an upstream fault.
const MAX_INTERIM: u8 = 16;

/// One request/response exchange (and, after a `101`, the bookkeeping of its tunnel).
#[derive(Debug)]
pub(super) struct Exchange {
    log: ExchangeLog,
    started: Instant,
    /// `sent_total[Client]` when the exchange began.
    sent_at_start: u64,
    head_bytes_to_client: u64,
    connect_started: Option<Instant>,
    pub(super) tunnel_started: Option<Instant>,
    minor: u8,
    is_head: bool,
    idempotent: bool,
    has_body: bool,
    /// The client's own keep-alive wish.
    keep_alive: bool,
    /// The upstream head, kept until the first response byte so that a request on a stale
    /// pooled connection can be retried.
    upstream_head: Option<Bytes>,
    /// The request body still being forwarded, and whether it is chunked.
    body: Option<(BodyDecoder, bool)>,
    response: ResponseState,
    interim: u8,
    client_keep_alive: bool,
    upstream_reusable: bool,
    retried: bool,
    pub(super) logged: bool,
}

#[derive(Debug)]
enum ResponseState {
    Head,
    Body { decoder: BodyDecoder, chunked: bool },
    Done,
}

impl Exchange {
    fn new(
        req: Request,
        now: Instant,
        sent_at_start: u64,
        head_len: usize,
        client: &crate::io::PeerInfo,
    ) -> Self {
        let mut log = new_log(client);
        log.request_line = req.request_line;
        log.host = req.host;
        log.referer = req.referer;
        log.user_agent = req.user_agent;
        log.bytes_from_client = head_len as u64;
        let body = match req.framing {
            Framing::Length(_) | Framing::Chunked => Some((
                BodyDecoder::new(req.framing),
                req.framing == Framing::Chunked,
            )),
            Framing::None | Framing::UntilClose => None,
        };
        Exchange {
            log,
            started: now,
            sent_at_start,
            head_bytes_to_client: 0,
            connect_started: None,
            tunnel_started: None,
            minor: req.minor,
            is_head: req.is_head,
            idempotent: req.idempotent,
            has_body: body.is_some(),
            keep_alive: req.keep_alive,
            upstream_head: Some(req.upstream_head),
            body,
            response: ResponseState::Head,
            interim: 0,
            client_keep_alive: false,
            upstream_reusable: false,
            retried: false,
            logged: false,
        }
    }

    /// An exchange for a request refused before it could be parsed, for logging.
    fn refused(
        request_line: String,
        bytes: u64,
        now: Instant,
        sent_at_start: u64,
        client: &crate::io::PeerInfo,
    ) -> Self {
        let req = Request {
            request_line,
            minor: 1,
            is_head: false,
            idempotent: false,
            framing: Framing::None,
            keep_alive: false,
            upgrade: None,
            host: None,
            referer: None,
            user_agent: None,
            upstream_head: Bytes::new(),
        };
        let mut ex = Exchange::new(req, now, sent_at_start, 0, client);
        ex.log.bytes_from_client = bytes;
        ex.upstream_head = None;
        ex
    }

    pub(super) fn request_body_pending(&self) -> bool {
        self.body.is_some()
    }

    pub(super) fn response_head_done(&self) -> bool {
        !matches!(self.response, ResponseState::Head)
    }

    pub(super) fn response_done(&self) -> bool {
        matches!(self.response, ResponseState::Done)
    }

    fn response_started(&self, sent_total_client: u64) -> bool {
        sent_total_client > self.sent_at_start
    }

    pub(super) fn count_client_bytes(&mut self, n: usize) {
        self.log.bytes_from_client += n as u64;
    }

    pub(super) fn finish_log(
        &mut self,
        now: Instant,
        sent_total_client: u64,
        close: Option<CloseReason>,
        state: &State,
    ) -> ExchangeLog {
        // Logged once (the session checks `logged`), so the log is moved out, not cloned.
        let placeholder = empty_log(self.log.client);
        let mut log = std::mem::replace(&mut self.log, placeholder);
        log.bytes_to_client = sent_total_client.saturating_sub(self.sent_at_start);
        log.body_bytes_to_client = log
            .bytes_to_client
            .saturating_sub(self.head_bytes_to_client);
        log.request_time = now.saturating_duration_since(self.started);
        if let (Some(start), None) = (self.connect_started, log.upstream_response_time) {
            if log.upstream_header_time.is_some() || matches!(state, State::Tunnel(_)) {
                log.upstream_response_time = Some(now.saturating_duration_since(start));
            }
        }
        if let Some(t) = self.tunnel_started {
            log.upgraded = true;
            log.tunnel_duration = Some(now.saturating_duration_since(t));
        }
        log.close = close;
        log
    }
}

/// What the request path decided. Lives for one call on the stack: boxing the large variant
/// would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    /// Forward `req` on `route` to `server`.
    Ready {
        req: Request,
        route: RouteRef,
        server: u16,
        key: Option<u64>,
    },
    /// The route's group has no server to give (all at `max_conns`).
    NoServer(Option<(usize, usize)>, usize),
}

/// The virtual host and route for `req`: `None` when no virtual host is configured (the
/// implicit route), a 404 when none matches.
fn route_request<'c>(
    config: &'c Config,
    local: Option<std::net::SocketAddr>,
    req: &ParsedRequest<'_>,
) -> Result<Option<(usize, usize, &'c Route)>, RequestError> {
    if config.virtual_hosts.is_empty() {
        return Ok(None);
    }
    let v = virtual_host(&config.virtual_hosts, local, req.host).ok_or(RequestError::NoRoute)?;
    let routes = &config.virtual_hosts[v].routes;
    let r = route_for(routes, req.path).ok_or(RequestError::NoRoute)?;
    Ok(Some((v, r, &routes[r])))
}

/// An exchange that only exists to be logged (a connection closed before any request).
pub(super) fn refused_exchange(
    bytes: u64,
    now: Instant,
    sent_at_start: u64,
    client: &crate::io::PeerInfo,
) -> Exchange {
    Exchange::refused(String::new(), bytes, now, sent_at_start, client)
}

/// The first line of a head, for logging a refused request.
fn first_line(head: &[u8]) -> String {
    let line = head
        .split(|b| *b == b'\n')
        .find(|l| !l.is_empty() && *l != b"\r")
        .unwrap_or(b"");
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(&line[..line.len().min(256)]).into_owned()
}

impl Session {
    /// Idle: feed queued client bytes to the head reader; start an exchange on a complete head.
    pub(super) fn step_idle(&mut self) -> bool {
        if !self.take_proxy_header() {
            return false;
        }
        let Some(mut chunk) = self.client_rx.pop_front() else {
            if self.client_eof {
                self.on_idle_eof();
            }
            return false;
        };
        self.client_rx_len -= chunk.len();
        if self.request_head_empty() && self.timers.get(Timer::KeepAlive).is_some() {
            // The first byte of the next request: the keep-alive wait becomes a head deadline.
            self.timers.stop(Timer::KeepAlive);
            self.timers.arm(
                Timer::RequestHead,
                self.now,
                self.config.timeouts.request_head,
            );
        }
        let limits = &self.config.limits;
        let (max_head, max_line) = (limits.max_head, limits.max_uri + REQUEST_LINE_SLACK);
        let result = self
            .http()
            .request_head
            .push(&mut chunk, max_head, max_line);
        if !chunk.is_empty() {
            self.client_rx_len += chunk.len();
            self.client_rx.push_front(chunk);
        }
        match result {
            Ok(Some(head)) => {
                self.start_exchange(head);
                true
            }
            Ok(None) => true,
            Err(limit) => {
                // The head is refused at the byte that crossed the limit; logging that count
                // (rather than however much the last read happened to hold) keeps the log
                // independent of how the bytes were split into reads.
                let (err, accepted) = match limit {
                    HeadLimit::TooLarge => (RequestError::HeadTooLarge, max_head + 1),
                    HeadLimit::LineTooLong => {
                        (RequestError::UriTooLong, max_line.min(max_head) + 1)
                    }
                };
                self.refuse(String::new(), accepted as u64, err);
                false
            }
        }
    }

    fn on_idle_eof(&mut self) {
        if !self.request_head_empty() {
            self.exchange = Some(Exchange::refused(
                String::new(),
                0,
                self.now,
                self.sent_total[Side::Client.index()],
                &self.client,
            ));
            self.log_exchange(Some(CloseReason::ClientClosed));
            self.exchange = None;
        }
        self.begin_closing();
    }

    pub(super) fn on_idle_timeout(&mut self, timer: Timer) {
        if !matches!(self.state, State::Idle) {
            return;
        }
        if self.awaits_proxy_header() {
            // A balancer that never finished its header gets no HTTP answer.
            self.proxy_failed(ProxyError::Missing);
            return;
        }
        if timer == Timer::RequestHead && (!self.request_head_empty() || self.client_rx_len > 0) {
            self.exchange = Some(Exchange::refused(
                String::new(),
                0,
                self.now,
                self.sent_total[Side::Client.index()],
                &self.client,
            ));
            self.fail(408, CloseReason::Timeout(timer));
        } else if self.in_flight[Side::Client.index()] > 0 {
            self.begin_closing();
        } else {
            self.close_all();
        }
    }

    fn refuse(&mut self, request_line: String, bytes: u64, err: RequestError) {
        let sent = self.sent_total[Side::Client.index()];
        if self.exchange.is_none() {
            self.exchange = Some(Exchange::refused(
                request_line,
                bytes,
                self.now,
                sent,
                &self.client,
            ));
        }
        self.fail(err.status(), CloseReason::BadRequest(err));
    }

    fn start_exchange(&mut self, head: Bytes) {
        self.requests += 1;
        self.timers.stop(Timer::RequestHead);
        let config = Arc::clone(&self.config);
        let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots = header_slots(&mut stack, &mut heap, config.limits.max_headers);
        // parse → route → serialise: nothing is chosen for a head that fails validation, and
        // nothing is sent before the whole head has been rewritten.
        let prepared = parse_request(&head, slots, &config.limits).and_then(|parsed| {
            let route = route_request(&config, self.client.local, &parsed)?;
            let settings = route.map(|(_, _, r)| &r.settings);
            let max_body = settings
                .and_then(|s| s.max_body)
                .unwrap_or(config.limits.max_body);
            check_body_limit(&parsed, max_body)?;
            let protocols = settings
                .and_then(|s| s.upgrade_protocols.as_deref())
                .unwrap_or(&config.upgrade_protocols);
            let offer = upgrade::offer(&parsed, protocols);
            let gi = route
                .and_then(|(_, _, r)| config.group_index(&r.group))
                .unwrap_or(0);
            let group = config.group(gi).unwrap_or(&config.upstream);
            let key = match &group.method {
                BalanceMethod::Hash(key) => Some(hash_key(key, &parsed, self.client.addr.ip())),
                _ => None,
            };
            let at = route.map(|(v, r, _)| (v, r));
            let Some(server) = self.balancer.pick(&config, gi, &self.choice(key, &[])) else {
                return Ok(Prepared::NoServer(at, gi));
            };
            let path = match route {
                Some((_, _, r)) => upstream_path(r, parsed.path),
                None => Cow::Borrowed(parsed.path),
            };
            let ctx = RequestContext {
                config: &config,
                client: &self.client,
                host: settings
                    .and_then(|s| s.host.as_ref())
                    .unwrap_or(&config.host),
                headers: settings
                    .and_then(|s| s.headers.as_deref())
                    .unwrap_or(&config.headers),
                path: &path,
            };
            let peer = &group.servers[usize::from(server)].peer;
            let req = serialise(&parsed, &ctx, offer, peer);
            Ok(Prepared::Ready {
                req,
                route: RouteRef { at, group: gi },
                server,
                key,
            })
        });
        match prepared {
            Err(e) => self.refuse(first_line(&head), head.len() as u64, e),
            Ok(Prepared::NoServer(at, group)) => {
                // Every server is at max_conns (the only way a valid group has none to give).
                self.route = RouteRef { at, group };
                let sent = self.sent_total[Side::Client.index()];
                let (line, len) = (first_line(&head), head.len() as u64);
                self.exchange = Some(Exchange::refused(line, len, self.now, sent, &self.client));
                self.state = State::Exchange;
                self.fail(502, CloseReason::NoUpstream);
            }
            Ok(Prepared::Ready {
                mut req,
                route,
                server,
                key,
            }) => {
                self.route = route;
                // The offer is HTTP-side state: a tunnel drops it with the rest of HTTP.
                self.http().upgrade = req.upgrade.take();
                let sent = self.sent_total[Side::Client.index()];
                self.http().failover = Failover {
                    key,
                    ..Failover::default()
                };
                self.exchange = Some(Exchange::new(req, self.now, sent, head.len(), &self.client));
                self.state = State::Exchange;
                self.connect(server, true);
            }
        }
    }

    /// The request body limit on the current route.
    pub(super) fn route_max_body(&self) -> u64 {
        self.route()
            .and_then(|r| r.settings.max_body)
            .unwrap_or(self.config.limits.max_body)
    }

    fn choice<'a>(&self, key: Option<u64>, tried: &'a [u16]) -> Choice<'a> {
        Choice {
            client: self.client.addr.ip(),
            key,
            tried,
            now: self.now,
        }
    }

    /// Starts a connection to `server` of the group, whose balancer slot the caller holds.
    fn connect(&mut self, server: u16, allow_pooled: bool) {
        let group = self.route.group;
        let Some(peer) = self
            .config
            .group(group)
            .and_then(|g| g.servers.get(usize::from(server)))
            .map(|s| s.peer.clone())
        else {
            return self.fail(502, CloseReason::NoUpstream);
        };
        self.next_upstream += 1;
        let id = UpstreamId(self.next_upstream);
        let now = self.now;
        self.http().failover.first_connect.get_or_insert(now);
        if let Some(ex) = self.exchange.as_mut() {
            ex.connect_started = Some(now);
            ex.log.upstream = Some(peer.clone());
        }
        self.upstream = Some(Upstream {
            id,
            group,
            server,
            connected: false,
            reused: false,
            eof: false,
        });
        self.outputs
            .push_back(Output::Event(Event::UpstreamChosen { peer: peer.clone() }));
        self.outputs.push_back(Output::Connect {
            id,
            peer,
            allow_pooled,
        });
        self.timers
            .arm(Timer::Connect, self.now, self.timeouts().connect);
    }

    pub(super) fn on_connected(&mut self, id: UpstreamId, reused: bool) {
        if !matches!(self.state, State::Exchange) {
            return;
        }
        let Some(up) = self
            .upstream
            .as_mut()
            .filter(|u| u.id == id && !u.connected)
        else {
            return;
        };
        up.connected = true;
        up.reused = reused;
        self.balancer.succeeded(up.group, up.server);
        self.timers.stop(Timer::Connect);
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        if let Some(start) = ex.connect_started {
            ex.log.upstream_connect_time = Some(self.now.saturating_duration_since(start));
        }
        let head = ex.upstream_head.clone();
        let body_pending = ex.request_body_pending();
        if let Some(head) = head {
            self.send(Side::Upstream, head);
        }
        // Like nginx's proxy_read_timeout, the wait for the response starts once the request
        // is sent: a slow upload is the client body timer's business.
        if body_pending {
            self.timers
                .arm(Timer::ClientBody, self.now, self.timeouts().client_body);
        } else {
            self.timers
                .arm(Timer::UpstreamRead, self.now, self.timeouts().read);
        }
    }

    pub(super) fn on_connect_failed(&mut self, id: UpstreamId, why: ConnectError) {
        let current = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.id == id && !u.connected);
        if current && matches!(self.state, State::Exchange) {
            self.next_upstream_or_fail(why);
        }
    }

    /// The connect timeout fired: like a refused connection, the next server gets a chance.
    pub(super) fn on_connect_timeout(&mut self) {
        if self.upstream.as_ref().is_some_and(|u| !u.connected)
            && matches!(self.state, State::Exchange)
        {
            self.next_upstream_or_fail(ConnectError::TimedOut);
        }
    }

    /// The current connect attempt failed: counts it against its server, then tries another
    /// server of the group while tries and the time budget allow (no request byte has gone
    /// anywhere yet, so any request may be repeated), else answers 502 (504 for a timeout).
    fn next_upstream_or_fail(&mut self, why: ConnectError) {
        let Some(up) = self.take_upstream() else {
            return;
        };
        self.outputs.push_back(Output::Close {
            side: Side::Upstream,
        });
        self.timers.stop(Timer::Connect);
        let config = Arc::clone(&self.config);
        let Some(group) = config.group(up.group) else {
            return;
        };
        self.balancer.failed(&config, up.group, up.server, self.now);
        let failed_peer = self.peer_of(&up);
        self.outputs.push_back(Output::Event(Event::UpstreamFailed {
            peer: failed_peer.clone(),
            cause: why,
        }));
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        ex.log.upstream_failures.push((failed_peer, why));
        let f = &mut self.http.get_or_insert_with(Box::default).failover;
        f.tried.push(up.server);
        let limit = match group.tries {
            0 => group.servers.len(),
            n => n as usize,
        };
        let in_budget = group.try_timeout.is_zero()
            || f.first_connect
                .is_none_or(|t| self.now.saturating_duration_since(t) < group.try_timeout);
        let next = if f.tried.len() < limit && in_budget {
            let choice = Choice {
                client: self.client.addr.ip(),
                key: f.key,
                tried: &f.tried,
                now: self.now,
            };
            self.balancer.pick(&config, up.group, &choice)
        } else {
            None
        };
        match next {
            Some(server) => self.connect(server, true),
            None if why == ConnectError::TimedOut => {
                self.fail(504, CloseReason::Timeout(Timer::Connect))
            }
            None => self.fail(502, CloseReason::ConnectFailed(why)),
        }
    }

    /// Exchange: forward queued client bytes as request body while the upstream keeps up.
    pub(super) fn step_request_body(&mut self) -> bool {
        let connected = self.upstream.as_ref().is_some_and(|u| u.connected);
        let flowing = self.in_flight[Side::Upstream.index()] < self.config.limits.queue;
        let Some(ex) = self.exchange.as_mut() else {
            return false;
        };
        if ex.body.is_none() || !connected || !flowing {
            return false;
        }
        let Some(mut chunk) = self.client_rx.pop_front() else {
            if self.client_eof {
                // The client went away in the middle of its request body.
                self.abort(CloseReason::ClientClosed);
            }
            return false;
        };
        self.client_rx_len -= chunk.len();
        let Some((mut decoder, chunked)) = ex.body.take() else {
            return false;
        };
        let before = chunk.len();
        let mut pieces = self
            .http
            .as_mut()
            .map(|h| std::mem::take(&mut h.pieces))
            .unwrap_or_default();
        let result = decoder.decode(&mut chunk, &mut |p| pieces.push(p));
        ex.count_client_bytes(before - chunk.len());
        if !chunk.is_empty() {
            self.client_rx_len += chunk.len();
            self.client_rx.push_front(chunk);
        }
        let max_body = self.route_max_body();
        let error = match result {
            Err(e) => Some(RequestError::BadChunk(e.0)),
            Ok(()) if max_body != 0 && decoder.data_len > max_body => {
                Some(RequestError::BodyTooLarge)
            }
            Ok(()) => None,
        };
        if let Some(err) = error {
            pieces.clear();
            if let Some(h) = self.http.as_mut() {
                h.pieces = pieces;
            }
            self.fail(err.status(), CloseReason::BadRequest(err));
            return false;
        }
        for p in pieces.drain(..) {
            self.forward_piece(Side::Upstream, p, chunked);
        }
        if let Some(h) = self.http.as_mut() {
            h.pieces = pieces;
        }
        let done = decoder.is_done();
        let Some(ex) = self.exchange.as_mut() else {
            return false;
        };
        if done {
            self.timers.stop(Timer::ClientBody);
            if ex.response_done() {
                self.finish_exchange();
            } else if !ex.response_head_done() {
                self.timers
                    .arm(Timer::UpstreamRead, self.now, self.timeouts().read);
            }
        } else {
            ex.body = Some((decoder, chunked));
            self.timers
                .arm(Timer::ClientBody, self.now, self.timeouts().client_body);
        }
        true
    }

    /// The upstream accepted bytes: the client is not the one stalling the body.
    pub(super) fn on_upstream_drained(&mut self) {
        if self
            .exchange
            .as_ref()
            .is_some_and(Exchange::request_body_pending)
        {
            self.timers
                .arm(Timer::ClientBody, self.now, self.timeouts().client_body);
        }
    }

    pub(super) fn on_upstream_data(&mut self, mut bytes: Bytes) {
        match self.state {
            State::Tunnel(_) => return self.tunnel_data(Side::Upstream, bytes),
            State::Exchange => {}
            _ => return,
        }
        if !self.upstream.as_ref().is_some_and(|u| u.connected) {
            return;
        }
        if let Some(ex) = self.exchange.as_mut() {
            ex.upstream_head = None;
        }
        while !bytes.is_empty() {
            let Some(ex) = self.exchange.as_mut() else {
                return;
            };
            match &mut ex.response {
                ResponseState::Head => {
                    let max = self.config.limits.max_head;
                    match self.http().response_head.push(&mut bytes, max, max) {
                        Err(_) => {
                            return self
                                .fail(502, CloseReason::BadResponse(ResponseError::HeadTooLarge))
                        }
                        Ok(None) => break,
                        Ok(Some(head)) => {
                            self.on_response_head(head, &mut bytes);
                            if !matches!(self.state, State::Exchange) {
                                return;
                            }
                        }
                    }
                }
                ResponseState::Body { decoder, chunked } => {
                    let chunked = *chunked;
                    let mut pieces = self
                        .http
                        .as_mut()
                        .map(|h| std::mem::take(&mut h.pieces))
                        .unwrap_or_default();
                    let result = decoder.decode(&mut bytes, &mut |p| pieces.push(p));
                    let done = decoder.is_done();
                    if let Err(e) = result {
                        pieces.clear();
                        if let Some(h) = self.http.as_mut() {
                            h.pieces = pieces;
                        }
                        return self.abort(CloseReason::BadResponse(ResponseError::BadChunk(e.0)));
                    }
                    for p in pieces.drain(..) {
                        self.forward_piece(Side::Client, p, chunked);
                    }
                    if let Some(h) = self.http.as_mut() {
                        h.pieces = pieces;
                    }
                    if done {
                        self.mark_response_done();
                    }
                }
                ResponseState::Done => {
                    // Bytes after a complete response: this connection cannot be trusted again.
                    ex.upstream_reusable = false;
                    break;
                }
            }
        }
        let done = self.exchange.as_ref().is_some_and(Exchange::response_done);
        if done {
            self.finish_exchange();
        } else {
            self.timers
                .arm(Timer::UpstreamRead, self.now, self.timeouts().read);
        }
    }

    fn on_response_head(&mut self, head: Bytes, rest: &mut Bytes) {
        let max_requests = self.config.limits.max_requests;
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        let ctx = ResponseContext {
            is_head: ex.is_head,
            client_minor: ex.minor,
            client_keep_alive: ex.keep_alive
                && !self.client_eof
                && !self.draining
                && self.requests < max_requests
                && !ex.request_body_pending(),
            upgrade: self.http.as_ref().and_then(|h| h.upgrade.as_ref()),
            check_accept: self.config.check_websocket_accept,
            max_headers: self.config.limits.max_headers,
        };
        let resp = match parse_response(&head, &ctx) {
            Ok(r) => r,
            Err(e) => return self.fail(502, CloseReason::BadResponse(e)),
        };
        let header_time = ex
            .connect_started
            .map(|s| self.now.saturating_duration_since(s));
        ex.head_bytes_to_client += resp.client_head.len() as u64;
        match resp.kind {
            ResponseKind::Interim => {
                ex.interim += 1;
                if ex.interim > MAX_INTERIM {
                    return self.fail(502, CloseReason::BadResponse(ResponseError::TooManyInterim));
                }
                self.send(Side::Client, resp.client_head);
            }
            ResponseKind::Switch => {
                ex.log.status = Some(101);
                ex.log.upstream_header_time = header_time;
                self.send(Side::Client, resp.client_head);
                self.switch_to_tunnel(rest);
            }
            ResponseKind::Final => {
                ex.log.status = Some(resp.status);
                ex.log.upstream_header_time = header_time;
                ex.client_keep_alive = resp.client_keep_alive;
                ex.upstream_reusable = resp.upstream_reusable;
                ex.response = match resp.framing {
                    Framing::None => ResponseState::Done,
                    f => ResponseState::Body {
                        decoder: BodyDecoder::new(f),
                        chunked: resp.client_framing == ClientFraming::Chunked,
                    },
                };
                let done = ex.response_done();
                self.send(Side::Client, resp.client_head);
                if done {
                    self.mark_response_done();
                }
            }
        }
    }

    fn mark_response_done(&mut self) {
        let now = self.now;
        if let Some(ex) = self.exchange.as_mut() {
            ex.response = ResponseState::Done;
            if let Some(start) = ex.connect_started {
                ex.log.upstream_response_time = Some(now.saturating_duration_since(start));
            }
        }
        self.timers.stop(Timer::UpstreamRead);
    }

    /// The response is complete: release the upstream, log, and keep the client or close it.
    /// Called with the request body possibly unfinished (an early response), in which case
    /// neither connection is kept.
    fn finish_exchange(&mut self) {
        let Some(ex) = self.exchange.as_ref() else {
            return;
        };
        let keep = ex.client_keep_alive && !ex.request_body_pending() && !self.draining;
        let reusable = ex.upstream_reusable && !ex.request_body_pending();
        self.release_upstream(reusable);
        self.log_exchange(if keep {
            None
        } else {
            Some(CloseReason::Completed)
        });
        self.exchange = None;
        self.http().response_head.clear();
        if keep {
            self.state = State::Idle;
            self.timers.stop(Timer::ClientBody);
            if self.client_rx_len > 0 {
                self.timers.arm(
                    Timer::RequestHead,
                    self.now,
                    self.config.timeouts.request_head,
                );
            } else {
                self.timers
                    .arm(Timer::KeepAlive, self.now, self.config.timeouts.keep_alive);
            }
        } else {
            self.begin_closing();
        }
    }

    /// The upstream closed (`reset`: failed). Completes a read-until-close body, retries a
    /// request that met a stale pooled connection, or fails the exchange.
    pub(super) fn on_upstream_eof(&mut self, reset: bool) {
        match self.state {
            State::Tunnel(_) if reset => return self.abort(CloseReason::UpstreamReset),
            State::Tunnel(_) => return self.tunnel_eof(Side::Upstream),
            State::Exchange => {}
            _ => return,
        }
        let Some(up) = self.upstream.as_mut().filter(|u| u.connected) else {
            return;
        };
        up.eof = true;
        let (reused, server) = (up.reused, up.server);
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        match &mut ex.response {
            ResponseState::Head => {
                let stale_pooled = reused
                    && ex.idempotent
                    && !ex.has_body
                    && !ex.retried
                    && ex.upstream_head.is_some();
                if stale_pooled {
                    // The pooled connection was closed by the upstream before our request
                    // reached it (nothing came back). Safe to repeat once on a fresh one.
                    ex.retried = true;
                    // The balancer slot carries over to the new connection to the same server.
                    self.upstream = None;
                    self.outputs.push_back(Output::Close {
                        side: Side::Upstream,
                    });
                    self.in_flight[Side::Upstream.index()] = 0;
                    self.timers.stop(Timer::SendUpstream);
                    self.timers.stop(Timer::UpstreamRead);
                    self.connect(server, false);
                } else {
                    let reason = if reset {
                        CloseReason::UpstreamReset
                    } else {
                        CloseReason::BadResponse(ResponseError::Truncated)
                    };
                    self.fail(502, reason);
                }
            }
            ResponseState::Body { decoder, .. } => {
                if !reset && decoder.finish_at_eof(&mut |_| {}) {
                    self.mark_response_done();
                    self.finish_exchange();
                } else {
                    self.abort(if reset {
                        CloseReason::UpstreamReset
                    } else {
                        CloseReason::UpstreamClosed
                    });
                }
            }
            ResponseState::Done => {}
        }
    }

    /// Answers the client with `status` and closes, or, if a response is already under way,
    /// aborts both connections. Either way the exchange is logged with `reason`.
    pub(super) fn fail(&mut self, status: u16, reason: CloseReason) {
        let sent = self.sent_total[Side::Client.index()];
        let started = self
            .exchange
            .as_ref()
            .is_some_and(|ex| ex.response_started(sent));
        if started || !matches!(self.state, State::Idle | State::Exchange) {
            return self.abort(reason);
        }
        self.release_upstream(false);
        if self.exchange.is_none() {
            self.exchange = Some(Exchange::refused(
                String::new(),
                0,
                self.now,
                sent,
                &self.client,
            ));
        }
        let is_head = self.exchange.as_ref().is_some_and(|ex| ex.is_head);
        let resp = error_response(status, is_head);
        if let Some(ex) = self.exchange.as_mut() {
            ex.log.status = Some(status);
            ex.head_bytes_to_client += resp.len() as u64;
        }
        self.send(Side::Client, resp);
        self.log_exchange(Some(reason));
        self.exchange = None;
        self.begin_closing();
    }
}
