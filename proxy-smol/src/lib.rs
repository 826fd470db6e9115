//! # proxy-smol — switchyard on async-io (smol and async-std)
//!
//! The async-io [`Runtime`] for switchyard's one drive loop ([`proxy_drive`]): readiness from
//! async-io's reactor, async-io timers, name lookup on the `blocking` pool, and tasks handed to
//! the [`Spawn`] you pass — so the same code runs under smol's `Executor` and under async-std's
//! (both sit on async-io's reactor). It never picks an executor itself. Everything else — the
//! loop, every syscall, the pool, the drain and all protocol decisions — is shared with the
//! tokio adapter.
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

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_io::Async;
use proxy_core::Config;
use proxy_drive::{BoxFuture, Direction, Runtime, Socket, Timer};

pub use proxy_drive::{
    ClientTls, EventSink, Reload, Reloader, Resolve, ServeOptions, ServerTls, Shutdown, Stats,
    SystemResolver, TlsCertificate, TlsError, TlsOutcome, TlsSettings, Verify,
};

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

/// Serves `listeners` until `shutdown` is triggered and every connection has finished (or the
/// drain timeout, plus a short grace, has passed). Tasks go to `spawner`.
///
/// # Errors
///
/// Fails only if a listener cannot be registered with the async-io reactor; accept errors are
/// logged and retried.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    options: ServeOptions,
    shutdown: Shutdown,
    spawner: impl Spawn,
) -> io::Result<()> {
    proxy_drive::serve(AsyncIo::new(spawner), config, listeners, options, shutdown).await
}

/// The async-io runtime, for [`proxy_drive::serve`], with tasks going to a [`Spawn`].
#[derive(Clone)]
pub struct AsyncIo {
    spawner: Arc<dyn Spawn>,
}

impl std::fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo").finish_non_exhaustive()
    }
}

impl AsyncIo {
    /// The runtime, spawning on `spawner`.
    pub fn new(spawner: impl Spawn) -> Self {
        AsyncIo {
            spawner: Arc::new(spawner),
        }
    }
}

impl Runtime for AsyncIo {
    type Socket = Stream;
    type Listener = Async<TcpListener>;
    type Timer = AsyncTimer;

    fn register(&self, stream: TcpStream) -> io::Result<Stream> {
        // The drive loop creates its sockets non-blocking; no second syscall to set it.
        Async::new_nonblocking(stream).map(Stream)
    }

    fn listener(&self, listener: TcpListener) -> io::Result<Async<TcpListener>> {
        Async::new(listener)
    }

    fn poll_accept(
        &self,
        listener: &Async<TcpListener>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Stream, SocketAddr)>> {
        loop {
            match listener.get_ref().accept() {
                Ok((stream, addr)) => {
                    return Poll::Ready(Async::new(stream).map(|s| (Stream(s), addr)))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = std::task::ready!(listener.poll_readable(cx)) {
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn timer(&self) -> AsyncTimer {
        AsyncTimer(async_io::Timer::never())
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.spawner.spawn_task(Box::pin(task));
    }

    fn lookup(
        &self,
        resolver: Arc<dyn Resolve>,
        host: &str,
        port: u16,
    ) -> BoxFuture<io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(blocking::unblock(move || resolver.resolve(&host, port)))
    }
}

/// An async-io TCP stream.
#[derive(Debug)]
pub struct Stream(Async<TcpStream>);

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Socket for Stream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // An error is left for the read itself to report.
        self.0.poll_readable(cx).map(drop)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_writable(cx).map(drop)
    }

    fn try_io<T>(&self, _dir: Direction, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        // async-io keeps no readiness between waits: each `poll_*_ready` asks the reactor anew.
        op()
    }
}

/// An async-io timer.
#[derive(Debug)]
pub struct AsyncTimer(async_io::Timer);

impl Timer for AsyncTimer {
    fn reset(&mut self, at: Instant) {
        self.0.set_at(at);
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}
