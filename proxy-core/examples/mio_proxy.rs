//! # A complete reverse proxy on a hand-written `mio` event loop
//!
//! The proof that [`proxy_core::Session`] embeds anywhere: no async runtime, one thread, one
//! `mio::Poll`. Everything HTTP and WebSocket (parsing, rewriting, the `101` check, framing,
//! keep-alive, half-close, timeouts) is decided by the core; this file only moves bytes between
//! sockets and sessions and tells the sessions what time it is.
//!
//! ```text
//! cargo run -p proxy-core --example mio_proxy -- --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000
//! ```
//!
//! How it keeps the core's contract:
//! * after every `handle_*` call it drains `poll_output` until `None`, performing each output in
//!   order (writes are queued per side and leave in that order);
//! * it reads a side only while `wants_read(side)` says so, and because mio is edge-triggered it
//!   retries reads after every drain instead of waiting for an edge that may never come;
//! * every successful write is reported as `Input::Sent`, which is what lets the core apply
//!   backpressure and know when a side is flushed before it asks for `ShutdownWrite`/`Close`;
//! * the poll timeout is the earliest `poll_timeout()` of all sessions.
//!
//! Deliberate simplifications, each fine for an example and each done properly by a production
//! adapter: names are resolved with the blocking resolver (instant for IP literals); there is no
//! upstream connection pool, so `ReleaseUpstream` just closes; deadlines are found by scanning
//! every session; a busy connection is pumped until its sockets would block before the next
//! one gets a turn; stopping drops connections instead of calling `Session::start_drain`.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use proxy_core::{
    Balancer, Config, ConnectError, Event, Input, Output, Peer, PeerInfo, Session, Side,
    UpstreamGroup, UpstreamId,
};

const LISTENER: Token = Token(usize::MAX);
/// Upper bound on one wait, so that `run` notices `stop` promptly.
const TICK: Duration = Duration::from_millis(50);
const READ_SIZE: usize = 16 * 1024;
/// At most this many queued buffers go into one `write_vectored` call.
const MAX_IOV: usize = 64;

/// One socket and what the session has asked us to write to it.
struct Pipe {
    stream: TcpStream,
    /// `Output::Send` buffers not yet fully written, oldest first.
    queue: VecDeque<Bytes>,
    /// A read returned 0: the core has its `Eof`, and reading again would only repeat it.
    read_done: bool,
    /// Set while an upstream's non-blocking connect is in progress.
    connecting: Option<UpstreamId>,
}

impl Pipe {
    fn new(stream: TcpStream, connecting: Option<UpstreamId>) -> Self {
        Pipe {
            stream,
            queue: VecDeque::new(),
            read_done: false,
            connecting,
        }
    }

    /// Drops the first `n` queued bytes: the part a write accepted.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            if n < front.len() {
                front.advance(n);
                break;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }
}

/// A client connection: its session and the sockets the session currently owns.
struct Conn {
    /// Tokens are `2 * key` for the client and `2 * key + 1` for the upstream.
    key: usize,
    session: Session,
    client: Option<Pipe>,
    upstream: Option<Pipe>,
    /// The session's `poll_timeout()`, re-read after every pump.
    deadline: Option<Instant>,
}

impl Conn {
    fn pipe_mut(&mut self, side: Side) -> Option<&mut Pipe> {
        match side {
            Side::Client => self.client.as_mut(),
            Side::Upstream => self.upstream.as_mut(),
        }
    }

    /// Feeds one input, then drains (the invariant the core relies on).
    fn feed(&mut self, registry: &Registry, input: Input) {
        self.session.handle_input(Instant::now(), input);
        self.drain(registry);
    }

    fn drain(&mut self, registry: &Registry) {
        // Performing an output can itself produce an input (a connect that fails at once, a
        // failed shutdown). Those are fed only after the drain is complete, so the session is
        // never re-entered mid-drain, and each of them is followed by its own drain.
        let mut follow_ups = VecDeque::new();
        loop {
            while let Some(output) = self.session.poll_output() {
                self.perform(registry, output, &mut follow_ups);
            }
            let Some(input) = follow_ups.pop_front() else {
                break;
            };
            self.session.handle_input(Instant::now(), input);
        }
    }

    fn perform(&mut self, registry: &Registry, output: Output, follow_ups: &mut VecDeque<Input>) {
        match output {
            // `allow_pooled` only matters to an adapter with a pool.
            Output::Connect { id, peer, .. } => {
                // A session owns one upstream at a time and closes or releases it first.
                debug_assert!(self.upstream.is_none(), "Connect while an upstream is open");
                self.close(registry, Side::Upstream);
                match self.connect(registry, id, &peer) {
                    Ok(pipe) => self.upstream = Some(pipe),
                    Err(why) => follow_ups.push_back(Input::UpstreamFailed { id, why }),
                }
            }
            // No pipe means we already reported that side `Reset`; the core is closing it.
            Output::Send { to, bytes } => {
                if let Some(pipe) = self.pipe_mut(to) {
                    pipe.queue.push_back(bytes);
                }
            }
            // The core asks for this only once everything sent to `side` was reported `Sent`.
            Output::ShutdownWrite { side } => {
                if let Some(pipe) = self.pipe_mut(side) {
                    pipe.queue.clear();
                    if pipe.stream.shutdown(Shutdown::Write).is_err() {
                        self.close(registry, side);
                        follow_ups.push_back(Input::Reset { from: side });
                    }
                }
            }
            Output::Close { side, .. } => self.close(registry, side),
            // No pool in this example: a reusable connection is closed like any other.
            Output::ReleaseUpstream { .. } => self.close(registry, Side::Upstream),
            Output::Event(event) => log_event(&event),
            other => eprintln!("mio_proxy: ignoring unknown output {other:?}"),
        }
    }

    /// Starts a non-blocking connect; `check_connect` notices when it completes.
    fn connect(
        &self,
        registry: &Registry,
        id: UpstreamId,
        peer: &Peer,
    ) -> Result<Pipe, ConnectError> {
        // Blocking resolution stalls the whole loop for a DNS name; a real adapter resolves
        // off-loop (or caches).
        let addr = (peer.host(), peer.port())
            .to_socket_addrs()
            .map_err(|_| ConnectError::Resolve)?
            .next()
            .ok_or(ConnectError::Resolve)?;
        let mut stream = TcpStream::connect(addr).map_err(|e| connect_error(&e))?;
        let token = Token(2 * self.key + 1);
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|_| ConnectError::Other)?;
        Ok(Pipe::new(stream, Some(id)))
    }

    fn close(&mut self, registry: &Registry, side: Side) {
        let pipe = match side {
            Side::Client => self.client.take(),
            Side::Upstream => self.upstream.take(),
        };
        if let Some(mut pipe) = pipe {
            // Dropping the socket closes it; deregistering first is what mio asks for.
            let _ = registry.deregister(&mut pipe.stream);
        }
    }

    /// Makes all the progress the sockets allow: connect completion, writes, reads, until every
    /// socket would block or the session says stop. Called on any event for this connection,
    /// which is also how reads resume after `wants_read` turned true again.
    fn pump(&mut self, registry: &Registry, buf: &mut BytesMut) {
        loop {
            let mut progressed = self.check_connect(registry);
            for side in [Side::Client, Side::Upstream] {
                progressed |= self.flush(registry, side);
            }
            for side in [Side::Client, Side::Upstream] {
                progressed |= self.read(registry, side, buf);
            }
            if !progressed || self.session.is_closed() {
                break;
            }
        }
        self.deadline = self.session.poll_timeout();
    }

    fn on_timeout(&mut self, registry: &Registry, buf: &mut BytesMut, now: Instant) {
        self.session.handle_timeout(now);
        self.drain(registry);
        self.pump(registry, buf);
    }

    /// The recipe from `mio::net::TcpStream::connect`: error first, then "connected yet?".
    fn check_connect(&mut self, registry: &Registry) -> bool {
        let Some(pipe) = self.upstream.as_mut() else {
            return false;
        };
        let Some(id) = pipe.connecting else {
            return false;
        };
        let result = match pipe.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match pipe.stream.peer_addr() {
                Ok(_) => Ok(()),
                // Still in progress; a later writable event brings us back here.
                Err(e) if matches!(e.kind(), ErrorKind::NotConnected | ErrorKind::WouldBlock) => {
                    return false
                }
                Err(e) => Err(e),
            },
        };
        pipe.connecting = None;
        let input = match result {
            Ok(()) => {
                // Small WebSocket frames must not wait for Nagle.
                let _ = pipe.stream.set_nodelay(true);
                Input::UpstreamConnected { id, reused: false }
            }
            Err(e) => {
                self.close(registry, Side::Upstream);
                Input::UpstreamFailed {
                    id,
                    why: connect_error(&e),
                }
            }
        };
        self.feed(registry, input);
        true
    }

    /// Writes queued bytes until the socket would block, reporting each accepted write.
    fn flush(&mut self, registry: &Registry, side: Side) -> bool {
        let mut progressed = false;
        loop {
            let Some(pipe) = self.pipe_mut(side) else {
                return progressed;
            };
            if pipe.queue.is_empty() || pipe.connecting.is_some() {
                return progressed;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let count = (iov.iter_mut().zip(&pipe.queue))
                .map(|(slot, bytes)| *slot = IoSlice::new(bytes))
                .count();
            let input = match pipe.stream.write_vectored(&iov[..count]) {
                Ok(0) => None,
                Ok(n) => {
                    pipe.consume(n);
                    Some(Input::Sent { to: side, len: n })
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return progressed,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => None,
            };
            progressed = true;
            let input = input.unwrap_or_else(|| {
                // The connection is unusable; nothing more will be read or written on it.
                self.close(registry, side);
                Input::Reset { from: side }
            });
            self.feed(registry, input);
        }
    }

    /// Reads one chunk from `side` if the session wants it. One chunk per call, so the pump
    /// alternates reads with the writes they cause and queues stay short.
    fn read(&mut self, registry: &Registry, side: Side, buf: &mut BytesMut) -> bool {
        // Backpressure: leaving a socket unread closes the kernel's window, which slows the peer.
        if !self.session.wants_read(side) {
            return false;
        }
        let Some(pipe) = self.pipe_mut(side) else {
            return false;
        };
        if pipe.read_done || pipe.connecting.is_some() {
            return false;
        }
        // Zero-filled because the workspace forbids `unsafe` reads into spare capacity. The
        // buffer is split off and frozen, so the core forwards these very bytes without copying.
        buf.reserve(READ_SIZE);
        buf.resize(READ_SIZE, 0);
        let result = pipe.stream.read(&mut buf[..]);
        // Keep what was read; after EOF or an error the buffer is left empty for the next read.
        buf.truncate(*result.as_ref().unwrap_or(&0));
        let input = match result {
            Ok(0) => {
                pipe.read_done = true;
                Input::Eof { from: side }
            }
            Ok(_) => Input::Data {
                from: side,
                bytes: buf.split().freeze(),
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => return true,
            Err(_) => {
                self.close(registry, side);
                Input::Reset { from: side }
            }
        };
        self.feed(registry, input);
        true
    }
}

fn connect_error(e: &io::Error) -> ConnectError {
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectError::Refused,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => ConnectError::Unreachable,
        _ => ConnectError::Other,
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Exchange(log) => {
            let status = log.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
            let close = log
                .close
                .as_ref()
                .map_or_else(|| "keep-alive".to_owned(), |c| c.to_string());
            eprintln!(
                "{} \"{}\" {} {}B upstream={} {}",
                log.client,
                log.request_line,
                status,
                log.bytes_to_client,
                log.upstream
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
                close
            );
        }
        other => eprintln!("{other:?}"),
    }
}

/// Everything the loop owns besides the `Poll`, whose registry every method borrows.
struct Server {
    listener: TcpListener,
    config: Arc<Config>,
    balancer: Arc<Balancer>,
    conns: HashMap<usize, Conn>,
    next_key: usize,
    /// One read buffer for all connections: reads split their bytes off it.
    buf: BytesMut,
}

impl Server {
    /// Accepts until the backlog is empty: the listener is edge-triggered too.
    fn accept_all(&mut self, registry: &Registry) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                // Out of descriptors, say: give up on this edge rather than spin on it.
                Err(e) => return eprintln!("mio_proxy: accept: {e}"),
            };
            let key = self.next_key;
            self.next_key += 1;
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = registry.register(&mut stream, Token(2 * key), interest) {
                eprintln!("mio_proxy: register: {e}");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let (config, balancer) = (self.config.clone(), self.balancer.clone());
            let session = Session::new(config, balancer, PeerInfo::new(addr), Instant::now());
            let mut conn = Conn {
                key,
                session,
                client: Some(Pipe::new(stream, None)),
                upstream: None,
                deadline: None,
            };
            // The request may already be waiting; do not count on a first edge.
            conn.pump(registry, &mut self.buf);
            self.conns.insert(key, conn);
        }
    }

    /// Readiness on either socket of a connection: try everything. A spurious attempt costs a
    /// `WouldBlock`, and a stale event for a socket closed meanwhile is harmless.
    fn on_ready(&mut self, registry: &Registry, token: Token) {
        if let Some(conn) = self.conns.get_mut(&(token.0 / 2)) {
            conn.pump(registry, &mut self.buf);
        }
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.deadline).min()
    }

    fn expire_timers(&mut self, registry: &Registry, now: Instant) {
        for conn in self.conns.values_mut() {
            if conn.deadline.is_some_and(|d| d <= now) {
                conn.on_timeout(registry, &mut self.buf, now);
            }
        }
    }
}

/// Runs the proxy on `listener` until `stop` is set. Connections still open then are dropped.
pub fn run(
    listener: std::net::TcpListener,
    config: Config,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    config
        .validate()
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
    listener.set_nonblocking(true)?;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let balancer = Arc::new(Balancer::new(&config, std::time::Instant::now()));
    let mut server = Server {
        listener: TcpListener::from_std(listener),
        config: Arc::new(config),
        balancer,
        conns: HashMap::new(),
        next_key: 0,
        buf: BytesMut::new(),
    };
    poll.registry()
        .register(&mut server.listener, LISTENER, Interest::READABLE)?;

    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = (server.earliest_deadline())
            .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let registry = poll.registry();
        for event in events.iter() {
            match event.token() {
                LISTENER => server.accept_all(registry),
                token => server.on_ready(registry, token),
            }
        }
        server.expire_timers(registry, Instant::now());
        server.conns.retain(|_, conn| !conn.session.is_closed());
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let (Some(listen), Some(upstream)) = (flag("--listen"), flag("--upstream")) else {
        eprintln!("usage: mio_proxy --listen ADDR --upstream HOST:PORT");
        std::process::exit(2);
    };
    let peer = Peer::parse(&upstream)
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
    let listener = std::net::TcpListener::bind(&listen)?;
    eprintln!("mio_proxy: {} -> {peer}", listener.local_addr()?);
    let config = Config::new(UpstreamGroup::new(vec![peer]));
    run(listener, config, Arc::new(AtomicBool::new(false)))
}
