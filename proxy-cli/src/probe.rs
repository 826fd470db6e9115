//! `switchyard probe URL`: one WebSocket handshake against a backend (or through a proxy), and
//! a plain-words verdict on what is wrong when it fails. It checks what switchyard itself checks
//! before it tunnels — status 101, `Upgrade: websocket`, `Connection: upgrade`, the
//! `Sec-WebSocket-Accept` derived from this request's key, the subprotocol — then sends a Ping
//! and waits for its Pong to show that frames pass.
//!
//! Blocking sockets on the calling thread: one connection, every step bounded by `--timeout`.
//! `wss://` adds a TLS handshake (verified against the Mozilla roots and `--ca`, or not at all
//! with `--insecure`), diagnosed on its own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A blocking connection, plain or TLS.
trait Io: Read + Write {
    /// Bounds the next reads.
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl Io for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl Io for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

/// How a probe ended; the process exits with [`Outcome::code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A genuine 101 and a Pong back.
    Ok,
    /// The URL cannot be probed (bad syntax, an unreadable `--ca`).
    Usage(String),
    /// The host name does not resolve.
    Resolve(String),
    /// The TCP connection was refused or the host is unreachable.
    Connect(String),
    /// A step took longer than the timeout.
    Timeout(String),
    /// The server answered, but not with a switch.
    NotSwitched(String),
    /// The server switched, but the 101 is not a valid answer to this request.
    BadSwitch(String),
    /// The 101 was fine, but the connection did not carry frames.
    NoFrames(String),
    /// wss://: the TLS handshake failed (certificate not trusted, wrong name, no TLS there).
    Tls(String),
}

impl Outcome {
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Usage(_) => 2,
            Outcome::Resolve(_) => 3,
            Outcome::Connect(_) => 4,
            Outcome::Timeout(_) => 5,
            Outcome::NotSwitched(_) => 6,
            Outcome::BadSwitch(_) => 7,
            Outcome::NoFrames(_) => 8,
            Outcome::Tls(_) => 9,
        }
    }

    fn message(&self) -> &str {
        match self {
            Outcome::Ok => "",
            Outcome::Usage(m)
            | Outcome::Resolve(m)
            | Outcome::Connect(m)
            | Outcome::Timeout(m)
            | Outcome::NotSwitched(m)
            | Outcome::BadSwitch(m)
            | Outcome::NoFrames(m)
            | Outcome::Tls(m) => m,
        }
    }
}

/// What to probe.
#[derive(Debug)]
pub struct Probe {
    pub url: String,
    pub timeout: Duration,
    /// A subprotocol to ask for (`Sec-WebSocket-Protocol`).
    pub protocol: Option<String>,
    /// An `Origin` to send, as a browser would.
    pub origin: Option<String>,
    /// wss://: CA certificates (PEM) trusted besides the Mozilla roots.
    pub ca: Vec<PathBuf>,
    /// wss://: accept any certificate.
    pub insecure: bool,
}

/// Runs the probe, printing each step and the verdict on stdout; returns the outcome.
pub fn run(p: &Probe) -> Outcome {
    let outcome = probe(p, &mut |line| println!("{line}"));
    match &outcome {
        Outcome::Ok => println!("OK: {} speaks WebSocket", p.url),
        other => println!("FAILED: {}", other.message()),
    }
    outcome
}

struct Target {
    host: String,
    port: u16,
    path: String,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Target, Outcome> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("ws://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (r, true)
    } else if url.starts_with("https://") {
        return Err(Outcome::Usage(format!(
            "{url} is an https:// URL; a secure WebSocket URL starts with wss:// (try {})",
            url.replacen("https://", "wss://", 1)
        )));
    } else if url.starts_with("http://") {
        return Err(Outcome::Usage(format!(
            "{url} is an http:// URL; a WebSocket URL starts with ws:// (try {})",
            url.replacen("http://", "ws://", 1)
        )));
    } else {
        return Err(Outcome::Usage(format!(
            "expected a URL such as ws://127.0.0.1:8080/ws, got {url:?}"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse()
                .map_err(|_| Outcome::Usage(format!("bad port {p:?} in {url}")))?;
            (h.trim_start_matches('[').trim_end_matches(']'), port)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(Outcome::Usage(format!("no host in {url}")));
    }
    Ok(Target {
        host: host.to_owned(),
        port,
        path: path.to_owned(),
        tls,
    })
}

/// The TLS client settings of a wss:// probe: what the proxy itself trusts upstream (the
/// Mozilla roots and `--ca`), or nothing checked with `--insecure`.
fn tls_config(p: &Probe) -> Result<Arc<rustls::ClientConfig>, Outcome> {
    let verify = if p.insecure {
        proxy_tokio::Verify::Skip
    } else {
        proxy_tokio::Verify::Roots
    };
    let tls = proxy_tokio::ClientTls::new(verify, &p.ca)
        .map_err(|e| Outcome::Usage(format!("--ca {e}")))?;
    Ok(tls.rustls_config())
}

/// Completes the TLS handshake on `tcp`, saying what was negotiated.
fn start_tls(
    p: &Probe,
    target: &Target,
    tcp: TcpStream,
    say: &mut dyn FnMut(String),
) -> Result<Box<dyn Io>, Outcome> {
    let config = tls_config(p)?;
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| Outcome::Usage(format!("{} is not a TLS server name: {e}", target.host)))?;
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| Outcome::Tls(format!("TLS: {e}")))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let started = Instant::now();
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            let hint = if e.to_string().contains("UnknownIssuer") {
                " (a self-signed or private CA certificate: pass --ca FILE, or --insecure for a test bench)"
            } else if e.to_string().contains("NotValidForName") {
                " (the certificate is for another name)"
            } else if e.to_string().contains("InvalidContentType")
                || e.to_string().contains("corrupt message")
            {
                " (the port does not speak TLS: try ws://)"
            } else {
                ""
            };
            return Err(Outcome::Tls(format!(
                "the TLS handshake with {}:{} failed: {e}{hint}",
                target.host, target.port
            )));
        }
    }
    let version = tls
        .conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let alpn = tls
        .conn
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_else(|| "none".to_owned());
    say(format!(
        "TLS handshake in {:.1} ms ({version}, ALPN {alpn}{})",
        started.elapsed().as_secs_f64() * 1000.0,
        if p.insecure {
            ", certificate NOT verified"
        } else {
            ", certificate verified"
        }
    ));
    Ok(Box::new(tls))
}

fn probe(p: &Probe, say: &mut dyn FnMut(String)) -> Outcome {
    let target = match parse_url(&p.url) {
        Ok(t) => t,
        Err(o) => return o,
    };
    let addrs: Vec<SocketAddr> = match (target.host.as_str(), target.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return Outcome::Resolve(format!(
                "{} does not resolve: {e}. Check the name, or probe an IP address",
                target.host
            ))
        }
    };
    let Some(&addr) = addrs.first() else {
        return Outcome::Resolve(format!("{} resolves to no address", target.host));
    };
    let started = Instant::now();
    let tcp = match TcpStream::connect_timeout(&addr, p.timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Outcome::Timeout(format!(
                "connecting to {addr} took longer than {:?}: a firewall dropping packets, or the wrong address",
                p.timeout
            ))
        }
        Err(e) => {
            return Outcome::Connect(format!(
                "cannot connect to {addr}: {e}. Nothing listens there, or it is unreachable"
            ))
        }
    };
    say(format!(
        "connected to {addr} in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    ));
    let _ = tcp.set_read_timeout(Some(p.timeout));
    let _ = tcp.set_write_timeout(Some(p.timeout));
    let mut stream: Box<dyn Io> = if target.tls {
        match start_tls(p, &target, tcp, say) {
            Ok(s) => s,
            Err(o) => return o,
        }
    } else {
        Box::new(tcp)
    };
    let key = nonce_key();
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: switchyard-probe\r\n",
        target.path,
        if target.port == if target.tls { 443 } else { 80 } {
            target.host.clone()
        } else {
            format!("{}:{}", target.host, target.port)
        }
    );
    if let Some(proto) = &p.protocol {
        request.push_str(&format!("Sec-WebSocket-Protocol: {proto}\r\n"));
    }
    if let Some(origin) = &p.origin {
        request.push_str(&format!("Origin: {origin}\r\n"));
    }
    request.push_str("\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Outcome::Connect(format!(
            "the connection failed while sending the handshake: {e}"
        ));
    }
    let sent = Instant::now();
    let (head, rest) =
        match read_head(&mut *stream) {
            Ok(h) => h,
            Err(Failure::Timeout) => {
                return Outcome::Timeout(format!(
                "no answer to the handshake within {:?}: the server accepted the connection but \
                 says nothing (is it an HTTP server? a TLS port probed with ws://?)",
                p.timeout
            ))
            }
            Err(Failure::Closed) => return Outcome::NotSwitched(
                "the server closed the connection without answering the handshake (if that port \
                 speaks TLS, probe it with wss://)"
                    .to_owned(),
            ),
            Err(Failure::Other(e)) => return Outcome::NotSwitched(e),
        };
    say(format!(
        "answer after {:.1} ms: {}",
        sent.elapsed().as_secs_f64() * 1000.0,
        head.lines().next().unwrap_or("")
    ));
    if let Some(o) = judge(&head, &key, p.protocol.as_deref()) {
        return o;
    }
    say("101 Switching Protocols with the right Sec-WebSocket-Accept".to_owned());
    ping_pong(&mut *stream, rest, p.timeout, say)
}

enum Failure {
    Timeout,
    Closed,
    Other(String),
}

/// Reads a response head; returns it and whatever followed it.
fn read_head(stream: &mut dyn Io) -> Result<(String, Vec<u8>), Failure> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            return Ok((head, buf[i + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return Err(Failure::Other(
                "the answer's head is over 64 KiB: not an HTTP response".to_owned(),
            ));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => return Err(Failure::Timeout),
            Err(e) => return Err(Failure::Other(format!("reading the answer failed: {e}"))),
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What is wrong with the answer, if anything.
fn judge(head: &str, key: &str, protocol: Option<&str>) -> Option<Outcome> {
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if !version.starts_with("HTTP/1.") {
        return Some(Outcome::NotSwitched(format!(
            "the answer is not HTTP/1.x: {status_line:?}"
        )));
    }
    if status != 101 {
        let why = match status {
            301 | 302 | 303 | 307 | 308 => format!(
                "a redirect to {} — WebSocket clients do not follow redirects: probe that URL instead",
                header(head, "location").unwrap_or("(no Location)")
            ),
            400 => "400 Bad Request: the server (or a proxy in front of it) refused the handshake. \
                    A proxy that drops the hop-by-hop Upgrade and Connection headers causes this \
                    (nginx needs proxy_http_version 1.1 and both proxy_set_header lines; \
                    switchyard needs nothing)"
                .to_owned(),
            426 => format!(
                "426 Upgrade Required (Upgrade: {}): the server wants a switch, but not this one — \
                 check Sec-WebSocket-Version 13 and the path",
                header(head, "upgrade").unwrap_or("not named")
            ),
            401 | 403 => format!("{status}: the server refused to authorise the handshake (check Origin and credentials)"),
            404 => "404: nothing serves WebSockets at this path".to_owned(),
            502..=504 => format!("{status}: a proxy in front could not reach its upstream"),
            s if (200..300).contains(&s) => format!(
                "{status} instead of 101: the request reached a plain HTTP handler — the \
                 Upgrade and Connection headers were dropped on the way (a proxy without \
                 WebSocket support?) or the path is not a WebSocket endpoint"
            ),
            s => format!("{s} instead of 101 Switching Protocols"),
        };
        return Some(Outcome::NotSwitched(why));
    }
    if !header(head, "upgrade").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
    }) {
        return Some(Outcome::BadSwitch(format!(
            "101 without Upgrade: websocket (got {:?}): it switched to something else",
            header(head, "upgrade")
        )));
    }
    if !header(head, "connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Some(Outcome::BadSwitch(
            "101 without Connection: upgrade (RFC 6455 §4.2.2); strict clients and switchyard refuse it"
                .to_owned(),
        ));
    }
    let expected =
        String::from_utf8_lossy(&proxy_core::websocket_accept(key.as_bytes())).into_owned();
    match header(head, "sec-websocket-accept") {
        None => {
            return Some(Outcome::BadSwitch(
                "101 without Sec-WebSocket-Accept: not a WebSocket server's answer (something \
                 in between may have answered for it)"
                    .to_owned(),
            ))
        }
        Some(got) if got != expected => {
            return Some(Outcome::BadSwitch(format!(
                "wrong Sec-WebSocket-Accept {got:?} (expected {expected:?} for this key): the 101 \
                 does not answer this request — a cache or a broken proxy replayed it"
            )))
        }
        Some(_) => {}
    }
    let answered = header(head, "sec-websocket-protocol");
    match (protocol, answered) {
        (Some(asked), Some(got)) if !got.eq_ignore_ascii_case(asked) => Some(Outcome::BadSwitch(
            format!("protocol mismatch: asked for {asked:?}, the server chose {got:?}"),
        )),
        (Some(asked), None) => Some(Outcome::BadSwitch(format!(
            "protocol mismatch: asked for {asked:?}, the server chose none (clients that need \
             it close the connection)"
        ))),
        (None, Some(got)) => Some(Outcome::BadSwitch(format!(
            "protocol mismatch: the server chose {got:?} though none was asked for (RFC 6455 \
             §4.1 makes clients fail this)"
        ))),
        _ => None,
    }
}

/// Sends a masked Ping and waits for the Pong; closes cleanly either way.
fn ping_pong(
    stream: &mut dyn Io,
    mut buf: Vec<u8>,
    timeout: Duration,
    say: &mut dyn FnMut(String),
) -> Outcome {
    let payload = b"switchyard-probe";
    let key = [0x5a, 0x17, 0xc3, 0x9e];
    let mut ping = vec![0x89, 0x80 | payload.len() as u8];
    ping.extend_from_slice(&key);
    ping.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    let sent = Instant::now();
    if let Err(e) = stream.write_all(&ping) {
        return closed_after_switch(&e);
    }
    let deadline = sent + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        // Frames from a server are unmasked: 2 header bytes (+2/+8 length) then payload.
        while buf.len() >= 2 {
            let len7 = usize::from(buf[1] & 0x7f);
            let (len, at): (usize, usize) = match len7 {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 if buf.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (
                        usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                        10,
                    )
                }
                126 | 127 => break,
                n => (n, 2),
            };
            if buf.len() < at.saturating_add(len) {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let body = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            match opcode {
                0xA if body == payload => {
                    say(format!(
                        "Pong after {:.1} ms: frames pass both ways",
                        sent.elapsed().as_secs_f64() * 1000.0
                    ));
                    let close = [
                        0x88,
                        0x82,
                        key[0],
                        key[1],
                        key[2],
                        key[3],
                        0x03 ^ key[0],
                        0xe8 ^ key[1],
                    ];
                    let _ = stream.write_all(&close);
                    return Outcome::Ok;
                }
                0x8 => {
                    return Outcome::NoFrames(format!(
                        "the server closed the WebSocket right away (code {})",
                        if body.len() >= 2 {
                            u16::from_be_bytes([body[0], body[1]]).to_string()
                        } else {
                            "none".to_owned()
                        }
                    ))
                }
                _ => {}
            }
        }
        if buf.len() > 1 << 20 {
            return Outcome::NoFrames(
                "over 1 MiB after the 101 without a Pong: the server streams, but not an answer"
                    .to_owned(),
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::Timeout(format!(
                "no Pong within {timeout:?} after the 101: frames do not come back"
            ));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Outcome::NoFrames(
                    "the connection closed right after the 101, before any frame".to_owned(),
                )
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => {
                return Outcome::Timeout(format!(
                    "no Pong within {timeout:?} after the 101: frames do not come back"
                ))
            }
            Err(e) => return closed_after_switch(&e),
        }
    }
}

/// A read or write after the 101 failed: a reset or broken pipe is the server closing (with
/// unread bytes, the kernel sends RST rather than FIN), anything else is reported as it is.
fn closed_after_switch(e: &std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionAborted => Outcome::NoFrames(
            "the connection closed right after the 101, before any frame".to_owned(),
        ),
        _ => Outcome::NoFrames(format!("the connection failed after the 101: {e}")),
    }
}

/// A blocking read that hit its timeout (reported as either kind, depending on the OS).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A fresh 16-byte `Sec-WebSocket-Key`, base64: unique per run (clock and process id), so a
/// replayed 101 shows up as a wrong accept value.
fn nonce_key() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = nanos ^ (u128::from(std::process::id()) << 64);
    let bytes = seed.to_le_bytes();
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_16_bytes_of_base64() {
        let k = nonce_key();
        assert_eq!(k.len(), 24);
        assert!(k.ends_with("=="));
    }

    #[test]
    fn urls() {
        assert!(parse_url("ws://127.0.0.1:9000/chat").is_ok());
        let t = parse_url("ws://example.com").map_err(|o| o.message().to_owned());
        assert_eq!(t.as_ref().map(|t| (t.port, t.path.as_str())), Ok((80, "/")));
        assert_eq!(parse_url("https://x/").err().map(|o| o.code()), Some(2));
        match parse_url("wss://x/p") {
            Ok(wss) => assert!(wss.tls && wss.port == 443 && wss.path == "/p"),
            Err(o) => panic!("wss parses: {o:?}"),
        }
        assert_eq!(parse_url("http://x/").err().map(|o| o.code()), Some(2));
    }

    #[test]
    fn verdicts() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(judge(ok, key, None), None);
        let code = |head: &str, proto: Option<&str>| judge(head, key, proto).map(|o| o.code());
        assert_eq!(
            code(&ok.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA"), None),
            Some(7)
        );
        assert_eq!(
            code(&ok.replace("Connection: Upgrade\r\n", ""), None),
            Some(7)
        );
        assert_eq!(code(ok, Some("chat")), Some(7));
        assert_eq!(
            code(
                "HTTP/1.1 301 Moved\r\nLocation: ws://elsewhere/\r\n\r\n",
                None
            ),
            Some(6)
        );
        assert_eq!(code("HTTP/1.1 200 OK\r\n\r\n", None), Some(6));
    }
}
