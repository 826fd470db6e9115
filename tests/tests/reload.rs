//! Reloading a running proxy on every runtime: connections accepted afterwards get the new
//! configuration, tunnels opened before keep theirs and go on echoing, and listeners are
//! opened and closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchyard_tests::{
    config_for, runtime_tests, start_proxy, start_proxy_with, ProxyOptions, Runtime, WAIT,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{accept_async, connect_async, MaybeTlsStream, WebSocketStream};

runtime_tests! {
    reload_switches_new_connections_and_keeps_open_tunnels,
    reload_opens_and_closes_listeners,
    connection_limits_refuse_at_accept_and_recover,
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket echo that tags each reply with `name`, so a test can tell the upstreams apart.
async fn tagged_echo(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws.send(Message::text(format!("{name}:{t}"))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn client(addr: SocketAddr) -> Client {
    let (ws, _) = tokio::time::timeout(WAIT, connect_async(format!("ws://{addr}/r")))
        .await
        .expect("handshake within WAIT")
        .expect("handshake");
    ws
}

async fn ask(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send");
    match tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("reply within WAIT")
    {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text reply, got {other:?}"),
    }
}

/// Asks a fresh connection until the answer comes from `tag` (a reload is applied by the
/// server's own task, a moment after it is handed over); bounded by WAIT.
async fn until_served_by(addr: SocketAddr, tag: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut ws = client(addr).await;
        let answer = ask(&mut ws, "who").await;
        let _ = ws.close(None).await;
        if answer.starts_with(tag) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still served by the old upstream: {answer}"
        );
        tokio::task::yield_now().await;
    }
}

async fn reload_switches_new_connections_and_keeps_open_tunnels(rt: Runtime) {
    let (a, b) = (tagged_echo("A").await, tagged_echo("B").await);
    let proxy = start_proxy(rt, config_for(&[a]));
    let mut before = client(proxy.addr).await;
    assert_eq!(ask(&mut before, "one").await, "A:one");

    proxy.reload(proxy_tokio::Reload::new(Arc::new(config_for(&[b]))));
    until_served_by(proxy.addr, "B:").await;
    // The tunnel opened before the reload keeps its upstream and its configuration.
    assert_eq!(ask(&mut before, "two").await, "A:two");
    let mut after = client(proxy.addr).await;
    assert_eq!(ask(&mut after, "three").await, "B:three");
    let _ = before.close(None).await;
    let _ = after.close(None).await;
    drop((before, after));
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the proxy");
}

async fn reload_opens_and_closes_listeners(rt: Runtime) {
    let a = tagged_echo("A").await;
    let proxy = start_proxy(rt, config_for(&[a]));
    let old = proxy.addr;
    let added = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a second listener");
    let new = added.local_addr().expect("its address");
    let mut reload = proxy_tokio::Reload::new(Arc::new(config_for(&[a])));
    reload.add.push(added);
    reload.remove.push(old);
    proxy.reload(reload);
    let mut ws = client(new).await;
    assert_eq!(ask(&mut ws, "new").await, "A:new");
    // The old port stops accepting: once its accept loop has gone, connects are refused.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpStream::connect(old).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{old} still accepts after its removal"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The connection accepted on the new listener is unaffected.
    assert_eq!(ask(&mut ws, "still").await, "A:still");
    let _ = ws.close(None).await;
    drop(ws);
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the proxy");
}

/// Reads from a fresh connection: true if the proxy closed it without a byte (a refusal).
async fn refused(addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt as _;
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Waits (bounded) until `done`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within WAIT");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `max_connections` and `max_connections_per_ip` (every test client is 127.0.0.1): a
/// connection over a limit is closed at accept and counted, and a slot that frees up admits
/// the next one.
async fn connection_limits_refuse_at_accept_and_recover(rt: Runtime) {
    let a = tagged_echo("A").await;
    for (total, per_ip) in [(2, 0), (0, 2)] {
        let opts = ProxyOptions {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ProxyOptions::default()
        };
        let proxy = start_proxy_with(rt, config_for(&[a]), opts);
        let mut first = client(proxy.addr).await;
        let mut second = client(proxy.addr).await;
        assert_eq!(ask(&mut first, "1").await, "A:1");
        assert_eq!(ask(&mut second, "2").await, "A:2");
        assert!(refused(proxy.addr).await, "a third connection is refused");
        assert_eq!(proxy.stats.refused(), 1);
        // The open tunnels are untouched.
        assert_eq!(ask(&mut first, "3").await, "A:3");
        let _ = first.close(None).await;
        drop(first);
        until("the first connection closed", || {
            proxy.stats.connections() == 1
        })
        .await;
        let mut third = client(proxy.addr).await;
        assert_eq!(ask(&mut third, "4").await, "A:4");
        let _ = second.close(None).await;
        let _ = third.close(None).await;
        drop((second, third));
        tokio::task::spawn_blocking(move || proxy.stop())
            .await
            .expect("stop the proxy");
    }
}
