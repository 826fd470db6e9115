//! Peers that misbehave slowly, on every runtime: a slowloris crowd trickling request heads
//! does not keep anyone else waiting, and each of them is answered 408 at its deadline; a
//! reader that stops reading stops the writer on the far side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_tests::origin::{http_origin, SeenRequest};
use switchyard_tests::{config_for, runtime_tests, start_proxy, Runtime, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

runtime_tests! {
    slowloris_is_cut_off_and_starves_no_one,
    backpressure_stops_the_writer_both_ways,
    faults_at_every_stage_are_contained,
    client_resets_are_contained,
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
    for (fault, request, answer) in cases {
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
        tokio::task::spawn_blocking(move || proxy.stop())
            .await
            .expect("stop the proxy");
    }
}

/// Client resets in the request body, in the response and in a tunnel: each is logged as a
/// client reset, the upstream connection is closed (never pooled half-used), and nothing is
/// left behind.
async fn client_resets_are_contained(rt: Runtime) {
    use proxy_core::CloseReason;
    for stage in ["request body", "response", "tunnel"] {
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
        tokio::task::spawn_blocking(move || proxy.stop())
            .await
            .expect("stop the proxy");
    }
}
