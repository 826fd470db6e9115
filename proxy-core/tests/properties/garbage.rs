//! 4. Arbitrary bytes from either peer: no panic, errors close, nothing invalid goes upstream,
//!    bounded holding.

use super::*;

// ---- 4. arbitrary bytes ----

pub(crate) fn small_config() -> Config {
    let mut c = config();
    let l = &mut c.limits;
    l.max_head = 256;
    l.max_headers = 8;
    l.max_uri = 64;
    l.max_body = 200;
    l.max_held = 128;
    l.queue = 128;
    l.max_requests = 4;
    c
}

pub(crate) fn client_templates() -> Vec<Vec<u8>> {
    vec![
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
        b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: v\r\n\r\n".to_vec(),
        ws_request("/ws").into_bytes(),
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /h HTTP/1.0\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\n".to_vec(),
    ]
}

pub(crate) const CLIENT_FRAGMENTS: &[&str] = &[
    "GET ",
    "POST ",
    "/ ",
    "HTTP/1.1",
    "HTTP/1.0",
    "\r\n",
    "\n",
    "\r",
    "Host: a",
    "Host: ",
    "Content-Length: ",
    "5",
    "Transfer-Encoding: chunked",
    "Connection: upgrade",
    "Connection: close",
    "Upgrade: websocket",
    ": ",
    " ",
    "0\r\n",
    "\r\n\r\n",
    "x",
    ";e",
    "\0",
    "hello",
    "Sec-WebSocket-Key: ",
    WS_KEY,
];

pub(crate) const UPSTREAM_FRAGMENTS: &[&str] = &[
    "HTTP/1.1 ",
    "HTTP/1.0 ",
    "200 OK",
    "101 ",
    "100 Continue",
    "204 ",
    "304 ",
    "\r\n",
    "\n",
    "\r",
    "Content-Length: ",
    "3",
    "Transfer-Encoding: chunked",
    "Connection: close",
    "Upgrade: websocket",
    "Sec-WebSocket-Accept: ",
    WS_ACCEPT,
    "0\r\n",
    "\r\n\r\n",
    "abc",
    ";e",
    "\0",
    ": ",
    " ",
];

pub(crate) fn upstream_templates() -> Vec<Vec<u8>> {
    vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n"
            .to_vec(),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec(),
        [ws_101().as_bytes(), b"\x81\x00"].concat(),
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec(),
    ]
}

pub(crate) fn mutate(mut v: Vec<u8>, muts: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(op, pos, b) in muts {
        match op % 3 {
            0 if !v.is_empty() => {
                let i = pos % v.len();
                v[i] = b;
            }
            1 => {
                let i = pos % (v.len() + 1);
                v.insert(i, b);
            }
            2 if !v.is_empty() => {
                let i = pos % v.len();
                v.remove(i);
            }
            _ => {}
        }
    }
    v
}

pub(crate) fn mutation() -> impl Strategy<Value = (u8, usize, u8)> {
    let byte = prop_oneof![any::<u8>(), select(&b"\r\n :;,\t\0-0123456789aAzZ/"[..])];
    (any::<u8>(), any::<usize>(), byte)
}

/// Arbitrary bytes, streams of protocol-shaped fragments, and mutated valid messages.
pub(crate) fn garbage(
    templates: Vec<Vec<u8>>,
    fragments: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(select(fragments), 0..60).prop_map(|v| v.concat().into_bytes()),
        (select(templates), prop::collection::vec(mutation(), 1..6))
            .prop_map(|(t, m)| mutate(t, &m)),
    ]
}

/// Whether the upstream's bytes could contain a genuine 4xx/5xx status line that the proxy
/// would relay (rewritten to HTTP/1.1).
pub(crate) fn claims_error_status(input: &[u8]) -> bool {
    [
        &b"HTTP/1.1 4"[..],
        b"HTTP/1.1 5",
        b"HTTP/1.0 4",
        b"HTTP/1.0 5",
    ]
    .iter()
    .any(|s| contains(input, s))
}

/// Sends `request`, connects, then feeds the upstream's `pieces` (and EOF).
pub(crate) fn run_upstream_bytes(request: &[u8], pieces: &[Vec<u8>], eof: bool) -> Sim {
    let mut sim = Sim::new(small_config());
    sim.client(request);
    sim.connected();
    for piece in pieces {
        sim.upstream(piece);
    }
    if eof {
        sim.upstream_eof();
    }
    sim
}

/// What must not depend on how a peer's bytes were split: the actions (except whether a
/// released upstream is reusable, which bytes after a complete response decide only if they
/// arrive in the same read), each exchange's status and close reason, and whether the session
/// closed.
#[allow(clippy::type_complexity)]
pub(crate) fn outcome(sim: &Sim) -> (Vec<Action>, Vec<(Option<u16>, Option<CloseReason>)>, bool) {
    let actions = sim
        .actions
        .iter()
        .map(|a| match a {
            Action::Release { id, .. } => Action::Release {
                id: *id,
                reusable: false,
            },
            other => other.clone(),
        })
        .collect();
    let events = sim
        .events
        .iter()
        .map(|e| (e.status, e.close.clone()))
        .collect();
    (actions, events, sim.session.is_closed())
}

/// Small limits for the invariance property on arbitrary bytes, with a request-line limit
/// (`max_uri + 32`) below the head limit so that both 414 and 431 are reachable.
pub(crate) fn invariance_config() -> Config {
    small_config()
}

/// Asserts that the client received exactly `answered` relayed copies of `OK2` (in the forms
/// the proxy may give it: keep-alive, close, HTTP/1.0 keep-alive; without its body for HEAD),
/// then at most one error response of the proxy's own, which closes.
pub(crate) fn check_client_stream(client: &[u8], answered: usize) {
    let mut rest = client;
    for i in 0..answered {
        let forms = [
            &b""[..],
            b"Connection: close\r\n",
            b"Connection: keep-alive\r\n",
        ];
        let matched = forms.iter().find_map(|extra| {
            let head = [
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"[..],
                extra,
                b"\r\n",
            ]
            .concat();
            rest.strip_prefix(&head[..])
                .map(|after| after.strip_prefix(b"ok").unwrap_or(after))
        });
        rest = matched.unwrap_or_else(|| {
            panic!(
                "response {i} is not the relayed answer: {:?}",
                lossy(client)
            )
        });
    }
    if !rest.is_empty() {
        check_proxy_error(rest);
    }
}

proptest! {
    #![proptest_config(cases(192))]

    /// Arbitrary client bytes (an upstream that answers every complete request) give the same
    /// client bytes, actions, events and complete upstream requests whole, byte by byte, or in
    /// arbitrary pieces. The upstream bytes may differ only after a body error, where a larger
    /// read discards its valid prefix: whole ⊑ pieces ⊑ bytewise.
    #[test]
    fn client_bytes_chunking_invariance(
        input in garbage(client_templates(), CLIENT_FRAGMENTS),
        sizes in piece_sizes(),
        eof in any::<bool>(),
    ) {
        let whole = run_client_stream(invariance_config(), std::slice::from_ref(&input), eof);
        let pieces = run_client_stream(invariance_config(), &split(&input, &sizes), eof);
        let bytewise = run_client_stream(invariance_config(), &split(&input, &[1]), eof);
        check_client_stream(&pieces.client, pieces.requests.len());
        for (name, a, b) in [("whole/pieces", &whole, &pieces), ("pieces/bytewise", &pieces, &bytewise)] {
            prop_assert!(b.upstream.starts_with(&a.upstream), "{}: {:?} vs {:?}", name, lossy(&a.upstream), lossy(&b.upstream));
            prop_assert_eq!(&a.client, &b.client, "{}", name);
            prop_assert_eq!(&a.actions, &b.actions, "{}", name);
            prop_assert_eq!(&a.events, &b.events, "{}", name);
            prop_assert_eq!(&a.requests, &b.requests, "{}", name);
            prop_assert_eq!(a.closed, b.closed, "{}", name);
        }
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// A head refused for its size (431) or its request line (414) is logged with the same
    /// `bytes_from_client` however it was split into reads.
    #[test]
    fn refused_head_bytes_logged_independently_of_reads(
        long_target in any::<bool>(),
        len in 0usize..200,
        sizes in piece_sizes(),
    ) {
        let request = if long_target {
            format!("GET /{} HTTP/1.1\r\nHost: example.com\r\n\r\n", "t".repeat(80 + len))
        } else {
            format!("GET / HTTP/1.1\r\nHost: example.com\r\nX-Pad: {}\r\n\r\n", "p".repeat(260 + len))
        }
        .into_bytes();
        let whole = run_client_stream(small_config(), std::slice::from_ref(&request), false);
        prop_assert_eq!(whole.events.len(), 1);
        prop_assert_eq!(whole.events[0].status, Some(if long_target { 414 } else { 431 }));
        let pieces = run_client_stream(small_config(), &split(&request, &sizes), false);
        prop_assert_eq!(&pieces.events, &whole.events);
        let bytewise = run_client_stream(small_config(), &split(&request, &[1]), false);
        prop_assert_eq!(&bytewise.events, &whole.events);
    }

    /// A request line longer than `max_uri + 32` bytes is refused with 414 when it arrives in
    /// pieces, but a read holding the whole line skips that check: a complete head (a long
    /// method, an in-limit target) is forwarded, an incomplete one is waited for.
    #[test]
    fn request_line_limit_independent_of_reads(
        method_len in 1usize..120,
        target_len in 1usize..=64,
        complete in any::<bool>(),
        sizes in piece_sizes(),
    ) {
        let mut request = format!(
            "{} /{} HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "M".repeat(method_len),
            "t".repeat(target_len - 1)
        )
        .into_bytes();
        if !complete {
            request.truncate(request.len() - 2);
        }
        let whole = run_client_stream(small_config(), std::slice::from_ref(&request), false);
        let pieces = run_client_stream(small_config(), &split(&request, &sizes), false);
        prop_assert_eq!(&pieces, &whole);
        let bytewise = run_client_stream(small_config(), &split(&request, &[1]), false);
        prop_assert_eq!(&bytewise, &whole);
    }

    /// With `max_uri + 32 > max_head`, an oversized head whose first LF lies past `max_head` (and
    /// within `max_uri + 32`) is classified 431 when read whole (the line end is visible) but 414
    /// when read in pieces (the reader gives up at `max_head + 1` buffered bytes, before the LF).
    #[test]
    fn head_limit_status_independent_of_reads(
        line_len in 240usize..300,
        sizes in piece_sizes(),
    ) {
        let mut config = small_config();
        config.limits.max_head = 256;
        config.limits.max_uri = 256;
        let request = format!(
            "GET /{} HTTP/1.1\r\nHost: example.com\r\nX-Pad: {}\r\n\r\n",
            "t".repeat(line_len - 15),
            "p".repeat(64)
        )
        .into_bytes();
        let whole = run_client_stream(config.clone(), std::slice::from_ref(&request), false);
        let pieces = run_client_stream(config.clone(), &split(&request, &sizes), false);
        prop_assert_eq!(
            pieces.events.first().map(|e| e.status),
            whole.events.first().map(|e| e.status)
        );
        prop_assert_eq!(&pieces.client, &whole.client);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Arbitrary client bytes with an upstream that never answers: no panic; the client gets
    /// nothing or one error response with `Connection: close`; the upstream gets nothing but a
    /// canonical head (and a canonical prefix of its body); a refused head sends nothing upstream.
    #[test]
    fn client_garbage_is_contained(
        input in garbage(client_templates(), CLIENT_FRAGMENTS),
        sizes in piece_sizes(),
        eof in any::<bool>(),
    ) {
        let mut sim = Sim::new(small_config());
        let mut connected = None;
        for piece in split(&input, &sizes) {
            sim.client(piece);
            connect_if_asked(&mut sim, &mut connected);
        }
        if eof {
            sim.client_eof();
            connect_if_asked(&mut sim, &mut connected);
        }

        let client = &sim.client_total;
        if !client.is_empty() {
            check_proxy_error(client);
            prop_assert_eq!(count(client, b"HTTP/1.1 "), 1, "one response at most: {:?}", lossy(client));
            prop_assert!(sim.shut(Side::Client) || sim.closed(Side::Client));
        }
        let upstream = &sim.upstream_total;
        if !upstream.is_empty() {
            let end = head_end(upstream).expect("heads go upstream whole");
            let head = &upstream[..end];
            check_canonical_request_head(head);
            let body = &upstream[end..];
            match framing_of(head) {
                BodyKind::None => prop_assert!(body.is_empty(), "bytes after a bodyless request: {:?}", lossy(upstream)),
                BodyKind::Length(n) => prop_assert!(body.len() <= n),
                BodyKind::Chunked => match parse_canonical_chunked(body) {
                    Canon::Partial => {}
                    Canon::Complete(n) => prop_assert_eq!(n, body.len()),
                    Canon::Invalid(why) => {
                        return Err(TestCaseError::fail(format!("{why}: {:?}", lossy(upstream))))
                    }
                },
            }
            if !client.is_empty() {
                // The request was accepted, so the error must come from its body.
                prop_assert!(framing_of(head) != BodyKind::None, "{:?} / {:?}", lossy(upstream), lossy(client));
                prop_assert!(client.starts_with(b"HTTP/1.1 400 ") || client.starts_with(b"HTTP/1.1 413 "));
            }
        }
    }

    /// Arbitrary upstream bytes after a request was forwarded: no panic; every head the client
    /// gets is valid and canonical; the proxy's own errors close; a non-upgrade request never
    /// gets a 101; an upstream EOF always ends the exchange.
    #[test]
    fn upstream_garbage_is_contained(
        kind in 0usize..3,
        input in garbage(upstream_templates(), UPSTREAM_FRAGMENTS),
        sizes in piece_sizes(),
        eof in any::<bool>(),
    ) {
        let request = match kind {
            0 => b"GET /g HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            1 => b"HEAD /g HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            _ => ws_request("/ws").into_bytes(),
        };
        let sim = run_upstream_bytes(&request, &split(&input, &sizes), eof);

        // Chunking invariance: the client gets the same bytes (up to a body error, where a
        // larger read discards its valid prefix: whole ⊑ pieces ⊑ bytewise), the same actions
        // and the same statuses however the upstream's bytes are split.
        let whole = run_upstream_bytes(&request, std::slice::from_ref(&input), eof);
        let bytewise = run_upstream_bytes(&request, &split(&input, &[1]), eof);
        for (name, a, b) in [("whole/pieces", &whole, &sim), ("pieces/bytewise", &sim, &bytewise)] {
            prop_assert!(b.client_total.starts_with(&a.client_total), "{}: {:?} vs {:?}", name, lossy(&a.client_total), lossy(&b.client_total));
            prop_assert_eq!(outcome(a), outcome(b), "{}", name);
        }

        let client = sim.client_total.clone();
        // Walk the leading heads: interim ones, then the final (or 101) one.
        let mut pos = 0;
        let mut saw_101 = false;
        while pos < client.len() {
            let rest = &client[pos..];
            prop_assert!(rest.starts_with(b"HTTP/1.1 "), "{:?}", lossy(&client));
            let Some(end) = head_end(rest) else {
                return Err(TestCaseError::fail(format!("incomplete head to the client: {:?}", lossy(&client))));
            };
            let head = &rest[..end];
            prop_assert!(!head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "bare LF: {:?}", lossy(head));
            let mut storage = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut storage);
            let parsed = res.parse(head);
            prop_assert!(matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()), "{:?}", lossy(head));
            let status = res.code.unwrap_or(0);
            if status == 101 {
                saw_101 = true;
                prop_assert_eq!(kind, 2, "a 101 for a request that did not ask: {:?}", lossy(&client));
            }
            pos += end;
            if !(100..200).contains(&status) || status == 101 {
                break;
            }
        }
        if !claims_error_status(&input) {
            let mut at = 0;
            while at < client.len() {
                let rest = &client[at..];
                let next = [find(rest, b"HTTP/1.1 4"), find(rest, b"HTTP/1.1 5")].into_iter().flatten().min();
                let Some(i) = next else { break };
                let head_len = head_end(&rest[i..]).unwrap_or(rest.len() - i);
                let head = &rest[i..i + head_len];
                prop_assert!(contains(head, b"\r\nConnection: close\r\n"), "proxy error without close: {:?}", lossy(&client));
                at += i + 1;
            }
        }
        if eof && saw_101 {
            prop_assert!(sim.shut(Side::Client) || sim.session.is_closed(), "a tunnel passes the upstream's FIN on");
        } else if eof {
            prop_assert_eq!(sim.events.len(), 1, "the exchange must end at upstream EOF: {:?}", lossy(&client));
            prop_assert!(sim.session.is_closed() || sim.shut(Side::Client) || sim.session.wants_read(Side::Client));
        }
    }

    /// An adapter that delivers client bytes only while `wants_read(Client)` holds, with an
    /// upstream that never answers: delivery stops (or the session closes) after roughly
    /// `max_held + max_head` bytes beyond the first request, and only that request goes
    /// upstream.
    #[test]
    fn held_client_bytes_are_bounded(
        kind in 0usize..3,
        pattern in prop::collection::vec(any::<u8>(), 1..64),
        sizes in prop::collection::vec(1usize..=32, 1..16),
    ) {
        let first = match kind {
            0 => b"GET /b HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            1 => b"POST /b HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\n"
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'x', 100))
                .collect(),
            _ => ws_request("/ws").into_bytes(),
        };
        let cfg = small_config();
        let bound = first.len() + cfg.limits.max_held + cfg.limits.max_head + 32;
        let mut stream = first.clone();
        while stream.len() < 8 * bound {
            stream.extend_from_slice(&pattern);
        }
        let mut sim = Sim::new(cfg);
        let mut connected = None;
        let mut delivered = 0;
        let mut stopped = false;
        for piece in split(&stream, &sizes) {
            if sim.session.is_closed() || !sim.session.wants_read(Side::Client) {
                stopped = true;
                break;
            }
            delivered += piece.len();
            sim.client(piece);
            connect_if_asked(&mut sim, &mut connected);
        }
        prop_assert!(stopped, "the session kept reading {} bytes", delivered);
        prop_assert!(delivered <= bound, "delivered {} > bound {}", delivered, bound);
        let upstream = &sim.upstream_total;
        prop_assert_eq!(complete_message(upstream), Some(upstream.len()), "{:?}", lossy(upstream));
        prop_assert!(sim.client_total.is_empty(), "{:?}", lossy(&sim.client_total));
    }
}
