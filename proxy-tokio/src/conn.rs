//! One client connection: a loop that moves bytes between sockets and a
//! [`Session`](proxy_core::Session), and nothing else. Every decision — what to send, when to
//! connect, when to shut down or close — is the session's; this file only performs them.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use proxy_core::{ConnectError, Event, Input, Output, Peer, PeerInfo, Session, Side, UpstreamId};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;

/// Bytes asked of the kernel per read. The buffer is allocated when a socket is readable and
/// released before the task waits again, so an idle connection holds none.
const READ_SIZE: usize = 16 * 1024;
/// Reads per side before yielding to the other side and the timers.
const READS_PER_TURN: usize = 8;
/// Slices per vectored write.
const MAX_IOVECS: usize = 64;

type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// A socket and the bytes the session has asked to write to it.
struct Endpoint {
    stream: Option<TcpStream>,
    queue: VecDeque<Bytes>,
    read_closed: bool,
}

impl Endpoint {
    fn new(stream: Option<TcpStream>) -> Self {
        Endpoint {
            stream,
            queue: VecDeque::new(),
            read_closed: false,
        }
    }

    fn close(&mut self) {
        self.stream = None;
        self.queue.clear();
        self.read_closed = true;
    }
}

struct Conn {
    session: Session,
    shared: Arc<Shared>,
    client: Endpoint,
    upstream: Endpoint,
    /// The peer of the current upstream connection, for returning it to the pool.
    upstream_peer: Option<Peer>,
    connecting: Option<(UpstreamId, Peer, Connecting)>,
}

pub(crate) async fn run(
    stream: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Small writes (frames, heads) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let session = Session::new(
        Arc::clone(&shared.config),
        Arc::clone(&shared.balancer),
        PeerInfo::new(addr),
        Instant::now(),
    );
    let mut conn = Conn {
        session,
        shared,
        client: Endpoint::new(Some(stream)),
        upstream: Endpoint::new(None),
        upstream_peer: None,
        connecting: None,
    };
    let mut draining = false;
    loop {
        if !draining && *shutdown.borrow() {
            draining = true;
            let now = Instant::now();
            let deadline = now + conn.shared.options.drain_timeout;
            conn.session.start_drain(now, deadline);
        }
        conn.perform_outputs().await;
        if conn.session.is_closed() {
            break;
        }
        if conn.flush(Side::Client) | conn.flush(Side::Upstream) {
            continue;
        }
        let now = Instant::now();
        let deadline = conn.session.poll_timeout();
        if deadline.is_some_and(|d| d <= now) {
            conn.session.handle_timeout(now);
            continue;
        }
        if !conn.wait(deadline, &mut shutdown, draining).await {
            // Nothing can wake this connection (no wanted read, write, connect or timer): the
            // session has no way forward, so end it rather than spin.
            tracing::warn!(client = %addr, "connection has nothing left to wait for; closing");
            break;
        }
    }
}

impl Conn {
    /// Drains the session's outputs, performing each (the drain invariant).
    async fn perform_outputs(&mut self) {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Send { to, bytes } => self.endpoint(to).queue.push_back(bytes),
                Output::Connect {
                    id,
                    peer,
                    allow_pooled,
                } => self.connect(id, peer, allow_pooled),
                Output::ShutdownWrite { side } => {
                    if let Some(s) = self.endpoint(side).stream.as_mut() {
                        // TcpStream's shutdown completes at once; an error means the peer is gone,
                        // which the next read reports.
                        let _ = s.shutdown().await;
                    }
                }
                Output::Close { side } => {
                    self.endpoint(side).close();
                    if side == Side::Upstream {
                        self.connecting = None;
                        self.upstream_peer = None;
                    }
                }
                Output::ReleaseUpstream { reusable, .. } => self.release(reusable),
                Output::Event(Event::Exchange(log)) => (self.shared.options.events)(&log),
                other => tracing::debug!(?other, "output not handled by this adapter version"),
            }
        }
    }

    fn endpoint(&mut self, side: Side) -> &mut Endpoint {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    fn connect(&mut self, id: UpstreamId, peer: Peer, allow_pooled: bool) {
        if allow_pooled {
            if let Some(stream) = self.pooled(&peer) {
                self.upstream = Endpoint::new(Some(stream));
                self.upstream_peer = Some(peer);
                self.session.handle_input(
                    Instant::now(),
                    Input::UpstreamConnected { id, reused: true },
                );
                return;
            }
        }
        let (host, port) = (peer.host().to_owned(), peer.port());
        let fut: Connecting =
            Box::pin(async move { TcpStream::connect((host.as_str(), port)).await });
        self.connecting = Some((id, peer, fut));
    }

    /// A live pooled connection to `peer`, if any. One the peer has closed (or that has unread
    /// bytes, which no idle HTTP/1.1 connection may have) is dropped.
    fn pooled(&self, peer: &Peer) -> Option<TcpStream> {
        let mut pool = self.shared.pool.lock().ok()?;
        let now = Instant::now();
        while let Some(stream) = pool.take(peer, now) {
            let mut probe = [0u8; 1];
            if let Err(e) = stream.try_read(&mut probe) {
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Some(stream);
                }
            }
        }
        None
    }

    fn release(&mut self, reusable: bool) {
        let stream = self.upstream.stream.take();
        let peer = self.upstream_peer.take();
        self.upstream.close();
        if let (true, Some(stream), Some(peer)) = (reusable, stream, peer) {
            if let Ok(mut pool) = self.shared.pool.lock() {
                // Whatever the pool hands back (an evicted connection) is dropped, i.e. closed.
                drop(pool.put(&peer, stream, Instant::now()));
            }
        }
    }

    /// Writes as much queued data as the socket takes without blocking. Returns whether any
    /// progress was made (the session then has news).
    fn flush(&mut self, side: Side) -> bool {
        let mut progressed = false;
        loop {
            let ep = self.endpoint(side);
            let Some(stream) = ep.stream.as_ref() else {
                return progressed;
            };
            if ep.queue.is_empty() {
                return progressed;
            }
            // A stack array, not a Vec: this runs once per write on the tunnel path.
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (slot, bytes) in slices.iter_mut().zip(ep.queue.iter()) {
                *slot = IoSlice::new(bytes);
                count += 1;
            }
            let result = stream.try_write_vectored(&slices[..count]);
            match result {
                Ok(0) => {
                    self.session
                        .handle_input(Instant::now(), Input::Reset { from: side });
                    return true;
                }
                Ok(n) => {
                    consume(&mut ep.queue, n);
                    self.session
                        .handle_input(Instant::now(), Input::Sent { to: side, len: n });
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progressed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    ep.queue.clear();
                    self.session
                        .handle_input(Instant::now(), Input::Reset { from: side });
                    return true;
                }
            }
        }
    }

    /// Reads from `side` while the session wants bytes and the socket has them.
    fn read(&mut self, side: Side) {
        let mut buf = BytesMut::new();
        for _ in 0..READS_PER_TURN {
            if !self.session.wants_read(side) {
                return;
            }
            let ep = self.endpoint(side);
            let Some(stream) = ep.stream.as_ref() else {
                return;
            };
            if ep.read_closed {
                return;
            }
            if buf.capacity() < READ_SIZE / 4 {
                buf = BytesMut::with_capacity(READ_SIZE);
            }
            match stream.try_read_buf(&mut buf) {
                Ok(0) => {
                    ep.read_closed = true;
                    self.session
                        .handle_input(Instant::now(), Input::Eof { from: side });
                    return;
                }
                Ok(_) => {
                    let bytes = buf.split().freeze();
                    self.session
                        .handle_input(Instant::now(), Input::Data { from: side, bytes });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    ep.read_closed = true;
                    self.session
                        .handle_input(Instant::now(), Input::Reset { from: side });
                    return;
                }
            }
        }
    }

    /// Sleeps until a socket the session cares about is ready, a connect finishes, the deadline
    /// passes, or shutdown begins; then feeds the session what happened.
    /// Returns false if there was nothing to wait for.
    async fn wait(
        &mut self,
        deadline: Option<Instant>,
        shutdown: &mut watch::Receiver<bool>,
        draining: bool,
    ) -> bool {
        let want_client = self.session.wants_read(Side::Client) && !self.client.read_closed;
        let want_upstream = self.session.wants_read(Side::Upstream) && !self.upstream.read_closed;
        let client_writes = !self.client.queue.is_empty();
        let upstream_writes = !self.upstream.queue.is_empty();
        let sleep = deadline.map(|d| tokio::time::sleep_until(tokio::time::Instant::from_std(d)));

        enum Wake {
            Read(Side),
            Write,
            Connected(io::Result<TcpStream>),
            Timer,
            Shutdown,
            Nothing,
        }
        let client = self.client.stream.as_ref();
        let upstream = self.upstream.stream.as_ref();
        let is_connecting = self.connecting.is_some();
        let connecting = self.connecting.as_mut().map(|(_, _, f)| f);
        let wake = tokio::select! {
            // A readiness error surfaces again from the read itself, which reports it.
            _ = ready(client, tokio::io::Interest::READABLE), if want_client => Wake::Read(Side::Client),
            _ = ready(upstream, tokio::io::Interest::READABLE), if want_upstream => Wake::Read(Side::Upstream),
            _ = ready(client, tokio::io::Interest::WRITABLE), if client_writes => Wake::Write,
            _ = ready(upstream, tokio::io::Interest::WRITABLE), if upstream_writes => Wake::Write,
            r = async { match connecting { Some(f) => f.await, None => std::future::pending().await } }, if is_connecting => Wake::Connected(r),
            _ = async { match sleep { Some(s) => s.await, None => std::future::pending().await } }, if deadline.is_some() => Wake::Timer,
            _ = shutdown.changed(), if !draining => Wake::Shutdown,
            else => Wake::Nothing,
        };
        match wake {
            Wake::Read(side) => self.read(side),
            Wake::Write | Wake::Shutdown => {}
            Wake::Nothing => return false,
            Wake::Timer => self.session.handle_timeout(Instant::now()),
            Wake::Connected(result) => {
                let Some((id, peer, _)) = self.connecting.take() else {
                    return true;
                };
                match result {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        self.upstream = Endpoint::new(Some(stream));
                        self.upstream_peer = Some(peer);
                        self.session.handle_input(
                            Instant::now(),
                            Input::UpstreamConnected { id, reused: false },
                        );
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "upstream connect failed");
                        self.session.handle_input(
                            Instant::now(),
                            Input::UpstreamFailed {
                                id,
                                why: connect_error(&e),
                            },
                        );
                    }
                }
            }
        }
        true
    }
}

async fn ready(
    stream: Option<&TcpStream>,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::Ready> {
    match stream {
        Some(s) => s.ready(interest).await,
        None => std::future::pending().await,
    }
}

/// Drops `n` written bytes from the front of the queue, splitting a partly written `Bytes`
/// without copying.
fn consume(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = queue.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            queue.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

fn connect_error(e: &io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnectError::Unreachable
        }
        // tokio reports an unresolvable name as an io::Error of kind Other or Uncategorized.
        _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => {
            ConnectError::Resolve
        }
        _ => ConnectError::Other,
    }
}
