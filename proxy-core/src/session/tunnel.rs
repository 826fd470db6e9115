//! The tunnel state: after a genuine `101`, two independent byte streams.
//!
//! Each direction is a small [`TunnelDirection`] that only counts and tracks half-close and says
//! what to pass on, so a frame-aware reader can later sit inside one without touching the opaque
//! path: bytes in are the same `Bytes` out, never copied. EOF from one side is flushed, then
//! turned into a FIN on the other; the tunnel ends when both directions have finished, or on a
//! tunnel timeout.

use std::time::Instant;

use bytes::Bytes;

use super::{Conn, Record, Upstream};
use crate::event::{CloseReason, Event};
use crate::io::{Output, Side};
use crate::timer::Timer;

/// Both directions of a tunnel, indexed by the side bytes are read from, with the upstream
/// connection and the access-log record of the exchange that opened it.
#[derive(Debug)]
pub(super) struct Tunnel {
    dirs: [TunnelDirection; 2],
    first_eof: Option<Side>,
    upstream: Upstream,
    record: Record,
    started: Instant,
    /// The last time a byte moved. The idle timer is re-armed from it only when it fires, so
    /// relaying a message costs no timer arithmetic.
    last_active: Instant,
}

/// One direction of a tunnel.
#[derive(Debug, Default)]
pub(crate) struct TunnelDirection {
    /// Bytes forwarded in this direction.
    bytes: u64,
    /// The source sent FIN.
    eof: bool,
    /// The FIN has been passed on to the destination.
    shut: bool,
}

impl TunnelDirection {
    /// Whether `len` bytes read from the source are passed on: not after its FIN.
    fn pass(&mut self, len: usize) -> bool {
        if self.eof {
            return false;
        }
        self.bytes += len as u64;
        true
    }

    /// Whether the source's FIN should be passed on now: once, after everything before it
    /// has been written (`dest_in_flight` is what the destination has not accepted yet).
    fn shut_now(&mut self, dest_in_flight: usize) -> bool {
        let now = self.eof && !self.shut && dest_in_flight == 0;
        self.shut |= now;
        now
    }
}

impl Tunnel {
    pub(super) fn new(record: Record, upstream: Upstream, now: Instant) -> Self {
        Tunnel {
            dirs: Default::default(),
            first_eof: None,
            upstream,
            record,
            started: now,
            last_active: now,
        }
    }

    pub(super) fn wants_read(&self, from: Side) -> bool {
        !self.dirs[from.index()].eof
    }

    pub(super) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Passes bytes read from `from` to the other side.
    pub(super) fn relay(&mut self, cx: &mut Conn, from: Side, bytes: Bytes) {
        if !self.dirs[from.index()].pass(bytes.len()) {
            return;
        }
        if from == Side::Client {
            self.record.log.bytes_from_client += bytes.len() as u64;
        }
        self.last_active = cx.now;
        cx.send(from.other(), bytes);
    }

    /// The idle timer fired: true if the tunnel really was idle that long, else the timer is
    /// moved to the idle limit after the last byte.
    pub(super) fn idle_expired(&self, cx: &mut Conn) -> bool {
        let idle = cx.timeouts().tunnel_idle;
        let deadline = self.last_active.checked_add(idle);
        match deadline {
            Some(at) if at > cx.now => {
                cx.timers.arm_at(Timer::TunnelIdle, at);
                false
            }
            _ => true,
        }
    }

    /// `from` sent FIN. Returns why the tunnel ends, if it does now.
    pub(super) fn eof(&mut self, cx: &mut Conn, from: Side) -> Option<CloseReason> {
        self.dirs[from.index()].eof = true;
        self.first_eof.get_or_insert(from);
        self.progress(cx)
    }

    /// Passes on FINs whose direction is flushed. Returns why the tunnel ends once both are.
    pub(super) fn progress(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        // Nothing to pass on before the first FIN: the common case, one check per write.
        self.first_eof?;
        let mut shut_now = [false; 2];
        for from in [Side::Client, Side::Upstream] {
            let dest_in_flight = cx.in_flight[from.other().index()];
            shut_now[from.index()] = self.dirs[from.index()].shut_now(dest_in_flight);
        }
        if self.dirs.iter().all(|d| d.shut) {
            // Both sockets are closed next, and the close sends the FIN: a shutdown first
            // would only cost a syscall.
            return Some(match self.first_eof {
                Some(Side::Upstream) => CloseReason::UpstreamClosed,
                _ => CloseReason::ClientClosed,
            });
        }
        for from in [Side::Client, Side::Upstream] {
            if shut_now[from.index()] {
                cx.outputs
                    .push_back(Output::ShutdownWrite { side: from.other() });
            }
        }
        if cx.timers.get(Timer::Fin).is_none() {
            let fin = cx.timeouts().fin;
            cx.timers.arm(Timer::Fin, cx.now, fin);
        }
        None
    }

    /// Ends the tunnel: logs it with `reason`, gives the upstream back and closes it.
    pub(super) fn close(self, cx: &mut Conn, reason: CloseReason) {
        cx.log(self.record, Some(reason), Some(self.started));
        let peer = cx.peer_of(&self.upstream);
        cx.emit(Event::TunnelClosed {
            peer,
            duration: cx.now.saturating_duration_since(self.started),
        });
        cx.drop_upstream(self.upstream);
    }
}
