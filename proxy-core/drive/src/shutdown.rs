//! Signals between the server and its tasks: the [`Shutdown`] handle, a per-connection
//! [`StopWatch`] on it, and the [`Stats`] gauges that say how many tasks are alive.
//!
//! Every waiter here is an `event_listener::EventListener`: registered when a task starts to
//! wait, and removed from the event's list when the task drops it. So the registry holds one
//! entry per task that is alive now, never one per task that ever lived (the previous
//! hand-written waker list kept every waker, and scanned all of them on every poll).

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use event_listener::{Event, EventListener};

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const FORCED: u8 = 2;

/// Stops a running server. Cheap to clone; every clone controls the same server(s).
///
/// [`trigger`](Self::trigger) starts a graceful drain: stop accepting, let exchanges finish,
/// give tunnels the drain timeout. [`force`](Self::force) ends every connection at once.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Default)]
struct ShutdownInner {
    level: AtomicU8,
    event: Event,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .field("forced", &self.is_forced())
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
        self.raise(DRAINING);
    }

    /// Closes every connection now, without waiting for exchanges or tunnels. Idempotent.
    pub fn force(&self) {
        self.raise(FORCED);
    }

    /// Whether [`trigger`](Self::trigger) (or [`force`](Self::force)) was called.
    pub fn is_triggered(&self) -> bool {
        self.level() >= DRAINING
    }

    /// Whether [`force`](Self::force) was called.
    pub fn is_forced(&self) -> bool {
        self.level() >= FORCED
    }

    /// A future that resolves once the shutdown is triggered.
    pub fn triggered(&self) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        async move { this.reached(DRAINING).await }
    }

    fn level(&self) -> u8 {
        self.inner.level.load(Ordering::Acquire)
    }

    fn raise(&self, level: u8) {
        let before = self.inner.level.fetch_max(level, Ordering::AcqRel);
        if before < level {
            self.inner.event.notify(usize::MAX);
        }
    }

    pub(crate) async fn reached(&self, level: u8) {
        loop {
            if self.level() >= level {
                return;
            }
            let listener = self.inner.event.listen();
            // Checked again after registering, so a trigger in between is not missed.
            if self.level() >= level {
                return;
            }
            listener.await;
        }
    }
}

/// What a connection should do about the shutdown, as seen by its [`StopWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Run,
    Drain,
    Force,
}

/// One connection's view of the [`Shutdown`]: a cheap check on every wakeup, and one listener
/// registered while the connection waits.
///
/// The listener is polled only when it is new or the task's waker changed, so an ordinary
/// wakeup costs an atomic load, not a lock on the shared listener list.
#[derive(Default)]
pub(crate) struct StopWatch {
    listener: Option<EventListener>,
    waker: Option<Waker>,
    /// The level the listener waits to rise above. A listener is notified once, so one
    /// registered before a drain is spent and must not be kept for the force that may follow.
    above: Option<Stop>,
}

impl fmt::Debug for StopWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopWatch")
            .field("listening", &self.listener.is_some())
            .finish()
    }
}

impl StopWatch {
    pub(crate) fn check(&self, shutdown: &Shutdown) -> Stop {
        match shutdown.level() {
            RUNNING => Stop::Run,
            DRAINING => Stop::Drain,
            _ => Stop::Force,
        }
    }

    /// Registers `cx` to be woken when the level rises above `seen`. Returns true if it already
    /// has (the caller loops and checks again).
    pub(crate) fn register(
        &mut self,
        shutdown: &Shutdown,
        seen: Stop,
        cx: &mut Context<'_>,
    ) -> bool {
        if self.above != Some(seen) {
            self.listener = None;
        }
        let same_waker = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if self.listener.is_some() && same_waker {
            if self.check(shutdown) == seen {
                return false;
            }
            // A listener is notified once: the next level needs a new one.
            self.listener = None;
            return true;
        }
        let mut listener = self
            .listener
            .take()
            .unwrap_or_else(|| shutdown.inner.event.listen());
        // Checked after registering, so a rise in between is not missed.
        if self.check(shutdown) != seen {
            return true;
        }
        if Pin::new(&mut listener).poll(cx).is_ready() {
            return true;
        }
        self.listener = Some(listener);
        self.waker = Some(cx.waker().clone());
        self.above = Some(seen);
        false
    }
}

/// Live counts a server keeps: cheap atomics, updated once per connection, never per byte.
#[derive(Debug, Default)]
pub struct Stats {
    tasks: AtomicUsize,
    connections: AtomicUsize,
    pooled: AtomicUsize,
    accepted: AtomicU64,
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    tls: [AtomicU64; 4],
    tls_in_flight: AtomicUsize,
    zero: Event,
}

/// How a TLS handshake with a client ended, as [`Stats::tls_handshakes`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsOutcome {
    /// Completed.
    Done,
    /// Failed (a protocol error, a certificate the client refused, a reset).
    Failed,
    /// Not completed within the handshake timeout.
    TimedOut,
    /// Refused at once: too many handshakes were in flight.
    Refused,
}

impl TlsOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [TlsOutcome; 4] = [
        TlsOutcome::Done,
        TlsOutcome::Failed,
        TlsOutcome::TimedOut,
        TlsOutcome::Refused,
    ];

    /// A label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsOutcome::Done => "ok",
            TlsOutcome::Failed => "failed",
            TlsOutcome::TimedOut => "timeout",
            TlsOutcome::Refused => "refused",
        }
    }

    fn index(self) -> usize {
        match self {
            TlsOutcome::Done => 0,
            TlsOutcome::Failed => 1,
            TlsOutcome::TimedOut => 2,
            TlsOutcome::Refused => 3,
        }
    }
}

impl Stats {
    /// A fresh set of gauges.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tasks the server has running now: accept loops, the pool reaper, and one per client
    /// connection.
    pub fn tasks(&self) -> usize {
        self.tasks.load(Ordering::Acquire)
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Idle upstream connections held in the keep-alive pool now.
    pub fn pooled(&self) -> usize {
        self.pooled.load(Ordering::Acquire)
    }

    pub(crate) fn set_pooled(&self, n: usize) {
        self.pooled.store(n, Ordering::Release);
    }

    /// Client connections accepted since the server started.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Upstream connections taken from the keep-alive pool since the server started.
    pub fn pool_hits(&self) -> u64 {
        self.pool_hits.load(Ordering::Relaxed)
    }

    /// Upstream connects that could have used the pool but found nothing idle there.
    pub fn pool_misses(&self) -> u64 {
        self.pool_misses.load(Ordering::Relaxed)
    }

    /// Connections closed at accept because a connection limit was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Accepts that failed (e.g. out of file descriptors), since start.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn count_accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Client TLS handshakes that ended as `outcome`, since start.
    pub fn tls_handshakes(&self, outcome: TlsOutcome) -> u64 {
        self.tls[outcome.index()].load(Ordering::Relaxed)
    }

    /// Client TLS handshakes in progress now.
    pub fn tls_in_flight(&self) -> usize {
        self.tls_in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn count_tls(&self, outcome: TlsOutcome) {
        self.tls[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a handshake slot if fewer than `max` are in flight (0: no limit).
    pub(crate) fn start_handshake(self: &Arc<Self>, max: usize) -> Option<HandshakeSlot> {
        let n = self.tls_in_flight.fetch_add(1, Ordering::AcqRel);
        if max > 0 && n >= max {
            self.tls_in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(HandshakeSlot(Arc::clone(self)))
    }

    pub(crate) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_pool(&self, hit: bool) {
        let c = if hit {
            &self.pool_hits
        } else {
            &self.pool_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn task(self: &Arc<Self>) -> TaskGuard {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        TaskGuard {
            stats: Arc::clone(self),
            connection: false,
        }
    }

    pub(crate) fn connection(self: &Arc<Self>) -> TaskGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.task();
        guard.connection = true;
        guard
    }

    /// Resolves once no task of the server is alive.
    pub(crate) async fn all_done(&self) {
        loop {
            if self.tasks() == 0 {
                return;
            }
            let listener = self.zero.listen();
            if self.tasks() == 0 {
                return;
            }
            listener.await;
        }
    }
}

/// Counts one task (and, for a connection, one connection) for as long as it lives; dropped
/// with the task, however the task ends.
#[derive(Debug)]
pub(crate) struct TaskGuard {
    stats: Arc<Stats>,
    connection: bool,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.connection {
            self.stats.connections.fetch_sub(1, Ordering::AcqRel);
        }
        if self.stats.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.stats.zero.notify(usize::MAX);
        }
    }
}

/// Waits for whichever of two futures finishes first; the other is dropped.
pub(crate) async fn race<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        b.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn flag() -> (Arc<Flag>, Waker) {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        (flag, waker)
    }

    #[test]
    fn triggered_wakes_waiters_and_resolves() {
        let (flag, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let s = Shutdown::new();
        let mut fut = Box::pin(s.triggered());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        s.clone().trigger();
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        assert!(s.is_triggered() && !s.is_forced());
        s.force();
        assert!(s.is_forced());
    }

    #[test]
    fn stop_watch_registers_once_and_sees_each_level() {
        let (flag, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let s = Shutdown::new();
        let mut w = StopWatch::default();
        assert_eq!(w.check(&s), Stop::Run);
        assert!(!w.register(&s, Stop::Run, &mut cx));
        // Registered again with the same waker: no new listener, still waiting.
        assert!(!w.register(&s, Stop::Run, &mut cx));
        s.trigger();
        assert!(flag.0.load(Ordering::SeqCst), "the drain wakes the waiter");
        assert!(w.register(&s, Stop::Run, &mut cx), "the level moved");
        assert_eq!(w.check(&s), Stop::Drain);
        flag.0.store(false, Ordering::SeqCst);
        assert!(!w.register(&s, Stop::Drain, &mut cx));
        s.force();
        assert!(flag.0.load(Ordering::SeqCst), "the force wakes it too");
        assert_eq!(w.check(&s), Stop::Force);
    }

    /// The drive loop's own order: it sees the drain in `check` and registers for the next
    /// level straight away. The listener from before the drain is spent, so a fresh one must
    /// be taken, or the force that follows never wakes the connection (a second signal then
    /// hung until the process was killed).
    #[test]
    fn a_force_after_a_drain_wakes_a_connection_that_saw_the_drain() {
        let (flag, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let s = Shutdown::new();
        let mut w = StopWatch::default();
        assert!(!w.register(&s, Stop::Run, &mut cx));
        s.trigger();
        assert_eq!(w.check(&s), Stop::Drain);
        flag.0.store(false, Ordering::SeqCst);
        assert!(
            !w.register(&s, Stop::Drain, &mut cx),
            "now waiting for the force"
        );
        s.force();
        assert!(flag.0.load(Ordering::SeqCst), "the force wakes it");
    }

    /// The regression behind the old waker list: waiters that have gone must not stay
    /// registered, so that a long-running server's shutdown signal costs what is open now.
    #[test]
    fn dropped_waiters_leave_no_trace() {
        let s = Shutdown::new();
        for _ in 0..10_000 {
            let (_flag, waker) = flag();
            let mut cx = Context::from_waker(&waker);
            let mut w = StopWatch::default();
            assert!(!w.register(&s, Stop::Run, &mut cx));
        }
        assert_eq!(s.inner.event.total_listeners(), 0);
    }

    #[test]
    fn stats_count_tasks_and_connections() {
        let stats = Arc::new(Stats::new());
        let t = stats.task();
        let c = stats.connection();
        assert_eq!(
            (stats.tasks(), stats.connections(), stats.accepted()),
            (2, 1, 1)
        );
        drop(c);
        assert_eq!((stats.tasks(), stats.connections()), (1, 0));
        let (flag, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let mut done = Box::pin(async { stats.all_done().await });
        assert!(done.as_mut().poll(&mut cx).is_pending());
        drop(t);
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(done.as_mut().poll(&mut cx).is_ready());
    }
}

/// A TLS handshake in flight; the slot is given back when it is dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot(Arc<Stats>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.tls_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
