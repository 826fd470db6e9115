//! The whole smuggling and parsing policy in one table: hostile requests and responses, each
//! with its exact outcome. A refused request gets its status and nothing reaches the upstream;
//! an accepted one reaches it rewritten canonically (the listed strings present or absent); a
//! request whose body breaks mid-way gets its status and no byte past the break goes upstream;
//! a hostile response gets the client a 502 and none of its bytes.
//!
//! Many of these are also tested where the rule lives; here a reviewer sees the policy at once.

mod sim;

use proxy_core::Side;
use sim::{ws_101, Sim, WS_KEY};

/// What must happen to an input.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Answered with this status; no connection upstream, no byte sent there.
    Refused(u16),
    /// Forwarded: the upstream head contains every `must` and none of `never`.
    Forwarded {
        must: &'static [&'static str],
        never: &'static [&'static str],
    },
    /// The head went upstream, the body broke: this status, and `never` never went upstream.
    BodyRefused { status: u16, never: &'static str },
}

use Want::*;

fn req(head: &str) -> String {
    head.replace('|', "\r\n")
}

/// Fails with every case that did not come out as the table says, not just the first.
fn all_pass<'a>(results: impl Iterator<Item = (&'a str, Result<(), String>)>) {
    let (mut total, mut failures) = (0, Vec::new());
    for (name, result) in results {
        total += 1;
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Checks one input; the error says what differs.
fn run_request(input: &[u8], want: Want) -> Result<(), String> {
    let mut sim = Sim::default_config();
    sim.client(input);
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    match want {
        Refused(status) => {
            let out = sim.take_client();
            check(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                format!("expected {status}, got {:?}", out.lines().next()),
            )?;
            check(
                out.contains("Connection: close\r\n"),
                format!("no Connection: close in {out:?}"),
            )?;
            check(
                sim.connects() == 0,
                "an upstream connection was made".to_owned(),
            )?;
            check(
                sim.upstream_total.is_empty(),
                "bytes went upstream".to_owned(),
            )
        }
        Forwarded { must, never } => {
            check(
                sim.connects() == 1,
                format!(
                    "not forwarded; the client got {:?}",
                    sim.take_client().lines().next()
                ),
            )?;
            sim.connected();
            let up = String::from_utf8_lossy(&sim.upstream_total).into_owned();
            for m in must {
                check(up.contains(m), format!("upstream lacks {m:?}: {up:?}"))?;
            }
            for n in never {
                check(!up.contains(n), format!("upstream got {n:?}: {up:?}"))?;
            }
            check(
                !up.contains("\r\n\r\nGET") && !up.contains("\r\n\r\nPOST"),
                format!("a second request was smuggled: {up:?}"),
            )
        }
        BodyRefused { status, never } => {
            check(
                sim.connects() == 1,
                "the valid head was not forwarded".to_owned(),
            )?;
            sim.connected();
            let out = sim.take_client();
            check(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                format!("expected {status}, got {:?}", out.lines().next()),
            )?;
            let up = String::from_utf8_lossy(&sim.upstream_total).into_owned();
            check(
                !up.contains(never),
                format!("{never:?} went upstream: {up:?}"),
            )?;
            check(
                sim.closed(Side::Upstream) || sim.releases() == vec![false],
                "the upstream connection would be reused".to_owned(),
            )
        }
    }
}

#[test]
fn hostile_requests() {
    let cases: Vec<(&str, String, Want)> = vec![
        // ---- CL.TE and TE.CL ----
        ("CL then TE", req("POST / HTTP/1.1|Host: a|Content-Length: 6|Transfer-Encoding: chunked||0||G"), Refused(400)),
        ("TE then CL", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked|Content-Length: 6||0||G"), Refused(400)),
        ("CL and TE on GET", req("GET / HTTP/1.1|Host: a|Content-Length: 0|Transfer-Encoding: chunked||"), Refused(400)),
        // ---- TE obfuscations ----
        // Codings the proxy knows but does not decode are 501; anything else is not HTTP: 400.
        ("xchunked", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: xchunked||"), Refused(400)),
        ("chunked with trailing space (OWS)", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked ||0||"), Forwarded { must: &["Transfer-Encoding: chunked\r\n"], never: &[] }),
        ("vertical tab before chunked", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: \x0bchunked||0||"), Refused(400)),
        (",chunked (empty list element)", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: ,chunked||0||"), Forwarded { must: &["Transfer-Encoding: chunked\r\n"], never: &[",chunked"] }),
        ("chunked, chunked", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked, chunked||0||"), Refused(400)),
        ("chunked;x=y", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked;x=y||0||"), Refused(400)),
        ("two TE lines", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: gzip|Transfer-Encoding: chunked||0||"), Refused(501)),
        ("space before the colon", req("POST / HTTP/1.1|Host: a|Transfer-Encoding : chunked||0||"), Refused(400)),
        ("TE identity", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: identity||"), Refused(400)),
        ("TE in HTTP/1.0", req("POST / HTTP/1.0|Host: a|Transfer-Encoding: chunked||0||"), Refused(400)),
        ("TE uppercase CHUNKED", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: CHUNKED||0||"), Forwarded { must: &["Transfer-Encoding: chunked\r\n"], never: &["CHUNKED"] }),
        // ---- Content-Length ----
        ("CL +5", req("POST / HTTP/1.1|Host: a|Content-Length: +5||hello"), Refused(400)),
        ("CL -1", req("POST / HTTP/1.1|Host: a|Content-Length: -1||"), Refused(400)),
        ("CL 0x10", req("POST / HTTP/1.1|Host: a|Content-Length: 0x10||"), Refused(400)),
        ("CL 1_0", req("POST / HTTP/1.1|Host: a|Content-Length: 1_0||"), Refused(400)),
        ("CL 5 5", req("POST / HTTP/1.1|Host: a|Content-Length: 5 5||hello"), Refused(400)),
        // A list of one value repeated is that value (RFC 9110 §8.6); it goes upstream as one.
        ("CL 5, 5", req("POST / HTTP/1.1|Host: a|Content-Length: 5, 5||hello"), Forwarded { must: &["Content-Length: 5\r\n\r\nhello"], never: &["5, 5"] }),
        ("CL empty", req("POST / HTTP/1.1|Host: a|Content-Length: ||"), Refused(400)),
        ("CL 20 digits", req("POST / HTTP/1.1|Host: a|Content-Length: 99999999999999999999||"), Refused(400)),
        ("two different CL lines", req("POST / HTTP/1.1|Host: a|Content-Length: 5|Content-Length: 6||hello!"), Refused(400)),
        ("two equal CL lines", req("POST / HTTP/1.1|Host: a|Content-Length: 5|Content-Length: 5||hello"), Forwarded { must: &["Content-Length: 5\r\n\r\nhello"], never: &["Content-Length: 5\r\nContent-Length"] }),
        ("CL over the body limit", req("POST / HTTP/1.1|Host: a|Content-Length: 2000000||"), Refused(413)),
        // ---- chunk sizes and extensions ----
        ("empty chunk size", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||||"), BodyRefused { status: 400, never: "\r\n\r\n\r\n" }),
        ("chunk size overflow", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||FFFFFFFFFFFFFFFFFF|x"), BodyRefused { status: 400, never: "FFFFFFFF" }),
        ("chunk size 0x5", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||0x5|hello|0||"), BodyRefused { status: 400, never: "hello" }),
        ("LF in a chunk extension", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n".to_owned(), BodyRefused { status: 400, never: "hello" }),
        ("CR in a chunk extension", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n".to_owned(), BodyRefused { status: 400, never: "hello" }),
        ("NUL in a chunk extension", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\0b\r\nhello\r\n0\r\n\r\n".to_owned(), BodyRefused { status: 400, never: "hello" }),
        ("a 64 KiB chunk extension", format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(64 * 1024)), BodyRefused { status: 400, never: "hello" }),
        ("no CRLF after chunk data", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||5|helloGET / HTTP/1.1|Host: a||"), BodyRefused { status: 400, never: "GET / HTTP/1.1\r\nHost: a\r\n\r\n" }),
        ("chunk extension is dropped", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||5;ext=1|hello|0||"), Forwarded { must: &["5\r\nhello\r\n0\r\n\r\n"], never: &["ext=1"] }),
        // ---- trailers ----
        ("a trailer field is not forwarded", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked||5|hello|0|Content-Length: 5||"), Forwarded { must: &["5\r\nhello\r\n0\r\n\r\n"], never: &["\r\nContent-Length: 5"] }),
        ("a trailer with a bare LF", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\r\n".to_owned(), BodyRefused { status: 400, never: "X: y" }),
        // ---- field lines ----
        ("obs-fold", req("GET / HTTP/1.1|Host: a|X: a| b||"), Refused(400)),
        ("field without a colon", req("GET / HTTP/1.1|Host: a|NoColon||"), Refused(400)),
        ("NUL in a field value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n".to_owned(), Refused(400)),
        ("bare LF line endings", "GET / HTTP/1.1\nHost: a\n\n".to_owned(), Refused(400)),
        ("a bare LF in one field line", "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n".to_owned(), Refused(400)),
        ("space inside a field name", req("GET / HTTP/1.1|Host: a|Bad Name: x||"), Refused(400)),
        ("empty field name", req("GET / HTTP/1.1|Host: a|: x||"), Refused(400)),
        ("CR inside a field value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n".to_owned(), Refused(400)),
        // ---- request lines ----
        ("bad method characters", req("G(ET / HTTP/1.1|Host: a||"), Refused(400)),
        ("double space", req("GET  / HTTP/1.1|Host: a||"), Refused(400)),
        ("HTTP/1.32", req("GET / HTTP/1.32|Host: a||"), Refused(400)),
        ("HTTP/2.0", req("GET / HTTP/2.0|Host: a||"), Refused(505)),
        ("HTTP/0.9", req("GET /||"), Refused(400)),
        ("lower-case version", req("GET / http/1.1|Host: a||"), Refused(400)),
        ("fragment in the target", req("GET /a#frag HTTP/1.1|Host: a||"), Refused(400)),
        ("authority-form CONNECT", req("CONNECT a:443 HTTP/1.1|Host: a:443||"), Refused(405)),
        ("CONNECT with a path", req("CONNECT / HTTP/1.1|Host: a||"), Refused(405)),
        ("the HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(), Refused(505)),
        ("asterisk for GET", req("GET * HTTP/1.1|Host: a||"), Refused(400)),
        ("target with a space", req("GET /a b HTTP/1.1|Host: a||"), Refused(400)),
        // TRACE is a method like any other; the upstream decides (nginx refuses it, HAProxy passes it).
        ("TRACE", req("TRACE / HTTP/1.1|Host: a||"), Forwarded { must: &["TRACE / HTTP/1.1\r\n"], never: &[] }),
        // ---- Host ----
        ("no Host in HTTP/1.1", req("GET / HTTP/1.1|X: y||"), Refused(400)),
        ("two Host fields", req("GET / HTTP/1.1|Host: a|Host: b||"), Refused(400)),
        ("Host with userinfo", req("GET / HTTP/1.1|Host: u@a||"), Refused(400)),
        ("Host with a space", req("GET / HTTP/1.1|Host: a b||"), Refused(400)),
        ("absolute-form wins over Host", req("GET http://real.example/p HTTP/1.1|Host: fake.example||"), Forwarded { must: &["GET /p HTTP/1.1\r\nHost: real.example\r\n"], never: &["fake.example"] }),
        ("absolute-form with userinfo", req("GET http://u@a/ HTTP/1.1|Host: a||"), Refused(400)),
        // ---- Connection naming framing fields ----
        // Connection naming a field the message cannot do without: a desync attempt, refused.
        ("Connection: Host", req("GET / HTTP/1.1|Host: a|Connection: Host||"), Refused(400)),
        ("Connection: Content-Length", req("POST / HTTP/1.1|Host: a|Content-Length: 5|Connection: Content-Length||hello"), Refused(400)),
        ("Connection: Transfer-Encoding", req("POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked|Connection: Transfer-Encoding||5|hello|0||"), Refused(400)),
        ("Connection names a custom hop-by-hop field", req("GET / HTTP/1.1|Host: a|Connection: X-Secret|X-Secret: 1||"), Forwarded { must: &[], never: &["X-Secret"] }),
        // ---- Expect ----
        ("Expect: 100-continue", req("POST / HTTP/1.1|Host: a|Content-Length: 5|Expect: 100-continue||"), Forwarded { must: &["Expect: 100-continue\r\n"], never: &[] }),
        // Other expectations are the upstream's to meet or refuse (RFC 9110 §10.1.1: MAY 417).
        ("Expect: something else", req("POST / HTTP/1.1|Host: a|Content-Length: 5|Expect: teapot||"), Forwarded { must: &["Expect: teapot\r\n"], never: &[] }),
        // ---- upgrades that are not offers ----
        ("upgrade on POST", req("POST /ws HTTP/1.1|Host: a|Connection: Upgrade|Upgrade: websocket|Content-Length: 0||"), Forwarded { must: &[], never: &["Upgrade"] }),
        ("upgrade with a body", req("GET /ws HTTP/1.1|Host: a|Connection: Upgrade|Upgrade: websocket|Content-Length: 5||hello"), Forwarded { must: &["hello"], never: &["Upgrade"] }),
        ("upgrade on HTTP/1.0", req("GET /ws HTTP/1.0|Host: a|Connection: Upgrade|Upgrade: websocket||"), Forwarded { must: &[], never: &["Upgrade"] }),
        ("h2c with HTTP2-Settings", req("GET / HTTP/1.1|Host: a|Connection: Upgrade, HTTP2-Settings|Upgrade: h2c|HTTP2-Settings: AAMAAABkAAQAAP__||"), Forwarded { must: &[], never: &["h2c", "HTTP2-Settings", "Upgrade"] }),
        ("Upgrade without Connection: upgrade", req("GET /ws HTTP/1.1|Host: a|Upgrade: websocket||"), Forwarded { must: &[], never: &["Upgrade"] }),
        ("an offer among other Connection tokens", req(&format!("GET /ws HTTP/1.1|Host: a|Connection: keep-alive, , Upgrade|Upgrade: websocket|Sec-WebSocket-Version: 13|Sec-WebSocket-Key: {WS_KEY}||")), Forwarded { must: &["Upgrade: websocket\r\nConnection: upgrade\r\n"], never: &["keep-alive"] }),
        // ---- bodies that are fine ----
        ("GET with a Content-Length body", req("GET / HTTP/1.1|Host: a|Content-Length: 5||hello"), Forwarded { must: &["Content-Length: 5\r\n\r\nhello"], never: &[] }),
        ("pipelined second request is held", req("GET /1 HTTP/1.1|Host: a||GET /2 HTTP/1.1|Host: a||"), Forwarded { must: &["GET /1 HTTP/1.1"], never: &["GET /2"] }),
    ];
    assert!(cases.len() >= 60, "{} request cases", cases.len());
    all_pass(
        cases
            .iter()
            .map(|(name, input, want)| (*name, run_request(input.as_bytes(), *want))),
    );
}

/// A hostile response to a plain GET: the client gets a 502 and none of the response, and the
/// upstream connection is not reused.
fn run_response(response: &[u8], upgrade: bool) -> Result<(), String> {
    let mut sim = Sim::default_config();
    if upgrade {
        sim.client(sim::ws_request("/ws"));
    } else {
        sim.client("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    sim.connected();
    if response.is_empty() {
        sim.upstream_eof();
    } else {
        sim.upstream(response);
    }
    let out = sim.take_client();
    if !out.starts_with("HTTP/1.1 502 ") {
        return Err(format!("expected 502, got {:?}", out.lines().next()));
    }
    if out.contains("Set-Cookie: leaked") {
        return Err("bytes of the response reached the client".to_owned());
    }
    if !(sim.closed(Side::Upstream) || sim.releases() == vec![false]) {
        return Err("the upstream connection would be reused".to_owned());
    }
    Ok(())
}

#[test]
fn hostile_responses() {
    let r = |s: &str| s.replace('|', "\r\n");
    let good_accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    let cases: Vec<(&str, String, bool)> = vec![
        ("CL and TE", r("HTTP/1.1 200 OK|Set-Cookie: leaked|Content-Length: 5|Transfer-Encoding: chunked||"), false),
        ("two different CLs", r("HTTP/1.1 200 OK|Set-Cookie: leaked|Content-Length: 5|Content-Length: 6||"), false),
        ("CL +5", r("HTTP/1.1 200 OK|Set-Cookie: leaked|Content-Length: +5||"), false),
        ("TE xchunked", r("HTTP/1.1 200 OK|Set-Cookie: leaked|Transfer-Encoding: xchunked||"), false),
        ("TE chunked in HTTP/1.0", r("HTTP/1.0 200 OK|Set-Cookie: leaked|Transfer-Encoding: chunked||"), false),
        ("obs-fold", r("HTTP/1.1 200 OK|Set-Cookie: leaked|X: a| b|Content-Length: 0||"), false),
        ("bare LF", "HTTP/1.1 200 OK\nSet-Cookie: leaked\nContent-Length: 0\n\n".to_owned(), false),
        ("NUL in a field", "HTTP/1.1 200 OK\r\nSet-Cookie: leaked\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n".to_owned(), false),
        ("a four-digit status", r("HTTP/1.1 2000 OK|Set-Cookie: leaked|Content-Length: 0||"), false),
        ("HTTP/2 status line", r("HTTP/2 200 OK|Set-Cookie: leaked|Content-Length: 0||"), false),
        ("not HTTP at all", "SSH-2.0-OpenSSH_9.0\r\n\r\n".to_owned(), false),
        ("a head over the limit", format!("HTTP/1.1 200 OK\r\nSet-Cookie: leaked\r\nX: {}\r\n\r\n", "x".repeat(40 * 1024)), false),
        ("an unsolicited 101", r(&format!("HTTP/1.1 101 Switching Protocols|Set-Cookie: leaked|Upgrade: websocket|Connection: Upgrade|Sec-WebSocket-Accept: {good_accept}||")), false),
        ("101 with a wrong accept", r("HTTP/1.1 101 Switching Protocols|Set-Cookie: leaked|Upgrade: websocket|Connection: Upgrade|Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=||"), true),
        ("101 switching to another protocol", r(&format!("HTTP/1.1 101 Switching Protocols|Set-Cookie: leaked|Upgrade: h2c|Connection: Upgrade|Sec-WebSocket-Accept: {good_accept}||")), true),
        ("closed before a response", String::new(), false),
    ];
    all_pass(
        cases
            .iter()
            .map(|(name, response, upgrade)| (*name, run_response(response.as_bytes(), *upgrade))),
    );
    // A genuine 101 still works, for contrast.
    let mut sim = Sim::default_config();
    sim.open_tunnel();
    let _ = ws_101();
    assert!(!sim.session.is_closed());
}

/// Interim responses are relayed as they come; past sixteen the upstream is at fault, and as a
/// response has started, both connections close without the final one.
#[test]
fn endless_interim_responses_end_the_exchange() {
    let mut sim = Sim::default_config();
    sim.client("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    sim.connected();
    sim.upstream(format!(
        "{}HTTP/1.1 200 OK\r\nSet-Cookie: leaked\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n".repeat(17)
    ));
    let out = sim.take_client();
    assert_eq!(out.matches("HTTP/1.1 100 Continue").count(), 16, "{out}");
    assert!(!out.contains("leaked"), "{out}");
    assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
}

/// A response body that breaks mid-way: what came before it went to the client, then both
/// connections close (a response cannot be taken back), and nothing after the break passes.
#[test]
fn a_response_body_breaking_mid_way_closes_both_connections() {
    let mut sim = Sim::default_config();
    sim.client("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    sim.connected();
    sim.upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nsmuggled\r\n",
    );
    let out = sim.take_client();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(!out.contains("smuggled"), "{out}");
    assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
}
