//! Routing (nginx `server` and `location`): which virtual host a request is for, which route of
//! it matches the path, and the settings and upstream group that route brings. A pure function
//! of the parsed head and the configuration.
//!
//! * **Virtual hosts** are matched by the request's host (the absolute-form authority or
//!   `Host`, without its port, case-insensitively): an exact name first, then the longest
//!   `*.suffix` wildcard, then the default server (the one named `_`, else the first). With no
//!   virtual host configured, every request goes to the default group with the global settings.
//! * **Routes** are matched by path, nginx-style: an exact route (`location = /x`) first, then
//!   the longest prefix (`location /x/`). Matching uses the path as received, before the query,
//!   without percent-decoding or dot-segment removal (the same bytes the upstream receives).
//!   No route matches: the proxy answers 404.
//! * **Prefix stripping** (nginx `proxy_pass http://group/;`): the matched prefix is replaced by
//!   `/` in the path sent upstream.

use std::borrow::Cow;
use std::net::SocketAddr;

use crate::config::{HeaderRule, HostPolicy, Timeouts, WebSocket};
use crate::error::ConfigError;

/// A virtual host (nginx `server`): the names it answers to and its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VirtualHost {
    /// The listener addresses it serves (as bound, e.g. `0.0.0.0:443`); empty serves all.
    pub listen: Vec<SocketAddr>,
    /// Names it answers to; empty or [`ServerName::Default`] makes it the default server.
    pub names: Vec<ServerName>,
    /// Its routes, in any order (matching does not depend on it).
    pub routes: Vec<Route>,
}

impl VirtualHost {
    /// A virtual host for `names` (see [`ServerName::parse`]) with `routes`.
    pub fn new(names: Vec<ServerName>, routes: Vec<Route>) -> Self {
        VirtualHost {
            listen: Vec::new(),
            names,
            routes,
        }
    }
}

/// A name a [`VirtualHost`] answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerName {
    /// This host exactly (lower-case).
    Exact(String),
    /// Any host ending with this suffix, which starts with a dot (from `*.example.com`).
    Suffix(String),
    /// The default server (`_`): requests no other virtual host claims.
    Default,
}

impl ServerName {
    /// Parses `example.com`, `*.example.com` or `_`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::new(
                "server_names",
                format!("a host name, *.suffix or _, got {s:?}"),
            )
        };
        if s == "_" {
            return Ok(ServerName::Default);
        }
        let lower = s.to_ascii_lowercase();
        if let Some(suffix) = lower.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || !valid_name(&suffix[1..]) {
                return Err(bad());
            }
            return Ok(ServerName::Suffix(suffix.to_owned()));
        }
        if !valid_name(&lower) {
            return Err(bad());
        }
        Ok(ServerName::Exact(lower))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// One route (nginx `location`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// Which paths it takes.
    pub path: PathMatch,
    /// Replace the matched prefix with `/` in the path sent upstream.
    pub strip_prefix: bool,
    /// The upstream group: `default` (the config's `upstream`) or one of its `groups` by name.
    pub group: String,
    /// Settings that replace the global ones for requests on this route.
    pub settings: RouteSettings,
}

impl Route {
    /// A route for `path` to `group`, with the global settings.
    pub fn new(path: PathMatch, group: &str) -> Self {
        Route {
            path,
            strip_prefix: false,
            group: group.to_owned(),
            settings: RouteSettings::default(),
        }
    }
}

/// How a [`Route`] matches paths.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathMatch {
    /// Exactly this path (nginx `location = /x`).
    Exact(String),
    /// Every path starting with this (nginx `location /x/`); the longest prefix wins.
    Prefix(String),
}

impl PathMatch {
    /// Parses nginx's spelling: `= /x` is exact, `/x` a prefix.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (exact, path) = match s.strip_prefix('=') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, s),
        };
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'?') {
            return Err(ConfigError::new(
                "path",
                format!("a path starting with / (\"= /x\" for an exact match), got {s:?}"),
            ));
        }
        Ok(if exact {
            PathMatch::Exact(path.to_owned())
        } else {
            PathMatch::Prefix(path.to_owned())
        })
    }

    fn as_str(&self) -> &str {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        }
    }
}

/// Per-route replacements for global settings; `None` keeps the global value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RouteSettings {
    /// Timeouts of exchanges and tunnels on this route (connect, read, send, client body,
    /// tunnel idle and lifetime, FIN). Connection-level timeouts (request head, keep-alive,
    /// linger) stay global: a connection has no route until a request arrives.
    pub timeouts: Option<Timeouts>,
    /// Which `Host` the upstream receives.
    pub host: Option<HostPolicy>,
    /// Header edits.
    pub headers: Option<Vec<HeaderRule>>,
    /// Upgrade protocols that may be tunnelled; an empty list refuses upgrades on this route.
    pub upgrade_protocols: Option<Vec<String>>,
    /// Request body limit in bytes, 0 for none.
    pub max_body: Option<u64>,
    /// The frame-aware tunnel for WebSocket upgrades on this route (replaces the global one).
    pub websocket: Option<WebSocket>,
}

/// Where a request goes: indices into the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouteRef {
    /// The virtual host and route, or `None` for the implicit route (no virtual hosts).
    pub(crate) at: Option<(usize, usize)>,
    /// The group: 0 is the default `upstream`, `i + 1` is `groups[i]`.
    pub(crate) group: usize,
}

/// The virtual host for `host` (a `Host` value, maybe with a port) among those serving the
/// listener at `local` (`None`: the listener is unknown, every virtual host serves it).
pub(crate) fn virtual_host(
    hosts: &[VirtualHost],
    local: Option<SocketAddr>,
    host: Option<&[u8]>,
) -> Option<usize> {
    let serves =
        |vh: &VirtualHost| vh.listen.is_empty() || local.is_none_or(|l| vh.listen.contains(&l));
    let name = host.map(strip_port);
    let exact = name.and_then(|n| {
        hosts.iter().position(|vh| {
            serves(vh)
                && vh.names.iter().any(
                    |s| matches!(s, ServerName::Exact(e) if e.as_bytes().eq_ignore_ascii_case(n)),
                )
        })
    });
    if exact.is_some() {
        return exact;
    }
    let wildcard = name.and_then(|n| {
        hosts
            .iter()
            .enumerate()
            .filter(|(_, vh)| serves(vh))
            .flat_map(|(i, vh)| vh.names.iter().map(move |s| (i, s)))
            .filter_map(|(i, s)| match s {
                ServerName::Suffix(suffix) if ends_with_ci(n, suffix.as_bytes()) => {
                    Some((suffix.len(), i))
                }
                _ => None,
            })
            .max_by_key(|(len, i)| (*len, std::cmp::Reverse(*i)))
            .map(|(_, i)| i)
    });
    wildcard
        .or_else(|| {
            hosts.iter().position(|vh| {
                serves(vh) && (vh.names.is_empty() || vh.names.contains(&ServerName::Default))
            })
        })
        .or_else(|| hosts.iter().position(serves))
}

/// The route of `routes` for `path` (origin-form, query included): exact first, then the
/// longest prefix.
pub(crate) fn route_for(routes: &[Route], path: &[u8]) -> Option<usize> {
    let path = path.split(|b| *b == b'?').next().unwrap_or(path);
    let exact = routes
        .iter()
        .position(|r| matches!(&r.path, PathMatch::Exact(p) if p.as_bytes() == path));
    exact.or_else(|| {
        routes
            .iter()
            .enumerate()
            .filter(
                |(_, r)| matches!(&r.path, PathMatch::Prefix(p) if path.starts_with(p.as_bytes())),
            )
            .max_by_key(|(i, r)| (r.path.as_str().len(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
    })
}

/// The path sent upstream for `path` on `route`: unchanged, or with the matched prefix replaced
/// by `/`.
pub(crate) fn upstream_path<'p>(route: &Route, path: &'p [u8]) -> Cow<'p, [u8]> {
    if !route.strip_prefix {
        return Cow::Borrowed(path);
    }
    let matched = route.path.as_str().len().min(path.len());
    let rest = &path[matched..];
    if rest.first() == Some(&b'/') {
        return Cow::Borrowed(rest);
    }
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(b'/');
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port or [v6]
        return match host.iter().position(|b| *b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|b| *b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

fn ends_with_ci(s: &[u8], suffix: &[u8]) -> bool {
    s.len() > suffix.len() && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<ServerName> {
        list.iter()
            .map(|n| ServerName::parse(n).expect("a valid name"))
            .collect()
    }

    fn hosts() -> Vec<VirtualHost> {
        vec![
            VirtualHost::new(names(&["example.com", "www.example.com"]), vec![]),
            VirtualHost::new(names(&["*.example.com"]), vec![]),
            VirtualHost::new(names(&["*.eu.example.com"]), vec![]),
            VirtualHost::new(names(&["_"]), vec![]),
        ]
    }

    #[test]
    fn hosts_match_exact_then_longest_wildcard_then_default() {
        let h = hosts();
        let cases: [(Option<&str>, usize); 8] = [
            (Some("example.com"), 0),
            (Some("WWW.Example.COM:8080"), 0),
            (Some("chat.example.com"), 1),
            (Some("a.eu.example.com"), 2),
            (Some("example.org"), 3),
            (Some("[::1]:80"), 3),
            (Some("eu.example.com"), 1),
            (None, 3),
        ];
        for (host, want) in cases {
            assert_eq!(
                virtual_host(&h, None, host.map(str::as_bytes)),
                Some(want),
                "{host:?}"
            );
        }
        // Without a default server, the first one takes the rest.
        let no_default = &h[..3];
        assert_eq!(virtual_host(no_default, None, Some(b"other.test")), Some(0));
        assert_eq!(virtual_host(&[], None, Some(b"x")), None);
    }

    #[test]
    fn a_virtual_host_serves_only_its_listeners() {
        let mut h = hosts();
        let tls: SocketAddr = "0.0.0.0:443".parse().expect("addr");
        let plain: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        h[0].listen = vec![tls];
        assert_eq!(virtual_host(&h, Some(tls), Some(b"example.com")), Some(0));
        assert_eq!(
            virtual_host(&h, Some(plain), Some(b"example.com")),
            Some(3),
            "not served on :80, so the default server takes it"
        );
    }

    fn routes(spec: &[&str]) -> Vec<Route> {
        spec.iter()
            .map(|p| Route::new(PathMatch::parse(p).expect("a valid path"), "default"))
            .collect()
    }

    #[test]
    fn paths_match_exact_then_longest_prefix() {
        let r = routes(&["/", "/ws/", "/ws/admin", "= /ws/", "/api"]);
        let cases: [(&str, Option<usize>); 8] = [
            ("/", Some(0)),
            ("/index.html", Some(0)),
            ("/ws/", Some(3)),
            ("/ws/?room=1", Some(3)),
            ("/ws/room/1", Some(1)),
            ("/ws/admin/x", Some(2)),
            ("/apix", Some(4)),
            ("/w", Some(0)),
        ];
        for (path, want) in cases {
            assert_eq!(route_for(&r, path.as_bytes()), want, "{path}");
        }
        assert_eq!(
            route_for(&routes(&["/ws/"]), b"/other"),
            None,
            "no route: 404"
        );
    }

    #[test]
    fn strip_prefix_replaces_the_match_with_a_slash() {
        let mut r = Route::new(PathMatch::parse("/chat/").expect("path"), "default");
        r.strip_prefix = true;
        assert_eq!(&*upstream_path(&r, b"/chat/room/1?x=2"), b"/room/1?x=2");
        assert_eq!(&*upstream_path(&r, b"/chat/"), b"/");
        let mut r = Route::new(PathMatch::parse("/api").expect("path"), "default");
        r.strip_prefix = true;
        assert_eq!(&*upstream_path(&r, b"/api/v1"), b"/v1");
        assert_eq!(&*upstream_path(&r, b"/apiv1"), b"/v1");
        r.strip_prefix = false;
        assert_eq!(&*upstream_path(&r, b"/api/v1"), b"/api/v1");
    }

    #[test]
    fn names_and_paths_are_checked() {
        assert!(ServerName::parse("*example.com").is_err());
        assert!(ServerName::parse("exa mple.com").is_err());
        assert_eq!(
            ServerName::parse("*.Example.com").expect("valid"),
            ServerName::Suffix(".example.com".into())
        );
        assert!(PathMatch::parse("ws/").is_err());
        assert!(PathMatch::parse("/a?b").is_err());
        assert_eq!(
            PathMatch::parse("= /x").expect("valid"),
            PathMatch::Exact("/x".into())
        );
    }
}
