//! Routing inside the session: virtual hosts by `Host`, routes by path, per-route settings, the
//! upstream group a route names, prefix stripping, and 404 when nothing matches.

mod sim;

use std::time::Duration;

use proxy_core::{
    CloseReason, Config, HostPolicy, PathMatch, Peer, RequestError, Route, ServerName, Timeouts,
    UpstreamGroup, VirtualHost,
};
use sim::{Sim, WS_ACCEPT};

fn route(path: &str, group: &str) -> Route {
    Route::new(PathMatch::parse(path).expect("a valid path"), group)
}

fn names(list: &[&str]) -> Vec<ServerName> {
    list.iter()
        .map(|n| ServerName::parse(n).expect("a valid name"))
        .collect()
}

fn group(name: &str, port: u16) -> UpstreamGroup {
    UpstreamGroup::new(vec![Peer::new("10.0.0.1", port)]).named(name)
}

/// example.com: `/` to `web`, `/ws/` to `chat` (stripped, websocket only, long tunnels),
/// `= /health` to `default`; *.api.test: everything to `api`, with a literal Host and a 10-byte
/// body limit; no default server.
fn config() -> Config {
    let mut c = Config::new(UpstreamGroup::new(vec![Peer::new("10.0.0.1", 9000)]));
    c.groups = vec![group("web", 9001), group("chat", 9002), group("api", 9003)];
    let mut ws = route("/ws/", "chat");
    ws.strip_prefix = true;
    let mut t = Timeouts::default();
    t.tunnel_idle = Duration::from_secs(7);
    ws.settings.timeouts = Some(t);
    let mut web = route("/", "web");
    web.settings.upgrade_protocols = Some(Vec::new());
    let mut api = route("/", "api");
    api.settings.host = Some(HostPolicy::Literal("api.internal".into()));
    api.settings.max_body = Some(10);
    c.virtual_hosts = vec![
        VirtualHost::new(
            names(&["example.com"]),
            vec![web, ws, route("= /health", "default")],
        ),
        VirtualHost::new(names(&["*.api.test"]), vec![api]),
    ];
    c.validate().expect("a valid routing config");
    c
}

fn get(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

#[test]
fn hosts_and_paths_pick_the_group() {
    let cases = [
        ("example.com", "/", "10.0.0.1:9001"),
        ("example.com", "/index.html", "10.0.0.1:9001"),
        ("EXAMPLE.com:80", "/ws/room", "10.0.0.1:9002"),
        ("example.com", "/health", "10.0.0.1:9000"),
        ("example.com", "/health/x", "10.0.0.1:9001"),
        ("v1.api.test", "/anything", "10.0.0.1:9003"),
        ("unknown.test", "/", "10.0.0.1:9001"),
    ];
    for (host, path, want) in cases {
        let mut sim = Sim::new(config());
        sim.client(get(host, path));
        assert_eq!(sim.chosen(), [want], "{host} {path}");
    }
}

#[test]
fn a_stripped_prefix_becomes_slash_upstream() {
    let mut sim = Sim::new(config());
    sim.client(get("example.com", "/ws/room/7?x=1"));
    sim.connected();
    assert!(sim
        .take_upstream()
        .starts_with("GET /room/7?x=1 HTTP/1.1\r\n"));
}

#[test]
fn route_settings_replace_the_global_ones() {
    // Host policy and body limit on the api route.
    let mut sim = Sim::new(config());
    sim.client(get("v1.api.test", "/x"));
    sim.connected();
    assert!(sim
        .take_upstream()
        .starts_with("GET /x HTTP/1.1\r\nHost: api.internal\r\n"));
    let mut sim = Sim::new(config());
    sim.client("POST /x HTTP/1.1\r\nHost: v1.api.test\r\nContent-Length: 11\r\n\r\n");
    assert!(sim.take_client().starts_with("HTTP/1.1 413 "));
    assert!(
        sim.chosen().is_empty(),
        "refused before a server was chosen"
    );
    // No upgrades on the web route: the offer goes upstream as a plain request.
    let mut sim = Sim::new(config());
    sim.client(sim::ws_request("/"));
    sim.connected();
    let head = sim.take_upstream();
    assert!(
        !head.contains("Upgrade:") && !head.contains("upgrade"),
        "{head}"
    );
}

#[test]
fn a_route_tunnel_idle_timeout_applies_to_its_tunnels() {
    let mut sim = Sim::new(config());
    sim.client(sim::ws_request("/ws/chat"));
    sim.connected();
    sim.take_upstream();
    sim.upstream(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    ));
    assert!(sim.take_client().starts_with("HTTP/1.1 101 "));
    sim.advance(Duration::from_secs(6));
    assert!(!sim.session.is_closed());
    sim.advance(Duration::from_secs(2));
    assert!(
        sim.session.is_closed(),
        "the route's 7 s, not the global hour"
    );
}

#[test]
fn no_matching_route_is_404() {
    let mut c = config();
    c.virtual_hosts[0].routes.retain(|r| r.group == "chat");
    let mut sim = Sim::new(c);
    sim.client(get("example.com", "/elsewhere"));
    let out = sim.take_client();
    assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
    assert!(sim.take_upstream().is_empty());
    assert_eq!(
        sim.events[0].close,
        Some(CloseReason::BadRequest(RequestError::NoRoute))
    );
}

#[test]
fn a_route_to_an_unknown_group_is_a_config_error() {
    let mut c = config();
    c.virtual_hosts[1].routes[0].group = "nope".into();
    let e = c.validate().expect_err("unknown group");
    assert_eq!(e.field, "virtual_hosts[1].routes[0].group");
}
