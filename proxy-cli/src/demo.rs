//! `switchyard demo`: a built-in WebSocket echo upstream with a small HTML page, so that a
//! newcomer sees a tunnel work with one command. The upstream listens on an ephemeral loopback
//! port; the proxy in front of it is the real thing.
//!
//! This is a deliberately small origin server, not part of the proxy: it serves `/` (the page)
//! and `/ws` (echo), with keep-alive, and nothing else. `/ws?info` first sends one text message
//! describing the handshake as the upstream saw it (the request head switchyard forwarded, and
//! the `Sec-WebSocket-Accept` switchyard verified), which the page shows.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const PAGE: &str = include_str!("demo.html");
const MAX_HEAD: usize = 16 * 1024;

/// Starts the echo upstream on its own thread (with a small tokio runtime, whatever runtime the
/// proxy uses) and returns its address. `metrics` is linked from the page when given.
pub fn start_upstream_thread(metrics: Option<String>) -> std::io::Result<SocketAddr> {
    // Made once per process and kept for its life: leaking it is simpler than sharing it.
    let page: &'static str = Box::leak(
        PAGE.replace(
            "<!--METRICS-->",
            &metrics.map_or_else(String::new, |url| {
                format!("<p>Metrics: <a href=\"{url}\">{url}</a></p>")
            }),
        )
        .into_boxed_str(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo-upstream".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let started = spawn_upstream(page).await;
                let ok = started.is_ok();
                let _ = tx.send(started);
                if ok {
                    std::future::pending::<()>().await;
                }
            });
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("demo upstream thread ended"))?
}

/// Starts the echo upstream on 127.0.0.1 and returns its address.
async fn spawn_upstream(page: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, page).await {
                            tracing::debug!(error = %e, "demo upstream connection ended");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "demo upstream accept failed"),
            }
        }
    });
    Ok(addr)
}

async fn serve(mut stream: TcpStream, page: &'static str) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD || stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if req.parse(&buf[..head_len]).is_err() {
            stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Ok(());
        }
        let path = req.path.unwrap_or("/").to_owned();
        let key = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
            .map(|h| h.value.to_vec());
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.advance(head_len);
        if path == "/ws" || path == "/ws?info" {
            let Some(key) = key else {
                // RFC 9110 §15.5.22: a 426 names the protocol to switch to.
                let body = "this is a WebSocket endpoint: connect with a WebSocket client\n";
                let resp = format!(
                    "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(resp.as_bytes()).await?;
                continue;
            };
            let accept = proxy_core::websocket_accept(&key);
            let accept = String::from_utf8_lossy(&accept).into_owned();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            stream.write_all(resp.as_bytes()).await?;
            let mut ws =
                WebSocketStream::from_partially_read(stream, buf.to_vec(), Role::Server, None)
                    .await;
            if path == "/ws?info" {
                let info = format!(
                    "info\nThe upstream received this head from switchyard:\n\n{}\nIt answered 101 with Sec-WebSocket-Accept: {accept}\nswitchyard checked that value (SHA-1 of the key plus the RFC 6455 GUID, base64) before opening the tunnel.",
                    head.trim_end()
                );
                ws.send(Message::text(info))
                    .await
                    .map_err(std::io::Error::other)?;
            }
            return echo(ws).await;
        }
        let (status, ctype, body) = match path.as_str() {
            "/" | "/index.html" => ("200 OK", "text/html; charset=utf-8", page),
            _ => ("404 Not Found", "text/plain; charset=utf-8", "not found\n"),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
    }
}

async fn echo(mut ws: WebSocketStream<TcpStream>) -> std::io::Result<()> {
    while let Some(msg) = ws.next().await {
        let msg = msg.map_err(std::io::Error::other)?;
        if msg.is_text() || msg.is_binary() {
            ws.send(msg).await.map_err(std::io::Error::other)?;
        } else if msg.is_close() {
            break;
        }
    }
    Ok(())
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, made now and written (with its
/// key, readable only by this user) to a fresh directory under the system's temporary one:
/// the paths of the certificate and the key.
pub fn self_signed() -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use anyhow::Context as _;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let key = rcgen::KeyPair::generate().context("key")?;
    let cert = rcgen::CertificateParams::new(names)
        .context("certificate parameters")?
        .self_signed(&key)
        .context("certificate")?;
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    tracing::info!(
        "demo certificate (self-signed, for localhost): {}",
        cert_path.display()
    );
    Ok((cert_path, key_path))
}

#[cfg(unix)]
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
