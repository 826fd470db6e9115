//! # proxy-drive — switchyard's one drive loop
//!
//! The async half of every switchyard adapter, written once: the per-connection loop that feeds
//! [`proxy_core::Session`] and performs what it asks, the syscalls on the sockets, the upstream
//! connect, the keep-alive pool as tasks share it, accept loops, the graceful drain and the
//! [`Shutdown`] signal. It is generic over [`Runtime`], a small trait a runtime implements with
//! socket readiness, timers, spawn and name lookup — in the style of quinn's
//! `runtime/{tokio,smol}.rs`. `proxy-tokio` and `proxy-smol` are each one short file of that
//! trait plus a `serve` entry point.
//!
//! ## Why it lives here
//!
//! The loop needs futures, wakers and locks, which `proxy-core` promises never to hold: that
//! crate stays sans-IO (no async, no threads, no clock), embeddable in any event loop. Putting
//! the loop in one of the runtime crates would make the other depend on it. So it is its own
//! crate, kept beside the core it drives (`proxy-core/drive`), depending on nothing
//! runtime-specific: `proxy-core`, `bytes`, `socket2` for syscalls on any runtime's socket,
//! `event-listener` for wakeups, `tracing`.
//!
//! ## What it guarantees
//!
//! * **Bounded by what is open now.** Every waiter (shutdown, drain) is an entry that its task
//!   removes when it ends; the pool is capped per peer and by the idle timeout; no registry
//!   remembers a connection after it closed. [`Stats`] shows the live counts.
//! * **No wasted syscall on the relay path.** A short read means the socket is drained and a
//!   short write that it is full: neither is followed by a call that could only fail with
//!   `EAGAIN`. Writes are vectored over the queued buffers.
//! * **No per-message allocation, no idle buffers.** Reads go into a per-thread buffer and
//!   leave it as `Bytes` slices, without a copy; a waiting connection holds no read buffer.
//! * **No protocol decision.** Every decision is the session's; this crate only moves bytes,
//!   opens connections and keeps time.
//! * **TLS is one more stream type, not another loop.** rustls's connection is sans-IO, so the
//!   same syscalls, readiness and budgets drive a TLS connection on every runtime (listeners
//!   with [`TlsSettings`], upstreams through [`proxy_core::TlsTarget`]). The session hears of
//!   bytes as sent only once their records are on the wire. rustls's buffered API copies each
//!   record once each way and allocates per record; that is the price of TLS here today.

mod dns;
mod drive;
mod health;
mod limits;
mod link;
mod pool;
mod reload;
mod runtime;
mod server;
mod shutdown;
mod sys;
mod tls;

pub use dns::{Resolve, SystemResolver};
pub use reload::{Reload, Reloader};
pub use runtime::{AsSocketFd, BoxFuture, Direction, Runtime, Socket, Timer};
pub use server::{serve, EventSink, ServeOptions};
pub use shutdown::{Shutdown, Stats, TlsOutcome};
pub use sys::{MIN_READ, READ_CHUNK};
pub use tls::{ClientTls, ServerTls, TlsCertificate, TlsError, TlsSettings, Verify};
