//! What a session needs to know, as plain data: where to send requests, how long to wait, how
//! much to accept, and how to rewrite heads. The CLI builds one from flags and TOML; an embedder
//! builds one in code. A session keeps the `Arc<Config>` it started with, so a reload never
//! changes the rules under a live connection.
//!
//! # Defaults
//!
//! Every timeout and limit, with the nginx or HAProxy directive it corresponds to. A zero
//! duration disables that timer.
//!
//! | field | default | like | meaning |
//! |---|---|---|---|
//! | `timeouts.request_head` | 60 s | `client_header_timeout` | total time to receive a request head, from its first byte (or from accept, for the first request) |
//! | `timeouts.keep_alive` | 75 s | `keepalive_timeout` | idle time allowed between requests on a client connection |
//! | `timeouts.client_body` | 60 s | `client_body_timeout` | time between two reads of a request body |
//! | `timeouts.connect` | 60 s | `proxy_connect_timeout` | time to establish the upstream connection → 504 |
//! | `timeouts.read` | 60 s | `proxy_read_timeout` | time to the response head, and between two reads of the response body → 504 / close |
//! | `timeouts.send` | 60 s | `send_timeout` / `proxy_send_timeout` | time a side may leave written bytes unaccepted |
//! | `timeouts.tunnel_idle` | 1 h | HAProxy `timeout tunnel` | no byte in either direction of an upgraded connection |
//! | `timeouts.tunnel_lifetime` | off | — | absolute lifetime of a tunnel |
//! | `timeouts.fin` | 30 s | HAProxy `timeout client-fin` | a half-closed tunnel waits this long for the other direction |
//! | `timeouts.linger` | 5 s | `lingering_timeout` | after a final response, how long unread client bytes are drained before close |
//! | `limits.max_head` | 32 KiB | `large_client_header_buffers` | request/response head size → 431 / 502 |
//! | `limits.max_headers` | 100 | — | header field count → 431 / 502 |
//! | `limits.max_uri` | 8 KiB | — | request-target length → 414 |
//! | `limits.max_body` | 1 MiB | `client_max_body_size` | request body size, 0 = unlimited → 413 |
//! | `limits.max_held` | 64 KiB | — | client bytes held while the upstream has not answered (pipelining, might-switch) |
//! | `limits.queue` | 64 KiB | — | unacknowledged bytes per direction before the source stops being read |
//! | `limits.max_requests` | 1000 | `keepalive_requests` | requests per client connection |
//!
//! [`WebSocket`] (the frame-aware tunnel) is off unless configured; its own table is on the type.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;
use crate::health::HealthCheck;
use crate::route::VirtualHost;

/// Everything a [`Session`](crate::Session) needs. Build with [`Config::new`] and adjust fields;
/// check with [`Config::validate`] before use.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The default upstream group (named `default`): every request goes here when no virtual
    /// host is configured.
    pub upstream: UpstreamGroup,
    /// More upstream groups, each with a unique `name`, for routes to name.
    pub groups: Vec<UpstreamGroup>,
    /// Virtual hosts and their routes (nginx `server` / `location`); empty means one implicit
    /// route for everything, to `upstream`.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Timeouts (see the module table).
    pub timeouts: Timeouts,
    /// Size and count limits (see the module table).
    pub limits: Limits,
    /// Which `Host` the upstream receives.
    pub host: HostPolicy,
    /// Extra header edits applied to every forwarded request, in order, after hop-by-hop removal
    /// and before the proxy's own `X-Forwarded-*` headers.
    pub headers: Vec<HeaderRule>,
    /// Clients whose `X-Forwarded-*` headers are believed and extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// Upgrade protocols that may be tunnelled (lower-case tokens). `h2c` is never accepted.
    pub upgrade_protocols: Vec<String>,
    /// Verify `Sec-WebSocket-Accept` on websocket `101`s (on by default).
    pub check_websocket_accept: bool,
    /// Listeners behind an L4 balancer that sends a PROXY protocol header (nginx
    /// `listen ... proxy_protocol`); `None` for none.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The frame-aware WebSocket tunnel (keepalive pings, dead-peer detection, Close 1001 on
    /// drain, message limits); `None`: tunnels relay opaque bytes. A route may set its own.
    pub websocket: Option<WebSocket>,
}

/// The frame-aware tunnel for WebSocket upgrades. With it, the proxy reads frame headers (never
/// payload) in both directions of a tunnel, which lets it:
///
/// * send its own Ping after `ping_interval` of silence from a side and close the tunnel as
///   dead when no Pong comes within `ping_timeout` (the other side gets Close 1001); the
///   matching Pong is consumed, the peers' own pings and pongs pass untouched;
/// * on a drain, send Close 1001 "Going Away" to both peers at a frame boundary, at a moment
///   spread over `close_spread` so clients do not all reconnect at once, then wait up to
///   `close_timeout` for the closing handshake;
/// * refuse a frame over `max_frame` or a message over `max_message` (Close 1009 to the sender,
///   1001 to the other side) before any byte of it is passed on, and an unmasked client frame
///   (Close 1002) when `require_mask`.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `ping_interval` | off | silence from a side before the proxy pings it |
/// | `ping_timeout` | 10 s | wait for the Pong before the peer counts as dead |
/// | `max_frame` | 0 (none) | largest frame payload, bytes on the wire |
/// | `max_message` | 0 (none) | largest message, bytes on the wire (compressed, with permessage-deflate) |
/// | `close_spread` | 10 s | window over which a drain spreads its Close frames |
/// | `close_timeout` | 5 s | wait for the peers' Close replies before the TCP close |
/// | `require_mask` | true | client frames must be masked (RFC 6455 §5.1) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebSocket {
    /// Silence from a side before the proxy sends it a Ping; `None` for no keepalive.
    pub ping_interval: Option<Duration>,
    /// How long a Ping waits for its Pong.
    pub ping_timeout: Duration,
    /// Largest frame payload in bytes, 0 for no limit.
    pub max_frame: u64,
    /// Largest message in bytes (all its frames' payload as on the wire), 0 for no limit.
    pub max_message: u64,
    /// The window a drain spreads its Close frames over.
    pub close_spread: Duration,
    /// How long the proxy waits for the closing handshake after sending Close.
    pub close_timeout: Duration,
    /// Refuse unmasked client frames with Close 1002.
    pub require_mask: bool,
}

impl Default for WebSocket {
    fn default() -> Self {
        WebSocket {
            ping_interval: None,
            ping_timeout: Duration::from_secs(10),
            max_frame: 0,
            max_message: 0,
            close_spread: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            require_mask: true,
        }
    }
}

impl WebSocket {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.ping_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                format!("{field}.ping_interval"),
                "a duration above zero (leave it out for no keepalive)",
            ));
        }
        if self.ping_interval.is_some() && self.ping_timeout.is_zero() {
            return Err(ConfigError::new(
                format!("{field}.ping_timeout"),
                "a duration above zero",
            ));
        }
        Ok(())
    }
}

/// Which connections must start with a PROXY protocol header (v1 or v2), and from whom it is
/// believed. The client address it carries replaces the socket's everywhere (`$remote_addr`,
/// `X-Forwarded-For`, IP hash). A connection without a valid header, or from a source not in
/// `trusted`, is closed without an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyProtocol {
    /// The listener addresses (as bound) that require it; empty means every listener.
    pub listeners: Vec<SocketAddr>,
    /// The balancers allowed to send it.
    pub trusted: Vec<IpNet>,
}

impl ProxyProtocol {
    /// Every listener requires the header, from these sources.
    pub fn new(trusted: Vec<IpNet>) -> Self {
        ProxyProtocol {
            listeners: Vec::new(),
            trusted,
        }
    }

    /// Whether a connection accepted by the listener at `local` must start with the header.
    pub fn applies_to(&self, local: Option<SocketAddr>) -> bool {
        self.listeners.is_empty() || local.is_some_and(|l| self.listeners.contains(&l))
    }
}

impl Config {
    /// A configuration sending everything to `upstream`, with every other field at its default.
    pub fn new(upstream: UpstreamGroup) -> Self {
        Config {
            upstream,
            groups: Vec::new(),
            virtual_hosts: Vec::new(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            host: HostPolicy::default(),
            headers: Vec::new(),
            trusted_proxies: Vec::new(),
            upgrade_protocols: vec!["websocket".to_owned()],
            check_websocket_accept: true,
            proxy_protocol: None,
            websocket: None,
        }
    }

    /// Group `i`: 0 is [`upstream`](Self::upstream), `i + 1` is `groups[i]`. Balancer and
    /// events index groups this way.
    pub fn group(&self, i: usize) -> Option<&UpstreamGroup> {
        match i {
            0 => Some(&self.upstream),
            i => self.groups.get(i - 1),
        }
    }

    /// Every group, in [`group`](Self::group) order.
    pub fn all_groups(&self) -> impl Iterator<Item = &UpstreamGroup> {
        std::iter::once(&self.upstream).chain(&self.groups)
    }

    /// The index (see [`group`](Self::group)) of the group called `name`.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        if name == DEFAULT_GROUP {
            return Some(0);
        }
        self.groups
            .iter()
            .position(|g| g.name == name)
            .map(|i| i + 1)
    }

    /// Checks the invariants the session relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let default_used = self.virtual_hosts.is_empty()
            || self
                .virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .any(|r| r.group == DEFAULT_GROUP);
        // The default group may be left empty when only named groups are routed to.
        if default_used || !self.upstream.servers.is_empty() {
            self.upstream.validate("upstream")?;
        }
        for (i, g) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}]");
            if g.name.is_empty() || g.name == DEFAULT_GROUP {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    "a name other than \"default\" (which is `upstream`)",
                ));
            }
            if self.groups[..i].iter().any(|o| o.name == g.name) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!("a name not used by another group, got {:?}", g.name),
                ));
            }
            g.validate(&field)?;
        }
        for (v, vh) in self.virtual_hosts.iter().enumerate() {
            if vh.routes.is_empty() {
                return Err(ConfigError::new(
                    format!("virtual_hosts[{v}].routes"),
                    "at least one route",
                ));
            }
            for (r, route) in vh.routes.iter().enumerate() {
                let field = format!("virtual_hosts[{v}].routes[{r}]");
                if self.group_index(&route.group).is_none() {
                    return Err(ConfigError::new(
                        format!("{field}.group"),
                        format!("\"default\" or the name of a group, got {:?}", route.group),
                    ));
                }
                let st = &route.settings;
                if let Some(h) = &st.headers {
                    validate_headers(&format!("{field}.headers"), h)?;
                }
                if let Some(p) = &st.upgrade_protocols {
                    validate_protocols(&format!("{field}.upgrade_protocols"), p)?;
                }
                if let Some(h) = &st.host {
                    validate_host_policy(&format!("{field}.host"), h)?;
                }
                if let Some(w) = &st.websocket {
                    w.validate(&format!("{field}.websocket"))?;
                }
            }
        }
        if let Some(w) = &self.websocket {
            w.validate("websocket")?;
        }
        let l = &self.limits;
        if l.max_head < 64 {
            return Err(ConfigError::new("limits.max_head", "at least 64 bytes"));
        }
        if l.max_headers == 0 {
            return Err(ConfigError::new("limits.max_headers", "at least 1"));
        }
        if l.max_uri == 0 || l.max_uri > l.max_head {
            return Err(ConfigError::new(
                "limits.max_uri",
                "between 1 and limits.max_head",
            ));
        }
        if l.queue == 0 || l.max_held == 0 {
            return Err(ConfigError::new(
                "limits.queue / limits.max_held",
                "at least 1 byte",
            ));
        }
        if l.max_requests == 0 {
            return Err(ConfigError::new("limits.max_requests", "at least 1"));
        }
        validate_protocols("upgrade_protocols", &self.upgrade_protocols)?;
        validate_headers("headers", &self.headers)?;
        validate_host_policy("host", &self.host)?;
        Ok(())
    }
}

/// The name of [`Config::upstream`] in routes.
pub const DEFAULT_GROUP: &str = "default";

fn validate_protocols(field: &str, protocols: &[String]) -> Result<(), ConfigError> {
    for (i, p) in protocols.iter().enumerate() {
        let field = format!("{field}[{i}]");
        if p.is_empty() || !p.bytes().all(crate::fields::is_token_byte) {
            return Err(ConfigError::new(
                field,
                "an HTTP token such as \"websocket\"",
            ));
        }
        if p.eq_ignore_ascii_case("h2c") {
            return Err(ConfigError::new(
                field,
                "a protocol other than h2c (never tunnelled)",
            ));
        }
    }
    Ok(())
}

fn validate_headers(field: &str, rules: &[HeaderRule]) -> Result<(), ConfigError> {
    for (i, rule) in rules.iter().enumerate() {
        let name = match rule {
            HeaderRule::Set { name, .. } | HeaderRule::Remove { name } => name,
        };
        if name.is_empty() || !name.bytes().all(crate::fields::is_token_byte) {
            return Err(ConfigError::new(
                format!("{field}[{i}].name"),
                "an HTTP field name",
            ));
        }
        if crate::fields::is_framing_or_hop(name.as_bytes()) {
            return Err(ConfigError::new(
                format!("{field}[{i}].name"),
                "a header other than Host, Content-Length, Transfer-Encoding and hop-by-hop headers",
            ));
        }
    }
    Ok(())
}

fn validate_host_policy(field: &str, host: &HostPolicy) -> Result<(), ConfigError> {
    if let HostPolicy::Literal(h) = host {
        if h.is_empty() || !crate::fields::is_valid_host(h.as_bytes()) {
            return Err(ConfigError::new(
                field,
                "a host[:port] without spaces or control bytes",
            ));
        }
    }
    Ok(())
}

/// A set of interchangeable upstream servers (nginx `upstream`), the method that chooses among
/// them, and how hard to try before giving up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamGroup {
    /// Its name in routes (`default` for [`Config::upstream`]).
    pub name: String,
    /// The servers, in configuration order.
    pub servers: Vec<UpstreamServer>,
    /// How a server is chosen.
    pub method: BalanceMethod,
    /// Connection attempts per request, on different servers, before the client gets a 502
    /// (or 504); 0 means every server once. nginx: `proxy_next_upstream_tries`.
    pub tries: u32,
    /// How long all attempts of one request may take together; zero for no limit. nginx:
    /// `proxy_next_upstream_timeout`.
    pub try_timeout: Duration,
    /// An active health check of every server, if any (servers that fail it are skipped).
    pub health: Option<HealthCheck>,
}

impl UpstreamGroup {
    /// A round-robin group of these peers, each with default server settings.
    pub fn new(peers: Vec<Peer>) -> Self {
        Self::with_servers(peers.into_iter().map(UpstreamServer::new).collect())
    }

    /// A round-robin group of these servers.
    pub fn with_servers(servers: Vec<UpstreamServer>) -> Self {
        UpstreamGroup {
            name: DEFAULT_GROUP.to_owned(),
            servers,
            method: BalanceMethod::RoundRobin,
            tries: 0,
            try_timeout: Duration::ZERO,
            health: None,
        }
    }

    /// The same group, called `name` (for [`Config::groups`]).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The same group, balanced by `method`.
    pub fn method(mut self, method: BalanceMethod) -> Self {
        self.method = method;
        self
    }

    /// The peers of every server, in order.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.servers.iter().map(|s| &s.peer)
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::new(field, "at least one server"));
        }
        if self.servers.iter().all(|s| s.backup) {
            return Err(ConfigError::new(
                format!("{field}.servers"),
                "at least one server that is not a backup",
            ));
        }
        if self.servers.len() > MAX_SERVERS {
            return Err(ConfigError::new(
                format!("{field}.servers"),
                format!("at most {MAX_SERVERS} servers"),
            ));
        }
        if let Some(h) = &self.health {
            h.validate(field)?;
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.weight == 0 || s.weight > MAX_WEIGHT {
                return Err(ConfigError::new(
                    format!("{field}.servers[{i}].weight"),
                    format!("between 1 and {MAX_WEIGHT}"),
                ));
            }
            if s.backup
                && !matches!(
                    self.method,
                    BalanceMethod::RoundRobin | BalanceMethod::LeastConn
                )
            {
                return Err(ConfigError::new(
                    format!("{field}.servers[{i}].backup"),
                    "no backup servers with the hash methods (as in nginx)",
                ));
            }
        }
        Ok(())
    }
}

/// A piece of a text with `$variables`.
enum Piece<'a> {
    Text(String),
    Var(&'a str),
}

/// Splits `text` into literal runs and `$name` variables (names are letters, digits and `_`);
/// `$$` is a literal dollar. Shared by header templates and hash keys.
fn split_variables(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        lit.push_str(&rest[..pos]);
        rest = &rest[pos + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            lit.push('$');
            rest = r;
            continue;
        }
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if !lit.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut lit)));
        }
        pieces.push(Piece::Var(&rest[..len]));
        rest = &rest[len..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Text(lit));
    }
    pieces
}

/// Most servers one group may have (server indices are 16-bit in the balancer's tables).
pub const MAX_SERVERS: usize = 4096;

/// Largest `weight` a server may have (keeps the smooth round-robin schedule small).
pub const MAX_WEIGHT: u32 = 100;

/// One server of an [`UpstreamGroup`], with nginx's `server` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamServer {
    /// Where it is.
    pub peer: Peer,
    /// Relative share of requests (round-robin, hash ring points) or of connections
    /// (least-connections). Default 1.
    pub weight: u32,
    /// Most connections (requests in flight and open tunnels) at once; 0 for no limit.
    pub max_conns: u32,
    /// Failed attempts within `fail_timeout` after which the server is considered unavailable
    /// for `fail_timeout`; 0 never marks it. Default 1. Ignored for a group of one server.
    pub max_fails: u32,
    /// The window for counting failures, and how long an unavailable server is skipped.
    /// Default 10 s.
    pub fail_timeout: Duration,
    /// Used only when every other server is unavailable.
    pub backup: bool,
}

impl UpstreamServer {
    /// `peer` with nginx's defaults: weight 1, no connection limit, max_fails 1,
    /// fail_timeout 10 s, not a backup.
    pub fn new(peer: Peer) -> Self {
        UpstreamServer {
            peer,
            weight: 1,
            max_conns: 0,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
        }
    }

    /// The same server with `weight`.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same server as a backup.
    pub fn backup(mut self) -> Self {
        self.backup = true;
        self
    }
}

/// How a group chooses a server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BalanceMethod {
    /// Smooth weighted round-robin (nginx's default).
    #[default]
    RoundRobin,
    /// The server with the fewest open connections relative to its weight; open WebSocket
    /// tunnels count, which is what matters for long-lived connections. nginx: `least_conn`.
    LeastConn,
    /// The client's address picks the server. nginx: `ip_hash`.
    IpHash,
    /// A key built from request variables, on a consistent-hash ring (ketama-style): a server
    /// joining or leaving moves about 1/N of the keys. nginx: `hash $key consistent`.
    Hash(HashKey),
}

/// The key of [`BalanceMethod::Hash`]: literal text and variables, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashKey {
    parts: Vec<KeyPart>,
}

/// One piece of a [`HashKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyPart {
    /// Text as written.
    Literal(String),
    /// `$remote_addr`.
    RemoteAddr,
    /// `$uri`: the request path without its query.
    Uri,
    /// `$arg_NAME`: a query parameter's value.
    Arg(String),
    /// `$cookie_NAME`: a cookie's value.
    Cookie(String),
    /// `$http_NAME`: a request header's value (`_` in NAME stands for `-`).
    Header(String),
}

impl HashKey {
    /// Parses a key such as `$arg_room` or `$http_x_tenant:$uri`. `$$` is a literal dollar.
    pub fn parse(key: &str) -> Result<Self, ConfigError> {
        let parts = split_variables(key)
            .into_iter()
            .map(|piece| {
                let name = match piece {
                    Piece::Text(t) => return Ok(KeyPart::Literal(t)),
                    Piece::Var(name) => name,
                };
                if name == "remote_addr" {
                    Ok(KeyPart::RemoteAddr)
                } else if name == "uri" {
                    Ok(KeyPart::Uri)
                } else if let Some(n) = name.strip_prefix("arg_").filter(|n| !n.is_empty()) {
                    Ok(KeyPart::Arg(n.to_owned()))
                } else if let Some(n) = name.strip_prefix("cookie_").filter(|n| !n.is_empty()) {
                    Ok(KeyPart::Cookie(n.to_owned()))
                } else if let Some(n) = name.strip_prefix("http_").filter(|n| !n.is_empty()) {
                    Ok(KeyPart::Header(n.replace('_', "-")))
                } else {
                    Err(ConfigError::new(
                        "hash",
                        format!(
                            "a key of text and $remote_addr, $uri, $arg_NAME, $cookie_NAME, $http_NAME; got ${name}"
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parts.is_empty() {
            return Err(ConfigError::new("hash", "a non-empty key"));
        }
        Ok(HashKey { parts })
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[KeyPart] {
        &self.parts
    }
}

/// One upstream server, by host (a name or an IP literal) and port. The adapter resolves and
/// connects; the core only uses the authority for `Host` and logging.
#[derive(Debug, Clone)]
pub struct Peer {
    host: Arc<str>,
    port: u16,
    /// Computed once: every request with the `$proxy_host` policy sends it.
    authority: Arc<str>,
    /// Reached over TLS, as this target; `None` for plain TCP.
    tls: Option<TlsTarget>,
}

/// How the adapter reaches a peer over TLS: the name it sends (SNI) and verifies the
/// certificate against, and the client profile (CA set, verification) it uses. The profile is
/// a name the adapter was given settings for — by the CLI, the upstream group's name. The core
/// only carries it: it keeps a TLS peer and a plain one at the same address apart (the pool
/// never hands one out for the other).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsTarget {
    /// The name sent as SNI and matched against the certificate.
    pub server_name: Arc<str>,
    /// Which of the adapter's TLS client settings to use.
    pub profile: Arc<str>,
}

impl Peer {
    /// A peer at `host:port`. `host` may be a name, an IPv4 literal, or an IPv6 literal with or
    /// without brackets.
    pub fn new(host: &str, port: u16) -> Self {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == 80 {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Peer {
            host: Arc::from(host),
            port,
            authority: Arc::from(authority),
            tls: None,
        }
    }

    /// The same peer, reached over TLS as `target`. Its authority (`$proxy_host`) omits port
    /// 443 instead of 80.
    pub fn with_tls(mut self, target: TlsTarget) -> Self {
        let bracketed = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.to_string()
        };
        self.authority = Arc::from(if self.port == 443 {
            bracketed
        } else {
            format!("{bracketed}:{}", self.port)
        });
        self.tls = Some(target);
        self
    }

    /// How to reach this peer over TLS; `None` for plain TCP.
    pub fn tls(&self) -> Option<&TlsTarget> {
        self.tls.as_ref()
    }

    /// Parses `host:port` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::new("upstream", format!("host:port, got {s:?}"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
            return Err(bad());
        }
        if !crate::fields::is_valid_host(host.as_bytes()) {
            return Err(bad());
        }
        Ok(Peer::new(host, port))
    }

    /// The host, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` as it goes in a `Host` header (nginx's `$proxy_host`): the port is omitted
    /// when it is 80, and IPv6 literals are bracketed.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

// Identity is host, port and transport; the authority is derived from them, so it is left out
// of the comparison and the hash (the pool hashes a peer on every check-out and release).
impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        self.port == other.port && self.host == other.host && self.tls == other.tls
    }
}

impl Eq for Peer {}

impl std::hash::Hash for Peer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.host.hash(state);
        self.port.hash(state);
        self.tls.hash(state);
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// All timeouts. A zero duration disables that timer. See the module table for defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Total time to receive a request head.
    pub request_head: Duration,
    /// Idle time between requests on a kept-alive client connection.
    pub keep_alive: Duration,
    /// Time between two reads of a request body.
    pub client_body: Duration,
    /// Time to establish an upstream connection.
    pub connect: Duration,
    /// Time to the response head, and between two reads of the response body.
    pub read: Duration,
    /// Time a side may leave written bytes unaccepted.
    pub send: Duration,
    /// Time with no byte in either direction of a tunnel.
    pub tunnel_idle: Duration,
    /// Absolute lifetime of a tunnel; `None` for no limit.
    pub tunnel_lifetime: Option<Duration>,
    /// How long a half-closed tunnel waits for the other direction to finish.
    pub fin: Duration,
    /// How long unread client bytes are drained after a final response before closing.
    pub linger: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_head: Duration::from_secs(60),
            keep_alive: Duration::from_secs(75),
            client_body: Duration::from_secs(60),
            connect: Duration::from_secs(60),
            read: Duration::from_secs(60),
            send: Duration::from_secs(60),
            tunnel_idle: Duration::from_secs(3600),
            tunnel_lifetime: None,
            fin: Duration::from_secs(30),
            linger: Duration::from_secs(5),
        }
    }
}

/// All size and count limits. See the module table for defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Maximum request or response head size in bytes.
    pub max_head: usize,
    /// Maximum number of header fields in a head.
    pub max_headers: usize,
    /// Maximum request-target length in bytes.
    pub max_uri: usize,
    /// Maximum request body in bytes; 0 means unlimited.
    pub max_body: u64,
    /// Maximum client bytes held while waiting for the upstream's answer.
    pub max_held: usize,
    /// Unacknowledged bytes per direction before the source stops being read.
    pub queue: usize,
    /// Maximum requests served on one client connection.
    pub max_requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 32 * 1024,
            max_headers: 100,
            max_uri: 8 * 1024,
            max_body: 1024 * 1024,
            max_held: 64 * 1024,
            queue: 64 * 1024,
            max_requests: 1000,
        }
    }
}

/// Which `Host` header the upstream receives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostPolicy {
    /// The client's `Host` (or, if it sent none, the peer's authority). nginx: `$host`.
    #[default]
    Client,
    /// The chosen peer's authority, `host[:port]`. nginx's default `$proxy_host`.
    Upstream,
    /// This literal value.
    Literal(String),
}

/// One edit to forwarded request heads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderRule {
    /// Replace every field of this name with one whose value is the expanded template.
    Set {
        /// Field name (case-insensitive).
        name: String,
        /// The value, possibly with variables.
        value: Template,
    },
    /// Remove every field of this name.
    Remove {
        /// Field name (case-insensitive).
        name: String,
    },
}

/// A header value with `$variables`, parsed once at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

/// A variable a [`Template`] can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Variable {
    /// `$remote_addr`: the client's IP address.
    RemoteAddr,
    /// `$host`: the client's `Host` without port semantics applied (as received).
    Host,
    /// `$scheme`: `http` or `https`.
    Scheme,
    /// `$request_uri`: the request target as received.
    RequestUri,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TemplatePart {
    Literal(String),
    Var(Variable),
}

impl Template {
    /// Parses `value`, expanding `$remote_addr`, `$host`, `$scheme` and `$request_uri` at request
    /// time. `$$` is a literal dollar. Values with control bytes are refused.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(ConfigError::new(
                "value",
                "a header value without control characters",
            ));
        }
        let parts = split_variables(value)
            .into_iter()
            .map(|piece| match piece {
                Piece::Text(t) => Ok(TemplatePart::Literal(t)),
                Piece::Var(name) => match name {
                    "remote_addr" => Ok(TemplatePart::Var(Variable::RemoteAddr)),
                    "host" => Ok(TemplatePart::Var(Variable::Host)),
                    "scheme" => Ok(TemplatePart::Var(Variable::Scheme)),
                    "request_uri" => Ok(TemplatePart::Var(Variable::RequestUri)),
                    other => Err(ConfigError::new(
                        "value",
                        format!(
                            "one of $remote_addr, $host, $scheme, $request_uri (or $$), got ${other}"
                        ),
                    )),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Template { parts })
    }

    pub(crate) fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }
}

/// An IP network in CIDR notation, for trusted-proxy lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// `addr/prefix`, as [`IpNet::parse`] reads it.
/// Writes `text` so that [`split_variables`] reads it back as this literal.
fn write_literal(f: &mut std::fmt::Formatter<'_>, text: &str) -> std::fmt::Result {
    f.write_str(&text.replace('$', "$$"))
}

/// The key as it is written in a configuration (parses back to the same key).
impl std::fmt::Display for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for part in &self.parts {
            match part {
                KeyPart::Literal(t) => write_literal(f, t)?,
                KeyPart::RemoteAddr => f.write_str("$remote_addr")?,
                KeyPart::Uri => f.write_str("$uri")?,
                KeyPart::Arg(n) => write!(f, "$arg_{n}")?,
                KeyPart::Cookie(n) => write!(f, "$cookie_{n}")?,
                KeyPart::Header(n) => write!(f, "$http_{}", n.replace('-', "_"))?,
            }
        }
        Ok(())
    }
}

/// The value as it is written in a configuration (parses back to the same template).
impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for part in &self.parts {
            match part {
                TemplatePart::Literal(t) => write_literal(f, t)?,
                TemplatePart::Var(Variable::RemoteAddr) => f.write_str("$remote_addr")?,
                TemplatePart::Var(Variable::Host) => f.write_str("$host")?,
                TemplatePart::Var(Variable::Scheme) => f.write_str("$scheme")?,
                TemplatePart::Var(Variable::RequestUri) => f.write_str("$request_uri")?,
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `::1/128`, or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::new(
                "trusted_proxies",
                format!("an IP or CIDR network, got {s:?}"),
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys_parse_variables_and_text() {
        let k = HashKey::parse("$http_x_tenant:$uri$$").expect("a valid key");
        assert_eq!(
            k.parts(),
            [
                KeyPart::Header("x-tenant".into()),
                KeyPart::Literal(":".into()),
                KeyPart::Uri,
                KeyPart::Literal("$".into()),
            ]
        );
        assert_eq!(
            HashKey::parse("room-$arg_room-$cookie_sid")
                .expect("valid")
                .parts(),
            [
                KeyPart::Literal("room-".into()),
                KeyPart::Arg("room".into()),
                KeyPart::Literal("-".into()),
                KeyPart::Cookie("sid".into()),
            ]
        );
        assert!(HashKey::parse("$arg_").is_err());
        assert!(HashKey::parse("$request_id").is_err());
        assert!(HashKey::parse("").is_err());
    }

    #[test]
    fn ipnet_contains() {
        let n = IpNet::parse("10.1.0.0/16").expect("valid");
        assert!(n.contains("10.1.200.3".parse().expect("ip")));
        assert!(!n.contains("10.2.0.1".parse().expect("ip")));
        assert!(n.contains("::ffff:10.1.0.9".parse().expect("ip")));
        let all = IpNet::parse("0.0.0.0/0").expect("valid");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        let one = IpNet::parse("::1").expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("nope").is_err());
    }

    #[test]
    fn template_parsing() {
        let t = Template::parse("a $remote_addr-$$-$host").expect("valid");
        assert_eq!(
            t.parts(),
            &[
                TemplatePart::Literal("a ".into()),
                TemplatePart::Var(Variable::RemoteAddr),
                TemplatePart::Literal("-$-".into()),
                TemplatePart::Var(Variable::Host),
            ]
        );
        assert!(Template::parse("$nope").is_err());
        assert!(Template::parse("a\r\nb").is_err());
    }

    #[test]
    fn peer_parse_and_authority() {
        let p = Peer::parse("127.0.0.1:8080").expect("valid");
        assert_eq!(p.authority(), "127.0.0.1:8080");
        assert_eq!(
            Peer::parse("example.com:80").expect("valid").authority(),
            "example.com"
        );
        let v6 = Peer::parse("[::1]:9000").expect("valid");
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.to_string(), "[::1]:9000");
        assert!(Peer::parse("::1:9000").is_err());
        assert!(Peer::parse("host").is_err());
        assert!(Peer::parse("host:99999").is_err());
    }

    #[test]
    fn validate_rejects_h2c_and_empty_upstream() {
        let mut c = Config::new(UpstreamGroup::new(vec![]));
        assert_eq!(
            c.validate().map_err(|e| e.field),
            Err("upstream".to_owned())
        );
        c.upstream = UpstreamGroup::new(vec![Peer::new("127.0.0.1", 1)]);
        assert!(c.validate().is_ok());
        c.upgrade_protocols.push("h2c".into());
        assert!(c.validate().is_err());
    }

    #[test]
    fn keys_and_templates_print_as_they_parse() {
        for text in [
            "room-$arg_room:$http_x_user",
            "$remote_addr$uri",
            "a$$b$cookie_sid",
        ] {
            let key = HashKey::parse(text).expect("a valid key");
            assert_eq!(key.to_string(), text);
            assert_eq!(HashKey::parse(&key.to_string()).expect("reparses"), key);
        }
        for text in [
            "$remote_addr",
            "https://$host$request_uri",
            "cost: 5$$",
            "$scheme",
        ] {
            let t = Template::parse(text).expect("a valid template");
            assert_eq!(t.to_string(), text);
            assert_eq!(Template::parse(&t.to_string()).expect("reparses"), t);
        }
    }
}
