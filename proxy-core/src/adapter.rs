//! The runtime-independent half of an adapter, shared by every adapter so that none of them
//! re-implements it: what to do with each [`Output`], the bytes queued for each socket, how a
//! partial write is accounted, when a connection has nothing left to wait for, the options an
//! adapter serves with, and the shutdown signal.
//!
//! Like the rest of the crate this module performs no IO and reads no clock: [`Connection`] is
//! told what the sockets did and says what they should do next; [`Shutdown`] is an atomic flag
//! with a list of [`Waker`]s, which every executor understands. The adapter keeps only what is
//! truly runtime-specific: sockets, readiness, timers, tasks.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::config::Peer;
use crate::event::{Event, ExchangeLog};
use crate::io::{ConnectError, Input, Output, Side, UpstreamId};
use crate::pool::IdlePool;
use crate::session::Session;

/// Receives one record per finished exchange or tunnel (the access log).
pub type EventSink = Arc<dyn Fn(&ExchangeLog) + Send + Sync>;

/// Adapter settings that are not protocol: how long to drain, how to pool, where events go.
#[derive(Clone)]
#[non_exhaustive]
pub struct AdapterOptions {
    /// After shutdown is triggered, how long tunnels may stay open before they are closed.
    pub drain_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle upstream connections are kept per peer (0 disables pooling).
    pub pool_max_per_peer: usize,
    /// Where finished exchanges are reported.
    pub events: EventSink,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        AdapterOptions {
            drain_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_per_peer: 32,
            events: Arc::new(|_| {}),
        }
    }
}

impl fmt::Debug for AdapterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterOptions")
            .field("drain_timeout", &self.drain_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_per_peer", &self.pool_max_per_peer)
            .finish_non_exhaustive()
    }
}

/// Triggers a graceful shutdown of a running server. Cheap to clone; every clone triggers the
/// same shutdown, and [`Shutdown::triggered`] resolves on any executor.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Default)]
struct ShutdownInner {
    triggered: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A handle that has not been triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops accepting, lets exchanges finish and gives tunnels the drain timeout. Idempotent.
    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        let wakers = match self.inner.wakers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// A future that resolves once the shutdown is triggered.
    pub fn triggered(&self) -> Triggered {
        Triggered {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Resolves when its [`Shutdown`] is triggered.
#[must_use = "futures do nothing unless polled"]
pub struct Triggered {
    inner: Arc<ShutdownInner>,
}

impl fmt::Debug for Triggered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Triggered").finish_non_exhaustive()
    }
}

impl Future for Triggered {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.triggered.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if let Ok(mut wakers) = self.inner.wakers.lock() {
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        // Checked again after registering, so a trigger between the two loads is not missed.
        if self.inner.triggered.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The upstream keep-alive pool as adapters share it between connection tasks: an [`IdlePool`]
/// behind a mutex, with the release and check-out rules every adapter follows.
#[derive(Debug)]
pub struct SharedPool<S> {
    pool: Mutex<IdlePool<S>>,
}

impl<S> SharedPool<S> {
    /// A pool keeping `max_per_peer` idle connections per peer for `idle_timeout`.
    pub fn new(idle_timeout: Duration, max_per_peer: usize) -> Self {
        SharedPool {
            pool: Mutex::new(IdlePool::new(idle_timeout, max_per_peer)),
        }
    }

    /// Takes a released upstream socket: pooled if `reusable`, otherwise (and whatever the pool
    /// evicts) dropped, which closes it.
    pub fn release(&self, peer: &Peer, socket: S, reusable: bool, now: Instant) {
        if reusable {
            if let Ok(mut pool) = self.pool.lock() {
                drop(pool.put(peer, socket, now));
            }
        }
    }

    /// The most recent idle connection to `peer` that `alive` accepts; others met on the way are
    /// dropped. `alive` is the adapter's liveness probe: a non-blocking read that must find
    /// nothing (an idle HTTP/1.1 connection has nothing to say, and EOF means it was closed).
    pub fn checkout(&self, peer: &Peer, now: Instant, alive: impl Fn(&S) -> bool) -> Option<S> {
        let mut pool = self.pool.lock().ok()?;
        while let Some(socket) = pool.take(peer, now) {
            if alive(&socket) {
                return Some(socket);
            }
        }
        None
    }

    /// Closes connections idle for longer than the timeout.
    pub fn expire(&self, now: Instant) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.expire(now);
        }
    }

    /// Closes every pooled connection and stops pooling (at shutdown).
    pub fn close_all(&self) {
        if let Ok(mut pool) = self.pool.lock() {
            *pool = IdlePool::new(Duration::ZERO, 0);
        }
    }
}

/// True when a non-blocking probe read of an idle connection found nothing to read.
pub fn idle_probe_ok(result: io::Result<usize>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Something a [`Connection`] needs the adapter to do that involves a socket, a pool or a log.
#[derive(Debug)]
#[non_exhaustive]
pub enum Action<S> {
    /// Connect to `peer` (or take a pooled connection, if `allow_pooled`), then call
    /// [`Connection::connected`] or [`Connection::connect_failed`] with `id`.
    Connect {
        /// Names the attempt.
        id: UpstreamId,
        /// Where to connect.
        peer: Peer,
        /// Whether a pooled connection may be used.
        allow_pooled: bool,
    },
    /// Shut down the write half of this side's socket.
    ShutdownWrite(Side),
    /// The socket was closed (dropped); stop waiting on it and cancel any pending connect.
    Closed(Side),
    /// The upstream connection is released: pool `socket` for `peer` if `reusable`, else drop it.
    Release {
        /// The upstream socket.
        socket: S,
        /// Its peer, the pool key.
        peer: Peer,
        /// Whether it may be reused.
        reusable: bool,
    },
    /// Report a finished exchange.
    Event(Box<ExchangeLog>),
}

/// What a connection is waiting for, so the adapter knows what to poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Read from this side when it is readable.
    pub read: [bool; 2],
    /// Write to this side when it is writable.
    pub write: [bool; 2],
    /// Call [`Connection::timeout`] at this instant.
    pub deadline: Option<Instant>,
}

impl Interest {
    /// Whether anything at all can wake the connection (else it must be dropped).
    pub fn any(&self, connecting: bool) -> bool {
        self.read.iter().any(|r| *r)
            || self.write.iter().any(|w| *w)
            || self.deadline.is_some()
            || connecting
    }
}

/// How many slices [`Connection::write_slices`] fills at most.
pub const MAX_IOVECS: usize = 64;

/// One client connection as an adapter sees it: the [`Session`], the sockets (any type `S`),
/// and the bytes waiting to be written to each. Methods take `now` because the session's clock
/// is an argument.
pub struct Connection<S> {
    session: Session,
    sockets: [Option<S>; 2],
    queues: [VecDeque<Bytes>; 2],
    read_closed: [bool; 2],
    upstream_peer: Option<Peer>,
    /// The connect attempt the session is waiting for.
    pending_connect: Option<UpstreamId>,
    actions: VecDeque<Action<S>>,
    draining: bool,
}

/// What the adapter does after [`Connection::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The session is over: drop the connection.
    Closed,
    /// Something changed; call `turn` again without waiting.
    Again,
    /// Wait for one of these (plus a pending connect and, unless draining, the shutdown), then
    /// do the IO and call `turn` again. If nothing at all can wake the connection
    /// ([`Interest::any`] is false), drop it.
    Wait(Interest),
}

impl<S> fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("session", &self.session)
            .field("queued", &[self.queues[0].len(), self.queues[1].len()])
            .field("read_closed", &self.read_closed)
            .finish_non_exhaustive()
    }
}

impl<S> Connection<S> {
    /// Wraps a new session and the accepted client socket.
    pub fn new(session: Session, client: S) -> Self {
        Connection {
            session,
            sockets: [Some(client), None],
            queues: [VecDeque::new(), VecDeque::new()],
            read_closed: [false; 2],
            upstream_peer: None,
            pending_connect: None,
            actions: VecDeque::new(),
            draining: false,
        }
    }

    /// One turn of an adapter's connection loop, everything that needs no waiting: start the
    /// drain once `shutdown` is triggered, perform every pending action with `perform`, write
    /// what the sockets accept with `write` (a non-blocking vectored write), and fire a due
    /// deadline. Returns what to do next.
    pub fn turn(
        &mut self,
        now: Instant,
        shutdown: &Shutdown,
        drain_timeout: Duration,
        mut write: impl FnMut(&S, &[IoSlice<'_>]) -> io::Result<usize>,
        mut perform: impl FnMut(&mut Self, Action<S>),
    ) -> Turn {
        if !self.draining && shutdown.is_triggered() {
            self.draining = true;
            self.drain(now, drain_timeout);
        }
        while let Some(action) = self.poll_action() {
            perform(self, action);
        }
        if self.is_closed() {
            return Turn::Closed;
        }
        let wrote = self.flush_with(Side::Client, now, &mut write);
        if wrote | self.flush_with(Side::Upstream, now, &mut write) {
            return Turn::Again;
        }
        let interest = self.interest();
        if interest.deadline.is_some_and(|d| d <= now) {
            self.timeout(now);
            return Turn::Again;
        }
        Turn::Wait(interest)
    }

    /// Whether the drain has begun (then the shutdown signal need not be awaited).
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The socket of `side`, if open.
    pub fn socket(&self, side: Side) -> Option<&S> {
        self.sockets[side.index()].as_ref()
    }

    /// True once the session is over; drop the connection.
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// The next action for the adapter, after applying the session's outputs. Call until `None`
    /// after every other method (this is the drain of the session's outputs).
    pub fn poll_action(&mut self) -> Option<Action<S>> {
        while let Some(out) = self.session.poll_output() {
            self.apply(out);
        }
        self.actions.pop_front()
    }

    fn apply(&mut self, out: Output) {
        match out {
            Output::Send { to, bytes } => self.queues[to.index()].push_back(bytes),
            Output::Connect {
                id,
                peer,
                allow_pooled,
            } => {
                self.upstream_peer = Some(peer.clone());
                self.pending_connect = Some(id);
                self.actions.push_back(Action::Connect {
                    id,
                    peer,
                    allow_pooled,
                });
            }
            Output::ShutdownWrite { side } => self.actions.push_back(Action::ShutdownWrite(side)),
            Output::Close { side } => {
                self.drop_side(side);
                self.actions.push_back(Action::Closed(side));
            }
            Output::ReleaseUpstream { reusable, .. } => {
                let socket = self.sockets[Side::Upstream.index()].take();
                let peer = self.upstream_peer.take();
                self.drop_side(Side::Upstream);
                match (socket, peer) {
                    (Some(socket), Some(peer)) => self.actions.push_back(Action::Release {
                        socket,
                        peer,
                        reusable,
                    }),
                    _ => self.actions.push_back(Action::Closed(Side::Upstream)),
                }
            }
            Output::Event(Event::Exchange(log)) => self.actions.push_back(Action::Event(log)),
        }
    }

    fn drop_side(&mut self, side: Side) {
        let i = side.index();
        self.sockets[i] = None;
        self.queues[i].clear();
        self.read_closed[i] = true;
        if side == Side::Upstream {
            self.upstream_peer = None;
            self.pending_connect = None;
        }
    }

    /// What to wait for now.
    pub fn interest(&self) -> Interest {
        let side_read = |side: Side| self.wants_read(side);
        let side_write = |side: Side| {
            self.sockets[side.index()].is_some() && !self.queues[side.index()].is_empty()
        };
        Interest {
            read: [side_read(Side::Client), side_read(Side::Upstream)],
            write: [side_write(Side::Client), side_write(Side::Upstream)],
            deadline: self.session.poll_timeout(),
        }
    }

    /// Whether `side` should be read now. Asked before every read on the data path, so it looks
    /// at that side only (not the timers).
    pub fn wants_read(&self, side: Side) -> bool {
        let i = side.index();
        self.sockets[i].is_some() && !self.read_closed[i] && self.session.wants_read(side)
    }

    /// Fills `slices` with the queued bytes for `side`; returns how many were filled. Pass them
    /// to a vectored write and report the result with [`wrote`](Self::wrote).
    pub fn write_slices<'a>(&'a self, side: Side, slices: &mut [IoSlice<'a>; MAX_IOVECS]) -> usize {
        let mut n = 0;
        for (slot, bytes) in slices.iter_mut().zip(self.queues[side.index()].iter()) {
            *slot = IoSlice::new(bytes);
            n += 1;
        }
        n
    }

    /// `n` bytes were written to `side`: drops them from the queue (splitting a partly written
    /// buffer without copying) and tells the session.
    pub fn wrote(&mut self, side: Side, mut n: usize, now: Instant) {
        let len = n;
        let queue = &mut self.queues[side.index()];
        while n > 0 {
            let Some(front) = queue.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        self.session
            .handle_input(now, Input::Sent { to: side, len });
    }

    /// Bytes were read from `side`.
    pub fn received(&mut self, side: Side, bytes: Bytes, now: Instant) {
        self.session
            .handle_input(now, Input::Data { from: side, bytes });
    }

    /// A read from `side` returned 0.
    pub fn eof(&mut self, side: Side, now: Instant) {
        self.read_closed[side.index()] = true;
        self.session.handle_input(now, Input::Eof { from: side });
    }

    /// A read or write on `side` failed (reset, broken pipe, or a write of zero bytes).
    pub fn failed(&mut self, side: Side, now: Instant) {
        let i = side.index();
        self.read_closed[i] = true;
        self.queues[i].clear();
        self.session.handle_input(now, Input::Reset { from: side });
    }

    /// Reads from `side` while the session wants bytes: at most [`READS_PER_TURN`] calls of
    /// `read`, a non-blocking read into the given slice (`WouldBlock` when nothing is ready).
    ///
    /// The buffer is allocated here, when the socket is readable, and never kept between
    /// wakeups, so a waiting connection holds no read memory. Each read's bytes are split off
    /// it and handed to the session without a copy; the rest of the allocation serves the next
    /// read of the same wakeup.
    pub fn read_with(
        &mut self,
        side: Side,
        now: Instant,
        mut read: impl FnMut(&S, &mut [u8]) -> io::Result<usize>,
    ) {
        let mut buf = BytesMut::new();
        for _ in 0..READS_PER_TURN {
            if !self.wants_read(side) {
                return;
            }
            let Some(socket) = self.sockets[side.index()].as_ref() else {
                return;
            };
            if buf.len() < READ_SIZE / 4 {
                buf = BytesMut::zeroed(READ_SIZE);
            }
            match read(socket, &mut buf[..]) {
                Ok(0) => return self.eof(side, now),
                Ok(n) => {
                    let bytes = buf.split_to(n.min(buf.len())).freeze();
                    self.received(side, bytes, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.failed(side, now),
            }
        }
    }

    /// Writes the bytes queued for `side` with `write`, a non-blocking vectored write, until it
    /// would block or the queue is empty. Returns whether anything happened that the adapter
    /// must react to (bytes written, or a failure).
    pub fn flush_with(
        &mut self,
        side: Side,
        now: Instant,
        mut write: impl FnMut(&S, &[IoSlice<'_>]) -> io::Result<usize>,
    ) -> bool {
        let mut progressed = false;
        loop {
            let result = {
                let Some(socket) = self.sockets[side.index()].as_ref() else {
                    return progressed;
                };
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = self.write_slices(side, &mut slices);
                if n == 0 {
                    return progressed;
                }
                write(socket, &slices[..n])
            };
            match result {
                Ok(0) => {
                    self.failed(side, now);
                    return true;
                }
                Ok(n) => {
                    self.wrote(side, n, now);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progressed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.failed(side, now);
                    return true;
                }
            }
        }
    }

    /// The connect for `id` succeeded with `socket` (a pooled one if `reused`). A socket for a
    /// stale id is handed back for the adapter to drop.
    pub fn connected(
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
        self.sockets[Side::Upstream.index()] = Some(socket);
        self.read_closed[Side::Upstream.index()] = false;
        self.session
            .handle_input(now, Input::UpstreamConnected { id, reused });
        None
    }

    /// The connect for `id` failed.
    pub fn connect_failed(&mut self, id: UpstreamId, why: ConnectError, now: Instant) {
        if self.pending_connect == Some(id) {
            self.pending_connect = None;
        }
        self.session
            .handle_input(now, Input::UpstreamFailed { id, why });
    }

    /// Fires due timers.
    pub fn timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
    }

    /// Begins a graceful drain; tunnels are closed at `now + drain_timeout`.
    pub fn drain(&mut self, now: Instant, drain_timeout: Duration) {
        let deadline = now.checked_add(drain_timeout).unwrap_or(now);
        self.session.start_drain(now, deadline);
    }
}

/// Maps an IO error from a connect attempt to the core's [`ConnectError`].
pub fn connect_error(e: &std::io::Error) -> ConnectError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectError::Refused,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => ConnectError::Unreachable,
        ErrorKind::NotFound => ConnectError::Resolve,
        _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => {
            ConnectError::Resolve
        }
        _ => ConnectError::Other,
    }
}

/// How big a read buffer to allocate when a socket becomes readable. A connection holds no
/// buffer while it waits, so idle connections cost no read memory; each wakeup allocates one,
/// and consecutive reads within a wakeup share it.
pub const READ_SIZE: usize = 16 * 1024;

/// Reads per side per wakeup before the adapter yields to the other side and the timers.
pub const READS_PER_TURN: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balancer;
    use crate::config::{Config, UpstreamGroup};
    use crate::io::PeerInfo;

    fn conn() -> (Connection<&'static str>, Instant) {
        let config = Arc::new(Config::new(UpstreamGroup::new(vec![Peer::new(
            "127.0.0.1",
            9,
        )])));
        let balancer = Arc::new(Balancer::new(&config));
        let now = Instant::now();
        let session = Session::new(
            config,
            balancer,
            PeerInfo::new("127.0.0.1:1".parse().expect("addr")),
            now,
        );
        (Connection::new(session, "client"), now)
    }

    #[test]
    fn queues_partial_writes_and_releases() {
        let (mut c, now) = conn();
        c.received(
            Side::Client,
            Bytes::from_static(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
            now,
        );
        let Some(Action::Connect { id, .. }) = c.poll_action() else {
            panic!("expected a connect")
        };
        assert!(c.poll_action().is_none());
        assert_eq!(c.connected(id, "up", false, now), None);
        assert!(c.poll_action().is_none());
        assert!(c.interest().write[1], "the head is queued for the upstream");
        let queued = |c: &Connection<&'static str>| {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = c.write_slices(Side::Upstream, &mut slices);
            slices[..n].iter().map(|s| s.len()).sum::<usize>()
        };
        let total = queued(&c);
        c.wrote(Side::Upstream, 5, now);
        assert_eq!(queued(&c), total - 5, "partial write accounted");
        c.wrote(Side::Upstream, total - 5, now);
        assert!(!c.interest().write[1]);
        c.received(
            Side::Upstream,
            Bytes::from_static(b"HTTP/1.1 204 No Content\r\n\r\n"),
            now,
        );
        let mut saw_release = false;
        let mut saw_event = false;
        while let Some(a) = c.poll_action() {
            match a {
                Action::Release {
                    socket, reusable, ..
                } => {
                    assert_eq!(socket, "up");
                    assert!(reusable);
                    saw_release = true;
                }
                Action::Event(e) => saw_event = e.status == Some(204),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_release && saw_event);
        assert!(c.socket(Side::Upstream).is_none());
        assert!(
            c.interest().write[0],
            "the response is queued for the client"
        );
    }

    #[test]
    fn stale_connect_hands_the_socket_back() {
        let (mut c, now) = conn();
        assert_eq!(
            c.connected(UpstreamId(7), "stray", false, now),
            Some("stray")
        );
    }

    #[test]
    fn shutdown_wakes_waiters() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        let s = Shutdown::new();
        let mut fut = s.triggered();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        s.clone().trigger();
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        assert!(s.is_triggered());
    }
}
