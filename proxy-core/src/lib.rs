//! # proxy-core — switchyard's sans-IO proxy state machine
//!
//! This crate is the whole protocol brain of switchyard, a reverse proxy for HTTP/1.1 and
//! WebSocket: request validation and rewriting, the upgrade handshake and its `101` check, body
//! framing, keep-alive, the tunnel with half-close, every timeout, and peer choice. It does no
//! IO: it consumes bytes, connection events and the current time, and emits actions. No sockets,
//! no async, no threads, no clock reads — so it runs in any event loop and is deterministic: the
//! same inputs give the same outputs.
//!
//! ## Driving a session
//!
//! One [`Session`] per accepted client connection. An adapter (the tokio and smol crates, or your
//! own loop) does four things, over and over:
//!
//! 1. feed what happened: [`Session::handle_input`] with an [`Input`] (bytes read, EOF, bytes
//!    written, an upstream connect result), or [`Session::handle_timeout`] when the deadline
//!    from [`Session::poll_timeout`] has passed;
//! 2. **drain [`Session::poll_output`] until it returns `None`**, performing each [`Output`] in
//!    order (connect, send, shut down, close, release, log);
//! 3. re-read [`Session::poll_timeout`] and [`Session::wants_read`] for each side;
//! 4. wait for socket readiness or the deadline, whichever comes first.
//!
//! **Invariant: after every `handle_*` call (and [`Session::start_drain`]), drain `poll_output`
//! until `None`, then re-read `poll_timeout`.** Outputs that are not drained are not lost, but
//! the deadline and backpressure answers only describe the state after the drain.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use bytes::Bytes;
//! use proxy_core::{Balancer, Config, Input, Output, Peer, PeerInfo, Session, Side, UpstreamGroup};
//!
//! let config = Arc::new(Config::new(UpstreamGroup::new(vec![Peer::new("127.0.0.1", 9000)])));
//! config.validate().expect("a valid config");
//! let now = Instant::now();
//! let balancer = Arc::new(Balancer::new(&config, now));
//! let mut session = Session::new(config, balancer, PeerInfo::new("127.0.0.1:50000".parse().unwrap()), now);
//!
//! // The client's socket became readable: hand the bytes over, zero-copy.
//! let request = Bytes::from_static(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
//! session.handle_input(now, Input::Data { from: Side::Client, bytes: request });
//!
//! // Drain: the session wants an upstream connection.
//! let mut connect_id = None;
//! while let Some(output) = session.poll_output() {
//!     match output {
//!         Output::Connect { id, peer, .. } => {
//!             assert_eq!(peer.to_string(), "127.0.0.1:9000");
//!             connect_id = Some(id); // a real adapter starts a connect here
//!         }
//!         Output::Event(_) => {} // the chosen upstream, for logs and metrics
//!         other => panic!("unexpected {other:?}"),
//!     }
//! }
//! // The connect timeout is armed.
//! assert!(session.poll_timeout().is_some());
//!
//! // The connection succeeded: the rewritten head comes out, ready to write upstream.
//! session.handle_input(now, Input::UpstreamConnected { id: connect_id.unwrap(), reused: false });
//! match session.poll_output() {
//!     Some(Output::Send { to: Side::Upstream, bytes }) => {
//!         assert!(bytes.starts_with(b"GET / HTTP/1.1\r\nHost: example.com\r\n"));
//!         // ...write them, then report how many the socket took:
//!         session.handle_input(now, Input::Sent { to: Side::Upstream, len: bytes.len() });
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! while session.poll_output().is_some() {}
//! ```
//!
//! ## The rules it enforces
//!
//! * Heads are re-serialised canonically, never copied through; hop-by-hop fields and every
//!   field named in `Connection` are removed before the proxy adds `Host`, `X-Forwarded-For`,
//!   `X-Forwarded-Proto`, `X-Forwarded-Host`, configured fields, and its own framing.
//! * Ambiguous framing is refused (RFC 9112 §6): `Content-Length` with `Transfer-Encoding`,
//!   codings other than a single `chunked`, bad lengths, bare LF, obs-fold, missing or doubled
//!   `Host`. The client gets a 4xx/5xx with `Connection: close`; the upstream gets nothing.
//! * A connection becomes a tunnel only after a genuine `101`: the upgrade was requested
//!   (`GET`, HTTP/1.1, no body, `Connection: upgrade`, an allowed `Upgrade`), the `101` names the
//!   same protocol, and for websocket its `Sec-WebSocket-Accept` matches the client's key.
//!   Until then client bytes are held, not forwarded. Anything else is a 502 or an ordinary
//!   response.
//! * Nothing is buffered without bound: heads up to the head limit, held bytes up to
//!   `max_held`, and in-flight bytes per direction up to `queue` before [`Session::wants_read`]
//!   says stop. Body and tunnel bytes leave as the very `Bytes` that came in.
//!
//! ## Timeouts and limits
//!
//! All of them, with defaults and their nginx equivalents, are in one table in the [`config`]
//! module docs. Time only ever enters as an argument; a session keeps the latest `now` it has
//! seen, so time never runs backwards inside it.
//!
//! ## Where things live
//!
//! * [`config`] — the plain-data configuration and its defaults.
//! * [`Session`] — the state machine; its module docs draw the lifecycle.
//! * [`VirtualHost`], [`Route`] — routing by `Host` and path (nginx `server` / `location`).
//! * [`Balancer`] — the shared server-choice state of every [`UpstreamGroup`]: the balancing
//!   methods, passive health and failover accounting.
//! * [`IdlePool`] — upstream keep-alive pool bookkeeping, shared by every adapter.
//!
//! The async drive loop that switchyard's own adapters run (futures, wakers, sockets) is not
//! here: it is the `proxy-drive` crate, beside this one, so that this crate keeps its promise.
//! * [`Input`], [`Output`], [`Event`] — the vocabulary with adapters.

pub mod config;

mod balance;
mod body;
mod error;
mod event;
mod fields;
mod frame;
mod head;
pub mod health;
mod io;
mod pool;
pub mod proxy_protocol;
mod request;
mod response;
mod route;
mod session;
mod timer;
mod upgrade;

pub use balance::{key_hash, Balancer, Choice};
pub use config::{
    BalanceMethod, Config, HashKey, HeaderRule, HostPolicy, IpNet, KeyPart, Limits, Peer,
    ProxyProtocol, Template, Timeouts, TlsTarget, UpstreamGroup, UpstreamServer, Variable,
    WebSocket, DEFAULT_GROUP,
};
pub use error::{ConfigError, RequestError, ResponseError};
pub use event::{CloseReason, Event, ExchangeLog, FrameCounts, WebSocketLog};
pub use io::{ConnectError, Input, Output, PeerInfo, Scheme, Side, UpstreamId};
pub use pool::IdlePool;
pub use route::{PathMatch, Route, RouteSettings, ServerName, VirtualHost};
pub use session::Session;
pub use timer::Timer;
pub use upgrade::websocket_accept;
