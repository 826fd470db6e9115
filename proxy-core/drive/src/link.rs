//! One client connection's bookkeeping, with no IO and no async: the [`Session`], the sockets
//! (any type `S`), the bytes queued for each, and the translation of the session's outputs into
//! the few [`Action`]s that need a runtime. The drive loop owns a `Link` and does the IO; this
//! part is unit-tested with plain values standing in for sockets.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use bytes::{Buf, Bytes};
use proxy_core::{ConnectError, Event, Input, Output, Peer, Session, Side, UpstreamId};

/// Something the session asked for that involves a socket, the pool or the log.
#[derive(Debug)]
pub(crate) enum Action<S> {
    /// Connect to `peer` (or take a pooled connection, if `allow_pooled`), then call
    /// [`Link::connected`] or [`Link::connect_failed`] with `id`.
    Connect {
        id: UpstreamId,
        peer: Peer,
        allow_pooled: bool,
    },
    /// Shut down the write half of this side's socket.
    ShutdownWrite(Side),
    /// The side's socket was dropped (closed); cancel a pending connect for it.
    Closed(Side),
    /// The upstream connection is released: pool `socket` for `peer` if `reusable`.
    Release {
        socket: S,
        peer: Peer,
        reusable: bool,
    },
    /// Report an event (a finished exchange, an upstream chosen or failed, a tunnel opened or
    /// closed).
    Event(Event),
}

/// The bytes waiting to be written to one socket, in order. The first buffer is held inline:
/// a relayed message is usually alone in its queue, so a connection that relays one message at
/// a time (and every idle one) keeps no queue allocation.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    first: Option<Bytes>,
    /// Only ever non-empty when `first` is `Some`.
    rest: VecDeque<Bytes>,
}

impl Outbox {
    pub(crate) fn push(&mut self, bytes: Bytes) {
        if self.first.is_none() {
            self.first = Some(bytes);
        } else {
            self.rest.push_back(bytes);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(self.rest.iter())
    }

    /// Drops the first `n` bytes, splitting a partly written buffer without copying.
    pub(crate) fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.first.as_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.first = self.rest.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// A connection that may have to be told, before it is dropped, that its end is not clean
/// (TLS then sends no close_notify).
pub(crate) trait Abort {
    /// What was sent is cut short.
    fn abort(&mut self);
}

/// A session, its sockets and their write queues.
pub(crate) struct Link<S> {
    session: Session,
    sockets: [Option<S>; 2],
    queues: [Outbox; 2],
    read_closed: [bool; 2],
    upstream_peer: Option<Peer>,
    /// The connect attempt the session is waiting for.
    pending_connect: Option<UpstreamId>,
}

impl<S> fmt::Debug for Link<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("session", &self.session)
            .field("queued", &[self.queues[0].len(), self.queues[1].len()])
            .field("read_closed", &self.read_closed)
            .finish_non_exhaustive()
    }
}

impl<S> Link<S> {
    pub(crate) fn new(session: Session, client: S) -> Self {
        Link {
            session,
            sockets: [Some(client), None],
            queues: Default::default(),
            read_closed: [false; 2],
            upstream_peer: None,
            pending_connect: None,
        }
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    pub(crate) fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    pub(crate) fn socket(&self, side: Side) -> Option<&S> {
        self.sockets[index(side)].as_ref()
    }

    pub(crate) fn socket_mut(&mut self, side: Side) -> Option<&mut S> {
        self.sockets[index(side)].as_mut()
    }

    /// The socket of `side` and the bytes queued for it, even when none are (a TLS stream may
    /// have its own to write).
    pub(crate) fn socket_and_queue(&mut self, side: Side) -> Option<(&mut S, &Outbox)> {
        let socket = self.sockets[index(side)].as_mut()?;
        Some((socket, &self.queues[index(side)]))
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    #[cfg(test)]
    pub(crate) fn is_connecting(&self) -> bool {
        self.pending_connect.is_some()
    }

    /// Applies the session's outputs until one needs the runtime. `Send`s only queue bytes, so
    /// they never surface. Call until `None` after every other method.
    pub(crate) fn next_action(&mut self) -> Option<Action<S>>
    where
        S: Abort,
    {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Send { to, bytes } => self.queues[index(to)].push(bytes),
                Output::Connect {
                    id,
                    peer,
                    allow_pooled,
                } => {
                    self.upstream_peer = Some(peer.clone());
                    self.pending_connect = Some(id);
                    return Some(Action::Connect {
                        id,
                        peer,
                        allow_pooled,
                    });
                }
                Output::ShutdownWrite { side } => return Some(Action::ShutdownWrite(side)),
                Output::Close { side, abort } => {
                    if abort {
                        if let Some(socket) = self.sockets[index(side)].as_mut() {
                            socket.abort();
                        }
                    }
                    self.drop_side(side);
                    return Some(Action::Closed(side));
                }
                Output::ReleaseUpstream { reusable, .. } => {
                    let socket = self.sockets[index(Side::Upstream)].take();
                    let peer = self.upstream_peer.take();
                    self.drop_side(Side::Upstream);
                    return Some(match (socket, peer) {
                        (Some(socket), Some(peer)) => Action::Release {
                            socket,
                            peer,
                            reusable,
                        },
                        _ => Action::Closed(Side::Upstream),
                    });
                }
                Output::Event(e) => return Some(Action::Event(e)),
                // Outputs added to the core later are ignored until the loop learns them.
                _ => {}
            }
        }
        None
    }

    fn drop_side(&mut self, side: Side) {
        let i = index(side);
        self.sockets[i] = None;
        self.queues[i] = Outbox::default();
        self.read_closed[i] = true;
        if side == Side::Upstream {
            self.upstream_peer = None;
            self.pending_connect = None;
        }
    }

    /// Whether `side` should be read now.
    pub(crate) fn wants_read(&self, side: Side) -> bool {
        let i = index(side);
        self.sockets[i].is_some() && !self.read_closed[i] && self.session.wants_read(side)
    }

    /// Whether bytes wait to be written to `side`.
    pub(crate) fn has_queued(&self, side: Side) -> bool {
        self.sockets[index(side)].is_some() && !self.queues[index(side)].is_empty()
    }

    /// The socket of `side` and the bytes queued for it; `None` when there is nothing to write.
    pub(crate) fn queued(&self, side: Side) -> Option<(&S, &Outbox)> {
        let socket = self.sockets[index(side)].as_ref()?;
        let queue = &self.queues[index(side)];
        (!queue.is_empty()).then_some((socket, queue))
    }

    /// `n` bytes were written to `side`: drops them from the queue (splitting a partly written
    /// buffer without copying) and tells the session.
    pub(crate) fn wrote(&mut self, side: Side, n: usize, now: Instant) {
        self.queues[index(side)].consume(n);
        self.session
            .handle_input(now, Input::Sent { to: side, len: n });
    }

    /// `n` queued bytes were taken by a layer that writes them later (TLS): they leave the
    /// queue, but the session hears of them only with [`sent`](Self::sent).
    pub(crate) fn taken(&mut self, side: Side, n: usize) {
        self.queues[index(side)].consume(n);
    }

    /// `n` bytes taken earlier are on the wire.
    pub(crate) fn sent(&mut self, side: Side, n: usize, now: Instant) {
        self.session
            .handle_input(now, Input::Sent { to: side, len: n });
    }

    /// Bytes were read from `side`.
    pub(crate) fn received(&mut self, side: Side, bytes: Bytes, now: Instant) {
        self.session
            .handle_input(now, Input::Data { from: side, bytes });
    }

    /// A read from `side` returned 0.
    pub(crate) fn eof(&mut self, side: Side, now: Instant) {
        self.read_closed[index(side)] = true;
        self.session.handle_input(now, Input::Eof { from: side });
    }

    /// A read or write on `side` failed (reset, broken pipe, or a write of zero bytes).
    pub(crate) fn failed(&mut self, side: Side, now: Instant) {
        let i = index(side);
        self.read_closed[i] = true;
        self.queues[i] = Outbox::default();
        self.session.handle_input(now, Input::Reset { from: side });
    }

    /// The connect for `id` succeeded with `socket` (a pooled one if `reused`). A socket for a
    /// stale id is handed back for the caller to drop.
    pub(crate) fn connected(
        &mut self,
        id: UpstreamId,
        socket: S,
        reused: bool,
        now: Instant,
    ) -> Option<S> {
        if self.pending_connect != Some(id) {
            return Some(socket);
        }
        self.pending_connect = None;
        self.sockets[index(Side::Upstream)] = Some(socket);
        self.read_closed[index(Side::Upstream)] = false;
        self.session
            .handle_input(now, Input::UpstreamConnected { id, reused });
        None
    }

    /// The connect for `id` failed.
    pub(crate) fn connect_failed(&mut self, id: UpstreamId, why: ConnectError, now: Instant) {
        if self.pending_connect == Some(id) {
            self.pending_connect = None;
        }
        self.session
            .handle_input(now, Input::UpstreamFailed { id, why });
    }

    /// Whether `id` is the attempt the session still waits for.
    pub(crate) fn is_pending(&self, id: UpstreamId) -> bool {
        self.pending_connect == Some(id)
    }
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::{Balancer, Config, PeerInfo, UpstreamGroup};
    use std::sync::Arc;

    impl Abort for &'static str {
        fn abort(&mut self) {}
    }

    fn link() -> (Link<&'static str>, Instant) {
        let config = Arc::new(Config::new(UpstreamGroup::new(vec![Peer::new(
            "127.0.0.1",
            9,
        )])));
        let now = Instant::now();
        let balancer = Arc::new(Balancer::new(&config, now));
        let session = Session::new(
            config,
            balancer,
            PeerInfo::new("127.0.0.1:1".parse().expect("addr")),
            now,
        );
        (Link::new(session, "client"), now)
    }

    fn queued(l: &Link<&'static str>, side: Side) -> usize {
        l.queued(side)
            .map(|(_, q)| q.iter().map(Bytes::len).sum())
            .unwrap_or(0)
    }

    /// Feeds a request head and returns the connect the session asks for.
    fn request(l: &mut Link<&'static str>, now: Instant) -> UpstreamId {
        l.received(
            Side::Client,
            Bytes::from_static(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
            now,
        );
        // The session reports its choice of upstream before it asks to connect.
        loop {
            match l.next_action() {
                Some(Action::Event(_)) => {}
                Some(Action::Connect { id, .. }) => return id,
                other => panic!("expected a connect, got {other:?}"),
            }
        }
    }

    #[test]
    fn queues_partial_writes_and_releases() {
        let (mut l, now) = link();
        let id = request(&mut l, now);
        assert!(l.is_connecting());
        assert!(l.next_action().is_none());
        assert_eq!(l.connected(id, "up", false, now), None);
        assert!(l.next_action().is_none());
        assert!(
            l.has_queued(Side::Upstream),
            "the head is queued for the upstream"
        );
        let total = queued(&l, Side::Upstream);
        l.wrote(Side::Upstream, 5, now);
        assert_eq!(
            queued(&l, Side::Upstream),
            total - 5,
            "partial write accounted"
        );
        l.wrote(Side::Upstream, total - 5, now);
        assert!(!l.has_queued(Side::Upstream));
        l.received(
            Side::Upstream,
            Bytes::from_static(b"HTTP/1.1 204 No Content\r\n\r\n"),
            now,
        );
        let mut saw_release = false;
        let mut saw_event = false;
        while let Some(a) = l.next_action() {
            match a {
                Action::Release {
                    socket, reusable, ..
                } => {
                    assert_eq!(socket, "up");
                    assert!(reusable);
                    saw_release = true;
                }
                Action::Event(Event::Exchange(e)) => saw_event = e.status == Some(204),
                Action::Event(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_release && saw_event);
        assert!(l.socket(Side::Upstream).is_none());
        assert!(
            l.has_queued(Side::Client),
            "the response is queued for the client"
        );
    }

    #[test]
    fn outbox_keeps_order_across_partial_writes_and_holds_one_buffer_inline() {
        let mut q = Outbox::default();
        assert!(q.is_empty());
        q.push(Bytes::from_static(b"abc"));
        assert_eq!(q.rest.capacity(), 0, "one buffer needs no allocation");
        q.push(Bytes::from_static(b"de"));
        q.push(Bytes::from_static(b"fgh"));
        assert_eq!(q.len(), 3);
        q.consume(4);
        let left: Vec<u8> = q.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(left, b"efgh");
        q.consume(4);
        assert!(q.is_empty() && q.rest.is_empty());
        q.push(Bytes::from_static(b"i"));
        assert_eq!(q.iter().count(), 1);
    }

    #[test]
    fn stale_connect_hands_the_socket_back() {
        let (mut l, now) = link();
        assert_eq!(
            l.connected(UpstreamId(7), "stray", false, now),
            Some("stray")
        );
        assert!(!l.is_pending(UpstreamId(7)));
    }

    #[test]
    fn a_failed_side_drops_its_queue_and_stops_reading() {
        let (mut l, now) = link();
        let id = request(&mut l, now);
        assert_eq!(l.connected(id, "up", false, now), None);
        while l.next_action().is_some() {}
        assert!(l.has_queued(Side::Upstream));
        l.failed(Side::Upstream, now);
        assert_eq!(queued(&l, Side::Upstream), 0);
        assert!(!l.wants_read(Side::Upstream));
    }
}
