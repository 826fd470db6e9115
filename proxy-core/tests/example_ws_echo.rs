//! End-to-end tests of the `mio_proxy` example: real sockets, a real WebSocket client and server
//! (sync `tungstenite`), and a plain HTTP exchange, all through the hand-written event loop.
//!
//! Every test socket has read and write timeouts, so a stuck proxy fails a test instead of
//! hanging it. Listeners are bound before their threads start, so no test sleeps.

#[path = "../examples/mio_proxy.rs"]
#[allow(dead_code)]
mod mio_proxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use proxy_core::{Config, Peer, UpstreamGroup};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Payload sizes around the WebSocket length encodings (7-bit, 16-bit, 64-bit) and one large one.
const SIZES: [usize; 7] = [0, 1, 125, 126, 65535, 65536, 1024 * 1024];

fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
}

/// The example proxy on its own thread; stopped (and checked) by [`Proxy::stop`], and at least
/// told to stop if a test panics first.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        Proxy::start_with(upstream, |_| {})
    }

    fn start_with(upstream: SocketAddr, configure: impl FnOnce(&mut Config)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let peer = Peer::new(&upstream.ip().to_string(), upstream.port());
        let mut config = Config::new(UpstreamGroup::new(vec![peer]));
        configure(&mut config);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || mio_proxy::run(listener, config, flag));
        Proxy {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect to proxy");
        set_timeouts(&stream);
        stream
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .expect("proxy thread panicked")
                .expect("proxy loop failed");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A WebSocket server that echoes text and binary messages, for `connections` connections.
fn spawn_ws_echo(connections: usize) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    let thread = thread::spawn(move || {
        for _ in 0..connections {
            let (stream, _) = listener.accept().expect("echo server accept");
            set_timeouts(&stream);
            let mut ws = tungstenite::accept(stream).expect("server-side handshake");
            loop {
                match ws.read() {
                    Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                        ws.send(msg).expect("echo server send")
                    }
                    // tungstenite answers pings and queues the close reply by itself.
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => break,
                    Err(e) => panic!("echo server: {e}"),
                }
            }
        }
    });
    (addr, thread)
}

/// Compares without dumping a megabyte into the failure message.
fn assert_same(what: &str, sent: &[u8], got: &[u8]) {
    if sent != got {
        let first = sent.iter().zip(got).position(|(a, b)| a != b);
        panic!(
            "{what}: sent {} bytes, got {} back, first difference at {first:?}",
            sent.len(),
            got.len()
        );
    }
}

#[test]
fn websocket_messages_echo_through_the_mio_proxy() {
    ws_echo_round_trip(|_| {});
}

/// With a queue far smaller than one 16 KiB read, `wants_read` turns false after nearly every
/// read, so reading each side stops and resumes many times within one message.
#[test]
fn websocket_echo_survives_constant_backpressure() {
    ws_echo_round_trip(|config| config.limits.queue = 1024);
}

/// Echoes every size as text and binary, then completes a close handshake.
fn ws_echo_round_trip(configure: impl FnOnce(&mut Config)) {
    let (server_addr, server) = spawn_ws_echo(1);
    let proxy = Proxy::start_with(server_addr, configure);

    let url = format!("ws://127.0.0.1:{}/ws", proxy.addr.port());
    let (mut ws, response) = tungstenite::client::client(url.as_str(), proxy.connect())
        .expect("client handshake through the proxy");
    assert_eq!(response.status().as_u16(), 101);

    for size in SIZES {
        // Text payloads vary so that a reordered or duplicated chunk would show.
        let text: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        ws.send(Message::Text(text.clone())).expect("send text");
        match ws.read().expect("read text echo") {
            Message::Text(got) => assert_same(
                &format!("text of {size} bytes"),
                text.as_bytes(),
                got.as_bytes(),
            ),
            other => panic!("text of {size} bytes came back as {:?}", other.len()),
        }

        let binary: Vec<u8> = (0..size).map(|i| (i * 31 + size) as u8).collect();
        ws.send(Message::Binary(binary.clone()))
            .expect("send binary");
        match ws.read().expect("read binary echo") {
            Message::Binary(got) => assert_same(&format!("binary of {size} bytes"), &binary, &got),
            other => panic!("binary of {size} bytes came back as {:?}", other.len()),
        }
    }

    let code = CloseCode::from(4321);
    let reason = "done, thanks";
    ws.close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
    .expect("start close handshake");
    let mut echoed = None;
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => echoed = Some(frame.map(CloseFrame::into_owned)),
            Ok(other) => panic!("unexpected message after close: {} bytes", other.len()),
            // The server closed TCP after its reply, and the proxy passed the FIN on.
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake failed: {e}"),
        }
    }
    let frame = echoed
        .expect("a close frame came back")
        .expect("the close frame has a code");
    assert_eq!(frame.code, code);
    assert_eq!(frame.reason, reason);
    drop(ws);

    server.join().expect("echo server thread");
    proxy.stop();
}

/// Reads a request head byte by byte, so nothing after it is consumed.
fn read_request_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("http server read");
        assert!(n == 1, "request head ended early: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("request head is UTF-8")
}

/// An HTTP/1.1 server answering `hello` to each of `connections` connections (one request per
/// connection); returns the request heads it received.
fn spawn_http_hello(connections: usize) -> (SocketAddr, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind http server");
    let addr = listener.local_addr().expect("http server address");
    let thread = thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().expect("http server accept");
            set_timeouts(&stream);
            let head = read_request_head(&mut stream);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .expect("http server write");
            // The proxy has no pool, so it closes the released connection: expect EOF.
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .expect("http server wait for close");
            assert!(rest.is_empty(), "bytes after the request: {rest:?}");
            heads.push(head);
        }
        heads
    });
    (addr, thread)
}

/// Reads one response with a `Content-Length` body: (head, body); nothing may follow it.
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let response = read_response_from(stream, &mut data);
    assert!(data.is_empty(), "bytes after the response: {}", data.len());
    response
}

/// Reads one response from `data` and then `stream`; bytes that follow it (pipelined
/// responses may share a read) are left in `data`.
fn read_response_from(stream: &mut TcpStream, data: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).expect("read response head");
        assert!(n > 0, "connection closed inside the response head");
        data.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(data[..head_end].to_vec()).expect("response head is UTF-8");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().expect("numeric Content-Length"))
        })
        .expect("response has Content-Length");
    while data.len() < head_end + length {
        let n = stream.read(&mut chunk).expect("read response body");
        assert!(n > 0, "connection closed inside the response body");
        data.extend_from_slice(&chunk[..n]);
    }
    let body = data[head_end..head_end + length].to_vec();
    data.drain(..head_end + length);
    (head, body)
}

#[test]
fn plain_http_get_through_the_mio_proxy() {
    let (server_addr, server) = spawn_http_hello(1);
    let proxy = Proxy::start(server_addr);

    let mut client = proxy.connect();
    client
        .write_all(b"GET /greeting?x=1 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let (head, body) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200 "), "status line: {head:?}");
    assert_eq!(body, b"hello");
    // `Connection: close`: after the response the proxy closes its side.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "bytes after the response: {rest:?}");
    drop(client);

    let heads = server.join().expect("http server thread");
    assert!(
        heads[0].starts_with("GET /greeting?x=1 HTTP/1.1\r\n"),
        "forwarded head: {:?}",
        heads[0]
    );
    proxy.stop();
}

#[test]
fn keep_alive_client_gets_a_fresh_upstream_per_request() {
    let (server_addr, server) = spawn_http_hello(2);
    let proxy = Proxy::start(server_addr);

    let mut client = proxy.connect();
    for (i, last) in [(1, false), (2, true)] {
        let connection = if last { "close" } else { "keep-alive" };
        let request =
            format!("GET /{i} HTTP/1.1\r\nHost: example.test\r\nConnection: {connection}\r\n\r\n");
        client.write_all(request.as_bytes()).expect("send request");
        let (head, body) = read_response(&mut client);
        assert!(
            head.starts_with("HTTP/1.1 200 "),
            "status line {i}: {head:?}"
        );
        assert_eq!(body, b"hello", "body {i}");
    }
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "bytes after the last response: {rest:?}");
    drop(client);

    let heads = server.join().expect("http server thread");
    assert!(
        heads[0].starts_with("GET /1 HTTP/1.1\r\n"),
        "{:?}",
        heads[0]
    );
    assert!(
        heads[1].starts_with("GET /2 HTTP/1.1\r\n"),
        "{:?}",
        heads[1]
    );
    proxy.stop();
}

/// An 8 MiB body that the client starts reading only once the server's writes would block.
/// When the proxy is the bottleneck, its writes to the client stall and `wants_read(Upstream)`
/// turns false until the client catches up; how often that happens depends on scheduling, so
/// the deterministic check of resuming without a new edge is the pipelining test below. This
/// one always checks that a large body arrives intact.
#[test]
fn large_response_to_a_stalled_client_resumes_after_backpressure() {
    const BODY: usize = 8 * 1024 * 1024;
    let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind http server");
    let server_addr = listener.local_addr().expect("http server address");
    let (full_tx, full_rx) = std::sync::mpsc::channel();
    let server_body = body.clone();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("http server accept");
        set_timeouts(&stream);
        read_request_head(&mut stream);
        let mut response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        response.extend_from_slice(&server_body);
        // Write without blocking until the path through the proxy is full, tell the client,
        // then finish with ordinary blocking writes.
        stream.set_nonblocking(true).expect("nonblocking");
        let mut written = 0;
        while written < response.len() {
            match stream.write(&response[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("http server write: {e}"),
            }
        }
        full_tx.send(()).expect("tell the client");
        stream.set_nonblocking(false).expect("blocking");
        stream
            .write_all(&response[written..])
            .expect("http server write");
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("http server wait for close");
    });
    let proxy = Proxy::start(server_addr);

    let mut client = proxy.connect();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        .expect("send request");
    full_rx
        .recv_timeout(IO_TIMEOUT)
        .expect("server filled the path");
    let (head, got) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200 "), "status line: {head:?}");
    assert_same("large body", &body, &got);
    drop(client);

    server.join().expect("http server thread");
    proxy.stop();
}

/// Three pipelined requests in one write, the second with a 20 KiB header. With `max_held` at
/// one byte the proxy stops reading the client as soon as it holds any byte of request 2, so
/// the rest of the bytes sit in the socket with their readiness edge already spent: requests 2
/// and 3 are only served if the loop re-checks `wants_read` after each drain.
#[test]
fn pipelined_requests_resume_reading_without_a_new_edge() {
    let (server_addr, server) = spawn_http_hello(3);
    let proxy = Proxy::start_with(server_addr, |config| config.limits.max_held = 1);

    let mut client = proxy.connect();
    let padding = "p".repeat(20 * 1024);
    let requests = format!(
        "GET /1 HTTP/1.1\r\nHost: example.test\r\n\r\n\
         GET /2 HTTP/1.1\r\nHost: example.test\r\nX-Padding: {padding}\r\n\r\n\
         GET /3 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    );
    client
        .write_all(requests.as_bytes())
        .expect("send requests");
    let mut pending = Vec::new();
    for i in 1..=3 {
        let (head, body) = read_response_from(&mut client, &mut pending);
        assert!(
            head.starts_with("HTTP/1.1 200 "),
            "status line {i}: {head:?}"
        );
        assert_eq!(body, b"hello", "body {i}");
    }
    let mut rest = pending;
    client.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "bytes after the last response: {rest:?}");
    drop(client);

    let heads = server.join().expect("http server thread");
    for (i, head) in heads.iter().enumerate() {
        let line = format!("GET /{} HTTP/1.1\r\n", i + 1);
        assert!(head.starts_with(&line), "request {}: {head:?}", i + 1);
    }
    proxy.stop();
}

/// The upstream port refuses connections: the non-blocking connect fails, the loop reports it,
/// and the core answers 502 and closes.
#[test]
fn refused_upstream_connection_becomes_a_502() {
    // Bound but never listening, and held for the whole test: connects are refused, and no
    // other test can take the port in between (binding a listener and dropping it would race).
    let refusing = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("create a socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("loopback");
    refusing.bind(&any.into()).expect("bind a loopback port");
    let closed_addr = refusing
        .local_addr()
        .expect("bound address")
        .as_socket()
        .expect("an IP address");
    let proxy = Proxy::start(closed_addr);

    let mut client = proxy.connect();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .expect("send request");
    let mut response = Vec::new();
    client.read_to_end(&mut response).expect("read to EOF");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 502 "),
        "response: {response:?}"
    );
    drop(client);
    proxy.stop();
}

/// A request head that never finishes: the loop's timer plumbing (`poll_timeout` as the poll
/// deadline, `handle_timeout` once it passes) lets the core answer 408.
#[test]
fn unfinished_request_head_times_out_with_408() {
    let unused = TcpListener::bind("127.0.0.1:0").expect("bind an upstream nobody calls");
    let request_head = Duration::from_millis(300);
    let proxy = Proxy::start_with(unused.local_addr().expect("address"), |config| {
        config.timeouts.request_head = request_head
    });

    let started = std::time::Instant::now();
    let mut client = proxy.connect();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: exam")
        .expect("send half a head");
    let mut response = Vec::new();
    client.read_to_end(&mut response).expect("read to EOF");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 408 "),
        "response: {response:?}"
    );
    assert!(
        started.elapsed() >= request_head,
        "answered before the deadline"
    );
    drop(client);
    proxy.stop();
}
