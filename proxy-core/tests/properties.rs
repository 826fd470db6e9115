//! Property tests for the session (DESIGN §4), driven through the simulation harness:
//!
//! 1. chunking invariance of request streams (client side);
//! 2. chunking invariance of responses (upstream side);
//! 3. tunnel fidelity under arbitrary interleavings, half-closes and backpressure;
//! 4. arbitrary bytes from either peer: no panic, errors close, nothing invalid goes upstream,
//!    and bounded holding when the adapter honours `wants_read`;
//! 5. hop-by-hop fields never reach the upstream;
//! 6. no tunnel without a genuine `101`;
//! 7. timers always make progress and a silent session always ends;
//! 8. only requests that are safe to repeat are retried after a stale pooled connection.
//!
//! Beyond the list: request and response bodies under backpressure (3b), and chunking invariance
//! on arbitrary bytes from either peer (in 4). Three properties pin down head-limit behaviour
//! that once depended on how bytes were split into reads (414 vs 431, the request-line limit,
//! and the logged byte count of a refused head).
//!
//! Every property asserts on bytes and behaviour, so each can fail. Case counts are kept small
//! (64–256) so the file runs in a few seconds in debug builds.

mod sim;

use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use proxy_core::{
    websocket_accept, CloseReason, Config, ConnectError, ExchangeLog, Input, Side, UpstreamId,
};
use sim::{config, ws_101, ws_request, Action, Sim, WS_ACCEPT, WS_KEY};

// ---- shared helpers ----

/// A proptest configuration with `n` cases (or `PROPTEST_CASES`, for a longer hunt) that writes
/// no regression files.
fn cases(n: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Splits `data` into pieces whose sizes cycle through `sizes` (each at least 1).
fn split(data: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    if sizes.is_empty() {
        return if data.is_empty() {
            Vec::new()
        } else {
            vec![data.to_vec()]
        };
    }
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let n = sizes[i % sizes.len()].max(1).min(data.len() - pos);
        out.push(data[pos..pos + n].to_vec());
        pos += n;
        i += 1;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    if hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The end (exclusive) of the first head in `buf`, if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|i| i + 4)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The header lines of a canonical head as `(lower-case name, value)`, request/status line
/// excluded.
fn fields(head: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for line in head.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
        let name = lossy(&line[..colon]).to_ascii_lowercase();
        let value = line.get(colon + 2..).unwrap_or(b"").to_vec();
        out.push((name, value));
    }
    out
}

fn field_values(head: &[u8], name: &str) -> Vec<Vec<u8>> {
    fields(head)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// The body framing a canonical head declares.
fn framing_of(head: &[u8]) -> BodyKind {
    if field_values(head, "transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case(b"chunked"))
    {
        return BodyKind::Chunked;
    }
    match field_values(head, "content-length").first() {
        Some(v) => BodyKind::Length(lossy(v).parse().unwrap_or(0)),
        None => BodyKind::None,
    }
}

/// How far a byte string is a canonical chunked body (lower-case hex sizes without leading
/// zeros or extensions, CRLF after data, `0\r\n\r\n` without trailers).
#[derive(Debug, PartialEq, Eq)]
enum Canon {
    Complete(usize),
    Partial,
    Invalid(String),
}

fn parse_canonical_chunked(buf: &[u8]) -> Canon {
    let is_hex = |b: &u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let Some(off) = find(rest, b"\r\n") else {
            let digits = rest.strip_suffix(b"\r").unwrap_or(rest);
            let ok = digits.iter().all(is_hex)
                && digits.len() <= 16
                && !(digits.len() > 1 && digits[0] == b'0')
                && !(rest.ends_with(b"\r") && digits.is_empty());
            return if ok {
                Canon::Partial
            } else {
                Canon::Invalid(format!("bad size line {:?}", lossy(rest)))
            };
        };
        let line = &rest[..off];
        if line.is_empty()
            || line.len() > 16
            || !line.iter().all(is_hex)
            || (line.len() > 1 && line[0] == b'0')
        {
            return Canon::Invalid(format!("bad size line {:?}", lossy(line)));
        }
        let Ok(size) = usize::from_str_radix(&lossy(line), 16) else {
            return Canon::Invalid("size overflows".into());
        };
        pos += off + 2;
        let rest = &buf[pos..];
        if size == 0 {
            return if rest.len() >= 2 {
                if &rest[..2] == b"\r\n" {
                    Canon::Complete(pos + 2)
                } else {
                    Canon::Invalid("last chunk not followed by CRLF".into())
                }
            } else if b"\r\n".starts_with(rest) {
                Canon::Partial
            } else {
                Canon::Invalid("last chunk not followed by CRLF".into())
            };
        }
        if rest.len() < size + 2 {
            if rest.len() > size && !b"\r\n".starts_with(&rest[size..]) {
                return Canon::Invalid("chunk data not followed by CRLF".into());
            }
            return Canon::Partial;
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Canon::Invalid("chunk data not followed by CRLF".into());
        }
        pos += size + 2;
    }
}

/// The length of the first complete message (canonical head and body) in `buf`.
fn complete_message(buf: &[u8]) -> Option<usize> {
    let end = head_end(buf)?;
    match framing_of(&buf[..end]) {
        BodyKind::None => Some(end),
        BodyKind::Length(n) => (buf.len() >= end + n).then_some(end + n),
        BodyKind::Chunked => match parse_canonical_chunked(&buf[end..]) {
            Canon::Complete(n) => Some(end + n),
            Canon::Partial => None,
            Canon::Invalid(why) => panic!("upstream got a non-canonical chunked body: {why}"),
        },
    }
}

/// Hop-by-hop fields that may never reach the upstream (Connection and Upgrade are checked
/// separately: they appear exactly for genuine upgrade requests).
const HOP_ONLY: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "proxy-authorization",
    "http2-settings",
];

/// Asserts that `head` is a head the proxy may legitimately write upstream: complete, CRLF-only,
/// parseable, HTTP/1.1, one `Host` first, no hop-by-hop fields, unambiguous framing.
fn check_canonical_request_head(head: &[u8]) {
    let show = lossy(head);
    for (i, b) in head.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && head[i - 1] == b'\r', "bare LF upstream: {show:?}"),
            b'\r' => assert_eq!(head.get(i + 1), Some(&b'\n'), "bare CR upstream: {show:?}"),
            0 => panic!("NUL upstream: {show:?}"),
            _ => {}
        }
    }
    let mut storage = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, head.len(), "{show:?}"),
        other => panic!("upstream head does not parse ({other:?}): {show:?}"),
    }
    assert_eq!(
        req.version,
        Some(1),
        "upstream always gets HTTP/1.1: {show:?}"
    );
    let names: Vec<String> = req
        .headers
        .iter()
        .map(|h| h.name.to_ascii_lowercase())
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("host"), "{show:?}");
    assert_eq!(names.iter().filter(|n| *n == "host").count(), 1, "{show:?}");
    for n in &names {
        assert!(
            !HOP_ONLY.contains(&n.as_str()),
            "hop-by-hop {n} upstream: {show:?}"
        );
    }
    let cl = names.iter().filter(|n| *n == "content-length").count();
    let te = field_values(head, "transfer-encoding");
    assert!(cl <= 1 && te.len() <= 1 && cl + te.len() <= 1, "{show:?}");
    assert!(te.iter().all(|v| v == b"chunked"), "{show:?}");
    let conn = field_values(head, "connection");
    let upgrade = field_values(head, "upgrade");
    assert_eq!(
        conn.len(),
        upgrade.len(),
        "Connection only with Upgrade: {show:?}"
    );
    assert!(conn.len() <= 1, "{show:?}");
    assert!(conn.iter().all(|v| v == b"upgrade"), "{show:?}");
}

/// Asserts that `resp` is exactly one error response the proxy produced itself.
fn check_proxy_error(resp: &[u8]) {
    let show = lossy(resp);
    assert!(
        resp.starts_with(b"HTTP/1.1 4") || resp.starts_with(b"HTTP/1.1 5"),
        "with no upstream answer the client can only get an error: {show:?}"
    );
    let end = head_end(resp).unwrap_or_else(|| panic!("incomplete error head: {show:?}"));
    let head = &resp[..end];
    assert!(
        contains(head, b"\r\nConnection: close\r\n"),
        "an error must close: {show:?}"
    );
    match framing_of(head) {
        BodyKind::Length(n) => assert!(resp.len() - end == n || resp.len() == end, "{show:?}"),
        other => panic!("error response framed as {other:?}: {show:?}"),
    }
}

// ---- strategies shared by several properties ----

fn token(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        select(&b"abcdefghijklmnopqrstuvwxyz0123456789-"[..]),
        1..=max,
    )
    .prop_map(|v| lossy(&v))
}

fn visible(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(0x21u8..0x7f, 0..=max).prop_map(|v| lossy(&v))
}

fn piece_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=24, 1..24)
}

fn side() -> impl Strategy<Value = Side> {
    any::<bool>().prop_map(|c| if c { Side::Client } else { Side::Upstream })
}

/// A chunk as a sender might write it: size in some spelling, extensions, data.
#[derive(Debug, Clone)]
struct ChunkSpec {
    data: Vec<u8>,
    style: u8,
    ext: String,
}

fn chunk_ext() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => token(8).prop_map(|t| format!(";{t}")),
        1 => (token(6), token(6)).prop_map(|(a, b)| format!(";{a}={b}")),
        1 => (token(6), visible(12)).prop_map(|(a, v)| format!(" ;{a}=\"{v}\"")),
        1 => (token(4), token(4), token(4)).prop_map(|(a, b, c)| format!(";{a}={b};{c}")),
    ]
}

fn chunk() -> impl Strategy<Value = ChunkSpec> {
    (
        prop::collection::vec(any::<u8>(), 1..24),
        0u8..3,
        chunk_ext(),
    )
        .prop_map(|(data, style, ext)| ChunkSpec { data, style, ext })
}

fn trailers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((token(10), visible(16)), 0..3)
}

/// Writes a chunked body with the given spellings, extensions and trailers.
fn write_chunked(
    out: &mut Vec<u8>,
    chunks: &[ChunkSpec],
    last_ext: &str,
    trailers: &[(String, String)],
) {
    for c in chunks {
        let size = match c.style {
            0 => format!("{:x}", c.data.len()),
            1 => format!("{:X}", c.data.len()),
            _ => format!("00{:x}", c.data.len()),
        };
        out.extend_from_slice(format!("{size}{}\r\n", c.ext).as_bytes());
        out.extend_from_slice(&c.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("0{last_ext}\r\n").as_bytes());
    for (name, value) in trailers {
        out.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// The canonical re-chunking the proxy must produce for `chunks`.
fn canonical_chunked(chunks: &[ChunkSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.data.len()).as_bytes());
        out.extend_from_slice(&c.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Completes the pending connect, if there is one not yet completed.
fn connect_if_asked(sim: &mut Sim, connected: &mut Option<UpstreamId>) -> bool {
    if sim.last_connect.is_some() && sim.last_connect != *connected {
        *connected = sim.last_connect;
        sim.connected();
        return true;
    }
    false
}

// ---- 1. chunking invariance, client side ----

#[derive(Debug, Clone)]
enum ReqBody {
    None,
    Length(Vec<u8>),
    Chunked {
        chunks: Vec<ChunkSpec>,
        last_ext: String,
        trailers: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone)]
struct ReqSpec {
    path: String,
    extra: Vec<(String, String)>,
    body: ReqBody,
}

fn req_spec() -> impl Strategy<Value = ReqSpec> {
    let body = prop_oneof![
        Just(ReqBody::None),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(ReqBody::Length),
        (
            prop::collection::vec(chunk(), 0..4),
            chunk_ext(),
            trailers()
        )
            .prop_map(|(chunks, last_ext, trailers)| ReqBody::Chunked {
                chunks,
                last_ext,
                trailers
            }),
    ];
    (
        token(12),
        prop::collection::vec((token(10), visible(20)), 0..3),
        body,
    )
        .prop_map(|(path, extra, body)| ReqSpec { path, extra, body })
}

impl ReqSpec {
    fn method(&self) -> &'static str {
        match self.body {
            ReqBody::None => "GET",
            _ => "POST",
        }
    }

    fn write(&self, out: &mut Vec<u8>, close: bool) {
        out.extend_from_slice(
            format!(
                "{} /{} HTTP/1.1\r\nHost: example.com\r\n",
                self.method(),
                self.path
            )
            .as_bytes(),
        );
        for (name, value) in &self.extra {
            out.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
        }
        match &self.body {
            ReqBody::None => {}
            ReqBody::Length(data) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n", data.len()).as_bytes())
            }
            ReqBody::Chunked { .. } => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        match &self.body {
            ReqBody::None => {}
            ReqBody::Length(data) => out.extend_from_slice(data),
            ReqBody::Chunked {
                chunks,
                last_ext,
                trailers,
            } => write_chunked(out, chunks, last_ext, trailers),
        }
    }

    /// The body the upstream must receive.
    fn upstream_body(&self) -> Vec<u8> {
        match &self.body {
            ReqBody::None => Vec::new(),
            ReqBody::Length(data) => data.clone(),
            ReqBody::Chunked { chunks, .. } => canonical_chunked(chunks),
        }
    }
}

const OK2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Everything observable about a run.
#[derive(Debug, PartialEq)]
struct Observed {
    upstream: Vec<u8>,
    client: Vec<u8>,
    actions: Vec<Action>,
    events: Vec<ExchangeLog>,
    closed: bool,
    /// The requests the fake upstream saw, one complete message each.
    requests: Vec<Vec<u8>>,
}

fn observe(sim: &Sim, requests: Vec<Vec<u8>>) -> Observed {
    Observed {
        upstream: sim.upstream_total.clone(),
        client: sim.client_total.clone(),
        actions: sim.actions.clone(),
        events: sim.events.clone(),
        closed: sim.session.is_closed(),
        requests,
    }
}

/// Feeds `pieces` from the client; the fake upstream connects when asked and answers each
/// request with `OK2` once the whole request has reached it.
fn run_client_stream(config: Config, pieces: &[Vec<u8>], eof: bool) -> Observed {
    let mut sim = Sim::new(config);
    let mut connected = None;
    let mut requests = Vec::new();
    let mut pump = |sim: &mut Sim| loop {
        let mut progressed = connect_if_asked(sim, &mut connected);
        if let Some(len) = complete_message(&sim.upstream_rx) {
            let request: Vec<u8> = sim.upstream_rx.drain(..len).collect();
            check_canonical_request_head(&request[..head_end(&request).unwrap_or(len)]);
            requests.push(request);
            sim.upstream(OK2);
            progressed = true;
        }
        if !progressed {
            break;
        }
    };
    for piece in pieces {
        sim.client(piece);
        pump(&mut sim);
    }
    if eof {
        sim.client_eof();
        pump(&mut sim);
    }
    observe(&sim, requests)
}

proptest! {
    #![proptest_config(cases(128))]

    /// A keep-alive stream of 1–3 requests (GET, POST with Content-Length, POST chunked with
    /// extensions and trailers) gives the same upstream bytes, client bytes, actions and
    /// events whether it arrives whole, byte by byte, or in arbitrary pieces.
    #[test]
    fn client_chunking_invariance(
        reqs in prop::collection::vec(req_spec(), 1..=3),
        close_last in any::<bool>(),
        sizes in piece_sizes(),
    ) {
        let mut stream = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            r.write(&mut stream, close_last && i + 1 == reqs.len());
        }
        let whole = run_client_stream(config(), std::slice::from_ref(&stream), false);

        // The whole run is itself correct: every request forwarded, canonically framed, answered.
        prop_assert_eq!(whole.requests.len(), reqs.len(), "{:?}", lossy(&whole.upstream));
        for (got, want) in whole.requests.iter().zip(&reqs) {
            let end = head_end(got).expect("complete head");
            check_canonical_request_head(&got[..end]);
            let line = format!("{} /{} HTTP/1.1\r\n", want.method(), want.path);
            prop_assert!(got.starts_with(line.as_bytes()), "{:?}", lossy(got));
            prop_assert_eq!(&got[end..], &want.upstream_body()[..]);
        }
        check_client_stream(&whole.client, reqs.len());
        prop_assert_eq!(whole.events.len(), reqs.len());
        prop_assert!(whole.events.iter().all(|e| e.status == Some(200)));
        prop_assert_eq!(whole.closed || whole.actions.contains(&Action::ShutdownWrite(Side::Client)), close_last);

        let bytewise = run_client_stream(config(), &split(&stream, &[1]), false);
        prop_assert_eq!(&bytewise, &whole);
        let pieces = run_client_stream(config(), &split(&stream, &sizes), false);
        prop_assert_eq!(&pieces, &whole);
    }
}

// ---- 2. chunking invariance, upstream side ----

#[derive(Debug, Clone)]
enum RespBody {
    Length(Vec<u8>),
    Chunked {
        chunks: Vec<ChunkSpec>,
        last_ext: String,
        trailers: Vec<(String, String)>,
    },
    UntilClose(Vec<u8>),
    NoContent,
}

#[derive(Debug, Clone)]
struct RespSpec {
    interim: Vec<usize>,
    extra: Vec<(String, String)>,
    body: RespBody,
}

const INTERIM: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
    "HTTP/1.1 102 Processing\r\n\r\n",
];

fn resp_spec() -> impl Strategy<Value = RespSpec> {
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..60).prop_map(RespBody::Length),
        (
            prop::collection::vec(chunk(), 0..4),
            chunk_ext(),
            trailers()
        )
            .prop_map(|(chunks, last_ext, trailers)| RespBody::Chunked {
                chunks,
                last_ext,
                trailers
            }),
        prop::collection::vec(any::<u8>(), 0..60).prop_map(RespBody::UntilClose),
        Just(RespBody::NoContent),
    ];
    (
        prop::collection::vec(0..INTERIM.len(), 0..3),
        prop::collection::vec((token(10), visible(20)), 0..3),
        body,
    )
        .prop_map(|(interim, extra, body)| RespSpec {
            interim,
            extra,
            body,
        })
}

impl RespSpec {
    fn write(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for i in &self.interim {
            out.extend_from_slice(INTERIM[*i].as_bytes());
        }
        let status = match self.body {
            RespBody::NoContent => "204 No Content",
            _ => "200 OK",
        };
        out.extend_from_slice(format!("HTTP/1.1 {status}\r\n").as_bytes());
        for (name, value) in &self.extra {
            out.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
        }
        match &self.body {
            RespBody::Length(data) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
            }
            RespBody::Chunked {
                chunks,
                last_ext,
                trailers,
            } => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                write_chunked(&mut out, chunks, last_ext, trailers);
            }
            RespBody::UntilClose(data) => {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(data);
            }
            RespBody::NoContent => out.extend_from_slice(b"\r\n"),
        }
        out
    }

    /// What the client must receive after the final head.
    fn client_body(&self) -> Vec<u8> {
        match &self.body {
            RespBody::Length(data) | RespBody::UntilClose(data) => data.clone(),
            RespBody::Chunked { chunks, .. } => canonical_chunked(chunks),
            RespBody::NoContent => Vec::new(),
        }
    }
}

fn run_response(pieces: &[Vec<u8>], until_close: bool) -> Observed {
    let mut sim = Sim::default_config();
    sim.client("GET /r HTTP/1.1\r\nHost: example.com\r\n\r\n");
    sim.connected();
    let head = std::mem::take(&mut sim.upstream_rx);
    for piece in pieces {
        sim.upstream(piece);
    }
    if until_close {
        sim.upstream_eof();
    }
    observe(&sim, vec![head])
}

proptest! {
    #![proptest_config(cases(128))]

    /// A response (Content-Length, chunked with extensions and trailers, until-close, 204,
    /// each possibly after 1xx interim responses) gives the client the same bytes however the
    /// upstream's writes are split.
    #[test]
    fn upstream_chunking_invariance(resp in resp_spec(), sizes in piece_sizes()) {
        let bytes = resp.write();
        let until_close = matches!(resp.body, RespBody::UntilClose(_));
        let whole = run_response(std::slice::from_ref(&bytes), until_close);

        let mut interim = Vec::new();
        for i in &resp.interim {
            interim.extend_from_slice(INTERIM[*i].as_bytes());
        }
        prop_assert!(whole.client.starts_with(&interim), "{:?}", lossy(&whole.client));
        let end = interim.len()
            + head_end(&whole.client[interim.len()..]).expect("a final head reached the client");
        let final_head = &whole.client[interim.len()..end];
        prop_assert_eq!(&whole.client[end..], &resp.client_body()[..]);
        prop_assert_eq!(contains(final_head, b"\r\nConnection: close\r\n"), until_close);
        let reusable = !until_close;
        let released = whole.actions.iter().any(|a| matches!(a, Action::Release { reusable: r, .. } if *r == reusable));
        prop_assert!(released, "{:?}", whole.actions);
        prop_assert_eq!(whole.events.len(), 1);

        let bytewise = run_response(&split(&bytes, &[1]), until_close);
        prop_assert_eq!(&bytewise, &whole);
        let pieces = run_response(&split(&bytes, &sizes), until_close);
        prop_assert_eq!(&pieces, &whole);
    }
}

// ---- 3. tunnel fidelity ----

#[derive(Debug, Clone)]
enum TunnelOp {
    Data(Side, Vec<u8>),
    Eof(Side),
    Ack(Side),
}

fn tunnel_ops() -> impl Strategy<Value = Vec<TunnelOp>> {
    let op = prop_oneof![
        6 => (side(), prop::collection::vec(any::<u8>(), 1..48)).prop_map(|(s, d)| TunnelOp::Data(s, d)),
        1 => side().prop_map(TunnelOp::Eof),
        3 => side().prop_map(TunnelOp::Ack),
    ];
    prop::collection::vec(op, 0..40)
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

/// What `side` has received so far in the sim.
fn received(sim: &Sim, side: Side) -> &[u8] {
    match side {
        Side::Client => &sim.client_rx,
        Side::Upstream => &sim.upstream_rx,
    }
}

/// Checks the end state of a tunnel run: each side received exactly what the other sent, in
/// order; each FIN was passed on; both FINs end the session.
fn check_tunnel_end(sim: &Sim, sent: &[Vec<u8>; 2], eof: [bool; 2]) {
    assert_eq!(
        received(sim, Side::Upstream),
        &sent[0][..],
        "upstream got the client's bytes"
    );
    assert_eq!(
        received(sim, Side::Client),
        &sent[1][..],
        "client got the upstream's bytes"
    );
    for from in [Side::Client, Side::Upstream] {
        // A FIN is passed on by a shutdown, or, when it ends the tunnel, by the close that
        // follows once everything is flushed.
        let fin_sent = sim.shut(from.other()) || sim.closed(from.other());
        assert_eq!(
            fin_sent,
            eof[idx(from)],
            "FIN from {from:?} is passed on exactly when it happened"
        );
    }
    if eof == [true, true] {
        assert!(sim.session.is_closed());
        assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
        assert_eq!(sim.events.len(), 1);
        assert!(sim.events[0].upgraded);
        assert_eq!(sim.events[0].bytes_from_client, {
            let head = ws_request("/ws").len() as u64;
            head + sent[0].len() as u64
        });
    } else {
        assert!(!sim.session.is_closed());
        assert!(sim.events.is_empty());
        for s in [Side::Client, Side::Upstream] {
            assert_eq!(sim.session.wants_read(s), !eof[idx(s)]);
        }
    }
}

fn tunnel_config(queue: usize) -> Config {
    let mut c = config();
    c.limits.queue = queue;
    c
}

proptest! {
    #![proptest_config(cases(192))]

    /// With fast peers, any interleaving of data and half-closes from both sides arrives
    /// intact and in order on the other side.
    #[test]
    fn tunnel_relays_interleavings(ops in tunnel_ops()) {
        let mut sim = Sim::default_config();
        sim.open_tunnel();
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut eof = [false, false];
        for op in &ops {
            match op {
                TunnelOp::Data(s, d) if !eof[idx(*s)] => {
                    sent[idx(*s)].extend_from_slice(d);
                    sim.input(Input::Data { from: *s, bytes: bytes::Bytes::copy_from_slice(d) });
                }
                TunnelOp::Eof(s) if !eof[idx(*s)] => {
                    eof[idx(*s)] = true;
                    sim.input(Input::Eof { from: *s });
                }
                _ => {}
            }
        }
        check_tunnel_end(&sim, &sent, eof);
    }

    /// With slow peers (acks at arbitrary points) and an adapter that reads a side only while
    /// `wants_read` says so, output still equals input, in-flight bytes stay bounded by the
    /// queue, and no byte follows a FIN.
    #[test]
    fn tunnel_relays_under_backpressure(ops in tunnel_ops(), queue in 1usize..64) {
        const MAX_PIECE: usize = 47;
        let mut sim = Sim::new(tunnel_config(queue));
        sim.open_tunnel();
        sim.auto_ack = false;
        let mut pending: [std::collections::VecDeque<Vec<u8>>; 2] = Default::default();
        let mut eof_wanted = [false, false];
        let mut eof = [false, false];
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Bytes received by a side when it was shut down, to check nothing follows the FIN.
        let mut at_shutdown: [Option<usize>; 2] = [None, None];

        let pump = |sim: &mut Sim,
                        pending: &mut [std::collections::VecDeque<Vec<u8>>; 2],
                        eof_wanted: &[bool; 2],
                        eof: &mut [bool; 2],
                        sent: &mut [Vec<u8>; 2],
                        at_shutdown: &mut [Option<usize>; 2]| {
            loop {
                let mut progressed = false;
                for s in [Side::Client, Side::Upstream] {
                    if !sim.session.wants_read(s) {
                        continue;
                    }
                    if let Some(d) = pending[idx(s)].pop_front() {
                        sent[idx(s)].extend_from_slice(&d);
                        sim.input(Input::Data { from: s, bytes: bytes::Bytes::from(d) });
                        progressed = true;
                    } else if eof_wanted[idx(s)] && !eof[idx(s)] {
                        eof[idx(s)] = true;
                        sim.input(Input::Eof { from: s });
                        progressed = true;
                    }
                }
                for s in [Side::Client, Side::Upstream] {
                    assert!(
                        sim.unacked[idx(s)] < queue + MAX_PIECE,
                        "in-flight to {s:?} grew to {} with queue {queue}",
                        sim.unacked[idx(s)]
                    );
                    if sim.shut(s) && at_shutdown[idx(s)].is_none() {
                        assert_eq!(sim.unacked[idx(s)], 0, "FIN to {s:?} before its bytes were flushed");
                        at_shutdown[idx(s)] = Some(received(sim, s).len());
                    }
                }
                if !progressed {
                    break;
                }
            }
        };

        for op in &ops {
            match op {
                TunnelOp::Data(s, d) if !eof_wanted[idx(*s)] => pending[idx(*s)].push_back(d.clone()),
                TunnelOp::Eof(s) => eof_wanted[idx(*s)] = true,
                TunnelOp::Ack(s) => sim.ack(*s),
                TunnelOp::Data(..) => {}
            }
            pump(&mut sim, &mut pending, &eof_wanted, &mut eof, &mut sent, &mut at_shutdown);
        }
        // The peers catch up: everything held must eventually be delivered.
        for _ in 0..10_000 {
            let done = pending.iter().all(|p| p.is_empty())
                && eof == eof_wanted
                && sim.unacked == [0, 0];
            if done {
                break;
            }
            sim.ack(Side::Client);
            sim.ack(Side::Upstream);
            pump(&mut sim, &mut pending, &eof_wanted, &mut eof, &mut sent, &mut at_shutdown);
        }
        prop_assert!(pending.iter().all(|p| p.is_empty()), "bytes stuck behind wants_read");
        prop_assert_eq!(eof, eof_wanted);
        check_tunnel_end(&sim, &sent, eof);
        for s in [Side::Client, Side::Upstream] {
            if let Some(n) = at_shutdown[idx(s)] {
                prop_assert_eq!(received(&sim, s).len(), n, "bytes to {:?} after its FIN", s);
            }
        }
    }
}

// ---- 3b. HTTP bodies under backpressure ----

/// `data` cut into chunks of the given sizes, written canonically.
fn chunks_of(data: &[u8], sizes: &[usize]) -> Vec<ChunkSpec> {
    split(data, sizes)
        .into_iter()
        .map(|data| ChunkSpec {
            data,
            style: 0,
            ext: String::new(),
        })
        .collect()
}

/// A message head with `first` as its start line and a body framed by Content-Length or
/// chunked; returns the message and the body the receiver must get.
fn message(first: &str, body: &[u8], chunked: bool, chunk_sizes: &[usize]) -> (Vec<u8>, Vec<u8>) {
    let mut out = first.as_bytes().to_vec();
    if chunked {
        let chunks = chunks_of(body, chunk_sizes);
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        write_chunked(&mut out, &chunks, "", &[]);
        (out, canonical_chunked(&chunks))
    } else {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        (out, body.to_vec())
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// A request body and a response body cross a session whose peers acknowledge writes at
    /// arbitrary points, with an adapter that reads a side only while `wants_read` says so:
    /// every byte arrives, canonically framed; in-flight bytes stay bounded by the queue;
    /// nothing deadlocks; the client connection is kept alive afterwards.
    #[test]
    fn bodies_flow_under_backpressure(
        req_body in prop::collection::vec(any::<u8>(), 0..300),
        req_chunked in any::<bool>(),
        resp_body in prop::collection::vec(any::<u8>(), 0..300),
        resp_chunked in any::<bool>(),
        chunk_sizes in prop::collection::vec(1usize..64, 1..6),
        read_sizes in piece_sizes(),
        queue in 1usize..64,
        acks in prop::collection::vec((any::<bool>(), any::<bool>()), 0..80),
    ) {
        const SLACK: usize = 24 + 16; // one read, plus chunk framing
        let (request, want_up) = message(
            "POST /up HTTP/1.1\r\nHost: example.com\r\n",
            &req_body,
            req_chunked,
            &chunk_sizes,
        );
        let (response, want_down) =
            message("HTTP/1.1 200 OK\r\n", &resp_body, resp_chunked, &chunk_sizes);
        let mut sim = Sim::new(tunnel_config(queue));
        sim.auto_ack = false;
        let mut client_pending: std::collections::VecDeque<Vec<u8>> =
            split(&request, &read_sizes).into();
        let mut upstream_pending = std::collections::VecDeque::new();
        let mut responded = false;
        let mut connected = None;
        for round in 0..10_000 {
            let mut progressed = false;
            if sim.session.wants_read(Side::Client) {
                if let Some(p) = client_pending.pop_front() {
                    sim.client(p);
                    progressed = true;
                }
            }
            progressed |= connect_if_asked(&mut sim, &mut connected);
            if !responded && complete_message(&sim.upstream_total).is_some() {
                responded = true;
                upstream_pending = split(&response, &read_sizes).into();
                progressed = true;
            }
            if sim.session.wants_read(Side::Upstream) {
                if let Some(p) = upstream_pending.pop_front() {
                    sim.upstream(p);
                    progressed = true;
                }
            }
            let (ack_client, ack_upstream) = acks.get(round).copied().unwrap_or((true, true));
            if ack_client && sim.unacked[0] > 0 {
                sim.ack(Side::Client);
                progressed = true;
            }
            if ack_upstream && sim.unacked[1] > 0 {
                sim.ack(Side::Upstream);
                progressed = true;
            }
            let up_head = head_end(&sim.upstream_total).unwrap_or(0);
            let down_head = head_end(&sim.client_total).unwrap_or(0);
            prop_assert!(sim.unacked[1] <= up_head + queue + SLACK, "in flight upstream {} (queue {})", sim.unacked[1], queue);
            prop_assert!(sim.unacked[0] <= down_head + queue + SLACK, "in flight to client {} (queue {})", sim.unacked[0], queue);
            if !progressed && round >= acks.len() {
                break;
            }
        }
        prop_assert!(client_pending.is_empty(), "request bytes stuck behind wants_read(Client)");
        prop_assert!(responded, "the request never fully reached the upstream");
        prop_assert!(upstream_pending.is_empty(), "response bytes stuck behind wants_read(Upstream)");
        let up_head = head_end(&sim.upstream_total).expect("request head upstream");
        check_canonical_request_head(&sim.upstream_total[..up_head]);
        prop_assert_eq!(&sim.upstream_total[up_head..], &want_up[..]);
        let down_head = head_end(&sim.client_total).expect("response head to client");
        prop_assert_eq!(&sim.client_total[down_head..], &want_down[..]);
        prop_assert_eq!(sim.events.len(), 1);
        prop_assert_eq!(sim.events[0].status, Some(200));
        prop_assert_eq!(&sim.events[0].close, &None);
        prop_assert!(!sim.session.is_closed() && sim.session.wants_read(Side::Client));
    }
}

// ---- 4. arbitrary bytes ----

fn small_config() -> Config {
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

fn client_templates() -> Vec<Vec<u8>> {
    vec![
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
        b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: v\r\n\r\n".to_vec(),
        ws_request("/ws").into_bytes(),
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /h HTTP/1.0\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\n".to_vec(),
    ]
}

const CLIENT_FRAGMENTS: &[&str] = &[
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

const UPSTREAM_FRAGMENTS: &[&str] = &[
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

fn upstream_templates() -> Vec<Vec<u8>> {
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

fn mutate(mut v: Vec<u8>, muts: &[(u8, usize, u8)]) -> Vec<u8> {
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

fn mutation() -> impl Strategy<Value = (u8, usize, u8)> {
    let byte = prop_oneof![any::<u8>(), select(&b"\r\n :;,\t\0-0123456789aAzZ/"[..])];
    (any::<u8>(), any::<usize>(), byte)
}

/// Arbitrary bytes, streams of protocol-shaped fragments, and mutated valid messages.
fn garbage(
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
fn claims_error_status(input: &[u8]) -> bool {
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
fn run_upstream_bytes(request: &[u8], pieces: &[Vec<u8>], eof: bool) -> Sim {
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
fn outcome(sim: &Sim) -> (Vec<Action>, Vec<(Option<u16>, Option<CloseReason>)>, bool) {
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
fn invariance_config() -> Config {
    small_config()
}

/// Asserts that the client received exactly `answered` relayed copies of `OK2` (in the forms
/// the proxy may give it: keep-alive, close, HTTP/1.0 keep-alive; without its body for HEAD),
/// then at most one error response of the proxy's own, which closes.
fn check_client_stream(client: &[u8], answered: usize) {
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

// ---- 5. hop-by-hop fields ----

const HOPS: &[(&str, &str)] = &[
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
    ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
];

/// `Upgrade` values a client may send, and the token a genuine upgrade forwards (the first
/// allowed one; only websocket is allowed).
const UPGRADES: &[(&str, Option<&str>)] = &[
    ("websocket", Some("websocket")),
    ("WebSocket", Some("WebSocket")),
    ("h2c", None),
    ("foo", None),
    ("h2c, websocket", Some("websocket")),
    ("foo ,WebSocket", Some("WebSocket")),
];

/// Ways to separate the elements of a `Connection` list (empty elements are allowed).
const SEPARATORS: &[&str] = &[", ", ",", " , ", ",, ", ",\t"];

#[derive(Debug, Clone)]
struct HopCase {
    post: bool,
    hops: Vec<(usize, u64)>,
    custom: Vec<(String, u64)>,
    conn_upgrade: bool,
    upgrade: Option<usize>,
    conn_extra: Vec<usize>,
    split_connection: bool,
    sep: usize,
    ws_key: bool,
    sizes: Vec<usize>,
}

/// Flips the case of ASCII letters where `mask` has a bit set.
fn recase(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            } else {
                c
            }
        })
        .collect()
}

fn hop_case() -> impl Strategy<Value = HopCase> {
    (
        any::<bool>(),
        prop::collection::vec((0..HOPS.len(), any::<u64>()), 0..6),
        prop::collection::vec((token(8), any::<u64>()), 0..3),
        any::<bool>(),
        prop::option::of(0..UPGRADES.len()),
        prop::collection::vec(0usize..2, 0..2),
        any::<bool>(),
        0..SEPARATORS.len(),
        any::<bool>(),
        piece_sizes(),
    )
        .prop_map(
            |(
                post,
                hops,
                custom,
                conn_upgrade,
                upgrade,
                conn_extra,
                split_connection,
                sep,
                ws_key,
                sizes,
            )| {
                HopCase {
                    post,
                    hops,
                    custom,
                    conn_upgrade,
                    upgrade,
                    conn_extra,
                    split_connection,
                    sep,
                    ws_key,
                    sizes,
                }
            },
        )
}

impl HopCase {
    fn genuine_upgrade(&self) -> bool {
        self.forwarded_token().is_some()
    }

    /// The `Upgrade` token the upstream must get, for a genuine upgrade request.
    fn forwarded_token(&self) -> Option<&'static str> {
        if self.post || !self.conn_upgrade {
            return None;
        }
        self.upgrade.and_then(|u| UPGRADES[u].1)
    }

    fn custom_name(name: &str) -> String {
        format!("x-c-{name}")
    }

    fn write(&self) -> Vec<u8> {
        let method = if self.post { "POST" } else { "GET" };
        let mut s = format!("{method} /hop HTTP/1.1\r\nHost: example.com\r\nX-Keep: yes\r\n");
        for (i, mask) in &self.hops {
            let (name, value) = HOPS[*i];
            s.push_str(&format!("{}: {value}\r\n", recase(name, *mask)));
        }
        let mut tokens: Vec<String> = Vec::new();
        for (name, mask) in &self.custom {
            let name = Self::custom_name(name);
            s.push_str(&format!("{}: v\r\n", recase(&name, *mask)));
            tokens.push(recase(&name, mask.rotate_left(7)));
        }
        if self.conn_upgrade {
            tokens.push("Upgrade".into());
        }
        for e in &self.conn_extra {
            tokens.push(["keep-alive", "close"][*e].into());
        }
        if !tokens.is_empty() {
            if self.split_connection && tokens.len() > 1 {
                let (a, b) = tokens.split_at(tokens.len() / 2);
                s.push_str(&format!("Connection: {}\r\n", a.join(SEPARATORS[self.sep])));
                s.push_str(&format!("connection: {}\r\n", b.join(",")));
            } else {
                s.push_str(&format!(
                    "Connection: {}\r\n",
                    tokens.join(SEPARATORS[self.sep])
                ));
            }
        }
        if let Some(u) = self.upgrade {
            s.push_str(&format!("Upgrade: {}\r\n", UPGRADES[u].0));
        }
        if self.ws_key {
            s.push_str(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
            ));
        }
        if self.post {
            s.push_str("Content-Length: 3\r\n\r\nabc");
        } else {
            s.push_str("\r\n");
        }
        s.into_bytes()
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Hop-by-hop fields and every field a `Connection` line names never reach the upstream;
    /// `Upgrade` / `Connection: upgrade` appear exactly for a genuine websocket upgrade.
    #[test]
    fn hop_by_hop_fields_never_reach_upstream(case in hop_case()) {
        let request = case.write();
        let mut sim = Sim::default_config();
        for piece in split(&request, &case.sizes) {
            sim.client(piece);
        }
        prop_assert_eq!(sim.connects(), 1, "{:?}", lossy(&request));
        sim.connected();
        let upstream = sim.upstream_total.clone();
        let end = head_end(&upstream).expect("the head reached the upstream");
        let head = &upstream[..end];
        let method = if case.post { "POST" } else { "GET" };
        let start = format!("{method} /hop HTTP/1.1\r\nHost: example.com\r\n");
        prop_assert!(head.starts_with(start.as_bytes()), "{:?}", lossy(head));
        check_canonical_request_head(head);
        let names: Vec<String> = fields(head).into_iter().map(|(n, _)| n).collect();
        for (name, _) in &case.custom {
            let name = HopCase::custom_name(name);
            prop_assert!(!names.contains(&name), "{} named by Connection reached upstream: {:?}", name, lossy(head));
        }
        prop_assert!(names.iter().any(|n| n == "x-keep"), "an end-to-end field was lost: {:?}", lossy(head));
        let upgrade = field_values(head, "upgrade");
        let connection = field_values(head, "connection");
        if case.genuine_upgrade() {
            let token = case.forwarded_token().expect("genuine has a token");
            prop_assert_eq!(upgrade, vec![token.as_bytes().to_vec()]);
            prop_assert_eq!(connection, vec![b"upgrade".to_vec()]);
        } else {
            prop_assert!(upgrade.is_empty() && connection.is_empty(), "{:?}", lossy(head));
        }
        if case.post {
            prop_assert_eq!(framing_of(head), BodyKind::Length(3));
            prop_assert_eq!(&upstream[end..], b"abc");
        } else {
            prop_assert_eq!(upstream.len(), end);
        }
    }
}

// ---- 6. no tunnel without a genuine 101 ----

const SWITCH_TOKENS: &[&str] = &["websocket", "WebSocket", "WEBSOCKET", "h2c", "websocket/13"];

#[derive(Debug, Clone)]
enum AcceptKind {
    Genuine,
    Missing,
    Doubled,
    OtherKey(Vec<u8>),
    Random(String),
}

#[derive(Debug, Clone)]
struct SwitchCase {
    status: u16,
    http10: bool,
    upgrade: Option<usize>,
    accept: AcceptKind,
    connection: bool,
    content_length: bool,
    after_head: Vec<u8>,
    /// Client bytes, each sent after the upstream piece its position names (mod the count).
    client_chunks: Vec<(usize, Vec<u8>)>,
    sizes: Vec<usize>,
}

fn accept_kind() -> impl Strategy<Value = AcceptKind> {
    let b64 = select(&b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[..]);
    prop_oneof![
        4 => Just(AcceptKind::Genuine),
        1 => Just(AcceptKind::Missing),
        1 => Just(AcceptKind::Doubled),
        1 => prop::collection::vec(any::<u8>(), 1..24).prop_map(AcceptKind::OtherKey),
        1 => prop::collection::vec(b64, 27)
            .prop_map(|v| AcceptKind::Random(format!("{}=", lossy(&v)))),
    ]
}

/// Bytes a websocket client or server might send: a frame header byte no HTTP head starts with.
fn frame_bytes(first: u8) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(move |mut v| {
        v.insert(0, first);
        v
    })
}

fn switch_case() -> impl Strategy<Value = SwitchCase> {
    (
        prop_oneof![3 => Just(101u16), 1 => 100u16..600],
        prop::bool::weighted(0.2),
        prop::option::weighted(0.85, 0..SWITCH_TOKENS.len()),
        accept_kind(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(Vec::new()), frame_bytes(0x82)],
        prop::collection::vec((any::<usize>(), frame_bytes(0x81)), 1..4),
        piece_sizes(),
    )
        .prop_map(
            |(
                status,
                http10,
                upgrade,
                accept,
                connection,
                content_length,
                after_head,
                client_chunks,
                sizes,
            )| {
                SwitchCase {
                    status,
                    http10,
                    upgrade,
                    accept,
                    connection,
                    content_length,
                    after_head,
                    client_chunks,
                    sizes,
                }
            },
        )
}

impl SwitchCase {
    fn genuine(&self) -> bool {
        self.status == 101
            && !self.http10
            && matches!(self.upgrade, Some(0..=2))
            && matches!(self.accept, AcceptKind::Genuine)
    }

    fn write(&self) -> Vec<u8> {
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut s = format!("{version} {} Whatever\r\n", self.status);
        if let Some(u) = self.upgrade {
            s.push_str(&format!("Upgrade: {}\r\n", SWITCH_TOKENS[u]));
        }
        if self.connection {
            s.push_str("Connection: Upgrade\r\n");
        }
        match &self.accept {
            AcceptKind::Genuine => s.push_str(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n")),
            AcceptKind::Missing => {}
            AcceptKind::Doubled => s.push_str(&format!(
                "Sec-WebSocket-Accept: {WS_ACCEPT}\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n"
            )),
            AcceptKind::OtherKey(key) => {
                let accept = websocket_accept(key);
                if accept != websocket_accept(WS_KEY.as_bytes()) {
                    s.push_str(&format!("Sec-WebSocket-Accept: {}\r\n", lossy(&accept)));
                }
            }
            AcceptKind::Random(a) => {
                if a != WS_ACCEPT {
                    s.push_str(&format!("Sec-WebSocket-Accept: {a}\r\n"));
                }
            }
        }
        if self.content_length {
            s.push_str("Content-Length: 0\r\n");
        }
        s.push_str("\r\n");
        let mut out = s.into_bytes();
        out.extend_from_slice(&self.after_head);
        out
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Client bytes sent after an upgrade request (before, during or after the answer, which
    /// arrives in arbitrary pieces) reach the upstream only when the answer is a genuine `101`:
    /// HTTP/1.1, `Upgrade: websocket`, and exactly one correct `Sec-WebSocket-Accept`.
    #[test]
    fn no_tunnel_without_genuine_101(case in switch_case()) {
        let mut sim = Sim::default_config();
        sim.client(ws_request("/ws"));
        sim.connected();
        let head = sim.take_upstream();
        prop_assert!(head.contains("Connection: upgrade\r\n"));
        let pieces = split(&case.write(), &case.sizes);
        let slots = pieces.len() + 1;
        let mut sent = Vec::new();
        for slot in 0..slots {
            for (pos, chunk) in &case.client_chunks {
                if pos % slots != slot {
                    continue;
                }
                let switched = sim.client_total.starts_with(b"HTTP/1.1 101 ")
                    && head_end(&sim.client_total).is_some();
                sim.client(chunk);
                sent.extend_from_slice(chunk);
                if !switched {
                    prop_assert!(sim.upstream_rx.is_empty(), "bytes forwarded in the might-switch window");
                }
            }
            if let Some(piece) = pieces.get(slot) {
                sim.upstream(piece);
            }
        }

        let client = sim.client_total.clone();
        if case.genuine() {
            prop_assert!(client.starts_with(b"HTTP/1.1 101 "), "{:?}", lossy(&client));
            let end = head_end(&client).expect("complete 101");
            prop_assert_eq!(&client[end..], &case.after_head[..]);
            prop_assert_eq!(&sim.upstream_rx[..], &sent[..]);
            prop_assert!(!sim.session.is_closed());
            prop_assert!(sim.session.wants_read(Side::Upstream) && sim.session.wants_read(Side::Client));
        } else {
            prop_assert!(sim.upstream_rx.is_empty(), "tunnel bytes without a genuine 101: {:?}", lossy(&sim.upstream_rx));
            prop_assert!(!client.starts_with(b"HTTP/1.1 101"), "{:?}", lossy(&client));
            if case.status == 101 {
                prop_assert!(client.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&client));
                prop_assert!(contains(&client, b"\r\nConnection: close\r\n"));
                prop_assert!(sim.shut(Side::Client) || sim.closed(Side::Client));
            }
        }
    }
}

// ---- 7. timers ----

#[derive(Debug, Clone)]
enum Step {
    Client(usize),
    ClientRaw(Vec<u8>),
    Connected,
    ConnectFailed,
    Upstream(usize),
    ClientEof,
    UpstreamEof,
    Advance(u64),
    AutoAck(bool),
    Ack(Side),
    Drain,
}

const TIMER_CLIENT: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nhal",
    "", // the websocket request, built at run time
    "GET / HT",
    "POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
    "BAD\r\n\r\n",
    "lf",
];

const TIMER_UPSTREAM: &[&str] = &[
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart",
    "", // the genuine 101, built at run time
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 200 O",
    "HTTP/1.1 200 OK\r\n\r\nuntil close",
    "frame",
];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..TIMER_CLIENT.len()).prop_map(Step::Client),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Step::ClientRaw),
        2 => Just(Step::Connected),
        1 => Just(Step::ConnectFailed),
        3 => (0..TIMER_UPSTREAM.len()).prop_map(Step::Upstream),
        1 => Just(Step::ClientEof),
        1 => Just(Step::UpstreamEof),
        2 => (0u64..30).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(Step::AutoAck),
        1 => side().prop_map(Step::Ack),
        1 => Just(Step::Drain),
    ]
}

/// Scripts that reach the named states, then a few random steps.
fn prefix(state: usize) -> Vec<Step> {
    use Step::*;
    match state {
        // idle, before any request
        0 => vec![],
        // waiting for connect
        1 => vec![Client(0)],
        // waiting for the response
        2 => vec![Client(0), Connected],
        // mid request body
        3 => vec![Client(1), Connected],
        // mid response body
        4 => vec![Client(0), Connected, Upstream(1)],
        // tunnel
        5 => vec![Client(2), Connected, Upstream(2)],
        // half-closed tunnel
        6 => vec![Client(2), Connected, Upstream(2), ClientEof],
        // lingering after an error
        7 => vec![Client(5)],
        // kept alive between requests
        8 => vec![Client(0), Connected, Upstream(0)],
        // a peer that stops accepting bytes
        _ => vec![AutoAck(false), Client(0), Connected, Upstream(1)],
    }
}

fn timer_config(t: &[u64], lifetime: Option<u64>) -> Config {
    let mut c = config();
    let secs = |i: usize| Duration::from_secs(t.get(i).copied().unwrap_or(60));
    let x = &mut c.timeouts;
    x.request_head = secs(0);
    x.keep_alive = secs(1);
    x.client_body = secs(2);
    x.connect = secs(3);
    x.read = secs(4);
    x.send = secs(5);
    x.tunnel_idle = secs(6);
    x.tunnel_lifetime = lifetime.map(Duration::from_secs);
    x.fin = secs(7);
    x.linger = secs(8);
    c
}

fn apply(sim: &mut Sim, step: &Step) {
    match step {
        Step::Client(i) => match *i {
            2 => sim.client(ws_request("/ws")),
            i => sim.client(TIMER_CLIENT[i]),
        },
        Step::ClientRaw(b) => sim.client(b),
        Step::Connected => {
            if sim.last_connect.is_some() {
                sim.connected();
            }
        }
        Step::ConnectFailed => {
            if let Some(id) = sim.last_connect {
                sim.input(Input::UpstreamFailed {
                    id,
                    why: ConnectError::Refused,
                });
            }
        }
        Step::Upstream(i) => match *i {
            2 => sim.upstream(ws_101()),
            i => sim.upstream(TIMER_UPSTREAM[i]),
        },
        Step::ClientEof => sim.client_eof(),
        Step::UpstreamEof => sim.upstream_eof(),
        Step::Advance(s) => sim.advance(Duration::from_secs(*s)),
        Step::AutoAck(on) => sim.auto_ack = *on,
        Step::Ack(s) => sim.ack(*s),
        Step::Drain => {
            let now = sim.now;
            sim.session.start_drain(now, now + Duration::from_secs(10));
            sim.drain();
        }
    }
}

/// Everything a timer firing could change, for the "early call is a no-op" check.
fn snapshot(sim: &Sim) -> (usize, usize, usize, usize, bool) {
    (
        sim.client_total.len(),
        sim.upstream_total.len(),
        sim.actions.len(),
        sim.events.len(),
        sim.session.is_closed(),
    )
}

proptest! {
    #![proptest_config(cases(256))]

    /// From idle, connecting, waiting, mid-body, tunnel, half-closed tunnel, lingering,
    /// keep-alive and stalled states (plus random steps): a live session always has a
    /// deadline; handling it early does nothing; handling it on time closes the session or
    /// moves the deadline past `now`; with silent peers the session closes within 50 firings.
    #[test]
    fn timers_make_progress(
        state in 0usize..10,
        extra in prop::collection::vec(step(), 0..6),
        timeouts in prop::collection::vec(1u64..=120, 9),
        lifetime in prop::option::of(1u64..=600),
    ) {
        let mut sim = Sim::new(timer_config(&timeouts, lifetime));
        for s in prefix(state).iter().chain(&extra) {
            apply(&mut sim, s);
        }
        // From here on the peers are silent.
        for _ in 0..50 {
            if sim.session.is_closed() {
                break;
            }
            let Some(deadline) = sim.session.poll_timeout() else {
                return Err(TestCaseError::fail(format!(
                    "a live session with silent peers has no deadline (state {state}, {extra:?})"
                )));
            };
            if let Some(early) = deadline.checked_sub(Duration::from_millis(1)) {
                if early >= sim.now {
                    let before = snapshot(&sim);
                    sim.now = early;
                    sim.session.handle_timeout(early);
                    sim.drain();
                    prop_assert_eq!(snapshot(&sim), before, "handle_timeout before the deadline acted");
                    prop_assert_eq!(sim.session.poll_timeout(), Some(deadline));
                }
            }
            sim.now = sim.now.max(deadline);
            sim.session.handle_timeout(sim.now);
            sim.drain();
            let now = sim.now;
            prop_assert!(
                sim.session.is_closed() || sim.session.poll_timeout().is_some_and(|t| t > now),
                "the deadline did not move: {:?} at {:?}", sim.session.poll_timeout(), now
            );
        }
        prop_assert!(sim.session.is_closed(), "still open after 50 timer firings (state {}, {:?})", state, extra);
        prop_assert!(sim.closed(Side::Client));
        prop_assert_eq!(sim.session.poll_timeout(), None);
    }
}

// ---- 8. retries ----

const METHODS: &[(&str, bool)] = &[
    ("GET", true),
    ("HEAD", true),
    ("OPTIONS", true),
    ("PUT", true),
    ("DELETE", true),
    ("POST", false),
    ("PATCH", false),
];

proptest! {
    #![proptest_config(cases(128))]

    /// A request that meets a connection the upstream closes before any response byte is
    /// repeated, once, on a fresh (non-pooled) connection exactly when that is safe: the
    /// connection was pooled, the method is idempotent, there is no body, and nothing came back.
    /// Otherwise the client gets a 502 and the request is never sent twice.
    #[test]
    fn only_safe_requests_are_retried(
        method in 0..METHODS.len(),
        body in any::<bool>(),
        reused in any::<bool>(),
        partial in 0usize..12,
        second_fails in any::<bool>(),
    ) {
        let (name, idempotent) = METHODS[method];
        let request = if body {
            format!("{name} /r HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        } else {
            format!("{name} /r HTTP/1.1\r\nHost: example.com\r\n\r\n")
        };
        let mut sim = Sim::default_config();
        sim.client(&request);
        sim.connected_with(reused);
        let first = sim.upstream_total.clone();
        prop_assert!(!first.is_empty());
        if partial > 0 {
            sim.upstream(&b"HTTP/1.1 200 OK\r\n"[..partial]);
        }
        sim.upstream_eof();
        let retry = reused && idempotent && !body && partial == 0;
        prop_assert_eq!(sim.connects(), 1 + usize::from(retry), "{:?}", sim.actions);
        if retry {
            prop_assert!(matches!(sim.actions.last(), Some(Action::Connect { allow_pooled: false, .. })), "{:?}", sim.actions);
            prop_assert!(sim.client_total.is_empty());
            sim.connected();
            prop_assert_eq!(&sim.upstream_total, &[&first[..], &first[..]].concat());
            if second_fails {
                sim.upstream_eof();
                prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&sim.client_total));
                prop_assert_eq!(sim.connects(), 2, "retried only once");
            } else {
                sim.upstream(OK2);
                prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 200 OK\r\n"));
            }
        } else {
            prop_assert_eq!(&sim.upstream_total, &first);
            prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&sim.client_total));
            prop_assert!(contains(&sim.client_total, b"\r\nConnection: close\r\n"));
        }
    }
}

// ---- the oracles themselves ----

#[test]
fn oracle_canonical_chunked() {
    assert_eq!(
        parse_canonical_chunked(b"5\r\nhello\r\n0\r\n\r\nX"),
        Canon::Complete(15)
    );
    assert_eq!(parse_canonical_chunked(b"5\r\nhel"), Canon::Partial);
    assert_eq!(parse_canonical_chunked(b"a"), Canon::Partial);
    for bad in [
        &b"5;e\r\nhello\r\n0\r\n\r\n"[..],
        b"05\r\nhello\r\n",
        b"A\r\n0123456789\r\n",
        b"5\r\nhelloXX",
        b"0\r\nT: v\r\n\r\n",
    ] {
        assert!(
            matches!(parse_canonical_chunked(bad), Canon::Invalid(_)),
            "{:?}",
            lossy(bad)
        );
    }
}

#[test]
fn oracle_accepts_a_canonical_head() {
    check_canonical_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    );
}

#[test]
#[should_panic(expected = "hop-by-hop")]
fn oracle_rejects_hop_by_hop_upstream() {
    check_canonical_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n");
}

#[test]
#[should_panic(expected = "bare LF")]
fn oracle_rejects_bare_lf_upstream() {
    check_canonical_request_head(b"GET / HTTP/1.1\r\nHost: a\n\r\n");
}

#[test]
#[should_panic(expected = "Connection only with Upgrade")]
fn oracle_rejects_connection_without_upgrade() {
    check_canonical_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n");
}

#[test]
#[should_panic(expected = "an error must close")]
fn oracle_rejects_error_without_close() {
    check_proxy_error(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
}
