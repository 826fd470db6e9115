//! The oracles the properties judge by, and tests that they can fail.

use super::*;

/// Asserts that `head` is a head the proxy may legitimately write upstream: complete, CRLF-only,
/// parseable, HTTP/1.1, one `Host` first, no hop-by-hop fields, unambiguous framing.
pub(crate) fn check_canonical_request_head(head: &[u8]) {
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
pub(crate) fn check_proxy_error(resp: &[u8]) {
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
