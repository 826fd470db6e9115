//! Where the sessions' events go: the metrics, the access log, and a WARN line when an
//! upstream fails — the one thing an operator must hear about without `RUST_LOG=debug`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_core::{Event, ExchangeLog};

use crate::access_log::LogSink;
use crate::metrics::Metrics;

/// At most one WARN line per upstream server in this window; the next one says how many were
/// left out.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The event sink the server calls.
pub fn sink(access: LogSink, metrics: Option<Arc<Metrics>>) -> proxy_tokio::EventSink {
    let warnings = Warnings::default();
    Arc::new(move |event: &Event| {
        if let Some(m) = &metrics {
            m.observe(event);
        }
        if let Event::Exchange(log) = event {
            warnings.upstream_failures(log, Instant::now());
            access(log);
        }
    })
}

/// Rate-limited WARN lines for upstream failures. Keyed by the configured server, so the map
/// is bounded by the configuration.
#[derive(Default)]
struct Warnings {
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Warnings {
    fn upstream_failures(&self, log: &ExchangeLog, now: Instant) {
        if log.upstream_failures.is_empty() {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let answered = match log.status {
            Some(s) if s == 502 || s == 504 => format!("the client got {s}"),
            Some(s) => format!("another server answered {s}"),
            None => "the client left".to_owned(),
        };
        for (peer, cause) in &log.upstream_failures {
            let key = peer.to_string();
            let entry = last.entry(key).or_insert((now - WARN_EVERY * 2, 0));
            if now.duration_since(entry.0) < WARN_EVERY {
                entry.1 += 1;
                continue;
            }
            let suppressed = std::mem::take(&mut entry.1);
            entry.0 = now;
            let more = if suppressed > 0 {
                format!(
                    " ({suppressed} more failures of it in the last {}s not shown)",
                    WARN_EVERY.as_secs()
                )
            } else {
                String::new()
            };
            tracing::warn!(
                "upstream {peer} failed: {cause}, for \"{}\" (host {}); {answered}{more}",
                log.request_line,
                log.host.as_deref().unwrap_or("-"),
            );
        }
    }
}
