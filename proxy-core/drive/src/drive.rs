//! The drive loop of one client connection, written once for every runtime.
//!
//! A connection is a hand-written poll function over its [`Link`]: on each wakeup it performs
//! the session's actions, reads the sides that are readable, writes the queued bytes, advances
//! a connect, and fires a due deadline — then registers for exactly what it now waits for and
//! returns `Pending`. There is no `select!`, no future built per wait, and one clock read per
//! wakeup.
//!
//! # What a turn guarantees
//!
//! A turn ends in `Pending` only when every source the connection waits on was registered with
//! the task's waker *after* the last change of state: each side that wants reading got a
//! `Pending` from `poll_read_ready`, each side with queued bytes a `Pending` from
//! `poll_write_ready`, a pending connect likewise, and the timer is armed no later than the
//! session's deadline. Otherwise another turn runs. If nothing at all can wake the connection,
//! it is ended with a warning rather than left to hang.
//!
//! # Timers are lazy
//!
//! The runtime timer is re-armed only when the session's deadline moves *earlier*. A tunnel's
//! idle deadline moves later with every message; the armed instant stays, fires early, and is
//! then re-armed once for the real deadline. That keeps timer-wheel work off the relay path.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use proxy_core::{ConnectError, Peer, PeerInfo, Session, Side, TlsTarget, UpstreamId};
use rustls::ServerConfig;

use crate::dns::Lookup;
use crate::limits::Admitted;
use crate::link::{Action, Link};
use crate::runtime::{BoxFuture, Runtime, Socket, Timer};
use crate::server::Shared;
use crate::shutdown::{HandshakeSlot, Stop, StopWatch, TaskGuard};
use crate::sys::{self, ReadOutcome, WriteOutcome};
use crate::tls::{Stream, TlsStream};
use crate::TlsOutcome;

/// Turns per wakeup before the connection yields to other tasks.
const TURNS_PER_POLL: usize = 16;

/// Reads per side per turn.
const READS_PER_TURN: usize = 8;

/// Writes per side per turn.
const WRITES_PER_TURN: usize = 8;

const SIDES: [Side; 2] = [Side::Client, Side::Upstream];

/// Runs one accepted TLS client connection: its handshake (bounded by the handshake timeout,
/// holding one of the in-flight slots), then the connection like any other, as `https` with
/// the name the client asked for.
pub(crate) async fn run_tls<R: Runtime>(
    shared: Arc<Shared<R>>,
    socket: R::Socket,
    config: Arc<ServerConfig>,
    client: PeerInfo,
    (guard, admitted, slot): (TaskGuard, Admitted, HandshakeSlot),
) {
    let stats = Arc::clone(&shared.options.stats);
    let mut tls = match TlsStream::accept(socket, config) {
        Ok(tls) => tls,
        Err(e) => {
            stats.count_tls(TlsOutcome::Failed);
            tracing::debug!(client = %client.addr, error = %e, "TLS handshake failed");
            return;
        }
    };
    let mut timer = shared.rt.timer();
    let deadline = Instant::now()
        .checked_add(shared.options.tls_handshake_timeout)
        .unwrap_or_else(Instant::now);
    timer.reset(deadline);
    let mut stopped = std::pin::pin!(shared.shutdown.triggered());
    let outcome = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = tls.poll_handshake(cx) {
            return Poll::Ready(r.map_err(Some));
        }
        if timer.poll_fired(cx).is_ready() {
            return Poll::Ready(Err(None));
        }
        // A handshake is not a connection yet: a shutdown ends it at once.
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Some(io::Error::other("shutting down"))));
        }
        Poll::Pending
    })
    .await;
    drop(slot);
    match outcome {
        Ok(()) => stats.count_tls(TlsOutcome::Done),
        Err(None) => {
            stats.count_tls(TlsOutcome::TimedOut);
            tracing::debug!(client = %client.addr, "TLS handshake timed out");
            return;
        }
        Err(Some(e)) => {
            stats.count_tls(TlsOutcome::Failed);
            tracing::debug!(client = %client.addr, error = %e, "TLS handshake failed");
            return;
        }
    }
    let client = client.with_tls(tls.sni());
    run(shared, tls.into_stream(), client, guard, admitted).await;
}

/// Runs one accepted client connection to its end.
pub(crate) async fn run<R: Runtime>(
    shared: Arc<Shared<R>>,
    socket: Stream<R::Socket>,
    client: PeerInfo,
    guard: TaskGuard,
    _admitted: Admitted,
) {
    let generation = shared.current();
    let session = Session::new(
        Arc::clone(&generation.config),
        Arc::clone(&generation.balancer),
        client,
        Instant::now(),
    );
    let mut driver = Driver {
        timer: shared.rt.timer(),
        shared,
        link: Link::new(session, socket),
        connecting: None,
        armed: None,
        stop: StopWatch::default(),
        tls: None,
        seen: Stop::Run,
        waits: Waits::default(),
        _guard: guard,
    };
    std::future::poll_fn(|cx| driver.poll(cx)).await;
}

/// An upstream connect in progress.
enum Connecting<S: Socket> {
    /// Looking up the peer's name.
    Resolving {
        id: UpstreamId,
        peer: Peer,
        lookup: BoxFuture<io::Result<Vec<SocketAddr>>>,
    },
    /// A non-blocking connect to one address; `rest` are tried if it fails; then TLS if `tls`.
    Dialing {
        id: UpstreamId,
        socket: S,
        rest: Addrs,
        tls: Option<TlsTarget>,
    },
    /// The TLS handshake on a connected socket (within the session's connect timeout).
    Handshaking {
        id: UpstreamId,
        tls: Box<TlsStream<S>>,
    },
}

/// The addresses of a name still to try, in order.
#[derive(Debug, Default)]
struct Addrs {
    list: Option<Arc<[SocketAddr]>>,
    next: usize,
}

impl From<Arc<[SocketAddr]>> for Addrs {
    fn from(list: Arc<[SocketAddr]>) -> Self {
        Addrs {
            list: Some(list),
            next: 0,
        }
    }
}

impl Iterator for Addrs {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        let addr = self.list.as_ref()?.get(self.next).copied()?;
        self.next += 1;
        Some(addr)
    }
}

/// What the current turn registered the task's waker for.
#[derive(Debug, Default, Clone, Copy)]
struct Waits {
    read: [bool; 2],
    write: [bool; 2],
    connect: bool,
    /// A budget ran out with work left: take another turn.
    more: bool,
}

impl Waits {
    /// The side's socket changed (connected, released, closed): its registrations are void.
    fn forget(&mut self, side: Side) {
        self.read[idx(side)] = false;
        self.write[idx(side)] = false;
    }
}

/// What the timer step found.
enum TimerStep {
    /// The session has no deadline.
    Unarmed,
    /// Armed and registered.
    Waiting,
    /// A deadline was handled: take another turn.
    Fired,
}

struct Driver<R: Runtime> {
    shared: Arc<Shared<R>>,
    link: Link<Stream<R::Socket>>,
    connecting: Option<Connecting<R::Socket>>,
    timer: R::Timer,
    /// When the runtime timer is set to fire; may be earlier than the session's deadline.
    armed: Option<Instant>,
    stop: StopWatch,
    /// How the upstream being connected is reached over TLS, if it is.
    tls: Option<TlsTarget>,
    /// The shutdown level this connection has acted on.
    seen: Stop,
    waits: Waits,
    _guard: TaskGuard,
}

impl<R: Runtime> Driver<R> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut now = Instant::now();
        for _ in 0..TURNS_PER_POLL {
            match self.stop.check(&self.shared.shutdown) {
                Stop::Force => {
                    // A hard stop waits for nothing, but the session gets one chance to say
                    // goodbye (a frame-aware tunnel's Close 1001), written if the sockets
                    // take it at once.
                    self.link.session_mut().start_drain(now, now);
                    self.perform_actions(now);
                    for side in SIDES {
                        self.flush(side, cx, now);
                    }
                    // Then it ends, logged (the access log gets its line).
                    self.link.session_mut().close_now(now);
                    self.perform_actions(now);
                    return Poll::Ready(());
                }
                Stop::Drain if self.seen == Stop::Run => {
                    self.seen = Stop::Drain;
                    let deadline = now
                        .checked_add(self.shared.options.drain_timeout)
                        .unwrap_or(now);
                    self.link.session_mut().start_drain(now, deadline);
                }
                _ => {}
            }
            self.waits = Waits::default();
            self.perform_actions(now);
            for side in SIDES {
                self.read(side, cx, now);
            }
            for side in SIDES {
                self.flush(side, cx, now);
            }
            self.poll_connect(cx, now);
            if self.link.is_closed() {
                return Poll::Ready(());
            }
            let timer = self.poll_timer(cx, &mut now);
            if matches!(timer, TimerStep::Fired) || self.needs_another_turn() {
                continue;
            }
            if self.link.is_closed() {
                return Poll::Ready(());
            }
            if self.stop.register(&self.shared.shutdown, self.seen, cx) {
                continue;
            }
            let w = self.waits;
            let waiting = w.read.contains(&true)
                || w.write.contains(&true)
                || w.connect
                || matches!(timer, TimerStep::Waiting);
            if !waiting {
                // The session has no way forward; end it rather than wait forever.
                tracing::warn!(client = %self.link.session().client().addr, "connection has nothing left to wait for; closing");
                return Poll::Ready(());
            }
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Whether this turn changed something it did not also register for.
    fn needs_another_turn(&self) -> bool {
        let w = &self.waits;
        w.more
            || SIDES.into_iter().any(|side| {
                (self.link.wants_read(side) && !w.read[idx(side)])
                    || (self.has_output(side) && !w.write[idx(side)])
            })
            || (self.connecting.is_some() && !w.connect)
    }

    /// Whether bytes wait to be written to `side`: queued, or inside its TLS layer.
    fn has_output(&self, side: Side) -> bool {
        self.link.has_queued(side)
            || self
                .link
                .socket(side)
                .is_some_and(Stream::has_pending_output)
    }

    /// Performs every action the session has asked for.
    fn perform_actions(&mut self, now: Instant) {
        while let Some(action) = self.link.next_action() {
            match action {
                Action::Connect {
                    id,
                    peer,
                    allow_pooled,
                } => self.start_connect(id, &peer, allow_pooled, now),
                Action::ShutdownWrite(side) => {
                    if let Some(socket) = self.link.socket_mut(side) {
                        socket.shutdown_write();
                    }
                }
                Action::Closed(side) => {
                    if side == Side::Upstream {
                        self.connecting = None;
                    }
                    self.waits.forget(side);
                }
                Action::Release {
                    socket,
                    peer,
                    reusable,
                } => {
                    self.shared.pool.release(&peer, socket, reusable, now);
                    self.waits.forget(Side::Upstream);
                }
                Action::Event(log) => (self.shared.options.events)(&log),
            }
        }
    }

    /// Reads `side` while the session wants bytes and the socket has them.
    fn read(&mut self, side: Side, cx: &mut Context<'_>, now: Instant) {
        let mut need_ready = true;
        for _ in 0..READS_PER_TURN {
            if !self.link.wants_read(side) {
                return;
            }
            let outcome = {
                let Some(socket) = self.link.socket_mut(side) else {
                    return;
                };
                if need_ready
                    && !socket.has_buffered_input()
                    && socket.poll_read_ready(cx).is_pending()
                {
                    self.waits.read[idx(side)] = true;
                    return;
                }
                socket.read()
            };
            match outcome {
                Ok(ReadOutcome::Data { bytes, drained }) => {
                    self.link.received(side, bytes, now);
                    // A short read emptied the socket: the readiness check that follows
                    // registers the waker instead of reading `EAGAIN`.
                    need_ready = drained;
                }
                Ok(ReadOutcome::Eof) => {
                    self.link.eof(side, now);
                    self.perform_actions(now);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => need_ready = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.link.failed(side, now);
                    self.perform_actions(now);
                    return;
                }
            }
            self.perform_actions(now);
        }
        self.waits.more = true;
    }

    /// Writes the bytes queued for `side` until the queue is empty or the socket is full.
    fn flush(&mut self, side: Side, cx: &mut Context<'_>, now: Instant) {
        if matches!(self.link.socket(side), Some(Stream::Tls(_))) {
            return self.flush_tls(side, cx, now);
        }
        for _ in 0..WRITES_PER_TURN {
            let result = {
                let Some((socket, queue)) = self.link.queued(side) else {
                    return;
                };
                sys::write_queue(socket, queue)
            };
            let must_wait = match result {
                Ok(WriteOutcome::Wrote { n: 0, .. }) => {
                    self.link.failed(side, now);
                    self.perform_actions(now);
                    return;
                }
                Ok(WriteOutcome::Wrote { n, full }) => {
                    self.link.wrote(side, n, now);
                    self.perform_actions(now);
                    full
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(_) => {
                    self.link.failed(side, now);
                    self.perform_actions(now);
                    return;
                }
            };
            if must_wait && self.link.has_queued(side) {
                let Some(socket) = self.link.socket(side) else {
                    return;
                };
                if socket.poll_write_ready(cx).is_pending() {
                    self.waits.write[idx(side)] = true;
                    return;
                }
            }
        }
        self.waits.more = true;
    }

    /// The TLS flush: plaintext from the queue into rustls, its records to the socket; the
    /// session hears of bytes sent once rustls has written all it holds.
    fn flush_tls(&mut self, side: Side, cx: &mut Context<'_>, now: Instant) {
        for _ in 0..WRITES_PER_TURN {
            let result = {
                let Some((Stream::Tls(tls), queue)) = self.link.socket_and_queue(side) else {
                    return;
                };
                tls.flush(queue)
            };
            let step = match result {
                Ok(step) => step,
                // Any error here is final (an interrupted write is retried inside): whatever
                // rustls took is dropped with the connection.
                Err(_) => {
                    self.link.failed(side, now);
                    self.perform_actions(now);
                    return;
                }
            };
            if step.taken > 0 {
                self.link.taken(side, step.taken);
            }
            if step.sent > 0 {
                self.link.sent(side, step.sent, now);
                self.perform_actions(now);
            }
            if !self.has_output(side) {
                return;
            }
            if step.full || (step.taken == 0 && step.sent == 0) {
                let Some(socket) = self.link.socket(side) else {
                    return;
                };
                if socket.poll_write_ready(cx).is_pending() {
                    self.waits.write[idx(side)] = true;
                    return;
                }
            }
        }
        self.waits.more = true;
    }

    /// Starts the connect the session asked for: a pooled connection if allowed and alive,
    /// else a non-blocking connect (after a name lookup, for a host name).
    fn start_connect(&mut self, id: UpstreamId, peer: &Peer, allow_pooled: bool, now: Instant) {
        self.connecting = None;
        self.waits.forget(Side::Upstream);
        if allow_pooled {
            let tls = &self.shared.options.tls;
            let pooled = self
                .shared
                .pool
                .checkout(peer, now, |s| s.reusable_under(tls) && s.idle_and_open());
            self.shared.options.stats.count_pool(pooled.is_some());
            if let Some(socket) = pooled {
                drop(self.link.connected(id, socket, true, now));
                return;
            }
        }
        self.tls = peer.tls().cloned();
        match peer.host().parse::<IpAddr>() {
            Ok(ip) => self.dial(id, SocketAddr::new(ip, peer.port()), Addrs::default(), now),
            Err(_) => {
                let shared = &self.shared;
                match shared
                    .dns
                    .lookup(&shared.rt, &shared.options.stats, peer, now)
                {
                    Lookup::Ready(addrs) => {
                        let mut addrs = Addrs::from(addrs);
                        match addrs.next() {
                            Some(first) => self.dial(id, first, addrs, now),
                            None => {
                                let e = io::Error::new(io::ErrorKind::NotFound, "no address");
                                self.connect_failed(id, ConnectError::Resolve, &e, now);
                            }
                        }
                    }
                    Lookup::Wait(lookup) => {
                        self.connecting = Some(Connecting::Resolving {
                            id,
                            peer: peer.clone(),
                            lookup,
                        });
                    }
                }
            }
        }
    }

    /// Starts a connect to `addr`, falling through `rest` on immediate failures.
    fn dial(&mut self, id: UpstreamId, mut addr: SocketAddr, mut rest: Addrs, now: Instant) {
        loop {
            match sys::start_connect(&self.shared.rt, addr) {
                Ok(socket) => {
                    let tls = self.tls.clone();
                    self.connecting = Some(Connecting::Dialing {
                        id,
                        socket,
                        rest,
                        tls,
                    });
                    return;
                }
                Err(e) => match rest.next() {
                    Some(next) => addr = next,
                    None => return self.connect_failed(id, sys::connect_error(&e), &e, now),
                },
            }
        }
    }

    fn connect_failed(&mut self, id: UpstreamId, why: ConnectError, e: &io::Error, now: Instant) {
        tracing::debug!(client = %self.link.session().client().addr, error = %e, "upstream connect failed");
        self.connecting = None;
        self.link.connect_failed(id, why, now);
    }

    /// Advances a connect in progress.
    fn poll_connect(&mut self, cx: &mut Context<'_>, now: Instant) {
        let Some(connecting) = self.connecting.as_mut() else {
            return;
        };
        match connecting {
            Connecting::Resolving { id, peer, lookup } => {
                let id = *id;
                let Poll::Ready(result) = lookup.as_mut().poll(cx) else {
                    self.waits.connect = true;
                    return;
                };
                if let Ok(addrs) = &result {
                    self.shared.dns.store(peer, addrs, now);
                }
                self.connecting = None;
                let mut addrs = match result {
                    Ok(addrs) => Addrs::from(Arc::<[SocketAddr]>::from(addrs)),
                    Err(e) => {
                        self.connect_failed(id, ConnectError::Resolve, &e, now);
                        self.perform_actions(now);
                        return;
                    }
                };
                match addrs.next() {
                    Some(first) => self.dial(id, first, addrs, now),
                    None => {
                        let e = io::Error::new(io::ErrorKind::NotFound, "no address for the name");
                        self.connect_failed(id, ConnectError::Resolve, &e, now);
                    }
                }
                self.perform_actions(now);
            }
            Connecting::Dialing { socket, .. } => {
                if socket.poll_write_ready(cx).is_pending() {
                    self.waits.connect = true;
                    return;
                }
                let result = sys::connect_result(socket);
                let Some(Connecting::Dialing {
                    id,
                    socket,
                    mut rest,
                    tls,
                }) = self.connecting.take()
                else {
                    return;
                };
                match result {
                    Ok(()) => match tls {
                        None => {
                            self.waits.forget(Side::Upstream);
                            drop(self.link.connected(id, Stream::Plain(socket), false, now));
                        }
                        Some(target) => self.start_tls(id, socket, &target, now),
                    },
                    Err(e) => {
                        drop(socket);
                        match rest.next() {
                            Some(next) if self.link.is_pending(id) => {
                                self.dial(id, next, rest, now)
                            }
                            _ => self.connect_failed(id, sys::connect_error(&e), &e, now),
                        }
                    }
                }
                self.perform_actions(now);
            }
            Connecting::Handshaking { tls, .. } => {
                let Poll::Ready(result) = tls.poll_handshake(cx) else {
                    self.waits.connect = true;
                    return;
                };
                let Some(Connecting::Handshaking { id, tls }) = self.connecting.take() else {
                    return;
                };
                match result {
                    Ok(()) => {
                        self.waits.forget(Side::Upstream);
                        drop(self.link.connected(id, Stream::Tls(tls), false, now));
                    }
                    Err(e) => self.connect_failed(id, ConnectError::Tls, &e, now),
                }
                self.perform_actions(now);
            }
        }
    }

    /// Starts the TLS handshake on a connected upstream socket.
    fn start_tls(&mut self, id: UpstreamId, socket: R::Socket, target: &TlsTarget, now: Instant) {
        let Some(config) = self.shared.options.tls.client(&target.profile) else {
            let e = io::Error::other(format!("no TLS client settings named {:?}", target.profile));
            return self.connect_failed(id, ConnectError::Tls, &e, now);
        };
        let generation = self.shared.options.tls.client_generation();
        match TlsStream::connect(socket, config, &target.server_name) {
            Ok(tls) => {
                let tls = tls.made_under(generation);
                self.connecting = Some(Connecting::Handshaking {
                    id,
                    tls: Box::new(tls),
                })
            }
            Err(e) => self.connect_failed(id, ConnectError::Tls, &e, now),
        }
    }

    /// Fires a due deadline, or arms the timer for the next one.
    fn poll_timer(&mut self, cx: &mut Context<'_>, now: &mut Instant) -> TimerStep {
        // Two rounds at most: a lazily armed timer that fired early is re-armed once.
        for _ in 0..2 {
            let Some(deadline) = self.link.session().poll_timeout() else {
                return TimerStep::Unarmed;
            };
            if deadline <= *now {
                self.link.session_mut().handle_timeout(*now);
                self.perform_actions(*now);
                return TimerStep::Fired;
            }
            if self.armed.is_none_or(|armed| armed > deadline) {
                self.timer.reset(deadline);
                self.armed = Some(deadline);
            }
            if self.timer.poll_fired(cx).is_pending() {
                return TimerStep::Waiting;
            }
            self.armed = None;
            *now = Instant::now();
        }
        TimerStep::Fired
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}
