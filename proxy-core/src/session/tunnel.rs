//! The tunnel half of a session: after a genuine `101`, two independent byte streams.
//!
//! Each direction is a small [`TunnelDirection`] that only counts and tracks half-close, so a
//! frame-aware reader can later sit inside one without touching the opaque path: bytes in are
//! the same `Bytes` out, never copied. EOF from one side is flushed, then turned into a FIN on
//! the other; the session ends when both directions have finished, or on a tunnel timeout.

use std::time::Instant;

use bytes::Bytes;

use super::{Session, State};
use crate::event::{CloseReason, Event};
use crate::io::{Output, Side};
use crate::timer::Timer;

/// Both directions of a tunnel, indexed by the side bytes are read from.
#[derive(Debug)]
pub(super) struct Tunnel {
    dirs: [TunnelDirection; 2],
    first_eof: Option<Side>,
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

impl Tunnel {
    pub(super) fn wants_read(&self, from: Side) -> bool {
        !self.dirs[from.index()].eof
    }
}

impl Session {
    /// Enters the tunnel after a genuine `101` head has been queued for the client. `rest` holds
    /// whatever the upstream sent after the head; it goes to the client at once, and held client
    /// bytes go to the upstream at once.
    pub(super) fn switch_to_tunnel(&mut self, rest: &mut Bytes) {
        self.stop_http_timers();
        let now: Instant = self.now;
        if let Some(ex) = self.exchange.as_mut() {
            ex.tunnel_started = Some(now);
        }
        self.timers
            .arm(Timer::TunnelIdle, now, self.timeouts().tunnel_idle);
        if let Some(life) = self.timeouts().tunnel_lifetime {
            self.timers.arm(Timer::TunnelLifetime, now, life);
        }
        // HTTP is over for this connection: its parsing state goes.
        self.http = None;
        if let Some(up) = &self.upstream {
            self.outputs.push_back(Output::Event(Event::TunnelOpened {
                peer: self.peer_of(up),
            }));
        }
        self.state = State::Tunnel(Tunnel {
            dirs: Default::default(),
            first_eof: None,
        });
        let after_head = rest.split_to(rest.len());
        if !after_head.is_empty() {
            self.tunnel_data(Side::Upstream, after_head);
        }
        // Held bytes go upstream, and the queue that held them is freed: the tunnel never
        // uses it again.
        for held in std::mem::take(&mut self.client_rx) {
            self.tunnel_data(Side::Client, held);
        }
        self.client_rx_len = 0;
        if self.client_eof {
            self.tunnel_eof(Side::Client);
        }
    }

    pub(super) fn tunnel_data(&mut self, from: Side, bytes: Bytes) {
        let State::Tunnel(t) = &mut self.state else {
            return;
        };
        let dir = &mut t.dirs[from.index()];
        if dir.eof {
            return;
        }
        dir.bytes += bytes.len() as u64;
        if from == Side::Client {
            if let Some(ex) = self.exchange.as_mut() {
                ex.count_client_bytes(bytes.len());
            }
        }
        self.timers
            .arm(Timer::TunnelIdle, self.now, self.timeouts().tunnel_idle);
        self.send(from.other(), bytes);
    }

    pub(super) fn tunnel_eof(&mut self, from: Side) {
        let State::Tunnel(t) = &mut self.state else {
            return;
        };
        t.dirs[from.index()].eof = true;
        t.first_eof.get_or_insert(from);
        self.tunnel_progress();
    }

    /// Passes on FINs whose direction is flushed, and ends the tunnel when both are.
    pub(super) fn tunnel_progress(&mut self) {
        let State::Tunnel(t) = &mut self.state else {
            return;
        };
        let mut shut_now = [false; 2];
        for from in [Side::Client, Side::Upstream] {
            let dir = &mut t.dirs[from.index()];
            if dir.eof && !dir.shut && self.in_flight[from.other().index()] == 0 {
                dir.shut = true;
                shut_now[from.index()] = true;
            }
        }
        let both = t.dirs.iter().all(|d| d.shut);
        if !both {
            // When this pass finishes the tunnel, both sockets are closed next, and the close
            // sends the FIN: a shutdown first would only cost a syscall.
            for from in [Side::Client, Side::Upstream] {
                if shut_now[from.index()] {
                    self.outputs
                        .push_back(Output::ShutdownWrite { side: from.other() });
                }
            }
        }
        let any = t.dirs.iter().any(|d| d.eof);
        let first = t.first_eof;
        if both {
            let reason = match first {
                Some(Side::Upstream) => CloseReason::UpstreamClosed,
                _ => CloseReason::ClientClosed,
            };
            self.abort(reason);
        } else if any && self.timers.get(Timer::Fin).is_none() {
            self.timers.arm(Timer::Fin, self.now, self.timeouts().fin);
        }
    }
}
