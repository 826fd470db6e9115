//! End-to-end WebSocket through switchyard: real tokio-tungstenite peers where the protocol
//! should just work, and raw TCP peers (hand-built frames, heads written in one `write_all`)
//! where the exact bytes and their timing are the point. Each scenario runs on every runtime;
//! every wait is bounded by [`WAIT`] (or a named, longer bound for the heavy cases).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proxy_core::{
    websocket_accept, CloseReason, Config, ExchangeLog, ResponseError, Side, Timer, WebSocket,
};
use switchyard_tests::origin::{http_origin, SeenRequest};
use switchyard_tests::{config_for, runtime_tests, start_proxy, ProxyHandle, Runtime, WAIT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{accept_async, connect_async, WebSocketStream};

runtime_tests! {
    echo_message_sizes,
    fragmented_messages_reassembled,
    ping_pong_both_ways,
    close_code_and_reason_both_ways,
    concurrent_200_connections,
    upstream_101_and_first_frames_in_one_write,
    client_frame_right_after_upgrade_request,
    refused_upgrade_keeps_connection_http,
    unsolicited_or_bogus_101_is_502,
    tunnel_idle_timeout_closes_tunnel,
    tunnel_not_subject_to_http_read_timeout,
    half_close_in_tunnel,
    event_log_for_echo_session,
    upgrades_fail_over_from_a_dead_upstream,
    frame_aware_silent_client_is_closed_as_dead,
    frame_aware_live_peers_answer_pings_and_stay,
    frame_aware_drain_sends_going_away_to_both,
    frame_aware_hard_stop_still_says_going_away,
    frame_aware_oversized_message_gets_1009,
    frame_aware_compressed_frames_pass_with_keepalive,
}

// ---- helpers ----

/// The RFC 6455 §1.3 example key; any 16-byte base64 nonce would do.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A websocket upgrade request head for `path` with [`KEY`].
fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// The value of the first header `name` (case-insensitive) in a raw head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The status line of a raw head.
fn status_line(head: &str) -> &str {
    head.split("\r\n").next().unwrap_or("")
}

/// Asserts that `head` is a genuine `101` for [`KEY`], as the proxy must relay it.
fn assert_switch(head: &str) {
    assert!(
        status_line(head).starts_with("HTTP/1.1 101 "),
        "expected a 101, got {head:?}"
    );
    let expected = websocket_accept(KEY.as_bytes());
    assert_eq!(
        header(head, "sec-websocket-accept").map(str::as_bytes),
        Some(&expected[..]),
        "accept in {head:?}"
    );
    assert!(
        header(head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "Upgrade in {head:?}"
    );
}

/// A `101` answering a request whose key is `key`.
fn switch_response(key: &str) -> String {
    let accept = websocket_accept(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(&accept)
    )
}

/// One frame, masked with `mask` (as a client must) or not (as a server must).
fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(m | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(m | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame; the key varies with the payload so no two tests share one.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let key = (0x9e37_79b9_u32 ^ n.wrapping_mul(2_654_435_761)).to_be_bytes();
    encode_frame(fin, opcode, payload, Some(key))
}

/// An unmasked server frame.
fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, opcode, payload, None)
}

/// A close frame payload: code then reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

impl Frame {
    /// Asserts this is a final, unmasked server frame with `opcode` and `payload`.
    fn assert_server(&self, opcode: u8, payload: &[u8]) {
        assert!(
            self.fin && self.rsv == 0 && !self.masked && self.opcode == opcode,
            "expected a final unmasked frame with opcode {opcode:#x}, got fin={} rsv={} masked={} opcode={:#x} ({} bytes)",
            self.fin,
            self.rsv,
            self.masked,
            self.opcode,
            self.payload.len()
        );
        assert_bytes_eq("frame payload", &self.payload, payload);
    }
}

/// Decodes one frame from the front of `buf`, with the number of bytes it used.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let key: Option<[u8; 4]> = if masked {
        let k = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(k)
    } else {
        None
    };
    let data = buf.get(pos..pos + len)?;
    let payload = match key {
        Some(k) => data.iter().enumerate().map(|(i, b)| b ^ k[i % 4]).collect(),
        None => data.to_vec(),
    };
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        masked,
        payload,
    };
    Some((frame, pos + len))
}

/// Byte-exact comparison that does not print megabytes on failure.
fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        let show = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
        panic!(
            "{what}: got {} bytes, want {}; first difference at {first:?}; got starts {:?}, want starts {:?}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// Deterministic pseudo-random bytes (every byte value occurs).
fn binary_payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Deterministic printable ASCII of exactly `len` bytes.
fn text_payload(len: usize, seed: u32) -> String {
    binary_payload(len, seed)
        .into_iter()
        .map(|b| char::from(b' ' + b % 95))
        .collect()
}

/// Splits a complete response with a Content-Length body into head, body and what follows.
fn split_response(bytes: &[u8]) -> (String, &[u8], &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head")
        + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let len: usize = header(&head, "content-length")
        .map(|v| v.parse().expect("numeric Content-Length"))
        .unwrap_or(0);
    assert!(bytes.len() >= end + len, "truncated body: {head:?}");
    let (body, rest) = bytes[end..].split_at(len);
    (head, body, rest)
}

/// A TCP connection read and written by hand, keeping unread bytes and byte counts.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    read_total: usize,
    written_total: usize,
}

impl Raw {
    fn new(stream: TcpStream) -> Self {
        Raw {
            stream,
            buf: Vec::new(),
            read_total: 0,
            written_total: 0,
        }
    }

    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect within WAIT")
            .expect("connect");
        Raw::new(stream)
    }

    async fn write(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write within WAIT")
            .expect("write");
        self.written_total += bytes.len();
    }

    /// Reads more bytes into the buffer; false at a clean EOF. Panics on errors and timeouts.
    async fn fill(&mut self) -> bool {
        let before = self.buf.len();
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "nothing read within {WAIT:?}; unread so far: {:?}",
                    String::from_utf8_lossy(&self.buf[..before.min(400)])
                )
            })
            .expect("read");
        self.read_total += n;
        n > 0
    }

    /// Reads a head (through the blank line) and returns it; later bytes stay buffered.
    async fn read_head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return String::from_utf8(head).expect("ASCII head");
            }
            assert!(
                self.fill().await,
                "EOF before a complete head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads a response head and its Content-Length body.
    async fn read_response(&mut self) -> (String, Vec<u8>) {
        let head = self.read_head().await;
        let len: usize = header(&head, "content-length")
            .map(|v| v.parse().expect("numeric Content-Length"))
            .unwrap_or(0);
        while self.buf.len() < len {
            assert!(self.fill().await, "EOF inside the body of {head:?}");
        }
        let body = self.buf.drain(..len).collect();
        (head, body)
    }

    async fn read_frame(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            assert!(
                self.fill().await,
                "EOF before a complete frame; {} bytes buffered",
                self.buf.len()
            );
        }
    }

    /// Reads until EOF; returns everything not read before.
    async fn read_to_eof(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Asserts the next read is a clean EOF with nothing before it.
    async fn expect_eof(&mut self) {
        let rest = self.read_to_eof().await;
        assert!(
            rest.is_empty(),
            "expected EOF, got {} more bytes: {:?}",
            rest.len(),
            String::from_utf8_lossy(&rest[..rest.len().min(200)])
        );
    }

    /// Performs a websocket handshake through the proxy at `addr` (the upstream must answer).
    async fn ws_connect(addr: SocketAddr, path: &str) -> (Self, String) {
        let mut raw = Raw::connect(addr).await;
        raw.write(upgrade_request(path).as_bytes()).await;
        let head = raw.read_head().await;
        assert_switch(&head);
        (raw, head)
    }

    /// Client-side closing handshake with an echoing server: close, the same close back, EOF.
    async fn close_handshake(&mut self, code: u16, reason: &str) {
        let payload = close_payload(code, reason);
        self.write(&client_frame(true, OP_CLOSE, &payload)).await;
        self.read_frame().await.assert_server(OP_CLOSE, &payload);
        self.expect_eof().await;
    }
}

/// Accepts one connection on `listener` and reads its upgrade request head; returns the
/// connection and the head.
async fn accept_upgrade(listener: &TcpListener) -> (Raw, String) {
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("upstream accept within WAIT")
        .expect("upstream accept");
    let mut raw = Raw::new(stream);
    let head = raw.read_head().await;
    assert!(
        status_line(&head).starts_with("GET "),
        "upstream got {head:?}"
    );
    (raw, head)
}

/// The key of an upgrade request head.
fn key_of(head: &str) -> String {
    header(head, "sec-websocket-key")
        .expect("forwarded Sec-WebSocket-Key")
        .to_owned()
}

/// Waits for a spawned peer task, failing the test if it panicked.
async fn join<T>(task: JoinHandle<T>, what: &str) -> T {
    match tokio::time::timeout(WAIT, task).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what} did not finish within {WAIT:?}"),
    }
}

/// Runs a blocking harness call off the test runtime's workers.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    join(tokio::task::spawn_blocking(f), what).await
}

/// Waits (bounded) until the proxy reported at least `n` events.
async fn wait_events(proxy: &ProxyHandle, n: usize) -> Vec<ExchangeLog> {
    let events = Arc::clone(&proxy.events);
    blocking("event wait", move || events.wait_for(n)).await
}

/// Stops the proxy (bounded); every connection must be closed by now.
async fn stop(proxy: ProxyHandle) {
    blocking("proxy stop", move || proxy.stop()).await;
}

/// The next websocket message (or end), within [`WAIT`].
async fn next_msg<S>(ws: &mut WebSocketStream<S>) -> Option<Result<Message, WsError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("websocket message within WAIT")
}

/// The next websocket message, which must exist.
async fn recv<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    next_msg(ws)
        .await
        .expect("websocket still open")
        .expect("websocket message")
}

/// Sends a websocket message within [`WAIT`].
async fn send<S>(ws: &mut WebSocketStream<S>, msg: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(WAIT, ws.send(msg))
        .await
        .expect("send within WAIT")
        .expect("send");
}

/// Asserts `got` is the same message as `want`, byte for byte.
fn assert_same_message(got: &Message, want: &Message) {
    match (got, want) {
        (Message::Text(g), Message::Text(w)) => {
            assert_bytes_eq("text message", g.as_bytes(), w.as_bytes())
        }
        (Message::Binary(g), Message::Binary(w)) => assert_bytes_eq("binary message", g, w),
        _ => panic!(
            "expected a {} message of {} bytes, got {got:?}",
            if want.is_text() { "text" } else { "binary" },
            want.len()
        ),
    }
}

/// Closes a client websocket and waits for the server's close and the end of the stream.
async fn close_client<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(WAIT, ws.close(None))
        .await
        .expect("close within WAIT")
        .expect("close");
    loop {
        match next_msg(ws).await {
            None => return,
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => panic!("unexpected message while closing: {other:?}"),
            Some(Err(e)) => panic!("error while closing: {e}"),
        }
    }
}

type Client = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A tungstenite client through the proxy.
async fn ws_client(proxy: &ProxyHandle, path: &str) -> Client {
    let (ws, response) = tokio::time::timeout(WAIT, connect_async(proxy.ws_url(path)))
        .await
        .expect("handshake within WAIT")
        .expect("handshake through the proxy");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// A websocket echo server like `origin::ws_echo`, but one that completes the closing
/// handshake: `ws_echo` answers a close with `ws.close(None)`, which tungstenite refuses
/// (`SendAfterClosing`) without flushing the queued close reply, so its clients see the
/// connection end without a close frame. Here the stream is read on until it ends, which
/// flushes the reply and then closes the connection (the server closes first, as RFC 6455
/// wants).
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Spawns a one-connection websocket server running `serve` on the accepted stream.
async fn ws_server<F, Fut, T>(serve: F) -> (SocketAddr, JoinHandle<T>)
where
    F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ws server");
    let addr = listener.local_addr().expect("ws server address");
    let task = tokio::spawn(async move {
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("ws server accept within WAIT")
            .expect("ws server accept");
        let ws = tokio::time::timeout(WAIT, accept_async(stream))
            .await
            .expect("server handshake within WAIT")
            .expect("server handshake");
        serve(ws).await
    });
    (addr, task)
}

// ---- scenarios ----

/// Text and binary messages at every frame-length boundary, up to 1 MiB, and a 16 MiB binary
/// message, all echoed byte-exact.
async fn echo_message_sizes(rt: Runtime) {
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    let mut ws = ws_client(&proxy, "/echo").await;
    let sizes = [0usize, 1, 125, 126, 65535, 65536, 1 << 20];
    let mut messages = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        messages.push(Message::Text(text_payload(n, i as u32 + 1)));
        messages.push(Message::Binary(binary_payload(n, i as u32 + 101)));
    }
    messages.push(Message::Binary(binary_payload(16 << 20, 7)));
    for msg in messages {
        send(&mut ws, msg.clone()).await;
        let got = recv(&mut ws).await;
        assert_same_message(&got, &msg);
    }
    close_client(&mut ws).await;
    drop(ws);
    stop(proxy).await;
}

/// Two upstreams, the first refusing connections: every upgrade still succeeds (the proxy moves
/// on to the live one, then skips the dead one), and the log says what was tried.
async fn upgrades_fail_over_from_a_dead_upstream(rt: Runtime) {
    let dead = switchyard_tests::refusing_port();
    let live = echo_upstream().await;
    let proxy = start_proxy(rt, config_for(&[dead.addr, live]));
    for i in 0..6u32 {
        let mut ws = ws_client(&proxy, "/chat").await;
        let msg = Message::Text(text_payload(32, i));
        send(&mut ws, msg.clone()).await;
        assert_same_message(&recv(&mut ws).await, &msg);
        close_client(&mut ws).await;
    }
    let events = proxy.events.wait_for(6);
    assert!(events.iter().all(|e| e.status == Some(101)), "{events:?}");
    let failures: Vec<_> = events.iter().flat_map(|e| &e.upstream_failures).collect();
    assert_eq!(failures.len(), 1, "tried once, then skipped: {failures:?}");
    assert_eq!(failures[0].0.port(), dead.addr.port());
    assert_eq!(failures[0].1, proxy_core::ConnectError::Refused);
    stop(proxy).await;
}

/// Messages sent as several frames (with a ping between fragments) come back reassembled,
/// with the pong first.
async fn fragmented_messages_reassembled(rt: Runtime) {
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    let (mut raw, _) = Raw::ws_connect(proxy.addr, "/frag").await;

    // Text in three fragments, a ping interleaved (control frames may be).
    let mut out = client_frame(false, OP_TEXT, b"Hello");
    out.extend(client_frame(false, OP_CONT, b", fragmented "));
    out.extend(client_frame(true, OP_PING, b"mid-message"));
    out.extend(client_frame(true, OP_CONT, b"world"));
    raw.write(&out).await;
    raw.read_frame()
        .await
        .assert_server(OP_PONG, b"mid-message");
    raw.read_frame()
        .await
        .assert_server(OP_TEXT, b"Hello, fragmented world");

    // Binary in fragments of every length encoding, each written separately.
    let whole = binary_payload(70_000 + 300 + 5, 42);
    let parts = [&whole[..70_000], &whole[70_000..70_300], &whole[70_300..]];
    for (i, part) in parts.iter().enumerate() {
        let opcode = if i == 0 { OP_BINARY } else { OP_CONT };
        raw.write(&client_frame(i == parts.len() - 1, opcode, part))
            .await;
    }
    raw.read_frame().await.assert_server(OP_BINARY, &whole);

    raw.close_handshake(1000, "done").await;
    drop(raw);
    stop(proxy).await;
}

/// A client ping is answered with a pong carrying the same payload, and a server ping reaches
/// the client and its pong reaches the server.
async fn ping_pong_both_ways(rt: Runtime) {
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    let mut ws = ws_client(&proxy, "/ping").await;
    for payload in [Vec::new(), b"ping-1".to_vec(), binary_payload(125, 3)] {
        send(&mut ws, Message::Ping(payload.clone())).await;
        match recv(&mut ws).await {
            Message::Pong(p) => assert_bytes_eq("pong payload", &p, &payload),
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    close_client(&mut ws).await;
    drop(ws);
    stop(proxy).await;

    // Server-initiated.
    let (addr, server) = ws_server(|mut ws| async move {
        send(&mut ws, Message::Ping(b"from-server".to_vec())).await;
        let pong = match recv(&mut ws).await {
            Message::Pong(p) => p,
            other => panic!("server expected a pong, got {other:?}"),
        };
        send(&mut ws, Message::Text("got pong".into())).await;
        // Wait for the client's close (tungstenite answers it).
        while let Some(Ok(_)) = next_msg(&mut ws).await {}
        pong
    })
    .await;
    let proxy = start_proxy(rt, config_for(&[addr]));
    let mut ws = ws_client(&proxy, "/ping").await;
    match recv(&mut ws).await {
        Message::Ping(p) => assert_eq!(p, b"from-server"),
        other => panic!("expected the server's ping, got {other:?}"),
    }
    // tungstenite queues the pong; flushing sends it.
    tokio::time::timeout(WAIT, ws.flush())
        .await
        .expect("flush within WAIT")
        .expect("flush");
    assert_eq!(recv(&mut ws).await, Message::Text("got pong".into()));
    close_client(&mut ws).await;
    drop(ws);
    assert_eq!(join(server, "ws server").await, b"from-server");
    stop(proxy).await;
}

/// Close codes and reasons cross the proxy both ways, for client- and server-initiated closes.
async fn close_code_and_reason_both_ways(rt: Runtime) {
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    for code in [CloseCode::Normal, CloseCode::Library(4001)] {
        let mut ws = ws_client(&proxy, "/close").await;
        let frame = CloseFrame {
            code,
            reason: "bye".into(),
        };
        tokio::time::timeout(WAIT, ws.close(Some(frame.clone())))
            .await
            .expect("close within WAIT")
            .expect("close");
        match recv(&mut ws).await {
            Message::Close(Some(got)) => assert_eq!(got, frame),
            other => panic!("expected the echoed close {frame:?}, got {other:?}"),
        }
        assert!(
            next_msg(&mut ws).await.is_none(),
            "stream ends after the close"
        );
    }
    stop(proxy).await;

    // Server-initiated: close with 4002 after the first message.
    let server_close = CloseFrame {
        code: CloseCode::Library(4002),
        reason: "server bye".into(),
    };
    let sent = server_close.clone();
    let (addr, server) = ws_server(move |mut ws| async move {
        let first = recv(&mut ws).await;
        assert_eq!(first, Message::Text("first".into()));
        tokio::time::timeout(WAIT, ws.close(Some(sent)))
            .await
            .expect("server close within WAIT")
            .expect("server close");
        // The client's answer.
        match recv(&mut ws).await {
            Message::Close(reply) => reply,
            other => panic!("server expected the client's close, got {other:?}"),
        }
    })
    .await;
    let proxy = start_proxy(rt, config_for(&[addr]));
    let mut ws = ws_client(&proxy, "/close").await;
    send(&mut ws, Message::Text("first".into())).await;
    match recv(&mut ws).await {
        Message::Close(Some(got)) => assert_eq!(got, server_close),
        other => panic!("expected the server's close {server_close:?}, got {other:?}"),
    }
    // The client's reply goes out on the next poll; then the server closes the connection.
    match next_msg(&mut ws).await {
        None => {}
        Some(other) => panic!("expected the end of the stream, got {other:?}"),
    }
    drop(ws);
    let reply = join(server, "ws server").await;
    assert_eq!(reply, Some(server_close));
    stop(proxy).await;
}

/// 200 connections at once, each echoing 50 messages; every one succeeds and is logged.
async fn concurrent_200_connections(rt: Runtime) {
    const CONNS: usize = 200;
    const MESSAGES: usize = 50;
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    let url = proxy.ws_url("/many");
    let started = Instant::now();
    let tasks: Vec<JoinHandle<()>> = (0..CONNS)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let (mut ws, _) = tokio::time::timeout(WAIT, connect_async(url))
                    .await
                    .expect("handshake within WAIT")
                    .expect("handshake");
                for m in 0..MESSAGES {
                    let msg = if m % 2 == 0 {
                        Message::Text(format!("connection {c} message {m}"))
                    } else {
                        Message::Binary(format!("{c}:{m}").repeat(m + 1).into_bytes())
                    };
                    send(&mut ws, msg.clone()).await;
                    let got = recv(&mut ws).await;
                    assert_same_message(&got, &msg);
                }
                close_client(&mut ws).await;
            })
        })
        .collect();
    let all = async {
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await {
                Ok(()) => {}
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("connection {i}: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("200 x 50 echoes within 60 s");
    eprintln!(
        "{CONNS} x {MESSAGES} echoes on {rt:?} took {:?}",
        started.elapsed()
    );
    let events = wait_events(&proxy, CONNS).await;
    assert_eq!(events.len(), CONNS);
    for e in &events {
        assert_eq!(e.status, Some(101), "{e:?}");
        assert!(e.upgraded, "{e:?}");
    }
    stop(proxy).await;
}

/// The upstream writes its `101` and its first frames in one write; the client gets the
/// frames, in order, as its first messages.
async fn upstream_101_and_first_frames_in_one_write(rt: Runtime) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    let upstream = tokio::spawn(async move {
        let (mut raw, head) = accept_upgrade(&listener).await;
        let mut out = switch_response(&key_of(&head)).into_bytes();
        out.extend(server_frame(true, OP_TEXT, b"hello"));
        out.extend(server_frame(true, OP_BINARY, b"\x00\x01second"));
        raw.write(&out).await;
        let frame = raw.read_frame().await;
        assert!(
            frame.masked && frame.fin && frame.opcode == OP_TEXT,
            "{frame:?}"
        );
        frame.payload
    });
    let proxy = start_proxy(rt, config_for(&[addr]));
    let mut ws = ws_client(&proxy, "/first").await;
    assert_eq!(recv(&mut ws).await, Message::Text("hello".into()));
    assert_eq!(
        recv(&mut ws).await,
        Message::Binary(b"\x00\x01second".to_vec())
    );
    send(&mut ws, Message::Text("reply".into())).await;
    assert_eq!(join(upstream, "raw upstream").await, b"reply");
    // The upstream is gone: the client sees the end.
    assert!(
        !matches!(next_msg(&mut ws).await, Some(Ok(_))),
        "no more messages"
    );
    drop(ws);
    stop(proxy).await;
}

/// The client writes the upgrade request and a frame in one write, without waiting for the
/// `101`; the frame is echoed after the switch.
async fn client_frame_right_after_upgrade_request(rt: Runtime) {
    let proxy = start_proxy(rt, config_for(&[echo_upstream().await]));
    let mut raw = Raw::connect(proxy.addr).await;
    let mut out = upgrade_request("/eager").into_bytes();
    out.extend(client_frame(true, OP_TEXT, b"early bird"));
    out.extend(client_frame(true, OP_BINARY, &binary_payload(300, 9)));
    raw.write(&out).await;
    let head = raw.read_head().await;
    assert_switch(&head);
    raw.read_frame().await.assert_server(OP_TEXT, b"early bird");
    raw.read_frame()
        .await
        .assert_server(OP_BINARY, &binary_payload(300, 9));
    raw.close_handshake(1000, "").await;
    drop(raw);
    stop(proxy).await;
}

/// An upgrade refused with a final response leaves an ordinary HTTP connection: the client
/// gets exactly that response, then a normal answer to its next request on the same
/// connection.
async fn refused_upgrade_keeps_connection_http(rt: Runtime) {
    fn response(status: &str, extra: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
    let origin = http_origin(Arc::new(|req: &SeenRequest| {
        let path = req.request_line().split(' ').nth(1).unwrap_or("");
        Some(match path {
            "/ws-403" => response("403 Forbidden", "", "no websockets for you\n"),
            "/ws-426" => response(
                "426 Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
                "upgrade elsewhere\n",
            ),
            "/ws-200" => response("200 OK", "", "a plain page instead\n"),
            "/next" => response("200 OK", "", "next page\n"),
            _ => response("404 Not Found", "", ""),
        })
    }))
    .await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let cases = [
        (
            "/ws-403",
            "HTTP/1.1 403 Forbidden",
            "no websockets for you\n",
        ),
        (
            "/ws-426",
            "HTTP/1.1 426 Upgrade Required",
            "upgrade elsewhere\n",
        ),
        ("/ws-200", "HTTP/1.1 200 OK", "a plain page instead\n"),
    ];
    for (path, status, body) in cases {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.write(upgrade_request(path).as_bytes()).await;
        let (head, got) = raw.read_response().await;
        assert_eq!(status_line(&head), status, "{path}: {head:?}");
        assert_bytes_eq(path, &got, body.as_bytes());
        assert!(
            raw.buf.is_empty(),
            "{path}: bytes after the refusal: {:?}",
            String::from_utf8_lossy(&raw.buf)
        );
        assert!(
            !header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "{path}: the refusal must not close the connection: {head:?}"
        );
        raw.write(b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let (head, got) = raw.read_response().await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "after {path}");
        assert_bytes_eq("/next body", &got, b"next page\n");
        assert!(raw.buf.is_empty(), "bytes after /next");
        drop(raw);
    }
    let seen = origin.seen();
    let paths: Vec<String> = seen.iter().map(|r| r.request_line().to_owned()).collect();
    assert_eq!(
        paths,
        [
            "GET /ws-403 HTTP/1.1",
            "GET /next HTTP/1.1",
            "GET /ws-426 HTTP/1.1",
            "GET /next HTTP/1.1",
            "GET /ws-200 HTTP/1.1",
            "GET /next HTTP/1.1",
        ]
    );
    for r in &seen {
        let upgrade = r.request_line() != "GET /next HTTP/1.1";
        assert_eq!(r.has_header("upgrade"), upgrade, "{:?}", r.head);
    }
    let events = wait_events(&proxy, 6).await;
    for e in &events {
        assert!(!e.upgraded, "{e:?}");
    }
    stop(proxy).await;
}

/// A `101` the client did not ask for, with a wrong or missing `Sec-WebSocket-Accept`, or
/// naming another protocol becomes a 502 with `Connection: close`; nothing the upstream sent after it reaches the
/// client.
async fn unsolicited_or_bogus_101_is_502(rt: Runtime) {
    const SECRET: &str = "UPSTREAM-SECRET";
    let origin = http_origin(Arc::new(|req: &SeenRequest| {
        let path = req.request_line().split(' ').nth(1).unwrap_or("");
        let head = match path {
            "/plain" => switch_response(KEY),
            "/bad-accept" => switch_response("AAAAAAAAAAAAAAAAAAAAAA=="),
            "/other-protocol" => switch_response(KEY).replace("Upgrade: websocket", "Upgrade: foo"),
            _ => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\n\r\n"
                .to_owned(),
        };
        let mut out = head.into_bytes();
        out.extend(server_frame(true, OP_TEXT, SECRET.as_bytes()));
        out.extend_from_slice(SECRET.as_bytes());
        Some(out)
    }))
    .await;
    let proxy = start_proxy(rt, config_for(&[origin.addr]));
    let cases = [
        (
            "GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
            ResponseError::UnsolicitedSwitch,
        ),
        (upgrade_request("/bad-accept"), ResponseError::BadAccept),
        (upgrade_request("/no-accept"), ResponseError::BadAccept),
        (
            upgrade_request("/other-protocol"),
            ResponseError::UpgradeMismatch,
        ),
    ];
    for (i, (request, why)) in cases.iter().enumerate() {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.write(request.as_bytes()).await;
        let all = raw.read_to_eof().await;
        let text = String::from_utf8_lossy(&all);
        assert!(
            status_line(&text).starts_with("HTTP/1.1 502 "),
            "{request:?}: {text:?}"
        );
        assert!(!text.contains(SECRET), "{request:?}: leaked: {text:?}");
        let (head, body, rest) = split_response(&all);
        assert_eq!(
            header(&head, "connection").map(str::to_ascii_lowercase),
            Some("close".to_owned()),
            "{request:?}: {head:?}"
        );
        assert!(
            rest.is_empty(),
            "{request:?}: bytes after the 502: {:?}",
            String::from_utf8_lossy(rest)
        );
        assert!(!body.is_empty(), "the proxy's 502 has a short body");
        let events = wait_events(&proxy, i + 1).await;
        let e = &events[i];
        assert_eq!(e.status, Some(502), "{e:?}");
        assert!(!e.upgraded, "{e:?}");
        assert_eq!(
            e.close,
            Some(CloseReason::BadResponse(why.clone())),
            "{e:?}"
        );
    }
    stop(proxy).await;
}

/// A silent tunnel is closed after `tunnel_idle`, on both sides, and logged as such.
async fn tunnel_idle_timeout_closes_tunnel(rt: Runtime) {
    let (addr, server) = ws_server(|mut ws| async move {
        let started = Instant::now();
        let end = next_msg(&mut ws).await;
        assert!(
            !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
            "upstream expected the end, got {end:?}"
        );
        started.elapsed()
    })
    .await;
    let mut config = config_for(&[addr]);
    config.timeouts.tunnel_idle = Duration::from_millis(300);
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/idle").await;
    let started = Instant::now();
    let end = next_msg(&mut ws).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(end, None | Some(Err(_))),
        "expected the tunnel to close, got {end:?}"
    );
    // Only an upper bound, with ten times the slack: the proxy armed its timer when the tunnel
    // opened, a moment before this client saw the 101, so a lower bound measured here could
    // fail on a loaded machine. That the close is the idle timer's is asserted from the log.
    assert!(
        elapsed < Duration::from_secs(3),
        "the 300 ms idle timeout took {elapsed:?}"
    );
    join(server, "ws server").await;
    let events = wait_events(&proxy, 1).await;
    let e = &events[0];
    assert_eq!(e.status, Some(101), "{e:?}");
    assert!(e.upgraded, "{e:?}");
    assert_eq!(
        e.close,
        Some(CloseReason::Timeout(Timer::TunnelIdle)),
        "{e:?}"
    );
    drop(ws);
    stop(proxy).await;
}

/// The HTTP read timeout does not apply to a tunnel: messages 300 ms apart keep flowing with
/// `read` = 200 ms.
async fn tunnel_not_subject_to_http_read_timeout(rt: Runtime) {
    let mut config = config_for(&[echo_upstream().await]);
    config.timeouts.read = Duration::from_millis(200);
    config.timeouts.tunnel_idle = Duration::from_secs(5);
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/slow").await;
    for i in 0..5 {
        if i > 0 {
            // Pacing, not synchronisation: silence longer than the read timeout.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let msg = Message::Text(format!("tick {i}"));
        send(&mut ws, msg.clone()).await;
        assert_eq!(recv(&mut ws).await, msg, "echo {i}");
    }
    assert!(
        proxy.events.all().is_empty(),
        "nothing ended yet: {:?}",
        proxy.events.all()
    );
    close_client(&mut ws).await;
    drop(ws);
    let events = wait_events(&proxy, 1).await;
    let e = &events[0];
    assert!(e.upgraded, "{e:?}");
    assert_eq!(e.close, Some(CloseReason::UpstreamClosed), "{e:?}");
    stop(proxy).await;
}

/// Half-close in a tunnel, both ways: after one side shuts its write half, the other side
/// can still send, and the FIN is passed on only after its data.
async fn half_close_in_tunnel(rt: Runtime) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    let proxy = start_proxy(rt, config_for(&[addr]));

    // The client shuts down first; the upstream answers after seeing the EOF.
    let upstream = tokio::spawn(async move {
        let (mut raw, head) = accept_upgrade(&listener).await;
        raw.write(switch_response(&key_of(&head)).as_bytes()).await;
        let frame = raw.read_frame().await;
        assert_eq!(
            (frame.masked, frame.opcode, frame.payload.as_slice()),
            (true, OP_TEXT, &b"last words"[..])
        );
        raw.expect_eof().await;
        raw.write(&server_frame(true, OP_TEXT, b"after your fin"))
            .await;
        raw.stream.shutdown().await.expect("upstream shutdown");
        drop(raw);
        listener
    });
    let (mut raw, _) = Raw::ws_connect(proxy.addr, "/half").await;
    raw.write(&client_frame(true, OP_TEXT, b"last words")).await;
    raw.stream.shutdown().await.expect("client shutdown");
    raw.read_frame()
        .await
        .assert_server(OP_TEXT, b"after your fin");
    raw.expect_eof().await;
    drop(raw);
    let listener = join(upstream, "raw upstream").await;
    let events = wait_events(&proxy, 1).await;
    assert!(events[0].upgraded, "{:?}", events[0]);
    assert_eq!(events[0].close, Some(CloseReason::ClientClosed));

    // The upstream shuts down first; the client can still send, and then closes.
    let upstream = tokio::spawn(async move {
        let (mut raw, head) = accept_upgrade(&listener).await;
        raw.write(switch_response(&key_of(&head)).as_bytes()).await;
        raw.stream.shutdown().await.expect("upstream shutdown");
        let frame = raw.read_frame().await;
        assert_eq!(
            (frame.masked, frame.opcode, frame.payload.as_slice()),
            (true, OP_TEXT, &b"still here"[..])
        );
        raw.expect_eof().await;
    });
    let (mut raw, _) = Raw::ws_connect(proxy.addr, "/half").await;
    raw.expect_eof().await;
    raw.write(&client_frame(true, OP_TEXT, b"still here")).await;
    raw.stream.shutdown().await.expect("client shutdown");
    join(upstream, "raw upstream").await;
    drop(raw);
    let events = wait_events(&proxy, 2).await;
    assert!(events[1].upgraded, "{:?}", events[1]);
    assert_eq!(events[1].close, Some(CloseReason::UpstreamClosed));
    stop(proxy).await;
}

/// A finished echo session is logged once: 101, upgraded, a tunnel duration, and exactly the
/// bytes the client wrote and read.
async fn event_log_for_echo_session(rt: Runtime) {
    let echo = echo_upstream().await;
    let proxy = start_proxy(rt, config_for(&[echo]));
    let events = Arc::clone(&proxy.events);
    let (mut raw, head) = Raw::ws_connect(proxy.addr, "/log").await;
    raw.write(&client_frame(true, OP_TEXT, b"log me")).await;
    raw.read_frame().await.assert_server(OP_TEXT, b"log me");
    raw.close_handshake(1000, "bye").await;
    let (written, read) = (raw.written_total, raw.read_total);
    drop(raw);
    let logged = wait_events(&proxy, 1).await;
    stop(proxy).await;
    let all = events.all();
    assert_eq!(all.len(), 1, "one event per tunnel: {all:?}");
    let e = &logged[0];
    assert_eq!(e.request_line, "GET /log HTTP/1.1");
    assert_eq!(e.status, Some(101));
    assert!(e.upgraded);
    assert!(e.tunnel_duration.is_some(), "{e:?}");
    assert_eq!(
        e.upstream.as_ref().map(ToString::to_string),
        Some(echo.to_string())
    );
    assert!(e.bytes_from_client > 0 && e.bytes_to_client > 0, "{e:?}");
    assert_eq!(e.bytes_from_client, written as u64, "{e:?}");
    assert_eq!(e.bytes_to_client, read as u64, "{e:?}");
    assert_eq!(
        e.body_bytes_to_client,
        (read - head.len()) as u64,
        "tunnel bytes after the 101 head: {e:?}"
    );
    assert_eq!(e.close, Some(CloseReason::UpstreamClosed), "{e:?}");
}

// ---- the frame-aware tunnel ----

/// `config` with the frame-aware tunnel: pings after `interval` of silence, `timeout` for the
/// Pong, and a short drain spread so a drain test takes well under a second.
fn frame_aware(mut config: Config, interval: Option<Duration>, timeout: Duration) -> Config {
    let mut w = WebSocket::default();
    w.ping_interval = interval;
    w.ping_timeout = timeout;
    w.close_spread = Duration::from_millis(200);
    w.close_timeout = Duration::from_secs(2);
    config.websocket = Some(w);
    config
}

/// A websocket server that answers pings (tungstenite does) and records every message until
/// the stream ends; returns them.
async fn recording_server() -> (SocketAddr, JoinHandle<Vec<Message>>) {
    ws_server(|mut ws| async move {
        let mut seen = Vec::new();
        while let Some(Ok(msg)) = next_msg(&mut ws).await {
            seen.push(msg);
        }
        seen
    })
    .await
}

/// Reads a client's stream to its end; returns the code of the Close it received, if any.
async fn read_to_close(ws: &mut Client) -> Option<u16> {
    let mut code = None;
    while let Some(Ok(msg)) = next_msg(ws).await {
        if let Message::Close(Some(f)) = msg {
            code = Some(u16::from(f.code));
        }
    }
    code
}

/// The close code of the last Close among `msgs`.
fn close_code_of(msgs: &[Message]) -> Option<u16> {
    msgs.iter().rev().find_map(|m| match m {
        Message::Close(Some(f)) => Some(u16::from(f.code)),
        _ => None,
    })
}

/// A client that vanished without a FIN (it reads, but never answers): the proxy pings it,
/// and when no Pong comes it closes the tunnel as dead, with Close 1001 to the upstream, within
/// ping_interval + ping_timeout (here 600 ms; checked with ten times the slack).
async fn frame_aware_silent_client_is_closed_as_dead(rt: Runtime) {
    let (addr, server) = recording_server().await;
    let config = frame_aware(
        config_for(&[addr]),
        Some(Duration::from_millis(300)),
        Duration::from_millis(300),
    );
    let proxy = start_proxy(rt, config);
    let (mut raw, _) = Raw::ws_connect(proxy.addr, "/dead").await;
    let started = Instant::now();
    let ping = raw.read_frame().await;
    assert_eq!(ping.opcode, OP_PING, "{ping:?}");
    assert!(
        !ping.masked && ping.payload.starts_with(b"swyd"),
        "{ping:?}"
    );
    // No Pong: the proxy gives up on this client and closes its connection.
    raw.expect_eof().await;
    let upstream_saw = join(server, "ws server").await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(6),
        "a dead client took {elapsed:?} to detect"
    );
    assert_eq!(close_code_of(&upstream_saw), Some(1001), "{upstream_saw:?}");
    let events = wait_events(&proxy, 1).await;
    let e = &events[0];
    assert_eq!(e.close, Some(CloseReason::PeerDead(Side::Client)), "{e:?}");
    let ws = e.websocket.expect("frame counts in the log");
    assert!(ws.proxy_pings >= 1, "{ws:?}");
    assert_eq!(ws.from_upstream.close_code, Some(1001), "{ws:?}");
    stop(proxy).await;
}

/// Peers that answer pings (tungstenite does on its own) keep an idle tunnel open for many
/// ping intervals; the proxy's pings reach the client as pings of its own payload, and
/// messages still flow afterwards.
async fn frame_aware_live_peers_answer_pings_and_stay(rt: Runtime) {
    let config = frame_aware(
        config_for(&[echo_upstream().await]),
        Some(Duration::from_millis(100)),
        Duration::from_millis(500),
    );
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/live").await;
    let mut pings = 0;
    while pings < 5 {
        match recv(&mut ws).await {
            Message::Ping(p) => {
                assert!(p.starts_with(b"swyd"), "{p:?}");
                pings += 1;
            }
            other => panic!("only the proxy's pings while idle, got {other:?}"),
        }
    }
    let msg = Message::Text("still here".into());
    send(&mut ws, msg.clone()).await;
    loop {
        match recv(&mut ws).await {
            Message::Ping(_) => {}
            got => break assert_same_message(&got, &msg),
        }
    }
    close_client(&mut ws).await;
    drop(ws);
    let events = wait_events(&proxy, 1).await;
    let e = &events[0];
    assert_eq!(e.close, Some(CloseReason::UpstreamClosed), "{e:?}");
    let counts = e.websocket.expect("frame counts in the log");
    assert_eq!(counts.from_client.messages, 1, "{counts:?}");
    assert_eq!(counts.from_upstream.messages, 1, "{counts:?}");
    assert_eq!(counts.from_client.close_code, Some(1005), "{counts:?}");
    stop(proxy).await;
}

/// A drain sends Close 1001 "Going Away" to both peers, which complete the closing handshake;
/// the proxy then stops well before its drain timeout.
async fn frame_aware_drain_sends_going_away_to_both(rt: Runtime) {
    let (addr, server) = recording_server().await;
    let config = frame_aware(config_for(&[addr]), None, Duration::from_secs(10));
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/drain").await;
    proxy.shutdown();
    let client_code = read_to_close(&mut ws).await;
    assert_eq!(client_code, Some(1001));
    let upstream_saw = join(server, "ws server").await;
    assert_eq!(close_code_of(&upstream_saw), Some(1001), "{upstream_saw:?}");
    let events = wait_events(&proxy, 1).await;
    assert_eq!(events[0].close, Some(CloseReason::Drain), "{:?}", events[0]);
    stop(proxy).await;
}

/// A hard stop waits for nothing, but a frame-aware tunnel's peers still get Close 1001 when
/// the sockets take it at once (here, on loopback, they do).
async fn frame_aware_hard_stop_still_says_going_away(rt: Runtime) {
    let (addr, server) = recording_server().await;
    let config = frame_aware(config_for(&[addr]), None, Duration::from_secs(10));
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/hard").await;
    send(&mut ws, Message::Text("hello".into())).await;
    proxy.force();
    let client_code = read_to_close(&mut ws).await;
    assert_eq!(client_code, Some(1001));
    let upstream_saw = join(server, "ws server").await;
    assert_eq!(close_code_of(&upstream_saw), Some(1001), "{upstream_saw:?}");
    stop(proxy).await;
}

/// A message over `max_message` never reaches the upstream: the sender gets Close 1009, the
/// upstream Close 1001.
async fn frame_aware_oversized_message_gets_1009(rt: Runtime) {
    let (addr, server) = recording_server().await;
    let mut config = frame_aware(config_for(&[addr]), None, Duration::from_secs(10));
    if let Some(w) = config.websocket.as_mut() {
        w.max_message = 1000;
    }
    let proxy = start_proxy(rt, config);
    let mut ws = ws_client(&proxy, "/big").await;
    send(&mut ws, Message::Binary(binary_payload(900, 1))).await;
    send(&mut ws, Message::Binary(binary_payload(2000, 2))).await;
    let client_code = read_to_close(&mut ws).await;
    assert_eq!(client_code, Some(1009));
    let upstream_saw = join(server, "ws server").await;
    let sizes: Vec<usize> = upstream_saw
        .iter()
        .filter(|m| m.is_binary())
        .map(Message::len)
        .collect();
    assert_eq!(sizes, vec![900], "only the message within the limit passed");
    assert_eq!(close_code_of(&upstream_saw), Some(1001), "{upstream_saw:?}");
    let events = wait_events(&proxy, 1).await;
    assert_eq!(
        events[0].close,
        Some(CloseReason::MessageTooBig(Side::Client)),
        "{:?}",
        events[0]
    );
    stop(proxy).await;
}

/// permessage-deflate (RFC 7692) through a frame-aware tunnel with keepalive on: the
/// compressed frames of RFC 7692 §7.2.3.1 ("Hello", RSV1 set) pass byte for byte both ways,
/// before and after the proxy's pings, which both peers answer.
async fn frame_aware_compressed_frames_pass_with_keepalive(rt: Runtime) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    let config = frame_aware(
        config_for(&[addr]),
        Some(Duration::from_millis(200)),
        Duration::from_secs(5),
    );
    let proxy = start_proxy(rt, config);
    let mut client = Raw::connect(proxy.addr).await;
    let request = upgrade_request("/deflate").replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    );
    client.write(request.as_bytes()).await;
    let (mut upstream, head) = accept_upgrade(&listener).await;
    assert_eq!(
        header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate")
    );
    let answer = switch_response(&key_of(&head)).replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    );
    upstream.write(answer.as_bytes()).await;
    assert_switch(&client.read_head().await);

    const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut from_client = vec![0xc1, 0x80 | 7];
    from_client.extend_from_slice(&key);
    from_client.extend(HELLO.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    let mut from_upstream = vec![0xc1, 7];
    from_upstream.extend_from_slice(&HELLO);

    for round in 0..2 {
        client.write(&from_client).await;
        upstream.write(&from_upstream).await;
        // Each side gets the other's compressed frame byte for byte, and (once idle) a ping
        // from the proxy, which it answers.
        let mut got_data = [false; 2];
        let mut got_ping = [false; 2];
        while got_data != [true; 2] || (round == 0 && got_ping != [true; 2]) {
            for (i, raw) in [&mut client, &mut upstream].into_iter().enumerate() {
                if got_data[i] && (round > 0 || got_ping[i]) {
                    continue;
                }
                let frame = raw.read_frame().await;
                if frame.opcode == OP_PING {
                    assert!(frame.payload.starts_with(b"swyd"), "{frame:?}");
                    assert_eq!(frame.masked, i == 1, "masked only towards the upstream");
                    got_ping[i] = true;
                    let pong = if i == 0 {
                        client_frame(true, OP_PONG, &frame.payload)
                    } else {
                        server_frame(true, OP_PONG, &frame.payload)
                    };
                    raw.write(&pong).await;
                } else {
                    assert_eq!(frame.rsv, 0x40, "RSV1 (compressed) kept: {frame:?}");
                    assert_bytes_eq("compressed payload", &frame.payload, &HELLO);
                    got_data[i] = true;
                }
            }
        }
    }
    drop(client);
    drop(upstream);
    let events = wait_events(&proxy, 1).await;
    let counts = events[0].websocket.expect("frame counts in the log");
    assert_eq!(counts.from_client.messages, 2, "{counts:?}");
    assert_eq!(counts.from_upstream.messages, 2, "{counts:?}");
    stop(proxy).await;
}
