//! # proxy-tokio — switchyard on tokio
//!
//! The tokio [`Runtime`] for switchyard's one drive loop ([`proxy_drive`]): socket readiness
//! from tokio's reactor, tokio timers, `tokio::spawn`, and tokio's name lookup. Nothing else:
//! the loop, every syscall, the pool, the drain and all protocol decisions are shared with the
//! smol adapter.
//!
//! tokio caches readiness per socket, so the drive loop's rule that a short read drains the
//! socket ([`Socket::try_io`] clears the cached readiness) saves the `EAGAIN` read per relayed
//! message, and a pooled connection's liveness probe costs no syscall unless the peer spoke.
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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use proxy_core::Config;
use proxy_drive::{BoxFuture, Direction, Runtime, Socket, Timer};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

pub use proxy_drive::{
    ClientTls, EventSink, Reload, Reloader, Resolve, ServeOptions, ServerTls, Shutdown, Stats,
    SystemResolver, TlsCertificate, TlsError, TlsOutcome, TlsSettings, Verify,
};

/// Serves `listeners` until `shutdown` is triggered and every connection has finished (or the
/// drain timeout, plus a short grace, has passed). Must run inside a tokio runtime with the
/// time and IO drivers enabled; connections are spawned on it.
///
/// # Errors
///
/// Fails only if a listener cannot be registered with tokio; accept errors (e.g. too many open
/// files) are logged and retried.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<std::net::TcpListener>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> io::Result<()> {
    proxy_drive::serve(Tokio, config, listeners, options, shutdown).await
}

/// The tokio runtime, for [`proxy_drive::serve`]. Uses the runtime the future runs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

impl Runtime for Tokio {
    type Socket = Stream;
    type Listener = TcpListener;
    type Timer = TokioTimer;

    fn register(&self, stream: std::net::TcpStream) -> io::Result<Stream> {
        TcpStream::from_std(stream).map(Stream)
    }

    fn listener(&self, listener: std::net::TcpListener) -> io::Result<TcpListener> {
        TcpListener::from_std(listener)
    }

    fn poll_accept(
        &self,
        listener: &TcpListener,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Stream, SocketAddr)>> {
        listener
            .poll_accept(cx)
            .map_ok(|(stream, addr)| (Stream(stream), addr))
    }

    fn timer(&self) -> TokioTimer {
        TokioTimer(None)
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(task);
    }

    fn lookup(
        &self,
        resolver: Arc<dyn Resolve>,
        host: &str,
        port: u16,
    ) -> BoxFuture<io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || resolver.resolve(&host, port))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        })
    }
}

/// A tokio TCP stream.
#[derive(Debug)]
pub struct Stream(TcpStream);

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Socket for Stream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // An error is left for the read itself to report.
        self.0.poll_read_ready(cx).map(drop)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_write_ready(cx).map(drop)
    }

    fn try_io<T>(&self, dir: Direction, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let interest = match dir {
            Direction::Read => Interest::READABLE,
            Direction::Write => Interest::WRITABLE,
        };
        self.0.try_io(interest, op)
    }
}

/// A tokio sleep, allocated on first use and re-armed in place.
#[derive(Debug)]
pub struct TokioTimer(Option<Pin<Box<Sleep>>>);

impl Timer for TokioTimer {
    fn reset(&mut self, at: Instant) {
        let at = tokio::time::Instant::from_std(at);
        match self.0.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.0.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}
