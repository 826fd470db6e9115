//! One client connection on tokio: wait for whatever the shared
//! [`Connection`](proxy_core::adapter::Connection) is interested in, do the syscall, report it.
//! Every decision is the session's; every piece of bookkeeping is the adapter kit's.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use proxy_core::adapter::{
    connect_error, idle_probe_ok, Action, Connection, Interest as Wanted, Turn,
};
use proxy_core::{PeerInfo, Session, Side, UpstreamId};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::Shared;

type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

pub(crate) async fn run(stream: TcpStream, addr: SocketAddr, shared: Arc<Shared>) {
    // Small writes (frames, heads) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
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
            |s, b| s.try_write_vectored(b),
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

fn perform(
    shared: &Shared,
    conn: &mut Connection<TcpStream>,
    connecting: &mut Option<(UpstreamId, Connecting)>,
    action: Action<TcpStream>,
) {
    match action {
        Action::Connect {
            id,
            peer,
            allow_pooled,
        } => {
            if allow_pooled {
                if let Some(stream) = shared.pool.checkout(&peer, Instant::now(), |s| {
                    idle_probe_ok(s.try_read(&mut [0u8; 1]))
                }) {
                    drop(conn.connected(id, stream, true, Instant::now()));
                    return;
                }
            }
            let (host, port) = (peer.host().to_owned(), peer.port());
            *connecting = Some((
                id,
                Box::pin(async move { TcpStream::connect((host.as_str(), port)).await }),
            ));
        }
        Action::ShutdownWrite(side) => {
            if let Some(s) = conn.socket(side) {
                // An error means the peer is gone, which the next read reports.
                let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
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

/// Sleeps until a socket the connection is interested in is ready, a connect finishes, the
/// deadline passes, or shutdown begins; then does the IO and reports it.
async fn wait(
    shared: &Shared,
    conn: &mut Connection<TcpStream>,
    connecting: &mut Option<(UpstreamId, Connecting)>,
    interest: Wanted,
) {
    enum Wake {
        Read(Side),
        Write,
        Connected(io::Result<TcpStream>),
        Timer,
        Shutdown,
    }
    let draining = conn.is_draining();
    let [read_client, read_upstream] = interest.read;
    let [write_client, write_upstream] = interest.write;
    let client = conn.socket(Side::Client);
    let upstream = conn.socket(Side::Upstream);
    let is_connecting = connecting.is_some();
    let connect = async {
        match connecting.as_mut() {
            Some((_, f)) => f.await,
            None => std::future::pending().await,
        }
    };
    let sleep = async {
        match interest.deadline {
            Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
            None => std::future::pending().await,
        }
    };
    // A readiness error resurfaces from the read or write itself, which reports it.
    let wake = tokio::select! {
        _ = ready(client, Interest::READABLE), if read_client => Wake::Read(Side::Client),
        _ = ready(upstream, Interest::READABLE), if read_upstream => Wake::Read(Side::Upstream),
        _ = ready(client, Interest::WRITABLE), if write_client => Wake::Write,
        _ = ready(upstream, Interest::WRITABLE), if write_upstream => Wake::Write,
        r = connect, if is_connecting => Wake::Connected(r),
        () = sleep, if interest.deadline.is_some() => Wake::Timer,
        () = shared.shutdown.triggered(), if !draining => Wake::Shutdown,
    };
    let now = Instant::now();
    match wake {
        Wake::Read(side) => conn.read_with(side, now, |s, buf| s.try_read(buf)),
        Wake::Write | Wake::Shutdown => {}
        Wake::Timer => conn.timeout(now),
        Wake::Connected(result) => {
            let Some((id, _)) = connecting.take() else {
                return;
            };
            match result {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    drop(conn.connected(id, stream, false, now));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upstream connect failed");
                    conn.connect_failed(id, connect_error(&e), now);
                }
            }
        }
    }
}

async fn ready(stream: Option<&TcpStream>, interest: Interest) -> io::Result<tokio::io::Ready> {
    match stream {
        Some(s) => s.ready(interest).await,
        None => std::future::pending().await,
    }
}
