//! Peers that misbehave slowly, on every runtime: a slowloris crowd trickling request heads
//! does not keep anyone else waiting, and each of them is answered 408 at its deadline; a
//! reader that stops reading stops the writer on the far side. Faults at every stage of an
//! exchange, from the upstream and from the client, are contained.
//!
//! Every scenario also checks that the file descriptors it made are all closed at its end (per
//! case, for those made of cases). Descriptors belong to the whole process, so each scenario
//! instance runs alone in a child process of its own (see [`run_isolated`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_tests::origin::{http_origin, SeenRequest};
use switchyard_tests::{config_for, refusing_port, run_scenario, start_proxy, Runtime, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Like `switchyard_tests::runtime_tests!`, but each instance runs in a child process of its
/// own, alone, so that its descriptor counts are its own.
macro_rules! isolated_runtime_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use switchyard_tests::Runtime;

                #[test]
                fn tokio() {
                    let name = concat!(stringify!($name), "::tokio");
                    super::run_isolated(name, Runtime::Tokio, super::$name);
                }
                #[test]
                fn tokio_multi() {
                    let name = concat!(stringify!($name), "::tokio_multi");
                    super::run_isolated(name, Runtime::TokioMulti, super::$name);
                }
                #[test]
                fn smol() {
                    let name = concat!(stringify!($name), "::smol");
                    super::run_isolated(name, Runtime::Smol, super::$name);
                }
                #[test]
                fn async_std() {
                    let name = concat!(stringify!($name), "::async_std");
                    super::run_isolated(name, Runtime::AsyncStd, super::$name);
                }
            }
        )*
    };
}

isolated_runtime_tests! {
    slowloris_is_cut_off_and_starves_no_one,
    backpressure_stops_the_writer_both_ways,
    faults_at_every_stage_are_contained,
    client_resets_are_contained,
}

/// Set in the child process that runs one scenario instance.
const ISOLATED_ENV: &str = "SWITCHYARD_ABUSE_ISOLATED";

/// How long a child may take: the scenario itself is bounded at 120 s by `run_scenario`.
const CHILD_LIMIT: Duration = Duration::from_secs(180);

/// Runs the test `name` (this scenario on `rt`) in a child process: this test binary started
/// again with only that test selected, one test thread, and [`ISOLATED_ENV`] set, which makes
/// the same test run the scenario itself. Nothing else runs in the child, so every descriptor
/// opened or closed there is the scenario's. The child must pass, having run exactly one test.
fn run_isolated<F, Fut>(name: &str, rt: Runtime, scenario: F)
where
    F: FnOnce(Runtime) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if std::env::var_os(ISOLATED_ENV).is_some() {
        return run_scenario(rt, scenario);
    }
    let exe = std::env::current_exe().expect("the path of this test binary");
    let mut command = smol::process::Command::new(exe);
    command
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ISOLATED_ENV, "1")
        .kill_on_drop(true);
    let output = smol::block_on(smol::future::or(
        async { Some(command.output().await) },
        async {
            smol::Timer::after(CHILD_LIMIT).await;
            None
        },
    ))
    .unwrap_or_else(|| panic!("{name}: the child process ran over {CHILD_LIMIT:?}"))
    .expect("run the child process");
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    // What the child said, for a failure here or `--nocapture`.
    eprint!("{err}");
    assert!(
        output.status.success(),
        "{name} failed in its child process ({}):\n{out}\n{err}",
        output.status
    );
    assert!(
        out.contains("test result: ok. 1 passed"),
        "{name}: the child process ran no test:\n{out}"
    );
}

/// The descriptors this process has open, each with what it refers to (`socket:[inode]`,
/// `anon_inode:[eventpoll]`, …); `None` without /proc.
fn open_fds() -> Option<BTreeMap<u32, String>> {
    let listing = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory being listed is open too, only while it is listed.
    let own = format!("/proc/{}/fd", std::process::id());
    let mut fds = BTreeMap::new();
    for entry in listing.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.display().to_string();
            if target != own {
                fds.insert(fd, target);
            }
        }
    }
    Some(fds)
}

/// The descriptors open at some point of a scenario.
#[derive(Debug)]
struct Fds(Option<BTreeMap<u32, String>>);

impl Fds {
    /// Takes note of the descriptors open now (says so when it cannot).
    fn now() -> Fds {
        let fds = open_fds();
        if fds.is_none() {
            eprintln!("/proc/self/fd unavailable: descriptor checks skipped");
        }
        Fds(fds)
    }

    /// Waits (bounded by [`WAIT`]) until every descriptor open was already open when `self`
    /// was taken: whatever the scenario opened since is closed, so the count is back to (or
    /// below) what it was. No slack: the scenario runs alone in its process (see
    /// [`run_isolated`]) after [`warm_up`], and a proxy on any runtime keeps nothing open once
    /// it has stopped.
    async fn assert_back(&self, what: &str) {
        self.wait_for(what, "after the end", |new| new.is_empty())
            .await;
    }

    /// While a proxy started since `self` still runs, with no connection: waits (bounded)
    /// until the only socket opened since is still open is its listener. (Its runtime's own
    /// descriptors, an epoll instance and a waker, are not sockets.) This sees a socket kept
    /// by something that lives as long as the proxy, which stopping it would close.
    async fn assert_only_listener(&self, what: &str) {
        self.wait_for(what, "with the proxy idle", |new| {
            new.iter().filter(|t| t.starts_with("socket:")).count() == 1
        })
        .await;
    }

    /// Polls until `ok` holds for the descriptors opened since `self` that are open now
    /// (their targets). Polled: a closing descriptor has no event to await.
    async fn wait_for(&self, what: &str, when: &str, ok: impl Fn(&[&String]) -> bool) {
        let Some(before) = &self.0 else {
            return;
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let now = open_fds().expect("list /proc/self/fd");
            let new: Vec<&String> = now
                .iter()
                .filter(|(fd, target)| before.get(fd) != Some(*target))
                .map(|(_, target)| target)
                .collect();
            if ok(&new) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: descriptors open {when}, {WAIT:?} on, that were not before: {new:?} \
                 ({} open, {} before)",
                now.len(),
                before.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts a proxy on `rt`, has it answer one request (a 502: its upstream refuses) and stops
/// it, so that what a runtime opens once per process and keeps (async-io's reactor behind smol
/// and async-std, async-std's executor) is open before a scenario takes its [`Fds`].
async fn warm_up(rt: Runtime) {
    let refusing = refusing_port();
    let proxy = start_proxy(rt, config_for(&[refusing.addr]));
    let answer = get(proxy.addr, 0).await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the warm-up proxy");
}

/// One slow client: the head one byte at a time, every 50 ms (a complete head would take 2 s),
/// then whatever the proxy answers.
async fn slow_client(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = b"GET /slow HTTP/1.1\r\nHost: example.test\r\nX-Pad: aaaaaaaa\r\n\r\n";
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(addr: SocketAddr, i: usize) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET /ok{i} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("an answer within WAIT")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

async fn slowloris_is_cut_off_and_starves_no_one(rt: Runtime) {
    const SLOW: usize = 50;
    warm_up(rt).await;
    let origin = http_origin(Arc::new(|_: &SeenRequest| {
        Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    }))
    .await;
    // After the origin: its listener lives as long as the test's runtime.
    let fds = Fds::now();
    let mut config = config_for(&[origin.addr]);
    config.timeouts.request_head = Duration::from_secs(1);
    let proxy = start_proxy(rt, config);
    let slow: Vec<_> = (0..SLOW)
        .map(|_| tokio::spawn(slow_client(proxy.addr)))
        .collect();
    // While the crowd trickles, ordinary requests are answered.
    for i in 0..20 {
        let answer = get(proxy.addr, i).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }
    for task in slow {
        let answer = task.await.expect("slow client task");
        assert!(
            answer.starts_with("HTTP/1.1 408 "),
            "a slow head is answered 408 at its deadline: {answer:?}"
        );
    }
    assert!(
        origin
            .seen()
            .iter()
            .all(|r| !r.request_line().contains("/slow")),
        "no trickled head reached the origin"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.stats.connections() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the proxy");
    fds.assert_back("slowloris").await;
}

/// Writes `chunk` to `s` until a write makes no progress for `stall` (the peer stopped
/// taking bytes, all the way back); returns how many bytes got through.
async fn push_until_stalled(s: &mut TcpStream, stall: Duration, limit: u64) -> u64 {
    let chunk = vec![b'x'; 64 * 1024];
    let mut total = 0u64;
    while total < limit {
        // `write`, not `write_all`: a write cut off by the timeout must not have sent bytes
        // this count does not know about.
        match tokio::time::timeout(stall, s.write(&chunk)).await {
            Ok(Ok(n)) => total += n as u64,
            Ok(Err(e)) => panic!("write failed after {total} bytes: {e}"),
            Err(_) => break,
        }
    }
    total
}

/// Backpressure, both ways: a reader that stops reading stops the writer on the far side once
/// the proxy's bounded queue and the kernels' socket buffers are full — the proxy does not
/// buffer what it cannot deliver. Measured by what the writer got through (something the test
/// owns), not by process RSS: at most 32 MiB of a 1 GiB push.
async fn backpressure_stops_the_writer_both_ways(rt: Runtime) {
    const BOUND: u64 = 32 * 1024 * 1024;
    const PUSH: u64 = 1024 * 1024 * 1024;
    warm_up(rt).await;
    let fds = Fds::now();
    // A raw upstream: it answers the upgrade with a genuine 101, then writes until stalled.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = listener.local_addr().expect("address");
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read head");
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head);
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key")
            .trim()
            .to_owned();
        let accept = proxy_core::websocket_accept(key.as_bytes());
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            String::from_utf8_lossy(&accept)
        );
        s.write_all(reply.as_bytes()).await.expect("101");
        // Upstream to client: the client reads nothing yet.
        let through = push_until_stalled(&mut s, Duration::from_secs(1), PUSH).await;
        (s, through)
    });
    let proxy = start_proxy(rt, config_for(&[upstream_addr]));
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(
            b"GET /bp HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("upgrade request");
    let (mut up, down_through) = upstream.await.expect("upstream task");
    assert!(
        down_through < BOUND,
        "the upstream pushed {down_through} bytes at a client that reads nothing"
    );
    // Client to upstream, with the upstream not reading.
    let up_through = push_until_stalled(&mut client, Duration::from_secs(1), PUSH).await;
    assert!(
        up_through < BOUND,
        "the client pushed {up_through} bytes at an upstream that reads nothing"
    );
    // Nothing was lost: the client now reads everything the upstream sent (after the 101).
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        let mut head_done = false;
        let mut pending = Vec::new();
        while got < down_through {
            let n = tokio::time::timeout(WAIT, client.read(&mut buf))
                .await
                .expect("data within WAIT")
                .expect("read");
            assert!(n > 0, "closed after {got} bytes");
            if head_done {
                got += n as u64;
            } else {
                pending.extend_from_slice(&buf[..n]);
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    head_done = true;
                    got += (pending.len() - i - 4) as u64;
                }
            }
        }
        got
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < up_through {
        let n = tokio::time::timeout(WAIT, up.read(&mut buf))
            .await
            .expect("data within WAIT")
            .expect("read");
        assert!(n > 0, "closed after {got} bytes");
        got += n as u64;
    }
    assert_eq!(got, up_through);
    assert_eq!(reader.await.expect("reader"), down_through);
    drop(up);
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the proxy");
    fds.assert_back("backpressure").await;
}

/// Closes `s` with a reset (SO_LINGER 0), as a crashed peer does.
fn reset(s: TcpStream) {
    let std = s.into_std().expect("a std stream");
    let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
    drop(std);
}

/// Reads a request head from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("a head within WAIT")
            .expect("read");
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.expect("write");
}

/// The 101 for a request head with the RFC 6455 sample key.
fn switch_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap_or("")
        .trim();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(&proxy_core::websocket_accept(key.as_bytes()))
    )
}

const UPGRADE: &str = "GET /t HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// What the upstream does once it has the request.
#[derive(Clone, Copy, Debug)]
enum UpstreamFault {
    ResetInHead,
    ClosedMidBodyLength,
    ClosedMidBodyChunked,
    ResetRightAfter101,
    ResetMidTunnel,
    NeverAnswers,
}

/// A fault at every stage: each gets its answer or close and a logged reason, leaves no
/// connection or task behind, and the proxy goes on serving.
async fn faults_at_every_stage_are_contained(rt: Runtime) {
    use proxy_core::CloseReason;
    use UpstreamFault::*;
    let cases: [(UpstreamFault, &str, &str); 6] = [
        (
            ResetInHead,
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 502 ",
        ),
        (
            ClosedMidBodyLength,
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 200 ",
        ),
        (
            ClosedMidBodyChunked,
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 200 ",
        ),
        (ResetRightAfter101, UPGRADE, "HTTP/1.1 101 "),
        (ResetMidTunnel, UPGRADE, "HTTP/1.1 101 "),
        (
            NeverAnswers,
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 504 ",
        ),
    ];
    warm_up(rt).await;
    for (fault, request, answer) in cases {
        let fds = Fds::now();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let head = read_head(&mut s).await;
            match fault {
                ResetInHead => {
                    send(&mut s, b"HTTP/1.1 200 OK\r\nContent-").await;
                    reset(s);
                }
                ClosedMidBodyLength => {
                    send(&mut s, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc").await;
                }
                ClosedMidBodyChunked => {
                    send(
                        &mut s,
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                    )
                    .await;
                }
                ResetRightAfter101 => {
                    send(&mut s, switch_for(&head).as_bytes()).await;
                    reset(s);
                }
                ResetMidTunnel => {
                    send(&mut s, switch_for(&head).as_bytes()).await;
                    send(&mut s, b"\x82\x03abc").await;
                    reset(s);
                }
                NeverAnswers => {
                    // Holds the connection, silent, until the proxy gives up on it.
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
                }
            }
        });
        let mut config = config_for(&[addr]);
        config.timeouts.read = Duration::from_millis(300);
        let proxy = start_proxy(rt, config);
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(request.as_bytes()).await.expect("request");
        let mut got = Vec::new();
        // The proxy ends the client connection in every case (the tunnel ones once the
        // upstream is gone and the client, which has nothing to say, closes too).
        let read = tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 4096];
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{fault:?}: the client connection did not end");
        let text = String::from_utf8_lossy(&got).into_owned();
        // A response (or tunnel) that breaks after it started can only be cut off; what was
        // relayed may or may not have been written out before the close, depending on whether
        // the fault came in the same read.
        let cut_off = !matches!(fault, ResetInHead | NeverAnswers);
        assert!(
            text.starts_with(answer) || (cut_off && text.is_empty()),
            "{fault:?}: {text:?}"
        );
        drop(client);
        upstream.await.expect("upstream task");
        let events = {
            let events = Arc::clone(&proxy.events);
            tokio::task::spawn_blocking(move || events.wait_for(1))
                .await
                .expect("events")
        };
        let close = events[0].close.clone();
        let expected = match fault {
            ResetInHead | ResetRightAfter101 | ResetMidTunnel => {
                matches!(
                    close,
                    Some(
                        CloseReason::UpstreamReset
                            | CloseReason::UpstreamClosed
                            | CloseReason::BadResponse(_)
                    )
                )
            }
            ClosedMidBodyLength | ClosedMidBodyChunked => {
                matches!(close, Some(CloseReason::UpstreamClosed))
            }
            NeverAnswers => matches!(close, Some(CloseReason::Timeout(_))),
        };
        assert!(expected, "{fault:?}: logged {close:?}");
        let deadline = tokio::time::Instant::now() + WAIT;
        while proxy.stats.connections() != 0 || proxy.stats.tasks() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{fault:?}: {} connections and {} tasks left",
                proxy.stats.connections(),
                proxy.stats.tasks()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fds.assert_only_listener(&format!("{fault:?}")).await;
        tokio::task::spawn_blocking(move || proxy.stop())
            .await
            .expect("stop the proxy");
        fds.assert_back(&format!("{fault:?}")).await;
    }
}

/// Client resets in the request body, in the response and in a tunnel: each is logged as a
/// client reset, the upstream connection is closed (never pooled half-used), and nothing is
/// left behind.
async fn client_resets_are_contained(rt: Runtime) {
    use proxy_core::CloseReason;
    warm_up(rt).await;
    for stage in ["request body", "response", "tunnel"] {
        let fds = Fds::now();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (got_head, head_arrived) = tokio::sync::oneshot::channel::<()>();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let head = read_head(&mut s).await;
            let _ = got_head.send(());
            if head.starts_with("GET /t ") {
                send(&mut s, switch_for(&head).as_bytes()).await;
            } else if head.starts_with("GET ") {
                send(
                    &mut s,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n",
                )
                .await;
                let chunk = vec![b'x'; 64 * 1024];
                // Until the proxy drops this connection after the client's reset.
                while s.write_all(&chunk).await.is_ok() {}
                return;
            }
            // Wait for the proxy to close this side after the client's reset.
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) = tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
            }
        });
        let proxy = start_proxy(rt, config_for(&[addr]));
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        match stage {
            "request body" => {
                send(
                    &mut client,
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789",
                )
                .await;
            }
            "response" => {
                send(&mut client, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
                let mut buf = [0u8; 1024];
                let n = client.read(&mut buf).await.expect("the response starts");
                assert!(buf[..n].starts_with(b"HTTP/1.1 200 "), "{stage}");
            }
            _ => {
                send(&mut client, UPGRADE.as_bytes()).await;
                let mut buf = [0u8; 1024];
                let n = client.read(&mut buf).await.expect("the 101");
                assert!(buf[..n].starts_with(b"HTTP/1.1 101 "), "{stage}");
            }
        }
        // The reset comes once the request reached the upstream (an exchange is under way).
        tokio::time::timeout(WAIT, head_arrived)
            .await
            .expect("the head reached the upstream")
            .expect("the upstream task");
        reset(client);
        let events = {
            let events = Arc::clone(&proxy.events);
            tokio::task::spawn_blocking(move || events.wait_for(1))
                .await
                .expect("events")
        };
        assert_eq!(
            events[0].close,
            Some(CloseReason::ClientReset),
            "{stage}: {:?}",
            events[0]
        );
        tokio::time::timeout(WAIT, upstream)
            .await
            .expect("the upstream connection was closed")
            .expect("upstream task");
        let deadline = tokio::time::Instant::now() + WAIT;
        while proxy.stats.connections() != 0
            || proxy.stats.tasks() != 2
            || proxy.stats.pooled() != 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{stage}: left behind"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fds.assert_only_listener(stage).await;
        tokio::task::spawn_blocking(move || proxy.stop())
            .await
            .expect("stop the proxy");
        fds.assert_back(stage).await;
    }
}
