//! Turning an upstream's response head into the head the client receives, deciding the body's
//! framing on both sides and whether either connection can be kept; and the proxy's own error
//! responses.
//!
//! A `101` is accepted here only when it answers an upgrade request with the same protocol and,
//! for websocket, the right `Sec-WebSocket-Accept`. Anything the upstream gets wrong is a
//! [`ResponseError`], which the session turns into a 502.

use std::fmt::Write as _;
use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};

use crate::body::Framing;
use crate::error::ResponseError;
use crate::fields::{
    header_slots, is_hop_or_framing, is_token_byte, list_contains, list_items,
    parse_content_length, trim_ows, Items, STACK_HEADERS,
};
use crate::request::check_line_endings;
use crate::upgrade::{check_switch, put_upgrade_fields, UpgradeRequest};

/// What the session knows about the request being answered.
pub(crate) struct ResponseContext<'a> {
    pub(crate) is_head: bool,
    /// The client's HTTP minor version.
    pub(crate) client_minor: u8,
    /// Whether the client connection may stay open, as far as the request side is concerned.
    pub(crate) client_keep_alive: bool,
    pub(crate) upgrade: Option<&'a UpgradeRequest>,
    pub(crate) check_accept: bool,
    pub(crate) max_headers: usize,
    /// The protocols the route lets clients switch to: a `426`'s `Upgrade` names only these.
    pub(crate) protocols: &'a [String],
}

/// How the body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFraming {
    /// Data bytes as they are (no body, a length, or until close).
    Identity,
    /// Re-chunked with the original chunk sizes.
    Chunked,
}

/// A parsed and rewritten response head.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) kind: ResponseKind,
    /// How the upstream delimits the body.
    pub(crate) framing: Framing,
    pub(crate) client_framing: ClientFraming,
    /// Whether the client connection stays open after this response.
    pub(crate) client_keep_alive: bool,
    /// Whether the upstream connection may be reused after this response.
    pub(crate) upstream_reusable: bool,
    /// The head for the client (empty if the client must not see it, e.g. 1xx to HTTP/1.0).
    pub(crate) client_head: Bytes,
}

/// Interim, switch, or final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseKind {
    /// A 1xx other than 101: relayed, and a final response follows.
    Interim,
    /// A valid 101: the connection becomes a tunnel.
    Switch,
    /// The final response.
    Final,
}

/// Validates and rewrites a response head.
pub(crate) fn parse_response(
    head: &[u8],
    ctx: &ResponseContext<'_>,
) -> Result<Response, ResponseError> {
    check_line_endings(head).map_err(ResponseError::Malformed)?;
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots = header_slots(&mut stack, &mut heap, ctx.max_headers);
    let mut res = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, head, slots)
    {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(ResponseError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::HeadTooLarge),
        Err(_) => return Err(ResponseError::Malformed("unparsable status line or field")),
    }
    let (Some(minor), Some(status)) = (res.version, res.code) else {
        return Err(ResponseError::Malformed("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(ResponseError::Malformed("status code out of range"));
    }
    let reason = res.reason.unwrap_or("");

    let mut connection = Items::default();
    let mut content_length: Option<u64> = None;
    let mut has_te = false;
    let mut te_chunked_only = true;
    let mut te_count = 0;
    let mut upgrade_ok = false;
    let mut advertised = Items::default();
    let mut accepts = Items::default();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        if name.eq_ignore_ascii_case(b"connection") {
            connection.extend(list_items(value));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)
                .ok_or(ResponseError::BadFraming("invalid Content-Length"))?;
            if content_length.is_some_and(|p| p != n) {
                return Err(ResponseError::BadFraming("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            for t in list_items(value) {
                te_count += 1;
                te_chunked_only &= t.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            if let Some(up) = ctx.upgrade {
                upgrade_ok |= list_contains(value, up.token.as_bytes());
            }
            if status == 426 {
                advertised.extend(list_items(value).filter(|t| {
                    let name = t.split(|b| *b == b'/').next().unwrap_or(t);
                    ctx.protocols.iter().any(|p| {
                        p.as_bytes().eq_ignore_ascii_case(name) && !p.eq_ignore_ascii_case("h2c")
                    }) && t.iter().all(|b| is_token_byte(*b) || *b == b'/')
                }));
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            accepts.push(value);
        }
    }
    let conn_has = |tok: &[u8]| connection.iter().any(|t| t.eq_ignore_ascii_case(tok));

    let kind = match status {
        101 => {
            check_switch(
                ctx.upgrade,
                minor,
                upgrade_ok,
                accepts.as_slice(),
                ctx.check_accept,
            )?;
            ResponseKind::Switch
        }
        100..=199 => ResponseKind::Interim,
        _ => ResponseKind::Final,
    };

    // Body framing (RFC 9112 §6.3).
    let bodyless = ctx.is_head || status == 204 || status == 304 || kind != ResponseKind::Final;
    let framing = if bodyless {
        Framing::None
    } else if has_te {
        if content_length.is_some() {
            return Err(ResponseError::BadFraming(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if minor == 0 || te_count != 1 || !te_chunked_only {
            return Err(ResponseError::BadFraming(
                "transfer coding other than a single chunked",
            ));
        }
        Framing::Chunked
    } else {
        match content_length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let upstream_reusable = kind == ResponseKind::Final
        && minor == 1
        && !conn_has(b"close")
        && framing != Framing::UntilClose;

    let (client_framing, delimited) = match framing {
        Framing::Chunked if ctx.client_minor == 1 => (ClientFraming::Chunked, true),
        Framing::Chunked | Framing::UntilClose => (ClientFraming::Identity, false),
        Framing::None | Framing::Length(_) => (ClientFraming::Identity, true),
    };
    let client_keep_alive = kind == ResponseKind::Final && ctx.client_keep_alive && delimited;

    if kind == ResponseKind::Interim && ctx.client_minor == 0 {
        // HTTP/1.0 clients do not understand interim responses (RFC 9110 §15.2).
        return Ok(Response {
            status,
            kind,
            framing,
            client_framing,
            client_keep_alive,
            upstream_reusable,
            client_head: Bytes::new(),
        });
    }

    let mut out = BytesMut::with_capacity(head.len() + 64);
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let keep_length = name.eq_ignore_ascii_case(b"content-length")
            && kind == ResponseKind::Final
            && (ctx.is_head || status == 304);
        if (is_hop_or_framing(name) && !keep_length)
            || connection.iter().any(|t| t.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(trim_ows(h.value));
        out.put_slice(b"\r\n");
    }
    match kind {
        ResponseKind::Switch => {
            if let Some(up) = ctx.upgrade {
                put_upgrade_fields(&mut out, up);
            }
        }
        ResponseKind::Interim => {}
        ResponseKind::Final => {
            match (framing, client_framing) {
                (Framing::Length(n), _) => {
                    let _ = write!(out, "Content-Length: {n}\r\n");
                }
                (Framing::None, _) if !ctx.is_head && status != 304 && status != 204 => {
                    out.put_slice(b"Content-Length: 0\r\n");
                }
                (_, ClientFraming::Chunked) => out.put_slice(b"Transfer-Encoding: chunked\r\n"),
                _ => {}
            }
            // A 426 must say what to switch to (RFC 9110 §15.5.22); `Upgrade` is hop-by-hop,
            // so the proxy re-states the protocols it would tunnel, with `Connection: upgrade`.
            let upgrade = !advertised.as_slice().is_empty();
            if upgrade {
                out.put_slice(b"Upgrade: ");
                for (i, t) in advertised.iter().enumerate() {
                    if i > 0 {
                        out.put_slice(b", ");
                    }
                    out.put_slice(t);
                }
                out.put_slice(b"\r\n");
            }
            let persistence: &[u8] = if !client_keep_alive {
                b"close"
            } else if ctx.client_minor == 0 {
                b"keep-alive"
            } else {
                b""
            };
            match (upgrade, persistence.is_empty()) {
                (false, true) => {}
                (false, false) => {
                    out.put_slice(b"Connection: ");
                    out.put_slice(persistence);
                    out.put_slice(b"\r\n");
                }
                (true, true) => out.put_slice(b"Connection: upgrade\r\n"),
                (true, false) => {
                    out.put_slice(b"Connection: upgrade, ");
                    out.put_slice(persistence);
                    out.put_slice(b"\r\n");
                }
            }
        }
    }
    out.put_slice(b"\r\n");
    Ok(Response {
        status,
        kind,
        framing,
        client_framing,
        client_keep_alive,
        upstream_reusable,
        client_head: out.freeze(),
    })
}

/// The reason phrase for statuses the proxy itself produces.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A complete error response: a short text body and `Connection: close`. For HEAD requests the
/// body is left out but its length is still declared. Returns the response and the length of
/// its body (what the access log counts as body bytes).
pub(crate) fn error_response(status: u16, is_head: bool) -> (Bytes, usize) {
    let reason = reason(status);
    let body = format!("{status} {reason}\n");
    // 405 must say what is allowed (RFC 9110 §15.5.6).
    let allow = if status == 405 {
        "Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n"
    } else {
        ""
    };
    let mut s = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {allow}Connection: close\r\n\r\n",
        body.len()
    );
    let body_len = if is_head { 0 } else { body.len() };
    s.push_str(&body[..body_len]);
    (Bytes::from(s), body_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::websocket_accept;

    fn ctx(upgrade: Option<&UpgradeRequest>) -> ResponseContext<'_> {
        ResponseContext {
            is_head: false,
            client_minor: 1,
            client_keep_alive: true,
            upgrade,
            check_accept: true,
            max_headers: 100,
            protocols: &PROTOCOLS,
        }
    }

    static PROTOCOLS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["websocket".to_owned()]);

    #[test]
    fn a_426_names_the_protocols_the_proxy_would_tunnel() {
        let r = parse_response(
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket, h2c, chat/2\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
            &ctx(None),
        )
        .expect("a valid response");
        let head = String::from_utf8(r.client_head.to_vec()).expect("ascii");
        assert!(head.contains("\r\nUpgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: upgrade\r\n"), "{head}");
        assert!(!head.contains("h2c") && !head.contains("chat"), "{head}");
        // Any other status keeps Upgrade out, as the hop-by-hop field it is.
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
            &ctx(None),
        )
        .expect("a valid response");
        assert!(!String::from_utf8_lossy(&r.client_head).contains("Upgrade"));
    }

    fn ws() -> UpgradeRequest {
        UpgradeRequest {
            token: "websocket".into(),
            expected_accept: Some(websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==")),
            is_websocket: true,
        }
    }

    #[test]
    fn genuine_101_switches() {
        let up = ws();
        let r = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            &ctx(Some(&up)),
        )
        .expect("valid");
        assert_eq!(r.kind, ResponseKind::Switch);
        assert_eq!(
            &r.client_head[..],
            &b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
               Upgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..]
        );
    }

    #[test]
    fn bogus_101s_are_refused() {
        let up = ws();
        let good_accept = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";
        let cases: Vec<(String, Option<&UpgradeRequest>, ResponseError)> = vec![
            (format!("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n{good_accept}\r\n"), None, ResponseError::UnsolicitedSwitch),
            (format!("HTTP/1.1 101 OK\r\nUpgrade: h2c\r\n{good_accept}\r\n"), Some(&up), ResponseError::UpgradeMismatch),
            (format!("HTTP/1.0 101 OK\r\nUpgrade: websocket\r\n{good_accept}\r\n"), Some(&up), ResponseError::UpgradeMismatch),
            ("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n".into(), Some(&up), ResponseError::BadAccept),
            ("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n".into(), Some(&up), ResponseError::BadAccept),
            (format!("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n{good_accept}{good_accept}\r\n"), Some(&up), ResponseError::BadAccept),
        ];
        for (head, upgrade, want) in cases {
            assert_eq!(
                parse_response(head.as_bytes(), &ctx(upgrade))
                    .map(|r| r.kind)
                    .err(),
                Some(want),
                "{head}"
            );
        }
    }

    #[test]
    fn final_framing_and_keep_alive() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nKeep-Alive: x\r\n\r\n",
            &ctx(None),
        )
        .expect("ok");
        assert_eq!(
            (r.framing, r.client_keep_alive, r.upstream_reusable),
            (Framing::Length(3), true, true)
        );
        assert_eq!(
            &r.client_head[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
        );

        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            &ctx(None),
        )
        .expect("ok");
        assert_eq!(
            (r.framing, r.client_framing, r.upstream_reusable),
            (Framing::Chunked, ClientFraming::Chunked, false)
        );
        assert!(
            r.client_keep_alive,
            "upstream close does not close the client"
        );

        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", &ctx(None)).expect("ok");
        assert_eq!(
            (r.framing, r.client_keep_alive, r.upstream_reusable),
            (Framing::UntilClose, false, false)
        );
        assert!(r.client_head.ends_with(b"Connection: close\r\n\r\n"));

        let mut c = ctx(None);
        c.client_minor = 0;
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", &c)
            .expect("ok");
        assert_eq!(
            (r.client_framing, r.client_keep_alive),
            (ClientFraming::Identity, false)
        );

        let mut c = ctx(None);
        c.is_head = true;
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", &c).expect("ok");
        assert_eq!(r.framing, Framing::None);
        assert_eq!(
            &r.client_head[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
        );

        for head in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(
                parse_response(head, &ctx(None)).expect("ok").framing,
                Framing::None
            );
        }
    }

    #[test]
    fn bad_upstream_framing() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
            b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(
                parse_response(head, &ctx(None)).is_err(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn interim_responses() {
        let r = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", &ctx(None)).expect("ok");
        assert_eq!(r.kind, ResponseKind::Interim);
        assert_eq!(&r.client_head[..], b"HTTP/1.1 100 Continue\r\n\r\n");
        let mut c = ctx(None);
        c.client_minor = 0;
        assert!(parse_response(b"HTTP/1.1 103 Early Hints\r\n\r\n", &c)
            .expect("ok")
            .client_head
            .is_empty());
    }

    #[test]
    fn error_responses_are_well_formed() {
        let (r, body) = error_response(502, false);
        assert_eq!(body, "502 Bad Gateway\n".len());
        let text = String::from_utf8(r.to_vec()).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n502 Bad Gateway\n"));
        let (head_only, body) = error_response(400, true);
        assert_eq!(body, 0);
        assert!(head_only.ends_with(b"\r\n\r\n"));
    }
}
