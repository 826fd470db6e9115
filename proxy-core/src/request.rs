//! Turning a client's request head into the head the upstream receives.
//!
//! The head is validated against RFC 9110/9112 (see DESIGN §3) and re-serialised canonically:
//! never copied through. Hop-by-hop fields, and every field a `Connection` line names, are
//! removed before the proxy adds its own (`Host`, `X-Forwarded-*`, configured rules, upgrade and
//! framing fields). This module must never let a byte of an invalid head reach the upstream:
//! everything it returns on error is a status for the client.

use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::balance::Fnv;
use crate::body::Framing;
use crate::config::{
    Config, HashKey, HeaderRule, HostPolicy, KeyPart, Limits, Peer, TemplatePart, Variable,
};
use crate::error::RequestError;
use crate::fields::{
    is_hop_or_framing, is_token_byte, is_valid_host, list_items, parse_content_length, trim_ows,
    Items,
};
use crate::io::PeerInfo;
use crate::upgrade::UpgradeRequest;

/// Longest `Referer` / `User-Agent` kept for the access log.
const MAX_LOGGED_FIELD: usize = 512;

/// A validated request, with the head to send upstream.
#[derive(Debug)]
pub(crate) struct Request {
    /// `METHOD target HTTP/1.x`, for logs.
    pub(crate) request_line: String,
    /// HTTP minor version the client spoke (0 or 1).
    pub(crate) minor: u8,
    pub(crate) is_head: bool,
    /// Whether repeating this request is safe (RFC 9110 §9.2.2).
    pub(crate) idempotent: bool,
    pub(crate) framing: Framing,
    /// Whether the client asked to keep the connection open.
    pub(crate) keep_alive: bool,
    pub(crate) upgrade: Option<UpgradeRequest>,
    pub(crate) host: Option<String>,
    pub(crate) referer: Option<String>,
    pub(crate) user_agent: Option<String>,
    /// The head for the upstream.
    pub(crate) upstream_head: Bytes,
}

/// What the session knows when a head arrives.
pub(crate) struct RequestContext<'a> {
    pub(crate) config: &'a Config,
    pub(crate) client: &'a PeerInfo,
    /// The route's `Host` policy and header edits (the global ones unless it replaces them).
    pub(crate) host: &'a HostPolicy,
    pub(crate) headers: &'a [HeaderRule],
    /// The path to send upstream (the route may have stripped a prefix).
    pub(crate) path: &'a [u8],
}

/// Fields gathered in one pass over the headers.
#[derive(Default)]
struct Seen<'h> {
    host: Option<&'h [u8]>,
    hosts: usize,
    content_length: Option<u64>,
    has_content_length: bool,
    te: Items<'h>,
    has_te: bool,
    connection: Items<'h>,
    upgrade: Items<'h>,
    ws_keys: Items<'h>,
    referer: Option<&'h [u8]>,
    user_agent: Option<&'h [u8]>,
    xff: Items<'h>,
    xfp: Option<&'h [u8]>,
    xfh: Option<&'h [u8]>,
}

/// A request head that passed validation (RFC 9110/9112), borrowing the head's bytes and the
/// header slots it was parsed into. Nothing about where it goes has been decided yet: the router
/// reads it, then [`serialise`] turns it into the upstream head.
pub(crate) struct ParsedRequest<'h> {
    pub(crate) method: &'h str,
    /// The request-target as received.
    pub(crate) target: &'h str,
    /// The origin-form path sent upstream (from an absolute-form target too).
    pub(crate) path: &'h [u8],
    pub(crate) minor: u8,
    headers: &'h [httparse::Header<'h>],
    /// The absolute-form authority, else the `Host` field; `None` when empty or absent.
    pub(crate) host: Option<&'h [u8]>,
    pub(crate) framing: Framing,
    /// Whether the client asked to keep the connection open.
    pub(crate) keep_alive: bool,
    seen: Seen<'h>,
}

impl<'h> ParsedRequest<'h> {
    /// Whether `Connection` (across all its lines) names `token`.
    pub(crate) fn connection_has(&self, token: &[u8]) -> bool {
        self.seen
            .connection
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token))
    }

    /// The `Upgrade` tokens offered, in order.
    pub(crate) fn upgrade_offers(&self) -> &[&'h [u8]] {
        self.seen.upgrade.as_slice()
    }

    /// The first field named `name` (case-insensitive), trimmed.
    pub(crate) fn header(&self, name: &str) -> Option<&'h [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| trim_ows(h.value))
    }

    /// A query parameter's raw value (nginx's `$arg_NAME`).
    pub(crate) fn arg(&self, name: &str) -> Option<&'h [u8]> {
        let (_, query) = split_query(self.path);
        query?
            .split(|b| *b == b'&')
            .find_map(|pair| pair.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
    }

    /// A cookie's value (nginx's `$cookie_NAME`), from any `Cookie` field.
    pub(crate) fn cookie(&self, name: &str) -> Option<&'h [u8]> {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .flat_map(|h| h.value.split(|b| *b == b';'))
            .find_map(|c| {
                trim_ows(c)
                    .strip_prefix(name.as_bytes())?
                    .strip_prefix(b"=")
            })
    }

    /// Every `Sec-WebSocket-Key` value sent.
    pub(crate) fn websocket_keys(&self) -> &[&'h [u8]] {
        self.seen.ws_keys.as_slice()
    }
}

/// Validates `head` (the complete request head, blank line included), parsing its fields into
/// `slots`. Everything it returns on error is a status for the client; nothing has been chosen
/// or sent.
pub(crate) fn parse_request<'h>(
    head: &'h [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'h>>],
    limits: &Limits,
) -> Result<ParsedRequest<'h>, RequestError> {
    let body = trim_leading_empty_lines(head);
    if body.starts_with(b"PRI * HTTP/2.0") {
        return Err(RequestError::Version);
    }
    check_line_endings(head).map_err(RequestError::Malformed)?;

    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, head, slots)
    {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(RequestError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
        Err(httparse::Error::Version) if names_other_http_version(body) => {
            return Err(RequestError::Version)
        }
        Err(httparse::Error::HeaderName) => {
            return Err(RequestError::BadField(
                "invalid field name (whitespace before colon or obs-fold)",
            ))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(RequestError::BadField("invalid byte in field value"))
        }
        Err(_) => return Err(RequestError::Malformed("invalid request line")),
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line"));
    };
    let headers: &'h mut [httparse::Header<'h>] = std::mem::take(&mut req.headers);
    let headers: &'h [httparse::Header<'h>] = headers;
    if target.len() > limits.max_uri {
        return Err(RequestError::UriTooLong);
    }
    if method == "CONNECT" {
        return Err(RequestError::Method);
    }

    let (abs_authority, path) = split_target(method, target)?;

    let mut seen = Seen::default();
    for h in headers {
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        let lower = |s: &[u8]| name.eq_ignore_ascii_case(s);
        if lower(b"host") {
            seen.hosts += 1;
            seen.host = Some(value);
        } else if lower(b"content-length") {
            let n = parse_content_length(value)
                .ok_or(RequestError::BadFraming("invalid Content-Length"))?;
            if seen.content_length.is_some_and(|prev| prev != n) {
                return Err(RequestError::BadFraming("conflicting Content-Length"));
            }
            seen.content_length = Some(n);
            seen.has_content_length = true;
        } else if lower(b"transfer-encoding") {
            seen.has_te = true;
            seen.te.extend(list_items(value));
        } else if lower(b"connection") {
            seen.connection.extend(list_items(value));
        } else if lower(b"upgrade") {
            seen.upgrade.extend(list_items(value));
        } else if lower(b"sec-websocket-key") {
            seen.ws_keys.push(value);
        } else if lower(b"referer") {
            seen.referer = Some(value);
        } else if lower(b"user-agent") {
            seen.user_agent = Some(value);
        } else if lower(b"x-forwarded-for") {
            seen.xff.push(value);
        } else if lower(b"x-forwarded-proto") {
            seen.xfp = Some(value);
        } else if lower(b"x-forwarded-host") {
            seen.xfh = Some(value);
        }
    }

    // Host (RFC 9112 §3.2).
    if seen.hosts > 1 {
        return Err(RequestError::BadField("duplicate Host"));
    }
    if minor == 1 && seen.hosts == 0 {
        return Err(RequestError::BadField("missing Host"));
    }
    if let Some(h) = seen.host {
        if !is_valid_host(h) {
            return Err(RequestError::BadField("invalid Host"));
        }
    }
    let host: Option<&[u8]> = abs_authority.or(seen.host).filter(|h| !h.is_empty());

    // Connection options.
    for t in &seen.connection {
        if !t.iter().all(|b| is_token_byte(*b)) {
            return Err(RequestError::BadField("invalid Connection option"));
        }
        if t.eq_ignore_ascii_case(b"host")
            || t.eq_ignore_ascii_case(b"content-length")
            || t.eq_ignore_ascii_case(b"transfer-encoding")
        {
            return Err(RequestError::BadField("Connection names a framing field"));
        }
    }
    let conn_has = |tok: &[u8]| seen.connection.iter().any(|t| t.eq_ignore_ascii_case(tok));
    let keep_alive = if minor == 1 {
        !conn_has(b"close")
    } else {
        conn_has(b"keep-alive") && !conn_has(b"close")
    };

    // Framing (RFC 9112 §6).
    let framing = if seen.has_te {
        if minor == 0 {
            return Err(RequestError::BadFraming("Transfer-Encoding on HTTP/1.0"));
        }
        if seen.has_content_length {
            return Err(RequestError::BadFraming(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        match seen.te.as_slice() {
            [only] if only.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            [.., last] if !last.eq_ignore_ascii_case(b"chunked") => {
                return Err(RequestError::BadFraming(
                    "chunked is not the final transfer coding",
                ))
            }
            [] => return Err(RequestError::BadFraming("empty Transfer-Encoding")),
            items
                if items
                    .iter()
                    .filter(|t| t.eq_ignore_ascii_case(b"chunked"))
                    .count()
                    > 1 =>
            {
                return Err(RequestError::BadFraming("chunked applied more than once"))
            }
            _ => return Err(RequestError::UnsupportedTransferCoding),
        }
    } else {
        match seen.content_length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };

    Ok(ParsedRequest {
        method,
        target,
        path,
        minor,
        headers,
        host,
        framing,
        keep_alive,
        seen,
    })
}

/// The path and the query of an origin-form target.
fn split_query(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|b| *b == b'?') {
        Some(q) => (&path[..q], Some(&path[q + 1..])),
        None => (path, None),
    }
}

/// The consistent-hash key of `req`: the parts of `key` expanded in order (an absent variable
/// is empty) and hashed as [`key_hash`](crate::balance::key_hash) hashes the whole text.
pub(crate) fn hash_key(key: &HashKey, req: &ParsedRequest<'_>, client: IpAddr) -> u64 {
    let mut h = Fnv::new();
    for part in key.parts() {
        match part {
            KeyPart::Literal(l) => h.write(l.as_bytes()),
            KeyPart::RemoteAddr => {
                let mut text = BytesMut::new();
                put_ip(&mut text, client.to_canonical());
                h.write(&text);
            }
            KeyPart::Uri => h.write(split_query(req.path).0),
            KeyPart::Arg(name) => h.write(req.arg(name).unwrap_or_default()),
            KeyPart::Cookie(name) => h.write(req.cookie(name).unwrap_or_default()),
            KeyPart::Header(name) => h.write(req.header(name).unwrap_or_default()),
        }
    }
    h.finish()
}

/// Refuses a declared body over `max_body` (0: no limit) before anything is sent. A chunked
/// body is counted as it streams.
pub(crate) fn check_body_limit(req: &ParsedRequest<'_>, max_body: u64) -> Result<(), RequestError> {
    match req.framing {
        Framing::Length(n) if max_body != 0 && n > max_body => Err(RequestError::BodyTooLarge),
        _ => Ok(()),
    }
}

/// The request as the session keeps it, with the head for `peer`: re-serialised canonically,
/// hop-by-hop fields and those `Connection` names removed, then the proxy's own fields.
// Out of line on purpose: inlined into the request path, it pushes that past the inliner's
// budget and its many small `put_slice` calls stop being inlined (+5 % instructions per
// exchange, counted with `benches/src/bin/instructions.rs`).
#[inline(never)]
pub(crate) fn serialise(
    req: &ParsedRequest<'_>,
    ctx: &RequestContext<'_>,
    upgrade: Option<UpgradeRequest>,
    peer: &Peer,
) -> Request {
    let ParsedRequest {
        method,
        target,
        minor,
        host,
        framing,
        keep_alive,
        ..
    } = *req;
    let path = ctx.path;
    let seen = &req.seen;
    let config = ctx.config;
    let client_ip = ctx.client.addr.ip().to_canonical();
    let host_out: &[u8] = match (ctx.host, host) {
        (HostPolicy::Client, Some(h)) => h,
        (HostPolicy::Literal(l), _) => l.as_bytes(),
        _ => peer.authority().as_bytes(),
    };
    let var = |v: Variable, out: &mut BytesMut| match v {
        Variable::RemoteAddr => put_ip(out, client_ip),
        Variable::Host => out.put_slice(host.unwrap_or(host_out)),
        Variable::Scheme => out.put_slice(ctx.client.scheme.as_str().as_bytes()),
        Variable::RequestUri => out.put_slice(target.as_bytes()),
    };
    let ruled = |name: &[u8]| {
        ctx.headers.iter().any(|r| match r {
            HeaderRule::Set { name: n, .. } | HeaderRule::Remove { name: n } => {
                n.as_bytes().eq_ignore_ascii_case(name)
            }
        })
    };
    let trusted = config.trusted_proxies.iter().any(|n| n.contains(client_ip));

    let head_len: usize = req
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len() + 4)
        .sum();
    let mut out = BytesMut::with_capacity(method.len() + path.len() + head_len + 160);
    out.put_slice(method.as_bytes());
    out.put_u8(b' ');
    out.put_slice(path);
    out.put_slice(b" HTTP/1.1\r\nHost: ");
    out.put_slice(host_out);
    out.put_slice(b"\r\n");
    for h in req.headers {
        let name = h.name.as_bytes();
        let named_by_connection = seen.connection.iter().any(|t| t.eq_ignore_ascii_case(name));
        if name.eq_ignore_ascii_case(b"host")
            || is_hop_or_framing(name)
            || named_by_connection
            || is_forwarding(name)
            || (!trusted && is_client_claim(name))
            || ruled(name)
        {
            continue;
        }
        put_field(&mut out, name, trim_ows(h.value));
    }
    if !ruled(b"x-forwarded-for") {
        out.put_slice(b"X-Forwarded-For: ");
        if trusted {
            for prior in &seen.xff {
                out.put_slice(prior);
                out.put_slice(b", ");
            }
        }
        put_ip(&mut out, client_ip);
        out.put_slice(b"\r\n");
    }
    if !ruled(b"x-forwarded-proto") {
        let proto = seen
            .xfp
            .filter(|_| trusted)
            .unwrap_or(ctx.client.scheme.as_str().as_bytes());
        put_field(&mut out, b"X-Forwarded-Proto", proto);
    }
    if !ruled(b"x-forwarded-host") {
        if let Some(h) = seen.xfh.filter(|_| trusted).or(host) {
            put_field(&mut out, b"X-Forwarded-Host", h);
        }
    }
    for rule in ctx.headers {
        if let HeaderRule::Set { name, value } = rule {
            out.put_slice(name.as_bytes());
            out.put_slice(b": ");
            for part in value.parts() {
                match part {
                    TemplatePart::Literal(l) => out.put_slice(l.as_bytes()),
                    TemplatePart::Var(v) => var(*v, &mut out),
                }
            }
            out.put_slice(b"\r\n");
        }
    }
    if let Some(up) = &upgrade {
        crate::upgrade::put_upgrade_fields(&mut out, up);
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => out.put_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None if seen.has_content_length => out.put_slice(b"Content-Length: 0\r\n"),
        Framing::None | Framing::UntilClose => {}
    }
    out.put_slice(b"\r\n");

    Request {
        request_line: request_line(method, target, minor),
        minor,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        framing,
        keep_alive,
        upgrade,
        host: host.map(|h| String::from_utf8_lossy(h).into_owned()),
        referer: seen.referer.map(loggable),
        user_agent: seen.user_agent.map(loggable),
        upstream_head: out.freeze(),
    }
}

/// Whether the request line is well-shaped but names an HTTP version other than 1.x, so that 505
/// is the right answer rather than 400.
fn names_other_http_version(head: &[u8]) -> bool {
    let line = head.split(|b| *b == b'\r').next().unwrap_or(head);
    let parts: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    matches!(parts.as_slice(), [m, t, v] if !m.is_empty() && !t.is_empty() && v.starts_with(b"HTTP/") && !v.starts_with(b"HTTP/1."))
}

/// Writes an address as text without the formatting machinery (it is on every request's path).
fn put_ip(out: &mut BytesMut, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'.');
                }
                let mut digits = [0u8; 3];
                let mut n = octet;
                let mut len = 0;
                loop {
                    digits[len] = b'0' + n % 10;
                    len += 1;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                digits[..len].reverse();
                out.put_slice(&digits[..len]);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `METHOD target HTTP/1.x`, in one allocation of the right size.
fn request_line(method: &str, target: &str, minor: u8) -> String {
    let mut line = String::with_capacity(method.len() + target.len() + 10);
    line.push_str(method);
    line.push(' ');
    line.push_str(target);
    line.push_str(if minor == 0 { " HTTP/1.0" } else { " HTTP/1.1" });
    line
}

fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

fn is_forwarding(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for")
        || name.eq_ignore_ascii_case(b"x-forwarded-proto")
        || name.eq_ignore_ascii_case(b"x-forwarded-host")
}

/// Fields that claim who the client is. From a client that is not a trusted proxy they are lies
/// a backend might believe, so they are dropped; from a trusted one they pass. (The proxy adds
/// `X-Forwarded-*` itself; `Forwarded` and `X-Real-IP` only when configured, e.g.
/// `set_headers = { X-Real-IP = "$remote_addr" }`.)
fn is_client_claim(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"forwarded") || name.eq_ignore_ascii_case(b"x-real-ip")
}

fn loggable(v: &[u8]) -> String {
    String::from_utf8_lossy(&v[..v.len().min(MAX_LOGGED_FIELD)]).into_owned()
}

/// Splits the request-target into an absolute-form authority (if any) and the origin-form path
/// sent upstream.
fn split_target<'t>(
    method: &str,
    target: &'t str,
) -> Result<(Option<&'t [u8]>, &'t [u8]), RequestError> {
    let t = target.as_bytes();
    if t.contains(&b'#') {
        // A fragment is the client's business and never valid on the wire (RFC 9112 §3.2).
        return Err(RequestError::Malformed("fragment in request target"));
    }
    if t.first() == Some(&b'/') {
        return Ok((None, t));
    }
    if t == b"*" {
        return if method == "OPTIONS" {
            Ok((None, t))
        } else {
            Err(RequestError::Malformed("asterisk-form target"))
        };
    }
    let rest = strip_prefix_ci(t, b"http://").or_else(|| strip_prefix_ci(t, b"https://"));
    let Some(rest) = rest else {
        return Err(RequestError::Malformed(
            "request target is not origin- or absolute-form",
        ));
    };
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || !is_valid_host(authority) || authority.contains(&b'@') {
        return Err(RequestError::Malformed(
            "invalid authority in absolute-form target",
        ));
    }
    match path.first() {
        Some(b'/') => Ok((Some(authority), path)),
        // "http://h?q" and "http://h" mean path "/"; the query cannot be kept without copying,
        // and such targets are vanishingly rare, so refuse the query form rather than mangle it.
        None => Ok((Some(authority), b"/")),
        Some(_) => Err(RequestError::Malformed(
            "absolute-form target without a path",
        )),
    }
}

fn strip_prefix_ci<'a>(t: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (t.len() >= prefix.len() && t[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &t[prefix.len()..])
}

fn trim_leading_empty_lines(mut head: &[u8]) -> &[u8] {
    while let Some(rest) = head.strip_prefix(b"\r\n") {
        head = rest;
    }
    head
}

/// Every LF must be part of a CRLF, and every CR of one: bare line endings are a classic
/// smuggling vector when two parsers disagree about them.
pub(crate) fn check_line_endings(head: &[u8]) -> Result<(), &'static str> {
    for i in memchr::memchr2_iter(b'\r', b'\n', head) {
        match head[i] {
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err("bare LF line ending"),
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err("bare CR"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{HostPolicy, IpNet, Template, UpstreamGroup};
    use crate::fields::{header_slots, STACK_HEADERS};

    #[test]
    fn put_ip_writes_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("an address literal");
            let mut out = BytesMut::new();
            put_ip(&mut out, ip);
            assert_eq!(&out[..], ip.to_string().as_bytes());
        }
    }

    fn config() -> Config {
        Config::new(UpstreamGroup::new(vec![Peer::new("10.9.9.9", 8080)]))
    }

    /// The session's path through this module: parse, check, detect the offer, serialise.
    fn run(config: &Config, head: &str) -> Result<Request, RequestError> {
        let client = PeerInfo::new("192.0.2.7:5555".parse().expect("addr"));
        let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots = header_slots(&mut stack, &mut heap, config.limits.max_headers);
        let parsed = parse_request(head.as_bytes(), slots, &config.limits)?;
        check_body_limit(&parsed, config.limits.max_body)?;
        let offer = crate::upgrade::offer(&parsed, &config.upgrade_protocols);
        let ctx = RequestContext {
            config,
            client: &client,
            host: &config.host,
            headers: &config.headers,
            path: parsed.path,
        };
        Ok(serialise(
            &parsed,
            &ctx,
            offer,
            &config.upstream.servers[0].peer,
        ))
    }

    fn upstream(config: &Config, head: &str) -> String {
        let r = run(config, head).expect("valid request");
        String::from_utf8(r.upstream_head.to_vec()).expect("utf8")
    }

    #[test]
    fn canonical_rewrite_strips_hop_by_hop() {
        let out = upstream(
            &config(),
            "GET /a?b HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n\
             X-Secret: 1\r\nTE: trailers\r\nTrailer: x\r\nProxy-Authorization: p\r\nProxy-Connection: x\r\n\
             HTTP2-Settings: x\r\nUpgrade: foo\r\nAccept:   text/html  \r\n\r\n",
        );
        assert_eq!(
            out,
            "GET /a?b HTTP/1.1\r\nHost: example.com\r\nAccept: text/html\r\nX-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: example.com\r\n\r\n"
        );
    }

    #[test]
    fn websocket_upgrade_detected_and_forwarded() {
        let head = "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let r = run(&config(), head).expect("valid");
        let up = r.upgrade.as_ref().expect("upgrade");
        assert_eq!(up.token, "websocket");
        assert_eq!(
            up.expected_accept.as_ref().map(|a| &a[..]),
            Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
        );
        let out = String::from_utf8(r.upstream_head.to_vec()).expect("utf8");
        assert!(
            out.ends_with("Upgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
    }

    #[test]
    fn not_an_upgrade_gets_no_upgrade_headers() {
        for head in [
            "POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
            "GET /ws HTTP/1.0\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgradex\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let r = run(&config(), head).expect("valid");
            assert!(r.upgrade.is_none(), "{head}");
            let out = String::from_utf8(r.upstream_head.to_vec()).expect("utf8").to_ascii_lowercase();
            assert!(!out.contains("upgrade"), "{out}");
        }
    }

    #[test]
    fn malformed_vectors() {
        let cases: &[(&str, u16)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\n\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\n\r\n", 400),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            ("GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("G T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1048577\r\n\r\n", 413),
        ];
        for (head, status) in cases {
            let got = run(&config(), head).map(|_| ()).map_err(|e| e.status());
            assert_eq!(got, Err(*status), "{head:?}");
        }
    }

    #[test]
    fn header_counts_beyond_the_stack_slots() {
        let mut c = config();
        c.limits.max_headers = 300;
        let fields: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        let r = run(&c, &format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n"))
            .expect("200 fields allowed");
        assert!(String::from_utf8_lossy(&r.upstream_head).contains("X-199: v\r\n"));
        c.limits.max_headers = 150;
        let e = run(&c, &format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n")).map(|_| ());
        assert_eq!(e.map_err(|e| e.status()), Err(431));
    }

    #[test]
    fn limits_on_uri_and_header_count() {
        let mut c = config();
        c.limits.max_uri = 10;
        assert_eq!(
            run(&c, "GET /0123456789a HTTP/1.1\r\nHost: a\r\n\r\n")
                .map_err(|e| e.status())
                .err(),
            Some(414)
        );
        c.limits.max_headers = 2;
        assert_eq!(
            run(&c, "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n")
                .map_err(|e| e.status())
                .err(),
            Some(431)
        );
    }

    #[test]
    fn framing_and_keep_alive() {
        let r = run(
            &config(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(r.framing, Framing::Length(5));
        assert!(String::from_utf8_lossy(&r.upstream_head).contains("Content-Length: 5\r\n"));
        let r = run(
            &config(),
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(r.framing, Framing::Chunked);
        assert!(!r.keep_alive);
        let r = run(&config(), "GET / HTTP/1.0\r\n\r\n").expect("ok");
        assert!(!r.keep_alive);
        assert!(String::from_utf8_lossy(&r.upstream_head)
            .starts_with("GET / HTTP/1.1\r\nHost: 10.9.9.9:8080\r\n"));
        let r = run(
            &config(),
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        )
        .expect("ok");
        assert!(r.keep_alive);
        let r = run(&config(), "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("leading empty lines are ignored");
        assert_eq!(r.request_line, "GET / HTTP/1.1");
    }

    #[test]
    fn forwarded_and_x_real_ip_pass_only_from_trusted_proxies() {
        let head =
            "GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=1.1.1.1\r\nX-Real-IP: 1.1.1.1\r\n\r\n";
        let out = upstream(&config(), head);
        assert!(!out.contains("\r\nForwarded:"), "{out}");
        assert!(!out.contains("X-Real-IP"), "{out}");
        let mut c = config();
        c.trusted_proxies
            .push(IpNet::parse("192.0.2.0/24").expect("net"));
        let out = upstream(&c, head);
        assert!(out.contains("Forwarded: for=1.1.1.1\r\n"), "{out}");
        assert!(out.contains("X-Real-IP: 1.1.1.1\r\n"), "{out}");
    }

    #[test]
    fn forwarded_headers_trusted_and_not() {
        let head = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: orig\r\n\r\n";
        let out = upstream(&config(), head);
        assert!(out.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{out}");
        assert!(out.contains("X-Forwarded-Proto: http\r\n"));
        assert!(out.contains("X-Forwarded-Host: a\r\n"));
        assert!(!out.contains("1.1.1.1") && !out.contains("orig"));
        let mut c = config();
        c.trusted_proxies
            .push(IpNet::parse("192.0.2.0/24").expect("net"));
        let out = upstream(&c, head);
        assert!(
            out.contains("X-Forwarded-For: 1.1.1.1, 192.0.2.7\r\n"),
            "{out}"
        );
        assert!(out.contains("X-Forwarded-Proto: https\r\n"));
        assert!(out.contains("X-Forwarded-Host: orig\r\n"));
    }

    #[test]
    fn host_policies_and_rules() {
        let mut c = config();
        c.host = HostPolicy::Upstream;
        assert!(
            upstream(&c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n").contains("Host: 10.9.9.9:8080\r\n")
        );
        c.host = HostPolicy::Literal("backend.internal".into());
        c.headers = vec![
            HeaderRule::Set {
                name: "X-Real-IP".into(),
                value: Template::parse("$remote_addr").expect("t"),
            },
            HeaderRule::Set {
                name: "X-Uri".into(),
                value: Template::parse("$scheme://$host$request_uri").expect("t"),
            },
            HeaderRule::Remove {
                name: "Cookie".into(),
            },
        ];
        let out = upstream(
            &c,
            "GET /p?q HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nX-Real-IP: spoof\r\n\r\n",
        );
        assert!(out.contains("Host: backend.internal\r\n"), "{out}");
        assert!(out.contains("X-Real-IP: 192.0.2.7\r\n"));
        assert!(out.contains("X-Uri: http://a/p?q\r\n"));
        assert!(!out.contains("Cookie") && !out.contains("spoof"));
    }

    #[test]
    fn absolute_form_target() {
        let r = run(
            &config(),
            "GET http://Example.org/x HTTP/1.1\r\nHost: other\r\n\r\n",
        )
        .expect("ok");
        let out = String::from_utf8(r.upstream_head.to_vec()).expect("utf8");
        assert!(
            out.starts_with("GET /x HTTP/1.1\r\nHost: Example.org\r\n"),
            "{out}"
        );
    }
}
