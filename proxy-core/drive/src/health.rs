//! Scheduling active health checks: one task per checked server, which every interval opens a
//! connection (and, for an HTTP check, sends the core's request and reads the status line),
//! bounded by the check's timeout, and hands the result to the balancer. Every decision — what
//! to send, what passes, when a server goes down or comes back — is the core's
//! ([`proxy_core::health`]).

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use proxy_core::health::{self, HealthCheck, Verdict};
use proxy_core::Peer;

use crate::dns::Lookup;
use crate::link::Outbox;
use crate::runtime::{Runtime, Socket};
use crate::server::{sleep, Generation, Shared};
use crate::shutdown::{race, TaskGuard};
use crate::sys::{self, ReadOutcome, WriteOutcome};
use crate::tls::{Stream, TlsStream};
use bytes::Bytes;

/// Checks `server` of group `gi` of `generation` every interval until the shutdown, or until a
/// reload replaces the generation.
pub(crate) async fn check_server<R: Runtime>(
    shared: Arc<Shared<R>>,
    generation: Arc<Generation>,
    gi: usize,
    server: u16,
    check: HealthCheck,
    peer: Peer,
    _guard: TaskGuard,
) {
    loop {
        let deadline = Instant::now() + check.timeout;
        let passed = race(check_once(&shared, &peer, &check), async {
            sleep(&shared.rt, deadline).await;
            false
        })
        .await;
        match generation
            .balancer
            .health_result(&generation.config, gi, server, passed)
        {
            Some(true) => {
                tracing::info!(upstream = %peer, "upstream server passes its health check again")
            }
            Some(false) => {
                tracing::warn!(upstream = %peer, "upstream server fails its health check; skipping it")
            }
            None => {}
        }
        let next = Instant::now() + check.interval;
        let stop = race(
            async {
                shared.shutdown.triggered().await;
                true
            },
            async {
                sleep(&shared.rt, next).await;
                false
            },
        )
        .await;
        if stop || shared.current().id != generation.id {
            return;
        }
    }
}

/// One check: connect (and for a TLS peer, complete the handshake, which verifies its
/// certificate), and for HTTP, ask and judge the answer. Unbounded in time by itself; the
/// caller races it with the check's timeout.
async fn check_once<R: Runtime>(shared: &Arc<Shared<R>>, peer: &Peer, check: &HealthCheck) -> bool {
    let Some(addr) = address(shared, peer).await else {
        return false;
    };
    let Ok(socket) = sys::start_connect(&shared.rt, addr) else {
        return false;
    };
    poll_fn(|cx| socket.poll_write_ready(cx)).await;
    if sys::connect_result(&socket).is_err() {
        return false;
    }
    let mut stream = match peer.tls() {
        None => Stream::Plain(socket),
        Some(target) => {
            let Some(config) = shared.options.tls.client(&target.profile) else {
                return false;
            };
            let Ok(mut tls) = TlsStream::connect(socket, config, &target.server_name) else {
                return false;
            };
            if poll_fn(|cx| tls.poll_handshake(cx)).await.is_err() {
                return false;
            }
            tls.into_stream()
        }
    };
    let Some(request) = health::request(check, peer) else {
        return true;
    };
    if !send(&mut stream, request).await {
        return false;
    }
    let mut received = Vec::new();
    loop {
        if !stream.has_buffered_input() {
            poll_fn(|cx| stream.poll_read_ready(cx)).await;
        }
        let eof = match stream.read() {
            Ok(ReadOutcome::Data { bytes, .. }) => {
                received.extend_from_slice(&bytes);
                false
            }
            Ok(ReadOutcome::Eof) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        };
        match health::judge(check, &received, eof) {
            Verdict::Pending if !eof => {}
            Verdict::Pass => return true,
            _ => return false,
        }
    }
}

/// Writes all of `request`, through TLS if the stream has it; false if the peer went away.
async fn send<S: Socket>(stream: &mut Stream<S>, request: Bytes) -> bool {
    let mut queue = Outbox::default();
    queue.push(request);
    loop {
        let (taken, full) = match stream {
            Stream::Plain(socket) => match sys::write_queue(socket, &queue) {
                Ok(WriteOutcome::Wrote { n: 0, .. }) => return false,
                Ok(WriteOutcome::Wrote { n, full }) => (n, full),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => (0, true),
                Err(_) => return false,
            },
            Stream::Tls(tls) => match tls.flush(&queue) {
                Ok(step) => (step.taken, step.full),
                Err(_) => return false,
            },
        };
        queue.consume(taken);
        if queue.is_empty() && !stream.has_pending_output() {
            return true;
        }
        if full || taken == 0 {
            poll_fn(|cx| stream.poll_write_ready(cx)).await;
        }
    }
}

/// The first address of `peer`, resolved through the shared cache for a name.
async fn address<R: Runtime>(shared: &Arc<Shared<R>>, peer: &Peer) -> Option<SocketAddr> {
    if let Ok(ip) = peer.host().parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, peer.port()));
    }
    let now = Instant::now();
    match shared
        .dns
        .lookup(&shared.rt, &shared.options.stats, peer, now)
    {
        Lookup::Ready(addrs) => addrs.first().copied(),
        Lookup::Wait(lookup) => {
            let addrs = lookup.await.ok()?;
            shared.dns.store(peer, &addrs, now);
            addrs.first().copied()
        }
    }
}
