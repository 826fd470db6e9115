//! The small trait a runtime implements to run switchyard: readiness of sockets, timers, spawn,
//! and name resolution. Everything else — every syscall on a socket, the connect, the loop — is
//! written once in this crate, over these few methods.
//!
//! A runtime file (`proxy-tokio`, `proxy-smol`) is a handful of one-line methods; the model is
//! quinn's `runtime/{tokio,smol}.rs`. The trait is generic (associated types, not trait objects)
//! so that the relay path has no dynamic dispatch.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::dns::Resolve;

/// A boxed future, for the rare paths where a runtime's own future is the simplest answer
/// (name resolution).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What switchyard needs from an async runtime.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// A TCP stream registered with the runtime's reactor.
    type Socket: Socket;
    /// A listening socket registered with the runtime's reactor.
    type Listener: Send + Sync + 'static;
    /// A re-armable timer.
    type Timer: Timer;

    /// Registers a connected (or connecting) non-blocking stream with the reactor.
    fn register(&self, stream: TcpStream) -> io::Result<Self::Socket>;

    /// Registers a non-blocking listener with the reactor.
    fn listener(&self, listener: TcpListener) -> io::Result<Self::Listener>;

    /// Accepts one connection, or registers the task to be woken when one may be pending.
    /// The accepted socket need not be configured: the drive loop sets its options.
    fn poll_accept(
        &self,
        listener: &Self::Listener,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Self::Socket, SocketAddr)>>;

    /// A timer that has not been armed yet.
    fn timer(&self) -> Self::Timer;

    /// Runs `task` to completion in the background.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static);

    /// Runs `resolver` for `host:port` off the event loop (name lookup blocks), on the
    /// runtime's blocking pool.
    fn lookup(
        &self,
        resolver: Arc<dyn Resolve>,
        host: &str,
        port: u16,
    ) -> BoxFuture<io::Result<Vec<SocketAddr>>>;
}

/// A non-blocking TCP stream and its readiness, as the runtime's reactor tracks it.
///
/// The syscalls themselves are made by the drive loop on the file descriptor; the runtime only
/// says when they may succeed and, through [`Socket::try_io`], learns when they did not.
pub trait Socket: AsSocketFd + Send + Sync + 'static {
    /// Ready when a read may make progress; otherwise registers the task's waker.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()>;

    /// Ready when a write may make progress; otherwise registers the task's waker.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<()>;

    /// Runs one syscall `op` in direction `dir`. A runtime that caches readiness clears it when
    /// `op` fails with `WouldBlock` (and may answer `WouldBlock` without calling `op` when it
    /// knows the socket is not ready); one that does not, just calls `op`.
    fn try_io<T>(&self, dir: Direction, op: impl FnOnce() -> io::Result<T>) -> io::Result<T>;
}

/// Which readiness a syscall consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `recv`, `accept`.
    Read,
    /// `send`, connect completion.
    Write,
}

/// A one-shot timer that can be moved.
pub trait Timer: Send + Unpin + 'static {
    /// Arms the timer for `at`, replacing any earlier setting.
    fn reset(&mut self, at: Instant);

    /// Ready once the armed instant has passed; otherwise registers the task's waker. Only
    /// polled after [`reset`](Self::reset).
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// The handle `socket2` needs to make syscalls on a runtime's socket: a file descriptor on
/// Unix, a socket handle on Windows.
#[cfg(unix)]
pub trait AsSocketFd: std::os::fd::AsFd {}
#[cfg(unix)]
impl<T: std::os::fd::AsFd> AsSocketFd for T {}

/// The handle `socket2` needs to make syscalls on a runtime's socket: a file descriptor on
/// Unix, a socket handle on Windows.
#[cfg(windows)]
pub trait AsSocketFd: std::os::windows::io::AsSocket {}
#[cfg(windows)]
impl<T: std::os::windows::io::AsSocket> AsSocketFd for T {}
