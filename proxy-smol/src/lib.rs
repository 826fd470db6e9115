//! # proxy-smol — switchyard on async-io (smol and async-std)
//!
//! A thin adapter that drives [`proxy_core::Session`] with [`async_io`] sockets and timers. It is
//! executor-agnostic: it never spawns on a particular executor, but hands its tasks to the
//! [`Spawn`] you pass, so the same code runs under smol's `Executor` and under async-std's
//! (both sit on async-io's reactor). Like the tokio adapter it makes no protocol decisions and
//! keeps no bookkeeping of its own: write queues, output handling, read-buffer policy, options
//! and the shutdown signal come from [`proxy_core::adapter`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use proxy_core::{Config, Peer, UpstreamGroup};
//! use proxy_smol::{serve, ServeOptions, Shutdown};
//!
//! let config = Arc::new(Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)])));
//! let listener = std::net::TcpListener::bind("127.0.0.1:8080").expect("bind");
//! let ex = Arc::new(smol::Executor::new());
//! let spawner = {
//!     let ex = Arc::clone(&ex);
//!     move |task| ex.spawn(task).detach()
//! };
//! let shutdown = Shutdown::new();
//! smol::block_on(ex.run(serve(config, vec![listener], ServeOptions::default(), shutdown, spawner)))
//!     .expect("serve");
//! ```

mod conn;

use std::future::Future;
use std::io;
use std::net::{TcpListener as StdListener, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future;
use proxy_core::{Balancer, Config};

use proxy_core::adapter::SharedPool;
pub use proxy_core::adapter::{AdapterOptions as ServeOptions, EventSink, Shutdown};

/// A boxed task, as handed to a [`Spawn`].
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs tasks on some executor. Implemented for every `Fn(Task)`, e.g.
/// `move |t| executor.spawn(t).detach()` for smol or `|t| { async_std::task::spawn(t); }`.
pub trait Spawn: Send + Sync + 'static {
    /// Starts `task`; it must be polled to completion (or dropped at executor shutdown).
    fn spawn_task(&self, task: Task);
}

impl<F> Spawn for F
where
    F: Fn(Task) + Send + Sync + 'static,
{
    fn spawn_task(&self, task: Task) {
        self(task)
    }
}

/// State every connection task shares.
struct Shared {
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    pool: SharedPool<Async<TcpStream>>,
    options: ServeOptions,
    shutdown: Shutdown,
    /// Triggered when the drain has run out of time: remaining connections end at once.
    kill: Shutdown,
}

/// Serves `listeners` until `shutdown` is triggered and every connection has finished (or the
/// drain timeout, plus a short grace, has passed). Tasks go to `spawner`.
///
/// # Errors
///
/// Fails only if a listener cannot be registered with the async-io reactor; accept errors are
/// logged and retried.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<StdListener>,
    options: ServeOptions,
    shutdown: Shutdown,
    spawner: impl Spawn,
) -> io::Result<()> {
    let spawner: Arc<dyn Spawn> = Arc::new(spawner);
    let shared = Arc::new(Shared {
        balancer: Arc::new(Balancer::new(&config)),
        config,
        pool: SharedPool::new(options.pool_idle_timeout, options.pool_max_per_peer),
        options,
        shutdown,
        kill: Shutdown::new(),
    });
    // Every task holds a sender; when the last one is dropped, `recv` fails: all tasks are done.
    let (alive, all_done) = async_channel::bounded::<()>(1);
    for listener in listeners {
        let listener = Async::new(listener)?;
        let (shared, spawner2, alive) = (Arc::clone(&shared), Arc::clone(&spawner), alive.clone());
        spawner.spawn_task(Box::pin(async move {
            accept_loop(listener, shared, spawner2, alive).await;
        }));
    }
    {
        let (shared, alive) = (Arc::clone(&shared), alive.clone());
        spawner.spawn_task(Box::pin(async move {
            pool_reaper(shared).await;
            drop(alive);
        }));
    }
    drop(alive);
    shared.shutdown.triggered().await;
    let grace = shared.options.drain_timeout + Duration::from_secs(5);
    let drained = future::or(async { all_done.recv().await.is_err() }, async {
        Timer::after(grace).await;
        false
    })
    .await;
    if !drained {
        tracing::warn!("connections still open after the drain timeout; closing them");
        shared.kill.trigger();
        let _ = all_done.recv().await;
    }
    Ok(())
}

async fn accept_loop(
    listener: Async<StdListener>,
    shared: Arc<Shared>,
    spawner: Arc<dyn Spawn>,
    alive: async_channel::Sender<()>,
) {
    enum Next {
        Accepted(io::Result<(Async<TcpStream>, std::net::SocketAddr)>),
        Stop,
    }
    loop {
        let next = future::or(async { Next::Accepted(listener.accept().await) }, async {
            shared.shutdown.triggered().await;
            Next::Stop
        })
        .await;
        match next {
            Next::Stop => break,
            Next::Accepted(Ok((stream, addr))) => {
                let (shared, alive) = (Arc::clone(&shared), alive.clone());
                spawner.spawn_task(Box::pin(async move {
                    let kill = shared.kill.triggered();
                    future::or(conn::run(stream, addr, Arc::clone(&shared)), kill).await;
                    drop(alive);
                }));
            }
            Next::Accepted(Err(e)) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Closes pooled connections that outlived the pool's idle timeout.
async fn pool_reaper(shared: Arc<Shared>) {
    let period = (shared.options.pool_idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        let stop = future::or(
            async {
                Timer::after(period).await;
                false
            },
            async {
                shared.shutdown.triggered().await;
                true
            },
        )
        .await;
        if stop {
            break;
        }
        shared.pool.expire(std::time::Instant::now());
    }
    shared.pool.close_all();
}
