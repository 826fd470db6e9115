//! Soak: one proxy serves 20,000 short connections (half HTTP, half WebSocket), and afterwards
//! holds what it held after warm-up — within 16 MiB of RSS, the same file descriptors, the same
//! tasks. A proxy runs for months; any structure that grows with connections ever served
//! (rather than connections open) fails here.
//!
//! The proxy runs in this test process, so RSS and descriptors are the process's. The
//! scenarios in this file therefore run one at a time (a lock), and the peers keep nothing per
//! connection either: the HTTP origin records nothing and the event sink is off. CPU per request
//! after such a run is measured by the comparison in `benches/`, not here: no timing is
//! asserted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use switchyard_tests::origin::{http_fixed, ws_echo};
use switchyard_tests::{
    config_for, runtime_tests, start_proxy_with, ProxyHandle, ProxyOptions, Runtime, WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

runtime_tests! {
    twenty_thousand_connections_leave_nothing_behind,
}

/// Connections per kind (HTTP, WebSocket) in the measured run.
const PER_KIND: usize = 10_000;
/// Connections per kind before the baseline is taken: allocator arenas, thread-local buffers
/// and the runtime's slabs reach their working size here.
const WARM_UP_PER_KIND: usize = 1_000;
/// Clients at once.
const CONCURRENCY: usize = 16;
/// How much RSS may differ from the post-warm-up level.
const RSS_SLACK: u64 = 16 * 1024 * 1024;
/// Tasks a serving proxy runs with no connection open: one accept loop and the pool reaper.
const IDLE_TASKS: usize = 2;

/// One scenario at a time: they measure the whole process.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn twenty_thousand_connections_leave_nothing_behind(rt: Runtime) {
    let _one_at_a_time = EXCLUSIVE.lock().await;
    let echo = ws_echo().await;
    let origin = http_fixed("hello").await;
    let opts = ProxyOptions {
        record_events: false,
        // Short, so that pooled upstream connections are reaped before each measurement.
        pool_idle_timeout: Duration::from_millis(400),
        ..ProxyOptions::default()
    };
    // Two proxies, one per upstream kind: the process holds both, as it holds the peers.
    let http_proxy = start_proxy_with(rt, config_for(&[origin]), opts.clone());
    let ws_proxy = start_proxy_with(rt, config_for(&[echo]), opts);

    load(&http_proxy, &ws_proxy, WARM_UP_PER_KIND).await;
    let baseline = settle(&[&http_proxy, &ws_proxy], None).await;

    load(&http_proxy, &ws_proxy, PER_KIND).await;
    let after = settle(&[&http_proxy, &ws_proxy], Some(&baseline)).await;

    let served = http_proxy.stats.accepted() + ws_proxy.stats.accepted();
    assert_eq!(
        served,
        2 * (WARM_UP_PER_KIND + PER_KIND) as u64,
        "every connection reached the proxy"
    );
    assert!(
        after.rss <= baseline.rss + RSS_SLACK,
        "RSS grew from {} KiB after warm-up to {} KiB after {} more connections",
        baseline.rss / 1024,
        after.rss / 1024,
        2 * PER_KIND
    );
    assert!(
        after.fds <= baseline.fds,
        "file descriptors back to baseline: {} after warm-up, {} now",
        baseline.fds,
        after.fds
    );
    http_proxy.stop();
    ws_proxy.stop();
}

/// Runs `per_kind` HTTP requests, each on its own connection, and `per_kind` WebSocket
/// sessions (handshake, one echoed message, close), `CONCURRENCY` at a time.
async fn load(http: &ProxyHandle, ws: &ProxyHandle, per_kind: usize) {
    let (http_addr, ws_url) = (http.addr, ws.ws_url("/soak"));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        let ws_url = ws_url.clone();
        workers.spawn(async move {
            for i in (w..per_kind).step_by(CONCURRENCY) {
                http_once(http_addr).await;
                ws_once(&ws_url, i).await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("a load worker panicked");
    }
}

async fn http_once(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    s.write_all(b"GET /soak HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = Vec::with_capacity(256);
    tokio::time::timeout(WAIT, s.read_to_end(&mut response))
        .await
        .expect("the response within WAIT")
        .expect("read the response");
    assert!(
        response.starts_with(b"HTTP/1.1 200 OK\r\n") && response.ends_with(b"\r\n\r\nhello"),
        "unexpected response {:?}",
        String::from_utf8_lossy(&response)
    );
}

async fn ws_once(url: &str, i: usize) {
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("the handshake within WAIT")
        .expect("the handshake through the proxy");
    let text = format!("soak {i}");
    ws.send(Message::text(text.clone())).await.expect("send");
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the echo within WAIT");
    match echoed {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
        other => panic!("expected the echo, got {other:?}"),
    }
    ws.close(None).await.expect("send the close");
    // Read until the closing handshake and the TCP close are through.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
}

/// What the process holds when the proxies are idle.
#[derive(Debug)]
struct Level {
    rss: u64,
    fds: usize,
}

/// Waits (bounded) until both proxies have no connection, no pooled connection and only their
/// idle tasks, and the descriptors have come back to `target` (or stopped changing, for the
/// baseline); then reads the level.
async fn settle(proxies: &[&ProxyHandle], target: Option<&Level>) -> Level {
    let deadline = Instant::now() + WAIT;
    let mut last_fds = usize::MAX;
    loop {
        let idle = proxies.iter().all(|p| {
            p.stats.connections() == 0 && p.stats.pooled() == 0 && p.stats.tasks() == IDLE_TASKS
        });
        let fds = open_fds();
        let fds_settled = match target {
            Some(t) => fds <= t.fds,
            None => fds == last_fds,
        };
        if idle && fds_settled {
            return Level { rss: rss(), fds };
        }
        assert!(
            Instant::now() < deadline,
            "the proxies did not return to idle within {WAIT:?}: {:?}, fds {fds} (target {:?})",
            proxies
                .iter()
                .map(|p| (p.stats.connections(), p.stats.pooled(), p.stats.tasks()))
                .collect::<Vec<_>>(),
            target.map(|t| t.fds)
        );
        last_fds = fds;
        // Polling a gauge that has no event to await; bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}
