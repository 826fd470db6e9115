//! # proxy-tokio — switchyard on tokio
//!
//! A thin adapter that drives [`proxy_core::Session`] with tokio sockets, timers and tasks. It
//! makes no protocol decisions, and keeps no bookkeeping that is not tokio-specific: the write
//! queues, output handling, read-buffer policy, options and shutdown signal come from
//! [`proxy_core::adapter`], shared with the smol adapter. What lives here:
//!
//! * an accept loop per listener and one task per client connection, `TCP_NODELAY` on both
//!   sides;
//! * waiting for socket readiness, connects, the session's deadline and shutdown;
//! * a shared upstream keep-alive pool ([`proxy_core::IdlePool`]) of tokio sockets, reaped
//!   periodically; upgraded connections never enter it;
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
//!     // Any event can trigger it: a signal handler, an admin endpoint, a timer.
//!     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
//!     handle.trigger();
//! });
//! serve(config, vec![listener], ServeOptions::default(), shutdown).await
//! # }
//! ```

mod conn;

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use proxy_core::{Balancer, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use proxy_core::adapter::SharedPool;
pub use proxy_core::adapter::{AdapterOptions as ServeOptions, EventSink, Shutdown};

/// State every connection task shares.
struct Shared {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    pool: SharedPool<TcpStream>,
    options: ServeOptions,
    shutdown: Shutdown,
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
        pool: SharedPool::new(options.pool_idle_timeout, options.pool_max_per_peer),
        options,
        shutdown,
    });
    let mut accept_loops = JoinSet::new();
    for std_listener in listeners {
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        accept_loops.spawn(accept_loop(listener, Arc::clone(&shared)));
    }
    accept_loops.spawn(pool_reaper(Arc::clone(&shared)));
    while accept_loops.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shared.shutdown.triggered());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    connections.spawn(conn::run(stream, addr, Arc::clone(&shared)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
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
async fn pool_reaper(shared: Arc<Shared>) {
    let period = (shared.options.pool_idle_timeout / 2).max(Duration::from_millis(100));
    let mut shutdown = std::pin::pin!(shared.shutdown.triggered());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {
                shared.pool.expire(std::time::Instant::now());
            }
            () = &mut shutdown => break,
        }
    }
    shared.pool.close_all();
}
