//! The echo backend (`compare backend`): the upstream behind every target.
//!
//! One single-threaded tokio runtime, one task per connection. A connection starts in HTTP/1.1:
//!
//! * a `GET` with `Upgrade: websocket` and a `Sec-WebSocket-Key` gets a genuine `101` (the
//!   accept value is computed, since switchyard verifies it), and the connection becomes a
//!   WebSocket echo: data frames come back unmasked with the same opcode and payload, pings get
//!   pongs, and a close is echoed and then the connection is closed (the server closes first,
//!   as RFC 6455 §7.1.1 asks);
//! * any other request gets `200` with the 13-byte body `Hello, world!`, keep-alive (unless the
//!   request asked for `Connection: close` or is HTTP/1.0), pipelining allowed.
//!
//! Buffers are per connection and reused: the read buffer is compacted in place and the write
//! buffer is cleared after each write, so steady-state echo allocates nothing.
//!
//! It prints `listening on ADDR` on stdout once bound, and exits when its stdin closes, so it
//! never outlives the orchestrator that started it.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ws;

/// The plain-HTTP answer: 13 bytes of body, keep-alive.
const OK_13: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
/// The largest request head or WebSocket frame accepted.
const MAX_BUFFER: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// Runs the backend on `listen` until stdin closes.
pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    crate::exit_when_stdin_closes();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the backend runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("backend cannot listen on {listen}"))?;
        let addr = listener.local_addr().context("backend address")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {addr}").context("stdout")?;
        stdout.flush().context("stdout")?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream).await {
                            // Peers vanish (a load generator being killed); stay quiet unless
                            // asked.
                            if std::env::var_os("COMPARE_DEBUG").is_some() {
                                eprintln!("backend: connection: {e:#}");
                            }
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    eprintln!("backend: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// A read buffer: bytes `start..end` of `data` are unread.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf {
            data: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more, making room for at least `want` unread bytes in total. Returns false on EOF.
    async fn fill(&mut self, stream: &mut TcpStream, want: usize) -> anyhow::Result<bool> {
        anyhow::ensure!(want <= MAX_BUFFER, "message of {want} bytes is too large");
        if self.start > 0 && self.data.len() - self.end < READ_CHUNK / 4 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = (self.start + want).max(self.end + READ_CHUNK / 4);
        if self.data.len() < need {
            self.data.resize(need, 0);
        }
        let n = stream.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }
}

/// What a parsed request asks for.
enum Request {
    Plain { close: bool },
    Upgrade { accept: String },
}

/// Parses one request head; `Ok(None)` if incomplete.
fn parse_request(buf: &[u8]) -> anyhow::Result<Option<(usize, Request)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let mut close = req.version == Some(0);
    let mut upgrade = false;
    let mut key = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                close = true;
            }
            if v.split(',').any(|t| t.trim() == "keep-alive") {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = h.value.eq_ignore_ascii_case(b"websocket");
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            anyhow::ensure!(
                h.value == b"0",
                "request bodies are not expected by this backend"
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!("request bodies are not expected by this backend");
        }
    }
    let request = match (upgrade, key) {
        (true, Some(key)) => Request::Upgrade {
            accept: ws::accept_key(key),
        },
        _ => Request::Plain { close },
    };
    Ok(Some((len, request)))
}

/// One connection: HTTP until an upgrade, then WebSocket echo.
async fn serve(mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = ReadBuf::new();
    let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let parsed = match parse_request(buf.unread()) {
            Ok(p) => p,
            Err(e) => {
                stream.write_all(BAD_REQUEST).await?;
                return Err(e);
            }
        };
        match parsed {
            Some((len, Request::Plain { close })) => {
                buf.consume(len);
                out.extend_from_slice(OK_13);
                if close {
                    stream.write_all(&out).await?;
                    return Ok(());
                }
            }
            Some((len, Request::Upgrade { accept })) => {
                buf.consume(len);
                out.extend_from_slice(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: ",
                );
                out.extend_from_slice(accept.as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                stream.write_all(&out).await?;
                out.clear();
                return echo(stream, buf, out).await;
            }
            None => {
                // Answer everything parsed so far before waiting for more (pipelining).
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
                if !buf.fill(&mut stream, buf.unread().len() + 1).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// The WebSocket echo loop.
async fn echo(mut stream: TcpStream, mut buf: ReadBuf, mut out: Vec<u8>) -> anyhow::Result<()> {
    loop {
        // Turn every complete frame in the buffer into its echo.
        let mut want = 1;
        let mut closing = false;
        while let Some(h) = ws::parse_header(buf.unread()) {
            let total = h.header_len as u64 + h.payload_len;
            anyhow::ensure!(total <= MAX_BUFFER as u64, "frame of {total} bytes");
            let total = total as usize;
            if buf.unread().len() < total {
                want = total;
                break;
            }
            let mask = h
                .mask
                .context("a client frame without a mask (RFC 6455 §5.1)")?;
            let payload = &mut buf.data[buf.start + h.header_len..buf.start + total];
            ws::apply_mask(payload, mask, 0);
            let opcode = match h.opcode {
                ws::OP_PING => ws::OP_PONG,
                ws::OP_PONG => {
                    buf.consume(total);
                    continue;
                }
                ws::OP_CLOSE => {
                    closing = true;
                    ws::OP_CLOSE
                }
                op => op,
            };
            // Fragments keep their FIN bit and opcode (continuations echo as continuations).
            let first = out.len();
            ws::write_header(&mut out, opcode, payload.len(), None);
            if !h.fin {
                out[first] &= 0x7f;
            }
            out.extend_from_slice(payload);
            buf.consume(total);
            if closing {
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if closing {
            // Server closes the TCP connection first.
            stream.shutdown().await?;
            return Ok(());
        }
        if !buf
            .fill(&mut stream, want.max(buf.unread().len() + 1))
            .await?
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_upgrade_requests_are_told_apart() {
        let plain = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET";
        match parse_request(plain).expect("valid") {
            Some((len, Request::Plain { close: false })) => assert_eq!(len, plain.len() - 3),
            _ => panic!("a keep-alive GET"),
        }
        let upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        match parse_request(upgrade).expect("valid") {
            Some((_, Request::Upgrade { accept })) => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            }
            _ => panic!("an upgrade"),
        }
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost:")
            .expect("partial is fine")
            .is_none());
        match parse_request(b"GET / HTTP/1.0\r\n\r\n").expect("valid") {
            Some((_, Request::Plain { close: true })) => {}
            _ => panic!("HTTP/1.0 closes"),
        }
    }
}
