//! Upstream peers for tests: a WebSocket echo server (tokio-tungstenite) and a scriptable HTTP
//! origin that records every request it receives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts a WebSocket echo server on loopback: text and binary messages come back unchanged,
/// pings are answered, and a close is echoed with its code and reason.
pub async fn ws_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        loop {
            let stream = accept(&listener).await;
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        // tungstenite queued the close reply when it read the close; keep
                        // polling so that it is flushed, until the stream ends.
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Which accepted connection (0-based) carried it: equal numbers mean a reused connection.
    pub connection: usize,
    /// The raw head, as received.
    pub head: String,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The request line.
    pub fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Whether any header named `name` is present.
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// What the origin answers: raw bytes written after the request was fully read. Returning
/// `None` makes the origin never answer (to test read timeouts).
pub type Responder = Arc<dyn Fn(&SeenRequest) -> Option<Vec<u8>> + Send + Sync>;

/// A scriptable HTTP/1.1 origin.
pub struct Origin {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    pub connections: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Origin {
    /// Every request seen so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.requests.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Number of connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Starts an origin answering every request with `respond`. It reads bodies framed by
/// Content-Length or chunked, and keeps connections alive unless the response says otherwise
/// (it closes after writing a response containing `Connection: close`).
pub async fn http_origin(respond: Responder) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin address");
    let requests = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (reqs, conns) = (Arc::clone(&requests), Arc::clone(&connections));
    tokio::spawn(async move {
        loop {
            let stream = accept(&listener).await;
            let n = conns.fetch_add(1, Ordering::SeqCst);
            let (reqs, respond) = (Arc::clone(&reqs), Arc::clone(&respond));
            tokio::spawn(async move {
                let _ = serve_origin(stream, n, reqs, respond).await;
            });
        }
    });
    Origin {
        addr,
        requests,
        connections,
    }
}

/// An origin answering `200 OK` with `body` to everything.
pub async fn http_ok(body: &'static str) -> Origin {
    http_origin(Arc::new(move |_req: &SeenRequest| {
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }))
    .await
}

async fn serve_origin(
    mut stream: TcpStream,
    connection: usize,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
    respond: Responder,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.advance(head_len);
        let mut req = SeenRequest {
            connection,
            head,
            body: Vec::new(),
        };
        if req
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            req.body = read_chunked(&mut stream, &mut buf).await?;
        } else if let Some(len) = req
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            while buf.len() < len {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
            req.body = buf.split_to(len).to_vec();
        }
        if let Ok(mut v) = requests.lock() {
            v.push(req.clone());
        }
        let Some(response) = respond(&req) else {
            // Never answer; hold the connection until the peer goes away.
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            return Ok(());
        };
        stream.write_all(&response).await?;
        let text =
            String::from_utf8_lossy(&response[..response.len().min(4096)]).to_ascii_lowercase();
        if text.contains("connection: close") {
            return Ok(());
        }
    }
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        buf.advance(line_end + 2);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if stream.read_buf(buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        while buf.len() < size + 2 {
            if stream.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.advance(size + 2);
    }
}

/// Sends raw bytes to `addr` and reads until the peer closes or `until` says the response is
/// complete; bounded by [`crate::WAIT`].
pub async fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    until: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
    stream.write_all(request).await.expect("write request");
    read_until(&mut stream, until).await
}

/// Reads from `stream` until `until(received)` or EOF; bounded by [`crate::WAIT`].
pub async fn read_until(stream: &mut TcpStream, until: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    let result = tokio::time::timeout(crate::WAIT, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if until(&out) {
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "timed out; received so far: {:?}",
        String::from_utf8_lossy(&out)
    );
    out
}

/// True once `bytes` holds a complete response with a Content-Length body (or no body).
pub fn complete_response(bytes: &[u8]) -> bool {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    bytes.len() >= head_end + 4 + len
}

/// An HTTP/1.1 origin that answers every request head with `200` and `body`, keeps the
/// connection alive, and records nothing: for long runs, where a record would be the structure
/// that grows. Requests must not have a body.
pub async fn http_fixed(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin address");
    let response: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .leak();
    tokio::spawn(async move {
        loop {
            let mut stream = accept(&listener).await;
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(4096);
                loop {
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.advance(i + 4);
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                    }
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

/// The next connection. An accept error (a test that exhausts descriptors on purpose) is
/// retried after a pause instead of ending the server, which lives as long as the test's
/// runtime.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}
