//! Everything the binary runs with: the TOML file, overridden by flags, turned into a
//! [`proxy_core::Config`] plus the adapter settings. Every error names the file, the line, the
//! key and what was expected.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_core::{Config, HeaderRule, HostPolicy, IpNet, Peer, Template, UpstreamGroup};
use serde::Deserialize;

use crate::access_log;
use crate::units::{format_duration, parse_duration, parse_size};

/// Which async runtime drives the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
    pub drain_timeout: Option<Duration>,
    pub workers: Option<usize>,
    pub runtime: Option<RuntimeKind>,
    pub access_log: Option<String>,
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
}

/// A configuration error, ready to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

// ---- the file ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Vec<String>>,
    workers: Option<usize>,
    runtime: Option<RuntimeKind>,
    access_log: Option<String>,
    drain_timeout: Option<Dur>,
    upstream: Option<UpstreamSection>,
    timeouts: Option<TimeoutsSection>,
    limits: Option<LimitsSection>,
    http: Option<HttpSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    peers: Option<Vec<String>>,
    pool_idle_timeout: Option<Dur>,
    pool_max_idle: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
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

#[derive(Debug, Default, Deserialize)]
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    host: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    upgrade_protocols: Option<Vec<String>>,
    check_websocket_accept: Option<bool>,
    set_headers: Option<BTreeMap<String, String>>,
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
        build(file, flags, &at)
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        let c = &self.config;
        let t = &c.timeouts;
        let l = &c.limits;
        let list = |v: Vec<String>| {
            format!(
                "[{}]",
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "listen = {}",
            list(self.listen.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(s, "workers = {}", self.workers);
        let _ = writeln!(
            s,
            "runtime = {:?}",
            format!("{:?}", self.runtime).to_lowercase()
        );
        let _ = writeln!(s, "access_log = {:?}", self.access_log.describe());
        let _ = writeln!(
            s,
            "drain_timeout = {:?}",
            format_duration(self.drain_timeout)
        );
        let _ = writeln!(s, "\n[upstream]");
        let _ = writeln!(
            s,
            "peers = {}",
            list(c.upstream.peers().map(ToString::to_string).collect())
        );
        let _ = writeln!(
            s,
            "pool_idle_timeout = {:?}",
            format_duration(self.pool_idle_timeout)
        );
        let _ = writeln!(s, "pool_max_idle = {}", self.pool_max_idle);
        let _ = writeln!(s, "\n[timeouts]");
        for (k, v) in [
            ("connect", t.connect),
            ("read", t.read),
            ("send", t.send),
            ("request_head", t.request_head),
            ("client_body", t.client_body),
            ("keep_alive", t.keep_alive),
            ("tunnel_idle", t.tunnel_idle),
            (
                "tunnel_lifetime",
                t.tunnel_lifetime.unwrap_or(Duration::ZERO),
            ),
            ("fin", t.fin),
            ("linger", t.linger),
        ] {
            let _ = writeln!(s, "{k} = {:?}", format_duration(v));
        }
        let _ = writeln!(s, "\n[limits]");
        let _ = writeln!(
            s,
            "max_head = {}\nmax_headers = {}\nmax_uri = {}",
            l.max_head, l.max_headers, l.max_uri
        );
        let _ = writeln!(
            s,
            "max_body = {}\nmax_held = {}\nqueue = {}",
            l.max_body, l.max_held, l.queue
        );
        let _ = writeln!(s, "max_requests = {}", l.max_requests);
        let _ = writeln!(s, "\n[http]");
        let host = match &c.host {
            HostPolicy::Upstream => "$proxy_host".to_owned(),
            HostPolicy::Literal(h) => h.clone(),
            _ => "$host".to_owned(),
        };
        let _ = writeln!(s, "host = {host:?}");
        let _ = writeln!(
            s,
            "upgrade_protocols = {}",
            list(c.upgrade_protocols.clone())
        );
        let _ = writeln!(s, "check_websocket_accept = {}", c.check_websocket_accept);
        let _ = writeln!(
            s,
            "trusted_proxies = {}",
            list(c.trusted_proxies.iter().map(|n| format!("{n:?}")).collect())
        );
        s
    }
}

fn build(
    file: File,
    flags: &Overrides,
    at: &dyn Fn(&str, String) -> SettingsError,
) -> Result<Settings, SettingsError> {
    let upstream = file.upstream.unwrap_or_default();
    let peer_strings = if flags.upstream.is_empty() {
        upstream.peers.unwrap_or_default()
    } else {
        flags.upstream.clone()
    };
    if peer_strings.is_empty() {
        return Err(SettingsError(
            "no upstream: give --upstream HOST:PORT (repeatable) or [upstream] peers in the config file".to_owned(),
        ));
    }
    let mut peers = Vec::new();
    for (i, p) in peer_strings.iter().enumerate() {
        let peer = Peer::parse(p)
            .map_err(|e| at("peers", format!("upstream.peers[{i}]: {}", e.expected)))?;
        peers.push(peer);
    }
    let mut config = Config::new(UpstreamGroup::new(peers));

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
        config.host = match host.as_str() {
            "$host" => HostPolicy::Client,
            "$proxy_host" => HostPolicy::Upstream,
            literal => HostPolicy::Literal(literal.to_owned()),
        };
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
    for name in h.remove_headers.unwrap_or_default() {
        config.headers.push(HeaderRule::Remove { name });
    }
    for (name, value) in h.set_headers.unwrap_or_default() {
        let value = Template::parse(&value)
            .map_err(|e| at(&name, format!("http.set_headers.{name}: {}", e.expected)))?;
        config.headers.push(HeaderRule::Set { name, value });
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
        file.listen
            .unwrap_or_else(|| vec!["127.0.0.1:8080".to_owned()])
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
    let workers = flags
        .workers
        .or(file.workers)
        .unwrap_or_else(default_workers);
    if workers == 0 {
        return Err(at("workers", "workers: at least 1".to_owned()));
    }
    Ok(Settings {
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
    })
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
}
