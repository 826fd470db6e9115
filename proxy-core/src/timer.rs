//! Timers as data: one [`Timer`] name per deadline and a fixed table of `Option<Instant>`. The
//! session arms and disarms entries; the adapter only ever sees the earliest one.

use std::time::{Duration, Instant};

/// A deadline a session can be waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// The request head must be complete by now.
    RequestHead,
    /// A kept-alive client connection has been idle too long.
    KeepAlive,
    /// The client stopped sending its request body.
    ClientBody,
    /// The upstream connection is not established yet.
    Connect,
    /// The upstream has not sent the response head, or stopped sending the body.
    UpstreamRead,
    /// The client is not accepting the bytes written to it.
    SendClient,
    /// The upstream is not accepting the bytes written to it.
    SendUpstream,
    /// No byte in either direction of a tunnel.
    TunnelIdle,
    /// The tunnel's absolute lifetime ended.
    TunnelLifetime,
    /// A half-closed tunnel's other direction did not finish.
    Fin,
    /// Draining unread client bytes before closing is over.
    Linger,
    /// A graceful drain's deadline for this session.
    Drain,
    /// A frame-aware tunnel's next keepalive check: a Ping due, or a Pong overdue.
    Keepalive,
    /// A frame-aware tunnel's closing: the moment a drain sends Close 1001, then the end of
    /// the wait for the closing handshake.
    WebSocketClose,
}

impl Timer {
    pub(crate) const ALL: [Timer; 14] = [
        Timer::RequestHead,
        Timer::KeepAlive,
        Timer::ClientBody,
        Timer::Connect,
        Timer::UpstreamRead,
        Timer::SendClient,
        Timer::SendUpstream,
        Timer::TunnelIdle,
        Timer::TunnelLifetime,
        Timer::Fin,
        Timer::Linger,
        Timer::Drain,
        Timer::Keepalive,
        Timer::WebSocketClose,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One optional deadline per [`Timer`], stored as nanoseconds after the session's start: half
/// the size of a table of `Option<Instant>`, which matters for a tunnel idling for hours.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable {
    base: Instant,
    /// Nanoseconds after `base`; [`UNARMED`] for none.
    deadlines: [u64; Timer::ALL.len()],
}

/// The table entry of a timer that is not armed.
const UNARMED: u64 = u64::MAX;

impl TimerTable {
    /// An empty table for a session that starts at `base`; no deadline is ever before it.
    pub(crate) fn new(base: Instant) -> Self {
        TimerTable {
            base,
            deadlines: [UNARMED; Timer::ALL.len()],
        }
    }

    /// Arms `timer` at `now + after`. A zero duration, or one too large to represent, disarms it:
    /// zero means "no timeout" throughout the configuration.
    pub(crate) fn arm(&mut self, timer: Timer, now: Instant, after: Duration) {
        match now.checked_add(after) {
            Some(at) if !after.is_zero() => self.arm_at(timer, at),
            _ => self.stop(timer),
        }
    }

    /// Arms `timer` at `at` (at the start, if `at` is earlier). A deadline more than 584 years
    /// away cannot fire and is not armed.
    pub(crate) fn arm_at(&mut self, timer: Timer, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        self.deadlines[timer.index()] = u64::try_from(nanos).unwrap_or(UNARMED);
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = UNARMED;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.instant(self.deadlines[timer.index()])
    }

    pub(crate) fn stop_all(&mut self) {
        self.deadlines = [UNARMED; Timer::ALL.len()];
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.instant(self.deadlines.iter().copied().min().unwrap_or(UNARMED))
    }

    /// The first timer (in [`Timer::ALL`] order) whose deadline is at or before `now`, disarmed.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let t = Timer::ALL
            .into_iter()
            .find(|t| self.get(*t).is_some_and(|d| d <= now))?;
        self.stop(t);
        Some(t)
    }

    fn instant(&self, nanos: u64) -> Option<Instant> {
        if nanos == UNARMED {
            return None;
        }
        self.base.checked_add(Duration::from_nanos(nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_wins_and_zero_disarms() {
        let now = Instant::now();
        let mut t = TimerTable::new(now);
        t.arm(Timer::Connect, now, Duration::from_secs(5));
        t.arm(Timer::UpstreamRead, now, Duration::from_secs(2));
        t.arm(Timer::Fin, now, Duration::ZERO);
        assert_eq!(t.next(), Some(now + Duration::from_secs(2)));
        assert_eq!(t.take_expired(now), None);
        assert_eq!(
            t.take_expired(now + Duration::from_secs(9)),
            Some(Timer::Connect)
        );
        assert_eq!(
            t.take_expired(now + Duration::from_secs(9)),
            Some(Timer::UpstreamRead)
        );
        assert_eq!(t.next(), None);
    }

    #[test]
    fn deadlines_round_trip_exactly() {
        let base = Instant::now();
        let mut t = TimerTable::new(base);
        let at = base + Duration::new(3600, 123_456_789);
        t.arm_at(Timer::TunnelIdle, at);
        assert_eq!(t.get(Timer::TunnelIdle), Some(at));
        if let Some(before) = base.checked_sub(Duration::from_secs(1)) {
            t.arm_at(Timer::Drain, before);
            assert_eq!(
                t.get(Timer::Drain),
                Some(base),
                "earlier than the start fires at once"
            );
        }
        t.arm(Timer::Fin, base, Duration::from_secs(u64::MAX / 1000));
        assert_eq!(
            t.get(Timer::Fin),
            None,
            "beyond representation is not armed"
        );
        t.stop_all();
        assert_eq!(t.next(), None);
    }
}
