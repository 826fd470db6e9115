//! The tunnel state: after a genuine `101`, two independent byte streams.
//!
//! Each direction is a small [`TunnelDirection`] that only counts and tracks half-close and says
//! what to pass on, so a frame-aware reader can later sit inside one without touching the opaque
//! path: bytes in are the same `Bytes` out, never copied. EOF from one side is flushed, then
//! turned into a FIN on the other; the tunnel ends when both directions have finished, or on a
//! tunnel timeout.

use std::time::Instant;

use bytes::Bytes;

use super::websocket::Frames;
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
    /// The frame-aware side, when configured for a WebSocket tunnel; `None` relays opaque
    /// bytes.
    frames: Option<Box<Frames>>,
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
    pub(super) fn new(
        record: Record,
        upstream: Upstream,
        now: Instant,
        frames: Option<Box<Frames>>,
    ) -> Self {
        Tunnel {
            dirs: Default::default(),
            first_eof: None,
            upstream,
            record,
            started: now,
            last_active: now,
            frames,
        }
    }

    pub(super) fn wants_read(&self, from: Side) -> bool {
        !self.dirs[from.index()].eof
    }

    pub(super) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Passes bytes read from `from` to the other side. Returns why the tunnel ends, if a
    /// frame-aware tunnel ends now.
    pub(super) fn relay(&mut self, cx: &mut Conn, from: Side, bytes: Bytes) -> Option<CloseReason> {
        if !self.dirs[from.index()].pass(bytes.len()) {
            return None;
        }
        if from == Side::Client {
            self.record.log.bytes_from_client += bytes.len() as u64;
        }
        self.last_active = cx.now;
        match &mut self.frames {
            None => {
                cx.send(from.other(), bytes);
                None
            }
            Some(f) => f.relay(cx, from, bytes),
        }
    }

    /// The keepalive timer fired.
    pub(super) fn on_keepalive(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        self.frames.as_mut()?.on_keepalive(cx)
    }

    /// The WebSocket closing timer fired.
    pub(super) fn on_close_timer(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        self.frames.as_mut()?.on_close_timer(cx)
    }

    /// A drain began; the tunnel is closed at `deadline` at the latest. A frame-aware tunnel
    /// closes itself before that with Close 1001.
    pub(super) fn start_drain(&mut self, cx: &mut Conn, deadline: Instant) {
        cx.timers.arm_at(Timer::Drain, deadline.max(cx.now));
        if let Some(f) = &mut self.frames {
            f.start_drain(cx, deadline);
        }
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
        if let Some(end) = self.frames.as_mut().and_then(|f| f.on_eof(cx, from)) {
            return Some(end);
        }
        self.progress(cx)
    }

    /// Passes on FINs whose direction is flushed. Returns why the tunnel ends once both are.
    pub(super) fn progress(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        if let Some(end) = self.frames.as_ref().and_then(|f| f.finished(cx)) {
            return Some(end);
        }
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
    /// `TunnelClosed` goes first and the access-log record last, so whoever sees the log line
    /// (a test, an operator) finds the gauges already updated.
    pub(super) fn close(mut self, cx: &mut Conn, reason: CloseReason) {
        let peer = cx.peer_of(&self.upstream);
        cx.emit(Event::TunnelClosed {
            peer,
            duration: cx.now.saturating_duration_since(self.started),
        });
        self.record.log.websocket = self.frames.as_ref().map(|f| f.log());
        cx.log(self.record, Some(reason), Some(self.started));
        cx.drop_upstream(self.upstream);
    }
}
