//! The frame-aware side of a tunnel (see [`WebSocket`] for what it does and its settings).
//!
//! Two [`FrameReader`]s follow the frames in each direction. The proxy's own frames (Ping,
//! Close) are injected into the stream towards a side only where the reader feeding that stream
//! is between frames; until then they wait as *due*. Keepalive and closing run on two timers,
//! both re-armed lazily: relaying a message only notes the time.
//!
//! Masking keys of the proxy's frames towards the upstream come from a counter, not a random
//! source (the core has none). RFC 6455 §10.3 asks for unpredictable keys so that script-chosen
//! payload cannot be aimed at intermediaries; the proxy's payload is its own (a ping counter, a
//! close code), so nothing is gained by hiding it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Conn;
use crate::config::WebSocket;
use crate::event::{CloseReason, FrameCounts, WebSocketLog};
use crate::frame::{
    close_code, close_frame, control_frame, Control, Feed, FrameLimits, FrameReader, Item,
    Violation, OP_CLOSE, OP_PING, OP_PONG,
};
use crate::io::Side;
use crate::timer::Timer;

/// Marks the proxy's own Ping payloads, so that their Pongs are recognised and kept.
const PING_MARK: &[u8; 4] = b"swyd";

/// Status codes (RFC 6455 §7.4.1).
const GOING_AWAY: u16 = 1001;
const PROTOCOL_ERROR: u16 = 1002;
const MESSAGE_TOO_BIG: u16 = 1009;
const NO_STATUS: u16 = 1005;

/// What waits for a frame boundary in the stream towards a side.
#[derive(Debug, Clone, Copy, Default)]
struct Due {
    ping: bool,
    close: Option<u16>,
}

impl Due {
    fn any(self) -> bool {
        self.ping || self.close.is_some()
    }
}

/// The proxy is closing the tunnel itself.
#[derive(Debug)]
struct Closing {
    reason: CloseReason,
    /// The proxy's Close went to this side, which has not answered yet.
    awaiting: [bool; 2],
}

/// Frame-aware state of one tunnel. Arrays are indexed by [`Side::index`].
#[derive(Debug)]
pub(super) struct Frames {
    settings: WebSocket,
    /// By the side the frames come from.
    readers: [FrameReader; 2],
    last_rx: [Instant; 2],
    /// The proxy's Ping awaiting its Pong, by the side it went to.
    ping: [Option<(u32, Instant)>; 2],
    due: [Due; 2],
    /// A Close frame (the proxy's or a peer's) went to this side.
    close_to: [bool; 2],
    /// The side sent a Close frame, with its code.
    close_from: [Option<u16>; 2],
    /// The side is gone (EOF) or dead (no Pong): nothing more is awaited from it.
    gone: [bool; 2],
    closing: Option<Closing>,
    sent_frames: u32,
    pings: u64,
}

impl Frames {
    pub(super) fn new(settings: WebSocket, cx: &mut Conn) -> Box<Self> {
        let limits = FrameLimits {
            max_frame: settings.max_frame,
            max_message: settings.max_message,
            require_mask: false,
        };
        let client = FrameLimits {
            require_mask: settings.require_mask,
            ..limits
        };
        if let Some(interval) = settings.ping_interval {
            cx.timers.arm(Timer::Keepalive, cx.now, interval);
        }
        Box::new(Frames {
            settings,
            readers: [FrameReader::new(client), FrameReader::new(limits)],
            last_rx: [cx.now; 2],
            ping: [None; 2],
            due: [Due::default(); 2],
            close_to: [false; 2],
            close_from: [None; 2],
            gone: [false; 2],
            closing: None,
            sent_frames: 0,
            pings: 0,
        })
    }

    /// Relays bytes read from `from`. Returns why the tunnel ends, if it does now.
    pub(super) fn relay(&mut self, cx: &mut Conn, from: Side, bytes: Bytes) -> Option<CloseReason> {
        let to = from.other();
        self.last_rx[from.index()] = cx.now;
        let mut feed = Feed::new(bytes, self.due[to.index()].any());
        while let Some(item) = self.readers[from.index()].next(&mut feed) {
            match item {
                Item::Forward(b) => cx.send(to, b),
                Item::Boundary => self.inject(cx, to),
                Item::Control(c) => self.on_control(cx, from, c),
                Item::Violation(v) => self.on_violation(cx, from, v),
            }
            feed.want_boundary = self.due[to.index()].any();
        }
        self.finished(cx)
    }

    /// `from` sent FIN.
    pub(super) fn on_eof(&mut self, cx: &Conn, from: Side) -> Option<CloseReason> {
        self.gone[from.index()] = true;
        self.ping[from.index()] = None;
        self.finished(cx)
    }

    /// Whether the proxy's own closing is complete: every Close sent and answered (or its
    /// side gone), and flushed, so the sockets may close.
    pub(super) fn finished(&self, cx: &Conn) -> Option<CloseReason> {
        let c = self.closing.as_ref()?;
        let pending = [Side::Client, Side::Upstream].iter().any(|s| {
            let i = s.index();
            !self.gone[i] && (c.awaiting[i] || self.due[i].close.is_some() || cx.in_flight[i] > 0)
        });
        (!pending).then(|| c.reason.clone())
    }

    /// The keepalive timer fired: pings what has been silent, ends the tunnel if a Pong is
    /// overdue.
    pub(super) fn on_keepalive(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        let interval = self.settings.ping_interval?;
        if self.closing.is_some() || self.close_from.iter().any(Option::is_some) {
            // A closing handshake is under way: no more pings.
            return None;
        }
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            match self.ping[i] {
                Some((_, at)) if cx.now >= after(at, self.settings.ping_timeout) => {
                    return self.dead(cx, side);
                }
                Some(_) => {}
                None if !self.due[i].ping && cx.now >= after(self.last_rx[i], interval) => {
                    self.due[i].ping = true;
                    self.try_inject(cx, side);
                }
                None => {}
            }
        }
        self.arm_keepalive(cx, interval);
        None
    }

    /// The closing timer fired: a drain's moment to send Close 1001, or the end of the wait
    /// for the closing handshake.
    pub(super) fn on_close_timer(&mut self, cx: &mut Conn) -> Option<CloseReason> {
        match &self.closing {
            None => {
                self.begin_close(cx, CloseReason::Drain, [Some(GOING_AWAY); 2]);
                self.finished(cx)
            }
            Some(c) => Some(c.reason.clone()),
        }
    }

    /// A drain began; the tunnel must be closed by `deadline`. Its Close 1001 goes out at a
    /// moment within the spread window chosen from the client's address, so a fleet of
    /// clients does not reconnect in the same second.
    pub(super) fn start_drain(&mut self, cx: &mut Conn, deadline: Instant) {
        if self.closing.is_some() {
            return;
        }
        let room = deadline
            .saturating_duration_since(cx.now)
            .saturating_sub(self.settings.close_timeout);
        let window = self.settings.close_spread.min(room);
        let offset = spread(cx, window);
        cx.timers.arm(Timer::WebSocketClose, cx.now, offset);
        if offset.is_zero() {
            // A zero duration disarms: send now instead.
            self.begin_close(cx, CloseReason::Drain, [Some(GOING_AWAY); 2]);
        }
    }

    /// The counts for the access log.
    pub(super) fn log(&self) -> WebSocketLog {
        let counts = |s: Side| {
            let r = &self.readers[s.index()];
            FrameCounts {
                frames: r.frames,
                messages: r.messages,
                close_code: self.close_from[s.index()],
            }
        };
        WebSocketLog {
            from_client: counts(Side::Client),
            from_upstream: counts(Side::Upstream),
            proxy_pings: self.pings,
        }
    }

    fn on_control(&mut self, cx: &mut Conn, from: Side, c: Control) {
        let to = from.other();
        let payload = self.readers[from.index()].control_payload();
        match c.opcode {
            OP_PONG if payload.starts_with(PING_MARK) => {
                // The answer to the proxy's own Ping: kept, never passed on.
                let id: Option<[u8; 4]> = payload.get(4..8).and_then(|b| b.try_into().ok());
                if self.ping[from.index()].is_some_and(|(p, _)| Some(p.to_be_bytes()) == id) {
                    self.ping[from.index()] = None;
                }
            }
            OP_CLOSE => {
                self.close_from[from.index()] = Some(close_code(payload).unwrap_or(NO_STATUS));
                match &mut self.closing {
                    // The answer to the proxy's Close (or one crossing it): the other side has
                    // had the proxy's own Close, so this one stays here.
                    Some(closing) => closing.awaiting[from.index()] = false,
                    // A peer's own closing handshake passes through.
                    None if !self.close_to[to.index()] => {
                        self.close_to[to.index()] = true;
                        cx.send(to, c.raw);
                    }
                    None => {}
                }
            }
            _ if self.closing.is_some() => {}
            _ => cx.send(to, c.raw),
        }
    }

    fn on_violation(&mut self, cx: &mut Conn, from: Side, v: Violation) {
        let (code, reason) = match v {
            Violation::TooBig => (MESSAGE_TOO_BIG, CloseReason::MessageTooBig(from)),
            Violation::Unmasked | Violation::Protocol => {
                (PROTOCOL_ERROR, CloseReason::WebSocketProtocol(from))
            }
        };
        let mut codes = [Some(GOING_AWAY); 2];
        codes[from.index()] = Some(code);
        self.begin_close(cx, reason, codes);
    }

    /// `side` did not answer a Ping: the other side gets Close 1001 and the tunnel ends once
    /// it answers (or the close timeout passes).
    fn dead(&mut self, cx: &mut Conn, side: Side) -> Option<CloseReason> {
        self.gone[side.index()] = true;
        let mut codes = [None; 2];
        codes[side.other().index()] = Some(GOING_AWAY);
        self.begin_close(cx, CloseReason::PeerDead(side), codes);
        self.finished(cx)
    }

    /// Starts the proxy's own closing handshake: `codes[side]` goes to each side (unless it
    /// already had a Close), data frames stop passing, and the wait is bounded by
    /// `close_timeout`. A closing already under way keeps its reason.
    fn begin_close(&mut self, cx: &mut Conn, reason: CloseReason, codes: [Option<u16>; 2]) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(Closing {
            reason,
            awaiting: [false; 2],
        });
        for r in &mut self.readers {
            r.discard_data();
        }
        cx.timers.stop(Timer::Keepalive);
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            self.due[i].ping = false;
            if let Some(code) = codes[i].filter(|_| !self.close_to[i] && !self.gone[i]) {
                self.due[i].close = Some(code);
                self.try_inject(cx, side);
            }
        }
        let wait = self.settings.close_timeout;
        cx.timers.arm(Timer::WebSocketClose, cx.now, wait);
    }

    /// Injects what is due towards `to` if the stream towards it is between frames.
    fn try_inject(&mut self, cx: &mut Conn, to: Side) {
        if self.readers[to.other().index()].at_boundary() {
            self.inject(cx, to);
        }
    }

    /// Sends what is due towards `to`; the stream towards it is between frames.
    fn inject(&mut self, cx: &mut Conn, to: Side) {
        let i = to.index();
        let mask = self.mask_for(to);
        if let Some(code) = self.due[i].close.take() {
            self.due[i].ping = false;
            self.close_to[i] = true;
            cx.send(to, close_frame(code, mask));
            // A side whose frames can no longer be read cannot be heard answering.
            let answers = self.close_from[i].is_none() && !self.readers[i].failed();
            if let Some(c) = &mut self.closing {
                c.awaiting[i] = answers;
            }
        } else if std::mem::take(&mut self.due[i].ping) {
            let id = self.sent_frames;
            let mut payload = [0; 8];
            payload[..4].copy_from_slice(PING_MARK);
            payload[4..].copy_from_slice(&id.to_be_bytes());
            cx.send(to, control_frame(OP_PING, &payload, mask));
            self.ping[i] = Some((id, cx.now));
            self.pings += 1;
            let overdue = after(cx.now, self.settings.ping_timeout);
            if cx.timers.get(Timer::Keepalive).is_none_or(|t| t > overdue) {
                cx.timers.arm_at(Timer::Keepalive, overdue);
            }
        }
    }

    /// The masking key for a frame of the proxy's own towards `to`: none towards the client,
    /// a fresh one per frame towards the upstream.
    fn mask_for(&mut self, to: Side) -> Option<[u8; 4]> {
        self.sent_frames = self.sent_frames.wrapping_add(1);
        (to == Side::Upstream).then(|| self.sent_frames.wrapping_mul(0x9E37_79B9).to_be_bytes())
    }

    /// Re-arms the keepalive timer at the earliest moment something may be due.
    fn arm_keepalive(&self, cx: &mut Conn, interval: Duration) {
        let next = [Side::Client, Side::Upstream]
            .iter()
            .filter_map(|s| {
                let i = s.index();
                match self.ping[i] {
                    Some((_, at)) => Some(after(at, self.settings.ping_timeout)),
                    None if self.due[i].ping => None,
                    None => Some(after(self.last_rx[i], interval)),
                }
            })
            .min();
        match next {
            Some(at) => cx.timers.arm_at(Timer::Keepalive, at.max(cx.now)),
            None => cx.timers.stop(Timer::Keepalive),
        }
    }
}

/// `at + d`, saturating far in the future.
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or(at)
}

/// A point in `window` chosen by the client's address (FNV-1a), the same for the same client.
fn spread(cx: &Conn, window: Duration) -> Duration {
    let nanos = window.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let addr = cx.client.addr;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    for b in ip.iter().chain(&addr.port().to_be_bytes()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_nanos(h % nanos)
}
