//! The vocabulary between the core and an adapter: what goes in ([`Input`]), what comes out
//! ([`Output`]), and the small identifiers both sides share.
//!
//! Nothing here performs IO; these are plain values that an event loop moves around.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::Peer;
use crate::event::Event;

/// One of the two connections a [`Session`](crate::Session) manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The downstream connection that was accepted from a client.
    Client,
    /// The connection the session opened to an upstream peer.
    Upstream,
}

impl Side {
    /// The other side: where bytes read from `self` are usually written.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Upstream => 1,
        }
    }
}

/// Names one upstream connection attempt of a session.
///
/// Every [`Output::Connect`] carries a fresh id (a generation counter), so an event about a
/// connection the session has already given up on — a connect that completes after its timeout
/// fired, say — is recognised as stale and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub u64);

/// The URL scheme the client used to reach the proxy; feeds `X-Forwarded-Proto` and `$scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Scheme {
    /// Plain HTTP (`ws://`).
    #[default]
    Http,
    /// TLS terminated by the adapter (`wss://`).
    Https,
}

impl Scheme {
    /// The scheme as it appears in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What the adapter knows about the accepted client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The client's address as seen on the socket.
    pub addr: SocketAddr,
    /// The address of the listener that accepted it, as bound (selects the virtual hosts that
    /// serve it); `None` when unknown.
    pub local: Option<SocketAddr>,
    /// How the client reached us.
    pub scheme: Scheme,
    /// The server name the client asked for in its TLS handshake (SNI), if any. Routing uses it
    /// as the virtual host of a request that carries no `Host` (HTTP/1.0).
    pub sni: Option<Arc<str>>,
}

impl PeerInfo {
    /// A plain-HTTP client at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        PeerInfo {
            addr,
            local: None,
            scheme: Scheme::Http,
            sni: None,
        }
    }

    /// The same client, accepted by the listener bound to `local`.
    pub fn with_local(mut self, local: SocketAddr) -> Self {
        self.local = Some(local);
        self
    }

    /// The same client, reached over `scheme`.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// The same client, over TLS (`https`), having asked for server name `sni`.
    pub fn with_tls(mut self, sni: Option<&str>) -> Self {
        self.scheme = Scheme::Https;
        self.sni = sni.map(Arc::from);
        self
    }
}

/// Why an upstream connection could not be made, as the adapter saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer actively refused the connection.
    #[error("connection refused")]
    Refused,
    /// The name did not resolve to any address.
    #[error("name resolution failed")]
    Resolve,
    /// The network or host is unreachable.
    #[error("peer unreachable")]
    Unreachable,
    /// The connect timeout passed first (reported by the session itself, not by adapters).
    #[error("connect timed out")]
    TimedOut,
    /// The TLS handshake with the upstream failed (its certificate did not verify, it spoke
    /// no TLS, or it refused ours).
    #[error("TLS handshake failed")]
    Tls,
    /// The proxy itself could not open a connection (out of file descriptors or buffer
    /// space): not the server's fault, so it is not marked failed and no other server is
    /// tried; the client gets a 503.
    #[error("no local resources for a connection (too many open files?)")]
    Local,
    /// Any other failure while connecting.
    #[error("connect failed")]
    Other,
}

/// Something that happened to the session's connections; fed in with
/// [`Session::handle_input`](crate::Session::handle_input).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Input {
    /// Bytes read from a side. Hand over a `Bytes` split off the read buffer: the core forwards
    /// body and tunnel bytes as slices of it without copying.
    Data {
        /// The side the bytes were read from.
        from: Side,
        /// The bytes, never empty (an empty read is [`Input::Eof`]).
        bytes: Bytes,
    },
    /// The side closed its write half (a read returned 0).
    Eof {
        /// The side that sent FIN.
        from: Side,
    },
    /// `len` bytes of earlier [`Output::Send`]s to `to` were written to the socket. The core
    /// uses this for backpressure, the send timeout, and to know when a side is flushed.
    /// Once an upstream connection has been released or closed, its writes are no longer
    /// reported: the count belongs to the session's current upstream.
    Sent {
        /// The side written to.
        to: Side,
        /// How many bytes the write accepted.
        len: usize,
    },
    /// The connection asked for by [`Output::Connect`] with this id is established.
    UpstreamConnected {
        /// The id from the `Connect` output.
        id: UpstreamId,
        /// True when the adapter handed out a pooled keep-alive connection instead of a new one.
        reused: bool,
    },
    /// The connection asked for by [`Output::Connect`] with this id could not be made.
    UpstreamFailed {
        /// The id from the `Connect` output.
        id: UpstreamId,
        /// What went wrong.
        why: ConnectError,
    },
    /// A read or write on that side failed (reset, broken pipe, …). The connection is unusable.
    Reset {
        /// The side whose socket failed.
        from: Side,
    },
}

/// Something the adapter must do, drained with [`Session::poll_output`](crate::Session::poll_output).
///
/// Outputs are in order. `Send`s to one side must be written in the order they were emitted.
/// The core emits `ShutdownWrite` and `Close` only once everything sent to that side has been
/// reported [`Input::Sent`] (or when it has decided to drop what is queued, e.g. after a send
/// timeout), so the adapter performs them at once and discards anything still queued.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Output {
    /// Open a connection to `peer`, then report [`Input::UpstreamConnected`] or
    /// [`Input::UpstreamFailed`] with this `id`. The session's connect timeout is running.
    Connect {
        /// Names this attempt in the events that answer it.
        id: UpstreamId,
        /// The peer the balancer chose.
        peer: Peer,
        /// Whether a pooled keep-alive connection to `peer` may be used. False when the session
        /// is retrying a request because a pooled connection turned out to be closed.
        allow_pooled: bool,
    },
    /// Write these bytes to the side, after everything sent to it before.
    Send {
        /// Where to write.
        to: Side,
        /// What to write: often a slice of an [`Input::Data`] buffer, unchanged.
        bytes: Bytes,
    },
    /// Shut down the write half of the side's socket (send FIN); keep reading from it.
    ShutdownWrite {
        /// The side to half-close.
        side: Side,
    },
    /// Close the side's socket now. After `Close { side: Client, .. }` the session is over.
    Close {
        /// The side to close.
        side: Side,
        /// What was sent to this side is cut short (a response the upstream broke off): an
        /// adapter with a closing handshake of its own (TLS's close_notify) must not say the
        /// end is clean.
        abort: bool,
    },
    /// The exchange on the current upstream connection is over and the session no longer owns
    /// it. If `reusable`, the adapter may keep it in its idle pool for another request to the
    /// same peer; otherwise it closes it.
    ReleaseUpstream {
        /// The connection being released.
        id: UpstreamId,
        /// True only when both messages were complete and nothing forbids reuse.
        reusable: bool,
    },
    /// A finished exchange or tunnel, for logging and metrics.
    Event(Event),
}
