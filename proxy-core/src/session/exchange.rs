//! The exchange state: connecting (and failing over), streaming the request body, relaying the
//! response, and deciding whether either connection lives on.
//!
//! What must never happen here: a byte of an unvalidated head reaching the upstream, an upgrade
//! request's follow-up bytes reaching the upstream before a genuine `101`, or a connection being
//! reused when either message was incomplete.
//!
//! [`Exchange`]'s methods take the shared [`Conn`] for their effects and answer with a [`Next`]:
//! stay, or which transition the session makes with the exchange it owns.

use std::sync::Arc;

use bytes::Bytes;

use super::{Conn, HttpParts, Record, Upstream};
use crate::balance::Choice;
use crate::body::{BodyDecoder, Framing};
use crate::error::{RequestError, ResponseError};
use crate::event::{CloseReason, Event};
use crate::io::{ConnectError, Output, Side, UpstreamId};
use crate::request::Request;
use crate::response::{parse_response, ClientFraming, ResponseContext, ResponseKind};
use crate::timer::Timer;

/// More interim responses than this before a final one is an upstream fault.
const MAX_INTERIM: u8 = 16;

/// One request/response exchange, with the upstream connection it uses.
#[derive(Debug)]
pub(super) struct Exchange {
    http: Box<HttpParts>,
    pub(super) record: Record,
    /// `None` only between a failed connect and the next attempt.
    upstream: Option<Upstream>,
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
}

#[derive(Debug)]
enum ResponseState {
    Head,
    Body { decoder: BodyDecoder, chunked: bool },
    Done,
}

/// What an exchange wants after an input.
#[derive(Debug)]
pub(super) enum Next {
    /// Carry on.
    Stay,
    /// The response is complete.
    Done,
    /// A genuine `101` has been queued for the client: become a tunnel over this upstream
    /// connection; the bytes are what the upstream sent after the head.
    Tunnel(Upstream, Bytes),
    /// Answer the client with this status and close; if the response has already started,
    /// close both connections instead.
    Fail(u16, CloseReason),
    /// Close both connections.
    Abort(CloseReason),
}

impl Exchange {
    /// The exchange for `req`, whose head was `head_len` bytes.
    pub(super) fn new(http: Box<HttpParts>, req: Request, cx: &Conn, head_len: usize) -> Self {
        let mut record = Record::new(cx, req.request_line, head_len as u64);
        record.log.host = req.host;
        record.log.referer = req.referer;
        record.log.user_agent = req.user_agent;
        record.log.upgrade_offered = http.upgrade.is_some();
        let body = match req.framing {
            Framing::Length(_) | Framing::Chunked => Some((
                BodyDecoder::new(req.framing),
                req.framing == Framing::Chunked,
            )),
            Framing::None | Framing::UntilClose => None,
        };
        Exchange {
            http,
            record,
            upstream: None,
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
        }
    }

    /// Splits a finished exchange into what outlives it.
    pub(super) fn into_parts(self) -> (Record, Option<Upstream>, Box<HttpParts>) {
        (self.record, self.upstream, self.http)
    }

    /// What answering the client with an error needs.
    pub(super) fn into_answer(self) -> (Record, Option<Upstream>, bool) {
        (self.record, self.upstream, self.is_head)
    }

    /// The upstream connection in use, if any.
    pub(super) fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    pub(super) fn request_body_pending(&self) -> bool {
        self.body.is_some()
    }

    pub(super) fn response_head_done(&self) -> bool {
        !matches!(self.response, ResponseState::Head)
    }

    fn response_done(&self) -> bool {
        matches!(self.response, ResponseState::Done)
    }

    pub(super) fn wants_upstream_read(&self) -> bool {
        self.upstream
            .as_ref()
            .is_some_and(|u| u.connected && !u.eof)
            && !self.response_done()
    }

    /// Whether the client connection and the upstream connection may be kept once the
    /// response is complete.
    pub(super) fn keep_alive(&self, draining: bool) -> (bool, bool) {
        let pending = self.request_body_pending();
        (
            self.client_keep_alive && !pending && !draining,
            self.upstream_reusable && !pending,
        )
    }

    /// Starts a connection to `server` of the route's group, whose balancer slot the caller
    /// holds.
    pub(super) fn connect(&mut self, cx: &mut Conn, server: u16, allow_pooled: bool) -> Next {
        let group = cx.route.group;
        let Some(peer) = cx
            .config
            .group(group)
            .and_then(|g| g.servers.get(usize::from(server)))
            .map(|s| s.peer.clone())
        else {
            return Next::Fail(502, CloseReason::NoUpstream);
        };
        cx.next_upstream += 1;
        let id = UpstreamId(cx.next_upstream);
        let now = cx.now;
        self.http.failover.first_connect.get_or_insert(now);
        self.record.connect_started = Some(now);
        self.record.log.upstream = Some(peer.clone());
        self.upstream = Some(Upstream {
            id,
            group,
            server,
            connected: false,
            reused: false,
            eof: false,
        });
        cx.emit(Event::UpstreamChosen { peer: peer.clone() });
        cx.outputs.push_back(Output::Connect {
            id,
            peer,
            allow_pooled,
        });
        let after = cx.timeouts().connect;
        cx.timers.arm(Timer::Connect, now, after);
        Next::Stay
    }

    pub(super) fn on_connected(&mut self, cx: &mut Conn, id: UpstreamId, reused: bool) {
        let Some(up) = self
            .upstream
            .as_mut()
            .filter(|u| u.id == id && !u.connected)
        else {
            return;
        };
        up.connected = true;
        up.reused = reused;
        cx.balancer.succeeded(up.group, up.server);
        cx.timers.stop(Timer::Connect);
        if let Some(start) = self.record.connect_started {
            self.record.log.upstream_connect_time = Some(cx.now.saturating_duration_since(start));
        }
        if let Some(head) = self.upstream_head.clone() {
            cx.send(Side::Upstream, head);
        }
        // Like nginx's proxy_read_timeout, the wait for the response starts once the request
        // is sent: a slow upload is the client body timer's business.
        let t = cx.timeouts();
        let (timer, after) = if self.request_body_pending() {
            (Timer::ClientBody, t.client_body)
        } else {
            (Timer::UpstreamRead, t.read)
        };
        cx.timers.arm(timer, cx.now, after);
    }

    pub(super) fn on_connect_failed(
        &mut self,
        cx: &mut Conn,
        id: UpstreamId,
        why: ConnectError,
    ) -> Next {
        if self
            .upstream
            .as_ref()
            .is_some_and(|u| u.id == id && !u.connected)
        {
            self.next_upstream_or_fail(cx, why)
        } else {
            Next::Stay
        }
    }

    /// The connect timeout fired: like a refused connection, the next server gets a chance.
    pub(super) fn on_connect_timeout(&mut self, cx: &mut Conn) -> Next {
        if self.upstream.as_ref().is_some_and(|u| !u.connected) {
            self.next_upstream_or_fail(cx, ConnectError::TimedOut)
        } else {
            Next::Stay
        }
    }

    /// The current connect attempt failed: counts it against its server, then tries another
    /// server of the group while tries and the time budget allow (no request byte has gone
    /// anywhere yet, so any request may be repeated), else answers 502 (504 for a timeout).
    fn next_upstream_or_fail(&mut self, cx: &mut Conn, why: ConnectError) -> Next {
        let Some(up) = self.upstream.take() else {
            return Next::Stay;
        };
        let failed_peer = cx.peer_of(&up);
        let (group, server) = (up.group, up.server);
        cx.drop_upstream(up);
        cx.timers.stop(Timer::Connect);
        let config = Arc::clone(&cx.config);
        cx.emit(Event::UpstreamFailed {
            peer: failed_peer.clone(),
            cause: why,
        });
        self.record.log.upstream_failures.push((failed_peer, why));
        if why == ConnectError::Local {
            // The proxy is out of sockets: another server would fail the same way, and this
            // one did nothing wrong.
            return Next::Fail(503, CloseReason::ConnectFailed(why));
        }
        cx.balancer.failed(&config, group, server, cx.now);
        let f = &mut self.http.failover;
        f.tried.push(server);
        let next = config.group(group).and_then(|g| {
            let limit = match g.tries {
                0 => g.servers.len(),
                n => n as usize,
            };
            let in_budget = g.try_timeout.is_zero()
                || f.first_connect
                    .is_none_or(|t| cx.now.saturating_duration_since(t) < g.try_timeout);
            if f.tried.len() >= limit || !in_budget {
                return None;
            }
            let choice = Choice {
                client: cx.client.addr.ip(),
                key: f.key,
                tried: &f.tried,
                now: cx.now,
            };
            cx.balancer.pick(&config, group, &choice)
        });
        match next {
            Some(server) => self.connect(cx, server, true),
            None if why == ConnectError::TimedOut => {
                Next::Fail(504, CloseReason::Timeout(Timer::Connect))
            }
            None => Next::Fail(502, CloseReason::ConnectFailed(why)),
        }
    }

    /// Forwards queued client bytes as request body while the upstream keeps up; the flag says
    /// whether anything was consumed.
    pub(super) fn step_request_body(&mut self, cx: &mut Conn) -> (bool, Next) {
        let Some((decoder, chunked)) = &mut self.body else {
            return (false, Next::Stay);
        };
        let chunked = *chunked;
        let connected = self.upstream.as_ref().is_some_and(|u| u.connected);
        if !connected || cx.in_flight[Side::Upstream.index()] >= cx.config.limits.queue {
            return (false, Next::Stay);
        }
        let Some(mut chunk) = cx.pop_rx() else {
            if cx.client_eof {
                // The client went away in the middle of its request body.
                return (false, Next::Abort(CloseReason::ClientClosed));
            }
            return (false, Next::Stay);
        };
        let before = chunk.len();
        let http = &mut *self.http;
        let pieces = &mut http.pieces;
        let result = decoder.decode(&mut chunk, &mut |p| pieces.push(p));
        self.record.log.bytes_from_client += (before - chunk.len()) as u64;
        cx.unpop_rx(chunk);
        let max_body = cx.route_max_body();
        let error = match result {
            Err(e) => Some(RequestError::BadChunk(e.0)),
            Ok(()) if max_body != 0 && decoder.data_len > max_body => {
                Some(RequestError::BodyTooLarge)
            }
            Ok(()) => None,
        };
        if let Some(err) = error {
            http.pieces.clear();
            return (
                false,
                Next::Fail(err.status(), CloseReason::BadRequest(err)),
            );
        }
        for p in http.pieces.drain(..) {
            cx.forward_piece(Side::Upstream, p, chunked, &mut http.scratch);
        }
        if !decoder.is_done() {
            let after = cx.timeouts().client_body;
            cx.timers.arm(Timer::ClientBody, cx.now, after);
            return (true, Next::Stay);
        }
        self.body = None;
        cx.timers.stop(Timer::ClientBody);
        if self.response_done() {
            return (true, Next::Done);
        }
        if !self.response_head_done() {
            let after = cx.timeouts().read;
            cx.timers.arm(Timer::UpstreamRead, cx.now, after);
        }
        (true, Next::Stay)
    }

    /// The upstream accepted bytes: the client is not the one stalling the body.
    pub(super) fn on_upstream_drained(&mut self, cx: &mut Conn) {
        if self.request_body_pending() {
            let after = cx.timeouts().client_body;
            cx.timers.arm(Timer::ClientBody, cx.now, after);
        }
    }

    pub(super) fn on_upstream_data(&mut self, cx: &mut Conn, mut bytes: Bytes) -> Next {
        if !self.upstream.as_ref().is_some_and(|u| u.connected) {
            return Next::Stay;
        }
        self.upstream_head = None;
        while !bytes.is_empty() {
            let http = &mut *self.http;
            match &mut self.response {
                ResponseState::Head => {
                    let max = cx.config.limits.max_head;
                    match http.response_head.push(&mut bytes, max, max) {
                        Err(_) => {
                            return Next::Fail(
                                502,
                                CloseReason::BadResponse(ResponseError::HeadTooLarge),
                            )
                        }
                        Ok(None) => break,
                        Ok(Some(head)) => {
                            let next = self.on_response_head(cx, head, &mut bytes);
                            if !matches!(next, Next::Stay) {
                                return next;
                            }
                        }
                    }
                }
                ResponseState::Body { decoder, chunked } => {
                    let chunked = *chunked;
                    let pieces = &mut http.pieces;
                    let result = decoder.decode(&mut bytes, &mut |p| pieces.push(p));
                    let done = decoder.is_done();
                    if let Err(e) = result {
                        http.pieces.clear();
                        return Next::Abort(CloseReason::BadResponse(ResponseError::BadChunk(e.0)));
                    }
                    for p in http.pieces.drain(..) {
                        cx.forward_piece(Side::Client, p, chunked, &mut http.scratch);
                    }
                    if done {
                        self.mark_response_done(cx);
                    }
                }
                ResponseState::Done => {
                    // Bytes after a complete response: this connection cannot be trusted again.
                    self.upstream_reusable = false;
                    break;
                }
            }
        }
        if self.response_done() {
            Next::Done
        } else {
            let after = cx.timeouts().read;
            cx.timers.arm(Timer::UpstreamRead, cx.now, after);
            Next::Stay
        }
    }

    fn on_response_head(&mut self, cx: &mut Conn, head: Bytes, rest: &mut Bytes) -> Next {
        let ctx = ResponseContext {
            is_head: self.is_head,
            client_minor: self.minor,
            client_keep_alive: self.keep_alive
                && !cx.client_eof
                && !cx.draining
                && cx.requests < cx.config.limits.max_requests
                && !self.request_body_pending(),
            upgrade: self.http.upgrade.as_ref(),
            check_accept: cx.config.check_websocket_accept,
            max_headers: cx.config.limits.max_headers,
            protocols: cx
                .route()
                .and_then(|r| r.settings.upgrade_protocols.as_deref())
                .unwrap_or(&cx.config.upgrade_protocols),
        };
        let resp = match parse_response(&head, &ctx) {
            Ok(r) => r,
            Err(e) => return Next::Fail(502, CloseReason::BadResponse(e)),
        };
        let record = &mut self.record;
        let header_time = record
            .connect_started
            .map(|s| cx.now.saturating_duration_since(s));
        record.head_bytes_to_client += resp.client_head.len() as u64;
        match resp.kind {
            ResponseKind::Interim => {
                self.interim += 1;
                if self.interim > MAX_INTERIM {
                    return Next::Fail(
                        502,
                        CloseReason::BadResponse(ResponseError::TooManyInterim),
                    );
                }
                cx.send(Side::Client, resp.client_head);
                Next::Stay
            }
            ResponseKind::Switch => {
                record.log.status = Some(101);
                record.log.upstream_header_time = header_time;
                cx.send(Side::Client, resp.client_head);
                match self.upstream.take() {
                    Some(up) => Next::Tunnel(up, std::mem::take(rest)),
                    // Not reached: response bytes are only read from a connected upstream.
                    None => Next::Abort(CloseReason::UpstreamClosed),
                }
            }
            ResponseKind::Final => {
                record.log.status = Some(resp.status);
                record.log.upstream_header_time = header_time;
                self.client_keep_alive = resp.client_keep_alive;
                self.upstream_reusable = resp.upstream_reusable;
                self.response = match resp.framing {
                    Framing::None => ResponseState::Done,
                    f => ResponseState::Body {
                        decoder: BodyDecoder::new(f),
                        chunked: resp.client_framing == ClientFraming::Chunked,
                    },
                };
                cx.send(Side::Client, resp.client_head);
                if self.response_done() {
                    self.mark_response_done(cx);
                }
                Next::Stay
            }
        }
    }

    fn mark_response_done(&mut self, cx: &mut Conn) {
        self.response = ResponseState::Done;
        if let Some(start) = self.record.connect_started {
            self.record.log.upstream_response_time = Some(cx.now.saturating_duration_since(start));
        }
        cx.timers.stop(Timer::UpstreamRead);
    }

    /// The upstream closed (`reset`: failed). Completes a read-until-close body, retries a
    /// request that met a stale pooled connection, or fails the exchange.
    pub(super) fn on_upstream_eof(&mut self, cx: &mut Conn, reset: bool) -> Next {
        let Some(up) = self.upstream.as_mut().filter(|u| u.connected) else {
            return Next::Stay;
        };
        up.eof = true;
        let (reused, server) = (up.reused, up.server);
        match &mut self.response {
            ResponseState::Head => {
                let stale_pooled = reused
                    && self.idempotent
                    && !self.has_body
                    && !self.retried
                    && self.upstream_head.is_some();
                if stale_pooled {
                    // The pooled connection was closed by the upstream before our request
                    // reached it (nothing came back). Safe to repeat once on a fresh one; the
                    // balancer slot carries over to the new connection to the same server.
                    self.retried = true;
                    self.upstream = None;
                    cx.outputs.push_back(Output::Close {
                        side: Side::Upstream,
                        abort: false,
                    });
                    cx.in_flight[Side::Upstream.index()] = 0;
                    cx.timers.stop(Timer::SendUpstream);
                    cx.timers.stop(Timer::UpstreamRead);
                    self.connect(cx, server, false)
                } else if reset {
                    Next::Fail(502, CloseReason::UpstreamReset)
                } else {
                    Next::Fail(502, CloseReason::BadResponse(ResponseError::Truncated))
                }
            }
            ResponseState::Body { decoder, .. } => {
                if !reset && decoder.finish_at_eof(&mut |_| {}) {
                    self.mark_response_done(cx);
                    Next::Done
                } else if reset {
                    Next::Abort(CloseReason::UpstreamReset)
                } else {
                    Next::Abort(CloseReason::UpstreamClosed)
                }
            }
            ResponseState::Done => Next::Stay,
        }
    }
}
