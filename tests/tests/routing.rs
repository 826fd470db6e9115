//! Routing and upstream groups end to end, on every runtime: virtual hosts and locations send
//! requests and upgrades to their groups, least-connections spreads held WebSockets, backups
//! serve only when the primaries are down, and a 404 when nothing matches.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use proxy_core::{
    BalanceMethod, Config, PathMatch, Peer, Route, ServerName, UpstreamGroup, UpstreamServer,
    VirtualHost,
};
use switchyard_tests::origin::{http_fixed, ws_echo};
use switchyard_tests::{
    refusing_port, runtime_tests, start_proxy, start_proxy_with, ProxyHandle, ProxyOptions,
    Runtime, WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

runtime_tests! {
    hosts_and_locations_route_to_their_groups,
    least_conn_spreads_held_websockets,
    hash_by_room_and_ip_hash_keep_websockets_together,
    backup_serves_only_when_primaries_are_down,
    proxy_protocol_sets_the_client_address,
    a_changing_dns_answer_is_followed,
    health_checks_take_a_server_out_and_back,
}

fn peer(a: SocketAddr) -> Peer {
    Peer::new(&a.ip().to_string(), a.port())
}

fn group(name: &str, addrs: &[SocketAddr]) -> UpstreamGroup {
    UpstreamGroup::new(addrs.iter().copied().map(peer).collect()).named(name)
}

fn route(path: &str, group: &str) -> Route {
    Route::new(PathMatch::parse(path).expect("a valid path"), group)
}

fn host(names: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost::new(
        names
            .iter()
            .map(|n| ServerName::parse(n).expect("a valid name"))
            .collect(),
        routes,
    )
}

/// One request on its own connection; the whole response as text.
async fn get(proxy: SocketAddr, host: &str, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    String::from_utf8_lossy(&exchange(proxy, request.as_bytes()).await).into_owned()
}

/// Writes `bytes` on a new connection and reads until the proxy closes it (bounded by WAIT).
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    s.write_all(bytes).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("a response within WAIT")
        .expect("read");
    out
}

/// A WebSocket through the proxy with one echoed message; left open.
async fn ws(
    proxy: &ProxyHandle,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let (mut ws, resp) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(proxy.ws_url(path)))
            .await
            .expect("the handshake within WAIT")
            .expect("a genuine 101 through the proxy");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.expect("send");
    let echo = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the echo within WAIT");
    assert!(matches!(echo, Some(Ok(Message::Text(t))) if t.as_str() == "hello"));
    ws
}

async fn close<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.close(None).await.expect("send the close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
}

/// The upstream port each finished tunnel or exchange in `events` went to.
fn ports(proxy: &ProxyHandle, n: usize) -> Vec<u16> {
    proxy
        .events
        .wait_for(n)
        .iter()
        .filter_map(|e| e.upstream.as_ref().map(Peer::port))
        .collect()
}

/// example.test: `/` to web, `/ws/` to the echo servers (prefix stripped), `= /api` to api;
/// api.test: everything to api; nothing else is served (no default server: the first takes
/// unknown hosts).
async fn hosts_and_locations_route_to_their_groups(rt: Runtime) {
    let web = http_fixed("web").await;
    let api = http_fixed("api").await;
    let echo = ws_echo().await;
    let mut config = Config::new(UpstreamGroup::new(Vec::new()));
    config.groups = vec![
        group("web", &[web]),
        group("api", &[api]),
        group("chat", &[echo]),
    ];
    let mut chat = route("/ws/", "chat");
    chat.strip_prefix = true;
    config.virtual_hosts = vec![
        host(
            &["example.test"],
            vec![route("/", "web"), chat, route("= /api", "api")],
        ),
        host(&["api.test", "*.api.test"], vec![route("/v1/", "api")]),
    ];
    let proxy = start_proxy(rt, config);
    let cases = [
        ("example.test", "/", "web"),
        ("example.test", "/page", "web"),
        ("example.test", "/api", "api"),
        ("example.test", "/api/more", "web"),
        ("eu.api.test", "/v1/x", "api"),
        ("other.test", "/", "web"),
    ];
    for (host, path, body) in cases {
        let out = get(proxy.addr, host, path).await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with(body),
            "{host}{path}: {out}"
        );
    }
    let out = get(proxy.addr, "api.test", "/v2/x").await;
    assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
    let socket = ws(&proxy, "/ws/room").await;
    close(socket).await;
    let events = proxy.events.wait_for(cases.len() + 2);
    let tunnel = events
        .iter()
        .find(|e| e.upgraded)
        .expect("the tunnel's event");
    assert_eq!(tunnel.upstream.as_ref().map(Peer::port), Some(echo.port()));
    proxy.stop();
}

/// Eight WebSockets held open at once on a least-connections group of two: four each.
async fn least_conn_spreads_held_websockets(rt: Runtime) {
    let (a, b) = (ws_echo().await, ws_echo().await);
    let config =
        Config::new(UpstreamGroup::new(vec![peer(a), peer(b)]).method(BalanceMethod::LeastConn));
    let proxy = start_proxy(rt, config);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(ws(&proxy, "/").await);
    }
    for socket in held {
        close(socket).await;
    }
    let ports = ports(&proxy, 8);
    let on_a = ports.iter().filter(|p| **p == a.port()).count();
    assert_eq!((on_a, ports.len() - on_a), (4, 4), "{ports:?}");
    proxy.stop();
}

/// Consistent hash on `$arg_room`: every connection of one room reaches the same server, and
/// rooms spread over the group; IP hash sends one client (here, every test connection comes
/// from 127.0.0.1) to one server.
async fn hash_by_room_and_ip_hash_keep_websockets_together(rt: Runtime) {
    let echoes = [ws_echo().await, ws_echo().await, ws_echo().await];
    let servers: Vec<Peer> = echoes.iter().copied().map(peer).collect();
    let key = proxy_core::HashKey::parse("$arg_room").expect("a key");
    let config = Config::new(UpstreamGroup::new(servers.clone()).method(BalanceMethod::Hash(key)));
    let proxy = start_proxy(rt, config);
    let rooms = 12;
    for room in 0..rooms {
        for _ in 0..3 {
            close(ws(&proxy, &format!("/chat?room={room}")).await).await;
        }
    }
    // Grouped by the request line each tunnel's event carries, not by arrival order.
    let mut by_room = std::collections::BTreeMap::<String, Vec<u16>>::new();
    for e in proxy.events.wait_for(rooms * 3) {
        let port = e.upstream.as_ref().map(Peer::port).expect("an upstream");
        by_room
            .entry(e.request_line.clone())
            .or_default()
            .push(port);
    }
    assert_eq!(by_room.len(), rooms);
    for (room, same) in &by_room {
        assert!(same.iter().all(|p| *p == same[0]), "{room}: {same:?}");
    }
    let mut used: Vec<u16> = by_room.values().map(|v| v[0]).collect();
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() >= 2,
        "12 rooms on one server of three: {by_room:?}"
    );
    proxy.stop();

    let config = Config::new(UpstreamGroup::new(servers).method(BalanceMethod::IpHash));
    let proxy = start_proxy(rt, config);
    for _ in 0..5 {
        close(ws(&proxy, "/").await).await;
    }
    let by_ip = ports(&proxy, 5);
    assert!(by_ip.iter().all(|p| *p == by_ip[0]), "{by_ip:?}");
    proxy.stop();
}

/// A backup server is used only while the primary cannot be reached.
async fn backup_serves_only_when_primaries_are_down(rt: Runtime) {
    let primary = http_fixed("primary").await;
    let backup = http_fixed("backup").await;
    let config = Config::new(UpstreamGroup::with_servers(vec![
        UpstreamServer::new(peer(primary)),
        UpstreamServer::new(peer(backup)).backup(),
    ]));
    let proxy = start_proxy(rt, config);
    for _ in 0..4 {
        assert!(get(proxy.addr, "x", "/").await.ends_with("primary"));
    }
    proxy.stop();

    let dead = refusing_port();
    let config = Config::new(UpstreamGroup::with_servers(vec![
        UpstreamServer::new(peer(dead.addr)),
        UpstreamServer::new(peer(backup)).backup(),
    ]));
    let proxy = start_proxy(rt, config);
    for _ in 0..4 {
        assert!(get(proxy.addr, "x", "/").await.ends_with("backup"));
    }
    proxy.stop();
}

/// Behind an L4 balancer: the PROXY header's address is the client's (in `X-Forwarded-For`),
/// and a connection without the header gets no answer at all.
async fn proxy_protocol_sets_the_client_address(rt: Runtime) {
    let origin = switchyard_tests::origin::http_origin(std::sync::Arc::new(
        |_req: &switchyard_tests::origin::SeenRequest| {
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
        },
    ))
    .await;
    let mut config = Config::new(UpstreamGroup::new(vec![peer(origin.addr)]));
    config.proxy_protocol = Some(proxy_core::ProxyProtocol::new(vec![
        proxy_core::IpNet::parse("127.0.0.1").expect("a network"),
    ]));
    let proxy = start_proxy(rt, config);
    let out = exchange(
        proxy.addr,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.ends_with(b"\r\n\r\nok"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let seen = origin.seen();
    assert_eq!(seen[0].header("x-forwarded-for"), Some("203.0.113.9"));

    let out = get(proxy.addr, "x", "/").await;
    assert!(out.is_empty(), "no header, no answer: {out:?}");
    assert_eq!(origin.seen().len(), 1, "nothing reached the origin");
    proxy.stop();
}

/// An upstream given by name follows its DNS answer: the name moves from one origin to
/// another (127.0.0.1 -> 127.0.0.2, same port) and requests follow; a lookup that fails keeps
/// the last good address. The resolver is a test seam: no DNS traffic.
async fn a_changing_dns_answer_is_followed(rt: Runtime) {
    let a = http_fixed("A").await;
    let b_listener = tokio::net::TcpListener::bind(("127.0.0.2", a.port()))
        .await
        .or(tokio::net::TcpListener::bind("127.0.0.2:0").await)
        .expect("a loopback listener on 127.0.0.2");
    // The port must match A's: the peer's port is part of the configuration, not of DNS.
    assert_eq!(
        b_listener.local_addr().expect("addr").port(),
        a.port(),
        "port {} taken on 127.0.0.2",
        a.port()
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = b_listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nB",
                    )
                    .await;
            });
        }
    });
    let answer: std::sync::Arc<std::sync::Mutex<std::io::Result<Vec<SocketAddr>>>> =
        std::sync::Arc::new(std::sync::Mutex::new(Ok(vec![a])));
    let seam = std::sync::Arc::clone(&answer);
    let resolver = move |host: &str, port: u16| -> std::io::Result<Vec<SocketAddr>> {
        assert_eq!(host, "backend.test");
        let current = seam.lock().expect("answer lock");
        match &*current {
            Ok(addrs) => Ok(addrs
                .iter()
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    };
    let opts = ProxyOptions {
        resolver: Some(std::sync::Arc::new(resolver)),
        dns_refresh: std::time::Duration::from_millis(20),
        pool_max_per_peer: 0,
        ..ProxyOptions::default()
    };
    let config = Config::new(UpstreamGroup::new(vec![Peer::new(
        "backend.test",
        a.port(),
    )]));
    let proxy = start_proxy_with(rt, config, opts);
    assert!(get(proxy.addr, "x", "/").await.ends_with("A"));

    // The name now points elsewhere: within a few refreshes, requests go there.
    let b: SocketAddr = ([127, 0, 0, 2], a.port()).into();
    *answer.lock().expect("answer lock") = Ok(vec![b]);
    assert!(
        until_body(&proxy, "B").await,
        "the new address was never used"
    );

    // The resolver fails: the last good address (B) stays in use.
    *answer.lock().expect("answer lock") = Err(std::io::Error::other("SERVFAIL"));
    for _ in 0..5 {
        assert!(get(proxy.addr, "x", "/").await.ends_with("B"));
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    proxy.stop();
}

/// Sends requests until one is answered with `body` (bounded by WAIT).
async fn until_body(proxy: &ProxyHandle, body: &str) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if get(proxy.addr, "x", "/").await.ends_with(body) {
            return true;
        }
        // The refresh runs in the background on its own clock; there is no event to await.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// An origin answering `name` on every path, and its health check path with 200 or 503 as
/// `healthy` says.
async fn checked_origin(
    name: &'static str,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    let origin = switchyard_tests::origin::http_origin(std::sync::Arc::new(
        move |req: &switchyard_tests::origin::SeenRequest| {
            let check = req.request_line().starts_with("GET /healthz ");
            let status = if check && !healthy.load(std::sync::atomic::Ordering::SeqCst) {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            Some(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{name}",
                    name.len()
                )
                .into_bytes(),
            )
        },
    ))
    .await;
    origin.addr
}

/// An HTTP health check marks a server that answers 503 down (requests avoid it) and brings it
/// back once it answers 200 again.
async fn health_checks_take_a_server_out_and_back(rt: Runtime) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let a_healthy = std::sync::Arc::new(AtomicBool::new(false));
    let a = checked_origin("A", std::sync::Arc::clone(&a_healthy)).await;
    let b = checked_origin("B", std::sync::Arc::new(AtomicBool::new(true))).await;
    let mut check = proxy_core::health::HealthCheck::new(proxy_core::health::HealthKind::Http {
        path: "/healthz".into(),
        expect: 200..=299,
    });
    check.interval = std::time::Duration::from_millis(20);
    check.fails = 1;
    check.passes = 1;
    let mut group = UpstreamGroup::new(vec![peer(a), peer(b)]);
    group.health = Some(check);
    let proxy = start_proxy(rt, Config::new(group));
    // A fails its checks: within a few intervals, every request goes to B.
    assert!(until_streak(&proxy, "B", 6).await, "A was never taken out");
    // A recovers: it gets requests again.
    a_healthy.store(true, Ordering::SeqCst);
    assert!(until_body(&proxy, "A").await, "A never came back");
    proxy.stop();
}

/// Sends requests until `n` in a row are answered with `body` (bounded by WAIT).
async fn until_streak(proxy: &ProxyHandle, body: &str, n: usize) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut streak = 0;
    while tokio::time::Instant::now() < deadline {
        if get(proxy.addr, "x", "/").await.ends_with(body) {
            streak += 1;
            if streak == n {
                return true;
            }
        } else {
            streak = 0;
            // The next check runs on its own clock; there is no event to await.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    false
}
