//! Clients that misbehave slowly, on every runtime: a slowloris crowd trickling request heads
//! does not keep anyone else waiting, and each of them is answered 408 at its deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_tests::origin::{http_origin, SeenRequest};
use switchyard_tests::{config_for, runtime_tests, start_proxy, Runtime, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

runtime_tests! {
    slowloris_is_cut_off_and_starves_no_one,
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
    let origin = http_origin(Arc::new(|_: &SeenRequest| {
        Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    }))
    .await;
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
}
