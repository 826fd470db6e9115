//! Everything the binary runs with: the TOML file, overridden by flags, turned into a
//! [`proxy_core::Config`] plus the adapter settings. Every error names the file, the line, the
//! key and what was expected.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_core::health::{HealthCheck, HealthKind};
use proxy_core::{
    BalanceMethod, Config, HashKey, HeaderRule, HostPolicy, IpNet, PathMatch, Peer, ProxyProtocol,
    Route, ServerName, Template, Timeouts, TlsTarget, UpstreamGroup, UpstreamServer, VirtualHost,
    WebSocket, DEFAULT_GROUP,
};
use serde::{Deserialize, Serialize};

use crate::access_log;
use crate::units::{format_duration, parse_duration, parse_size};

/// Which async runtime drives the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// tokio's multi-threaded (or, with one worker, current-thread) runtime.
    Tokio,
    /// smol / async-io executors.
    Smol,
}

/// What the flags say; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstream: Vec<String>,
    pub connect_timeout: Option<Duration>,
    pub read_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    pub tunnel_idle_timeout: Option<Duration>,
    pub ws_ping_interval: Option<Duration>,
    pub ws_ping_timeout: Option<Duration>,
    pub ws_max_message: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub drain_timeout: Option<Duration>,
    pub workers: Option<usize>,
    pub runtime: Option<RuntimeKind>,
    pub access_log: Option<String>,
    /// `--tls-cert` / `--tls-key`: TLS on every listener with this one certificate.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub config: Config,
    pub workers: usize,
    pub runtime: RuntimeKind,
    pub access_log: access_log::Target,
    pub drain_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    pub dns_refresh: Duration,
    /// Most client connections open at once, 0 for no limit.
    pub max_connections: usize,
    /// Most client connections open at once from one address, 0 for no limit.
    pub max_connections_per_ip: usize,
    /// Certificates served by TLS listeners.
    pub tls: Vec<ListenerCert>,
    /// How long a client has for its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Most client TLS handshakes in progress at once, 0 for no limit.
    pub max_tls_handshakes: usize,
    /// TLS to upstreams, by group name (the core's TLS profile).
    pub upstream_tls: BTreeMap<String, UpstreamTls>,
}

/// A certificate and its key, served on `listen` (every listener when empty), chosen by SNI
/// among the others on the same listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub listen: Vec<SocketAddr>,
}

/// How one upstream group is reached over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// CA certificates trusted besides the Mozilla roots.
    pub ca: Vec<PathBuf>,
    /// The name sent as SNI and verified, instead of each server's host.
    pub server_name: Option<String>,
    /// Accept any certificate (logged as a warning at start).
    pub insecure_skip_verify: bool,
}

/// A configuration error, ready to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

impl SettingsError {
    /// An error with this text.
    pub fn new(text: String) -> Self {
        SettingsError(text)
    }
}

// ---- the file ----

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, deserialize_with = "one_or_many")]
    listen: Option<Vec<String>>,
    workers: Option<usize>,
    runtime: Option<RuntimeKind>,
    access_log: Option<String>,
    drain_timeout: Option<Dur>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    upstream: Option<UpstreamSection>,
    timeouts: Option<TimeoutsSection>,
    limits: Option<LimitsSection>,
    http: Option<HttpSection>,
    /// `[[server]]` blocks: virtual hosts and their routes.
    server: Option<Vec<ServerBlock>>,
    proxy_protocol: Option<ProxyProtocolSection>,
    websocket: Option<WebSocketSection>,
    /// `tls = { cert = "...", key = "..." }`, or a list of them (chosen by SNI).
    tls: Option<TlsSpec>,
    tls_handshake_timeout: Option<Dur>,
    max_tls_handshakes: Option<usize>,
}

/// One certificate or several.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum TlsSpec {
    One(TlsEntry),
    Many(Vec<TlsEntry>),
}

/// `{ cert = "cert.pem", key = "key.pem", listen = "0.0.0.0:443" }`; paths are relative to the
/// config file; without `listen`, every listener serves it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TlsEntry {
    cert: String,
    key: String,
    #[serde(default, deserialize_with = "one_or_many")]
    listen: Option<Vec<String>>,
}

/// `[websocket]` (or `websocket = { ... }` in a server or route): the frame-aware tunnel. Its
/// presence turns it on; every key is optional.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WebSocketSection {
    ping_interval: Option<Dur>,
    ping_timeout: Option<Dur>,
    max_frame: Option<Size>,
    max_message: Option<Size>,
    close_spread: Option<Dur>,
    close_timeout: Option<Dur>,
    require_mask: Option<bool>,
}

impl WebSocketSection {
    /// `base` with this section's keys applied.
    fn apply(&self, mut w: WebSocket) -> WebSocket {
        if let Some(Dur(d)) = self.ping_interval {
            w.ping_interval = (!d.is_zero()).then_some(d);
        }
        if let Some(Dur(d)) = self.ping_timeout {
            w.ping_timeout = d;
        }
        if let Some(Size(n)) = self.max_frame {
            w.max_frame = n;
        }
        if let Some(Size(n)) = self.max_message {
            w.max_message = n;
        }
        if let Some(Dur(d)) = self.close_spread {
            w.close_spread = d;
        }
        if let Some(Dur(d)) = self.close_timeout {
            w.close_timeout = d;
        }
        if let Some(b) = self.require_mask {
            w.require_mask = b;
        }
        w
    }
}

/// `[proxy_protocol]`: listeners behind an L4 balancer (nginx `listen ... proxy_protocol` with
/// `set_real_ip_from`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ProxyProtocolSection {
    /// Listener addresses that require the header; absent means every listener.
    #[serde(default, deserialize_with = "one_or_many")]
    listen: Option<Vec<String>>,
    /// Balancers allowed to send it.
    #[serde(deserialize_with = "many")]
    trusted: Vec<String>,
}

/// `[upstream]`: the default group's servers and method, the pool, and (as sub-tables,
/// `[upstream.NAME]`) the named groups routes refer to.
#[derive(Debug, Default)]
struct UpstreamSection {
    peers: Option<Vec<String>>,
    servers: Option<Vec<ServerSpec>>,
    method: Option<String>,
    hash: Option<String>,
    tries: Option<u32>,
    try_timeout: Option<Dur>,
    pool_idle_timeout: Option<Dur>,
    pool_max_idle: Option<usize>,
    dns_refresh: Option<Dur>,
    health: Option<HealthSection>,
    tls: Option<bool>,
    ca: Option<Vec<String>>,
    server_name: Option<String>,
    insecure_skip_verify: Option<bool>,
    /// Every other key is a named group (`[upstream.chat]`).
    groups: BTreeMap<String, GroupSection>,
}

// By hand rather than with `#[serde(flatten)]`, which would lose the position of an error (and
// with it the line the user is told to look at).
impl<'de> Deserialize<'de> for UpstreamSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UpstreamSection;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an [upstream] table")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UpstreamSection, A::Error> {
                let mut s = UpstreamSection::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "peers" => s.peers = Some(map.next_value::<OneOrMany>()?.0),
                        "servers" => s.servers = Some(map.next_value()?),
                        "method" => s.method = Some(map.next_value()?),
                        "hash" => s.hash = Some(map.next_value()?),
                        "tries" => s.tries = Some(map.next_value()?),
                        "try_timeout" => s.try_timeout = Some(map.next_value()?),
                        "pool_idle_timeout" => s.pool_idle_timeout = Some(map.next_value()?),
                        "pool_max_idle" => s.pool_max_idle = Some(map.next_value()?),
                        "dns_refresh" => s.dns_refresh = Some(map.next_value()?),
                        "health" => s.health = Some(map.next_value()?),
                        "tls" => s.tls = Some(map.next_value()?),
                        "ca" => s.ca = Some(map.next_value::<OneOrMany>()?.0),
                        "server_name" => s.server_name = Some(map.next_value()?),
                        "insecure_skip_verify" => s.insecure_skip_verify = Some(map.next_value()?),
                        _ => {
                            let group: GroupTable = map.next_value()?;
                            s.groups.insert(key, group.0);
                        }
                    }
                }
                Ok(s)
            }
        }
        d.deserialize_map(Visitor)
    }
}

impl Serialize for UpstreamSection {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = ser.serialize_map(None)?;
        macro_rules! entry {
            ($($key:ident),*) => {$(
                if let Some(v) = &self.$key {
                    m.serialize_entry(stringify!($key), v)?;
                }
            )*};
        }
        entry!(
            peers,
            servers,
            method,
            hash,
            tries,
            try_timeout,
            pool_idle_timeout,
            pool_max_idle,
            dns_refresh,
            health,
            tls,
            ca,
            server_name,
            insecure_skip_verify
        );
        for (name, group) in &self.groups {
            m.serialize_entry(name, group)?;
        }
        m.end()
    }
}

/// A list of strings, or one string for a list of one (`listen = "127.0.0.1:8080"`).
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(OneOrMany(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    OneOrMany::deserialize(d).map(|l| Some(l.0))
}

fn many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(d).map(|l| l.0)
}

/// A named group's table, with an error that says what an unknown `[upstream]` key may be.
struct GroupTable(GroupSection);

impl<'de> Deserialize<'de> for GroupTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = GroupTable;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "one of peers, servers, method, hash, tries, try_timeout, pool_idle_timeout, \
                     pool_max_idle, dns_refresh, health, or an [upstream.NAME] group table",
                )
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<GroupTable, A::Error> {
                GroupSection::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(GroupTable)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// `[upstream.NAME]`: one named group.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GroupSection {
    #[serde(default, deserialize_with = "one_or_many")]
    peers: Option<Vec<String>>,
    servers: Option<Vec<ServerSpec>>,
    method: Option<String>,
    hash: Option<String>,
    tries: Option<u32>,
    try_timeout: Option<Dur>,
    health: Option<HealthSection>,
    /// Reach the servers over TLS, verifying their certificates.
    tls: Option<bool>,
    /// CA certificates (PEM files) trusted besides the Mozilla roots.
    #[serde(default, deserialize_with = "one_or_many")]
    ca: Option<Vec<String>>,
    /// The name to send as SNI and verify, instead of each server's host.
    server_name: Option<String>,
    /// Accept any certificate (warned about at start).
    insecure_skip_verify: Option<bool>,
}

/// `health = { check = "http", path = "/healthz", expect = "200-399", interval = "5s",
/// timeout = "2s", fails = 2, passes = 1 }` (or `check = "tcp"`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    check: String,
    path: Option<String>,
    expect: Option<StatusSpec>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    fails: Option<u32>,
    passes: Option<u32>,
}

/// `200`, `"200"` or `"200-399"`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum StatusSpec {
    One(u16),
    Text(String),
}

/// A server of a group: `"host:port"`, or a table with nginx's `server` parameters.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum ServerSpec {
    Addr(String),
    Full(ServerTable),
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ServerTable {
    addr: String,
    weight: Option<u32>,
    max_conns: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<Dur>,
    backup: Option<bool>,
}

/// `[[server]]`: a virtual host (nginx `server`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ServerBlock {
    #[serde(default, deserialize_with = "one_or_many")]
    listen: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    server_names: Option<Vec<String>>,
    #[serde(default)]
    route: Vec<RouteBlock>,
    host: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    upgrade_protocols: Option<Vec<String>>,
    max_body: Option<Size>,
    set_headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    remove_headers: Option<Vec<String>>,
    timeouts: Option<RouteTimeouts>,
    websocket: Option<WebSocketSection>,
}

/// `[[server.route]]`: a route (nginx `location`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RouteBlock {
    path: String,
    upstream: Option<String>,
    strip_prefix: Option<bool>,
    host: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    upgrade_protocols: Option<Vec<String>>,
    max_body: Option<Size>,
    set_headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    remove_headers: Option<Vec<String>>,
    timeouts: Option<RouteTimeouts>,
    websocket: Option<WebSocketSection>,
}

/// The timeouts a server or route may set for its exchanges and tunnels.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RouteTimeouts {
    connect: Option<Dur>,
    read: Option<Dur>,
    send: Option<Dur>,
    client_body: Option<Dur>,
    tunnel_idle: Option<Dur>,
    tunnel_lifetime: Option<Dur>,
    fin: Option<Dur>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsSection {
    connect: Option<Dur>,
    read: Option<Dur>,
    send: Option<Dur>,
    request_head: Option<Dur>,
    client_body: Option<Dur>,
    keep_alive: Option<Dur>,
    tunnel_idle: Option<Dur>,
    tunnel_lifetime: Option<Dur>,
    fin: Option<Dur>,
    linger: Option<Dur>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_head: Option<Size>,
    max_headers: Option<usize>,
    max_uri: Option<Size>,
    max_body: Option<Size>,
    max_held: Option<Size>,
    queue: Option<Size>,
    max_requests: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    host: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    trusted_proxies: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    upgrade_protocols: Option<Vec<String>>,
    check_websocket_accept: Option<bool>,
    set_headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    remove_headers: Option<Vec<String>>,
}

/// A duration written as `"5s"` (or a number of seconds).
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Secs(u64),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration such as \"500ms\", \"5s\", \"1h\" or \"off\"",
            )
        })? {
            Raw::Secs(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Text(s) => parse_duration(&s)
                .map(Dur)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&format_duration(self.0))
    }
}

/// A size written as `"32k"` (or a number of bytes).
#[derive(Debug, Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Bytes(u64),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size such as 4096, \"32k\" or \"1m\"")
        })? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_u64(self.0)
    }
}

impl Settings {
    /// Reads `path` (if any) and applies `flags` on top.
    pub fn load(path: Option<&Path>, flags: &Overrides) -> Result<Settings, SettingsError> {
        let (file, src) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    SettingsError(format!("cannot read config file {}: {e}", p.display()))
                })?;
                let file: File = toml::from_str(&text).map_err(|e| {
                    SettingsError(format!(
                        "config error in {}: {}",
                        p.display(),
                        one_line(&e, &text)
                    ))
                })?;
                (file, Some((p.to_path_buf(), text)))
            }
            None => (File::default(), None),
        };
        let at =
            |key: &str, expected: String| -> SettingsError { locate(src.as_ref(), key, &expected) };
        let base = path.and_then(Path::parent);
        build(file, flags, &at, base)
    }

    /// The effective configuration as TOML, for `check-config`: every key with the value in
    /// force, written by the same types the file is read with, so the output reads back as the
    /// same configuration.
    pub fn to_toml(&self) -> String {
        let mut s = match toml::to_string(&self.to_file()) {
            Ok(s) => s,
            // Not reached: every value written is a string, number, bool, list or table.
            Err(e) => format!("# cannot print the configuration: {e}\n"),
        };
        s.push_str(&self.routing_table());
        s
    }

    /// The file that configures exactly these settings.
    fn to_file(&self) -> File {
        let c = &self.config;
        let t = &c.timeouts;
        let l = &c.limits;
        let (set_headers, remove_headers) = header_sections(&c.headers);
        let mut upstream = UpstreamSection {
            pool_idle_timeout: Some(Dur(self.pool_idle_timeout)),
            pool_max_idle: Some(self.pool_max_idle),
            dns_refresh: Some(Dur(self.dns_refresh)),
            ..UpstreamSection::default()
        };
        let default = group_section(&c.upstream);
        upstream.servers = default.servers;
        upstream.method = default.method;
        upstream.hash = default.hash;
        upstream.tries = default.tries;
        upstream.try_timeout = default.try_timeout;
        upstream.health = default.health;
        if let Some(t) = self.upstream_tls.get(DEFAULT_GROUP) {
            upstream.tls = Some(true);
            upstream.ca = Some(t.ca.iter().map(|p| p.display().to_string()).collect());
            upstream.server_name.clone_from(&t.server_name);
            upstream.insecure_skip_verify = Some(t.insecure_skip_verify);
        }
        for g in &c.groups {
            let mut section = group_section(g);
            if let Some(t) = self.upstream_tls.get(&g.name) {
                section.tls = Some(true);
                section.ca = Some(t.ca.iter().map(|p| p.display().to_string()).collect());
                section.server_name.clone_from(&t.server_name);
                section.insecure_skip_verify = Some(t.insecure_skip_verify);
            }
            upstream.groups.insert(g.name.clone(), section);
        }
        File {
            listen: Some(self.listen.iter().map(ToString::to_string).collect()),
            workers: Some(self.workers),
            runtime: Some(self.runtime),
            access_log: Some(self.access_log.describe()),
            drain_timeout: Some(Dur(self.drain_timeout)),
            max_connections: Some(self.max_connections),
            max_connections_per_ip: Some(self.max_connections_per_ip),
            upstream: Some(upstream),
            timeouts: Some(TimeoutsSection {
                connect: Some(Dur(t.connect)),
                read: Some(Dur(t.read)),
                send: Some(Dur(t.send)),
                request_head: Some(Dur(t.request_head)),
                client_body: Some(Dur(t.client_body)),
                keep_alive: Some(Dur(t.keep_alive)),
                tunnel_idle: Some(Dur(t.tunnel_idle)),
                tunnel_lifetime: Some(Dur(t.tunnel_lifetime.unwrap_or(Duration::ZERO))),
                fin: Some(Dur(t.fin)),
                linger: Some(Dur(t.linger)),
            }),
            limits: Some(LimitsSection {
                max_head: Some(Size(l.max_head as u64)),
                max_headers: Some(l.max_headers),
                max_uri: Some(Size(l.max_uri as u64)),
                max_body: Some(Size(l.max_body)),
                max_held: Some(Size(l.max_held as u64)),
                queue: Some(Size(l.queue as u64)),
                max_requests: Some(l.max_requests),
            }),
            http: Some(HttpSection {
                host: Some(host_text(&c.host)),
                trusted_proxies: Some(c.trusted_proxies.iter().map(ToString::to_string).collect()),
                upgrade_protocols: Some(c.upgrade_protocols.clone()),
                check_websocket_accept: Some(c.check_websocket_accept),
                set_headers: (!set_headers.is_empty()).then_some(set_headers),
                remove_headers: Some(remove_headers),
            }),
            server: (!c.virtual_hosts.is_empty()).then(|| {
                c.virtual_hosts
                    .iter()
                    .map(|vh| server_block(vh, c))
                    .collect()
            }),
            proxy_protocol: c.proxy_protocol.as_ref().map(|p| ProxyProtocolSection {
                listen: Some(p.listeners.iter().map(ToString::to_string).collect()),
                trusted: p.trusted.iter().map(ToString::to_string).collect(),
            }),
            websocket: c.websocket.as_ref().map(websocket_section),
            tls: (!self.tls.is_empty()).then(|| {
                TlsSpec::Many(
                    self.tls
                        .iter()
                        .map(|t| TlsEntry {
                            cert: t.cert.display().to_string(),
                            key: t.key.display().to_string(),
                            listen: (!t.listen.is_empty())
                                .then(|| t.listen.iter().map(ToString::to_string).collect()),
                        })
                        .collect(),
                )
            }),
            tls_handshake_timeout: Some(Dur(self.tls_handshake_timeout)),
            max_tls_handshakes: Some(self.max_tls_handshakes),
        }
    }

    /// The resolved routing table, as TOML comments: every group with its method and servers,
    /// then every virtual host with its listeners, names and routes.
    pub fn routing_table(&self) -> String {
        let c = &self.config;
        let mut s = String::from("\n# routing table\n");
        for g in c.all_groups() {
            if g.servers.is_empty() {
                continue;
            }
            let method = match &g.method {
                BalanceMethod::LeastConn => "least_conn".to_owned(),
                BalanceMethod::IpHash => "ip_hash".to_owned(),
                BalanceMethod::Hash(_) => "hash (consistent)".to_owned(),
                _ => "round_robin".to_owned(),
            };
            let health = match g.health.as_ref().map(|h| &h.kind) {
                Some(HealthKind::Tcp) => ", health: tcp".to_owned(),
                Some(HealthKind::Http { path, expect }) => {
                    format!(
                        ", health: GET {path} expecting {}-{}",
                        expect.start(),
                        expect.end()
                    )
                }
                _ => String::new(),
            };
            let _ = writeln!(s, "# group {} ({method}{health}):", g.name);
            for srv in &g.servers {
                let mut extra = format!("weight={}", srv.weight);
                if srv.max_conns > 0 {
                    let _ = write!(extra, " max_conns={}", srv.max_conns);
                }
                let _ = write!(
                    extra,
                    " max_fails={} fail_timeout={}",
                    srv.max_fails,
                    format_duration(srv.fail_timeout)
                );
                if srv.backup {
                    extra.push_str(" backup");
                }
                let _ = writeln!(s, "#   {} {extra}", srv.peer);
            }
        }
        if let Some(pp) = &c.proxy_protocol {
            let on = if pp.listeners.is_empty() {
                "every listener".to_owned()
            } else {
                pp.listeners
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "# PROXY protocol required on {on}, from {}",
                pp.trusted
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if c.virtual_hosts.is_empty() {
            let _ = writeln!(s, "# every request -> group default");
        }
        for vh in &c.virtual_hosts {
            let names: Vec<String> = vh
                .names
                .iter()
                .map(|n| match n {
                    ServerName::Exact(e) => e.clone(),
                    ServerName::Suffix(x) => format!("*{x}"),
                    _ => "_".to_owned(),
                })
                .collect();
            let listen: Vec<String> = vh.listen.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                s,
                "# server {} on {}",
                if names.is_empty() {
                    "_".to_owned()
                } else {
                    names.join(" ")
                },
                if listen.is_empty() {
                    "every listener".to_owned()
                } else {
                    listen.join(", ")
                }
            );
            for r in &vh.routes {
                let path = match &r.path {
                    PathMatch::Exact(p) => format!("= {p}"),
                    PathMatch::Prefix(p) => p.clone(),
                    _ => "?".to_owned(),
                };
                let strip = if r.strip_prefix {
                    " (prefix stripped)"
                } else {
                    ""
                };
                let _ = writeln!(s, "#   {path} -> group {}{strip}", r.group);
            }
        }
        s
    }
}

fn build(
    file: File,
    flags: &Overrides,
    at: &dyn Fn(&str, String) -> SettingsError,
    base: Option<&Path>,
) -> Result<Settings, SettingsError> {
    // Paths in the file are relative to the file (like nginx's to its prefix), not to
    // wherever the proxy was started from.
    let path_of = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        }
    };
    let mut upstream = file.upstream.unwrap_or_default();
    let servers = file.server.unwrap_or_default();
    let default_section = GroupSection {
        peers: if flags.upstream.is_empty() {
            upstream.peers.take()
        } else {
            Some(flags.upstream.clone())
        },
        servers: if flags.upstream.is_empty() {
            upstream.servers.take()
        } else {
            None
        },
        method: upstream.method.take(),
        hash: upstream.hash.take(),
        tries: upstream.tries,
        try_timeout: upstream.try_timeout,
        health: upstream.health.take(),
        tls: upstream.tls,
        ca: upstream.ca.take(),
        server_name: upstream.server_name.take(),
        insecure_skip_verify: upstream.insecure_skip_verify,
    };
    let mut upstream_tls = BTreeMap::new();
    let (default_group, tls) =
        group_from("upstream", DEFAULT_GROUP, default_section, at, &path_of)?;
    if let Some(tls) = tls {
        upstream_tls.insert(DEFAULT_GROUP.to_owned(), tls);
    }
    if default_group.servers.is_empty() && servers.is_empty() {
        return Err(SettingsError(
            "no upstream: give --upstream HOST:PORT (repeatable), [upstream] peers in the config file, or [[server]] routes to [upstream.NAME] groups".to_owned(),
        ));
    }
    let mut config = Config::new(default_group);
    for (name, g) in std::mem::take(&mut upstream.groups) {
        let field = format!("upstream.{name}");
        let (group, tls) = group_from(&field, &name, g, at, &path_of)?;
        if let Some(tls) = tls {
            upstream_tls.insert(name.clone(), tls);
        }
        config.groups.push(group.named(&name));
    }

    let t = file.timeouts.unwrap_or_default();
    let ct = &mut config.timeouts;
    let set = |slot: &mut Duration, v: Option<Dur>| {
        if let Some(Dur(d)) = v {
            *slot = d;
        }
    };
    set(&mut ct.connect, t.connect);
    set(&mut ct.read, t.read);
    set(&mut ct.send, t.send);
    set(&mut ct.request_head, t.request_head);
    set(&mut ct.client_body, t.client_body);
    set(&mut ct.keep_alive, t.keep_alive);
    set(&mut ct.tunnel_idle, t.tunnel_idle);
    set(&mut ct.fin, t.fin);
    set(&mut ct.linger, t.linger);
    if let Some(Dur(d)) = t.tunnel_lifetime {
        ct.tunnel_lifetime = (!d.is_zero()).then_some(d);
    }
    for (slot, flag) in [
        (&mut ct.connect, flags.connect_timeout),
        (&mut ct.read, flags.read_timeout),
        (&mut ct.send, flags.send_timeout),
        (&mut ct.tunnel_idle, flags.tunnel_idle_timeout),
    ] {
        if let Some(d) = flag {
            *slot = d;
        }
    }

    let l = file.limits.unwrap_or_default();
    let cl = &mut config.limits;
    let usize_of = |key: &str, v: u64| {
        usize::try_from(v)
            .map_err(|_| at(key, format!("limits.{key}: a size this machine can hold")))
    };
    if let Some(Size(v)) = l.max_head {
        cl.max_head = usize_of("max_head", v)?;
    }
    if let Some(v) = l.max_headers {
        cl.max_headers = v;
    }
    if let Some(Size(v)) = l.max_uri {
        cl.max_uri = usize_of("max_uri", v)?;
    }
    if let Some(Size(v)) = l.max_body {
        cl.max_body = v;
    }
    if let Some(Size(v)) = l.max_held {
        cl.max_held = usize_of("max_held", v)?;
    }
    if let Some(Size(v)) = l.queue {
        cl.queue = usize_of("queue", v)?;
    }
    if let Some(v) = l.max_requests {
        cl.max_requests = v;
    }

    let h = file.http.unwrap_or_default();
    if let Some(host) = h.host {
        config.host = host_policy(&host);
    }
    if let Some(nets) = h.trusted_proxies {
        for (i, n) in nets.iter().enumerate() {
            let net = IpNet::parse(n).map_err(|e| {
                at(
                    "trusted_proxies",
                    format!("http.trusted_proxies[{i}]: {}", e.expected),
                )
            })?;
            config.trusted_proxies.push(net);
        }
    }
    if let Some(p) = h.upgrade_protocols {
        config.upgrade_protocols = p.into_iter().map(|s| s.to_ascii_lowercase()).collect();
    }
    if let Some(b) = h.check_websocket_accept {
        config.check_websocket_accept = b;
    }
    push_header_rules(
        &mut config.headers,
        "http",
        h.set_headers,
        h.remove_headers,
        at,
    )?;
    if let Some(pp) = file.proxy_protocol {
        let mut trusted = Vec::new();
        for (i, n) in pp.trusted.iter().enumerate() {
            trusted.push(IpNet::parse(n).map_err(|e| {
                at(
                    "trusted",
                    format!("proxy_protocol.trusted[{i}]: {}", e.expected),
                )
            })?);
        }
        if trusted.is_empty() {
            return Err(at(
                "trusted",
                "proxy_protocol.trusted: the balancers' addresses (IPs or CIDR networks)"
                    .to_owned(),
            ));
        }
        let mut policy = ProxyProtocol::new(trusted);
        for (i, a) in pp.listen.unwrap_or_default().iter().enumerate() {
            policy.listeners.push(a.parse().map_err(|_| {
                at(
                    "listen",
                    format!("proxy_protocol.listen[{i}]: a listen address, got {a:?}"),
                )
            })?);
        }
        config.proxy_protocol = Some(policy);
    }
    let ws_flags = WebSocketSection {
        ping_interval: flags.ws_ping_interval.map(Dur),
        ping_timeout: flags.ws_ping_timeout.map(Dur),
        max_message: flags.ws_max_message.map(Size),
        ..WebSocketSection::default()
    };
    let any_flag = flags.ws_ping_interval.is_some()
        || flags.ws_ping_timeout.is_some()
        || flags.ws_max_message.is_some();
    if file.websocket.is_some() || any_flag {
        let w = file
            .websocket
            .unwrap_or_default()
            .apply(WebSocket::default());
        config.websocket = Some(ws_flags.apply(w));
    }
    let mut server_listen = Vec::new();
    for (i, block) in servers.into_iter().enumerate() {
        let (vh, listen) = virtual_host_from(i, block, &config, at)?;
        config.virtual_hosts.push(vh);
        server_listen.extend(listen);
    }
    config.validate().map_err(|e| {
        let key = e
            .field
            .rsplit('.')
            .next()
            .unwrap_or(&e.field)
            .split('[')
            .next()
            .unwrap_or("")
            .to_owned();
        at(&key, format!("{}: {}", e.field, e.expected))
    })?;

    let listen_strings = if !flags.listen.is_empty() {
        flags.listen.clone()
    } else {
        match file.listen {
            Some(l) => l,
            None if !server_listen.is_empty() => Vec::new(),
            None => vec!["127.0.0.1:8080".to_owned()],
        }
    };
    let mut listen = Vec::new();
    for (i, a) in listen_strings.iter().enumerate() {
        let addr: SocketAddr = a.parse().map_err(|_| {
            at(
                "listen",
                format!("listen[{i}]: an address such as 127.0.0.1:8080, got {a:?}"),
            )
        })?;
        listen.push(addr);
    }
    // A server block's listen addresses are bound too (once each).
    for addr in server_listen {
        if !listen.contains(&addr) {
            listen.push(addr);
        }
    }
    let tls = match (&flags.tls_cert, &flags.tls_key) {
        (Some(cert), Some(key)) => vec![ListenerCert {
            cert: cert.clone(),
            key: key.clone(),
            listen: Vec::new(),
        }],
        (None, None) => {
            let entries = match file.tls {
                None => Vec::new(),
                Some(TlsSpec::One(e)) => vec![e],
                Some(TlsSpec::Many(v)) => v,
            };
            let mut certs = Vec::new();
            for (i, e) in entries.into_iter().enumerate() {
                let mut on = Vec::new();
                for (j, a) in e.listen.unwrap_or_default().iter().enumerate() {
                    let addr: SocketAddr = a.parse().map_err(|_| {
                        at(
                            "listen",
                            format!("tls[{i}].listen[{j}]: a listen address, got {a:?}"),
                        )
                    })?;
                    if !listen.contains(&addr) {
                        return Err(at(
                            "listen",
                            format!("tls[{i}].listen[{j}]: one of the listen addresses, got {a:?}"),
                        ));
                    }
                    on.push(addr);
                }
                certs.push(ListenerCert {
                    cert: path_of(&e.cert),
                    key: path_of(&e.key),
                    listen: on,
                });
            }
            certs
        }
        _ => {
            return Err(SettingsError(
                "--tls-cert and --tls-key: give both (the certificate chain and its key, PEM)"
                    .to_owned(),
            ))
        }
    };
    let workers = flags
        .workers
        .or(file.workers)
        .unwrap_or_else(default_workers);
    if workers == 0 {
        return Err(at("workers", "workers: at least 1".to_owned()));
    }
    Ok(Settings {
        tls,
        tls_handshake_timeout: file
            .tls_handshake_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(10)),
        max_tls_handshakes: file.max_tls_handshakes.unwrap_or(1024),
        upstream_tls,
        max_connections: flags.max_connections.or(file.max_connections).unwrap_or(0),
        max_connections_per_ip: flags
            .max_connections_per_ip
            .or(file.max_connections_per_ip)
            .unwrap_or(0),
        listen,
        config,
        workers,
        runtime: flags.runtime.or(file.runtime).unwrap_or(RuntimeKind::Tokio),
        access_log: access_log::Target::parse(
            flags
                .access_log
                .as_deref()
                .or(file.access_log.as_deref())
                .unwrap_or("-"),
        ),
        drain_timeout: flags
            .drain_timeout
            .or(file.drain_timeout.map(|d| d.0))
            .unwrap_or(Duration::from_secs(30)),
        pool_idle_timeout: upstream
            .pool_idle_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        pool_max_idle: upstream.pool_max_idle.unwrap_or(32),
        dns_refresh: upstream
            .dns_refresh
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30)),
    })
}

/// One upstream group from its keys, with its TLS settings if it is reached over TLS; `field`
/// names it in errors (`upstream`, `upstream.chat`), `name` is its name in routes (and its TLS
/// profile).
fn group_from(
    field: &str,
    name: &str,
    g: GroupSection,
    at: &dyn Fn(&str, String) -> SettingsError,
    path_of: &dyn Fn(&str) -> PathBuf,
) -> Result<(UpstreamGroup, Option<UpstreamTls>), SettingsError> {
    let GroupSection {
        peers,
        servers,
        method,
        hash,
        tries,
        try_timeout,
        health,
        tls,
        ca,
        server_name,
        insecure_skip_verify,
    } = g;
    let tls = match tls {
        Some(true) => Some(UpstreamTls {
            ca: ca.unwrap_or_default().iter().map(|p| path_of(p)).collect(),
            server_name,
            insecure_skip_verify: insecure_skip_verify.unwrap_or(false),
        }),
        _ => {
            for (key, given) in [
                ("ca", ca.is_some()),
                ("server_name", server_name.is_some()),
                ("insecure_skip_verify", insecure_skip_verify.is_some()),
            ] {
                if given {
                    return Err(at(key, format!("{field}.{key}: only with `tls = true`")));
                }
            }
            None
        }
    };
    let mut list = Vec::new();
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        let peer = Peer::parse(p)
            .map_err(|e| at("peers", format!("{field}.peers[{i}]: {}", e.expected)))?;
        list.push(UpstreamServer::new(peer));
    }
    for (i, spec) in servers.unwrap_or_default().into_iter().enumerate() {
        let server = match spec {
            ServerSpec::Addr(a) => UpstreamServer::new(
                Peer::parse(&a)
                    .map_err(|e| at("servers", format!("{field}.servers[{i}]: {}", e.expected)))?,
            ),
            ServerSpec::Full(t) => {
                let peer = Peer::parse(&t.addr).map_err(|e| {
                    at("addr", format!("{field}.servers[{i}].addr: {}", e.expected))
                })?;
                let mut server = UpstreamServer::new(peer);
                if let Some(w) = t.weight {
                    server.weight = w;
                }
                if let Some(m) = t.max_conns {
                    server.max_conns = m;
                }
                if let Some(m) = t.max_fails {
                    server.max_fails = m;
                }
                if let Some(Dur(d)) = t.fail_timeout {
                    server.fail_timeout = d;
                }
                server.backup = t.backup.unwrap_or(false);
                server
            }
        };
        list.push(server);
    }
    let mut group = UpstreamGroup::with_servers(list);
    group.method = match (method.as_deref(), hash) {
        (None | Some("round_robin"), None) => BalanceMethod::RoundRobin,
        (Some("least_conn"), None) => BalanceMethod::LeastConn,
        (Some("ip_hash"), None) => BalanceMethod::IpHash,
        (None | Some("hash"), Some(key)) => BalanceMethod::Hash(
            HashKey::parse(&key)
                .map_err(|e| at("hash", format!("{field}.hash: {}", e.expected)))?,
        ),
        (Some("hash"), None) => {
            return Err(at(
                "method",
                format!("{field}.method: \"hash\" needs a `hash` key such as \"$arg_room\""),
            ))
        }
        (Some(m), _) => {
            return Err(at(
                "method",
                format!(
                    "{field}.method: one of \"round_robin\", \"least_conn\", \"ip_hash\", \"hash\", got {m:?}"
                ),
            ))
        }
    };
    if let Some(t) = tries {
        group.tries = t;
    }
    if let Some(Dur(d)) = try_timeout {
        group.try_timeout = d;
    }
    if let Some(h) = health {
        group.health = Some(health_from(field, h, at)?);
    }
    if let Some(t) = &tls {
        for server in &mut group.servers {
            let server_name = t.server_name.as_deref().unwrap_or(server.peer.host());
            let target = TlsTarget {
                server_name: server_name.into(),
                profile: name.into(),
            };
            server.peer = server.peer.clone().with_tls(target);
        }
    }
    Ok((group, tls))
}

fn health_from(
    field: &str,
    h: HealthSection,
    at: &dyn Fn(&str, String) -> SettingsError,
) -> Result<HealthCheck, SettingsError> {
    let kind = match h.check.as_str() {
        "tcp" => HealthKind::Tcp,
        "http" => {
            let expect = match h.expect {
                None => 200..=399,
                Some(StatusSpec::One(n)) => n..=n,
                Some(StatusSpec::Text(t)) => {
                    let parse = |s: &str| s.trim().parse::<u16>().ok();
                    match t.split_once('-') {
                        Some((a, b)) => parse(a).zip(parse(b)).map(|(a, b)| a..=b),
                        None => parse(&t).map(|n| n..=n),
                    }
                    .ok_or_else(|| {
                        at(
                            "expect",
                            format!("{field}.health.expect: a status such as 200 or \"200-399\", got {t:?}"),
                        )
                    })?
                }
            };
            HealthKind::Http {
                path: h.path.unwrap_or_else(|| "/".to_owned()),
                expect,
            }
        }
        other => {
            return Err(at(
                "check",
                format!("{field}.health.check: \"tcp\" or \"http\", got {other:?}"),
            ))
        }
    };
    let mut check = HealthCheck::new(kind);
    if let Some(Dur(d)) = h.interval {
        check.interval = d;
    }
    if let Some(Dur(d)) = h.timeout {
        check.timeout = d;
    }
    if let Some(n) = h.fails {
        check.fails = n;
    }
    if let Some(n) = h.passes {
        check.passes = n;
    }
    Ok(check)
}

fn host_policy(host: &str) -> HostPolicy {
    match host {
        "$host" => HostPolicy::Client,
        "$proxy_host" => HostPolicy::Upstream,
        literal => HostPolicy::Literal(literal.to_owned()),
    }
}

/// Header rules from `set_headers` / `remove_headers` of `field`, appended to `rules`.
fn push_header_rules(
    rules: &mut Vec<HeaderRule>,
    field: &str,
    set: Option<BTreeMap<String, String>>,
    remove: Option<Vec<String>>,
    at: &dyn Fn(&str, String) -> SettingsError,
) -> Result<(), SettingsError> {
    for name in remove.unwrap_or_default() {
        rules.push(HeaderRule::Remove { name });
    }
    for (name, value) in set.unwrap_or_default() {
        let value = Template::parse(&value)
            .map_err(|e| at(&name, format!("{field}.set_headers.{name}: {}", e.expected)))?;
        rules.push(HeaderRule::Set { name, value });
    }
    Ok(())
}

/// The timeouts for a route: the global ones, then the server's, then the route's; `None` when
/// neither sets any (the route uses the global table).
fn layered_timeouts(base: &Timeouts, layers: [&Option<RouteTimeouts>; 2]) -> Option<Timeouts> {
    if layers.iter().all(|l| l.is_none()) {
        return None;
    }
    let mut t = base.clone();
    for layer in layers.into_iter().flatten() {
        for (slot, v) in [
            (&mut t.connect, layer.connect),
            (&mut t.read, layer.read),
            (&mut t.send, layer.send),
            (&mut t.client_body, layer.client_body),
            (&mut t.tunnel_idle, layer.tunnel_idle),
            (&mut t.fin, layer.fin),
        ] {
            if let Some(Dur(d)) = v {
                *slot = d;
            }
        }
        if let Some(Dur(d)) = layer.tunnel_lifetime {
            t.tunnel_lifetime = (!d.is_zero()).then_some(d);
        }
    }
    Some(t)
}

/// One `[[server]]` block: the virtual host, and the addresses it asks to listen on. Route
/// settings override the server's, which override the globals; header edits add to the
/// global ones (unlike nginx, where a `proxy_set_header` inside a location drops every
/// inherited one).
fn virtual_host_from(
    i: usize,
    block: ServerBlock,
    config: &Config,
    at: &dyn Fn(&str, String) -> SettingsError,
) -> Result<(VirtualHost, Vec<SocketAddr>), SettingsError> {
    let field = format!("server[{i}]");
    let mut listen = Vec::new();
    for (j, a) in block.listen.unwrap_or_default().iter().enumerate() {
        listen.push(a.parse::<SocketAddr>().map_err(|_| {
            at(
                "listen",
                format!("{field}.listen[{j}]: an address such as 0.0.0.0:8080, got {a:?}"),
            )
        })?);
    }
    let mut names = Vec::new();
    for (j, n) in block.server_names.unwrap_or_default().iter().enumerate() {
        names.push(ServerName::parse(n).map_err(|e| {
            at(
                "server_names",
                format!("{field}.server_names[{j}]: {}", e.expected),
            )
        })?);
    }
    if block.route.is_empty() {
        return Err(at(
            "server_names",
            format!("{field}: at least one [[server.route]]"),
        ));
    }
    let mut server_rules = Vec::new();
    push_header_rules(
        &mut server_rules,
        &field,
        block.set_headers,
        block.remove_headers,
        at,
    )?;
    let mut routes = Vec::new();
    for (j, r) in block.route.into_iter().enumerate() {
        let rfield = format!("{field}.route[{j}]");
        let path = PathMatch::parse(&r.path)
            .map_err(|e| at("path", format!("{rfield}.path: {}", e.expected)))?;
        let group = r.upstream.as_deref().unwrap_or(DEFAULT_GROUP);
        if config.group_index(group).is_none() {
            return Err(at(
                "upstream",
                format!(
                    "{rfield}.upstream: \"default\" or a group defined as [upstream.NAME], got {group:?}"
                ),
            ));
        }
        let mut route = Route::new(path, group);
        route.strip_prefix = r.strip_prefix.unwrap_or(false);
        let st = &mut route.settings;
        st.timeouts = layered_timeouts(&config.timeouts, [&block.timeouts, &r.timeouts]);
        st.host = r.host.as_deref().or(block.host.as_deref()).map(host_policy);
        st.upgrade_protocols = r
            .upgrade_protocols
            .or_else(|| block.upgrade_protocols.clone())
            .map(|p| p.into_iter().map(|s| s.to_ascii_lowercase()).collect());
        st.max_body = r.max_body.or(block.max_body).map(|Size(n)| n);
        if block.websocket.is_some() || r.websocket.is_some() {
            // Layered like timeouts: the global settings, then the server's, then the route's.
            let mut w = config.websocket.unwrap_or_default();
            for layer in [&block.websocket, &r.websocket].into_iter().flatten() {
                w = layer.apply(w);
            }
            st.websocket = Some(w);
        }
        if !server_rules.is_empty() || r.set_headers.is_some() || r.remove_headers.is_some() {
            let mut rules = config.headers.clone();
            rules.extend(server_rules.iter().cloned());
            push_header_rules(&mut rules, &rfield, r.set_headers, r.remove_headers, at)?;
            st.headers = Some(rules);
        }
        routes.push(route);
    }
    let mut vh = VirtualHost::new(names, routes);
    vh.listen = listen.clone();
    Ok((vh, listen))
}

// ---- writing a configuration back (check-config) ----

fn host_text(h: &HostPolicy) -> String {
    match h {
        HostPolicy::Upstream => "$proxy_host".to_owned(),
        HostPolicy::Literal(l) => l.clone(),
        _ => "$host".to_owned(),
    }
}

/// `set_headers` / `remove_headers` for `rules`. Within one section removals apply before
/// additions, the order the file is read in.
fn header_sections(rules: &[HeaderRule]) -> (BTreeMap<String, String>, Vec<String>) {
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for r in rules {
        match r {
            HeaderRule::Set { name, value } => {
                set.insert(name.clone(), value.to_string());
            }
            HeaderRule::Remove { name } => remove.push(name.clone()),
            _ => {}
        }
    }
    (set, remove)
}

fn group_section(g: &UpstreamGroup) -> GroupSection {
    let servers = g
        .servers
        .iter()
        .map(|srv| {
            if *srv == UpstreamServer::new(srv.peer.clone()) {
                ServerSpec::Addr(srv.peer.to_string())
            } else {
                ServerSpec::Full(ServerTable {
                    addr: srv.peer.to_string(),
                    weight: Some(srv.weight),
                    max_conns: Some(srv.max_conns),
                    max_fails: Some(srv.max_fails),
                    fail_timeout: Some(Dur(srv.fail_timeout)),
                    backup: Some(srv.backup),
                })
            }
        })
        .collect();
    let (method, hash) = match &g.method {
        BalanceMethod::LeastConn => ("least_conn", None),
        BalanceMethod::IpHash => ("ip_hash", None),
        BalanceMethod::Hash(key) => ("hash", Some(key.to_string())),
        _ => ("round_robin", None),
    };
    GroupSection {
        peers: None,
        servers: Some(servers),
        method: Some(method.to_owned()),
        hash,
        tries: Some(g.tries),
        try_timeout: Some(Dur(g.try_timeout)),
        health: g.health.as_ref().map(|h| {
            let (check, path, expect) = match &h.kind {
                HealthKind::Http { path, expect } => (
                    "http",
                    Some(path.clone()),
                    Some(StatusSpec::Text(format!(
                        "{}-{}",
                        expect.start(),
                        expect.end()
                    ))),
                ),
                _ => ("tcp", None, None),
            };
            HealthSection {
                check: check.to_owned(),
                path,
                expect,
                interval: Some(Dur(h.interval)),
                timeout: Some(Dur(h.timeout)),
                fails: Some(h.fails),
                passes: Some(h.passes),
            }
        }),
        tls: None,
        ca: None,
        server_name: None,
        insecure_skip_verify: None,
    }
}

fn websocket_section(w: &WebSocket) -> WebSocketSection {
    WebSocketSection {
        ping_interval: Some(Dur(w.ping_interval.unwrap_or(Duration::ZERO))),
        ping_timeout: Some(Dur(w.ping_timeout)),
        max_frame: Some(Size(w.max_frame)),
        max_message: Some(Size(w.max_message)),
        close_spread: Some(Dur(w.close_spread)),
        close_timeout: Some(Dur(w.close_timeout)),
        require_mask: Some(w.require_mask),
    }
}

/// A virtual host as a `[[server]]` block. Everything a route has in force is written on the
/// route (server-level settings were merged into each route when the file was read); its
/// header edits are those beyond the global ones.
fn server_block(vh: &VirtualHost, c: &Config) -> ServerBlock {
    let route = vh
        .routes
        .iter()
        .map(|r| {
            let st = &r.settings;
            let own_rules = st
                .headers
                .as_deref()
                .map(|h| h.strip_prefix(c.headers.as_slice()).unwrap_or(h));
            let (set, remove) = own_rules.map(header_sections).unwrap_or_default();
            RouteBlock {
                path: match &r.path {
                    PathMatch::Exact(p) => format!("= {p}"),
                    PathMatch::Prefix(p) => p.clone(),
                    _ => "/".to_owned(),
                },
                upstream: Some(r.group.clone()),
                strip_prefix: Some(r.strip_prefix),
                host: st.host.as_ref().map(host_text),
                upgrade_protocols: st.upgrade_protocols.clone(),
                max_body: st.max_body.map(Size),
                set_headers: (!set.is_empty()).then_some(set),
                remove_headers: (!remove.is_empty()).then_some(remove),
                timeouts: st.timeouts.as_ref().map(|t| RouteTimeouts {
                    connect: Some(Dur(t.connect)),
                    read: Some(Dur(t.read)),
                    send: Some(Dur(t.send)),
                    client_body: Some(Dur(t.client_body)),
                    tunnel_idle: Some(Dur(t.tunnel_idle)),
                    tunnel_lifetime: Some(Dur(t.tunnel_lifetime.unwrap_or(Duration::ZERO))),
                    fin: Some(Dur(t.fin)),
                }),
                websocket: st.websocket.as_ref().map(websocket_section),
            }
        })
        .collect();
    ServerBlock {
        listen: (!vh.listen.is_empty())
            .then(|| vh.listen.iter().map(ToString::to_string).collect()),
        server_names: Some(
            vh.names
                .iter()
                .map(|n| match n {
                    ServerName::Exact(x) => x.clone(),
                    ServerName::Suffix(x) => format!("*{x}"),
                    _ => "_".to_owned(),
                })
                .collect(),
        ),
        route,
        ..ServerBlock::default()
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A toml error as one line: where it is (line, column), which key (with its `[section]`), and
/// what was expected; without the source excerpt toml would print.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim();
    let Some(span) = e.span() else {
        return msg.to_owned();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .or_else(|| {
            let k = line.trim();
            (!k.is_empty() && !k.starts_with('[')).then(|| k.to_owned())
        });
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_owned());
    match (key, section) {
        (Some(k), Some(sec)) => format!("line {line_no}, column {column}, key `{sec}.{k}`: {msg}"),
        (Some(k), None) => format!("line {line_no}, column {column}, key `{k}`: {msg}"),
        (None, _) => format!("line {line_no}, column {column}: {msg}"),
    }
}

/// An error about `key`, pointing at the first line of the file that sets it.
fn locate(src: Option<&(PathBuf, String)>, key: &str, expected: &str) -> SettingsError {
    let Some((path, text)) = src else {
        return SettingsError(format!("invalid setting {expected}"));
    };
    let line = text.lines().position(|l| {
        let l = l.trim_start().trim_start_matches('"');
        l.starts_with(key)
            && l[key.len()..]
                .trim_start()
                .trim_start_matches('"')
                .trim_start()
                .starts_with('=')
    });
    match line {
        Some(n) => SettingsError(format!(
            "config error in {}: line {}, key `{key}`: expected {expected}",
            path.display(),
            n + 1
        )),
        None => SettingsError(format!(
            "config error in {} (flags applied): expected {expected}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, flags: &Overrides) -> Result<Settings, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("switchyard-settings-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("switchyard.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let r = Settings::load(Some(&path), flags).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn file_and_flags_merge() {
        let flags = Overrides {
            read_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let s = load_str(
            "listen = [\"127.0.0.1:9999\"]\n[upstream]\npeers = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n\
             [timeouts]\nread = \"1m\"\ntunnel_idle = \"2h\"\ntunnel_lifetime = \"1d\"\n[limits]\nmax_body = \"2m\"\n\
             [http]\nhost = \"$proxy_host\"\nset_headers = { X-Real-IP = \"$remote_addr\" }\n",
            &flags,
        )
        .expect("valid");
        assert_eq!(
            s.listen,
            ["127.0.0.1:9999".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(s.config.upstream.servers.len(), 2);
        assert_eq!(
            s.config.timeouts.read,
            Duration::from_secs(5),
            "flags override the file"
        );
        assert_eq!(s.config.timeouts.tunnel_idle, Duration::from_secs(7200));
        assert_eq!(
            s.config.timeouts.tunnel_lifetime,
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(s.config.limits.max_body, 2 << 20);
        assert_eq!(s.config.host, HostPolicy::Upstream);
        assert!(s.to_toml().contains("read = \"5s\""));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../switchyard.example.toml");
        let s = load_str(text, &Overrides::default()).expect("switchyard.example.toml is valid");
        assert_eq!(s.config.upstream.servers.len(), 2);
        assert_eq!(s.config.timeouts.tunnel_idle, Duration::from_secs(3600));
        assert_eq!(s.config.timeouts.tunnel_lifetime, None);
        assert_eq!(s.config.trusted_proxies.len(), 2);
        assert_eq!(s.config.headers.len(), 2);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[timeouts]\nconnect = \"5x\"\n",
            &Overrides::default(),
        )
        .expect_err("bad duration");
        assert!(
            e.contains("switchyard.toml") && e.contains("line 4") && e.contains("duration"),
            "{e}"
        );
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\nbogus = 1\n",
            &Overrides::default(),
        )
        .expect_err("unknown key");
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        let e = load_str("[upstream]\npeers = [\"nope\"]\n", &Overrides::default())
            .expect_err("bad peer");
        assert!(e.contains("line 2") && e.contains("peers"), "{e}");
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[http]\nupgrade_protocols = [\"h2c\"]\n",
            &Overrides::default(),
        )
        .expect_err("h2c");
        assert!(e.contains("line 4") && e.contains("h2c"), "{e}");
    }

    fn example(name: &str) -> Settings {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name);
        Settings::load(Some(&path), &Overrides::default())
            .unwrap_or_else(|e| panic!("examples/{name}: {e}"))
    }

    #[test]
    fn the_nginx_translations_load_as_documented() {
        let s = example("chat-location.toml");
        let vh = &s.config.virtual_hosts[0];
        assert_eq!(vh.names, [ServerName::Exact("chat.example.com".into())]);
        assert_eq!(vh.routes[0].path, PathMatch::Prefix("/chat/".into()));
        assert!(vh.routes[0].strip_prefix);
        assert_eq!(vh.routes[0].group, "chat");
        assert!(
            s.config.upstream.servers.is_empty(),
            "no default group needed"
        );

        let s = example("upstream-group.toml");
        let g = &s.config.upstream;
        assert_eq!(g.tries, 3);
        assert_eq!(
            g.servers.iter().map(|x| x.weight).collect::<Vec<_>>(),
            [3, 1, 1, 1]
        );
        assert_eq!(g.servers[1].fail_timeout, Duration::from_secs(30));
        assert_eq!(g.servers[2].max_conns, 500);
        assert!(g.servers[3].backup);

        let s = example("site-http-and-ws.toml");
        let routes = &s.config.virtual_hosts[0].routes;
        assert_eq!(routes[0].settings.upgrade_protocols, Some(vec![]));
        assert_eq!(routes[1].settings.max_body, Some(10 * 1024 * 1024));
        assert_eq!(s.config.group_index("ws"), Some(2));

        let s = example("least-conn-ws.toml");
        assert_eq!(s.config.upstream.method, BalanceMethod::LeastConn);
        assert_eq!(s.config.upstream.servers[2].weight, 2);

        let s = example("hash-by-room.toml");
        let rooms = s.config.group(1).expect("the rooms group");
        assert!(matches!(&rooms.method, BalanceMethod::Hash(_)));
        let table = s.routing_table();
        assert!(
            table.contains("# group rooms (hash (consistent)):"),
            "{table}"
        );
        assert!(table.contains("#   /rooms/ -> group rooms"), "{table}");
    }

    #[test]
    fn routes_inherit_server_settings_and_add_header_edits() {
        let s = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[http.set_headers]\nX-Global = \"g\"\n\
             [[server]]\nhost = \"$proxy_host\"\n[server.timeouts]\nread = \"5s\"\n\
             [[server.route]]\npath = \"/a\"\n[server.route.timeouts]\nconnect = \"2s\"\n\
             [server.route.set_headers]\nX-Route = \"r\"\n\
             [[server.route]]\npath = \"/b\"\nhost = \"b.internal\"\n",
            &Overrides::default(),
        )
        .expect("valid");
        let routes = &s.config.virtual_hosts[0].routes;
        let t = routes[0]
            .settings
            .timeouts
            .as_ref()
            .expect("layered timeouts");
        assert_eq!(
            (t.read, t.connect),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!(t.send, s.config.timeouts.send, "the rest stays global");
        assert_eq!(routes[0].settings.host, Some(HostPolicy::Upstream));
        assert_eq!(
            routes[1].settings.host,
            Some(HostPolicy::Literal("b.internal".into()))
        );
        let names: Vec<&str> = routes[0]
            .settings
            .headers
            .as_ref()
            .expect("header edits")
            .iter()
            .map(|r| match r {
                HeaderRule::Set { name, .. } | HeaderRule::Remove { name } => name.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(names, ["X-Global", "X-Route"]);
        assert_eq!(
            routes[1].settings.headers, None,
            "no edits: the global ones apply"
        );
    }

    #[test]
    fn routing_errors_name_the_line_and_what_was_expected() {
        let e = load_str(
            "[upstream.chat]\npeers = [\"127.0.0.1:1\"]\n[[server]]\n[[server.route]]\npath = \"/\"\nupstream = \"nope\"\n",
            &Overrides::default(),
        )
        .expect_err("unknown group");
        assert!(e.contains("line 6") && e.contains("nope"), "{e}");
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\nmethod = \"fastest\"\n",
            &Overrides::default(),
        )
        .expect_err("unknown method");
        assert!(e.contains("line 3") && e.contains("least_conn"), "{e}");
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\nmethod = \"hash\"\n",
            &Overrides::default(),
        )
        .expect_err("hash without a key");
        assert!(e.contains("$arg_room"), "{e}");
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[[server]]\n[[server.route]]\npath = \"ws\"\n",
            &Overrides::default(),
        )
        .expect_err("relative path");
        assert!(e.contains("line 5") && e.contains("path"), "{e}");
    }

    #[test]
    fn proxy_protocol_section() {
        let s = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[proxy_protocol]\nlisten = [\"0.0.0.0:8443\"]\ntrusted = [\"10.0.0.0/8\"]\n",
            &Overrides::default(),
        )
        .expect("valid");
        let pp = s.config.proxy_protocol.as_ref().expect("required");
        assert_eq!(
            pp.listeners,
            ["0.0.0.0:8443".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(pp.trusted[0].to_string(), "10.0.0.0/8");
        assert!(s
            .routing_table()
            .contains("PROXY protocol required on 0.0.0.0:8443, from 10.0.0.0/8"));
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\n[proxy_protocol]\ntrusted = [\"somewhere\"]\n",
            &Overrides::default(),
        )
        .expect_err("bad network");
        assert!(e.contains("line 4") && e.contains("trusted"), "{e}");
    }

    #[test]
    fn health_checks_in_groups() {
        let s = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\nhealth = { check = \"tcp\", interval = \"1s\" }\n\
             [upstream.api]\npeers = [\"127.0.0.1:2\"]\nhealth = { check = \"http\", path = \"/healthz\", expect = \"200-299\", fails = 3 }\n",
            &Overrides::default(),
        )
        .expect("valid");
        let h = s.config.upstream.health.as_ref().expect("a tcp check");
        assert_eq!(
            (h.kind.clone(), h.interval),
            (HealthKind::Tcp, Duration::from_secs(1))
        );
        let h = s.config.groups[0].health.as_ref().expect("an http check");
        assert_eq!(
            h.kind,
            HealthKind::Http {
                path: "/healthz".into(),
                expect: 200..=299
            }
        );
        assert_eq!(h.fails, 3);
        assert!(s
            .routing_table()
            .contains("health: GET /healthz expecting 200-299"));
        let e = load_str(
            "[upstream]\npeers = [\"127.0.0.1:1\"]\nhealth = { check = \"ping\" }\n",
            &Overrides::default(),
        )
        .expect_err("unknown check");
        assert!(e.contains("tcp") && e.contains("ping"), "{e}");
    }

    #[test]
    fn websocket_settings_layer_from_file_server_route_and_flags() {
        let text = "[upstream]\npeers = [\"127.0.0.1:9000\"]\n\
             [websocket]\nping_interval = \"30s\"\nmax_message = \"1m\"\n\
             [[server]]\nserver_names = [\"_\"]\n\
             [[server.route]]\npath = \"/\"\n\
             [[server.route]]\npath = \"/chat/\"\nwebsocket = { ping_timeout = \"3s\", max_frame = \"64k\" }\n";
        let s = load_str(text, &Overrides::default()).expect("valid");
        let global = s.config.websocket.expect("the section turns it on");
        assert_eq!(global.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(global.ping_timeout, Duration::from_secs(10));
        assert_eq!(global.max_message, 1 << 20);
        let routes = &s.config.virtual_hosts[0].routes;
        assert_eq!(
            routes[0].settings.websocket, None,
            "inherits the global one"
        );
        let chat = routes[1].settings.websocket.expect("its own");
        assert_eq!(chat.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(chat.ping_timeout, Duration::from_secs(3));
        assert_eq!(chat.max_frame, 64 << 10);
        assert_eq!(chat.max_message, 1 << 20);
        assert!(s.to_toml().contains("[websocket]\nping_interval = \"30s\""));

        let flags = Overrides {
            upstream: vec!["127.0.0.1:9000".to_owned()],
            ws_max_message: Some(4096),
            ..Overrides::default()
        };
        let s = load_str("", &flags).expect("valid");
        let w = s.config.websocket.expect("a ws flag turns it on");
        assert_eq!((w.max_message, w.ping_interval), (4096, None));
        let s = load_str(
            "[upstream]\npeers = [\"127.0.0.1:9000\"]\n",
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(s.config.websocket, None, "off unless asked for");

        let err = load_str(
            "[upstream]\npeers = [\"127.0.0.1:9000\"]\n[websocket]\nping_every = \"1s\"\n",
            &Overrides::default(),
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("ping_every"), "{err}");
    }

    /// `tls = true` makes every server of the group a TLS peer: SNI and verification name from
    /// `server_name` or the server's host, the group's name as the profile; paths are relative
    /// to the config file.
    #[test]
    fn upstream_tls_marks_every_server_of_the_group() {
        let text = "tls = { cert = \"c.pem\", key = \"/abs/k.pem\" }\n\
                    [upstream]\npeers = [\"app.internal:443\", \"10.0.0.2:8443\"]\ntls = true\n\
                    [upstream.api]\npeers = \"10.0.0.3:443\"\ntls = true\nserver_name = \"api.internal\"\n\
                    insecure_skip_verify = true\n[upstream.plain]\npeers = \"10.0.0.4:80\"\n";
        let file: File = toml::from_str(text).expect("parses");
        let s = build(
            file,
            &Overrides::default(),
            &|k, e| SettingsError(format!("{k}: {e}")),
            Some(Path::new("/etc/sy")),
        )
        .expect("builds");
        let names: Vec<(String, String)> = s
            .config
            .all_groups()
            .flat_map(|g| g.servers.iter())
            .filter_map(|srv| {
                srv.peer
                    .tls()
                    .map(|t| (t.server_name.to_string(), t.profile.to_string()))
            })
            .collect();
        assert_eq!(
            names,
            [
                ("app.internal".to_owned(), DEFAULT_GROUP.to_owned()),
                ("10.0.0.2".to_owned(), DEFAULT_GROUP.to_owned()),
                ("api.internal".to_owned(), "api".to_owned()),
            ]
        );
        assert_eq!(
            s.config.upstream.servers[0].peer.authority(),
            "app.internal",
            "443 is implied"
        );
        assert!(s.upstream_tls["api"].insecure_skip_verify);
        assert!(!s.upstream_tls.contains_key("plain"));
        assert_eq!(s.tls[0].cert, Path::new("/etc/sy/c.pem"));
        assert_eq!(s.tls[0].key, Path::new("/abs/k.pem"));
    }

    /// `check-config` output reads back as the same configuration: for the example config, the
    /// nginx translations, and one with every kind of rule.
    #[test]
    fn the_effective_configuration_round_trips() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut texts: Vec<(String, String)> = std::fs::read_dir(dir.join("examples"))
            .expect("examples dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("read example");
                (p.display().to_string(), text)
            })
            .collect();
        texts.push((
            "switchyard.example.toml".to_owned(),
            std::fs::read_to_string(dir.join("switchyard.example.toml")).expect("example"),
        ));
        texts.push((
            "everything".to_owned(),
            "listen = \"127.0.0.1:18080\"\n\
             tls = [{ cert = \"/etc/a.pem\", key = \"/etc/a.key\" }, { cert = \"b.pem\", key = \"b.key\", listen = \"127.0.0.1:18080\" }]\n\
             tls_handshake_timeout = \"5s\"\nmax_tls_handshakes = 64\n\
             [upstream]\npeers = \"10.0.0.1:80\"\nmethod = \"least_conn\"\ntries = 2\n\
             health = { check = \"http\", path = \"/hz\", expect = \"200-204\", interval = \"3s\" }\n\
             [upstream.chat]\nservers = [{ addr = \"10.0.0.2:80\", weight = 3, backup = false }, \"10.0.0.3:80\"]\n\
             hash = \"room-$arg_room\"\ntls = true\nca = \"ca.pem\"\nserver_name = \"chat.internal\"\n\
             [http]\ntrusted_proxies = \"10.0.0.0/8\"\nset_headers = { X-Real-IP = \"$remote_addr\", X-Cost = \"5$$\" }\n\
             remove_headers = \"X-Debug\"\n\
             [websocket]\nping_interval = \"30s\"\n\
             [proxy_protocol]\ntrusted = [\"10.1.0.0/16\"]\nlisten = \"127.0.0.1:18080\"\n\
             [[server]]\nserver_names = [\"chat.example.com\", \"*.example.org\"]\nset_headers = { X-Site = \"chat\" }\n\
             [[server.route]]\npath = \"= /health\"\n\
             [[server.route]]\npath = \"/ws/\"\nupstream = \"chat\"\nstrip_prefix = true\nhost = \"$proxy_host\"\n\
             timeouts = { tunnel_idle = \"2h\" }\nwebsocket = { max_message = \"64k\" }\nmax_body = \"0\"\n\
             [[server]]\nserver_names = \"_\"\n[[server.route]]\npath = \"/\"\nremove_headers = [\"Cookie\"]\n"
                .to_owned(),
        ));
        for (name, text) in texts {
            let first =
                load_str(&text, &Overrides::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let printed = first.to_toml();
            let second = load_str(&printed, &Overrides::default()).unwrap_or_else(|e| {
                panic!("{name}: the output does not read back: {e}\n{printed}")
            });
            assert_eq!(second.to_toml(), printed, "{name}");
            assert_eq!(
                format!("{:?}", second.config),
                format!("{:?}", first.config),
                "{name}"
            );
            assert_eq!(second.listen, first.listen, "{name}");
            assert_eq!(second.tls, first.tls, "{name}");
            assert_eq!(second.upstream_tls, first.upstream_tls, "{name}");
        }
    }
}
