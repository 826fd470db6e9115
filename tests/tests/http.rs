//! End-to-end HTTP/1.1 through switchyard: raw TCP clients on one side (so every byte the client
//! receives can be asserted), recording origins on the other, the proxy in-process on each
//! runtime (in a child process of its own where its memory is measured). Every wait is bounded
//! by [`WAIT`] (or a shorter, named bound).
//!
//! Clients are dropped before a proxy is stopped: the proxy closes an idle connection with a
//! lingering close that waits (up to `timeouts.linger`, 5 s) for the client's EOF.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proxy_core::{Config, IpNet, Peer, UpstreamGroup};
use switchyard_tests::origin::{self, http_origin, Responder, SeenRequest};
use switchyard_tests::{
    child, config_for, runtime_tests, start_proxy, start_proxy_with, ProxyOptions, Runtime, WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

runtime_tests! {
    keep_alive_reuses_one_upstream_connection,
    upstream_named_by_host_name,
    requests_fail_over_from_a_dead_upstream,
    post_one_mib_with_content_length,
    chunked_request_and_response,
    head_204_304_have_no_body,
    pipelined_requests_answered_in_order,
    streams_100_mib_response_in_bounded_memory,
    hop_by_hop_headers_and_forwarded_for,
    connect_refused_502_and_read_timeout_504,
    malformed_request_gets_400,
    graceful_shutdown_finishes_in_flight_request,
    graceful_shutdown_closes_tunnel_at_drain_deadline,
    a_pooled_connection_its_upstream_closes_is_dropped_at_once,
}

// ---- helpers ----

/// `GET path` on `client`, answered by an origin that echoes the path as the body.
async fn get_echoed_path(client: &mut Client, path: &str) {
    client
        .send(format!("GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n").as_bytes())
        .await;
    let resp = client.response(false).await;
    assert_eq!(
        show(&resp.raw),
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
            path.len()
        )
    );
}

/// A responder from a closure.
fn responder(f: impl Fn(&SeenRequest) -> Option<Vec<u8>> + Send + Sync + 'static) -> Responder {
    Arc::new(f)
}

/// `200 OK` with `body` and a Content-Length, as raw bytes.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The path of a request line.
fn path_of(req: &SeenRequest) -> String {
    req.request_line()
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_owned()
}

/// The exact bytes of one of the proxy's own error responses (see `proxy-core`'s
/// `error_response`): a short text body and `Connection: close`.
fn proxy_error(status: u16, reason: &str) -> Vec<u8> {
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How many header fields named `name` a head has.
fn header_count(head: &str, name: &str) -> usize {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .count()
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One response as the client received it.
#[derive(Debug)]
struct Resp {
    /// Every byte of the response, head and framed body.
    raw: Vec<u8>,
    /// The head, including the final CRLF CRLF.
    head: String,
    /// The decoded body.
    body: Vec<u8>,
}

impl Resp {
    fn status_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw HTTP/1.1 client on one TCP connection, keeping bytes read past a response for the next.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect within WAIT")
            .expect("connect to proxy");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write within WAIT")
            .expect("write to proxy");
    }

    /// Reads more bytes into the buffer; returns how many (0 at EOF).
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("timed out; buffered so far: {:?}", show(&self.buf)))
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn fill_or_panic(&mut self, what: &str) {
        if self.fill().await == 0 {
            panic!(
                "connection closed while reading {what}; buffered: {:?}",
                show(&self.buf)
            );
        }
    }

    /// Reads one complete response. `head_request` says the request was HEAD (no body).
    async fn response(&mut self, head_request: bool) -> Resp {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill_or_panic("a response head").await;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 "),
            "not a response: {:?}",
            show(&self.buf)
        );
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .expect("a three-digit status");
        let probe = Resp {
            raw: Vec::new(),
            head: head.clone(),
            body: Vec::new(),
        };
        let no_body = head_request || status / 100 == 1 || status == 204 || status == 304;
        let chunked = probe
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = probe
            .header("content-length")
            .map(|v| v.parse::<usize>().expect("numeric Content-Length"));
        let (body, total) = if no_body {
            (Vec::new(), head_len)
        } else if chunked {
            assert!(
                length.is_none(),
                "both Content-Length and chunked: {head:?}"
            );
            loop {
                if let Some((body, used)) = decode_chunked(&self.buf[head_len..]) {
                    break (body, head_len + used);
                }
                self.fill_or_panic("a chunked body").await;
            }
        } else if let Some(len) = length {
            while self.buf.len() < head_len + len {
                self.fill_or_panic("a Content-Length body").await;
            }
            (self.buf[head_len..head_len + len].to_vec(), head_len + len)
        } else {
            // Delimited by close.
            while self.fill().await > 0 {}
            (self.buf[head_len..].to_vec(), self.buf.len())
        };
        let raw: Vec<u8> = self.buf.drain(..total).collect();
        Resp { raw, head, body }
    }

    /// Asserts the proxy closes the connection without sending anything more.
    async fn expect_eof(&mut self) {
        while self.fill().await > 0 {}
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before close: {:?}",
            show(&self.buf)
        );
    }
}

/// Decodes a complete chunked body at the start of `bytes`: `Some((body, bytes used))`, or
/// `None` if more bytes are needed. Panics on invalid framing.
fn decode_chunked(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut pos = 0;
    let line = |from: usize| -> Option<(String, usize)> {
        let rel = bytes[from..].windows(2).position(|w| w == b"\r\n")?;
        Some((
            String::from_utf8_lossy(&bytes[from..from + rel]).into_owned(),
            from + rel + 2,
        ))
    };
    loop {
        let (size_line, next) = line(pos)?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .unwrap_or_else(|_| panic!("invalid chunk size line {size_line:?}"));
        pos = next;
        if size == 0 {
            // Trailer fields until an empty line.
            loop {
                let (trailer, next) = line(pos)?;
                pos = next;
                if trailer.is_empty() {
                    return Some((body, pos));
                }
                assert!(trailer.contains(':'), "invalid trailer line {trailer:?}");
            }
        }
        if bytes.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&bytes[pos..pos + size]);
        assert_eq!(
            &bytes[pos + size..pos + size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        pos += size + 2;
    }
}

// ---- scenarios ----

/// Three requests on one client connection get three responses, and the proxy reuses one
/// upstream connection for all of them.
/// An idle pooled upstream connection whose server closes it is closed by the proxy at once,
/// as nginx does, not left in CLOSE_WAIT until the pool's idle timeout (60 s here) or its next
/// use.
async fn a_pooled_connection_its_upstream_closes_is_dropped_at_once(rt: Runtime) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let origin = listener.local_addr().expect("origin address");
    let (close_tx, mut close_rx) = mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.expect("read request");
            assert!(n > 0, "the proxy closed before its request");
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .expect("respond");
        // Keep the connection (pooled on the proxy's side) until told, then close it.
        close_rx.recv().await;
        drop(stream);
    });
    let opts = ProxyOptions {
        pool_idle_timeout: Duration::from_secs(60),
        ..ProxyOptions::default()
    };
    let proxy = start_proxy_with(rt, config_for(&[origin]), opts);
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    assert!(
        show(&resp.raw).ends_with("\r\n\r\nok"),
        "{}",
        show(&resp.raw)
    );
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    until("the upstream connection is pooled", &|| {
        proxy.stats.pooled() == 1
    });
    close_tx.send(()).await.expect("tell the origin to close");
    server.await.expect("origin task");
    until("the closed pooled connection is dropped", &|| {
        proxy.stats.pooled() == 0
    });
    drop(client);
    proxy.stop();
}

async fn keep_alive_reuses_one_upstream_connection(rt: Runtime) {
    let origin = http_origin(responder(|req| Some(ok(&path_of(req))))).await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let mut client = Client::connect(proxy.addr).await;
    for path in ["/one", "/two", "/three"] {
        get_echoed_path(&mut client, path).await;
    }
    let events = proxy.events.wait_for(3);
    assert!(events.iter().all(|e| e.status == Some(200)), "{events:?}");
    let seen = origin.seen();
    let lines: Vec<&str> = seen.iter().map(SeenRequest::request_line).collect();
    assert_eq!(
        lines,
        [
            "GET /one HTTP/1.1",
            "GET /two HTTP/1.1",
            "GET /three HTTP/1.1"
        ]
    );
    assert!(
        seen.iter().all(|r| r.connection == 0),
        "every request on upstream connection 0: {seen:?}"
    );
    assert_eq!(origin.connection_count(), 1, "one upstream connection");
    drop(client);
    proxy.stop();
}

/// An upstream given by name (`localhost`, from the hosts file: no traffic leaves the machine)
/// is looked up off the event loop and connected to; the log names it as configured.
async fn upstream_named_by_host_name(rt: Runtime) {
    let origin = http_origin(responder(|req| Some(ok(&path_of(req))))).await;
    let config = Config::new(UpstreamGroup::new(vec![Peer::new(
        "localhost",
        origin.addr.port(),
    )]));
    let proxy = start_proxy(rt, config);
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(b"GET /by-name HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n/by-name"
    );
    let events = proxy.events.wait_for(1);
    assert_eq!(
        events[0].upstream.as_ref().map(ToString::to_string),
        Some(format!("localhost:{}", origin.addr.port()))
    );
    drop(client);
    proxy.stop();
}

/// Two upstreams, the first refusing connections (a new user's setup, one backend down): every
/// request still gets its answer, on new connections and on a kept-alive one.
async fn requests_fail_over_from_a_dead_upstream(rt: Runtime) {
    let dead = switchyard_tests::refusing_port();
    let origin = http_origin(responder(|req| Some(ok(&path_of(req))))).await;
    let proxy = start_proxy(rt, config_for(&[dead.addr, origin.addr]));
    for i in 0..4 {
        let mut client = Client::connect(proxy.addr).await;
        for j in 0..2 {
            get_echoed_path(&mut client, &format!("/r{i}-{j}")).await;
        }
    }
    let events = proxy.events.wait_for(8);
    assert!(events.iter().all(|e| e.status == Some(200)), "{events:?}");
    assert_eq!(origin.seen().len(), 8);
    proxy.stop();
}

/// A body of exactly the default limit (1 MiB) arrives intact; one byte more is refused with
/// 413 before anything reaches the origin.
async fn post_one_mib_with_content_length(rt: Runtime) {
    const MIB: usize = 1024 * 1024;
    let origin = http_origin(responder(|req| Some(ok(&req.body.len().to_string())))).await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let body: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();

    let mut first = Client::connect(proxy.addr).await;
    let mut request =
        format!("POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: {MIB}\r\n\r\n")
            .into_bytes();
    request.extend_from_slice(&body);
    first.send(&request).await;
    let resp = first.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n1048576"
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("content-length"), Some("1048576"));
    assert!(seen[0].body == body, "origin received the exact body");

    let mut client = Client::connect(proxy.addr).await;
    client
        .send(
            format!(
                "POST /too-big HTTP/1.1\r\nHost: example.test\r\nContent-Length: {}\r\n\r\n",
                MIB + 1
            )
            .as_bytes(),
        )
        .await;
    let resp = client.response(false).await;
    assert_eq!(
        show(&resp.raw),
        show(&proxy_error(413, "Content Too Large"))
    );
    client.expect_eof().await;
    assert_eq!(
        origin.seen().len(),
        1,
        "the 413 request never reached the origin"
    );
    drop((first, client));
    proxy.stop();
}

/// A chunked request body (with a chunk extension and a trailer) reaches the origin decoded and
/// still chunked; a chunked response reaches the client as a valid chunked message with the same
/// content, and the connection stays usable.
async fn chunked_request_and_response(rt: Runtime) {
    let origin = http_origin(responder(|req| {
        if path_of(req) == "/chunked" {
            Some(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5;x=y\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Checksum: abc\r\n\r\n"
                    .to_vec(),
            )
        } else {
            Some(ok("after"))
        }
    }))
    .await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(
            b"POST /chunked HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .await;
    let resp = client.response(false).await;
    assert_eq!(resp.status_line(), "HTTP/1.1 200 OK");
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.header("content-length"), None);
    assert_eq!(show(&resp.body), "wikipedia in\r\n\r\nchunks.");

    client
        .send(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter"
    );

    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].request_line(), "POST /chunked HTTP/1.1");
    assert_eq!(show(&seen[0].body), "hello world");
    assert_eq!(seen[0].header("transfer-encoding"), Some("chunked"));
    assert!(!seen[0].has_header("content-length"), "{}", seen[0].head);
    drop(client);
    proxy.stop();
}

/// HEAD, 204 and 304 responses carry no body (HEAD and 304 keep their Content-Length), and the
/// connection stays usable after each.
async fn head_204_304_have_no_body(rt: Runtime) {
    let origin = http_origin(responder(|req| {
        let line = req.request_line().to_owned();
        Some(match line.as_str() {
            "HEAD /doc HTTP/1.1" => {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
                    .to_vec()
            }
            "DELETE /doc HTTP/1.1" => b"HTTP/1.1 204 No Content\r\nX-Kind: nc\r\n\r\n".to_vec(),
            "GET /doc HTTP/1.1" if req.has_header("if-none-match") => {
                b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 11\r\n\r\n".to_vec()
            }
            _ => ok("hello world"),
        })
    }))
    .await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let mut client = Client::connect(proxy.addr).await;
    let after = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world";
    let cases: [(&str, bool, &str); 3] = [
        (
            "HEAD /doc HTTP/1.1\r\nHost: example.test\r\n\r\n",
            true,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n",
        ),
        (
            "DELETE /doc HTTP/1.1\r\nHost: example.test\r\n\r\n",
            false,
            "HTTP/1.1 204 No Content\r\nX-Kind: nc\r\n\r\n",
        ),
        (
            "GET /doc HTTP/1.1\r\nHost: example.test\r\nIf-None-Match: \"v1\"\r\n\r\n",
            false,
            "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 11\r\n\r\n",
        ),
    ];
    for (request, is_head, expected) in cases {
        client.send(request.as_bytes()).await;
        let resp = client.response(is_head).await;
        assert_eq!(show(&resp.raw), expected, "response to {request:?}");
        // The next response must start right after the bodiless one: no stray bytes.
        client
            .send(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .await;
        let resp = client.response(false).await;
        assert_eq!(show(&resp.raw), after, "request after {request:?}");
    }
    assert_eq!(origin.seen().len(), 6);
    drop(client);
    proxy.stop();
}

/// Three requests in one write come back as three responses, in order.
async fn pipelined_requests_answered_in_order(rt: Runtime) {
    let origin = http_origin(responder(|req| Some(ok(&path_of(req))))).await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(
            b"GET /p1 HTTP/1.1\r\nHost: example.test\r\n\r\n\
              GET /p2 HTTP/1.1\r\nHost: example.test\r\n\r\n\
              GET /p3 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        )
        .await;
    for path in ["/p1", "/p2", "/p3"] {
        let resp = client.response(false).await;
        assert_eq!(
            show(&resp.raw),
            format!("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{path}")
        );
    }
    let seen = origin.seen();
    let lines: Vec<&str> = seen.iter().map(SeenRequest::request_line).collect();
    assert_eq!(
        lines,
        ["GET /p1 HTTP/1.1", "GET /p2 HTTP/1.1", "GET /p3 HTTP/1.1"]
    );
    // And the connection is still good for one more.
    client
        .send(b"GET /p4 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n/p4"
    );
    drop(client);
    proxy.stop();
}

/// An origin answering every request with `len` bytes of `x` (HEAD: just the head), written from one reusable 64 KiB
/// buffer (so the origin itself does not grow with `len`).
async fn big_origin(len: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind big origin");
    let addr = listener.local_addr().expect("big origin address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                let chunk = vec![b'x'; 64 * 1024];
                loop {
                    let head_len = loop {
                        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let is_head = pending.starts_with(b"HEAD ");
                    pending.drain(..head_len);
                    let response_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                    if stream.write_all(response_head.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut left = if is_head { 0 } else { len };
                    while left > 0 {
                        let n =
                            usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                        if stream.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            });
        }
    });
    addr
}

/// A 100 MiB response streams through the proxy: the client receives every byte, and the
/// proxy's resident memory grows by far less than the body.
///
/// The proxy runs in a child process of its own ([`proxy_process`]), so the VmRSS measured is
/// the proxy's alone: not the origin's or the client's, nor that of the other scenarios of this
/// binary running beside it. The proxy itself should hold at most a few queues of 64 KiB
/// (`limits.queue`) and a 64 KiB read buffer per thread; the growth measured is under 1 MiB
/// on every runtime. The bound is 8 MiB; a proxy that buffered the body, or a tenth of it,
/// would fail clearly.
async fn streams_100_mib_response_in_bounded_memory(rt: Runtime) {
    const LEN: u64 = 100 * 1024 * 1024;
    const RSS_BOUND: u64 = 8 * 1024 * 1024;
    let origin = big_origin(LEN).await;
    let proxy = proxy_process(rt, origin).await;
    let mut client = Client::connect(proxy.addr).await;
    // A first exchange, so that the baseline has the proxy's runtime up, its upstream
    // connection open and its first buffers allocated: what grows after it is the stream's.
    client
        .send(b"HEAD /big HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(true).await;
    assert_eq!(
        show(&resp.raw),
        format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n")
    );
    let baseline = child::vm_rss(proxy.pid());
    let mut peak = baseline;
    client
        .send(b"GET /big HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    // The head, then count the body without keeping it.
    let head_len = loop {
        if let Some(i) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        client.fill_or_panic("the big response head").await;
    };
    assert_eq!(
        show(&client.buf[..head_len]),
        format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n")
    );
    let mut received = (client.buf.len() - head_len) as u64;
    client.buf.clear();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next_sample = 8 * 1024 * 1024;
    let started = Instant::now();
    while received < LEN {
        let n = tokio::time::timeout(WAIT, client.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("stalled after {received} bytes"))
            .expect("read the big body");
        assert!(n > 0, "connection closed after {received} of {LEN} bytes");
        assert!(
            chunk[..n].iter().all(|&b| b == b'x'),
            "body bytes are the origin's"
        );
        received += n as u64;
        if received >= next_sample {
            next_sample += 8 * 1024 * 1024;
            if let (Some(p), Some(now)) = (peak, child::vm_rss(proxy.pid())) {
                peak = Some(p.max(now));
            }
        }
    }
    assert_eq!(received, LEN, "exactly the announced length");
    let elapsed = started.elapsed();
    if let (Some(p), Some(now)) = (peak, child::vm_rss(proxy.pid())) {
        peak = Some(p.max(now));
    }
    match (baseline, peak) {
        (Some(base), Some(peak)) => {
            let growth = peak.saturating_sub(base);
            eprintln!(
                "{rt:?}: 100 MiB in {elapsed:?}; the proxy's RSS {} KiB -> peak {} KiB \
                 (growth {} KiB)",
                base >> 10,
                peak >> 10,
                growth >> 10
            );
            assert!(
                growth < RSS_BOUND,
                "{rt:?}: the proxy's RSS grew by {growth} bytes while streaming {LEN} bytes"
            );
        }
        _ => eprintln!(
            "SKIPPED the memory bound: /proc/{}/status is unreadable here; only the bytes \
             were checked",
            proxy.pid()
        ),
    }
    // The connection is still usable: a second request gets a response head.
    client
        .send(b"HEAD /big HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(true).await;
    assert_eq!(
        show(&resp.raw),
        format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n")
    );
    drop(client);
    proxy.finish().await;
}

/// Set in the child process [`proxy_child_process`] is: the runtime to serve on.
const CHILD_RUNTIME_ENV: &str = "SWITCHYARD_HTTP_CHILD_RUNTIME";
/// Set in that child: the upstream.
const CHILD_UPSTREAM_ENV: &str = "SWITCHYARD_HTTP_CHILD_UPSTREAM";

/// The body of the proxy child process the memory test starts (see
/// [`switchyard_tests::child`]): the proxy, until its stdin closes.
#[test]
#[ignore = "the body of the proxy process a test in this file starts; does nothing on its own"]
fn proxy_child_process() {
    let Ok(runtime) = std::env::var(CHILD_RUNTIME_ENV) else {
        return;
    };
    let upstream: SocketAddr = std::env::var(CHILD_UPSTREAM_ENV)
        .expect("an upstream")
        .parse()
        .expect("an upstream address");
    child::serve_proxy_until_stdin_closes(child::runtime_named(&runtime), upstream);
}

/// The proxy on `rt` in front of `upstream`, in a child process of its own.
async fn proxy_process(rt: Runtime, upstream: SocketAddr) -> child::Child {
    child::Child::spawn(
        "proxy_child_process",
        &[
            (CHILD_RUNTIME_ENV, format!("{rt:?}")),
            (CHILD_UPSTREAM_ENV, upstream.to_string()),
        ],
    )
    .await
}

/// Hop-by-hop request headers (fixed ones and those named in Connection) never reach the
/// origin; end-to-end ones do. X-Forwarded-For is extended for a trusted client and replaced
/// otherwise. Hop-by-hop response headers never reach the client.
async fn hop_by_hop_headers_and_forwarded_for(rt: Runtime) {
    let origin = http_origin(responder(|_| {
        Some(
            b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Resp-E2e: yes\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
        )
    }))
    .await;
    let request =
        b"GET /h HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Custom-Hop\r\n\
        Keep-Alive: timeout=5\r\nX-Custom-Hop: secret\r\nTE: trailers\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\n\
        Accept: text/plain\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n";

    let untrusted = start_proxy(rt, config_for(&[origin.addr]));
    let mut trusted_config = config_for(&[origin.addr]);
    trusted_config.trusted_proxies = vec![IpNet::parse("127.0.0.1").expect("valid network")];
    let trusted = start_proxy(rt, trusted_config);

    for proxy in [&untrusted, &trusted] {
        let mut client = Client::connect(proxy.addr).await;
        client.send(request).await;
        let resp = client.response(false).await;
        assert_eq!(
            show(&resp.raw),
            "HTTP/1.1 200 OK\r\nX-Resp-E2e: yes\r\nContent-Length: 2\r\n\r\nok"
        );
    }

    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    for req in &seen {
        for hop in [
            "keep-alive",
            "x-custom-hop",
            "te",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(
                !req.has_header(hop),
                "{hop} reached the origin:\n{}",
                req.head
            );
        }
        if let Some(c) = req.header("connection") {
            let c = c.to_ascii_lowercase();
            assert!(
                !c.contains("upgrade") && !c.contains("x-custom-hop"),
                "Connection: {c}"
            );
        }
        assert_eq!(req.request_line(), "GET /h HTTP/1.1");
        assert_eq!(req.header("host"), Some("example.test"));
        assert_eq!(req.header("x-end-to-end"), Some("kept"));
        assert_eq!(req.header("accept"), Some("text/plain"));
        assert_eq!(
            header_count(&req.head, "x-forwarded-for"),
            1,
            "{}",
            req.head
        );
    }
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        Some("127.0.0.1"),
        "untrusted client: replaced"
    );
    assert_eq!(
        seen[1].header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "trusted client: appended"
    );
    untrusted.stop();
    trusted.stop();
}

/// A refused upstream connection is a quick 502; an upstream that never answers is a 504 after
/// the read timeout. Both close the client connection.
async fn connect_refused_502_and_read_timeout_504(rt: Runtime) {
    let port = switchyard_tests::refusing_port();
    let refused = start_proxy(rt, config_for(&[port.addr]));
    let started = Instant::now();
    let mut client = Client::connect(refused.addr).await;
    client
        .send(b"GET /x HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    let took = started.elapsed();
    assert_eq!(show(&resp.raw), show(&proxy_error(502, "Bad Gateway")));
    assert_eq!(resp.status_line(), "HTTP/1.1 502 Bad Gateway");
    assert_eq!(resp.header("connection"), Some("close"));
    client.expect_eof().await;
    assert!(
        took < Duration::from_secs(5),
        "refusal is reported at once, not at the 60 s connect timeout: {took:?}"
    );
    assert_eq!(refused.events.wait_for(1)[0].status, Some(502));
    drop(client);
    refused.stop();

    let silent = http_origin(responder(|_| None)).await;
    let mut config = config_for(&[silent.addr]);
    config.timeouts.read = Duration::from_millis(300);
    let proxy = start_proxy(rt, config);
    let started = Instant::now();
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = client.response(false).await;
    let took = started.elapsed();
    assert_eq!(show(&resp.raw), show(&proxy_error(504, "Gateway Timeout")));
    assert_eq!(resp.status_line(), "HTTP/1.1 504 Gateway Timeout");
    assert_eq!(resp.header("connection"), Some("close"));
    client.expect_eof().await;
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(10),
        "504 after the 300 ms read timeout, took {took:?}"
    );
    assert_eq!(silent.seen().len(), 1, "the request reached the origin");
    drop(client);
    proxy.stop();
}

/// Content-Length together with Transfer-Encoding is refused with 400 and nothing reaches the
/// origin.
async fn malformed_request_gets_400(rt: Runtime) {
    let origin = http_origin(responder(|_| Some(ok("should not happen")))).await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let mut client = Client::connect(proxy.addr).await;
    client
        .send(
            b"POST /smuggle HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
    let resp = client.response(false).await;
    assert_eq!(show(&resp.raw), show(&proxy_error(400, "Bad Request")));
    assert_eq!(resp.header("connection"), Some("close"));
    client.expect_eof().await;
    assert_eq!(proxy.events.wait_for(1)[0].status, Some(400));
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());
    assert_eq!(origin.connection_count(), 0);
    drop(client);
    proxy.stop();
}

/// An origin that answers `GET /slow` only once released (and everything else at once with
/// its path). Returns its address, a receiver told when `/slow` has arrived, and the release.
async fn gated_origin() -> (SocketAddr, mpsc::Receiver<()>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gated origin");
    let addr = listener.local_addr().expect("gated origin address");
    let (arrived_tx, arrived_rx) = mpsc::channel(4);
    let (release_tx, release_rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (arrived, mut release) = (arrived_tx.clone(), release_rx.clone());
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let head_len = loop {
                        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head: Vec<u8> = pending.drain(..head_len).collect();
                    let line = show(&head).lines().next().unwrap_or("").to_owned();
                    let response = if line == "GET /slow HTTP/1.1" {
                        let _ = arrived.send(()).await;
                        if release.wait_for(|r| *r).await.is_err() {
                            return;
                        }
                        ok("late")
                    } else {
                        ok(line.split(' ').nth(1).unwrap_or(""))
                    };
                    if stream.write_all(&response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, arrived_rx, release_tx)
}

/// Whether a new connection to `addr` is refused, or accepted and closed without a response.
async fn refused_or_closed(addr: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else {
        return true;
    };
    let _ = stream
        .write_all(b"GET /new HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => false,
        Ok(Ok(n)) => panic!(
            "a connection made after shutdown was answered: {:?}",
            show(&buf[..n])
        ),
        Err(_) => panic!("a connection made after shutdown was neither answered nor closed"),
    }
}

/// After shutdown is triggered: the listener closes, an idle keep-alive connection is closed,
/// the in-flight request still gets its complete response (with `Connection: close`), and the
/// proxy returns.
async fn graceful_shutdown_finishes_in_flight_request(rt: Runtime) {
    let (origin, mut arrived, release) = gated_origin().await;
    let mut proxy = start_proxy(rt, config_for(&[origin]));

    let mut idle = Client::connect(proxy.addr).await;
    idle.send(b"GET /idle HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    let resp = idle.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n/idle"
    );

    let mut in_flight = Client::connect(proxy.addr).await;
    in_flight
        .send(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await;
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("the request reached the origin within WAIT")
        .expect("origin alive");

    proxy.shutdown();

    // The idle keep-alive connection is closed without a response.
    idle.expect_eof().await;

    // New connections are refused once the accept loop has seen the shutdown; until then an
    // accepted one must be closed without an answer. Bounded retries.
    let deadline = Instant::now() + WAIT;
    loop {
        if refused_or_closed(proxy.addr).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener was still open {WAIT:?} after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The in-flight exchange completes.
    release.send_replace(true);
    let resp = in_flight.response(false).await;
    assert_eq!(
        show(&resp.raw),
        "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate"
    );
    in_flight.expect_eof().await;
    drop((idle, in_flight));
    proxy.join_bounded();
}

/// A WebSocket tunnel keeps working during the drain and is closed at the drain deadline; then
/// the proxy returns.
async fn graceful_shutdown_closes_tunnel_at_drain_deadline(rt: Runtime) {
    const DRAIN: Duration = Duration::from_millis(500);
    let echo = origin::ws_echo().await;
    let mut proxy = start_proxy_with(
        rt,
        config_for(&[echo]),
        ProxyOptions {
            drain_timeout: DRAIN,
            ..ProxyOptions::default()
        },
    );
    let (mut ws, response) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(proxy.ws_url("/drain")),
    )
    .await
    .expect("handshake within WAIT")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status().as_u16(), 101);
    ws.send(Message::text("before"))
        .await
        .expect("send before shutdown");
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("echo within WAIT");
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "before"),
        "{echoed:?}"
    );

    let triggered = Instant::now();
    proxy.shutdown();
    // Still open during the drain.
    ws.send(Message::text("during"))
        .await
        .expect("send during drain");
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("echo within WAIT");
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "during"),
        "{echoed:?}"
    );
    assert!(
        triggered.elapsed() < DRAIN,
        "the echo during the drain was too slow to prove anything"
    );

    // Closed at the deadline: the next read ends (close frame, EOF or reset).
    let ended = tokio::time::timeout(WAIT, ws.next()).await;
    match ended {
        Err(_) => panic!("tunnel still open {WAIT:?} after the drain began"),
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
        Ok(Some(Ok(other))) => panic!("unexpected message while draining: {other:?}"),
    }
    let took = triggered.elapsed();
    assert!(
        took >= DRAIN - Duration::from_millis(50),
        "tunnel closed before the drain deadline: {took:?}"
    );
    drop(ws);
    proxy.join_bounded();
}
