//! The server around the connections: accept loops, the pool reaper, the graceful drain, and
//! the state every connection task shares. Written once, over [`Runtime`].

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use proxy_core::{Balancer, Config, Event, PeerInfo};

use crate::dns::{DnsCache, Resolve, SystemResolver};
use crate::pool::SharedPool;
use crate::runtime::{Runtime, Timer};
use crate::shutdown::{race, Shutdown, Stats, TaskGuard};
use crate::{drive, health, sys};

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
    pub(crate) config: Arc<Config>,
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) pool: SharedPool<R::Socket>,
    pub(crate) options: ServeOptions,
    pub(crate) shutdown: Shutdown,
    pub(crate) dns: Arc<DnsCache>,
}

/// Extra time after the drain timeout before remaining connections are forced closed.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Pause after an accept error such as `EMFILE`, instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
        .map(|l| {
            l.set_nonblocking(true)?;
            // Sessions learn which listener accepted them: virtual hosts can be per listener.
            let local = l.local_addr().ok();
            Ok((rt.listener(l)?, local))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let stats = Arc::clone(&options.stats);
    let drain_timeout = options.drain_timeout;
    let shared = Arc::new(Shared {
        balancer: Arc::new(Balancer::new(&config, Instant::now())),
        pool: SharedPool::new(
            options.pool_idle_timeout,
            options.pool_max_per_peer,
            Arc::clone(&stats),
        ),
        rt: rt.clone(),
        config,
        dns: Arc::new(DnsCache::new(
            Arc::clone(&options.resolver),
            options.dns_refresh,
        )),
        options,
        shutdown: shutdown.clone(),
    });
    for (listener, local) in registered {
        let (shared, guard) = (Arc::clone(&shared), stats.task());
        rt.spawn(accept_loop(shared, listener, local, guard));
    }
    {
        let (shared, guard) = (Arc::clone(&shared), stats.task());
        rt.spawn(pool_reaper(shared, guard));
    }
    for (gi, group) in shared.config.all_groups().enumerate() {
        let Some(check) = &group.health else {
            continue;
        };
        for (i, server) in group.servers.iter().enumerate() {
            let Ok(index) = u16::try_from(i) else {
                break;
            };
            rt.spawn(health::check_server(
                Arc::clone(&shared),
                gi,
                index,
                check.clone(),
                server.peer.clone(),
                stats.task(),
            ));
        }
    }
    drop(shared);
    shutdown.triggered().await;
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
    _guard: TaskGuard,
) {
    let mut stopped = std::pin::pin!(shared.shutdown.triggered());
    let mut backoff: Option<R::Timer> = None;
    poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() {
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
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
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

fn spawn_connection<R: Runtime>(
    shared: &Arc<Shared<R>>,
    socket: R::Socket,
    addr: SocketAddr,
    local: Option<SocketAddr>,
) {
    sys::configure(&socket);
    let guard = shared.options.stats.connection();
    let mut client = PeerInfo::new(addr);
    if let Some(local) = local {
        client = client.with_local(local);
    }
    let task = drive::run(Arc::clone(shared), socket, client, guard);
    shared.rt.spawn(task);
}

/// Closes pooled connections that outlived the pool's idle timeout, so their sockets do not
/// linger until someone asks for them; at shutdown, closes them all.
async fn pool_reaper<R: Runtime>(shared: Arc<Shared<R>>, _guard: TaskGuard) {
    let period = (shared.options.pool_idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        let stop = race(
            async {
                shared.shutdown.triggered().await;
                true
            },
            async {
                sleep(&shared.rt, Instant::now() + period).await;
                false
            },
        );
        if stop.await {
            break;
        }
        shared.pool.expire(Instant::now());
    }
    shared.pool.close_all();
}

pub(crate) async fn sleep<R: Runtime>(rt: &R, until: Instant) {
    let mut timer = rt.timer();
    timer.reset(until);
    poll_fn(|cx| timer.poll_fired(cx)).await;
}
