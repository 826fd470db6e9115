//! The syscalls, written once for every runtime: reads into a shared per-thread buffer, vectored
//! writes, non-blocking connects, socket options. Each goes through [`Socket::try_io`] so a
//! runtime that caches readiness keeps it true.
//!
//! Two rules save a syscall per relayed message:
//! * a **short read drains the socket**: the kernel gave us less than we asked for, so there is
//!   nothing more right now; the readiness is cleared with that read instead of with a second
//!   read that would only return `EAGAIN`;
//! * a **short write fills the socket**: likewise, the next attempt waits for writability.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use proxy_core::ConnectError;
use socket2::{Domain, Protocol, SockRef, Type};

use crate::link::Outbox;
use crate::runtime::{Direction, Runtime, Socket};

/// The size of the buffer a thread reads into. Reads are split off it and handed to the core
/// without a copy; a new one is allocated when less than [`MIN_READ`] is left, so allocation
/// and zeroing cost one byte per byte read, and no connection holds a buffer while it waits.
pub const READ_CHUNK: usize = 64 * 1024;

/// The smallest space a read is offered. Below it the thread's buffer is replaced.
pub const MIN_READ: usize = 8 * 1024;

thread_local! {
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// What one read produced.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    /// Bytes; `drained` when the read was short (the socket has nothing more right now).
    Data { bytes: Bytes, drained: bool },
    /// The peer closed its write half.
    Eof,
}

/// One non-blocking read from `socket`.
pub(crate) fn read<S: Socket>(socket: &S) -> io::Result<ReadOutcome> {
    with_read_buffer(|buf| {
        let want = buf.len();
        let mut short = None;
        let result = socket.try_io(Direction::Read, || {
            let n = (&*SockRef::from(socket)).read(buf)?;
            if n > 0 && n < want {
                // Drained: tell the runtime, so that it does not report the socket readable
                // until the peer sends more.
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (result, short) {
            (_, Some(n)) => Ok(Some((n, true))),
            (Ok(0), None) => Ok(None),
            (Ok(n), None) => Ok(Some((n, false))),
            (Err(e), None) => Err(e),
        }
    })
}

/// Runs `fill` on the free part of the thread's read buffer (at least [`MIN_READ`] bytes) and
/// hands out what it filled as `Bytes`, without a copy. `fill` answers `Some((n, drained))`
/// for `n > 0` bytes, `None` at end of stream.
pub(crate) fn with_read_buffer(
    fill: impl FnOnce(&mut [u8]) -> io::Result<Option<(usize, bool)>>,
) -> io::Result<ReadOutcome> {
    SCRATCH.with_borrow_mut(|buf| {
        if buf.len() < MIN_READ {
            // The old buffer lives on in the `Bytes` already split off it, until they are written.
            *buf = BytesMut::zeroed(READ_CHUNK);
        }
        Ok(match fill(&mut buf[..])? {
            Some((n, drained)) => ReadOutcome::Data {
                bytes: buf.split_to(n).freeze(),
                drained,
            },
            None => ReadOutcome::Eof,
        })
    })
}

/// What one vectored write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// `n` bytes went out; `full` when fewer than offered (the socket buffer is full).
    Wrote { n: usize, full: bool },
}

/// How many queued buffers one vectored write offers at most.
const MAX_IOVECS: usize = 16;

/// Writes the front of `queue` to `socket`: the one buffer with `send`, several with one
/// vectored write.
pub(crate) fn write_queue<S: Socket>(socket: &S, queue: &Outbox) -> io::Result<WriteOutcome> {
    if let (1, Some(one)) = (queue.len(), queue.iter().next()) {
        return write(socket, &[IoSlice::new(one)]);
    }
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let mut n = 0;
    for (slot, bytes) in slices.iter_mut().zip(queue.iter()) {
        *slot = IoSlice::new(bytes);
        n += 1;
    }
    write(socket, &slices[..n])
}

/// One non-blocking vectored write of `slices` to `socket`.
pub(crate) fn write<S: Socket>(socket: &S, slices: &[IoSlice<'_>]) -> io::Result<WriteOutcome> {
    let offered: usize = slices.iter().map(|s| s.len()).sum();
    let mut short = None;
    let result = socket.try_io(Direction::Write, || {
        let sock = SockRef::from(socket);
        // One buffer (the usual case on the relay path) goes by `send`, which the kernel
        // takes without importing a message header and an iovec array.
        let n = match slices {
            [one] => sock.send_with_flags(one, SEND_FLAGS)?,
            _ => sock.send_vectored_with_flags(slices, SEND_FLAGS)?,
        };
        if n > 0 && n < offered {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (_, Some(n)) => Ok(WriteOutcome::Wrote { n, full: true }),
        (Ok(n), None) => Ok(WriteOutcome::Wrote { n, full: false }),
        (Err(e), None) => Err(e),
    }
}

/// A peer that has gone must give `EPIPE`, never `SIGPIPE`, whatever the embedding program
/// does with signals.
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: std::ffi::c_int = 0;

/// Options every proxied connection gets: small writes (frames, heads) must not wait for Nagle.
pub(crate) fn configure<S: Socket>(socket: &S) {
    // Best effort: a socket that refuses the option still works, only slower.
    let _ = SockRef::from(socket).set_tcp_nodelay(true);
}

/// Sends FIN. An error means the peer is gone, which the next read reports.
pub(crate) fn shutdown_write<S: Socket>(socket: &S) {
    let _ = SockRef::from(socket).shutdown(std::net::Shutdown::Write);
}

/// True when an idle pooled connection has nothing to say: a probe read finds no byte and no
/// EOF. On a runtime that caches readiness this costs no syscall unless the peer did something.
pub(crate) fn idle_and_open<S: Socket>(socket: &S) -> bool {
    let mut byte = [0u8; 1];
    let probe = socket.try_io(Direction::Read, || {
        (&*SockRef::from(socket)).read(&mut byte)
    });
    matches!(probe, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Starts a non-blocking connect to `addr` and registers the socket with the runtime; it is
/// connected once writable and [`connect_result`] says so.
pub(crate) fn start_connect<R: Runtime>(rt: &R, addr: SocketAddr) -> io::Result<R::Socket> {
    let socket = new_nonblocking_socket(addr)?;
    // Set before the SYN, so the first bytes never wait for Nagle.
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    rt.register(std::net::TcpStream::from(socket))
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn new_nonblocking_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    // Created non-blocking (and close-on-exec, which socket2 always sets): no fcntl calls.
    socket2::Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn new_nonblocking_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket =
        socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(unix)]
fn in_progress(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINPROGRESS)
}

#[cfg(not(unix))]
fn in_progress(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Once a connecting socket is writable: `Ok` if the connection is established.
pub(crate) fn connect_result<S: Socket>(socket: &S) -> io::Result<()> {
    match SockRef::from(socket).take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Classifies a failed connect by the error's kind. (Name resolution failures never get here:
/// they are classified where they happen, as [`ConnectError::Resolve`].)
pub(crate) fn connect_error(e: &io::Error) -> ConnectError {
    if is_local_exhaustion(e) {
        return ConnectError::Local;
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnectError::Unreachable
        }
        _ => ConnectError::Other,
    }
}

/// Whether `e` says this process (or machine) is out of what a socket needs.
#[cfg(unix)]
fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(not(unix))]
fn is_local_exhaustion(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_kind_not_text() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_error(&refused), ConnectError::Refused);
        let unreachable = io::Error::from(io::ErrorKind::NetworkUnreachable);
        assert_eq!(connect_error(&unreachable), ConnectError::Unreachable);
        // A message that merely mentions a lookup is not a resolution failure.
        let other = io::Error::other("failed to lookup address information");
        assert_eq!(connect_error(&other), ConnectError::Other);
        // Out of descriptors is the proxy's own trouble, not the server's.
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(connect_error(&emfile), ConnectError::Local);
    }
}
