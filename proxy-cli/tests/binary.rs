//! The `switchyard` binary as a user runs it: flags, readiness, round-robin, the access log on
//! stdout, signals, `check-config`, startup errors, `demo` and `--help`.
//!
//! Every spawned process is owned by a [`Proc`] guard that kills it when the test ends, pass or
//! fail. Every wait is bounded by [`WAIT`].

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use switchyard_tests::origin::{http_origin, ws_echo, Origin, SeenRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long any single wait may take.
const WAIT: Duration = Duration::from_secs(20);

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

// ---- process helpers ----

/// Everything a child wrote to one of its pipes, filled by a reader thread.
#[derive(Clone, Default)]
struct Captured {
    inner: Arc<(Mutex<(String, bool)>, Condvar)>,
}

impl Captured {
    fn start(mut pipe: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let inner = Arc::clone(&captured.inner);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let (lock, changed) = &*inner;
                let Ok(mut state) = lock.lock() else { return };
                if n == 0 {
                    state.1 = true;
                    changed.notify_all();
                    return;
                }
                state.0.push_str(&String::from_utf8_lossy(&buf[..n]));
                changed.notify_all();
            }
        });
        captured
    }

    fn text(&self) -> String {
        self.inner.0.lock().map(|s| s.0.clone()).unwrap_or_default()
    }

    /// Waits (bounded) until `done(text)`; returns the text, or `None` if the pipe closed or
    /// WAIT passed first.
    fn wait_until(&self, done: impl Fn(&str) -> bool) -> Option<String> {
        let (lock, changed) = &*self.inner;
        let guard = lock.lock().expect("capture lock");
        let (guard, _) = changed
            .wait_timeout_while(guard, WAIT, |s| !done(&s.0) && !s.1)
            .expect("capture lock");
        done(&guard.0).then(|| guard.0.clone())
    }

    /// Waits (bounded) for the pipe to close; returns everything written.
    fn wait_closed(&self) -> String {
        let (lock, changed) = &*self.inner;
        let guard = lock.lock().expect("capture lock");
        let (guard, _) = changed
            .wait_timeout_while(guard, WAIT, |s| !s.1)
            .expect("capture lock");
        assert!(guard.1, "output still open {WAIT:?} after exit");
        guard.0.clone()
    }
}

/// A running `switchyard`, killed on drop.
struct Proc {
    child: Child,
    stdout: Captured,
    stderr: Captured,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_env(args, &[("NO_COLOR", "1")])
    }

    /// [`spawn`](Self::spawn) with these environment variables (and no `NO_COLOR` unless
    /// given).
    fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchyard");
        let stdout = Captured::start(child.stdout.take().expect("piped stdout"));
        let stderr = Captured::start(child.stderr.take().expect("piped stderr"));
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the startup line on stderr; panics with the output if the process exits or
    /// WAIT passes first.
    /// Waits for the startup line and returns the address it reports. Tests listen on port 0
    /// and read the real port from here: picking a free port beforehand races with other tests.
    fn wait_ready(&self) -> SocketAddr {
        let Some(text) = self.stderr.wait_until(|s| s.contains("listening on")) else {
            panic!(
                "switchyard did not report `listening on`; stderr: {:?}, stdout: {:?}",
                self.stderr.text(),
                self.stdout.text()
            );
        };
        let after = text.split("listening on ").nth(1).unwrap_or("");
        let addr = after
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches(',');
        addr.parse()
            .unwrap_or_else(|_| panic!("an address in the startup line: {text:?}"))
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// Waits (bounded polling of the child's status) for the process to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "switchyard still running {WAIT:?} later; stderr: {:?}",
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `switchyard args` to completion (bounded): status, stdout, stderr.
    fn run(args: &[&str]) -> (ExitStatus, String, String) {
        let mut p = Proc::spawn(args);
        let status = p.wait_exit();
        (status, p.stdout.wait_closed(), p.stderr.wait_closed())
    }
}

/// A free loopback port: bound, read, released.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a throwaway listener");
    l.local_addr().expect("throwaway address")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
}

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-binary-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---- peers ----

/// A keep-alive HTTP origin answering every request with `200` and body `name` (the shared
/// recording origin, so the test can count what each one saw).
async fn named_origin(name: &'static str) -> Origin {
    http_origin(Arc::new(move |_req: &SeenRequest| {
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                name.len()
            )
            .into_bytes(),
        )
    }))
    .await
}

/// Sends `request` on a new connection and reads until the peer closes (bounded).
async fn exchange_until_close(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect within WAIT")
        .expect("connect to switchyard");
    stream.write_all(request).await.expect("write request");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no close within WAIT; got {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .expect("read response");
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects a WebSocket client to `url`, sends a text and a binary message and expects both
/// back, then closes cleanly.
async fn ws_round_trip(url: &str) {
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake within WAIT")
        .expect("WebSocket handshake through switchyard");
    assert_eq!(response.status().as_u16(), 101);
    for msg in [
        Message::text("hello through switchyard"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        ws.send(msg.clone()).await.expect("send message");
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo within WAIT");
        match echoed {
            Some(Ok(m)) => assert_eq!(m, msg),
            other => panic!("expected the echo of {msg:?}, got {other:?}"),
        }
    }
    ws.close(None).await.expect("send close");
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "close handshake within WAIT");
}

// ---- A: the flags contract ----

#[test]
fn flags_round_robin_access_log_and_sigterm_tokio() {
    flags_round_robin_access_log_and_sigterm("tokio");
}

#[test]
fn flags_round_robin_access_log_and_sigterm_smol() {
    flags_round_robin_access_log_and_sigterm("smol");
}

fn flags_round_robin_access_log_and_sigterm(runtime_name: &str) {
    let rt = runtime();
    let (origin_a, origin_b) =
        rt.block_on(async { (named_origin("A").await, named_origin("B").await) });
    let (a, b) = (origin_a.addr, origin_b.addr);
    let (listen_s, a_s, b_s) = ("127.0.0.1:0".to_owned(), a.to_string(), b.to_string());
    let mut proc = Proc::spawn(&[
        "--listen",
        &listen_s,
        "--upstream",
        &a_s,
        "--upstream",
        &b_s,
        "--connect-timeout",
        "5s",
        "--read-timeout",
        "60s",
        "--send-timeout",
        "60s",
        "--tunnel-idle-timeout",
        "1h",
        "--workers",
        "2",
        "--access-log",
        "-",
        "--runtime",
        runtime_name,
    ]);
    let listen = proc.wait_ready();

    let bodies: Vec<String> = rt.block_on(async {
        let mut bodies = Vec::new();
        for i in 0..4 {
            let request = format!("GET /rr{i} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            let response = exchange_until_close(listen, request.as_bytes()).await;
            let body = response
                .strip_prefix("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n")
                .unwrap_or_else(|| panic!("unexpected response {response:?}"))
                .to_owned();
            bodies.push(body);
        }
        bodies
    });
    assert!(
        bodies == ["A", "B", "A", "B"] || bodies == ["B", "A", "B", "A"],
        "round-robin alternates between the two upstreams: {bodies:?}"
    );
    let lines_a: Vec<String> = origin_a
        .seen()
        .iter()
        .map(|r| r.request_line().to_owned())
        .collect();
    let lines_b: Vec<String> = origin_b
        .seen()
        .iter()
        .map(|r| r.request_line().to_owned())
        .collect();
    assert_eq!(lines_a.len(), 2, "origin A: {lines_a:?}");
    assert_eq!(lines_b.len(), 2, "origin B: {lines_b:?}");

    let log = proc
        .stdout
        .wait_until(|s| s.lines().count() >= 4)
        .unwrap_or_else(|| panic!("4 access log lines; stdout: {:?}", proc.stdout.text()));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    for i in 0..4 {
        let needle = format!("\"GET /rr{i} HTTP/1.1\" 200 1 ");
        assert_eq!(
            lines.iter().filter(|l| l.contains(&needle)).count(),
            1,
            "one line with {needle:?} in {log}"
        );
    }
    assert!(
        lines.iter().all(|l| l.starts_with("127.0.0.1 - - [")),
        "{log}"
    );

    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}; stderr: {}", proc.stderr.text());
    let stdout = proc.stdout.wait_closed();
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    let stderr = proc.stderr.wait_closed();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---- B: WebSocket through the binary ----

#[test]
fn websocket_echo_through_the_binary_tokio() {
    websocket_echo_through_the_binary("tokio");
}

#[test]
fn websocket_echo_through_the_binary_smol() {
    websocket_echo_through_the_binary("smol");
}

fn websocket_echo_through_the_binary(runtime_name: &str) {
    let rt = runtime();
    let echo = rt.block_on(ws_echo());
    let (listen_s, echo_s) = ("127.0.0.1:0".to_owned(), echo.to_string());
    let mut proc = Proc::spawn(&[
        "--listen",
        &listen_s,
        "--upstream",
        &echo_s,
        "--workers",
        "1",
        "--runtime",
        runtime_name,
    ]);
    let listen = proc.wait_ready();
    rt.block_on(ws_round_trip(&format!("ws://{listen}/chat")));
    // The finished tunnel is logged with status 101.
    proc.stdout
        .wait_until(|s| s.contains("\"GET /chat HTTP/1.1\" 101 "))
        .unwrap_or_else(|| panic!("tunnel access log line; stdout: {:?}", proc.stdout.text()));
    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}; stderr: {}", proc.stderr.text());
}

// ---- operations: metrics, WARN lines, the second signal ----

#[test]
fn metrics_count_known_traffic_and_a_refused_upstream_warns_once_tokio() {
    metrics_count_known_traffic_and_a_refused_upstream_warns_once("tokio");
}

#[test]
fn metrics_count_known_traffic_and_a_refused_upstream_warns_once_smol() {
    metrics_count_known_traffic_and_a_refused_upstream_warns_once("smol");
}

/// The value of the series `name` (with labels, as written) in an exposition text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
}

/// GETs `/metrics` from `addr`.
async fn scrape(addr: SocketAddr) -> String {
    let response = exchange_until_close(addr, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// Two WebSocket round trips through a group whose first server refuses: the metrics show the
/// exact counts, the refusal is one WARN line on stderr (not repeated for the second request)
/// naming the server, and stderr has no colour codes when it is not a terminal.
fn metrics_count_known_traffic_and_a_refused_upstream_warns_once(runtime_name: &str) {
    let rt = runtime();
    let echo = rt.block_on(ws_echo());
    let refusing = switchyard_tests::refusing_port();
    let (refusing_s, echo_s) = (refusing.addr.to_string(), echo.to_string());
    let mut proc = Proc::spawn_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &refusing_s,
            "--upstream",
            &echo_s,
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--runtime",
            runtime_name,
        ],
        &[],
    );
    let listen = proc.wait_ready();
    let text = proc
        .stderr
        .wait_until(|s| s.contains("/metrics"))
        .expect("the metrics address on stderr");
    let metrics_at: SocketAddr = text
        .split("metrics at http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("metrics address in {text:?}"));
    for _ in 0..2 {
        rt.block_on(ws_round_trip(&format!("ws://{listen}/m")));
    }
    proc.stdout
        .wait_until(|s| s.matches(" 101 ").count() >= 2)
        .unwrap_or_else(|| panic!("two tunnel lines; stdout: {:?}", proc.stdout.text()));
    let text = rt.block_on(scrape(metrics_at));
    assert_eq!(
        metric(&text, "switchyard_connections_accepted_total"),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "switchyard_upgrades_attempted_total"), 2.0);
    assert_eq!(metric(&text, "switchyard_upgrades_accepted_total"), 2.0);
    assert_eq!(
        metric(&text, "switchyard_requests_total{class=\"1xx\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "switchyard_requests_total{class=\"5xx\"}"),
        0.0
    );
    assert_eq!(metric(&text, "switchyard_tunnels_open"), 0.0);
    assert_eq!(
        metric(&text, "switchyard_tunnel_duration_seconds_count"),
        2.0
    );
    let closed: f64 = text
        .lines()
        .filter(|l| l.starts_with("switchyard_tunnels_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(closed, 2.0, "{text}");
    let refused = metric(
        &text,
        "switchyard_upstream_failures_total{cause=\"refused\"}",
    );
    assert!(refused >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "switchyard_upstream_connects_total"),
        2.0 + refused,
        "every attempt is a connect: {text}"
    );
    assert_eq!(metric(&text, "switchyard_draining"), 0.0);

    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}");
    let stderr = proc.stderr.wait_closed();
    let warns: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&refusing_s))
        .collect();
    assert_eq!(
        warns.len(),
        1,
        "one WARN line for the refused server: {stderr}"
    );
    assert!(warns[0].contains("connection refused"), "{}", warns[0]);
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes in a pipe: {stderr:?}"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_still_logs_open_tunnels() {
    let rt = runtime();
    let echo = rt.block_on(ws_echo());
    let echo_s = echo.to_string();
    let mut proc = Proc::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &echo_s,
        "--drain-timeout",
        "1h",
        "--workers",
        "1",
    ]);
    let listen = proc.wait_ready();
    let ws = rt.block_on(async {
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(format!("ws://{listen}/open")),
        )
        .await
        .expect("handshake within WAIT")
        .expect("handshake");
        ws
    });
    proc.signal("-TERM");
    proc.stderr
        .wait_until(|s| s.contains("shutting down"))
        .expect("the drain starts");
    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert_eq!(status.code(), Some(130), "{status}");
    let stdout = proc.stdout.wait_closed();
    assert!(
        stdout.contains("\"GET /open HTTP/1.1\" 101 "),
        "the cut tunnel still has its access-log line: {stdout:?}; stderr: {}",
        proc.stderr.wait_closed()
    );
    drop(ws);
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_running_configuration() {
    let rt = runtime();
    let (a, b) = rt.block_on(async { (named_origin("A").await, named_origin("B").await) });
    let config = |peer: SocketAddr, extra: &str| {
        format!("listen = \"127.0.0.1:0\"\n{extra}[upstream]\npeers = \"{peer}\"\n")
    };
    let file = TempFile::new("reload.toml", &config(a.addr, ""));
    let mut proc = Proc::spawn(&[
        "--config",
        file.path(),
        "--workers",
        "1",
        "--access-log",
        "off",
    ]);
    let listen = proc.wait_ready();
    let get = |addr: SocketAddr| {
        let response = rt.block_on(exchange_until_close(
            addr,
            b"GET / HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        ));
        response.rsplit("\r\n\r\n").next().unwrap_or("").to_owned()
    };
    assert_eq!(get(listen), "A");

    // A new upstream and a second listener.
    let second = free_addr();
    std::fs::write(
        &file.0,
        config(b.addr, "").replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = [\"127.0.0.1:0\", \"{second}\"]"),
        ),
    )
    .expect("rewrite the config");
    proc.signal("-HUP");
    proc.stderr
        .wait_until(|s| s.contains("reloaded the configuration"))
        .unwrap_or_else(|| panic!("no reload line: {}", proc.stderr.text()));
    let deadline = Instant::now() + WAIT;
    while get(listen) != "B" {
        assert!(Instant::now() < deadline, "new connections still go to A");
    }
    assert_eq!(get(second), "B", "the listener added by the reload serves");

    // A broken file: refused with the check-config error, and B keeps being served.
    std::fs::write(&file.0, "[upstream\npeers = 1\n").expect("break the config");
    proc.signal("-HUP");
    let text = proc
        .stderr
        .wait_until(|s| s.contains("reload refused"))
        .unwrap_or_else(|| panic!("no refusal: {}", proc.stderr.text()));
    assert!(
        text.contains(file.path()),
        "the error names the file: {text}"
    );
    assert_eq!(get(listen), "B");

    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}; stderr: {}", proc.stderr.text());
}

// ---- probe ----

/// A one-trick server: for every connection, reads a request head and writes
/// `answer(head)`; then holds the connection open (`hold`) or closes it.
fn scripted_server(
    answer: impl Fn(&str) -> Option<Vec<u8>> + Send + 'static,
    hold: bool,
) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind scripted server");
    let addr = listener.local_addr().expect("scripted server address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(WAIT));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match std::io::Read::read(&mut stream, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if let Some(bytes) = answer(&String::from_utf8_lossy(&head)) {
                let _ = std::io::Write::write_all(&mut stream, &bytes);
            }
            if hold {
                held.push(stream);
            }
        }
    });
    addr
}

/// The accept value for the key in a request head.
fn accept_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap_or("")
        .trim();
    String::from_utf8_lossy(&proxy_core::websocket_accept(key.as_bytes())).into_owned()
}

fn probe(url: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["probe", url];
    args.extend_from_slice(extra);
    let (status, stdout, stderr) = Proc::run(&args);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (status.code(), stdout)
}

#[test]
fn probe_diagnoses_each_kind_of_failure() {
    let rt = runtime();
    let echo = rt.block_on(ws_echo());
    // A real WebSocket server, directly and through switchyard.
    let (code, out) = probe(&format!("ws://{echo}/"), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK: ") && out.contains("Pong after"), "{out}");
    let echo_s = echo.to_string();
    let proxy = Proc::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &echo_s,
        "--workers",
        "1",
    ]);
    let listen = proxy.wait_ready();
    let (code, out) = probe(&format!("ws://{listen}/through"), &[]);
    assert_eq!(code, Some(0), "{out}");

    let cases: Vec<(SocketAddr, i32, &str)> = vec![
        (
            scripted_server(
                |_| Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()),
                false,
            ),
            6,
            "Upgrade and Connection headers were dropped",
        ),
        (
            scripted_server(
                |_| {
                    Some(b"HTTP/1.1 301 Moved\r\nLocation: ws://elsewhere/ws\r\nContent-Length: 0\r\n\r\n".to_vec())
                },
                false,
            ),
            6,
            "redirect to ws://elsewhere/ws",
        ),
        (
            scripted_server(
                |_| Some(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec()),
                false,
            ),
            6,
            "proxy_http_version 1.1",
        ),
        (
            scripted_server(
                |_| {
                    Some(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                            .to_vec(),
                    )
                },
                true,
            ),
            7,
            "wrong Sec-WebSocket-Accept",
        ),
        (
            scripted_server(
                |head| {
                    Some(
                        format!(
                            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                             Sec-WebSocket-Accept: {}\r\n\r\n",
                            accept_for(head)
                        )
                        .into_bytes(),
                    )
                },
                true,
            ),
            7,
            "without Upgrade: websocket",
        ),
        (
            scripted_server(
                |head| {
                    Some(
                        format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                             Sec-WebSocket-Accept: {}\r\n\r\n",
                            accept_for(head)
                        )
                        .into_bytes(),
                    )
                },
                false,
            ),
            8,
            "closed right after the 101",
        ),
        (
            scripted_server(|_| None, true),
            5,
            "no answer to the handshake",
        ),
    ];
    for (addr, want, needle) in cases {
        let (code, out) = probe(&format!("ws://{addr}/x"), &["--timeout", "500ms"]);
        assert_eq!(code, Some(want), "{needle}: {out}");
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let refusing = switchyard_tests::refusing_port();
    let (code, out) = probe(&format!("ws://{}/", refusing.addr), &[]);
    assert_eq!(code, Some(4), "{out}");
    let (code, out) = probe("https://127.0.0.1:1/", &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("wss://"),
        "an https URL gets the wss one suggested: {out}"
    );
}

// ---- C: check-config ----

#[test]
fn check_config_prints_effective_config() {
    let file = TempFile::new(
        "good.toml",
        "listen = [\"127.0.0.1:18080\"]\n\n[upstream]\npeers = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n\n\
         [timeouts]\ntunnel_idle = \"2h\"\nread = \"90s\"\n",
    );
    let (status, stdout, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(status.success(), "{status}; stderr: {stderr}");
    assert!(stdout.contains(file.path()), "{stdout}");
    for expected in [
        "tunnel_idle = \"2h\"",
        "read = \"90s\"",
        "connect = \"1m\"",
        "servers = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]",
        "listen = [\"127.0.0.1:18080\"]",
        "max_body = 1048576",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The output is itself a valid configuration, and the same one.
    let body = stdout.split_once('\n').map_or("", |(_, rest)| rest);
    let again = TempFile::new("again.toml", body);
    let (status, stdout2, stderr) = Proc::run(&["check-config", again.path()]);
    assert!(status.success(), "{status}; stderr: {stderr}");
    assert_eq!(stdout2.split_once('\n').map(|(_, r)| r), Some(body));
}

#[test]
fn check_config_unknown_key_names_file_line_and_key() {
    let file = TempFile::new(
        "unknown.toml",
        "[upstream]\npeers = [\"127.0.0.1:9000\"]\n\n[timeouts]\nread = \"5s\"\nreed = \"5s\"\n",
    );
    let (status, stdout, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(!status.success(), "unknown key accepted; stdout: {stdout}");
    for expected in [file.path(), "line 6", "reed"] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

const BAD_DURATION: &str =
    "[upstream]\npeers = [\"127.0.0.1:9000\"]\n\n[timeouts]\nconnect = \"5x\"\n";

#[test]
fn check_config_bad_duration_names_file_and_line() {
    let file = TempFile::new("duration.toml", BAD_DURATION);
    let (status, stdout, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(!status.success(), "bad duration accepted; stdout: {stdout}");
    for expected in [file.path(), "line 5", "duration", "\"5x\""] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// settings.rs promises that "every error names the file, the line, the key and what was
/// expected"; for a value that fails to deserialize (here a bad duration) the key is lost.
#[test]
fn check_config_bad_duration_names_the_key() {
    let file = TempFile::new("duration.toml", BAD_DURATION);
    let (status, stdout, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(!status.success(), "bad duration accepted; stdout: {stdout}");
    for expected in [file.path(), "line 5", "connect"] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in: {stderr}"
        );
    }
}

// ---- D: startup errors ----

/// The error output is one line starting `switchyard: error:`, without a panic or backtrace.
fn assert_one_line_error(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr:?}");
    assert!(lines[0].starts_with("switchyard: error: "), "{stderr:?}");
    assert!(lines[0].contains(needle), "{needle:?} missing: {stderr:?}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr:?}"
    );
}

#[test]
fn port_in_use_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the port to take");
    let addr = taken.local_addr().expect("taken address").to_string();
    let (status, _stdout, stderr) = Proc::run(&["--listen", &addr, "--upstream", "127.0.0.1:9"]);
    assert!(!status.success(), "started on a port in use");
    assert_one_line_error(&stderr, &format!("cannot listen on {addr}"));
    drop(taken);
}

#[test]
fn unknown_runtime_is_a_clear_error() {
    let listen = free_addr().to_string();
    let (status, _stdout, stderr) = Proc::run(&[
        "--listen",
        &listen,
        "--upstream",
        "127.0.0.1:9",
        "--runtime",
        "nope",
    ]);
    assert!(!status.success(), "--runtime nope accepted");
    assert!(
        stderr.contains("invalid value 'nope'")
            && stderr.contains("tokio")
            && stderr.contains("smol"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn no_upstream_is_a_clear_error() {
    let listen = free_addr().to_string();
    let (status, _stdout, stderr) = Proc::run(&["--listen", &listen]);
    assert!(!status.success(), "started without an upstream");
    assert_one_line_error(&stderr, "no upstream");
    assert!(stderr.contains("--upstream"), "{stderr}");
}

// ---- E: demo ----

#[test]
fn demo_serves_page_and_echo_then_stops_on_sigint() {
    let rt = runtime();
    let mut proc = Proc::spawn(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let listen = proc.wait_ready();
    let response = rt.block_on(exchange_until_close(
        listen,
        b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    ));
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "{:?}",
        response.get(..200)
    );
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(body.len(), length);
    assert!(body.contains("switchyard demo"), "{body}");
    assert!(
        body.contains("/metrics\">http://"),
        "the page links the metrics"
    );
    // A plain GET of the WebSocket endpoint: 426 naming the protocol (RFC 9110 §15.5.22).
    let response = rt.block_on(exchange_until_close(
        listen,
        b"GET /ws HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    ));
    assert!(response.starts_with("HTTP/1.1 426 "), "{response}");
    assert!(
        response.contains("\r\nUpgrade: websocket\r\n"),
        "{response}"
    );
    // With ?info the upstream first describes the handshake switchyard forwarded and checked.
    let info = rt.block_on(async {
        let (mut ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(format!("ws://{listen}/ws?info")),
        )
        .await
        .expect("handshake within WAIT")
        .expect("handshake");
        let first = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("info within WAIT");
        let _ = ws.close(None).await;
        match first {
            Some(Ok(Message::Text(t))) => t.to_string(),
            other => panic!("expected the info message, got {other:?}"),
        }
    });
    assert!(info.starts_with("info\n"), "{info}");
    assert!(info.contains("X-Forwarded-For: 127.0.0.1"), "{info}");
    assert!(info.contains("Sec-WebSocket-Accept: "), "{info}");
    rt.block_on(ws_round_trip(&format!("ws://{listen}/ws")));
    proc.signal("-INT");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}; stderr: {}", proc.stderr.text());
    assert!(
        proc.stdout
            .wait_closed()
            .contains(&format!("http://{listen}/")),
        "the demo prints its address"
    );
}

// ---- F: --help ----

#[test]
fn help_mentions_the_timeouts() {
    let (status, stdout, stderr) = Proc::run(&["--help"]);
    assert!(status.success(), "{status}; stderr: {stderr}");
    for flag in [
        "--tunnel-idle-timeout",
        "--read-timeout",
        "--upstream",
        "check-config",
    ] {
        assert!(
            stdout.contains(flag),
            "{flag} missing from --help:\n{stdout}"
        );
    }
}

// ---- TLS ----

/// A throwaway CA and leaf certificates made now (no key is committed).
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA");
        TestCa { cert, key }
    }

    /// PEM certificate and key for `name`.
    fn leaf(&self, name: &str) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to `addr` for `name`, and the leaf certificate it was shown (DER).
async fn tls_to(ca: &TestCa, addr: SocketAddr, name: &str) -> (ClientTls, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let tls = tokio::time::timeout(WAIT, ca.connector().connect(server, tcp))
        .await
        .expect("TLS handshake within WAIT")
        .expect("TLS handshake");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .to_vec();
    (tls, leaf)
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

/// The whole wss story of the binary: a file's `tls` (paths relative to the file) terminates
/// TLS for a plain ws backend; SIGHUP re-reads the certificate for new connections while an
/// open tunnel keeps working; a broken key file refuses the reload and the certificate in use
/// stays.
#[test]
fn wss_through_the_binary_with_a_certificate_rotated_on_sighup() {
    let rt = runtime();
    let backend = rt.block_on(ws_echo());
    let ca = TestCa::new();
    let (first, second) = (ca.leaf("wss.test"), ca.leaf("wss.test"));
    let file = TempFile::new(
        "tls.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n[upstream]\npeers = \"{backend}\"\n"
        ),
    );
    let dir = file.0.parent().expect("temp dir").to_path_buf();
    let write_pair = |(cert, key): &(String, String)| {
        std::fs::write(dir.join("cert.pem"), cert).expect("write cert");
        std::fs::write(dir.join("key.pem"), key).expect("write key");
    };
    write_pair(&first);
    let check = Proc::run(&["check-config", file.path()]);
    assert!(check.0.success(), "check-config: {}", check.2);
    assert!(check.1.contains("cert.pem"), "{}", check.1);
    let mut proc = Proc::spawn(&["--config", file.path(), "--access-log", "off"]);
    let addr = proc.wait_ready();
    assert!(
        proc.stderr.text().contains("(TLS)"),
        "the startup line says which listeners speak TLS: {}",
        proc.stderr.text()
    );
    let (tls, leaf) = rt.block_on(tls_to(&ca, addr, "wss.test"));
    assert_eq!(leaf, der_of(&first.0));
    let url = format!("wss://wss.test:{}/chat", addr.port());
    let mut ws = rt.block_on(async {
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("handshake within WAIT")
            .expect("wss handshake");
        assert_eq!(response.status().as_u16(), 101);
        ws
    });

    write_pair(&second);
    proc.signal("-HUP");
    proc.stderr
        .wait_until(|s| s.contains("reloaded the configuration"))
        .unwrap_or_else(|| panic!("no reload line: {}", proc.stderr.text()));
    let (fresh, leaf) = rt.block_on(tls_to(&ca, addr, "wss.test"));
    assert_eq!(
        leaf,
        der_of(&second.0),
        "new connections get the new certificate"
    );
    drop(fresh);
    rt.block_on(async {
        let msg = Message::text("after the rotation");
        ws.send(msg.clone()).await.expect("send");
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo within WAIT");
        assert!(
            matches!(echoed, Some(Ok(m)) if m == msg),
            "the open tunnel keeps working"
        );
    });

    std::fs::write(dir.join("key.pem"), "not a key").expect("break the key");
    proc.signal("-HUP");
    let text = proc
        .stderr
        .wait_until(|s| s.contains("reload refused"))
        .unwrap_or_else(|| panic!("no refusal: {}", proc.stderr.text()));
    assert!(text.contains("key.pem"), "the error names the file: {text}");
    let (_kept, leaf) = rt.block_on(tls_to(&ca, addr, "wss.test"));
    assert_eq!(leaf, der_of(&second.0), "the certificate in use stays");

    rt.block_on(async {
        ws.close(None).await.expect("close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    });
    drop(ws);
    proc.signal("-TERM");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}; stderr: {}", proc.stderr.text());
}

#[test]
fn tls_config_errors_name_the_file_and_the_setting() {
    let file = TempFile::new(
        "bad-tls.toml",
        "listen = \"127.0.0.1:0\"\ntls = { cert = \"missing.pem\", key = \"missing.key\" }\n[upstream]\npeers = \"127.0.0.1:9\"\n",
    );
    let (status, _, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(!status.success());
    assert_one_line_error(&stderr, "tls[0]: ");
    assert!(stderr.contains("missing.pem"), "{stderr}");
    let file = TempFile::new(
        "bad-group.toml",
        "[upstream]\npeers = \"127.0.0.1:9\"\nca = \"ca.pem\"\n",
    );
    let (status, _, stderr) = Proc::run(&["check-config", file.path()]);
    assert!(!status.success());
    assert!(
        stderr.contains("upstream.ca: only with `tls = true`"),
        "{stderr}"
    );
    let (status, _, stderr) = Proc::run(&["--tls-cert", "c.pem", "--upstream", "127.0.0.1:9"]);
    assert!(!status.success());
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

/// Turning verification off for an upstream group is said out loud at start.
#[test]
fn insecure_skip_verify_is_warned_about_at_start() {
    let file = TempFile::new(
        "insecure.toml",
        "listen = \"127.0.0.1:0\"\n[upstream]\npeers = \"127.0.0.1:9\"\n\
         [upstream.lab]\npeers = \"127.0.0.1:9443\"\ntls = true\ninsecure_skip_verify = true\n",
    );
    let mut proc = Proc::spawn(&["--config", file.path(), "--access-log", "off"]);
    proc.wait_ready();
    let text = proc.stderr.text();
    assert!(
        text.contains("WARN") && text.contains("insecure_skip_verify") && text.contains("lab"),
        "{text}"
    );
    proc.signal("-TERM");
    assert!(proc.wait_exit().success());
}

#[test]
fn demo_tls_serves_https_and_wss() {
    let rt = runtime();
    let mut proc = Proc::spawn(&[
        "demo",
        "--tls",
        "--listen",
        "127.0.0.1:0",
        "--access-log",
        "off",
    ]);
    let addr = proc.wait_ready();
    let text = proc
        .stdout
        .wait_until(|s| s.contains("wss://"))
        .unwrap_or_else(|| panic!("no wss line: {}", proc.stdout.text()));
    assert!(text.contains("https://"), "{text}");
    // The certificate is self-signed: this client trusts whatever it is shown (a browser asks).
    rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = tokio::time::timeout(
            WAIT,
            insecure_connector().connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                tcp,
            ),
        )
        .await
        .expect("handshake within WAIT")
        .expect("TLS handshake with the demo");
        let url = format!("wss://localhost:{}/ws", addr.port());
        let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("within WAIT")
            .expect("wss handshake with the demo");
        let msg = Message::text("hello demo");
        ws.send(msg.clone()).await.expect("send");
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo within WAIT");
        assert!(matches!(echoed, Some(Ok(m)) if m == msg), "echoed over wss");
    });
    // probe: the self-signed certificate is refused with its own exit code and a hint, and
    // accepted with --insecure.
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (code, out) = probe(&url, &[]);
    assert_eq!(code, Some(9), "{out}");
    assert!(out.contains("--insecure"), "{out}");
    let (code, out) = probe(&url, &["--insecure"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("TLS handshake in") && out.contains("ALPN http/1.1"),
        "{out}"
    );
    let (code, out) = probe(&format!("ws://127.0.0.1:{}/ws", addr.port()), &[]);
    assert_eq!(code, Some(6), "{out}");
    assert!(
        out.contains("wss://"),
        "a plain probe of a TLS port says so: {out}"
    );
    proc.signal("-INT");
    let status = proc.wait_exit();
    assert!(status.success(), "{status}");
}

/// A client that accepts any certificate (for the demo's self-signed one only): the proxy's
/// own `insecure_skip_verify` settings.
fn insecure_connector() -> tokio_rustls::TlsConnector {
    let tls = proxy_tokio::ClientTls::new(proxy_tokio::Verify::Skip, &[]).expect("no-verify TLS");
    tokio_rustls::TlsConnector::from(tls.rustls_config())
}
