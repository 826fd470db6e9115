//! Helpers and strategies several properties share.

use super::*;

// ---- shared helpers ----

/// A proptest configuration with `n` cases (or `PROPTEST_CASES`, for a longer hunt) that writes
/// no regression files.
pub(crate) fn cases(n: u32) -> ProptestConfig {
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
pub(crate) fn split(data: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
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

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

pub(crate) fn count(hay: &[u8], needle: &[u8]) -> usize {
    if hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The end (exclusive) of the first head in `buf`, if it is complete.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|i| i + 4)
}

pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The header lines of a canonical head as `(lower-case name, value)`, request/status line
/// excluded.
pub(crate) fn fields(head: &[u8]) -> Vec<(String, Vec<u8>)> {
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

pub(crate) fn field_values(head: &[u8], name: &str) -> Vec<Vec<u8>> {
    fields(head)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// The body framing a canonical head declares.
pub(crate) fn framing_of(head: &[u8]) -> BodyKind {
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
pub(crate) enum Canon {
    Complete(usize),
    Partial,
    Invalid(String),
}

pub(crate) fn parse_canonical_chunked(buf: &[u8]) -> Canon {
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
pub(crate) fn complete_message(buf: &[u8]) -> Option<usize> {
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
pub(crate) const HOP_ONLY: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "proxy-authorization",
    "http2-settings",
];

// ---- strategies shared by several properties ----

pub(crate) fn token(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        select(&b"abcdefghijklmnopqrstuvwxyz0123456789-"[..]),
        1..=max,
    )
    .prop_map(|v| lossy(&v))
}

pub(crate) fn visible(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(0x21u8..0x7f, 0..=max).prop_map(|v| lossy(&v))
}

pub(crate) fn piece_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=24, 1..24)
}

pub(crate) fn side() -> impl Strategy<Value = Side> {
    any::<bool>().prop_map(|c| if c { Side::Client } else { Side::Upstream })
}

/// A chunk as a sender might write it: size in some spelling, extensions, data.
#[derive(Debug, Clone)]
pub(crate) struct ChunkSpec {
    pub(crate) data: Vec<u8>,
    pub(crate) style: u8,
    pub(crate) ext: String,
}

pub(crate) fn chunk_ext() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => token(8).prop_map(|t| format!(";{t}")),
        1 => (token(6), token(6)).prop_map(|(a, b)| format!(";{a}={b}")),
        1 => (token(6), visible(12)).prop_map(|(a, v)| format!(" ;{a}=\"{v}\"")),
        1 => (token(4), token(4), token(4)).prop_map(|(a, b, c)| format!(";{a}={b};{c}")),
    ]
}

pub(crate) fn chunk() -> impl Strategy<Value = ChunkSpec> {
    (
        prop::collection::vec(any::<u8>(), 1..24),
        0u8..3,
        chunk_ext(),
    )
        .prop_map(|(data, style, ext)| ChunkSpec { data, style, ext })
}

pub(crate) fn trailers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((token(10), visible(16)), 0..3)
}

/// Writes a chunked body with the given spellings, extensions and trailers.
pub(crate) fn write_chunked(
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
pub(crate) fn canonical_chunked(chunks: &[ChunkSpec]) -> Vec<u8> {
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
pub(crate) fn connect_if_asked(sim: &mut Sim, connected: &mut Option<UpstreamId>) -> bool {
    if sim.last_connect.is_some() && sim.last_connect != *connected {
        *connected = sim.last_connect;
        sim.connected();
        return true;
    }
    false
}
