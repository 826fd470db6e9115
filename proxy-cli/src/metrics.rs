//! Prometheus metrics, fed by the sessions' events and the server's gauges, served as the text
//! exposition format (version 0.0.4) on a listener of their own (`--metrics ADDR`, path
//! `/metrics`).
//!
//! Every counter is a relaxed atomic bumped from the connection's task when an event arrives
//! (a handful per request, none per relayed message); rendering reads them. The format is
//! written by hand: it is a few lines of text per metric, and a crate for it would bring a
//! registry and locks this needs neither of.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proxy_core::{CloseReason, ConnectError, Event, ExchangeLog, ResponseError, Timer};

/// Tunnel duration histogram bounds, in seconds.
const DURATION_BUCKETS: [f64; 8] = [1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0];

/// Why an offered upgrade did not become a tunnel.
const REFUSALS: [&str; 5] = [
    "declined",
    "no_offer",
    "bad_101",
    "bad_accept",
    "protocol_mismatch",
];

const FAILURE_CAUSES: [&str; 7] = [
    "refused",
    "dns",
    "unreachable",
    "timeout",
    "tls",
    "local",
    "other",
];

const TUNNEL_ENDS: [&str; 9] = [
    "client_closed",
    "upstream_closed",
    "reset",
    "idle_timeout",
    "other_timeout",
    "drain",
    "peer_dead",
    "too_big",
    "other",
];

/// The counters; gauges the server keeps itself are read from its `Stats` when rendering.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 6],
    upgrades_attempted: AtomicU64,
    upgrades_accepted: AtomicU64,
    upgrades_refused: [AtomicU64; REFUSALS.len()],
    tunnels_open: AtomicI64,
    tunnel_ends: [AtomicU64; TUNNEL_ENDS.len()],
    tunnel_duration_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    tunnel_duration_count: AtomicU64,
    tunnel_duration_micros: AtomicU64,
    tunnel_bytes_from_client: AtomicU64,
    tunnel_bytes_to_client: AtomicU64,
    upstream_connects: AtomicU64,
    upstream_failures: [AtomicU64; FAILURE_CAUSES.len()],
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one event.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Exchange(log) => self.exchange(log),
            Event::UpstreamChosen { .. } => bump(&self.upstream_connects),
            Event::UpstreamFailed { cause, .. } => {
                bump(&self.upstream_failures[failure_index(*cause)]);
            }
            Event::TunnelOpened { .. } => {
                self.tunnels_open.fetch_add(1, Ordering::Relaxed);
            }
            Event::TunnelClosed { duration, .. } => {
                self.tunnels_open.fetch_sub(1, Ordering::Relaxed);
                let secs = duration.as_secs_f64();
                for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                    if secs <= *bound {
                        bump(&self.tunnel_duration_buckets[i]);
                    }
                }
                bump(&self.tunnel_duration_count);
                let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
                self.tunnel_duration_micros
                    .fetch_add(micros, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn exchange(&self, log: &ExchangeLog) {
        if let Some(status) = log.status {
            let class = usize::from(status / 100).clamp(1, 5);
            bump(&self.requests[class]);
        } else {
            bump(&self.requests[0]);
        }
        let refused = |reason: &str| {
            if let Some(i) = REFUSALS.iter().position(|r| *r == reason) {
                bump(&self.upgrades_refused[i]);
            }
        };
        if log.upgrade_offered {
            bump(&self.upgrades_attempted);
            if log.upgraded {
                bump(&self.upgrades_accepted);
            } else {
                match &log.close {
                    Some(CloseReason::BadResponse(ResponseError::BadAccept)) => {
                        refused("bad_accept")
                    }
                    Some(CloseReason::BadResponse(ResponseError::UpgradeMismatch)) => {
                        refused("protocol_mismatch")
                    }
                    Some(CloseReason::BadResponse(_)) if log.status == Some(502) => {
                        refused("bad_101")
                    }
                    _ => refused("declined"),
                }
            }
        } else if matches!(
            log.close,
            Some(CloseReason::BadResponse(ResponseError::UnsolicitedSwitch))
        ) {
            refused("no_offer");
        }
        if log.upgraded {
            let end = match &log.close {
                Some(CloseReason::ClientClosed) => "client_closed",
                Some(CloseReason::UpstreamClosed) => "upstream_closed",
                Some(CloseReason::ClientReset | CloseReason::UpstreamReset) => "reset",
                Some(CloseReason::Timeout(Timer::TunnelIdle)) => "idle_timeout",
                Some(CloseReason::Timeout(_)) => "other_timeout",
                Some(CloseReason::Drain) => "drain",
                Some(CloseReason::PeerDead(_)) => "peer_dead",
                Some(CloseReason::MessageTooBig(_)) => "too_big",
                _ => "other",
            };
            if let Some(i) = TUNNEL_ENDS.iter().position(|e| *e == end) {
                bump(&self.tunnel_ends[i]);
            }
            self.tunnel_bytes_from_client
                .fetch_add(log.bytes_from_client, Ordering::Relaxed);
            self.tunnel_bytes_to_client
                .fetch_add(log.bytes_to_client, Ordering::Relaxed);
        }
    }

    /// The exposition text, with the server's gauges.
    pub fn render(&self, stats: &proxy_tokio::Stats, draining: bool) -> String {
        let mut s = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        one(
            "switchyard_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            stats.accepted().to_string(),
        );
        one(
            "switchyard_connections_refused_total",
            "counter",
            "Client connections closed at accept: a connection limit was reached.",
            stats.refused().to_string(),
        );
        one(
            "switchyard_accept_errors_total",
            "counter",
            "Accepts that failed (out of file descriptors, say); each is retried after 50 ms.",
            stats.accept_errors().to_string(),
        );
        one(
            "switchyard_connections_open",
            "gauge",
            "Client connections open now.",
            stats.connections().to_string(),
        );
        one(
            "switchyard_upgrades_attempted_total",
            "counter",
            "Requests offering a protocol switch that was passed upstream.",
            load(&self.upgrades_attempted).to_string(),
        );
        one(
            "switchyard_upgrades_accepted_total",
            "counter",
            "Upgrades that became tunnels after a genuine 101.",
            load(&self.upgrades_accepted).to_string(),
        );
        one(
            "switchyard_tunnels_open",
            "gauge",
            "Tunnels open now.",
            self.tunnels_open.load(Ordering::Relaxed).max(0).to_string(),
        );
        one(
            "switchyard_upstream_connects_total",
            "counter",
            "Upstream servers chosen for a request (each attempt, retries included).",
            load(&self.upstream_connects).to_string(),
        );
        one(
            "switchyard_pool_hits_total",
            "counter",
            "Upstream connections reused from the keep-alive pool.",
            stats.pool_hits().to_string(),
        );
        one(
            "switchyard_pool_misses_total",
            "counter",
            "Upstream connects that found no idle pooled connection.",
            stats.pool_misses().to_string(),
        );
        one(
            "switchyard_pool_idle",
            "gauge",
            "Idle upstream connections in the pool now.",
            stats.pooled().to_string(),
        );
        one(
            "switchyard_draining",
            "gauge",
            "1 while the proxy drains for shutdown.",
            u8::from(draining).to_string(),
        );
        let labelled =
            |s: &mut String, name: &str, help: &str, label: &str, rows: &[(&str, u64)]| {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
                for (value, n) in rows {
                    let _ = writeln!(s, "{name}{{{label}=\"{value}\"}} {n}");
                }
            };
        // A family of counters, one per label value, in the order of `values`.
        let family =
            |values: &[&'static str], counters: &[AtomicU64]| -> Vec<(&'static str, u64)> {
                values
                    .iter()
                    .copied()
                    .zip(counters.iter().map(load))
                    .collect()
            };
        labelled(
            &mut s,
            "switchyard_requests_total",
            "Finished exchanges by the status class sent to the client (none: no response).",
            "class",
            &family(&["none", "1xx", "2xx", "3xx", "4xx", "5xx"], &self.requests),
        );
        labelled(
            &mut s,
            "switchyard_upgrades_refused_total",
            "Upgrades that did not become tunnels, by reason.",
            "reason",
            &family(&REFUSALS, &self.upgrades_refused),
        );
        let tls: Vec<(&str, u64)> = proxy_tokio::TlsOutcome::ALL
            .iter()
            .map(|o| (o.as_str(), stats.tls_handshakes(*o)))
            .collect();
        labelled(
            &mut s,
            "switchyard_tls_handshakes_total",
            "Client TLS handshakes by outcome (refused: too many in flight).",
            "result",
            &tls,
        );
        labelled(
            &mut s,
            "switchyard_upstream_failures_total",
            "Upstream connects that failed, by cause.",
            "cause",
            &family(&FAILURE_CAUSES, &self.upstream_failures),
        );
        labelled(
            &mut s,
            "switchyard_tunnels_closed_total",
            "Tunnels ended, by why.",
            "reason",
            &family(&TUNNEL_ENDS, &self.tunnel_ends),
        );
        labelled(
            &mut s,
            "switchyard_tunnel_bytes_total",
            "Bytes through finished tunnels (the upgrade exchange included), by direction.",
            "direction",
            &[
                ("from_client", load(&self.tunnel_bytes_from_client)),
                ("to_client", load(&self.tunnel_bytes_to_client)),
            ],
        );
        let name = "switchyard_tunnel_duration_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} How long tunnels lasted.\n# TYPE {name} histogram"
        );
        for (bound, n) in DURATION_BUCKETS.iter().zip(&self.tunnel_duration_buckets) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{bound}\"}} {}", load(n));
        }
        let count = load(&self.tunnel_duration_count);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = Duration::from_micros(load(&self.tunnel_duration_micros)).as_secs_f64();
        let _ = writeln!(s, "{name}_sum {sum}\n{name}_count {count}");
        s
    }
}

fn failure_index(cause: ConnectError) -> usize {
    match cause {
        ConnectError::Refused => 0,
        ConnectError::Resolve => 1,
        ConnectError::Unreachable => 2,
        ConnectError::TimedOut => 3,
        ConnectError::Tls => 4,
        ConnectError::Local => 5,
        _ => 6,
    }
}

/// Serves `GET /metrics` on `listener` from a thread of its own until the process exits: a
/// scrape every few seconds needs no runtime, and a slow scraper cannot stall the proxy.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stats: Arc<proxy_tokio::Stats>,
    shutdown: proxy_tokio::Shutdown,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".to_owned())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let body = metrics.render(&stats, shutdown.is_triggered());
                if let Err(e) = answer(stream, &body) {
                    tracing::debug!("metrics scrape failed: {e}");
                }
            }
        })
        .map(drop)
}

/// Answers one scrape: `/metrics` gets the text, anything else a 404.
fn answer(mut stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or(b"");
    let ok = line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?");
    let response = if ok {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    stream.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_parseable_and_counts() {
        let m = Metrics::default();
        m.observe(&Event::TunnelClosed {
            peer: proxy_core::Peer::new("h", 1),
            duration: Duration::from_secs(5),
        });
        let stats = proxy_tokio::Stats::new();
        let text = m.render(&stats, true);
        let mut seen_help = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or("");
                assert!(seen_help.insert(name.to_owned()), "{name} twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("switchyard_"), "{line}");
        }
        assert!(text.contains("switchyard_draining 1\n"));
        assert!(text.contains("switchyard_tunnel_duration_seconds_bucket{le=\"1\"} 0\n"));
        assert!(text.contains("switchyard_tunnel_duration_seconds_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("switchyard_tunnel_duration_seconds_count 1\n"));
    }
}
