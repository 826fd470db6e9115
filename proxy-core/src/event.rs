//! What the session reports about finished work: one [`Event::Exchange`] per request/response
//! exchange (or refused request) and one per tunnel, at its end. Adapters turn these into access
//! log lines and metrics; the core never formats a log line itself.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Peer;
use crate::error::{RequestError, ResponseError};
use crate::io::{ConnectError, Side};
use crate::proxy_protocol::ProxyError;
use crate::timer::Timer;

/// A report from a session: one per finished exchange or tunnel, and the moments balancing and
/// metrics care about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An exchange or a tunnel finished.
    Exchange(Box<ExchangeLog>),
    /// A request was assigned to this upstream server (each attempt, retries included).
    UpstreamChosen {
        /// The server.
        peer: Peer,
    },
    /// A connection to this upstream server failed; the request moves on to another server if
    /// the group allows, else the client gets a 502 or 504.
    UpstreamFailed {
        /// The server.
        peer: Peer,
        /// Why.
        cause: ConnectError,
    },
    /// A genuine `101` turned the connection into a tunnel to this server.
    TunnelOpened {
        /// The server.
        peer: Peer,
    },
    /// A tunnel to this server ended (the balancer no longer counts it).
    TunnelClosed {
        /// The server.
        peer: Peer,
        /// How long it was open.
        duration: Duration,
    },
}

/// Everything an access log line needs about one exchange or tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExchangeLog {
    /// The client's address.
    pub client: SocketAddr,
    /// `METHOD target HTTP/1.x` as received, or as much of it as could be read.
    pub request_line: String,
    /// The client's `Host` (or absolute-form authority).
    pub host: Option<String>,
    /// The client's `Referer`, truncated.
    pub referer: Option<String>,
    /// The client's `User-Agent`, truncated.
    pub user_agent: Option<String>,
    /// The final status sent to the client (`101` for a tunnel), if a response head was sent.
    pub status: Option<u16>,
    /// Bytes received from the client for this exchange (head, body, and tunnel bytes).
    pub bytes_from_client: u64,
    /// Bytes sent to the client for this exchange (heads, body, and tunnel bytes).
    pub bytes_to_client: u64,
    /// Of those, bytes after the response head(s) (nginx's `$body_bytes_sent`).
    pub body_bytes_to_client: u64,
    /// The upstream peer, if one was chosen (`Display` gives `host:port`).
    pub upstream: Option<Peer>,
    /// From the first byte of the request to the end of the exchange.
    pub request_time: Duration,
    /// Time to establish the upstream connection.
    pub upstream_connect_time: Option<Duration>,
    /// From the connect attempt to the end of the response head.
    pub upstream_header_time: Option<Duration>,
    /// From the connect attempt to the end of the response (or the tunnel).
    pub upstream_response_time: Option<Duration>,
    /// Upstream servers tried before the one that answered (or all of them, for a 502/504),
    /// each with why its connection failed, in order.
    pub upstream_failures: Vec<(Peer, ConnectError)>,
    /// Whether the request offered a protocol switch the proxy accepted to pass on (an
    /// upgrade attempt; see `upgraded` for whether it succeeded).
    pub upgrade_offered: bool,
    /// Whether the exchange became a tunnel.
    pub upgraded: bool,
    /// How long the tunnel lasted.
    pub tunnel_duration: Option<Duration>,
    /// What the frame-aware tunnel counted (`None` for an opaque tunnel or no tunnel).
    pub websocket: Option<WebSocketLog>,
    /// Why the client connection closed after this exchange; `None` if it stays open.
    pub close: Option<CloseReason>,
}

/// What a frame-aware tunnel saw, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WebSocketLog {
    /// Frames and messages the client sent.
    pub from_client: FrameCounts,
    /// Frames and messages the upstream sent.
    pub from_upstream: FrameCounts,
    /// Pings the proxy sent of its own (both sides).
    pub proxy_pings: u64,
}

/// Counts for one direction of a frame-aware tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FrameCounts {
    /// Frames, control frames included.
    pub frames: u64,
    /// Complete messages (counted at their final frame).
    pub messages: u64,
    /// The status code of the Close frame this side sent, if it sent one (1005 for a Close
    /// without a code).
    pub close_code: Option<u16>,
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The exchange ended and HTTP says the connection ends with it (`Connection: close`,
    /// HTTP/1.0, a read-until-close body, the request limit, or a drain).
    #[error("completed")]
    Completed,
    /// The client closed its side first.
    #[error("client closed")]
    ClientClosed,
    /// The upstream closed its side first.
    #[error("upstream closed")]
    UpstreamClosed,
    /// The client connection failed.
    #[error("client connection reset")]
    ClientReset,
    /// The upstream connection failed.
    #[error("upstream connection reset")]
    UpstreamReset,
    /// A timer expired.
    #[error("timeout: {0:?}")]
    Timeout(Timer),
    /// The client sent something the proxy refuses.
    #[error("bad request: {0}")]
    BadRequest(RequestError),
    /// The upstream sent something the proxy refuses.
    #[error("bad upstream response: {0}")]
    BadResponse(ResponseError),
    /// No upstream connection could be made.
    #[error("upstream connect failed: {0}")]
    ConnectFailed(ConnectError),
    /// The adapter delivered far more client bytes than [`Session::wants_read`](crate::Session::wants_read)
    /// allowed; the session refuses to hold them.
    #[error("input overflow")]
    Overflow,
    /// A listener requiring the PROXY protocol got no valid header, or got it from an
    /// untrusted source (`None`); the connection was closed without an answer.
    #[error("PROXY protocol: {}", match .0 { Some(e) => e.to_string(), None => "untrusted source".to_owned() })]
    ProxyProtocol(Option<ProxyError>),
    /// Every upstream server was busy (at `max_conns`): the request was not sent.
    #[error("no upstream server available")]
    NoUpstream,
    /// A graceful drain's deadline ended the tunnel (or, on a frame-aware tunnel, the drain's
    /// Close 1001 and the closing handshake did).
    #[error("drained")]
    Drain,
    /// A peer of a frame-aware tunnel did not answer the proxy's Ping in time.
    #[error("{0:?} did not answer a ping: dead")]
    PeerDead(Side),
    /// A peer of a frame-aware tunnel sent a frame or message over the limit (Close 1009).
    #[error("{0:?} sent a message over the limit")]
    MessageTooBig(Side),
    /// A peer of a frame-aware tunnel broke WebSocket framing, or a client sent an unmasked
    /// frame (Close 1002).
    #[error("{0:?} broke the WebSocket protocol")]
    WebSocketProtocol(Side),
}
