//! The server around the connections: accept loops, the pool reaper, the graceful drain, and
//! the state every connection task shares. Written once, over [`Runtime`].

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use proxy_core::{Balancer, Config, Event, PeerInfo};

use crate::dns::{DnsCache, Resolve, SystemResolver};
use crate::limits::Admission;
use crate::pool::SharedPool;
use crate::reload::{Reload, Reloader};
use crate::runtime::{Runtime, Timer};
use crate::shutdown::{race, Shutdown, Stats, TaskGuard};
use crate::tls::{Stream, TlsSettings};
use crate::{drive, health};

/// Receives the sessions' events: one [`Event::Exchange`] per finished exchange or tunnel (the
/// access log), and the moments metrics count (upstream chosen or failed, tunnel opened or
/// closed). Called on the connection's task: keep it cheap.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Server settings that are not protocol: how long to drain, how to pool, where events go.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// After shutdown is triggered, how long tunnels may stay open before they are closed.
    pub drain_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle upstream connections are kept per peer (0 disables pooling).
    pub pool_max_per_peer: usize,
    /// Where events are reported.
    pub events: EventSink,
    /// Live gauges of the server. Give each server its own (the default does): the drain waits
    /// for the tasks counted here.
    pub stats: Arc<Stats>,
    /// Looks up upstream host names (the system resolver by default).
    pub resolver: Arc<dyn Resolve>,
    /// How often a name in use is looked up again in the background (nginx `resolver valid=`);
    /// zero looks it up on every connect. Default 30 s.
    pub dns_refresh: Duration,
    /// Where reloads come from (a fresh handle nobody triggers by default).
    pub reload: Reloader,
    /// Most client connections open at once (nginx `worker_connections`); 0 for no limit.
    /// Over it, a new connection is closed at accept and counted in [`Stats::refused`].
    pub max_connections: usize,
    /// Most client connections open at once from one address; 0 for no limit.
    pub max_connections_per_ip: usize,
    /// Which listeners terminate TLS, and the TLS settings for upstreams (none by default).
    pub tls: TlsSettings,
    /// How long a client has to complete its TLS handshake (10 s by default).
    pub tls_handshake_timeout: Duration,
    /// Most client TLS handshakes in progress at once; over it, a new TLS connection is closed
    /// at accept and counted ([`TlsOutcome::Refused`](crate::TlsOutcome)). 0 for no limit.
    pub max_tls_handshakes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            drain_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_per_peer: 32,
            events: Arc::new(|_| {}),
            stats: Arc::new(Stats::new()),
            resolver: Arc::new(SystemResolver),
            dns_refresh: Duration::from_secs(30),
            reload: Reloader::new(),
            max_connections: 0,
            max_connections_per_ip: 0,
            tls: TlsSettings::new(),
            tls_handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 1024,
        }
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("drain_timeout", &self.drain_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_per_peer", &self.pool_max_per_peer)
            .field("dns_refresh", &self.dns_refresh)
            .finish_non_exhaustive()
    }
}

/// What every connection task of one server shares. Bounded by the configuration and by what
/// is open now: the pool by its per-peer cap, the shutdown registry by the tasks waiting on it.
pub(crate) struct Shared<R: Runtime> {
    pub(crate) rt: R,
    /// What new connections get; replaced by a reload.
    generation: RwLock<Arc<Generation>>,
    admission: Arc<Admission>,
    pub(crate) pool: SharedPool<Stream<R::Socket>>,
    pub(crate) options: ServeOptions,
    pub(crate) shutdown: Shutdown,
    pub(crate) dns: Arc<DnsCache>,
}

/// One configuration a server has served, with the balancer state that goes with it. Sessions
/// keep the generation they started with.
pub(crate) struct Generation {
    pub(crate) id: u64,
    pub(crate) config: Arc<Config>,
    pub(crate) balancer: Arc<Balancer>,
}

impl Generation {
    fn new(id: u64, config: Arc<Config>) -> Arc<Self> {
        Arc::new(Generation {
            id,
            balancer: Arc::new(Balancer::new(&config, Instant::now())),
            config,
        })
    }
}

impl<R: Runtime> Shared<R> {
    /// The generation new connections get.
    pub(crate) fn current(&self) -> Arc<Generation> {
        match self.generation.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// Extra time after the drain timeout before remaining connections are forced closed.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Pause after an accept error such as `EMFILE`, instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one warning per listener this often while accepts keep failing.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepts per wakeup of an accept loop before it yields.
const ACCEPTS_PER_POLL: usize = 64;

/// Serves `listeners` on `rt` until `shutdown` is triggered and every connection has finished
/// (or the drain timeout plus a short grace has passed, after which the rest are forced
/// closed).
///
/// # Errors
///
/// Fails only if a listener cannot be registered with the runtime; accept errors (e.g. too
/// many open files) are logged and retried after a pause.
pub async fn serve<R: Runtime>(
    rt: R,
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> io::Result<()> {
    let registered = listeners
        .into_iter()
        .map(|l| register(&rt, l))
        .collect::<io::Result<Vec<_>>>()?;
    let stats = Arc::clone(&options.stats);
    let drain_timeout = options.drain_timeout;
    let shared = Arc::new(Shared {
        generation: RwLock::new(Generation::new(0, config)),
        admission: Admission::new(options.max_connections, options.max_connections_per_ip),
        pool: SharedPool::new(
            options.pool_idle_timeout,
            options.pool_max_per_peer,
            Arc::clone(&stats),
        ),
        rt: rt.clone(),
        dns: Arc::new(DnsCache::new(
            Arc::clone(&options.resolver),
            options.dns_refresh,
        )),
        options,
        shutdown: shutdown.clone(),
    });
    let mut open = Vec::new();
    for (listener, local) in registered {
        open.push(start_accepting(&shared, listener, local));
    }
    {
        let (shared, guard) = (Arc::clone(&shared), stats.task());
        rt.spawn(pool_reaper(shared, guard));
    }
    start_health_checks(&shared, &shared.current());
    let reloads = shared.options.reload.clone();
    loop {
        let reload = race(
            async {
                shutdown.triggered().await;
                false
            },
            async {
                reloads.requested().await;
                true
            },
        )
        .await;
        if !reload {
            break;
        }
        for r in reloads.take() {
            apply(&shared, r, &mut open);
        }
    }
    drop(shared);
    let drained = race(
        async {
            stats.all_done().await;
            true
        },
        async {
            let grace = drain_timeout.saturating_add(DRAIN_GRACE);
            let deadline = Instant::now()
                .checked_add(grace)
                .unwrap_or_else(Instant::now);
            sleep(&rt, deadline).await;
            false
        },
    );
    if !drained.await {
        tracing::warn!(
            remaining = stats.connections(),
            "connections still open after the drain timeout; closing them"
        );
        shutdown.force();
        stats.all_done().await;
    }
    Ok(())
}

async fn accept_loop<R: Runtime>(
    shared: Arc<Shared<R>>,
    listener: R::Listener,
    local: Option<SocketAddr>,
    removed: Shutdown,
    _guard: TaskGuard,
) {
    let mut stopped = std::pin::pin!(shared.shutdown.triggered());
    let mut removed = std::pin::pin!(removed.triggered());
    let mut backoff: Option<R::Timer> = None;
    let mut last_warn: Option<Instant> = None;
    let mut suppressed = 0u64;
    poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() || removed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(timer) = backoff.as_mut() {
            if timer.poll_fired(cx).is_pending() {
                return Poll::Pending;
            }
            backoff = None;
        }
        for _ in 0..ACCEPTS_PER_POLL {
            match shared.rt.poll_accept(&listener, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((socket, addr))) => spawn_connection(&shared, socket, addr, local),
                // The peer gave up before we accepted: nothing to do.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Poll::Ready(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning on the error, and say so
                    // once per period, not twenty times a second.
                    shared.options.stats.count_accept_error();
                    let now = Instant::now();
                    if last_warn.is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY) {
                        tracing::warn!(
                            error = %e,
                            suppressed,
                            "accept failed; retrying every {ACCEPT_BACKOFF:?}"
                        );
                        last_warn = Some(now);
                        suppressed = 0;
                    } else {
                        suppressed += 1;
                    }
                    let mut timer = shared.rt.timer();
                    timer.reset(Instant::now() + ACCEPT_BACKOFF);
                    if timer.poll_fired(cx).is_pending() {
                        backoff = Some(timer);
                        return Poll::Pending;
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    // Dropping the listener here closes the port while connections drain.
}

/// Readies a bound listener for the runtime; sessions learn which listener accepted them
/// (virtual hosts can be per listener).
fn register<R: Runtime>(rt: &R, l: TcpListener) -> io::Result<(R::Listener, Option<SocketAddr>)> {
    l.set_nonblocking(true)?;
    let local = l.local_addr().ok();
    Ok((rt.listener(l)?, local))
}

/// An accept loop for `listener`; the returned handle stops it.
fn start_accepting<R: Runtime>(
    shared: &Arc<Shared<R>>,
    listener: R::Listener,
    local: Option<SocketAddr>,
) -> (Option<SocketAddr>, Shutdown) {
    let stop = Shutdown::new();
    let guard = shared.options.stats.task();
    shared.rt.spawn(accept_loop(
        Arc::clone(shared),
        listener,
        local,
        stop.clone(),
        guard,
    ));
    (local, stop)
}

/// One health-check task per checked server of `generation`; each ends when the server shuts
/// down or a reload replaces the generation.
fn start_health_checks<R: Runtime>(shared: &Arc<Shared<R>>, generation: &Arc<Generation>) {
    for (gi, group) in generation.config.all_groups().enumerate() {
        let Some(check) = &group.health else {
            continue;
        };
        for (i, server) in group.servers.iter().enumerate() {
            let Ok(index) = u16::try_from(i) else {
                break;
            };
            shared.rt.spawn(health::check_server(
                Arc::clone(shared),
                Arc::clone(generation),
                gi,
                index,
                check.clone(),
                server.peer.clone(),
                shared.options.stats.task(),
            ));
        }
    }
}

/// Applies one reload: the new generation for connections accepted from now on, its health
/// checks, and the listener changes. Names no longer configured leave the DNS cache.
fn apply<R: Runtime>(
    shared: &Arc<Shared<R>>,
    reload: Reload,
    open: &mut Vec<(Option<SocketAddr>, Shutdown)>,
) {
    let next = Generation::new(shared.current().id + 1, reload.config);
    match shared.generation.write() {
        Ok(mut g) => *g = Arc::clone(&next),
        Err(poisoned) => *poisoned.into_inner() = Arc::clone(&next),
    }
    shared.dns.retain(|peer| {
        next.config
            .all_groups()
            .any(|g| g.servers.iter().any(|s| s.peer == *peer))
    });
    start_health_checks(shared, &next);
    for addr in reload.remove {
        open.retain(|(local, stop)| {
            let gone = *local == Some(addr);
            if gone {
                stop.trigger();
            }
            !gone
        });
    }
    for listener in reload.add {
        match register(&shared.rt, listener) {
            Ok((l, local)) => open.push(start_accepting(shared, l, local)),
            Err(e) => tracing::warn!(error = %e, "a listener added by a reload cannot be used"),
        }
    }
    tracing::info!(generation = next.id, "configuration reloaded");
}

fn spawn_connection<R: Runtime>(
    shared: &Arc<Shared<R>>,
    socket: R::Socket,
    addr: SocketAddr,
    local: Option<SocketAddr>,
) {
    let stats = &shared.options.stats;
    let Some(admitted) = shared.admission.admit(addr.ip(), stats.connections()) else {
        // Closed before anything is read: the cheapest refusal there is.
        stats.count_refused();
        drop(socket);
        return;
    };
    crate::sys::configure(&socket);
    let guard = stats.connection();
    let mut client = PeerInfo::new(addr);
    if let Some(local) = local {
        client = client.with_local(local);
    }
    match shared.options.tls.listener(local) {
        None => {
            let task = drive::run(
                Arc::clone(shared),
                Stream::Plain(socket),
                client,
                guard,
                admitted,
            );
            shared.rt.spawn(task);
        }
        Some(config) => {
            let Some(slot) = stats.start_handshake(shared.options.max_tls_handshakes) else {
                stats.count_tls(crate::TlsOutcome::Refused);
                tracing::debug!(client = %addr, "too many TLS handshakes in flight; closed");
                return;
            };
            let task = drive::run_tls(
                Arc::clone(shared),
                socket,
                config,
                client,
                (guard, admitted, slot),
            );
            shared.rt.spawn(task);
        }
    }
}

/// Closes pooled connections that outlived the pool's idle timeout, so their sockets do not
/// linger until someone asks for them; at shutdown, closes them all.
/// How often newly pooled connections are registered with the watch (those already
/// registered are noticed the moment their upstream closes): a release does not wake the
/// watcher, which would cost a task wake-up per request.
const POOL_WATCH_EVERY: Duration = Duration::from_secs(1);

async fn pool_reaper<R: Runtime>(shared: Arc<Shared<R>>, _guard: TaskGuard) {
    let period =
        (shared.options.pool_idle_timeout / 2).clamp(Duration::from_millis(100), POOL_WATCH_EVERY);
    let mut stopped = std::pin::pin!(shared.shutdown.triggered());
    let mut timer = shared.rt.timer();
    timer.reset(Instant::now() + period);
    poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        while timer.poll_fired(cx).is_ready() {
            shared.pool.expire(Instant::now());
            timer.reset(Instant::now() + period);
        }
        // Idle connections the upstream closed (or spoke on) go at once.
        let dropped = shared.pool.watch(cx, Stream::idle_and_open);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "closed pooled upstream connections their server ended"
            );
        }
        Poll::Pending
    })
    .await;
    shared.pool.close_all();
}

pub(crate) async fn sleep<R: Runtime>(rt: &R, until: Instant) {
    let mut timer = rt.timer();
    timer.reset(until);
    poll_fn(|cx| timer.poll_fired(cx)).await;
}
