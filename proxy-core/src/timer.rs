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
}

impl Timer {
    pub(crate) const ALL: [Timer; 12] = [
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
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms `timer` at `now + after`. A zero duration, or one too large to represent, disarms it:
    /// zero means "no timeout" throughout the configuration.
    pub(crate) fn arm(&mut self, timer: Timer, now: Instant, after: Duration) {
        self.deadlines[timer.index()] = if after.is_zero() {
            None
        } else {
            now.checked_add(after)
        };
    }

    pub(crate) fn arm_at(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    pub(crate) fn stop_all(&mut self) {
        self.deadlines = Default::default();
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// The first timer (in [`Timer::ALL`] order) whose deadline is at or before `now`, disarmed.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let t = Timer::ALL
            .into_iter()
            .find(|t| self.get(*t).is_some_and(|d| d <= now))?;
        self.stop(t);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_wins_and_zero_disarms() {
        let now = Instant::now();
        let mut t = TimerTable::default();
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
}
