//! The idle state: an optional PROXY protocol header, then a request head, which is parsed,
//! routed to a group, given a server by the balancer and rewritten for the upstream before an
//! exchange starts. Nothing is chosen for a head that fails validation, and nothing is sent
//! before the whole head has been rewritten.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use bytes::Bytes;

use super::exchange::Exchange;
use super::{Conn, HttpParts, Session, State};
use crate::balance::Choice;
use crate::config::{BalanceMethod, Config};
use crate::error::RequestError;
use crate::event::CloseReason;
use crate::fields::{header_slots, STACK_HEADERS};
use crate::head::HeadLimit;
use crate::proxy_protocol::{self, ProxyError, ProxyHeader};
use crate::request::{
    check_body_limit, hash_key, parse_request, serialise, ParsedRequest, Request, RequestContext,
};
use crate::route::{route_for, upstream_path, virtual_host, Route, RouteRef};
use crate::timer::Timer;
use crate::upgrade;

/// Room on the request line beyond the request-target: method, spaces and version.
const REQUEST_LINE_SLACK: usize = 32;

/// What one step of the idle state found.
pub(super) enum IdleStep {
    /// Nothing to do until more bytes arrive.
    Wait,
    /// Bytes were consumed; step again.
    Progress,
    /// A complete request head.
    Head(Bytes),
    /// The client closed; `partial` if part of a head had arrived.
    Eof { partial: bool },
    /// The head broke a limit after this many bytes.
    TooLarge(RequestError, u64),
    /// The PROXY protocol header was missing or bad.
    ProxyFailed(ProxyError),
}

/// Feeds queued client bytes to the PROXY header parser, then to the head reader.
pub(super) fn step(http: &mut HttpParts, cx: &mut Conn) -> IdleStep {
    if let Some(buf) = http.proxy_header.as_mut() {
        match take_proxy_header(buf, cx) {
            Ok(true) => http.proxy_header = None,
            Ok(false) => return IdleStep::Wait,
            Err(e) => return IdleStep::ProxyFailed(e),
        }
    }
    let Some(mut chunk) = cx.pop_rx() else {
        return if cx.client_eof {
            IdleStep::Eof {
                partial: !http.request_head.is_empty(),
            }
        } else {
            IdleStep::Wait
        };
    };
    if http.request_head.is_empty() && cx.timers.get(Timer::KeepAlive).is_some() {
        // The first byte of the next request: the keep-alive wait becomes a head deadline.
        cx.timers.stop(Timer::KeepAlive);
        cx.timers
            .arm(Timer::RequestHead, cx.now, cx.config.timeouts.request_head);
    }
    let limits = &cx.config.limits;
    let (max_head, max_line) = (limits.max_head, limits.max_uri + REQUEST_LINE_SLACK);
    let result = http.request_head.push(&mut chunk, max_head, max_line);
    cx.unpop_rx(chunk);
    match result {
        Ok(Some(head)) => IdleStep::Head(head),
        Ok(None) => IdleStep::Progress,
        Err(limit) => {
            // The head is refused at the byte that crossed the limit; logging that count
            // (rather than however much the last read happened to hold) keeps the log
            // independent of how the bytes were split into reads.
            let (err, accepted) = match limit {
                HeadLimit::TooLarge => (RequestError::HeadTooLarge, max_head + 1),
                HeadLimit::LineTooLong => (RequestError::UriTooLong, max_line.min(max_head) + 1),
            };
            IdleStep::TooLarge(err, accepted as u64)
        }
    }
}

/// Feeds the awaited PROXY protocol header: `Ok(true)` once it is complete and applied,
/// `Ok(false)` while more bytes are needed.
fn take_proxy_header(buf: &mut Vec<u8>, cx: &mut Conn) -> Result<bool, ProxyError> {
    while let Some(chunk) = cx.pop_rx() {
        let before = buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(proxy_protocol::V2_MAX)]);
        match proxy_protocol::parse(buf)? {
            None if chunk.len() > proxy_protocol::V2_MAX => return Err(ProxyError::TooLong),
            None => {}
            Some((header, len)) => {
                // The client's own bytes start after the header, in this chunk.
                cx.unpop_rx(chunk.slice((len - before).min(chunk.len())..));
                if let ProxyHeader::Proxied { source, .. } = header {
                    cx.client.addr = source;
                }
                return Ok(true);
            }
        }
    }
    if cx.client_eof {
        return Err(ProxyError::Missing);
    }
    Ok(false)
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
    NoServer(RouteRef),
}

/// parse → route → serialise.
fn prepare(cx: &Conn, head: &[u8]) -> Result<Prepared, RequestError> {
    let config = &*cx.config;
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots = header_slots(&mut stack, &mut heap, config.limits.max_headers);
    let parsed = parse_request(head, slots, &config.limits)?;
    let route = route_request(config, &cx.client, &parsed)?;
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
        BalanceMethod::Hash(key) => Some(hash_key(key, &parsed, cx.client.addr.ip())),
        _ => None,
    };
    let route_ref = RouteRef {
        at: route.map(|(v, r, _)| (v, r)),
        group: gi,
    };
    let choice = Choice {
        client: cx.client.addr.ip(),
        key,
        tried: &[],
        now: cx.now,
    };
    let Some(server) = cx.balancer.pick(config, gi, &choice) else {
        return Ok(Prepared::NoServer(route_ref));
    };
    let path = match route {
        Some((_, _, r)) => upstream_path(r, parsed.path),
        None => Cow::Borrowed(parsed.path),
    };
    let ctx = RequestContext {
        config,
        client: &cx.client,
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
        route: route_ref,
        server,
        key,
    })
}

/// The virtual host and route for `req`: `None` when no virtual host is configured (the
/// implicit route), a 404 when none matches.
fn route_request<'c>(
    config: &'c Config,
    client: &crate::PeerInfo,
    req: &ParsedRequest<'_>,
) -> Result<Option<(usize, usize, &'c Route)>, RequestError> {
    if config.virtual_hosts.is_empty() {
        return Ok(None);
    }
    // A request without Host (HTTP/1.0) is served by the name its TLS handshake asked for.
    let host = req.host.or(client.sni.as_deref().map(str::as_bytes));
    let v = virtual_host(&config.virtual_hosts, client.local, host).ok_or(RequestError::NoRoute)?;
    let routes = &config.virtual_hosts[v].routes;
    let r = route_for(routes, req.path).ok_or(RequestError::NoRoute)?;
    Ok(Some((v, r, &routes[r])))
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
    /// Acts on an idle step; true if the session should step again.
    pub(super) fn on_idle_step(&mut self, step: IdleStep) -> bool {
        match step {
            IdleStep::Wait => false,
            IdleStep::Progress => true,
            IdleStep::Head(head) => {
                self.start_exchange(head);
                true
            }
            IdleStep::Eof { partial } => {
                if partial {
                    let record = super::Record::new(&self.cx, String::new(), 0);
                    self.cx.log(record, Some(CloseReason::ClientClosed), None);
                }
                self.begin_closing();
                false
            }
            IdleStep::TooLarge(err, bytes) => {
                self.refuse(
                    String::new(),
                    bytes,
                    err.status(),
                    CloseReason::BadRequest(err),
                );
                false
            }
            IdleStep::ProxyFailed(e) => {
                self.close_without_answer(CloseReason::ProxyProtocol(Some(e)));
                false
            }
        }
    }

    /// The request-head or keep-alive timer fired while idle.
    pub(super) fn on_idle_timeout(&mut self, timer: Timer) {
        let State::Idle(http) = &self.state else {
            return;
        };
        let cx = &self.cx;
        if http.proxy_header.is_some() {
            // A balancer that never finished its header gets no HTTP answer.
            self.close_without_answer(CloseReason::ProxyProtocol(Some(ProxyError::Missing)));
        } else if timer == Timer::RequestHead && (!http.request_head.is_empty() || cx.rx_len > 0) {
            self.refuse(String::new(), 0, 408, CloseReason::Timeout(timer));
        } else if cx.in_flight[crate::io::Side::Client.index()] > 0 {
            self.begin_closing();
        } else {
            self.close(CloseReason::Timeout(timer));
        }
    }

    /// A complete request head arrived while idle: start its exchange, or refuse it.
    fn start_exchange(&mut self, head: Bytes) {
        // Only the idle state reads heads; its HTTP parts move into the exchange.
        let mut http = match self.take_state() {
            State::Idle(http) => http,
            other => return self.state = other,
        };
        let cx = &mut self.cx;
        cx.requests += 1;
        cx.timers.stop(Timer::RequestHead);
        match prepare(cx, &head) {
            Err(e) => {
                self.state = State::Idle(http);
                let status = e.status();
                self.refuse(
                    first_line(&head),
                    head.len() as u64,
                    status,
                    CloseReason::BadRequest(e),
                );
            }
            Ok(Prepared::NoServer(route)) => {
                // Every server is at max_conns (the only way a valid group has none to give).
                cx.route = route;
                self.state = State::Idle(http);
                self.refuse(
                    first_line(&head),
                    head.len() as u64,
                    502,
                    CloseReason::NoUpstream,
                );
            }
            Ok(Prepared::Ready {
                mut req,
                route,
                server,
                key,
            }) => {
                cx.route = route;
                // The offer is HTTP-side state: a tunnel drops it with the rest of HTTP.
                http.upgrade = req.upgrade.take();
                let f = &mut http.failover;
                f.tried.clear();
                f.key = key;
                f.first_connect = None;
                let mut ex = Exchange::new(http, req, cx, head.len());
                let next = ex.connect(cx, server, true);
                self.state = State::Exchange(ex);
                self.settle(next);
            }
        }
    }
}
