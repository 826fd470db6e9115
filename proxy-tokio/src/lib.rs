//! # proxy-tokio — switchyard on tokio
//!
//! A thin adapter that drives [`proxy_core::Session`] with tokio sockets, timers and tasks. It
//! makes no protocol decisions: every byte goes to the core, and the adapter does what the
//! core's outputs say. What lives here is only IO:
//!
//! * an accept loop per listener and one task per client connection, `TCP_NODELAY` on both
//!   sides;
//! * reads handed to the core as `Bytes` split off a read buffer, honouring
//!   [`Session::wants_read`](proxy_core::Session::wants_read); a connection waiting for bytes
//!   holds no read buffer at all (idle WebSockets are the common case);
//! * vectored writes of the core's queued `Send`s, reported back as `Sent`;
//! * a shared upstream keep-alive pool ([`proxy_core::IdlePool`]) with an idle timeout and a
//!   per-peer cap; upgraded connections never enter it;
//! * graceful shutdown through a [`Shutdown`] handle: stop accepting, let exchanges finish,
//!   give tunnels [`ServeOptions::drain_timeout`], then return.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use proxy_core::{Config, Peer, UpstreamGroup};
//! use proxy_tokio::{serve, ServeOptions, Shutdown};
//!
//! let config = Arc::new(Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)])));
//! let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
//! let shutdown = Shutdown::new();
//! let handle = shutdown.clone();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     handle.trigger();
//! });
//! serve(config, vec![listener], ServeOptions::default(), shutdown).await
//! # }
//! ```

mod conn;

use std::fmt;
use std::net::TcpListener as StdListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_core::{Balancer, Config, ExchangeLog, IdlePool};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Receives one record per finished exchange or tunnel (the access log).
pub type EventSink = Arc<dyn Fn(&ExchangeLog) + Send + Sync>;

/// Adapter settings that are not protocol: how long to drain, how to pool, where events go.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// After shutdown is triggered, how long tunnels may stay open before they are closed.
    pub drain_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle upstream connections are kept per peer (0 disables pooling).
    pub pool_max_per_peer: usize,
    /// Where finished exchanges are reported.
    pub events: EventSink,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            drain_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_per_peer: 32,
            events: Arc::new(|_| {}),
        }
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("drain_timeout", &self.drain_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_per_peer", &self.pool_max_per_peer)
            .finish_non_exhaustive()
    }
}

/// Triggers a graceful shutdown of a running [`serve`]. Cheap to clone; every clone triggers
/// the same shutdown.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle that has not been triggered.
    pub fn new() -> Self {
        Shutdown {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Stops accepting, lets exchanges finish and gives tunnels the drain timeout. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// State every connection task shares.
struct Shared {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    pool: Mutex<IdlePool<TcpStream>>,
    options: ServeOptions,
}

/// Serves `listeners` until `shutdown` is triggered and every connection has finished (or the
/// drain timeout, plus a short grace, has passed). Must run inside a tokio runtime with the
/// time and IO drivers enabled.
///
/// # Errors
///
/// Fails only if a listener cannot be registered with tokio; accept errors (e.g. too many open
/// files) are logged and retried.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<StdListener>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        balancer: Arc::new(Balancer::new(&config)),
        config,
        pool: Mutex::new(IdlePool::new(
            options.pool_idle_timeout,
            options.pool_max_per_peer,
        )),
        options,
    });
    let mut accept_loops = JoinSet::new();
    for std_listener in listeners {
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        accept_loops.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            shutdown.subscribe(),
        ));
    }
    accept_loops.spawn(pool_reaper(Arc::clone(&shared), shutdown.subscribe()));
    while accept_loops.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    connections.spawn(conn::run(stream, addr, Arc::clone(&shared), shutdown.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => {}
        }
    }
    drop(listener);
    // Connections drain themselves (each saw the shutdown); this bounds a misbehaving one.
    let grace = shared.options.drain_timeout + Duration::from_secs(5);
    let finished = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.abort_all();
    }
}

/// Closes pooled connections that outlived the pool's idle timeout, so their sockets do not
/// linger half-closed until someone asks for them.
async fn pool_reaper(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let period = (shared.options.pool_idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {
                if let Ok(mut pool) = shared.pool.lock() {
                    pool.expire(std::time::Instant::now());
                }
            }
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    if let Ok(mut pool) = shared.pool.lock() {
        *pool = IdlePool::new(Duration::ZERO, 0);
    }
}
