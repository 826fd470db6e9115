//! One client connection on async-io: wait for whatever the shared
//! [`Connection`](proxy_core::adapter::Connection) is interested in, do the syscall, report it.
//! Every decision is the session's; every piece of bookkeeping is the adapter kit's.

use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use async_io::{Async, Timer};
use proxy_core::adapter::{
    connect_error, idle_probe_ok, Action, Connection, Interest as Wanted, Turn,
};
use proxy_core::{Peer, PeerInfo, Session, Side, UpstreamId};

use crate::Shared;

type Connecting = Pin<Box<dyn Future<Output = io::Result<Async<TcpStream>>> + Send>>;

pub(crate) async fn run(stream: Async<TcpStream>, addr: SocketAddr, shared: Arc<Shared>) {
    // Small writes (frames, heads) must not wait for Nagle.
    let _ = stream.get_ref().set_nodelay(true);
    let session = Session::new(
        Arc::clone(&shared.config),
        Arc::clone(&shared.balancer),
        PeerInfo::new(addr),
        Instant::now(),
    );
    let mut conn = Connection::new(session, stream);
    let mut connecting: Option<(UpstreamId, Connecting)> = None;
    loop {
        let turn = conn.turn(
            Instant::now(),
            &shared.shutdown,
            shared.options.drain_timeout,
            write,
            |conn, action| perform(&shared, conn, &mut connecting, action),
        );
        match turn {
            Turn::Closed => break,
            Turn::Again => continue,
            Turn::Wait(interest) if !interest.any(connecting.is_some()) => {
                // Nothing can wake this connection: the session has no way forward; end it
                // rather than wait forever.
                tracing::warn!(client = %addr, "connection has nothing left to wait for; closing");
                break;
            }
            Turn::Wait(interest) => wait(&shared, &mut conn, &mut connecting, interest).await,
        }
    }
}

fn write(s: &Async<TcpStream>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    Write::write_vectored(&mut s.get_ref(), bufs)
}

fn read(s: &Async<TcpStream>, buf: &mut [u8]) -> io::Result<usize> {
    Read::read(&mut s.get_ref(), buf)
}

fn perform(
    shared: &Shared,
    conn: &mut Connection<Async<TcpStream>>,
    connecting: &mut Option<(UpstreamId, Connecting)>,
    action: Action<Async<TcpStream>>,
) {
    match action {
        Action::Connect {
            id,
            peer,
            allow_pooled,
        } => {
            if allow_pooled {
                if let Some(stream) = shared.pool.checkout(&peer, Instant::now(), |s| {
                    idle_probe_ok(Read::read(&mut s.get_ref(), &mut [0u8; 1]))
                }) {
                    drop(conn.connected(id, stream, true, Instant::now()));
                    return;
                }
            }
            *connecting = Some((id, Box::pin(connect(peer))));
        }
        Action::ShutdownWrite(side) => {
            if let Some(s) = conn.socket(side) {
                // An error means the peer is gone, which the next read reports.
                let _ = s.get_ref().shutdown(std::net::Shutdown::Write);
            }
        }
        Action::Closed(Side::Upstream) => *connecting = None,
        Action::Closed(Side::Client) => {}
        Action::Release {
            socket,
            peer,
            reusable,
        } => {
            shared.pool.release(&peer, socket, reusable, Instant::now());
        }
        Action::Event(log) => (shared.options.events)(&log),
        other => tracing::debug!(?other, "action not handled by this adapter version"),
    }
}

/// Resolves `peer` on the blocking pool (name lookup is a blocking call) and connects to the
/// first address that accepts.
async fn connect(peer: Peer) -> io::Result<Async<TcpStream>> {
    let (host, port) = (peer.host().to_owned(), peer.port());
    let addrs: Vec<SocketAddr> = blocking::unblock(move || {
        (host.as_str(), port)
            .to_socket_addrs()
            .map(Iterator::collect)
    })
    .await?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in addrs {
        match Async::<TcpStream>::connect(addr).await {
            Ok(s) => {
                let _ = s.get_ref().set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sleeps until a socket the connection is interested in is ready, a connect finishes, the
/// deadline passes, or shutdown begins; then does the IO and reports it.
async fn wait(
    shared: &Shared,
    conn: &mut Connection<Async<TcpStream>>,
    connecting: &mut Option<(UpstreamId, Connecting)>,
    interest: Wanted,
) {
    enum Wake {
        Read(Side),
        Write,
        Connected(io::Result<Async<TcpStream>>),
        Timer,
        Shutdown,
    }
    let draining = conn.is_draining();
    let mut timer = interest.deadline.map(Timer::at);
    let mut shutdown = shared.shutdown.triggered();
    let wake = {
        let client = conn.socket(Side::Client);
        let upstream = conn.socket(Side::Upstream);
        let sockets = [client, upstream];
        poll_fn(|cx| {
            // A readiness error resurfaces from the read or write itself, which reports it.
            for (side, socket) in [Side::Client, Side::Upstream].into_iter().zip(sockets) {
                let Some(s) = socket else { continue };
                let i = usize::from(side == Side::Upstream);
                if interest.read[i] && s.poll_readable(cx).is_ready() {
                    return Poll::Ready(Wake::Read(side));
                }
                if interest.write[i] && s.poll_writable(cx).is_ready() {
                    return Poll::Ready(Wake::Write);
                }
            }
            if let Some((_, fut)) = connecting.as_mut() {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Wake::Connected(r));
                }
            }
            if let Some(t) = timer.as_mut() {
                if Pin::new(t).poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
            }
            if !draining && Pin::new(&mut shutdown).poll(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            Poll::Pending
        })
        .await
    };
    let now = Instant::now();
    match wake {
        Wake::Read(side) => conn.read_with(side, now, read),
        Wake::Write | Wake::Shutdown => {}
        Wake::Timer => conn.timeout(now),
        Wake::Connected(result) => {
            let Some((id, _)) = connecting.take() else {
                return;
            };
            match result {
                Ok(stream) => drop(conn.connected(id, stream, false, now)),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream connect failed");
                    conn.connect_failed(id, connect_error(&e), now);
                }
            }
        }
    }
}
