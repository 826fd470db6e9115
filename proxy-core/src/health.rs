//! Active health checks, as decisions: what a check sends, how its answer is judged, and when a
//! server changes state. The adapter only schedules checks and moves bytes; the verdicts feed
//! the [`Balancer`](crate::Balancer), which skips servers that are down.
//!
//! A server starts healthy. `fails` consecutive failed checks mark it down; `passes`
//! consecutive good ones bring it back. A TCP check passes when the connection is established
//! within the timeout; an HTTP check also needs a response head whose status is in `expect`.

use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Peer;
use crate::error::ConfigError;

/// An active health check for every server of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What is checked.
    pub kind: HealthKind,
    /// Time between two checks of a server.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Consecutive failures that mark a server down.
    pub fails: u32,
    /// Consecutive successes that bring it back.
    pub passes: u32,
}

impl HealthCheck {
    /// A check of `kind` every 5 s, timing out after 2 s, down after 2 failures, up after 1
    /// success.
    pub fn new(kind: HealthKind) -> Self {
        HealthCheck {
            kind,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            fails: 2,
            passes: 1,
        }
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err(ConfigError::new(
                format!("{field}.health"),
                "an interval and a timeout above zero",
            ));
        }
        if self.fails == 0 || self.passes == 0 {
            return Err(ConfigError::new(
                format!("{field}.health"),
                "fails and passes of at least 1",
            ));
        }
        if let HealthKind::Http { path, expect } = &self.kind {
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(ConfigError::new(
                    format!("{field}.health.path"),
                    "a path starting with / without spaces or control bytes",
                ));
            }
            if expect.is_empty() || *expect.start() < 100 || *expect.end() > 599 {
                return Err(ConfigError::new(
                    format!("{field}.health.expect"),
                    "a status or range of statuses between 100 and 599",
                ));
            }
        }
        Ok(())
    }
}

/// What a [`HealthCheck`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthKind {
    /// The server accepts a TCP connection.
    Tcp,
    /// The server answers `GET path` with a status in `expect`.
    Http {
        /// The path requested.
        path: String,
        /// The statuses that mean healthy (e.g. `200..=399`).
        expect: RangeInclusive<u16>,
    },
}

/// The bytes an HTTP check sends to `peer`; `None` for a TCP check.
pub fn request(check: &HealthCheck, peer: &Peer) -> Option<Bytes> {
    let HealthKind::Http { path, .. } = &check.kind else {
        return None;
    };
    Some(Bytes::from(format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-health-check\r\nConnection: close\r\n\r\n",
        peer.authority()
    )))
}

/// A check's outcome so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    Pending,
    /// The server passed.
    Pass,
    /// The server failed.
    Fail,
}

/// Judges an HTTP check's answer from the bytes received so far (`eof`: the server closed).
/// Only the status line matters; a head that does not parse is a failure.
pub fn judge(check: &HealthCheck, received: &[u8], eof: bool) -> Verdict {
    let HealthKind::Http { expect, .. } = &check.kind else {
        return Verdict::Pass;
    };
    let Some(end) = memchr::memmem::find(received, b"\r\n") else {
        return if eof || received.len() > 1024 {
            Verdict::Fail
        } else {
            Verdict::Pending
        };
    };
    let line = &received[..end];
    let mut parts = line.splitn(3, |b| *b == b' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Verdict::Fail;
    };
    let status = std::str::from_utf8(code)
        .ok()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(s) if version.starts_with(b"HTTP/1.") && expect.contains(&s) => Verdict::Pass,
        _ => Verdict::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> HealthCheck {
        HealthCheck::new(HealthKind::Http {
            path: "/healthz".into(),
            expect: 200..=299,
        })
    }

    #[test]
    fn an_http_check_asks_and_judges_the_status() {
        let req = request(&http(), &Peer::new("10.0.0.1", 8080)).expect("an HTTP check sends");
        assert!(req.starts_with(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"));
        assert!(request(&HealthCheck::new(HealthKind::Tcp), &Peer::new("h", 1)).is_none());
        let c = http();
        assert_eq!(
            judge(&c, b"HTTP/1.1 204 No Content\r\n", false),
            Verdict::Pass
        );
        assert_eq!(
            judge(&c, b"HTTP/1.1 503 Unavailable\r\n\r\n", false),
            Verdict::Fail
        );
        assert_eq!(judge(&c, b"HTTP/1.1 20", false), Verdict::Pending);
        assert_eq!(judge(&c, b"HTTP/1.1 20", true), Verdict::Fail);
        assert_eq!(judge(&c, b"SSH-2.0-OpenSSH\r\n", false), Verdict::Fail);
        assert_eq!(judge(&c, b"HTTP/1.1 2000 x\r\n", false), Verdict::Fail);
        assert_eq!(judge(&c, &[b'x'; 2000], false), Verdict::Fail, "bounded");
    }

    #[test]
    fn checks_are_validated() {
        assert!(http().validate("upstream").is_ok());
        let mut c = http();
        c.fails = 0;
        assert!(c.validate("upstream").is_err());
        let c = HealthCheck::new(HealthKind::Http {
            path: "healthz".into(),
            expect: 200..=299,
        });
        assert_eq!(
            c.validate("upstream").expect_err("relative path").field,
            "upstream.health.path"
        );
    }
}
