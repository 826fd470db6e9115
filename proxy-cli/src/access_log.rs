//! The access log: one line per finished exchange or tunnel, in nginx's "combined" format
//! followed by `$request_time $upstream_response_time $request_length`:
//!
//! ```text
//! 127.0.0.1 - - [22/Nov/2026:10:00:00 +0000] "GET /ws HTTP/1.1" 101 2048 "-" "curl/8" 12.034 12.033 1024
//! ```
//!
//! For a tunnel the status is 101, `$body_bytes_sent` and `$request_length` are the bytes sent
//! to and received from the client over the whole tunnel, and `$request_time` is its duration
//! (from the first byte of the upgrade request). Times are in seconds with millisecond
//! resolution, in UTC.
//!
//! A frame-aware WebSocket tunnel adds one quoted field: messages and frames from the client /
//! from the upstream, the close codes each sent (`-` for none), the proxy's own pings, and why
//! the tunnel ended:
//!
//! ```text
//! ... 12.034 12.033 1024 "ws msgs=3/5 frames=4/6 close=1001/- pings=2 end=client did not answer a ping: dead"
//! ```

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_core::{CloseReason, ExchangeLog, WebSocketLog};

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// Appended to a file.
    File(std::path::PathBuf),
    /// Nowhere.
    Off,
}

impl Target {
    pub fn parse(s: &str) -> Target {
        match s {
            "-" | "stdout" => Target::Stdout,
            "off" => Target::Off,
            path => Target::File(path.into()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Stdout => "-".to_owned(),
            Target::Off => "off".to_owned(),
            Target::File(p) => p.display().to_string(),
        }
    }
}

/// Writes one access-log line per finished exchange or tunnel.
pub type LogSink = Arc<dyn Fn(&ExchangeLog) + Send + Sync>;

/// Builds the access-log writer for `target`.
pub fn sink(target: &Target) -> io::Result<LogSink> {
    let writer: Box<dyn Write + Send> = match target {
        Target::Off => return Ok(Arc::new(|_| {})),
        Target::Stdout => Box::new(LineWriter::new(io::stdout())),
        Target::File(path) => Box::new(LineWriter::new(open_append(path)?)),
    };
    let writer = Mutex::new(writer);
    Ok(Arc::new(move |log: &ExchangeLog| {
        let line = format_line(log, SystemTime::now());
        if let Ok(mut w) = writer.lock() {
            // A full disk must not take the proxy down; the line is lost.
            let _ = w.write_all(line.as_bytes());
        }
    }))
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// One log line, with a trailing newline.
pub fn format_line(log: &ExchangeLog, now: SystemTime) -> String {
    let request = if log.request_line.is_empty() {
        "-"
    } else {
        log.request_line.as_str()
    };
    let ws = log
        .websocket
        .map(|w| format!(" \"{}\"", escape(&ws_field(&w, log.close.as_ref()))))
        .unwrap_or_default();
    format!(
        "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" {} {} {}{ws}\n",
        log.client.ip().to_canonical(),
        time_local(now),
        escape(request),
        log.status.unwrap_or(0),
        log.body_bytes_to_client,
        escape(log.referer.as_deref().unwrap_or("-")),
        escape(log.user_agent.as_deref().unwrap_or("-")),
        seconds(log.request_time),
        log.upstream_response_time
            .map(seconds)
            .unwrap_or_else(|| "-".to_owned()),
        log.bytes_from_client,
    )
}

/// The frame-aware tunnel's field (see the module docs).
fn ws_field(w: &WebSocketLog, close: Option<&CloseReason>) -> String {
    let code = |c: Option<u16>| c.map_or_else(|| "-".to_owned(), |c| c.to_string());
    let (c, u) = (&w.from_client, &w.from_upstream);
    let end = match close {
        Some(CloseReason::PeerDead(side)) => {
            format!("{} did not answer a ping: dead", side_name(*side))
        }
        Some(CloseReason::MessageTooBig(side)) => {
            format!("{} sent a message over the limit", side_name(*side))
        }
        Some(CloseReason::WebSocketProtocol(side)) => {
            format!("{} broke the WebSocket protocol", side_name(*side))
        }
        Some(other) => other.to_string(),
        None => "-".to_owned(),
    };
    format!(
        "ws msgs={}/{} frames={}/{} close={}/{} pings={} end={end}",
        c.messages,
        u.messages,
        c.frames,
        u.frames,
        code(c.close_code),
        code(u.close_code),
        w.proxy_pings,
    )
}

fn side_name(side: proxy_core::Side) -> &'static str {
    match side {
        proxy_core::Side::Client => "client",
        proxy_core::Side::Upstream => "upstream",
    }
}

fn seconds(d: Duration) -> String {
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

/// Escapes quotes, backslashes and control bytes as nginx does (`\xHH`), so a line cannot be
/// split or forged by a client.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '"' || c == '\\' || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `22/Nov/2026:10:00:00 +0000`.
fn time_local(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[(m as usize).saturating_sub(1).min(11)];
    format!(
        "{d:02}/{month}/{y}:{:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(time_local(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        // 2026-11-22T03:22:01Z
        assert_eq!(
            time_local(UNIX_EPOCH + Duration::from_secs(1_795_317_721)),
            "22/Nov/2026:03:22:01 +0000"
        );
        // 2000-02-29T12:00:00Z (a leap day)
        assert_eq!(
            time_local(UNIX_EPOCH + Duration::from_secs(951_825_600)),
            "29/Feb/2000:12:00:00 +0000"
        );
    }

    #[test]
    fn websocket_field() {
        let mut w = WebSocketLog::default();
        w.from_client.messages = 3;
        w.from_client.frames = 4;
        w.from_upstream.messages = 5;
        w.from_upstream.frames = 6;
        w.from_upstream.close_code = Some(1001);
        w.proxy_pings = 2;
        assert_eq!(
            ws_field(&w, Some(&CloseReason::PeerDead(proxy_core::Side::Client))),
            "ws msgs=3/5 frames=4/6 close=-/1001 pings=2 end=client did not answer a ping: dead"
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("a\"b\\c\n"), "a\\x22b\\x5Cc\\x0A");
    }
}
